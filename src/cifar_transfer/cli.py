"""`cifar-transfer`: a thin command line over the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .data import CLASSES
from .errors import CifarTransferError
from .recipe import PRESETS, compose, preset

EPILOG = """Data is looked for in --data-dir, then $CIFAR_TRANSFER_DATA, then ./data (the official
cifar-10-batches-py/ folder, cifar-10-python.tar.gz, or train.npz + test.npz), and downloaded into ./data
if none holds it. Weights: --weights, else $CIFAR_TRANSFER_WEIGHTS, else torchvision's (downloaded)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-transfer", description=(
        "Fine-tune an ImageNet ResNet-50 on CIFAR-10 in two phases and report where it fails."), epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train, evaluate and write a report", epilog=EPILOG,
                       description="Train a recipe (a preset plus --set overrides), evaluate it on the 10,000 "
                                   "test images and write runs/<name>/ with metrics, figures and a report.")
    r.add_argument("--preset", default="auto", choices=[*PRESETS, "auto"],
                   help="auto (default): strong with CUDA, lean without; seed: the literal original recipe; "
                        "strong: 224 px, for a GPU; lean: the original claim on a CPU; smoke: a one-minute check")
    _recipe_file(r)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set finetune_epochs=5 (repeatable); applied last")
    r.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    _common(r, out=True)
    _human(r)

    a = sub.add_parser("analyze", help="error analysis of a saved run",
                       description="Calibration (ECE, temperature scaling on the validation set), flip TTA, human "
                                   "ambiguity (CIFAR-10H), Grad-CAM centre vs border, and accuracy under common "
                                   "corruptions; written to RUN_DIR/analysis/.")
    a.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    a.add_argument("--data-dir", help="folder holding CIFAR-10")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a.add_argument("--no-download", action="store_true", help="never download CIFAR-10; fail if it is not found")
    _human(a)

    rp = sub.add_parser("repeat", help="run a recipe with several seeds: mean and std of accuracy and leakage",
                        description="Runs the recipe with seeds 0..N-1 (each its own training subsample and head "
                                    "initialisation) into OUT/seed-K/ and writes OUT/repeat.json and a report.")
    rp.add_argument("--preset", default="smoke", choices=[*PRESETS, "auto"], help="default smoke")
    rp.add_argument("--seeds", type=int, default=3, help="how many runs (default 3)")
    _recipe_file(rp)
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (repeatable); applied last")
    _common(rp, out=True)

    e = sub.add_parser("eda", help="sample images and class counts", epilog=EPILOG,
                       description="Write samples.png and class_counts.png for the default split.")
    e.add_argument("--out", type=Path, default=Path("runs/eda"), help="folder for the figures (default runs/eda)")
    e.add_argument("--data-dir", help="folder holding CIFAR-10")
    e.add_argument("--no-download", action="store_true", help="never download CIFAR-10; fail if it is not found")
    e.add_argument("--preset", default="seed", choices=list(PRESETS), help="whose split sizes and seed to use")

    v = sub.add_parser("evaluate", help="re-evaluate a saved run on the test set or another dataset",
                       description="Evaluate RUN_DIR/model.safetensors; results go to RUN_DIR/evaluations/<data>/.")
    v.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    v.add_argument("--data", help="an .npz (images N x 32 x 32 x 3 uint8, labels), a CIFAR-10 folder, or a folder of "
                                  "photos with one subfolder per class name (airplane/, cat/, ...; any format "
                                  "and size, prepared as predict prepares them); default: the CIFAR-10 test set")
    v.add_argument("--tta", action="store_true", help="average each prediction with the mirror image's")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda")
    v.add_argument("--no-download", action="store_true", help="never download CIFAR-10; fail if it is not found")

    lr = sub.add_parser("lr-find", help="learning-rate range test for phase 1 or 2",
                        description="Grow the learning rate exponentially over training batches (never validation "
                                    "or test images) on a copy of the model until the smoothed loss exceeds 4x its "
                                    "best; writes lr_find.json (with the suggested rate) and lr_find.png.")
    lr.add_argument("--preset", default="auto", choices=[*PRESETS, "auto"], help="the recipe to test (default auto)")
    _recipe_file(lr)
    lr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lr.add_argument("--phase", type=int, choices=(1, 2), default=1, help="1: the head; 2: the fine-tune")
    lr.add_argument("--from", dest="start_from", type=Path, metavar="RUN_DIR",
                    help="start from a saved run's model (the sensible start for --phase 2) instead of the "
                         "pretrained weights with a fresh head")
    lr.add_argument("--steps", type=int, default=100, help="most optimizer steps (default 100)")
    lr.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lr.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    _common(lr, out=True)

    t = sub.add_parser("tune", help="an Optuna study over recipe fields, scored on validation accuracy",
                       description="Sample recipes from a search space, train each as a run folder OUT/trial-NNNN "
                                   "(training and validation images only: the test set is never read), prune poor "
                                   "trials after any epoch, and write the best recipe (best_recipe.json, for run "
                                   "--recipe), study.json and a report. Workers on one or many machines that give "
                                   "the same --storage and --study share one study.", epilog=EPILOG)
    t.add_argument("--preset", default="auto", choices=[*PRESETS, "auto"], help="the base recipe (default auto)")
    _recipe_file(t)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base recipe field (repeatable); applied last")
    t.add_argument("--space", type=Path, metavar="FILE",
                   help="search space, TOML or JSON: a table per field with low, high (log, step) or choices; "
                        "default: the preset's")
    t.add_argument("--trials", type=int, default=20, help="the study's total trials, across all workers (default 20)")
    t.add_argument("--study", help="study name; workers giving the same name join one study (default: OUT's name)")
    t.add_argument("--storage", metavar="URL", help="Optuna storage: default sqlite:///OUT/study.db; for workers on "
                                                    "several machines postgresql://USER:PASSWORD@HOST/DB")
    t.add_argument("--pruner", default="median", choices=["median", "asha", "none"],
                   help="stop poor trials early: median (default) or asha (successive halving)")
    t.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="a worker's trials are marked failed this long times two after it dies (default 60)")
    t.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (give each worker its own)")
    _common(t, out=True)

    c = sub.add_parser("compare", help="finished runs side by side: recipe differences, results, curves",
                       description="One table of the recipe fields that differ, test accuracy and loss, times and "
                                   "machine; leakage rates; learning curves overlaid. Markdown, HTML and PNG.")
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", type=Path, help="folder for the comparison (default runs/compare-<time>)")

    pr = sub.add_parser("predict", help="classify image files with a trained model",
                        description="Classify images (PNG, JPEG, WebP, BMP, ...; any size, alpha or greyscale). "
                                    "Each is centre-cropped to a square and downscaled (Lanczos) to 32x32 RGB, "
                                    "as CIFAR-10 images were made.")
    pr.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    pr.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    pr.add_argument("--top", type=_top, default=3, help=f"how many classes to show, 1-{len(CLASSES)} (default 3)")
    pr.add_argument("--json", action="store_true", help="print JSON for machines")
    pr.add_argument("--no-calibration", action="store_true",
                    help="raw softmax probabilities, without the temperature fitted on the validation split")
    pr.add_argument("--tta", action="store_true", help="average with the mirror image (flip test-time augmentation)")

    s = sub.add_parser("serve", help="serve a trained model over HTTP, with an upload page",
                       description="POST /predict, POST /predict/batch, GET /health, GET /docs and an upload "
                                   "page at /.")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-bytes", type=int, default=10_000_000, help="largest accepted image (default 10 MB)")
    s.add_argument("--max-images", type=int, default=32, help="most images in one /predict/batch request")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")

    x = sub.add_parser("export", help="export a trained model to ONNX",
                       description="Export RUN_DIR/model.safetensors to ONNX; the file is written only if ONNX "
                                   "Runtime reproduces PyTorch's logits within 1e-4.")
    x.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    x.add_argument("--onnx", type=Path, required=True, metavar="OUT.onnx", help="where to write the model")
    x.add_argument("--no-calibration", action="store_true",
                   help="the 'probabilities' output without the model's temperature (plain softmax)")
    return p


def _common(p: argparse.ArgumentParser, out: bool) -> None:
    p.add_argument("--data-dir", help="folder holding CIFAR-10 (see below)")
    p.add_argument("--weights", default=None, help="'imagenet' (torchvision, downloaded), a .safetensors or a "
                                                   ".pth state_dict in torchvision's key names; default "
                                                   "$CIFAR_TRANSFER_WEIGHTS, else imagenet (with --resume: the "
                                                   "weights the run started from)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10; fail if it is not found")
    if out:
        p.add_argument("--out", type=Path, help="run folder (default runs/<preset>-<time>)")


def _recipe_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=Path, metavar="FILE",
                   help="recipe fields from a file: JSON (a run's recipe.json) or TOML, any subset; applied over "
                        "the preset, under --set")


def _top(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= len(CLASSES):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number from 1 to {len(CLASSES)}")
    return int(text)


def _human(p: argparse.ArgumentParser) -> None:
    p.add_argument("--human-labels", type=Path, default=os.environ.get("CIFAR_TRANSFER_HUMAN_LABELS"),
                   metavar="DIR", help="CIFAR-10H folder (cifar10h-probs.npy) for the human-ambiguity analysis; "
                                       "default $CIFAR_TRANSFER_HUMAN_LABELS; without it the section is skipped")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.out or args.resume):
        parser.error("under torchrun, give --out (or --resume): every process must name the same run folder")
    from . import pipeline  # torch, torchvision, scikit-learn: after parsing, so --help and usage errors are instant

    out = None
    try:
        if args.command == "run":
            name, chosen_by = pipeline.resolve_preset(args.preset, args.device)
            recipe = compose(name, args.recipe, args.overrides)  # --resume: the checkpoint's recipe replaces it
            out = args.resume or args.out or pipeline.default_run_dir(recipe.name)
            metrics = pipeline.run(recipe, out, data_dir=args.data_dir, weights=args.weights,
                                   device=args.device, resume=bool(args.resume),
                                   progress=not args.no_progress, download=not args.no_download,
                                   human_labels=args.human_labels, chosen_by=None if args.resume else chosen_by)
            if metrics is not None:  # under torchrun, rank 0 reports
                print(f"test accuracy {metrics['test']['accuracy']:.4f} ({metrics['timings']['total_s']:.0f} s); "
                      f"report: {out / 'report.html'}")
        elif args.command == "analyze":
            _, where = pipeline.analyze_saved(args.run_dir, args.data_dir, args.human_labels, args.device,
                                              download=not args.no_download)
            print(f"report: {where / 'report.html'}")
        elif args.command == "repeat":
            recipe = compose(pipeline.resolve_preset(args.preset, args.device)[0], args.recipe, args.overrides)
            out = args.out or pipeline.default_run_dir(f"{recipe.name}-repeat")
            result = pipeline.repeat(recipe, args.seeds, out, data_dir=args.data_dir,
                                     weights=args.weights or pipeline.default_weights(), device=args.device,
                                     progress=not args.no_progress, download=not args.no_download)
            acc = result["summary"]["test accuracy"]
            print(f"test accuracy {acc['mean']:.4f} ± {acc['std']:.4f} over {args.seeds} seeds; "
                  f"report: {out / 'report.html'}")
        elif args.command == "eda":
            from .data import load_cifar10, split

            r = preset(args.preset)
            train, test = load_cifar10(args.data_dir, allow_download=not args.no_download)
            pipeline.check_writable(args.out)
            pipeline.eda(split(train, test, r.train_size, r.val_size, r.seed), args.out, r.seed)
            print(f"wrote {args.out / 'samples.png'} and {args.out / 'class_counts.png'}")
        elif args.command == "evaluate":
            metrics, where = pipeline.evaluate_saved(args.run_dir, args.data, args.device,
                                                    download=not args.no_download, tta=args.tta)
            skipped = metrics["skipped"]
            for line in skipped:
                print(f"skipped: {line}", file=sys.stderr)
            print(f"accuracy {metrics['test']['accuracy']:.4f} on {metrics['test']['n']} images"
                  f"{f' ({len(skipped)} skipped)' if skipped else ''}; report: {where / 'report.html'}")
        elif args.command == "lr-find":
            from .lr_find import lr_find_command

            recipe = compose(pipeline.resolve_preset(args.preset, args.device)[0], args.recipe, args.overrides)
            out = args.out or pipeline.default_run_dir(f"lr-find-{recipe.name}")
            result = lr_find_command(recipe, out, phase=args.phase, start_from=args.start_from,
                                     data_dir=args.data_dir, weights=args.weights, device=args.device,
                                     download=not args.no_download, steps=args.steps, start=args.start, end=args.end)
            found = f"{result['suggestion']:.2e} ({result['method']})" if result["suggestion"] else result["method"]
            print(f"suggested learning rate {found} after {result['steps']} steps; plot: {out / 'lr_find.png'}")
        elif args.command == "tune":
            from .tune import read_space, tune

            recipe = compose(pipeline.resolve_preset(args.preset, args.device)[0], args.recipe, args.overrides)
            out = args.out or pipeline.default_run_dir(f"tune-{recipe.name}")
            result = tune(recipe, out, space=read_space(args.space) if args.space else None, storage=args.storage,
                          study_name=args.study, trials=args.trials, pruner=args.pruner, heartbeat=args.heartbeat,
                          sampler_seed=args.sampler_seed, data_dir=args.data_dir, weights=args.weights,
                          device=args.device, download=not args.no_download, progress=not args.no_progress)
            best = result["best"]
            found = (f"best validation accuracy {best['value']:.4f} (trial {best['number']}); best recipe: "
                     f"{best['recipe_file']}") if best else "no trial completed"
            print(f"{found}; report: {out / 'report.html'}")
        elif args.command == "compare":
            from .compare import compare

            out = args.out or pipeline.default_run_dir("compare")
            result = compare(args.run_dirs, out)
            best = max(result["runs"], key=lambda r: r["accuracy"])
            print(f"best test accuracy {best['accuracy']:.4f} ({best['run']}); report: {out / 'report.html'}")
        elif args.command == "predict":
            from .predict import Options, predict_files

            results = predict_files(args.run_dir, args.images, args.top,
                                    Options(calibrated=not args.no_calibration, tta=args.tta))
            if args.json:
                print(json.dumps(results, indent=2))
            for r in results:
                if "error" in r:
                    print(f"error: {r['error']}", file=sys.stderr)
                elif not args.json:
                    print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
            return 1 if any("error" in r for r in results) else 0
        elif args.command == "serve":
            from .serve import serve

            serve(args.run_dir, args.host, args.port, args.max_bytes, args.max_images, args.device)
        elif args.command == "export":
            from .export import export_onnx

            diff = export_onnx(args.run_dir, args.onnx, calibrated=not args.no_calibration)
            print(f"wrote {args.onnx}; largest difference from PyTorch {diff:.1e}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CifarTransferError as e:  # foreseen: the message says everything
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        _record(out, f"{e}\n")
        return 1
    except Exception as e:  # a bug: keep the traceback
        trace = traceback.format_exc()
        where = _record(out, trace)
        if args.debug or where is None:
            print(trace, file=sys.stderr, end="")
        pointer = f"; the traceback is in {where}" if where else ""
        print(f"error: unexpected {type(e).__name__}: {e}{pointer}", file=sys.stderr)
        return 1


def _record(out: Path | None, text: str) -> Path | None:
    """Write error.txt into the run folder the failure belongs to (never into a finished run); its path."""
    from . import atomic, pipeline

    if out is None or not Path(out).is_dir() or pipeline.finished(Path(out)) or os.environ.get("RANK", "0") != "0":
        return None  # under torchrun, rank 0 alone writes into the run folder
    try:
        return atomic.write_text(Path(out) / "error.txt", text)
    except OSError:  # the error itself may be an unwritable folder
        return None


if __name__ == "__main__":
    sys.exit(main())

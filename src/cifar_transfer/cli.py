"""`cifar-transfer`: a thin command line over the Python API (`cifar_transfer.api`) and the jobs.

Parsing imports nothing heavy, so --help and usage errors answer at once; each command's handler
imports what it needs. A foreseen failure (`CifarTransferError`) is one `error:` line; anything else
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .data.folder import MAX_CLASSES
from .errors import (
    CifarTransferError,
    ResourceError,
    check_temporary_folder,
    out_of_memory,
    require,
)
from .recipe import PRESETS
from .runfolder import FolderRefused

EPILOG = """Data is looked for in --data-dir, then $CIFAR_TRANSFER_DATA, then ./data (the official
cifar-10-batches-py/ folder, cifar-10-python.tar.gz, or train.npz + test.npz), and downloaded into
./data if none holds it. Weights: --weights, else $CIFAR_TRANSFER_WEIGHTS, else torchvision's
(downloaded)."""
PRESET_HELP = (
    "auto: strong with CUDA, lean without; seed: the literal original recipe; strong: 224 px, for "
    "a GPU; lean: the original claim on a CPU; smoke: a one-minute check"
)


ADAPT_HELP = (
    "first adapt the model to the unlabelled images themselves: every BatchNorm's statistics "
    "re-estimated on them (test-time adaptation; transductive, reported apart)"
)


def _options() -> dict[str, argparse.ArgumentParser]:
    """Option groups several commands share, as parent parsers."""
    cifar, data = _data_options(folder=False), _data_options(folder=True)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    training = argparse.ArgumentParser(add_help=False)
    group = training.add_argument_group("training")
    group.add_argument(
        "--weights",
        help="'imagenet' (torchvision, downloaded), a .safetensors or a .pth state_dict in "
        "torchvision's key names; default $CIFAR_TRANSFER_WEIGHTS, else imagenet (with --resume: "
        "the weights the run started from)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--out", type=Path, help="output folder (default runs/<preset>-<time>)")
    recipe = argparse.ArgumentParser(add_help=False)
    group = recipe.add_argument_group("recipe (preset, then --recipe FILE, then each --set)")
    group.add_argument(
        "--recipe",
        type=Path,
        metavar="FILE",
        help="recipe fields from a file: JSON (a run's recipe.json) or TOML, any subset",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set finetune_epochs=5 (repeatable); applied last",
    )
    human = argparse.ArgumentParser(add_help=False)
    human.add_argument(
        "--human-labels",
        type=Path,
        default=os.environ.get("CIFAR_TRANSFER_HUMAN_LABELS"),
        metavar="DIR",
        help="CIFAR-10H folder (cifar10h-probs.npy) for the human-ambiguity analysis; default "
        "$CIFAR_TRANSFER_HUMAN_LABELS; without it: skipped",
    )
    return {
        "cifar": cifar,
        "data": data,
        "device": device,
        "training": training,
        "recipe": recipe,
        "human": human,
    }


def _data_options(folder: bool) -> argparse.ArgumentParser:
    """The "data" options: where CIFAR-10 is, and (for commands that can train on them) a folder of
    pictures."""
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("data")
    if folder:
        group.add_argument(
            "--data",
            metavar="FOLDER",
            help="your own labelled pictures instead of CIFAR-10: one subfolder per class (split "
            "by the recipe's val_fraction and test_fraction, default 10%% and 20%% of each class, "
            "seeded), or train/ with optional val/ and test/, each with class subfolders; JPEG, "
            "PNG, WebP, BMP, TIFF or GIF",
        )
    group.add_argument("--data-dir", help="folder holding CIFAR-10 (see below)")
    group.add_argument(
        "--no-download", action="store_true", help="never download CIFAR-10; fail if not found"
    )
    return p


def _preset(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--preset",
        default=default,
        choices=[*PRESETS, "auto"],
        help=f"{PRESET_HELP} (default {default})",
    )


def _whole_number(low: int, high: int):
    """An argparse type: a whole number in [low, high], or a usage error saying so."""

    def parse(text: str) -> int:
        # "²".isdigit() is True
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r}: must be a whole number from {low} to {high}"
            )
        return int(text)

    return parse


_top = _whole_number(1, MAX_CLASSES)  # at most the model's classes are shown


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: must be auto, cpu, cuda or cuda:N")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cifar-transfer",
        epilog=EPILOG,
        description=(
            "Fine-tune an ImageNet ResNet-50 on CIFAR-10 in two phases and report where it fails."
        ),
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)
    o = _options()
    for add in (_training_commands, _saved_run_commands, _model_commands):
        add(sub, o)
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = (
            False  # `--data` must not be taken for `--data-dir`, nor any prefix for an option
        )
    return p


def _training_commands(sub, o: dict) -> None:
    train = [o["recipe"], o["data"], o["device"], o["training"]]
    r = sub.add_parser(
        "run",
        parents=[*train, o["human"]],
        epilog=EPILOG,
        help="train, evaluate, write a report",
        description="Train a recipe, evaluate it on the 10,000 test images and write runs/<name>/ "
        "with metrics, figures and a report.",
    )
    _preset(r)
    r.add_argument(
        "--exclude",
        metavar="CSV",
        help="leave out the training and validation images its `image` column names: audit's "
        "label_issues.csv, or a reviewed copy (the test set never changes)",
    )
    resuming = r.add_mutually_exclusive_group()
    resuming.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its checkpoint",
    )
    resuming.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (refused without it)",
    )
    rp = sub.add_parser(
        "repeat",
        parents=train,
        help="a recipe with several seeds: mean and spread",
        description="Runs the recipe with seeds 0..N-1 into OUT/seed-K/; OUT/repeat.json, report.",
    )
    _preset(rp, "smoke")
    rp.add_argument(
        "--seeds", type=_whole_number(1, 1000), default=3, help="how many runs (default 3)"
    )
    _lr_find_command(sub, train)
    _tune_command(sub, train)
    e = sub.add_parser(
        "eda",
        parents=[o["data"]],
        epilog=EPILOG,
        help="sample images and class counts",
        description="Write samples.png and class_counts.png for a preset's split.",
    )
    e.add_argument(
        "--out",
        type=Path,
        default=Path("runs/eda"),
        help="folder for the figures (default runs/eda)",
    )
    e.add_argument(
        "--preset", default="seed", choices=list(PRESETS), help="whose split sizes and seed to use"
    )


def _lr_find_command(sub, train: list) -> None:
    lr = sub.add_parser(
        "lr-find",
        parents=train,
        help="learning-rate range test for phase 1 or 2",
        description="Grow the learning rate exponentially over training batches on a copy of the "
        "model until the smoothed loss exceeds 4x its best; lr_find.json and .png.",
    )
    _preset(lr)
    lr.add_argument(
        "--phase", type=int, choices=(1, 2), default=1, help="1: the head; 2: the fine-tune"
    )
    lr.add_argument(
        "--from",
        dest="start_from",
        type=Path,
        metavar="RUN_DIR",
        help="start from a saved run's model (the sensible start for --phase 2)",
    )
    lr.add_argument("--steps", type=int, default=100, help="most optimizer steps (default 100)")
    lr.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lr.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")


def _tune_command(sub, train: list) -> None:
    t = sub.add_parser(
        "tune",
        parents=train,
        epilog=EPILOG,
        help="an Optuna study scored on validation accuracy",
        description="Train sampled recipes as OUT/trial-NNNN (the test set is never read), prune "
        "poor trials, write best_recipe.json, study.json and a report. Workers giving the same "
        "--storage and --study share one study.",
    )
    _preset(t)
    study = t.add_argument_group("study")
    study.add_argument(
        "--space", type=Path, metavar="FILE", help="search space, TOML or JSON (default: preset's)"
    )
    study.add_argument(
        "--trials", type=int, default=20, help="the study's total trials, all workers (default 20)"
    )
    study.add_argument(
        "--study", help="study name; workers giving the same name join one study (default: OUT's)"
    )
    study.add_argument(
        "--storage",
        metavar="URL",
        help=(
            "default sqlite:///OUT/study.db; for several machines "
            "postgresql://USER:PASSWORD@HOST/DB"
        ),
    )
    study.add_argument(
        "--pruner", default="median", choices=["median", "asha", "none"], help="default median"
    )
    study.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        metavar="SECONDS",
        help="a dead worker's trials are marked failed after twice this (default 60)",
    )
    study.add_argument(
        "--sampler-seed", type=int, help="seed of the TPE sampler (give each worker its own)"
    )


def _saved_run_commands(sub, o: dict) -> None:
    a = sub.add_parser(
        "analyze",
        parents=[o["data"], o["device"], o["human"]],
        help="error analysis of a saved run",
        description="Calibration, flip TTA, human ambiguity (CIFAR-10H), Grad-CAM and "
        "corruptions; written to RUN_DIR/analysis/.",
    )
    a.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _audit_command(sub, o)
    v = sub.add_parser(
        "evaluate",
        parents=[o["device"]],
        help="re-evaluate a saved run on the test set or other data",
        description="Evaluate RUN_DIR/model.safetensors; "
        "results go to RUN_DIR/evaluations/<data>/.",
    )
    v.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    v.add_argument(
        "--data",
        help="an .npz (images N x 32 x 32 x 3 uint8, labels), a CIFAR-10 folder, a CIFAR-10-C "
        "folder (gaussian_noise.npy, ..., labels.npy), or a folder of photos with one subfolder "
        "per class name (airplane/, cat/, ...); default: the CIFAR-10 test set",
    )
    v.add_argument(
        "--tta", action="store_true", help="average each prediction with the mirror image's"
    )
    v.add_argument("--adapt", action="store_true", help=ADAPT_HELP)
    v.add_argument(
        "--no-download", action="store_true", help="never download CIFAR-10; fail if not found"
    )
    r = sub.add_parser(
        "robustness",
        parents=[o["cifar"], o["device"]],
        help="CIFAR-10-C's corruptions at its own strength on a saved run",
        description="Accuracy under the 15 benchmark and 4 held-out corruptions of CIFAR-10-C, "
        "severities 1-5, drawn by this tool with the generator's constants; "
        "written to RUN_DIR/robustness/.",
    )
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    r.add_argument(
        "--images",
        type=_whole_number(1, 10_000),
        default=1000,
        help="class-balanced test images per corruption and severity (default 1000; 10000: all)",
    )
    r.add_argument(
        "--benchmark-only", action="store_true", help="leave out the 4 held-out corruptions"
    )
    r.add_argument(
        "--adapt", action="store_true", help=ADAPT_HELP + "; written to RUN_DIR/robustness-adapted/"
    )
    c = sub.add_parser(
        "compare",
        help="finished runs side by side: recipe differences, results, curves",
        description="The recipe fields that differ, results, times, machines, leakage and "
        "learning curves of finished runs. Markdown, HTML and PNG.",
    )
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    c.add_argument(
        "--out", type=Path, help="folder for the comparison (default runs/compare-<time>)"
    )


def _audit_command(sub, o: dict) -> None:
    au = sub.add_parser(
        "audit",
        parents=[o["data"], o["device"], o["human"]],
        help="which labels are likely wrong (confident learning)",
        description="Rank a saved run's training, validation and test images by how likely their "
        "label is wrong, from out-of-sample probabilities, with cleanlab; "
        "RUN_DIR/audit/label_issues.csv, a gallery and a report. Give a reviewed copy of "
        "the CSV to run --exclude.",
    )
    au.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    au.add_argument(
        "--weights",
        help="the pretrained weights whose features judge the labels (default: the run's)",
    )
    au.add_argument(
        "--resolution",
        type=_whole_number(32, 512),
        help="the size the pretrained base sees the images at (default: the run's resolution)",
    )


def _model_commands(sub, o: dict) -> None:
    calibration = argparse.ArgumentParser(add_help=False)
    calibration.add_argument(
        "--no-calibration",
        action="store_true",
        help="raw softmax probabilities, without the temperature fitted on validation",
    )
    pr = sub.add_parser(
        "predict",
        parents=[calibration],
        help="classify image files with a trained model",
        description="Classify images (PNG, JPEG, WebP, BMP, ...; any size): each is "
        "centre-cropped to a square and downscaled (Lanczos) to 32x32 RGB, as CIFAR-10 was made.",
    )
    pr.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    pr.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    pr.add_argument(
        "--top",
        type=_top,
        default=3,
        help="how many classes to show, best first (default 3; at most all)",
    )
    pr.add_argument("--json", action="store_true", help="print JSON for machines")
    pr.add_argument(
        "--tta",
        action="store_true",
        help="average with the mirror image (flip test-time augmentation)",
    )
    pr.add_argument("--adapt", action="store_true", help=ADAPT_HELP)
    s = sub.add_parser(
        "serve",
        parents=[o["device"]],
        help="serve a trained model over HTTP, with an upload page",
        description="POST /predict, POST /predict/batch, GET /health, GET /docs and a page at /.",
    )
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument(
        "--port", type=_whole_number(0, 65535), default=8000, help="port, 0-65535 (default 8000)"
    )
    s.add_argument(
        "--max-bytes",
        type=_whole_number(1, 2**40),
        default=10_000_000,
        help="largest accepted image (default 10 MB)",
    )
    s.add_argument(
        "--max-images",
        type=_whole_number(1, 10_000),
        default=32,
        help="most images in one /predict/batch request",
    )
    s.add_argument(
        "--read-timeout",
        type=_whole_number(1, 3600),
        default=30,
        help=(
            "seconds for a whole request (headers and body) to arrive; a slower client is cut off "
            "(default 30)"
        ),
    )
    s.add_argument(
        "--max-connections",
        type=_whole_number(1, 100_000),
        default=64,
        help="connections served at once; more are answered 503 (default 64)",
    )
    x = sub.add_parser(
        "export",
        parents=[calibration],
        help="export a trained model to ONNX",
        description="Export RUN_DIR/model.safetensors to ONNX, written only if ONNX Runtime "
        "reproduces PyTorch's logits within 1e-4.",
    )
    x.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    x.add_argument(
        "--onnx", type=Path, required=True, metavar="OUT.onnx", help="where to write the model"
    )


def _data_args(args: argparse.Namespace) -> dict:
    # robustness measures CIFAR-10 models only
    folder = {"data": args.data} if "data" in args else {}
    return {**folder, "data_dir": args.data_dir, "download": not args.no_download}


def _training_args(args: argparse.Namespace) -> dict:
    return {
        **_data_args(args),
        "weights": args.weights,
        "device": args.device,
        "progress": not args.no_progress,
    }


def _recipe(args: argparse.Namespace):
    from .api import choose_recipe

    return choose_recipe(args.preset, args.recipe, args.overrides, args.device)


def _out(args: argparse.Namespace, name: str) -> Path:
    """The command's output folder (given, or runs/<name>-<time>), kept in `args.folder` for
    error.txt."""
    from .machine import default_run_dir

    args.folder = args.out or default_run_dir(name)
    return args.folder


def cmd_run(args: argparse.Namespace) -> int:
    from . import api

    # --resume: the checkpoint's recipe replaces the one given
    out = args.resume or _out(args, _recipe(args).name)
    args.folder = out
    run = api.run(
        args.preset,
        out,
        overrides=args.overrides,
        recipe_file=args.recipe,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        human_labels=args.human_labels,
        exclude=args.exclude,
        **_training_args(args),
    )
    if run is not None:  # under torchrun, rank 0 reports
        m = run.metrics
        print(
            f"test accuracy {m['test']['accuracy']:.4f} ({m['timings']['total_s']:.0f} s); report: "
            f"{run.report}"
        )
    return 0


def cmd_repeat(args: argparse.Namespace) -> int:
    from . import api

    recipe = _recipe(args)
    out = _out(args, f"{recipe.name}-repeat")
    result = api.repeat(recipe, args.seeds, out, **_training_args(args))
    acc = result.metrics["summary"]["test accuracy"]
    print(
        f"test accuracy {acc['mean']:.4f} ± {acc['std']:.4f} over {args.seeds} seeds; report: "
        f"{out / 'report.html'}"
    )
    return 0


def cmd_eda(args: argparse.Namespace) -> int:
    from .jobs.run import eda
    from .recipe import preset

    eda(preset(args.preset), args.out, **_data_args(args))
    print(f"wrote {args.out / 'samples.png'} and {args.out / 'class_counts.png'}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from . import api

    recipe = _recipe(args)
    out = _out(args, f"lr-find-{recipe.name}")
    training = _training_args(args)
    training.pop("progress")
    found = {"phase": args.phase, "start_from": args.start_from, "steps": args.steps}
    result = api.lr_find(recipe, out, start=args.start, end=args.end, **found, **training).metrics
    found = (
        f"{result['suggestion']:.2e} ({result['method']})"
        if result["suggestion"]
        else result["method"]
    )
    print(
        f"suggested learning rate {found} after {result['steps']} steps; plot: "
        f"{out / 'lr_find.png'}"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import api

    recipe = _recipe(args)
    out = _out(args, f"tune-{recipe.name}")
    study = {
        "space": args.space,
        "storage": args.storage,
        "study": args.study,
        "trials": args.trials,
    }
    workers = {
        "pruner": args.pruner,
        "heartbeat": args.heartbeat,
        "sampler_seed": args.sampler_seed,
    }
    best = api.tune(recipe, out, **study, **workers, **_training_args(args)).metrics["best"]
    found = "no trial completed"
    if best:
        found = (
            f"best validation accuracy {best['value']:.4f} (trial {best['number']}); best recipe: "
            f"{best['recipe_file']}"
        )
    print(f"{found}; report: {out / 'report.html'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import api

    result = api.analyze(
        args.run_dir, human_labels=args.human_labels, device=args.device, **_data_args(args)
    )
    print(f"report: {result.report}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    require("analysis", "cleanlab")
    from . import api

    options = {
        "weights": args.weights,
        "resolution": args.resolution,
        "human_labels": args.human_labels,
    }
    result = api.audit(args.run_dir, device=args.device, **options, **_data_args(args))
    parts = result.metrics["parts"]
    flagged = ", ".join(f"{p['flagged']:,} of {p['images']:,} {name}" for name, p in parts.items())
    print(f"flagged {flagged}; {result.dir / 'label_issues.csv'}; report: {result.report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api

    options = {
        "tta": args.tta,
        "adapt": args.adapt,
        "device": args.device,
        "download": not args.no_download,
    }
    result = api.evaluate(args.run_dir, args.data, **options)
    metrics = result.metrics
    if "robustness" in metrics:
        print(f"{_robustness_line(metrics['robustness'])}; report: {result.report}")
        return 0
    skipped = metrics["skipped"]
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    note = f" ({len(skipped)} skipped)" if skipped else ""
    print(
        f"accuracy {metrics['test']['accuracy']:.4f} on {metrics['test']['n']} images{note}; "
        f"report: {result.report}"
    )
    return 0


def _robustness_line(rob: dict) -> str:
    if rob["mean_corrupted"] is None:
        return f"no benchmark corruption found; held-out mean {rob['mean_held_out']:.4f}"
    line = (
        f"CIFAR-10-C mean accuracy {rob['mean_corrupted']:.4f} ± {rob['margin_95']:.4f} over "
        f"{rob['benchmark_corruptions']} corruptions x 5 severities on {rob['images']:,} images"
    )
    if rob.get("trained_on"):
        line += (
            f" ({rob['mean_unseen']:.4f} over those it never trained on; it trained on "
            f"{', '.join(rob['trained_on'])})"
        )
    return line


def cmd_robustness(args: argparse.Namespace) -> int:
    from . import api

    result = api.robustness(
        args.run_dir,
        images=args.images,
        held_out=not args.benchmark_only,
        adapt=args.adapt,
        device=args.device,
        **_data_args(args),
    )
    print(f"{_robustness_line(result.metrics['robustness'])}; report: {result.report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import api

    out = _out(args, "compare")
    result = api.compare(args.run_dirs, out).metrics
    for r in result["runs"]:
        for lack in r["lacks"]:
            print(f"note: {r['run']} lacks {lack}", file=sys.stderr)
    tested = [r for r in result["runs"] if r["accuracy"] is not None]
    if tested:
        best = max(tested, key=lambda r: r["accuracy"])
        print(
            f"best test accuracy {best['accuracy']:.4f} ({best['run']}); report: "
            f"{out / 'report.html'}"
        )
    else:
        best = max(result["runs"], key=lambda r: r["best_val_acc"] or 0)
        print(
            f"best validation accuracy {best['best_val_acc']:.4f} ({best['run']}); report: "
            f"{out / 'report.html'}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .serving.predictor import Options, predict_files

    options = Options(calibrated=not args.no_calibration, tta=args.tta)
    results = predict_files(args.run_dir, args.images, args.top, options, adapt=args.adapt)
    if args.json:
        print(json.dumps(results, indent=2))
    elif described := next((r for r in results if "error" not in r), None):
        print(_probabilities_line(described))
    for r in results:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(
                f"{r['image']}: "
                + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            )
    return 1 if any("error" in r for r in results) else 0


def _probabilities_line(described: dict) -> str:
    """Once per call: whether the probabilities below are calibrated, and how."""
    how = (
        f"calibrated (T = {described['temperature']:.3g})"
        if described["calibrated"]
        else "not calibrated"
    )
    adapted = (
        f", adapted to these {described['adapted_on']:,} images"
        if "adapted_on" in described
        else ""
    )
    return f"probabilities {how}{', flip TTA' if described['tta'] else ''}{adapted}:"


def cmd_serve(args: argparse.Namespace) -> int:
    require("serve", "fastapi", "uvicorn", "multipart")
    from .serving.service import serve

    limits = {"read_timeout": args.read_timeout, "max_connections": args.max_connections}
    serve(
        args.run_dir, args.host, args.port, args.max_bytes, args.max_images, args.device, **limits
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    require("export", "onnx", "onnxscript", "onnxruntime")
    from .serving.export import export_onnx

    diff = export_onnx(args.run_dir, args.onnx, calibrated=not args.no_calibration)
    print(f"wrote {args.onnx}; largest difference from PyTorch {diff:.1e}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "repeat": cmd_repeat,
    "eda": cmd_eda,
    "robustness": cmd_robustness,
    "lr-find": cmd_lr_find,
    "tune": cmd_tune,
    "analyze": cmd_analyze,
    "audit": cmd_audit,
    "evaluate": cmd_evaluate,
    "compare": cmd_compare,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        args.command == "run"
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not (args.out or args.resume)
    ):
        parser.error(
            "under torchrun, give --out (or --resume): every process must name the same run folder"
        )
    try:
        check_temporary_folder()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CifarTransferError as e:  # foreseen: the message says everything
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        # a folder that is not this run's is left as it is; without a temporary folder, nothing more
        # is tried
        if not isinstance(e, FolderRefused | ResourceError):
            _record(getattr(args, "folder", None), f"{e}\n")
        return 1
    except Exception as e:  # a bug: keep the traceback (unless memory ran out, which is no bug)
        short = out_of_memory(e)
        if short is not None:  # nothing more is tried (writing error.txt would need memory too)
            print(f"error: {short}", file=sys.stderr)
            return 1
        trace = traceback.format_exc()
        where = _record(getattr(args, "folder", None), trace)
        if args.debug or where is None:
            print(trace, file=sys.stderr, end="")
        pointer = f"; the traceback is in {where}" if where else ""
        print(f"error: unexpected {type(e).__name__}: {e}{pointer}", file=sys.stderr)
        return 1


def _record(out: Path | None, text: str) -> Path | None:
    """Write error.txt into the run folder the failure belongs to (never into a finished run); its
    path."""
    from . import atomic
    from .jobs.run import finished

    if (
        out is None
        or not Path(out).is_dir()
        or finished(Path(out))
        or os.environ.get("RANK", "0") != "0"
    ):
        return None  # under torchrun, rank 0 alone writes into the run folder
    try:
        return atomic.write_text(Path(out) / "error.txt", text)
    except OSError:  # the error itself may be an unwritable folder
        return None


if __name__ == "__main__":
    sys.exit(main())

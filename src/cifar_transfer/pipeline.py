"""The whole job, step by step: data -> model -> train -> evaluate -> report. The CLI calls these."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sklearn
import torch
import torchvision

from . import atomic, figures, report
from .augment import to_device
from .calibration import shipped_temperature
from .data import CLASSES, Dataset, Splits, find_source, load_cifar10, load_test_set, split
from .distributed import ALONE, World, device_for, gather, joined
from .evaluate import logits_for, summarise, tta_logits
from .logbook import Logbook
from .model import Pretrained, TransferNet, build_model, load_model, load_pretrained, pick_device, save_model
from .model import to_device as model_to_device
from .predict import read_image_folder
from .recipe import AUTO, PRESETS, Recipe, preset
from .train import TrainingError, check_same_network, checkpoint_bytes, fit, load_checkpoint

CHECKPOINT = "checkpoint.pt"


def check_writable(folder: Path) -> None:
    """Fail before any training if the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(folder / ".write-test", b"ok")
        (folder / ".write-test").unlink()
    except OSError as e:
        raise atomic.OutputError(f"{folder}: output folder is not writable ({e.strerror or e})") from None


def cpu_model() -> dict:
    """The CPU's model name, cores and bf16 matrix units: CPU figures differ 2x between machines of one kind."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    bf16 = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "none"
    return {"model": fields.get("model name", platform.processor() or platform.machine()),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "bf16_units": bf16}


def peak_rss_gib() -> float:
    """The most memory this process has held (resident set), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports kilobytes


def environment(device: torch.device) -> dict:
    cpu = cpu_model()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU: {cpu['model']} ({cpu['threads']} threads, bf16 units: {cpu['bf16_units']})")
    gpu = ({"name": name, "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}
           if device.type == "cuda" else None)
    return {"device": str(device), "device_name": name, "cpu": cpu, "gpu": gpu,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__,
                         "scikit-learn": sklearn.__version__}}


def class_counts(ds: Dataset) -> list[int]:
    return np.bincount(ds.labels, minlength=len(CLASSES)).tolist()


def eda(splits: Splits, out: Path, seed: int = 0) -> None:
    """The data figures: random samples of each class and the class counts of each split."""
    figures.sample_grid(splits.train, out / "samples.png", seed=seed)
    figures.class_counts({"train": class_counts(splits.train), "validation": class_counts(splits.val),
                          "test": class_counts(splits.test)}, out / "class_counts.png")


def write_history(history: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]) if history else ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text(path, buf.getvalue())


def test_results(model: torch.nn.Module, test: Dataset, recipe: Recipe, out: Path,
                 progress: bool = True, tta: bool = False) -> tuple[dict, float, np.ndarray]:
    """Evaluate on `test` (with flip TTA if asked) and write the results (`write_test_results`).

    Returns the summary, the seconds the forward passes took, and the logits."""
    t0 = time.perf_counter()
    logits = tta_logits(model, test.images, recipe) if tta else logits_for(
        model, test.images, recipe, desc="test" if progress else None)
    seconds = time.perf_counter() - t0
    return write_test_results(logits, test, out), seconds, logits


def write_test_results(logits: np.ndarray, test: Dataset, out: Path) -> dict:
    """The summary of `logits` on `test`; writes classification_report.txt and the confusion and gallery
    figures."""
    result = summarise(logits, test.labels)
    atomic.write_text(out / "classification_report.txt", result["classification_report"])
    figures.confusion(result["confusion"], out / "confusion_matrix.png")
    figures.gallery(test.images, result["misclassified"], out / "misclassified.png")
    return result


def shared_logits(model: TransferNet, images: np.ndarray, recipe: Recipe, world: World,
                  desc: str | None = None) -> np.ndarray:
    """Logits for `images`, each rank predicting its share, gathered on every rank (one process: all of them)."""
    mine = logits_for(model, images[world.rows(len(images))], recipe, desc=desc)
    if world.size == 1:
        return mine
    device = next(model.parameters()).device  # NCCL gathers device tensors
    return gather(torch.from_numpy(mine).to(device), world).cpu().numpy()


def resolve_preset(name: str, device: str = "auto") -> tuple[str, str | None]:
    """`auto` -> the preset that reaches the original claim on this device; returns it and why it was chosen."""
    if name != "auto":
        return name, None
    kind = pick_device(device).type
    chosen = AUTO.get(kind, AUTO["cpu"])
    return chosen, f"--preset auto on {'a CUDA device' if kind == 'cuda' else 'a machine without CUDA'}"


def shipped(history: list[dict], recipe: Recipe) -> dict:
    """Which epoch's weights the run ships, and why."""
    row = next((h for h in history if h["shipped"]), None)  # `fit` marks exactly one row
    if row is None:
        return {}
    why = ("the best validation accuracy (keep=best_val; ties go to the earlier epoch)" if recipe.keep == "best_val"
           else "the last epoch (keep=last)")
    return {"epoch": row["epoch"], "phase": row["phase"], "val_acc": row["val_acc"], "keep": recipe.keep,
            "why": why}


def train(recipe: Recipe, out: Path, splits: Splits, pretrained: Pretrained, dev: torch.device, *,
          resume_state: dict | None = None, progress: bool = True, meta: dict | None = None,
          on_epoch: Callable[[list[dict]], None] | None = None,
          world: World = ALONE) -> tuple[TransferNet, list[dict], float]:
    """Both phases on `splits`' training and validation images, into `out`: the checkpoint, history.csv and
    TensorBoard events after every epoch, recipe.json and the learning curves. The test set is not touched.

    `on_epoch(history)` runs after each epoch's files are written (`tune` reports to its pruner there). Returns
    the trained model (the shipped epoch's weights), the history and the training seconds. Under torchrun every
    rank trains; rank 0 alone writes."""
    if world.main:
        atomic.write_text(out / "recipe.json", recipe.dumps() + "\n")
    torch.manual_seed(recipe.seed)  # the head's initialisation
    model = model_to_device(build_model(recipe, pretrained), recipe, dev)
    if world.main:
        atomic.ensure_free(out, checkpoint_bytes(model, recipe) * (1 if resume_state else 2) + 32 * atomic.MiB,
                           "the checkpoint (an atomic save holds the old and the new one)")
    t_train = time.perf_counter()
    logbook = Logbook(out / "tensorboard") if world.main else None

    def after_epoch(history: list[dict], step_losses: list[float], step_lrs: list[float]) -> None:
        logbook.epoch(history, step_losses, step_lrs)
        if on_epoch is not None:
            on_epoch(history)

    try:  # history.csv gains a row once the checkpoint holding that epoch is in place: a row means it can resume
        history = fit(model, recipe, to_device(splits.train.images, splits.train.labels, dev),
                      to_device(splits.val.images, splits.val.labels, dev),
                      checkpoint=out / CHECKPOINT if world.main else None, resume=resume_state,
                      progress=progress and world.main, on_epoch=after_epoch if world.main else None,
                      on_saved=(lambda rows: write_history(rows, out / "history.csv")) if world.main else None,
                      meta=meta, world=world)
    finally:
        if logbook is not None:
            logbook.close()
    train_s = time.perf_counter() - t_train
    if world.main:
        write_history(history, out / "history.csv")  # now with the `shipped` column
        tuned = "all layers" if recipe.finetune_from == "stem" else f"{recipe.finetune_from} onwards and the head"
        figures.learning_curves(history, out / "learning_curves.png", tuned)
    return model, history, train_s


def run(recipe: Recipe, out: Path, *, data_dir: str | None = None, weights: str | None = None,
        device: str = "auto", resume: bool = False, progress: bool = True, download: bool = True,
        human_labels: Path | None = None, chosen_by: str | None = None) -> dict | None:
    """Train and evaluate one recipe; write everything into `out`; return metrics.json's content.

    `weights`: None means the default (on resume: the weights the run was started from). `chosen_by` says why
    this recipe was run (e.g. `--preset auto`); the report repeats it. Under torchrun every process trains and
    tests its share; rank 0 writes and returns the metrics, the others return None."""
    with joined(device) as world:
        t_start = time.perf_counter()
        if world.main:
            check_writable(out)
            atomic.remove_stale(out)  # e.g. the half-written checkpoint of a run killed while saving
        dev = device_for(world, pick_device(device))
        if dev.type == "cuda":  # fixed input shapes: cuDNN picks its fastest kernels; TF32 for fp32 matmuls/convs
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        resume_state = None
        if resume:
            if not (out / CHECKPOINT).is_file():
                done = " (the run is complete: see metrics.json)" if (out / "metrics.json").is_file() else ""
                raise TrainingError(f"{out / CHECKPOINT}: no checkpoint to resume from{done}")
            resume_state = load_checkpoint(out / CHECKPOINT)
            recipe = Recipe.from_dict(resume_state["recipe"])
        started_from = (resume_state or {}).get("meta", {}).get("network")
        pretrained = load_pretrained(weights or (started_from or {}).get("weights") or default_weights())
        network = pretrained.identity()
        if started_from is not None:
            check_same_network(started_from, network, out / CHECKPOINT)
        train_full, test = load_cifar10(data_dir, allow_download=download)
        splits = split(train_full, test, recipe.train_size, recipe.val_size, recipe.seed)
        if world.main:
            (out / "error.txt").unlink(missing_ok=True)
            eda(splits, out, recipe.seed)
        model, history, train_s = train(recipe, out, splits, pretrained, dev, resume_state=resume_state,
                                        progress=progress, meta={"network": network}, world=world)

        t0 = time.perf_counter()
        logits = shared_logits(model, test.images, recipe, world, "test" if progress and world.main else None)
        eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        val_logits = shared_logits(model, splits.val.images, recipe, world) if len(splits.val) else None
        if not world.main:
            return None
        result = write_test_results(logits, test, out)
        calibration = shipped_temperature(val_logits, splits.val.labels, logits, test.labels)
        model.temperature = calibration["temperature"]
        calibration_s = time.perf_counter() - t0
        save_model(model, recipe, out / "model.safetensors")
        metrics = {
            "run": {"name": out.name, "command": shlex.join(["cifar-transfer", *sys.argv[1:]]),
                    "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "data_source": train_full.source, "weights": pretrained.source, "resumed": resume,
                    "preset": recipe.name, "chosen_by": chosen_by, **environment(dev),
                    "distributed": {**world.describe(), "device_of_rank_0": str(dev),
                                    "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}},
            "timings": {"phase1_s": sum(h["seconds"] for h in history if h["phase"] == 1),
                        "phase2_s": sum(h["seconds"] for h in history if h["phase"] == 2),
                        "train_s": train_s, "eval_s": eval_s, "calibration_s": calibration_s,
                        "total_s": time.perf_counter() - t_start},
            "data": {"counts": {"train": class_counts(splits.train), "validation": class_counts(splits.val),
                                "test": class_counts(test)}},
            "final_epoch": history[-1] if history else {},
            "shipped": shipped(history, recipe),
            "calibration": calibration,
            "test": result,
        }
        if recipe.analysis:
            from .analyze import analyze  # Grad-CAM and the corruptions load only for runs that analyse

            t0 = time.perf_counter()
            metrics["analysis"] = analyze(model, recipe, splits.val, test, out, human_labels, logits, val_logits)
            metrics["timings"]["analysis_s"] = time.perf_counter() - t0
            metrics["timings"]["total_s"] = time.perf_counter() - t_start
        metrics["peak_rss_gib"] = peak_rss_gib()
        atomic.write_json(out / "metrics.json", metrics)
        report.write(out, report.run_markdown(metrics, history, recipe.to_dict()), f"cifar-transfer: {out.name}")
        (out / CHECKPOINT).unlink()  # the run is complete: model.safetensors holds what is worth keeping
        return metrics


def evaluate_saved(run_dir: Path, data: str | None = None, device: str = "auto", download: bool = True,
                   tta: bool = False) -> tuple[dict, Path]:
    """Re-evaluate a saved model on its test set, on another CIFAR-shaped set, or on a folder of photos with one
    subfolder per class; with `tta`, predictions average each image with its mirror."""
    model, recipe = load_model(run_dir / "model.safetensors")
    paths, skipped = None, []
    if data and Path(data).is_dir() and find_source(Path(data)) is None:  # photos, one folder per class
        test, paths, skipped = read_image_folder(Path(data))
    else:
        test = load_test_set(data) if data else load_cifar10(None, allow_download=download)[1]
    name = (Path(data).stem or Path(data).resolve().name) if data else "cifar10-test"
    out = run_dir / "evaluations" / name
    check_writable(out)
    dev = pick_device(device)
    result, seconds, _ = test_results(model_to_device(model, recipe, dev), test, recipe, out, tta=tta)
    if paths is not None:
        for row in result["misclassified"]:
            row["file"] = paths[row["index"]]
    trained = run_dir / "metrics.json"
    reference = json.loads(trained.read_text())["test"]["accuracy"] if trained.is_file() and data else None
    metrics = {"run": {"model": str(run_dir / "model.safetensors"), "data_source": test.source, "tta": tta,
                       "command": shlex.join(["cifar-transfer", *sys.argv[1:]]), **environment(dev)},
               "timings": {"eval_s": seconds}, "test": result, "cifar10_test_accuracy": reference,
               "skipped": skipped}
    atomic.write_json(out / "metrics.json", metrics)
    report.write(out, report.evaluation_markdown(run_dir, metrics), f"cifar-transfer evaluation: {name}")
    return metrics, out


def analyze_saved(run_dir: Path, data_dir: str | None = None, human_labels: Path | None = None,
                  device: str = "auto", download: bool = True) -> tuple[dict, Path]:
    """The error analysis of a saved run, on its own validation split and the CIFAR-10 test set."""
    from .analyze import analyze

    model, recipe = load_model(run_dir / "model.safetensors")
    train, test = load_cifar10(data_dir, allow_download=download)
    splits = split(train, test, recipe.train_size, recipe.val_size, recipe.seed)
    out = run_dir / "analysis"
    check_writable(out)
    result = analyze(model_to_device(model, recipe, pick_device(device)), recipe, splits.val, test, out,
                     human_labels)
    atomic.write_json(out / "analysis.json", result)
    report.write(out, f"Analysis of `{run_dir}`\n\n" + report.analysis_markdown(result) + "\n",
                 f"cifar-transfer analysis: {run_dir.name}")
    return result, out


def repeat(recipe: Recipe, seeds: int, out: Path, **run_args: object) -> dict:
    """Run the recipe with seeds 0..seeds-1 (subsample and initialisation); mean and std of the results."""
    check_writable(out)
    runs = [run(dataclasses.replace(recipe, seed=k, analysis=False), out / f"seed-{k}", **run_args)["test"]
            for k in range(seeds)]
    values = {"test accuracy": [r["accuracy"] for r in runs]}
    for i, pair in enumerate(runs[0]["leakage"]):  # every run lists the same pairs in the same order
        values[f"{pair['a']} → {pair['b']}"] = [r["leakage"][i]["a_as_b"] for r in runs]
        values[f"{pair['b']} → {pair['a']}"] = [r["leakage"][i]["b_as_a"] for r in runs]
    summary = {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                      "values": v} for name, v in values.items()}
    result = {"recipe": recipe.to_dict(), "seeds": list(range(seeds)), "summary": summary}
    atomic.write_json(out / "repeat.json", result)
    figures.spread(summary, out / "repeat.png")
    base = preset(recipe.name).to_dict() if recipe.name in PRESETS else {}
    changed = {k: v for k, v in recipe.to_dict().items() if k != "seed" and base.get(k) != v}
    report.write(out, report.repeat_markdown(recipe.name, seeds, changed, summary),
                 f"cifar-transfer repeat: {recipe.name}")
    return result


def finished(folder: Path) -> bool:
    """A completed run: its metrics are written and its checkpoint is gone."""
    return (folder / "metrics.json").is_file() and not (folder / CHECKPOINT).exists()


def default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def default_weights() -> str:
    return os.environ.get("CIFAR_TRANSFER_WEIGHTS", "imagenet")

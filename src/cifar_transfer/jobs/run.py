"""The main job: train a recipe into a run folder, evaluate it on the test set, fit the temperature
it ships with, analyse its errors and write the report.

Also `repeat` (several seeds) and `eda` (the data's figures).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..analysis.calibration import calibration, fit_temperature
from ..data.cifar import Dataset, Splits
from ..data.folder import FolderData
from ..data.sources import load_splits, scaled_epochs
from ..machine import command_line, default_weights, environment, peak_rss_gib
from ..model.adapt import training_moments
from ..model.inference import computes_in_bf16, logits_for
from ..model.network import TransferNet, folded, pick_device, save_model
from ..model.weights import Pretrained, load_pretrained
from ..recipe import AUTO, PRESETS, Recipe, preset
from ..reporting import figures, report
from ..runfolder import TEST_LOGITS, clear_run, run_folder
from ..training.checkpoint import check_same_network, load_checkpoint
from ..training.distributed import World, device_for, gather, joined
from ..training.phases import TrainingError
from ..training.trainer import CHECKPOINT, shipped_epoch, train_to_folder


def resolve_preset(name: str, device: str = "auto") -> tuple[str, str | None]:
    """`auto` -> the preset that reaches the original claim on this device; returns it and why it
    was chosen."""
    if name != "auto":
        return name, None
    kind = pick_device(device).type
    chosen = AUTO.get(kind, AUTO["cpu"])
    return (
        chosen,
        f"--preset auto on {'a CUDA device' if kind == 'cuda' else 'a machine without CUDA'}",
    )


def run(
    recipe: Recipe,
    out: Path,
    *,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    download: bool = True,
    human_labels: Path | None = None,
    chosen_by: str | None = None,
    data: str | Path | None = None,
    exclude: str | Path | None = None,
) -> dict | None:
    """Train and evaluate one recipe; write everything into `out`; return metrics.json's content.

    `data`: a folder of the user's own labelled pictures (data.folder) instead of CIFAR-10; its
    split is written to splits.csv. `exclude`: a CSV naming training and validation images to leave
    out (`audit`'s label_issues.csv, or a reviewed copy).

    `weights`: None means the default (on resume: the weights the run was started from). `chosen_by`
    says why this recipe was run (e.g. `--preset auto`); the report repeats it. Under torchrun every
    process trains and tests its share; rank 0 writes and returns the metrics, the others return
    None. Rank 0 holds the folder's lock for the whole run; a folder in use, or holding another run
    (unless `resume` or `overwrite`), is refused; `overwrite` removes the old run's files (and
    nothing else) once the weights and data have loaded.
    """
    with joined(device) as world, _claim(world, out, resume, overwrite):
        t_start = time.perf_counter()
        dev = _start(out, device, world)
        state = _resume_state(out) if resume else None
        recipe = Recipe.from_dict(state["recipe"]) if state else recipe
        pretrained, network = _pretrained(weights, state, out)
        sources = _sources(state, data, exclude)
        loaded = load_splits(
            recipe, sources["data"], data_dir, download, progress and world.main, sources["exclude"]
        )
        splits, notes = loaded.splits, loaded.folder
        if state is None and data is not None:  # CIFAR-10's presets are sized for it already
            recipe = scaled_epochs(recipe, len(splits.train))
        if world.main:
            if overwrite:  # the old run goes only once the new one's weights and data have loaded
                clear_run(out)
            figures.data_figures(splits, out, recipe.seed)
            _write_splits(out, notes, splits)
        trained = {
            "resume_state": state,
            "progress": progress,
            "meta": {"network": network, **sources},
        }
        trained["world"] = world
        model, history, train_s = train_to_folder(recipe, out, splits, pretrained, dev, **trained)
        timings = {
            "phase1_s": sum(h["seconds"] for h in history if h["phase"] == 1),
            "phase2_s": sum(h["seconds"] for h in history if h["phase"] == 2),
            "train_s": train_s,
        }
        # the trained weights stay as they are: model.safetensors keeps BatchNorm
        inference = folded(model)
        logits, val_logits = _test(inference, recipe, splits, world, progress, timings)
        if not world.main:
            return None
        atomic.write_with(out / TEST_LOGITS, lambda f: np.save(f, logits))
        metrics = {
            "run": _run_facts(
                out, recipe, loaded.source, pretrained.source, resume, chosen_by, dev, world
            ),
            "timings": timings,
            "data": _data_facts(splits, recipe, notes)
            | _excluded(loaded.excluded, sources["exclude"]),
            "final_epoch": history[-1] if history else {},
            "shipped": shipped_epoch(history, recipe),
            **_results_and_temperature(model, recipe, splits, logits, val_logits, out, timings),
        }
        if recipe.analysis:
            metrics["analysis"] = _analysis(
                inference, recipe, splits, out, human_labels, logits, timings
            )
        timings["total_s"] = time.perf_counter() - t_start
        metrics["peak_rss_gib"] = peak_rss_gib()
        _finish(out, metrics, history, recipe)
        return metrics


def _write_splits(out: Path, folder: FolderData | None, used: Splits) -> None:
    """splits.csv: which picture went to which set, for anyone to see and reproduce."""
    if folder is None:
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "split", "label"])
    writer.writerows(folder.rows(used))
    atomic.write_text(out / "splits.csv", buf.getvalue())


def _data_facts(splits: Splits, recipe: Recipe, folder: FolderData | None) -> dict:
    """What metrics.json (and the report's data section) says of the data."""
    facts = {
        "counts": {name: figures.counts(ds) for name, ds in _named_sets(splits)},
        "classes": list(splits.train.classes),
        "image_size": int(splits.train.images.shape[1]),
        "kind": "folder" if folder is not None else "cifar10",
    }
    if folder is not None:
        facts |= {
            "skipped": folder.skipped,
            "duplicates": folder.duplicates,
            "policy": recipe.duplicates,
        }
        facts["fractions"] = {"validation": recipe.val_fraction, "test": recipe.test_fraction}
    return facts


def _sources(
    state: dict | None, data: str | Path | None, exclude: str | Path | None
) -> dict[str, str | None]:
    """The folder of pictures and the exclusion list a run reads, resolved: as given, else
    (resuming) as the checkpoint recorded them, so a folder run resumes on its folder, without what
    it left out."""
    recorded = (state or {}).get("meta", {})
    given = {"data": data, "exclude": exclude}
    return {k: recorded.get(k) if v is None else str(Path(v).resolve()) for k, v in given.items()}


def _excluded(count: int, exclude: str | None) -> dict:
    """What metrics.json says of the images `run --exclude` left out (`exclude`: the list,
    resolved)."""
    return {} if exclude is None else {"excluded": {"images": count, "file": exclude}}


def _start(out: Path, device: str, world: World) -> torch.device:
    """Tidy the folder (rank 0) and choose the device."""
    if world.main:
        atomic.remove_stale(out)  # e.g. the half-written checkpoint of a run killed while saving
        (out / "error.txt").unlink(missing_ok=True)
    dev = device_for(world, pick_device(device))
    # fixed input shapes: cuDNN picks its fastest kernels; TF32 for fp32 matmuls/convs
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev


def _pretrained(weights: str | None, state: dict | None, out: Path) -> tuple[Pretrained, dict]:
    """The weights to start from (on resume: those the run started from, unless others are given,
    which must make the same network) and their identity."""
    started_from = (state or {}).get("meta", {}).get("network")
    pretrained = load_pretrained(
        weights or (started_from or {}).get("weights") or default_weights()
    )
    network = pretrained.identity()  # hashes every tensor: once
    if started_from is not None:
        check_same_network(started_from, network, out / CHECKPOINT)
    return pretrained, network


def _named_sets(splits: Splits) -> list[tuple[str, Dataset]]:
    return [("train", splits.train), ("validation", splits.val), ("test", splits.test)]


def _test(
    model: TransferNet, recipe: Recipe, splits: Splits, world: World, progress: bool, timings: dict
) -> tuple[np.ndarray, np.ndarray | None]:
    """The shipped model's test logits (timed) and its validation logits."""
    t0 = time.perf_counter()
    desc = "test" if progress and world.main else None
    logits = shared_logits(model, splits.test.images, recipe, world, desc)
    timings["eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_logits = _validation_logits(model, splits, recipe, world)
    timings["calibration_s"] = time.perf_counter() - t0
    return logits, val_logits


def _results_and_temperature(
    model: TransferNet,
    recipe: Recipe,
    splits: Splits,
    logits: np.ndarray,
    val_logits: np.ndarray | None,
    out: Path,
    timings: dict,
) -> dict:
    """The test results and the temperature fitted on validation (once: the report and `analyze`
    measure this one); the model saved with it and with its training images' BatchNorm moments."""
    t0 = time.perf_counter()
    test = splits.test
    model.temperature = (
        fit_temperature(val_logits, splits.val.labels) if val_logits is not None else None
    )
    results = {
        "test": report.write_test_results(logits, test, out),
        "calibration": calibration(model.temperature, len(splits.val), logits, test.labels),
    }
    figures.calibration(results["calibration"], out / "reliability.png")
    timings["calibration_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    # for `--adapt` later
    model.source_moments = training_moments(model, splits.train.images, recipe)
    timings["source_moments_s"] = time.perf_counter() - t0
    save_model(model, recipe, out / "model.safetensors")
    return results


def _finish(out: Path, metrics: dict, history: list[dict], recipe: Recipe) -> None:
    figures.learning_curves(history, out / "learning_curves.png", recipe.finetune_from)
    atomic.write_json(out / "metrics.json", metrics)
    report.write(
        out, report.run_markdown(metrics, history, recipe.to_dict()), f"cifar-transfer: {out.name}"
    )
    (
        out / CHECKPOINT
    ).unlink()  # the run is complete: model.safetensors holds what is worth keeping


def _claim(
    world: World, out: Path, resume: bool, overwrite: bool
) -> contextlib.AbstractContextManager:
    return run_folder(out, resume, overwrite) if world.main else contextlib.nullcontext()


def _resume_state(out: Path) -> dict:
    if not (out / CHECKPOINT).is_file():
        done = (
            " (the run is complete: see metrics.json)" if (out / "metrics.json").is_file() else ""
        )
        raise TrainingError(f"{out / CHECKPOINT}: no checkpoint to resume from{done}")
    return load_checkpoint(out / CHECKPOINT)


def _run_facts(
    out: Path,
    recipe: Recipe,
    data_source: str,
    weights: str,
    resumed: bool,
    chosen_by: str | None,
    dev: torch.device,
    world: World,
) -> dict:
    """What metrics.json says about the run: its command, sources, machine and processes."""
    return {
        "name": out.name,
        "command": command_line(),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "data_source": data_source,
        "weights": weights,
        "resumed": resumed,
        "preset": recipe.name,
        "chosen_by": None if resumed else chosen_by,
        "computed_in": "bf16" if computes_in_bf16(dev, recipe.precision) else "fp32",
        **environment(dev),
        "distributed": {
            **world.describe(),
            "device_of_rank_0": str(dev),
            "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        },
    }


def _analysis(
    model: TransferNet,
    recipe: Recipe,
    splits: Splits,
    out: Path,
    human_labels: Path | None,
    logits: np.ndarray,
    timings: dict,
) -> dict:
    """The error analysis and its figures, timed."""
    # Grad-CAM and the corruptions load only for runs that analyse
    from ..analysis.analyze import analyze

    t0 = time.perf_counter()
    analysis = analyze(model, recipe, splits.test, human_labels, logits)
    figures.analysis_figures(analysis, splits.test, out)
    timings["analysis_s"] = time.perf_counter() - t0
    return analysis.result


def _validation_logits(
    model: TransferNet, splits: Splits, recipe: Recipe, world: World
) -> np.ndarray | None:
    """The shipped weights' validation logits: kept from the epoch that computed them, else one more
    pass."""
    if not len(splits.val):
        return None
    kept = model.val_logits
    if kept is not None and len(kept) == len(splits.val):
        return kept.float().cpu().numpy()
    return shared_logits(model, splits.val.images, recipe, world)


def shared_logits(
    model: TransferNet, images: np.ndarray, recipe: Recipe, world: World, desc: str | None = None
) -> np.ndarray:
    """Logits for `images`, each rank predicting its share, gathered on every rank (one process: all
    of them)."""
    mine = logits_for(model, images[world.rows(len(images))], recipe, desc=desc)
    if world.size == 1:
        return mine
    device = next(model.parameters()).device  # NCCL gathers device tensors
    return gather(torch.from_numpy(mine).to(device), world).cpu().numpy()


def repeat(recipe: Recipe, seeds: int, out: Path, **run_args: object) -> dict:
    """Run the recipe with seeds 0..seeds-1 (subsample and initialisation); mean and std of the
    results."""
    atomic.check_writable(out)
    runs = [
        run(dataclasses.replace(recipe, seed=k, analysis=False), out / f"seed-{k}", **run_args)[
            "test"
        ]
        for k in range(seeds)
    ]
    values = {"test accuracy": [r["accuracy"] for r in runs]}
    classes = list(runs[0]["per_class"])
    # the first seed's pairs (a folder's most confused differ from seed to seed)
    for pair in runs[0]["leakage"]:
        a, b = classes.index(pair["a"]), classes.index(pair["b"])
        values[f"{pair['a']} → {pair['b']}"] = [r["confusion_normalised"][a][b] for r in runs]
        values[f"{pair['b']} → {pair['a']}"] = [r["confusion_normalised"][b][a] for r in runs]
    summary = {
        name: {
            "mean": float(np.mean(v)),
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "values": v,
        }
        for name, v in values.items()
    }
    result = {"recipe": recipe.to_dict(), "seeds": list(range(seeds)), "summary": summary}
    atomic.write_json(out / "repeat.json", result)
    figures.spread(summary, out / "repeat.png")
    base = preset(recipe.name).to_dict() if recipe.name in PRESETS else {}
    changed = {k: v for k, v in recipe.to_dict().items() if k != "seed" and base.get(k) != v}
    report.write(
        out,
        report.repeat_markdown(recipe.name, seeds, changed, summary),
        f"cifar-transfer repeat: {recipe.name}",
    )
    return result


def eda(
    recipe: Recipe,
    out: Path,
    data_dir: str | None = None,
    download: bool = True,
    data: str | Path | None = None,
) -> Path:
    """The data's figures for the recipe's split of CIFAR-10 or of the folder `data` (samples.png,
    class_counts.png) into `out`."""
    splits = load_splits(recipe, data, data_dir, download).splits
    atomic.check_writable(out)
    figures.data_figures(splits, out, recipe.seed)
    return out


def finished(folder: Path) -> bool:
    """A completed run: its metrics are written and its checkpoint is gone."""
    return (folder / "metrics.json").is_file() and not (folder / CHECKPOINT).exists()

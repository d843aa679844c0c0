"""Jobs on a saved run: evaluate its model on the test set, another CIFAR-shaped set or a folder of photos, and
analyse its errors again."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from .. import atomic
from ..data.cifar import find_source, load_cifar10, load_test_set, split
from ..data.images import read_image_folder
from ..machine import environment
from ..model.inference import logits_for, tta_logits
from ..model.network import load_model, pick_device, place
from ..reporting import figures, report


def evaluate(
    run_dir: Path,
    data: str | None = None,
    device: str = "auto",
    download: bool = True,
    tta: bool = False,
    progress: bool = True,
) -> tuple[dict, Path]:
    """Re-evaluate a saved model on its test set, on another CIFAR-shaped set or on a folder of photos with one
    subfolder per class; with `tta`, predictions average each image with its mirror. Results go to
    RUN_DIR/evaluations/<data>/; returns the metrics and that folder."""
    model, recipe = load_model(run_dir / "model.safetensors")
    paths, skipped = None, []
    if data and Path(data).is_dir() and find_source(Path(data)) is None:  # photos, one folder per class
        test, paths, skipped = read_image_folder(Path(data))
    else:
        test = load_test_set(data) if data else load_cifar10(None, allow_download=download)[1]
    name = (Path(data).stem or Path(data).resolve().name) if data else "cifar10-test"
    out = run_dir / "evaluations" / name
    atomic.check_writable(out)
    dev = pick_device(device)
    model = place(model, recipe, dev)
    t0 = time.perf_counter()
    logits = (
        tta_logits(model, test.images, recipe)
        if tta
        else logits_for(model, test.images, recipe, desc="test" if progress else None)
    )
    seconds = time.perf_counter() - t0
    result = report.write_test_results(logits, test, out)
    for row in result["misclassified"] if paths is not None else []:
        row["file"] = paths[row["index"]]
    trained = run_dir / "metrics.json"
    reference = json.loads(trained.read_text())["test"]["accuracy"] if trained.is_file() and data else None
    metrics = {
        "run": {
            "model": str(run_dir / "model.safetensors"),
            "data_source": test.source,
            "tta": tta,
            "command": shlex.join(["cifar-transfer", *sys.argv[1:]]),
            **environment(dev),
        },
        "timings": {"eval_s": seconds},
        "test": result,
        "cifar10_test_accuracy": reference,
        "skipped": skipped,
    }
    atomic.write_json(out / "metrics.json", metrics)
    report.write(out, report.evaluation_markdown(run_dir, metrics), f"cifar-transfer evaluation: {name}")
    return metrics, out


def analyze(
    run_dir: Path,
    data_dir: str | None = None,
    human_labels: Path | None = None,
    device: str = "auto",
    download: bool = True,
) -> tuple[dict, Path]:
    """The error analysis of a saved run, on its own validation split and the CIFAR-10 test set, into
    RUN_DIR/analysis/; returns the result and that folder."""
    from ..analysis.analyze import analyze as analyse_model  # Grad-CAM and the corruptions load only here

    model, recipe = load_model(run_dir / "model.safetensors")
    train, test = load_cifar10(data_dir, allow_download=download)
    splits = split(train, test, recipe.train_size, recipe.val_size, recipe.seed)
    out = run_dir / "analysis"
    atomic.check_writable(out)
    analysis = analyse_model(place(model, recipe, pick_device(device)), recipe, splits.val, test, human_labels)
    figures.analysis_figures(analysis, test, out)
    atomic.write_json(out / "analysis.json", analysis.result)
    report.write(
        out,
        f"Analysis of `{run_dir}`\n\n" + report.analysis_markdown(analysis.result) + "\n",
        f"cifar-transfer analysis: {run_dir.name}",
    )
    return analysis.result, out

"""Jobs on a saved run: evaluate its model on the test set, another CIFAR-shaped set or a folder of
photos, and analyse its errors again."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..analysis import robustness
from ..analysis.audit import audit_test_labels
from ..analysis.calibration import calibration, softmax
from ..analysis.human import load_human
from ..data import corruptions
from ..data.augment import TRAINS_ON_CORRUPTIONS
from ..data.cifar import CLASSES, DataError, Dataset, find_source, load_cifar10, load_test_set
from ..data.images import read_image_folder
from ..data.sources import load_splits
from ..errors import CifarTransferError
from ..machine import command_line, environment
from ..model.adapt import PRIOR, TRANSDUCTIVE, adapted, training_moments
from ..model.inference import logits_for, tta_logits
from ..model.network import TransferNet, for_inference, load_model, pick_device, place
from ..recipe import Recipe
from ..reporting import figures, report
from ..runfolder import recorded, saved_test_logits


def evaluate(
    run_dir: Path,
    data: str | None = None,
    device: str = "auto",
    download: bool = True,
    tta: bool = False,
    progress: bool = True,
    adapt: bool = False,
) -> tuple[dict, Path]:
    """Re-evaluate a saved model on its test set, on another CIFAR-shaped set or on a folder of
    photos with one subfolder per class; with `tta`, predictions average each image with its mirror;
    with `adapt`, the model is first adapted to the unlabelled test images (each corruption and
    severity of a CIFAR-10-C folder to its own).

    Results go to RUN_DIR/evaluations/<data>/ (<data>-adapted/); returns the metrics and that
    folder.
    """
    model, recipe = load_model(run_dir / "model.safetensors")
    name = _evaluation_name(data) + ("-adapted" if adapt else "")
    out = atomic.child(run_dir / "evaluations", name)
    dev = pick_device(device)
    prepare = (
        _adapting(model, recipe, run_dir, None, download, dev)
        if adapt
        else _standard(model, recipe, dev)
    )
    if data and Path(data).is_dir() and corruptions.is_official_folder(Path(data)):
        atomic.check_writable(out)
        return _evaluate_cifar10c(prepare, recipe, Path(data), out, run_dir, adapt), out
    skipped = []
    # photos, one folder per class
    if data and Path(data).is_dir() and find_source(Path(data)) is None:
        test, skipped = read_image_folder(Path(data), model.classes, model.image_size)
    else:
        test = load_test_set(data) if data else load_cifar10(None, allow_download=download)[1]
    atomic.check_writable(out)
    t0 = time.perf_counter()
    model = prepare(test.images)
    logits = (
        tta_logits(model, test.images, recipe)
        if tta
        else logits_for(model, test.images, recipe, desc="test" if progress else None)
    )
    seconds = time.perf_counter() - t0
    result = report.write_test_results(logits, test, out)
    trained = run_dir / "metrics.json"
    reference = (
        json.loads(trained.read_text())["test"]["accuracy"] if trained.is_file() and data else None
    )
    metrics = {
        "run": {
            "model": str(run_dir / "model.safetensors"),
            "data_source": test.source,
            "tta": tta,
            "adapted": _adapted_facts(len(test)) if adapt else None,
            "command": command_line(),
            **environment(dev),
        },
        "timings": {"eval_s": seconds},
        "test": result,
        "cifar10_test_accuracy": reference,
        "skipped": skipped,
    }
    atomic.write_json(out / "metrics.json", metrics)
    report.write(
        out, report.evaluation_markdown(run_dir, metrics), f"cifar-transfer evaluation: {name}"
    )
    return metrics, out


def _evaluation_name(data: str | None) -> str:
    """The evaluation folder's name: the data file's stem or the data folder's own name, read from
    the resolved path (`..` or `.` name the folder they stand for, not a step out of
    evaluations/)."""
    if not data:
        return "cifar10-test"
    path = Path(data).resolve()
    return (path.stem if path.is_file() else path.name) or "root"


def _standard(
    model: TransferNet, recipe: Recipe, device: torch.device
) -> Callable[[np.ndarray], TransferNet]:
    """The saved model for inference, whatever the images."""
    inference = for_inference(model, recipe, device)
    return lambda images: inference


def _adapting(
    model: TransferNet,
    recipe: Recipe,
    run_dir: Path,
    data_dir: str | None,
    download: bool,
    device: torch.device,
) -> Callable[[np.ndarray], TransferNet]:
    """For `--adapt`: unlabelled images -> the model adapted to them (model.adapt), for inference.

    A model saved before its training images' moments were kept gets them from its training data,
    here and not saved.
    """
    network = place(model, recipe, device)
    moments = model.source_moments
    if moments is None:
        recipe_as_read = dataclasses.replace(recipe, image_size=model.image_size)
        facts = recorded(run_dir)
        if (
            data_dir is None
            and facts.get("data") is None
            and Path(facts.get("data_source", "")).is_dir()
        ):
            data_dir = facts["data_source"]  # the CIFAR-10 folder the run read
        train = load_splits(
            recipe_as_read, facts.get("data"), data_dir, download, progress=False
        ).splits.train
        moments = training_moments(network, train.images, recipe)
    return lambda images: for_inference(adapted(network, images, recipe, moments), recipe, device)


def _adapted_facts(images: int) -> dict:
    """What metrics.json says of an adaptation: on how many images each set was adapted, and that it
    is apart."""
    return {"images": images, "prior": PRIOR, "how": TRANSDUCTIVE}


def _evaluate_cifar10c(
    prepare: Callable[[np.ndarray], TransferNet],
    recipe: Recipe,
    folder: Path,
    out: Path,
    run_dir: Path,
    adapt: bool,
) -> dict:
    """Accuracy on each corruption and severity of a folder in CIFAR-10-C's released layout
    (`prepare`: the model for a corruption and severity's images, adapted to them or not)."""
    t0 = time.perf_counter()
    table: dict[str, list[float]] = {}
    sizes = set()
    device = None
    for name, _, ds in corruptions.read_official(folder):
        model = prepare(ds.images)
        device = model.mean.device
        predictions = logits_for(model, ds.images, recipe).argmax(1)
        table.setdefault(name, []).append(float((predictions == ds.labels).mean()))
        sizes.add(len(ds))
    origin = f"the released CIFAR-10-C files in {folder}"
    trained = run_dir / "metrics.json"
    clean = (
        json.loads(trained.read_text())["test"]["accuracy"] if trained.is_file() else float("nan")
    )
    result = robustness.summarise(
        table, clean, min(sizes), origin, TRAINS_ON_CORRUPTIONS.get(recipe.augment, ())
    )
    if adapt:
        result["adapted"] = _adapted_facts(min(sizes))
    seconds = time.perf_counter() - t0
    return _write_robustness(out, result, seconds, f"evaluation on {folder.name}", device)


def robustness_job(
    run_dir: Path,
    images: int = 1000,
    held_out: bool = True,
    data_dir: str | None = None,
    device: str = "auto",
    download: bool = True,
    adapt: bool = False,
) -> tuple[dict, Path]:
    """CIFAR-10-C's corruptions at its strength on `images` class-balanced test images (10,000: all
    of them), the held-out four too unless told not to, into RUN_DIR/robustness/; with `adapt`, the
    model adapted to each corruption and severity's images (and to the clean ones) before it
    classifies them, into RUN_DIR/robustness-adapted/."""
    from ..analysis.analyze import corruption_robustness

    model, recipe = load_model(run_dir / "model.safetensors")
    if model.classes != CLASSES or model.image_size != 32:
        raise CifarTransferError(
            f"robustness: {run_dir} was trained on other pictures than CIFAR-10's; CIFAR-10-C's "
            "corruptions are drawn at the strength made for CIFAR-10's 32-pixel test images, so "
            "they measure only CIFAR-10 models"
        )
    test = load_cifar10(data_dir, allow_download=download)[1]
    out = run_dir / ("robustness-adapted" if adapt else "robustness")
    atomic.check_writable(out)
    names = (*corruptions.BENCHMARK, *corruptions.HELD_OUT) if held_out else corruptions.BENCHMARK
    t0 = time.perf_counter()
    dev = pick_device(device)
    prepare = (
        _adapting(model, recipe, run_dir, data_dir, download, dev)
        if adapt
        else _standard(model, recipe, dev)
    )

    def classify(batch: np.ndarray) -> np.ndarray:
        return logits_for(prepare(batch), batch, recipe).argmax(1)

    result = corruption_robustness(classify, recipe, test, None, images, names)
    if "skipped" in result:
        raise CifarTransferError(f"robustness: {result['skipped']}")
    if adapt:
        result["adapted"] = _adapted_facts(result["images"])
    return _write_robustness(
        out, result, time.perf_counter() - t0, f"robustness of {run_dir.name}", dev
    ), out


def _write_robustness(
    out: Path, result: dict, seconds: float, title: str, device: torch.device
) -> dict:
    metrics = {
        "run": {"command": command_line(), **environment(device)},
        "timings": {"robustness_s": seconds},
        "robustness": result,
    }
    figures.robustness(result, out / "robustness.png")
    atomic.write_json(out / "metrics.json", metrics)
    report.write(out, report.robustness_markdown(result) + "\n", f"cifar-transfer {title}")
    return metrics


def analyze(
    run_dir: Path,
    data_dir: str | None = None,
    human_labels: Path | None = None,
    device: str = "auto",
    download: bool = True,
    data: str | Path | None = None,
) -> tuple[dict, Path]:
    """The error analysis of a saved run, on its own validation and test sets (CIFAR-10's, or
    those of the folder it trained on: `data`, else the one its metrics.json names), into
    RUN_DIR/analysis/; returns the result and that folder."""
    # Grad-CAM and the corruptions load only here
    from ..analysis.analyze import analyze as analyse_model

    model, recipe = load_model(run_dir / "model.safetensors")
    data = data if data is not None else recorded(run_dir).get("data")
    # the folder read as the model saw it
    recipe = dataclasses.replace(recipe, image_size=model.image_size)
    splits = load_splits(recipe, data, data_dir, download, progress=False).splits
    if splits.test.classes != model.classes:
        raise DataError(
            f"{data or 'CIFAR-10'}: classes {', '.join(splits.test.classes)}; the model knows "
            f"{', '.join(model.classes)}"
        )
    out = run_dir / "analysis"
    atomic.check_writable(out)
    # the one the run fitted and ships: measured, never fitted again
    temperature = model.temperature
    model = for_inference(model, recipe, pick_device(device))
    logits = saved_test_logits(run_dir, data, len(splits.test), len(model.classes))
    if logits is None:
        logits = logits_for(model, splits.test.images, recipe)
    analysis = analyse_model(model, recipe, splits.test, human_labels, logits)
    result = {
        "calibration": calibration(temperature, len(splits.val), logits, splits.test.labels),
        **analysis.result,
        "label_audit": _audit_test_labels(splits.test, logits, temperature, human_labels),
    }
    figures.calibration(result["calibration"], out / "reliability.png")
    figures.analysis_figures(analysis, splits.test, out)
    atomic.write_json(out / "analysis.json", result)
    md = "\n\n".join(
        [
            report.calibration_markdown(result["calibration"]),
            report.analysis_markdown(analysis.result),
            report.label_audit_section(result["label_audit"]),
        ]
    )
    report.write(
        out,
        f"Analysis of {report.code(run_dir)}\n\n{md}\n",
        f"cifar-transfer analysis: {run_dir.name}",
    )
    return result, out


def _audit_test_labels(
    test: Dataset, logits: np.ndarray, temperature: float | None, human_labels: Path | None
) -> dict:
    """`audit`'s test part as a section of the analysis: free, from the logits it has; with
    CIFAR-10H where it labels this test set."""
    human = None
    if human_labels is not None and test.is_cifar10:
        try:
            human = load_human(human_labels, test.labels)
        except DataError:
            human = None  # the analysis's human section says why
    probs = softmax(logits, temperature or 1.0)
    return audit_test_labels(test.labels, probs, test.classes, test.files, human)

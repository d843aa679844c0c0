"""`cifar-transfer audit RUN`: which of a run's labels are likely wrong (analysis.audit), into
RUN/audit/:

label_issues.csv (every flagged image, most suspect first), audit.json, a gallery and a report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from pathlib import Path

import numpy as np

from .. import atomic
from ..analysis.audit import (
    FOLDS,
    against_people,
    confirmed,
    label_issues,
    out_of_sample_probabilities,
)
from ..analysis.calibration import softmax
from ..analysis.human import load_human
from ..data.augment import to_nchw
from ..data.cifar import DataError, Dataset, Splits
from ..data.sources import load_splits
from ..machine import command_line, default_weights, environment
from ..model.inference import logits_for
from ..model.network import build_model, for_inference, load_model, pick_device, place
from ..model.weights import load_pretrained
from ..reporting import figures, report
from ..runfolder import recorded, saved_test_logits
from ..training.inputs import cache_activations

COLUMNS = ["image", "split", "given", "suggested", "quality"]
SHOWN = 24  # images in the gallery


def audit(
    run_dir: Path,
    *,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    download: bool = True,
    resolution: int | None = None,
    human_labels: Path | None = None,
) -> tuple[dict, Path]:
    """Flag the likely label errors of a run's training, validation and test images; returns the
    summary and RUN/audit/.

    `resolution`: the size the pretrained base sees the images at (its features score the training
    and validation labels; default: the run's own, which docs/audit.md measured to pay). With
    CIFAR-10H (`human_labels`), the test audit is checked against people.
    """
    model, recipe = load_model(run_dir / "model.safetensors")
    out = run_dir / "audit"
    atomic.check_writable(out)
    made = recorded(run_dir)
    data = data if data is not None else made.get("data")
    # the folder read as the model saw it
    recipe = dataclasses.replace(recipe, image_size=model.image_size)
    splits = load_splits(recipe, data, data_dir, download, progress=False).splits
    if splits.test.classes != model.classes:
        raise DataError(
            f"{data or 'CIFAR-10'}: classes {', '.join(splits.test.classes)}; the model knows "
            "others"
        )
    dev = pick_device(device)
    t0 = time.perf_counter()
    pool = _pooled(splits)
    resolution = resolution or recipe.resolution
    pretrained = load_pretrained(weights or made.get("weights") or default_weights())
    probs = _out_of_sample(pool, pretrained, model.classes, recipe, resolution, dev)
    trained = for_inference(model, recipe, dev)
    t1 = time.perf_counter()
    test_logits = saved_test_logits(run_dir, data, len(splits.test), len(model.classes))
    if test_logits is None:
        test_logits = logits_for(trained, splits.test.images, recipe)
    test_probs = softmax(test_logits, model.temperature or 1.0)
    t2 = time.perf_counter()
    parts = {"train+val": (pool, probs), "test": (splits.test, test_probs)}
    verdicts = {name: label_issues(ds.labels, p) for name, (ds, p) in parts.items()}
    verdicts["train+val"] = _confirmed_by(trained, pool, verdicts["train+val"], recipe)
    t3 = time.perf_counter()
    seconds = t3 - t0
    rows = _issue_rows(splits, pool, verdicts)
    summary = _summary(rows, verdicts, parts, seconds, resolution)
    # where the time goes: the features and heads, the test logits (none when the run saved them)
    summary["seconds_by_part"] = {"train+val": t1 - t0, "test": t2 - t1, "flags": t3 - t2}
    summary["run"] = {"command": command_line(), "audited": str(run_dir), **environment(dev)}
    if human_labels is not None and splits.test.is_cifar10:
        human = load_human(human_labels, splits.test.labels)
        summary["human"] = against_people(human, splits.test.labels, verdicts["test"]["flagged"])
    _write(out, rows, summary, pool, splits.test, verdicts)
    return summary, out


def _out_of_sample(
    pool: Dataset, pretrained, classes: tuple[str, ...], recipe, resolution: int, dev
) -> np.ndarray:
    """The training and validation images' out-of-sample probabilities: K-fold heads on the
    pretrained base's pooled features at `resolution`."""
    base = place(
        build_model(dataclasses.replace(recipe, resolution=resolution), pretrained, classes),
        recipe,
        dev,
    )
    (features,) = cache_activations(base, to_nchw(pool.images, dev), "stem", "head", recipe)
    return out_of_sample_probabilities(
        features.float().cpu().numpy(), pool.labels, len(classes), recipe.seed
    )


def _confirmed_by(trained, pool: Dataset, verdict: dict, recipe) -> dict:
    """The flags on the training and validation images that the run's own model (`trained`) still
    disagrees with; it predicts the flagged images only."""
    asked = np.flatnonzero(verdict["flagged"])
    predicted = logits_for(trained, pool.images[asked], recipe).argmax(1) if len(asked) else asked
    return confirmed(verdict, pool.labels, asked, predicted)


def _pooled(splits: Splits) -> Dataset:
    """Training and validation images in one set (their labels are judged together), named as
    label_issues.csv names them: the file for a folder, else the index among CIFAR-10's 50,000
    training images."""
    names = splits.train.files, splits.val.files
    if names[0] is None:
        names = tuple(str(i) for i in splits.train_index), tuple(str(i) for i in splits.val_index)
    return Dataset(
        np.concatenate([splits.train.images, splits.val.images]),
        np.concatenate([splits.train.labels, splits.val.labels]),
        splits.train.source,
        splits.train.classes,
        (*names[0], *names[1]),
    )


def _issue_rows(splits: Splits, pool: Dataset, verdicts: dict) -> list[dict]:
    """One row per flagged image, most suspect (lowest quality) first."""
    classes = pool.classes
    sets = np.array(["train"] * len(splits.train) + ["val"] * len(splits.val))
    rows = []
    for name, ds, split_of in (("train+val", pool, sets), ("test", splits.test, None)):
        v = verdicts[name]
        for i in np.flatnonzero(v["flagged"]):
            image = ds.files[i] if ds.files is not None else str(i)
            split = split_of[i] if split_of is not None else "test"
            given, suggested = classes[ds.labels[i]], classes[v["suggested"][i]]
            rows.append(
                {
                    "image": image,
                    "split": split,
                    "given": given,
                    "suggested": suggested,
                    "quality": float(v["quality"][i]),
                    "_part": name,
                    "_row": int(i),
                }
            )
    return sorted(rows, key=lambda r: r["quality"])


def _summary(
    rows: list[dict], verdicts: dict, parts: dict, seconds: float, resolution: int
) -> dict:
    """audit.json: how many images each part has and how many it flags, the class pairs flagged
    most, the top issues."""
    pairs: dict[str, int] = {}
    for r in rows:
        key = f"{r['given']} → {r['suggested']}"
        pairs[key] = pairs.get(key, 0) + 1
    return {
        "parts": {
            name: {
                "images": len(ds),
                "flagged": int(verdicts[name]["flagged"].sum()),
                "flagged_out_of_sample": int(
                    verdicts[name].get("flagged_out_of_sample", verdicts[name]["flagged"]).sum()
                ),
            }
            for name, (ds, _) in parts.items()
        },
        "how": {
            "train+val": f"{FOLDS}-fold logistic-regression heads on the pretrained base's "
            f"features at {resolution} px (out of sample: each image scored by "
            "a head that never saw it)",
            "test": "the shipped model with its temperature (it never trained on the test images)",
            "flagging": "cleanlab.filter.find_label_issues (prune by noise rate), "
            "ranked by self-confidence; a training or validation image stays flagged only if "
            "the run's own model, trained on its given label, still predicts another class",
        },
        "pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1])),
        "top": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows[:50]],
        "seconds": seconds,
    }


def _write(
    out: Path, rows: list[dict], summary: dict, pool: Dataset, test: Dataset, verdicts: dict
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "quality": f"{r['quality']:.6f}"} for r in rows)
    atomic.write_text(out / "label_issues.csv", buf.getvalue())
    atomic.write_json(out / "audit.json", summary)
    shown = rows[:SHOWN]
    images = (
        np.stack([(pool if r["_part"] == "train+val" else test).images[r["_row"]] for r in shown])
        if shown
        else None
    )
    gallery_rows = [
        {"index": k, "true": f"{r['split']}: {r['given']}", "predicted": r["suggested"]}
        for k, r in enumerate(shown)
    ]
    if images is not None:
        figures.gallery(
            images,
            gallery_rows,
            out / "label_issues.png",
            title="Most likely label errors (given → suggested)",
        )
    report.write(
        out, report.audit_markdown(summary, bool(shown)) + "\n", "cifar-transfer label audit"
    )

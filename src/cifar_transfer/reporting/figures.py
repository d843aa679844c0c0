"""The report's figures (matplotlib, Agg backend), each saved atomically as a PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text

from .. import atomic
from ..data.cifar import CLASSES, Dataset, Splits

if TYPE_CHECKING:  # the analysis imports Grad-CAM, which only runs that analyse need
    from ..analysis.analyze import Analysis


def save(fig: Figure, path: Path) -> Path:
    # class and file names are the user's: a `$` in one is no formula
    for label in fig.findobj(Text):
        label.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic.write_bytes(path, buf.getvalue())


# a sample grid shows at most this many classes (a row each), so 100 classes still fit a page
MAX_ROWS = 20
MAX_NAMED = 120  # class names a bar chart can still print, one under each group of bars


def sample_grid(ds: Dataset, path: Path, per_class: int = 10, seed: int = 0) -> Path:
    """One labelled row of random images per class (the first MAX_ROWS classes)."""
    rng = np.random.default_rng(seed)
    shown = min(len(ds.classes), MAX_ROWS)
    height = shown * 0.7 + 0.4  # rows as tall as the square images are wide
    fig, axes = plt.subplots(shown, per_class, figsize=(per_class * 0.8, height), squeeze=False)
    # the title 0.4 in above
    fig.subplots_adjust(top=1 - 0.4 / height, bottom=0.01, hspace=0.08, wspace=0.05)
    for c, row in enumerate(axes):
        rows = np.flatnonzero(ds.labels == c)
        picks = rng.choice(rows, min(per_class, len(rows)), replace=False)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        for ax, i in zip(row, picks):
            ax.imshow(ds.images[i], interpolation="nearest")
        row[0].set_ylabel(ds.classes[c], rotation=0, ha="right", va="center", fontsize=9)
    more = f" (the first {shown} of {len(ds.classes)} classes)" if shown < len(ds.classes) else ""
    fig.suptitle(f"Random training images, one row per class{more}", fontsize=10)
    return save(fig, path)


def class_counts(counts: dict[str, list[int]], classes: tuple[str, ...], path: Path) -> Path:
    """Images per class in each split, as grouped bars; the legend above the bars, never on them.

    Past MAX_NAMED classes the names are left out (metrics.json has every count).
    """
    fig, ax = plt.subplots(figsize=(min(max(9, 0.25 * len(classes)), 30), 3.2))
    width = 0.8 / len(counts)
    x = np.arange(len(classes))
    for k, (split, values) in enumerate(counts.items()):
        ax.bar(
            x + (k - (len(counts) - 1) / 2) * width,
            values,
            width,
            label=f"{split} ({sum(values):,})",
        )
    if len(classes) <= 20:
        ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    elif len(classes) <= MAX_NAMED:
        ax.set_xticks(x, classes, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(classes)} classes, in name order (metrics.json lists each count)")
    ax.set_ylabel("images")
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.legend(
        loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(counts), frameon=False, fontsize=8
    )
    ax.set_title("Images per class", loc="right")
    return save(fig, path)


def learning_curves(history: list[dict], path: Path, finetune_from: str = "stem") -> Path:
    """Train and validation loss and accuracy per epoch, with the phase boundary and the shipped
    epoch marked."""
    finetuned = "all layers" if finetune_from == "stem" else f"{finetune_from} onwards and the head"
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        head = [h["epoch"] for h in history if h["phase"] == 1]
        if head and len(head) < len(history):
            ax.axvline(max(head) + 0.5, color="grey", linestyle="--", label="fine-tune starts")
        kept = [h for h in history if h.get("shipped")]
        if kept:
            ax.plot(kept[0]["epoch"], kept[0][f"val_{key}"], "k*", markersize=14, label="shipped")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Learning curves (phase 1: head only, phase 2: {finetuned})", fontsize=10)
    return save(fig, path)


def overlaid_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Several runs' validation accuracy and training loss per epoch on shared axes."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label=name)
        acc_ax.plot(epochs, [h["val_acc"] for h in history], "s-", label=name)
    for ax, label in ((loss_ax, "training loss"), (acc_ax, "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Learning curves, run by run", fontsize=10)
    return save(fig, path)


def lr_find(result: dict, path: Path) -> Path:
    """The range test: loss against learning rate (log scale), smoothed, with the suggested rate
    marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(result["lrs"], result["losses"], color="lightgrey", label="loss per step")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    if result["suggestion"]:
        ax.axvline(
            result["suggestion"],
            color="C3",
            linestyle="--",
            label=f"suggested {result['suggestion']:.1e} ({result['method']})",
        )
    ax.set_xscale("log")
    # up to where the test stops
    ax.set_ylim(min(result["smoothed"]) * 0.9, 4 * min(result["smoothed"]))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"Learning-rate range test, phase {result['phase']} ({result['optimizer']})", fontsize=10
    )
    return save(fig, path)


def confusion(cm: list[list[int]], classes: tuple[str, ...], path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    counts = np.asarray(cm)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(5.4, 0.16 * len(classes))
    fig, axes = plt.subplots(1, 2, figsize=(2.4 * side, side))
    for ax, m, title, fmt in (
        (axes[0], counts, "counts", "d"),
        (axes[1], norm, "share of each true class", ".2f"),
    ):
        class_matrix(ax, norm, m, fmt, "Blues", "predicted", f"Confusion matrix ({title})", classes)
    return save(fig, path)


ANNOTATED = (
    20  # class heat maps write each cell's value up to this many classes; beyond, colour alone
)


def class_matrix(
    ax: plt.Axes,
    shade: np.ndarray,
    values: np.ndarray,
    fmt: str,
    cmap: str,
    xlabel: str,
    title: str,
    classes: tuple[str, ...] = CLASSES,
) -> None:
    """A class x class heat map, coloured by `shade` (in [0, 1]) and annotated with `values` (up to
    ANNOTATED classes)."""
    ax.imshow(shade, cmap=cmap, vmin=0, vmax=1)
    n = len(classes) if len(classes) <= ANNOTATED else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                format(values[i, j], fmt),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shade[i, j] > 0.5 else "black",
            )
    size = 8 if len(classes) <= ANNOTATED else 5
    ax.set_xticks(
        range(len(classes)),
        classes,
        rotation=45 if len(classes) <= ANNOTATED else 90,
        ha="right",
        fontsize=size,
    )
    ax.set_yticks(range(len(classes)), classes, fontsize=size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)


GALLERY_TITLE = "Misclassified test images with the highest loss (true → predicted, confidence)"


def gallery(
    images: np.ndarray, rows: list[dict], path: Path, cols: int = 8, title: str = GALLERY_TITLE
) -> Path:
    """Images with their true class and prediction (and its confidence, when the rows have one)."""
    n = max(len(rows), 1)
    r = (n + cols - 1) // cols
    fig, axes = plt.subplots(r, cols, figsize=(cols * 1.5, r * 1.85), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(images[row["index"]], interpolation="nearest")
        note = f" {row['confidence']:.0%}" if "confidence" in row else ""
        ax.set_title(f"{row['true']}\n→ {row['predicted']}{note}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def reliability(before: dict, after: dict, temperature: float, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature
    scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, bins, title in (
        (axes[0], before, "as trained"),
        (axes[1], after, f"temperature {temperature:.2f}"),
    ):
        edges = np.asarray(bins["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        used = np.asarray(bins["count"]) > 0
        ax.bar(
            centres[used],
            np.asarray(bins["accuracy"])[used],
            width=width,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {bins['ece']:.3f}", fontsize=10)
        ax.legend(loc="upper left")
    return save(fig, path)


def human_vs_model(human: list[list[float]], model: list[list[float]], path: Path) -> Path:
    """Row-normalised confusion of CIFAR-10H's people beside the model's."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, m, title in (
        (axes[0], np.asarray(human), "people (CIFAR-10H)"),
        (axes[1], np.asarray(model), "model"),
    ):
        # shaded by the square root so that small rates stay visible
        class_matrix(ax, np.sqrt(m), m, ".2f", "Purples", "labelled as", f"Confusion of {title}")
    return save(fig, path)


def robustness(result: dict, path: Path) -> Path:
    """Accuracy against corruption severity, one line per corruption (held-out ones dashed)."""
    from ..data.corruptions import HELD_OUT

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors
    for i, (name, accs) in enumerate(result["accuracy"].items()):
        style = "o--" if name in HELD_OUT else "o-"
        ax.plot(
            result["severities"],
            accs,
            style,
            color=colours[i % 20],
            label=name.replace("_", " "),
            ms=3,
        )
    ax.axhline(result["clean"], color="black", linestyle=":", label="clean")
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_xticks(result["severities"])
    ax.set_title(
        f"Accuracy under CIFAR-10-C's corruptions ({result['images']:,} test images)", fontsize=10
    )
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    return save(fig, path)


def spread(summary: dict[str, dict], path: Path) -> Path:
    """Per-seed values of each measure, with mean ± std."""
    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    for y, name in enumerate(names):
        s = summary[name]
        ax.plot(s["values"], [y] * len(s["values"]), "o", alpha=0.6, color="tab:blue")
        ax.errorbar(s["mean"], y, xerr=s["std"], fmt="|", color="black", capsize=4, markersize=14)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("rate (test set)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("Spread across seeds: each dot one run; bar = mean ± std", fontsize=10)
    return save(fig, path)


def data_figures(splits: Splits, out: Path, seed: int = 0) -> None:
    """The data's figures: random samples of each class and the class counts of each split."""
    sample_grid(splits.train, out / "samples.png", seed=seed)
    class_counts(
        {
            "train": counts(splits.train),
            "validation": counts(splits.val),
            "test": counts(splits.test),
        },
        splits.train.classes,
        out / "class_counts.png",
    )


def counts(ds: Dataset) -> list[int]:
    """Images per class."""
    return np.bincount(ds.labels, minlength=len(ds.classes)).tolist()


def calibration(cal: dict, path: Path) -> None:
    """The reliability diagram of a shipped temperature (analysis.calibration); none without one."""
    if cal["temperature"] is not None:
        reliability(cal["bins_before"], cal["bins_after"], cal["temperature"], path)


def analysis_figures(analysis: Analysis, test: Dataset, out: Path) -> None:
    """The error analysis's figures: human vs model confusion, clear errors, Grad-CAM,
    corruptions."""
    from sklearn.metrics import confusion_matrix

    result = analysis.result
    if "skipped" not in result["human"]:
        model_cm = confusion_matrix(
            test.labels, analysis.predictions, labels=range(len(test.classes)), normalize="true"
        )
        human_vs_model(
            result["human"]["human_confusion"], model_cm.tolist(), out / "human_vs_model.png"
        )
        gallery(
            test.images,
            result["human"]["clear_errors"],
            out / "clear_errors.png",
            title="Model errors on images people found clear (≥ 99% chose the true class)",
        )
    if "skipped" not in result["attribution"]:
        gallery(
            analysis.gradcam,
            analysis.gradcam_rows,
            out / "gradcam.png",
            title="Grad-CAM for the predicted class on the worst errors (true → predicted)",
        )
    if "skipped" not in result["robustness"]:
        robustness(result["robustness"], out / "robustness.png")

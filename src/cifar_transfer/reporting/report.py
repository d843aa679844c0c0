"""report.md and a self-contained report.html, every number read from this run's metrics and
history."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown
import numpy as np

from .. import atomic
from ..analysis.metrics import score_predictions
from ..data.cifar import Dataset
from . import figures

# What a CIFAR-10 report measures itself against: the original report's claim for its recipe (a
# claim, not a measurement; what this project measured of that recipe is in docs/results.md with its
# command and machine).
CLAIM = 0.92


# Markdown that could make markup of user text: a link or image (whose address could run a script),
# a code span, a table cell's end, emphasis, and the escape character itself. `<`, `>` and `&`
# become HTML's references.
MARKDOWN_SPECIAL = frozenset("\\`*[]|")
HTML_SPECIAL = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def text(value: object) -> str:
    """User text (a path, a file, folder or recipe name, a class name, an error message) made
    inert in Markdown and HTML: it reads the same in report.md and report.html and can never
    become a tag, a link or a script."""
    return "".join(_inert(c) for c in _printable(value))


def _inert(c: str) -> str:
    if c in HTML_SPECIAL:
        return HTML_SPECIAL[c]
    return f"\\{c}" if c in MARKDOWN_SPECIAL else c


def code(value: object) -> str:
    """User text as a code span, fenced with more backticks than it holds in a row, so nothing in it
    can end the span; Markdown writes everything inside a code span as text."""
    shown = _printable(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", shown)), default=0) + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def _printable(value: object) -> str:
    """One line: a line break becomes a space, any other control character the replacement
    character."""
    return "".join(_printable_char(c) for c in str(value))


def _printable_char(c: str) -> str:
    if c in "\n\r\t":
        return " "
    return c if c.isprintable() else "\ufffd"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def findings(metrics: dict, history: list[dict]) -> list[str]:
    """Plain-language observations, each computed from the numbers."""
    test = metrics["test"]
    out = [
        f"Test accuracy is **{pct(test['accuracy'])}** on {test['n']:,} test images "
        f"({test['errors']:,} errors), mean cross-entropy {test['loss']:.4f}."
    ]
    if history:
        last = history[-1]
        gap = last["train_acc"] - last["val_acc"]
        verdict = "little overfitting"
        if gap > 0.15:
            verdict = "the model memorises its training subset"
        elif gap > 0.05:
            verdict = "a moderate generalisation gap"
        out.append(
            f"After the last epoch, training accuracy is {pct(last['train_acc'])} and validation "
            f"accuracy {pct(last['val_acc'])}: a gap of {100 * gap:.1f} points, {verdict}."
        )
        best = max(history, key=lambda h: h["val_acc"])
        if best["epoch"] != last["epoch"]:
            out.append(
                f"Validation accuracy peaked at {pct(best['val_acc'])} in epoch {best['epoch']} "
                f"(phase {best['phase']}), above the last epoch's."
            )
    per = test["per_class"]
    present = [c for c in per if per[c]["support"]]
    worst = min(present, key=lambda c: per[c]["f1"])
    best_c = max(present, key=lambda c: per[c]["f1"])
    out.append(
        f"Hardest class: **{text(worst)}** (F1 {per[worst]['f1']:.3f}); easiest: "
        f"**{text(best_c)}** (F1 {per[best_c]['f1']:.3f})."
    )
    top = test["most_confused"][0]
    out.append(
        f"The most confused pair is {text(top['a'])}↔{text(top['b'])} with {top['errors']} errors "
        f"({top['a_as_b']} {text(top['a'])} taken for {text(top['b'])}, {top['b_as_a']} the other "
        f"way): {100 * top['errors'] / max(test['errors'], 1):.1f}% of all errors."
    )
    return out


def headline(metrics: dict, recipe: dict) -> str:
    """The report's first lines: this run's accuracy beside the original report's claim (for
    CIFAR-10; a folder of the user's own pictures has no such yardstick).

    No number this run did not measure.
    """
    acc = metrics["test"]["accuracy"]
    if metrics.get("data", {}).get("kind") == "folder":
        classes = len(metrics["data"]["classes"])
        return (
            f"**Test accuracy {pct(acc)}** on {metrics['test']['n']:,} held-out test pictures of "
            f"{classes} classes."
        )
    verdict = "reaches" if acc >= CLAIM else "falls short of"
    literal = (
        "This run *is* that literal recipe."
        if recipe["name"] == "seed"
        else (
            "That literal recipe is preset `seed`: `cifar-transfer compare` sets a run of it "
            "beside this one."
        )
    )
    return (
        f"**Test accuracy {pct(acc)}** on {metrics['test']['n']:,} test images — it {verdict} the "
        f"{pct(CLAIM)} the original report claimed for its recipe. {literal}"
    )


def run_line(metrics: dict, preset: str) -> str:
    """Preset (and why it was chosen), device, where the time went, peak memory, when."""
    run, t = metrics["run"], metrics["timings"]
    chosen = f" (chosen by {text(run['chosen_by'])})" if run.get("chosen_by") else ""
    times = f"training {t['train_s']:.0f} s, test evaluation {t['eval_s']:.1f} s"
    if "analysis_s" in t:
        times += f", error analysis {t['analysis_s']:.0f} s"
    memory = (
        f" · peak memory {metrics['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in metrics else ""
    )
    computed_in = f" in {run['computed_in']}" if "computed_in" in run else ""
    return (
        f"Preset **{text(preset)}**{chosen} · {text(run['device_name'])}{computed_in} · "
        f"{t['total_s']:.0f} s in all ({times}){memory} · {run['finished']}"
    )


def shipped_markdown(s: dict) -> str:
    if not s:
        return ""
    return (
        f"The shipped weights are those of epoch {s['epoch']} (phase {s['phase']}, validation "
        f"accuracy {pct(s['val_acc'])}): {text(s['why'])}. The test set "
        "was not used to choose them."
    )


def calibration_markdown(c: dict) -> str:
    """The temperature shipped with the model, and what it does on the test set: calibration error,
    cross-entropy, confidence."""
    if c.get("temperature") is None:
        return (
            "## Calibration\n\nProbabilities are not calibrated: "
            f"{text(c.get('skipped', 'no temperature'))}."
        )
    t = c["test"]
    return (
        f"## Calibration\n\nThe model ships with temperature **T = {c['temperature']:.3f}**, "
        f"fitted on the {c['validation_images']:,} validation images (never the test set): "
        "`predict`, `serve` and the ONNX export return softmax(logits / T) unless told not to; T "
        "> 1 means the model was over-confident. On the test set it moves the expected "
        f"calibration error (15 equal-width bins) from **{c['ece_before']:.4f}** to "
        f"**{c['ece_after']:.4f}**, the mean cross-entropy from {c['nll_before']:.4f} to "
        f"{c['nll_after']:.4f}, and the mean top-class probability from "
        f"{pct(t['mean_confidence_before'])} to {pct(t['mean_confidence_after'])}, beside an "
        f"accuracy of {pct(t['accuracy'])}; predictions (the arg-max) do not "
        "change.\n\n![Reliability diagram](reliability.png)"
    )


def results_markdown(test: dict, pictures: dict[str, str]) -> str:
    """The test-set sections: per-class scores, confusion, leakage, misclassified images."""
    per = test["per_class"]
    # the classes present
    rows = [
        [
            text(c),
            f"{per[c]['precision']:.4f}",
            f"{per[c]['recall']:.4f}",
            f"{per[c]['f1']:.4f}",
            per[c]["support"],
        ]
        for c in per
        if per[c]["support"]
    ]
    leak = [
        [
            f"{text(r['a'])} ↔ {text(r['b'])}",
            f"{pct(r['a_as_b'])} ({r['a_as_b_count']})",
            f"{pct(r['b_as_a'])} ({r['b_as_a_count']})",
        ]
        for r in test["leakage"]
    ]
    confused = [
        [f"{text(r['a'])} ↔ {text(r['b'])}", r["errors"], r["a_as_b"], r["b_as_a"]]
        for r in test["most_confused"]
    ]
    wrong = [_misclassified_row(r) for r in test["misclassified"][:12]]
    return "\n\n".join(
        [
            "## Per-class precision, recall and F1",
            table(["class", "precision", "recall", "F1", "support"], rows),
            f"Macro-averaged F1: {test['macro_f1']:.4f}.",
            "## Confusion matrix",
            f"![Confusion matrix]({pictures['confusion']})",
            "## Class leakage between look-alike classes",
            "Share of each class predicted as the other (count in brackets), in both directions.",
            table(["pair (a ↔ b)", "a predicted as b", "b predicted as a"], leak),
            "Most-confused pairs overall (errors in both directions):",
            table(["pair (a ↔ b)", "errors", "a as b", "b as a"], confused),
            "## Misclassified images with the highest loss",
            f"![Misclassified]({pictures['gallery']})",
            table(["image", "true", "predicted", "confidence", "loss"], wrong),
        ]
    )


def data_markdown(metrics: dict, recipe: dict) -> str:
    """Where the pictures came from and how they were split; for a folder, what was skipped and what
    leaks; what was left out."""
    data = metrics["data"]
    left_out = ""
    if "excluded" in data:
        left_out = (
            f"\n\n**{data['excluded']['images']:,} training and validation images were left out**, "
            f"as {code(data['excluded']['file'])} lists them (`run --exclude`: e.g. the "
            "labels an audit flagged)."
        )
    return _source_markdown(metrics, recipe) + left_out


def _source_markdown(metrics: dict, recipe: dict) -> str:
    run, data = metrics["run"], metrics["data"]
    if data.get("kind") != "folder":
        return (
            f"CIFAR-10 from {code(run['data_source'])}. Training images are a class-balanced "
            f"subsample (seed {recipe['seed']}); validation images come from the training images "
            "*not* in it; the test set is used only for the final evaluation."
        )
    fractions = data["fractions"]
    parts = [
        f"{len(data['classes'])} classes from the folder {code(run['data_source'])}, each picture "
        f"stored as a {data['image_size']} × {data['image_size']} square. Where the folder has no "
        f"`val/` or `test/`, each class gave {fractions['validation']:.0%} of its pictures to "
        f"validation and {fractions['test']:.0%} to test (seed {recipe['seed']}); `splits.csv` "
        "lists which file went where. The test set is used only for the final evaluation."
    ]
    if data["skipped"]:
        shown = "\n".join(f"- {text(s)}" for s in data["skipped"][:20])
        more = (
            f"\n- … and {len(data['skipped']) - 20} more (metrics.json lists them all)"
            if len(data["skipped"]) > 20
            else ""
        )
        parts.append(f"{len(data['skipped'])} skipped:\n\n{shown}{more}")
    parts.append(duplicates_markdown(data["duplicates"], data["policy"]))
    return "\n\n".join(parts)


def duplicates_markdown(copies: list[dict], policy: str) -> str:
    """The validation and test pictures that copy an earlier set's picture, and what was done with
    them."""
    if not copies:
        return (
            "No validation or test picture copies a picture of an earlier set (neither the same "
            "pixels nor a perceptual hash within a few bits)."
        )
    exact = sum(c["exact"] for c in copies)
    dropped = sum(c["dropped"] for c in copies)
    conflicts = sum(not c["same_class"] for c in copies)
    done = (
        f"{dropped} of them were dropped from their set (recipe field duplicates={policy})"
        if dropped
        else (
            "they were kept: `--set duplicates=drop-exact` (or `drop-near`) removes them from "
            "their set"
        )
    )
    rows = [
        [
            code(c["later"]),
            c["later_set"],
            code(c["earlier"]),
            c["earlier_set"],
            _copy_kind(c),
            _yes(c["dropped"]),
        ]
        for c in copies[:20]
    ]
    more = (
        f"\n\n… and {len(copies) - 20} more (metrics.json lists them all)"
        if len(copies) > 20
        else ""
    )
    label = f" {conflicts} of them carry a different label than their copy." if conflicts else ""
    return (
        f"**{len(copies)} validation or test pictures copy an earlier set's picture** ({exact} "
        f"exact, {len(copies) - exact} near: perceptual hashes a few bits apart): the model may be "
        f"scored on pictures it trained on; {done}.{label}\n\n"
        + table(["picture", "set", "copy of", "set", "how close", "dropped"], rows)
        + more
    )


def _copy_kind(copy: dict) -> str:
    kind = "same pixels" if copy["exact"] else f"{copy['bits_apart']} bits apart"
    return kind if copy["same_class"] else f"{kind}; other label"


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


def _misclassified_row(r: dict) -> list[str]:
    """A misclassified image named by its file where it has one, else by its index in the test
    set."""
    shown = code(r["file"]) if "file" in r else str(r["index"])
    return [
        shown,
        text(r["true"]),
        text(r["predicted"]),
        f"{r['confidence']:.3f}",
        f"{r['loss']:.3f}",
    ]


def run_markdown(metrics: dict, history: list[dict], recipe: dict) -> str:
    run, data = metrics["run"], metrics["data"]
    hist = [
        [
            h["epoch"],
            h["phase"],
            f"{h['lr']:.2g}",
            f"{h['train_loss']:.4f}",
            f"{h['train_acc']:.4f}",
            f"{h['val_loss']:.4f}",
            f"{h['val_acc']:.4f}",
            f"{h['seconds']:.1f}",
            "✓" if h.get("shipped") else "",
        ]
        for h in history
    ]
    counts = [[split, f"{sum(c):,}", min(c), max(c)] for split, c in data["counts"].items()]
    results = [
        f"# cifar-transfer report: {text(run['name'])}",
        headline(metrics, recipe),
        run_line(metrics, recipe["name"]),
        "## What this run found",
        "\n".join(f"- {f}" for f in findings(metrics, history)),
        f"# Test set: {pct(metrics['test']['accuracy'])} accuracy",
        results_markdown(
            metrics["test"], {"confusion": "confusion_matrix.png", "gallery": "misclassified.png"}
        ),
        calibration_markdown(metrics["calibration"]),
        analysis_markdown(metrics["analysis"]) if "analysis" in metrics else "",
    ]
    appendix = [
        "# Appendix: how this run was made",
        "## Data",
        data_markdown(metrics, recipe),
        table(["split", "images", "fewest per class", "most per class"], counts),
        "![Images per class](class_counts.png)",
        "![Sample images](samples.png)",
        "## Training",
        "![Learning curves](learning_curves.png)",
        shipped_markdown(metrics.get("shipped", {})),
        "Training loss includes label smoothing when the recipe sets it; validation loss is plain "
        "cross-entropy.",
        table(
            [
                "epoch",
                "phase",
                "lr",
                "train loss",
                "train acc",
                "val loss",
                "val acc",
                "seconds",
                "shipped",
            ],
            hist,
        ),
        "## Reproduce",
        # one line that starts with the program's name: nothing in it can close the fence
        f"```\n{_printable(run['command'])}\n```\n\ntorch {run['versions']['torch']}, torchvision "
        f"{run['versions']['torchvision']}, Python {run['versions']['python']}.",
        "## Recipe",
        f"Weights: {code(run['weights'])}. Labels are class indices with cross-entropy, the same "
        "mathematics as one-hot categorical cross-entropy.",
        table(["field", "value"], [[k, code(v)] for k, v in recipe.items()]),
    ]
    return "\n\n".join(part for part in results + appendix if part) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.5em 0}td,th{
border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f5f5f5;
padding:0 .2em}pre{background:#f5f5f5;padding:.6em;overflow-x:auto}"""


# A report is a document: no script of any kind runs in it, whatever text reached it; images only as
# data URIs.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def to_html(md: str, folder: Path, title: str) -> str:
    """Render markdown and inline every local image as a data URI, so the page stands alone."""
    body = markdown.markdown(md, extensions=["tables", "fenced_code"])

    def inline(m: re.Match) -> str:
        data = base64.b64encode((folder / m.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n<meta '
        'http-equiv="Content-Security-Policy" '
        f'content="{POLICY}">\n<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n{body}\n'
        "</body></html>\n"
    )


def evaluation_markdown(run_dir: Path, metrics: dict) -> str:
    """The report of `evaluate`: accuracy (beside the CIFAR-10 test accuracy when the set is
    another), what was skipped, then the test-set sections."""
    test, ref, skipped = metrics["test"], metrics["cifar10_test_accuracy"], metrics["skipped"]
    parts = [
        f"# Evaluation of {code(run_dir)} on {code(metrics['run']['data_source'])}",
        f"Accuracy **{pct(test['accuracy'])}** on {test['n']:,} images"
        + (" with flip test-time augmentation" if metrics["run"]["tta"] else "")
        + f", mean cross-entropy {test['loss']:.4f}.",
    ]
    if adapted := metrics["run"].get("adapted"):
        parts.append(_adapted_line(adapted))
    if ref is not None:
        parts.append(
            f"On the CIFAR-10 test set this model scored {pct(ref)}: a drop of "
            f"**{100 * (ref - test['accuracy']):.1f} points** on this set."
        )
    if skipped:
        parts.append(f"{len(skipped)} skipped:\n\n" + "\n".join(f"- {text(s)}" for s in skipped))
    parts.append(
        results_markdown(
            test, {"confusion": "confusion_matrix.png", "gallery": "misclassified.png"}
        )
    )
    if any("file" in r for r in test["misclassified"]):
        parts.append(
            table(
                ["file", "true", "predicted", "confidence"],
                [
                    [
                        code(r["file"]),
                        text(r["true"]),
                        text(r["predicted"]),
                        f"{r['confidence']:.3f}",
                    ]
                    for r in test["misclassified"]
                ],
            )
        )
    return "\n\n".join(parts) + "\n"


def compare_markdown(s: dict) -> str:
    """`compare`'s report: one column per run, a row per differing recipe field and per result; then
    leakage and the curves."""
    fields, runs = s["differing_fields"], s["runs"]
    rows = [[code(k), *(code(r["recipe"][k]) for r in runs)] for k in fields]
    pairs = dict.fromkeys(p for r in runs for p in r["leakage"])
    rows += [
        ["**test accuracy**", *(f"**{_maybe(r['accuracy'], pct)}**" for r in runs)],
        ["test loss", *(_maybe(r["loss"], "{:.4f}".format) for r in runs)],
        ["best validation accuracy", *(_maybe(r.get("best_val_acc"), pct) for r in runs)],
        *([f"leakage {text(p)}", *(_maybe(r["leakage"].get(p), pct) for r in runs)] for p in pairs),
        ["training (s)", *(_maybe(r["train_s"], "{:.0f}".format) for r in runs)],
        ["total (s)", *(_maybe(r["total_s"], "{:.0f}".format) for r in runs)],
        ["machine", *(text(r["machine"] or "—") for r in runs)],
        ["lacks", *(text("; ".join(r.get("lacks", [])) or "—") for r in runs)],
    ]
    return (
        "\n\n".join(
            [
                f"# Comparison of {len(runs)} runs",
                "Recipe fields that differ: "
                + (", ".join(code(k) for k in fields) or "none")
                + ". Leakage is the share of the first class of a pair predicted as the second.",
                table(["", *(code(r["run"]) for r in runs)], rows),
                "## Learning curves",
                "![Learning curves](learning_curves.png)",
            ]
        )
        + "\n"
    )


def _maybe(value: float | None, show) -> str:
    return "—" if value is None else show(value)


def write_test_results(logits: np.ndarray, test: Dataset, out: Path) -> dict:
    """The scores of `logits` on `test`; writes classification_report.txt and the confusion and
    gallery figures."""
    result = score_predictions(logits, test.labels, test.classes)
    for row in result["misclassified"] if test.files is not None else []:
        row["file"] = test.files[row["index"]]
    atomic.write_text(out / "classification_report.txt", result["classification_report"])
    figures.confusion(result["confusion"], test.classes, out / "confusion_matrix.png")
    figures.gallery(test.images, result["misclassified"], out / "misclassified.png")
    return result


def write(folder: Path, md: str, title: str) -> None:
    atomic.write_text(folder / "report.md", md)
    atomic.write_text(folder / "report.html", to_html(md, folder, title))


def analysis_markdown(a: dict) -> str:
    """The error-analysis sections: flip TTA, human ambiguity, Grad-CAM, corruptions."""
    sections = [
        _tta_section(a["tta"]),
        _human_section(a["human"]),
        _attribution_section(a["attribution"]),
        robustness_markdown(a["robustness"]),
    ]
    return "\n\n".join(["# Error analysis", *sections])


def _tta_section(tta: dict) -> str:
    return (
        "## Test-time augmentation\n\nAveraging each prediction with that of the horizontally "
        f"flipped image, on {tta_scope(tta)}: accuracy {pct(tta['accuracy'])} → "
        f"{pct(tta['accuracy_flip_tta'])} ({100 * tta['change']:+.2f} points)."
    )


def _human_section(human: dict) -> str:
    if "skipped" in human:
        return f"## Human ambiguity (CIFAR-10H)\n\nSkipped: {text(human['skipped'])}."
    rows = [
        [
            f"{text(r['true'])} → {text(r['predicted'])}",
            r["errors"],
            r["on_ambiguous"],
            r["on_clear"],
            pct(r["share_ambiguous"]),
            pct(r["ambiguous_rate_in_class"]),
        ]
        for r in human["leakage"]
    ]
    header = ["true → predicted", "model errors", "on ambiguous", "on the rest", "share ambiguous"]
    parts = [
        "## Human ambiguity (CIFAR-10H)",
        f"An image is *ambiguous* when fewer than {human['ambiguous_below']:.0%} of about 51 "
        f"people chose its true class: {human['ambiguous_images']:,} test images are. Of the "
        f"model's {human['errors']:,} errors, {human['errors_on_ambiguous']:,} "
        f"({pct(human['errors_on_ambiguous'] / max(human['errors'], 1))}) fall on ambiguous "
        f"images, and {human['errors_on_clear']:,} on images at least {human['clear_from']:.0%} of "
        "people labelled correctly.",
        "Leakage split by human ambiguity: if the look-alike confusions came from genuinely "
        "ambiguous images, the share on ambiguous images would far exceed the class's base rate.",
        table([*header, "ambiguous rate in the class"], rows),
        "![Human and model confusion](human_vs_model.png)",
        "![Errors on human-clear images](clear_errors.png)",
    ]
    return "\n\n".join(parts)


def _attribution_section(att: dict) -> str:
    if "skipped" in att:
        return f"## Where the model looks (Grad-CAM)\n\nSkipped: {text(att['skipped'])}."
    parts = [
        "## Where the model looks (Grad-CAM)",
        f"Grad-CAM for the predicted class at `{att['layer']}`, the deepest stage with at least 4 "
        "× 4 positions at this resolution.",
    ]
    e, c = att["centre_share_errors"], att["centre_share_correct"]
    if e is not None and c is not None:
        if e < c - 0.02:
            verdict = (
                "errors put less attribution on the centre than correct predictions — consistent "
                "with the original report's 'background-dominant samples' explanation"
            )
        else:
            verdict = (
                "errors do not look at the background more than correct predictions do — no "
                "support for the original report's 'background-dominant samples' explanation"
            )
        parts.append(
            "Share of attribution in the central quarter of the image, over "
            f"{att['images_per_group']} images per group: errors **{e:.3f}**, correct predictions "
            f"**{c:.3f}** (a uniform map gives 0.25): {verdict}."
        )
    parts.append("![Grad-CAM on the worst errors](gradcam.png)")
    return "\n\n".join(parts)


def robustness_markdown(rob: dict) -> str:
    """CIFAR-10-C: the benchmark mean with its margin, the table corruption x severity, the
    figure."""
    if "skipped" in rob:
        return f"## Robustness (CIFAR-10-C)\n\nSkipped: {text(rob['skipped'])}."
    mean = rob["mean_corrupted"]
    summary = (
        f"Mean accuracy over the {rob['benchmark_corruptions']} benchmark corruptions × 5 "
        f"severities: **{pct(mean)}** ± {100 * rob['margin_95']:.1f} points (95%, from the sample "
        f"of {rob['images']:,} class-balanced test images); mean corruption error "
        f"{pct(rob['mean_corruption_error'])}; clean accuracy on the same "
        f"images {pct(rob['clean'])}."
        if mean is not None
        else f"Clean accuracy on {rob['images']:,} images: {pct(rob['clean'])}."
    )
    summary += _protocol(rob)
    if rob.get("mean_held_out") is not None:
        summary += f" The held-out corruptions (not in the mean): {pct(rob['mean_held_out'])}."
    rows = [
        [k.replace("_", " "), *(pct(v) for v in accs), pct(sum(accs) / len(accs))]
        for k, accs in rob["accuracy"].items()
    ]
    adapted = rob.get("adapted")
    return "\n\n".join(
        [
            "## Robustness (CIFAR-10-C)" + (", adapted at test time" if adapted else ""),
            *([_adapted_line(adapted)] if adapted else []),
            f"The corruptions: {text(rob['origin'])}.",
            summary,
            table(["corruption", *(f"severity {s}" for s in rob["severities"]), "mean"], rows),
            "![Accuracy under corruptions](robustness.png)",
        ]
    )


def _adapted_line(adapted: dict) -> str:
    return (
        f"**Adapted** on {adapted['images']:,} images at a time, {text(adapted['how'])} (prior: "
        f"{adapted['prior']:g} training images)."
    )


def _protocol(rob: dict) -> str:
    """Which benchmark corruptions the model trained on, and the mean over those it never saw."""
    seen = rob.get("trained_on")
    if seen is None or rob["mean_corrupted"] is None:
        return ""  # a result written before the protocol was recorded
    if not seen:
        return " The model's augmentation makes none of these corruptions: all of them are unseen."
    names = " and ".join(s.replace("_", " ") for s in seen)
    return (
        f" **The model trained on {names}** (its augmentation draws them at this strength), "
        f"against the benchmark's rule: over the {rob['benchmark_corruptions'] - len(seen)} "
        f"corruptions it never saw, **{pct(rob['mean_unseen'])}**."
    )


def tta_scope(tta: dict) -> str:
    if not tta.get("sampled"):  # analyses written before sampling existed used the whole test set
        return "the whole test set"
    return f"{tta['images']:,} class-balanced test images"


def repeat_markdown(name: str, seeds: int, changed: dict, summary: dict[str, dict]) -> str:
    """The report of `repeat`: mean, std and per-seed values of each measure."""
    rows = [
        [
            text(measure),
            pct(s["mean"]),
            f"{100 * s['std']:.2f} points",
            ", ".join(pct(x) for x in s["values"]),
        ]
        for measure, s in summary.items()
    ]
    fields = ", ".join(code(f"{k}={v}") for k, v in changed.items())
    return (
        f"# {text(name)}: {seeds} runs with seeds 0–{seeds - 1}\n\n"
        + (f"Preset {code(name)} with {fields}. " if fields else f"Preset {code(name)}. ")
        + "Each run draws its own training subsample and head initialisation; mean ± standard "
        "deviation across runs.\n\n"
        + table(["measure", "mean", "std", "per seed"], rows)
        + "\n\n![Spread across seeds](repeat.png)\n"
    )


def tune_markdown(s: dict) -> str:
    """`tune`'s report: the best trial and its recipe file, every trial, and Optuna's plots."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in s["counts"].items() if n)
    best = s["best"]
    space = ", ".join(code(k) for k in s["space"] or {})
    parts = [
        f"# Study {code(s['study'])}",
        f"{counts} (cap: {s['trials_cap']} trials, counted across every worker). Each trial is "
        "scored on the validation accuracy of the epoch it ships; the test set is never read "
        f"while tuning. Fields tuned: {space}; the others are the base recipe's "
        f"({code(s['base_recipe']['name'])}).",
    ]
    if best is None:
        parts.append("No trial has completed yet.")
    else:
        params = ", ".join(
            code(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
            for k, v in best["params"].items()
        )
        parts += [
            f"**Best: trial {best['number']}, validation accuracy {pct(best['value'])}** with "
            f"{params}. Its recipe: {code(best['recipe_file'])}; train it and measure it on the "
            f"test set with {code('cifar-transfer run --recipe ' + str(best['recipe_file']))}."
        ]
    rows = [
        [
            t["number"],
            t["state"].lower(),
            pct(t["value"]) if t["value"] is not None else "",
            text(
                ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in t["params"].items()
                )
            ),
            t["epochs"],
            f"{t['seconds']:.0f}" if t["seconds"] is not None else "",
            text(t["host"] or ""),
            text(t["note"]),
        ]
        for t in s["trials"]
    ]
    parts += [
        "## Trials",
        table(
            [
                "trial",
                "state",
                "validation accuracy",
                "fields",
                "epochs reported",
                "seconds",
                "host",
                "note",
            ],
            rows,
        ),
    ]
    for name, title in (
        ("history", "Optimisation history"),
        ("importances", "Field importances"),
        ("intermediate", "Validation accuracy per epoch (pruned trials stop early)"),
    ):
        drawn = s.get("plots", {}).get(name)
        if drawn:
            parts += [
                f"## {title}",
                f"![{title}]({drawn})" if drawn.endswith(".png") else drawn.capitalize() + ".",
            ]
    return "\n\n".join(parts) + "\n"


def label_audit_section(a: dict) -> str:
    """`analyze`'s label-audit section: the test labels the shipped model finds suspect."""
    lines = [
        "## Label audit (test set)",
        f"The shipped model, which never trained on the test images, flags **{a['flagged']:,}** of "
        f"their {a['images']:,} labels as likely wrong (cleanlab's confident learning on its "
        "calibrated probabilities). `cifar-transfer audit RUN` judges the training and validation "
        "labels too, out of sample, and writes label_issues.csv for `run --exclude`.",
    ]
    if "human" in a:
        h = a["human"]
        lines.append(
            "People (CIFAR-10H) agree with the given label on "
            f"{pct(h['agreement_flagged'] or 0)} of the flagged images on average, "
            f"{pct(h['agreement_rest'])} on the rest; most people chose another class for "
            f"{len(h['majority_disagrees']):,} of the flagged."
        )
    if a["pairs"]:
        lines.append(
            table(["given → suggested", "images"], [[text(k), v] for k, v in a["pairs"].items()])
        )
    return "\n\n".join(lines)


def audit_markdown(summary: dict, gallery: bool) -> str:
    """`audit`'s report: how many labels each part flags, how it judged them, the class pairs and
    top issues."""
    parts = summary["parts"]
    lines = [
        f"# Label audit of {code(summary['run']['audited'])}",
        "Images whose given label is likely wrong, by confident learning (cleanlab) on "
        "out-of-sample probabilities: "
        + "; ".join(f"{text(name)}: {text(how)}" for name, how in summary["how"].items())
        + ". `label_issues.csv` lists every flagged image, most suspect first; a reviewed copy of "
        "it can be given to `run --exclude` to train without them.",
        table(
            ["images", "audited", "flagged out of sample", "flagged", "share"],
            [
                [
                    name,
                    f"{p['images']:,}",
                    f"{p.get('flagged_out_of_sample', p['flagged']):,}",
                    f"{p['flagged']:,}",
                    pct(p["flagged"] / max(p["images"], 1)),
                ]
                for name, p in parts.items()
            ],
        ),
    ]
    if summary["pairs"]:
        pairs = list(summary["pairs"].items())[:10]
        lines += [
            "## Given → suggested, most often",
            table(["labels", "images"], [[text(k), v] for k, v in pairs]),
        ]
    if "human" in summary:
        h = summary["human"]
        lines += [
            "## Against people (CIFAR-10H)",
            f"People's mean agreement with the given label: **{pct(h['agreement_flagged'] or 0)}** "
            f"on the {h['flagged']:,} flagged test images, {pct(h['agreement_rest'])} on the rest; "
            f"on {len(h['majority_disagrees']):,} of the flagged ones most "
            "people chose another class.",
        ]
    if gallery:
        lines.append("![Most likely label errors](label_issues.png)")
    top = [
        [
            code(r["image"]),
            r["split"],
            text(r["given"]),
            text(r["suggested"]),
            f"{r['quality']:.3f}",
        ]
        for r in summary["top"][:20]
    ]
    if top:
        lines += [
            "## The most suspect labels",
            table(["image", "split", "given", "suggested", "quality"], top),
        ]
    parts = summary.get("seconds_by_part", {})
    lines.append(
        f"Audited in {summary['seconds']:.0f} s"
        + (" (" + ", ".join(f"{k}: {v:.0f} s" for k, v in parts.items()) + ")." if parts else ".")
    )
    return "\n\n".join(lines)

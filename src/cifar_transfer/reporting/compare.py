"""`cifar-transfer compare RUN_DIR...`: finished runs side by side — the recipe fields that differ,
test accuracy and loss, leakage between look-alike classes, times and machines, and the learning
curves overlaid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .. import atomic
from ..errors import CifarTransferError
from ..recipe import Recipe
from ..runfolder import holds_run
from . import figures, report


class CompareError(CifarTransferError):
    """A folder that is not a finished run."""


def load_run(folder: Path) -> dict:
    """A finished run's metrics, recipe and history (as numbers)."""
    files = {name: folder / name for name in ("metrics.json", "recipe.json", "history.csv")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise CompareError(f"{folder}: not a finished run (no {', '.join(missing)})")
    try:
        metrics = json.loads(files["metrics.json"].read_text())
        recipe = Recipe.from_dict(json.loads(files["recipe.json"].read_text())).to_dict()
        history = read_history(files["history.csv"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CompareError(f"{folder}: unreadable run files ({e})") from None
    _check_metrics(files["metrics.json"], metrics)
    return {"name": str(folder), "metrics": metrics, "recipe": recipe, "history": history}


NUMBER = (int, float)
# what a comparison reads of metrics.json: each part's type ("test" is absent from a tune trial's)
METRICS_PARTS = {"run": dict, "timings": dict, "test": dict}
TEST_FIELDS = {"accuracy": NUMBER, "loss": NUMBER, "leakage": list}
LEAKAGE_FIELDS = {"a": str, "b": str, "a_as_b": NUMBER, "b_as_a": NUMBER}


def _check_metrics(path: Path, metrics: object) -> None:
    """The parts of a (possibly hand-edited) metrics.json that compare reads, each of its type, or
    one line."""
    if not isinstance(metrics, dict):
        raise CompareError(f"{path}: a JSON object is needed, found {type(metrics).__name__}")
    _check_fields(path, metrics, METRICS_PARTS, "", required=False)
    if "test" in metrics:
        _check_fields(path, metrics["test"], TEST_FIELDS, "test.", required=True)
        for i, pair in enumerate(metrics["test"]["leakage"]):
            if not isinstance(pair, dict):
                raise CompareError(
                    f"{path}: test.leakage[{i}] must be an object, found {type(pair).__name__}"
                )
            _check_fields(path, pair, LEAKAGE_FIELDS, f"test.leakage[{i}].", required=True)


def _check_fields(path: Path, part: dict, fields: dict, prefix: str, required: bool) -> None:
    for key, kind in fields.items():
        if key not in part:
            if required:
                raise CompareError(f"{path}: {prefix}{key} is missing")
            continue
        value = part[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CompareError(
                f"{path}: {prefix}{key} must be {_kind_name(kind)}, found {json.dumps(value)[:40]}"
            )


def _kind_name(kind: type | tuple) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(kind, "a number")


HISTORY_COLUMNS = ("epoch", "phase", "train_loss", "val_acc")


def read_history(path: Path) -> list[dict]:
    """history.csv as rows of numbers (and the `shipped` flag); a file without the columns every run
    writes is refused by name."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: _parse_cell(v) for k, v in row.items()} for row in reader]
    missing = [c for c in HISTORY_COLUMNS if c not in (reader.fieldnames or [])]
    if rows and missing:  # a run that trained no epoch writes the header alone
        raise CompareError(
            f"{path}: no {', '.join(missing)} column (a run's history.csv has {HISTORY_COLUMNS})"
        )
    for i, row in enumerate(rows, start=2):
        if not all(isinstance(row[c], float) for c in HISTORY_COLUMNS):
            raise CompareError(
                f"{path}: line {i} has a value that is not a number in {HISTORY_COLUMNS}"
            )
    return rows


def _parse_cell(text: str) -> float | str | bool:
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def summary(runs: list[dict]) -> dict:
    """The comparison's numbers: the recipe fields that differ, and per run its results, times and
    machine.

    A run without a test evaluation (a `tune` trial reads validation only) has None there, and says
    so.
    """
    fields = [k for k in runs[0]["recipe"] if len({json.dumps(r["recipe"][k]) for r in runs}) > 1]
    return {"differing_fields": fields, "runs": [_row(r, fields) for r in runs]}


def _row(r: dict, fields: list[str]) -> dict:
    m, t = r["metrics"], r["metrics"].get("timings", {})
    test = m.get("test", {})
    leakage = {
        name: share
        for p in test.get("leakage", [])
        for name, share in (
            (f"{p['a']} → {p['b']}", p["a_as_b"]),
            (f"{p['b']} → {p['a']}", p["b_as_a"]),
        )
    }
    val = [h["val_acc"] for h in r["history"] if isinstance(h.get("val_acc"), float)]
    return {
        "run": r["name"],
        "recipe": {k: r["recipe"][k] for k in fields},
        "accuracy": test.get("accuracy"),
        "loss": test.get("loss"),
        "best_val_acc": max(val, default=None),
        "leakage": leakage,
        "train_s": t.get("train_s"),
        "total_s": t.get("total_s"),
        "machine": m.get("run", {}).get("device_name"),
        "lacks": []
        if "test" in m
        else ["a test evaluation (a tune trial is scored on validation only)"],
    }


def _check_not_a_run(out: Path, run_dirs: list[Path]) -> None:
    """A comparison writes report.md, report.html and learning_curves.png: never into a run folder
    (or one of the compared runs), whose files of those names it would replace.

    An earlier comparison's folder it may replace.
    """
    compared = {Path(d).resolve() for d in run_dirs}
    foreign_report = (out / "report.md").exists() and not (out / "compare.json").is_file()
    if out.resolve() in compared or holds_run(out) or foreign_report:
        raise CompareError(
            f"--out {out}: holds a run or a report, which this comparison would replace; give "
            "another --out"
        )


def compare(run_dirs: list[Path], out: Path) -> dict:
    """Write compare.json, learning_curves.png, report.md and report.html into `out`; return the
    summary."""
    if len(run_dirs) < 2:
        raise CompareError("compare needs at least two run folders")
    runs = [load_run(Path(d)) for d in run_dirs]
    _check_not_a_run(out, run_dirs)
    atomic.check_writable(out)
    result = summary(runs)
    atomic.write_json(out / "compare.json", result)
    figures.overlaid_curves({r["name"]: r["history"] for r in runs}, out / "learning_curves.png")
    report.write(out, report.compare_markdown(result), "cifar-transfer comparison")
    return result

"""The Python API, the same calls the command line makes: one line for the common case, every layer
below it reachable (`cifar_transfer.data`, `.model`, `.training`, `.analysis`, `.reporting`,
`.serving`).

    import cifar_transfer as ct
    ct.eda("smoke").show("samples")             # the data first: a row of images per class
    run = ct.run("smoke", out="runs/smoke")   # train, evaluate, analyse, report: a Run
    run.metrics["test"]["accuracy"], run.history[-1]["val_acc"]
    run.show("confusion_matrix")               # a figure, inline in a notebook
    predictor = ct.load(run)                   # classify arrays of 32x32 RGB images
    ct.evaluate(run, "photos/")                # another test set or a folder of photos: a Run

Nothing heavy is imported until a call needs it: `import cifar_transfer` stays instant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .recipe import Recipe, RecipeError, compose


class Run:
    """A folder a job wrote (a run, an evaluation, an analysis): its metrics, history, recipe and
    figures."""

    def __init__(self, folder: str | Path, metrics_file: str = "metrics.json"):
        self.dir = Path(folder)
        self.metrics_file = metrics_file

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    def __fspath__(self) -> str:
        return str(self.dir)

    @property
    def metrics(self) -> dict:
        return json.loads((self.dir / self.metrics_file).read_text())

    @property
    def history(self) -> list[dict]:
        """One row per epoch (history.csv); empty for folders that trained nothing."""
        from .reporting.compare import read_history

        path = self.dir / "history.csv"
        return read_history(path) if path.is_file() else []

    @property
    def recipe(self) -> Recipe | None:
        path = self.dir / "recipe.json"
        return Recipe.from_dict(json.loads(path.read_text())) if path.is_file() else None

    @property
    def figures(self) -> dict[str, Path]:
        """Every figure in the folder by name: "confusion_matrix", "learning_curves",
        "misclassified", ..."""
        return {p.stem: p for p in sorted(self.dir.glob("*.png"))}

    @property
    def report(self) -> Path:
        return self.dir / "report.html"

    def show(self, name: str):
        """A figure by name, as an image a notebook displays (its path outside IPython)."""
        if name not in self.figures:
            raise KeyError(f"{self.dir}: no figure {name!r} (there are: {', '.join(self.figures)})")
        try:
            from IPython.display import Image
        except ImportError:
            return self.figures[name]
        return Image(filename=str(self.figures[name]))


def choose_recipe(
    preset: str | Recipe = "auto",
    recipe_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    **fields: object,
) -> Recipe:
    """A Recipe from a preset name (`auto`: the one for this machine) or a Recipe, then a recipe
    file, then `KEY=VALUE` strings (`--set`), then recipe fields as keywords: `choose_recipe("lean",
    finetune_epochs=3)`."""
    if isinstance(preset, Recipe):
        chosen = preset.with_file(recipe_file) if recipe_file else preset
        chosen = chosen.with_overrides(list(overrides))
    else:
        from .jobs.run import resolve_preset

        chosen = compose(resolve_preset(preset, device)[0], recipe_file, overrides)
    return chosen.replace(**fields) if fields else chosen


def run(
    preset: str | Recipe = "auto",
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    recipe_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    progress: bool = True,
    download: bool = True,
    human_labels: str | Path | None = None,
    data: str | Path | None = None,
    exclude: str | Path | None = None,
    **fields: object,
) -> Run | None:
    """Train a recipe, evaluate it on the 10,000 test images, analyse its errors and write the
    report into `out` (default runs/<preset>-<time>; with `resume`, the interrupted run's folder; a
    folder holding another run is refused unless `overwrite`).

    `data`: a folder of your own labelled pictures (one subfolder per class, or train/ [val/]
    [test/] with class subfolders) instead of CIFAR-10; `exclude`: a CSV of images to leave out
    (`audit`'s label_issues.csv). Recipe fields may be given as keywords (`ct.run("lean",
    finetune_epochs=3)`), applied after `recipe_file` and `overrides`. Under torchrun the processes
    other than rank 0 (which writes the folder) get None.
    """
    from .jobs.run import resolve_preset
    from .jobs.run import run as run_job
    from .machine import default_run_dir

    if resume and (overrides or recipe_file or fields):
        _check_resumed_recipe(Path(out or "."), recipe_file, overrides, fields)
    chosen_by = None
    if not isinstance(preset, Recipe):
        preset, chosen_by = resolve_preset(preset, device)
    chosen = choose_recipe(preset, recipe_file, overrides, device, **fields)
    folder = Path(out) if out is not None else default_run_dir(chosen.name)
    metrics = run_job(
        chosen,
        folder,
        data_dir=data_dir,
        weights=weights,
        device=device,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        download=download,
        human_labels=Path(human_labels) if human_labels else None,
        chosen_by=chosen_by,
        data=data,
        exclude=exclude,
    )
    return None if metrics is None else Run(folder)


def _check_resumed_recipe(
    folder: Path,
    recipe_file: str | Path | None,
    overrides: Sequence[str],
    fields: dict[str, object],
) -> None:
    """A resumed run keeps the recipe it started with: fields given again with the same values are
    fine (the same command with --resume added), a changed one is refused rather than silently
    ignored."""
    saved = folder / "recipe.json"
    if not saved.is_file():
        return  # the run job says there is nothing to resume
    started = Recipe.from_dict(json.loads(saved.read_text()))
    given = started.with_file(recipe_file) if recipe_file else started
    given = given.with_overrides(list(overrides)).replace(**fields)
    changed = [k for k, v in given.to_dict().items() if started.to_dict()[k] != v]
    if changed:
        now = ", ".join(
            f"{k}={getattr(started, k)!r} (given {getattr(given, k)!r})" for k in changed
        )
        raise RecipeError(
            f"{saved}: a resumed run keeps the recipe it started with: {now}; to change it, start "
            f"a new run with --recipe {saved}"
        )


def eda(
    preset: str | Recipe = "smoke",
    out: str | Path = "runs/eda",
    *,
    data_dir: str | None = None,
    download: bool = True,
    data: str | Path | None = None,
    **fields: object,
) -> Run:
    """The data before any training: a labelled row of images per class and the images per class in
    each split (of CIFAR-10, or of the folder `data` as the recipe splits it)."""
    from .jobs.run import eda as eda_job

    return Run(eda_job(choose_recipe(preset, **fields), Path(out), data_dir, download, data))


def load(run: str | Path | Run, device: str = "auto"):
    """The run's model as a `serving.predictor.Predictor` (probabilities for uint8 N x 32 x 32 x 3
    images); `.adapt(images)` gives one adapted to a new domain's unlabelled images (test-time
    adaptation)."""
    from .serving.predictor import Predictor

    return Predictor(Path(run), device)


def evaluate(
    run: str | Path | Run,
    data: str | Path | None = None,
    *,
    tta: bool = False,
    adapt: bool = False,
    device: str = "auto",
    download: bool = True,
    progress: bool = True,
) -> Run:
    """The run's model on the test set, an .npz, a CIFAR-10 folder or a folder of photos (one
    subfolder per class):

    RUN/evaluations/<data>/; `adapt`: adapted to those images first (transductive; <data>-adapted/).
    """
    from .jobs.evaluate import evaluate as evaluate_job

    _, folder = evaluate_job(
        Path(run), str(data) if data else None, device, download, tta, progress, adapt
    )
    return Run(folder)


def analyze(
    run: str | Path | Run,
    *,
    data_dir: str | None = None,
    human_labels: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
    data: str | Path | None = None,
) -> Run:
    """The error analysis of a saved run again: RUN/analysis/.

    A run trained on a folder of pictures is analysed on that folder's split (`data` names it where
    it has moved).
    """
    from .jobs.evaluate import analyze as analyze_job

    human = Path(human_labels) if human_labels else None
    _, folder = analyze_job(Path(run), data_dir, human, device, download, data)
    return Run(folder, "analysis.json")


def audit(
    run: str | Path | Run,
    *,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    resolution: int | None = None,
    human_labels: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
) -> Run:
    """Which labels are likely wrong: RUN/audit/ (label_issues.csv, a gallery, `.metrics`:
    audit.json)."""
    from .jobs.audit import audit as audit_job

    human = Path(human_labels) if human_labels else None
    sources = {"data": data, "data_dir": data_dir, "weights": weights, "download": download}
    _, folder = audit_job(
        Path(run), device=device, resolution=resolution, human_labels=human, **sources
    )
    return Run(folder, "audit.json")


def robustness(
    run: str | Path | Run,
    *,
    images: int = 1000,
    held_out: bool = True,
    data_dir: str | None = None,
    adapt: bool = False,
    device: str = "auto",
    download: bool = True,
) -> Run:
    """CIFAR-10-C's corruptions at its own strength on `images` class-balanced test images:
    RUN/robustness/; `adapt`: the model adapted to each corruption and severity's images first
    (RUN/robustness-adapted/)."""
    from .jobs.evaluate import robustness_job

    _, folder = robustness_job(Path(run), images, held_out, data_dir, device, download, adapt)
    return Run(folder)


def repeat(
    preset: str | Recipe = "smoke",
    seeds: int = 3,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    recipe_file: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    progress: bool = True,
    download: bool = True,
    data: str | Path | None = None,
    **fields: object,
) -> Run:
    """The recipe with seeds 0..seeds-1 into OUT/seed-K/: mean and spread of accuracy and leakage
    (`Run.metrics` is repeat.json)."""
    from .jobs.run import repeat as repeat_job
    from .machine import default_run_dir, default_weights

    chosen = choose_recipe(preset, recipe_file, overrides, device, **fields)
    folder = Path(out) if out is not None else default_run_dir(f"{chosen.name}-repeat")
    sources = {
        "data": data,
        "data_dir": data_dir,
        "download": download,
        "weights": weights or default_weights(),
    }
    repeat_job(chosen, seeds, folder, device=device, progress=progress, **sources)
    return Run(folder, "repeat.json")


def compare(runs: Sequence[str | Path | Run], out: str | Path) -> Run:
    """Finished runs side by side: the recipe fields that differ, results, times, curves (`.metrics`
    is compare.json)."""
    from .reporting.compare import compare as compare_runs

    compare_runs([Path(r) for r in runs], Path(out))
    return Run(out, "compare.json")


def lr_find(
    preset: str | Recipe = "auto",
    out: str | Path | None = None,
    *,
    phase: int = 1,
    start_from: str | Path | Run | None = None,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 10.0,
    overrides: Sequence[str] = (),
    recipe_file: str | Path | None = None,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    download: bool = True,
    **fields: object,
) -> Run:
    """The learning-rate range test for `phase` (1: the head; 2: the fine-tune, best `start_from` a
    saved run):

    OUT/lr_find.json (`.metrics`: the suggestion, rates and losses) and lr_find.png.
    """
    from .jobs.lr_find import lr_find_job
    from .machine import default_run_dir

    chosen = choose_recipe(preset, recipe_file, overrides, device, **fields)
    folder = Path(out) if out is not None else default_run_dir(f"lr-find-{chosen.name}")
    found = {"phase": phase, "start_from": Path(start_from) if start_from else None, "steps": steps}
    sources = {
        "data": data,
        "data_dir": data_dir,
        "weights": weights,
        "device": device,
        "download": download,
    }
    lr_find_job(chosen, folder, start=start, end=end, **found, **sources)
    return Run(folder, "lr_find.json")


def tune(
    preset: str | Recipe = "auto",
    out: str | Path | None = None,
    *,
    space: str | Path | dict | None = None,
    trials: int = 20,
    storage: str | None = None,
    study: str | None = None,
    pruner: str = "median",
    heartbeat: int = 60,
    sampler_seed: int | None = None,
    overrides: Sequence[str] = (),
    recipe_file: str | Path | None = None,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    progress: bool = True,
    download: bool = True,
    **fields: object,
) -> Run:
    """An Optuna study over recipe fields scored on validation accuracy (`space`: a TOML/JSON
    file or a dict; default: the preset's): OUT/trial-NNNN/, best_recipe.json, and `.metrics`,
    study.json."""
    from .errors import require

    require("tune", "optuna")
    from .jobs.tune import check_space, read_space
    from .jobs.tune import tune as tune_job
    from .machine import default_run_dir

    chosen = choose_recipe(preset, recipe_file, overrides, device, **fields)
    folder = Path(out) if out is not None else default_run_dir(f"tune-{chosen.name}")
    if isinstance(space, dict):
        space = check_space(space, "space")
    elif space is not None:
        space = read_space(Path(space))
    study_args = {
        "space": space,
        "storage": storage,
        "study_name": study,
        "trials": trials,
        "pruner": pruner,
    }
    sources = {
        "data": data,
        "data_dir": data_dir,
        "weights": weights,
        "device": device,
        "download": download,
    }
    tune_job(
        chosen,
        folder,
        heartbeat=heartbeat,
        sampler_seed=sampler_seed,
        progress=progress,
        **study_args,
        **sources,
    )
    return Run(folder, "study.json")


def export(run: str | Path | Run, onnx: str | Path, *, calibrated: bool = True) -> Path:
    """The run's model as an ONNX file (class names and image size in its metadata), checked against
    PyTorch with ONNX Runtime; returns its path."""
    from .errors import require

    require("export", "onnx", "onnxscript", "onnxruntime")
    from .serving.export import export_onnx

    export_onnx(Path(run), Path(onnx), calibrated=calibrated)
    return Path(onnx)

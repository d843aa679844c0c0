"""`cifar-transfer tune`: an Optuna study over recipe fields, scored on validation accuracy only.

Each trial trains the base recipe with the sampled fields into its own run folder (recipe.json,
history.csv, TensorBoard events, learning curves, model.safetensors, metrics.json), reports its
validation accuracy after every epoch to a pruner that stops poor trials early, and scores the
validation accuracy of the epoch it ships. The test set is never read: only the training batches are
loaded.

The study lives in an Optuna RDB storage: SQLite on one machine (default `<out>/study.db`),
PostgreSQL for many workers on many machines. Workers that name the same `--study` share its trials;
`--trials` caps the study's total across all of them (completed, pruned and running trials count;
failed ones do not, so they are replaced). A worker stopped with Ctrl-C or SIGTERM marks its trial
failed at once; one killed outright stops its heartbeat, and the next worker to start or finish a
trial marks that trial failed. A failed trial keeps its run folder.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import optuna
import torch
from optuna.trial import TrialState

from .. import atomic
from ..data.cifar import Splits, load_cifar10, split
from ..data.sources import load_splits, scaled_epochs
from ..errors import CifarTransferError
from ..machine import default_weights, environment
from ..model.network import pick_device, save_model
from ..model.weights import Pretrained, load_pretrained
from ..recipe import Recipe, RecipeError, finite_number, read_table
from ..reporting import figures, report
from ..training.phases import TrainingError
from ..training.trainer import CHECKPOINT, shipped_epoch, train_to_folder

# The default search space of each preset: the fields that moved its accuracy most when tuned by
# hand.
LOG = {"log": True}
SPACES: dict[str, dict[str, dict]] = {
    "seed": {
        "head_lr": {"low": 1e-4, "high": 1e-2, **LOG},
        "finetune_lr": {"low": 1e-6, "high": 1e-4, **LOG},
    },
    "smoke": {
        "head_lr": {"low": 1e-4, "high": 1e-2, **LOG},
        "finetune_lr": {"low": 1e-6, "high": 1e-3, **LOG},
    },
    "lean": {
        "head_lr": {"low": 3e-4, "high": 1e-2, **LOG},
        "finetune_lr": {"low": 3e-3, "high": 5e-2, **LOG},
        "label_smoothing": {"low": 0.0, "high": 0.2},
        "weight_decay": {"low": 1e-5, "high": 1e-3, **LOG},
    },
    "strong": {
        "finetune_lr": {"low": 3e-3, "high": 5e-2, **LOG},
        "label_smoothing": {"low": 0.0, "high": 0.2},
        "weight_decay": {"low": 1e-5, "high": 1e-3, **LOG},
        "warmup_epochs": {"low": 0.0, "high": 2.0},
    },
}
SPACES["full"] = SPACES["strong"]

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
PRUNERS = ("median", "asha", "none")


class TuneError(CifarTransferError):
    """A search space, storage or study that cannot be used; the message names it."""


class Surplus(Exception):
    """This trial was created after the study had reached `--trials` (two workers asked at the same
    moment)."""


def read_space(path: Path) -> dict[str, dict]:
    """A search-space file (TOML or JSON): a table per recipe field, with `low`/`high` (and `log`,
    `step`) or `choices`."""
    return check_space(read_table(path, TuneError), str(path))


def check_space(space: object, where: str) -> dict[str, dict]:
    """Refuse, naming the field, anything Optuna could not sample or a recipe could not take."""
    if not isinstance(space, dict) or not space:
        raise TuneError(f"{where}: expected a table of recipe fields to tune, found {space!r}")
    hints = typing.get_type_hints(Recipe)
    for name, spec in space.items():
        field = f"{where}: field {name}"
        if name not in hints or name == "name":
            raise TuneError(f"{field}: not a recipe field that can be tuned")
        kind = hints[name]
        if not isinstance(spec, dict):
            raise TuneError(f"{field}: expected a table with low/high or choices, found {spec!r}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise TuneError(
                f"{field}: unknown keys {', '.join(sorted(unknown))} (low, high, log, step, "
                "choices)"
            )
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
                raise TuneError(f"{field}: choices must be a non-empty list, alone")
            if not all(isinstance(c, str | int | float | bool) for c in choices):
                raise TuneError(f"{field}: choices must be strings, numbers or booleans")
        else:
            if kind not in (int, float):
                wanted = (
                    typing.get_args(kind)
                    if typing.get_origin(kind) is Literal
                    else "a list of values"
                )
                raise TuneError(f"{field}: is not a number: give choices (one or more of {wanted})")
            low, high = spec.get("low"), spec.get("high")
            if not (finite_number(low) and finite_number(high)):
                raise TuneError(
                    f"{field}: needs numbers low and high (got low={low!r}, high={high!r})"
                )
            if kind is int and not (isinstance(low, int) and isinstance(high, int)):
                raise TuneError(f"{field}: an integer field needs integer low and high")
            if not low < high:
                raise TuneError(f"{field}: low={low} must be below high={high}")
            if not isinstance(spec.get("log", False), bool):
                raise TuneError(f"{field}: log must be true or false")
            if spec.get("log") and (low <= 0 or "step" in spec):
                raise TuneError(f"{field}: a log scale needs low > 0 and no step")
            step = spec.get("step")
            if step is not None and not (finite_number(step) and step > 0):
                raise TuneError(f"{field}: step must be a positive number")
    return space


def sample(trial: optuna.Trial, base: Recipe, space: dict[str, dict]) -> Recipe:
    """The base recipe with each field of the space drawn by the trial."""
    hints = typing.get_type_hints(Recipe)
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif hints[name] is int:
            values[name] = trial.suggest_int(
                name,
                spec["low"],
                spec["high"],
                step=spec.get("step", 1),
                log=spec.get("log", False),
            )
        else:
            values[name] = trial.suggest_float(
                name, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False)
            )
    return dataclasses.replace(base, **values)


def taken(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count toward the cap (numbered below `before`, if given)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=COUNTED)
        if before is None or t.number < before
    )


def redact(url: str) -> str:
    """The storage URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say so with the text as given
        return url


def with_driver(url: str) -> str:
    """postgresql://...

    driven by psycopg 3, the driver this package installs (SQLAlchemy 2.0 would pick psycopg2).
    """
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL: RDBStorage says so, naming it
        return url
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def open_study(
    storage: str,
    name: str,
    *,
    heartbeat: int,
    pruner: str,
    sampler_seed: int | None,
    trials: int,
    base: Recipe,
    space: dict[str, dict],
) -> optuna.Study:
    """Create the study or join it; a study started with another base recipe or space is refused."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    engine = (
        {"connect_args": {"timeout": 60}}
        if storage.startswith("sqlite")
        else {"pool_pre_ping": True}
    )
    rdb, failure = None, None
    for attempt in range(5):
        try:
            rdb = optuna.storages.RDBStorage(
                with_driver(storage), engine_kwargs=engine, heartbeat_interval=heartbeat
            )
            break
        except (
            IntegrityError,
            OperationalError,
            ProgrammingError,
        ) as e:  # workers started together race to
            failure = e  # create the tables ("already exists"); a server may be starting: try again
            time.sleep(0.2 * (attempt + 1))
        except Exception as e:  # bad URLs and missing drivers fail in many types
            failure = e
            break
    if rdb is None:
        detail = " ".join(str(failure).split())[:300]
        raise TuneError(
            f"--storage {redact(storage)}: cannot open the study storage "
            f"({type(failure).__name__}: {detail})"
        )
    pruners = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2),
        "asha": optuna.pruners.SuccessiveHalvingPruner(),
        "none": optuna.pruners.NopPruner(),
    }
    sampler = optuna.samplers.TPESampler(
        seed=sampler_seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=min(10, max(2, trials // 3)),
    )
    study = optuna.create_study(
        storage=rdb,
        study_name=name,
        direction="maximize",
        load_if_exists=True,
        sampler=sampler,
        pruner=pruners[pruner],
    )
    mine = {"base_recipe": base.to_dict(), "space": space}
    for key, value in mine.items():
        found = study.user_attrs.get(key)
        if found is None:
            study.set_user_attr(key, value)
            continue
        stored = json.loads(json.dumps(value))  # as the storage keeps it: tuples come back as lists
        if found != stored:
            differ = sorted(k for k in set(found) | set(stored) if found.get(k) != stored.get(k))
            what = "base recipe" if key == "base_recipe" else "search space"
            raise TuneError(
                f"study {name!r} in {redact(storage)} was started with another {what} (differs in: "
                f"{', '.join(differ)}): join it with the same "
                "--preset/--recipe/--set/--space, or start a new --study"
            )
    return study


@contextmanager
def sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """SIGTERM (what schedulers and `kill` send) ends the trial as Ctrl-C does: Optuna marks it
    failed.

    A KeyboardInterrupt raised while Python runs a finaliser is dropped ("Exception ignored in
    ..."), so the signal is also remembered: the check this yields raises it again at the next
    epoch's end.
    """
    received = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    def check() -> None:
        if received:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield check
    finally:
        signal.signal(signal.SIGTERM, previous)


def tune(
    base: Recipe,
    out: Path,
    *,
    space: dict[str, dict] | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    trials: int = 20,
    pruner: str = "median",
    heartbeat: int = 60,
    sampler_seed: int | None = None,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    download: bool = True,
    progress: bool = True,
) -> dict:
    """Run trials of the study until it holds `trials` (across every worker); then write the study's
    summary.

    Trials train on CIFAR-10's training images, or on the folder `data` (split once by `base`).
    """
    if base.val_size == 0:
        raise TuneError("tune scores trials on the validation split: the recipe needs val_size > 0")
    if trials < 1:
        raise TuneError(f"--trials {trials}: must be at least 1")
    if heartbeat < 1:
        raise TuneError(f"--heartbeat {heartbeat}: must be at least 1 second")
    if space is None:
        if base.name not in SPACES:
            raise TuneError(
                f"no default search space for recipe {base.name!r}: give one with --space FILE"
            )
        space = SPACES[base.name]
    atomic.check_writable(out)
    name = study_name or out.resolve().name
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # heartbeats and stale-trial checks are marked experimental in Optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = open_study(
            storage,
            name,
            heartbeat=heartbeat,
            pruner=pruner,
            sampler_seed=sampler_seed,
            trials=trials,
            base=base,
            space=space,
        )
        optuna.storages.fail_stale_trials(study)  # trials of workers killed since the last one ran
        if taken(study) < trials:
            dev = pick_device(device)
            pretrained = load_pretrained(weights or default_weights())
            prepare, source = trial_data(base, space, data, data_dir, download, progress)
            with sigterm_as_interrupt() as interrupted:
                worker = Worker(
                    base,
                    space,
                    out,
                    trials,
                    dev,
                    pretrained,
                    prepare,
                    source,
                    progress,
                    interrupted,
                )

                def stop_when_full(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
                    if taken(study) >= trials:
                        study.stop()

                study.optimize(worker, callbacks=[stop_when_full], catch=(Surplus,))
    return write_summary(study, base, out, trials)


FIXED_BY_A_FOLDER = ("seed", "image_size", "val_fraction", "test_fraction", "duplicates")


def trial_data(
    base: Recipe,
    space: dict[str, dict],
    data: str | Path | None,
    data_dir: str | None,
    download: bool,
    progress: bool,
) -> tuple[Callable[[Recipe], tuple[Recipe, Splits]], str]:
    """How a trial gets its training and validation sets (never the test set), and their source.

    CIFAR-10's training images are split as each trial's recipe says; a folder is split once, by
    `base`, its test set left out, and each trial's epochs scaled to the folder's size as `run`
    scales them.
    """
    if data is None:
        images = load_cifar10(data_dir, allow_download=download, test=False)[0]
        return (lambda r: (r, split(images, None, r.train_size, r.val_size, r.seed))), images.source
    fixed = sorted(set(space) & set(FIXED_BY_A_FOLDER))
    if fixed:
        raise TuneError(
            f"--data {data}: the folder is split once for the whole study; {', '.join(fixed)} "
            "cannot vary"
        )
    loaded = load_splits(base, data, progress=progress)
    splits = dataclasses.replace(loaded.splits, test=None)
    return (lambda r: (scaled_epochs(r, len(splits.train)), splits)), loaded.source


@dataclasses.dataclass
class Worker:
    """The objective: one trial is one run folder, trained on training and validation images
    only."""

    base: Recipe
    space: dict[str, dict]
    out: Path
    cap: int
    device: torch.device
    pretrained: Pretrained
    # a trial's recipe as run, its train and validation sets
    prepare: Callable[[Recipe], tuple[Recipe, Splits]]
    source: str
    progress: bool
    # raises KeyboardInterrupt once SIGTERM has come, even if its raise was lost
    interrupted: Callable[[], None]

    def __call__(self, trial: optuna.Trial) -> float:
        if taken(trial.study, before=trial.number) >= self.cap:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise Surplus(f"the study already had {self.cap} trials when this one was created")
        run_dir = self.out / f"trial-{trial.number:04d}"
        if (run_dir / "history.csv").exists():
            raise TuneError(
                f"{run_dir}: already holds a run (another study's?): give each study its own --out"
            )
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        try:
            recipe = sample(trial, self.base, self.space)
        except (
            RecipeError
        ) as e:  # a combination the recipe refuses: scored as pruned so the sampler avoids it
            trial.set_user_attr("invalid", str(e))
            raise optuna.TrialPruned(f"invalid recipe: {e}") from None

        def report_epoch(history: list[dict]) -> None:
            self.interrupted()
            row = history[-1]
            trial.report(row["val_acc"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {row['epoch']}: validation accuracy {row['val_acc']:.4f}"
                )

        recipe, splits = self.prepare(recipe)
        t0 = time.perf_counter()
        try:
            model, history, train_s = train_to_folder(
                recipe,
                run_dir,
                splits,
                self.pretrained,
                self.device,
                progress=self.progress,
                on_epoch=report_epoch,
            )
        except (
            TrainingError
        ) as e:  # a diverged loss is an outcome of the sampled rates, not a broken worker
            # its advice is about resuming runs
            trial.set_user_attr("diverged", str(e).split(";")[0])
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            # a trial is never resumed: free its disk at once
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        figures.learning_curves(history, run_dir / "learning_curves.png", recipe.finetune_from)
        save_model(model, recipe, run_dir / "model.safetensors")
        kept = shipped_epoch(history, recipe)
        atomic.write_json(
            run_dir / "metrics.json",
            {
                "run": {
                    "name": run_dir.name,
                    "study": trial.study.study_name,
                    "trial": trial.number,
                    "data_source": self.source,
                    "weights": self.pretrained.source,
                    "preset": recipe.name,
                    **environment(self.device),
                },
                "timings": {"train_s": train_s, "total_s": time.perf_counter() - t0},
                "final_epoch": history[-1],
                "shipped": kept,
                "validation": {
                    "accuracy": kept["val_acc"],
                    "epoch": kept["epoch"],
                    "n": len(splits.val),
                },
            },
        )
        return kept["val_acc"]


def write_summary(study: optuna.Study, base: Recipe, out: Path, cap: int) -> dict:
    """The whole study (every worker's trials): best_recipe.json, study.json, Optuna's plots and a
    report."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "epochs": len(t.intermediate_values),
                "seconds": seconds,
                "host": t.user_attrs.get("host"),
                "run_dir": t.user_attrs.get("run_dir"),
                "note": next(
                    (
                        f"{k}: {t.user_attrs[k]}"
                        for k in ("diverged", "invalid")
                        if k in t.user_attrs
                    ),
                    "surplus (created after the cap)" if t.user_attrs.get("surplus") else "",
                ),
            }
        )
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    result = {
        "study": study.study_name,
        "trials_cap": cap,
        "base_recipe": base.to_dict(),
        "space": study.user_attrs.get("space"),
        "trials": rows,
        "counts": {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState},
        "best": None,
    }
    if complete:
        best = study.best_trial
        recipe = dataclasses.replace(base, **best.params)
        atomic.write_text(out / "best_recipe.json", recipe.dumps() + "\n")
        result["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_dir": best.user_attrs.get("run_dir"),
            "recipe_file": str(out / "best_recipe.json"),
        }
        result["plots"] = plots(study, out)
    atomic.write_json(out / "study.json", result)
    report.write(out, report.tune_markdown(result), f"cifar-transfer tune: {study.study_name}")
    return result


def plots(study: optuna.Study, out: Path) -> dict[str, str]:
    """Optuna's optimisation history, parameter importances and per-epoch curves, where the study
    allows them; a plot it cannot draw (too few finished trials) is named with the reason."""
    from optuna.visualization import matplotlib as ovm

    drawn = {}
    for name, draw in (
        ("history", ovm.plot_optimization_history),
        ("importances", ovm.plot_param_importances),
        ("intermediate", ovm.plot_intermediate_values),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                ax = draw(study)
            except (ValueError, RuntimeError) as e:
                drawn[name] = f"not drawn: {e}"
                continue
        if name != "importances":
            ax.set_ylabel("validation accuracy")
        if name == "intermediate":
            ax.set_xlabel("epoch")
        figures.save(ax.figure, out / f"{name}.png")
        drawn[name] = f"{name}.png"
    return drawn

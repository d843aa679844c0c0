"""`tune`: search spaces, workers sharing one study (SQLite, then a real PostgreSQL server), the
trial cap across workers, pruning reports, killed workers, and the best recipe re-running to the
same validation accuracy."""

from __future__ import annotations

import csv
import glob
import json
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from cifar_transfer.jobs.tune import SPACES, TuneError, check_space, open_study, read_space, sample
from cifar_transfer.recipe import preset

# A trial of a couple of seconds: 100 images, two head epochs and one fine-tuning epoch of the last
# block.
TINY = [
    "--preset",
    "smoke",
    "--set",
    "train_size=100",
    "--set",
    "val_size=100",
    "--set",
    "head_epochs=2",
    "--set",
    "finetune_epochs=1",
    "--set",
    "finetune_from=layer4.2",
    "--set",
    "analysis=false",
]


def worker(out: Path, data: Path, weights: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar_transfer",
            "tune",
            *TINY,
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--weights",
            str(weights),
            "--no-progress",
            "--no-download",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]


def history(run_dir: str) -> list[dict]:
    with open(Path(run_dir) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_study(study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly `trials` trials finished; failures only from kills or simultaneous asks; each trial
    reported every epoch of its history.csv to the pruner.

    Returns the failed trials.
    """
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == trials
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    for t in finished:
        rows = history(t.user_attrs["run_dir"])
        assert t.intermediate_values == {
            int(r["epoch"]): pytest.approx(float(r["val_acc"])) for r in rows
        }
        if t.state == TrialState.COMPLETE:  # scored by the shipped epoch's validation accuracy
            assert t.value == pytest.approx(
                float(next(r for r in rows if r["shipped"] == "True")["val_acc"])
            )
    return study.get_trials(states=(TrialState.FAIL,))


@pytest.fixture
def no_test_set(cifar_copy) -> Path:
    """CIFAR-10's training batches without test_batch: a trial that read the test set would fail."""
    return cifar_copy("test_batch", None).parent


def test_default_spaces_sample_valid_recipes() -> None:
    for name, space in SPACES.items():
        check_space(space, name)
        for end in ("low", "high"):  # both corners of every range make recipes the preset accepts
            fixed = {
                k: spec["choices"][0] if "choices" in spec else spec[end]
                for k, spec in space.items()
            }
            recipe = sample(FixedTrial(fixed), preset(name), space)
            assert {k: getattr(recipe, k) for k in space} == fixed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[head_lr]\nlow = 0.1\nhigh = 0.01\n", "field head_lr: low=0.1 must be below high=0.01"),
        ("[head_lrr]\nlow = 0.1\nhigh = 1.0\n", "field head_lrr: not a recipe field"),
        (
            "[head_lr]\nlow = 0.0\nhigh = 1.0\nlog = true\n",
            "field head_lr: a log scale needs low > 0",
        ),
        (
            "[batch_size]\nlow = 16.5\nhigh = 64\n",
            "field batch_size: an integer field needs integer low and high",
        ),
        ("[augment]\nlow = 0\nhigh = 1\n", "field augment: is not a number: give choices"),
        ("[augment]\nchoices = []\n", "field augment: choices must be a non-empty list"),
        (
            '[head_lr]\nlow = 0.001\nhigh = 0.1\nscale = "log"\n',
            "field head_lr: unknown keys scale",
        ),
        ("head_lr = 0.01\n", "field head_lr: expected a table"),
        ("[head_lr\n", "not valid TOML"),
    ],
)
def test_bad_space_files_are_refused_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(TuneError, match=f"^{path}: .*") as e:
        read_space(path)
    assert message in str(e.value)


@pytest.mark.slow
def test_two_sqlite_workers_share_one_study_without_the_test_set(
    tmp_path: Path, no_test_set: Path, cifar, weights_path: Path
) -> None:
    out = tmp_path / "tune"
    a = worker(out, no_test_set, weights_path, "--trials", "4", "--sampler-seed", "1")
    b = worker(out, no_test_set, weights_path, "--trials", "4", "--sampler-seed", "2")
    finish(a, b)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    assert all(t.user_attrs.get("surplus") for t in check_study(study, 4))
    assert {t.user_attrs["run_dir"] for t in study.trials} <= {str(p) for p in out.glob("trial-*")}

    summary = json.loads((out / "study.json").read_text())
    best = study.best_trial
    assert summary["best"]["number"] == best.number
    recipe = json.loads((out / "best_recipe.json").read_text())
    assert {k: recipe[k] for k in best.params} == pytest.approx(best.params)
    assert "test" not in json.loads((Path(best.user_attrs["run_dir"]) / "metrics.json").read_text())

    # a third worker finds the study full: it trains nothing and leaves the count as it was
    finish(worker(out, no_test_set, weights_path, "--trials", "4"))
    assert len(
        optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").trials
    ) == len(study.trials)

    # `run` re-trains the best recipe (against a 100-image test set: the validation accuracy is what
    # is compared)
    data = tmp_path / "npz"
    data.mkdir()
    np.savez(data / "train.npz", images=cifar[0].images, labels=cifar[0].labels)
    np.savez(data / "test.npz", images=cifar[1].images[:100], labels=cifar[1].labels[:100])
    rerun = tmp_path / "rerun"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_transfer",
            "run",
            "--recipe",
            str(out / "best_recipe.json"),
            "--preset",
            "smoke",
            "--out",
            str(rerun),
            "--data-dir",
            str(data),
            "--weights",
            str(weights_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    shipped = json.loads((rerun / "metrics.json").read_text())["shipped"]
    assert shipped["val_acc"] == pytest.approx(best.value)


def _open_at_once(barrier, url: str) -> str:
    barrier.wait()
    try:
        open_study(
            url,
            "s",
            heartbeat=60,
            pruner="median",
            sampler_seed=None,
            trials=4,
            base=preset("smoke"),
            space=SPACES["smoke"],
        )
        return "ok"
    except TuneError as e:
        return str(e)


@pytest.mark.slow
def test_workers_starting_together_all_open_a_new_study(tmp_path: Path) -> None:
    """Four processes create the same new SQLite study at the same moment: the race to create its
    tables ("table studies already exists") is retried, not reported."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        results = pool.starmap(_open_at_once, [(barrier, f"sqlite:///{tmp_path / 'study.db'}")] * 4)
    assert results == ["ok"] * 4


def test_joining_a_study_with_another_recipe_is_refused(tmp_path: Path, run_cli) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=storage).set_user_attr(
        "base_recipe", {"head_lr": 1.0}
    )
    done = run_cli(
        "tune", "--preset", "smoke", "--out", str(tmp_path), "--storage", storage, "--study", "s"
    )
    assert done.returncode == 1
    assert (
        f"study 's' in {storage} was started with another base recipe (differs in: " in done.stderr
    )


def test_unreachable_storage_is_named_without_its_password(tmp_path: Path, run_cli) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = bound.getsockname()[1]
        done = run_cli(
            "tune",
            "--preset",
            "smoke",
            "--out",
            str(tmp_path),
            "--storage",
            f"postgresql://tuner:secret@127.0.0.1:{port}/study",
        )
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"error: --storage postgresql://tuner:***@127.0.0.1:{port}/study: cannot open the study "
        "storage ("
    )
    assert "secret" not in done.stderr


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql`), run as the `postgres`
    user when the tests run as root (the server refuses root); yields its URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    bin_dir = Path(found[-1]).parent
    home = Path(tempfile.mkdtemp(prefix="pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "data"
    subprocess.run(
        [*as_user, bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            bin_dir / "pg_ctl",
            "-D",
            data,
            "-l",
            home / "log",
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {home}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(home, ignore_errors=True)


def first_epoch_written(out: Path, proc: subprocess.Popen) -> Path:
    """Wait until a trial of `proc` has written its first history row; that trial's folder."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        rows = list(out.glob("trial-*/history.csv"))
        if rows:
            return rows[0].parent
        time.sleep(0.1)
    raise AssertionError("no trial wrote an epoch")


@pytest.mark.slow
@pytest.mark.database
def test_postgres_workers_survive_stopped_and_killed_workers(
    tmp_path: Path, no_test_set: Path, weights_path: Path, postgres: str
) -> None:
    common = ["--storage", postgres, "--study", "shared", "--trials", "4", "--heartbeat", "1"]

    stopped = worker(tmp_path / "a", no_test_set, weights_path, *common)  # SIGTERM: failed at once
    trial_dir = first_epoch_written(tmp_path / "a", stopped)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 130, stopped.communicate()[1][-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres)
    assert [(t.state, t.user_attrs["run_dir"]) for t in study.trials] == [
        (TrialState.FAIL, str(trial_dir))
    ]

    # SIGKILL: failed once its heartbeat stops
    killed = worker(tmp_path / "b", no_test_set, weights_path, *common)
    trial_dir = first_epoch_written(tmp_path / "b", killed)
    killed.kill()
    killed.wait()
    time.sleep(2.5)  # the grace period: twice the heartbeat
    finish(
        worker(tmp_path / "c", no_test_set, weights_path, *common),
        worker(tmp_path / "d", no_test_set, weights_path, *common),
    )

    study = optuna.load_study(study_name="shared", storage=postgres)
    failed = [t for t in check_study(study, 4) if not t.user_attrs.get("surplus")]
    assert [t.user_attrs["run_dir"] for t in failed] == [
        str(tmp_path / "a" / "trial-0000"),
        str(trial_dir),
    ]
    # the failed trials' epochs are kept
    assert all(len(history(t.user_attrs["run_dir"])) >= 1 for t in failed)
    summary = json.loads((tmp_path / "d" / "study.json").read_text())
    assert summary["counts"]["FAIL"] >= 2 and summary["best"] is not None

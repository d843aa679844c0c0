"""Nothing lost, one clear line for every bad input: the command line's behaviour when things go
wrong."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.models import resnet50

from cifar_transfer.training.checkpoint import load_checkpoint

# smoke made smaller (200 training images, bf16), with augmentation so that phase 1 takes long
# enough to be interrupted in; no error analysis (not what is tested here, and it would run five
# times)
RECIPE = [
    "--set",
    "head_epochs=2",
    "--set",
    "finetune_epochs=2",
    "--set",
    "augment=true",
    "--set",
    "analysis=false",
    "--set",
    "train_size=200",
    "--set",
    "val_size=100",
    "--set",
    "precision=bf16",
]


def start(out: Path, *args: str, data: Path, weights: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar_transfer.cli",
            "run",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--no-progress",
            "--no-download",
            "--data-dir",
            str(data),
            "--weights",
            str(weights),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def kill_after_epochs(proc: subprocess.Popen, history: Path, epochs: int) -> None:
    """SIGKILL the run as soon as history.csv shows `epochs` finished epochs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) - 1 >= epochs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    pytest.fail(f"run ended or stalled before epoch {epochs}: {proc.communicate()[1]}")


@pytest.mark.slow
def test_killed_runs_resume_to_identical_metrics(small_data, weights_path, tmp_path):
    """One run killed in phase 1, resumed and killed again in phase 2, resumed to the end: the same
    results as a run never interrupted."""
    data = small_data
    finish(start(tmp_path / "whole", *RECIPE, data=data, weights=weights_path))
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["test"]
    out = tmp_path / "killed"
    # killed during phase 1 epoch 2, and during phase 2 epoch 2
    for epochs, phase in (
        (1, 1),
        (3, 2),
    ):
        resume = ["--resume", str(out)] if phase == 2 else []
        kill_after_epochs(
            start(out, *RECIPE, *resume, data=data, weights=weights_path),
            out / "history.csv",
            epochs,
        )
        assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["phase"] == phase, "the kill came too late to test this phase"
    # the same tensors without the layout metadata make another network: refused, nothing touched
    before = (out / "checkpoint.pt").read_bytes()
    other = tmp_path / "no-metadata.safetensors"
    save_file(load_file(weights_path), other)
    refused = start(out, "--resume", str(out), data=data, weights=other)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 1 and err.count("\n") == 1, err
    assert "stride_in_1x1" in err and str(weights_path) in err and "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "metrics.json").exists()

    finish(start(out, "--resume", str(out), data=data, weights=weights_path))
    resumed = json.loads((out / "metrics.json").read_text())["test"]
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["loss"] == whole["loss"]
    assert resumed["confusion"] == whole["confusion"]
    assert len((out / "history.csv").read_text().splitlines()) == 5
    assert not (out / "checkpoint.pt").exists()


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def batch(data: object, labels: object) -> bytes:
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("data_batch_3", "truncate", ("data_batch_3", "truncated or corrupt")),
        ("data_batch_1", None, ("data_batch_1", "missing")),
        (
            "data_batch_2",
            batch(np.zeros((10_000, 1024), np.uint8), [0] * 10_000),
            ("data_batch_2", "N x 3072"),
        ),
        (
            "test_batch",
            batch(np.zeros((10_000, 3072), np.int16), [0] * 10_000),
            ("test_batch", "must be uint8"),
        ),
        (
            "data_batch_5",
            batch(np.zeros((10_000, 3072), np.uint8), [10] * 10_000),
            ("data_batch_5", "0..9"),
        ),
    ],
)
def test_bad_data_is_one_line_naming_the_file(
    run_cli, cifar_dir, cifar_copy, weights_path, tmp_path, name, content, fragments
):
    if content == "truncate":
        content = (cifar_dir / name).read_bytes()[:5000]
    folder = cifar_copy(name, content)
    done = run_cli(
        "run",
        "--data-dir",
        str(folder),
        "--weights",
        str(weights_path),
        "--out",
        str(tmp_path / "r"),
        "--no-download",
    )
    assert_one_line(done, *fragments)
    assert (tmp_path / "r" / "error.txt").read_text().strip() == done.stderr.strip().removeprefix(
        "error: "
    )


def test_missing_folder(run_cli, tmp_path, weights_path):
    done = run_cli(
        "run",
        "--data-dir",
        str(tmp_path / "absent"),
        "--weights",
        str(weights_path),
        "--out",
        str(tmp_path / "r"),
        "--no-download",
        cwd=tmp_path,
    )
    assert_one_line(done, f"--data-dir {tmp_path / 'absent'}: holds no CIFAR-10")
    done = run_cli("evaluate", str(tmp_path))
    assert_one_line(done, "model.safetensors")
    assert "Traceback" in run_cli("--debug", "evaluate", str(tmp_path)).stderr


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"images": np.zeros((3, 32, 32, 3), np.uint8)}, "no 'labels' array"),
        ({"x": np.zeros(3)}, "no 'images' or 'labels' array"),
        (
            {"images": np.zeros((3, 28, 28), np.uint8), "labels": np.zeros(3, np.int64)},
            "N x 32 x 32 x 3",
        ),
    ],
)
def test_bad_npz_is_one_line(run_cli, smoke_run, tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert_one_line(
        run_cli("evaluate", str(smoke_run), "--data", str(tmp_path / "bad.npz")),
        "bad.npz",
        fragment,
    )


def weights_file(tmp_path: Path, change) -> Path:
    sd = {k: v.half() for k, v in resnet50().state_dict().items()}
    change(sd)
    save_file(sd, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (
            lambda p: weights_file(p, lambda sd: sd.pop("layer4.0.bn3.weight")),
            ("missing keys", "layer4.0.bn3.weight"),
        ),
        (
            lambda p: weights_file(p, lambda sd: sd.update(head=torch.zeros(2))),
            ("unexpected keys", "head"),
        ),
        (
            lambda p: weights_file(
                p, lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)})
            ),
            ("conv1.weight has shape (64, 3, 3, 3)",),
        ),
        (
            lambda p: weights_file(p, lambda sd: sd["fc.bias"].fill_(float("inf"))),
            ("fc.bias holds non-finite",),
        ),
        (
            lambda p: (torch.save({"state": {"a": 1}, "opt": "x"}, p / "w.pth"), p / "w.pth")[1],
            ("expected a state_dict",),
        ),
        (
            lambda p: (p.joinpath("w.pth").write_bytes(pickle.dumps(Path("x"))), p / "w.pth")[1],
            ("weights_only=True",),
        ),
    ],
)
def test_bad_weights_are_one_line(run_cli, tmp_path, cifar_dir, make, fragments):
    path = make(tmp_path)
    done = run_cli(
        "run",
        "--data-dir",
        str(cifar_dir),
        "--weights",
        str(path),
        "--out",
        str(tmp_path / "r"),
        "--no-download",
    )
    assert_one_line(done, str(path), *fragments)


def test_unwritable_output_fails_before_training(run_cli, tmp_path, cifar_dir, weights_path):
    (tmp_path / "a-file").write_text("x")
    started = time.monotonic()
    done = run_cli(
        "run",
        "--data-dir",
        str(cifar_dir),
        "--weights",
        str(weights_path),
        "--out",
        str(tmp_path / "a-file" / "run"),
    )
    assert_one_line(done, "a-file/run", "not writable")
    assert time.monotonic() - started < 60


def test_non_finite_loss_stops_with_phase_epoch_and_step(
    run_cli, tmp_path, cifar_dir, weights_path
):
    out = tmp_path / "r"
    done = run_cli(
        "run",
        "--preset",
        "smoke",
        "--set",
        "head_lr=1e30",
        "--set",
        "head_epochs=2",
        "--data-dir",
        str(cifar_dir),
        "--weights",
        str(weights_path),
        "--out",
        str(out),
        "--no-progress",
    )
    assert_one_line(done, "phase 1 epoch", "step", "non-finite loss")
    assert not (out / "metrics.json").exists() and (out / "error.txt").is_file()


def test_resume_without_a_checkpoint(run_cli, tmp_path):
    done = run_cli("run", "--resume", str(tmp_path))
    assert_one_line(done, "checkpoint.pt", "no checkpoint to resume from")


def test_recipe_values_are_refused_before_anything_loads(run_cli, tmp_path):
    for assignment, fragment in (
        ("seed=-1", "seed=-1"),
        ("warmup_epochs=inf", "warmup_epochs=inf"),
    ):
        done = run_cli(
            "run",
            "--set",
            assignment,
            "--data-dir",
            str(tmp_path / "absent"),
            "--no-download",
            "--out",
            str(tmp_path / "r"),
        )
        # not the missing data: the recipe is checked first
        assert_one_line(done, "recipe field", fragment)
    assert not (tmp_path / "r").exists()


def test_corrupt_compressed_npz_names_the_file(run_cli, smoke_run, cifar, tmp_path):
    path = tmp_path / "small.npz"
    np.savez_compressed(path, images=cifar[1].images[:200], labels=cifar[1].labels[:200])
    data = bytearray(path.read_bytes())
    data[100:108] = b"\xff" * 8  # inside the deflated images array
    path.write_bytes(bytes(data))
    assert_one_line(
        run_cli("evaluate", str(smoke_run), "--data", str(path)),
        str(path),
        "not a readable .npz file",
    )


@pytest.mark.parametrize(
    "content",
    [
        b"not a checkpoint at all",
        "truncated",
        # torch.save of an object weights_only refuses: torch's message advises weights_only=False
        "pickle",
    ],
)
def test_a_corrupt_checkpoint_is_one_line_without_unsafe_advice(run_cli, tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        torch.save({"recipe": {}, "model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif content == "pickle":
        torch.save({"recipe": Path("x")}, path)
    else:
        path.write_bytes(content)
    done = run_cli("run", "--resume", str(tmp_path))
    assert_one_line(done, str(path), "not a readable checkpoint")
    assert "weights_only=False" not in done.stderr


def test_resume_on_a_finished_run_changes_nothing(run_cli, smoke_run):
    def snapshot() -> dict:
        # the folder's lock file records who holds it; the run's own files must not change
        return {
            p.name: (p.stat().st_mtime_ns, p.stat().st_size)
            for p in smoke_run.iterdir()
            if p.name != ".lock"
        }

    before = snapshot()
    assert_one_line(
        run_cli("run", "--resume", str(smoke_run)),
        "no checkpoint to resume from",
        "the run is complete",
    )
    assert snapshot() == before


def test_a_fresh_run_removes_what_a_killed_checkpoint_write_left(run_cli, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    stale = out / ".checkpoint.pt.k2j3h4.tmp"
    stale.write_bytes(b"\0" * 1000)
    done = run_cli(
        "run",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--weights",
        str(tmp_path / "absent.safetensors"),
    )
    # fails early: the clean-up comes first
    assert "absent.safetensors: no such weights file" in done.stderr
    assert done.returncode == 1 and not stale.exists()


def test_an_interrupt_while_saving_a_checkpoint_stays_an_interrupt(tmp_path):
    """torch.save turns a Ctrl-C (or tune's SIGTERM) inside its writes into "RuntimeError:
    unexpected pos"."""
    from cifar_transfer import atomic

    class Interrupted:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    with pytest.raises(KeyboardInterrupt):
        atomic.write_with(
            tmp_path / "checkpoint.pt",
            lambda f: torch.save({"x": torch.zeros(10_000)}, Interrupted(f)),
        )
    assert list(tmp_path.iterdir()) == []


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def small_disk(tmp_path: Path, megabytes: int, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with a `megabytes` tmpfs mounted at tmp_path/disk (a private mount namespace,
    no root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f'mount -t tmpfs -o size={megabytes}m tmpfs {disk} && exec "$@"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_TRANSFER_")}
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if "mount" in done.stderr and ("ermission" in done.stderr or "not permitted" in done.stderr):
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    return done


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs util-linux unshare")
@pytest.mark.slow
def test_a_full_disk_is_named_before_training_and_during_a_write(tmp_path, cifar_dir, weights_path):
    disk = tmp_path / "disk"
    done = small_disk(
        tmp_path,
        30,
        [
            sys.executable,
            "-m",
            "cifar_transfer.cli",
            "run",
            "--preset",
            "smoke",
            "--data-dir",
            str(cifar_dir),
            "--weights",
            str(weights_path),
            "--out",
            str(disk / "run"),
            "--no-progress",
        ],
    )
    assert_one_line(
        done, f"{disk / 'run'}: no space left on device for the checkpoint", "MiB needed"
    )
    assert not (disk / "run" / "history.csv").exists()  # refused before the data was even read

    write = (
        "import sys, torch; from cifar_transfer import atomic\ntry: "
        "atomic.write_with(sys.argv[1], lambda f: torch.save(torch.zeros(2_000_000), f))\nexcept "
        "atomic.DiskFullError as e: print(e)\nimport os; "
        "print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))"
    )
    tmp_path.joinpath("disk2").mkdir()
    done = small_disk(
        tmp_path / "disk2", 4, [sys.executable, "-c", write, str(tmp_path / "disk2/disk/ckpt.pt")]
    )
    first, listing = done.stdout.strip().splitlines()
    assert first.startswith(f"{tmp_path / 'disk2/disk/ckpt.pt'}: no space left on device"), (
        done.stdout + done.stderr
    )
    assert listing == "[]"  # no half-written temporary file stays behind


def test_an_unexpected_error_keeps_its_traceback(run_cli, tmp_path, monkeypatch):
    """Only the project's own errors are one-liners: a bug (here a shape error) leaves its traceback
    in error.txt and a line that points to it."""
    from cifar_transfer.jobs import run as run_job

    def broken(recipe, out: Path, **kwargs) -> dict:
        out.mkdir(parents=True)
        return torch.zeros(2, 3) @ torch.zeros(2, 3)  # a shape bug deep inside

    monkeypatch.setattr(run_job, "run", broken)
    done = run_cli("run", "--preset", "smoke", "--out", str(tmp_path / "r"))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert err[0].startswith("error: unexpected RuntimeError: mat1 and mat2 shapes")
    assert err[0].endswith(f"the traceback is in {tmp_path / 'r' / 'error.txt'}")
    trace = (tmp_path / "r" / "error.txt").read_text()
    assert trace.startswith("Traceback") and "in broken" in trace


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_device_is_one_line(run_cli, tmp_path):
    assert_one_line(
        run_cli("run", "--device", "cuda", "--out", str(tmp_path / "r")),
        "--device cuda: no CUDA device",
    )

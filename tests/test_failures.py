"""Nothing lost, one clear line for every bad input: the command line's behaviour when things go wrong."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet50

from cifar_transfer.train import load_checkpoint

# smoke, with augmentation so that phase 1 takes long enough to be interrupted in; no error analysis (not
# what is tested here, and it would run five times)
RECIPE = ["--set", "head_epochs=2", "--set", "finetune_epochs=2", "--set", "augment=true", "--set", "analysis=false"]


def start(out: Path, *args: str, data: Path, weights: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_transfer.cli", "run", "--preset", "smoke", "--out", str(out), "--no-progress",
         "--no-download", "--data-dir", str(data), "--weights", str(weights), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def test_killed_runs_resume_to_identical_metrics(cifar_dir, weights_path, tmp_path):
    data = cifar_dir.parent
    finish(start(tmp_path / "whole", *RECIPE, data=data, weights=weights_path))
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["test"]
    for epochs, phase in ((1, 1), (3, 2)):  # killed during phase 1 epoch 2, and during phase 2 epoch 2
        out = tmp_path / f"killed-{phase}"
        kill_after_epochs(start(out, *RECIPE, data=data, weights=weights_path), out / "history.csv", epochs)
        assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["phase"] == phase, "the kill came too late to test this phase"
        finish(start(out, "--resume", str(out), data=data, weights=weights_path))
        resumed = json.loads((out / "metrics.json").read_text())["test"]
        assert resumed["accuracy"] == whole["accuracy"]
        assert resumed["loss"] == whole["loss"]
        assert resumed["confusion"] == whole["confusion"]
        assert len((out / "history.csv").read_text().splitlines()) == 5
        assert not (out / "checkpoint.pt").exists()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_TRANSFER_")}
    return subprocess.run([sys.executable, "-m", "cifar_transfer.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def batch(data: object, labels: object) -> bytes:
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)


@pytest.mark.parametrize(("name", "content", "fragments"), [
    ("data_batch_3", "truncate", ("data_batch_3", "truncated or corrupt")),
    ("data_batch_1", None, ("data_batch_1", "missing")),
    ("data_batch_2", batch(np.zeros((10_000, 1024), np.uint8), [0] * 10_000), ("data_batch_2", "N x 3072")),
    ("test_batch", batch(np.zeros((10_000, 3072), np.int16), [0] * 10_000), ("test_batch", "must be uint8")),
    ("data_batch_5", batch(np.zeros((10_000, 3072), np.uint8), [10] * 10_000), ("data_batch_5", "0..9")),
])
def test_bad_data_is_one_line_naming_the_file(cifar_dir, cifar_copy, weights_path, tmp_path, name, content,
                                              fragments):
    if content == "truncate":
        content = (cifar_dir / name).read_bytes()[:5000]
    folder = cifar_copy(name, content)
    done = cli("run", "--data-dir", str(folder), "--weights", str(weights_path), "--out", str(tmp_path / "r"),
               "--no-download")
    assert_one_line(done, *fragments)
    assert (tmp_path / "r" / "error.txt").read_text().strip() == done.stderr.strip().removeprefix("error: ")


def test_missing_folder(tmp_path, weights_path):
    done = cli("run", "--data-dir", str(tmp_path / "absent"), "--weights", str(weights_path), "--out",
               str(tmp_path / "r"), "--no-download", cwd=tmp_path)
    assert_one_line(done, "CIFAR-10 not found in", "absent")
    done = cli("evaluate", str(tmp_path))
    assert_one_line(done, "model.safetensors")
    assert "Traceback" in cli("--debug", "evaluate", str(tmp_path)).stderr


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"images": np.zeros((3, 32, 32, 3), np.uint8)}, "no 'labels' array"),
    ({"x": np.zeros(3)}, "no 'images' or 'labels' array"),
    ({"images": np.zeros((3, 28, 28), np.uint8), "labels": np.zeros(3, np.int64)}, "N x 32 x 32 x 3"),
])
def test_bad_npz_is_one_line(smoke_run, tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert_one_line(cli("evaluate", str(smoke_run), "--data", str(tmp_path / "bad.npz")), "bad.npz", fragment)


def weights_file(tmp_path: Path, change) -> Path:
    sd = {k: v.half() for k, v in resnet50().state_dict().items()}
    change(sd)
    save_file(sd, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda p: weights_file(p, lambda sd: sd.pop("layer4.0.bn3.weight")), ("missing keys", "layer4.0.bn3.weight")),
    (lambda p: weights_file(p, lambda sd: sd.update(head=torch.zeros(2))), ("unexpected keys", "head")),
    (lambda p: weights_file(p, lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)})),
     ("conv1.weight has shape (64, 3, 3, 3)",)),
    (lambda p: weights_file(p, lambda sd: sd["fc.bias"].fill_(float("inf"))), ("fc.bias holds non-finite",)),
    (lambda p: (torch.save({"state": {"a": 1}, "opt": "x"}, p / "w.pth"), p / "w.pth")[1],
     ("expected a state_dict",)),
    (lambda p: (p.joinpath("w.pth").write_bytes(pickle.dumps(Path("x"))), p / "w.pth")[1], ("weights_only=True",)),
])
def test_bad_weights_are_one_line(tmp_path, cifar_dir, make, fragments):
    path = make(tmp_path)
    done = cli("run", "--data-dir", str(cifar_dir), "--weights", str(path), "--out", str(tmp_path / "r"),
               "--no-download")
    assert_one_line(done, str(path), *fragments)


def test_unwritable_output_fails_before_training(tmp_path, cifar_dir, weights_path):
    (tmp_path / "a-file").write_text("x")
    started = time.monotonic()
    done = cli("run", "--data-dir", str(cifar_dir), "--weights", str(weights_path), "--out",
               str(tmp_path / "a-file" / "run"))
    assert_one_line(done, "a-file/run", "not writable")
    assert time.monotonic() - started < 60


def test_non_finite_loss_stops_with_phase_epoch_and_step(tmp_path, cifar_dir, weights_path):
    out = tmp_path / "r"
    done = cli("run", "--preset", "smoke", "--set", "head_lr=1e30", "--set", "head_epochs=2", "--data-dir",
               str(cifar_dir), "--weights", str(weights_path), "--out", str(out), "--no-progress")
    assert_one_line(done, "phase 1 epoch", "step", "non-finite loss")
    assert not (out / "metrics.json").exists() and (out / "error.txt").is_file()


def test_resume_without_a_checkpoint(tmp_path):
    done = cli("run", "--resume", str(tmp_path))
    assert_one_line(done, "checkpoint.pt", "no checkpoint to resume from")

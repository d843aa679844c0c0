"""Torchrun + DistributedDataParallel on the CPU: two gloo processes, smoke-sized, as users launch
them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifar_transfer.data.augment import as_tensors
from cifar_transfer.model.network import build_model
from cifar_transfer.recipe import preset
from cifar_transfer.training.distributed import DistributedError, World
from cifar_transfer.training.loop import fit

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# BatchNorm frozen and no augmentation: two processes must train what one does
RECIPE = [
    "train_size=160",
    "val_size=40",
    "batch_size=32",
    "head_epochs=2",
    "finetune_epochs=1",
    "finetune_from=layer4.2",
    "analysis=false",
]

WORKER = """
import sys
import numpy as np
import torch
from safetensors.torch import save_file
from cifar_transfer.data.augment import as_tensors
from cifar_transfer.training.distributed import join, leave
from cifar_transfer.model.network import build_model
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset
from cifar_transfer.training.loop import fit

recipe = preset("seed").with_overrides(sys.argv[3].split())
world = join("cpu")
data = np.load(sys.argv[1])
train = as_tensors(data["images"][:160], data["labels"][:160], torch.device("cpu"))
val = as_tensors(data["images"][160:200], data["labels"][160:200], torch.device("cpu"))
pretrained = load_pretrained(sys.argv[2])
torch.manual_seed(recipe.seed)  # the head's initialisation, as train_to_folder seeds it
model = build_model(recipe, pretrained)
history = fit(model, recipe, train, val, progress=False, world=world)
if world.main:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[4])
leave(world)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_take_the_steps_one_process_takes(
    small_data, pretrained, weights_path, tmp_path
):
    """K optimizer steps with global batch 32 split over 2 ranks (16 each) give one process's
    weights."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = np.load(small_data / "train.npz")
    done = subprocess.run(
        [
            *TORCHRUN,
            str(script),
            str(small_data / "train.npz"),
            str(weights_path),
            " ".join(RECIPE),
            str(tmp_path / "ranks.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    recipe = preset("seed").with_overrides(RECIPE)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, pretrained)
    train = as_tensors(data["images"][:160], data["labels"][:160], torch.device("cpu"))
    val = as_tensors(data["images"][160:200], data["labels"][160:200], torch.device("cpu"))
    fit(model, recipe, train, val, progress=False)
    two = load_file(tmp_path / "ranks.safetensors")
    assert_trained_alike(two, model.state_dict())

    # the check is strict enough to catch a rank that trained on other images than its share
    torch.manual_seed(recipe.seed)
    other = build_model(recipe, pretrained)
    fit(other, recipe, (train[0].flip(0), train[1].flip(0)), val, progress=False)
    with pytest.raises(AssertionError, match=r"^\S+: Tensor-likes are not close"):
        assert_trained_alike(other.state_dict(), model.state_dict())


def assert_trained_alike(got: dict, want: dict) -> None:
    """Two trainings of one model took the same steps: in every tensor all but 1 element in 10,000
    agree within float32 tolerance (rtol 1e-4, atol 1e-6). On failure, torch's report says how many
    differ, by how much, where.

    Why a few may differ: the ranks' convolutions run over batches of 16, one process's over 32, and
    oneDNN rounds the two differently (differently again on AMX than on AVX-512). Adam divides each
    gradient by its own running magnitude, so where a gradient is near zero a rounding difference
    can grow into a step of up to `lr`: seen on an Intel Xeon (AMX) as 1 element of head.0.weight's
    262,144 off by 1.8e-6 (the rest within 1e-6). A rank that trains on the wrong images changes
    nearly every element; the test checks that this fails.
    """
    for name, weight in want.items():
        a, b = got[name].double(), weight.double()
        off = int((~torch.isclose(a, b, rtol=1e-4, atol=1e-6)).sum())
        if off > weight.numel() // 10_000:
            torch.testing.assert_close(
                got[name],
                weight,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda report, name=name: f"{name}: {report}",
            )


def test_a_batch_that_does_not_divide_is_refused(pretrained):
    recipe = preset("seed").with_overrides(["batch_size=30"])
    x = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    y = torch.zeros(40, dtype=torch.long)
    with pytest.raises(
        DistributedError, match="batch_size=30 is the global batch: it must divide among the 4 "
    ):
        fit(
            build_model(recipe, pretrained),
            recipe,
            (x, y),
            (x[:0], y[:0]),
            progress=False,
            world=World(rank=0, size=4),
        )


def files(folder: Path) -> list[str]:
    """Every file of a run folder; TensorBoard event files by folder (their names hold host, pid and
    time)."""
    return sorted(
        str(p.relative_to(folder).parent / "events")
        if p.name.startswith("events.")
        else str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file()
    )


def run_args(data: Path, weights: Path, out: Path) -> list[str]:
    return [
        "run",
        "--preset",
        "smoke",
        *[a for f in RECIPE for a in ("--set", f)],
        "--data-dir",
        str(data),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--no-progress",
        "--no-download",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_writes_one_run_that_matches_one_process(
    small_data, weights_path, tmp_path, run_cli
):
    two = subprocess.run(
        [*TORCHRUN, "-m", "cifar_transfer", *run_args(small_data, weights_path, tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 reports
    one = run_cli(*run_args(small_data, weights_path, tmp_path / "one"))
    assert one.returncode == 0, one.stderr

    # written once: no second event file, no strays
    assert files(tmp_path / "two") == files(tmp_path / "one")
    m2, m1 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert (
        m2["run"]["distributed"]["world_size"] == 2
        and m2["run"]["distributed"]["backend"] == "gloo"
    )
    assert m1["run"]["distributed"]["world_size"] == 1
    assert m2["test"]["accuracy"] == pytest.approx(m1["test"]["accuracy"], abs=0.015)
    assert m2["final_epoch"]["val_acc"] == pytest.approx(m1["final_epoch"]["val_acc"], abs=0.03)


def ranks(torchrun: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    children = [
        c
        for task in Path(f"/proc/{torchrun.pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    for child in children:
        env = dict(
            kv.split("=", 1)
            for kv in Path(f"/proc/{child}/environ").read_text().split("\0")
            if "=" in kv
        )
        if "RANK" in env:
            found[int(env["RANK"])] = int(child)
    return found


@pytest.mark.slow
@pytest.mark.distributed
def test_killing_one_rank_ends_the_job_and_resume_finishes_it(small_data, weights_path, tmp_path):
    out = tmp_path / "run"
    args = run_args(small_data, weights_path, out)
    args[args.index("finetune_epochs=1")] = "finetune_epochs=3"
    # phase 2 runs every frozen stage each step: slow enough to be caught
    args += [
        "--set",
        "cache=false",
    ]
    job = subprocess.Popen(
        [*TORCHRUN, "-m", "cifar_transfer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (
        (out / "history.csv").is_file() and len((out / "history.csv").read_text().splitlines()) >= 3
    ):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(ranks(job)[1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    done_before = len((out / "history.csv").read_text().splitlines()) - 1
    assert not (out / "metrics.json").exists() and (out / "checkpoint.pt").is_file()

    resumed = subprocess.run(
        [
            *TORCHRUN,
            "-m",
            "cifar_transfer",
            "run",
            "--resume",
            str(out),
            "--no-progress",
            "--data-dir",
            str(small_data),
            "--no-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["resumed"] and metrics["run"]["distributed"]["world_size"] == 2
    assert len((out / "history.csv").read_text().splitlines()) - 1 == 5 > done_before
    assert not (out / "checkpoint.pt").exists()

"""Benchmarks that print numbers: what `run` does, timed, beside a deliberately plain loop
(bench/reference.py) in the same process, with the gain of each engineering step measured on its
own.

usage: python bench/bench.py [--smoke] [--data-dir D] [--weights W] [--device auto|cpu|cuda]
                             [--json FILE]
Plans: `full` on a GPU (sized for 8 minutes on one H100/H200: not yet run on one), `cpu` without
one, `--smoke` (about a minute on 2 cores; the test suite runs it).

1. throughput: a full training step (all layers) and inference, images per second, the median of 5
   timed windows after a warm-up step (which absorbs compilation and cuDNN's autotuning).
2. gains: one recipe trained end to end by `train_to_folder` (both phases, validation, a checkpoint
   and history row every epoch: what `run` runs) and tested, adding one step at a time: the plain
   loop; our loop in fp32 without caching and with checkpoints written on the critical path;
   + cached activations of frozen steps; + bf16 autocast; + checkpoints written in a background
   thread; + torch.compile (CUDA graphs on a GPU), compiled cold (inductor's caches are off here, so
   every run pays the compilation a first `run` pays). Each row's gain is over the row above it.
3. presets: end to end with test accuracy and peak GPU memory.
On a CPU it first measures the machine's own matmul and convolution rates (bench/roofline.py, which
also reads a finished run's passes against them).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference import accuracy_plain, train_plain
from roofline import machine_rates

from cifar_transfer import atomic, machine
from cifar_transfer.data.augment import as_tensors
from cifar_transfer.data.cifar import Splits, load_cifar10, split
from cifar_transfer.model.inference import autocast, predict_logits
from cifar_transfer.model.network import build_model, pick_device, place
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import Recipe, preset
from cifar_transfer.training.phases import make_optimizer, set_phase
from cifar_transfer.training.trainer import train_to_folder

WINDOWS = 5  # timed windows per throughput figure; the median is reported

# What each step adds, as recipe fields over the one before (None: the plain reference loop).
# `in_place`: the checkpoint is written on the critical path, as before it moved to a background
# thread.
LADDER = [
    ("plain loop: fp32, no caching, .item() every step", None, True),
    (
        "ours: fp32, no caching, checkpoints in place",
        ["precision=fp32", "cache=false", "compile=off"],
        True,
    ),
    ("+ cached activations of frozen steps", ["precision=fp32", "cache=true", "compile=off"], True),
    ("+ bf16 autocast", ["precision=bf16", "cache=true", "compile=off"], True),
    (
        "+ checkpoints in a background thread",
        ["precision=bf16", "cache=true", "compile=off"],
        False,
    ),
    (
        "+ torch.compile (cold: compile time included)",
        ["precision=bf16", "cache=true", "compile={compile}"],
        False,
    ),
]

PLANS = {
    # one lent GPU, sized to finish within 8 minutes (estimated from a plain loop's H100 time; not
    # yet run)
    "full": {
        "throughput": [
            (32, 32, "bf16"),
            (32, 256, "bf16"),
            (128, 256, "bf16"),
            (224, 256, "bf16"),
            (224, 256, "fp32"),
            (224, 32, "bf16"),
        ],
        "steps": 10,
        "ladder": ("seed", ["head_epochs=5", "finetune_epochs=5"]),
        "presets": [("seed", []), ("lean", []), ("strong", [])],
        "test_images": 10_000,
    },
    # `make bench` without a GPU: the same parts at a size 2 CPU cores measure in minutes
    "cpu": {
        "throughput": [(32, 32, "fp32"), (32, 32, "bf16"), (32, 256, "bf16"), (128, 32, "bf16")],
        "steps": 3,
        "ladder": (
            "seed",
            [
                "train_size=2000",
                "val_size=500",
                "head_epochs=3",
                "finetune_epochs=2",
                "finetune_from=layer4",
            ],
        ),
        "presets": [("smoke", ["analysis=false"])],
        "test_images": 2000,
    },
    "smoke": {
        "throughput": [(32, 32, "fp32"), (32, 32, "bf16")],
        "steps": 2,
        "ladder": (
            "seed",
            [
                "train_size=200",
                "val_size=100",
                "head_epochs=1",
                "finetune_epochs=1",
                "finetune_from=layer4.2",
            ],
        ),
        "presets": [("smoke", ["analysis=false", "train_size=100", "val_size=100"])],
        "test_images": 500,
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    """Release the previous measurement's memory (so each peak is its own) and compiled graphs (so
    each run pays its own compilation, as a fresh `run` does)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def median_rate(step: Callable[[], object], images: int, steps: int, device: torch.device) -> float:
    """Images per second: one warm-up step, then the median of WINDOWS windows of `steps` steps."""
    step()
    rates = []
    for _ in range(WINDOWS):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(images * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def throughput(
    pretrained, resolution: int, batch: int, precision: str, device: torch.device, steps: int
) -> dict:
    """A training step of every layer (our optimizer and layout), and inference, on one resident
    batch."""
    free(device)
    recipe = preset("strong").with_overrides([f"resolution={resolution}", f"precision={precision}"])
    model = place(build_model(recipe, pretrained), recipe, device)
    opt = make_optimizer(set_phase(model, 2, recipe), 2, recipe)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def train_step() -> None:
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_ips = median_rate(train_step, batch, steps, device)
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(x)

    return {
        "resolution": resolution,
        "batch": batch,
        "precision": precision,
        "train_img_s": train_ips,
        "infer_img_s": median_rate(infer, batch, steps, device),
        "peak_gpu_mib": peak_mib(device),
    }


@contextmanager
def checkpoints_in_place() -> Iterator[None]:
    """`fit` writes its checkpoints on the critical path: the baseline the background thread is
    measured by."""

    class InPlace(atomic.Background):
        def submit(self, path, write, then=None) -> None:
            atomic.write_with(path, write)
            if then is not None:
                then()

    background = atomic.Background
    atomic.Background = InPlace
    try:
        yield
    finally:
        atomic.Background = background


def end_to_end(
    recipe: Recipe | None,
    base: Recipe,
    splits: Splits,
    pretrained,
    device: torch.device,
    in_place: bool = False,
) -> dict:
    """Train (both phases, as `run` does: checkpoints and history in a run folder) and test;
    `recipe=None` runs the plain reference loop on `base` instead."""
    free(device)
    sync(device)
    t0 = time.perf_counter()
    test = as_tensors(splits.test.images, splits.test.labels, device)
    if recipe is None:
        torch.manual_seed(base.seed)
        model = build_model(base, pretrained).to(device)
        train_plain(
            model,
            base.with_overrides(["precision=fp32"]),
            *as_tensors(splits.train.images, splits.train.labels, device),
        )
        accuracy = accuracy_plain(model, *test)
    else:
        with (
            tempfile.TemporaryDirectory() as folder,
            checkpoints_in_place() if in_place else nullcontext(),
        ):
            model, _, _ = train_to_folder(
                recipe, Path(folder), splits, pretrained, device, progress=False
            )
        logits = predict_logits(model, test[0], recipe.eval_batch_size, recipe.precision)
        accuracy = (logits.argmax(1) == test[1]).float().mean().item()
    sync(device)
    return {
        "seconds": time.perf_counter() - t0,
        "test_accuracy": accuracy,
        "peak_gpu_mib": peak_mib(device),
    }


def gains(base: Recipe, splits: Splits, pretrained, device: torch.device) -> list[dict]:
    """LADDER on one recipe; each row's gain over the row above, and over the plain loop."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    rows = []
    for label, fields, in_place in LADDER:
        recipe = (
            None
            if fields is None
            else base.with_overrides([f.format(compile=mode) for f in fields])
        )
        row = {"step": label, **end_to_end(recipe, base, splits, pretrained, device, in_place)}
        row["gain"] = rows[-1]["seconds"] / row["seconds"] if rows else 1.0
        row["vs_plain"] = rows[0]["seconds"] / row["seconds"] if rows else 1.0
        rows.append(row)
        print(f"gains {row}", flush=True)
    return rows


def table(results: dict) -> str:
    env = results["environment"]
    lines = [f"machine: {env['device_name']}; torch {env['versions']['torch']}"]
    if results["machine"]:
        rates = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in results["machine"].items())
        lines.append(
            f"roofline (TFLOP/s): {rates}; a run's passes against it: bench/roofline.py RUN_DIR"
        )
    lines += [
        "",
        f"{'px':>4} {'batch':>5} {'prec':>5} {'train img/s':>12} {'infer img/s':>12}   (median of "
        f"{WINDOWS})",
    ]
    for r in results["throughput"]:
        lines.append(
            f"{r['resolution']:>4} {r['batch']:>5} {r['precision']:>5} {r['train_img_s']:>12,.0f} "
            f"{r['infer_img_s']:>12,.0f}"
        )
    name, overrides = results["ladder_recipe"]
    lines += [
        "",
        f"gains, one at a time: {' '.join([name, *overrides])} (train + test)",
        f"{'step':<48} {'seconds':>8} {'test acc':>8} {'gain':>7} {'vs plain':>8} {'GPU MiB':>8}",
    ]
    for r in results["gains"]:
        mem = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:,.0f}"
        lines.append(
            f"{r['step']:<48} {r['seconds']:>8.1f} {r['test_accuracy']:>8.2%} {r['gain']:>6.2f}x "
            f"{r['vs_plain']:>7.2f}x {mem:>8}"
        )
    lines += ["", f"{'preset':<40} {'seconds':>8} {'test acc':>8} {'GPU MiB':>8}"]
    for r in results["presets"]:
        mem = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:,.0f}"
        lines.append(
            f"{' '.join([r['preset'], *r['overrides']]):<40} {r['seconds']:>8.1f} "
            f"{r['test_accuracy']:>8.2%} {mem:>8}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: about a minute on 2 cores")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--weights", default=os.environ.get("CIFAR_TRANSFER_WEIGHTS", "imagenet"))
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--json", type=Path, help="where to write the results (default runs/bench/bench-*.json)"
    )
    args = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False  # every compiled row compiles from scratch
    torch._functorch.config.enable_autograd_cache = False
    device = pick_device(args.device)
    plan = PLANS["cpu"]
    if args.smoke:
        plan = PLANS["smoke"]
    elif device.type == "cuda":
        plan = PLANS["full"]
    if device.type == "cuda":  # as `run` sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pretrained = load_pretrained(args.weights)
    results: dict = {
        "environment": machine.environment(device),
        "machine": machine_rates()
        if device.type == "cpu"
        else None,  # the CPU roofline the passes are read against
        "smoke": args.smoke,
        "windows": WINDOWS,
        "throughput": [],
        "ladder_recipe": plan["ladder"],
        "gains": [],
        "presets": [],
    }
    for r, b, p in plan["throughput"]:
        results["throughput"].append(throughput(pretrained, r, b, p, device, plan["steps"]))
        print(f"throughput {results['throughput'][-1]}", flush=True)
    train, test = load_cifar10(args.data_dir)
    test = test.take(np.arange(min(plan["test_images"], len(test))))

    def splits_for(recipe: Recipe) -> Splits:
        return split(train, test, recipe.train_size, recipe.val_size, recipe.seed)

    base = preset(plan["ladder"][0]).with_overrides(plan["ladder"][1])
    results["gains"] = gains(base, splits_for(base), pretrained, device)
    for name, overrides in plan["presets"]:
        recipe = preset(name).with_overrides(overrides)
        results["presets"].append(
            {
                "preset": name,
                "overrides": overrides,
                **end_to_end(recipe, recipe, splits_for(recipe), pretrained, device),
            }
        )
        print(f"preset {results['presets'][-1]}", flush=True)
    name = next(k for k, v in PLANS.items() if v is plan)
    path = args.json or Path("runs/bench") / f"bench-{name}.json"
    atomic.write_json(path, results)
    print(f"\n{table(results)}\n\nwritten to {path}")


if __name__ == "__main__":
    main()

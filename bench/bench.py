"""Benchmarks that print numbers: training/inference throughput, end-to-end presets, and the same recipes run
by a deliberately plain loop (bench/reference.py) in the same process, so each speed-up is a measured ratio.

usage: python bench/bench.py [--smoke] [--data-dir D] [--weights W] [--device auto|cpu|cuda] [--json FILE]
--smoke is CPU-sized (a few minutes on 2 cores); without it: 32/128/224 px x batch 32/256 and the full
`seed` and `strong` presets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference import accuracy_plain, train_plain

from cifar_transfer import atomic
from cifar_transfer.augment import to_device
from cifar_transfer.data import load_cifar10, split
from cifar_transfer.evaluate import autocast, predict_logits
from cifar_transfer.model import build_model, load_pretrained, pick_device
from cifar_transfer.model import to_device as model_to_device
from cifar_transfer.pipeline import environment
from cifar_transfer.recipe import preset
from cifar_transfer.train import fit, make_optimizer, set_phase

FULL = {
    "throughput": [(r, b, p) for r in (32, 128, 224) for b in (32, 256) for p in ("fp32", "bf16")],
    "end_to_end": [("seed", []), ("seed", ["precision=bf16"]), ("strong", [])],
    "steps": 20,
}
SMOKE = {
    "throughput": [(32, 32, "fp32"), (32, 32, "bf16"), (32, 256, "fp32"), (128, 32, "fp32")],
    "end_to_end": [("seed", ["train_size=1000", "val_size=500", "head_epochs=3", "finetune_epochs=1"]),
                   ("seed", ["train_size=1000", "val_size=500", "head_epochs=3", "finetune_epochs=1",
                             "precision=bf16"])],
    "steps": 3,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(pretrained, resolution: int, batch: int, precision: str, device: torch.device, steps: int) -> dict:
    """Images per second for a full training step (all layers) and for inference."""
    recipe = preset("strong").with_overrides([f"resolution={resolution}", f"precision={precision}"])
    model = model_to_device(build_model(recipe, pretrained), recipe, device)
    opt = make_optimizer(set_phase(model, 2, recipe), 2, recipe)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for timed in (False, True):  # warm-up, then measure
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps if timed else 1):
            with autocast(device, precision):
                loss = torch.nn.functional.cross_entropy(model(x.float() / 255).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
    train_ips = steps * batch / (time.perf_counter() - t0)
    model.eval()
    for timed in (False, True):
        sync(device)
        t0 = time.perf_counter()
        predict_logits(model, x.repeat(steps if timed else 1, 1, 1, 1), batch, precision)
        sync(device)
    return {"resolution": resolution, "batch": batch, "precision": precision, "train_img_s": train_ips,
            "infer_img_s": steps * batch / (time.perf_counter() - t0)}


def end_to_end(name: str, overrides: list[str], data, pretrained, device: torch.device) -> dict:
    """Train + final test evaluation, by the pipeline's loop and by the plain reference loop."""
    recipe = preset(name).with_overrides(overrides)
    splits = split(*data, recipe.train_size, recipe.val_size, recipe.seed)
    out = {"preset": name, "overrides": overrides}
    for loop in ("ours", "reference"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed)
        train = to_device(splits.train.images, splits.train.labels, device)
        test = to_device(splits.test.images, splits.test.labels, device)
        if loop == "ours":
            model = model_to_device(build_model(recipe, pretrained), recipe, device)
            fit(model, recipe, train, to_device(splits.val.images, splits.val.labels, device), progress=False)
            accuracy = (predict_logits(model, test[0], recipe.eval_batch_size, recipe.precision).argmax(1)
                        == test[1]).float().mean().item()
        else:
            model = build_model(recipe, pretrained)
            model = model.to(device)
            train_plain(model, recipe.with_overrides(["precision=fp32"]), *train)
            accuracy = accuracy_plain(model, *test)
        sync(device)
        out[loop] = {"seconds": time.perf_counter() - t0, "test_accuracy": accuracy,
                     "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}
    out["speedup"] = out["reference"]["seconds"] / out["ours"]["seconds"]
    return out


def table(results: dict) -> str:
    lines = [f"machine: {results['environment']['device_name']}, torch {results['environment']['versions']['torch']}",
             "", f"{'px':>4} {'batch':>5} {'prec':>5} {'train img/s':>12} {'infer img/s':>12}"]
    for r in results["throughput"]:
        lines.append(f"{r['resolution']:>4} {r['batch']:>5} {r['precision']:>5} {r['train_img_s']:>12,.0f} "
                     f"{r['infer_img_s']:>12,.0f}")
    lines += ["", f"{'recipe':<90} {'ours s':>8} {'acc':>7} {'plain s':>8} {'acc':>7} {'speed-up':>8} {'GPU MiB':>8}"]
    for r in results["end_to_end"]:
        label = " ".join([r["preset"], *r["overrides"]])
        mem = r["ours"]["peak_gpu_mib"]
        lines.append(f"{label:<90} {r['ours']['seconds']:>8.1f} {r['ours']['test_accuracy']:>7.2%} "
                     f"{r['reference']['seconds']:>8.1f} {r['reference']['test_accuracy']:>7.2%} "
                     f"{r['speedup']:>7.2f}x {'-' if mem is None else f'{mem:,.0f}':>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: a few minutes on 2 cores")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--weights", default=os.environ.get("CIFAR_TRANSFER_WEIGHTS", "imagenet"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="where to write the results (default runs/bench/bench-*.json)")
    args = ap.parse_args()
    plan = SMOKE if args.smoke else FULL
    device = pick_device(args.device)
    pretrained = load_pretrained(args.weights)
    results: dict = {"environment": environment(device), "smoke": args.smoke, "throughput": [], "end_to_end": []}
    for r, b, p in plan["throughput"]:
        results["throughput"].append(throughput(pretrained, r, b, p, device, plan["steps"]))
        print(f"throughput {results['throughput'][-1]}", flush=True)
    data = load_cifar10(args.data_dir)
    for name, overrides in plan["end_to_end"]:
        results["end_to_end"].append(end_to_end(name, overrides, data, pretrained, device))
        print(f"end to end {results['end_to_end'][-1]}", flush=True)
    path = args.json or Path("runs/bench") / f"bench-{'smoke' if args.smoke else 'full'}.json"
    atomic.write_json(path, results)
    print(f"\n{table(results)}\n\nwritten to {path}")


if __name__ == "__main__":
    main()

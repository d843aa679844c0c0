"""The machine's own roofline, and each pass of a finished run measured against it.

usage: python bench/roofline.py [RUN_DIR ...] [--json FILE]

First the machine: a 2048^3 matmul and a 3x3 convolution (256 channels, 8x8 maps, batch 64,
channels-last) forward and forward + backward, each in bf16 and fp32 and the best of a few timed
repeats (seconds in all). Then, for each run folder, every pass the run made (phase 1: the frozen
pass cached once, the base features and the head epochs; phase 2: the fine-tune epochs with their
validation, and with augment=flip+augmix the fresh views' frozen forwards and, with the consistency
loss, the mixes' fine-tune steps; the test evaluation; calibration; the error analysis): its FLOPs
(counted with torch.utils.flop_counter at the recipe's resolution, from the image counts and epochs
in metrics.json), its seconds (metrics.json's timings), the achieved TFLOP/s and the fraction of the
machine's matmul rate in the precision the run computed in (metrics.json's `computed_in`). The
analysis row counts the CIFAR-10-C and flip-TTA forwards only (Grad-CAM and the corruptions' own
arithmetic are not counted), so its rate is a floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cifar_transfer import atomic, machine
from cifar_transfer.data.corruptions import BENCHMARK, SEVERITIES
from cifar_transfer.model.network import Part, TransferNet
from cifar_transfer.recipe import Recipe


def best_seconds(f, repeats: int = 5) -> float:
    f()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def machine_rates() -> dict:
    """TFLOP/s of the kernels the passes are made of, on this CPU's threads, in both precisions: a
    CPU without bf16 units (AMX, AVX-512 BF16) emulates bf16, slower than fp32."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {
        "fp32_matmul": 2 * n**3 / best_seconds(lambda: a @ b) / 1e12,
        "bf16_matmul": 2 * n**3 / best_seconds(lambda: a.bfloat16() @ b.bfloat16()) / 1e12,
    }
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(64, 256, 8, 8).to(memory_format=torch.channels_last)
    flops = 2 * 64 * 256 * 256 * 9 * 8 * 8
    for precision in ("bf16", "fp32"):

        def forward(bf16: bool = precision == "bf16") -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return conv(x)

        with torch.no_grad():
            rates[f"{precision}_conv_forward"] = flops / best_seconds(forward) / 1e12
        rates[f"{precision}_conv_forward_backward"] = (
            3 * flops / best_seconds(lambda f=forward: f().float().sum().backward()) / 1e12
        )
    return rates


def counted(f) -> float:
    with FlopCounterMode(display=False) as counter:
        f()
    return float(counter.get_total_flops())


def flops_per_image(recipe: Recipe) -> dict[str, float]:
    """FLOPs for one image of each kind of pass (a model of the recipe's shape; the weights do not
    matter)."""
    model = TransferNet(recipe, (0.5,) * 3, (0.25,) * 3, False).eval()
    x = torch.rand(2, 3, 32, 32)
    begin = recipe.finetune_from
    with torch.no_grad():
        frozen_out = Part(model, "stem", begin)(x) if begin != "stem" else x
        full = counted(lambda: model(x)) / 2
        frozen = counted(lambda: Part(model, "stem", begin)(x)) / 2 if begin != "stem" else 0.0
        features = counted(lambda: Part(model, begin, "head")(frozen_out)) / 2
        top = counted(lambda: Part(model, begin)(frozen_out)) / 2
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("backbone") or _trained(model, name, begin))
    labels = torch.zeros(2, dtype=torch.long)
    step = counted(lambda: F.cross_entropy(Part(model, begin)(frozen_out), labels).backward()) / 2
    return {
        "full_forward": full,
        "frozen": frozen,
        "features": features,
        "top_forward": top,
        "step": step,
    }


def _trained(model: TransferNet, name: str, begin: str) -> bool:
    from cifar_transfer.recipe import STEPS, step_name

    first = STEPS.index(step_name(begin))
    block = ".".join(name.split(".")[1:3])  # backbone.layer3.3.conv1.weight -> layer3.3
    return block in STEPS and STEPS.index(block) >= first


def passes(run_dir: Path) -> list[dict]:
    """Each pass of the run: FLOPs, seconds, achieved TFLOP/s."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = Recipe.from_dict(json.loads((run_dir / "recipe.json").read_text()))
    per = flops_per_image(recipe)
    counts = {k: sum(v) for k, v in metrics["data"]["counts"].items()}
    train, val, test = counts["train"], counts["validation"], counts["test"]
    # cached views of each image
    views = {"flip": 2, "flip+noise": 3, "flip+augmix": 2}.get(recipe.augment, 1)
    t = metrics["timings"]
    head_images = recipe.head_epochs * train + recipe.head_epochs * val
    phase1 = (per["frozen"] + per["features"]) * (
        views * train + val
    ) + head_images * 1e5  # the head: ~1e5 an image
    # flip+augmix: a third made anew every step (two mixes of each with the consistency loss, which
    # trains on them beside the clean rows)
    mixes = (2 if recipe.consistency else 1) * train / 3 if recipe.augment == "flip+augmix" else 0.0
    stepped = train + (mixes if recipe.consistency else 0.0)
    phase2 = recipe.finetune_epochs * (
        stepped * per["step"] + mixes * per["frozen"] + val * per["top_forward"]
    )
    analysis = metrics.get("analysis", {})
    robust = analysis.get("robustness", {}).get("images", 0) * len(BENCHMARK) * len(SEVERITIES)
    tta = analysis.get("tta", {}).get("images", 0)
    rows = [
        ("phase 1: frozen pass cached once, base features, head epochs", phase1, t["phase1_s"]),
        ("phase 2: fine-tune epochs and their validation", phase2, t["phase2_s"]),
        ("test evaluation (full forward)", test * per["full_forward"], t["eval_s"]),
        ("calibration (validation logits kept from training)", 0.0, t.get("calibration_s", 0.0)),
        (
            "analysis (CIFAR-10-C and flip-TTA forwards only)",
            (robust + tta) * per["full_forward"],
            t.get("analysis_s"),
        ),
    ]
    return [
        {
            "pass": name,
            "tflop": flops / 1e12,
            "seconds": s,
            "tflop_s": flops / s / 1e12 if s and flops else None,
        }
        for name, flops, s in rows
        if s is not None
    ]


def table(result: dict) -> str:
    r = result["machine"]
    lines = [
        f"machine: {result['environment']['device_name']}; torch "
        f"{result['environment']['versions']['torch']}",
        "roofline (TFLOP/s): "
        + "; ".join(
            f"{kind} bf16 {r[f'bf16_{kind}']:.2f}, fp32 {r[f'fp32_{kind}']:.2f}"
            for kind in ("matmul", "conv_forward", "conv_forward_backward")
        ),
    ]
    for run in result["runs"]:
        precision = run["computed_in"]
        lines += [
            "",
            f"run {run['run']} ({run['preset']}, computed in {precision}, total_s "
            f"{run['total_s']:.0f})",
        ]
        lines.append(
            f"{'pass':<62} {'TFLOP':>7} {'seconds':>8} {'TFLOP/s':>8} {f'of {precision} mm':>10}"
        )
        for p in run["passes"]:
            rate = "-" if p["tflop_s"] is None else f"{p['tflop_s']:.3f}"
            share = (
                "-" if p["tflop_s"] is None else f"{p['tflop_s'] / r[f'{precision}_matmul']:.0%}"
            )
            lines.append(
                f"{p['pass']:<62} {p['tflop']:>7.1f} {p['seconds']:>8.1f} {rate:>8} {share:>10}"
            )
    return "\n".join(lines)


def roofline(run_dirs: list[Path]) -> dict:
    runs = []
    for d in run_dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        runs.append(
            {
                "run": str(d),
                "preset": metrics["run"]["preset"],
                # runs made before `computed_in` was recorded: bf16 only when the recipe asked for
                # it
                "computed_in": metrics["run"].get("computed_in", _asked_for(d)),
                "total_s": metrics["timings"]["total_s"],
                "measured_on": metrics["run"]["device_name"],
                "passes": passes(d),
            }
        )
    return {
        "environment": machine.environment(torch.device("cpu")),
        "machine": machine_rates(),
        "runs": runs,
    }


def _asked_for(run_dir: Path) -> str:
    return (
        "bf16"
        if json.loads((run_dir / "recipe.json").read_text())["precision"] == "bf16"
        else "fp32"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", type=Path, nargs="*", metavar="RUN_DIR", help="finished run folders (metrics.json)"
    )
    ap.add_argument("--json", type=Path, default=Path("runs/bench/roofline.json"))
    args = ap.parse_args()
    missing = [str(d) for d in args.runs if not (d / "metrics.json").is_file()]
    if missing:
        sys.exit(f"error: not finished run folders (no metrics.json): {', '.join(missing)}")
    result = roofline(args.runs)
    atomic.write_json(args.json, result)
    print(f"{table(result)}\n\nwritten to {args.json}")


if __name__ == "__main__":
    main()

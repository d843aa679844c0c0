"""Design probe for issue "near what the CPU can do": what would make lean's passes faster on this
CPU?

Times, on the shared ResNet-50 weights at lean's 128 px and bf16 autocast (channels-last): the
frozen pass (stem..layer3.2) at evaluation batch 32 and 128, and with frozen BatchNorm folded into
the convolutions; the full forward at batch 32 and 128; a fine-tune step (layer3.3..head, batch 64,
SGD) eager and through inductor (`torch.compile`, compile time printed). Images per second, best of
two timed calls after a warm-up.

usage: python bench/design/passes.py [WEIGHTS]   (default: $CIFAR_TRANSFER_WEIGHTS)
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

from cifar_transfer.model.inference import predict_logits
from cifar_transfer.model.network import Part, build_model, folded, place
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset


def rate(f, images: int) -> float:
    f()
    best = min(_timed(f) for _ in range(2))
    return images / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def step_rate(model, compile_it: bool) -> float:
    for name, p in model.named_parameters():
        p.requires_grad_(
            not name.startswith("backbone")
            or name.startswith(("backbone.layer4", "backbone.layer3.3"))
        )
    top = Part(model, "layer3.3")
    forward = torch.compile(top) if compile_it else top
    x = torch.randn(64, 1024, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True
    )

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    if compile_it:
        print(f"  inductor compile and first step: {time.perf_counter() - t0:.1f} s")
    return rate(lambda: [step() for _ in range(3)], 3 * 64)


def main() -> None:
    recipe = preset("lean")
    weights = sys.argv[1] if len(sys.argv) > 1 else os.environ["CIFAR_TRANSFER_WEIGHTS"]
    model = place(build_model(recipe, load_pretrained(weights)), recipe, torch.device("cpu")).eval()
    x = torch.randint(0, 255, (256, 3, 32, 32), dtype=torch.uint8)
    frozen, fused = Part(model, "stem", "layer3.3"), Part(folded(model), "stem", "layer3.3")
    for label, part, batch in (
        ("frozen pass", frozen, 32),
        ("frozen pass", frozen, 128),
        ("+ BN folded", fused, 32),
    ):
        r = rate(lambda p=part, b=batch: predict_logits(p, x, b, "bf16", dtype=None), len(x))
        print(f"{label:<24} batch {batch:>3}: {r:6.1f} img/s")
    for batch in (32, 128):
        full = rate(lambda b=batch: predict_logits(model, x, b, "bf16"), len(x))
        print(f"{'full forward':<24} batch {batch:>3}: {full:6.1f} img/s")
    print(f"{'fine-tune step eager':<24} batch  64: {step_rate(model, False):6.1f} img/s")
    print(f"{'fine-tune step inductor':<24} batch  64: {step_rate(model, True):6.1f} img/s")


if __name__ == "__main__":
    main()

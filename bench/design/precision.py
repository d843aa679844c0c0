"""Design probe for `precision="auto"`: is bf16 worth it on this CPU, and does folding BatchNorm
pay?

On lean's network (128 px, the shared ResNet-50 weights) it times, in bf16 autocast and in fp32,
channels-last and contiguous: the frozen pass (stem..layer3.2, evaluation batch 32, 128 images) and
a fine-tune step (layer3.3..head, batch 64, SGD); then, in fp32 channels-last, the frozen pass at
batches 32, 64 and 96 and the full forward at 64, each with the frozen BatchNorm as it is and folded
into the convolutions (`model.network.folded`). Images per second, best of two timed calls after a
warm-up. A CPU without bf16 units (AMX, AVX-512 BF16) emulates bf16.

usage: python bench/design/precision.py [WEIGHTS]   (default: $CIFAR_TRANSFER_WEIGHTS)
"""

import dataclasses
import os
import sys
import time

import torch
import torch.nn.functional as F

from cifar_transfer.machine import cpu_model
from cifar_transfer.model.inference import predict_logits
from cifar_transfer.model.network import Part, build_model, folded, place
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset


def rate(f, images: int) -> float:
    f()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return images / min(times)


def lean_model(pretrained, precision: str, memory_format: str):
    recipe = dataclasses.replace(preset("lean"), precision=precision, memory_format=memory_format)
    return place(build_model(recipe, pretrained), recipe, torch.device("cpu")).eval()


def step_rate(model, precision: str, memory_format: str) -> float:
    for name, p in model.named_parameters():
        p.requires_grad_(
            not name.startswith("backbone")
            or name.startswith(("backbone.layer4", "backbone.layer3.3"))
        )
    top = Part(model, "layer3.3")
    x = torch.randn(64, 1024, 8, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    x = x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True
    )

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(top(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return rate(lambda: [step() for _ in range(2)], 128)


def main() -> None:
    pretrained = load_pretrained(
        sys.argv[1] if len(sys.argv) > 1 else os.environ["CIFAR_TRANSFER_WEIGHTS"]
    )
    print(f"CPU: {cpu_model()}; torch {torch.__version__}")
    x = torch.randint(0, 255, (128, 3, 32, 32), dtype=torch.uint8)
    for precision in ("bf16", "fp32"):
        for memory_format in ("channels_last", "contiguous"):
            model = lean_model(pretrained, precision, memory_format)
            frozen = Part(model, "stem", "layer3.3")
            a = rate(lambda f=frozen, p=precision: predict_logits(f, x, 32, p, dtype=None), len(x))
            b = step_rate(model, precision, memory_format)
            print(
                f"{precision} {memory_format}: frozen pass {a:.1f} img/s, fine-tune step {b:.1f} "
                "img/s",
                flush=True,
            )
    model = lean_model(pretrained, "fp32", "channels_last")
    x = torch.randint(0, 255, (192, 3, 32, 32), dtype=torch.uint8)
    for label, m in (("plain", model), ("BN folded", folded(model))):
        for batch in (32, 64, 96):
            frozen = Part(m, "stem", "layer3.3")
            r = rate(lambda f=frozen, b=batch: predict_logits(f, x, b, "fp32", dtype=None), len(x))
            print(f"{label} frozen pass batch {batch}: {r:.1f} img/s", flush=True)
        print(
            f"{label} full forward batch 64: "
            f"{rate(lambda m=m: predict_logits(m, x, 64, 'fp32'), len(x)):.1f} img/s"
        )


if __name__ == "__main__":
    main()

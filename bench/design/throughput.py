"""Design probe for the `lean` preset: is bf16 worth it on this CPU, and in which memory layout?

Times ResNet-50's frozen stages (stem..layer3, inference) and layer4 + the head (a training step) at
128 px, fp32 against bf16 autocast, contiguous against channels-last, on random weights (speed does
not depend on them). Prints images per second, best of three timed calls after one warm-up.

usage: python bench/design/throughput.py
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.models import resnet50


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def frozen_stages(net: torch.nn.Module, layout: torch.memory_format, bf16: bool) -> float:
    """Images per second through stem..layer3 at 128 px (inference, batch 32)."""
    frozen = torch.nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
    )
    frozen.to(memory_format=layout)
    images = torch.rand(32, 3, 32, 32)

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            frozen(
                F.interpolate(images, size=(128, 128), mode="bilinear").contiguous(
                    memory_format=layout
                )
            )

    return 32 / best_seconds(infer)


def top_training(net: torch.nn.Module, layout: torch.memory_format, bf16: bool) -> float:
    """Images per second of a training step of layer4 + the 128-64 head on 8x8 layer3 activations
    (batch 64)."""
    head = torch.nn.Sequential(
        torch.nn.Linear(2048, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    top = torch.nn.Sequential(
        net.layer4, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head
    ).train()
    top.to(memory_format=layout)
    opt = torch.optim.SGD(top.parameters(), lr=0.01, momentum=0.9)
    acts = (
        torch.randn(64, 1024, 8, 8)
        .to(torch.bfloat16 if bf16 else torch.float32)
        .contiguous(memory_format=layout)
    )
    labels = torch.randint(0, 10, (64,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(top(acts).float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return 64 / best_seconds(step)


def main() -> None:
    net = resnet50().eval()
    for layout, name in (
        (torch.contiguous_format, "contiguous"),
        (torch.channels_last, "channels-last"),
    ):
        for bf16 in (False, True):
            print(
                f"128 px {'bf16' if bf16 else 'fp32'} {name}: frozen stages "
                f"{frozen_stages(net, layout, bf16):.0f} img/s (batch 32), layer4 + head training "
                f"{top_training(net, layout, bf16):.0f} img/s (batch 64)",
                flush=True,
            )


if __name__ == "__main__":
    main()

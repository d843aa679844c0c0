"""Design probe for the `lean` preset, step 1: cache the frozen stages' activations once.

Runs stem..layer3[:BLOCK] at RES px under bf16 autocast (channels_last, batch 32) over the class-
balanced 10,000-image training subsample of SEED, its mirror images, the 5,000 validation images and
the test set, and saves them to /tmp/lean-design/cache{RES}_s{SEED}_b{BLOCK}.pt for `train.py`. This
is the exploration the preset was chosen with; `cifar-transfer run --preset lean` does the same
inside `train.fit`.

usage: python bench/design/cache.py RES SEED BLOCK   (e.g. 128 0 3; BLOCK 6 caches layer3's output)
"""

import os
import sys
import time
from pathlib import Path

import torch

from cifar_transfer.data.cifar import load_cifar10, split
from cifar_transfer.model.network import build_model
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import Recipe

OUT = Path("/tmp/lean-design")


def main() -> None:
    res, seed, block = (int(a) for a in sys.argv[1:4])
    torch.set_grad_enabled(False)
    train, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    sp = split(train, test, 10_000, 5_000, seed)
    model = build_model(
        Recipe(resolution=res), load_pretrained(os.environ["CIFAR_TRANSFER_WEIGHTS"])
    ).eval()
    model = model.to(memory_format=torch.channels_last)
    stop = f"layer3.{block}" if block < 6 else "layer4"

    def run(images, flip: bool = False) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        x = x.flip(-1) if flip else x
        t0, out = time.perf_counter(), []
        for i in range(0, len(x), 32):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out.append(model.run(x[i : i + 32].float() / 255, stop=stop).to(torch.bfloat16))
        print(f"{len(x)} images {time.perf_counter() - t0:.1f} s", flush=True)
        return torch.cat(out)

    cache = {
        "train": run(sp.train.images),
        "train_flip": run(sp.train.images, True),
        "val": run(sp.val.images),
        "test": run(sp.test.images),
        "ytrain": torch.from_numpy(sp.train.labels),
        "yval": torch.from_numpy(sp.val.labels),
        "ytest": torch.from_numpy(sp.test.labels),
    }
    OUT.mkdir(exist_ok=True)
    torch.save(cache, OUT / f"cache{res}_s{seed}_b{block}.pt")


if __name__ == "__main__":
    main()

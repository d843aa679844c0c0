"""How far apart, in perceptual-hash bits, are CIFAR-10's test images from their nearest training
image? The measurement behind data.duplicates.NEAR: the pairs at each distance are counted (and how
many share a label), and a strip of ten pairs per distance is written for a person to judge.

    python bench/design/near_copies.py [--out /tmp/near]     # CIFAR-10 from $CIFAR_TRANSFER_DATA
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_transfer.data.cifar import load_cifar10
from cifar_transfer.data.duplicates import perceptual_hashes


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/near"))
    a = p.parse_args()
    train, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    t0 = time.perf_counter()
    train_hashes, test_hashes = perceptual_hashes(train.images), perceptual_hashes(test.images)
    hashed = time.perf_counter() - t0
    nearest, which = np.empty(len(test), np.int64), np.empty(len(test), np.int64)
    for start in range(0, len(test), 256):
        bits = np.bitwise_count(test_hashes[start : start + 256, None] ^ train_hashes[None, :])
        nearest[start : start + 256], which[start : start + 256] = bits.min(1), bits.argmin(1)
    print(
        f"hashed 60,000 images in {hashed:.1f} s; nearest training image found in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    same = train.labels[which] == test.labels
    for k in range(9):
        print(
            f"<= {k} bits: {(nearest <= k).sum():4d} test images ({((nearest <= k) & same).sum()} "
            "with the same label)"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(0, 9, 2):
        rows = np.flatnonzero(nearest == k)
        strip = Image.new("RGB", (70 * 10, 140), "white")
        for j, i in enumerate(rng.choice(rows, min(10, len(rows)), replace=False)):
            strip.paste(Image.fromarray(test.images[i]).resize((64, 64)), (70 * j, 0))
            strip.paste(Image.fromarray(train.images[which[i]]).resize((64, 64)), (70 * j, 70))
        strip.save(a.out / f"{k}-bits.png")


if __name__ == "__main__":
    main()

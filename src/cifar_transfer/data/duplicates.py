"""Pictures that sit in two sets at once: a validation or test picture whose copy, or near-copy, is
a training picture (or, for test, a validation picture) flatters the score it is counted in.

Exact copies have the same decoded pixels. Near-copies have perceptual hashes (`imagehash.phash`:
the signs of an 8 x 8 block of the picture's DCT, 64 bits) at most `NEAR` bits apart: the same
photograph re-encoded, resized, brightened or with a watermark. Each later-set picture is paired
with its closest picture in an earlier set (train before val before test), so a picture that appears
five times is listed once per later copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

SET_ORDER = ("train", "val", "test")
# Bits of 64 two pictures' hashes may differ by and still be called copies: at this distance the
# pairs found in CIFAR-10 (test against train) were all the same photograph, further out less and
# less (docs/own-images.md).
NEAR = 4
CHUNK = (
    256  # later-set pictures compared at once: the XOR holds 8 x CHUNK x (earlier pictures) bytes
)


@dataclass(frozen=True)
class Duplicate:
    earlier: int  # index of the picture in the earlier set
    later: int  # index of its copy in a later set
    distance: int  # bits of the perceptual hashes that differ; exact copies say 0
    exact: bool  # the same decoded pixels


BITS = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def perceptual_hash(image: np.ndarray) -> np.uint64:
    """A picture's 64-bit pHash as one unsigned integer."""
    return (imagehash.phash(Image.fromarray(image)).hash.ravel().astype(np.uint64) * BITS).sum(
        dtype=np.uint64
    )


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    return np.array([perceptual_hash(image) for image in images], dtype=np.uint64)


def find_duplicates(
    images: np.ndarray, sets: np.ndarray, hashes: np.ndarray | None = None, near: int = NEAR
) -> list[Duplicate]:
    """For each validation or test picture, its closest earlier-set picture if it is an exact copy
    or at most `near` bits away (`hashes`: the pictures' perceptual hashes, where the caller has
    them)."""
    rank = np.array([SET_ORDER.index(s) for s in sets])
    digests = [hashlib.sha1(image.tobytes()).digest() for image in images]
    hashes = perceptual_hashes(images) if hashes is None else hashes
    found = []
    for later_rank in (1, 2):
        earlier, later = np.flatnonzero(rank < later_rank), np.flatnonzero(rank == later_rank)
        if not len(earlier):
            continue
        copies = {
            digests[j]: int(j) for j in earlier[::-1]
        }  # the first of several identical earlier pictures
        for start in range(0, len(later), CHUNK):
            rows = later[start : start + CHUNK]
            distances = np.bitwise_count(hashes[rows, None] ^ hashes[None, earlier])
            for k, row in enumerate(rows.tolist()):
                closest = int(distances[k].argmin())
                if digests[row] in copies:
                    found.append(Duplicate(copies[digests[row]], row, 0, True))
                elif distances[k, closest] <= near:
                    found.append(
                        Duplicate(int(earlier[closest]), row, int(distances[k, closest]), False)
                    )
    return found

"""How long reading a folder of pictures takes: the first read (decode on all cores, cache written)
and the second (everything from the cache), and the peak memory of each, in fresh processes.

    python bench/design/folder_read.py FOLDER [--size 64]
    python bench/design/folder_read.py FOLDER --make 10000 --cifar ../shared/data
                                           # photo-sized JPEGs first

`--make N` writes N JPEGs of photo size into FOLDER first: CIFAR-10 test images (real pictures)
upscaled to 640 x 480 (0.3 megapixels) and saved at quality 90, one folder per class. Decoding cost
follows pixel count and format, not content, so this measures what a folder of phone-camera exports
of that size costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

READ = """
import json, resource, sys, time
from cifar_transfer.data.folder import read_labelled_folder
t0 = time.perf_counter()
data = read_labelled_folder(sys.argv[1], int(sys.argv[2]), 0.1, 0.2, seed=0, progress=False)
seconds = time.perf_counter() - t0
n = sum(len(s) for s in (data.splits.train, data.splits.val, data.splits.test))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
facts = {
        "pictures": n,
        "skipped": len(data.skipped),
        "seconds": round(seconds, 2),
        "peak_gib": round(peak, 2),
    }
print(json.dumps(facts))
"""


def make_jpegs(folder: str, cifar: str, n: int) -> None:
    from pathlib import Path

    from PIL import Image

    from cifar_transfer.data.cifar import load_cifar10

    test = load_cifar10(cifar, allow_download=False)[1]
    for i in range(n):
        out = Path(folder) / test.classes[test.labels[i % len(test)]]
        out.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(test.images[i % len(test)]).resize(
            (640, 480), Image.Resampling.BICUBIC
        )
        picture.save(out / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder")
    p.add_argument("--size", type=int, default=64)
    p.add_argument(
        "--make",
        type=int,
        default=0,
        metavar="N",
        help="write N photo-sized JPEGs into FOLDER first",
    )
    p.add_argument("--cifar", help="the folder holding CIFAR-10, for --make")
    args = p.parse_args()
    if args.make:
        make_jpegs(args.folder, args.cifar, args.make)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CIFAR_TRANSFER_CACHE": cache}
        for which in ("first read (decode)", "second read (cache)"):
            out = subprocess.run(
                [sys.executable, "-c", READ, args.folder, str(args.size)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(f"{which}: {json.loads(out)}")


if __name__ == "__main__":
    main()

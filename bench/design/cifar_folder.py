"""Parity of the two doors: CIFAR-10 read from its batch files against the same images as a folder
of PNG files.

    python bench/design/cifar_folder.py FOLDER [--cifar ../shared/data] [--preset lean] [--seed 0]

writes the preset's split of CIFAR-10 (its class-balanced training and validation subsamples, and
the 10,000 test images) into FOLDER/train, FOLDER/val and FOLDER/test, one PNG file per image and
one subfolder per class, and prints the two commands to time against each other:

    cifar-transfer run --preset lean --out runs/parity-batches
    cifar-transfer run --preset lean --data FOLDER --set image_size=32 --out runs/parity-folder

`image_size=32` stores the pictures at CIFAR-10's own size, so that both runs see the same pixels;
the folder run's first read decodes all 25,000 files (its cache is then warm for a second run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from cifar_transfer.data.cifar import load_cifar10, split
from cifar_transfer.recipe import preset


def write_folder(folder: Path, cifar: str | None, preset_name: str, seed: int) -> None:
    recipe = preset(preset_name)
    train, test = load_cifar10(cifar, allow_download=False)
    write_splits(folder, split(train, test, recipe.train_size, recipe.val_size, seed))


def image_path(folder: Path, split_name: str, class_name: str, index: int) -> Path:
    """Where write_splits puts an image: FOLDER/<split>/<class>/<index in the split>.png."""
    return folder / split_name / class_name / f"{index:05d}.png"


def write_splits(folder: Path, splits, train_labels=None) -> None:
    """One PNG file per image under FOLDER/<split>/<class>/, named by its index in the split;
    `train_labels` files the training images under other classes than their own (audit_flips.py's
    noisy copy: the same files, some in another class's folder)."""
    for name, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        labels = train_labels if name == "train" and train_labels is not None else ds.labels
        for i, (image, label) in enumerate(zip(ds.images, labels)):
            path = image_path(folder, name, ds.classes[label], i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", type=Path)
    p.add_argument(
        "--cifar", help="the folder holding CIFAR-10 (default: as the tool looks for it)"
    )
    p.add_argument("--preset", default="lean")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_folder(args.folder, args.cifar, args.preset, args.seed)
    print(f"cifar-transfer run --preset {args.preset} --out runs/parity-batches")
    folder_run = f"--data {args.folder} --set image_size=32 --out runs/parity-folder"
    print(f"cifar-transfer run --preset {args.preset} {folder_run}")


if __name__ == "__main__":
    main()

"""Images in: bring any image to a square RGB array the way CIFAR-10 images were made, and read
folders of photos.

CIFAR-10 images are small, roughly centred photos scaled down to 32x32. An input image is therefore:
EXIF-rotated; made RGB (transparency composited onto white, greyscale replicated to three channels);
centre-cropped to a square; and resized to the stored size (32 for CIFAR-10; a folder run's recipe
names its own) with Lanczos resampling, which is antialiased.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CifarTransferError
from .cifar import CLASSES, DataError, Dataset, check_readable_folder

SIZE = 32  # CIFAR-10's
# Decoded pixels: far more than a small classifier needs, and the bound on what one decode can cost
# (a 16-megapixel RGBA image is 64 MB). JPEGs are decoded at a reduced scale (see `open_image`), so
# a larger photo still passes if its reduced decode fits.
MAX_PIXELS = 16_000_000
# JPEG decoding stops at the smallest scale that keeps at least this many times the stored size a
# side
DRAFT = 4
MAX_FILE_BYTES = (
    100_000_000  # an image file larger than this is refused unread (/dev/zero would never end)
)


class ImageError(CifarTransferError, ValueError):
    """The bytes are not an image this tool can read; the message says why."""


def to_square(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """Any PIL image -> size x size x 3 uint8 RGB, as described in the module docstring.

    Cropped and resized before anything else, so no full-size copy is made: Pillow resizes RGBA with
    premultiplied alpha, so compositing onto white afterwards equals compositing first.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        image = white
    # a writable copy (torch warns on read-only arrays)
    return np.array(image.convert("RGB"), dtype=np.uint8)


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Pillow's many exceptions for bad input, as one ImageError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image Pillow can read (PNG, JPEG, WebP, BMP, ...)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except ImageError:
        raise
    except (
        Exception
    ) as e:  # any decoder failure is a bad image: OSError, SyntaxError, AVIF's RuntimeError, ...
        raise ImageError(f"{name}: truncated or corrupt image ({e or type(e).__name__})") from None


def open_image(data: bytes, name: str = "image", size: int = SIZE) -> Image.Image:
    """Read only the header: refuse what is too large to decode, and ask JPEG for a reduced-scale
    decode."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    with _image_errors(name):
        image = Image.open(io.BytesIO(data))
        # JPEG: decode at 1/2, 1/4 or 1/8 scale; others ignore it
        image.draft("RGB", (DRAFT * size, DRAFT * size))
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(
                f"{name}: {image.width}x{image.height} pixels is over the limit of {MAX_PIXELS:,}"
            )
        return image


def eight_bit(image: Image.Image, name: str = "image") -> Image.Image:
    """16-bit greyscale as the 8-bit file of the same picture would hold it (v * 257 -> v); 32-bit
    integer and floating-point images, whose range no file states, are refused by name."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ImageError(
                f"{name}: 32-bit integer pixels ({values.min()}..{values.max()}): save it as 8-bit"
            )
        return Image.fromarray(np.round(values / 257).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ImageError(
            f"{name}: floating-point pixels, whose range the file does not state: save it as 8-bit"
        )
    return image


def decode(image: Image.Image, name: str = "image", size: int = SIZE) -> np.ndarray:
    """Decode an image `open_image` returned and convert it with `to_square`."""
    with _image_errors(name), image:
        image.seek(0)  # an animated GIF or WebP: its first frame
        image.load()
        return to_square(eight_bit(image, name), size)


def read_image(data: bytes, name: str = "image", size: int = SIZE) -> np.ndarray:
    """Image bytes -> size x size x 3 uint8 RGB, safely (Pillow's decompression-bomb limit made
    strict)."""
    return decode(open_image(data, name, size), name, size)


def read_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes, at most `max_bytes`: a FIFO, a device or a folder is refused, never
    waited on."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging; fstat then
        # refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{path}: a symbolic link loop") from None
        raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    # checked before fdopen, which refuses a folder with a bare "Is a directory: 3"
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "not a regular file"
        if stat.S_ISDIR(mode):
            kind = "a folder"
        elif stat.S_ISFIFO(mode):
            kind = "a FIFO"
        raise ImageError(f"{path}: {kind}, not an image file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{path}: over the size limit of {max_bytes:,} bytes")
    return data


def read_image_file(
    path: str | Path, size: int = SIZE, max_bytes: int = MAX_FILE_BYTES
) -> np.ndarray:
    """An image file -> size x size x 3 uint8 RGB; anything that is not a readable image is an
    ImageError naming it."""
    return read_image(read_file(path, max_bytes), str(path), size)


def _class_files(folder: Path, skipped: list[str]) -> list[Path]:
    """Every entry under a class folder that is not a folder, in order; what cannot be walked
    becomes a `skipped` line (an unreadable folder, a symbolic link to a folder, which is not
    followed so a loop cannot trap us)."""
    files = []

    def unreadable(e: OSError) -> None:
        skipped.append(f"{e.filename}: cannot be read ({e.strerror or e}); skipped")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        for d in sorted(dirs):
            if Path(root, d).is_symlink():
                skipped.append(
                    f"{Path(root, d)}: a symbolic link to a folder, not followed; skipped"
                )
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not Path(root, d).is_symlink()
        )
        files += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def read_image_folder(
    folder: Path, classes: tuple[str, ...] = CLASSES, size: int = SIZE
) -> tuple[Dataset, list[str]]:
    """A folder with one subfolder per class of the model (torchvision's ImageFolder layout;
    CIFAR-10's names match in any case), each image prepared as `predict` prepares it.

    Returns the dataset (with each image's file) and one line per thing skipped (a file outside the
    class folders, anything that is not a readable image). A subfolder that is not one of the
    model's classes is an error naming it: its pictures would otherwise be silently left out of the
    accuracy.
    """
    folder = Path(folder)
    check_readable_folder(folder)
    lookup = {c.lower() if classes == CLASSES else c: i for i, c in enumerate(classes)}
    images, labels, paths, skipped = [], [], [], []
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not entry.is_dir():
            skipped.append(f"{entry}: not inside a class folder; skipped")
            continue
        label = lookup.get(entry.name.lower() if classes == CLASSES else entry.name)
        if label is None:
            raise DataError(f"{entry}: not one of the model's classes ({_shown(classes)})")
        for f in _class_files(entry, skipped):
            try:
                images.append(read_image_file(f, size))
            except ImageError as e:
                skipped.append(f"{e}; skipped")
                continue
            labels.append(label)
            paths.append(str(f))
    if not images:
        raise DataError(
            f"{folder}: no readable images in subfolders named after the model's classes "
            f"({_shown(classes)})"
        )
    data = Dataset(
        np.stack(images), np.array(labels, dtype=np.int64), str(folder), classes, tuple(paths)
    )
    return data, skipped


def _shown(classes: tuple[str, ...]) -> str:
    return ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")

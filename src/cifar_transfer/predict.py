"""Use a trained model: bring any image to 32x32 RGB the way CIFAR-10 images were made, and classify it.

CIFAR-10 images are small, roughly centred photos scaled down to 32x32. An input image is therefore:
EXIF-rotated; made RGB (transparency composited onto white, greyscale replicated to three channels);
centre-cropped to a square; and downscaled to 32x32 with Lanczos resampling, which is antialiased.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import CLASSES
from .evaluate import logits_for
from .model import load_model, pick_device, to_device

SIZE = 32
MAX_PIXELS = 40_000_000  # a larger image is refused: a decompression bomb, or no photo worth 32x32


class ImageError(ValueError):
    """The bytes are not an image this tool can read; the message says why."""


def to_cifar(image: Image.Image) -> np.ndarray:
    """Any PIL image -> 32 x 32 x 3 uint8 RGB, as described in the module docstring."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    image = ImageOps.fit(image.convert("RGB"), (SIZE, SIZE), method=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def read_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes safely (Pillow's decompression-bomb limit made strict) and convert with `to_cifar`."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"{name}: {image.width}x{image.height} pixels is over the limit of "
                                     f"{MAX_PIXELS:,}")
                image.load()
                return to_cifar(image)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, WebP, BMP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: truncated or corrupt image ({e})") from None


@dataclass
class Prediction:
    probabilities: dict[str, float]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


class Predictor:
    """A saved run's model, ready to classify batches of 32 x 32 RGB images."""

    def __init__(self, run_dir: Path, device: str = "auto"):
        path = Path(run_dir) / "model.safetensors"
        self.model, self.recipe = load_model(path)
        self.model_id = f"{Path(run_dir).resolve().name}-{_digest(self.model.state_dict())}"
        self.device = pick_device(device)
        self.model = to_device(self.model, self.recipe, self.device)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """N x 32 x 32 x 3 uint8 -> N x 10 class probabilities."""
        return torch.from_numpy(logits_for(self.model, images, self.recipe)).softmax(1).numpy()

    def predict(self, images: np.ndarray) -> list[Prediction]:
        return [Prediction({c: float(p) for c, p in zip(CLASSES, row)}) for row in self.probabilities(images)]


def _digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (safetensors' header order varies between saves of the same model)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def predict_files(run_dir: Path, paths: list[Path], top: int = 3) -> list[dict]:
    """What `cifar-transfer predict` shows: the top classes of each image."""
    predictor = Predictor(run_dir)
    images = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ImageError(f"{p}: cannot be read ({e.strerror})") from None
        images.append(read_image(data, str(p)))
    results = predictor.predict(np.stack(images))
    return [{"image": str(p), "model": predictor.model_id,
             "top": [{"class": c, "probability": round(q, 6)} for c, q in r.top(top)]}
            for p, r in zip(paths, results)]

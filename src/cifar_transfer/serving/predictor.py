"""Use a trained model: a saved run's model classifies batches of RGB images at its stored size (32
x 32 for CIFAR-10), or image files of any size, prepared as its training images were."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis.calibration import softmax
from ..data.images import ImageError, read_image_file
from ..model.adapt import PRIOR, AdaptError, adapted
from ..model.inference import flip_tta, logits_for
from ..model.network import for_inference, load_model, pick_device, place
from ..model.weights import digest


@dataclass
class Prediction:
    probabilities: dict[str, float]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


@dataclass(frozen=True)
class Options:
    """How probabilities are made: calibrated with the model's temperature, and/or averaged with the
    mirror image (flip test-time augmentation)."""

    calibrated: bool = True
    tta: bool = False


class Predictor:
    """A saved run's model, ready to classify batches of RGB images at its stored size.

    It computes in fp32 whatever the recipe trained in, so `predict`, `serve` and the ONNX export
    (fp32) give one answer for one image.
    """

    def __init__(self, run_dir: Path, device: str = "auto"):
        path = Path(run_dir) / "model.safetensors"
        network, trained = load_model(path)
        self.recipe = dataclasses.replace(trained, precision="fp32")
        self.model_id = f"{Path(run_dir).resolve().name}-{digest(network.state_dict())[:12]}"
        self.device = pick_device(device)
        # as saved: BatchNorm there, for `adapt`
        self.network = place(network, self.recipe, self.device)
        self.model = for_inference(network, self.recipe, self.device)
        self.adapted_on: int | None = (
            None  # how many images `adapt` re-estimated BatchNorm statistics on
        )

    def adapt(self, images: np.ndarray, prior: float = PRIOR) -> Predictor:
        """A predictor whose BatchNorm statistics are re-estimated on these unlabelled N x S x S x 3
        uint8 images of a new domain (mapped onto the training images'; model.adapt); this one and
        the saved model are unchanged.

        Its predictions are transductive when they are of the same images.
        """
        if self.network.source_moments is None:
            raise AdaptError(
                f"adapt: {self.model_id} was saved without its training images' BatchNorm moments "
                "(by an older version); `evaluate --adapt` and `robustness --adapt` compute "
                "them from its training data"
            )
        network = adapted(
            self.network,
            check_batch(images, self.model.image_size),
            self.recipe,
            self.network.source_moments,
            prior,
        )
        other = copy.copy(self)
        other.model, other.adapted_on = (
            for_inference(network, self.recipe, self.device),
            len(images),
        )
        return other

    @property
    def temperature(self) -> float | None:
        """The model's own (saved with it); None for a model saved without one."""
        return self.model.temperature

    def logits(self, images: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 -> N x classes logits."""
        return logits_for(self.model, check_batch(images, self.model.image_size), self.recipe)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes

    @staticmethod
    def model_inputs(images: np.ndarray, options: Options) -> np.ndarray:
        """What goes through the model: the images, then (with TTA) their mirror images."""
        return np.concatenate([images, images[:, :, ::-1]]) if options.tta else images

    def combine(self, logits: np.ndarray, options: Options) -> np.ndarray:
        """Logits of `model_inputs(images)` -> N x classes probabilities: softmax(logits / T), with
        TTA the mean of each image's and its mirror's (`flip_tta`)."""
        t = self.temperature if self.calibrated(options) else 1.0
        if options.tta:
            return flip_tta(logits[: len(logits) // 2], logits[len(logits) // 2 :], t).astype(
                np.float32
            )
        return softmax(logits, t).astype(np.float32)

    def calibrated(self, options: Options) -> bool:
        return options.calibrated and self.temperature is not None

    def describe(self, options: Options) -> dict:
        """What every response says about how its probabilities were made."""
        return {
            "model": self.model_id,
            "calibrated": self.calibrated(options),
            "temperature": self.temperature if self.calibrated(options) else None,
            "tta": options.tta,
            # the service never adapts
            **({"adapted_on": self.adapted_on} if self.adapted_on is not None else {}),
        }

    def probabilities(self, images: np.ndarray, options: Options = Options()) -> np.ndarray:
        """N x S x S x 3 uint8 -> N x classes probabilities."""
        return self.combine(self.logits(self.model_inputs(images, options)), options)

    def predict(self, images: np.ndarray, options: Options = Options()) -> list[Prediction]:
        rows = self.probabilities(images, options)
        return [Prediction({c: float(p) for c, p in zip(self.classes, row)}) for row in rows]

    def predict_file(self, path: str | Path, options: Options = Options()) -> Prediction:
        """One image file of any format and size, brought to the stored size as the training images
        were."""
        return self.predict(read_image_file(path, self.model.image_size)[None], options)[0]


def check_batch(images: object, size: int = 32) -> np.ndarray:
    """What the model takes, or one error saying what was given instead: anything else (floats on
    0-255 or 0-1, channels first, one image without its batch axis) would be answered with confident
    nonsense."""
    want = f"N x {size} x {size} x 3"
    if not isinstance(images, np.ndarray):
        raise ImageError(
            f"images: a numpy array {want} of uint8 is needed, got {type(images).__name__}"
        )
    if images.dtype != np.uint8:
        raise ImageError(
            f"images: dtype {images.dtype}; uint8 pixels (0-255) are needed: for floats in [0, 1], "
            "pass (images * 255).round().astype(np.uint8)"
        )
    if images.shape[1:] != (size, size, 3) or images.ndim != 4:
        hint = " (one image: images[None])" if images.shape == (size, size, 3) else ""
        hint = (
            " (channels first: images.transpose(0, 2, 3, 1))"
            if images.shape[1:] == (3, size, size)
            else hint
        )
        raise ImageError(f"images: shape {images.shape}; {want} is needed{hint}")
    if len(images) == 0:
        raise ImageError("images: an empty batch (N = 0)")
    return images


def predict_files(
    run_dir: Path,
    paths: list[Path],
    top: int = 3,
    options: Options = Options(),
    adapt: bool = False,
) -> list[dict]:
    """What `cifar-transfer predict` shows, one entry per path in order: its top classes, or `error`
    saying why the file could not be classified (one bad file does not stop the others).

    `adapt`: first adapt the model to the readable images themselves (Predictor.adapt).
    """
    predictor = Predictor(run_dir)
    images, errors = {}, {}
    for i, p in enumerate(paths):
        try:
            images[i] = read_image_file(p, predictor.model.image_size)
        except ImageError as e:
            errors[i] = str(e)
    results = {}
    if images:
        batch = np.stack(list(images.values()))
        predictor = predictor.adapt(batch) if adapt else predictor
        results = dict(zip(images, predictor.predict(batch, options)))
    return [
        {"image": str(p), "error": errors[i]}
        if i in errors
        else {
            "image": str(p),
            **predictor.describe(options),
            "top": [{"class": c, "probability": round(q, 6)} for c, q in results[i].top(top)],
        }
        for i, p in enumerate(paths)
    ]

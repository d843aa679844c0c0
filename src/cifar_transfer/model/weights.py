"""Pretrained weights in: torchvision's ResNet-50 ImageNet weights (downloaded), a .safetensors file
or a .pth state_dict, checked key by key before use, with the input normalisation and stride layout
they were trained with."""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torchvision.models import ResNet50_Weights, resnet50

from ..errors import CifarTransferError

IMAGENET = "imagenet"


class WeightsError(CifarTransferError):
    """A weights file that cannot be loaded as ResNet-50; the message names the file and the
    problem."""


@dataclass(frozen=True)
class Pretrained:
    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride_in_1x1: bool  # ResNet v1 layout: the stride-2 of a downsampling block is in its 1x1 conv
    source: str

    def identity(self) -> dict:
        """What defines the network these weights make: a resumed run must be given the same."""
        return {
            "weights": IMAGENET if self.source == "torchvision" else self.source,
            "sha256": digest(self.state_dict),
            "stride_in_1x1": self.stride_in_1x1,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves: the same weights give the same digest from any file or
    format."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _floats(text: str, key: str, path: str) -> tuple[float, float, float]:
    """Three per-channel values for inputs in [0, 1]: means in [0, 1], standard deviations in (0,
    1]."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise WeightsError(f"{path}: metadata {key}={text!r} is not three comma-separated numbers")
    low, what = (0.0, "in [0, 1]") if key == "input_mean" else (1e-6, "in (0, 1]")
    if not all(math.isfinite(v) and low <= v <= 1 for v in values):
        raise WeightsError(
            f"{path}: metadata {key}={text!r}: each value must be {what} (inputs are scaled to [0, "
            "1])"
        )
    return values  # type: ignore[return-value]


def load_pretrained(weights: str | Path, url: str | None = None) -> Pretrained:
    """ImageNet weights from torchvision (`imagenet`, downloaded), a .safetensors file or a .pth
    state_dict."""
    default = ResNet50_Weights.IMAGENET1K_V1
    if str(weights) == IMAGENET:
        try:
            sd = torch.hub.load_state_dict_from_url(
                url or default.url, progress=True, check_hash=True, weights_only=True
            )
        except Exception as e:  # network and hash failures come in many types
            raise WeightsError(
                "could not download torchvision's ResNet-50 ImageNet weights from "
                f"{url or default.url} ({type(e).__name__}: {e}); pass --weights FILE "
                "(.safetensors or .pth) or set $CIFAR_TRANSFER_WEIGHTS"
            ) from None
        return Pretrained(
            _checked(sd, str(url or default.url)), *_torchvision_norm(), False, "torchvision"
        )
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path, "safetensors file")
        if meta.get("arch", "resnet50") != "resnet50":
            raise WeightsError(f"{path}: metadata arch={meta['arch']!r}, expected 'resnet50'")
        if meta.get("stride_in_1x1", "false") not in ("true", "false"):
            raise WeightsError(
                f"{path}: metadata stride_in_1x1={meta['stride_in_1x1']!r}, expected 'true' or "
                "'false'"
            )
        mean, std = _torchvision_norm()
        mean = (
            _floats(meta["input_mean"], "input_mean", str(path)) if "input_mean" in meta else mean
        )
        std = _floats(meta["input_std"], "input_std", str(path)) if "input_std" in meta else std
        return Pretrained(
            _checked(sd, str(path)), mean, std, meta.get("stride_in_1x1") == "true", str(path)
        )
    try:
        with warnings.catch_warnings():
            # torch warns about old pickle protocols before refusing them
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # weights_only refuses arbitrary pickles with UnpicklingError; corrupt files vary
        raise WeightsError(
            f"{path}: not a plain state_dict loadable with weights_only=True ({first_line(e)})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(
            f"{path}: expected a state_dict (a dict of tensors), found {type(sd).__name__}"
        )
    return Pretrained(_checked(sd, str(path)), *_torchvision_norm(), False, str(path))


def _torchvision_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std torchvision's ImageNet weights expect: the default for files without
    metadata."""
    t = ResNet50_Weights.IMAGENET1K_V1.transforms()
    return tuple(t.mean), tuple(t.std)


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable {what} ({e})") from None


# torch.load's refusal explains itself around one informative line, and advises loading unsafely:
# never shown
_ADVICE = re.compile(
    r"weights_only|arbitrary code|trusted source|load failed|documentation|PyTorch 2\.6", re.I
)


def first_line(e: Exception) -> str:
    """The informative line of torch.load's long weights_only error, without its advice to load
    unsafely."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [
        s.strip() for line in text.splitlines() for s in re.split(r"(?<=\.) ", line) if s.strip()
    ]
    return next(
        (s for s in lines if not _ADVICE.search(s)), f"refused by torch.load ({type(e).__name__})"
    )


def _checked(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Same keys and shapes as torchvision's resnet50 (fc is dropped), floating-point where it is,
    all values finite and BatchNorm variances non-negative; returned as float32."""
    expected = resnet50().state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            if unexpected
            else "",
        ]
        raise WeightsError(
            f"{where}: not ResNet-50 weights in torchvision's key names: "
            + "; ".join(p for p in parts if p)
        )
    out = {}
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise WeightsError(
                f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
        # counters may be of any dtype
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise WeightsError(
                f"{where}: {k} has dtype {str(v.dtype).removeprefix('torch.')}, expected a "
                "floating-point tensor"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"{where}: {k} holds non-finite values")
        if k.endswith("running_var") and (v < 0).any():
            raise WeightsError(f"{where}: {k} holds negative variances")
        if not k.startswith("fc."):
            out[k] = v.float() if v.is_floating_point() else v
    return out

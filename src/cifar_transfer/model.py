"""The network: torchvision's ResNet-50 with ImageNet weights, a small head, and the input preprocessing.

The model takes float RGB images in [0, 1] at 32 x 32 (N x 3 x 32 x 32). Inside it they are normalised with
the weights' own mean/std and, when the recipe's resolution is above 32, upsampled bilinearly — so the saved
model, `predict`, the service and an ONNX export all share one definition of preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn
from torchvision.models import ResNet, ResNet50_Weights, resnet50

from . import atomic
from .data import CLASSES
from .errors import CifarTransferError
from .recipe import STEPS, Recipe, step_name

FEATURES = 2048
IMAGENET = "imagenet"


class WeightsError(CifarTransferError):
    """A weights file that cannot be loaded as ResNet-50; the message names the file and the problem."""


class DeviceError(CifarTransferError):
    """The device asked for is not there."""


@dataclass(frozen=True)
class Pretrained:
    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride_in_1x1: bool  # ResNet v1 layout: the stride-2 of a downsampling block is in its 1x1 conv
    source: str

    def identity(self) -> dict:
        """What defines the network these weights make: a resumed run must be given the same."""
        return {"weights": IMAGENET if self.source == "torchvision" else self.source,
                "sha256": digest(self.state_dict), "stride_in_1x1": self.stride_in_1x1,
                "mean": list(self.mean), "std": list(self.std)}


def digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves: the same weights give the same digest from any file or format."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TransferNet(nn.Module):
    """Normalise -> (upsample) -> ResNet-50 features -> head (2048 -> hidden... -> 10)."""

    def __init__(self, recipe: Recipe, mean: tuple[float, ...], std: tuple[float, ...], stride_in_1x1: bool):
        super().__init__()
        self.resolution = recipe.resolution
        self.stride_in_1x1 = stride_in_1x1
        # fitted on the validation split after training: probabilities are softmax(logits / temperature)
        self.temperature: float | None = None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.backbone = _resnet50(stride_in_1x1)
        layers: list[nn.Module] = []
        width = FEATURES
        for hidden in recipe.head_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if recipe.dropout:
                layers.append(nn.Dropout(recipe.dropout))
            width = hidden
        layers.append(nn.Linear(width, len(CLASSES)))
        self.head = nn.Sequential(*layers)

    def step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One of STEPS ("stem", "layer3.2", "pool", "head"); "stem" takes images in [0, 1] and normalises and
        upsamples them first."""
        b = self.backbone
        if name == "stem":
            if b.conv1.weight.is_contiguous(memory_format=torch.channels_last):  # convert the small input once,
                x = x.contiguous(memory_format=torch.channels_last)  # not conv1's upsampled one every batch
            x = (x - self.mean) / self.std
            if x.shape[-1] != self.resolution:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
            return b.maxpool(b.relu(b.bn1(b.conv1(x))))
        if name == "pool":
            return torch.flatten(b.avgpool(x), 1)
        return self.head(x) if name == "head" else self.block(name)(x)

    def block(self, name: str) -> nn.Module:
        """The residual block of a "layerN.k" step."""
        stage, k = name.split(".")
        return getattr(self.backbone, stage)[int(k)]

    def run(self, x: torch.Tensor, start: str = "stem", stop: str | None = None) -> torch.Tensor:
        """The steps from `start` up to, not including, `stop` (None: through the head, to the logits); a stage
        name stands for its first block."""
        first = STEPS.index(step_name(start))
        for name in STEPS[first:STEPS.index(step_name(stop)) if stop else None]:
            x = self.step(name, x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, stop="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class Part(nn.Module):
    """The steps of a TransferNet from `start` up to `stop`, as a module (for torch.compile and evaluation)."""

    def __init__(self, model: TransferNet, start: str = "stem", stop: str | None = None):
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run(x, self.start, self.stop)


def _resnet50(stride_in_1x1: bool) -> ResNet:
    net = resnet50()
    net.fc = nn.Identity()
    if stride_in_1x1:
        for layer in (net.layer2, net.layer3, net.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return net


def _floats(text: str, key: str, path: str) -> tuple[float, float, float]:
    """Three per-channel values for inputs in [0, 1]: means in [0, 1], standard deviations in (0, 1]."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise WeightsError(f"{path}: metadata {key}={text!r} is not three comma-separated numbers")
    low, what = (0.0, "in [0, 1]") if key == "input_mean" else (1e-6, "in (0, 1]")
    if not all(math.isfinite(v) and low <= v <= 1 for v in values):
        raise WeightsError(f"{path}: metadata {key}={text!r}: each value must be {what} (inputs are scaled to [0, 1])")
    return values  # type: ignore[return-value]


def load_pretrained(weights: str | Path, url: str | None = None) -> Pretrained:
    """ImageNet weights from torchvision (`imagenet`, downloaded), a .safetensors file or a .pth state_dict."""
    default = ResNet50_Weights.IMAGENET1K_V1
    if str(weights) == IMAGENET:
        try:
            sd = torch.hub.load_state_dict_from_url(url or default.url, progress=True, check_hash=True,
                                                    weights_only=True)
        except Exception as e:  # network and hash failures come in many types
            raise WeightsError(
                f"could not download torchvision's ResNet-50 ImageNet weights from {url or default.url} "
                f"({type(e).__name__}: {e}); pass --weights FILE (.safetensors or .pth) or set "
                f"$CIFAR_TRANSFER_WEIGHTS") from None
        return Pretrained(_checked(sd, str(url or default.url)), *_torchvision_norm(), False, "torchvision")
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path, "safetensors file")
        if meta.get("arch", "resnet50") != "resnet50":
            raise WeightsError(f"{path}: metadata arch={meta['arch']!r}, expected 'resnet50'")
        if meta.get("stride_in_1x1", "false") not in ("true", "false"):
            raise WeightsError(f"{path}: metadata stride_in_1x1={meta['stride_in_1x1']!r}, expected 'true' or 'false'")
        mean, std = _torchvision_norm()
        mean = _floats(meta["input_mean"], "input_mean", str(path)) if "input_mean" in meta else mean
        std = _floats(meta["input_std"], "input_std", str(path)) if "input_std" in meta else std
        return Pretrained(_checked(sd, str(path)), mean, std, meta.get("stride_in_1x1") == "true", str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols before refusing them
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles with UnpicklingError; corrupt files vary
        raise WeightsError(f"{path}: not a plain state_dict loadable with weights_only=True "
                           f"({first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), found {type(sd).__name__}")
    return Pretrained(_checked(sd, str(path)), *_torchvision_norm(), False, str(path))


def _torchvision_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std torchvision's ImageNet weights expect: the default for files without metadata."""
    t = ResNet50_Weights.IMAGENET1K_V1.transforms()
    return tuple(t.mean), tuple(t.std)


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable {what} ({e})") from None


def first_line(e: Exception) -> str:
    """The informative line of torch.load's long weights_only error (never its advice to load unsafely)."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def _checked(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Same keys and shapes as torchvision's resnet50 (fc is dropped), floating-point where it is, all values
    finite and BatchNorm variances non-negative; returned as float32."""
    expected = resnet50().state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else ""]
        raise WeightsError(f"{where}: not ResNet-50 weights in torchvision's key names: "
                           + "; ".join(p for p in parts if p))
    out = {}
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise WeightsError(f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if expected[k].is_floating_point() and not v.is_floating_point():  # counters may be of any dtype
            raise WeightsError(f"{where}: {k} has dtype {str(v.dtype).removeprefix('torch.')}, expected a "
                               "floating-point tensor")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"{where}: {k} holds non-finite values")
        if k.endswith("running_var") and (v < 0).any():
            raise WeightsError(f"{where}: {k} holds negative variances")
        if not k.startswith("fc."):
            out[k] = v.float() if v.is_floating_point() else v
    return out


def build_model(recipe: Recipe, pretrained: Pretrained) -> TransferNet:
    """A TransferNet with the pretrained base and a freshly initialised head (seeded by the caller)."""
    model = TransferNet(recipe, pretrained.mean, pretrained.std, pretrained.stride_in_1x1)
    model.backbone.load_state_dict(pretrained.state_dict, strict=True)
    return model


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def channels_last(recipe: Recipe, device: torch.device) -> bool:
    """The recipe's memory layout on `device`: "auto" is channels_last on CUDA only."""
    return recipe.memory_format == "channels_last" or (recipe.memory_format == "auto" and device.type == "cuda")


def to_device(model: TransferNet, recipe: Recipe, device: torch.device) -> TransferNet:
    """Move to `device` in the recipe's memory layout (channels_last on CUDA unless the recipe says otherwise)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(recipe, device) else model


def save_model(model: TransferNet, recipe: Recipe, path: Path) -> Path:
    """model.safetensors: every tensor, plus the recipe, classes and preprocessing needed to rebuild it."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "cifar-transfer/1",
        "recipe": recipe.dumps(),
        "classes": json.dumps(CLASSES),
        "stride_in_1x1": json.dumps(model.stride_in_1x1),
        "temperature": json.dumps(model.temperature),
        "input": "float32 RGB in [0, 1], N x 3 x 32 x 32; normalised (mean/std buffers) and resized inside",
    }
    return atomic.write_bytes(path, save(sd, metadata=meta))


def load_model(path: Path) -> tuple[TransferNet, Recipe]:
    """Rebuild a model saved by `save_model` (no pretrained weights needed)."""
    sd, meta = _read_safetensors(path, "model file")
    if meta.get("format") != "cifar-transfer/1":
        raise WeightsError(f"{path}: not a model saved by cifar-transfer (metadata format={meta.get('format')!r})")
    recipe = Recipe.from_dict(json.loads(meta["recipe"]))
    model = TransferNet(recipe, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), json.loads(meta["stride_in_1x1"]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not match the recipe's model ({e})") from None
    model.temperature = _temperature(meta.get("temperature", "null"), path)  # older models have none
    return model.eval(), recipe


def _temperature(text: str, path: Path) -> float | None:
    try:
        t = json.loads(text)
    except ValueError:
        t = text
    if t is not None and not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
        raise WeightsError(f"{path}: metadata temperature={text!r} is not a positive number")
    return t


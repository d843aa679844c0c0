"""The network: torchvision's ResNet-50 with ImageNet weights, a small head, and the input
preprocessing.

The model takes float RGB images in [0, 1] at its stored size (N x 3 x S x S; S = 32 for CIFAR-10).
Inside it they are normalised with the weights' own mean/std and resized bilinearly to the recipe's
resolution — so the saved model, `predict`, the service and an ONNX export all share one definition
of preprocessing. The model knows its class names and stored size, and they travel in
model.safetensors' metadata.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet, resnet50

from .. import atomic
from ..data.cifar import CLASSES
from ..data.folder import MAX_CLASSES
from ..errors import CifarTransferError
from ..recipe import STEPS, Recipe, finite_number, step_name
from .weights import Pretrained, WeightsError, read_safetensors

FEATURES = 2048
MOMENTS = "source_moments."  # the prefix of the training images' moments in model.safetensors


class DeviceError(CifarTransferError):
    """The device asked for is not there."""


class TransferNet(nn.Module):
    """Normalise -> (resize) -> ResNet-50 features -> head (2048 -> hidden...

    -> one logit per class).
    """

    def __init__(
        self,
        recipe: Recipe,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        stride_in_1x1: bool,
        classes: tuple[str, ...] = CLASSES,
        image_size: int = 32,
    ):
        super().__init__()
        self.resolution = recipe.resolution
        self.classes, self.image_size = tuple(classes), image_size
        self.stride_in_1x1 = stride_in_1x1
        # fitted on the validation split after training: probabilities are softmax(logits /
        # temperature)
        self.temperature: float | None = None
        # the shipped epoch's validation logits, kept by training so calibration needs no second
        # pass
        self.val_logits: torch.Tensor | None = None
        # each BatchNorm's input moments on the training images, for test-time adaptation
        # (model.adapt)
        self.source_moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
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
        layers.append(nn.Linear(width, len(self.classes)))
        self.head = nn.Sequential(*layers)

    def step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One of STEPS ("stem", "layer3.2", "pool", "head"); "stem" takes images in [0, 1] and
        normalises and upsamples them first."""
        b = self.backbone
        if name == "stem":
            # convert the small input once,
            if b.conv1.weight.is_contiguous(memory_format=torch.channels_last):
                # not conv1's upsampled one every batch
                x = x.contiguous(memory_format=torch.channels_last)
            x = (x - self.mean) / self.std
            if x.shape[-1] != self.resolution:
                x = F.interpolate(
                    x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
                )
            return b.maxpool(b.relu(b.bn1(b.conv1(x))))
        if name == "pool":
            return torch.flatten(b.avgpool(x), 1)
        return self.head(x) if name == "head" else self.block(name)(x)

    def block(self, name: str) -> nn.Module:
        """The residual block of a "layerN.k" step."""
        stage, k = name.split(".")
        return getattr(self.backbone, stage)[int(k)]

    def run(self, x: torch.Tensor, start: str = "stem", stop: str | None = None) -> torch.Tensor:
        """The steps from `start` up to, not including, `stop` (None: through the head, to the
        logits); a stage name stands for its first block."""
        if x.dtype == torch.bfloat16 and not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # activations cached in bf16, computed on in fp32
        first = STEPS.index(step_name(start))
        for name in STEPS[first : STEPS.index(step_name(stop)) if stop else None]:
            x = self.step(name, x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, stop="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class Part(nn.Module):
    """The steps of a TransferNet from `start` up to `stop`, as a module (for torch.compile and
    evaluation)."""

    def __init__(self, model: TransferNet, start: str = "stem", stop: str | None = None):
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run(x, self.start, self.stop)


def folded(model: TransferNet) -> TransferNet:
    """A copy for inference, each BatchNorm folded into the convolution before it: the same function
    up to rounding, one pass over each layer's output instead of two.

    For steps whose BatchNorm is in inference mode:
    the frozen ones.
    """
    channels_last = model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).eval()
    b = model.backbone
    b.conv1, b.bn1 = fuse_conv_bn_eval(b.conv1, b.bn1), nn.Identity()
    for block in (*b.layer1, *b.layer2, *b.layer3, *b.layer4):
        for i in (1, 2, 3):
            conv, norm = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
            setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, norm))
            setattr(block, f"bn{i}", nn.Identity())
        if block.downsample is not None:
            block.downsample = fuse_conv_bn_eval(*block.downsample)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _resnet50(stride_in_1x1: bool) -> ResNet:
    net = resnet50()
    net.fc = nn.Identity()
    if stride_in_1x1:
        for layer in (net.layer2, net.layer3, net.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return net


def build_model(
    recipe: Recipe, pretrained: Pretrained, classes: tuple[str, ...] = CLASSES, image_size: int = 32
) -> TransferNet:
    """A TransferNet with the pretrained base and a freshly initialised head (seeded by the caller)
    for `classes`, taking images stored at `image_size`."""
    model = TransferNet(
        recipe, pretrained.mean, pretrained.std, pretrained.stride_in_1x1, classes, image_size
    )
    model.backbone.load_state_dict(pretrained.state_dict, strict=True)
    return model


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: this tool runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available")
    return device


def channels_last(recipe: Recipe, device: torch.device) -> bool:
    """The recipe's memory layout on `device`: "auto" is channels_last on CUDA only."""
    return recipe.memory_format == "channels_last" or (
        recipe.memory_format == "auto" and device.type == "cuda"
    )


def place(model: TransferNet, recipe: Recipe, device: torch.device) -> TransferNet:
    """Move to `device` in the recipe's memory layout (channels_last on CUDA unless the recipe says
    otherwise)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(recipe, device) else model


def for_inference(model: TransferNet, recipe: Recipe, device: torch.device) -> TransferNet:
    """What evaluation, analysis and serving run: placed on `device`, every BatchNorm folded
    (`folded`)."""
    return folded(place(model, recipe, device))


def save_model(model: TransferNet, recipe: Recipe, path: Path) -> Path:
    """model.safetensors: every tensor, plus the recipe, classes and preprocessing needed to rebuild
    it."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, (mean, var) in (model.source_moments or {}).items():
        sd[f"{MOMENTS}{name}.mean"], sd[f"{MOMENTS}{name}.var"] = (
            mean.cpu().contiguous(),
            var.cpu().contiguous(),
        )
    meta = {
        "format": "cifar-transfer/1",
        "recipe": recipe.dumps(),
        "classes": json.dumps(model.classes),
        "image_size": json.dumps(model.image_size),
        "stride_in_1x1": json.dumps(model.stride_in_1x1),
        "temperature": json.dumps(model.temperature),
        "input": f"float32 RGB in [0, 1], N x 3 x {model.image_size} x {model.image_size} "
        "(centre-cropped to a square and resized with Lanczos); normalised (mean/std buffers) and "
        "resized to the recipe's resolution inside",
    }
    return atomic.write_bytes(path, save(sd, metadata=meta))


def load_model(path: Path) -> tuple[TransferNet, Recipe]:
    """Rebuild a model saved by `save_model` (no pretrained weights needed)."""
    sd, meta = read_safetensors(path, "model file")
    if meta.get("format") != "cifar-transfer/1":
        raise WeightsError(
            f"{path}: not a model saved by cifar-transfer (metadata format={meta.get('format')!r})"
        )
    recipe = Recipe.from_dict(_metadata_json(meta, "recipe", dict, path))
    classes, image_size = _classes_and_size(meta, path)
    stride_in_1x1 = _metadata_json(meta, "stride_in_1x1", bool, path)
    model = TransferNet(
        recipe, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), stride_in_1x1, classes, image_size
    )
    model.source_moments = _moments(
        {k: sd.pop(k) for k in [k for k in sd if k.startswith(MOMENTS)]}, path
    )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not match the recipe's model ({e})") from None
    # older models have none
    model.temperature = _temperature(meta.get("temperature", "null"), path)
    return model.eval(), recipe


def _moments(
    tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The training images' BatchNorm input moments saved with the model (None: saved before they
    were kept)."""
    names = {k.removeprefix(MOMENTS).rsplit(".", 1)[0] for k in tensors}
    try:
        moments = {
            n: (tensors.pop(f"{MOMENTS}{n}.mean").float(), tensors.pop(f"{MOMENTS}{n}.var").float())
            for n in names
        }
    except KeyError as e:
        raise WeightsError(
            f"{path}: {e.args[0]} is missing (each layer's moments are a mean and a var)"
        ) from None
    if tensors:
        raise WeightsError(f"{path}: unexpected tensors {', '.join(sorted(tensors))}")
    return moments or None


def _classes_and_size(meta: dict[str, str], path: Path) -> tuple[tuple[str, ...], int]:
    """The class names and stored image size a model was trained with (models saved before they were
    kept:

    CIFAR-10's).
    """
    classes = _metadata_json(meta, "classes", list, path) if "classes" in meta else list(CLASSES)
    if not 2 <= len(classes) <= MAX_CLASSES or not all(isinstance(c, str) and c for c in classes):
        raise WeightsError(f"{path}: metadata 'classes' must be 2 to {MAX_CLASSES:,} names")
    size = _metadata_json(meta, "image_size", int, path) if "image_size" in meta else 32
    if not 8 <= size <= 1024:
        raise WeightsError(f"{path}: metadata image_size={size}: must be in [8, 1024]")
    return tuple(classes), size


def _metadata_json(meta: dict[str, str], key: str, kind: type, path: Path) -> object:
    """A metadata entry that must hold JSON of one type; a missing or tampered one is named."""
    if key not in meta:
        raise WeightsError(f"{path}: metadata has no {key!r} (not a complete cifar-transfer model)")
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise WeightsError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise WeightsError(
            f"{path}: metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _temperature(text: str, path: Path) -> float | None:
    try:
        t = json.loads(text)
    except ValueError:
        t = text
    if t is not None and not (finite_number(t) and t > 0):
        raise WeightsError(f"{path}: metadata temperature={text!r} is not a positive number")
    return t

"""The recipe: every choice that defines a run, as one typed dataclass, and the presets as data."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CifarTransferError

# ResNet-50's forward pass as named steps, block by block (its stages have 3, 4, 6 and 3 blocks).
# Training can start at any of them, taking the activations of the frozen steps before it as input;
# "pool" gives the 2048 base features, "head" the logits.
BLOCKS = (3, 4, 6, 3)
STEPS = (
    "stem",
    *(f"layer{i}.{k}" for i, n in enumerate(BLOCKS, 1) for k in range(n)),
    "pool",
    "head",
)
FINETUNE_FROM = {"stem", *(f"layer{i}" for i in range(1, 5)), *STEPS[1:-2]}


def step_name(where: str) -> str:
    """A stage name stands for its first block: "layer3" -> "layer3.0"."""
    return f"{where}.0" if where in ("layer1", "layer2", "layer3", "layer4") else where


MAX_WIDTH = 65_536  # a head layer wider than this is a typo (2048 x 1e9 weights would ask for 8 TB)
MAX_LAYERS = 16


class RecipeError(CifarTransferError, ValueError):
    """A recipe field has a value it cannot take."""


@dataclass(frozen=True)
class Recipe:
    """Two-phase transfer learning: phase 1 trains the head on a frozen base, phase 2 fine-tunes
    all."""

    name: str = "seed"
    seed: int = 0
    # data
    train_size: int = 10_000
    val_size: int = 5_000
    # a folder of the user's own pictures (run --data): each picture is stored as an image_size
    # square, and a class folder without val/ or test/ gives these shares of its pictures to
    # validation and test (seeded)
    image_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # a validation or test picture that copies one in an earlier set (data.duplicates) is listed in
    # the report; "drop-exact" also removes exact copies from their later set, "drop-near"
    # near-copies as well
    duplicates: Literal["keep", "drop-exact", "drop-near"] = "keep"
    # a folder with fewer training pictures than this has its epochs multiplied (rounded) so it
    # takes about the optimiser steps the preset was tuned with (0: as many epochs as named);
    # CIFAR-10 runs are not scaled
    epoch_images: int = 0
    resolution: int = 32
    # "flip": horizontal flips only, which frozen-stage caching can serve (it caches each image and
    # its mirror); "crop+flip": random crops (reflect-padded by 4) as well, computed afresh every
    # step "flip+noise": also a copy of each image under CIFAR-10-C-strength Gaussian noise or low
    # contrast (cached once beside the image and its mirror; each step draws one of the three)
    # "flip+augmix": flips, and a third of each batch replaced by a fresh AugMix of its images
    # (cached stages run on those each step)
    augment: Literal["none", "flip", "crop+flip", "flip+noise", "flip+augmix"] = "none"
    # with flip+augmix: the weight of AugMix's Jensen-Shannon consistency loss (the paper's is 12;
    # 0: none). The AugMix third of each phase-2 batch then adds two mixes of each of its images
    # beside the clean view, and the loss pulls the three predictions together
    consistency: float = 0.0
    # model
    head_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    # both phases
    batch_size: int = 32
    label_smoothing: float = 0.0
    # "auto": bf16 autocast where the device computes bf16 in hardware (a CUDA GPU that has it, a
    # CPU with AMX or AVX-512 BF16), fp32 elsewhere, where bf16 is emulated and slower than fp32
    # (docs/performance.md)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # "auto": NHWC on GPUs, where it is faster; on CPUs it was slower in the seed loop
    # (docs/performance.md)
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = (
        "off"  # reduce-overhead: CUDA graphs
    )
    # phase 1: frozen base, BatchNorm in inference mode
    head_epochs: int = 10
    head_optimizer: Literal["adam", "sgd"] = "adam"
    head_lr: float = 1e-3
    # phase 2: everything trains
    finetune_epochs: int = 10
    finetune_optimizer: Literal["adam", "sgd"] = "adam"
    finetune_lr: float = 1e-5
    finetune_bn: Literal["frozen", "train"] = "frozen"
    # with several processes (torchrun) and finetune_bn=train: BatchNorm statistics of the global
    # batch (SyncBatchNorm, CUDA only; CPU processes joined by gloo keep their own batch's
    # statistics)
    sync_bn: bool = True
    # where phase 2's training starts: "stem" (everything), a stage ("layer4") or a block
    # ("layer3.3"); the steps before it stay frozen (BatchNorm in inference mode), so their
    # activations are computed once and reused
    finetune_from: str = "stem"
    # compute the frozen steps' activations once and train on them (false: run them every step, as a
    # plain loop does: for measuring what caching gains, or for random crops with a partial
    # fine-tune)
    cache: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 0.0
    eval_batch_size: int = 500
    # which epoch's weights the run ships: the last, or the one with the best validation accuracy
    keep: Literal["last", "best_val"] = "last"
    # error analysis after training (calibration, flip TTA, CIFAR-10H, Grad-CAM, corruptions)
    analysis: bool = True
    gradcam_images: int = (
        200  # errors and as many correct predictions, for the centre-vs-border test
    )
    corruption_images: int = 1000  # class-balanced test images per corruption and severity
    tta_images: int = (
        10_000  # class-balanced test images for the flip-TTA measurement (10,000: all of them)
    )

    def __post_init__(self) -> None:
        # recipes saved when `augment` was a bool (crops and flips, or none); 1 == True, so the type
        # is checked
        if type(self.augment) in (bool, str) and self.augment in LEGACY_AUGMENT:
            object.__setattr__(self, "augment", LEGACY_AUGMENT[self.augment])
        hints = typing.get_type_hints(Recipe)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if not NAME.fullmatch(self.name):
            raise RecipeError(
                f"recipe field name={shown(self.name)}: must be 1 to 100 characters with no '/', "
                "'\\' or control characters and no leading '.' (it names "
                "the run folder under runs/)"
            )
        ranges = {  # field: (lowest, highest), both allowed; None: unbounded
            "seed": (0, 2**32 - 1),
            "train_size": (10, 50_000),
            "val_size": (0, 50_000),
            "resolution": (32, 1024),
            "image_size": (8, 1024),
            "epoch_images": (0, 1_000_000),
            # sizes that set memory or time are bounded, so a typo is refused here, not after
            # loading data
            "batch_size": (1, 65_536),
            "eval_batch_size": (1, 65_536),
            "head_epochs": (0, 10_000),
            "finetune_epochs": (0, 10_000),
            "momentum": (0, 0.999),
            # a weight too large for float32 passes here and fails later as a non-finite loss: bound
            # them
            "weight_decay": (0, 1),
            "consistency": (0, 1000),
            "warmup_epochs": (0, self.finetune_epochs),
            "tta_images": (1, 10_000),
            "corruption_images": (1, 10_000),
            "gradcam_images": (1, 10_000),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                why = " (finetune_epochs)" if name == "warmup_epochs" else ""
                raise RecipeError(f"recipe field {name}={shown(value)}: must be {bounds}{why}")
        for name in ("head_lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"recipe field {name}={shown(getattr(self, name))}: must be > 0")
        if (
            any(h < 1 or h > MAX_WIDTH for h in self.head_hidden)
            or len(self.head_hidden) > MAX_LAYERS
        ):
            raise RecipeError(
                f"recipe field head_hidden={self.head_hidden!r}: at most {MAX_LAYERS} layers, each "
                f"1 to {MAX_WIDTH:,} wide"
            )
        if self.train_size % 10 or self.val_size % 10:
            raise RecipeError(
                "recipe fields train_size and val_size must be multiples of 10 (class-balanced)"
            )
        if self.train_size + self.val_size > 50_000:
            total = self.train_size + self.val_size
            raise RecipeError(
                f"train_size + val_size = {total}: CIFAR-10 has 50,000 training images"
            )
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 0.9:
                raise RecipeError(
                    f"recipe field {name}={shown(getattr(self, name))}: must be in [0, 0.9)"
                )
        if self.val_fraction + self.test_fraction >= 0.9:
            raise RecipeError(
                "recipe fields val_fraction + test_fraction must be below 0.9: training needs the "
                "rest"
            )
        for name in ("dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise RecipeError(
                    f"recipe field {name}={shown(getattr(self, name))}: must be in [0, 1)"
                )
        if self.finetune_from not in FINETUNE_FROM:
            raise RecipeError(
                f"recipe field finetune_from={self.finetune_from!r}: must be stem, a stage "
                f"(layer1..layer4) or a block (layer1.0 .. layer4.{BLOCKS[-1] - 1})"
            )
        if self.cache and self.finetune_from != "stem" and self.augment == "crop+flip":
            raise RecipeError(
                f"recipe fields finetune_from={self.finetune_from!r} and augment='crop+flip': "
                "activations of frozen stages are cached once, so random crops cannot be drawn "
                "every step; use augment=flip (or none), or cache=false"
            )
        if self.consistency and not (
            self.augment == "flip+augmix" and self.cache and self.finetune_from != "stem"
        ):
            raise RecipeError(
                f"recipe field consistency={self.consistency!r}: AugMix's consistency loss "
                "compares the cached clean view of an image with fresh mixes of it, so it needs "
                "augment='flip+augmix', cache=true and finetune_from past the stem"
            )
        if self.keep == "best_val" and self.val_size == 0:
            raise RecipeError(
                "recipe field keep='best_val' needs a validation split (val_size > 0)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(known)
        if unknown:
            raise RecipeError(
                f"unknown recipe fields: {', '.join(sorted(unknown))} (known: {', '.join(known)})"
            )
        d = dict(d)
        # JSON has lists, the dataclass a tuple; anything else is refused
        if isinstance(d.get("head_hidden"), list):
            d["head_hidden"] = tuple(d["head_hidden"])
        return cls(**d)

    def replace(self, **fields: object) -> Recipe:
        """A copy with `fields` changed, e.g. `preset("lean").replace(finetune_epochs=3)`: an
        unknown name or a value of the wrong type is refused, naming the field, as `--set` refuses
        it."""
        return Recipe.from_dict(self.to_dict() | fields)

    def with_overrides(self, assignments: list[str]) -> Recipe:
        """Apply `key=value` strings (from `--set`), parsing each value by the field's type."""
        hints = typing.get_type_hints(Recipe)
        changes = {}
        for a in assignments:
            key, sep, value = a.partition("=")
            key = key.strip()
            if not sep or key not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(self))
                raise RecipeError(f"--set {a!r}: expected key=value with key one of: {known}")
            changes[key] = _parse(key, value.strip(), hints[key])
        return dataclasses.replace(self, **changes)

    def with_file(self, path: str | Path) -> Recipe:
        """Apply the fields of a recipe file: JSON (the recipe.json every run writes) or TOML,
        any subset of the fields. Unknown fields and wrong values are refused, naming the file
        and the field."""
        path = Path(path)
        fields = read_table(path, RecipeError)
        if not isinstance(fields, dict):
            raise RecipeError(
                f"{path}: expected a table of recipe fields, found {type(fields).__name__}"
            )
        try:
            return Recipe.from_dict(self.to_dict() | fields)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_table(path: Path, error: type[Exception]) -> object:
    """A TOML file (by its .toml suffix) or JSON, parsed; `error` names the file and what is wrong
    with it."""
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise error(
            f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})"
        ) from None
    except RecursionError:  # e.g. a JSON list nested 100,000 deep
        raise error(f"{path}: nested too deeply to be a recipe") from None
    except (
        ValueError
    ) as e:  # e.g. a number of more than 4,300 digits, which Python will not convert
        raise error(f"{path}: not a readable recipe ({str(e).split(':')[0]})") from None


LEGACY_AUGMENT = {True: "crop+flip", False: "none", "true": "crop+flip", "false": "none"}


NAME = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,99}")


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, cut short (a 5,000-digit number is not
    printed whole)."""
    if isinstance(value, int) and value.bit_length() > 332:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)):,} digits>"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _check_type(name: str, value: object, kind: object) -> None:
    """A field's value has its declared type; numbers are finite (JSON recipe files can hold
    anything)."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        ok, want = value in typing.get_args(kind), f"one of {typing.get_args(kind)}"
    elif origin is tuple:
        ok = isinstance(value, tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        want = "a list of integers"
    elif kind is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok, want = finite_number(value), "a finite number"
    else:
        # type: ignore[arg-type]
        ok, want = isinstance(value, kind), getattr(kind, "__name__", str(kind))
    if not ok:
        raise RecipeError(f"recipe field {name}={shown(value)}: must be {want}")


def finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite: the one check of numbers read from files,
    metadata and search spaces."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _parse(key: str, value: str, kind: object) -> object:
    origin = typing.get_origin(kind)
    try:
        if origin is Literal:
            return value
        if origin is tuple:
            return tuple(int(v) for v in value.split(",") if v.strip())
        if origin in (typing.Union, types.UnionType):
            return None if value.lower() == "none" else _parse(key, value, typing.get_args(kind)[0])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        return kind(value)  # type: ignore[operator]
    except ValueError:
        raise RecipeError(
            f"--set {key}={shown(value)}: not a valid {getattr(kind, '__name__', kind)}"
        ) from None


# The fine-tune that reaches the claim, shared by `strong` and `lean`: SGD nesterov with a
# half-epoch warm-up and cosine decay, light weight decay, bf16 autocast where the hardware has it,
# and the best validation epoch shipped.
SGD_FINETUNE = {
    "finetune_optimizer": "sgd",
    "finetune_lr": 0.01,
    "nesterov": True,
    "weight_decay": 5e-5,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "precision": "auto",
    "keep": "best_val",
}

STRONG = {
    "resolution": 224,
    "augment": "crop+flip",
    "label_smoothing": 0.1,
    "batch_size": 128,
    "head_epochs": 1,
    "finetune_epochs": 20,
    **SGD_FINETUNE,
    "finetune_bn": "train",
    "eval_batch_size": 256,
}

# Presets are data: each is a set of field values applied to the defaults (which are the seed's).
PRESETS: dict[str, dict] = {
    # The literal recipe of the original report: 32 px, no augmentation, Adam 1e-3 then Adam 1e-5,
    # BN frozen.
    "seed": {},
    # Upsampled input, augmentation, label smoothing and an SGD fine-tune: what it takes to reach
    # the claim.
    "strong": STRONG,
    # The workload for many GPUs: all 50,000 training images but a class-balanced 5,000 for
    # validation, `strong` otherwise.
    "full": {**STRONG, "train_size": 45_000, "val_size": 5_000},
    # The claim on a 2-core CPU: 128 px, the stem to layer3.2 frozen and run once (over each image,
    # its mirror and a copy under CIFAR-10-C-strength noise or low contrast), then layer3.3-layer4
    # and the head fine-tuned on those activations with SGD and label smoothing. The shifted copy
    # buys robustness under CIFAR-10-C at no cost in clean accuracy (docs/robustness.md has the
    # measurement)
    "lean": {
        "resolution": 128,
        "augment": "flip+noise",
        "label_smoothing": 0.1,
        "batch_size": 64,
        "head_epochs": 3,
        "finetune_epochs": 5,
        "finetune_from": "layer3.3",
        **SGD_FINETUNE,
        # a smaller folder of pictures gets as many optimiser steps as CIFAR-10's subsample
        "epoch_images": 10_000,
        "memory_format": "channels_last",
        "eval_batch_size": 32,
        # the error analysis is sampled so that it stays a small share of the run at 128 px
        # (CIFAR-10-C: 15 corruptions x 5 severities x corruption_images; docs/results.md has its
        # time)
        "tta_images": 1000,
        "corruption_images": 150,
        "gradcam_images": 100,
    },
    # A tiny run through every step, about a minute on 2 CPU cores.
    "smoke": {
        "train_size": 500,
        "val_size": 500,
        "head_epochs": 1,
        "finetune_epochs": 1,
        "gradcam_images": 32,
        "corruption_images": 50,
        "tta_images": 1000,
    },
}


# `--preset auto`: the preset that reaches the original claim on the device at hand.
AUTO = {"cuda": "strong", "cpu": "lean"}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise RecipeError(f"unknown preset {name!r}: choose one of {', '.join([*PRESETS, 'auto'])}")
    return Recipe(name=name, **PRESETS[name])


def compose(
    preset_name: str, recipe_file: str | Path | None = None, overrides: list[str] = ()
) -> Recipe:
    """The recipe a command runs, in this order, each step overriding the one before: the preset's
    fields, then the recipe file's, then the `--set KEY=VALUE` assignments."""
    recipe = preset(preset_name)
    if recipe_file is not None:
        recipe = recipe.with_file(recipe_file)
    return recipe.with_overrides(list(overrides))

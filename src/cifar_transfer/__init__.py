"""Fine-tune an ImageNet ResNet-50 on CIFAR-10 in two phases and explain its mistakes.

    import cifar_transfer as ct
    run = ct.run("smoke")   # or "lean", "strong", a ct.Recipe; see cifar_transfer.api

Names are imported when first used, so `import cifar_transfer` loads neither torch nor the stages.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "eda": "api",
    "run": "api",
    "load": "api",
    "evaluate": "api",
    "analyze": "api",
    "audit": "api",
    "repeat": "api",
    "robustness": "api",
    "compare": "api",
    "lr_find": "api",
    "tune": "api",
    "export": "api",
    "choose_recipe": "api",
    "Run": "api",
    "Recipe": "recipe",
    "preset": "recipe",
    "PRESETS": "recipe",
    "Predictor": "serving.predictor",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> object:
    if name not in _NAMES:
        raise AttributeError(f"module 'cifar_transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)

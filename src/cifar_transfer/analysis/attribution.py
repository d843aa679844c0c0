"""Where the model looks: Grad-CAM (the `grad-cam` package) and the share of attribution in the
image centre.

At 32 px the last ResNet stage is 1 x 1, where Grad-CAM says nothing about position, so the target
layer is the deepest stage whose output is at least 4 x 4 at the recipe's resolution (layer2 at 32
px, layer4 at 224).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.augment import to_input, to_nchw
from ..model.network import TransferNet

MIN_SIDE = 4
CENTRE = slice(8, 24)  # the central 16 x 16 of a 32 x 32 image: a quarter of its area


def target_layer(model: TransferNet) -> tuple[str, torch.nn.Module]:
    """The deepest of layer1..layer4 whose output is at least MIN_SIDE x MIN_SIDE for this model's
    input."""
    sides: dict[str, int] = {}
    last = {
        name: getattr(model.backbone, name)[-1] for name in ("layer1", "layer2", "layer3", "layer4")
    }
    # a stage's output is its last block's
    hooks = [
        block.register_forward_hook(lambda m, i, o, name=name: sides.__setitem__(name, o.shape[-1]))
        for name, block in last.items()
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=model.mean.device))
    for h in hooks:
        h.remove()
    name = [n for n, side in sides.items() if side >= MIN_SIDE][-1]
    return name, last[name]


def grad_cam(
    model: TransferNet, images: np.ndarray, classes: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """N x 32 x 32 Grad-CAM maps in [0, 1] for uint8 images (N x 32 x 32 x 3), explaining
    `classes`."""
    from pytorch_grad_cam import GradCAM  # the analysis extra: imported only when used
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, layer = target_layer(model)
    device = model.mean.device
    maps = []
    with GradCAM(model=model.eval(), target_layers=[layer]) as cam:
        for i in range(0, len(images), batch_size):
            x = to_input(to_nchw(images[i : i + batch_size], device))
            # so activations carry gradients even when the base is frozen (phase 1 only)
            x.requires_grad_(True)
            maps.append(
                cam(
                    input_tensor=x,
                    targets=[ClassifierOutputTarget(int(c)) for c in classes[i : i + batch_size]],
                )
            )
    return np.concatenate(maps) if maps else np.zeros((0, 32, 32))


def centre_share(maps: np.ndarray) -> np.ndarray:
    """Per map, the share of attribution inside the central quarter (0.25 for a uniform map)."""
    total = maps.sum((1, 2))
    centre = maps[:, CENTRE, CENTRE].sum((1, 2))
    return np.where(total > 0, centre / np.maximum(total, 1e-12), 0.25)


def overlays(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Heat maps over the images, as uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return (
        np.stack(
            [
                show_cam_on_image(im.astype(np.float32) / 255, m, use_rgb=True)
                for im, m in zip(images, maps)
            ]
        )
        if len(images)
        else images
    )

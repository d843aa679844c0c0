"""ONNX export of a trained model, checked against PyTorch with ONNX Runtime before it is
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .. import atomic
from ..errors import CifarTransferError
from ..model.network import load_model

TOLERANCE = 1e-4
PREPROCESSING = (
    "input 'image': float32 RGB in [0, 1], N x 3 x {size} x {size} (centre-crop to square, "
    "Lanczos resize to {size}x{size}); normalisation and any resizing happen inside the graph; "
    "outputs 'logits': N x {classes}, and 'probabilities': N x {classes}, "
    "softmax(logits / temperature)"
)


class ExportError(CifarTransferError):
    """ONNX Runtime does not reproduce the PyTorch model: nothing is written."""


class WithProbabilities(nn.Module):
    """The model, with the probabilities `predict` and `serve` return as a second output."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, (logits / self.temperature).softmax(1)


def export_onnx(run_dir: Path, out: Path, calibrated: bool = True, opset: int = 18) -> float:
    """Write `out` and return the largest |ONNX - PyTorch| difference (logits and probabilities)
    on a check batch.

    The probabilities use the model's temperature unless `calibrated` is false (or the model has
    none)."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: a folder; --onnx takes a file name, e.g. {out / 'model.onnx'}")
    atomic.check_writable(out.parent)  # before the export's minute of work, not after
    model, recipe = load_model(Path(run_dir) / "model.safetensors")
    temperature = model.temperature if calibrated and model.temperature is not None else None
    net = WithProbabilities(model, temperature or 1.0).eval()
    size = model.image_size
    example = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(
        net,
        (example,),
        input_names=["image"],
        output_names=["logits", "probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    meta = {
        "classes": json.dumps(model.classes),
        "image_size": str(size),
        "preprocessing": PREPROCESSING.format(size=size, classes=len(model.classes)),
        "mean": json.dumps([round(v, 6) for v in model.mean.flatten().tolist()]),
        "std": json.dumps([round(v, 6) for v in model.std.flatten().tolist()]),
        "calibrated": json.dumps(temperature is not None),
        "temperature": json.dumps(temperature),
        "resolution": str(recipe.resolution),
        "recipe": recipe.dumps(),
        "source": str(run_dir),
    }
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    diff = max_difference(net, data, example)
    if diff > TOLERANCE:
        raise ExportError(
            f"ONNX export differs from PyTorch by {diff:.2e} (> {TOLERANCE}); not written"
        )
    atomic.write_bytes(out, data)
    return diff


def max_difference(net: nn.Module, onnx_bytes: bytes, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in net(x)]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}

"""ONNX export of a trained model, checked against PyTorch with ONNX Runtime before it is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from . import atomic
from .data import CLASSES
from .model import load_model

TOLERANCE = 1e-4
PREPROCESSING = ("input 'image': float32 RGB in [0, 1], N x 3 x 32 x 32 (centre-crop to square, Lanczos "
                 "downscale to 32x32); normalisation and any upsampling happen inside the graph; output "
                 "'logits': N x 10, softmax gives class probabilities")


def export_onnx(run_dir: Path, out: Path, opset: int = 18) -> float:
    """Write `out` and return the largest |ONNX - PyTorch| logit difference on a check batch."""
    model, recipe = load_model(Path(run_dir) / "model.safetensors")
    example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                dynamo=True, verbose=False)
    proto = program.model_proto
    meta = {"classes": json.dumps(CLASSES), "preprocessing": PREPROCESSING,
            "mean": json.dumps([round(v, 6) for v in model.mean.flatten().tolist()]),
            "std": json.dumps([round(v, 6) for v in model.std.flatten().tolist()]),
            "resolution": str(recipe.resolution), "recipe": recipe.dumps(), "source": str(run_dir)}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    diff = max_difference(model, data, example)
    if diff > TOLERANCE:
        raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} (> {TOLERANCE}); not written")
    atomic.write_bytes(out, data)
    return diff


def max_difference(model: torch.nn.Module, onnx_bytes: bytes, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}

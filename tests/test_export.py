import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch

from cifar_transfer.data import CLASSES
from cifar_transfer.export import TOLERANCE, metadata
from cifar_transfer.model import load_model


def test_onnx_export_matches_pytorch(smoke_run, cifar, tmp_path):
    out = tmp_path / "model.onnx"
    done = subprocess.run([sys.executable, "-m", "cifar_transfer.cli", "export", str(smoke_run), "--onnx", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    meta = metadata(out)
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert "centre-crop" in meta["preprocessing"] and json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    model, _ = load_model(smoke_run / "model.safetensors")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = cifar[1].images
    for batch in (images[:1], images[1:8], images[100:300]):  # the batch dimension is dynamic
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        (got,) = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            want = model(x).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() < TOLERANCE
        assert (got.argmax(1) == want.argmax(1)).all()

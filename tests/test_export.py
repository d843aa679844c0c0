import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cifar_transfer.data.cifar import CLASSES
from cifar_transfer.serving.export import TOLERANCE, metadata
from cifar_transfer.serving.predictor import Options, Predictor


@pytest.mark.slow
def test_onnx_export_matches_pytorch_and_returns_calibrated_probabilities(
    run_cli, smoke_run, cifar, tmp_path
):
    out = tmp_path / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "cifar_transfer.cli", "export", str(smoke_run), "--onnx", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    meta = metadata(out)
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert "centre-crop" in meta["preprocessing"] and json.loads(meta["mean"]) == [
        0.485,
        0.456,
        0.406,
    ]
    predictor = Predictor(smoke_run, "cpu")
    assert (
        json.loads(meta["calibrated"]) is True
        and json.loads(meta["temperature"]) == predictor.temperature
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = cifar[1].images
    for batch in (images[:1], images[1:8], images[100:300]):  # the batch dimension is dynamic
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        got, probabilities = session.run(None, {"image": x.numpy()})
        want = predictor.logits(batch)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < TOLERANCE
        assert (got.argmax(1) == want.argmax(1)).all()
        # what predict and serve return
        assert np.abs(probabilities - predictor.probabilities(batch)).max() < 1e-5
    assert run_cli("export", str(smoke_run), "--onnx", str(out), "--no-calibration").returncode == 0
    assert json.loads(metadata(out)["calibrated"]) is False
    _, raw = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()}
    )
    assert np.abs(raw - predictor.probabilities(batch, Options(calibrated=False))).max() < 1e-5

"""examples/quickstart.ipynb runs from top to bottom on the smoke preset, in a real Jupyter kernel,
and shows what it promises: figures inline, the accuracy the run folder records, a prediction for a
photograph, and a run on a folder of real handwritten-digit scans."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


def test_saved_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code"
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "outputs are stripped before commit"
    )


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch, cifar_dir, weights_path):
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "runs"))
    # the digits' decode cache, not ~/.cache
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    # the kernel is a second process on this worker's core
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel runs in a folder of its own, as a user's would: nothing it writes lands in the
    # checkout
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6, (
        "samples, class counts, learning curves, confusion matrix, misclassified, digits"
    )
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    accuracy = json.loads((tmp_path / "runs" / "smoke" / "metrics.json").read_text())["test"][
        "accuracy"
    ]
    assert f"test accuracy {accuracy:.2%}" in text
    assert "cat -> dog" in text
    assert "chelsea.jpg [(" in text, text
    digits = json.loads((tmp_path / "runs" / "digits-run" / "metrics.json").read_text())
    assert (
        "10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), digits test accuracy "
        f"{digits['test']['accuracy']:.2%}" in text
    )
    assert (tmp_path / "runs" / "digits-run" / "splits.csv").is_file()

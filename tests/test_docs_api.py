"""docs/python-api.md's examples run as written, in a folder holding what they name (my-photos/: the
bundled real photographs; my_pictures/: 400 real digit scans), with CIFAR-10 and the weights where a
user's environment names them. The first example trains runs/smoke; the examples that read it find
the suite's own `smoke` run there (made by the same preset), so that they can run side by side."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import write_digits

import cifar_transfer as ct

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
PHOTOS = Path(__file__).resolve().parent / "fixtures" / "photos"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def user_folder(cifar_dir, weights_path, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR_TRANSFER_DATA", str(cifar_dir))
    monkeypatch.setenv("CIFAR_TRANSFER_WEIGHTS", str(weights_path))
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    shutil.copytree(PHOTOS, "my-photos", ignore=shutil.ignore_patterns("*.md"))
    write_digits(Path("my_pictures"), rows=range(400))
    return tmp_path


def run_examples(*numbers: int) -> dict:
    namespace: dict = {"ct": ct}  # as the first example imports it
    for n in numbers:
        exec(compile(examples()[n - 1], f"{DOC.name}, example {n}", "exec"), namespace)
    return namespace


def test_the_examples_are_the_five_the_tests_run():
    assert len(examples()) == 5 and "ct.run(" in examples()[0]


@pytest.mark.slow
def test_the_first_examples_train_a_run_and_read_it(user_folder):
    namespace = run_examples(1, 2)
    assert (
        namespace["run"].metrics["test"]["n"] == 10_000 and Path("runs/smoke/report.html").is_file()
    )
    assert namespace["recipe"].seed == 1


@pytest.mark.slow
@pytest.mark.parametrize("number", [3, 4])
def test_the_examples_on_a_trained_run(user_folder, smoke_copy, number):
    (user_folder / "runs").mkdir()
    smoke_copy.rename(user_folder / "runs" / "smoke")
    run_examples(number)
    if number == 3:
        assert Path("runs/smoke/evaluations/my-photos-adapted/metrics.json").is_file()
        assert Path("smoke.onnx").is_file()
    else:
        assert Path("runs/smoke/robustness-adapted/metrics.json").is_file()


@pytest.mark.slow
def test_the_own_pictures_example_audits_and_retrains_without_the_flagged(user_folder):
    run_examples(5)
    clean = ct.Run("runs/mine-clean").metrics
    assert clean["data"]["kind"] == "folder" and "excluded" in clean["data"]

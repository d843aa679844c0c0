"""What a user ships: calibrated probabilities (predict, ONNX), flip TTA, and evaluation on real
photographs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cifar_transfer.analysis.calibration import fit_temperature, softmax
from cifar_transfer.data.cifar import CLASSES, split
from cifar_transfer.data.images import read_image
from cifar_transfer.recipe import preset
from cifar_transfer.serving.predictor import Options, Predictor

PHOTOS = Path(__file__).parent / "fixtures" / "photos"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar_transfer.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_validation_temperature_ships_with_the_model_and_calibrates_predictions(
    smoke_run, cifar
):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    predictor = Predictor(smoke_run, "cpu")
    r = preset("smoke")
    val = split(*cifar, r.train_size, r.val_size, r.seed).val
    assert predictor.temperature == metrics["calibration"]["temperature"]
    assert "calibration" not in metrics["analysis"]  # one fit, reported once
    # fitted on validation only, from the logits the shipped epoch's validation computed (through
    # the cached activations: the same mathematics as a fresh pass, to float rounding)
    refit = fit_temperature(predictor.logits(val.images), val.labels)
    assert predictor.temperature == pytest.approx(refit, rel=1e-6)
    test = cifar[1]
    some = test.images[:200]
    assert np.allclose(
        predictor.probabilities(some),
        softmax(predictor.logits(some), predictor.temperature),
        atol=1e-6,
    )
    assert np.allclose(
        predictor.probabilities(some, Options(calibrated=False)),
        softmax(predictor.logits(some)),
        atol=1e-6,
    )
    # 2,000 test images: mean confidence and accuracy to about 1 point
    sample = np.arange(0, len(test), 5)
    logits = predictor.logits(test.images[sample])
    calibrated, raw = (
        predictor.combine(logits, Options()),
        predictor.combine(logits, Options(calibrated=False)),
    )
    accuracy = (calibrated.argmax(1) == test.labels[sample]).mean()
    assert (raw.argmax(1) == calibrated.argmax(1)).all()
    # the target: mean confidence within 0.05 of accuracy on the CIFAR-10 test set
    print(
        f"\nsmoke model, T = {predictor.temperature:.3f}: accuracy {accuracy:.4f}, mean confidence "
        f"{raw.max(1).mean():.4f} raw, {calibrated.max(1).mean():.4f} calibrated"
    )
    assert abs(calibrated.max(1).mean() - accuracy) <= 0.05
    assert abs(calibrated.max(1).mean() - accuracy) < abs(raw.max(1).mean() - accuracy)
    assert (
        f"T = {predictor.temperature:.3f}"
        in (smoke_run / "report.md").read_text().split("## Calibration")[1]
    )


def test_predict_says_how_its_probabilities_were_made(run_cli, smoke_run, cifar, tmp_path):
    image = cifar[1].images[5]
    path = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(image).save(path)
    predictor = Predictor(smoke_run, "cpu")
    x = read_image(path.read_bytes())[None]
    for call, flags, options in (
        (cli, [], Options()),
        (run_cli, ["--no-calibration"], Options(calibrated=False)),
        (run_cli, ["--tta"], Options(tta=True)),
    ):
        done = call("predict", str(smoke_run), str(path), "--json", "--top", "10", *flags)
        assert done.returncode == 0, done.stderr
        (result,) = json.loads(done.stdout)
        assert result["calibrated"] == options.calibrated and result["tta"] == options.tta
        assert result["temperature"] == (predictor.temperature if options.calibrated else None)
        got = {t["class"]: t["probability"] for t in result["top"]}
        want = predictor.probabilities(x, options)[0]
        assert np.allclose([got[c] for c in CLASSES], want, atol=1e-5)
    mirrored = predictor.probabilities(x[:, :, ::-1])[0]
    assert np.allclose(
        predictor.probabilities(x, Options(tta=True))[0],
        (predictor.probabilities(x)[0] + mirrored) / 2,
        atol=1e-6,
    )


def test_evaluate_with_tta_agrees_with_the_analysis(run_cli, smoke_copy, cifar, tmp_path):
    """`evaluate --tta` on the class-balanced test images the run's TTA analysis sampled gives its
    accuracy."""
    from cifar_transfer.analysis.analyze import balanced_sample

    analysis = json.loads((smoke_copy / "metrics.json").read_text())["analysis"]["tta"]
    recipe = preset("smoke")
    test = cifar[1]
    index = balanced_sample(test, recipe.tta_images, recipe.seed)
    assert analysis["sampled"] and analysis["images"] == len(index) == recipe.tta_images
    np.savez(tmp_path / "sample.npz", images=test.images[index], labels=test.labels[index])
    done = run_cli("evaluate", str(smoke_copy), "--tta", "--data", str(tmp_path / "sample.npz"))
    assert done.returncode == 0, done.stderr
    evaluation = json.loads((smoke_copy / "evaluations" / "sample" / "metrics.json").read_text())
    assert evaluation["run"]["tta"] is True
    assert evaluation["test"]["accuracy"] == analysis["accuracy_flip_tta"]


def test_evaluate_on_a_folder_of_photos(run_cli, smoke_copy, tmp_path):
    photos = tmp_path / "my photos"
    shutil.copytree(PHOTOS, photos)
    (photos / "zebra").mkdir()  # a class the model does not know: its pictures cannot be scored
    (photos / "zebra" / "z.png").write_bytes((PHOTOS / "horse" / "horse.png").read_bytes())
    done = run_cli("evaluate", str(smoke_copy), "--data", str(photos))
    refused = f"error: {photos / 'zebra'}: not one of the model's classes (airplane"
    assert done.returncode == 1 and refused in done.stderr
    shutil.rmtree(photos / "zebra")
    (photos / "cat" / "broken.jpg").write_bytes((PHOTOS / "cat" / "chelsea.jpg").read_bytes()[:300])
    (photos / "notes.txt").write_text("not in a class folder")
    done = run_cli("evaluate", str(smoke_copy), "--data", str(photos))
    assert done.returncode == 0, done.stderr
    # besides progress bars
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2, done.stderr
    assert any("broken.jpg: truncated or corrupt image" in s for s in skipped)
    assert any("notes.txt: not inside a class folder" in s for s in skipped)
    counts = {c: len(list((PHOTOS / c).iterdir())) for c in CLASSES if (PHOTOS / c).is_dir()}
    out = smoke_copy / "evaluations" / "my photos"
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == sum(counts.values()) and len(m["skipped"]) == 2
    assert {c: m["test"]["per_class"][c]["support"] for c in counts} == counts
    reference = json.loads((smoke_copy / "metrics.json").read_text())["test"]["accuracy"]
    assert m["cifar10_test_accuracy"] == reference
    report = (out / "report.md").read_text()
    assert f"a drop of **{100 * (reference - m['test']['accuracy']):.1f} points**" in report
    assert all(
        (out / f).is_file() for f in ("confusion_matrix.png", "misclassified.png", "report.html")
    )
    assert all(r["file"].startswith(str(photos)) for r in m["test"]["misclassified"])


@pytest.mark.slow
def test_without_a_validation_split_calibration_is_skipped_and_said(
    run_cli, small_data, weights_path, tmp_path
):
    out = tmp_path / "no-val"
    done = run_cli(
        "run",
        "--preset",
        "smoke",
        "--set",
        "val_size=0",
        "--set",
        "train_size=100",
        "--set",
        "finetune_epochs=0",
        "--set",
        "tta_images=100",
        "--set",
        "corruption_images=10",
        "--set",
        "gradcam_images=4",
        "--data-dir",
        str(small_data),
        "--weights",
        str(weights_path),
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["temperature"] is None and "val_size=0" in m["calibration"]["skipped"]
    assert not (out / "reliability.png").exists()
    report = (out / "report.md").read_text()
    assert "Probabilities are not calibrated: no validation split (val_size=0)" in report
    assert report.count("## Calibration") == 1
    image = out / "x.png"
    image.write_bytes((PHOTOS / "cat" / "chelsea.jpg").read_bytes())
    (result,) = json.loads(run_cli("predict", str(out), str(image), "--json").stdout)
    assert result["calibrated"] is False and result["temperature"] is None

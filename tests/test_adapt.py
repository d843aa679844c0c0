"""Test-time adaptation (model.adapt): BatchNorm statistics re-estimated on unlabelled images,
mapped onto the training images' statistics; per call, never in the saved model."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cifar_transfer.data import corruptions
from cifar_transfer.model.adapt import AdaptError, adapted, source_moments
from cifar_transfer.model.network import load_model, save_model
from cifar_transfer.model.weights import WeightsError
from cifar_transfer.recipe import preset
from cifar_transfer.serving.predictor import Predictor

FP32 = preset("smoke").replace(precision="fp32", eval_batch_size=64)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy(predictor: Predictor, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predictor.probabilities(images).argmax(1) == labels).mean())


def test_adapting_to_low_contrast_images_raises_accuracy_on_them_and_changes_no_saved_byte(
    smoke_run, cifar
):
    test = cifar[1]
    images, labels = (
        corruptions.corrupt(test.images[:200], "contrast", 5, seed=0),
        test.labels[:200],
    )
    before = sha256(smoke_run / "model.safetensors")
    predictor = Predictor(smoke_run)
    standard = predictor.probabilities(images)
    adapted_predictor = predictor.adapt(images)
    assert adapted_predictor.adapted_on == 200
    assert accuracy(adapted_predictor, images, labels) >= accuracy(predictor, images, labels) + 0.05
    # the predictor it came from
    np.testing.assert_array_equal(predictor.probabilities(images), standard)
    assert sha256(smoke_run / "model.safetensors") == before


def test_an_adapted_batchnorm_gives_the_target_images_the_moments_the_source_images_had(cifar):
    """One BatchNorm after a fixed convolution: adapted (no prior) on low-contrast images, it gives
    them the per-channel output mean and variance the unchanged layer gave the original images.

    The batch size splits the
    images into several batches: the adaptation's moments are of all of them.
    """
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    (
        bn.running_mean.uniform_(-1, 1),
        bn.running_var.uniform_(0.5, 2),
        bn.weight.data.uniform_(0.5, 2),
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn).eval()
    source_images = cifar[1].images[:256]
    target_images = corruptions.corrupt(source_images, "contrast", 4, seed=0)
    source = source_moments(model, source_images, FP32)
    running_var = bn.running_var.clone()
    mapped = adapted(model, target_images, FP32, source, prior=0)

    def output_moments(net, images):
        out = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).detach().double()
        return out.mean((0, 2, 3)), out.var((0, 2, 3), correction=0)

    want_mean, want_var = output_moments(model, source_images)
    got_mean, got_var = output_moments(mapped, target_images)
    # there was a shift
    assert not torch.allclose(output_moments(model, target_images)[1], want_var, rtol=0.1)
    torch.testing.assert_close(got_mean, want_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_var, want_var, atol=1e-3, rtol=1e-3)
    assert torch.equal(bn.running_var, running_var)  # the model given is untouched


def test_a_strong_prior_keeps_a_handful_of_images_from_moving_the_model(smoke_run, cifar):
    model, _ = load_model(smoke_run / "model.safetensors")
    few = cifar[1].images[:4]
    steady = adapted(model, few, FP32, model.source_moments, prior=1e9)
    for name, bn in steady.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            original = model.get_submodule(name)
            torch.testing.assert_close(bn.running_mean, original.running_mean, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(bn.running_var, original.running_var, atol=1e-4, rtol=1e-4)


def test_images_sorted_by_class_adapt_the_model_as_all_of_them_at_once(smoke_run, cifar):
    """A folder's pictures come class by class; the pass that measures the moments maps each batch
    with the moments seen so far, so it must not see one class first. Adapted on 256 test images
    sorted by label in batches of 32, every layer's statistics stay near those of adapting on all
    256 in one batch (exact: each layer's moments over every image). Unshuffled, the first
    batches held one class and the means were about 0.4 standard deviations off."""
    model, _ = load_model(smoke_run / "model.safetensors")
    images, labels = cifar[1].images[:256], cifar[1].labels[:256]
    by_class = images[np.argsort(labels, kind="stable")]
    batched = adapted(model, by_class, FP32.replace(eval_batch_size=32), model.source_moments)
    at_once = adapted(model, images, FP32.replace(eval_batch_size=256), model.source_moments)
    for name, bn in at_once.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            other = batched.get_submodule(name)
            shift = (bn.running_mean - other.running_mean).abs() / bn.running_var.sqrt()
            assert shift.max() < 0.3, name
            assert (bn.running_var / other.running_var).log().abs().max() < 0.3, name


def test_moments_travel_with_the_model_and_a_tampered_set_is_refused(smoke_run, tmp_path):
    model, _ = load_model(smoke_run / "model.safetensors")
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # `run` saved them
    assert model.source_moments is not None and set(model.source_moments) == layers
    tensors = load_file(smoke_run / "model.safetensors")
    with safe_open(smoke_run / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    name = next(iter(model.source_moments))
    del tensors[f"source_moments.{name}.var"]
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    with pytest.raises(WeightsError, match=rf"source_moments\.{name}\.var.* missing"):
        load_model(tmp_path / "model.safetensors")


def test_a_model_saved_without_moments_is_adapted_from_its_training_data(
    smoke_copy, cifar, cifar_dir, run_cli
):
    """An older model: `Predictor.adapt` says what to do; `evaluate --adapt` measures the moments
    from the run's training images, labels its result transductive and keeps it apart from the
    standard one."""
    model, recipe = load_model(smoke_copy / "model.safetensors")
    model.source_moments = None
    save_model(model, recipe, smoke_copy / "model.safetensors")
    with pytest.raises(AdaptError, match="evaluate --adapt"):
        Predictor(smoke_copy).adapt(cifar[1].images[:8])

    test = cifar[1]
    data = smoke_copy.parent / "contrast.npz"
    np.savez(
        data,
        images=corruptions.corrupt(test.images[:300], "contrast", 5, seed=0),
        labels=test.labels[:300],
    )
    assert run_cli("evaluate", str(smoke_copy), "--data", str(data)).returncode == 0
    done = run_cli("evaluate", str(smoke_copy), "--data", str(data), "--adapt")
    assert done.returncode == 0, done.stderr
    standard = json.loads((smoke_copy / "evaluations/contrast/metrics.json").read_text())
    adapted_run = json.loads((smoke_copy / "evaluations/contrast-adapted/metrics.json").read_text())
    assert adapted_run["run"]["adapted"]["images"] == 300 and standard["run"]["adapted"] is None
    assert adapted_run["test"]["accuracy"] > standard["test"]["accuracy"]
    assert "transductive" in (smoke_copy / "evaluations/contrast-adapted/report.md").read_text()


def test_predict_adapt_adapts_to_the_files_given_and_says_so(smoke_run, cifar, tmp_path, run_cli):
    paths = []
    for i, image in enumerate(corruptions.corrupt(cifar[1].images[:12], "fog", 5, seed=0)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    plain = run_cli("predict", str(smoke_run), *paths, "--json")
    done = run_cli("predict", str(smoke_run), *paths, "--json", "--adapt")
    assert done.returncode == 0, done.stderr
    rows, plain_rows = json.loads(done.stdout), json.loads(plain.stdout)
    assert all(r["adapted_on"] == 12 for r in rows) and all(
        "adapted_on" not in r for r in plain_rows
    )
    assert [r["top"] for r in rows] != [r["top"] for r in plain_rows]
    assert (
        "adapted to these 12 images" in run_cli("predict", str(smoke_run), *paths, "--adapt").stdout
    )


def test_robustness_adapt_adapts_each_corruption_apart_and_keeps_the_standard_result(
    smoke_copy, cifar_dir, run_cli
):
    done = run_cli(
        "robustness",
        str(smoke_copy),
        "--images",
        "20",
        "--benchmark-only",
        "--adapt",
        "--data-dir",
        str(cifar_dir),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((smoke_copy / "robustness-adapted/metrics.json").read_text())["robustness"]
    assert result["adapted"]["images"] == 20 and len(result["accuracy"]) == len(
        corruptions.BENCHMARK
    )
    assert not (smoke_copy / "robustness").exists()
    assert "adapted at test time" in (smoke_copy / "robustness-adapted/report.md").read_text()

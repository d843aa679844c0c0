"""CIFAR-10-C's corruptions at their own strength: the constants recovered from corrupted flat
images, one seed one array, ImageMagick's motion blur reproduced, and the released files' layout
read by `evaluate --data`."""

from __future__ import annotations

import ctypes
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import zoom

from cifar_transfer.data import corruptions as C

GREY = np.full((200, 32, 32, 3), 128, dtype=np.uint8)  # 0.502 of full scale


def levels(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_noise_strengths_are_cifar10c_not_imagenet_c(severity):
    cifar10c = {
        "gaussian": (0.04, 0.06, 0.08, 0.09, 0.10),
        "speckle": (0.06, 0.10, 0.12, 0.16, 0.20),
    }
    imagenet_c = {
        "gaussian": (0.08, 0.12, 0.18, 0.26, 0.38),
        "speckle": (0.35, 0.45, 0.6, 0.8, 0.95),
    }
    sigma = levels(C.corrupt(GREY, "gaussian_noise", severity)).std()
    assert sigma == pytest.approx(cifar10c["gaussian"][severity - 1], rel=0.03)
    assert abs(sigma - imagenet_c["gaussian"][severity - 1]) > 0.03
    # sigma scaled by the level
    speckle = levels(C.corrupt(GREY, "speckle_noise", severity)).std() / (128 / 255)
    assert speckle == pytest.approx(cifar10c["speckle"][severity - 1], rel=0.03)
    photons = (500, 250, 100, 75, 50)[severity - 1]  # Poisson: variance of x c / c is x / c
    shot = levels(C.corrupt(GREY, "shot_noise", severity)).std()
    assert shot == pytest.approx(np.sqrt((128 / 255) / photons), rel=0.05)
    flipped = C.corrupt(GREY, "impulse_noise", severity) != 128  # salt or pepper, value by value
    assert flipped.mean() == pytest.approx((0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1], rel=0.1)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_contrast_and_brightness_strengths(severity):
    halves = np.zeros((4, 32, 32, 3), np.uint8)
    halves[:, :, :16], halves[:, :, 16:] = 51, 204  # 0.2 and 0.8
    out = levels(C.corrupt(halves, "contrast", severity))
    spread = out[:, :, 16:].mean() - out[:, :, :16].mean()
    assert spread / 0.6 == pytest.approx((0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1], abs=0.01)
    # V + c on a grey image
    brighter = levels(C.corrupt(GREY, "brightness", severity)).mean() - 128 / 255
    assert brighter == pytest.approx((0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1], abs=0.005)


RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
}
RANDOM |= {"frost", "fog", "elastic_transform", "spatter"}


@pytest.mark.parametrize("name", C.BENCHMARK + C.HELD_OUT)
def test_one_seed_gives_one_array(cifar, name):
    images = cifar[1].images[:16]
    a = C.corrupt(images, name, 3, seed=1)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert not np.array_equal(a, images)
    assert np.array_equal(a, C.corrupt(images, name, 3, seed=1))
    assert np.array_equal(a, C.corrupt(images, name, 3, seed=2)) == (name not in RANDOM)
    milder = np.abs(C.corrupt(images, name, 1, seed=1).astype(int) - images).mean()
    assert milder < np.abs(
        C.corrupt(images, name, 5, seed=1).astype(int) - images
    ).mean() or name in {
        "elastic_transform",  # its severities trade the affine warp against the displacement field
        "glass_blur",
        "saturate",  # severities 1-2 desaturate, 3-5 oversaturate
        "frost",
        "spatter",  # water (1-3) and mud (4-5) are different layers
    }


def test_unknown_names_and_severities_are_refused():
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        C.corrupt(GREY[:1], "rain", 1)
    with pytest.raises(ValueError, match="severity 6"):
        C.corrupt(GREY[:1], "fog", 6)


def test_zoom_as_matrix_products_equals_scipy_zoom():
    x = np.random.default_rng(0).random((4, 32, 32, 3))
    for factor in (1.0, 1.07, 1.25, 1.75, 2.25):
        crop = int(np.ceil(32 / factor))
        top = (32 - crop) // 2
        expected = []
        for image in x:
            z = zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
            trim = (z.shape[0] - 32) // 2
            expected.append(z[trim : trim + 32, trim : trim + 32])
        np.testing.assert_allclose(C._clipped_zoom(x, factor), np.stack(expected), atol=1e-12)


def test_motion_blur_matches_imagemagick(cifar):
    """CIFAR-10-C's motion blur and snow called ImageMagick; ours must give its pixels."""
    try:
        from wand.api import library
        from wand.image import Image as MagickImage
    except (
        ImportError
    ) as e:  # Wand present but Debian's ImageMagick library missing (make test installs it)
        pytest.skip(f"ImageMagick not loadable: {e}")
    library.MagickMotionBlurImage.argtypes = (
        ctypes.c_void_p,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
    )
    rng = np.random.default_rng(0)
    differences = []
    for image, (radius, sigma) in zip(cifar[1].images[:30], [(6, 1), (9, 2.5), (14, 12)] * 10):
        angle = float(rng.uniform(-135, 45))
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        with MagickImage(blob=png.getvalue()) as magick:
            library.MagickMotionBlurImage(magick.wand, radius, sigma, angle)
            theirs = np.asarray(
                Image.open(io.BytesIO(magick.make_blob("png"))).convert("RGB"), dtype=float
            )
        ours = C.motion_kernel_blur(levels(image[None]), radius, sigma, np.array([angle]))[0] * 255
        differences.append(np.abs(theirs - np.round(ours)))
    differences = np.stack(differences)
    # one 8-bit level where ImageMagick's 16-bit sum rounds the other way
    assert differences.max() <= 1
    assert differences.mean() < 0.05, differences.mean()


def released_layout(folder, images, labels, names=("gaussian_noise", "contrast")):
    """A folder as CIFAR-10-C is released: one .npy per corruption with severities 1-5 stacked,
    labels.npy."""
    folder.mkdir()
    for name in names:
        np.save(
            folder / f"{name}.npy",
            np.concatenate([C.corrupt(images, name, s) for s in C.SEVERITIES]),
        )
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    return folder


@pytest.mark.slow
def test_evaluate_reads_the_released_layout(smoke_copy, cifar, tmp_path, run_cli):
    from cifar_transfer.serving.predictor import Options, Predictor

    images, labels = cifar[1].images[:100], cifar[1].labels[:100]
    folder = released_layout(tmp_path / "CIFAR-10-C", images, labels)
    done = run_cli("evaluate", str(smoke_copy), "--data", str(folder))
    assert done.returncode == 0, done.stderr
    assert (
        "CIFAR-10-C mean accuracy" in done.stdout
        and "over 2 corruptions x 5 severities on 100 images" in done.stdout
    )
    out = smoke_copy / "evaluations" / "CIFAR-10-C"
    rob = json.loads((out / "metrics.json").read_text())["robustness"]
    assert (
        set(rob["accuracy"]) == {"gaussian_noise", "contrast"}
        and "released CIFAR-10-C files" in rob["origin"]
    )
    probabilities = Predictor(smoke_copy).probabilities(
        C.corrupt(images, "contrast", 4), Options(calibrated=False)
    )
    assert rob["accuracy"]["contrast"][3] == pytest.approx(
        (probabilities.argmax(1) == labels).mean()
    )
    assert (out / "robustness.png").is_file() and "| contrast |" in (out / "report.md").read_text()


def test_a_released_file_that_does_not_match_its_labels_is_named(
    smoke_copy, cifar, tmp_path, run_cli
):
    folder = released_layout(
        tmp_path / "c10c", cifar[1].images[:10], cifar[1].labels[:10], names=("fog",)
    )
    np.save(folder / "labels.npy", np.zeros(40, np.uint8))
    done = run_cli("evaluate", str(smoke_copy), "--data", str(folder))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: {folder / 'fog'}.npy: 50 images for 40 labels; expected 5 equal blocks"
    )


@pytest.mark.slow
def test_robustness_command_on_a_saved_run(smoke_copy, run_cli, cifar_dir):
    done = run_cli(
        "robustness", str(smoke_copy), "--images", "20", "--data-dir", str(cifar_dir.parent)
    )
    assert done.returncode == 0, done.stderr
    rob = json.loads((smoke_copy / "robustness" / "metrics.json").read_text())["robustness"]
    assert set(rob["accuracy"]) == set(C.BENCHMARK + C.HELD_OUT) and rob["images"] == 20
    assert rob["benchmark_corruptions"] == 15 and f"{rob['mean_corrupted']:.4f}" in done.stdout
    report = (smoke_copy / "robustness" / "report.md").read_text()
    assert "not the released files" in report and "held-out corruptions (not in the mean)" in report


def test_the_report_says_which_corruptions_the_model_trained_on():
    from cifar_transfer.analysis.robustness import summarise
    from cifar_transfer.data.augment import TRAINS_ON_CORRUPTIONS
    from cifar_transfer.reporting.report import robustness_markdown

    table = {
        name: [0.9 if name in ("gaussian_noise", "contrast") else 0.5] * 5 for name in C.BENCHMARK
    }
    rob = summarise(table, 0.95, 100, "drawn here", seen=TRAINS_ON_CORRUPTIONS["flip+noise"])
    assert rob["mean_unseen"] == pytest.approx(0.5) and rob["mean_corrupted"] == pytest.approx(
        (13 * 0.5 + 1.8) / 15
    )
    md = robustness_markdown(rob)
    assert "**The model trained on gaussian noise and contrast**" in md
    assert "over the 13 corruptions it never saw, **50.00%**" in md
    assert "makes none of these corruptions" in robustness_markdown(
        summarise(table, 0.95, 100, "drawn here")
    )

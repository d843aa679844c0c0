import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cifar_transfer.data.images import MAX_PIXELS, ImageError, read_image, to_square
from cifar_transfer.serving.predictor import Predictor


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_a_solid_image_of_any_size_stays_that_colour():
    out = to_square(Image.new("RGB", (640, 480), (10, 200, 30)))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out == (10, 200, 30)).all()


def test_centre_crop_to_square_before_downscaling():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :, 2] = 255  # blue everywhere ...
    wide[:, 100:200] = (255, 0, 0)  # ... but a red centre square
    out = to_square(Image.fromarray(wide)).astype(int)
    # Lanczos rings slightly and reads past the edges
    assert np.abs(out[:, 1:-1] - (255, 0, 0)).max() <= 2
    assert (out[..., 0] > 200).all() and (out[..., 2] < 60).all()


def test_transparency_becomes_white_and_grey_becomes_rgb():
    clear = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    assert (to_square(clear) == 255).all()
    grey = to_square(Image.new("L", (40, 40), 77))
    assert (grey == 77).all() and grey.shape == (32, 32, 3)


def test_a_32px_png_is_read_exactly(cifar):
    image = cifar[1].images[0]
    assert np.array_equal(read_image(encode(Image.fromarray(image), "PNG")), image)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_unreadable_bytes(data, fragment):
    with pytest.raises(ImageError, match=fragment):
        read_image(data, "upload")


def test_truncated_and_oversized_images():
    png = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG"
    )
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(png[: len(png) // 2])
    side = int(MAX_PIXELS**0.5) + 100
    bomb = encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge image
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="over the limit"):
        read_image(bomb)


def test_large_jpegs_decode_at_reduced_scale_and_other_formats_are_refused():
    side = 6000  # 36 megapixels: over the decoded-pixel limit unless decoded at a reduced scale
    assert side * side > MAX_PIXELS
    photo = Image.fromarray(
        np.broadcast_to(np.linspace(0, 255, side, dtype=np.uint8)[None, :, None], (side, side, 3))
    )
    assert read_image(encode(photo, "JPEG")).shape == (32, 32, 3)  # decoded at 1/8 scale: 750 x 750
    with pytest.raises(ImageError, match="6000x6000 pixels is over the limit"):
        read_image(encode(photo, "PNG"))


@pytest.fixture(scope="module")
def images(cifar, tmp_path_factory):
    """One real test image, upscaled 4x, saved in several formats and modes."""
    folder = tmp_path_factory.mktemp("images")
    big = Image.fromarray(cifar[1].images[3]).resize((128, 128), Image.Resampling.BICUBIC)
    paths = []
    for name, image, fmt in [
        ("a.png", big, "PNG"),
        ("b.jpg", big, "JPEG"),
        ("c.webp", big, "WEBP"),
        ("d.bmp", big, "BMP"),
        ("e.png", big.convert("RGBA"), "PNG"),
        ("f.png", big.convert("L"), "PNG"),
        ("g.jpg", big.crop((0, 10, 128, 118)), "JPEG"),
    ]:
        image.save(folder / name, format=fmt)
        paths.append(folder / name)
    return paths


def test_predict_command_on_several_formats(smoke_run, images):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_transfer.cli",
            "predict",
            str(smoke_run),
            *map(str, images),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    predictor = Predictor(smoke_run, "cpu")
    expected = predictor.predict(np.stack([read_image(p.read_bytes()) for p in images]))
    assert [r["image"] for r in results] == [str(p) for p in images]
    for r, e in zip(results, expected):
        assert r["model"] == predictor.model_id
        assert len(r["top"]) == 3
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert [t["class"] for t in r["top"]] == [c for c, _ in e.top(3)]


@pytest.mark.slow
def test_predict_command_reports_every_file_and_each_bad_one(smoke_run, images, tmp_path, run_cli):
    """One bad file among good ones: results for the good ones, one error line per bad one, exit
    status 1."""

    def predict(*args: str) -> subprocess.CompletedProcess:
        return run_cli("predict", str(smoke_run), *args)

    (tmp_path / "notes.txt").write_text("not an image")
    bad, missing = tmp_path / "notes.txt", tmp_path / "absent.png"
    done = predict(str(images[0]), str(bad), str(images[1]), str(missing), "--top", "2")
    assert done.returncode == 1
    header, *lines = done.stdout.splitlines()  # once: how the probabilities were made
    assert header.startswith("probabilities calibrated (T = ")
    assert [line.split(": ")[0] for line in lines] == [str(images[0]), str(images[1])]
    assert all(len(line.split(", ")) == 2 for line in lines)
    assert done.stderr.splitlines() == [
        f"error: {bad}: not an image Pillow can read (PNG, JPEG, WebP, BMP, ...)",
        f"error: {missing}: cannot be read (No such file or directory)",
    ]
    results = json.loads(predict(str(bad), str(images[2]), "--json").stdout)
    assert [("error" in r, "top" in r) for r in results] == [(True, False), (False, True)]
    for top in ("0", "-1"):
        done = predict(str(images[0]), "--top", top)
        assert done.returncode == 2 and "--top" in done.stderr and "from 1 to 10" in done.stderr

"""Your own pictures: a folder of labelled images goes through run, evaluate, predict, serve and
export.

The pictures are real: scikit-learn's 1,797 scans of handwritten digits (conftest's `digits`), and
CIFAR-10 test photographs for the copies a user's folder holds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits
from PIL import Image

from cifar_transfer.data.cifar import DataError
from cifar_transfer.data.folder import read_labelled_folder


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test its own decode cache (never the user's ~/.cache)."""
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_a_folder_of_digits_trains_reports_and_predicts(digits_run, digits):
    import cifar_transfer as ct

    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert (
        metrics["data"]["classes"] == [str(d) for d in range(10)]
        and metrics["data"]["kind"] == "folder"
    )
    assert metrics["test"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    with (digits_run / "splits.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1797 and len({r["file"] for r in rows}) == 1797
    for d in range(10):  # stratified: each class gives 10% to validation and 20% to test, rounded
        mine = [r["split"] for r in rows if r["label"] == str(d)]
        want = {"val": round(0.1 * len(mine)), "test": round(0.2 * len(mine))}
        assert {s: mine.count(s) for s in want} == want and mine.count("train") == len(mine) - sum(
            want.values()
        )
    assert all(Path(r["file"]).parent.name == r["label"] for r in rows)
    report = (digits_run / "report.md").read_text()
    assert (
        "10 classes from the folder" in report and "CIFAR-10H labels CIFAR-10's test set" in report
    )
    assert "92.00%" not in report  # no CIFAR-10 claim for a folder of digits
    predictor = ct.load(digits_run, device="cpu")
    assert (
        predictor.classes == tuple(str(d) for d in range(10)) and predictor.model.image_size == 64
    )
    test_files = [r["file"] for r in rows if r["split"] == "test"][:20]
    right = sum(predictor.predict_file(f).top(1)[0][0] == Path(f).parent.name for f in test_files)
    assert right >= 10


@pytest.mark.slow
def test_evaluate_a_folder_with_the_runs_classes_and_refuse_others(digits_run, tmp_path, run_cli):
    other = write_digits(tmp_path / "more digits", np.arange(0, 1797, 9))
    done = run_cli("evaluate", str(digits_run), "--data", str(other))
    assert done.returncode == 0, done.stderr
    m = json.loads((digits_run / "evaluations" / "more digits" / "metrics.json").read_text())
    assert m["test"]["n"] == 200 and set(m["test"]["per_class"]) == {str(d) for d in range(10)}
    assert all(r["file"].startswith(str(other)) for r in m["test"]["misclassified"])
    (other / "cat").mkdir()
    done = run_cli("evaluate", str(digits_run), "--data", str(other))
    assert (
        done.returncode == 1
        and f"error: {other / 'cat'}: not one of the model's classes (0, 1, 2" in done.stderr
    )


@pytest.mark.slow
def test_serve_and_export_speak_the_folders_classes(digits_run, digits, tmp_path):
    import onnxruntime as ort
    from fastapi.testclient import TestClient

    from cifar_transfer.serving.export import export_onnx, metadata
    from cifar_transfer.serving.predictor import Predictor
    from cifar_transfer.serving.service import create_app

    picture = next((digits / "3").iterdir())
    with TestClient(create_app(digits_run, device="cpu")) as client:
        body = client.post(
            "/predict", files={"file": ("3.png", picture.read_bytes(), "image/png")}
        ).json()
        assert set(body["probabilities"]) == {str(d) for d in range(10)}
        assert (
            "Classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
            in client.get("/openapi.json").json()["info"]["description"]
        )
    out = tmp_path / "digits.onnx"
    export_onnx(digits_run, out)
    meta = metadata(out)
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)] and meta["image_size"] == "64"
    predictor = Predictor(digits_run, "cpu")
    images = np.stack([predictor_input(p) for p in sorted((digits / "7").iterdir())[:8]])
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    _, probabilities = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    assert np.abs(probabilities - predictor.probabilities(images)).max() < 1e-4


def predictor_input(path: Path) -> np.ndarray:
    from cifar_transfer.data.images import read_image_file

    return read_image_file(path, 64)


# ---- reading folders: layouts, the cache, and bad input (no training) ----


def small(digits: Path, root: Path, per_class: int = 12) -> Path:
    for d in sorted(digits.iterdir()):
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per_class]:
            shutil.copy(f, root / d.name / f.name)
    return root


def test_a_train_test_layout_keeps_its_test_set_and_splits_validation_from_train(digits, tmp_path):
    root = tmp_path / "pics"
    small(digits, root / "train", 10)
    small(digits, root / "test", 3)
    (root / "README.txt").write_text("notes")
    data = read_labelled_folder(root, 32, 0.2, 0.3, seed=0, progress=False)
    assert len(data.splits.test) == 30 and all("/test/" in f for f in data.splits.test.files)
    # val from train/; test/ as given
    assert len(data.splits.val) == 20 and len(data.splits.train) == 80
    assert any("README.txt: beside train/, val/ and test/" in s for s in data.skipped)
    shutil.rmtree(root / "test" / "3")
    (root / "test" / "three").mkdir()
    with pytest.raises(DataError, match=r"test/three: a class that train/ does not have"):
        read_labelled_folder(root, 32, 0.2, 0.3, seed=0, progress=False)


def test_the_second_read_decodes_nothing_and_a_changed_file_is_decoded_again(
    digits, tmp_path, monkeypatch
):
    from cifar_transfer.data import folder

    root = small(digits, tmp_path / "pics", 5)
    calls = []
    real = folder.read_image_file
    monkeypatch.setattr(folder, "read_image_file", lambda p, size: calls.append(p) or real(p, size))
    first = read_labelled_folder(root, 32, 0.2, 0.2, seed=1, progress=False)
    assert len(calls) == 50
    calls.clear()
    second = read_labelled_folder(root, 32, 0.2, 0.2, seed=1, progress=False)
    assert calls == [] and np.array_equal(first.splits.train.images, second.splits.train.images)
    changed = sorted((root / "4").iterdir())[0]
    os.utime(changed, ns=(1, 1))
    read_labelled_folder(root, 32, 0.2, 0.2, seed=1, progress=False)
    assert calls == [changed]


def photo_folder(cifar, root: Path) -> tuple[Path, list[Path]]:
    """Real photographs (CIFAR-10 test images, 12 cats and 12 dogs) in train/, 4 others of each in
    test/; and test/ copies of three training photos as users meet them: the same file twice, re-
    saved as a JPEG at 48 px, and brightened.

    Returns the folder and the three copies.
    """
    _, test = cifar
    for name in ("cat", "dog"):
        rows = np.flatnonzero(test.labels == test.classes.index(name))
        for k, i in enumerate(rows[:16]):
            folder = root / ("train" if k < 12 else "test") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(test.images[i]).save(folder / f"{i}.png")
    originals = sorted((root / "train" / "cat").iterdir())[:3]
    copies = [
        root / "test" / "cat" / "same.png",
        root / "test" / "cat" / "resaved.jpg",
        root / "test" / "cat" / "lit.png",
    ]
    shutil.copy(originals[0], copies[0])
    Image.open(originals[1]).resize((48, 48), Image.Resampling.BICUBIC).save(copies[1], quality=80)
    brighter = np.asarray(Image.open(originals[2])).astype(np.int16) + 12
    Image.fromarray(brighter.clip(0, 255).astype(np.uint8)).save(copies[2])
    return root, copies


def test_copies_of_training_pictures_in_later_sets_are_found_and_can_be_dropped(cifar, tmp_path):
    root, copies = photo_folder(cifar, tmp_path / "pics")
    data = read_labelled_folder(root, 32, 0.25, 0.0, seed=0, progress=False)
    found = {Path(c["later"]).name: c for c in data.duplicates if c["later_set"] == "test"}
    assert set(found) == {c.name for c in copies}  # the 8 other test photos are nobody's copy
    assert found["same.png"]["exact"] and found["same.png"]["earlier_set"] in ("train", "val")
    assert not found["resaved.jpg"]["exact"] and not found["lit.png"]["exact"]
    assert all(c["same_class"] and not c["dropped"] for c in data.duplicates)
    assert {str(c) for c in copies} <= set(data.splits.test.files)
    exact_only = read_labelled_folder(
        root, 32, 0.25, 0.0, seed=0, progress=False, duplicates="drop-exact"
    )
    assert set(data.splits.test.files) - set(exact_only.splits.test.files) == {str(copies[0])}
    near = read_labelled_folder(root, 32, 0.25, 0.0, seed=0, progress=False, duplicates="drop-near")
    assert not {str(c) for c in copies} & set(near.splits.test.files) and len(near.splits.test) == 8
    # a copy leaves its later set, never train
    assert near.splits.train.files == data.splits.train.files
    dropped = [r for r in near.rows() if r[1] == "dropped"]
    assert sorted(r[0] for r in dropped) == sorted(str(c) for c in copies) and {
        r[2] for r in dropped
    } == {"cat"}


def test_a_copy_with_another_label_is_flagged(cifar, tmp_path):
    root, copies = photo_folder(cifar, tmp_path / "pics")
    copies[0].rename(root / "test" / "dog" / "same.png")  # the same photo filed as a dog
    data = read_labelled_folder(root, 32, 0.25, 0.0, seed=0, progress=False)
    (conflict,) = [c for c in data.duplicates if not c["same_class"]]
    assert (
        conflict["exact"]
        and Path(conflict["later"]).parent.name == "dog"
        and conflict["class"] == "dog"
    )


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda root: None, "0 class folders; a classifier needs at least 2"),
        (lambda root: (root / "only").mkdir(), "1 class folder; a classifier needs at least 2"),
        (
            lambda root: ((root / "a").mkdir(), (root / "b").mkdir()),
            "class a: 0 images, too few to split",
        ),
    ],
)
def test_folders_that_cannot_make_a_classifier_are_named(make, fragment, tmp_path, digits):
    root = tmp_path / "pics"
    root.mkdir()
    make(root)
    with pytest.raises(DataError, match=fragment):
        read_labelled_folder(root, 32, 0.1, 0.2, seed=0, progress=False)


def test_a_class_too_small_to_split_is_named_with_its_count(digits, tmp_path):
    root = small(digits, tmp_path / "pics", 10)
    for f in sorted((root / "7").iterdir())[2:]:
        f.unlink()
    with pytest.raises(
        DataError,
        match=r"class 7: 2 images, too few to split into train / validation / test \(at least 3",
    ):
        read_labelled_folder(root, 32, 0.1, 0.2, seed=0, progress=False)


def test_every_kind_of_picture_a_user_has_is_read_and_the_rest_skipped_by_name(digits, tmp_path):
    root = tmp_path / "mixed"
    (root / "ünïcode class").mkdir(parents=True)
    (root / "plain").mkdir()
    grey = np.asarray(Image.open(sorted((digits / "8").iterdir())[0]))
    rgb = np.stack([grey] * 3, -1)
    modes = {
        "l.png": Image.fromarray(grey, "L"),
        "p.gif": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full_like(grey, 200)]), "RGBA"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "i16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "x.webp": Image.fromarray(rgb),
        "x.bmp": Image.fromarray(rgb),
        "x.tiff": Image.fromarray(rgb),
    }
    for folder in ("ünïcode class", "plain"):
        for name, picture in modes.items():
            picture.save(root / folder / name)
    (root / "plain" / "deeper").mkdir()
    (root / "plain" / "deeper" / "x.png").write_bytes((root / "plain" / "l.png").read_bytes())
    (root / "plain" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "plain" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "plain" / "labels.txt").write_text("8\n")
    (root / "plain" / "loop.png").symlink_to(root / "plain" / "loop.png")
    # 64 megapixels: Pillow's bomb guard
    Image.new("L", (8000, 8000)).save(root / "plain" / "huge.png")
    data = read_labelled_folder(root, 32, 0.2, 0.2, seed=0, progress=False)
    assert data.splits.train.classes == ("plain", "ünïcode class")
    total = sum(len(s) for s in (data.splits.train, data.splits.val, data.splits.test))
    assert total == 2 * len(modes)
    skipped = "\n".join(data.skipped)
    assert f"{root / 'plain' / 'deeper'}: a folder inside a class folder" in skipped
    assert f"{root / 'plain' / 'Thumbs.db'}: not an image Pillow can read" in skipped
    assert f"{root / 'plain' / 'labels.txt'}: not an image Pillow can read" in skipped
    assert f"{root / 'plain' / 'loop.png'}: a symbolic link loop" in skipped
    assert f"{root / 'plain' / 'huge.png'}: 8000x8000 pixels is over the limit" in skipped
    assert ".DS_Store" not in skipped  # hidden files are not pictures and not worth a line


# root reads folders whatever their mode: as root, the command runs without the two capabilities
# that allow it
AS_A_USER = [
    "setpriv",
    *(f"--{s}=-dac_override,-dac_read_search" for s in ("bounding-set", "inh-caps")),
]


def test_an_unreadable_class_folder_is_one_line_naming_it(digits, tmp_path, weights_path):
    import subprocess
    import sys

    root = small(digits, tmp_path / "pics", 5)
    (root / "4").chmod(0)
    command = [
        sys.executable,
        "-m",
        "cifar_transfer",
        "run",
        "--preset",
        "smoke",
        "--data",
        str(root),
    ]
    command += ["--weights", str(weights_path), "--out", str(tmp_path / "run")]
    try:
        done = subprocess.run(
            [*AS_A_USER, *command] if os.geteuid() == 0 else command, capture_output=True, text=True
        )
    finally:
        (root / "4").chmod(0o755)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: {root / '4'}: a folder that cannot be read (permission denied)"
    )


def test_class_names_that_look_like_formulas_are_drawn_as_text(tmp_path):
    from cifar_transfer.reporting import figures

    # matplotlib would parse these as math, and fail on the first
    classes = (
        "$\\frac$",
        "price $5 or $6",
    )
    figures.confusion([[3, 1], [0, 4]], classes, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0


@pytest.mark.slow
def test_every_training_command_takes_a_folder(
    digits, tmp_path, run_cli, weights_path, monkeypatch
):
    root = small(digits, tmp_path / "pics", 12)
    common = ["--data", str(root), "--weights", str(weights_path), "--no-progress"]
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))  # run_cli cleared it
    done = run_cli("eda", "--data", str(root), "--out", str(tmp_path / "eda"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "eda" / "class_counts.png").is_file() and (
        tmp_path / "eda" / "samples.png"
    ).is_file()
    done = run_cli(
        "lr-find", "--preset", "smoke", "--steps", "5", "--out", str(tmp_path / "lr"), *common
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["steps"] >= 3
    done = run_cli(
        "repeat", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path / "rep"), *common
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "rep" / "repeat.json").read_text())["summary"]
    seeds = [
        json.loads((tmp_path / "rep" / f"seed-{k}" / "metrics.json").read_text()) for k in (0, 1)
    ]
    assert summary["test accuracy"]["values"] == [m["test"]["accuracy"] for m in seeds]
    # the first seed's most confused digits, followed in both seeds
    pair = seeds[0]["test"]["leakage"][0]
    assert f"{pair['a']} → {pair['b']}" in summary and summary[f"{pair['a']} → {pair['b']}"][
        "values"
    ][0] == (pytest.approx(pair["a_as_b"], abs=1e-6))
    assert all(
        m["data"]["kind"] == "folder" and m["run"]["data_source"] == str(root) for m in seeds
    )
    run = tmp_path / "rep" / "seed-1"
    # the folder the run recorded, split by its seed
    done = run_cli("analyze", str(run), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    with (run / "splits.csv").open() as f:
        tested = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert analysis["tta"]["images"] == len(tested) == 20 and not analysis["tta"]["sampled"]
    files = {r["file"] for r in tested}  # the label audit names a folder's test pictures by file
    assert all(r["image"] in files for r in analysis["label_audit"]["top"])
    done = run_cli("robustness", str(run))
    assert done.returncode == 1 and "trained on other pictures than CIFAR-10's" in done.stderr
    space = tmp_path / "space.toml"

    def tune_one_trial(out: str):
        trial = ["--preset", "smoke", "--trials", "1", "--space", str(space)]
        return run_cli("tune", *trial, "--out", str(tmp_path / out), *common)

    space.write_text("[head_lr]\nlow = 1e-4\nhigh = 1e-2\n")
    done = tune_one_trial("t")
    assert done.returncode == 0, done.stderr
    trial = json.loads((tmp_path / "t" / "trial-0000" / "metrics.json").read_text())
    # 10% of 12 a class
    assert trial["run"]["data_source"] == str(root) and trial["validation"]["n"] == 10
    space.write_text("[seed]\nlow = 0\nhigh = 9\n")
    done = tune_one_trial("t2")
    assert (
        done.returncode == 1 and "split once for the whole study; seed cannot vary" in done.stderr
    )

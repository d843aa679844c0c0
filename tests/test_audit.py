"""The label audit: out-of-sample probabilities, labels known to be wrong found among real pictures,
and the loop closed by `run --exclude`."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from cifar_transfer.analysis.audit import (
    confirmed,
    label_issues,
    out_of_sample_probabilities,
    ranking_quality,
)


def test_probabilities_are_out_of_sample():
    """Features that identify each image and nothing else: a head that saw an image recalls its
    label, a head that did not can only guess.

    The audit's probabilities must be the guess.
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    features = np.eye(200)
    # memorised
    assert LogisticRegression(max_iter=1000).fit(features, labels).score(features, labels) == 1.0
    probs = out_of_sample_probabilities(features, labels, 4, seed=0)
    assert probs.shape == (200, 4) and np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == labels).mean() < 0.45  # chance is a quarter


def test_a_flag_stands_only_where_the_trained_model_still_disagrees():
    """The run's own model learnt the given labels: where it predicts them anyway, the flag was the
    heads' mistake and is dropped; flags are never added, and cleanlab's own are kept apart."""
    labels = np.array([0, 1, 2, 3, 0, 1])
    flagged = np.array([True, True, True, False, False, True])
    verdict = {"flagged": flagged, "quality": np.linspace(0, 1, 6), "suggested": labels[::-1]}
    asked = np.array([5, 0, 1, 2])
    out = confirmed(verdict, labels, asked, predicted=np.array([3, 0, 2, 2]))
    assert np.flatnonzero(out["flagged"]).tolist() == [1, 5]
    assert out["flagged_out_of_sample"] is flagged and out["quality"] is verdict["quality"]
    with pytest.raises(ValueError, match="exactly the flagged images"):
        confirmed(verdict, labels, np.array([0, 1, 3]), np.array([1, 2, 0]))


def test_saved_test_logits_are_read_back_only_for_the_test_set_they_were_saved_for(tmp_path):
    from cifar_transfer.atomic import OutputError
    from cifar_transfer.runfolder import TEST_LOGITS, saved_test_logits

    assert saved_test_logits(tmp_path, None, 4, 3) is None  # a run older than the file
    logits = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / TEST_LOGITS, logits)
    assert np.array_equal(saved_test_logits(tmp_path, None, 4, 3), logits)
    assert (
        saved_test_logits(tmp_path, None, 5, 3) is None
        and saved_test_logits(tmp_path, None, 4, 2) is None
    )
    (tmp_path / TEST_LOGITS).write_bytes(b"not an array")
    with pytest.raises(OutputError, match=r"test_logits.npy: not the test logits a run saves"):
        saved_test_logits(tmp_path, None, 4, 3)


@pytest.mark.slow
def test_flipped_labels_among_real_digits_are_found(pretrained):
    """600 of scikit-learn's digit scans, 5% of their labels moved to another digit (seeded): the
    audit ranks most of them first."""
    from sklearn.datasets import load_digits

    from cifar_transfer.data.augment import to_nchw
    from cifar_transfer.model.network import build_model
    from cifar_transfer.recipe import preset
    from cifar_transfer.training.inputs import cache_activations

    digits = load_digits()
    scans = np.repeat(
        np.repeat((digits.images[:600] * 255 / 16).round().astype(np.uint8), 4, 1), 4, 2
    )
    images = np.stack([scans] * 3, -1)
    true = digits.target[:600]
    rng = np.random.default_rng(0)
    flipped = rng.choice(600, 30, replace=False)
    given = true.copy()
    given[flipped] = (given[flipped] + rng.integers(1, 10, 30)) % 10
    recipe = dataclasses.replace(preset("lean"), resolution=64, precision="fp32")
    base = build_model(recipe, pretrained, tuple(str(d) for d in range(10))).eval()
    (features,) = cache_activations(base, to_nchw(images), "stem", "head", recipe)
    verdict = label_issues(given, out_of_sample_probabilities(features.numpy(), given, 10, seed=0))
    found = ranking_quality(verdict["quality"], verdict["flagged"], given != true, top=60)
    assert found["wrong"] == 30 and found["recall_top_60"] >= 0.7 and found["recall"] >= 0.5
    assert (
        verdict["suggested"][flipped] == true[flipped]
    ).mean() >= 0.7  # and says what they should be


@pytest.mark.slow
def test_audit_a_folder_run_and_train_without_what_it_flags(
    digits_run, digits, run_cli, weights_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))  # run_cli cleared it
    done = run_cli("audit", str(digits_run), "--device", "cpu", "--weights", str(weights_path))
    assert done.returncode == 0, done.stderr
    audit = digits_run / "audit"
    with (audit / "label_issues.csv").open() as f:
        issues = list(csv.DictReader(f))
    summary = json.loads((audit / "audit.json").read_text())
    assert sum(p["flagged"] for p in summary["parts"].values()) == len(issues) > 0
    pool = summary["parts"]["train+val"]
    assert pool["flagged"] <= pool["flagged_out_of_sample"]
    assert all(r["image"].startswith(str(digits)) and r["given"] != r["suggested"] for r in issues)
    assert [float(r["quality"]) for r in issues] == sorted(float(r["quality"]) for r in issues)
    assert (audit / "label_issues.png").is_file() and "Label audit" in (
        audit / "report.md"
    ).read_text()
    left_out = {r["image"] for r in issues if r["split"] in ("train", "val")}
    out = tmp_path / "cleaner"
    args = [
        "--preset",
        "smoke",
        "--data",
        str(digits),
        "--weights",
        str(weights_path),
        "--no-progress",
    ]
    done = run_cli("run", *args, "--exclude", str(audit / "label_issues.csv"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["excluded"]["images"] == len(left_out) > 0
    with (out / "splits.csv").open() as f:
        used = {r["file"] for r in csv.DictReader(f) if r["split"] in ("train", "val")}
    assert (
        not used & left_out
        and f"**{len(left_out):,} training and validation images were left out**"
        in (out / "report.md").read_text()
    )


def test_an_exclusion_list_that_matches_nothing_is_refused(digits, tmp_path, monkeypatch):
    from cifar_transfer.data.cifar import DataError
    from cifar_transfer.data.sources import load_splits
    from cifar_transfer.recipe import preset

    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    recipe = preset("smoke")
    whole = load_splits(recipe, digits, progress=False).splits
    listed = tmp_path / "issues.csv"
    first = whole.train.files[0]
    listed.write_text(f"image,split\n{first},train\n{whole.test.files[0]},test\n")
    kept = load_splits(recipe, digits, progress=False, exclude=listed)
    assert kept.excluded == 1 and first not in kept.splits.train.files
    assert kept.splits.test.files == whole.test.files  # a test row is never left out
    listed.write_text("image,split\n12345,train\n")  # a CIFAR-10 index given to a folder run
    with pytest.raises(
        DataError, match=r"issues.csv: none of its 1 images is among this run's training"
    ):
        load_splits(recipe, digits, progress=False, exclude=listed)
    listed.write_text("file,split\nx.png,train\n")
    with pytest.raises(DataError, match="no `image` column"):
        load_splits(recipe, digits, progress=False, exclude=listed)

import json

import numpy as np
import pytest

from cifar_transfer.analysis import attribution
from cifar_transfer.analysis.calibration import fit_temperature, reliability, softmax
from cifar_transfer.analysis.human import human_analysis
from cifar_transfer.analysis.robustness import corruption_accuracy
from cifar_transfer.data.cifar import CLASSES
from cifar_transfer.model.network import build_model
from cifar_transfer.recipe import preset
from cifar_transfer.reporting.report import pct


def probs_with_confidence(conf: float, n: int, correct: int) -> tuple[np.ndarray, np.ndarray]:
    """N predictions of class 0 with confidence `conf`; the first `correct` of them are right."""
    probs = np.full((n, 10), (1 - conf) / 9)
    probs[:, 0] = conf
    labels = np.where(np.arange(n) < correct, 0, 1)
    return probs, labels


def test_ece_is_zero_when_confidence_matches_accuracy():
    a = probs_with_confidence(0.8, 1000, 800)
    b = probs_with_confidence(0.3, 500, 150)
    result = reliability(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    assert result["ece"] == pytest.approx(0, abs=1e-12)
    assert sum(result["count"]) == 1500 and len(result["count"]) == 15


def test_ece_of_an_overconfident_model():
    probs, labels = probs_with_confidence(1.0, 100, 50)
    assert reliability(probs, labels)["ece"] == pytest.approx(0.5)


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (20_000, 10))
    # labels drawn from softmax(z): calibrated
    labels = np.array([rng.choice(10, p=p) for p in softmax(z)])
    assert fit_temperature(3 * z, labels) == pytest.approx(3, rel=0.05)
    assert fit_temperature(z, labels) == pytest.approx(1, rel=0.05)


def test_human_split_on_a_hand_made_case():
    cat, dog = CLASSES.index("cat"), CLASSES.index("dog")
    human = np.zeros((4, 10))
    human[0, [cat, dog]] = (0.5, 0.5)  # ambiguous cat
    human[1, cat] = 1.0  # clear cat
    human[2, cat] = 1.0  # clear cat
    human[3, dog] = 1.0  # clear dog
    labels = np.array([cat, cat, cat, dog])
    pred = np.array([dog, dog, cat, dog])  # two cats taken for dogs: one ambiguous, one clear
    result = human_analysis(human, labels, pred, losses=np.array([1.0, 2.0, 0.1, 0.1]))
    row = next(r for r in result["leakage"] if r["true"] == "cat" and r["predicted"] == "dog")
    assert (row["errors"], row["on_ambiguous"], row["on_clear"]) == (2, 1, 1)
    assert row["share_ambiguous"] == 0.5 and row["ambiguous_rate_in_class"] == pytest.approx(1 / 3)
    assert np.array(result["human_confusion"])[cat, dog] == pytest.approx(0.5 / 3, abs=1e-6)
    assert [e["index"] for e in result["clear_errors"]] == [1]
    assert (result["errors"], result["errors_on_ambiguous"], result["errors_on_clear"]) == (2, 1, 1)


def test_centre_share_known_answers():
    uniform = np.ones((1, 32, 32))
    centre = np.zeros((1, 32, 32))
    centre[0, 8:24, 8:24] = 1
    border = 1 - centre
    assert attribution.centre_share(np.concatenate([uniform, centre, border])) == pytest.approx(
        [0.25, 1, 0]
    )


def test_grad_cam_layer_follows_resolution(pretrained, cifar):
    model = build_model(preset("seed"), pretrained).eval()
    assert attribution.target_layer(model)[0] == "layer2"  # 4 x 4 at 32 px; layer4 is 1 x 1
    assert attribution.target_layer(build_model(preset("strong"), pretrained).eval())[0] == "layer4"
    maps = attribution.grad_cam(model, cifar[1].images[:3], np.array([0, 1, 2]))
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    for p in model.backbone.parameters():  # a run with no fine-tuning leaves the base frozen
        p.requires_grad_(False)
    assert np.allclose(
        attribution.grad_cam(model, cifar[1].images[:3], np.array([0, 1, 2])), maps, atol=1e-5
    )
    assert attribution.overlays(cifar[1].images[:3], maps).shape == (3, 32, 32, 3)


def test_corruption_accuracy_counts_only_what_survives(cifar):
    images, labels = cifar[1].images[:20], cifar[1].labels[:20]
    clean = {im.tobytes(): y for im, y in zip(images, labels)}

    def knows_only_clean(
        batch: np.ndarray,
    ) -> np.ndarray:  # right exactly when the image is untouched
        return np.array([clean.get(im.tobytes(), (y + 1) % 10) for im, y in zip(batch, labels)])

    result = corruption_accuracy(
        knows_only_clean, images, labels, names=("gaussian_noise", "pixelate", "saturate")
    )
    assert result["clean"] == 1.0
    assert all(acc < 1 for accs in result["accuracy"].values() for acc in accs)
    assert (
        set(result["accuracy"]) == {"gaussian_noise", "pixelate", "saturate"}
        and len(result["severities"]) == 5
    )
    # the benchmark mean leaves out the held-out corruption (saturate) and says over how many it is
    benchmark = [a for name in ("gaussian_noise", "pixelate") for a in result["accuracy"][name]]
    assert result["benchmark_corruptions"] == 2
    assert result["mean_corrupted"] == pytest.approx(np.mean(benchmark))
    assert result["mean_held_out"] == pytest.approx(np.mean(result["accuracy"]["saturate"]))
    assert result["margin_95"] == pytest.approx(
        1.96 * np.sqrt(np.mean(benchmark) * (1 - np.mean(benchmark)) / 20)
    )


SECTIONS = (
    "# Error analysis",
    "## Calibration",
    "## Test-time augmentation",
    "## Human ambiguity (CIFAR-10H)",
    "## Where the model looks (Grad-CAM)",
    "## Robustness (CIFAR-10-C)",
)


def test_the_smoke_report_contains_every_analysis(smoke_run):
    md = (smoke_run / "report.md").read_text()
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    analysis = metrics["analysis"]
    for section in SECTIONS:
        assert md.count(section + "\n") == 1, section
    assert "skipped" not in analysis["human"]  # CIFAR-10H was given
    # fitted once
    assert f"{metrics['calibration']['ece_before']:.4f}" in md and "calibration" not in analysis
    assert f"{analysis['attribution']['centre_share_errors']:.3f}" in md
    # CIFAR-10-C's 15 at their strength, the subset's size and margin stated
    robust = analysis["robustness"]
    assert robust["benchmark_corruptions"] == 15 and robust["images"] == 50
    assert (
        f"**{100 * robust['mean_corrupted']:.2f}%** ± {100 * robust['margin_95']:.1f} points" in md
    )
    assert "not the released files" in md
    for name in (
        "reliability.png",
        "human_vs_model.png",
        "clear_errors.png",
        "gradcam.png",
        "robustness.png",
    ):
        assert (smoke_run / name).is_file() and f"({name})" in md


@pytest.mark.slow
def test_analyze_command_without_human_labels(smoke_copy, cifar_dir, run_cli):
    done = run_cli(
        "analyze",
        str(smoke_copy),
        "--data-dir",
        str(cifar_dir.parent),
        "--human-labels",
        str(smoke_copy / "nowhere"),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((smoke_copy / "analysis" / "analysis.json").read_text())
    metrics = json.loads((smoke_copy / "metrics.json").read_text())
    first = metrics["analysis"]
    assert "cifar10h-probs.npy: no such file" in result["human"]["skipped"]
    # the shipped one
    assert result["calibration"]["temperature"] == metrics["calibration"]["temperature"]
    assert result["calibration"]["ece_before"] == pytest.approx(
        metrics["calibration"]["ece_before"], abs=1e-6
    )
    assert result["tta"] == pytest.approx(first["tta"], abs=1e-6)
    md = (smoke_copy / "analysis" / "report.md").read_text()
    assert "Skipped: " in md and all(s in md for s in SECTIONS)
    audit = result["label_audit"]  # the test labels the shipped model finds suspect
    assert audit["images"] == 10_000 and 0 < audit["flagged"] < 10_000 and "human" not in audit
    qualities = [r["quality"] for r in audit["top"]]
    assert qualities == sorted(qualities) and f"flags **{audit['flagged']:,}**" in md


@pytest.mark.slow
def test_repeat_reports_mean_and_spread_and_compare_sets_its_runs_side_by_side(
    run_cli, small_data, weights_path, tmp_path
):
    out = tmp_path / "rep"
    done = run_cli(
        "repeat",
        "--preset",
        "smoke",
        "--seeds",
        "2",
        "--set",
        "train_size=100",
        "--set",
        "val_size=100",
        "--data-dir",
        str(small_data),
        "--weights",
        str(weights_path),
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "repeat.json").read_text())
    acc = result["summary"]["test accuracy"]
    runs = [
        json.loads((out / f"seed-{k}" / "metrics.json").read_text())["test"]["accuracy"]
        for k in (0, 1)
    ]
    assert acc["values"] == runs and acc["mean"] == pytest.approx(np.mean(runs))
    assert acc["std"] == pytest.approx(np.std(runs, ddof=1))
    assert "cat → dog" in result["summary"] and (out / "repeat.png").is_file()
    assert runs[0] != runs[1]  # different subsamples and initialisations

    done = run_cli(
        "compare", str(out / "seed-0"), str(out / "seed-1"), "--out", str(tmp_path / "cmp")
    )
    assert done.returncode == 0, done.stderr
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["differing_fields"] == ["seed"]
    assert [r["accuracy"] for r in cmp["runs"]] == runs and [
        r["recipe"]["seed"] for r in cmp["runs"]
    ] == [0, 1]
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert all(pct(a) in md for a in runs) and "cat → dog" in md
    assert (tmp_path / "cmp" / "learning_curves.png").is_file() and (
        tmp_path / "cmp" / "report.html"
    ).is_file()
    done = run_cli("compare", str(out / "seed-0"), str(tmp_path))
    assert (
        done.returncode == 1
        and done.stderr
        == f"error: {tmp_path}: not a finished run (no metrics.json, recipe.json, history.csv)\n"
    )


def test_flip_tta_on_a_class_balanced_sample(pretrained, cifar, tmp_path):
    """`tta_images` keeps the analysis affordable at high resolution: it samples the test set
    evenly."""
    from cifar_transfer.analysis.analyze import analyze
    from cifar_transfer.reporting.report import tta_scope

    test = cifar[1]
    r = preset("smoke").with_overrides(
        ["tta_images=100", "gradcam_images=4", "corruption_images=10"]
    )
    model = build_model(r, pretrained).eval()
    result = analyze(model, r, test.take(np.arange(400))).result
    tta = result["tta"]
    assert (tta["images"], tta["sampled"]) == (100, True)
    assert tta_scope(tta) == "100 class-balanced test images"
    every = analyze(model, r.with_overrides(["tta_images=400"]), test.take(np.arange(400))).result[
        "tta"
    ]
    assert (every["images"], every["sampled"]) == (400, False) and tta_scope(
        every
    ) == "the whole test set"

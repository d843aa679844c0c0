"""The learning-rate range test: a finite suggestion from training data, on a copy of the model."""

import json
import math

import pytest
import torch

from cifar_transfer.data.augment import as_tensors
from cifar_transfer.jobs.lr_find import lr_find, suggest
from cifar_transfer.model.network import build_model
from cifar_transfer.recipe import RecipeError, preset


def test_the_range_test_suggests_a_rate_stops_on_divergence_and_leaves_the_model_alone(
    pretrained, cifar
):
    recipe = preset("smoke")
    torch.manual_seed(0)
    model = build_model(recipe, pretrained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = as_tensors(cifar[0].images[:500], cifar[0].labels[:500], torch.device("cpu"))
    result = lr_find(model, recipe, images, labels, phase=1, start=1e-6, end=1e3, steps=60)
    # it trained a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Adam at rates near 100 blows the head up: stopped before the end
    assert 3 <= result["steps"] < 60
    assert max(result["smoothed"]) > 4 * min(result["smoothed"]) * 0.999
    assert 1e-6 <= result["suggestion"] <= 1e3 and math.isfinite(result["suggestion"])
    assert result["lrs"] == sorted(result["lrs"]) and result["method"].startswith("steepest")
    with pytest.raises(RecipeError, match="0 < start < end"):
        lr_find(model, recipe, images, labels, start=1.0, end=0.1)


def test_lr_find_command_writes_its_plot_and_suggestion(run_cli, cifar_dir, weights_path, tmp_path):
    out = tmp_path / "lr"
    done = run_cli(
        "lr-find",
        "--preset",
        "smoke",
        "--steps",
        "20",
        "--data-dir",
        str(cifar_dir),
        "--weights",
        str(weights_path),
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "lr_find.json").read_text())
    assert (
        (out / "lr_find.png").is_file() and result["phase"] == 1 and result["optimizer"] == "adam"
    )
    assert f"{result['suggestion']:.2e}" in done.stdout


def test_the_suggestion_on_curves_of_known_shape():
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    # falls fastest at 1e-3
    falling = [2.3 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]
    assert suggest(lrs, falling)["suggestion"] == pytest.approx(1e-3, rel=0.25)
    flat = [0.5] * 90 + [0.5 * 1.1**k for k in range(1, 11)]  # a trained model: flat, then it rises
    result = suggest(lrs, flat)
    assert result["method"].startswith("a tenth of where the flat loss starts to rise")
    # 0.55 is the first value above 1.05 * 0.5
    assert result["suggestion"] == pytest.approx(lrs[90] / 10)

"""The Python API speaks Python: recipe fields as typed keywords, objects back, and `import
cifar_transfer` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cifar_transfer as ct
from cifar_transfer.recipe import RecipeError


def test_import_loads_no_torch_and_every_public_name_resolves():
    code = "import sys, cifar_transfer as ct; print('torch' in sys.modules, sorted(ct.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("False")
    for name in ct.__all__:
        assert getattr(ct, name) is not None, name
    assert {"run", "lr_find", "tune", "export", "repeat", "compare"} <= set(ct.__all__)


def test_recipe_fields_as_keywords_come_last_and_are_typed():
    recipe = ct.choose_recipe(
        "smoke", overrides=["seed=2", "head_lr=0.1"], head_lr=0.01, head_hidden=[32]
    )
    assert (recipe.seed, recipe.head_lr, recipe.head_hidden) == (2, 0.01, (32,))
    assert ct.preset("lean").replace(finetune_epochs=3) == ct.preset("lean").with_overrides(
        ["finetune_epochs=3"]
    )
    with pytest.raises(
        RecipeError, match=r"unknown recipe fields: finetune_epoch \(known: name, seed"
    ):
        ct.choose_recipe("smoke", finetune_epoch=3)
    with pytest.raises(RecipeError, match="recipe field finetune_epochs='3': must be an integer"):
        ct.preset("smoke").replace(finetune_epochs="3")


def test_a_resumed_run_refuses_a_changed_keyword_before_any_work(tmp_path):
    (tmp_path / "recipe.json").write_text(ct.preset("smoke").dumps())
    with pytest.raises(
        RecipeError, match=r"keeps the recipe it started with: finetune_epochs=1 \(given 5\)"
    ):
        ct.run("smoke", out=tmp_path, resume=True, finetune_epochs=5)
    assert json.loads((tmp_path / "recipe.json").read_text())["finetune_epochs"] == 1

import json

import pytest

from cifar_transfer.recipe import PRESETS, Recipe, RecipeError, preset


def test_seed_preset_is_the_literal_recipe():
    r = preset("seed")
    assert (r.resolution, r.augment, r.batch_size, r.finetune_from) == (32, "none", 32, "stem")
    assert (r.head_optimizer, r.head_lr, r.head_epochs) == ("adam", 1e-3, 10)
    assert (r.finetune_optimizer, r.finetune_lr, r.finetune_epochs, r.finetune_bn) == ("adam", 1e-5, 10, "frozen")
    assert r.head_hidden == (128, 64)


def test_every_preset_builds_and_round_trips_through_json():
    for name in PRESETS:
        r = preset(name)
        assert r.name == name
        assert Recipe.from_dict(json.loads(r.dumps())) == r


def test_overrides_are_parsed_by_field_type():
    r = preset("seed").with_overrides(
        ["finetune_epochs=3", "head_lr=0.01", "augment=true", "head_hidden=256,32", "precision=bf16"])
    assert r.finetune_epochs == 3 and isinstance(r.finetune_epochs, int)
    assert r.head_lr == 0.01
    assert r.augment == "crop+flip"  # the bool it once was still reads
    assert r.head_hidden == (256, 32)
    assert r.precision == "bf16"


@pytest.mark.parametrize(("assignment", "fragment"), [
    ("nope=1", "key=value"),
    ("finetune_epochs", "key=value"),
    ("finetune_epochs=three", "not a valid int"),
    ("augment=maybe", "augment=.maybe."),
    ("finetune_from=layer5", "finetune_from=.layer5."),
    ("finetune_from=layer3.6", "finetune_from=.layer3.6."),
    ("precision=fp8", "precision='fp8'"),
    ("train_size=15", "multiples of 10"),
    ("train_size=49000", "50,000"),
    ("resolution=16", "resolution=16"),
    ("head_lr=0", "head_lr=0.0"),
    ("dropout=1.5", "dropout=1.5"),
    ("seed=-1", "seed=-1: must be in"),
    ("head_lr=nan", "head_lr=nan: must be a finite number"),
    ("finetune_lr=inf", "finetune_lr=inf: must be a finite number"),
    ("warmup_epochs=inf", "warmup_epochs=inf"),
    ("warmup_epochs=11", "warmup_epochs=11.0: must be in \\[0, 10\\]"),
    ("head_hidden=-5", "head_hidden=\\(-5,\\): layer widths must be >= 1"),
    ("momentum=1", "momentum=1.0"),
    ("resolution=100000", "resolution=100000"),
    ("label_smoothing=nan", "label_smoothing=nan"),
    ("eval_batch_size=0", "eval_batch_size=0"),
])
def test_bad_overrides_name_the_field(assignment, fragment):
    with pytest.raises(RecipeError, match=fragment):
        preset("seed").with_overrides([assignment])


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("seed", "7", "seed='7': must be an integer"),
    ("head_epochs", 2.5, "head_epochs=2.5: must be an integer"),
    ("analysis", "yes", "analysis='yes': must be true or false"),
    ("head_hidden", ["a"], "must be a list of integers"),
    ("weight_decay", None, "weight_decay=None: must be a finite number"),
    ("label_smoothing", True, "label_smoothing=True: must be a finite number"),
])
def test_recipe_files_with_wrong_types_name_the_field(field, value, fragment):
    with pytest.raises(RecipeError, match=fragment):
        Recipe.from_dict(preset("seed").to_dict() | {field: value})


def test_unknown_preset_and_fields():
    with pytest.raises(RecipeError, match="unknown preset"):
        preset("fast")
    with pytest.raises(RecipeError, match="unknown recipe fields: bogus"):
        Recipe.from_dict({"bogus": 1})


def test_cached_stages_and_best_val_need_what_they_rely_on():
    with pytest.raises(RecipeError, match="random crops cannot be drawn"):
        preset("lean").with_overrides(["augment=crop+flip"])
    with pytest.raises(RecipeError, match="keep='best_val' needs a validation split"):
        preset("lean").with_overrides(["val_size=0"])
    assert preset("lean").with_overrides(["finetune_from=layer4"]).finetune_from == "layer4"


def test_recipes_saved_with_a_bool_augment_still_load():
    saved = preset("strong").to_dict() | {"augment": True}
    assert Recipe.from_dict(saved).augment == "crop+flip"
    assert Recipe.from_dict(preset("seed").to_dict() | {"augment": False}).augment == "none"

import json

import pytest

from cifar_transfer.recipe import PRESETS, Recipe, RecipeError, compose, preset


def test_seed_preset_is_the_literal_recipe():
    r = preset("seed")
    assert (r.resolution, r.augment, r.batch_size, r.finetune_from) == (32, "none", 32, "stem")
    assert (r.head_optimizer, r.head_lr, r.head_epochs) == ("adam", 1e-3, 10)
    assert (r.finetune_optimizer, r.finetune_lr, r.finetune_epochs, r.finetune_bn) == (
        "adam",
        1e-5,
        10,
        "frozen",
    )
    assert r.head_hidden == (128, 64)


def test_every_preset_builds_and_round_trips_through_json():
    for name in PRESETS:
        r = preset(name)
        assert r.name == name
        assert Recipe.from_dict(json.loads(r.dumps())) == r


def test_overrides_are_parsed_by_field_type():
    r = preset("seed").with_overrides(
        [
            "finetune_epochs=3",
            "head_lr=0.01",
            "augment=true",
            "head_hidden=256,32",
            "precision=bf16",
        ]
    )
    assert r.finetune_epochs == 3 and isinstance(r.finetune_epochs, int)
    assert r.head_lr == 0.01
    assert r.augment == "crop+flip"  # the bool it once was still reads
    assert r.head_hidden == (256, 32)
    assert r.precision == "bf16"


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
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
        ("head_hidden=-5", "head_hidden=\\(-5,\\): at most 16 layers, each 1 to 65,536 wide"),
        ("momentum=1", "momentum=1.0"),
        ("resolution=100000", "resolution=100000"),
        ("label_smoothing=nan", "label_smoothing=nan"),
        ("eval_batch_size=0", "eval_batch_size=0"),
        ("consistency=-1", r"consistency=-1.0: must be in \[0, 1000\]"),
        (
            "consistency=12",
            "consistency=12.0: AugMix's consistency loss .* needs augment='flip\\+augmix'",
        ),
    ],
)
def test_bad_overrides_name_the_field(assignment, fragment):
    with pytest.raises(RecipeError, match=fragment):
        preset("seed").with_overrides([assignment])


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("seed", "7", "seed='7': must be an integer"),
        ("head_epochs", 2.5, "head_epochs=2.5: must be an integer"),
        ("analysis", "yes", "analysis='yes': must be true or false"),
        ("head_hidden", ["a"], "must be a list of integers"),
        ("weight_decay", None, "weight_decay=None: must be a finite number"),
        ("label_smoothing", True, "label_smoothing=True: must be a finite number"),
    ],
)
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


def test_recipe_files_apply_over_the_preset_and_under_set(tmp_path):
    saved = tmp_path / "recipe.json"
    saved.write_text(preset("lean").dumps())  # what every run writes
    assert compose("seed", saved) == preset("lean")
    partial = tmp_path / "mine.toml"
    partial.write_text("finetune_epochs = 3\nhead_hidden = [256, 32]\nlabel_smoothing = 0.2\n")
    r = compose("smoke", partial, ["finetune_epochs=5"])
    # --set wins over the file
    assert (r.finetune_epochs, r.head_hidden, r.label_smoothing) == (
        5,
        (256, 32),
        0.2,
    )
    # the rest from the preset
    assert r.train_size == preset("smoke").train_size and r.name == "smoke"


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("a.toml", "bogus = 1\n", "unknown recipe fields: bogus"),
        ("a.toml", "head_lr = -1.0\n", "recipe field head_lr=-1.0: must be > 0"),
        ("a.toml", "head_lr = \n", "not valid TOML"),
        ("a.json", "[1, 2]", "expected a table of recipe fields, found list"),
        ("a.json", '{"seed": "zero"}', "recipe field seed='zero': must be an integer"),
    ],
)
def test_bad_recipe_files_name_the_file_and_the_field(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError) as e:
        compose("seed", tmp_path / name)
    assert str(e.value).startswith(f"{tmp_path / name}: ") and fragment in str(e.value)


def test_a_bad_recipe_file_is_one_line_before_anything_loads(run_cli, tmp_path):
    (tmp_path / "r.toml").write_text("finetune_lr = nan\n")
    done = run_cli("run", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'r.toml'}: recipe field finetune_lr=nan: must be a finite number"
    ]
    assert not (tmp_path / "out").exists()


def test_full_is_strong_on_the_whole_training_set():
    full, strong = preset("full").to_dict(), preset("strong").to_dict()
    assert (full["train_size"], full["val_size"]) == (45_000, 5_000)
    assert {k: v for k, v in full.items() if k not in ("name", "train_size", "val_size")} == {
        k: v for k, v in strong.items() if k not in ("name", "train_size", "val_size")
    }

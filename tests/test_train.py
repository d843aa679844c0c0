import errno
import itertools
import math

import pytest
import torch

from cifar_transfer import atomic
from cifar_transfer.data.augment import as_tensors, to_input
from cifar_transfer.model import inference
from cifar_transfer.model.network import Part, build_model
from cifar_transfer.recipe import preset
from cifar_transfer.training import checkpoint, inputs, loop, phases
from cifar_transfer.training.loop import Saving, fit
from cifar_transfer.training.phases import TrainingError

TINY = ["train_size=40", "val_size=20", "batch_size=8", "head_epochs=2", "finetune_epochs=2"]


@pytest.fixture(scope="module")
def tiny_data(cifar):
    train_set, _ = cifar
    return (
        as_tensors(train_set.images[:40], train_set.labels[:40], torch.device("cpu")),
        as_tensors(train_set.images[40:60], train_set.labels[40:60], torch.device("cpu")),
    )


def fresh(recipe, pretrained):
    torch.manual_seed(recipe.seed)
    return build_model(recipe, pretrained)


def backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_same_seed_same_history_and_weights(pretrained, tiny_data):
    r = preset("seed").with_overrides([*TINY, "augment=true", "dropout=0.3"])
    a, b = fresh(r, pretrained), fresh(r, pretrained)
    ha = fit(a, r, *tiny_data, progress=False)
    hb = fit(b, r, *tiny_data, progress=False)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ha]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in hb]
    assert [h["phase"] for h in ha] == [1, 1, 2, 2] and [h["epoch"] for h in ha] == [1, 2, 3, 4]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_phase_one_leaves_the_base_alone_and_frozen_bn_keeps_its_statistics(pretrained, tiny_data):
    r = preset("seed").with_overrides([*TINY, "finetune_epochs=0"])
    model = fresh(r, pretrained)
    before, head_before = backbone_state(model), [p.clone() for p in model.head.parameters()]
    fit(model, r, *tiny_data, progress=False)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(p, q) for p, q in zip(model.head.parameters(), head_before))

    frozen = preset("seed").with_overrides([*TINY, "head_epochs=0", "finetune_lr=1e-3"])
    model = fresh(frozen, pretrained)
    fit(model, frozen, *tiny_data, progress=False)
    after = model.backbone.state_dict()
    assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])

    trained = frozen.with_overrides(["finetune_bn=train"])
    model = fresh(trained, pretrained)
    fit(model, trained, *tiny_data, progress=False)
    assert not torch.equal(
        model.backbone.state_dict()["bn1.running_mean"], before["bn1.running_mean"]
    )


def test_cosine_schedule_warms_up_and_decays(pretrained):
    r = preset("strong").with_overrides(["finetune_epochs=4", "warmup_epochs=1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = phases.make_schedule(opt, 2, r, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.01) and lrs[-1] < 0.0005
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))


def test_weight_decay_skips_norms_and_biases(pretrained):
    r = preset("strong")
    model = fresh(r, pretrained)
    opt = phases.make_optimizer(phases.set_phase(model, 2, r), 2, r)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == r.weight_decay and plain["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]


def test_non_finite_loss_names_phase_epoch_and_step(pretrained, tiny_data):
    r = preset("seed").with_overrides([*TINY, "head_lr=1e30"])
    with pytest.raises(TrainingError, match=r"phase 1 epoch \d/2, step \d+: non-finite loss"):
        fit(fresh(r, pretrained), r, *tiny_data, progress=False)


@pytest.mark.slow
def test_resume_from_any_epoch_ends_identically(pretrained, tiny_data, tmp_path, monkeypatch):
    r = preset("seed").with_overrides([*TINY, "augment=true", "dropout=0.3"])
    saved = []
    write_with = atomic.write_with

    def keep_each(path, write):
        saved.append(tmp_path / f"ckpt{len(saved)}.pt")
        write_with(saved[-1], write)
        return write_with(path, write)

    monkeypatch.setattr(atomic, "write_with", keep_each)
    full = fresh(r, pretrained)
    history = fit(
        full, r, *tiny_data, saving=Saving(checkpoint=tmp_path / "checkpoint.pt"), progress=False
    )
    assert len(saved) == 4 and (tmp_path / "checkpoint.pt").is_file()
    for k in (0, 2):  # interrupted in phase 1 (after epoch 1) and in phase 2 (after epoch 3)
        state = checkpoint.load_checkpoint(saved[k])
        resumed = fresh(r, pretrained)
        h = fit(resumed, r, *tiny_data, saving=Saving(resume=state), progress=False)
        assert [x["val_loss"] for x in h] == [x["val_loss"] for x in history]
        for (name, va), vb in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(va, vb), (k, name)


def test_resume_with_another_recipe_is_refused(pretrained, tiny_data, tmp_path):
    r = preset("seed").with_overrides([*TINY, "finetune_epochs=0", "head_epochs=1"])
    fit(
        fresh(r, pretrained),
        r,
        *tiny_data,
        saving=Saving(checkpoint=tmp_path / "c.pt"),
        progress=False,
    )
    other = r.with_overrides(["head_lr=0.5"])
    with pytest.raises(TrainingError, match="different recipe"):
        fit(
            fresh(other, pretrained),
            other,
            *tiny_data,
            saving=Saving(resume=checkpoint.load_checkpoint(tmp_path / "c.pt")),
        )


def test_cached_activations_give_the_full_forward_passes_outputs(pretrained, tiny_data):
    r = preset("seed").with_overrides(["resolution=64", "augment=flip", "finetune_from=layer3"])
    model = fresh(r, pretrained).eval()
    images = tiny_data[0][0][:12]
    with torch.no_grad():
        full = model(to_input(images))
        mirrored = model(to_input(images.flip(-1)))
    plain, mirror = inputs.cache_activations(model, images, "stem", "layer3", r, mirrored=True)
    assert plain.shape == (12, 512, 8, 8)  # layer2's output at 64 px
    for cached, expected in ((plain, full), (mirror, mirrored)):
        with torch.no_grad():
            assert torch.allclose(Part(model, "layer3")(cached), expected, atol=1e-5)
    # phase 1's features, computed from the cached activations, are the base's features (up to fp32
    # rounding: the cached steps run with their BatchNorm folded into the convolutions)
    (feats,) = inputs.cache_activations(model, (plain,), "layer3", "head", r)
    with torch.no_grad():
        assert torch.allclose(feats, model.features(to_input(images)), rtol=1e-4, atol=1e-5)


def test_auto_precision_without_bf16_hardware_computes_in_fp32_and_caches_in_bf16(
    pretrained, tiny_data, monkeypatch
):
    # e.g. an Ice Lake Xeon
    monkeypatch.setattr(inference, "native_bf16", lambda device_type: False)
    r = preset("seed").with_overrides(
        [*TINY, "resolution=64", "finetune_from=layer3", "precision=auto"]
    )
    model = fresh(r, pretrained).eval()
    images = tiny_data[0][0][:12]
    (cached,) = inputs.cache_activations(model, images, "stem", "layer3", r)
    with torch.no_grad():
        exact = Part(model, "stem", "layer3")(to_input(images))  # fp32, no autocast
        logits, full = Part(model, "layer3")(cached), model(to_input(images))
    # computed in fp32 (BatchNorm folded) and rounded once: a bf16 step off at most (autocast rounds
    # every block)
    assert cached.dtype == torch.bfloat16 and torch.allclose(
        cached.float(), exact, rtol=2**-7, atol=1e-4
    )
    assert logits.dtype == torch.float32 and torch.allclose(logits, full, atol=1e-2)
    history = fit(model, r, *tiny_data, progress=False)  # the fp32 blocks train on the bf16 cache
    assert len(history) == 4 and all(math.isfinite(h["val_loss"]) for h in history)


def test_only_the_chosen_stages_learn(pretrained, tiny_data):
    r = preset("seed").with_overrides(
        [
            *TINY,
            "head_epochs=1",
            "finetune_from=layer4",
            "finetune_bn=train",
            "augment=flip",
            "finetune_lr=1e-3",
        ]
    )
    model = fresh(r, pretrained)
    names = {n for n, p in model.named_parameters() if p in set(phases.set_phase(model, 2, r))}
    assert names and all(n.startswith(("backbone.layer4.", "head.")) for n in names)
    assert any(n.startswith("backbone.layer4.") for n in names)
    before = backbone_state(model)
    fit(model, r, *tiny_data, progress=False)
    for k, v in model.backbone.state_dict().items():
        changed = not torch.equal(v, before[k])
        if k.startswith("layer4.") and not k.endswith("num_batches_tracked"):
            assert changed, k  # weights and (finetune_bn=train) BatchNorm statistics
        elif not k.startswith("layer4."):
            assert not changed, k  # frozen stages: weights and running statistics untouched


def test_best_val_ships_the_best_validation_epoch(pretrained, tiny_data, tmp_path, monkeypatch):
    r = preset("seed").with_overrides([*TINY, "keep=best_val", "finetune_lr=1e-3"])
    scripted = iter([0.2, 0.6, 0.4, 0.5])  # epoch 2 (the last of phase 1) is the best
    validate = loop._validate
    monkeypatch.setattr(
        loop, "_validate", lambda *a: (lambda v: (v[0], next(scripted), v[2]))(validate(*a))
    )
    saved = []
    write_with = atomic.write_with

    def keep_each(path, write):
        saved.append(tmp_path / f"ckpt{len(saved)}.pt")
        return write_with(saved[-1], write)

    monkeypatch.setattr(atomic, "write_with", keep_each)
    model = fresh(r, pretrained)
    history = fit(
        model, r, *tiny_data, saving=Saving(checkpoint=tmp_path / "checkpoint.pt"), progress=False
    )
    assert [h["shipped"] for h in history] == [False, True, False, False]
    at_epoch_2 = checkpoint.load_checkpoint(saved[1])["model"]
    last = checkpoint.load_checkpoint(saved[3])["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, at_epoch_2[k]), k
    assert any(not torch.equal(v, last[k]) for k, v in model.state_dict().items())
    # the shipped epoch's validation logits are kept, so calibration needs no second pass: they are
    # the model's
    with torch.inference_mode():
        fresh_pass = model(to_input(tiny_data[1][0]))
    torch.testing.assert_close(model.val_logits, fresh_pass, rtol=1e-4, atol=1e-4)

    # resumed after epoch 3, the run still remembers epoch 2 as the best and ships it
    scripted = iter([0.5])
    resumed = fresh(r, pretrained)
    h = fit(
        resumed,
        r,
        *tiny_data,
        saving=Saving(resume=checkpoint.load_checkpoint(saved[2])),
        progress=False,
    )
    assert [x["shipped"] for x in h] == [False, True, False, False]
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, at_epoch_2[k]), k
    # computed before the resume: the run makes one more pass instead
    assert resumed.val_logits is None


def test_each_history_row_follows_its_checkpoint_and_write_errors_stop_training(
    pretrained, tiny_data, tmp_path, monkeypatch
):
    """Checkpoints are written in the background; `on_saved` (history.csv in a run) runs once the
    epoch's checkpoint is in place, and a failed write surfaces in the training loop."""
    r = preset("seed").with_overrides(TINY)
    seen = []

    def on_saved(rows):
        seen.append((len(rows), len(checkpoint.load_checkpoint(tmp_path / "c.pt")["history"])))

    fit(
        fresh(r, pretrained),
        r,
        *tiny_data,
        saving=Saving(checkpoint=tmp_path / "c.pt", on_saved=on_saved),
        progress=False,
    )
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(atomic.DiskFullError, match=r"d\.pt: no space left on device"):
        fit(
            fresh(r, pretrained),
            r,
            *tiny_data,
            saving=Saving(checkpoint=tmp_path / "d.pt"),
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_compile_builds_one_graph_per_phase_and_module_mode(pretrained, tiny_data, monkeypatch):
    """Ragged last batches (40 % 24 = 16 training images, 20 % 7 = 6 validation images) and the
    evaluation batch size reuse their mode's graph: two phases x (training, evaluation) = 4
    graphs, counted at the backend. (Convolutions guard a dynamic batch at >= 16 on the CPU: a
    ragged training batch below 16 compiles once more. The presets' ragged batches are 16: 10,000
    % 32, % 64 and % 128.)"""
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda module, mode=None: compile_(module, backend=counting)
    )
    torch._dynamo.reset()
    r = preset("seed").with_overrides(
        [*TINY, "batch_size=24", "eval_batch_size=7", "finetune_from=layer4.2", "compile=default"]
    )
    history = fit(fresh(r, pretrained), r, *tiny_data, progress=False)
    eager = fit(fresh(r, pretrained), r.with_overrides(["compile=off"]), *tiny_data, progress=False)
    assert len(graphs) == 4
    assert [h["val_loss"] for h in history] == pytest.approx(
        [h["val_loss"] for h in eager], rel=1e-5
    )


def test_without_caching_the_frozen_stages_run_every_step_to_the_same_result(pretrained, tiny_data):
    r = preset("seed").with_overrides([*TINY, "finetune_from=layer4.2"])
    cached = fit(fresh(r, pretrained), r, *tiny_data, progress=False)
    plain = fit(fresh(r, pretrained), r.with_overrides(["cache=false"]), *tiny_data, progress=False)
    assert [h["val_loss"] for h in plain] == pytest.approx(
        [h["val_loss"] for h in cached], rel=1e-4
    )


@pytest.mark.parametrize(
    ("mode", "precision"),
    [("default", "fp32"), ("reduce-overhead", "bf16"), ("max-autotune", "fp32")],
)
@pytest.mark.slow
def test_inductor_compiled_training_matches_eager(pretrained, tiny_data, mode, precision):
    """Every compile mode the recipe accepts trains through inductor (which runs on the CPU too) to
    the eager loop's results, within the precision's tolerance.

    Phase 2 alone (a residual block and the head): phase 1's head is the same kind of graph,
    smaller, and each graph costs seconds of C++ compilation.
    """
    r = preset("seed").with_overrides(
        [
            *TINY,
            "head_epochs=0",
            "finetune_epochs=1",
            "finetune_from=layer4.2",
            f"precision={precision}",
            f"compile={mode}",
        ]
    )
    torch._dynamo.reset()
    compiled = fit(fresh(r, pretrained), r, *tiny_data, progress=False)
    eager = fit(fresh(r, pretrained), r.with_overrides(["compile=off"]), *tiny_data, progress=False)
    tolerance = 2e-2 if precision == "bf16" else 1e-3
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in compiled] == pytest.approx(
            [h[key] for h in eager], rel=tolerance
        ), key


def test_consistency_changes_phase_2_alone(pretrained, tiny_data):
    lean = preset("lean").with_overrides(
        [
            *TINY,
            "resolution=32",
            "precision=fp32",
            "augment=flip+augmix",
            "head_epochs=1",
            "finetune_epochs=1",
        ]
    )
    plain = fit(fresh(lean, pretrained), lean, *tiny_data, progress=False)
    consistent = lean.with_overrides(["consistency=12"])
    history = fit(fresh(consistent, pretrained), consistent, *tiny_data, progress=False)
    assert [h["phase"] for h in history] == [1, 2]
    # phase 1 trains the head on flips alone
    assert history[0]["train_loss"] == plain[0]["train_loss"]
    assert history[1]["train_loss"] != plain[1]["train_loss"]

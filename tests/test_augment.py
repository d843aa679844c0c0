import math

import pytest
import torch
import torch.nn.functional as F

from cifar_transfer.data.augment import PAD, as_tensors, augment, random_crop_flip, to_input


def test_every_output_is_a_crop_of_the_padded_image_flipped_or_not():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x.float(), (PAD,) * 4, mode="reflect").to(torch.uint8)
    flips, offsets = 0, set()
    for i in range(len(x)):
        found = None
        for dy in range(2 * PAD + 1):
            for dx in range(2 * PAD + 1):
                crop = padded[i, :, dy : dy + 32, dx : dx + 32]
                if torch.equal(out[i], crop):
                    found = (dy, dx, False)
                elif torch.equal(out[i], crop.flip(-1)):
                    found = (dy, dx, True)
        assert found is not None, f"image {i} is not a (flipped) crop"
        flips += found[2]
        offsets.add(found[:2])
    assert 16 < flips < 48  # about half are flipped
    assert len(offsets) > 20  # offsets vary


def test_same_generator_seed_same_augmentation():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["flip+noise", "flip+augmix"])
def test_uncached_shifts_replace_about_a_third_of_a_flipped_batch(kind):
    x = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8)
    out = augment(x.clone(), kind, torch.Generator().manual_seed(5))
    assert torch.equal(out, augment(x.clone(), kind, torch.Generator().manual_seed(5)))
    flipped = [torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1)) for i in range(60)]
    assert 10 <= flipped.count(False) <= 30


def test_to_input_scales_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_input(x), torch.tensor([0.0, 0.2, 1.0]))


def test_the_shifted_copy_is_cifar10c_noise_or_contrast_and_reproducible():
    from cifar_transfer.data.augment import CONTRAST, NOISE_SIGMA, shifted

    grey = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    a = shifted(grey, torch.Generator().manual_seed(3))
    assert torch.equal(a, shifted(grey, torch.Generator().manual_seed(3)))
    spread = (a.float() / 255).flatten(1).std(1)
    # a flat grey image keeps its level under contrast, and gets noise otherwise
    noisy = spread > 0.01
    assert 0.4 < noisy.float().mean() < 0.6
    assert torch.equal(a[~noisy], grey[~noisy])
    assert spread[noisy].min() > 0.8 * min(NOISE_SIGMA) and spread[noisy].max() < 1.2 * max(
        NOISE_SIGMA
    )
    two_levels = torch.zeros(400, 3, 32, 32, dtype=torch.uint8)
    two_levels[..., 16:] = 200
    b = shifted(two_levels, torch.Generator().manual_seed(3)).float()
    spread = (b[..., 16:].mean((1, 2, 3)) - b[..., :16].mean((1, 2, 3))) / 200
    factors = spread[~noisy]  # the same draws as above: these images got contrast, not noise
    assert all(min(abs(f - c) for c in CONTRAST) < 0.01 for f in factors.tolist())
    assert set(CONTRAST) == {
        c for c in CONTRAST if any(abs(f - c) < 0.01 for f in factors.tolist())
    }


def test_flip_noise_caches_three_views_and_draws_each(pretrained, cifar):
    from cifar_transfer.model.network import build_model
    from cifar_transfer.recipe import preset
    from cifar_transfer.training.distributed import ALONE
    from cifar_transfer.training.inputs import PhaseInputs, draw_batch

    r = preset("lean").with_overrides(
        ["augment=flip+noise", "resolution=32", "precision=fp32", "train_size=20", "val_size=10"]
    )
    x, _ = as_tensors(cifar[0].images[:20], cifar[0].labels[:20], torch.device("cpu"))
    v, _ = as_tensors(cifar[0].images[20:30], cifar[0].labels[20:30], torch.device("cpu"))
    inputs = PhaseInputs(build_model(r, pretrained).eval(), r, x, v, ALONE, progress=False)
    (train, val), begin = inputs.for_phase(2)
    assert begin == "layer3.3" and len(train) == 3 and len(val) == 1
    assert not torch.equal(train[2], train[0]) and not torch.equal(train[2], train[1])
    batch = draw_batch(train, torch.arange(20), torch.Generator().manual_seed(0), r).inputs
    picked = {next(k for k in range(3) if torch.equal(batch[i], train[k][i])) for i in range(20)}
    assert picked == {0, 1, 2}


def test_augmix_is_seeded_per_image_and_keeps_the_image_recognisable(cifar):
    from cifar_transfer.data.augment import augmixed

    x, _ = as_tensors(cifar[0].images[:16], cifar[0].labels[:16], torch.device("cpu"))
    a = augmixed(x, torch.Generator().manual_seed(0))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, augmixed(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augmixed(x, torch.Generator().manual_seed(1)))
    changed = (a.float() - x.float()).abs().mean((1, 2, 3))
    assert (changed > 0).sum() >= 14  # each image its own mix: nearly all change ...
    # ... by different amounts (one chain for the whole batch would change them alike), and the mix
    # keeps the original's weight: each stays closer to its own image than to another
    assert changed.std() > 1
    other = (a.float() - x.roll(1, 0).float()).abs().mean((1, 2, 3))
    assert (changed < other).float().mean() >= 0.8
    assert len(augmixed(x[:0], torch.Generator())) == 0


def augmix_inputs(pretrained, cifar, *overrides):
    """`lean` at 32 px on 30 images with augment=flip+augmix: phase 2's training inputs (checked to
    be a FreshAugMix, beside flips alone in phase 1), the recipe, a copy of the cached activations
    and the PhaseInputs."""
    from cifar_transfer.model.network import build_model
    from cifar_transfer.recipe import preset
    from cifar_transfer.training.distributed import ALONE
    from cifar_transfer.training.inputs import FreshAugMix, PhaseInputs

    r = preset("lean").with_overrides(
        [
            "augment=flip+augmix",
            "resolution=32",
            "precision=fp32",
            "train_size=30",
            "val_size=10",
            *overrides,
        ]
    )
    x, _ = as_tensors(cifar[0].images[:30], cifar[0].labels[:30], torch.device("cpu"))
    v, _ = as_tensors(cifar[0].images[30:40], cifar[0].labels[30:40], torch.device("cpu"))
    inputs = PhaseInputs(build_model(r, pretrained).eval(), r, x, v, ALONE, progress=False)
    (head_train, _), begin = inputs.for_phase(1)
    assert begin == "head" and isinstance(head_train, tuple) and len(head_train) == 2  # flips alone
    (train, val), begin = inputs.for_phase(2)
    assert (
        begin == "layer3.3"
        and isinstance(train, FreshAugMix)
        and len(train.cached) == 2
        and len(val) == 1
    )
    return train, r, [view.clone() for view in train.cached], inputs


def nearest_image(row, cached):
    """The index of the training image whose cached view (either) is nearest to `row`."""
    return torch.stack([(row - view).flatten(1).norm(dim=1) for view in cached]).amin(0).argmin()


def test_flip_augmix_draws_a_fresh_third_through_the_frozen_steps_in_phase_2(pretrained, cifar):
    from cifar_transfer.training.distributed import ALONE
    from cifar_transfer.training.inputs import PhaseInputs, draw_batch

    train, r, cached, inputs = augmix_inputs(pretrained, cifar)
    batches = [
        draw_batch(train, torch.arange(30), torch.Generator().manual_seed(s), r).inputs
        for s in (0, 1)
    ]
    for batch in batches:
        kept = [any(torch.equal(batch[i], view[i]) for view in cached) for i in range(30)]
        assert 3 <= kept.count(False) <= 20  # about a third drawn anew ...
    # ... never written into the cache
    assert all(torch.equal(a, b) for a, b in zip(cached, train.cached))
    i = next(
        i for i in range(30) if not any(torch.equal(batches[0][i], view[i]) for view in cached)
    )
    # a fresh row is what the frozen steps make of an AugMix of that image: nearer its own than any
    # other's
    assert nearest_image(batches[0][i], cached) == i
    assert not torch.equal(batches[0], batches[1])
    # nothing cached when the whole network trains: the step's own augmentation draws the AugMix
    # third
    whole = r.with_overrides(["finetune_from=stem"])
    x, v = inputs.images
    (images, _), begin = PhaseInputs(inputs.model, whole, x, v, ALONE, progress=False).for_phase(2)
    assert begin == "stem" and images is x


def test_consistency_keeps_the_clean_batch_and_adds_two_mixes_of_a_third(pretrained, cifar):
    from cifar_transfer.training.inputs import draw_batch

    train, r, cached, _ = augmix_inputs(pretrained, cifar, "consistency=12")
    batch = draw_batch(train, torch.arange(30), torch.Generator().manual_seed(0), r)
    clean, first, second = batch.inputs[:30], *batch.inputs[30:].chunk(2)
    # nothing replaced
    assert all(any(torch.equal(clean[i], view[i]) for view in cached) for i in range(30))
    assert 3 <= len(batch.mixed) <= 20 and len(first) == len(second) == len(batch.mixed)
    for image, a, b in zip(batch.mixed, first, second):
        assert not torch.equal(a, b)  # two mixes of one image, each nearest that image
        assert nearest_image(a, cached) == image and nearest_image(b, cached) == image


def test_consistency_loss_is_the_jensen_shannon_divergence_of_the_three_predictions():
    from cifar_transfer.recipe import preset
    from cifar_transfer.training.losses import js_divergence, training_loss

    z = torch.randn(6, 10)
    assert js_divergence(z, z, z) == pytest.approx(0, abs=1e-6)
    sure = 50 * torch.eye(10)[:3]  # three confident predictions of three different classes
    assert js_divergence(sure[:1], sure[1:2], sure[2:]) == pytest.approx(math.log(3), abs=1e-3)
    a, b, c = torch.randn(3, 6, 10)
    assert 0 < js_divergence(a, b, c) == pytest.approx(js_divergence(c, a, b).item())

    r = preset("lean").with_overrides(["augment=flip+augmix", "consistency=12"])
    y, mixed = torch.randint(0, 10, (6,)), torch.tensor([1, 4])
    plain = F.cross_entropy(z, y, label_smoothing=r.label_smoothing)
    assert training_loss(z, y, None, r) == pytest.approx(plain.item())
    agreeing = torch.cat([z, z[mixed], z[mixed]])
    assert training_loss(agreeing, y, mixed, r) == pytest.approx(plain.item(), abs=1e-5)
    apart = torch.cat([z, b[:2], c[:2]])
    expected = plain + 12 * js_divergence(z[mixed], b[:2], c[:2])
    assert training_loss(apart, y, mixed, r) == pytest.approx(expected.item())

import torch
import torch.nn.functional as F

from cifar_transfer.data.augment import PAD, as_tensors, random_crop_flip, to_input


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


def test_to_input_scales_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_input(x), torch.tensor([0.0, 0.2, 1.0]))


def test_the_shifted_copy_is_cifar10c_noise_or_contrast_and_reproducible():
    from cifar_transfer.data.augment import CONTRAST, NOISE_SIGMA, shifted

    grey = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    a = shifted(grey, torch.Generator().manual_seed(3))
    assert torch.equal(a, shifted(grey, torch.Generator().manual_seed(3)))
    spread = (a.float() / 255).flatten(1).std(1)
    noisy = spread > 0.01  # a flat grey image keeps its level under contrast, and gets noise otherwise
    assert 0.4 < noisy.float().mean() < 0.6
    assert torch.equal(a[~noisy], grey[~noisy])
    assert spread[noisy].min() > 0.8 * min(NOISE_SIGMA) and spread[noisy].max() < 1.2 * max(NOISE_SIGMA)
    two_levels = torch.zeros(400, 3, 32, 32, dtype=torch.uint8)
    two_levels[..., 16:] = 200
    b = shifted(two_levels, torch.Generator().manual_seed(3)).float()
    spread = (b[..., 16:].mean((1, 2, 3)) - b[..., :16].mean((1, 2, 3))) / 200
    factors = spread[~noisy]  # the same draws as above: these images got contrast, not noise
    assert all(min(abs(f - c) for c in CONTRAST) < 0.01 for f in factors.tolist())
    assert set(CONTRAST) == {c for c in CONTRAST if any(abs(f - c) < 0.01 for f in factors.tolist())}


def test_flip_noise_caches_three_views_and_draws_each(pretrained, cifar):
    from cifar_transfer.model.network import build_model
    from cifar_transfer.recipe import preset
    from cifar_transfer.training.distributed import ALONE
    from cifar_transfer.training.loop import PhaseInputs, _batch

    r = preset("lean").with_overrides(
        ["augment=flip+noise", "resolution=32", "precision=fp32", "train_size=20", "val_size=10"]
    )
    x, _ = as_tensors(cifar[0].images[:20], cifar[0].labels[:20], torch.device("cpu"))
    v, _ = as_tensors(cifar[0].images[20:30], cifar[0].labels[20:30], torch.device("cpu"))
    inputs = PhaseInputs(build_model(r, pretrained).eval(), r, x, v, ALONE, progress=False)
    (train, val), begin = inputs.for_phase(2)
    assert begin == "layer3.3" and len(train) == 3 and len(val) == 1
    assert not torch.equal(train[2], train[0]) and not torch.equal(train[2], train[1])
    batch = _batch(train, torch.arange(20), torch.Generator().manual_seed(0), r)
    picked = {next(k for k in range(3) if torch.equal(batch[i], train[k][i])) for i in range(20)}
    assert picked == {0, 1, 2}

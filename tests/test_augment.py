import torch
import torch.nn.functional as F

from cifar_transfer.data.augment import PAD, random_crop_flip, to_input


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

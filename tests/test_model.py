import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cifar_transfer.model.inference import autocast, computes_in_bf16, native_bf16
from cifar_transfer.model.network import build_model, for_inference, load_model, place, save_model
from cifar_transfer.model.weights import IMAGENET, WeightsError, load_pretrained
from cifar_transfer.recipe import preset


def test_shared_weights_load_with_v1_strides_and_their_own_normalisation(pretrained):
    assert pretrained.stride_in_1x1
    assert pretrained.mean == pytest.approx((0.485, 0.456, 0.406))
    model = build_model(preset("seed"), pretrained)
    for layer in (model.backbone.layer2, model.backbone.layer3, model.backbone.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert model.backbone.layer1[0].conv1.stride == (1, 1)
    assert torch.equal(model.backbone.conv1.weight, pretrained.state_dict["conv1.weight"])
    assert model.backbone.conv1.weight.dtype == torch.float32  # fp16 file, float32 model


def test_head_shape_and_resolution(pretrained):
    r = preset("seed").with_overrides(["dropout=0.2", "resolution=64"])
    model = build_model(r, pretrained).eval()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 128), (128, 64), (64, 10)]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.head)
    seen = []
    model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert seen[0][-2:] == (64, 64)  # upsampled inside the model


def test_save_and_load_gives_the_same_function(pretrained, tmp_path):
    r = preset("smoke").with_overrides(["memory_format=channels_last"])
    torch.manual_seed(0)
    model = place(build_model(r, pretrained), r, torch.device("cpu")).eval()
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model.temperature = 2.5
    save_model(model, r, tmp_path / "model.safetensors")
    loaded, recipe = load_model(tmp_path / "model.safetensors")
    assert recipe == r and loaded.temperature == 2.5
    loaded = place(loaded, recipe, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    sd, meta = (
        load_file(tmp_path / "model.safetensors"),
        safe_open(tmp_path / "model.safetensors", "pt").metadata(),
    )
    for bad in ("-1", "0", "NaN", '"hot"', "[1]"):
        save_file(sd, tmp_path / "bad.safetensors", metadata=meta | {"temperature": bad})
        with pytest.raises(WeightsError, match=r"metadata temperature=.* is not a positive number"):
            load_model(tmp_path / "bad.safetensors")


def test_the_inference_copy_folds_every_batchnorm_and_keeps_the_function(pretrained):
    r = preset("smoke").with_overrides(["memory_format=channels_last"])
    model = build_model(r, pretrained).eval()
    model.temperature = 1.7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inference = for_inference(model, r, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inference.backbone.modules())
    assert inference.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert inference.temperature == 1.7
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        # the same function, up to rounding
        assert torch.allclose(inference(x), model(x), rtol=1e-4, atol=1e-4)
    # the trained model is untouched: it is what model.safetensors keeps
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules()) == 53
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def resnet_state() -> dict[str, torch.Tensor]:
    from torchvision.models import resnet50

    return {k: v.half() for k, v in resnet50().state_dict().items()}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda sd: sd.pop("layer3.2.conv2.weight"), "missing keys \\['layer3.2.conv2.weight'\\]"),
        (
            lambda sd: sd.update({"extra.weight": torch.zeros(1)}),
            "unexpected keys \\['extra.weight'\\]",
        ),
        (
            lambda sd: sd.update({"bn1.weight": torch.zeros(32)}),
            "bn1.weight has shape \\(32,\\), expected \\(64,\\)",
        ),
        (
            lambda sd: sd["layer1.0.conv1.weight"].view(-1).__setitem__(0, float("nan")),
            "non-finite",
        ),
        (
            lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].to(torch.int16)}),
            "conv1.weight has dtype int16, expected a floating-point tensor",
        ),
        (
            lambda sd: sd["layer2.0.bn1.running_var"].fill_(-1),
            "layer2.0.bn1.running_var holds negative variances",
        ),
        ({"input_std": "0,0,0"}, "input_std='0,0,0': each value must be in \\(0, 1\\]"),
        (
            {"input_mean": "0.5,nan,0.4"},
            "input_mean='0.5,nan,0.4': each value must be in \\[0, 1\\]",
        ),
        ({"input_mean": "120,115,100"}, "input_mean='120,115,100'"),
        ({"stride_in_1x1": "yes"}, "stride_in_1x1='yes'"),
    ],
)
def test_bad_safetensors_weights_are_named(tmp_path, change, fragment):
    sd = resnet_state()
    if callable(change):
        change(sd)
    path = tmp_path / "w.safetensors"
    save_file(sd, path, metadata=None if callable(change) else change)
    with pytest.raises(WeightsError, match=fragment) as e:
        load_pretrained(path)
    assert str(path) in str(e.value)


def test_a_pth_state_dict_loads(tmp_path):
    sd = resnet_state()
    torch.save(sd, tmp_path / "w.pth")
    p = load_pretrained(tmp_path / "w.pth")
    assert not p.stride_in_1x1 and torch.equal(p.state_dict["bn1.bias"], sd["bn1.bias"].float())


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path, capsys):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_pretrained(tmp_path / "evil.pth")
    assert "never run" not in capsys.readouterr().out
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="expected a state_dict"):
        load_pretrained(tmp_path / "list.pth")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_pretrained(tmp_path / "junk.safetensors")


def test_torchvision_weights_download_from_a_loopback_server(http_root, tmp_path, monkeypatch):
    root, url = http_root
    sd = resnet_state()
    torch.save(sd, tmp_path / "w.pth")
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    name = f"resnet50-{digest[:8]}.pth"  # torch.hub checks the hash prefix in the file name
    (root / name).write_bytes((tmp_path / "w.pth").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    p = load_pretrained(IMAGENET, url=f"{url}/{name}")
    assert p.source == "torchvision" and not p.stride_in_1x1
    assert torch.equal(p.state_dict["conv1.weight"], sd["conv1.weight"].float())
    (root / "resnet50-00000000.pth").write_bytes((tmp_path / "w.pth").read_bytes())
    with pytest.raises(WeightsError, match="could not download"):
        load_pretrained(IMAGENET, url=f"{url}/resnet50-00000000.pth")


def test_loading_a_file_that_is_not_ours(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="not a model saved by cifar-transfer"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(False, False), (True, False), (False, True)])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    native_bf16.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert computes_in_bf16(cpu, "auto") == (amx or avx512_bf16)
        assert computes_in_bf16(cpu, "bf16") and not computes_in_bf16(cpu, "fp32")
        with autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == (amx or avx512_bf16)
    finally:
        native_bf16.cache_clear()  # the next test sees the real CPU
    assert preset("lean").precision == preset("strong").precision == "auto"

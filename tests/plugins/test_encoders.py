"""corex_encoders: pyramid shapes, torchvision-compatible names, weight loading."""

from __future__ import annotations

import math

import pytest
import torch

import corex_encoders
import corex_encoders.densenet
import corex_encoders.resnet
from corex.interfaces import Encoder
from corex.testing import assert_mirrors
from corex_encoders import densenet121, resnet18, resnet34, resnet50

ENCODERS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "densenet121": densenet121}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_hook_registers_every_encoder():
    assert corex_encoders.corex_encoders() == ENCODERS


@pytest.mark.parametrize("name", ENCODERS)
def test_each_light_factory_has_its_implementations_options(name):
    implementation = getattr(corex_encoders.resnet, name, None) or getattr(corex_encoders.densenet, name)
    assert_mirrors(ENCODERS[name], implementation)
    assert corex_encoders.ResNet is corex_encoders.resnet.ResNet and corex_encoders.DenseNet is corex_encoders.densenet.DenseNet


@pytest.mark.parametrize("name", ENCODERS)
def test_pyramid_matches_channels_and_strides(name):
    encoder = ENCODERS[name](width=8)
    assert isinstance(encoder, Encoder)
    assert (encoder.arch, encoder.in_channels) == (name, 1)
    assert tuple(encoder.strides) == (2, 4, 8, 16, 32)
    pyramid = encoder(torch.rand(2, 1, 64, 64))
    assert [tuple(f.shape) for f in pyramid] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(encoder.channels, encoder.strides)
    ]


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", (64, 64, 128, 256, 512)),
        ("resnet34", (64, 64, 128, 256, 512)),
        ("resnet50", (64, 256, 512, 1024, 2048)),
        ("densenet121", (64, 256, 512, 1024, 1024)),
    ],
)
def test_standard_width_channels(name, channels):
    assert ENCODERS[name]().channels == channels


@pytest.mark.parametrize(
    ("name", "count"),
    # torchvision's published totals minus the ImageNet classifier (512*1000+1000, 2048*1000+1000,
    # 1024*1000+1000): 11,689,512, 25,557,032 and 7,978,856 parameters.
    [("resnet18", 11_176_512), ("resnet50", 23_508_032), ("densenet121", 6_953_856)],
)
def test_standard_parameter_counts(name, count):
    assert n_params(ENCODERS[name](in_channels=3)) == count


def test_resnet18_uses_torchvision_names():
    state = resnet18(in_channels=3).state_dict()
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.bias": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    # torchvision's resnet18 has 122 entries, two of them fc.weight and fc.bias.
    assert len(state) == 120
    assert not any(k.startswith(("fc.", "layer1.0.downsample")) for k in state)


def test_resnet50_uses_torchvision_names():
    encoder = resnet50()
    state = encoder.state_dict()
    expected = {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),  # v1.5: the stride sits in the 3x3
        "layer4.2.bn3.weight": (2048,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert tuple(encoder.layer2[0].conv2.stride) == (2, 2)


def test_densenet121_uses_torchvision_names():
    state = densenet121(in_channels=3).state_dict()
    expected = {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.norm0.weight": (64,),
        "features.denseblock1.denselayer1.norm1.weight": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.denseblock1.denselayer6.conv2.weight": (32, 128, 3, 3),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.denseblock3.denselayer24.norm1.weight": (992,),
        "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
        "features.norm5.weight": (1024,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not any(k.startswith("classifier") for k in state)


def test_torchvision_initialisation():
    encoder = resnet18()
    conv = encoder.layer4[1].conv2.weight
    fan_out = 512 * 3 * 3
    assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.all(encoder.layer1[0].bn2.weight == 1) and torch.all(encoder.layer1[0].bn2.bias == 0)


def torchvision_style_file(model, path, classifier: str, classes_in: int):
    """Save ``model`` as torchvision publishes it: a classifier, no num_batches_tracked."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state[f"{classifier}.weight"] = torch.randn(1000, classes_in)
    state[f"{classifier}.bias"] = torch.randn(1000)
    torch.save(state, path)
    return state


def randomise_batchnorm(model):
    """Give BN non-trivial statistics so that a wrong load would show in the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_rgb_weights_fold_into_one_channel(tmp_path):
    rgb = randomise_batchnorm(resnet18(in_channels=3, width=8))
    state = torchvision_style_file(rgb, tmp_path / "resnet18.pth", "fc", 64)

    grey = resnet18(width=8, weights=tmp_path / "resnet18.pth").eval()

    assert torch.equal(grey.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(grey.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    # The reason for summing: a grey image replicated to RGB gets the same features.
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected, actual = rgb(image.expand(-1, 3, -1, -1)), grey(image)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_densenet_legacy_keys_load(tmp_path):
    source = randomise_batchnorm(densenet121(width=8))
    state = torchvision_style_file(source, tmp_path / "plain.pth", "classifier", 64)
    # torchvision's published DenseNet files spell denselayer modules "norm.1", "conv.2", ...
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    assert any(".denselayer1.norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "legacy.pth")

    loaded = densenet121(width=8, weights=tmp_path / "legacy.pth").eval()

    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        for e, a in zip(source(image), loaded(image)):
            assert torch.equal(a, e)


def test_corex_export_loads_and_checks_arch(tmp_path):
    source = resnet34(width=8)
    torch.save({"arch": "resnet34", "state_dict": source.state_dict()}, tmp_path / "export.pt")
    loaded = resnet34(width=8, weights=tmp_path / "export.pt")
    assert torch.equal(loaded.layer4[2].conv2.weight, source.layer4[2].conv2.weight)

    torch.save({"arch": "resnet18", "state_dict": resnet18(width=8).state_dict()}, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="'resnet18' encoder, not 'resnet34'"):
        resnet34(width=8, weights=tmp_path / "r18.pt")


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "bad.pth"
    state = resnet18(width=8).state_dict()
    del state["layer2.1.bn1.weight"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, path)
    expected = r"bad\.pth does not fit resnet18: missing layer2\.1\.bn1\.weight; unexpected head\.weight"
    with pytest.raises(ValueError, match=expected):
        resnet18(width=8, weights=path)

    torch.save(resnet18(width=16).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch conv1\.weight \(16, 1, 7, 7\) != \(8, 1, 7, 7\)"):
        resnet18(width=8, weights=path)

    torch.save(resnet18(width=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit resnet50: missing .* \(and \d+ more\)"):
        resnet50(width=8, weights=path)

    with pytest.raises(ValueError, match="does not exist"):
        resnet18(weights=tmp_path / "nowhere.pth")


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        (resnet18, {"width": 0}, "width must be at least 1, got 0"),
        (resnet50, {"in_channels": 0}, "in_channels must be at least 1, got 0"),
        (densenet121, {"width": 9}, "width must be an even number"),
    ],
)
def test_bad_options(factory, options, message):
    with pytest.raises(ValueError, match=message):
        factory(**options)


def test_three_channel_encoder_takes_rgb():
    pyramid = resnet18(in_channels=3, width=8)(torch.rand(2, 3, 32, 32))
    assert pyramid[-1].shape == (2, 64, 1, 1)

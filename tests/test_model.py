"""The U-Net: the paper's facts, shapes for both paddings, size helpers, init, gradients."""

import math

import pytest
import torch

from napari_unet.config import ConfigError, ModelConfig
from napari_unet.model import InvalidInputSizeError, UNet


@pytest.fixture(scope="module")
def paper_net():
    return UNet(in_channels=1, n_classes=2, depth=5, base_filters=64, padding="valid", batch_norm=False)


def test_paper_network_facts(paper_net):
    assert paper_net.n_parameters() == 31_030_658
    assert paper_net.n_conv_layers() == 23
    assert paper_net.output_size(572) == 388
    assert paper_net.margin() == 92
    with torch.inference_mode():
        out = paper_net(torch.zeros(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("up_mode", ["transpose", "bilinear"])
def test_valid_shapes_match_helpers(depth, width, up_mode):
    net = UNet(2, 3, depth=depth, base_filters=width, padding="valid", up_mode=up_mode).eval()
    sizes = net.valid_input_sizes(1, 200)
    assert sizes, "some valid size below 200"
    # valid sizes are spaced by 2 ** (depth - 1), and the margin is constant
    assert all(b - a == 2 ** (depth - 1) for a, b in zip(sizes, sizes[1:]))
    h, w = sizes[0], sizes[min(2, len(sizes) - 1)]
    with torch.inference_mode():
        out = net(torch.randn(1, 2, h, w))
    assert out.shape == (1, 3, *net.output_shape((h, w)))
    assert h - out.shape[2] == 2 * net.margin()
    assert w - out.shape[3] == 2 * net.margin()


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_same_padding_keeps_size(depth, batch_norm):
    net = UNet(1, 4, depth=depth, base_filters=4, padding="same", batch_norm=batch_norm).eval()
    m = 2 ** (depth - 1)
    for h, w in [(m * 3, m * 5), (64, 48)]:
        with torch.inference_mode():
            out = net(torch.randn(2, 1, h, w))
        assert out.shape == (2, 4, h, w)
    assert net.margin() == 0
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in net.modules()) == batch_norm


def test_odd_sizes_rejected_with_nearest_sizes(paper_net):
    with pytest.raises(InvalidInputSizeError, match=r"nearest valid sizes are 572 and 588"):
        paper_net(torch.zeros(1, 1, 573, 572))
    with pytest.raises(InvalidInputSizeError, match=r"smallest valid size is 188"):
        paper_net.check_input_shape((100, 188))
    same = UNet(1, 2, depth=4, base_filters=4, padding="same")
    with pytest.raises(InvalidInputSizeError, match=r"multiple of 8.*56 and 64"):
        same(torch.zeros(1, 1, 60, 64))
    assert paper_net.valid_input_size(573) == 588
    assert paper_net.valid_input_size(573, "down") == 572


def test_forward_backward_updates_every_parameter():
    torch.manual_seed(0)
    net = UNet(1, 3, depth=3, base_filters=8, padding="valid")
    x = torch.randn(2, 1, 92, 92)
    out = net(x)
    target = torch.randint(0, 3, out.shape[:1] + out.shape[2:])
    loss = torch.nn.functional.cross_entropy(out, target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_he_initialisation_std():
    torch.manual_seed(0)
    net = UNet(1, 2, depth=5, base_filters=64)
    conv = net.downs[2][1][0]  # a 3x3 conv with 128 input channels
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    up = net.ups[0].up
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / up.in_channels), rel=0.02)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_dropout_only_in_training():
    net = UNet(1, 2, depth=3, base_filters=4, padding="same", dropout=0.5)
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("bad", [dict(depth=0), dict(padding="full"), dict(up_mode="nearest"), dict(dropout=1.0),
                                 dict(base_filters=2.5), dict(n_classes=0)])
def test_bad_arguments_rejected(bad):
    with pytest.raises(ConfigError):
        UNet(**{**dict(in_channels=1, n_classes=2), **bad})


def test_config_round_trip():
    net = UNet(3, 4, depth=3, base_filters=8, padding="same", batch_norm=True, up_mode="bilinear", dropout=0.1)
    cfg = ModelConfig.from_dict({**net.config.to_dict(), "unknown_future_key": 1})
    assert cfg == net.config
    assert UNet.from_config(cfg).n_parameters() == net.n_parameters()

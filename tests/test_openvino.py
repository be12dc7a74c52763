"""OpenVINO as predict's CPU back-end (napari_unet.openvino_backend; the [openvino] extra)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from napari_unet import device as dev
from napari_unet import inference as inf
from napari_unet import openvino_backend as ovb
from napari_unet.config import ConfigError, PredictConfig
from napari_unet.model import UNet

if not ovb.openvino_available():
    pytest.skip("the openvino extra is not installed", allow_module_level=True)
ovb.import_openvino()  # first, as napari-unet does: its telemetry stays off in this process too


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test with an empty cache folder and no decision remembered."""
    monkeypatch.setenv("NAPARI_UNET_CACHE", str(tmp_path / "cache"))
    ovb.clear_memory_cache()
    yield
    ovb.clear_memory_cache()


def _net(padding: str, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(1, 3, depth=3, base_filters=4, padding=padding, batch_norm=padding == "same").eval()


@pytest.mark.parametrize("padding,depth", [("valid", 3), ("valid", 4), ("same", 3)])
def test_openvino_gives_torchs_probabilities_and_labels(padding, depth):
    """fp32 on OpenVINO: the probabilities of torch's path (to float32 rounding) and the same labels,
    over several overlapping tiles, for both U-Net forms (a depth-4 valid network has no valid
    64 px input: the conversion must pick one)."""
    img = np.random.default_rng(1).integers(0, 3000, (100, 140)).astype(np.uint16)
    torch.manual_seed(0)
    net = UNet(1, 3, depth=depth, base_filters=4, padding=padding, batch_norm=padding == "same").eval()
    with torch.no_grad():  # a bias towards the interior class: cells to label, not an empty image
        net.outc.bias.copy_(torch.tensor([0.0, 0.3, -2.0]))
    cfg = dict(precision="fp32", tile_size=96 if depth == 4 else 64, probabilities=True, output="instances",
               device="cpu", min_size=0)
    a = inf.predict_all(net, img, PredictConfig(backend="torch", **cfg), {"mode": "instances"})
    b = inf.predict_all(net, img, PredictConfig(backend="openvino", **cfg), {"mode": "instances"})
    assert (a.backend, b.backend) == ("torch", "openvino")
    np.testing.assert_allclose(b.probabilities, a.probabilities, atol=2e-5)
    assert a.labels.max() >= 1
    assert (b.labels == a.labels).mean() > 0.999


def test_the_converted_network_is_kept_and_reused(monkeypatch):
    net = inf._replica(_net("same"), torch.device("cpu"))
    x = torch.rand(1, 1, 64, 96)
    first = ovb.openvino_runner(net, 1, "fp32")(x)
    assert len(list(ovb.cache_folder().glob("*/model.xml"))) == 1
    ov = ovb.import_openvino()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(ov, "convert_model", no_conversion)
        again = ovb.openvino_runner(net, 1, "fp32")(x)
    torch.testing.assert_close(again, first)
    other = inf._replica(_net("same", seed=1), torch.device("cpu"))  # other weights: another entry
    ovb.openvino_runner(other, 1, "fp32")(x)
    assert len(list(ovb.cache_folder().glob("*/model.xml"))) == 2


def test_auto_weighs_the_time_saved_against_the_set_up(monkeypatch):
    """'auto' takes OpenVINO when the job's batches plus its set-up (compiling; converting a new
    network) take at most 0.8 of torch's time; small jobs stay on torch without measuring."""
    net = inf._replica(_net("same"), torch.device("cpu"))
    shape = (1, 1, 1024, 1024)
    calls = []
    timings = {"torch": 1.0, "openvino": 0.85, "compile": 0.2, "convert": 3.0}
    monkeypatch.setattr(ovb, "_timings", lambda *a: calls.append(a) or dict(timings))
    monkeypatch.setattr(ovb, "is_converted", lambda model: False)

    def pick(n):
        return ovb.select_backend("auto", "cpu", net, shape, "bf16", lambda x: x, n_batches=n)

    assert pick(3) == "torch" and not calls  # 3 Mpx < MIN_PIXELS: not even measured
    assert pick(100) == "torch"  # 85 + 3.2 s > 0.8 x 100 s
    timings["openvino"] = 0.5
    assert pick(100) == "openvino"  # 50 + 3.2 s <= 80 s
    assert pick(4) == "torch"  # 2 + 3.2 s > 3.2 s: converting a new network does not pay
    monkeypatch.setattr(ovb, "is_converted", lambda model: True)
    assert pick(4) == "openvino"  # 2 + 0.2 s <= 3.2 s once it is converted


def test_timings_are_measured_once_per_machine_and_shape(monkeypatch):
    net = inf._replica(_net("same"), torch.device("cpu"))
    shape = (1, 1, 64, 64)
    measured = []

    def fake_best_times(fns, **kw):
        measured.append(sorted(fns))
        return {"torch": 1.0, "openvino": 0.5}

    monkeypatch.setattr(dev, "_best_times", fake_best_times)
    first = ovb._timings(net, shape, "fp32", lambda x: x)
    assert measured == [["openvino", "torch"]]
    assert first["torch"] == 1.0 and first["openvino"] == 0.5 and first["compile"] > 0 and first["convert"] > 0
    assert ovb._timings(net, shape, "fp32", lambda x: x) == first  # this process remembers
    ovb.clear_memory_cache()  # a new process reads the cache folder
    assert ovb._timings(net, shape, "fp32", lambda x: x) == first and len(measured) == 1
    ovb._timings(net, (1, 1, 64, 96), "fp32", lambda x: x)  # another shape is measured
    assert len(measured) == 2


def test_where_openvino_does_not_apply(monkeypatch):
    net = inf._replica(_net("same"), torch.device("cpu"))
    shape = (1, 1, 64, 64)
    assert ovb.select_backend("torch", "cpu", net, shape, "fp32") == "torch"
    big = dict(n_batches=100)
    assert ovb.select_backend("auto", "meta", net, shape, "fp32", lambda x: x, **big) == "torch"  # not the CPU
    assert ovb.select_backend("auto", "cpu", net, shape, "fp16", lambda x: x, **big) == "torch"
    with pytest.raises(ValueError, match="CPU in fp32 or bf16"):
        ovb.select_backend("openvino", "cpu", net, shape, "fp16")
    monkeypatch.setattr(ovb, "openvino_available", lambda: False)
    assert ovb.select_backend("auto", "cpu", net, shape, "fp32", lambda x: x, **big) == "torch"
    with pytest.raises(ValueError, match=r"pip install 'napari-unet\[openvino\]'"):
        ovb.select_backend("openvino", "cpu", net, shape, "fp32")
    with pytest.raises(ConfigError, match="backend"):
        PredictConfig(backend="onnx")


def test_openvino_sends_nothing_home():
    """openvino-telemetry (a dependency of the wheel) is kept out: OpenVINO runs on its stub."""
    import subprocess

    code = ("import sys; from napari_unet.openvino_backend import import_openvino; import_openvino(); "
            "print(sys.modules.get('openvino_telemetry'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_cli_says_when_openvino_ran(tmp_path, capsys):
    import tifffile

    from napari_unet.cli import main
    from napari_unet.io import save_model

    net = _net("same")
    save_model(tmp_path / "m.safetensors", net, {"mode": "instances"})
    img = np.random.default_rng(2).integers(0, 3000, (80, 90)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", img)
    rc = main(["predict", "--model", str(tmp_path / "m.safetensors"), "--image", str(tmp_path / "img.tif"),
               "--out", str(tmp_path / "out.tif"), "--backend", "openvino", "--precision", "fp32", "--device", "cpu",
               "--quiet"])
    assert rc == 0 and tifffile.imread(tmp_path / "out.tif").shape == (80, 90)
    assert "OpenVINO" in capsys.readouterr().err

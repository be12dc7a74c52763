"""Device and precision choice: explicit choices honoured, auto never picks a slower path."""

import subprocess
import sys

import pytest
import torch

from napari_unet import device as dev
from napari_unet.model import UNet


def test_resolve_device():
    assert dev.resolve_device("cpu").type == "cpu"
    assert dev.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(dev.DeviceError, match="unknown device"):
        dev.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(dev.DeviceError, match="no CUDA GPU"):
            dev.resolve_device("cuda")


def test_explicit_precision_is_kept():
    assert dev.select_precision("fp32", "cpu") == "fp32"
    assert dev.select_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        dev.select_precision("int4", "cpu")


@pytest.mark.parametrize("t32,t16,expected", [(1.0, 0.25, "bf16"), (1.0, 0.9, "fp32"), (0.2, 1.1, "fp32")])
def test_auto_picks_bf16_only_when_clearly_faster(monkeypatch, t32, t16, expected):
    times = iter([t32, t16])
    monkeypatch.setattr(dev, "_median_time", lambda fn, repeats=3: next(times))
    monkeypatch.setattr(dev, "_CALIBRATION", {})
    net = UNet(1, 2, depth=2, base_filters=4, padding="same")
    assert dev.select_precision("auto", "cpu", net) == expected
    # cached: no second calibration (the iterator is exhausted and would raise)
    assert dev.select_precision("auto", "cpu", net) == expected


def test_auto_falls_back_to_fp32_when_bf16_fails(monkeypatch):
    def broken(fn, repeats=3):
        if torch.is_autocast_enabled('cpu'):
            raise RuntimeError("no bf16 kernel")
        return 1.0

    monkeypatch.setattr(dev, "_median_time", broken)
    monkeypatch.setattr(dev, "_CALIBRATION", {})
    assert dev.select_precision("auto", "cpu") == "fp32"


def test_real_calibration_and_autocast_run():
    net = UNet(1, 3, depth=2, base_filters=4, padding="same").eval()
    choice = dev.select_precision("auto", "cpu", net)
    assert choice in ("fp32", "bf16")
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode(), dev.autocast(choice, "cpu"):
        out = net(x)
    assert out.shape == (1, 3, 32, 32)
    assert out.dtype == (torch.float32 if choice == "fp32" else torch.bfloat16)
    assert not net.training


_IMPORT_PROBE = r"""
import importlib.abc, importlib.util, sys
seen = []  # at each lookup of "torch": is libtorch_cpu.so mapped? (the last one is the import's)

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            with open("/proc/self/maps") as f:
                seen.append("libtorch_cpu.so" in f.read())
        return None

sys.meta_path.insert(0, Probe())
if sys.argv[1] == "broken":  # a layout import_torch does not know: the plain import still works
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "torch" else real(name, *a)
from napari_unet.device import import_torch
torch = import_torch()
assert torch is sys.modules["torch"] and float(torch.ones(3).sum()) == 3.0
print(seen[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preloading is Linux-only")
@pytest.mark.parametrize("case, mapped", [("normal", "True"), ("broken", "False")])
def test_import_torch_loads_the_libraries_before_the_import(case, mapped):
    """In a fresh process: libtorch_cpu.so is mapped before ``import torch`` runs (loaded
    by ``dlopen`` outside the GIL); when the preloading cannot work, the import still does."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, case], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [mapped]


# ---- training set-up: precision and memory layout -------------------------------------------------

def _bn_net():
    return UNet(1, 3, depth=2, base_filters=4, padding="same", batch_norm=True)


def test_training_setup_explicit_choices_are_kept():
    net = _bn_net()
    assert dev.select_training_setup("fp32", "cpu", net, (2, 1, 32, 32)) == ("fp32", False)
    assert dev.select_training_setup("bf16", "cpu", net, (2, 1, 32, 32)) == ("bf16", True)


@pytest.mark.parametrize("times, expected", [
    ({("fp32", False): 1.0, ("fp32", True): 0.6, ("bf16", True): 0.5}, ("bf16", True)),
    ({("fp32", False): 1.0, ("fp32", True): 0.6, ("bf16", True): 2.5}, ("fp32", True)),
    ({("fp32", False): 1.0, ("fp32", True): 0.9, ("bf16", True): 0.85}, ("fp32", False)),  # not 1.25x faster
    ({("fp32", False): 0.4, ("fp32", True): 1.1, ("bf16", True): 1.0}, ("fp32", False)),
])
def test_training_setup_auto_takes_the_clearly_fastest(monkeypatch, times, expected):
    calls = []

    def fake(model, shape, precision, channels_last, repeats=2):
        calls.append((precision, channels_last, shape))
        return times[(precision, channels_last)]

    monkeypatch.setattr(dev, "_time_training_step", fake)
    monkeypatch.setattr(dev, "_TRAIN_CALIBRATION", {})
    net = _bn_net()
    assert dev.select_training_setup("auto", "cpu", net, (8, 1, 64, 64)) == expected
    assert [c[:2] for c in calls] == list(dev.TRAINING_CANDIDATES) and all(c[2] == (8, 1, 64, 64) for c in calls)
    # cached for the same network and batch shape; measured again for another batch shape
    assert dev.select_training_setup("auto", "cpu", net, (8, 1, 64, 64)) == expected
    assert len(calls) == 3
    dev.select_training_setup("auto", "cpu", net, (4, 1, 64, 64))
    assert len(calls) == 6


def test_training_setup_skips_what_cannot_run(monkeypatch):
    def fake(model, shape, precision, channels_last, repeats=2):
        if precision == "bf16":
            raise RuntimeError("no bf16 kernel")
        return 1.0 if not channels_last else 0.5

    monkeypatch.setattr(dev, "_time_training_step", fake)
    monkeypatch.setattr(dev, "_TRAIN_CALIBRATION", {})
    assert dev.select_training_setup("auto", "cpu", _bn_net(), (2, 1, 32, 32)) == ("fp32", True)


def test_real_training_calibration_leaves_the_model_alone(monkeypatch):
    monkeypatch.setattr(dev, "_TRAIN_CALIBRATION", {})
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    precision, channels_last = dev.select_training_setup("auto", "cpu", net, (2, 1, 32, 32))
    assert (precision, channels_last) in dev.TRAINING_CANDIDATES
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in net.parameters())
    assert net.training and next(net.parameters()).is_contiguous()

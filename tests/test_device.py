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


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bf16 hardware, whatever this machine is."""
    monkeypatch.setattr(dev, "native_bf16", lambda: True)


@pytest.mark.parametrize("t32,t16,expected", [(1.0, 0.25, "bf16"), (1.0, 0.9, "fp32"), (0.2, 1.1, "fp32")])
def test_auto_picks_bf16_only_when_clearly_faster(monkeypatch, bf16_cpu, t32, t16, expected):
    calls = []
    monkeypatch.setattr(dev, "_forward_times", lambda model, shape: calls.append(shape) or {"fp32": t32, "bf16": t16})
    net = UNet(1, 2, depth=2, base_filters=4, padding="same")
    assert dev.select_precision("auto", "cpu", net, shape=(1, 1, 64, 64)) == expected
    assert calls == [(1, 1, 64, 64)]  # timed at the job's shape
    # Cached in the process, and on disk for the next process (the file is per test here).
    assert dev.select_precision("auto", "cpu", net, shape=(1, 1, 64, 64)) == expected
    monkeypatch.setattr(dev, "_CALIBRATION", {})
    assert dev.select_precision("auto", "cpu", net, shape=(1, 1, 64, 64)) == expected
    assert len(calls) == 1
    assert (dev.cache_dir() / "precision.json").is_file()
    # Another tile shape is measured on its own.
    dev.select_precision("auto", "cpu", net, shape=(1, 1, 128, 128))
    assert len(calls) == 2


def test_no_bf16_hardware_means_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(dev, "native_bf16", lambda: False)
    monkeypatch.setattr(dev, "_forward_times", lambda *a: pytest.fail("measured on a CPU without bf16 hardware"))
    monkeypatch.setattr(dev, "_time_training_step", lambda *a: pytest.fail("measured training"))
    net = UNet(1, 2, depth=2, base_filters=4, padding="same", batch_norm=True)
    assert dev.select_precision("auto", "cpu", net) == "fp32"
    assert dev.select_training_setup("auto", "cpu", net, (2, 1, 32, 32)) == ("fp32", False)


def test_a_limited_instruction_set_counts_as_no_bf16_hardware(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert dev.native_bf16() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert dev.native_bf16() == bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def _noisy_clock(monkeypatch, durations):
    """A fake clock: each candidate call advances it by its next duration (real slowdowns only add time)."""
    now = [0.0]
    monkeypatch.setattr(dev.time, "perf_counter", lambda: now[0])

    def fn(name):
        def call():
            now[0] += next(durations[name])
        return call

    return fn


@pytest.mark.parametrize("ratio, expected", [(0.25, "bf16"), (0.6, "bf16"), (1.0, "fp32"), (1.5, "fp32")])
def test_noise_cannot_flip_the_choice(monkeypatch, ratio, expected):
    """Timings with slowdowns of up to 3x on a third of the calls (another process, a frequency
    drop), independent per call (worse than real slowdowns, which hit interleaved calls
    alike): over 200 draws a slower path is never chosen and a clearly faster one (AMX: bf16
    4x faster) always is; at equal speed or 1.7x faster, all but rare draws agree."""
    import numpy as np

    chosen = []
    for seed in range(200):
        rng = np.random.default_rng(seed)

        def draws(base, rng=rng):
            while True:
                yield base * (1 + (2 * rng.random() if rng.random() < 0.33 else 0.05 * rng.random()))

        fn = _noisy_clock(monkeypatch, {"fp32": draws(1.0), "bf16": draws(ratio)})
        times = dev._best_times({"fp32": fn("fp32"), "bf16": fn("bf16")}, repeats=dev.REPEATS, warmup=1)
        chosen.append("bf16" if times["bf16"] < dev.BF16_MARGIN * times["fp32"] else "fp32")
    if ratio > 1.0 or ratio <= 0.25:
        assert set(chosen) == {expected}
    else:
        assert chosen.count(expected) >= 0.97 * len(chosen)


def test_auto_falls_back_to_fp32_when_bf16_fails(monkeypatch, bf16_cpu):
    def forward(model, shape):
        def broken():
            raise RuntimeError("no bf16 kernel")
        return dev._best_times({"fp32": lambda: None, "bf16": broken})

    monkeypatch.setattr(dev, "_forward_times", forward)
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
from napari_unet.tuning import import_torch
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
    ({("fp32", False): 1.0, ("bf16", True): 0.5}, ("bf16", True)),
    ({("fp32", False): 1.0, ("bf16", True): 2.5}, ("fp32", False)),
    ({("fp32", False): 1.0, ("bf16", True): 0.85}, ("fp32", False)),  # not 1.25x faster
])
def test_training_setup_auto_takes_the_clearly_fastest(monkeypatch, bf16_cpu, times, expected):
    built = []

    def fake(model, shape, precision, channels_last):
        built.append((precision, channels_last, shape))
        return lambda: None

    monkeypatch.setattr(dev, "_time_training_step", fake)
    monkeypatch.setattr(dev, "_best_times", lambda fns, **kw: {c: times[c] for c in fns})
    net = _bn_net()
    assert dev.select_training_setup("auto", "cpu", net, (8, 1, 64, 64), max_time=60) == expected
    assert [c[:2] for c in built] == list(dev.TRAINING_CANDIDATES) and all(c[2] == (8, 1, 64, 64) for c in built)
    # cached for the same network and batch shape (in the process and on disk); measured again for another
    assert dev.select_training_setup("auto", "cpu", net, (8, 1, 64, 64), max_time=60) == expected
    monkeypatch.setattr(dev, "_TRAIN_CALIBRATION", {})
    assert dev.select_training_setup("auto", "cpu", net, (8, 1, 64, 64), max_time=60) == expected
    assert len(built) == 2
    dev.select_training_setup("auto", "cpu", net, (4, 1, 64, 64), max_time=60)
    assert len(built) == 4


def test_training_setup_measures_within_five_percent_of_the_budget(monkeypatch, bf16_cpu):
    """A step so slow that timing the set-ups would eat more than 5 % of the run: bf16 (the
    hardware has it) without measuring further."""
    now = [0.0]
    monkeypatch.setattr(dev.time, "perf_counter", lambda: now[0])

    def fake(model, shape, precision, channels_last):
        def step():
            now[0] += 2.0  # seconds per step
        return step

    monkeypatch.setattr(dev, "_time_training_step", fake)
    monkeypatch.setattr(dev, "_best_times", lambda *a, **k: pytest.fail("measured beyond the budget"))
    assert dev.select_training_setup("auto", "cpu", _bn_net(), (8, 1, 64, 64), max_time=60) == ("bf16", True)
    assert now[0] <= 0.05 * 60


def test_real_training_calibration_leaves_the_model_alone(monkeypatch, bf16_cpu):
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    precision, channels_last = dev.select_training_setup("auto", "cpu", net, (2, 1, 32, 32))
    assert (precision, channels_last) in dev.TRAINING_CANDIDATES
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in net.parameters())
    assert net.training and next(net.parameters()).is_contiguous()

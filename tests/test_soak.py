"""Soak: many predictions and training runs in one process do not accumulate memory.

Each soak runs in a fresh subprocess, so that other tests' allocations (and pytest's)
do not disturb the measurement, and so that nothing it does to the heap (e.g. the CLI's
``tune_malloc``) leaks into the test process. Resident memory (RSS, psutil) is measured
after a warm-up, with ``gc.collect()`` and glibc's ``malloc_trim`` first (freed memory the heap
keeps made the RSS jump by up to 30 MB between otherwise equal runs; a real leak is still
referenced and cannot be trimmed). On a CUDA machine ``device="auto"`` runs on
the GPU and its allocated memory is checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PREDICT = r"""
import gc, json
import psutil, torch
from napari_unet.config import PredictConfig
from napari_unet.inference import predict_all
from napari_unet.model import UNet
from napari_unet.synthetic import make_nuclei

torch.set_num_threads(1)
torch.manual_seed(0)
model = UNet(1, 3, depth=2, base_filters=4, padding="same", batch_norm=True).eval()
image, _ = make_nuclei((256, 256), seed=1)
cfg = PredictConfig(precision="fp32", tile_size=128, device="auto")
proc = psutil.Process()
cuda = torch.cuda.is_available()

def trim():  # give freed heap pages back (glibc): what is left is memory still referenced
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
def measure():
    gc.collect()
    trim()
    return proc.memory_info().rss / 2**20, (torch.cuda.memory_allocated() / 2**20 if cuda else 0.0)

for _ in range(10):  # warm-up: torch's allocator, lazily imported modules, first-call caches
    predict_all(model, image, cfg, {"mode": "instances"})
rss0, gpu0 = measure()
for _ in range(100):
    predict_all(model, image, cfg, {"mode": "instances"})
rss1, gpu1 = measure()
print(json.dumps({"rss_growth_mb": rss1 - rss0, "gpu_growth_mb": gpu1 - gpu0, "rss_mb": rss1}))
"""

TRAIN = r"""
import gc, json
import psutil, torch
from napari_unet.config import ModelConfig, TrainConfig
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import train

img, truth = make_nuclei((512, 512), seed=2)  # ~3 MB of planes, targets and weights per run
lab = paint_sparse_labels(truth, n_cells=5, seed=2)
cfg = TrainConfig(iterations=3, max_time=None, patch_size=48, batch_size=2, precision="fp32", threads=1,
                  val_every=1, device="auto")
arch = ModelConfig(depth=2, base_filters=8, padding="same", batch_norm=True)
proc = psutil.Process()
cuda = torch.cuda.is_available()
def trim():  # give freed heap pages back (glibc): what is left is memory still referenced
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
after = {}
for run in range(1, 21):
    *_, last = train(img, lab, cfg, model_config=arch)
    del last, _
    gc.collect()
    trim()
    after[run] = (proc.memory_info().rss / 2**20, torch.cuda.memory_allocated() / 2**20 if cuda else 0.0)
print(json.dumps({"rss_growth_mb": after[20][0] - after[5][0], "gpu_growth_mb": after[20][1] - after[5][1],
                  "rss_mb": after[20][0]}))
"""


def _run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_100_predictions_grow_resident_memory_by_less_than_50_mb():
    r = _run(PREDICT)
    print(f"100 predictions: RSS {r['rss_mb']:.0f} MB, growth {r['rss_growth_mb']:+.1f} MB, "
          f"GPU {r['gpu_growth_mb']:+.1f} MB")
    assert r["rss_growth_mb"] < 50
    assert abs(r["gpu_growth_mb"]) < 1  # 0 on a machine without CUDA


def test_20_training_runs_release_their_memory():
    r = _run(TRAIN)
    print(f"training runs 5 -> 20: RSS {r['rss_mb']:.0f} MB, growth {r['rss_growth_mb']:+.1f} MB, "
          f"GPU {r['gpu_growth_mb']:+.1f} MB")
    # 15 more runs: a model, optimiser state or data kept per run would add up; noise is a few MB.
    assert r["rss_growth_mb"] < 20
    assert abs(r["gpu_growth_mb"]) < 1

"""Files are never half-written and model files never run code (see README "Safety and limits").

A writer process is SIGKILLed at random moments while it saves model files and TIFFs over
a target path; the target must always be either the previous complete file or the new
complete file. Hostile pickles of several kinds must be refused without running.
"""

import os
import pickle
import signal
import time
import zipfile

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.io import ModelFileError, load_model, save_model, write_labels_tiff
from napari_unet.model import UNet


def _write_forever(kind, target):
    """The child: save over ``target`` again and again until it is killed."""
    torch.manual_seed(0)
    net = UNet(1, 3, depth=4, base_filters=32, padding="same")  # ~7.8 MB of weights
    labels = (np.arange(1500 * 1500, dtype=np.uint32) % 60000).reshape(1500, 1500).astype(np.uint16)
    i = 0
    while True:
        i += 1
        if kind == "model":
            save_model(target, net, {"training": {"iteration": i}})
        else:
            write_labels_tiff(target, labels, overwrite=True)


@pytest.mark.parametrize("kind", ["model", "tiff"])
def test_sigkill_during_writes_never_leaves_a_truncated_target(tmp_path, kind):
    target = tmp_path / ("m.safetensors" if kind == "model" else "l.tif")
    rng = np.random.default_rng(0)
    kills = 20
    for _ in range(kills):
        # fork: the child starts writing at once (no interpreter start-up), so kills land mid-write
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _write_forever(kind, target)
            finally:
                os._exit(0)
        time.sleep(float(rng.uniform(0.01, 0.4)))  # a random moment, not a synchronisation
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if target.exists():
            if kind == "model":
                model, meta = load_model(target)
                assert meta["training"]["iteration"] >= 1
            else:
                data = tifffile.imread(target)
                assert data.shape == (1500, 1500) and int(data[-1, -1]) == (1500 * 1500 - 1) % 60000
    assert target.exists(), f"at least one write completed in {kills} runs"
    # temporaries left by kills that landed mid-write: the case this test is about did happen
    assert list(tmp_path.glob(f".{target.name}.*.part")), "no kill landed inside a write"


def _evil_payloads(marker):
    class Call:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    class Import:
        def __reduce__(self):
            return (__import__("subprocess").call, (["touch", str(marker)],))

    return {"os_system": Call(), "exec": Exec(), "subprocess": Import(),
            "nested": {"state_dict": {"w": torch.zeros(2)}, "hook": Call()}}


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    for name, payload in _evil_payloads(marker).items():
        for suffix in (".safetensors", ".pt", ".pth", ".pkl"):
            path = tmp_path / f"{name}{suffix}"
            path.write_bytes(pickle.dumps(payload, protocol=protocol))
            with pytest.raises(ModelFileError) as err:
                load_model(path)
            assert path.name in str(err.value)
    assert not marker.exists()


def test_torch_save_archives_and_zip_tricks_are_refused(tmp_path):
    marker = tmp_path / "ran"
    payloads = _evil_payloads(marker)
    torch.save({"model": UNet(1, 2, depth=2, base_filters=4).state_dict(), "x": payloads["exec"]},
               tmp_path / "torch.safetensors")
    # a real model file hidden inside a zip: still not a safetensors file at the top level
    good = save_model(tmp_path / "good.safetensors", UNet(1, 2, depth=2, base_filters=4, padding="same"))
    with zipfile.ZipFile(tmp_path / "zipped.safetensors", "w") as z:
        z.write(good, "good.safetensors")
    for name in ("torch.safetensors", "zipped.safetensors"):
        with pytest.raises(ModelFileError, match=name):
            load_model(tmp_path / name)
    assert not marker.exists()

"""Files are never half-written and model files never run code (see docs/safety.md).

A writer process is SIGKILLed inside a save of a model file or a TIFF over a target path
(it tells the test when it is there); the target must be the previous complete file.
Hostile pickles of several kinds must be refused without running.
"""

import copy
import json
import os
import pickle
import select
import signal
import struct
import time
import zipfile

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.io import ModelFileError, load_model, save_model, write_labels_tiff
from napari_unet.model import UNet


def _write_twice(kind, target, ready_fd):
    """The child: one complete save over ``target``, then a second that stops inside the write
    (its new bytes in the temporary file, before the rename) and tells the parent so."""
    torch.manual_seed(0)
    net = UNet(1, 3, depth=4, base_filters=32, padding="same")  # ~7.8 MB of weights
    labels = (np.arange(1500 * 1500, dtype=np.uint32) % 60000).reshape(1500, 1500).astype(np.uint16)

    def save(i):
        if kind == "model":
            save_model(target, net, {"training": {"iteration": i}})
        else:
            write_labels_tiff(target, labels + (i - 1), overwrite=True)

    save(1)
    real_fsync = os.fsync

    def fsync_then_wait(fd):  # called by atomic_write on the finished temporary file
        real_fsync(fd)
        os.write(ready_fd, b"x")  # the parent may kill now: we are between writing and renaming
        time.sleep(600)

    os.fsync = fsync_then_wait
    save(2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "tiff"])
def test_sigkill_during_a_write_leaves_the_previous_complete_file(tmp_path, kind):
    """SIGKILL lands inside the second write (the child says when, no timing guess): the target
    is still the first complete file, and only a temporary file is left beside it."""
    target = tmp_path / ("m.safetensors" if kind == "model" else "l.tif")
    read_fd, write_fd = os.pipe()
    # fork: the child shares nothing with the test but the pipe and the folder
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            _write_twice(kind, target, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    ready = []
    try:
        ready = select.select([read_fd], [], [], 120)[0]
        assert ready and os.read(read_fd, 1) == b"x", "the child never reached the middle of its second write"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_fd)
        if ready == []:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # killed, not finished
    if kind == "model":
        _, meta = load_model(target)
        assert meta["training"]["iteration"] == 1
    else:
        data = tifffile.imread(target)
        assert data.shape == (1500, 1500) and int(data[-1, -1]) == (1500 * 1500 - 1) % 60000
    assert list(tmp_path.glob(f".{target.name}.*.part")), "the interrupted write's temporary file is beside it"


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


def _raw_safetensors(header, body: bytes) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, tensor bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _odd_headers(good, marker):
    """Crafted safetensors files whose JSON header (or bytes) carry odd content, by name."""
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    meta = json.loads(header["__metadata__"]["napari_unet"])
    code = f"__import__('os').system('touch {marker}')"
    payload = pickle.dumps(_evil_payloads(marker)["os_system"])

    def with_meta(value):
        h = copy.deepcopy(header)
        h["__metadata__"]["napari_unet"] = value if isinstance(value, str) else json.dumps(value)
        return _raw_safetensors(h, body)

    def with_tensor(edit):
        h = copy.deepcopy(header)
        edit(h[next(k for k in h if k != "__metadata__")])
        return _raw_safetensors(h, body)

    padded = payload + b"\0" * (-len(payload) % 8)
    extra = copy.deepcopy(header)
    extra["hook"] = {"dtype": "U8", "shape": [len(padded)], "data_offsets": [len(body), len(body) + len(padded)]}
    return {
        "python code as metadata": (with_meta(code), "not valid JSON"),
        "a pickle as metadata": (with_meta(payload.decode("latin1")), "not valid JSON"),
        "JSON nested 100000 deep": (with_meta("[" * 100_000 + "]" * 100_000), "not valid JSON"),
        "code as an architecture value": (with_meta({**meta, "model": {**meta["model"], "in_channels": code}}),
                                          "invalid model architecture"),
        "metadata as a JSON object": (_raw_safetensors({**header, "__metadata__": {"napari_unet": meta}}, body),
                                      "not a valid safetensors file"),  # safetensors metadata holds strings only
        "format version as text": (with_meta({**meta, "format_version": "1"}), "invalid model format version"),
        "normalisation as code": (with_meta({**meta, "normalization": code}), "unusable normalisation"),
        "unknown label mode": (with_meta({**meta, "mode": code}), "unknown label mode"),
        "tensor bytes beyond the file": (with_tensor(lambda t: t.update(data_offsets=[0, 10**12])),
                                         "not a valid safetensors file"),
        "tensor of an unknown dtype": (with_tensor(lambda t: t.update(dtype="PICKLE")), "not a valid safetensors file"),
        "a pickle as an extra tensor": (_raw_safetensors(extra, body + padded), "do not fit"),
        "header length of 1 TB": (struct.pack("<Q", 2**40) + data[8:], "not a valid safetensors file"),
    }


def test_safetensors_with_odd_headers_are_refused_and_nothing_runs(tmp_path):
    from napari_unet.inference import predict_all
    from napari_unet.io import read_model_metadata

    marker = tmp_path / "ran"
    good = save_model(tmp_path / "good.safetensors", UNet(1, 3, depth=2, base_filters=4, padding="same"),
                      {"mode": "instances"})
    for name, (blob, expected) in _odd_headers(good, marker).items():
        path = tmp_path / "odd.safetensors"
        path.write_bytes(blob)
        for load in (load_model, lambda p: predict_all(p, np.zeros((8, 8), np.float32))):
            with pytest.raises(ModelFileError) as err:
                load(path)
            message = str(err.value)
            assert expected in message and "odd.safetensors" in message and "\n" not in message, (name, message)
        if expected != "do not fit" and "architecture" not in expected:  # weights and architecture aside
            with pytest.raises(ModelFileError, match=expected):
                read_model_metadata(path)
    assert not marker.exists()


def test_pickle_bytes_inside_the_weights_are_only_numbers(tmp_path):
    """A valid model file whose weight bytes hold a pickle: it loads as (odd) numbers and nothing runs."""
    marker = tmp_path / "ran"
    good = save_model(tmp_path / "good.safetensors", UNet(1, 3, depth=2, base_filters=4, padding="same"),
                      {"mode": "instances"})
    data = bytearray(good.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    payload = pickle.dumps(_evil_payloads(marker)["exec"])
    key = max((k for k in header if k != "__metadata__"), key=lambda k: np.diff(header[k]["data_offsets"])[0])
    start = 8 + n + header[key]["data_offsets"][0]
    data[start:start + len(payload)] = payload
    (tmp_path / "numbers.safetensors").write_bytes(bytes(data))
    model, _ = load_model(tmp_path / "numbers.safetensors")
    got = model.state_dict()[key].flatten().view(torch.uint8)[:len(payload)].numpy().tobytes()
    assert got == payload and not marker.exists()

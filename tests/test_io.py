"""Model files (safetensors, never unpickled, atomic) and TIFF writing."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.io import (
    FORMAT_VERSION,
    ModelFileError,
    OutputPathError,
    atomic_write,
    load_model,
    read_image,
    read_model_metadata,
    save_model,
    write_labels_tiff,
)
from napari_unet.model import UNet


@pytest.fixture
def net():
    torch.manual_seed(1)
    net = UNet(1, 3, depth=3, base_filters=8, padding="same", batch_norm=True)
    # give batch norm non-trivial running statistics, as after training
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 1, 32, 32) * 3 + 1)
    return net.eval()


META = {
    "normalization": {"method": "percentile", "low": 2.0, "high": 99.5},
    "mode": "instances",
    "class_names": ["background", "interior", "boundary"],
    "training": {"date": "2026-11-22T00:00:00", "iterations": 12, "data_shapes": [[256, 256]]},
}


def test_round_trip_predicts_identically(tmp_path, net):
    path = save_model(tmp_path / "m.safetensors", net, META)
    loaded, meta = load_model(path)
    x = torch.randn(2, 1, 40, 48)
    with torch.inference_mode():
        assert torch.equal(net(x), loaded(x))
    assert loaded.config == net.config
    for key, value in META.items():
        assert meta[key] == value
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["napari_unet_version"]
    assert read_model_metadata(path)["model"] == net.config.to_dict()
    assert not loaded.training


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, net):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for i, payload in enumerate([Evil(), {"state_dict": net.state_dict(), "x": Evil()}]):
        path = tmp_path / f"evil{i}.safetensors"
        with open(path, "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(ModelFileError, match="never unpickled"):
            load_model(path)
    # torch.save's zip format carrying the payload
    path = tmp_path / "evil.pt"
    torch.save({"weights": net.state_dict(), "evil": Evil()}, path)
    with pytest.raises(ModelFileError, match=str(path.name)):
        load_model(path)
    assert not marker.exists()


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, net):
    good = save_model(tmp_path / "good.safetensors", net, META)
    blob = good.read_bytes()
    cases = {
        "truncated.safetensors": blob[: len(blob) // 2],
        "empty.safetensors": b"",
        "text.safetensors": b"hello, this is not a model\n" * 10,
        "header_only.safetensors": blob[:8],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFileError) as e:
            load_model(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def _rewrite_header(path, new_path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["napari_unet"])
    edit(meta, header)
    header["__metadata__"]["napari_unet"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    new_path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_future_version_and_wrong_architecture(tmp_path, net):
    good = save_model(tmp_path / "good.safetensors", net, META)

    def future(meta, header):
        meta["format_version"] = FORMAT_VERSION + 1

    _rewrite_header(good, tmp_path / "future.safetensors", future)
    with pytest.raises(ModelFileError, match="newer napari-unet"):
        load_model(tmp_path / "future.safetensors")

    def deeper(meta, header):
        meta["model"]["depth"] = 4

    _rewrite_header(good, tmp_path / "deeper.safetensors", deeper)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "deeper.safetensors")


def test_save_is_atomic(tmp_path, net, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_model(target, net, META)
    before = target.read_bytes()

    import napari_unet.io as nio

    real_fsync = os.fsync

    def crash(fd):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the write

    monkeypatch.setattr(nio.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(target, UNet(1, 3, depth=3, base_filters=8, padding="same", batch_norm=True), META)
    monkeypatch.setattr(nio.os, "fsync", real_fsync)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left


def test_output_path_errors(tmp_path, net):
    with pytest.raises(OutputPathError, match="is a folder"):
        save_model(tmp_path, net)
    with pytest.raises(OutputPathError, match="does not exist"):
        save_model(tmp_path / "nope" / "m.safetensors", net)
    (tmp_path / "x.tif").write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        write_labels_tiff(tmp_path / "x.tif", np.ones((4, 4), np.uint16))
    assert (tmp_path / "x.tif").read_bytes() == b"keep me"
    with pytest.raises(OutputPathError):
        with atomic_write(tmp_path / "x.tif", overwrite=False):
            pass


@pytest.mark.parametrize("dtype,expected", [(np.uint8, np.uint8), (np.uint16, np.uint16), (np.int32, np.uint8),
                                            (np.int64, np.uint16), (np.uint32, np.uint32)])
def test_labels_tiff_imagej_dtype_scale(tmp_path, dtype, expected):
    labels = np.zeros((3, 20, 30), dtype)
    labels[1, 5:10, 5:12] = 7
    if expected == np.uint16:
        labels[2, 0, 0] = 300
    if expected == np.uint32:
        labels[2, 0, 0] = 70000
    path = write_labels_tiff(tmp_path / "l.tif", labels, axes="ZYX", scale={"X": 0.5, "Y": 0.5, "Z": 2.0})
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        assert tif.is_imagej == (expected != np.uint32)
    assert data.dtype == expected
    np.testing.assert_array_equal(data, labels)
    back, info = read_image(path)
    np.testing.assert_array_equal(back, labels)
    assert info.axes == "ZYX"
    if expected != np.uint32:
        assert info.scale["X"] == pytest.approx(0.5) and info.scale["Z"] == pytest.approx(2.0)


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="bad.tif"):
        read_image(tmp_path / "bad.tif")


def test_written_files_follow_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path, net):
    old = os.umask(0o022)
    try:
        model = save_model(tmp_path / "m.safetensors", net, META)
        tiff = tmp_path / "l.tif"
        write_labels_tiff(tiff, np.ones((4, 4), np.uint16))
        # Not mkstemp's owner-only 0600: a colleague (or a cluster job) can read the model.
        assert model.stat().st_mode & 0o777 == 0o644
        assert tiff.stat().st_mode & 0o777 == 0o644
        os.chmod(model, 0o640)
        save_model(model, net, META)  # overwrite: the user's chosen permissions stay
        assert model.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("area", [0, -3.0, "big", True, float("nan")])
def test_object_area_in_a_file_must_be_a_positive_number(tmp_path, net, area):
    good = save_model(tmp_path / "good.safetensors", net, {**META, "object_area": 120.5})
    assert read_model_metadata(good)["object_area"] == 120.5

    def edit(meta, header):
        meta["object_area"] = area

    _rewrite_header(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ModelFileError, match="object_area"):
        load_model(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("shift", [[1.0, 2.0], "x", [1.0, None, 2.0], [1.0, float("inf"), 0.0]])
def test_output_bias_shift_in_a_file_must_be_one_number_per_class(tmp_path, net, shift):
    good = save_model(tmp_path / "good.safetensors", net, {**META, "output_bias_shift": [0.1, -0.5, -1.0]})
    assert load_model(good)[1]["output_bias_shift"] == [0.1, -0.5, -1.0]

    def edit(meta, header):
        meta["output_bias_shift"] = shift

    _rewrite_header(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ModelFileError, match="output_bias_shift"):
        load_model(tmp_path / "bad.safetensors")


def test_loading_draws_no_random_weights(tmp_path, net, monkeypatch):
    path = save_model(tmp_path / "m.safetensors", net, {"mode": "semantic"})
    drawn = []
    real = torch.nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        drawn.append(tensor.is_meta)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    model, _ = load_model(path)
    assert all(drawn)  # nothing drawn on real tensors (nor on the meta skeleton, see below)
    assert all(not t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert all(p.requires_grad for p in model.parameters())  # still trainable (fine-tuning)
    for name, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_loading_a_model_does_not_import_the_compiler(tmp_path, net):
    """Random draws on meta tensors go through torch._dynamo (a second of start-up): none are made."""
    import subprocess
    import sys

    path = save_model(tmp_path / "m.safetensors", net, {"mode": "semantic"})
    code = ("import sys; from napari_unet.io import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

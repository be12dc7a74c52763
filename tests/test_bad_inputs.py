"""Bad input, table-driven: every case through the command line AND through the core calls the widgets make.

Command line (``napari_unet.cli.main``): exit status 2, exactly one line on stderr naming
the problem, no traceback, no warning, no output file, input files unchanged.

Core (what the widgets call in their worker or on the GUI thread: ``train`` /
``prepare_training_data``, ``load_model``, ``predict``, ``save_model``,
``write_labels_tiff``, ``read_image``): an exception of the kinds the widgets turn into a
one-line notification (``ValueError``, ``OSError``, ``MemoryError``: their
``BAD_INPUT_ERRORS``), a message of one line naming the problem, the caller's arrays
unchanged, no file written.

A second, smaller table holds odd inputs that are accepted on purpose (a 1-pixel image,
NaN pixels, a stack given to a 2D model, ...): they must work and change nothing either.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.cli import main
from napari_unet.config import ModelConfig, PredictConfig, TrainConfig
from napari_unet.errors import BAD_INPUT_ERRORS
from napari_unet.inference import predict_all
from napari_unet.io import (
    FORMAT_VERSION,
    check_output_path,
    load_model,
    read_image,
    save_model,
    write_labels_tiff,
)
from napari_unet.model import UNet
from napari_unet.synthetic import make_nuclei, paint_sparse_labels
from napari_unet.training import prepare_training_data, train

#: What the CLI and the widgets report as one line (the one definition, napari_unet.errors).
#: Anything else is shown as a bug.
TINY = ModelConfig(depth=2, base_filters=4, padding="same", batch_norm=True)
CFG = TrainConfig(iterations=2, max_time=None, patch_size=32, batch_size=1, precision="fp32", threads=1)
FAST = ["--iterations", "2", "--patch-size", "32", "--batch-size", "1", "--threads", "1", "--precision", "fp32",
        "--quiet"]
NEW_NET = ["--depth", "2", "--width", "4"]  # a tiny new network (not with --from)

_IMG, _TRUTH = make_nuclei((48, 48), radius=(4, 7), seed=5)
_LAB = paint_sparse_labels(_TRUTH, n_cells=4, seed=5, exclude_border=2).astype(np.uint16)
_RGB = np.stack([_IMG // 256] * 3, axis=-1).astype(np.uint8)


def good_image() -> np.ndarray:
    return _IMG.copy()


def good_labels() -> np.ndarray:
    return _LAB.copy()


# ---- model files --------------------------------------------------------------------------------

def _tiny(in_channels: int = 1) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels, 3, depth=2, base_filters=4, padding="same", batch_norm=True).eval()


def _rewrite_meta(good: Path, target: Path, edit: Callable[[dict], None]) -> None:
    """A copy of a model file with its napari-unet metadata edited (weights unchanged)."""
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["napari_unet"])
    edit(meta)
    header["__metadata__"]["napari_unet"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_model(kind: str, d: Path) -> Path:
    """A model file of the given kind in ``d`` (the good ones are the base of the broken ones)."""
    path = d / f"{kind}.safetensors"
    if path.exists():
        return path
    if kind in ("grey", "rgb"):
        return save_model(path, _tiny(1 if kind == "grey" else 3), {"mode": "instances"})
    good = make_model("grey", d)
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":  # another format: a PNG signature and some bytes
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "future":
        _rewrite_meta(good, path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}, "hook": _RunsCode(d / "ran")}))
    elif kind == "torch_zip":
        torch.save({"model": _tiny().state_dict(), "hook": _RunsCode(d / "ran")}, path)
    elif kind == "no_meta":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, str(path))
    elif kind == "odd_meta":
        _rewrite_meta(good, path, lambda m: m.update(normalization={"method": "percentile", "low": "__import__"}))
    elif kind == "absurd":  # an architecture of 2**40 filters: must be refused before allocating anything
        _rewrite_meta(good, path, lambda m: m["model"].update(base_filters=2**40))
    elif kind == "other_arch":  # the header says 8 filters, the weights are those of 4
        _rewrite_meta(good, path, lambda m: m["model"].update(base_filters=8))
    elif kind == "folder":
        path.mkdir()
    else:  # pragma: no cover - a typo in the table
        raise KeyError(kind)
    return path


# ---- outputs ------------------------------------------------------------------------------------

def output_path(kind: str, command: str, tmp_path: Path, read_only_dir) -> Path:
    name = "out.safetensors" if command == "train" else "out.tif"
    if kind == "new":
        return tmp_path / name
    if kind == "folder":
        p = tmp_path / ("a_folder.safetensors" if command == "train" else "a_folder.tif")
        p.mkdir()
        return p
    if kind == "missing":  # a drive that is not mounted, a folder that was never made
        return Path("/nonexistent-drive-napari-unet") / "results" / name
    if kind == "under_file":
        (tmp_path / "a_file").write_bytes(b"I am a file")
        return tmp_path / "a_file" / name
    if kind == "read_only":  # see conftest.read_only_dir: permission bits, or /proc when root
        return read_only_dir() / name
    if kind == "exists":
        p = tmp_path / name
        p.write_bytes(b"precious results")
        return p
    raise KeyError(kind)  # pragma: no cover


# ---- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One bad input. ``image``/``labels`` build the arrays; ``model`` names a model file (``--from`` for
    train, ``--model`` for predict); ``out`` the kind of output path; ``broken`` an input file that is
    itself the problem; ``expect`` a piece of the one-line message (the CLI and the core)."""

    id: str
    command: str
    expect: str
    image: Callable[[], np.ndarray] = good_image
    labels: Callable[[], np.ndarray] = good_labels
    model: str | None = None
    out: str = "new"
    broken: str | None = None
    mode: str = "instances"
    channel_axis: int | None = None


def _with(f, *args):
    return lambda: f(*args)


def _painted_cell(shape):
    lab = np.ones(shape, np.uint16)
    lab[shape[0] // 3:shape[0] // 2, shape[1] // 3:shape[1] // 2] = 2
    return lab


BAD = [
    # -- painted labels --
    Case("labels empty", "train", "labels are empty", labels=lambda: np.zeros_like(_LAB)),
    Case("labels only background", "train", "no object painted", labels=lambda: np.ones_like(_LAB)),
    Case("labels only cells", "train", "no background painted", labels=lambda: np.full_like(_LAB, 2)),
    Case("labels float fractional", "train", "not integers", labels=lambda: _LAB.astype(np.float32) + 0.5),
    Case("labels float NaN", "train", "not integers",
         labels=lambda: np.where(_LAB > 1, np.nan, _LAB).astype(np.float32)),
    Case("labels negative", "train", "negative", labels=lambda: _LAB.astype(np.int16) - 1),
    Case("labels 1D", "train", "at least 2D", image=lambda: _IMG[0].copy(), labels=lambda: _LAB[0].copy()),
    Case("semantic, one class", "train", "at least two classes", labels=lambda: np.minimum(_LAB, 1), mode="semantic"),
    Case("semantic, 300 classes", "train", "at most 255",
         labels=lambda: np.where(_LAB >= 2, 300, _LAB).astype(np.uint16), mode="semantic"),
    # -- images for training --
    Case("shapes differ", "train", "differ", labels=lambda: _LAB[:40].copy()),
    Case("image 1 pixel", "train", "too small", image=lambda: _IMG[:1, :1].copy(), labels=lambda: _LAB[:1, :1].copy()),
    Case("image 0 pixels", "train", "too small", image=lambda: _IMG[:0, :0].copy(), labels=lambda: _LAB[:0, :0].copy()),
    Case("image smaller than a patch minimum", "train", "too small", image=lambda: _IMG[:10, :10].copy(),
         labels=_with(_painted_cell, (10, 10))),
    Case("image all NaN", "train", "no finite values", image=lambda: np.full(_IMG.shape, np.nan, np.float32)),
    Case("image all Inf", "train", "no finite values", image=lambda: np.full(_IMG.shape, -np.inf, np.float32)),
    Case("image constant", "train", "same value", image=lambda: np.full(_IMG.shape, 7, np.uint16)),
    Case("image complex", "train", "real numbers", image=lambda: _IMG.astype(np.complex64)),
    # (An RGB image on its last axis trains a 1-channel model as grey, as prediction reads it: test_quality.py.)
    Case("3 channels first, 1-channel model", "train", "takes 1 channel(s) but the image has 3",
         image=lambda: np.moveaxis(_RGB, -1, 0).copy(), model="grey"),
    Case("grey image, RGB model", "train", "takes 3 channel(s) but the image has 1", model="rgb"),
    # -- model files to fine-tune --
    Case("fine-tune a truncated file", "train", "not a valid safetensors file", model="truncated"),
    Case("fine-tune a pickle with code", "train", "never unpickled", model="pickle"),
    Case("fine-tune a folder", "train", "is a folder", model="folder"),
    # -- training outputs --
    Case("model out is a folder", "train", "is a folder", out="folder"),
    Case("model out on a missing drive", "train", "does not exist", out="missing"),
    Case("model out under a file", "train", "is a file, not a folder", out="under_file"),
    Case("model out read-only", "train", "cannot write", out="read_only"),
    Case("model out exists", "train", "already exists", out="exists"),
    # -- input files --
    Case("labels file missing", "train", "no such file", broken="labels missing"),
    Case("labels file not a TIFF", "train", "cannot read this TIFF", broken="labels garbage"),
    Case("image file empty", "predict", "cannot read this TIFF", broken="image empty"),
    Case("image file missing", "predict", "no such", broken="image missing"),
    # -- model files to segment with --
    Case("model truncated", "predict", "not a valid safetensors file", model="truncated"),
    Case("model empty", "predict", "the file is empty", model="empty"),
    Case("model of another format", "predict", "not a valid safetensors file", model="png"),
    Case("model from a future version", "predict", "newer napari-unet", model="future"),
    Case("model is a pickle with code", "predict", "never unpickled", model="pickle"),
    Case("model is a torch.save zip with code", "predict", "never unpickled", model="torch_zip"),
    Case("model without napari-unet metadata", "predict", "without napari-unet metadata", model="no_meta"),
    Case("model with odd metadata", "predict", "unusable normalisation", model="odd_meta"),
    Case("model with an absurd architecture", "predict", "impossible model architecture", model="absurd"),
    Case("model whose weights do not fit", "predict", "do not fit", model="other_arch"),
    Case("model is a folder", "predict", "is a folder", model="folder"),
    # -- images to segment --
    Case("grey image, RGB model", "predict", "model takes 3", model="rgb"),
    Case("RGBA image, RGB model", "predict", "model takes 3", model="rgb",
         image=lambda: np.concatenate([_RGB, _RGB[..., :1]], axis=-1)),
    Case("RGBA stack, RGB model", "predict", "model takes 3", model="rgb",
         image=lambda: np.stack([np.concatenate([_RGB, _RGB[..., :1]], axis=-1)] * 2)),
    Case("image 0 pixels", "predict", "empty", image=lambda: _IMG[:0, :0].copy()),
    Case("stack of 0 planes", "predict", "empty", image=lambda: np.zeros((0, 48, 48), np.uint16)),
    Case("image 1D", "predict", "2 spatial dimensions", image=lambda: _IMG[0].copy()),
    Case("image complex", "predict", "complex", image=lambda: _IMG.astype(np.complex64)),
    Case("channel axis out of range", "predict", "out of range", channel_axis=5),
    # -- segmentation outputs --
    Case("labels out is a folder", "predict", "is a folder", out="folder"),
    Case("labels out on a missing drive", "predict", "does not exist", out="missing"),
    Case("labels out under a file", "predict", "is a file, not a folder", out="under_file"),
    Case("labels out read-only", "predict", "cannot write", out="read_only"),
    Case("labels out exists", "predict", "already exists", out="exists"),
]
assert len(BAD) >= 30 and len({(c.command, c.id) for c in BAD}) == len(BAD)
IDS = [f"{c.command}: {c.id}" for c in BAD]


def _write_tiff(path: Path, arr: np.ndarray) -> str:
    with warnings.catch_warnings():  # a zero-size array makes a "nonconformant" TIFF: that is the point
        warnings.simplefilter("ignore", UserWarning)
        if arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
            tifffile.imwrite(path, arr, photometric="rgb", extrasamples=[2] if arr.shape[-1] == 4 else None)
        else:
            tifffile.imwrite(path, arr)
    return str(path)


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` with a hash of its bytes: nothing may appear, vanish or change."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _one_line(e: BaseException, expect: str) -> None:
    msg = str(e)
    assert isinstance(e, BAD_INPUT_ERRORS), f"{type(e).__name__} would be shown as a bug: {msg}"
    assert "\n" not in msg.strip() and msg.strip(), repr(msg)
    assert expect in msg, msg


@pytest.mark.parametrize("case", BAD, ids=IDS)
def test_cli_refuses_with_one_line(case, tmp_path, models, capsys, read_only_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = _write_tiff(inputs / "image.tif", case.image())
    labels = _write_tiff(inputs / "labels.tif", case.labels())
    if case.broken == "labels missing":
        labels = str(inputs / "no_such_labels.tif")
    elif case.broken == "labels garbage":
        Path(labels).write_bytes(b"this is not a TIFF")
    elif case.broken == "image empty":
        Path(image).write_bytes(b"")
    elif case.broken == "image missing":
        image = str(inputs / "no_such_image.tif")
    out = output_path(case.out, case.command, tmp_path, read_only_dir)
    if case.command == "train":
        argv = ["train", "--image", image, "--labels", labels, "--out", str(out), "--mode", case.mode, *FAST]
        argv += ["--from", str(make_model(case.model, models))] if case.model else NEW_NET
    else:
        argv = ["predict", "--model", str(make_model(case.model or "grey", models)), "--image", image,
                "--out", str(out), "--quiet", "--precision", "fp32"]
        if case.channel_axis is not None:
            argv += ["--channel-axis", str(case.channel_axis)]
    before = _snapshot(tmp_path, models)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning would be one more stderr line outside pytest
        rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"napari-unet {case.command}: error: ") and case.expect in lines[0], lines[0]
    assert not caught, [str(w.message) for w in caught]
    assert _snapshot(tmp_path, models) == before  # no output, no temporary, inputs untouched
    assert not out.exists() or case.out in ("exists", "folder")
    assert not Path("/nonexistent-drive-napari-unet").exists()  # nothing created where a drive was missing
    assert not (models / "ran").exists()  # no pickle ever ran


@pytest.mark.parametrize("case", BAD, ids=IDS)
def test_core_refuses_with_one_line_and_changes_nothing(case, tmp_path, models, read_only_dir):
    image, labels = case.image(), case.labels()
    image_before, labels_before = image.copy(), labels.copy()
    out = output_path(case.out, case.command, tmp_path, read_only_dir)
    model = make_model(case.model, models) if case.model else None
    before = _snapshot(tmp_path, models)
    calls: list[Callable] = []
    if case.broken:  # the CLI's reader (napari reads files itself for the widgets)
        name = {"labels missing": "none.tif", "image missing": "none.tif", "labels garbage": "garbage.tif",
                "image empty": "empty.tif"}[case.broken]
        path = tmp_path / "files" / name
        path.parent.mkdir()
        if "garbage" in case.broken:
            path.write_bytes(b"this is not a TIFF")
        elif "empty" in case.broken:
            path.write_bytes(b"")
        before = _snapshot(tmp_path, models)
        calls.append(lambda: read_image(path))
    elif case.out != "new":  # Train widget's Save model / Export widget and napari's writer
        if case.command == "train":
            calls += [lambda: save_model(out, _tiny(), {"mode": "instances"}, overwrite=False),
                      lambda: check_output_path(out)]
        else:
            calls += [lambda: write_labels_tiff(out, labels), lambda: check_output_path(out)]
    elif case.command == "train":  # the Train widget's worker (and the GUI-thread check)
        if model is None:
            calls.append(lambda: prepare_training_data(image, labels, case.mode))
        cfg = TrainConfig(**{**CFG.to_dict(), "mode": case.mode})
        calls.append(lambda: next(train(image, labels, cfg, init_from=model, model_config=None if model else TINY)))
    else:  # the Segment widget's worker: load the file, then predict
        source = model if model is not None else make_model("grey", models)
        if case.model not in (None, "grey", "rgb"):  # the file itself is the problem
            calls.append(lambda: load_model(source))
        calls.append(lambda: predict_all(source, image, PredictConfig(precision="fp32",
                                                                      channel_axis=case.channel_axis)))
    for call in calls:
        with pytest.raises(Exception) as err:
            call()
        _one_line(err.value, case.expect)
    for got, want in ((image, image_before), (labels, labels_before)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc")
    assert _snapshot(tmp_path, models) == before
    assert not (models / "ran").exists()


# ---- odd but accepted ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Odd:
    """An unusual input that is fine: ``check(result)`` says what must come out."""

    id: str
    command: str
    image: Callable[[], np.ndarray]
    labels: Callable[[], np.ndarray] = good_labels
    model: str = "grey"
    shape: tuple[int, ...] | None = None  # expected labels shape (predict)


def _nan_pixels():
    img = _IMG.astype(np.float32)
    img[::7, ::5] = np.nan
    img[3, 3] = np.inf
    return img


ODD = [
    Odd("1 pixel", "predict", lambda: _IMG[:1, :1].copy(), shape=(1, 1)),
    Odd("a thin line", "predict", lambda: _IMG[:1].copy(), shape=(1, 48)),
    Odd("smaller than one tile", "predict", lambda: _IMG[:9, :13].copy(), shape=(9, 13)),
    Odd("NaN and Inf pixels", "predict", _nan_pixels, shape=(48, 48)),
    Odd("all NaN", "predict", lambda: np.full((20, 20), np.nan, np.float32), shape=(20, 20)),
    Odd("constant", "predict", lambda: np.full((20, 20), 3, np.uint16), shape=(20, 20)),
    Odd("RGB for a 1-channel model (grey)", "predict", lambda: _RGB.copy(), shape=(48, 48)),
    Odd("grey stack for a 2D model (planes)", "predict", lambda: np.stack([_IMG] * 3), shape=(3, 48, 48)),
    Odd("RGB stack for an RGB model", "predict", lambda: np.stack([_RGB] * 2), model="rgb", shape=(2, 48, 48)),
    Odd("NaN pixels", "train", _nan_pixels),
    Odd("stack, one plane painted", "train", lambda: np.stack([_IMG, _IMG[::-1]]),
        labels=lambda: np.stack([np.zeros_like(_LAB), _LAB])),
]


@pytest.mark.parametrize("case", ODD, ids=[f"{c.command}: {c.id}" for c in ODD])
def test_odd_inputs_are_accepted_and_change_nothing(case, tmp_path, models):
    image, labels = case.image(), case.labels()
    image_before, labels_before = image.copy(), labels.copy()
    if case.command == "predict":
        model, meta = load_model(make_model(case.model, models))
        res = predict_all(model, image, PredictConfig(precision="fp32"), meta)
        assert res.labels.shape == case.shape and res.labels.dtype == np.uint16
        path = write_labels_tiff(tmp_path / "out.tif", res.labels)
        np.testing.assert_array_equal(read_image(path)[0], res.labels)
    else:
        events = list(train(image, labels, CFG, model_config=TINY))
        assert events[-1].result.metadata["training"]["status"] == "finished"
        assert np.isfinite([e.loss for e in events if e.loss is not None]).all()
    for got, want in ((image, image_before), (labels, labels_before)):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=want.dtype.kind == "f")


def test_odd_inputs_through_the_command_line(tmp_path, models, capsys):
    """A few of the accepted cases end to end: exit status 0 and the files that should come out."""
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([_IMG] * 3), imagej=True, metadata={"axes": "ZYX"})
    one = _write_tiff(tmp_path / "one.tif", _IMG[:1, :1])
    nan = _write_tiff(tmp_path / "nan.tif", _nan_pixels())
    grey = str(make_model("grey", models))
    for src, shape in ((stack, (3, 48, 48)), (one, (1, 1)), (nan, (48, 48))):
        out = tmp_path / f"{Path(src).stem}_seg.tif"
        assert main(["predict", "--model", grey, "--image", str(src), "--out", str(out), "--quiet",
                     "--precision", "fp32"]) == 0, capsys.readouterr().err
        assert read_image(out)[0].shape == shape
    labels = _write_tiff(tmp_path / "labels.tif", _LAB)
    out = tmp_path / "m.safetensors"
    assert main(["train", "--image", nan, "--labels", labels, "--out", str(out), *FAST, *NEW_NET]) == 0
    assert load_model(out)[1]["training"]["status"] == "finished"

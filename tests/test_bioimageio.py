"""bioimage.io model packages: export passes bioimage.io's own checks, import gives back the same model,
bad packages are refused in one line."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("bioimageio.core")  # the [bioimageio] extra; make test installs it

from bioimageio.spec import load_model_description  # noqa: E402

from napari_unet import bioimageio as bio  # noqa: E402
from napari_unet._sample_data import SAMPLE_MODEL_PATH  # noqa: E402
from napari_unet.cli import main  # noqa: E402
from napari_unet.io import ModelFileError, load_model, read_model_metadata, save_model  # noqa: E402
from napari_unet.jobs import drain  # noqa: E402
from napari_unet.model import UNet  # noqa: E402
from napari_unet.synthetic import make_nuclei, paint_sparse_labels  # noqa: E402

BOTH = "model test (pytorch_state_dict, torchscript)"
# TorchScript is what bioimage.io's Java consumers run, deprecated in torch or not.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def sample_package(tmp_path_factory):
    """The packaged model exported once for the module (with bioimage.io's model test)."""
    out = tmp_path_factory.mktemp("pkg") / "cells.zip"
    events = list(bio.export_steps(SAMPLE_MODEL_PATH, out, authors=["Test Author"]))
    return out, events


def _member(pkg: Path, name: str) -> bytes:
    with zipfile.ZipFile(pkg) as z:
        return z.read(name)


def _npy(pkg: Path, name: str) -> np.ndarray:
    return np.load(io.BytesIO(_member(pkg, name)))


def _rewrite(pkg: Path, dst: Path, edit_yaml=None, replace: dict[str, bytes] | None = None,
             drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``pkg`` with rdf.yaml edited (text -> text) and members replaced or dropped."""
    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(dst, "w") as out:
        for item in src.infolist():
            if item.filename in drop:
                continue
            data = src.read(item.filename)
            if item.filename == "rdf.yaml" and edit_yaml is not None:
                data = edit_yaml(data.decode()).encode()
            if replace and item.filename in replace:
                data = replace[item.filename]
            out.writestr(item.filename, data)
    return dst


def test_packaged_model_exports_and_passes_bioimageio_checks(sample_package):
    pkg, events = sample_package
    last = events[-1]
    assert last["path"] == pkg and pkg.is_file()
    assert last["checks"][0].startswith("format 0.5") and last["checks"][1] == BOTH
    assert [e["step"] for e in events] == sorted(e["step"] for e in events)
    names = set(zipfile.ZipFile(pkg).namelist())
    assert {"rdf.yaml", "weights.pt", "weights.torchscript.pt", bio.ARCH_FILE, "test_input.npy",
            "test_output.npy", "cover.png", "README.md"} <= names

    descr = load_model_description(pkg, perform_io_checks=False)
    _, meta = load_model(SAMPLE_MODEL_PATH)
    model_cfg = meta["model"]
    arch = descr.weights.pytorch_state_dict.architecture
    assert str(arch.callable) == "SoftmaxUNet" and dict(arch.kwargs) == model_cfg
    pre = [p for p in descr.inputs[0].preprocessing if p.id == "scale_range"][0]
    assert (pre.kwargs.min_percentile, pre.kwargs.max_percentile) == (meta["normalization"]["low"],
                                                                      meta["normalization"]["high"])
    assert [str(a) for a in pre.kwargs.axes] == ["y", "x"]  # per sample and channel, as training normalises
    y_in = descr.inputs[0].axes[2].size
    assert (y_in.min, y_in.step) == (2 ** (model_cfg["depth"] - 1),) * 2  # padded net: multiples of 2^(depth-1)
    assert [str(c) for c in descr.outputs[0].axes[1].channel_names] == ["background", "interior", "boundary"]
    assert descr.config.model_extra["napari_unet"]["mode"] == "instances"
    assert [a.name for a in descr.authors] == ["Test Author"]
    assert {c.doi for c in descr.cite} >= {bio.UNET_DOI}
    # The test output is class probabilities of the test input's shape.
    x, y = _npy(pkg, "test_input.npy"), _npy(pkg, "test_output.npy")
    assert x.shape == (1, 1, 256, 256) and y.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    # The cover is the image beside its segmentation (2:1).
    import imageio.v3 as iio

    cover = iio.imread(io.BytesIO(_member(pkg, "cover.png")))
    assert cover.shape == (256, 512, 3) and cover[:, 256:].std() > 0


def test_reimported_package_predicts_what_the_original_does(sample_package):
    pkg, _ = sample_package
    original, meta0 = load_model(SAMPLE_MODEL_PATH)
    imported, meta1 = load_model(pkg)  # load_model reads packages as well
    assert isinstance(imported, UNet) and imported.config == original.config
    assert {k: v for k, v in meta1.items() if k != "bioimageio"} == meta0
    assert meta1["bioimageio"]["name"] == SAMPLE_MODEL_PATH.stem
    assert read_model_metadata(pkg)["mode"] == meta0["mode"]
    x = torch.from_numpy(bio._normalised(_npy(pkg, "test_input.npy"), meta0))
    with torch.no_grad():
        diff = (original(x) - imported(x)).abs().max().item()
        ts = torch.jit.load(io.BytesIO(_member(pkg, "weights.torchscript.pt")))
        ts_diff = np.abs(ts(x).numpy() - _npy(pkg, "test_output.npy")).max()
    assert diff == 0.0  # the same weights, bit for bit
    assert ts_diff < 1e-5


def _train_tiny(tmp_path: Path, in_channels: int = 1, padding: str = "valid") -> Path:
    from napari_unet.config import ModelConfig, TrainConfig
    from napari_unet.training import train

    img, truth = make_nuclei((96, 96), radius=(5, 9), seed=3)
    labels = paint_sparse_labels(truth, n_cells=4, seed=3, exclude_border=4)
    if in_channels == 3:
        img = np.stack([img, img // 2, img // 3], axis=-1)
    cfg = ModelConfig(in_channels=in_channels, n_classes=3, depth=3, base_filters=4, padding=padding,
                      batch_norm=padding == "same")
    gen = train([img], [labels], TrainConfig(iterations=3, patch_size=64, batch_size=2, threads=1,
                                             precision="fp32", augment=False),
                model_config=cfg, channel_axis=-1 if in_channels == 3 else None)
    result = drain(gen)
    return save_model(tmp_path / f"fresh{in_channels}{padding}.safetensors", result.model, result.metadata)


@pytest.mark.slow
@pytest.mark.parametrize("in_channels, padding", [(1, "valid"), (3, "same")])
def test_freshly_trained_model_exports_and_round_trips(tmp_path, in_channels, padding):
    model_file = _train_tiny(tmp_path, in_channels, padding)
    image = np.random.default_rng(0).integers(0, 4000, (300, 200, 3) if in_channels == 3 else (300, 200),
                                              dtype=np.uint16)
    out = bio.export_package(model_file, tmp_path / "fresh.zip", image=image, name="fresh model",
                             description="a test", license="MIT", tags=["test"])
    descr = load_model_description(out, perform_io_checks=False)
    assert descr.name == "fresh model" and descr.license == "MIT" and list(descr.tags) == ["test"]
    model, _ = load_model(model_file)
    x_raw = _npy(out, "test_input.npy")
    side = model.valid_input_size(bio.TEST_SIDE)
    assert x_raw.shape == (1, in_channels, side, side)  # mirrored up from the 200-pixel side
    out_y = descr.outputs[0].axes[2].size
    assert out_y.offset == -2 * model.margin() and (padding == "same") == (out_y.offset == 0)
    imported, _ = load_model(out)
    ts = torch.jit.load(io.BytesIO(_member(out, "weights.torchscript.pt")))
    # The traced network follows the input size (valid nets crop their skips by traced sizes).
    other = model.valid_input_size(side + 40)
    x = torch.rand(2, in_channels, other, model.valid_input_size(other + 16))
    with torch.no_grad():
        want = torch.softmax(model(x), dim=1)
        assert (imported(x) - model(x)).abs().max().item() == 0.0
        assert (ts(x) - want).abs().max().item() < 1e-5


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    # A test output that the package's own preprocessing + network cannot reproduce: bioimage.io's
    # model test fails, the error is one line, and neither the package nor a temporary is left.
    monkeypatch.setattr(bio, "_normalised", lambda raw, meta: raw.astype(np.float32))
    out = tmp_path / "bad.zip"
    with pytest.raises(bio.BioimageioError, match="model test failed") as e:
        bio.export_package(SAMPLE_MODEL_PATH, out)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_requests(tmp_path, sample_package):
    pkg, _ = sample_package
    with pytest.raises(bio.BioimageioError, match=r"\.zip"):
        bio.export_package(SAMPLE_MODEL_PATH, tmp_path / "model.tar")
    with pytest.raises(OSError, match="already exists"):
        bio.export_package(SAMPLE_MODEL_PATH, pkg)
    with pytest.raises(bio.BioimageioError, match="unknown weight format"):
        bio.export_package(SAMPLE_MODEL_PATH, tmp_path / "x.zip", weight_formats=["onnx"])
    with pytest.raises(ModelFileError, match="no such model file"):
        bio.export_package(tmp_path / "missing.safetensors", tmp_path / "x.zip")
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # as if the extra were not installed
    with pytest.raises(bio.BioimageioError, match=r"napari-unet\[bioimageio\]"):
        bio.export_package(SAMPLE_MODEL_PATH, tmp_path / "x.zip")
    zipped = tmp_path / "some.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("rdf.yaml", "type: model\n")
    assert bio.description_name(zipped) == "rdf.yaml"
    with pytest.raises(ModelFileError, match=r"napari-unet\[bioimageio\]"):
        load_model(zipped)


def test_bad_packages_are_refused_in_one_line(tmp_path, sample_package):
    pkg, _ = sample_package
    data = pkg.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    not_bio = tmp_path / "other.zip"
    with zipfile.ZipFile(not_bio, "w") as z:
        z.writestr("hello.txt", "not a model")

    class Evil:  # what a crafted pickle would run on load: weights_only must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    evil = _torch_bytes({"w": Evil()})
    outside = tmp_path / "outside.pt"
    outside.write_bytes(_member(pkg, "weights.pt"))  # the right weights, but not in the package
    cases = {
        truncated: "not a zip file",
        not_bio: "a zip without a bioimage.io description",
        _rewrite(pkg, tmp_path / "arch.zip", lambda y: y.replace("callable: SoftmaxUNet", "callable: ResNet")):
            "architecture is 'ResNet'",
        _rewrite(pkg, tmp_path / "kwargs.zip", lambda y: y.replace("base_filters: 8", "base_filters: 8\n"
                                                                   "        attention: true", 1)):
            "unknown U-Net arguments",
        _rewrite(pkg, tmp_path / "wide.zip", lambda y: y.replace("base_filters: 8", "base_filters: 16", 1)):
            "weights do not fit",
        _rewrite(pkg, tmp_path / "noinputs.zip", lambda y: y.replace("\ninputs:", "\nunused_inputs:")):
            "not a bioimage.io model package",
        _rewrite(pkg, tmp_path / "tsonly.zip", lambda y: y.split("weights:\n")[0] + "weights:\n  torchscript:\n"
                 "    source: weights.torchscript.pt\n    pytorch_version: 2.13.0\n" + "config:" +
                 y.split("\nconfig:")[1], drop=("weights.pt",)):
            "no pytorch_state_dict weights",
        _rewrite(pkg, tmp_path / "altered.zip", replace={"weights.pt": _torch_bytes({"w": torch.zeros(1)})}):
            "do not match their SHA-256",
        _rewrite(pkg, tmp_path / "url.zip", lambda y: y.replace("source: weights.pt", "source: "
                                                              "http://127.0.0.1:9/weights.pt")):
            "must be a file inside the package",
        _rewrite(pkg, tmp_path / "outside.zip", lambda y: y.replace("source: weights.pt", f"source: {outside}")):
            "must be a file inside the package",
        _rewrite(pkg, tmp_path / "nohash.zip", lambda y: y.replace(
            f"source: weights.pt\n    sha256: {_sha(_member(pkg, 'weights.pt'))}\n", "source: weights.pt\n")):
            "gives no SHA-256",
        _rewrite(pkg, tmp_path / "pickle.zip", lambda y: y.replace(_sha(_member(pkg, "weights.pt")), _sha(evil)),
                 replace={"weights.pt": evil}):
            "not a plain state dict",
        _rewrite(pkg, tmp_path / "mode.zip", lambda y: y.replace("mode: instances", "mode: tracking")):
            "unknown label mode",
    }
    for path, message in cases.items():
        with pytest.raises(ModelFileError) as e:
            load_model(path)
        assert message in str(e.value), (path.name, str(e.value))
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=pickle)
    return buf.getvalue()


def test_cli_export_predict_and_finetune_from_package(tmp_path, sample_package, capsys):
    out = tmp_path / "cli.zip"
    img, truth = make_nuclei((96, 96), seed=5)
    tifffile.imwrite(tmp_path / "img.tif", img)
    assert main(["export-model", str(SAMPLE_MODEL_PATH), "--out", str(out), "--authors", "A One; B Two",
                 "--name", "my nuclei", "--image", str(tmp_path / "img.tif"), "--no-test"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "model test" not in captured.out and "[1/4]" in captured.err
    descr = load_model_description(out, perform_io_checks=False)
    assert [a.name for a in descr.authors] == ["A One", "B Two"] and descr.name == "my nuclei"
    # Existing package, no --overwrite: one line, exit 2.
    assert main(["export-model", str(SAMPLE_MODEL_PATH), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    # predict --model PKG.zip gives the labels the model file gives.
    for model, name in ((SAMPLE_MODEL_PATH, "a.tif"), (out, "b.tif")):
        assert main(["predict", "--model", str(model), "--image", str(tmp_path / "img.tif"),
                     "--out", str(tmp_path / name), "--precision", "fp32", "--quiet"]) == 0
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert a.max() > 3 and np.array_equal(a, b)
    # train --from PKG.zip fine-tunes it.
    lab = paint_sparse_labels(truth, n_cells=4, seed=5)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    assert main(["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
                 "--out", str(tmp_path / "ft.safetensors"), "--from", str(out), "--iterations", "2",
                 "--patch-size", "32", "--batch-size", "2", "--threads", "1", "--precision", "fp32"]) == 0
    ft, meta = load_model(tmp_path / "ft.safetensors")
    assert ft.config == load_model(SAMPLE_MODEL_PATH)[0].config and meta["training"]["iterations"] == 2


def test_published_metadata_has_no_local_paths_and_distinct_channel_names():
    meta = {"mode": "instances", "bioimageio": {"name": "x", "package": "x.zip"},
            "training": {"init_from": "/home/jane/models/nuclei.safetensors",
                         "previous": {"init_from": "/srv/lab/base.zip", "previous": None}}}
    public = bio._public(meta)
    assert "bioimageio" not in public and meta["bioimageio"]  # the caller's dict is left alone
    assert public["training"]["init_from"] == "nuclei.safetensors"
    assert public["training"]["previous"]["init_from"] == "base.zip"
    assert bio._channel_names(["background", "cell a", "cell_a", "2nd"]) == \
        ["background", "cell_a", "cell_a_2", "class3"]

"""``napari-unet predict``: output files (dtype, axes, pixel size), folders and globs, one-line errors."""

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.cli import main
from napari_unet.io import read_image, save_model
from napari_unet.model import UNet
from napari_unet.synthetic import make_nuclei


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_model(d / "inst.safetensors", UNet(1, 3, depth=2, base_filters=4, padding="same"), {"mode": "instances"})
    save_model(d / "rgb.safetensors", UNet(3, 2, depth=2, base_filters=4, padding="valid"), {"mode": "semantic"})
    img, _ = make_nuclei((64, 80), seed=0)
    imgs = d / "images"
    imgs.mkdir()
    tifffile.imwrite(imgs / "a.tif", img, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "YX", "unit": "um"})
    tifffile.imwrite(imgs / "z.tif", np.stack([img, img[::-1]]), imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "um"})
    rgb = np.stack([img // 16] * 3, axis=-1).astype(np.uint8)
    tifffile.imwrite(d / "rgb.tif", rgb, photometric="rgb")
    (d / "bad.tif").write_bytes(b"not a tiff at all")
    return d


def test_one_image_to_one_file_with_probabilities(files, tmp_path, capsys):
    out = tmp_path / "seg.tif"
    rc = main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images" / "a.tif"),
               "--out", str(out), "--probabilities", "--precision", "fp32", "--quiet"])
    assert rc == 0
    labels, info = read_image(out)
    assert labels.dtype == np.uint16 and labels.shape == (64, 80)
    assert info.axes == "YX" and info.scale == {"X": 0.5, "Y": 0.5} and info.unit == "um"
    probs, pinfo = read_image(tmp_path / "seg_probabilities.tif")
    assert probs.dtype == np.float32 and probs.shape == (3, 64, 80) and pinfo.axes == "CYX"
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert "seg.tif" in capsys.readouterr().err
    # Existing output: refused without --overwrite, file untouched.
    before = out.read_bytes()
    rc = main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images" / "a.tif"),
               "--out", str(out), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images" / "a.tif"),
                 "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_flips_average_the_mirror_images(files, tmp_path):
    """--flips: the written probabilities are the mean over the image's four mirror images."""
    from napari_unet.config import PredictConfig
    from napari_unet.inference import predict_all
    from napari_unet.io import load_model

    src = files / "images" / "a.tif"
    assert main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(src),
                 "--out", str(tmp_path / "f.tif"), "--probabilities", "--flips", "--precision", "fp32",
                 "--quiet"]) == 0
    got, _ = read_image(tmp_path / "f_probabilities.tif")
    model, meta = load_model(files / "inst.safetensors")
    image, _ = read_image(src)
    plain = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32"), meta).probabilities
    flipped = predict_all(model, image, PredictConfig(probabilities=True, precision="fp32", flips=True),
                          meta).probabilities
    np.testing.assert_allclose(got, flipped, atol=1e-6)
    assert np.abs(got - plain).max() > 1e-3


def test_folder_and_glob_inputs_write_one_file_each(files, tmp_path):
    out = tmp_path / "outdir"
    rc = main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images"),
               "--out", str(out), "--quiet", "--tile", "32"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "z_labels.tif"]
    z, info = read_image(out / "z_labels.tif")
    assert z.shape == (2, 64, 80) and info.axes == "ZYX" and info.scale["Z"] == 3.0 and info.scale["X"] == 0.5
    out2 = tmp_path / "globbed"
    assert main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images" / "z*"),
                 "--out", str(out2), "--quiet"]) == 0
    assert [p.name for p in out2.iterdir()] == ["z_labels.tif"]


def test_rgb_image_for_a_three_channel_model(files, tmp_path):
    out = tmp_path / "rgb_seg.tif"
    assert main(["predict", "--model", str(files / "rgb.safetensors"), "--image", str(files / "rgb.tif"),
                 "--out", str(out), "--quiet"]) == 0
    labels, info = read_image(out)
    assert labels.shape == (64, 80) and labels.dtype == np.uint8 and info.axes == "YX"
    assert set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize("case,message", [
    ("missing image", "no such image file"),
    ("missing model", "no such model file"),
    ("unreadable image", "cannot read this TIFF"),
    ("channel mismatch", "model takes 3 channels"),
    ("many images one file", "give a folder"),
    ("empty glob", "no file matches"),
])
def test_bad_input_gives_one_line_and_no_file(files, tmp_path, capsys, case, message):
    model, image, out = files / "inst.safetensors", files / "images" / "a.tif", tmp_path / "o.tif"
    extra = []
    if case == "missing image":
        image = files / "nope.tif"
    elif case == "missing model":
        model = files / "nope.safetensors"
    elif case == "unreadable image":
        image = files / "bad.tif"
    elif case == "channel mismatch":
        model = files / "rgb.safetensors"
    elif case == "many images one file":
        extra = ["--image", str(files / "rgb.tif")]
    elif case == "empty glob":
        image = files / "images" / "*.nothing"
    rc = main(["predict", "--model", str(model), "--image", str(image), *extra, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1 and err.startswith("napari-unet predict: error:")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_skips_hidden_files_and_goes_on_past_a_bad_one(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.tif", "c.tif"):
        shutil.copy(files / "images" / "a.tif", folder / name)
    (folder / "._a.tif").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: not an image
    (folder / "b.tif").write_bytes(b"not a tiff at all")  # a broken file among good ones
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(folder), "--out", str(out),
               "--precision", "fp32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "c_labels.tif"]
    bad = [line for line in err if "error" in line]
    assert len(bad) == 2 and "b.tif" in bad[0] and "._a" not in "\n".join(err)
    assert bad[1].endswith("1 of 3 images failed (see above); the others were written")


@pytest.mark.parametrize("option, message", [(["--scale", "0"], "scale must be"),
                                             (["--seed-threshold", "1.5"], "seed_threshold must be"),
                                             (["--foreground-threshold", "0"], "foreground_threshold must be")])
def test_a_bad_option_fails_before_any_image(files, tmp_path, capsys, option, message):
    rc = main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images"),
               "--out", str(tmp_path / "o"), *option, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_thresholds_reach_the_instance_step(files, tmp_path, thresholds_seen):
    """--seed-threshold and --foreground-threshold go to the instance step."""
    out = tmp_path / "seg.tif"
    assert main(["predict", "--model", str(files / "inst.safetensors"), "--image", str(files / "images" / "a.tif"),
                 "--out", str(out), "--seed-threshold", "0.35", "--foreground-threshold", "0.65", "--quiet"]) == 0
    assert thresholds_seen == [(0.35, 0.65)] and tifffile.imread(out).shape == (64, 80)

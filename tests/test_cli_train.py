"""``napari-unet train``: the model file it writes, its progress output and its one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet.cli import main
from napari_unet.io import load_model
from napari_unet.synthetic import make_nuclei, paint_sparse_labels

QUICK = ["--iterations", "3", "--patch-size", "32", "--batch-size", "2", "--threads", "1", "--precision", "fp32"]
FAST = [*QUICK, "--depth", "2", "--width", "4"]  # and a tiny new network


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    img, gt = make_nuclei((64, 64), seed=3)
    lab = paint_sparse_labels(gt, n_cells=4, seed=3)
    tifffile.imwrite(d / "img.tif", img)
    tifffile.imwrite(d / "lab.tif", lab)
    return d, img, lab


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_train_writes_exactly_out(files, capsys):
    d, _, lab = files
    out = d / "m.safetensors"
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out), *FAST]) == 0
    model, meta = load_model(out)
    assert meta["mode"] == "instances" and meta["training"]["iterations"] == 3
    assert model.config.depth == 2 and model.config.base_filters == 4
    assert [p.name for p in d.iterdir() if p.name.startswith(".") or p.name.endswith(".part")] == []
    err = capsys.readouterr().err
    assert "training" in err and "wrote" in err  # progress bar and summary on stderr
    # Refuses to overwrite, then --overwrite replaces it; --from fine-tunes it.
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out), *FAST]) == 2
    assert "already exists" in _err_line(capsys)
    two = _write(d, "two_classes.tif", np.minimum(lab, 2).astype(np.uint16))  # background and one class
    assert main(["train", "--image", str(d / "img.tif"), "--labels", two, "--out", str(out),
                 "--from", str(out), "--overwrite", "--mode", "semantic", *QUICK]) == 0
    assert "replaced the output layer: 3 -> 2 classes" in capsys.readouterr().err
    assert load_model(out)[1]["mode"] == "semantic"


def test_from_sample_fine_tunes_the_packaged_model(files, tmp_path, monkeypatch, capsys):
    from napari_unet import _sample_data

    d, _, _ = files
    out = tmp_path / "ft.safetensors"
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out),
                 "--from", "sample", *QUICK]) == 0
    model, meta = load_model(out)
    assert meta["training"]["init_from"] == str(_sample_data.SAMPLE_MODEL_PATH)
    packaged, _ = load_model(_sample_data.SAMPLE_MODEL_PATH)
    assert model.config == packaged.config
    # An installation without the packaged model says so in one line.
    monkeypatch.setattr(_sample_data, "sample_model_path", lambda: None)
    capsys.readouterr()
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out",
                 str(tmp_path / "no.safetensors"), "--from", "sample", *QUICK]) != 0
    assert "no packaged sample model" in _err_line(capsys)
    assert not (tmp_path / "no.safetensors").exists()


def test_from_sample_on_a_colour_image_trains_and_predicts_as_grey(files, tmp_path, capsys):
    d, img, lab = files
    grey = img.astype(np.float32) / img.max()
    rgb = (255 * np.stack([1 - 0.5 * grey, 1 - 0.8 * grey, 1 - 0.3 * grey], axis=-1)).astype(np.uint8)  # H&E-like
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    out = tmp_path / "rgb.safetensors"
    assert main(["train", "--image", str(tmp_path / "rgb.tif"), "--labels", str(d / "lab.tif"), "--out", str(out),
                 "--from", "sample", *QUICK]) == 0
    err = capsys.readouterr().err
    n_painted = len(np.unique(lab[lab >= 2]))
    assert "check on the painted cells" in err and f"of {n_painted} found again" in err
    model, meta = load_model(out)
    assert model.config.in_channels == 1 and meta["training"]["painted_check"]["painted"] == n_painted
    assert main(["predict", "--model", str(out), "--image", str(tmp_path / "rgb.tif"), "--out",
                 str(tmp_path / "rgb_labels.tif")]) == 0
    assert tifffile.imread(tmp_path / "rgb_labels.tif").shape == (64, 64)


def test_from_refuses_new_network_options(files, tmp_path, capsys):
    d, _, _ = files
    out = tmp_path / "m.safetensors"
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out),
                 "--from", "sample", *FAST]) == 2
    assert _err_line(capsys).endswith("--depth, --width describe a new network; a model fine-tuned with --from keeps "
                                      "its own architecture")
    assert not out.exists()


def test_fine_tuning_options_without_from_are_refused(files, tmp_path, capsys):
    d, _, _ = files
    out = tmp_path / "m.safetensors"
    base = ["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out), *FAST]
    assert main([*base, "--keep-pretrained", "0.5"]) == 2
    assert _err_line(capsys).endswith("--keep-pretrained only apply when fine-tuning: give the starting model "
                                      "with --from")
    assert main([*base, "--no-rescale", "--keep-pretrained", "0"]) == 2
    assert "--keep-pretrained, --no-rescale only apply" in _err_line(capsys)
    assert not out.exists()


def test_an_iteration_count_alone_is_not_cut_at_a_minute():
    from napari_unet.config import DEFAULT_MAX_TIME, TrainConfig

    assert TrainConfig(iterations=5000).max_time is None
    assert TrainConfig().max_time == DEFAULT_MAX_TIME
    assert TrainConfig(iterations=10, max_time=5.0).max_time == 5.0


def test_several_images(files, capsys):
    d, img, lab = files
    tifffile.imwrite(d / "img2.tif", img[::-1])
    tifffile.imwrite(d / "lab2.tif", lab[::-1])
    out = d / "two.safetensors"
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--image",
                 str(d / "img2.tif"), "--labels", str(d / "lab2.tif"), "--out", str(out), "--quiet", *FAST]) == 0
    assert load_model(out)[1]["training"]["data_shapes"] == [[64, 64], [64, 64]]


def _write(d, name, arr):
    tifffile.imwrite(d / name, arr)
    return str(d / name)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("shape", "differ"),
    ("no_background", "no background"),
    ("no_object", "no object"),
    ("float_labels", "not integers"),
    ("pairs", "give one --labels per --image"),
])
def test_bad_input_one_line_error(files, capsys, case, expected):
    d, img, lab = files
    image, labels = str(d / "img.tif"), str(d / "lab.tif")
    extra = []
    if case == "missing":
        image = str(d / "nope.tif")
    elif case == "shape":
        labels = _write(d, "small.tif", lab[:50])
    elif case == "no_background":
        labels = _write(d, "nobg.tif", np.where(lab == 1, 0, lab).astype(np.uint16))
    elif case == "no_object":
        labels = _write(d, "noobj.tif", np.minimum(lab, 1).astype(np.uint16))
    elif case == "float_labels":
        labels = _write(d, "float.tif", lab.astype(np.float32) + 0.5)
    elif case == "pairs":
        extra = ["--image", image]
    out = d / f"{case}.safetensors"
    code = main(["train", "--image", image, "--labels", labels, *extra, "--out", str(out), *FAST])
    assert code == 2
    line = _err_line(capsys)
    assert line.startswith("napari-unet train: error:") and expected in line
    assert not out.exists()


def test_subprocess_error_exit_status(files):
    d, _, lab = files
    bad = _write(d, "neg.tif", (lab.astype(np.int16) - 1))
    exe = Path(sys.executable).parent / "napari-unet"
    r = subprocess.run([str(exe), "train", "--image", str(d / "img.tif"), "--labels", bad, "--out",
                        str(d / "x.safetensors"), *FAST], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "negative" in r.stderr and not (d / "x.safetensors").exists()


def test_options_reach_the_training_config(files):
    """Every training option of the command line lands in the TrainConfig stored in the model file."""
    d, _, _ = files
    out = d / "opts.safetensors"
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out), *FAST,
                 "--lr", "0.002", "--lr-schedule", "cosine", "--optimizer", "sgd", "--no-augment",
                 "--val-fraction", "0.3", "--min-val-objects", "3", "--ema", "0.5", "--seed", "4",
                 "--overwrite"]) == 0
    cfg = load_model(out)[1]["training"]["config"]
    assert cfg["learning_rate"] == 0.002 and cfg["lr_schedule"] == "cosine" and cfg["optimizer"] == "sgd"
    assert cfg["augment"] is False and cfg["val_fraction"] == 0.3 and cfg["seed"] == 4
    assert cfg["min_val_objects"] == 3 and cfg["ema"] == 0.5
    assert cfg["patch_size"] == 32 and cfg["batch_size"] == 2 and cfg["iterations"] == 3
    # Not given: the library's defaults.
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out),
                 "--iterations", "1", "--depth", "2", "--width", "4", "--threads", "1", "--precision", "fp32",
                 "--overwrite"]) == 0
    from napari_unet.config import TrainConfig

    cfg = load_model(out)[1]["training"]["config"]
    dflt = TrainConfig()
    assert (cfg["learning_rate"], cfg["lr_schedule"], cfg["patch_size"], cfg["batch_size"], cfg["ema"],
            cfg["min_val_objects"]) == \
        (dflt.learning_rate, dflt.lr_schedule, dflt.patch_size, dflt.batch_size, dflt.ema, dflt.min_val_objects)
    # SGD without --lr: the widget's SGD rate, not Adam's.
    assert main(["train", "--image", str(d / "img.tif"), "--labels", str(d / "lab.tif"), "--out", str(out),
                 "--iterations", "1", "--depth", "2", "--width", "4", "--threads", "1", "--precision", "fp32",
                 "--optimizer", "sgd", "--overwrite"]) == 0
    assert load_model(out)[1]["training"]["config"]["learning_rate"] == 0.01

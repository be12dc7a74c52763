"""``napari-unet train --images DIR --labels DIR``: pairing by name, the loss log, and one-line errors."""

import csv

import numpy as np
import pytest
import tifffile

from napari_unet.cli import main
from napari_unet.io import load_model
from napari_unet.synthetic import make_nuclei, paint_sparse_labels

FAST = ["--iterations", "2", "--depth", "2", "--width", "4", "--patch-size", "32", "--batch-size", "2",
        "--threads", "1", "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("folders")
    imgs, labs = d / "images", d / "labels"
    imgs.mkdir()
    labs.mkdir()
    for k, (name, lab_name) in enumerate([("a.tif", "a_labels.tif"), ("b.tif", "b.tif")]):
        img, gt = make_nuclei((64, 64 + 16 * k), seed=k)
        tifffile.imwrite(imgs / name, img)
        tifffile.imwrite(labs / lab_name, paint_sparse_labels(gt, n_cells=4, seed=k))
    tifffile.imwrite(imgs / "c_unlabelled.tif", img)
    return d


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_folders_pair_by_name_and_log_the_losses(folders, capsys):
    out, log = folders / "m.safetensors", folders / "loss.csv"
    assert main(["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
                 "--out", str(out), "--log-csv", str(log), *FAST, "--min-val-objects", "3"]) == 0
    assert "1 image(s) without a label file left out" in capsys.readouterr().err
    meta = load_model(out)[1]
    assert meta["training"]["data_shapes"] == [[64, 64], [64, 80]] and meta["training"]["processes"] == 1
    rows = list(csv.DictReader(log.open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows) and rows[-1]["val_iou"] != ""
    # The log is an output like --out: kept unless --overwrite.
    out.unlink()
    assert main(["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
                 "--out", str(out), "--log-csv", str(log), *FAST]) == 2
    assert "loss.csv already exists" in _err_line(capsys) and not out.exists()


@pytest.mark.parametrize("case, expected", [
    ("both", "not both"),
    ("count", "1 --images but 2 --labels"),
    ("no_folder", "no such folder (--images)"),
    ("no_pairs", "has a label file of the same name"),
    ("labels_folder_for_file", "is a folder; for folders of images and labels use --images"),
    ("nothing", "no training images"),
    ("bad_pair", "b.tif: labels 2 are not integers"),
])
def test_folder_mode_errors_one_line(folders, tmp_path, capsys, case, expected):
    imgs, labs = str(folders / "images"), str(folders / "labels")
    if case == "both":
        args = ["--images", imgs, "--image", str(folders / "images" / "a.tif"), "--labels", labs]
    elif case == "count":
        args = ["--images", imgs, "--labels", labs, "--labels", labs]
    elif case == "no_folder":
        args = ["--images", str(tmp_path / "nope"), "--labels", labs]
    elif case == "no_pairs":
        (tmp_path / "empty").mkdir()
        args = ["--images", imgs, "--labels", str(tmp_path / "empty")]
    elif case == "labels_folder_for_file":
        args = ["--image", str(folders / "images" / "a.tif"), "--labels", labs]
    elif case == "nothing":
        args = ["--labels", labs]
    else:  # the second pair's labels are not integers: the message names that pair's files
        bad_labs = tmp_path / "labels"
        bad_labs.mkdir()
        for name in ("a_labels.tif", "b.tif"):
            lab = tifffile.imread(folders / "labels" / name)
            tifffile.imwrite(bad_labs / name, lab + np.float32(0.5) if name == "b.tif" else lab)
        args = ["--images", imgs, "--labels", str(bad_labs)]
    out = tmp_path / "m.safetensors"
    assert main(["train", *args, "--out", str(out), *FAST]) == 2
    line = _err_line(capsys)
    assert line.startswith("napari-unet train: error:") and expected in line
    assert not out.exists()

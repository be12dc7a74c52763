"""The npe2 writer (File > Save Selected Layers) for Labels layers -> ImageJ TIFF."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet._writer import axes_letters, write_labels


def test_write_labels_keeps_values_dtype_and_scale(tmp_path):
    labels = np.zeros((4, 16, 20), np.uint16)
    labels[2, 3:7, 4:9] = 1234
    path = tmp_path / "out.tif"
    assert write_labels(str(path), labels, {"scale": (3.0, 0.25, 0.25), "axis_labels": ("z", "y", "x")}) == [str(path)]
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.asarray(), labels)
        assert tif.asarray().dtype == np.uint16
        assert tif.imagej_metadata["spacing"] == 3.0
        num, den = tif.pages[0].tags["XResolution"].value
        assert num / den == 4.0
    # napari has already asked: an existing file is replaced, atomically (no temporary left).
    write_labels(str(path), labels[:1], {})
    assert tifffile.imread(path).shape == (16, 20)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_axes_letters():
    assert axes_letters(2) == "YX" and axes_letters(3) == "ZYX" and axes_letters(4) == "TZYX"
    assert axes_letters(3, ("t", "y", "x")) == "TYX"
    assert axes_letters(3, ("-3", "-2", "-1")) == "ZYX"
    with pytest.raises(ValueError, match="6 dimensions"):
        write_labels("x.tif", np.zeros((1,) * 6, np.uint8), {})


def test_napari_saves_labels_through_the_plugin(tmp_path):
    import napari
    from napari.layers import Labels
    from napari.plugins import _initialize_plugins
    from npe2 import PluginManager

    # napari registers plugins when a viewer opens; run alone, this test opens none (and
    # registering twice fails, so only when an earlier test has not).
    try:
        PluginManager.instance().get_manifest("napari-unet")
    except KeyError:
        _initialize_plugins()

    layer = Labels(np.array([[0, 1], [2, 700]], np.int32), name="lab", scale=(0.5, 0.5))
    written = napari.save_layers(str(tmp_path / "lab.tif"), [layer], plugin="napari-unet")
    assert written == [str(tmp_path / "lab.tif")]
    data = tifffile.imread(written[0])
    np.testing.assert_array_equal(data, layer.data)
    assert data.dtype == np.uint16

"""3D stacks: volumes segmented as 3D objects (core, CLI, widgets), on synthetic touching nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_unet.config import ConfigError, PredictConfig, TrainConfig
from napari_unet.inference import predict_all
from napari_unet.postprocess import instance_labels, stitch_planes, volume_size_limits
from napari_unet.quality import match_objects
from napari_unet.synthetic import make_nuclei_3d
from napari_unet.training_data import prepare_training_data, side_planes


def ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    """AP at IoU 0.5 over 3D objects: TP / (TP + FP + FN), one-to-one matching."""
    n_t, n_p = len(np.unique(truth[truth > 0])), len(np.unique(pred[pred > 0]))
    tp = int(np.sum(match_objects(truth, pred) > 0.5))
    return tp / max(n_t + n_p - tp, 1)


def oracle_probabilities(truth: np.ndarray):
    """Interior = each object shrunk by 2 voxels away from its neighbours and the background; foreground."""
    from skimage.segmentation import find_boundaries

    rim = ndi.binary_dilation(find_boundaries(truth, mode="inner"), iterations=1)
    interior = ((truth > 0) & ~rim).astype(np.float16)
    return interior, (truth > 0).astype(np.float16)


def touching_pairs(truth: np.ndarray) -> set[tuple[int, int]]:
    grown = ndi.grey_dilation(truth, size=3)
    sel = (truth > 0) & (grown > 0) & (grown != truth)
    return {tuple(sorted(p)) for p in zip(truth[sel].tolist(), grown[sel].tolist())}


def pieces_per_object(truth: np.ndarray, pred: np.ndarray) -> list[int]:
    """For every true object: how many predicted ids cover at least a tenth of it."""
    out = []
    for i in np.unique(truth[truth > 0]):
        ids, counts = np.unique(pred[truth == i], return_counts=True)
        out.append(int(np.sum((ids > 0) & (counts >= 0.1 * counts.sum()))))
    return out


@pytest.mark.parametrize("voxel_size, shape", [((1, 1, 1), (40, 96, 96)), ((3, 1, 1), (14, 96, 96))])
def test_synthetic_volumes_have_touching_3d_nuclei(voxel_size, shape):
    image, truth = make_nuclei_3d(shape, voxel_size, seed=3)
    assert image.shape == shape and image.dtype == np.uint16 and truth.shape == shape
    assert truth.max() >= 10
    assert len(touching_pairs(truth)) >= 3  # touching nuclei, Z included
    z_extent = [len(np.unique(np.nonzero(truth == i)[0])) for i in range(1, truth.max() + 1)]
    assert np.median(z_extent) >= 3  # nuclei span several planes
    for i in range(1, truth.max() + 1):  # every nucleus is one connected object
        assert ndi.label(truth == i)[1] == 1
    inside, outside = image[truth > 0].mean(), image[truth == 0].mean()
    assert inside > 2 * outside


@pytest.mark.parametrize("voxel_size, shape", [((1, 1, 1), (40, 96, 96)), ((3, 1, 1), (14, 96, 96))])
def test_3d_post_processing_finds_each_nucleus_once_and_keeps_touching_ones_apart(voxel_size, shape):
    _, truth = make_nuclei_3d(shape, voxel_size, seed=3)
    interior, fg = oracle_probabilities(truth)
    aniso = voxel_size[0] / voxel_size[1]
    min_size, min_seed = volume_size_limits(15, 0, aniso)
    labels = instance_labels(interior, fg, min_size=min_size, min_seed_size=min_seed)
    assert labels.shape == shape and labels.dtype == np.uint16
    assert ap50(truth, labels) >= 0.9
    assert sorted(np.unique(labels[labels > 0])) == list(range(1, labels.max() + 1))  # consecutive ids
    # One object per nucleus across its planes, and no object holding most of two touching nuclei.
    assert np.mean(np.array(pieces_per_object(truth, labels)) == 1) >= 0.9
    for a, b in touching_pairs(truth):
        ids_a, ids_b = np.bincount(labels[truth == a]).argmax(), np.bincount(labels[truth == b]).argmax()
        assert ids_a == 0 or ids_a != ids_b
    # Bands of rows (bounded memory) give the same objects as the whole volume.
    banded = instance_labels(interior, fg, min_size=min_size, min_seed_size=min_seed, block=16, halo=40)
    assert ap50(labels, banded) == 1.0


def test_stitching_links_planes_by_overlap():
    v = np.zeros((4, 12, 12), np.int32)
    v[0, 2:6, 2:6] = 1
    v[1, 2:6, 2:7] = 1      # the same object: ids repeat between planes on input
    v[1, 8:11, 8:11] = 2    # a new object
    v[2, 8:11, 8:11] = 5
    v[3, 2:4, 9:12] = 5     # no overlap with plane 2's object 5: a new object despite the same id
    out = stitch_planes(v)
    assert out.dtype == np.uint16 and out.max() == 3
    assert len(np.unique(out[0:2, 2:6, 2:6])) == 1
    assert out[1, 9, 9] == out[2, 9, 9] != out[0, 3, 3]
    assert out[3, 3, 10] not in (0, out[2, 9, 9], out[0, 3, 3])
    low = stitch_planes(v, iou_threshold=0.9)  # plane 1's object is larger: IoU 0.8, not linked
    assert low[0, 3, 3] != low[1, 3, 3]
    with pytest.raises(ValueError, match="Z, Y, X"):
        stitch_planes(v[0])


def test_size_limits_in_voxels():
    assert volume_size_limits(0, 1) == (0, 1)
    small, seed = volume_size_limits(100, 20)
    assert small == round(4 / 3 * np.pi * (100 / np.pi) ** 1.5) and 0 < seed < small
    assert volume_size_limits(100, 20, anisotropy=4.0)[0] == round(small / 4)


def test_volume_options_are_checked():
    assert PredictConfig(axes="tzyx").axes == "TZYX"
    for bad in ("ZXY", "CZYX", "ZZYX", "Z1YX"):
        with pytest.raises(ConfigError, match="axes"):
            PredictConfig(axes=bad)
    with pytest.raises(ConfigError, match="voxel size"):
        PredictConfig(voxel_size=(1, 0, 1))
    with pytest.raises(ConfigError, match="voxel size"):
        TrainConfig(voxel_size=(1, 1))
    with pytest.raises(ConfigError, match="volume"):
        PredictConfig(volume="4d")
    with pytest.raises(ConfigError, match="volume_smoothing"):
        PredictConfig(volume_smoothing=-1)
    assert TrainConfig.from_dict(TrainConfig(side_views=True, voxel_size=[3, 1, 1]).to_dict()).voxel_size == (3, 1, 1)


@pytest.fixture(scope="module")
def volume():
    return make_nuclei_3d((14, 96, 96), (3, 1, 1), seed=1)


@pytest.fixture(scope="module")
def sample_model():
    from napari_unet._sample_data import sample_model_path
    from napari_unet.io import load_model

    return load_model(sample_model_path())


def test_predicting_a_volume_in_3d(volume, sample_model):
    """The packaged model, zero-shot: plane by plane every plane has ids of its own; in 3D a nucleus is one object."""
    image, truth = volume
    model, meta = sample_model
    base = dict(precision="fp32", voxel_size=(3, 1, 1))
    planes = predict_all(model, image, PredictConfig(**base), meta).labels
    by_3d = predict_all(model, image, PredictConfig(axes="ZYX", **base), meta).labels
    ortho = predict_all(model, image, PredictConfig(axes="ZYX", volume="orthogonal", **base), meta)
    stitched = predict_all(model, image, PredictConfig(axes="ZYX", volume="stitch", **base), meta).labels
    for labels in (by_3d, ortho.labels, stitched):
        assert labels.shape == image.shape and labels.dtype == np.uint16
        assert sorted(np.unique(labels[labels > 0])) == list(range(1, labels.max() + 1))
    # Plane by plane no object spans two planes; in 3D most do.
    z_of = {i: len(np.unique(np.nonzero(planes == i)[0])) for i in range(1, planes.max() + 1)}
    assert max(z_of.values()) == 1 and ap50(truth, planes) < 0.1
    assert planes.max() > 2 * by_3d.max()
    for labels in (by_3d, ortho.labels):
        spans = [len(np.unique(np.nonzero(labels == i)[0])) for i in range(1, labels.max() + 1)]
        assert np.median(spans) >= 3
        assert np.mean(np.array(pieces_per_object(truth, labels)) <= 1) >= 0.8
    # Zero-shot on one small volume (quality is compared on many in benchmarks/volumes.py).
    assert ap50(truth, by_3d) >= 0.5 and ap50(truth, ortho.labels) >= 0.6 and ap50(truth, stitched) >= 0.3
    assert ortho.output == "instances"


def test_smoothing_the_volume_probabilities_removes_one_voxel_streaks(volume, sample_model):
    image, truth = volume
    model, meta = sample_model

    def streak_voxels(labels):  # object voxels with at most 2 object neighbours in their plane's 3x3
        m = labels > 0
        return int((m & (ndi.uniform_filter(m.astype(np.float32), size=(1, 3, 3)) * 9 <= 3.01)).sum())

    cfg = dict(axes="ZYX", voxel_size=(3, 1, 1), volume="orthogonal", precision="fp32")
    raw = predict_all(model, image, PredictConfig(volume_smoothing=0, **cfg), meta).labels
    smooth = predict_all(model, image, PredictConfig(**cfg), meta).labels  # default: 1 pixel
    assert streak_voxels(smooth) < streak_voxels(raw) / 4
    assert ap50(truth, smooth) >= ap50(truth, raw) - 0.05


def test_volume_probabilities_semantic_output_and_a_time_series(volume, sample_model):
    image, truth = volume
    model, meta = sample_model
    cfg = PredictConfig(axes="ZYX", probabilities=True, precision="fp32", volume="orthogonal")
    res = predict_all(model, image[:, :48, :48], cfg, meta)
    assert res.probabilities.shape == (3, 14, 48, 48) and res.probabilities.dtype == np.float32
    np.testing.assert_allclose(res.probabilities.sum(axis=0), 1.0, atol=2e-2)  # the mean of three views
    stitched = predict_all(model, image[:, :48, :48], PredictConfig(axes="ZYX", probabilities=True, volume="stitch",
                                                                    precision="fp32"), meta)
    np.testing.assert_allclose(stitched.probabilities.sum(axis=0), 1.0, atol=1e-3)  # every plane's, as predicted
    sem = predict_all(model, image[:, :48, :48], PredictConfig(axes="ZYX", output="semantic", precision="fp32"),
                      meta)
    assert sem.labels.shape == (14, 48, 48) and sem.labels.dtype == np.uint8 and sem.labels.max() <= 2

    # (T, Z, Y, X): a sequence of volumes, each with its own objects; no id spans two frames.
    frames = np.stack([image, image[:, ::-1]])
    res = predict_all(model, frames, PredictConfig(axes="TZYX", precision="fp32"), meta)
    assert res.labels.shape == frames.shape
    ids0, ids1 = set(np.unique(res.labels[0])) - {0}, set(np.unique(res.labels[1])) - {0}
    assert ids0 and ids1 and not ids0 & ids1
    assert len(ids0) == len(ids1)  # the mirrored volume has the same objects
    with pytest.raises(ValueError, match="axes 'ZYX' do not match"):
        predict_all(model, frames, PredictConfig(axes="ZYX"), meta)
    # Planes asked for are segmented in 2D, even in a volume.
    one = predict_all(model, image, PredictConfig(axes="ZYX", precision="fp32"), meta, planes=[7]).labels
    assert one[7].any() and not one[:7].any() and not one[8:].any()


def test_side_views_train_where_cells_were_painted_on_several_planes():
    image, truth = make_nuclei_3d((12, 64, 64), (2, 1, 1), seed=4)
    labels = np.zeros_like(truth)
    cell = int(np.bincount(truth[6].ravel())[1:].argmax() + 1)
    for z in (5, 6, 7):
        labels[z][truth[z] == 0] = 1
        labels[z][truth[z] == cell] = 2
    norm = image[..., None].astype(np.float32)
    side = side_planes(norm, labels, (2, 1, 1))
    ys = np.flatnonzero((labels >= 2).any(axis=2).sum(axis=0) >= 2)  # rows crossing the cell on 2+ planes
    xs = np.flatnonzero((labels >= 2).any(axis=1).sum(axis=0) >= 2)
    assert len(ys) >= 5 and len(side) == len(ys) + len(xs)  # only planes through the painted cell
    img0, lab0 = side[0]
    assert img0.shape == (24, 64, 1) and lab0.shape == (24, 64)  # Z resampled to cubic voxels
    np.testing.assert_array_equal(lab0, np.repeat(labels[:, ys[0], :], 2, axis=0))  # planes at 2 rows each
    assert list(np.flatnonzero(lab0.any(axis=1))) == list(range(10, 16))  # planes 5-7
    assert len(side_planes(norm, labels, (2, 1, 1), max_planes=3)) == 6
    assert side_planes(norm, labels, (0.5, 1, 1)) == []  # too few planes once resampled (6 < 16)
    one_plane = np.zeros_like(labels)
    one_plane[6] = labels[6]
    assert side_planes(norm, one_plane, (2, 1, 1)) == []  # a single painted plane teaches no side view

    flat = prepare_training_data(image, labels)
    both = prepare_training_data(image, labels, side_views=(2, 1, 1))
    assert len(flat.planes) == 3 and len(both.planes) == 3 + len(side)
    assert any("side-view planes" in m for m in both.messages)
    # The side views add planes, not cells: same count, same cell size (for resizing and size limits).
    assert both.n_objects == flat.n_objects and both.object_area == flat.object_area
    # Where the painting stops (unpainted rows above and below the cell) is not taught as a boundary.
    from napari_unet.data import IGNORE

    sides = [p for p in both.planes if p.source[1] < 0]
    ignored_edges = 0
    for pl in sides:
        unpainted_near = ndi.distance_transform_edt(pl.painted != 0) <= 3  # the default boundary width
        assert not ((pl.target == 2) & unpainted_near).any()
        ignored_edges += int(((pl.target == IGNORE) & (pl.painted >= 2)).sum())
    assert ignored_edges > 0 and any((pl.target == 1).any() for pl in sides)  # cell pixels still train


def test_training_with_side_views_runs(tmp_path):
    from napari_unet.jobs import drain
    from napari_unet.training import train

    image, truth = make_nuclei_3d((10, 48, 48), (2, 1, 1), seed=5)
    labels = np.where(truth > 0, truth + 1, 1).astype(np.uint16)
    labels[:3] = 0
    result = drain(train(image, labels, TrainConfig(iterations=3, side_views=True, voxel_size=(2, 1, 1),
                                                    check_painted=False, batch_size=2, patch_size=32)))
    info = result.metadata["training"] if "training" in result.metadata else result.metadata
    assert info["iterations"] == 3
    assert info["config"]["side_views"] is True and list(info["config"]["voxel_size"]) == [2.0, 1.0, 1.0]
    assert any("side-view planes" in m for m in info["messages"])


# ---- command line ---------------------------------------------------------------------------------


def _cli(*args):
    from napari_unet.cli import main

    return main(list(args))


def _write_volume(path, image, spacing=3.0, axes="ZYX"):
    tifffile.imwrite(path, image, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": axes, "spacing": spacing, "unit": "um"})


def test_cli_segments_a_tiff_volume_in_3d_and_keeps_axes_and_voxel_size(tmp_path, volume, capsys):
    from napari_unet._sample_data import sample_model_path

    image, truth = volume
    src = tmp_path / "stack.tif"
    _write_volume(src, image)
    out = tmp_path / "stack_labels.tif"
    assert _cli("predict", "--model", str(sample_model_path()), "--image", str(src), "--out", str(out),
                "--precision", "fp32", "--quiet") == 0
    assert "in 3D (3d)" in capsys.readouterr().err
    with tifffile.TiffFile(out) as tif:
        labels = tif.asarray()
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 3.0
        xres = tif.pages[0].tags["XResolution"].value
    assert xres[0] / xres[1] == 2.0
    spans = [len(np.unique(np.nonzero(labels == i)[0])) for i in range(1, labels.max() + 1)]
    assert np.median(spans) >= 3  # objects across planes

    # The same file said to be frames: plane by plane, every plane with ids of its own.
    frames = tmp_path / "frames_labels.tif"
    assert _cli("predict", "--model", str(sample_model_path()), "--image", str(src), "--out", str(frames),
                "--axes", "TYX", "--precision", "fp32", "--quiet") == 0
    with tifffile.TiffFile(frames) as tif:
        per_plane = tif.asarray()
        assert tif.series[0].axes == "TYX"
    assert max(len(np.unique(np.nonzero(per_plane == i)[0])) for i in range(1, per_plane.max() + 1)) == 1


def test_cli_voxel_size_given_is_written_and_ome_sizes_are_read(tmp_path, volume):
    from napari_unet._sample_data import sample_model_path
    from napari_unet.io import read_image

    image = volume[0][:, :48, :48]
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, image)  # no axes, no sizes: said on the command line
    out = tmp_path / "plain_labels.tif"
    assert _cli("predict", "--model", str(sample_model_path()), "--image", str(plain), "--out", str(out),
                "--axes", "ZYX", "--voxel-size", "2.5,0.5,0.5", "--quiet") == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 2.5
        xres = tif.pages[0].tags["XResolution"].value
    assert xres[0] / xres[1] == 2.0
    _, info = read_image(out)
    assert info.voxel_size() == (2.5, 0.5, 0.5)

    ome = tmp_path / "vol.ome.tif"
    tifffile.imwrite(ome, image, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                                                     "PhysicalSizeZ": 1.0})
    _, info = read_image(ome)
    assert info.axes == "ZYX" and info.voxel_size() == (1.0, 0.25, 0.25) and info.unit == "um"


def test_cli_trains_side_views_with_the_files_voxel_size(tmp_path, capsys):
    from napari_unet.io import read_model_metadata

    image, truth = make_nuclei_3d((10, 48, 48), (2, 1, 1), seed=5)
    labels = np.where(truth > 0, truth + 1, 1).astype(np.uint16)
    labels[:3] = 0
    _write_volume(tmp_path / "vol.tif", image, spacing=1.0)  # 1.0 um Z step, 0.5 um pixels: 2 pixels
    tifffile.imwrite(tmp_path / "vol_labels.tif", labels)
    out = tmp_path / "vol.safetensors"
    assert _cli("train", "--image", str(tmp_path / "vol.tif"), "--labels", str(tmp_path / "vol_labels.tif"),
                "--out", str(out), "--iterations", "2", "--side-views", "--quiet") == 0
    config = read_model_metadata(out)["training"]["config"]
    assert config["side_views"] is True and list(config["voxel_size"]) == [1.0, 0.5, 0.5]
    assert _cli("train", "--image", str(tmp_path / "vol.tif"), "--labels", str(tmp_path / "vol_labels.tif"),
                "--out", str(tmp_path / "x.safetensors"), "--iterations", "2", "--voxel-size", "2,1,1") != 0
    assert "--voxel-size is for --side-views" in capsys.readouterr().err


def test_cli_volume_options_fail_with_one_line(tmp_path, volume, capsys):
    from napari_unet._sample_data import sample_model_path

    src = tmp_path / "stack.tif"
    _write_volume(src, volume[0][:4, :32, :32])
    for extra, message in ((["--axes", "ZY"], "--axes ZY does not describe this image"),
                           (["--voxel-size", "3,1"], "--voxel-size 3,1: give three positive numbers")):
        code = _cli("predict", "--model", str(sample_model_path()), "--image", str(src), "--out",
                    str(tmp_path / "x.tif"), "--quiet", *extra)
        err = capsys.readouterr().err
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.tif").exists()


# ---- napari -----------------------------------------------------------------------------------------


def test_segment_widget_segments_a_volume_in_3d(make_napari_viewer, qtbot, volume, tmp_path, notes,
                                                no_threads_left):
    from napari_unet._widgets import ExportWidget, SegmentWidget
    from napari_unet._widgets.segment import training_labels_from_corrected

    image, truth = volume
    viewer = make_napari_viewer()
    viewer.add_image(image[:, :64, :64], name="nuclei", scale=(3.0, 1.0, 1.0), translate=(6.0, 0, 0),
                     axis_labels=("z", "y", "x"))
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment with U-Net")
    assert seg.stack_kind.value == "3D volume"  # from the layer's axis labels
    assert seg.voxel_size.value == "3, 1, 1"
    seg.volume_method.value = "orthogonal"
    with qtbot.waitSignal(seg.runner.finished, timeout=240_000):
        seg.run_button.click()
    assert seg.state.state == "done", seg.state.text()
    out = viewer.layers["nuclei [U-Net]"]
    assert out.data.shape == (14, 64, 64)
    np.testing.assert_allclose(out.scale, (3, 1, 1))
    np.testing.assert_allclose(out.translate, (6, 0, 0))
    assert tuple(out.axis_labels) == ("z", "y", "x")
    spans = [len(np.unique(np.nonzero(out.data == i)[0])) for i in range(1, out.data.max() + 1)]
    assert np.median(spans) >= 3
    viewer.dims.ndisplay = 3  # the 3D view shows it
    assert notes["error"] == []

    # A volume's corrections become training labels, in 3D.
    edited = out.data.copy()
    edited[edited == edited.max()] = 0
    labels = training_labels_from_corrected(edited, out.data, only_edited=True)
    assert labels.shape == out.data.shape and labels.max() == 1 and labels[edited == 0].max() == 1

    # Export keeps Z and the voxel size.
    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export masks")
    export.layers.value = [out]
    export.file.value = str(tmp_path / "nuclei.tif")
    with qtbot.waitSignal(export.runner.finished, timeout=60_000):
        export.export_button.click()
    with tifffile.TiffFile(tmp_path / "nuclei.tif") as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 3.0
        np.testing.assert_array_equal(tif.asarray(), out.data)

    # Told it is a time series: plane by plane.
    seg.stack_kind.value = "time series"
    assert seg.prediction_config().voxel_size is None


def test_stack_axes_follow_the_z_label():
    from napari_unet._widgets._common import spatial_axis_labels, stack_axes

    # A two-channel (z, c, y, x) layer for a 2-channel model, and an RGB (z, y, x) layer.
    assert spatial_axis_labels(("z", "c", "y", "x"), False, 1, 4) == ("z", "y", "x")
    assert spatial_axis_labels(("z", "y", "x"), True, 3, 4) == ("z", "y", "x")
    assert spatial_axis_labels(("z", "y", "x"), False, None, 4) == ()  # labels that do not fit the data

    assert stack_axes("3D volume", 3) == "ZYX" and stack_axes("3D volume", 4) == "TZYX"
    assert stack_axes("3D volume", 4, ("z", "t", "y", "x")) == "ZTYX"
    assert stack_axes("time series", 4) is None and stack_axes("3D volume", 2) is None
    many = stack_axes("3D volume", 7)
    assert len(many) == 7 and len(set(many)) == 7 and many.endswith("ZYX")


def test_a_large_changed_volume_replaces_the_layer_data(make_napari_viewer, monkeypatch):
    from napari_unet._widgets import segment

    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((4, 16, 16), np.uint16))
    segment._update_labels_undoably(layer, np.ones((4, 16, 16), np.uint16))  # small: an undo step
    layer.undo()
    assert not layer.data.any()
    monkeypatch.setattr(segment, "UNDO_LIMIT", 100)
    new = np.full((4, 16, 16), 3, np.uint16)
    segment._update_labels_undoably(layer, new)  # 1024 changed voxels > 100: replaced
    np.testing.assert_array_equal(layer.data, new)


def test_segment_widget_voxel_size_is_checked(make_napari_viewer, notes):
    from napari_unet._widgets import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 32, 32), np.uint8), name="stack")
    seg = SegmentWidget(viewer)
    assert seg.stack_kind.value == "independent planes"
    seg.stack_kind.value = "3D volume"
    seg.voxel_size.value = "3, x, 1"
    seg.run_button.click()
    assert notes["error"] and "voxel size" in notes["error"][-1] and seg.runner.worker is None
    assert "stack [U-Net]" not in viewer.layers


def test_train_widget_passes_side_views_and_the_layer_voxel_size(make_napari_viewer):
    from napari_unet._widgets import TrainWidget
    from napari_unet._widgets.train import train_config_from

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((6, 32, 32), np.uint8), name="vol", scale=(2.5, 0.5, 0.5))
    viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="painted")
    w = TrainWidget(viewer)
    w.side_views.value = True
    config = train_config_from(w.settings())
    assert config.side_views and config.voxel_size == (2.5, 0.5, 0.5)
    w.side_views.value = False
    assert train_config_from(w.settings()).voxel_size is None

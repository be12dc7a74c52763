"""Inference: overlap-tile equivalence, mirroring, channels and stacks, precision, OOM retry, stopping."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_unet import device as dev
from napari_unet import inference as inf
from napari_unet.config import ConfigError, PredictConfig
from napari_unet.io import save_model
from napari_unet.jobs import drain
from napari_unet.model import UNet

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _net(padding="valid", n_classes=3, in_channels=1, depth=3, width=4, seed=0, bn=False):
    torch.manual_seed(seed)
    net = UNet(in_channels, n_classes, depth=depth, base_filters=width, padding=padding, batch_norm=bn)
    if bn:  # non-trivial running statistics, so eval-mode batch norm does something
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


VALID = _net("valid", depth=3, width=2)


def _forward(net):
    def f(x):
        with torch.no_grad():
            return net(x)
    return f


# ---- mirroring and the tiling core ---------------------------------------------------------

@given(n=st.integers(1, 12), start=st.integers(-40, 0), extra=st.integers(0, 40))
@FAST
def test_reflect_indices_match_numpy_pad(n, start, extra):
    a = np.arange(n)
    stop = n + extra
    padded = np.pad(a, (-start, extra), mode="reflect")
    assert np.array_equal(a[inf.reflect_indices(start, stop, n)], padded)


@given(h=st.integers(1, 70), w=st.integers(1, 70), out_tile=st.integers(4, 40), data=st.data())
@FAST
def test_valid_model_tiles_equal_whole_image_forward(h, w, out_tile, data):
    """Paper overlap-tile: tiled output == forward of the whole mirror-padded image (any size, any tile)."""
    net, m = VALID, VALID.margin()
    tile = net.valid_input_size(out_tile + 2 * m)
    img = np.random.default_rng(h * 100 + w).normal(size=(1, h, w)).astype(np.float32)
    out = inf.tiled_predict(_forward(net), img, tile, margin=m, blending="constant", multiple=net.size_multiple,
                            batch_size=data.draw(st.integers(1, 3)))
    ph, pw = net.valid_input_size(h + 2 * m), net.valid_input_size(w + 2 * m)
    idx_y, idx_x = inf.reflect_indices(-m, ph - m, h), inf.reflect_indices(-m, pw - m, w)
    padded = img[:, idx_y[:, None], idx_x[None, :]]
    ref = net(torch.from_numpy(padded)[None]).detach().numpy()[0, :, :h, :w]
    assert out.shape == (3, h, w)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@given(h=st.integers(1, 60), w=st.integers(1, 60), tile=st.integers(4, 32), overlap=st.integers(0, 16),
       blending=st.sampled_from(["gaussian", "cosine", "constant"]))
@FAST
def test_blending_reproduces_pointwise_predictor(h, w, tile, overlap, blending):
    """Any positive window, any overlap: a per-pixel (1x1 conv) predictor is reproduced exactly."""
    conv = torch.nn.Conv2d(2, 3, 1)
    img = np.random.default_rng(tile).normal(size=(2, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = conv(torch.from_numpy(img)[None])[0].numpy()
        out = inf.tiled_predict(conv, img, tile, overlap=min(overlap, tile - 1), blending=blending)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_same_model_tiles_close_to_whole_image():
    """Padded model with batch norm: blended tiles with overlap >= half the receptive field stay close."""
    net = _net("same", depth=3, width=4, bn=True)
    img = np.random.default_rng(0).normal(size=(1, 128, 96)).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(img)[None]), 1)[0].numpy()

    def f(x):
        with torch.no_grad():
            return torch.softmax(net(x), 1)

    out = inf.tiled_predict(f, img, 64, overlap=40, blending="gaussian", multiple=net.size_multiple)
    err = np.abs(out - ref)
    assert err.mean() < 2e-3 and err.max() < 0.1
    no_overlap = inf.tiled_predict(f, img, 32, overlap=0, blending="constant", multiple=net.size_multiple)
    assert np.abs(no_overlap - ref).mean() > 3 * err.mean()  # seams without overlap: blending is what helps


def test_replica_folds_batch_norm_and_leaves_the_model_alone():
    net = _net("same", depth=3, width=4, bn=True)
    x = torch.from_numpy(np.random.default_rng(8).normal(size=(2, 1, 32, 40)).astype(np.float32))
    with torch.no_grad():
        ref = net(x)
    rep = inf._replica(net, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rep.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 10  # 5 double convs, untouched
    with torch.no_grad():
        np.testing.assert_allclose(rep(x.contiguous(memory_format=torch.channels_last)).numpy(), ref.numpy(),
                                   atol=1e-5)


def test_parallel_predictors_give_the_same_result():
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    img = np.random.default_rng(1).normal(size=(1, 70, 50)).astype(np.float32)
    with torch.no_grad():
        one = inf.tiled_predict(conv, img, 16, overlap=4)
        two = inf.tiled_predict([conv, conv], img, 16, overlap=4)
    np.testing.assert_allclose(one, two, atol=1e-6)


def test_tiled_predict_checks_predictor_output():
    with pytest.raises(ValueError, match="expected"):
        inf.tiled_predict(lambda x: x[:, :, 1:], np.zeros((1, 20, 20)), 8)


# ---- predict: images of every kind -------------------------------------------------------------

def _run(net, image, meta=None, planes=None, **cfg):
    return inf.predict_all(net, image, PredictConfig(precision="fp32", **cfg), meta, planes=planes)


def test_predict_2d_valid_model_equals_whole_image_forward():
    net = _net("valid", n_classes=2, depth=3, width=4)
    img = np.random.default_rng(2).integers(0, 4000, size=(45, 83)).astype(np.uint16)
    res = _run(net, img, {"mode": "semantic"}, tile_size=60, probabilities=True)
    from napari_unet.data import normalize_like

    x = normalize_like(img, None)
    m = net.margin()
    ph, pw = net.valid_input_size(45 + 2 * m), net.valid_input_size(83 + 2 * m)
    pad = x[inf.reflect_indices(-m, ph - m, 45)[:, None], inf.reflect_indices(-m, pw - m, 83)[None, :]]
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(pad)[None, None]), 1)[0].numpy()[:, :45, :83]
    assert res.probabilities.shape == (2, 45, 83) and res.probabilities.dtype == np.float32
    np.testing.assert_allclose(res.probabilities, ref, atol=1e-5)
    assert res.labels.dtype == np.uint8
    assert np.array_equal(res.labels, ref.argmax(0))
    assert res.device == "cpu" and res.precision == "fp32" and res.output == "semantic"


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_flips_average_the_mirrored_predictions(padding):
    """Test-time flips: the mean of the four mirror images' softmax, each mirrored back."""
    net = _net(padding, depth=3, width=4, bn=True)
    runner = inf._replica(net, torch.device("cpu"))
    x = torch.randn(2, 1, 60, 76) if padding == "valid" else torch.randn(2, 1, 48, 64)
    got = inf._make_predictor(runner, torch.device("cpu"), "fp32", False, flips=True)(x)
    plain = inf._make_predictor(runner, torch.device("cpu"), "fp32", False)
    want = sum(torch.flip(plain(torch.flip(x, d)), d) for d in [(), (-1,), (-2,), (-2, -1)]) / 4
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, plain(x), atol=1e-3)  # the random net is not mirror-symmetric


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_mirrored_tiles_map_back_onto_their_pixels(padding):
    """With mirror-symmetric kernels the network commutes with mirroring exactly when each
    output pixel sits where its input is (a valid net's crop must be centred): what the
    flips average relies on."""
    net = _net(padding, depth=3, width=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                w = m.weight
                w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-2, -1)) / 4)
    runner = inf._replica(net, torch.device("cpu"))
    plain = inf._make_predictor(runner, torch.device("cpu"), "fp32", False)
    x = torch.randn(1, 1, 60, 76) if padding == "valid" else torch.randn(1, 1, 48, 64)
    for d in [(-1,), (-2,)]:
        torch.testing.assert_close(plain(torch.flip(x, d)), torch.flip(plain(x), d), atol=1e-5, rtol=1e-4)


def test_predict_with_flips_changes_the_probabilities_not_the_shapes():
    net = _net("same", n_classes=3, depth=3, width=4, bn=True)
    img = np.random.default_rng(5).normal(size=(70, 90)).astype(np.float32)
    plain = _run(net, img, {"mode": "instances"}, tile_size=48, probabilities=True)
    tta = _run(net, img, {"mode": "instances"}, tile_size=48, probabilities=True, flips=True)
    assert tta.probabilities.shape == plain.probabilities.shape == (3, 70, 90)
    np.testing.assert_allclose(tta.probabilities.sum(0), 1.0, atol=1e-5)
    assert np.abs(tta.probabilities - plain.probabilities).max() > 1e-3
    assert tta.labels.shape == plain.labels.shape


def test_stacks_are_processed_plane_by_plane():
    net = _net("same", depth=2, width=4)
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(2, 3, 40, 48)).astype(np.float32)  # (T, Z, Y, X)
    gen = inf.predict(net, stack, PredictConfig(precision="fp32", tile_size=32, overlap=8), {"mode": "instances"})
    events = []
    res = drain(gen, events.append)
    assert res.labels.shape == (2, 3, 40, 48)
    assert {e.plane for e in events} == set(range(6)) and events[-1].n_planes == 6
    assert events[-1].done == events[-1].total
    assert all(e.device == "cpu" and e.precision == "fp32" for e in events)
    single = _run(net, stack[1, 2], {"mode": "instances"}, tile_size=32, overlap=8, probabilities=True)
    full = _run(net, stack, {"mode": "instances"}, tile_size=32, overlap=8, probabilities=True)
    assert full.probabilities.shape == (3, 2, 3, 40, 48)
    np.testing.assert_allclose(full.probabilities[:, 1, 2], single.probabilities, atol=1e-6)
    # Restricting to some planes: the others stay empty.
    part = _run(net, stack, {"mode": "semantic"}, planes=[(1, 2), 0], tile_size=32, overlap=8, probabilities=True)
    assert np.abs(part.probabilities[:, 0, 1]).max() == 0
    np.testing.assert_allclose(part.probabilities[:, 1, 2], single.probabilities, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        _run(net, stack, planes=[6])


def test_channels_detected_converted_or_refused():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, size=(40, 36, 3), dtype=np.uint8)
    grey_net = _net("same", depth=2, width=4)
    a = _run(grey_net, rgb, probabilities=True)
    grey = (rgb.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32))
    b = _run(grey_net, grey, probabilities=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert a.labels.shape == (40, 36)

    two = _net("same", in_channels=2, depth=2, width=4)
    img = rng.normal(size=(40, 36, 2)).astype(np.float32)
    last = _run(two, img, probabilities=True)
    first = _run(two, np.moveaxis(img, -1, 0), probabilities=True)
    explicit = _run(two, np.moveaxis(img, -1, 1), channel_axis=1, probabilities=True)
    np.testing.assert_allclose(last.probabilities, first.probabilities, atol=1e-6)
    np.testing.assert_allclose(last.probabilities, explicit.probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="has 3 channels .* model takes 2"):
        _run(two, rgb, channel_axis=-1)
    with pytest.raises(ValueError, match="model takes 2 channels"):
        _run(two, rng.normal(size=(40, 36)))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_dtypes_and_non_finite_values(dtype):
    net = _net("valid", depth=2, width=4)
    img = (np.random.default_rng(5).random((30, 40)) * 200).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        img[3, 4], img[10, 10] = np.nan, np.inf
    res = _run(net, img, {"mode": "instances"}, probabilities=True)
    assert np.isfinite(res.probabilities).all()
    np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-5)
    assert res.labels.dtype == np.uint16 and res.labels.shape == (30, 40)


def test_instance_output_needs_three_classes_and_model_file(tmp_path):
    with pytest.raises(ValueError, match="3 classes"):
        _run(_net("same", n_classes=2, depth=2), np.zeros((16, 16)), output="instances")
    net = _net("same", n_classes=4, depth=2, width=4)
    path = save_model(tmp_path / "m.safetensors", net, {"mode": "semantic"})
    res = inf.predict_all(path, np.random.default_rng(0).random((20, 20)), PredictConfig(precision="fp32"))
    assert res.output == "semantic" and res.labels.max() <= 3


# ---- precision, memory, out-of-memory, stopping --------------------------------------------------

def test_auto_precision_is_measured_at_the_jobs_tile_and_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(dev, "native_bf16", lambda: True)
    shapes = []
    ratio = {"value": 3.0}  # bf16 3x slower

    def forward(model, shape):
        shapes.append(shape)
        return {"fp32": 1.0, "bf16": ratio["value"]}

    monkeypatch.setattr(dev, "_forward_times", forward)
    res = inf.predict_all(_net("same", depth=2), np.zeros((40, 56)), PredictConfig(precision="auto"))
    assert res.precision == "fp32"
    assert shapes[0][:2] == (1, 1) and shapes[0][2] >= 40 and shapes[0][3] >= 56  # the tile that covers the image
    ratio["value"] = 0.25
    monkeypatch.setattr(dev, "_CALIBRATION", {})
    res = inf.predict_all(_net("same", depth=2, width=8), np.zeros((40, 56)), PredictConfig(precision="auto"))
    assert res.precision == "bf16"


def test_bf16_agrees_with_fp32():
    net = _net("same", depth=2, width=8)
    img = np.random.default_rng(6).random((64, 64)).astype(np.float32)
    a = inf.predict_all(net, img, PredictConfig(precision="fp32", probabilities=True, output="semantic"))
    b = inf.predict_all(net, img, PredictConfig(precision="bf16", probabilities=True, output="semantic"))
    assert b.precision == "bf16"
    assert np.abs(a.probabilities - b.probabilities).max() < 0.05


def test_choose_tile_follows_memory():
    net = UNet(1, 3, depth=4, base_filters=16, padding="same")
    big, _ = inf.choose_tile(net, "cpu", available=64e9)
    small, batch = inf.choose_tile(net, "cpu", available=200e6)
    assert big == 1024 and small < big and batch == 1
    assert small % net.size_multiple == 0
    assert inf.choose_tile(net, "cpu", tile_size=100)[0] == 104
    valid = UNet(1, 3, depth=3, base_filters=4)
    t, _ = inf.choose_tile(valid, "cpu", available=1e6)
    assert valid.is_valid_size(t) and valid.output_size(t) >= valid.size_multiple


def test_out_of_memory_retries_with_smaller_tiles(monkeypatch):
    net = _net("same", depth=2, width=4)
    img = np.random.default_rng(7).random((100, 90)).astype(np.float32)
    expected = _run(net, img, {"mode": "semantic"}, tile_size=32, overlap=8, probabilities=True)
    forward = UNet.forward
    sizes = []

    def flaky(self, x):
        sizes.append(x.shape[-1])
        if x.shape[-1] > 40:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", flaky)
    gen = inf.predict(net, img, PredictConfig(precision="fp32", tile_size=64, overlap=8, probabilities=True),
                      {"mode": "semantic"})
    messages = []
    res = drain(gen, lambda ev: messages.append(ev.message))
    assert any("out of memory" in m for m in messages)
    assert res.tile_size == 32 and sizes[0] > 40  # the first, larger tiles failed, then smaller ones ran
    assert max(sizes[sizes.index(next(s for s in sizes if s <= 40)):]) <= 40
    np.testing.assert_allclose(res.probabilities, expected.probabilities, atol=1e-6)

    def always(self, x):
        raise MemoryError()

    monkeypatch.setattr(UNet, "forward", always)
    with pytest.raises(MemoryError, match="even with"):
        _run(net, img, tile_size=64)

    def broken(self, x):
        raise RuntimeError("something else")

    monkeypatch.setattr(UNet, "forward", broken)
    with pytest.raises(RuntimeError, match="something else"):
        _run(net, img, tile_size=64)


def test_closing_the_generator_stops_at_once(monkeypatch):
    net = _net("same", depth=2, width=4)
    forward = UNet.forward
    calls = []

    def counting(self, x):
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", counting)
    gen = inf.predict(net, np.zeros((128, 128), np.float32), PredictConfig(precision="fp32", tile_size=32, overlap=0))
    first = next(gen)
    assert first.total == 16 and first.done == 0
    next(gen)
    next(gen)
    n = len(calls)
    gen.close()
    assert len(calls) == n == 2


def test_size_limits_come_from_the_painted_cells():
    assert inf.instance_size_limits(None, None) == (inf.DEFAULT_MIN_SIZE, 0)
    assert inf.instance_size_limits(None, 400.0) == (60, 20)  # 15 % and 5 % of the median painted cell
    assert inf.instance_size_limits(7, 400.0) == (7, 20)  # an explicit smallest cell wins
    assert inf.instance_size_limits(0, None) == (0, 0)


@pytest.mark.parametrize("meta_area, min_size, expected", [
    (None, None, (15, 0)), (900.0, None, (135, 45)), (900.0, 3, (3, 45)),
])
def test_predict_passes_the_size_limits_to_the_instance_step(monkeypatch, meta_area, min_size, expected):
    from napari_unet import postprocess

    seen = []
    real = postprocess.instance_labels

    def spy(interior, fg, **kw):
        seen.append((kw["min_size"], kw["min_seed_size"]))
        return real(interior, fg, **kw)

    monkeypatch.setattr(postprocess, "instance_labels", spy)  # predict imports it when it runs
    meta = {"mode": "instances"} if meta_area is None else {"mode": "instances", "object_area": meta_area}
    net = _net("same", depth=2, width=4)
    _run(net, np.random.default_rng(0).random((32, 32)).astype(np.float32), meta, min_size=min_size)
    assert seen == [expected]


@pytest.mark.parametrize("seed, foreground", [(None, None), (0.7, 0.2)])
def test_predict_passes_the_thresholds_to_the_instance_step(thresholds_seen, seed, foreground):
    net = _net("same", depth=2, width=4)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    _run(net, image, {"mode": "instances"}, seed_threshold=seed, foreground_threshold=foreground)
    assert thresholds_seen == [(seed, foreground)]  # None: instance_labels picks the plane's defaults


@pytest.mark.parametrize("volume, planes, calls", [("3d", None, 1), ("stitch", None, 3), ("3d", [(1,)], 1)])
@pytest.mark.parametrize("given", [(None, None), (0.7, 0.2)])
def test_a_volume_is_segmented_with_the_volume_thresholds_unless_told(thresholds_seen, volume, planes, calls,
                                                                      given):
    """Any method, and one plane of a volume alone: the volume defaults (what volumes were measured with)."""
    from napari_unet import postprocess

    net = _net("same", depth=2, width=4)
    stack = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    _run(net, stack, {"mode": "instances"}, planes=planes, axes="ZYX", volume=volume,
         seed_threshold=given[0], foreground_threshold=given[1])
    want = given if given[0] is not None else (postprocess.VOLUME_SEED_THRESHOLD,
                                               postprocess.VOLUME_FOREGROUND_THRESHOLD)
    assert thresholds_seen == [want] * calls


def test_threshold_settings_are_checked():
    assert PredictConfig(seed_threshold=0.3, foreground_threshold=0.7).seed_threshold == 0.3
    assert PredictConfig(seed_threshold=np.float32(0.3)).seed_threshold == np.float32(0.3)  # numpy numbers too
    for name in ("seed_threshold", "foreground_threshold"):
        for bad in (0, 1, 1.5, -0.1, "0.3", True):
            with pytest.raises(ConfigError, match=name):
                PredictConfig(**{name: bad})


@pytest.mark.parametrize("padding, depth, side, tile", [("same", 5, 1024, 880), ("same", 4, 700, 512),
                                                        ("valid", 3, 300, 204), ("same", 3, 100, 512)])
def test_plane_tile_takes_the_smallest_tile_that_needs_no_more_tiles(padding, depth, side, tile):
    net = UNet(1, 3, depth=depth, base_filters=2, padding=padding)
    m, mult, overlap = net.margin(), net.size_multiple, (32 if padding == "same" else 0)
    tile = net.valid_input_size(tile)

    def n(t):
        return len(inf._positions(side, t - 2 * m, overlap, mult))

    th, tw = inf._plane_tile(net, tile, (side, side), overlap, mult)
    assert th == tw and net.is_valid_size(th) and th <= max(tile, net.valid_input_size(side + 2 * m))
    full = min(tile, net.valid_input_size(side + 2 * m))
    assert n(th) == n(full)  # as many tiles as the largest tile needs ...
    smaller = [t for t in net.valid_input_sizes(2 * m + overlap + 1, th - 1) if t - 2 * m - overlap >= mult]
    assert all(n(t) > n(th) for t in smaller)  # ... and no smaller valid tile does as well
    if side == 1024:
        assert th <= 600  # two tiles of ~550 per axis, not two of 880


def test_tiles_normalised_one_by_one_match_the_image_normalised_first():
    """predict normalises each batch of tiles with the whole plane's percentiles (no float32 copy of
    a huge image): exactly the output of tiling the plane normalised first."""
    from napari_unet.data import normalize

    net = _net("same", depth=3, width=4, bn=True)
    img = np.random.default_rng(5).integers(0, 4000, size=(90, 130)).astype(np.uint16)
    job = inf._PredictJob(net, img, PredictConfig(precision="fp32", tile_size=48, output="semantic"),
                          {"mode": "semantic"}, None)
    assert job.n_tiles(job.tile) > 4  # several tiles, overlapping
    got = drain(job.plane_probabilities(0, ()))
    want = drain(job.array_probabilities(normalize(img)[None], 0, "whole"))
    np.testing.assert_array_equal(got, want)


def test_the_network_is_released_before_the_last_planes_post_processing(monkeypatch):
    """For one huge image the post-processing sets the peak memory: the network's replica (and
    OpenVINO's compiled network with it) must be gone by then, and only for the last plane."""
    import weakref

    from napari_unet import postprocess

    replicas, alive_at_post = [], []
    make_replica = inf._replica

    def tracked(model, device):
        r = make_replica(model, device)
        replicas.append(weakref.ref(r))
        return r

    real_labels = postprocess.instance_labels

    def labels(*args, **kwargs):  # no gc.collect(): freed by reference counting, at once
        alive_at_post.append(sum(ref() is not None for ref in replicas))
        return real_labels(*args, **kwargs)

    monkeypatch.setattr(inf, "_replica", tracked)
    monkeypatch.setattr(postprocess, "instance_labels", labels)
    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, base_filters=4).eval()
    stack = np.random.default_rng(0).random((3, 48, 40)).astype(np.float32)
    result = inf.predict_all(net, stack, PredictConfig(device="cpu", precision="fp32", backend="torch"),
                             {"mode": "instances"})
    assert result.labels.shape == stack.shape
    assert len(replicas) == 1 and alive_at_post == [1, 1, 0]

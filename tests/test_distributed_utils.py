"""Pure helpers of the distributed mode: sharding files between ranks, pairing folders by name."""

import pytest

from napari_unet.distributed import DistContext, init_from_env, pair_by_name, shard


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shard_gives_every_item_exactly_once(n, world):
    items = [f"f{i}.tif" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == n
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(items, world, world)


def test_single_process_context(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_from_env()
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed
    ctx.shutdown()  # harmless when not distributed
    assert DistContext(rank=1, world_size=2, local_rank=1, backend="nccl").device_name() == "cuda:1"
    assert DistContext(rank=1, world_size=2, backend="gloo").device_name("cpu") == "cpu"


def test_pair_by_name(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    for name in ("a.tif", "b.tif", "c.png", "unlabelled.tif", ".hidden.tif", "notes.txt"):
        (imgs / name).write_bytes(b"x")
    for name in ("a.tif", "b_labels.tif", "C_mask.png", "orphan_labels.tif"):
        (labs / name).write_bytes(b"x")
    pairs = pair_by_name(imgs, labs)
    assert [(i.name, lab.name) for i, lab in pairs] == [("a.tif", "a.tif"), ("b.tif", "b_labels.tif"),
                                                       ("c.png", "C_mask.png")]


def test_pair_by_name_errors(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pair_by_name(tmp_path / "nope", labs)
    (imgs / "a.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match="no image .* has a label file"):
        pair_by_name(imgs, labs)
    (labs / "a_labels.tif").write_bytes(b"x")
    (labs / "a_mask.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match="several label files"):
        pair_by_name(imgs, labs)

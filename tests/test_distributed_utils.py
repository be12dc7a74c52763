"""Pure helpers of the distributed mode (sharding files between ranks) and the pairing of folders by name."""

import pytest

from napari_unet.distributed import (
    DistContext,
    DistributedError,
    init_from_env,
    plain_batch_norm,
    shard,
    sync_batch_norm,
)
from napari_unet.io import pair_by_name


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


def test_distributed_error_says_which_ranks_failed_and_how():
    same = DistributedError({0: ("TrainingDataError", "no background painted", True),
                             1: ("TrainingDataError", "no background painted", True)}, world_size=2)
    assert str(same) == "no background painted" and same.bad_input  # all alike: as one process says it
    one = DistributedError({1: ("FileNotFoundError", "b.tif: no such image file", True)}, world_size=4)
    assert str(one) == "rank 1: b.tif: no such image file"
    mixed = DistributedError({2: ("RuntimeError", "CUDA error", False), 0: ("ValueError", "x", True),
                              3: ("RuntimeError", "CUDA error", False)}, world_size=4)
    assert str(mixed) == "rank 0: x; ranks 2, 3: CUDA error" and not mixed.bad_input
    named = same.reworded(lambda m: f"a.tif: {m}", ("TrainingDataError",))
    assert str(named) == "a.tif: no background painted"
    assert str(one.reworded(lambda m: "changed", ("TrainingDataError",))) == str(one)  # other types untouched


def test_single_process_agreement_is_the_error_itself():
    ctx = DistContext()
    ctx.agree(None)
    with pytest.raises(KeyError):
        ctx.agree(KeyError("k"))
    with pytest.raises(ValueError, match="unchanged"), ctx.agreeing():
        raise ValueError("unchanged")
    with ctx.agreeing():
        pass
    assert ctx.broadcast({"a": 1}) == {"a": 1}
    assert ctx.all_reduce([1.0, 2.0]).tolist() == [1.0, 2.0]


def test_numbered_gpu_under_nccl_is_refused():
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        DistContext(rank=0, world_size=2, backend="nccl").device_name("cuda:1")


def test_sync_batch_norm_there_and_back_keeps_parameters_and_statistics():
    import torch

    from napari_unet.model import UNet

    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, base_filters=4, padding="same", batch_norm=True)
    net(torch.randn(2, 1, 16, 16))  # running statistics that are not the initial ones
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    assert sync_batch_norm(net) is net
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
    assert plain_batch_norm(net) is net
    kinds = {type(m) for m in net.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds
    assert [id(p) for p in net.parameters()] == params  # an optimiser made before still holds them
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_every_option_passes_through_torchruns_parser():
    """torchrun parses the whole command line; an option of ours that abbreviates one of its own breaks the job
    (``--log`` did: ambiguous with ``--log-dir``)."""
    from torch.distributed.run import get_args_parser

    from napari_unet.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        ours = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        args = get_args_parser().parse_args(["--standalone", "--nproc-per-node=2", "-m", "napari_unet.cli", name,
                                             *ours])
        assert args.training_script_args == [name, *ours]

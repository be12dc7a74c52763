"""The few-shot benchmark's scoring (benchmarks/fewshot.py): what its tables count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def fewshot():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fewshot.py"
    spec = importlib.util.spec_from_file_location("fewshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scene():
    """Six 8x8 reference objects in a row on a 20x80 image; object 6 touches the right border."""
    objects = np.zeros((20, 80), np.int32)
    for i in range(6):
        objects[6:14, 4 + 13 * i:12 + 13 * i] = i + 1
    objects[6:14, 72:80] = 6
    return objects


def test_score_and_error_kinds_count_each_mistake(fewshot):
    objects = _scene()
    region = np.ones(objects.shape, bool)
    pred = np.zeros_like(objects)
    pred[objects == 1] = 10                      # object 1 (painted): not scored
    pred[objects == 2] = 11                      # object 2: matched
    pred[6:14, 30:51] = 12                       # objects 3 and 4 merged into one
    pred[6:9, 56:64], pred[9:11, 56:64], pred[11:14, 56:64] = 13, 14, 17   # object 5 split in three
    pred[1:4, 20:26] = 15                        # an extra object on background
    pred[objects == 6] = 16                      # the border object: left out on both sides
    train, ignore = np.array([1]), fewshot.border_ids(objects)
    assert ignore.tolist() == [6]
    ap, miou = fewshot.score(pred, objects, region, train, ignore, drop_border=True)
    # scored: 2, 3, 4, 5; counted predictions: 11, 12, 13, 14, 17, 15 -> 1 TP, 5 FP, 3 FN.
    assert ap == pytest.approx(1 / 9) and miou == pytest.approx(1.0)
    kinds = fewshot.error_kinds(pred, objects, region, train, ignore, drop_border=True)
    assert kinds == dict(matched=1, merged=2, split=1, missed=0, misshapen=0, extra=5)
    # Nothing predicted: every scored object missed.
    nothing = fewshot.error_kinds(np.zeros_like(pred), objects, region, train, ignore, drop_border=True)
    assert nothing["missed"] == 4 and nothing["extra"] == 0
    assert fewshot.score(np.zeros_like(pred), objects, region, train, ignore) == (0.0, 0.0)


def test_paint_marks_the_chosen_objects_and_background_near_them(fewshot):
    objects = _scene()
    region = np.ones(objects.shape, bool)
    painted = fewshot.paint(objects, region, np.array([2, 4]))
    assert set(np.unique(painted[objects == 2])) == {2} and set(np.unique(painted[objects == 4])) == {3}
    assert (painted[np.isin(objects, [1, 3, 5, 6])] == 0).all()   # other objects stay unlabelled
    assert (painted[(objects == 0)] <= 1).all() and (painted == 1).any()


def test_simulated_rounds_paint_the_worst_objects_and_continue(fewshot):
    import torch

    from napari_unet.synthetic import make_nuclei

    image, objects = make_nuclei((128, 128), radius=(5, 8), seed=4)  # 14 objects off the border
    objects = objects.astype(np.int32)
    region = np.ones(objects.shape, bool)
    ids = np.setdiff1d(np.unique(objects), np.concatenate([[0], fewshot.border_ids(objects)]))
    first_ids = ids[:3]
    painted = fewshot.paint(objects, region, first_ids)
    pred, _, info = fewshot.unet(image, painted, seed=0, max_time=None, spec="4/2/32/2/3e-3", threads=1,
                                 iterations=2, init="new")
    # The result misses every object but the first two remaining: those two are painted last.
    fake = np.where(np.isin(objects, ids[3:5]), objects, 0)
    first_weights = {k: v.clone() for k, v in info["result"].model.state_dict().items()}
    rounds = fewshot.simulated_rounds(image, objects, region, first_ids, ids, (fake, info), rounds=2,
                                      per_round=2, seconds=0.5, seed=0, overrides={"keep_pretrained": 0.0})
    assert len(rounds) == 2
    first_round = rounds[0][2]
    assert first_round[:3].tolist() == first_ids.tolist() and len(first_round) == 5
    assert not np.isin(ids[3:5], first_round).any()       # found objects are not painted first
    assert len(rounds[1][2]) == 7 and rounds[1][2][:5].tolist() == first_round.tolist()
    # Continue trains one network on through the rounds: a copy of the first run's, which stays as it
    # was (other variants start from it), with the overrides for Continue only.
    assert rounds[1][1]["result"].model is rounds[0][1]["result"].model
    assert rounds[1][1]["result"].model is not info["result"].model
    for key, value in info["result"].model.state_dict().items():
        assert torch.equal(value, first_weights[key]), key
    assert rounds[1][1]["result"].metadata["training"]["config"]["keep_pretrained"] == 0.0
    assert info["config"].keep_pretrained == 0.3
    assert rounds[1][0].shape == objects.shape
    # A pool of two: the first round paints both, the second has nothing left and keeps the result.
    short = fewshot.simulated_rounds(image, objects, region, first_ids, ids[3:5], (fake, info), rounds=2,
                                     per_round=2, seconds=0.5, seed=0)
    assert sorted(short[0][2][3:].tolist()) == ids[3:5].tolist() and short[0][1]["iterations"] > 0
    assert short[1][0] is short[0][0] and short[1][1]["iterations"] == 0 and short[1][1]["nothing_left"]
    assert short[1][2].tolist() == short[0][2].tolist()
    # The control (--null-round): Continue as long, on the same painting, nothing new painted.
    null = fewshot.simulated_rounds(image, objects, region, first_ids, ids, (fake, info), rounds=1,
                                    per_round=0, seconds=0.5, seed=0)
    assert null[0][2].tolist() == first_ids.tolist() and null[0][1]["iterations"] > 0
    # --whole-round: the same choice of objects, trained with the whole result around them.
    whole = fewshot.simulated_rounds(image, objects, region, first_ids, ids, (fake, info), rounds=1,
                                     per_round=2, seconds=0.5, seed=0, whole=True)
    assert whole[0][2].tolist() == first_round.tolist() and whole[0][1]["iterations"] > 0
    assert whole[0][1]["n_objects"] > len(first_round)  # the predicted objects train too


def test_rounds_are_scored_apart_from_the_objects_the_user_may_correct(fewshot):
    # The pool the simulated user corrects and the scored objects never share an object, and
    # together they are every unpainted object: scoring on "the objects no round painted" left
    # out what each round got most wrong (what the next round paints) and flattered it.
    unpainted = np.random.default_rng(0).permutation(np.arange(2, 30))
    pool, scored = fewshot.round_split(unpainted, 0.5)
    assert len(pool) == 14 and len(scored) == 14
    assert not np.isin(pool, scored).any()
    assert sorted(np.concatenate([pool, scored]).tolist()) == list(range(2, 30))
    assert len(fewshot.round_split(unpainted, 0.25)[0]) == 7
    assert [len(x) for x in fewshot.round_split(unpainted[:3], 0.9)] == [2, 1]   # one left to score
    assert [len(x) for x in fewshot.round_split(unpainted[:1], 0.5)] == [0, 1]


def test_the_rounds_correct_the_pool_and_score_the_rest(fewshot, monkeypatch):
    seen = {}
    monkeypatch.setattr(fewshot, "simulated_rounds", lambda image, objects, region, painted_ids, candidates, *a,
                        **kw: seen.update(painted=painted_ids, candidates=candidates) or [])
    monkeypatch.setattr(fewshot, "_score_rounds", lambda *a: seen.update(scored=a[7]))
    args = type("Args", (), dict(round_pool=0.5, round_variants={"default": {}}, rounds=1, round_k=5,
                                  round_time=1.0))()
    order = np.random.default_rng(3).permutation(np.arange(1, 21))
    fewshot._rounds(args, {}, "scene", 5, 0, "U-Net", None, None, None, order[:5], order[5:], None, {})
    assert seen["painted"].tolist() == order[:5].tolist()
    assert not np.isin(seen["candidates"], seen["scored"]).any()
    assert not np.isin(np.concatenate([seen["candidates"], seen["scored"]]), order[:5]).any()
    assert sorted(np.concatenate([seen["candidates"], seen["scored"]]).tolist()) == sorted(order[5:].tolist())


def test_the_null_round_continues_without_painting_anything(fewshot, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fewshot, "simulated_rounds", lambda *a, **kw: calls.append(a[7]) or [])
    monkeypatch.setattr(fewshot, "_score_rounds", lambda *a: calls.append(a[4]))
    args = type("Args", (), dict(round_pool=0.5, round_variants={"default": {}, fewshot.NULL_ROUND: {}}, rounds=1,
                                  round_k=5, round_time=1.0))()
    order = np.random.default_rng(3).permutation(np.arange(1, 21))
    fewshot._rounds(args, {}, "scene", 5, 0, "U-Net", None, None, None, order[:5], order[5:], None, {})
    assert calls == [5, "U-Net", 0, f"U-Net, Continue {fewshot.NULL_ROUND}"]
    with pytest.raises(SystemExit):
        fewshot.main(["--null-round", "--datasets", "none"])
    assert "--null-round is a control for the correction rounds" in capsys.readouterr().err


def test_the_whole_corrected_result_trains_with_the_corrections_drawn_in(fewshot):
    """--whole-round: the whole result becomes training labels (background 1, objects 2..), the
    corrected objects as in the reference, what the result had on them erased, the rest as predicted."""
    objects = np.zeros((40, 60), np.int32)
    objects[5:15, 5:15], objects[5:15, 15:25], objects[25:35, 30:40], objects[25:35, 45:55] = 1, 2, 3, 4
    region = np.ones(objects.shape, bool)
    region[:, 57:] = False
    pred = np.zeros_like(objects)
    pred[5:15, 5:25] = 7                      # objects 1 and 2 merged
    pred[25:35, 30:40] = 9                    # object 3 found
    pred[25:35, 45:50] = 4                    # object 4 split in two
    pred[25:35, 50:55] = 5
    pred[0:3, 0:3] = 8                        # a false object nobody corrects
    labels = fewshot.corrected_result(pred, objects, region, np.array([1, 2, 4]))
    assert labels.dtype == np.uint16 and (labels[:, 57:] == 0).all()       # outside the annotated region
    assert labels[20, 5] == 1 and (labels[0:3, 0:3] == 9).all()            # background; the rest as predicted
    assert (labels[25:35, 30:40] == 10).all()
    for i in (1, 2, 4):                       # each corrected object one new id, none of the predicted ones
        ids = np.unique(labels[objects == i])
        assert len(ids) == 1 and ids[0] > 10
    assert len({int(labels[objects == i][0]) for i in (1, 2, 4)}) == 3
    # A predicted object only partly on a corrected one keeps its other part.
    pred2 = pred.copy()
    pred2[5:15, 25:40] = 7                    # the merge reaches well beyond objects 1 and 2
    labels2 = fewshot.corrected_result(pred2, objects, region, np.array([1]))
    assert (labels2[5:15, 15:40] == 8).all() and len(np.unique(labels2[objects == 1])) == 1
    # Mostly on the corrected one: erased, background there now.
    labels3 = fewshot.corrected_result(pred2, objects, region, np.array([1, 2]))
    assert (labels3[5:15, 25:40] == 1).all()


def test_the_whole_round_runs_beside_the_shipped_one(fewshot, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fewshot, "simulated_rounds", lambda *a, **kw: calls.append((a[7], kw["whole"])) or [])
    monkeypatch.setattr(fewshot, "_score_rounds", lambda *a: calls.append(a[4]))
    args = type("Args", (), dict(round_pool=0.5, round_variants={"default": {}, fewshot.WHOLE_ROUND: {}}, rounds=1,
                                  round_k=5, round_time=1.0))()
    order = np.random.default_rng(3).permutation(np.arange(1, 21))
    fewshot._rounds(args, {}, "scene", 5, 0, "U-Net", None, None, None, order[:5], order[5:], None, {})
    assert calls == [(5, False), "U-Net", (5, True), f"U-Net, Continue {fewshot.WHOLE_ROUND}"]
    with pytest.raises(SystemExit):
        fewshot.main(["--whole-round", "--datasets", "none"])
    assert "--whole-round is a way of running the correction rounds" in capsys.readouterr().err
    # The controls' names are reserved: a --round-variant of that name would be overwritten.
    for name in (fewshot.NULL_ROUND, fewshot.WHOLE_ROUND, "default"):
        with pytest.raises(SystemExit):
            fewshot.main(["--rounds", "1", "--datasets", "none", "--round-variant", f"{name}:ema=0"])
        assert f"--round-variant {name}:ema=0: give NAME:FIELD=VALUE" in capsys.readouterr().err


def test_thresholds_segment_the_same_network_once_per_pair(fewshot, capsys):
    from napari_unet.postprocess import FOREGROUND_THRESHOLD, SEED_THRESHOLD
    from napari_unet.synthetic import make_nuclei

    image, objects = make_nuclei((96, 96), radius=(5, 8), seed=4)
    objects = objects.astype(np.int32)
    painted = fewshot.paint(objects, np.ones(objects.shape, bool), np.unique(objects)[1:4])
    pairs = fewshot.parse_thresholds(f"{SEED_THRESHOLD}/{FOREGROUND_THRESHOLD}, 0.05/0.05,0.95/0.95")
    assert pairs == [(SEED_THRESHOLD, FOREGROUND_THRESHOLD), (0.05, 0.05), (0.95, 0.95)]
    pred, _, info = fewshot.unet(image, painted, seed=0, max_time=None, spec="4/2/32/2/3e-3", threads=1,
                                 iterations=2, init="new", thresholds=pairs)
    got = info["thresholded"]
    assert list(got) == [fewshot.threshold_label(*p) for p in pairs]
    np.testing.assert_array_equal(got[fewshot.threshold_label(*pairs[0])], pred)  # the defaults
    loose, strict = got[fewshot.threshold_label(0.05, 0.05)], got[fewshot.threshold_label(0.95, 0.95)]
    assert (strict > 0).sum() < (loose > 0).sum()  # the same network, fewer pixels sure enough
    for bad in ("0.4", "0.4/x", "0/0.5", "0.5/1"):
        with pytest.raises(SystemExit):
            fewshot.main(["--thresholds", bad, "--datasets", "none"])
        assert f"--thresholds: '{bad}'" in capsys.readouterr().err


def test_every_round_is_scored_on_the_same_objects_outside_the_pool(fewshot):
    objects = _scene()
    region = np.ones(objects.shape, bool)
    scored = np.array([3])
    wrong = np.where(objects == 3, 0, objects)           # a result that misses object 3
    results = {}
    rounds = [(objects, {"iterations": 5}, np.array([1, 2, 4])),
              (wrong, {"iterations": 0, "nothing_left": True}, np.array([1, 2, 4]))]
    fewshot._score_rounds(results, "scene", 5, 0, "U-Net", objects, region, scored, wrong, {"iterations": 9},
                          rounds, 0.0)
    assert sorted(results) == [("scene", 5, f"U-Net, round {r}") for r in range(3)]
    # Only object 3 counts: a result that misses it scores 0 whatever it does elsewhere, one that
    # finds it 1, and the predictions on the other objects are not counted as extra.
    assert [results[("scene", 5, f"U-Net, round {r}")][0][1] for r in range(3)] == [0.0, 1.0, 0.0]
    assert all(v[0][2] == 1 for v in results.values())
    # Nothing to score: no rows (not an AP of 0).
    empty = {}
    fewshot._score_rounds(empty, "scene", 5, 0, "U-Net", objects, region, np.array([], int), objects,
                          {"iterations": 1}, rounds, 0.0)
    assert empty == {}


def test_suggestions_are_scored_on_the_errors_a_user_would_correct(fewshot):
    objects = _scene()
    region = np.ones_like(objects, bool)
    pred = np.where(objects == 2, 0, objects)  # object 2 missed
    pred[6:14, 30:38] = 0
    pred[6:14, 30:33] = 8  # object 3 split in three
    pred[6:14, 33:36] = 9
    pred[6:14, 36:38] = 11
    pred[0:3, 60:63] = 10  # an extra object
    errors = fewshot.error_mask(pred, objects, region, np.array([1]), np.array([6]))
    assert errors[objects == 2].all() and errors[objects == 3].all() and errors[pred == 10].all()
    assert not errors[(objects == 1) | (objects == 4) | (objects == 5) | (objects == 6)].any()
    # The network is unsure exactly over the missed object: the one suggestion lands there.
    probs = np.zeros((3,) + objects.shape, np.float32)
    probs[0] = 1.0
    probs[:, objects == 2] = 1 / 3
    painted = np.where(objects == 1, 2, 0)
    hits, n, chance = fewshot.suggestion_hits(probs, pred, objects, region, np.array([1]), np.array([6]),
                                              painted, cell_area=64.0, n=1)
    assert (hits, n) == (1, 1)
    assert 0 < chance < 1


def test_round_changes_count_the_image_seeds_each_round_made_worse(fewshot):
    results = {("a", 5, "U-Net, round 0"): [(0, 0.5, 10, 0, 0), (1, 0.6, 10, 0, 0)],
               ("a", 5, "U-Net, round 1"): [(0, 0.7, 10, 0, 0), (1, 0.4, 10, 0, 0)],
               ("b", 5, "U-Net, round 0"): [(0, 1.0, 10, 0, 0)],
               ("b", 5, "U-Net, round 1"): [(0, 1.0, 10, 0, 0)],
               ("a", 5, "U-Net"): [(0, 0.5, 20, 0, 0)]}
    results[("a", 5, "U-Net, Continue lr:learning_rate=0.001, round 0")] = [(1, 0.6, 10, 0, 0), (0, 0.5, 10, 0, 0)]
    for r in range(1, 11):   # seeds listed in another order than round 0's: paired by seed
        results[("a", 5, f"U-Net, Continue lr:learning_rate=0.001, round {r}")] = [(0, 0.5 + r / 100, 10, 0, 0),
                                                                                   (1, 0.6, 10, 0, 0)]
    lines = fewshot.round_changes(results)
    assert lines[0] == "U-Net, round 1 against round 0: mean change +0.000, 1 better, 1 worse of 3 image-seeds"
    assert lines[1] == ("U-Net, Continue lr:learning_rate=0.001, round 1 against round 0: mean change +0.005, "
                        "1 better, 0 worse of 2 image-seeds")
    assert [line.split(" against")[0].rsplit(" ", 1)[1] for line in lines[1:]] == [str(r) for r in range(1, 11)]

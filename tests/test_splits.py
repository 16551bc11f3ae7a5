"""make_splits.py: dev/test and fold invariants, determinism, stratification quality, bad input;
protocols.load_splits."""

import hashlib
import json
import os
import time

import numpy as np
import pytest

import data
import make_splits
import protocols
import synthetic
import synthetic_coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    # our own synthetic tree: load_coco writes its index cache next to the data
    return synthetic_coco.make_synthetic_coco(
        str(tmp_path_factory.mktemp("coco") / "coco"), n_images=150, seed=1
    )


def run(argv):
    make_splits.main(make_splits.get_args_parser().parse_args(argv))


def test_splits_file_invariants(coco_root, tmp_path, capsys):
    out = str(tmp_path / "splits.json")
    run(["--data_root", coco_root, "--out", out])
    s = json.load(open(out))
    coco = data.load_coco(coco_root)
    ids, splits = coco["ids"].tolist(), coco["splits"]
    assert (
        s["protocol"] == "karpathy_cv"
        and s["method"] == "stratified"
        and s["folds"] == 5
        and s["seed"] == 42
    )
    assert s["counts"] == {"dev": len(s["dev"]), "test": len(s["test"])} and "database" not in s
    assert s["categories"] == data.COCO_CATEGORIES
    assert s["dev"] == sorted(i for i, k in zip(ids, splits) if k in ("train", "restval", "val"))
    assert s["test"] == sorted(i for i, k in zip(ids, splits) if k == "test")
    assert not set(s["dev"]) & set(s["test"]) and len(s["dev"]) + len(s["test"]) == len(ids)
    folds = s["val_folds"]
    assert len(folds) == 5 and sorted(sum(folds, [])) == s["dev"]  # a partition of dev
    assert max(map(len, folds)) - min(map(len, folds)) <= 3
    row = {i: r for r, i in enumerate(ids)}
    for f, st in zip(folds, s["stats"]):
        assert st["size"] == len(f) == len(set(f)) and f == sorted(f)
        assert st["positives"] == coco["labels"][[row[i] for i in f]].sum(0).tolist()
    assert protocols.load_splits(out) == s
    protocols.check_splits(s, np.array(ids), {"categories": json.dumps(coco["categories"])})
    text = capsys.readouterr().out
    assert "fold" in text and "max_rel_dev" in text and out in text and len(text.splitlines()) == 8


def test_same_seed_same_bytes_other_seed_differs(coco_root, tmp_path):
    paths = [str(tmp_path / f"{n}.json") for n in ("a", "b", "c", "r")]
    run(["--data_root", coco_root, "--out", paths[0]])
    run(["--data_root", coco_root, "--out", paths[1]])
    run(["--data_root", coco_root, "--out", paths[2], "--seed", "7"])
    run(["--data_root", coco_root, "--out", paths[3], "--method", "random", "--folds", "3"])
    a, b, c = (open(p, "rb").read() for p in paths[:3])
    assert a == b and a != c
    r = protocols.load_splits(paths[3])
    assert r["method"] == "random" and len(r["val_folds"]) == 3
    assert json.loads(c)["dev"] == json.loads(a)["dev"]
    assert sorted(os.listdir(tmp_path)) == [
        "a.json",
        "b.json",
        "c.json",
        "r.json",
    ]  # no temporaries


# make_splits.py of 6b0df37 (before --protocol) on coco_root: sha256 of its inputs and of the files
# it wrote
_TODAY_INPUT = "59b6e3d669a8cff1200486e5396609ae958e5ac84bdac62fee8316bf559513c3"
_TODAY_FILES = {
    (): "4283125fd70532e615b594014b24b439ee1f1b6b1403e7083d8e3db0c264102b",
    (
        "--method",
        "random",
        "--folds",
        "3",
        "--seed",
        "7",
    ): "5cd4ed046a84f348e849bb37110831ff65745df045af2e4d9cbbf8ad70c1a813",
}


@pytest.mark.parametrize("extra", list(_TODAY_FILES))
def test_karpathy_cv_is_todays_file_plus_protocol_and_counts(coco_root, tmp_path, extra):
    paths = {p: str(tmp_path / f"{p}.json") for p in ("default", "named")}
    run(["--data_root", coco_root, "--out", paths["default"], *extra])
    run(["--data_root", coco_root, "--out", paths["named"], "--protocol", "karpathy_cv", *extra])
    assert open(paths["default"], "rb").read() == open(paths["named"], "rb").read()
    s = json.load(open(paths["default"]))
    assert (s.pop("protocol"), s.pop("counts")) == (
        "karpathy_cv",
        {"dev": len(s["dev"]), "test": len(s["test"])},
    )
    # today's file, rebuilt from today's rule (dev = not Karpathy test, folds over dev in id order)
    coco = data.load_coco(coco_root)
    dev = np.asarray(coco["splits"]) != "test"
    method, folds, seed = (
        (extra[1], int(extra[3]), int(extra[5])) if extra else ("stratified", 5, 42)
    )
    fold_of = (
        make_splits.iterative_stratification(coco["labels"][dev], folds, seed)
        if method == "stratified"
        else make_splits.random_folds(int(dev.sum()), folds, seed)
    )
    dev_ids = coco["ids"][dev]
    val = [dev_ids[fold_of == k].tolist() for k in range(folds)]
    assert s == {
        "method": method,
        "folds": folds,
        "seed": seed,
        "categories": coco["categories"],
        "dev": dev_ids.tolist(),
        "test": coco["ids"][~dev].tolist(),
        "val_folds": val,
        "stats": [
            {"size": len(v), "positives": coco["labels"][dev][fold_of == k].sum(0).tolist()}
            for k, v in enumerate(val)
        ],
    }
    # and byte for byte, as long as synthetic.py still generates the same tree
    h = hashlib.sha256()
    for part in (coco["ids"].tobytes(), coco["labels"].tobytes(), "".join(coco["splits"]).encode()):
        h.update(part)
    if h.hexdigest() == _TODAY_INPUT:
        assert (
            hashlib.sha256((json.dumps(s, indent=2) + "\n").encode()).hexdigest()
            == _TODAY_FILES[extra]
        )


def test_default_out_is_under_data_root(tmp_path):
    root = synthetic_coco.make_synthetic_coco(str(tmp_path / "coco"), n_images=30, seed=2)
    run(["--data_root", root])
    assert protocols.load_splits(os.path.join(root, "splits.json"))["folds"] == 5


def _greedy_reference(level, prio, m):
    """The paper's per-example loop: each item to the fold with the largest level (ties: prio)."""
    level = level.astype(float).copy()
    counts = np.zeros(len(level), np.int64)
    for _ in range(m):
        j = max(range(len(level)), key=lambda i: (level[i], prio[i]))
        level[j] -= 1
        counts[j] += 1
    return counts


def test_block_shares_equal_per_example_greedy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 7))
        level = np.round(rng.uniform(-3, 12, k) * 4) / 4  # many exact ties
        prio = rng.permutation(k).astype(float)
        m = int(rng.integers(0, 40))
        np.testing.assert_array_equal(
            make_splits._take_top(level, prio, m), _greedy_reference(level, prio, m)
        )


def _mean_rel_dev(y, fold_of, k):
    return float(np.nanmean(make_splits.fold_deviation(y, fold_of, k)))


def test_stratified_balance_and_determinism():
    y = synthetic.synthetic_labels(20000, seed=3)
    f = make_splits.iterative_stratification(y, 5, seed=0)
    assert f.dtype == np.int64 and set(np.unique(f)) == set(range(5))
    assert np.bincount(f).max() - np.bincount(f).min() <= 1
    strat, rand = (
        _mean_rel_dev(y, f, 5),
        _mean_rel_dev(y, make_splits.random_folds(len(y), 5, 0), 5),
    )
    assert strat < 0.01 and strat < rand / 5, (strat, rand)
    # every class: per-fold positives within 1 of the even share (brute-force check of the counts)
    pos = np.stack([y[f == j].sum(0) for j in range(5)])  # (5, 80)
    assert (np.abs(pos - y.sum(0) / 5) <= 1.0 + 1e-9).mean() > 0.95
    np.testing.assert_array_equal(f, make_splits.iterative_stratification(y, 5, seed=0))
    assert (f != make_splits.iterative_stratification(y, 5, seed=1)).any()
    # labelless rows are spread too
    y0 = y.copy()
    y0[:3000] = 0
    f0 = make_splits.iterative_stratification(y0, 4, seed=0)
    assert np.bincount(f0).max() - np.bincount(f0).min() <= 1


def test_coco_scale_acceptance():
    y = synthetic.synthetic_labels(118287, seed=0)
    t = time.time()
    f = make_splits.iterative_stratification(y, 5, seed=42)
    took = time.time() - t
    assert _mean_rel_dev(y, f, 5) <= 0.002  # issue: <= 0.2% relative
    assert _mean_rel_dev(y, make_splits.random_folds(len(y), 5, 42), 5) > 0.02
    assert took < 15  # ~0.25 s idle; shared CPUs here


def test_random_folds_partition():
    f = make_splits.random_folds(103, 5, seed=0)
    assert np.bincount(f).tolist() == [21, 21, 21, 20, 20]
    np.testing.assert_array_equal(f, make_splits.random_folds(103, 5, seed=0))


@pytest.mark.parametrize("case", ["no_root", "no_ann", "bad_keys", "bad_cats", "absent_image"])
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, case):
    root = synthetic_coco.make_synthetic_coco(str(tmp_path / "coco"), n_images=20, seed=0)
    kp = os.path.join(root, "dataset_coco.json")
    tr = os.path.join(root, "annotations", "instances_train2014.json")
    if case == "no_root":
        root, expect = str(tmp_path / "nowhere"), str(tmp_path / "nowhere")
    elif case == "no_ann":
        os.remove(tr)
        expect = tr
    elif case == "bad_keys":
        with open(kp, "w") as f:
            json.dump({"annotations": []}, f)
        expect = kp
    elif case == "bad_cats":
        d = json.load(open(tr))
        d["categories"][5]["name"] = "hovercraft"
        with open(tr, "w") as f:
            json.dump(d, f)
        expect = tr
    else:
        d = json.load(open(kp))
        d["images"].append(dict(d["images"][0], cocoid=123456789))
        with open(kp, "w") as f:
            json.dump(d, f)
        expect = kp
    before = sorted(os.listdir(root)) if os.path.isdir(root) else None
    out = str(tmp_path / "splits.json")
    with pytest.raises(SystemExit) as e:
        run(["--data_root", root, "--out", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not os.path.exists(out)
    if before is not None:
        assert sorted(os.listdir(root)) == before  # no cache, no temporaries


@pytest.mark.parametrize("argv", [["--folds", "1"], ["--folds", "x"], ["--method", "kfold"]])
def test_argparse_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        make_splits.get_args_parser().parse_args(argv)
    assert e.value.code == 2


def _good_splits():
    return {
        "method": "stratified",
        "folds": 2,
        "seed": 0,
        "categories": data.COCO_CATEGORIES,
        "dev": [1, 2, 3, 4],
        "test": [5, 6],
        "val_folds": [[1, 3], [2, 4]],
        "stats": [{"size": 2, "positives": [0] * 80}] * 2,
    }


@pytest.mark.parametrize(
    "case",
    [
        "ok",
        "overlap",
        "not_partition",
        "duplicate",
        "fold_count",
        "missing_key",
        "no_file",
        "bad_json",
        "categories",
    ],
)
def test_load_splits_validation(tmp_path, case):
    p = str(tmp_path / "s.json")
    s = _good_splits()
    if case == "overlap":
        s["test"] = [4, 5]
    elif case == "not_partition":
        s["val_folds"] = [[1, 3], [2, 3]]
    elif case == "duplicate":
        s["dev"], s["val_folds"] = [1, 2, 3, 4, 4], [[1, 3], [2, 4, 4]]
    elif case == "fold_count":
        s["folds"] = 3
    elif case == "missing_key":
        del s["val_folds"]
    elif (
        case == "categories"
    ):  # any class list is fine (checked against the cache), but it must name them
        s["categories"] = [c["id"] for c in s["categories"]]
    if case == "bad_json":
        open(p, "w").write("{")
    elif case != "no_file":
        data.save_json(p, s)
    if case == "ok":
        assert protocols.load_splits(p)["val_folds"] == [[1, 3], [2, 4]]
        return
    with pytest.raises(data.DataError) as e:
        protocols.load_splits(p)
    assert p in str(e.value) and "\n" not in str(e.value)


def test_check_splits_ids_and_categories():
    s = _good_splits()
    protocols.check_splits(s, np.arange(1, 7), {})
    with pytest.raises(data.DataError, match="2 of 6 split image ids are missing"):
        protocols.check_splits(s, np.array([1, 2, 3, 4]), {})
    s["database"] = [7]  # a retrieval database's images must be in the cache too
    with pytest.raises(data.DataError, match="1 of 7 split image ids are missing"):
        protocols.check_splits(s, np.arange(1, 7), {})
    names = [dict(c) for c in s["categories"]]
    protocols.check_splits(s, np.arange(1, 8), {"categories": json.dumps(names)})
    names[3]["name"] = "not the same"
    with pytest.raises(data.DataError, match="categories are not the"):
        protocols.check_splits(s, np.arange(1, 8), {"categories": json.dumps(names)})

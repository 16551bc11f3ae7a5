"""protocols.py + make_splits.py --protocol coco2014 | hashnet: which images are dev / test /
database, the HashNet list reader and its label-column order (checked against real COCO
annotations), bad lists."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

import data
import make_splits
import protocols
import synthetic_coco

AUTHOR = "/home/caozhangjie/run-czj/dataset/coco"  # HashNet's lists carry the authors' paths


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return synthetic_coco.make_synthetic_coco(
        str(tmp_path_factory.mktemp("coco") / "coco"), n_images=240, seed=3
    )


def run(argv):
    make_splits.main(make_splits.get_args_parser().parse_args(argv))


def alphabetical(labels):
    """Our labels (COCO id order) -> HashNet's columns, written here independently of
    protocols.py."""
    names = [c["name"] for c in data.COCO_CATEGORIES]
    return labels[:, [names.index(n) for n in sorted(names)]]


def write_lists(folder, coco, train_rows, test_rows):
    """HashNet-format train.txt / test.txt of these rows: absolute author paths, alphabetical label
    columns."""
    os.makedirs(folder, exist_ok=True)
    for name, rows in (("train.txt", train_rows), ("test.txt", test_rows)):
        y = alphabetical(coco["labels"][rows])
        with open(os.path.join(folder, name), "w") as f:
            for r, row in zip(rows, y):
                rel = os.path.relpath(
                    coco["paths"][r], os.path.dirname(os.path.dirname(coco["paths"][r]))
                )
                f.write(f"{AUTHOR}/{rel} " + " ".join(map(str, row.tolist())) + "\n")
    return str(folder)


def pick_lists(coco, seed=0):
    """A shuffled (HashNet's lists are not sorted) train and query list of labelled images, both
    folders."""
    rng = np.random.default_rng(seed)
    labelled = rng.permutation(np.flatnonzero(coco["labels"].any(1)))
    return labelled[:80], labelled[80:130]


def test_hashnet_dev_test_database(coco_root, tmp_path, capsys):
    coco = data.load_coco(coco_root)
    train_rows, test_rows = pick_lists(coco)
    folders = {os.path.basename(os.path.dirname(coco["paths"][r])) for r in train_rows}
    assert folders == {"train2014", "val2014"}  # like the real lists
    lists = write_lists(tmp_path / "lists", coco, train_rows, test_rows)
    out = str(tmp_path / "splits.json")
    run(["--data_root", coco_root, "--protocol", "hashnet", "--lists", lists, "--out", out])
    s = json.load(open(out))
    ids, labelled = coco["ids"], coco["labels"].any(1)
    assert list(s) == [
        "protocol",
        "method",
        "folds",
        "seed",
        "categories",
        "dev",
        "test",
        "database",
        "val_folds",
        "stats",
        "counts",
    ]
    assert s["protocol"] == "hashnet" and s["method"] == "stratified" and s["folds"] == 5
    assert s["dev"] == sorted(ids[train_rows].tolist())
    assert s["test"] == sorted(ids[test_rows].tolist())
    want_db = sorted(set(ids[labelled].tolist()) - set(ids[test_rows].tolist()))
    assert s["database"] == want_db and set(s["dev"]) <= set(
        s["database"]
    )  # training images included
    assert not (~labelled).all() and not set(ids[~labelled].tolist()) & set(s["database"])
    assert s["counts"] == {"dev": 80, "test": 50, "database": len(want_db)}
    assert sorted(sum(s["val_folds"], [])) == s["dev"]  # val folds partition dev
    row = {i: r for r, i in enumerate(ids.tolist())}
    for f, st in zip(s["val_folds"], s["stats"]):
        assert st["positives"] == coco["labels"][[row[i] for i in f]].sum(0).tolist()
    assert protocols.load_splits(out)["dev"] == s["dev"]
    text = capsys.readouterr().out
    assert (
        text.startswith("hashnet: stratified 5-fold split of 80 dev images")
        and f"database {len(want_db)}" in text
    )
    assert len(text.splitlines()) == 8 and out in text


def test_coco2014_is_train2014_val2014_labelled(coco_root, tmp_path):
    out = str(tmp_path / "splits.json")
    run(["--data_root", coco_root, "--protocol", "coco2014", "--out", out])
    s = json.load(open(out))
    # straight from the instance files, not through load_coco: images with >= 1 annotation
    want = {}
    for f in ("train2014", "val2014"):
        d = json.load(open(os.path.join(coco_root, "annotations", f"instances_{f}.json")))
        assert {i["file_name"].split("_")[1] for i in d["images"]} == {f}
        want[f] = sorted({a["image_id"] for a in d["annotations"]})
        assert len(want[f]) < len(d["images"]) or f == "train2014"  # unlabelled images exist
    assert s["protocol"] == "coco2014" and "database" not in s
    assert s["dev"] == want["train2014"] and s["test"] == want["val2014"]
    assert s["counts"] == {"dev": len(s["dev"]), "test": len(s["test"])}
    assert sorted(sum(s["val_folds"], [])) == s["dev"]
    assert protocols.load_splits(out)["test"] == s["test"]


def fixture_labels(path):
    """pycocotools labels of an instances file -> {image id: uint8 [80]} (any annotation, crowd
    included)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO(str(path))
    index = {cat["id"]: k for k, cat in enumerate(data.COCO_CATEGORIES)}
    out = {}
    for i in c.getImgIds():
        y = np.zeros(80, np.uint8)
        y[[index[a["category_id"]] for a in c.loadAnns(c.getAnnIds(imgIds=[i]))]] = 1
        out[i] = y
    return out


def test_column_order_matches_real_annotations(hashnet_dir, fixtures_dir):
    ours = fixture_labels(fixtures_dir / "fce_instances_val2014_100.json")
    order = protocols.hashnet_columns(data.COCO_CATEGORIES)
    assert [data.COCO_CATEGORIES[k]["name"] for k in order[[0, 1, 2, 49, 79]]] == [
        "airplane",
        "apple",
        "backpack",
        "person",
        "zebra",
    ]
    theirs, ours_rows = [], []
    for name in protocols.HASHNET_LISTS:
        names, _, y = protocols.read_hashnet_list(str(hashnet_dir / name), 80)
        for n, row in zip(names, y):
            if n.startswith("COCO_val2014_") and int(n[-16:-4]) in ours:
                theirs.append(row)
                ours_rows.append(ours[int(n[-16:-4])])
    theirs, ours_rows = np.array(theirs), np.array(ours_rows)
    assert len(theirs) == 18  # 12 in train.txt, 6 in test.txt
    np.testing.assert_array_equal(theirs, ours_rows[:, order])  # every column of every image
    assert (theirs != ours_rows).any()  # COCO's id order does not fit


def test_real_lists_parse(hashnet_dir):
    tr_names, tr_lines, tr_y = protocols.read_hashnet_list(str(hashnet_dir / "train.txt"), 80)
    te_names, _, te_y = protocols.read_hashnet_list(str(hashnet_dir / "test.txt"), 80)
    assert (
        len(tr_names) == 10000
        and len(te_names) == 5000
        and tr_lines.tolist() == list(range(1, 10001))
    )
    assert not set(tr_names) & set(te_names)
    # SOURCES.md and issue 18 say 6,680 + 3,320; the file's own bytes say 6,766 + 3,234
    folders = [n.split("_")[1] for n in tr_names]
    assert folders.count("train2014") == 6766 and folders.count("val2014") == 3234
    assert tr_y.dtype == np.uint8 and tr_y.shape == (10000, 80) and te_y.shape == (5000, 80)
    assert tr_y.sum(1).min() >= 1 and te_y.sum(1).min() >= 1
    assert set(np.unique(np.concatenate([tr_y, te_y]))) == {0, 1}


def _expect_fail(argv, capsys, *needles):
    out = argv[argv.index("--out") + 1]
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    assert not os.path.exists(out)
    return err[0]


def _edit_line(path, lineno, fn):
    lines = open(path).read().splitlines()
    lines[lineno - 1] = fn(lines[lineno - 1])
    open(path, "w").write("\n".join(lines) + "\n")


def test_disagreeing_labels_refused(coco_root, tmp_path, capsys):
    coco = data.load_coco(coco_root)
    train_rows, test_rows = pick_lists(coco)
    lists = write_lists(tmp_path / "lists", coco, train_rows, test_rows)
    argv = [
        "--data_root",
        coco_root,
        "--protocol",
        "hashnet",
        "--lists",
        lists,
        "--out",
        str(tmp_path / "s.json"),
    ]
    test_txt = os.path.join(lists, "test.txt")
    y = alphabetical(coco["labels"][test_rows[6:7]])[0]
    col = int(np.flatnonzero(y == 0)[0])  # add a label the image lacks
    what = sorted(c["name"] for c in data.COCO_CATEGORIES)[col]
    _edit_line(
        test_txt, 7, lambda s: " ".join(t if j != col + 1 else "1" for j, t in enumerate(s.split()))
    )
    name = os.path.basename(coco["paths"][test_rows[6]])
    msg = _expect_fail(
        argv, capsys, test_txt, "line 7", name, f"list only: ['{what}']", "annotations only: []"
    )
    assert "1 of 50 lines differ" in msg
    # columns in COCO id order instead of alphabetical: refused on the first line whose labels
    # differ
    with open(os.path.join(lists, "train.txt"), "w") as f:
        for r in train_rows:
            f.write(
                f"{AUTHOR}/x/{os.path.basename(coco['paths'][r])} "
                + " ".join(map(str, coco["labels"][r].tolist()))
                + "\n"
            )
    _expect_fail(
        argv, capsys, os.path.join(lists, "train.txt"), "disagree with the COCO annotations"
    )


@pytest.mark.parametrize(
    "case",
    [
        "no_dir",
        "no_test",
        "empty",
        "columns",
        "not_01",
        "file_name",
        "duplicate",
        "overlap",
        "absent",
        "no_lists",
        "lists_other_protocol",
    ],
)
def test_bad_lists_one_line(coco_root, tmp_path, capsys, case):
    coco = data.load_coco(coco_root)
    train_rows, test_rows = pick_lists(coco)
    lists = write_lists(tmp_path / "lists", coco, train_rows, test_rows)
    tr, te = os.path.join(lists, "train.txt"), os.path.join(lists, "test.txt")
    argv = [
        "--data_root",
        coco_root,
        "--protocol",
        "hashnet",
        "--lists",
        lists,
        "--out",
        str(tmp_path / "s.json"),
    ]
    first = os.path.basename(coco["paths"][train_rows[0]])
    if case == "no_dir":
        argv[argv.index(lists)] = lists = str(tmp_path / "nowhere")
        needles = [lists, "not found"]
    elif case == "no_test":
        os.remove(te)
        needles = [te, "not found"]
    elif case == "empty":
        open(te, "w").write("\n")
        needles = [te, "no image lines"]
    elif case == "columns":
        _edit_line(tr, 3, lambda s: s + " 0")
        needles = [tr, "line 3", "81 label columns, expected 80"]
    elif case == "not_01":
        _edit_line(tr, 4, lambda s: s[:-1] + "2")
        needles = [tr, "line 4", "'2'"]
    elif case == "file_name":
        _edit_line(te, 2, lambda s: "/data/img_0001.png " + s.split(" ", 1)[1])
        needles = [te, "line 2", "img_0001.png"]
    elif case == "duplicate":
        open(tr, "a").write(open(tr).readline())
        needles = [tr, "line 81", first, "listed twice (first on line 1)"]
    elif case == "overlap":
        open(te, "a").write(open(tr).readline())
        needles = [te, tr, first, "1 query image(s)"]
    elif case == "absent":
        _edit_line(te, 5, lambda s: re.sub(r"\d{12}\.jpg", "000000999999.jpg", s))
        needles = [te, "line 5", "000000999999.jpg", coco_root, "1 of 50 listed images are missing"]
    elif case == "no_lists":
        del argv[argv.index("--lists") : argv.index("--lists") + 2]
        needles = ["--protocol hashnet needs --lists"]
    else:
        argv[argv.index("hashnet")] = "coco2014"
        needles = ["--lists is only read by --protocol hashnet"]
    _expect_fail(argv, capsys, *needles)


def test_select_rules_on_a_hand_made_pool():
    """The rules as plain functions of a load_coco-shaped dict (rows ascending, labelled-only where
    stated)."""
    y = np.zeros((6, 80), np.uint8)
    y[[0, 1, 3, 4], [0, 5, 7, 9]] = 1  # rows 2 and 5 unlabelled
    coco = {
        "ids": np.arange(10, 16),
        "labels": y,
        "categories": data.COCO_CATEGORIES,
        "splits": ["train", "test", "restval", "val", "test", "train"],
        "paths": [
            f"/r/{f}/COCO_{f}_{i:012d}.jpg"
            for i, f in zip(
                range(10, 16),
                ["train2014", "val2014", "val2014", "val2014", "val2014", "train2014"],
            )
        ],
    }
    k = protocols.select(coco, "karpathy_cv")
    assert (
        k["dev"].tolist() == [0, 2, 3, 5] and k["test"].tolist() == [1, 4] and "database" not in k
    )
    c = protocols.select(coco, "coco2014")
    assert c["dev"].tolist() == [0] and c["test"].tolist() == [1, 3, 4]
    coco["paths"][2] = "/r/images/x.jpg"  # no 2014 folder: refused
    with pytest.raises(data.DataError, match="neither train2014 nor val2014"):
        protocols.coco2014(coco)
    with pytest.raises(data.DataError, match="unknown protocol"):
        protocols.select(coco, "imagenet")

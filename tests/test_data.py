"""data.py and features.py: COCO loading against pycocotools on real annotation excerpts, caching,
synthetic data, the feature cache."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

import data
import features
import images
import synthetic
import synthetic_coco

KARPATHY_TEST_IDS = [42, 359, 636, 711, 810, 974, 1146, 1180, 1290]  # from SOURCES.md
UNANNOTATED_IDS = [73, 74, 133]  # we strip their annotations: real "image without annotations" rows


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def build_real_root(root, fixtures_dir):
    """A COCO 2014 data_root around the real annotation excerpts; returns (root, caption sets by
    cocoid)."""
    from PIL import Image

    val = json.loads((fixtures_dir / "fce_instances_val2014_100.json").read_text())
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] not in UNANNOTATED_IDS]
    train = json.loads((fixtures_dir / "cocoapi_pr_instances_val2017_1img-sample.json").read_text())
    # keep only the crowd annotation of its category, so that category is present through a crowd
    # box only
    crowd_cat = next(a["category_id"] for a in train["annotations"] if a["iscrowd"])
    train["annotations"] = [
        a for a in train["annotations"] if a["iscrowd"] or a["category_id"] != crowd_cat
    ]
    _write_json(os.path.join(root, "annotations", "instances_val2014.json"), val)
    _write_json(os.path.join(root, "annotations", "instances_train2014.json"), train)
    # real captions with stray spaces / newlines, one set per image (borrowed from other images:
    # only the text normalisation is under test)
    caps = json.loads((fixtures_dir / "captions_val2017_1000_subset.json").read_text())
    sets = {}
    for a in caps["annotations"]:
        sets.setdefault(a["image_id"], []).append(a["caption"])
    odd = [v for v in sets.values() if any("\n" in c or c != c.strip() for c in v)]
    record0 = json.loads((fixtures_dir / "karpathy_dataset_coco_record0_quoted.json").read_text())[
        "images"
    ][0]
    images = [(im["id"], "val2014") for im in val["images"]] + [
        (im["id"], "train2014") for im in train["images"]
    ]
    records, by_id, sentid = [], {}, 0
    for i, (cid, folder) in enumerate(images):
        split = (
            "test"
            if cid in KARPATHY_TEST_IDS
            else "train"
            if folder == "train2014"
            else ("restval", "val")[i % 2]
        )
        fname = f"COCO_{folder}_{cid:012d}.jpg"
        sents = [
            {"tokens": c.lower().split(), "raw": c, "imgid": i, "sentid": sentid + j}
            for j, c in enumerate(odd[i])
        ]
        sentid += len(sents)
        rec = dict(
            record0,
            filepath=folder,
            filename=fname,
            imgid=i,
            split=split,
            cocoid=cid,
            sentences=sents,
            sentids=[s["sentid"] for s in sents],
        )
        records.append(rec)
        by_id[cid] = odd[i]
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        Image.new("RGB", (8, 8), (i % 255, 50, 100)).save(os.path.join(root, folder, fname))
    records.reverse()  # load_coco must sort by id
    _write_json(os.path.join(root, "dataset_coco.json"), {"images": records, "dataset": "coco"})
    return str(root), by_id


@pytest.fixture(scope="module")
def _pristine_root(tmp_path_factory, fixtures_dir):
    return build_real_root(tmp_path_factory.mktemp("real") / "coco", fixtures_dir)


@pytest.fixture()
def real_root(tmp_path, _pristine_root):
    """A fresh copy per test (tests break files on purpose)."""
    root, caps = _pristine_root
    return shutil.copytree(root, str(tmp_path / "coco")), caps


def _pycocotools_labels(root, ids):
    """Reference labels straight from pycocotools: any annotation (crowd included) of a category."""
    from pycocotools.coco import COCO

    y = np.zeros((len(ids), 80), np.uint8)
    cat_ids = None
    for name in ("instances_train2014.json", "instances_val2014.json"):
        coco = COCO(os.path.join(root, "annotations", name))
        cat_ids = sorted(coco.getCatIds())
        have = set(coco.getImgIds())
        for r, i in enumerate(ids):
            if i in have:
                for a in coco.loadAnns(coco.getAnnIds(imgIds=[i], iscrowd=None)):
                    y[r, cat_ids.index(a["category_id"])] = 1
    return y, [{"id": c["id"], "name": c["name"]} for c in coco.loadCats(cat_ids)]


def test_load_coco_matches_pycocotools(real_root):
    root, caps = real_root
    coco = data.load_coco(root)
    ids = coco["ids"]
    assert ids.dtype == np.int64 and len(ids) == 101 and np.all(np.diff(ids) > 0)
    ref, ref_cats = _pycocotools_labels(root, ids.tolist())
    assert coco["labels"].dtype == np.uint8 and coco["labels"].shape == (101, 80)
    np.testing.assert_array_equal(coco["labels"], ref)
    assert coco["categories"] == ref_cats == data.COCO_CATEGORIES
    assert [c["id"] for c in coco["categories"]] == sorted(c["id"] for c in coco["categories"])
    # images without annotations keep a zero row; the crowd-only category of image 448263 counts
    rows = {i: r for r, i in enumerate(ids.tolist())}
    for i in UNANNOTATED_IDS:
        assert coco["labels"][rows[i]].sum() == 0
    assert coco["labels"][rows[448263]].sum() > 1
    assert coco["labels"][rows[448263], 0] == 1  # person, via its crowd box only
    # splits, paths, captions
    assert (
        sorted(i for i, s in zip(ids.tolist(), coco["splits"]) if s == "test") == KARPATHY_TEST_IDS
    )
    assert coco["splits"][rows[448263]] == "train"
    assert all(os.path.isfile(p) for p in coco["paths"])
    assert coco["paths"][rows[42]] == os.path.join(root, "val2014", "COCO_val2014_000000000042.jpg")
    for i, got in zip(ids.tolist(), coco["captions"]):
        assert got == [" ".join(c.split()) for c in caps[i]]  # order kept
        assert all("\n" not in c and c == c.strip() and "  " not in c for c in got)
    assert any(c != n for i in caps for c, n in zip(caps[i], coco["captions"][rows[i]]))


def test_load_coco_cache_and_fingerprint(real_root, monkeypatch):
    root, _ = real_root
    first = data.load_coco(root)
    assert os.path.isfile(os.path.join(root, ".coco_index.npz"))
    calls = []
    build = data._build_coco_index
    monkeypatch.setattr(data, "_build_coco_index", lambda r: calls.append(r) or build(r))
    again = data.load_coco(root)  # served from the cache
    assert calls == [] and again["fingerprint"] == first["fingerprint"]
    np.testing.assert_array_equal(again["labels"], first["labels"])
    assert again["captions"] == first["captions"] and again["paths"] == first["paths"]
    # a changed source file (new mtime) is noticed and the index rebuilt
    p = os.path.join(root, "annotations", "instances_val2014.json")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = data.load_coco(root)
    assert len(calls) == 1 and rebuilt["fingerprint"] != first["fingerprint"]
    np.testing.assert_array_equal(rebuilt["labels"], first["labels"])


@pytest.mark.parametrize(
    "case", ["no_root", "no_ann", "bad_keys", "bad_cats", "absent_image", "bad_json"]
)
def test_load_coco_bad_input(real_root, case):
    root, _ = real_root
    kp = os.path.join(root, "dataset_coco.json")
    val = os.path.join(root, "annotations", "instances_val2014.json")
    if case == "no_root":
        root, expect = root + "_missing", root + "_missing"
    elif case == "no_ann":
        os.remove(os.path.join(root, "annotations", "instances_train2014.json"))
        expect = "instances_train2014.json"
    elif case == "bad_keys":
        _write_json(kp, {"images": [{"cocoid": 42, "split": "test"}]})
        expect = "dataset_coco.json"
    elif case == "bad_cats":
        d = json.load(open(val))
        d["categories"] = d["categories"][:79]
        _write_json(val, d)
        expect = "instances_val2014.json"
    elif case == "absent_image":
        d = json.load(open(kp))
        d["images"].append(
            dict(d["images"][0], cocoid=999999999, filename="COCO_val2014_000999999999.jpg")
        )
        _write_json(kp, d)
        expect = "dataset_coco.json"
    else:
        with open(val, "w") as f:
            f.write('{"images": [')
        expect = "instances_val2014.json"
    with pytest.raises(data.DataError) as e:
        data.load_coco(root)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg
    assert not os.path.exists(os.path.join(root, ".coco_index.npz"))  # nothing written


def test_synthetic_coco_real_formats(tmp_path):
    from pycocotools.coco import COCO
    from PIL import Image

    root = synthetic_coco.make_synthetic_coco(str(tmp_path / "syn"), n_images=80, seed=3)
    coco = data.load_coco(root)
    ref, _ = _pycocotools_labels(root, coco["ids"].tolist())
    np.testing.assert_array_equal(coco["labels"], ref)
    assert set(coco["splits"]) == {"train", "restval", "val", "test"}
    for p, s in zip(coco["paths"], coco["splits"]):
        assert ("train2014" in p) == (s == "train")  # val/test/restval from val2014
    assert (coco["labels"].sum(1) == 0).any() and all(5 <= len(c) <= 7 for c in coco["captions"])
    raw = json.load(open(os.path.join(root, "dataset_coco.json")))["images"]
    assert any(
        s["raw"] != s["raw"].strip() or "\n" in s["raw"] for r in raw for s in r["sentences"]
    )
    crowd = []
    for name in ("instances_train2014.json", "instances_val2014.json"):
        c = COCO(os.path.join(root, "annotations", name))
        crowd += [(c, a) for a in c.dataset["annotations"] if a["iscrowd"]]
        assert len(c.getCatIds()) == 80
    assert crowd
    for c, a in crowd:  # RLE decodes to its bbox
        m = c.annToMask(a)
        x, y, w, h = a["bbox"]
        assert m.sum() == w * h and m[int(y) : int(y + h), int(x) : int(x + w)].all()
    # the picture carries the labels: the category's colour sits in its grid cell
    r = int(np.flatnonzero(coco["labels"].sum(1) > 0)[0])
    k = int(np.flatnonzero(coco["labels"][r])[0])
    cx, cy, rgb, _ = synthetic_coco._category_look(k)
    px = np.asarray(Image.open(coco["paths"][r]).convert("RGB"), np.float32)[
        1 + 7 * cy + 3, 1 + 7 * cx + 3
    ]
    assert np.abs(px - np.array(rgb)).max() < 60
    again = synthetic_coco.make_synthetic_coco(str(tmp_path / "syn2"), n_images=80, seed=3)
    np.testing.assert_array_equal(data.load_coco(again)["labels"], coco["labels"])


def test_image_caption_dataset(synthetic_coco, tmp_path):
    coco = data.load_coco(synthetic_coco)
    ds = images.ImageCaptionDataset(coco, indices=[3, 1])
    i, img, caps = ds[0]
    assert (
        len(ds) == 2
        and i == 3
        and img.mode == "RGB"
        and img.size == (64, 64)
        and caps == coco["captions"][3]
    )
    bad = dict(coco, paths=[str(tmp_path / "broken.jpg")] * len(coco["paths"]))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert images.ImageCaptionDataset(bad)[0][1] is None
    idx, imgs, capss = images.ImageCaptionDataset.collate([ds[0], ds[1]])
    assert idx == [3, 1] and len(imgs) == 2 and capss[1] == coco["captions"][1]


def test_synthetic_labels_are_coco_like():
    y = synthetic.synthetic_labels(60000, seed=1)
    assert y.dtype == np.uint8 and y.shape == (60000, 80)
    prev = y.mean(0)
    assert 0.52 < prev[0] < 0.57 and prev.argmax() == 0  # person
    assert 0.001 < prev.min() < 0.003  # hair drier / toaster
    assert 2.7 < y.sum(1).mean() < 3.1
    assert 0.005 < (y.sum(1) == 0).mean() < 0.02
    np.testing.assert_array_equal(y, synthetic.synthetic_labels(60000, seed=1))


def _average_precision(y, s):
    """AP = mean precision at the rank of each positive (sklearn's definition when scores are
    distinct)."""
    hits = y[np.argsort(-s, kind="stable")]
    return float(np.sum(np.cumsum(hits) / np.arange(1, len(hits) + 1) * hits) / hits.sum())


def test_planted_features(planted):
    f = planted
    n = len(f["ids"])
    assert f["image"].dtype == np.float16 and f["image"].shape == (n, 1, 768)
    assert f["text"].dtype == np.float16 and f["text"].shape == (n, 5, 768)
    assert f["ids"].dtype == np.int64 and len(np.unique(f["ids"])) == n
    assert f["labels"].dtype == np.uint8 and f["n_captions"].dtype == np.int64
    assert f["n_captions"].min() >= 1 and f["n_captions"].max() == 5 and (f["n_captions"] < 5).any()
    norms = np.linalg.norm(f["text"].astype(np.float32), axis=2)
    valid = np.arange(5)[None] < f["n_captions"][:, None]
    assert (norms[~valid] == 0).all() and norms[valid].min() > 4.9 and norms[valid].max() < 30.1
    img_norm = np.linalg.norm(f["image"][:, 0].astype(np.float32), axis=1)
    assert img_norm.min() > 4.9 and img_norm.max() < 30.1 and img_norm.std() > 3
    assert np.abs(f["image"]).max() < 8  # small coordinates
    assert f["meta"]["model"] == "planted"
    # labels are recoverable but not trivially: a ridge probe on normalised [image, mean caption]
    x_img = f["image"][:, 0].astype(np.float32)
    x_img /= np.linalg.norm(x_img, axis=1, keepdims=True)
    t = f["text"].astype(np.float32)
    t /= np.maximum(np.linalg.norm(t, axis=2, keepdims=True), 1e-6)
    cap = t.sum(1) / f["n_captions"][:, None]
    x = np.concatenate([x_img, cap / np.linalg.norm(cap, axis=1, keepdims=True)], 1)
    y = f["labels"].astype(np.float64)
    xtr, xva = x[:900].astype(np.float64), x[900:].astype(np.float64)
    mu = xtr.mean(0)
    # kernel ridge in its dual form (900 x 900 solve): fast and exact
    alpha = np.linalg.solve(
        (xtr - mu) @ (xtr - mu).T + 3.0 * np.eye(900), y[:900] - y[:900].mean(0)
    )
    s = (xva - mu) @ ((xtr - mu).T @ alpha)
    keep = y[900:].sum(0) >= 3
    ap = np.mean([_average_precision(y[900:, k], s[:, k]) for k in np.flatnonzero(keep)])
    chance = y[900:, keep].mean()  # AP of random scores
    assert 0.3 < ap < 0.98 and ap > 5 * chance, (ap, chance)  # 0.45 on this fixture


def test_planted_is_fast_and_deterministic():
    t = time.time()
    a = synthetic.make_planted_features(3000, seed=5)
    assert time.time() - t < 15  # <1 s idle; shared CPUs here
    b = synthetic.make_planted_features(300, seed=5)
    c = synthetic.make_planted_features(300, seed=5)
    for k in ("ids", "image", "text", "n_captions", "labels", "prompts"):
        np.testing.assert_array_equal(b[k], c[k])
    assert a["labels"].shape == (3000, 80)


def test_features_round_trip(tmp_path, planted):
    p = str(tmp_path / "f.safetensors")
    features.save_features(p, planted, planted["meta"])
    tensors, meta = features.load_features(p)
    for k in ("ids", "image", "text", "n_captions", "labels", "prompts"):
        np.testing.assert_array_equal(tensors[k].numpy(), planted[k])
    assert (
        meta["format"] == features.FEATURES_FORMAT
        and meta["dim"] == "768"
        and meta["model"] == "planted"
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["categories"]) == data.COCO_CATEGORIES
    assert sorted(os.listdir(tmp_path)) == ["f.safetensors"]  # no temporary left behind


def _small_cache(n=30):
    rng = np.random.default_rng(0)
    return {
        "ids": np.arange(100, 100 + n, dtype=np.int64),
        "image": rng.standard_normal((n, 1, 16)).astype(np.float16),
        "text": rng.standard_normal((n, 3, 16)).astype(np.float16),
        "n_captions": np.full(n, 3, np.int64),
        "labels": np.zeros((n, 80), np.uint8),
    }


def test_load_features_names_nan_rows(tmp_path):
    t = _small_cache()
    t["image"][[2, 5], 0, 3] = np.nan
    for r in range(10, 22):
        t["text"][r, 1, 0] = np.inf
    p = str(tmp_path / "nan.safetensors")
    features.save_features(p, t, {"model": "x"})
    with pytest.raises(data.DataError) as e:
        features.load_features(p)
    msg = str(e.value)
    assert (
        p in msg
        and "14 image(s)" in msg
        and "[102, 105, 110, 111, 112, 113, 114, 115, 116, 117] ..." in msg
    )


@pytest.mark.parametrize("case", ["missing", "garbage", "format", "no_labels", "dtype", "shape"])
def test_load_features_refuses_bad_files(tmp_path, case):
    p = str(tmp_path / "f.safetensors")
    t, meta = _small_cache(), {"model": "x"}
    if case == "garbage":
        with open(p, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case == "format":
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v) for k, v in t.items()}, p, metadata={"format": "pt"})
    elif case != "missing":
        if case == "no_labels":
            del t["labels"]
        elif case == "dtype":
            t["image"] = t["image"].astype(np.float32)
        else:
            t["labels"] = t["labels"][:-1]
        features.save_features(p, t, meta)
    with pytest.raises(data.DataError) as e:
        features.load_features(p)
    assert p in str(e.value) and "\n" not in str(e.value)


def _fold_cache(root, n=300):
    """A planted cache stored out of id order, with 2 image views, prompts and 2 unreadable images,
    and a 3-fold splits file -> (features path, splits path, bad ids)."""
    feats = synthetic.make_planted_features(n, seed=1)
    perm = np.random.default_rng(0).permutation(n)
    t = {k: feats[k][perm] for k in ("ids", "image", "text", "n_captions", "labels")}
    t["image"] = np.concatenate([t["image"], 2 * t["image"]], 1)  # (N, 2, D)
    ids = feats["ids"].tolist()  # sorted
    dev, bad = ids[20:], [ids[25], ids[26]]
    val_folds = [dev[k::3] for k in range(3)]
    features.save_features(
        root / "f.safetensors",
        dict(t, prompts=feats["prompts"]),
        dict(feats["meta"], bad_images=bad),
    )
    data.save_json(
        root / "splits.json",
        {
            "method": "random",
            "folds": 3,
            "seed": 0,
            "categories": data.COCO_CATEGORIES,
            "dev": dev,
            "test": ids[:20],
            "val_folds": val_folds,
            "stats": [{"size": len(f)} for f in val_folds],
        },
    )
    return root / "f.safetensors", root / "splits.json", bad


def _load_fold(feats, splits):
    """features.load_fold of fold 0 on the cpu, as train.py calls it."""

    return features.load_fold(str(feats), str(splits), 0, torch.device("cpu"), "both", 16)


def test_load_fold_equals_the_whole_cache_gathered(tmp_path, monkeypatch):
    """features.load_fold reads only the fold's rows, chunk by chunk; it equals the old way (every
    tensor loaded whole, then the fold's rows gathered) tensor for tensor, and load_features equals
    safetensors' load_file."""
    from safetensors.torch import load_file

    feats, splits, bad = _fold_cache(tmp_path)
    # 7 caption rows per chunk: many, a ragged last one
    monkeypatch.setattr(features, "_CHUNK_BYTES", 7 * 5 * 768 * 2)
    fold = _load_fold(feats, splits)
    whole, s = load_file(feats), json.loads(splits.read_text())
    row = {i: r for r, i in enumerate(whole["ids"].tolist())}
    val = sorted(set(s["val_folds"][0]) - set(bad))
    for name, want in (
        ("train", sorted(set(s["dev"]) - set(s["val_folds"][0]) - set(bad))),
        ("val", val),
    ):
        r = torch.tensor([row[i] for i in want])
        assert list(fold[name]) == ["ids", "image", "text", "n_captions", "labels"]
        assert fold[name]["ids"].tolist() == want
        for k in ("image", "text", "n_captions", "labels"):
            assert fold[name][k].dtype == whole[k].dtype and torch.equal(
                fold[name][k], whole[k][r]
            ), (name, k)
    assert fold["skipped"] == {"train": 1, "val": 1}  # dev[5] is in fold 2, dev[6] in fold 0
    assert torch.equal(fold["prompts"], whole["prompts"]) and fold["meta"]["model"] == "planted"
    tensors, _ = features.load_features(feats)
    assert sorted(tensors) == sorted(whole) and all(
        torch.equal(tensors[k], whole[k]) for k in whole
    )
    # any order, repeats, empty
    picked = features.load_embeddings(feats, [torch.tensor([5, 0, 5, 299]), []])
    assert torch.equal(picked[0]["text"], whole["text"][[5, 0, 5, 299]])
    assert picked[1]["image"].shape == (0, 2, 768)


def test_load_fold_refuses_bad_caches_in_one_line(tmp_path):
    """A truncated or corrupt cache, a NaN row outside the fold (load_features refuses it, so
    load_fold does), a cache replaced between the index and the embeddings: one-line DataError."""
    feats, splits, _ = _fold_cache(tmp_path)
    raw = feats.read_bytes()
    for case, content in (("truncated", raw[:-1000]), ("corrupt", raw[:8] + b"#" + raw[9:])):
        p = tmp_path / f"{case}.safetensors"
        p.write_bytes(content)
        loads = (
            features.load_features,
            lambda q: features.load_embeddings(q, [None]),
            lambda q: _load_fold(q, splits),
        )
        for load in loads:
            with pytest.raises(data.DataError) as e:
                load(p)
            assert str(p) in str(e.value) and "\n" not in str(e.value), case
    t, meta = features.load_features(feats)
    t = {k: v.numpy() for k, v in t.items()}
    test_id = json.loads(splits.read_text())["test"][0]
    t["text"][np.flatnonzero(t["ids"] == test_id)[0], 0, 0] = np.inf
    features.save_features(tmp_path / "nan.safetensors", t, meta)
    with pytest.raises(data.DataError) as e:
        _load_fold(tmp_path / "nan.safetensors", splits)
    assert f"1 image(s) have NaN/Inf embeddings (COCO ids [{test_id}])" in str(e.value)
    with pytest.raises(data.DataError, match="changed while it was read"):
        features.load_embeddings(feats, [None], torch.arange(300))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    p = str(tmp_path / "out.npz")
    data.atomic_write(p, lambda tmp: np.savez(tmp, a=np.arange(3)))  # np.savez keeps the name
    assert np.load(p)["a"].tolist() == [0, 1, 2]

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        data.atomic_write(p, boom)
    assert sorted(os.listdir(tmp_path)) == ["out.npz"] and np.load(p)["a"].tolist() == [0, 1, 2]
    data.save_json(str(tmp_path / "sub" / "x.json"), {"a": 1})
    assert json.load(open(tmp_path / "sub" / "x.json")) == {"a": 1}


def test_coco_categories_literal(fixtures_dir):
    official = json.loads((fixtures_dir / "coco80_categories_official.json").read_text())
    assert data.COCO_CATEGORIES == [{"id": c["id"], "name": c["name"]} for c in official]
    assert data.NUM_CLASSES == len(data.COCO_CATEGORIES) == 80
    assert len(synthetic.COCO_IMAGE_COUNTS) == 80


def test_cache_rows_drops_bad_ids_keeps_order():
    """features.cache_rows: the cache rows of the wanted ids in the order asked, bad images left out
    (kept marks the others), an id neither in the cache nor bad -> DataError naming it."""
    ids = np.array([30, 10, 20, 40])  # a cache stored out of id order
    meta = {"bad_images": json.dumps([50, 60])}
    assert features.bad_ids(meta) == {50, 60} and features.bad_ids({}) == set()
    rows, kept = features.cache_rows(ids, [40, 50, 10, 30, 60], meta)
    assert kept.tolist() == [True, False, True, True, False]
    assert rows.tolist() == [3, 1, 0] and ids[rows].tolist() == [40, 10, 30]
    rows, kept = features.cache_rows(ids, [], meta)
    assert rows.tolist() == [] and kept.tolist() == []
    with pytest.raises(data.DataError, match=r"1 of 2 image ids .*\[70\]"):
        features.cache_rows(ids, [10, 70], meta)
    with pytest.raises(data.DataError, match=r"\[50\]"):  # bad only when the metadata says so
        features.cache_rows(ids, [50], {})


def test_read_json_names_file_and_fix(tmp_path):
    p = tmp_path / "x.json"
    data.save_json(p, {"a": [1]})
    assert data.read_json(p) == {"a": [1]}
    p.write_text("{")
    for path in (p, tmp_path / "missing.json"):
        with pytest.raises(data.DataError) as e:
            data.read_json(path, "the thing", "make it again")
        msg = str(e.value)
        assert msg.startswith(f"{path}: cannot read the thing (") and msg.endswith("make it again")
        assert "\n" not in msg

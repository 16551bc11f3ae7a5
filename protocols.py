"""Evaluation protocols: which images of load_coco's pool are dev, test and (for retrieval)
database, and the splits file that records them (load_splits, check_splits).

    import data, protocols
    coco = data.load_coco("data/coco")
    rows = protocols.select(coco, "hashnet", lists="data/hashnet")  # {"dev", "test", "database"}

- karpathy_cv: dev = Karpathy train + restval + val (118,287), test = Karpathy test (5,000).
- coco2014: dev = train2014 images with >= 1 label (82,081), test = val2014 images with >= 1
  label (40,137).
- hashnet: dev = HashNet's train.txt (10,000), test = its test.txt queries (5,000), database =
  every labelled train2014 + val2014 image that is not a query (~117,218; training images
  included), as in HashNet's database.txt. The lists are thuml/HashNet's
  pytorch/data/coco/{train,test}.txt: per line an image path from the authors' machine (only the
  file name COCO_<split>2014_<id>.jpg identifies the image), then 80 label columns of 0/1 in the
  order of the category NAMES sorted alphabetically (hashnet_columns).

Every function takes the load_coco dict and returns ascending row indices into it (ids are sorted,
so the ids of those rows are ascending too). Bad input raises data.DataError(one line naming the
file and the fix).
"""

import hashlib
import json
import os
import re

import numpy as np

import data

PROTOCOLS = ("karpathy_cv", "coco2014", "hashnet")
HASHNET_LISTS = ("train.txt", "test.txt")  # dev, test (queries)
_COCO_FILE = re.compile(r"COCO_(train|val)2014_(\d{12})\.jpg")


def _rows(mask):
    return np.flatnonzero(mask).astype(np.int64)


def _folders(coco):
    """Image folder of every row ("train2014" / "val2014", Karpathy's filepath) -> str array [N]."""
    folder = np.array([os.path.basename(os.path.dirname(p)) for p in coco["paths"]])
    odd = np.flatnonzero(~np.isin(folder, ["train2014", "val2014"]))
    if len(odd):  # another dataset's loader: no 2014 folders
        raise data.DataError(
            f"{coco['paths'][odd[0]]}: image folder {folder[odd[0]]!r} is neither train2014 "
            f"nor val2014; the coco2014 and hashnet protocols need the COCO 2014 folders"
        )
    return folder


def karpathy_cv(coco):
    """dev = Karpathy train + restval + val, test = Karpathy test (every image, labelled or not)."""
    splits = np.asarray(coco["splits"])
    return {"dev": _rows(splits != "test"), "test": _rows(splits == "test")}


def coco2014(coco):
    """dev = labelled train2014 images, test = labelled val2014 images (the classification
    literature's split)."""
    folder, labelled = _folders(coco), np.asarray(coco["labels"]).any(1)
    return {
        "dev": _rows(labelled & (folder == "train2014")),
        "test": _rows(labelled & (folder == "val2014")),
    }


def hashnet_columns(categories):
    """HashNet column j -> our label index: its 80 columns are the category names in sorted() order.

    -> int64 [C], so labels[:, hashnet_columns(categories)] puts our labels in the lists' column
    order. (Checked on the 18 images that tests/fixtures/hashnet and fce_instances_val2014_100.json
    share.)
    """
    names = [c["name"] for c in categories]
    return np.array(sorted(range(len(names)), key=lambda k: names[k]), np.int64)


def read_hashnet_list(path, n_classes):
    """Parse one HashNet list -> (file names [n], line numbers [n], labels uint8 [n, n_classes] in
    list order).

    Blank lines are skipped; no image line at all, a wrong column count, a label other than 0/1, a
    path whose file name is not COCO_<train|val>2014_<12 digits>.jpg, or a file name listed twice
    raise DataError naming the line.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(
            f"{path}: cannot read the HashNet list ({type(e).__name__}); pass --lists with "
            f"HashNet's train.txt and test.txt"
        ) from None
    names, line_no, cols, seen = [], [], [], {}
    for i, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}: line {i}"
        labels = "".join(parts[1:])  # one character per column when well-formed
        if len(parts) != 1 + n_classes:
            raise data.DataError(
                f"{where} has {len(parts) - 1} label columns, expected {n_classes}; expected "
                f"HashNet's format '<path> <{n_classes} columns of 0/1>'"
            )
        if len(labels) != n_classes or labels.strip("01"):
            bad = next(t for t in parts[1:] if t not in ("0", "1"))
            raise data.DataError(f"{where} has label {bad!r}; every label column must be 0 or 1")
        # the authors' folders mean nothing here
        name = parts[0].replace("\\", "/").rsplit("/", 1)[-1]
        if not _COCO_FILE.fullmatch(name):
            raise data.DataError(
                f"{where}: file name {name!r} is not COCO_<train|val>2014_<12-digit id>.jpg"
            )
        if name in seen:
            raise data.DataError(
                f"{where}: {name} is listed twice (first on line {seen[name]}); remove the "
                f"duplicate"
            )
        seen[name] = i
        names.append(name)
        line_no.append(i)
        cols.append(labels)
    if not names:
        raise data.DataError(
            f"{path}: no image lines; expected HashNet's list '<path> <{n_classes} columns of 0/1>'"
        )
    y = np.frombuffer("".join(cols).encode(), np.uint8).reshape(len(cols), n_classes) - ord("0")
    return names, np.array(line_no, np.int64), y.astype(np.uint8)


def _match_hashnet_list(coco, path, order, row_of):
    """Read one list, find its images in coco by file name, check its labels -> int64 [n] row
    indices."""
    names, line_no, y = read_hashnet_list(path, len(order))
    rows = np.array([row_of.get(n, -1) for n in names], np.int64)
    if (rows < 0).any():
        j = int(np.argmax(rows < 0))
        root = (
            os.path.dirname(os.path.dirname(coco["paths"][0]))
            if len(coco["paths"])
            else "the data root"
        )
        raise data.DataError(
            f"{path}: line {line_no[j]}: {names[j]} is not an image of {root} "
            f"({int((rows < 0).sum())} of {len(rows)} listed images are missing); use the COCO "
            f"2014 data root these lists were made from"
        )
    ours = np.asarray(coco["labels"])[rows][:, order]  # (n, C) in list order
    bad = np.flatnonzero((ours != y).any(1))
    if len(bad):
        j = int(bad[0])
        cats = [coco["categories"][k]["name"] for k in order]
        only_list = [cats[c] for c in np.flatnonzero(y[j] > ours[j])]
        only_ours = [cats[c] for c in np.flatnonzero(ours[j] > y[j])]
        raise data.DataError(
            f"{path}: line {line_no[j]}: labels of {names[j]} disagree with the COCO "
            f"annotations (list only: {only_list}, annotations only: {only_ours}; "
            f"{len(bad)} of {len(rows)} lines differ); use HashNet's lists, whose columns "
            f"are the category names in alphabetical order"
        )
    return rows


def hashnet(coco, lists):
    """dev = lists/train.txt, test = lists/test.txt (queries), database = labelled 2014 images minus
    queries."""
    if not os.path.isdir(lists):
        raise data.DataError(
            f"{lists}: --lists folder not found; pass the folder with HashNet's train.txt "
            f"and test.txt (thuml/HashNet pytorch/data/coco)"
        )
    paths = [os.path.join(lists, f) for f in HASHNET_LISTS]
    for p in paths:
        if not os.path.isfile(p):
            raise data.DataError(f"{p}: not found; --lists needs HashNet's train.txt and test.txt")
    folder = _folders(coco)
    row_of = {os.path.basename(p): r for r, p in enumerate(coco["paths"])}
    order = hashnet_columns(coco["categories"])
    dev, test = (_match_hashnet_list(coco, p, order, row_of) for p in paths)
    both = np.intersect1d(dev, test)
    if len(both):
        name = os.path.basename(coco["paths"][both[0]])
        raise data.DataError(
            f"{paths[1]}: {len(both)} query image(s) are also in {paths[0]} (e.g. {name}); "
            f"the training and query lists must be disjoint"
        )
    is_query = np.zeros(len(folder), bool)
    is_query[test] = True
    database = np.asarray(coco["labels"]).any(1) & ~is_query  # folders checked: all 2014 images
    return {"dev": np.sort(dev), "test": np.sort(test), "database": _rows(database)}


def select(coco, protocol, lists=None):
    """Rows of each part of `protocol` -> {"dev", "test"[, "database"]}: ascending int64 row
    indices."""
    if protocol == "karpathy_cv":
        return karpathy_cv(coco)
    if protocol == "coco2014":
        return coco2014(coco)
    if protocol == "hashnet":
        if lists is None:
            raise data.DataError(
                "--protocol hashnet needs --lists DIR with HashNet's train.txt and test.txt"
            )
        return hashnet(coco, lists)
    raise data.DataError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


# -------------------------------------------------------- the splits file (make_splits.py's output)

_SPLIT_KEYS = ("method", "folds", "seed", "categories", "dev", "test", "val_folds", "stats")


def fold_ids(splits, k):
    """Fold k of a splits dict -> (train ids, validation ids), sorted int64: it trains on the dev
    pool minus val_folds[k]."""
    val = np.asarray(sorted(splits["val_folds"][k]), dtype=np.int64)
    return np.setdiff1d(np.asarray(splits["dev"], dtype=np.int64), val), val


def splits_sha256(path):
    """The splits file's identity (config.json splits_sha256): sha256 of its bytes."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise data.DataError(
            f"{path}: cannot read the splits file ({type(e).__name__}); run make_splits.py first"
        ) from None


def load_splits(path):
    """Load and validate splits.json (make_splits.py) -> dict as written (lists of int ids).

    Checks: every key present; categories a list of {id, name}; protocol one of PROTOCOLS (absent:
    the original karpathy_cv); dev, test and the optional retrieval database duplicate-free, test
    disjoint from dev and database; len(val_folds) == folds >= 2; the val folds partition dev
    exactly.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: splits file not found; run make_splits.py first")
    s = data.read_json(path, "the splits file", "re-run make_splits.py")
    missing = [k for k in _SPLIT_KEYS if not isinstance(s, dict) or k not in s]
    if missing:
        raise data.DataError(f"{path}: missing keys {missing}; re-run make_splits.py")
    s.setdefault("protocol", "karpathy_cv")
    if s["protocol"] not in PROTOCOLS:
        raise data.DataError(
            f"{path}: protocol {s['protocol']!r} is not one of {PROTOCOLS}; re-run make_splits.py"
        )
    if not (
        isinstance(s["categories"], list)
        and all(isinstance(c, dict) and "name" in c for c in s["categories"])
    ):
        raise data.DataError(
            f"{path}: categories must be a list of {{id, name}}; re-run make_splits.py"
        )
    dev, test, folds, db = s["dev"], s["test"], s["val_folds"], s.get("database", [])
    if any(len(set(x)) != len(x) for x in (dev, test, db)):
        raise data.DataError(
            f"{path}: duplicate image ids in dev, test or database; re-run make_splits.py"
        )
    overlap = set(test) & (set(dev) | set(db))
    if overlap:
        raise data.DataError(
            f"{path}: {len(overlap)} test image ids are also in dev or the database "
            f"(e.g. {sorted(overlap)[:5]}); re-run make_splits.py"
        )
    if not isinstance(s["folds"], int) or s["folds"] < 2 or len(folds) != s["folds"]:
        raise data.DataError(
            f"{path}: folds={s['folds']!r} but {len(folds)} val_folds; re-run make_splits.py"
        )
    if sum(len(f) for f in folds) != len(dev) or set().union(*map(set, folds)) != set(dev):
        raise data.DataError(
            f"{path}: val_folds do not partition dev exactly; re-run make_splits.py"
        )
    return s


def check_splits(splits, ids, meta, where="feature cache"):
    """Raise data.DataError unless the splits file fits the feature cache: every dev / test /
    database id is among the cache's `ids` and both name the same categories in the same order (when
    the cache names them)."""
    cats = json.loads(meta.get("categories") or "null")
    if cats is not None and [c["name"] for c in cats] != [c["name"] for c in splits["categories"]]:
        raise data.DataError(
            f"{where}: its {len(cats)} categories are not the {len(splits['categories'])} of the "
            f"splits file (names or order differ); make both from the same data_root"
        )
    have = set(np.asarray(ids).tolist())
    want = set(splits["dev"]) | set(splits["test"]) | set(splits.get("database", []))
    missing = sorted(want - have)
    if missing:
        raise data.DataError(
            f"{where}: {len(missing)} of {len(want)} split image ids are missing (e.g. "
            f"{missing[:5]}); the splits and the {where} come from different data - re-run "
            f"extract_features.py on the same data_root as make_splits.py"
        )

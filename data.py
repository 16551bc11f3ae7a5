"""Data: the dataset loaders (COCO 2014 + Karpathy split, a JSONL manifest) and atomic writes.

Importable module, no CLI (the feature cache is features.py). Typical use:

    import data
    coco = data.load_coco("data/coco")       # ids, paths, splits, labels [N,80], captions, ...
    ds = data.load_dataset("mine.jsonl")     # the same dict from a manifest (or a COCO folder)
    data.save_json("out/metrics.json", obj)  # atomic: readers never see a half-written file

Every error caused by bad input is raised as DataError(one line naming the file and the fix);
scripts catch it and exit with code 2.
"""

import hashlib
import json
import os

import numpy as np

NUM_CLASSES = 80  # COCO's; nothing after the feature cache assumes it

# the official 80 COCO categories (instances_*.json "categories"), sorted by id -> label index 0..79
COCO_CATEGORIES = [
    {"id": i, "name": n}
    for i, n in zip(
        [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)],
        (
            "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,"
            "fire hydrant,stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,"
            "zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,"
            "sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,"
            "bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,"
            "carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,"
            "laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,"
            "clock,vase,scissors,teddy bear,hair drier,toothbrush"
        ).split(","),
    )
]


class DataError(Exception):
    """Bad input data: the message is one line naming the file and what to do."""


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename tmp_path onto path, so readers never see a half-written
    file.

    The temporary name keeps the extension (x.tmp<pid>.npz), so np.savez / torch.save / PIL work
    unchanged.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_text(path, content):
    """Atomically write a string, or CSV rows (a list of lists, header first)."""
    import csv

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(content) if isinstance(content, str) else csv.writer(f).writerows(content)

    atomic_write(path, write)


def save_json(path, obj):
    """Atomically write obj as JSON (indent=2, trailing newline)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def file_fingerprint(paths):
    """Short sha256 over (name, size, mtime_ns) of each file: changes whenever a source file is
    replaced."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise DataError(f"{p}: file not found; check --data_root") from None
        h.update(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------- COCO 2014 + Karpathy split

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_INDEX_VERSION = 1


def coco_files(data_root):
    """The three source files under data_root: Karpathy json, train and val instances."""
    return [
        os.path.join(data_root, "dataset_coco.json"),
        os.path.join(data_root, "annotations", "instances_train2014.json"),
        os.path.join(data_root, "annotations", "instances_val2014.json"),
    ]


def read_json(path, what="JSON", fix="re-run the script that wrote it"):
    """The one JSON reader: path -> its object; a DataError naming the file, the cause and `fix`
    when the file is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        cause = f"{type(e).__name__}: {str(e)[:80]}"
        raise DataError(f"{path}: cannot read {what} ({cause}); {fix}") from None


def _karpathy_records(path):
    """-> list of (cocoid, split, rel_path, captions) from Karpathy's dataset_coco.json,
    validated."""
    d = read_json(path, "the Karpathy split json", "re-download it")
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise DataError(f"{path}: no 'images' list; expected Karpathy's dataset_coco.json")
    out = []
    for i, r in enumerate(d["images"]):
        miss = [
            k
            for k in ("filepath", "filename", "split", "sentences", "cocoid")
            if not isinstance(r, dict) or k not in r
        ]
        if miss:
            raise DataError(
                f"{path}: images[{i}] lacks {miss}; expected Karpathy's dataset_coco.json "
                f"(images[].filepath/filename/split/sentences[].raw/cocoid)"
            )
        if r["split"] not in KARPATHY_SPLITS:
            raise DataError(
                f"{path}: images[{i}] has split {r['split']!r}, expected one of {KARPATHY_SPLITS}"
            )
        try:
            caps = [" ".join(str(s["raw"]).split()) for s in r["sentences"]]  # spaces, newlines
        except (KeyError, TypeError):
            raise DataError(
                f"{path}: images[{i}].sentences lack 'raw'; expected Karpathy's dataset_coco.json"
            )
        out.append(
            (
                int(r["cocoid"]),
                r["split"],
                os.path.join(r["filepath"], r["filename"]),
                [c for c in caps if c],
            )
        )
    ids = [o[0] for o in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate cocoid entries; expected Karpathy's dataset_coco.json")
    return out


def _instances(path):
    """-> (set of image ids, int64 [A] image ids, int64 [A] category ids) of all annotations, crowd
    included."""
    import contextlib
    import io
    from pycocotools.coco import COCO

    d = read_json(path, "the instances annotation file", "re-download it")
    if not isinstance(d, dict) or not all(
        isinstance(d.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"{path}: needs 'images', 'annotations' and 'categories' lists; use the official "
            f"COCO 2014 instances file"
        )
    cats = sorted((c.get("id"), c.get("name")) for c in d["categories"] if isinstance(c, dict))
    if cats != [(c["id"], c["name"]) for c in COCO_CATEGORIES]:
        raise DataError(
            f"{path}: categories are not the 80 COCO categories ({len(cats)} given); use the "
            f"official COCO 2014 instances file"
        )
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints
        coco.createIndex()
    anns = coco.loadAnns(coco.getAnnIds())  # iscrowd=None: all
    img = np.fromiter((a["image_id"] for a in anns), np.int64, len(anns))
    cat = np.fromiter((a["category_id"] for a in anns), np.int64, len(anns))
    return set(coco.getImgIds()), img, cat


def _build_coco_index(data_root):
    kp, tr, va = coco_files(data_root)
    recs = sorted(_karpathy_records(kp))  # ids ascending
    ids = np.array([r[0] for r in recs], np.int64)
    labels = np.zeros((len(ids), NUM_CLASSES), np.uint8)
    cat_index = np.full(max(c["id"] for c in COCO_CATEGORIES) + 1, -1, np.int64)
    cat_index[[c["id"] for c in COCO_CATEGORIES]] = np.arange(NUM_CLASSES)
    known = set()
    for path in (tr, va):
        img_ids, img, cat = _instances(path)
        known |= img_ids
        if len(cat) and (
            cat.min() < 0 or cat.max() >= len(cat_index) or (cat_index[cat] < 0).any()
        ):
            raise DataError(
                f"{path}: annotations with category ids outside the 80 COCO categories; use the "
                f"official COCO 2014 instances file"
            )
        row = np.searchsorted(ids, img)
        # the images in the Karpathy json
        keep = (row < len(ids)) & (ids[np.minimum(row, len(ids) - 1)] == img)
        labels[row[keep], cat_index[cat[keep]]] = 1
    absent = [i for i in ids.tolist() if i not in known]
    if absent:
        raise DataError(
            f"{kp}: {len(absent)} image(s) have no entry in {os.path.basename(tr)} or "
            f"{os.path.basename(va)} (e.g. cocoid {absent[0]}); use the COCO 2014 annotations "
            f"that match this Karpathy split"
        )
    return {
        "ids": ids,
        "rel_paths": [r[2] for r in recs],
        "splits": [r[1] for r in recs],
        "labels": labels,
        "captions": [r[3] for r in recs],
    }


def _read_index(npz, js, fp):
    """load_coco's cached index (npz: ids, labels; js: the rest) if it is of these source files
    (fingerprint fp) and this index version, else None."""
    try:
        meta = read_json(js, "the COCO index cache")
        if meta.get("fingerprint") == fp and meta.get("version") == _INDEX_VERSION:
            with np.load(npz) as z:
                idx = {
                    "ids": z["ids"],
                    "labels": z["labels"],
                    **{k: meta[k] for k in ("rel_paths", "splits", "captions")},
                }
            if not (
                len(idx["ids"])
                == len(idx["labels"])
                == len(idx["rel_paths"])
                == len(idx["captions"])
            ):
                return None
            return idx
    except (DataError, OSError, ValueError, KeyError, AttributeError):
        return None  # no / stale / broken cache
    return None


def _write_index(npz, js, fp, idx):
    """Cache load_coco's index beside the data; read-only data: no cache."""
    # labels first, then the json carrying the fingerprint: a half-updated cache reads as stale
    try:
        atomic_write(npz, lambda tmp: np.savez(tmp, ids=idx["ids"], labels=idx["labels"]))
        meta = {
            "version": _INDEX_VERSION,
            "fingerprint": fp,
            "rel_paths": idx["rel_paths"],
            "splits": idx["splits"],
            "captions": idx["captions"],
        }

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f)  # compact: ~40 MB on real COCO

        atomic_write(js, write)
    except OSError:
        pass  # read-only data: no cache


def load_coco(data_root):
    """Load the COCO 2014 Karpathy-split pool -> dict (see DESIGN.md), rows sorted by COCO id.

    ids int64 [N], paths list[str] (data_root/filepath/filename), splits list[str], labels uint8
    [N, 80] (category present in any annotation, crowd included; no annotation -> zero row),
    captions list[list[str]] (whitespace-normalised, in order), categories (80 {id, name} by id),
    fingerprint str. The parsed index is cached in data_root/.coco_index.{npz,json}, rebuilt when a
    source file changes.
    """
    data_root = os.fspath(data_root)
    if not os.path.isdir(data_root):
        raise DataError(
            f"{data_root}: data_root not found; pass --data_root pointing at the folder with "
            f"dataset_coco.json, annotations/, train2014/ and val2014/"
        )
    for p in coco_files(data_root):
        if not os.path.isfile(p):
            raise DataError(
                f"{p}: not found; put the COCO 2014 annotations and Karpathy's dataset_coco.json "
                f"under {data_root}"
            )
    fp = file_fingerprint(coco_files(data_root))
    npz, js = (
        os.path.join(data_root, ".coco_index.npz"),
        os.path.join(data_root, ".coco_index.json"),
    )
    idx = _read_index(npz, js, fp)
    if idx is None:
        idx = _build_coco_index(data_root)
        _write_index(npz, js, fp, idx)
    return {
        "ids": idx["ids"],
        "paths": [os.path.join(data_root, p) for p in idx["rel_paths"]],
        "splits": list(idx["splits"]),
        "labels": idx["labels"],
        "captions": idx["captions"],
        "categories": [dict(c) for c in COCO_CATEGORIES],
        "fingerprint": fp,
    }


MANIFEST_SPLITS = ("train", "test")


def _manifest_classes(path, n, value):
    """A manifest's header record {"classes": [names]} -> the list, checked (line n)."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise DataError(f'{path}: line {n}: "classes" must be a non-empty list of class names')
    if len(set(value)) != len(value):
        raise DataError(f'{path}: line {n}: "classes" names a class twice')
    return list(value)


def _manifest_record(path, n, r, known):
    """Line n's object -> (id, split, image, texts, labels), its split checked, and its labels
    against `known` (a set of class names; None: any)."""
    try:
        rec = (
            int(r.get("id", n)),
            r.get("split", "train"),
            str(r["image"]),
            [" ".join(str(t).split()) for t in r.get("texts", [])],
            [str(x) for x in r["labels"]],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: line {n} is not a manifest record ({type(e).__name__}: {e}); "
            f'each line needs "image" and "labels"'
        ) from None
    if rec[1] not in MANIFEST_SPLITS:  # a misspelt test image must not join the training pool
        raise DataError(
            f'{path}: line {n} has "split": {rec[1]!r}; use "train" or "test" (or leave it out: '
            f'"train")'
        )
    unknown = [x for x in rec[4] if known is not None and x not in known]
    if unknown:
        raise DataError(
            f"{path}: line {n} has label {unknown[0]!r}, not in the manifest's class list; "
            f'fix the label or add it to "classes"'
        )
    return rec


def load_jsonl(path, classes=None):
    """A generic dataset from a JSON-lines manifest -> the same dict as load_coco (rows sorted by
    id).

    One JSON object per line: {"image": path (relative to the manifest's folder), "labels": [class
    names], "texts": [captions] (optional; none is fine), "split": "train" | "test" (optional,
    default "train"; any other value is refused), "id": int (optional, default the line number)}.
    The classes: a first line {"classes": [names]} (or `classes`) fixes them and their order (ids
    1..C) and refuses any other label; without one, every label name that occurs, sorted. This is
    the second loader: another dataset plugs in by writing one such function.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: manifest not found; pass --data_root pointing at a .jsonl manifest"
        )
    recs, first = [], True
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{path}: line {n} is not JSON ({e}); each line needs one JSON object"
                ) from None
            if first and isinstance(r, dict) and "classes" in r and "image" not in r:
                given = _manifest_classes(path, n, r["classes"])
                if classes is not None and given != list(classes):
                    raise DataError(f"{path}: line {n}: its class list differs from the one given")
                classes = given
            else:
                known = None if classes is None else set(classes)
                recs.append(_manifest_record(path, n, r, known))
            first = False
    recs.sort()
    ids = np.array([r[0] for r in recs], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f'{path}: duplicate image ids; give every line a unique "id"')
    names = list(classes) if classes is not None else sorted({x for r in recs for x in r[4]})
    col = {name: j for j, name in enumerate(names)}
    labels = np.zeros((len(recs), len(names)), np.uint8)
    for i, r in enumerate(recs):
        labels[i, [col[x] for x in r[4]]] = 1
    root = os.path.dirname(os.path.abspath(path))
    return {
        "ids": ids,
        "paths": [os.path.join(root, r[2]) for r in recs],
        "splits": [r[1] for r in recs],
        "labels": labels,
        "captions": [[t for t in r[3] if t] for r in recs],
        "categories": [{"id": j + 1, "name": name} for j, name in enumerate(names)],
        "fingerprint": file_fingerprint([path]),
    }


def load_dataset(data_root):
    """The loader for data_root: a .jsonl manifest (load_jsonl), else a COCO 2014 folder
    (load_coco)."""
    return (
        load_jsonl(data_root) if os.fspath(data_root).endswith(".jsonl") else load_coco(data_root)
    )

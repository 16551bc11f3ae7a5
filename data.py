"""Data: the COCO loader (Karpathy split + 2014 instances), feature cache I/O, splits I/O, atomic writes.

Importable module, no CLI. Typical use:

    import data
    coco = data.load_coco("data/coco")            # ids, paths, splits, labels [N,80], captions, categories
    data.save_features("f.safetensors", tensors, meta)
    tensors, meta = data.load_features("f.safetensors")
    parts = data.load_embeddings("f.safetensors", [rows_a, rows_b])   # image / text at given rows only, chunked

Every error caused by bad input is raised as DataError(one line naming the file and the fix);
scripts catch it and exit with code 2.
"""
import hashlib
import json
import math
import os

import numpy as np

NUM_CLASSES = 80  # COCO's; nothing after the feature cache assumes it
FEATURES_FORMAT = "coco-siglip-features-v1"

# the official 80 COCO categories (instances_*.json "categories"), sorted by id -> label index 0..79
COCO_CATEGORIES = [{"id": i, "name": n} for i, n in zip(
    [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)],
    ('person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,'
     'parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,'
     'handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,'
     'surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,'
     'broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,'
     'mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,'
     'teddy bear,hair drier,toothbrush').split(","))]

class DataError(Exception):
    """Bad input data: the message is one line naming the file and what to do."""


# ----------------------------------------------------------------------------- atomic writes

def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename tmp_path onto path, so readers never see a half-written file.

    The temporary name keeps the extension (x.tmp<pid>.npz), so np.savez / torch.save / PIL work unchanged.
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
    """Short sha256 over (name, size, mtime_ns) of each file: changes whenever a source file is replaced."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise DataError(f"{p}: file not found; check --data_root") from None
        h.update(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- COCO 2014 + Karpathy split

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_INDEX_VERSION = 1


def coco_files(data_root):
    """The three source files under data_root: Karpathy json, train and val instances."""
    return [os.path.join(data_root, "dataset_coco.json"),
            os.path.join(data_root, "annotations", "instances_train2014.json"),
            os.path.join(data_root, "annotations", "instances_val2014.json")]


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:80]}); "
                        f"re-download it") from None


def _karpathy_records(path):
    """-> list of (cocoid, split, rel_path, captions) from Karpathy's dataset_coco.json, validated."""
    d = _read_json(path, "the Karpathy split json")
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise DataError(f"{path}: no 'images' list; expected Karpathy's dataset_coco.json")
    out = []
    for i, r in enumerate(d["images"]):
        miss = [k for k in ("filepath", "filename", "split", "sentences", "cocoid")
                if not isinstance(r, dict) or k not in r]
        if miss:
            raise DataError(f"{path}: images[{i}] lacks {miss}; expected Karpathy's dataset_coco.json "
                            f"(images[].filepath/filename/split/sentences[].raw/cocoid)")
        if r["split"] not in KARPATHY_SPLITS:
            raise DataError(f"{path}: images[{i}] has split {r['split']!r}, expected one of {KARPATHY_SPLITS}")
        try:
            caps = [" ".join(str(s["raw"]).split()) for s in r["sentences"]]  # collapse spaces, newlines
        except (KeyError, TypeError):
            raise DataError(f"{path}: images[{i}].sentences lack 'raw'; expected Karpathy's dataset_coco.json")
        out.append((int(r["cocoid"]), r["split"], os.path.join(r["filepath"], r["filename"]),
                    [c for c in caps if c]))
    ids = [o[0] for o in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate cocoid entries; expected Karpathy's dataset_coco.json")
    return out


def _instances(path):
    """-> (set of image ids, int64 [A] image ids, int64 [A] category ids) of all annotations, crowd included."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    d = _read_json(path, "the instances annotation file")
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("images", "annotations",
                                                                               "categories")):
        raise DataError(f"{path}: needs 'images', 'annotations' and 'categories' lists; use the official "
                        f"COCO 2014 instances file")
    cats = sorted((c.get("id"), c.get("name")) for c in d["categories"] if isinstance(c, dict))
    if cats != [(c["id"], c["name"]) for c in COCO_CATEGORIES]:
        raise DataError(f"{path}: categories are not the 80 COCO categories ({len(cats)} given); use the "
                        f"official COCO 2014 instances file")
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):                              # pycocotools prints
        coco.createIndex()
    anns = coco.loadAnns(coco.getAnnIds())                                       # iscrowd=None: all
    img = np.fromiter((a["image_id"] for a in anns), np.int64, len(anns))
    cat = np.fromiter((a["category_id"] for a in anns), np.int64, len(anns))
    return set(coco.getImgIds()), img, cat


def _build_coco_index(data_root):
    kp, tr, va = coco_files(data_root)
    recs = sorted(_karpathy_records(kp))                                         # ids ascending
    ids = np.array([r[0] for r in recs], np.int64)
    labels = np.zeros((len(ids), NUM_CLASSES), np.uint8)
    cat_index = np.full(max(c["id"] for c in COCO_CATEGORIES) + 1, -1, np.int64)
    cat_index[[c["id"] for c in COCO_CATEGORIES]] = np.arange(NUM_CLASSES)
    known = set()
    for path in (tr, va):
        img_ids, img, cat = _instances(path)
        known |= img_ids
        if len(cat) and (cat.min() < 0 or cat.max() >= len(cat_index) or (cat_index[cat] < 0).any()):
            raise DataError(f"{path}: annotations with category ids outside the 80 COCO categories; use the "
                            f"official COCO 2014 instances file")
        row = np.searchsorted(ids, img)
        keep = (row < len(ids)) & (ids[np.minimum(row, len(ids) - 1)] == img)      # images in the Karpathy json
        labels[row[keep], cat_index[cat[keep]]] = 1
    absent = [i for i in ids.tolist() if i not in known]
    if absent:
        raise DataError(f"{kp}: {len(absent)} image(s) have no entry in {os.path.basename(tr)} or "
                        f"{os.path.basename(va)} (e.g. cocoid {absent[0]}); use the COCO 2014 annotations "
                        f"that match this Karpathy split")
    return {"ids": ids, "rel_paths": [r[2] for r in recs], "splits": [r[1] for r in recs],
            "labels": labels, "captions": [r[3] for r in recs]}


def load_coco(data_root):
    """Load the COCO 2014 Karpathy-split pool -> dict (see DESIGN.md), rows sorted by COCO id.

    ids int64 [N], paths list[str] (data_root/filepath/filename), splits list[str], labels uint8 [N, 80]
    (category present in any annotation, crowd included; no annotation -> zero row), captions
    list[list[str]] (whitespace-normalised, in order), categories (80 {id, name} by id), fingerprint str.
    The parsed index is cached in data_root/.coco_index.{npz,json}, rebuilt when a source file changes.
    """
    data_root = os.fspath(data_root)
    if not os.path.isdir(data_root):
        raise DataError(f"{data_root}: data_root not found; pass --data_root pointing at the folder with "
                        f"dataset_coco.json, annotations/, train2014/ and val2014/")
    for p in coco_files(data_root):
        if not os.path.isfile(p):
            raise DataError(f"{p}: not found; put the COCO 2014 annotations and Karpathy's dataset_coco.json "
                            f"under {data_root}")
    fp = file_fingerprint(coco_files(data_root))
    npz, js = os.path.join(data_root, ".coco_index.npz"), os.path.join(data_root, ".coco_index.json")
    idx = None
    try:
        with open(js) as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fp and meta.get("version") == _INDEX_VERSION:
            with np.load(npz) as z:
                idx = {"ids": z["ids"], "labels": z["labels"], **{k: meta[k] for k in
                                                                   ("rel_paths", "splits", "captions")}}
            if not (len(idx["ids"]) == len(idx["labels"]) == len(idx["rel_paths"]) == len(idx["captions"])):
                idx = None
    except (OSError, ValueError, KeyError):
        idx = None                                                               # no / stale / broken cache
    if idx is None:
        idx = _build_coco_index(data_root)
        try:  # labels first, then the json carrying the fingerprint, so a half-updated cache reads as stale
            atomic_write(npz, lambda tmp: np.savez(tmp, ids=idx["ids"], labels=idx["labels"]))
            meta = {"version": _INDEX_VERSION, "fingerprint": fp, "rel_paths": idx["rel_paths"],
                    "splits": idx["splits"], "captions": idx["captions"]}
            def write(tmp):
                with open(tmp, "w") as f:
                    json.dump(meta, f)                                       # compact: ~40 MB on real COCO
            atomic_write(js, write)
        except OSError:
            pass                                                                 # read-only data: no cache
    return {"ids": idx["ids"], "paths": [os.path.join(data_root, p) for p in idx["rel_paths"]],
            "splits": list(idx["splits"]), "labels": idx["labels"], "captions": idx["captions"],
            "categories": [dict(c) for c in COCO_CATEGORIES], "fingerprint": fp}


def load_jsonl(path):
    """A generic dataset from a JSON-lines manifest -> the same dict as load_coco (rows sorted by id).

    One JSON object per line: {"image": path (relative to the manifest's folder), "labels": [class names],
    "texts": [captions] (optional; none is fine), "split": "train" | "test" (optional, default "train"),
    "id": int (optional, default the line number)}. The classes are every label name that occurs, sorted,
    with ids 1..C. This is the second loader: another dataset plugs in by writing one such function.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: manifest not found; pass --data_root pointing at a .jsonl manifest")
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                recs.append((int(r.get("id", n)), str(r.get("split", "train")), str(r["image"]),
                             [" ".join(str(t).split()) for t in r.get("texts", [])], [str(x) for x in r["labels"]]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {n} is not a manifest record ({type(e).__name__}: {e}); each line "
                                f"needs \"image\" and \"labels\"") from None
    recs.sort()
    ids = np.array([r[0] for r in recs], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: duplicate image ids; give every line a unique \"id\"")
    names = sorted({x for r in recs for x in r[4]})
    col = {name: j for j, name in enumerate(names)}
    labels = np.zeros((len(recs), len(names)), np.uint8)
    for i, r in enumerate(recs):
        labels[i, [col[x] for x in r[4]]] = 1
    root = os.path.dirname(os.path.abspath(path))
    return {"ids": ids, "paths": [os.path.join(root, r[2]) for r in recs], "splits": [r[1] for r in recs],
            "labels": labels, "captions": [[t for t in r[3] if t] for r in recs],
            "categories": [{"id": j + 1, "name": name} for j, name in enumerate(names)],
            "fingerprint": file_fingerprint([path])}


def load_dataset(data_root):
    """The loader for data_root: a .jsonl manifest (load_jsonl), else a COCO 2014 folder (load_coco)."""
    return load_jsonl(data_root) if os.fspath(data_root).endswith(".jsonl") else load_coco(data_root)


# ----------------------------------------------------------------------------- feature cache

# name -> (dtype, rank); N must agree across all, D across image/text/prompts
_FEATURE_SPECS = {"ids": ("int64", 1), "image": ("float16", 3), "text": ("float16", 3),
                  "n_captions": ("int64", 1), "labels": ("uint8", 2)}
EMBEDDINGS = ("image", "text")  # the large tensors, read chunk by chunk (load_embeddings); the others are small
_CHUNK_BYTES = 16 * 2 ** 20  # of one embedding tensor per read: ~2,200 rows of 5 x 768 float16
_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' codes


def save_features(path, tensors, meta):
    """Atomically write a feature cache (.safetensors); meta values are stored as str (dicts/lists as JSON).

    tensors: name -> np.ndarray or torch.Tensor (a non-array "meta" entry, as in make_planted_features'
    output, is skipped). meta gets "format" = FEATURES_FORMAT unless given.
    """
    import torch
    from safetensors.torch import save_file
    out = {}
    for k, v in tensors.items():
        if k == "meta" and isinstance(v, dict):
            continue
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()
        out[k] = t.contiguous()
    md = {"format": FEATURES_FORMAT}
    md.update({k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
               for k, v in meta.items()})
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=md))


def _check_index(path, specs, tensors, meta):
    """load_features' checks that need no embedding read: dtypes and ranks (from the header), consistent N / D / C,
    n_captions in range, unique ids, finite prompts. Raises DataError (one line) on the first failure."""
    import torch
    want = dict(_FEATURE_SPECS, **({"prompts": ("float16", 2)} if "prompts" in specs else {}))
    for k, (dtype, rank) in want.items():
        if k not in specs:
            raise DataError(f"{path}: tensor '{k}' missing; re-run extract_features.py")
        if specs[k][0] != dtype or len(specs[k][1]) != rank:
            raise DataError(f"{path}: tensor '{k}' is {specs[k][0]} with shape {specs[k][1]}, expected {dtype} "
                            f"of rank {rank}; re-run extract_features.py")
    shape = {k: s[1] for k, s in specs.items()}
    (n, c), (t, d) = shape["labels"], shape["text"][1:]
    cats = json.loads(meta.get("categories") or "null")
    if not (all(shape[k][0] == n for k in ("ids", "image", "text", "n_captions")) and shape["image"][2] == d
            and (cats is None or len(cats) == c) and shape.get("prompts", (c, d)) == (c, d)):
        raise DataError(f"{path}: inconsistent tensor shapes ({', '.join(f'{k} {v}' for k, v in shape.items())}; "
                        f"{len(cats or [])} categories in the metadata); re-run extract_features.py")
    if torch.unique(tensors["ids"]).numel() != n:
        raise DataError(f"{path}: duplicate image ids; re-run extract_features.py")
    nc = tensors["n_captions"]
    if n and (int(nc.min()) < 0 or int(nc.max()) > t):
        raise DataError(f"{path}: n_captions outside 0..{t}; re-run extract_features.py")
    if "prompts" in tensors and not torch.isfinite(tensors["prompts"]).all():
        raise DataError(f"{path}: NaN/Inf in the class prompt embeddings; re-run extract_features.py")


def _read_index(path):
    """Open and check a feature cache without reading its embeddings -> (every tensor but image / text, meta,
    specs: name -> (dtype name, shape, byte offset in the file)). safetensors checks the header against the file
    (a truncated or foreign file is a DataError); the small tensors are copies, so no view keeps the file mapped."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: feature cache not found; run extract_features.py first")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FEATURES_FORMAT:
                raise DataError(f"{path}: not a feature cache (format {meta.get('format')!r}, expected "
                                f"{FEATURES_FORMAT!r}); re-run extract_features.py")
            tensors = {k: f.get_tensor(k).clone() for k in f.keys() if k not in EMBEDDINGS}
        with open(path, "rb") as f:  # the byte offsets, which safe_open does not expose
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated / foreign file
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); delete it and re-run extract_features.py")
    specs = {k: (_DTYPE_NAMES.get(v["dtype"], v["dtype"]), tuple(v["shape"]), 8 + size + v["data_offsets"][0])
             for k, v in header.items() if k != "__metadata__"}
    _check_index(path, specs, tensors, meta)
    return tensors, meta, specs


def load_embeddings(path, row_sets, ids=None):
    """The image and text embeddings of a feature cache at given rows, read chunk by chunk straight into their
    outputs: the peak is the outputs plus one chunk, not the whole cache beside a copy of its rows.

    row_sets: a list of int64 row indices (any order, repeats allowed) or None (every row) -> a list of
    {"image": (n, V, D), "text": (n, T, D)} float16, one per entry. Every row of the file is checked finite on
    the way (load_features' check). ids: the cache's ids as read before (load_features(path, embeddings=False)),
    so a cache replaced in between is refused instead of read at the wrong rows.
    """
    import torch
    tensors, _, specs = _read_index(path)
    n = len(tensors["ids"])
    if ids is not None and not torch.equal(torch.as_tensor(ids), tensors["ids"]):
        raise DataError(f"{path}: the feature cache changed while it was read; run again")
    rows = [torch.arange(n) if r is None else torch.as_tensor(r, dtype=torch.int64) for r in row_sets]
    out = [{k: torch.empty((len(r), *specs[k][1][1:]), dtype=torch.float16) for k in EMBEDDINGS} for r in rows]
    bad = torch.zeros(n, dtype=torch.bool)
    with open(path, "rb") as f:  # plain reads: a memory-mapped file keeps every page read resident while mapped
        for k in EMBEDDINGS:
            (_, *row_shape), offset = specs[k][1:]
            row = 2 * math.prod(row_shape)  # bytes per row
            step = max(1, _CHUNK_BYTES // max(1, row))  # rows per chunk
            buf = torch.empty(step * row, dtype=torch.uint8)  # one chunk, reused: no page faults per chunk
            f.seek(offset)
            for s in range(0, n, step):
                c = min(step, n - s)
                if f.readinto(buf[:c * row].numpy()) != c * row:
                    raise DataError(f"{path}: the file ends early (changed while it was read?); run again")
                chunk = buf[:c * row].view(torch.float16).view(c, *row_shape)  # rows s .. s + c - 1
                # a row's float32 sum is finite iff all its float16 values are (it cannot overflow); 8x isfinite's speed
                bad[s:s + c] |= ~torch.isfinite(chunk.sum(dim=(1, 2), dtype=torch.float32))
                for r, o in zip(rows, out):
                    hit = ((r >= s) & (r < s + c)).nonzero().squeeze(1)  # the output rows this chunk holds
                    o[k].index_copy_(0, hit, chunk.index_select(0, r[hit] - s))
    if bad.any():
        bad_ids = tensors["ids"][bad].tolist()
        raise DataError(f"{path}: {len(bad_ids)} image(s) have NaN/Inf embeddings (COCO ids "
                        f"{bad_ids[:10]}{' ...' if len(bad_ids) > 10 else ''}); re-run extract_features.py")
    return out


def load_features(path, embeddings=True):
    """Load and validate a feature cache -> (tensors: dict[str, torch.Tensor], meta: dict[str, str]).

    Checks: file exists and is safetensors with format FEATURES_FORMAT; ids/image/text/n_captions/labels
    present with the right dtypes, ranks and consistent N (and D); labels [N, C] with C the number of categories
    in the metadata (any C: the cache speaks for its dataset); no NaN/Inf embedding rows. embeddings=False: every
    tensor but image / text (their dtypes and shapes checked, their rows not read; see load_embeddings).
    """
    tensors, meta, _ = _read_index(path)
    if embeddings:
        tensors.update(load_embeddings(path, [None], tensors["ids"])[0])
    return tensors, meta

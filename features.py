"""The feature cache: one .safetensors file of frozen SigLIP2 embeddings, written once by
extract_features.py.

What it holds (name: dtype [shape]): ids int64 [N] (the dataset's image ids, unique), image float16
[N, V, D] (view 0 = the plain image), text float16 [N, T, D] (up to T captions, zero rows past
n_captions), n_captions int64 [N] (0..T), labels uint8 [N, C], and optionally prompts float16 [C, D]
(the class prompts' text embeddings). Its string metadata carries "format" = FEATURES_FORMAT, the
model, the categories and bad_images (JSON) and the extraction settings
(extract_features.write_cache).

How it is validated (_read_index / _check_index, before any embedding is read): the file exists and
is safetensors with that format; every tensor has its dtype and rank; N, D and C agree across
tensors and with the metadata's categories; ids are unique; n_captions is in range; prompts are
finite. While the embeddings are read, every row is checked finite. Every failure is a one-line
data.DataError naming the file and the fix.

How it is read: load_embeddings reads image / text chunk by chunk (_CHUNK_BYTES each, plain reads at
the byte offsets from the header) straight into preallocated float16 outputs at the asked rows, so
the peak is the outputs plus one chunk; load_features(embeddings=False) returns every tensor but
those two.

    import features
    features.save_features("f.safetensors", tensors, meta)
    tensors, meta = features.load_features("f.safetensors")
    parts = features.load_embeddings("f.safetensors", [rows_a, rows_b])  # image / text at rows
    fold = features.load_fold("f.safetensors", "splits.json", 0, "cpu")  # one fold's rows
"""

import json
import math
import os

import numpy as np
import torch

import protocols
from data import DataError, atomic_write

FEATURES_FORMAT = "coco-siglip-features-v1"

# name -> (dtype, rank); N must agree across all, D across image/text/prompts
_FEATURE_SPECS = {
    "ids": ("int64", 1),
    "image": ("float16", 3),
    "text": ("float16", 3),
    "n_captions": ("int64", 1),
    "labels": ("uint8", 2),
}
# the large tensors, read chunk by chunk (load_embeddings); the others are small
EMBEDDINGS = ("image", "text")
_CHUNK_BYTES = 16 * 2**20  # of one embedding tensor per read: ~2,200 rows of 5 x 768 float16
# safetensors' dtype codes
_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


def save_features(path, tensors, meta):
    """Atomically write a feature cache (.safetensors); meta values are stored as str (dicts/lists
    as JSON).

    tensors: name -> np.ndarray or torch.Tensor (a non-array "meta" entry, as in
    make_planted_features' output, is skipped). meta gets "format" = FEATURES_FORMAT unless given.
    """
    import torch
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        if k == "meta" and isinstance(v, dict):
            continue
        t = (
            torch.from_numpy(np.ascontiguousarray(v))
            if isinstance(v, np.ndarray)
            else v.detach().cpu()
        )
        out[k] = t.contiguous()
    md = {"format": FEATURES_FORMAT}
    md.update(
        {
            k: v
            if isinstance(v, str)
            else json.dumps(v)
            if isinstance(v, (dict, list, tuple))
            else str(v)
            for k, v in meta.items()
        }
    )
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=md))


def _check_index(path, specs, tensors, meta):
    """load_features' checks that need no embedding read: dtypes and ranks (from the header),
    consistent N / D / C, n_captions in range, unique ids, finite prompts. Raises DataError (one
    line) on the first failure."""
    import torch

    want = dict(_FEATURE_SPECS, **({"prompts": ("float16", 2)} if "prompts" in specs else {}))
    for k, (dtype, rank) in want.items():
        if k not in specs:
            raise DataError(f"{path}: tensor '{k}' missing; re-run extract_features.py")
        if specs[k][0] != dtype or len(specs[k][1]) != rank:
            raise DataError(
                f"{path}: tensor '{k}' is {specs[k][0]} with shape {specs[k][1]}, expected {dtype} "
                f"of rank {rank}; re-run extract_features.py"
            )
    shape = {k: s[1] for k, s in specs.items()}
    (n, c), (t, d) = shape["labels"], shape["text"][1:]
    cats = json.loads(meta.get("categories") or "null")
    if not (
        all(shape[k][0] == n for k in ("ids", "image", "text", "n_captions"))
        and shape["image"][2] == d
        and (cats is None or len(cats) == c)
        and shape.get("prompts", (c, d)) == (c, d)
    ):
        shapes = ", ".join(f"{k} {v}" for k, v in shape.items())
        raise DataError(
            f"{path}: inconsistent tensor shapes ({shapes}; {len(cats or [])} categories in the "
            f"metadata); re-run extract_features.py"
        )
    if torch.unique(tensors["ids"]).numel() != n:
        raise DataError(f"{path}: duplicate image ids; re-run extract_features.py")
    nc = tensors["n_captions"]
    if n and (int(nc.min()) < 0 or int(nc.max()) > t):
        raise DataError(f"{path}: n_captions outside 0..{t}; re-run extract_features.py")
    if "prompts" in tensors and not torch.isfinite(tensors["prompts"]).all():
        raise DataError(
            f"{path}: NaN/Inf in the class prompt embeddings; re-run extract_features.py"
        )


def _read_index(path):
    """Open and check a feature cache without reading its embeddings -> (every tensor but image /
    text, meta, specs: name -> (dtype name, shape, byte offset in the file)). safetensors checks the
    header against the file (a truncated or foreign file is a DataError); the small tensors are
    copies, so no view keeps the file mapped."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: feature cache not found; run extract_features.py first")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FEATURES_FORMAT:
                raise DataError(
                    f"{path}: not a feature cache (format {meta.get('format')!r}, expected "
                    f"{FEATURES_FORMAT!r}); re-run extract_features.py"
                )
            tensors = {k: f.get_tensor(k).clone() for k in f.keys() if k not in EMBEDDINGS}
        with open(path, "rb") as f:  # the byte offsets, which safe_open does not expose
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated / foreign file
        raise DataError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete it and re-run extract_features.py"
        )
    specs = {
        k: (
            _DTYPE_NAMES.get(v["dtype"], v["dtype"]),
            tuple(v["shape"]),
            8 + size + v["data_offsets"][0],
        )
        for k, v in header.items()
        if k != "__metadata__"
    }
    _check_index(path, specs, tensors, meta)
    return tensors, meta, specs


def load_embeddings(path, row_sets, ids=None):
    """The image and text embeddings of a feature cache at given rows, read chunk by chunk straight
    into their outputs: the peak is the outputs plus one chunk, not the whole cache beside a copy of
    its rows.

    row_sets: a list of int64 row indices (any order, repeats allowed) or None (every row) -> a list
    of {"image": (n, V, D), "text": (n, T, D)} float16, one per entry. Every row of the file is
    checked finite on the way (load_features' check). ids: the cache's ids as read before
    (load_features(path, embeddings=False)), so a cache replaced in between is refused instead of
    read at the wrong rows.
    """
    import torch

    tensors, _, specs = _read_index(path)
    n = len(tensors["ids"])
    if ids is not None and not torch.equal(torch.as_tensor(ids), tensors["ids"]):
        raise DataError(f"{path}: the feature cache changed while it was read; run again")
    rows = [
        torch.arange(n) if r is None else torch.as_tensor(r, dtype=torch.int64) for r in row_sets
    ]
    out = [
        {k: torch.empty((len(r), *specs[k][1][1:]), dtype=torch.float16) for k in EMBEDDINGS}
        for r in rows
    ]
    bad = torch.zeros(n, dtype=torch.bool)
    # plain reads: a memory-mapped file keeps every page read resident while mapped
    with open(path, "rb") as f:
        for k in EMBEDDINGS:
            (_, *row_shape), offset = specs[k][1:]
            row = 2 * math.prod(row_shape)  # bytes per row
            step = max(1, _CHUNK_BYTES // max(1, row))  # rows per chunk
            buf = torch.empty(step * row, dtype=torch.uint8)  # one chunk, reused: no page faults
            f.seek(offset)
            for s in range(0, n, step):
                c = min(step, n - s)
                if f.readinto(buf[: c * row].numpy()) != c * row:
                    raise DataError(
                        f"{path}: the file ends early (changed while it was read?); run again"
                    )
                chunk = buf[: c * row].view(torch.float16).view(c, *row_shape)  # rows s..s+c-1
                # a row's float32 sum is finite iff all its float16 values are (it cannot
                # overflow); faster than isfinite on every value
                bad[s : s + c] |= ~torch.isfinite(chunk.sum(dim=(1, 2), dtype=torch.float32))
                for r, o in zip(rows, out):
                    hit = ((r >= s) & (r < s + c)).nonzero().squeeze(1)  # output rows held here
                    o[k].index_copy_(0, hit, chunk.index_select(0, r[hit] - s))
    if bad.any():
        bad_ids = tensors["ids"][bad].tolist()
        raise DataError(
            f"{path}: {len(bad_ids)} image(s) have NaN/Inf embeddings (COCO ids "
            f"{bad_ids[:10]}{' ...' if len(bad_ids) > 10 else ''}); re-run extract_features.py"
        )
    return out


def load_features(path, embeddings=True):
    """Load and validate a feature cache -> (tensors: dict[str, Tensor], meta: dict[str, str]).

    Checks: file exists and is safetensors with format FEATURES_FORMAT; ids / image / text /
    n_captions / labels present with the right dtypes, ranks and consistent N (and D);
    labels [N, C] with C the number of categories in the metadata (any C: the cache speaks for its
    dataset); no NaN/Inf embedding rows. embeddings=False: every tensor but image / text (their
    dtypes and shapes checked, their rows not read; see load_embeddings).
    """
    tensors, meta, _ = _read_index(path)
    if embeddings:
        tensors.update(load_embeddings(path, [None], tensors["ids"])[0])
    return tensors, meta


def bad_ids(meta):
    """The image ids the extractor could not read (metadata bad_images, a JSON list) -> int set."""
    return {int(i) for i in json.loads(meta.get("bad_images") or "[]")}


def cache_rows(ids, want, meta):
    """The one id -> row rule, bad images left out: the cache's ids [N] and wanted image ids [M] ->
    (rows int64 [M'], kept bool [M]). kept marks the wanted ids that are not bad images, rows are
    their cache rows in the order asked. A wanted id neither in the cache nor bad raises
    DataError."""
    ids, want = np.asarray(ids, dtype=np.int64), np.asarray(want, dtype=np.int64)
    bad = bad_ids(meta)
    kept = ~np.isin(want, np.fromiter(bad, np.int64, len(bad)))
    missing = np.setdiff1d(want[kept], ids)
    if len(missing):
        raise DataError(
            f"feature cache: {len(missing)} of {len(want)} image ids asked are not in it (e.g. "
            f"{missing[:5].tolist()}); re-run extract_features.py on the data the splits came from"
        )
    order = np.argsort(ids)
    return order[np.searchsorted(ids, want[kept], sorter=order)], kept


# ----------------------------------------------------------------------------- one fold in memory


def load_fold(features_path, splits_path, fold, device, inputs="both", batch_size=2):
    """Feature cache + splits -> the fold's train / val images on `device` (embeddings float16, as
    cached). Only the fold's rows are kept, read chunk by chunk (features.load_embeddings): the peak
    is the fold, not the cache too. Images the extractor could not read are left out (counted in
    "skipped")."""
    tensors, meta = load_features(features_path, embeddings=False)  # all but image / text
    splits = protocols.load_splits(splits_path)
    protocols.check_splits(splits, tensors["ids"].numpy(), meta, where=features_path)
    n_folds = len(splits["val_folds"])
    if fold >= n_folds:
        raise DataError(f"--fold: {fold} is out of range; {splits_path} has folds 0..{n_folds - 1}")
    train_ids, val_ids = protocols.fold_ids(splits, fold)
    out = {"meta": meta, "categories": splits["categories"], "skipped": {}}
    out["prompts"] = tensors.get("prompts")
    rows = {}
    for name, want in (("train", train_ids), ("val", val_ids)):
        r, kept = cache_rows(tensors["ids"].numpy(), want, meta)
        out["skipped"][name] = int((~kept).sum())
        out[name] = {"ids": torch.from_numpy(want[kept])}
        rows[name] = torch.from_numpy(r)  # (n,) cache rows
    n_train = len(rows["train"])
    if n_train < batch_size:  # checked before the embeddings are read
        raise DataError(
            f"--batch_size: {batch_size} exceeds the {n_train} training images of fold {fold}"
        )
    if len(rows["val"]) == 0:
        raise DataError(f"{splits_path}: fold {fold} has no usable validation images")
    if inputs != "image" and not bool((tensors["n_captions"][rows["train"]] > 0).any()):
        raise DataError(
            f"--inputs {inputs}: no training image of {features_path} has a text; "
            "use --inputs image"
        )
    embeddings = load_embeddings(features_path, list(rows.values()), tensors["ids"])
    for (name, r), emb in zip(rows.items(), embeddings):  # (n, V, D) (n, T, D) (n,) (n, C)
        split = dict(
            image=emb["image"],
            text=emb["text"],
            n_captions=tensors["n_captions"][r],
            labels=tensors["labels"][r],
        )
        out[name].update({k: v.to(device) for k, v in split.items()})
    return out

"""COCO data: loading (Karpathy split + 2014 instances), feature cache I/O, splits I/O, synthetic data.

Importable module, no CLI. Typical use:

    import data
    coco = data.load_coco("data/coco")            # ids, paths, splits, labels [N,80], captions, categories
    data.make_synthetic_coco("demo/coco", n_images=200, seed=0)   # a tiny COCO-like tree in the real formats
    feats = data.make_planted_features(1200)      # fake feature cache with recoverable labels
    data.save_features("f.safetensors", {k: v for k, v in feats.items() if k != "meta"}, feats["meta"])
    tensors, meta = data.load_features("f.safetensors")

Every error caused by bad input is raised as DataError(one line naming the file and the fix);
scripts catch it and exit with code 2.
"""
import hashlib
import json
import os
from statistics import NormalDist

import numpy as np

NUM_CLASSES = 80
FEATURES_FORMAT = "coco-siglip-features-v1"

# the official 80 COCO categories (instances_*.json "categories"), sorted by id -> label index 0..79
COCO_CATEGORIES = [
    {"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "car"},
    {"id": 4, "name": "motorcycle"}, {"id": 5, "name": "airplane"}, {"id": 6, "name": "bus"},
    {"id": 7, "name": "train"}, {"id": 8, "name": "truck"}, {"id": 9, "name": "boat"},
    {"id": 10, "name": "traffic light"}, {"id": 11, "name": "fire hydrant"}, {"id": 13, "name": "stop sign"},
    {"id": 14, "name": "parking meter"}, {"id": 15, "name": "bench"}, {"id": 16, "name": "bird"},
    {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 19, "name": "horse"}, {"id": 20, "name": "sheep"},
    {"id": 21, "name": "cow"}, {"id": 22, "name": "elephant"}, {"id": 23, "name": "bear"},
    {"id": 24, "name": "zebra"}, {"id": 25, "name": "giraffe"}, {"id": 27, "name": "backpack"},
    {"id": 28, "name": "umbrella"}, {"id": 31, "name": "handbag"}, {"id": 32, "name": "tie"},
    {"id": 33, "name": "suitcase"}, {"id": 34, "name": "frisbee"}, {"id": 35, "name": "skis"},
    {"id": 36, "name": "snowboard"}, {"id": 37, "name": "sports ball"}, {"id": 38, "name": "kite"},
    {"id": 39, "name": "baseball bat"}, {"id": 40, "name": "baseball glove"}, {"id": 41, "name": "skateboard"},
    {"id": 42, "name": "surfboard"}, {"id": 43, "name": "tennis racket"}, {"id": 44, "name": "bottle"},
    {"id": 46, "name": "wine glass"}, {"id": 47, "name": "cup"}, {"id": 48, "name": "fork"},
    {"id": 49, "name": "knife"}, {"id": 50, "name": "spoon"}, {"id": 51, "name": "bowl"},
    {"id": 52, "name": "banana"}, {"id": 53, "name": "apple"}, {"id": 54, "name": "sandwich"},
    {"id": 55, "name": "orange"}, {"id": 56, "name": "broccoli"}, {"id": 57, "name": "carrot"},
    {"id": 58, "name": "hot dog"}, {"id": 59, "name": "pizza"}, {"id": 60, "name": "donut"},
    {"id": 61, "name": "cake"}, {"id": 62, "name": "chair"}, {"id": 63, "name": "couch"},
    {"id": 64, "name": "potted plant"}, {"id": 65, "name": "bed"}, {"id": 67, "name": "dining table"},
    {"id": 70, "name": "toilet"}, {"id": 72, "name": "tv"}, {"id": 73, "name": "laptop"},
    {"id": 74, "name": "mouse"}, {"id": 75, "name": "remote"}, {"id": 76, "name": "keyboard"},
    {"id": 77, "name": "cell phone"}, {"id": 78, "name": "microwave"}, {"id": 79, "name": "oven"},
    {"id": 80, "name": "toaster"}, {"id": 81, "name": "sink"}, {"id": 82, "name": "refrigerator"},
    {"id": 84, "name": "book"}, {"id": 85, "name": "clock"}, {"id": 86, "name": "vase"},
    {"id": 87, "name": "scissors"}, {"id": 88, "name": "teddy bear"}, {"id": 89, "name": "hair drier"},
    {"id": 90, "name": "toothbrush"},
]

# approximate number of images containing each category in the 118,287-image pool (index order);
# sums to ~2.9 labels per image, person ~54%, hair drier / toaster ~0.2%
_COCO_IMAGE_COUNTS = [
    64115, 3252, 12251, 3502, 2986, 3952, 3588, 6127, 3025, 4139, 1711, 1734, 705, 5570, 3237, 4114, 4385,
    2941, 1529, 1968, 2143, 960, 1916, 2546, 5528, 3968, 6841, 3810, 2402, 2184, 3082, 1654, 4262, 2261,
    2506, 2629, 3476, 3486, 3394, 8501, 2533, 9189, 3555, 4326, 3529, 7111, 2243, 1586, 2365, 1699, 1939,
    2180, 1222, 3166, 1523, 2925, 12774, 4423, 4452, 3682, 11837, 3353, 4561, 3524, 1876, 3076, 2115, 4803,
    1547, 2877, 217, 4678, 2360, 5332, 4659, 3593, 947, 1571, 189, 1007]
# first COCO id of each supercategory after "person" (vehicle, outdoor, animal, ..., indoor): a group per range
_SUPERCATEGORY_STARTS = [2, 10, 16, 27, 34, 44, 52, 62, 72, 78, 84]


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


class ImageCaptionDataset:
    """Raw images + captions of load_coco's rows: item i -> (row index, PIL RGB image or None, captions).

    An unreadable / corrupt image gives None instead of raising, so extraction can record it as bad.
    A plain map-style dataset (torch's DataLoader takes it as is; data.py imports torch lazily so that
    make_splits.py starts fast). collate_fn=ImageCaptionDataset.collate -> (indices, images, captions) lists.
    """

    def __init__(self, coco, indices=None):
        self.paths, self.captions = coco["paths"], coco["captions"]
        self.indices = list(range(len(self.paths))) if indices is None else [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image
        j = self.indices[i]
        try:
            with Image.open(self.paths[j]) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            img = None
        return j, img, list(self.captions[j])

    @staticmethod
    def collate(batch):
        return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]


# ----------------------------------------------------------------------------- synthetic COCO tree

_SUPERCATEGORIES = ["person", "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen", "food",
                    "furniture", "electronic", "appliance", "indoor"]
_CAPTION_TEMPLATES = ["A photo of {}.", "  There is {} in this picture. ", "{} can be seen here.\n",
                      "An image showing {} ", "Someone took a picture of {}.", "A scene with {}  in it.",
                      "Close up of {}."]


def _category_look(k):
    """Category index k -> (cell x, cell y, RGB colour, shape) on a 9x9 grid of 7-pixel cells."""
    hue = (k * 0.618034) % 1.0
    rgb = tuple(int(255 * min(1.0, max(0.0, 2.0 - abs(((hue * 6 + o) % 6) - 3)))) for o in (0, 4, 2))
    return k % 9, k // 9, rgb, ("rect", "ellipse", "triangle")[k % 3]


def make_synthetic_coco(root, n_images=200, seed=0):
    """Write a small COCO-2014-like tree under root in the real formats and return root.

    root/train2014/*.jpg, root/val2014/*.jpg (64x64; one shape per present category, at a category-specific
    place and colour, so a model can learn the labels), root/annotations/instances_{train,val}2014.json
    (real 80 category ids/names, bboxes, polygons, some iscrowd=1 RLE, some images without annotations)
    and root/dataset_coco.json (Karpathy format; train/restval/val/test, test and val from val2014,
    5-7 captions per image naming some of its labels, with stray whitespace).
    """
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    n = int(n_images)
    labels = synthetic_labels(n, seed)
    labels[rng.permutation(n)[:max(1, n // 20)]] = 0                            # ~5% without annotations
    ids = np.sort(rng.choice(np.arange(1, 600000), size=n, replace=False))
    n_test, n_val = max(2, n // 10), max(2, n // 10)
    n_restval = max(1, n // 5)
    split = np.array(["test"] * n_test + ["val"] * n_val + ["restval"] * n_restval
                     + ["train"] * (n - n_test - n_val - n_restval))[rng.permutation(n)]
    folder = np.where(split == "train", "train2014", "val2014")
    group = np.searchsorted(_SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right")
    cats = [{"supercategory": _SUPERCATEGORIES[g], "id": c["id"], "name": c["name"]}
            for c, g in zip(COCO_CATEGORIES, group)]
    inst = {f: {"info": {"description": "synthetic COCO-like data", "version": "1.0", "year": 2014},
                "licenses": [{"id": 1, "name": "synthetic", "url": ""}], "images": [], "annotations": [],
                "categories": cats} for f in ("train2014", "val2014")}
    karpathy, ann_id, sent_id = [], 1, 1
    for i in range(n):
        cid, f = int(ids[i]), str(folder[i])
        fname = f"COCO_{f}_{cid:012d}.jpg"
        img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(90, 140, 3)))
        draw = ImageDraw.Draw(img)
        present = np.flatnonzero(labels[i])
        for k in present:
            cx, cy, rgb, shape = _category_look(int(k))
            x, y = 1 + 7 * cx + int(rng.integers(0, 2)), 1 + 7 * cy + int(rng.integers(0, 2))
            box = [x, y, x + 5, y + 5]
            getattr(draw, {"rect": "rectangle", "ellipse": "ellipse", "triangle": "polygon"}[shape])(
                [(x, y + 5), (x + 5, y + 5), (x + 2.5, y)] if shape == "triangle" else box, fill=rgb)
            for _ in range(1 + int(rng.random() < 0.2)):                            # sometimes 2 instances
                crowd = rng.random() < 0.08
                # crowd: uncompressed RLE, column-major runs (5 columns of 5 pixels); else a polygon
                rle = [x * 64 + y] + [5, 59] * 4 + [5, 64 * 64 - x * 64 - y - 4 * 64 - 5]
                seg = ({"counts": rle, "size": [64, 64]} if crowd
                       else [[float(x), float(y), x + 5.0, float(y), x + 5.0, y + 5.0, float(x), y + 5.0]])
                inst[f]["annotations"].append({"segmentation": seg, "area": 25.0, "iscrowd": int(crowd),
                                               "image_id": cid, "bbox": [float(x), float(y), 5.0, 5.0],
                                               "category_id": COCO_CATEGORIES[k]["id"], "id": ann_id})
                ann_id += 1
        os.makedirs(os.path.join(root, f), exist_ok=True)
        atomic_write(os.path.join(root, f, fname), lambda tmp: img.save(tmp, format="JPEG", quality=90))
        inst[f]["images"].append({"license": 1, "file_name": fname, "height": 64, "width": 64, "id": cid,
                                  "coco_url": "", "date_captured": "2014-01-01 00:00:00", "flickr_url": ""})
        names = [COCO_CATEGORIES[k]["name"] for k in present]
        sentences = []
        for _ in range(int(rng.integers(5, 8))):                                   # 5-7 captions
            said = [a for a in names if rng.random() < 0.6] or names[:1]
            what = " and ".join(f"a {a}" for a in said) if said else "nothing in particular"
            raw = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))].format(what)
            sentences.append({"tokens": raw.lower().replace(".", "").split(), "raw": raw, "imgid": i,
                              "sentid": sent_id})
            sent_id += 1
        karpathy.append({"filepath": f, "sentids": [s["sentid"] for s in sentences], "filename": fname,
                         "imgid": i, "split": str(split[i]), "sentences": sentences, "cocoid": cid})
    for f in ("train2014", "val2014"):
        save_json(os.path.join(root, "annotations", f"instances_{f}.json"), inst[f])
    save_json(os.path.join(root, "dataset_coco.json"), {"images": karpathy, "dataset": "coco"})
    return root


# ----------------------------------------------------------------------------- feature cache

# name -> (dtype, rank); N must agree across all, D across image/text/prompts
_FEATURE_SPECS = {"ids": ("int64", 1), "image": ("float16", 3), "text": ("float16", 3),
                  "n_captions": ("int64", 1), "labels": ("uint8", 2)}


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


def load_features(path):
    """Load and validate a feature cache -> (tensors: dict[str, torch.Tensor], meta: dict[str, str]).

    Checks: file exists and is safetensors with format FEATURES_FORMAT; ids/image/text/n_captions/labels
    present with the right dtypes, ranks and consistent N (and D); no NaN/Inf embedding rows.
    """
    import torch
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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated / foreign file
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); delete it and re-run extract_features.py")
    specs = dict(_FEATURE_SPECS)
    if "prompts" in tensors:
        specs["prompts"] = ("float16", 2)
    for k, (name, rank) in specs.items():
        dtype = getattr(torch, name)
        if k not in tensors:
            raise DataError(f"{path}: tensor '{k}' missing; re-run extract_features.py")
        t = tensors[k]
        if t.dtype != dtype or t.dim() != rank:
            raise DataError(f"{path}: tensor '{k}' is {t.dtype} with shape {tuple(t.shape)}, expected {dtype} "
                            f"of rank {rank}; re-run extract_features.py")
    n, d = tensors["ids"].shape[0], tensors["image"].shape[2]
    shapes_ok = (all(tensors[k].shape[0] == n for k in ("image", "text", "n_captions", "labels"))
                 and tensors["text"].shape[2] == d and tensors["labels"].shape[1] == NUM_CLASSES
                 and ("prompts" not in tensors or tuple(tensors["prompts"].shape) == (NUM_CLASSES, d)))
    if not shapes_ok:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
        raise DataError(f"{path}: inconsistent tensor shapes ({shapes}); re-run extract_features.py")
    if torch.unique(tensors["ids"]).numel() != n:
        raise DataError(f"{path}: duplicate image ids; re-run extract_features.py")
    nc = tensors["n_captions"]
    if n and (int(nc.min()) < 0 or int(nc.max()) > tensors["text"].shape[1]):
        raise DataError(f"{path}: n_captions outside 0..{tensors['text'].shape[1]}; re-run extract_features.py")
    bad = torch.zeros(n, dtype=torch.bool)
    for s in range(0, n, 8192):  # chunked so the bool temporaries stay small on a 118k x 5 x 768 cache
        for k in ("image", "text"):
            bad[s:s + 8192] |= ~torch.isfinite(tensors[k][s:s + 8192]).flatten(1).all(1)
    if "prompts" in tensors and not torch.isfinite(tensors["prompts"]).all():
        raise DataError(f"{path}: NaN/Inf in the class prompt embeddings; re-run extract_features.py")
    if bad.any():
        bad_ids = tensors["ids"][bad].tolist()
        raise DataError(f"{path}: {len(bad_ids)} image(s) have NaN/Inf embeddings (COCO ids "
                        f"{bad_ids[:10]}{' ...' if len(bad_ids) > 10 else ''}); re-run extract_features.py")
    return tensors, meta


# ----------------------------------------------------------------------------- splits file

_SPLIT_KEYS = ("method", "folds", "seed", "categories", "dev", "test", "val_folds", "stats")


def load_splits(path):
    """Load and validate splits.json (make_splits.py) -> dict as written (lists of int ids).

    Checks: every key present; the 80 COCO categories; dev and test disjoint and duplicate-free;
    len(val_folds) == folds >= 2; the val folds partition dev exactly.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: splits file not found; run make_splits.py first")
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run make_splits.py") from None
    missing = [k for k in _SPLIT_KEYS if not isinstance(s, dict) or k not in s]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; re-run make_splits.py")
    if s["categories"] != COCO_CATEGORIES:
        raise DataError(f"{path}: categories are not the 80 COCO categories in id order; re-run make_splits.py")
    dev, test, folds = s["dev"], s["test"], s["val_folds"]
    if len(set(dev)) != len(dev) or len(set(test)) != len(test):
        raise DataError(f"{path}: duplicate image ids in dev or test; re-run make_splits.py")
    overlap = set(dev) & set(test)
    if overlap:
        raise DataError(f"{path}: {len(overlap)} image ids are in both dev and test "
                        f"(e.g. {sorted(overlap)[:5]}); re-run make_splits.py")
    if not isinstance(s["folds"], int) or s["folds"] < 2 or len(folds) != s["folds"]:
        raise DataError(f"{path}: folds={s['folds']!r} but {len(folds)} val_folds; re-run make_splits.py")
    if sum(len(f) for f in folds) != len(dev) or set().union(*map(set, folds)) != set(dev):
        raise DataError(f"{path}: val_folds do not partition dev exactly; re-run make_splits.py")
    return s


def check_split_ids(splits, ids, where="feature cache"):
    """Raise DataError if any dev/test id of `splits` is absent from `ids` (e.g. the feature cache's ids)."""
    have = set(np.asarray(ids).tolist())
    want = set(splits["dev"]) | set(splits["test"])
    missing = sorted(want - have)
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(want)} split image ids are missing (e.g. "
                        f"{missing[:5]}); the splits and the {where} come from different data - re-run "
                        f"extract_features.py on the same data_root as make_splits.py")


# ----------------------------------------------------------------------------- synthetic labels / features

def synthetic_labels(n, seed=0):
    """COCO-like multi-label matrix uint8 [n, 80]: real per-class prevalences (person ~54% ... ~0.2%),
    ~2.9 labels per image, correlated within supercategories, ~1% all-zero rows."""
    rng = np.random.default_rng(seed)
    p = np.asarray(_COCO_IMAGE_COUNTS, np.float64) / 118287.0                        # (80,)
    group = np.searchsorted(_SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right")
    thr = np.array([NormalDist().inv_cdf(1.0 - q) for q in p], np.float32)         # (80,)
    # Gaussian copula: one latent factor per supercategory keeps every marginal exact but makes
    # co-occurrence realistic (fork with knife, car with truck) for stratification to cope with
    rho = 0.35
    g = rng.standard_normal((n, len(_SUPERCATEGORY_STARTS) + 1), dtype=np.float32)   # (n, 12)
    z = rng.standard_normal((n, NUM_CLASSES), dtype=np.float32)                      # (n, 80)
    z *= np.float32(np.sqrt(1 - rho))
    z += np.float32(np.sqrt(rho)) * g[:, group]
    labels = (z > thr).astype(np.uint8)
    # images with nothing: ~1% stay empty on purpose, the others get one label drawn by prevalence
    empty = rng.random(n) < 0.01
    fill = ~labels.any(1) & ~empty
    pick = np.searchsorted(np.cumsum(p) / p.sum(), rng.random(int(fill.sum())), side="right")
    labels[np.flatnonzero(fill), np.minimum(pick, NUM_CLASSES - 1)] = 1
    labels[empty] = 0
    return labels


def _planted_blocks(rng, labels, ncap, table, image, text, pool, p_mention, step=512):
    """Fill image [N,1,D] / text [N,C,D] float16 block by block (blocks of `step` images stay in cache)."""
    import torch
    import torch.nn.functional as F
    n, c, d = len(labels), text.shape[1], text.shape[2]
    for s in range(0, n, step):
        lab = labels[s:s + step].astype(bool)                                       # (B, 80)
        b = lab.shape[0]
        m = b * (1 + c)
        # captions: each mentions each label with prob p_mention, and at least one when there is any
        r = lab[:, None, :] * rng.random((b, c, NUM_CLASSES), dtype=np.float32)     # (B, C, 80)
        ment = r > 1.0 - p_mention
        bi, ci = np.nonzero(~ment.any(2) & lab.any(1)[:, None])
        ment[bi, ci, np.argmax(r[bi, ci], axis=1)] = True
        rows, col = np.nonzero(np.concatenate([lab[:, None], ment], 1).reshape(m, NUM_CLASSES))
        cnt = np.bincount(rows, minlength=m)
        col = col + pool + NUM_CLASSES * (rows % (1 + c) > 0)                       # W_i or W_t rows
        offsets = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        fixed = np.empty((m, 3), np.int64)
        fixed[:, :2] = rng.integers(0, pool, size=(m, 2))                            # noise rows
        fixed[:, 2] = pool + 2 * NUM_CLASSES + (np.arange(m) % (1 + c) > 0)          # mu_i or mu_t
        v = F.embedding_bag(torch.from_numpy(fixed), table, mode="sum")             # (B*(1+C), D)
        v += F.embedding_bag(torch.from_numpy(col), table, torch.from_numpy(offsets), mode="sum",
                             per_sample_weights=torch.from_numpy((1.0 / np.sqrt(np.maximum(cnt, 1)))[rows]
                                                                 .astype(np.float32)))
        mags = np.exp(rng.uniform(np.log(5.0), np.log(30.0), size=(b, 1 + c)))       # random norms
        mags[:, 1:] *= np.arange(c)[None, :] < ncap[s:s + b, None]                   # no caption -> zero row
        v = v.view(b, 1 + c, d)                                                      # slot 0 = image
        scale = (torch.from_numpy(mags.astype(np.float32)) / torch.linalg.vector_norm(v, dim=2))[:, :, None]
        torch.mul(v[:, :1], scale[:, :1], out=image[s:s + b])                       # float16 from here
        torch.mul(v[:, 1:], scale[:, 1:], out=text[s:s + b])


def make_planted_features(n_images, dim=768, n_captions=5, seed=0):
    """A fake feature cache whose labels a linear probe can recover, but not trivially.

    Image v = m * normalize(mu_i + a * sum_{c in labels} W_i[c] / sqrt(k) + noise); caption v likewise with
    mu_t, W_t and the labels that caption mentions (a random subset of the image's, at least one).
    W_t is correlated with W_i (aligned towers), mu_i != mu_t (modality gap), norms m random in [5, 30].
    A logistic-regression probe on L2-normalised [image, mean caption] reaches val macro mAP 0.88 at COCO
    scale (123,287 images, 80/20 split; 0.87 with 60k images, less on a few thousand): learnable, not trivial.
    Returns numpy arrays exactly like the cache: ids int64 [N], image float16 [N,1,D], text float16
    [N,C,D] (zero rows past n_captions), n_captions int64 [N] in 1..C, labels uint8 [N,80],
    prompts float16 [80,D]; plus "meta" (dict for save_features, model "planted").
    """
    import torch
    n, d, c = int(n_images), int(dim), int(n_captions)
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(n, seed)                                               # (N, 80)
    ids = np.sort(rng.choice(np.arange(1, 600000), size=n, replace=False)).astype(np.int64)
    probs = np.array([0.02, 0.02, 0.03, 0.03] + [0.0] * max(c - 5, 0) + [0.9])[-c:] if c > 1 else np.ones(1)
    ncap = (rng.choice(c, size=n, p=probs / probs.sum()) + 1).astype(np.int64)     # mostly C captions

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    sig, p_mention, pool = 0.25, 0.5, 16384   # signal vs two unit noise vectors: sets the difficulty
    w_img = unit(rng.standard_normal((NUM_CLASSES, d)))                             # (80, D) class directions
    w_txt = unit(0.6 * w_img + 0.8 * unit(rng.standard_normal((NUM_CLASSES, d))))
    mu = unit(rng.standard_normal((2, d)))                                           # image / text offsets
    # one lookup table, every vector = a weighted bag of its rows: 2 random noise rows (full-rank,
    # label-free, far cheaper than N*(1+C)*D fresh normals), its mean row and its label rows
    table = np.concatenate([unit(rng.standard_normal((pool, d), dtype=np.float32)), sig * w_img, sig * w_txt, mu])
    table = torch.from_numpy(table.astype(np.float32))                             # (pool+162, D)
    image = torch.empty((n, 1, d), dtype=torch.float16)
    text = torch.empty((n, c, d), dtype=torch.float16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # memory-bound gathers: one thread is as fast, and 3x faster on a busy CPU
    try:
        _planted_blocks(rng, labels, ncap, table, image, text, pool, p_mention)
    finally:
        torch.set_num_threads(threads)
    image, text = image.numpy(), text.numpy()
    w_txt = sig * w_txt
    prompts = (unit(mu[1] + w_txt) * 10.0).astype(np.float16)                      # (80, D) "a photo of a <c>"
    meta = {"format": FEATURES_FORMAT, "model": "planted", "dim": d, "views": 1, "max_captions": c,
            "image_size": 0, "transformers_version": "none", "logit_scale": 10.0, "logit_bias": -10.0,
            "fingerprint": f"planted-seed{seed}", "categories": json.dumps(COCO_CATEGORIES), "bad_images": "[]"}
    return {"ids": ids, "image": image, "text": text, "n_captions": ncap, "labels": labels,
            "prompts": prompts, "meta": meta}

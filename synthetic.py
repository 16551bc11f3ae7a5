"""Generators for the demo, the tests and bench.py: a COCO-2014-like tree in the real file formats,
planted feature caches whose labels a linear probe can recover (and folds and splits around them),
COCO-like JPEGs, and a tiny randomly initialised SigLIP.

    import synthetic
    synthetic.make_synthetic_coco("demo/coco", n_images=200, seed=0)  # images, annotations, ...
    feats = synthetic.make_planted_features(1200)             # arrays shaped like the feature cache
    features.save_features("f.safetensors", feats, feats["meta"])
    synthetic.make_tiny_siglip("demo/tiny_siglip")            # loadable by encoders.load_encoder
    fold = synthetic.planted_fold(4096, 1024)                 # bench: as features.load_fold

None of it is needed to train or evaluate on real data; data.py, features.py and model.py do not
import it.
"""

import json
import math
import os
from statistics import NormalDist

import numpy as np

import encoders
from data import COCO_CATEGORIES, atomic_write, save_json
from features import FEATURES_FORMAT, save_features

# approximate number of images containing each category in the 118,287-image pool (index order);
# sums to ~2.9 labels per image, person ~54%, hair drier / toaster ~0.2%
COCO_IMAGE_COUNTS = [
    64115,
    3252,
    12251,
    3502,
    2986,
    3952,
    3588,
    6127,
    3025,
    4139,
    1711,
    1734,
    705,
    5570,
    3237,
    4114,
    4385,
    2941,
    1529,
    1968,
    2143,
    960,
    1916,
    2546,
    5528,
    3968,
    6841,
    3810,
    2402,
    2184,
    3082,
    1654,
    4262,
    2261,
    2506,
    2629,
    3476,
    3486,
    3394,
    8501,
    2533,
    9189,
    3555,
    4326,
    3529,
    7111,
    2243,
    1586,
    2365,
    1699,
    1939,
    2180,
    1222,
    3166,
    1523,
    2925,
    12774,
    4423,
    4452,
    3682,
    11837,
    3353,
    4561,
    3524,
    1876,
    3076,
    2115,
    4803,
    1547,
    2877,
    217,
    4678,
    2360,
    5332,
    4659,
    3593,
    947,
    1571,
    189,
    1007,
]
# first COCO id of each supercategory after "person" (vehicle, outdoor, animal, ..., indoor): a
# group per range
_SUPERCATEGORY_STARTS = [2, 10, 16, 27, 34, 44, 52, 62, 72, 78, 84]


# ----------------------------------------------------------------------------- synthetic COCO tree

_SUPERCATEGORIES = [
    "person",
    "vehicle",
    "outdoor",
    "animal",
    "accessory",
    "sports",
    "kitchen",
    "food",
    "furniture",
    "electronic",
    "appliance",
    "indoor",
]
_CAPTION_TEMPLATES = [
    "A photo of {}.",
    "  There is {} in this picture. ",
    "{} can be seen here.\n",
    "An image showing {} ",
    "Someone took a picture of {}.",
    "A scene with {}  in it.",
    "Close up of {}.",
]


def _category_look(k):
    """Category index k -> (cell x, cell y, RGB colour, shape) on a 9x9 grid of 7-pixel cells."""
    hue = (k * 0.618034) % 1.0
    rgb = tuple(
        int(255 * min(1.0, max(0.0, 2.0 - abs(((hue * 6 + o) % 6) - 3)))) for o in (0, 4, 2)
    )
    return k % 9, k // 9, rgb, ("rect", "ellipse", "triangle")[k % 3]


def _draw_image(rng, present, cid, ann_id):
    """A 64x64 image with one shape per present category (its place and colour: _category_look), and
    its instance annotations (a polygon, sometimes a second instance, ~8% crowd RLE) -> (PIL image,
    [annotation])."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(90, 140, 3)))
    draw = ImageDraw.Draw(img)
    anns = []
    for k in present:
        cx, cy, rgb, shape = _category_look(int(k))
        x, y = 1 + 7 * cx + int(rng.integers(0, 2)), 1 + 7 * cy + int(rng.integers(0, 2))
        box = [x, y, x + 5, y + 5]
        getattr(draw, {"rect": "rectangle", "ellipse": "ellipse", "triangle": "polygon"}[shape])(
            [(x, y + 5), (x + 5, y + 5), (x + 2.5, y)] if shape == "triangle" else box, fill=rgb
        )
        for _ in range(1 + int(rng.random() < 0.2)):  # sometimes 2 instances
            crowd = rng.random() < 0.08
            # crowd: uncompressed RLE, column-major runs (5 columns of 5 pixels); else a polygon
            rle = [x * 64 + y] + [5, 59] * 4 + [5, 64 * 64 - x * 64 - y - 4 * 64 - 5]
            seg = (
                {"counts": rle, "size": [64, 64]}
                if crowd
                else [[float(x), float(y), x + 5.0, float(y), x + 5.0, y + 5.0, float(x), y + 5.0]]
            )
            anns.append(
                {
                    "segmentation": seg,
                    "area": 25.0,
                    "iscrowd": int(crowd),
                    "image_id": cid,
                    "bbox": [float(x), float(y), 5.0, 5.0],
                    "category_id": COCO_CATEGORIES[k]["id"],
                    "id": ann_id + len(anns),
                }
            )
    return img, anns


def _captions(rng, names, imgid, sent_id):
    """5-7 Karpathy-format sentences naming some of the image's labels, with stray whitespace and
    newlines."""
    sentences = []
    for _ in range(int(rng.integers(5, 8))):
        said = [a for a in names if rng.random() < 0.6] or names[:1]
        what = " and ".join(f"a {a}" for a in said) if said else "nothing in particular"
        raw = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))].format(what)
        sentences.append(
            {
                "tokens": raw.lower().replace(".", "").split(),
                "raw": raw,
                "imgid": imgid,
                "sentid": sent_id + len(sentences),
            }
        )
    return sentences


def make_synthetic_coco(root, n_images=200, seed=0):
    """Write a small COCO-2014-like tree under root in the real formats and return root.

    root/train2014/*.jpg, root/val2014/*.jpg (64x64; one shape per present category, at a
    category-specific place and colour, so a model can learn the labels),
    root/annotations/instances_{train,val}2014.json (real 80 category ids/names, bboxes, polygons,
    some iscrowd=1 RLE, some images without annotations) and root/dataset_coco.json (Karpathy
    format; train/restval/val/test, test and val from val2014, 5-7 captions per image naming some of
    its labels, with stray whitespace).
    """
    rng = np.random.default_rng(seed)
    n = int(n_images)
    labels = synthetic_labels(n, seed)
    labels[rng.permutation(n)[: max(1, n // 20)]] = 0  # ~5% without annotations
    ids = np.sort(rng.choice(np.arange(1, 600000), size=n, replace=False))
    n_test, n_val = max(2, n // 10), max(2, n // 10)
    n_restval = max(1, n // 5)
    split = np.array(
        ["test"] * n_test
        + ["val"] * n_val
        + ["restval"] * n_restval
        + ["train"] * (n - n_test - n_val - n_restval)
    )[rng.permutation(n)]
    folder = np.where(split == "train", "train2014", "val2014")
    group = np.searchsorted(_SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right")
    cats = [
        {"supercategory": _SUPERCATEGORIES[g], "id": c["id"], "name": c["name"]}
        for c, g in zip(COCO_CATEGORIES, group)
    ]
    inst = {
        f: {
            "info": {"description": "synthetic COCO-like data", "version": "1.0", "year": 2014},
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
            "images": [],
            "annotations": [],
            "categories": cats,
        }
        for f in ("train2014", "val2014")
    }
    karpathy, ann_id, sent_id = [], 1, 1
    for i in range(n):
        cid, f = int(ids[i]), str(folder[i])
        fname = f"COCO_{f}_{cid:012d}.jpg"
        present = np.flatnonzero(labels[i])
        img, anns = _draw_image(rng, present, cid, ann_id)
        inst[f]["annotations"] += anns
        ann_id += len(anns)
        os.makedirs(os.path.join(root, f), exist_ok=True)
        atomic_write(
            os.path.join(root, f, fname), lambda tmp: img.save(tmp, format="JPEG", quality=90)
        )
        inst[f]["images"].append(
            {
                "license": 1,
                "file_name": fname,
                "height": 64,
                "width": 64,
                "id": cid,
                "coco_url": "",
                "date_captured": "2014-01-01 00:00:00",
                "flickr_url": "",
            }
        )
        sentences = _captions(rng, [COCO_CATEGORIES[k]["name"] for k in present], i, sent_id)
        sent_id += len(sentences)
        karpathy.append(
            {
                "filepath": f,
                "sentids": [s["sentid"] for s in sentences],
                "filename": fname,
                "imgid": i,
                "split": str(split[i]),
                "sentences": sentences,
                "cocoid": cid,
            }
        )
    for f in ("train2014", "val2014"):
        save_json(os.path.join(root, "annotations", f"instances_{f}.json"), inst[f])
    save_json(os.path.join(root, "dataset_coco.json"), {"images": karpathy, "dataset": "coco"})
    return root


# ---------------------------------------------------------------------- synthetic labels / features


def class_prevalences(num_classes=80):
    """Per-class prevalence (C,) and supercategory group (C,): COCO's own for 80 classes, else
    log-spaced prevalences from 30% down to 0.5% in groups of 8 (a generic long-tailed label
    set)."""
    if num_classes == 80:
        group = np.searchsorted(
            _SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right"
        )
        return np.asarray(COCO_IMAGE_COUNTS, np.float64) / 118287.0, group
    return np.geomspace(0.3, 0.005, num_classes), np.arange(num_classes) // 8


def synthetic_labels(n, seed=0, num_classes=80):
    """Multi-label matrix uint8 [n, C] with long-tailed prevalences (COCO's real ones for C = 80:
    person ~54% ... ~0.2%, ~2.9 labels per image), correlated within groups, ~1% all-zero rows."""
    rng = np.random.default_rng(seed)
    p, group = class_prevalences(num_classes)  # (C,), (C,)
    thr = np.array([NormalDist().inv_cdf(1.0 - q) for q in p], np.float32)  # (C,)
    # Gaussian copula: one latent factor per group keeps every marginal exact but makes
    # co-occurrence realistic (fork with knife, car with truck) for stratification to cope with
    rho = 0.35
    g = rng.standard_normal((n, int(group.max()) + 1), dtype=np.float32)  # (n, groups)
    z = rng.standard_normal((n, num_classes), dtype=np.float32)  # (n, C)
    z *= np.float32(np.sqrt(1 - rho))
    z += np.float32(np.sqrt(rho)) * g[:, group]
    labels = (z > thr).astype(np.uint8)
    # images with nothing: ~1% stay empty on purpose, the others get one label drawn by prevalence
    empty = rng.random(n) < 0.01
    fill = ~labels.any(1) & ~empty
    pick = np.searchsorted(np.cumsum(p) / p.sum(), rng.random(int(fill.sum())), side="right")
    labels[np.flatnonzero(fill), np.minimum(pick, num_classes - 1)] = 1
    labels[empty] = 0
    return labels


def planted_scores(n, seed=0):
    """Labels (n, 80), every class positive at least once (scikit-learn's macro AP / AUC need one),
    and float32 probabilities that follow them (sigmoid of 3 y - 3 + 2 noise; some tie, as saved
    ones do) -> (labels, probs)."""
    y = synthetic_labels(n, seed)
    y[np.arange(80), np.arange(80)] = 1
    logit = 3.0 * y - 3.0 + 2.0 * np.random.default_rng(seed).standard_normal(y.shape)
    return y, (1 / (1 + np.exp(-logit))).astype(np.float32)


def planted_codes(n, bits=64, seed=0):
    """Labels (n, 80) and +-1 codes (n, bits) that follow them, sign(labels @ P + 2 noise), both
    float32."""
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(n, seed).astype(np.float32)
    proj = rng.standard_normal((labels.shape[1], bits)).astype(np.float32)
    codes = np.where(
        labels @ proj + 2 * rng.standard_normal((n, bits), dtype=np.float32) >= 0, 1.0, -1.0
    )
    return labels, codes.astype(np.float32)


def planted_concepts(n, dim=64, concepts=5, per_concept=2, p_label=0.8, cooccur=True, seed=0):
    """Labels that co-occur, for ML-GCN (mlgcn.py): each of `concepts` hidden concepts is in an
    image with probability 0.3, and each of its `per_concept` classes is labelled on a p_label
    share of its images, so the classes of a concept co-occur (P(j | i) ~ p_label) and share one
    image direction. cooccur False: every class on its own, independently (prevalence 0.15), with
    its own direction. Image x = sum of the present directions + noise -> float32 (image (n, dim),
    labels (n, C)), C = concepts * per_concept."""
    rng = np.random.default_rng(seed)
    c = concepts * per_concept
    u = rng.standard_normal((c, dim)) / np.sqrt(dim) * 2.0  # (C, D) class directions
    if cooccur:
        k = rng.random((n, concepts)) < 0.3  # (n, concepts) hidden concepts
        y = np.repeat(k, per_concept, axis=1) & (rng.random((n, c)) < p_label)
        u = np.repeat(u[::per_concept], per_concept, axis=0)  # one direction per concept
        x = k @ u[::per_concept]
    else:
        y = rng.random((n, c)) < 0.15
        x = y @ u
    x = x + rng.standard_normal((n, dim)) / np.sqrt(dim) * 2.0
    return x.astype(np.float32), y.astype(np.float32)


def _planted_blocks(rng, labels, ncap, table, image, text, pool, p_mention, step=512):
    """Fill image [N,1,D] / text [N,C,D] float16 block by block (blocks of `step` images stay in
    cache)."""
    import torch
    import torch.nn.functional as F

    (n, k), c, d = labels.shape, text.shape[1], text.shape[2]
    for s in range(0, n, step):
        lab = labels[s : s + step].astype(bool)  # (B, K)
        b = lab.shape[0]
        m = b * (1 + c)
        # captions: each mentions each label with prob p_mention, and at least one when there is any
        r = lab[:, None, :] * rng.random((b, c, k), dtype=np.float32)  # (B, C, K)
        ment = r > 1.0 - p_mention
        bi, ci = np.nonzero(~ment.any(2) & lab.any(1)[:, None])
        ment[bi, ci, np.argmax(r[bi, ci], axis=1)] = True
        rows, col = np.nonzero(np.concatenate([lab[:, None], ment], 1).reshape(m, k))
        cnt = np.bincount(rows, minlength=m)
        col = col + pool + k * (rows % (1 + c) > 0)  # W_i or W_t rows
        offsets = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        fixed = np.empty((m, 3), np.int64)
        fixed[:, :2] = rng.integers(0, pool, size=(m, 2))  # noise rows
        fixed[:, 2] = pool + 2 * k + (np.arange(m) % (1 + c) > 0)  # mu_i or mu_t
        v = F.embedding_bag(torch.from_numpy(fixed), table, mode="sum")  # (B*(1+C), D)
        v += F.embedding_bag(
            torch.from_numpy(col),
            table,
            torch.from_numpy(offsets),
            mode="sum",
            per_sample_weights=torch.from_numpy(
                (1.0 / np.sqrt(np.maximum(cnt, 1)))[rows].astype(np.float32)
            ),
        )
        mags = np.exp(rng.uniform(np.log(5.0), np.log(30.0), size=(b, 1 + c)))  # random norms
        mags[:, 1:] *= np.arange(c)[None, :] < ncap[s : s + b, None]  # no caption -> zero row
        v = v.view(b, 1 + c, d)  # slot 0 = image
        scale = (torch.from_numpy(mags.astype(np.float32)) / torch.linalg.vector_norm(v, dim=2))[
            :, :, None
        ]
        torch.mul(v[:, :1], scale[:, :1], out=image[s : s + b])  # float16 from here
        torch.mul(v[:, 1:], scale[:, 1:], out=text[s : s + b])


def make_planted_features(n_images, dim=768, n_captions=5, seed=0, num_classes=80, categories=None):
    """A fake feature cache whose labels a linear probe can recover, but not trivially.

    Image v = m * normalize(mu_i + a * sum_{c in labels} W_i[c] / sqrt(k) + noise); caption v
    likewise with mu_t, W_t and the labels that caption mentions (a random subset of the image's, at
    least one). W_t is correlated with W_i (aligned towers), mu_i != mu_t (modality gap), norms m
    random in [5, 30]. A logistic-regression probe on L2-normalised [image, mean caption] reaches
    val macro mAP 0.88 at COCO scale (123,287 images, 80/20 split; 0.87 with 60k images, less on a
    few thousand): learnable, not trivial. Returns numpy arrays exactly like the cache: ids int64
    [N], image float16 [N,1,D], text float16 [N,C,D] (zero rows past n_captions), n_captions int64
    [N] in 1..C, labels uint8 [N,K], prompts float16 [K,D]; plus "meta" (dict for save_features,
    model "planted").
    """
    import torch

    n, d, c = int(n_images), int(dim), int(n_captions)
    if categories is None:  # COCO's for 80 classes, else class_00, class_01, ...
        categories = (
            COCO_CATEGORIES
            if num_classes == 80
            else [{"id": i + 1, "name": f"class_{i:02d}"} for i in range(num_classes)]
        )
    if len(categories) != num_classes:
        raise ValueError(f"{len(categories)} categories for {num_classes} classes")
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(n, seed, num_classes)  # (N, K)
    ids = np.sort(rng.choice(np.arange(1, 600000), size=n, replace=False)).astype(np.int64)
    probs = (
        np.array([0.02, 0.02, 0.03, 0.03] + [0.0] * max(c - 5, 0) + [0.9])[-c:]
        if c > 1
        else np.ones(1)
    )
    ncap = (rng.choice(c, size=n, p=probs / probs.sum()) + 1).astype(np.int64)  # mostly C captions

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    sig, p_mention, pool = 0.25, 0.5, 16384  # signal vs two unit noise vectors: sets the difficulty
    w_img = unit(rng.standard_normal((num_classes, d)))  # (K, D) class directions
    w_txt = unit(0.6 * w_img + 0.8 * unit(rng.standard_normal((num_classes, d))))
    mu = unit(rng.standard_normal((2, d)))  # image / text offsets
    # one lookup table, every vector = a weighted bag of its rows: 2 random noise rows (full-rank,
    # label-free, far cheaper than N*(1+C)*D fresh normals), its mean row and its label rows
    table = np.concatenate(
        [unit(rng.standard_normal((pool, d), dtype=np.float32)), sig * w_img, sig * w_txt, mu]
    )
    table = torch.from_numpy(table.astype(np.float32))  # (pool+162, D)
    image = torch.empty((n, 1, d), dtype=torch.float16)
    text = torch.empty((n, c, d), dtype=torch.float16)
    threads = torch.get_num_threads()
    # memory-bound gathers: one thread is as fast, and much faster on a busy CPU
    torch.set_num_threads(1)
    try:
        _planted_blocks(rng, labels, ncap, table, image, text, pool, p_mention)
    finally:
        torch.set_num_threads(threads)
    image, text = image.numpy(), text.numpy()
    w_txt = sig * w_txt
    prompts = (unit(mu[1] + w_txt) * 10.0).astype(np.float16)  # (K, D) "a photo of a <c>"
    meta = {
        "format": FEATURES_FORMAT,
        "model": "planted",
        "dim": d,
        "views": 1,
        "max_captions": c,
        "image_size": 0,
        "transformers_version": "none",
        "logit_scale": 10.0,
        "logit_bias": -10.0,
        "fingerprint": f"planted-seed{seed}",
        "categories": json.dumps(categories),
        "bad_images": "[]",
    }
    return {
        "ids": ids,
        "image": image,
        "text": text,
        "n_captions": ncap,
        "labels": labels,
        "prompts": prompts,
        "meta": meta,
    }


# ----------------------------------------------------------------------------- bench.py's inputs


def planted_fold(n_train, n_val, seed=0, device="cpu"):
    """A fold as features.load_fold returns it (its train / val parts), from planted embeddings:
    float16 (n, 1, D) images and (n, 5, D) captions on `device`, ids on the CPU."""
    import torch

    f = make_planted_features(n_train + n_val, seed=seed)
    fold = {"skipped": {"train": 0, "val": 0}}
    for name, rows in (("train", slice(0, n_train)), ("val", slice(n_train, n_train + n_val))):
        fold[name] = {
            k: torch.from_numpy(f[k][rows]).to("cpu" if k == "ids" else device)
            for k in ("ids", "image", "text", "n_captions", "labels")
        }
    return fold


def write_planted_cache(folder, n, seed=0, n_val=1000, n_test=5000):
    """A planted cache of n images and a 2-fold splits file (test: the first min(n_test, n / 20)
    ids) whose fold 0 validates on n_val dev images, so the fold holds every dev image and its KNN
    validation stays short -> (features path, splits path)."""
    feats = make_planted_features(n, seed=seed)
    path, splits = os.path.join(folder, "features.safetensors"), os.path.join(folder, "splits.json")
    save_features(path, feats, feats["meta"])
    ids = feats["ids"].tolist()
    test, dev = ids[: min(n_test, n // 20)], ids[min(n_test, n // 20) :]
    n_val = min(n_val, len(dev) // 5)
    val = dev[:: len(dev) // n_val][:n_val]
    rest = sorted(set(dev) - set(val))
    save_json(
        splits,
        {
            "method": "random",
            "folds": 2,
            "seed": seed,
            "categories": COCO_CATEGORIES,
            "dev": dev,
            "test": test,
            "val_folds": [val, rest],
            "stats": [{"size": len(f)} for f in (val, rest)],
        },
    )
    return path, splits


def write_jpegs(folder, n, seed=0, size=(640, 480)):
    """n COCO-like JPEGs (640 x 480, quality 90, ~150 kB: a smooth colour layout plus grain) ->
    their paths."""
    from PIL import Image

    rng, paths = np.random.default_rng(seed), []
    for i in range(n):
        layout = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
            size, Image.Resampling.BICUBIC
        )
        px = np.asarray(layout, np.float32) + rng.normal(0, 20, (size[1], size[0], 3)).astype(
            np.float32
        )
        paths.append(os.path.join(folder, f"{i:06d}.jpg"))
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


# words of the tiny test tokenizer: the 80 COCO category names plus common caption words
_TINY_WORDS = """
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking
meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie
suitcase
frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket bottle
wine
glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot pizza donut cake
chair
couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven
toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush
a an the of on in at with and or to from by for near next under over above behind front top
is are was be being sitting standing walking riding holding playing eating looking lying flying
parked running jumping laying waiting carrying wearing driving crossing taking showing filled
man woman men women boy girl child children people group couple player players kid kids
photo picture image view close up small large big little two three four several many some
white black red blue green yellow brown gray grey pink purple colorful dark bright old young
street road city field grass water beach snow sky room kitchen bathroom living area house building
wall window door floor plate food tray shelf counter desk park air ocean lake river tree trees
it its his her their this that there other each one side background several together around
very while out into down along across like has have shown made set full empty sits stands
circle square triangle shape shapes color colored drawn scene object objects thing things
. , ' - !
"""


def siglip_image_processor(**kwargs):
    """transformers' PIL SigLIP image processor (SiglipImageProcessorPil in 5.x; in 4.x
    SiglipImageProcessor is the PIL one, and in 5.x the old name wants torchvision, else it
    warns)."""
    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return Processor(**kwargs)


def random_siglip(size, vocab_size, image_size, patch_size, seed=0, **text):
    """A SiglipModel built from its config with random weights, in eval mode; the global torch RNG
    is left untouched. size: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads
    of both towers; text: more of the text config (token ids, projection_size)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    length = encoders.SIGLIP_TEXT.max_length
    text = dict(size, vocab_size=vocab_size, max_position_embeddings=length, **text)
    config = SiglipConfig(
        text_config=text, vision_config=dict(size, image_size=image_size, patch_size=patch_size)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SiglipModel(config).eval()


def make_tiny_siglip(out_dir, image_size=32, seed=0):
    """Save a tiny randomly initialised SiglipModel + tokenizer + processor to out_dir -> out_dir
    (str).

    Offline stand-in for google/siglip2-base-patch16-256 in tests and demos: same class, same
    preprocessing path, loadable by encoders.load_encoder(out_dir) via AutoModel / AutoProcessor.
    hidden 32, 2 layers, patch 8; a case-sensitive WordLevel tokenizer (unknown words -> <unk>) that
    appends </s>. Deterministic for a seed; the global torch RNG is left untouched.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipProcessor

    encoders.quiet_default_token_ids()  # our config's ids are valid (bos None, eos 1 < 274 words)

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _TINY_WORDS.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=encoders.SIGLIP_TEXT.max_length,
    )
    image_processor = siglip_image_processor(size={"height": image_size, "width": image_size})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    net = random_siglip(
        small,
        len(vocab),
        image_size,
        8,
        seed,
        projection_size=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    # SigLIP's initial temperature and bias (log 10, -10), not transformers' zeros
    with torch.no_grad():
        net.logit_scale.fill_(math.log(10.0))
        net.logit_bias.fill_(-10.0)
    out_dir = str(out_dir)
    net.save_pretrained(out_dir)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _bytes_to_unicode():
    """GPT-2 / CLIP's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tiny_clip(out_dir, image_size=32, seed=0):
    """A tiny randomly initialised CLIPModel + its real CLIPProcessor (a byte-level BPE tokenizer
    over the 256 byte characters, with and without </w>, and a few merges; CLIPImageProcessor),
    saved to out_dir -> str. Offline stand-in for openai/clip-vit-base-patch16 in tests and the demo
    study. Projection 24 != hidden 32, so a wrong dim shows; end-of-text is the last id, as in
    OpenAI's vocabulary. Deterministic for a seed; the global torch RNG is left untouched."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    else:  # 4.x: the fast tokenizer from files
        from transformers import CLIPTokenizerFast

        os.makedirs(out_dir, exist_ok=True)
        with open(f"{out_dir}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{out_dir}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizerFast(f"{out_dir}/vocab.json", f"{out_dir}/merges.txt")
    tokenizer.model_max_length = encoders.CLIP_TEXT.max_length
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(size, vocab_size=len(vocab), max_position_embeddings=77)
    text.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(
        text_config=text,
        vision_config=dict(size, image_size=image_size, patch_size=8),
        projection_dim=24,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CLIPModel(config).eval()
    try:  # 5.x: the PIL processor by name (CLIPImageProcessor wants torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        pass
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    out_dir = str(out_dir)
    net.save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir

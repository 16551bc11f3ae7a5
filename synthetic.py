"""Generators for the demo, the tests and bench.py: labels at COCO's class prevalences, planted
feature caches whose labels a linear probe can recover (and folds and splits around them), and
COCO-like JPEGs. The COCO tree is synthetic_coco.py, the tiny random towers tiny_models.py.

    import synthetic
    feats = synthetic.make_planted_features(1200)             # arrays shaped like the feature cache
    features.save_features("f.safetensors", feats, feats["meta"])
    fold = synthetic.planted_fold(4096, 1024)                 # bench: as features.load_fold

None of it is needed to train or evaluate on real data; data.py, features.py and model.py do not
import it.
"""

import json
import os
from statistics import NormalDist

import numpy as np

from data import COCO_CATEGORIES, save_json
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
SUPERCATEGORY_STARTS = [2, 10, 16, 27, 34, 44, 52, 62, 72, 78, 84]


# ---------------------------------------------------------------------- synthetic labels / features


def class_prevalences(num_classes=80):
    """Per-class prevalence (C,) and supercategory group (C,): COCO's own for 80 classes, else
    log-spaced prevalences from 30% down to 0.5% in groups of 8 (a generic long-tailed label
    set)."""
    if num_classes == 80:
        group = np.searchsorted(
            SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right"
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

"""A COCO-2014-like tree in the real file formats, for the demo and the tests: JPEGs of drawn shapes
(one look per category), instances / captions annotations and Karpathy's dataset_coco.json, with
labels drawn at COCO's class prevalences (synthetic.synthetic_labels).

    import synthetic_coco
    synthetic_coco.make_synthetic_coco("demo/coco", n_images=200)  # images, annotations, ...
"""

import os

import numpy as np

from data import COCO_CATEGORIES, atomic_write, save_json
from synthetic import SUPERCATEGORY_STARTS, synthetic_labels


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
    group = np.searchsorted(SUPERCATEGORY_STARTS, [c["id"] for c in COCO_CATEGORIES], side="right")
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

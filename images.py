"""Images for the frozen towers, as extract_features.py reads them: the raw image + caption dataset,
the decode check, the augmented views (PIL only, seeded per (seed, image id, view)) and the
worker-side collate.

    import images
    img_v = images.view(img, seed=0, image_id=9, v=1)  # the same pixels on every rerun, anywhere
    ds = images.ImageCaptionDataset(dataset, rows)     # item -> (row, PIL RGB or None, captions)

A view is: random resized crop (50-100% of the area, aspect 3/4..4/3) -> horizontal flip (p 0.5) ->
small rotation / shift / scale (+-10 degrees, +-5% of the size, 0.9-1.1) -> brightness and contrast
(x 0.8-1.2). Light on purpose: the towers are frozen, and a view must still show every labelled
object.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

import encoders

# recorded in the cache's metadata: a change here is a different cache (extract_features refuses to
# mix them)
RECIPE = "crop0.5-1,flip,rot10,shift0.05,scale0.9-1.1,bright0.8-1.2,contrast0.8-1.2"
FILL = (127, 127, 127)  # corners uncovered by the rotation: ~0 after SigLIP's (x/255 - 0.5) / 0.5


def random_resized_crop(img, rng, area=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop a random box of `area` x the image's area and aspect in `ratio` (the whole image after
    10 misses)."""
    w0, h0 = img.size
    for _ in range(10):
        a = w0 * h0 * rng.uniform(*area)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < w <= w0 and 0 < h <= h0:
            x, y = int(rng.integers(0, w0 - w + 1)), int(rng.integers(0, h0 - h + 1))
            return img.crop((x, y, x + w, y + h))
    return img


def shift_scale_rotate(img, rng, degrees=10.0, shift=0.05, scale=(0.9, 1.1)):
    """Rotate by +-degrees and scale about the centre, then shift by +-shift of the size; one
    bilinear resample."""
    w, h = img.size
    theta = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(*scale)
    tx, ty = rng.uniform(-shift, shift) * w, rng.uniform(-shift, shift) * h
    # PIL maps each OUTPUT pixel p to the input point A p + b, so give it the inverse of
    # p -> s R (p - c) + c + t: input = R(-theta) (p - c - t) / s + c
    cos, sin = math.cos(theta) / s, math.sin(theta) / s
    cx, cy = w / 2, h / 2
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    return img.transform(
        (w, h),
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        resample=Image.Resampling.BILINEAR,
        fillcolor=FILL,
    )


def colour_jitter(img, rng, brightness=(0.8, 1.2), contrast=(0.8, 1.2)):
    """Scale brightness, then contrast (about the mean grey), by factors drawn from the given
    ranges."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(*brightness))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(*contrast))


def augment(img, rng):
    """One light augmentation of an RGB PIL image, every draw from `rng` (a numpy Generator), in a
    fixed order."""
    img = random_resized_crop(img, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = shift_scale_rotate(img, rng)
    return colour_jitter(img, rng)


def view(img, seed, image_id, v):
    """View v >= 1 of the image with this (e.g. COCO) id: seeded by (seed, image_id, v), so reruns,
    other worker counts and other ranks all give the same pixels. View 0 is the plain image and
    never comes here."""
    return augment(img.convert("RGB"), np.random.default_rng([int(seed), int(image_id), int(v)]))


# ---------------------------------------------------------------------------- reading and collating


class ImageCaptionDataset:
    """Raw images + captions of load_coco's rows: item i -> (row index, PIL RGB image or None,
    captions).

    An unreadable / corrupt image gives None instead of raising, so extraction can record it as bad.
    A plain map-style dataset (torch's DataLoader takes it as is).
    collate_fn=ImageCaptionDataset.collate -> (indices, images, captions) lists.
    """

    def __init__(self, coco, indices=None):
        self.paths, self.captions = coco["paths"], coco["captions"]
        self.indices = (
            list(range(len(self.paths))) if indices is None else [int(i) for i in indices]
        )

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


def check_image(path):
    """None if the file decodes completely, else 'ExcType: message'. verify() misses truncation, so
    decode; draft mode (JPEG DCT scaling) still reads every byte of the stream at a fraction of the
    cost."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))
            im.load()
        return None
    except Exception as e:  # any failure to decode: missing, not an image, truncated, bomb
        return f"{type(e).__name__}: {e}"


def check_batch(paths):
    return [check_image(p) for p in paths]  # in the worker processes (a module function: picklable)


class Collate:
    """Worker-side preprocessing: (row, PIL, captions) items -> pixel_values (B*V, 3, H, W),
    input_ids (T, L) [+ attention_mask (T, L)] by the family's text_rule (encoders.TextRule)."""

    def __init__(
        self, image_processor, tokenizer, ids, n_views, max_captions, seed, text_rule=None
    ):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.text_rule = text_rule or encoders.SIGLIP_TEXT
        self.ids, self.views, self.max_captions, self.seed = ids, n_views, max_captions, seed

    def __call__(self, items):
        unreadable = [row for row, img, _ in items if img is None]
        if unreadable:  # changed on disk since the check: the main process stops with a message
            return {"unreadable": unreadable}
        rows, imgs, caps = [], [], []
        for row, img, captions in items:
            rows.append(row)
            imgs.append(img)
            for v in range(1, self.views):  # seeded by (seed, COCO id, view): same on a rerun
                imgs.append(view(img, self.seed, self.ids[row], v))
            caps.append(list(captions)[: self.max_captions])
        texts = [c for cs in caps for c in cs]
        # pixel_values (B*V, 3, H, W); NaFlex (B*V, N, 3*p*p) + pixel_attention_mask, spatial_shapes
        pixels = encoders.image_inputs(self.image_processor, imgs)
        return {
            "rows": torch.tensor(rows),
            **pixels,
            **self.text_rule(self.tokenizer, texts),  # (T, L) each, T = captions of the batch
            "n_captions": torch.tensor([len(c) for c in caps]),
        }

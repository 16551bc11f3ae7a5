"""
Run the frozen SigLIP2 towers ONCE over every dev + test image and its captions; cache the raw pooled
embeddings (not normalised) in one safetensors file that train.py and evaluate.py read.

    python extract_features.py --data_root data/coco    # cuda fp16 -> <data_root>/features_<model>.safetensors
    python extract_features.py --data_root data/coco --views 3             # + 2 augmented views per image
    python extract_features.py --data_root data/coco --limit 200 --device cpu --out /tmp/f.safetensors  # quick try
    python extract_features.py --data_root data/coco --skip_bad_images     # leave unreadable images out

Cache (see data.load_features): ids int64 [N], image float16 [N,V,D] (view 0 = the plain image), text float16
[N,C,D] (zero rows past n_captions), n_captions int64 [N], labels uint8 [N,80], prompts float16 [80,D]
("a photo of a {name}."), metadata: model, dim, views, max_captions, image_size, logit scale/bias, ...

Robustness: every image is decoded once before any encoding; unreadable ones stop the run (exit 2, all listed)
unless --skip_bad_images. Work is done in shards written atomically to <out>.parts/, so a killed run resumes
where it stopped and ends with the same file as an uninterrupted one. An existing --out made with another
model / max_captions / views / data is refused; with the same settings it is reported up to date.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli
import data
import model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEV_SPLITS = ("train", "restval", "val")
# settings that decide the cache's content: a different value makes a different file
IDENTITY = ("model", "max_captions", "views", "fingerprint", "limit", "seed")


def get_args_parser():
    p = cli.Parser("extract_features", description="Cache frozen SigLIP2 embeddings of COCO images and captions")
    # data
    g = p.add_argument_group("data")
    g.add_argument("--data_root", default="data/coco", help="COCO root: dataset_coco.json, annotations/, images")
    g.add_argument("--max_captions", type=cli.positive_int, default=5, help="captions kept per image (COCO has 5-7)")
    g.add_argument("--views", type=cli.positive_int, default=1,
                   help="image views per image: view 0 is the plain image, the others a random resized crop "
                        "(50-100%% of the area) + horizontal flip, seeded per image so reruns agree")
    g.add_argument("--limit", type=cli.positive_int, default=None,
                   help="only the first N dev and the first N test images (by id), for a quick try")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="leave unreadable images out of the cache (listed in metadata bad_images) "
                        "instead of stopping with exit code 2")
    g.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    # model
    g = p.add_argument_group("model")
    g.add_argument("--model", default="google/siglip2-base-patch16-256",
                   help="Hugging Face name or local folder of a fixed-resolution SigLIP/SigLIP2 model")
    g.add_argument("--prompts", action="store_true", default=True,
                   help="also cache the embedding of 'a photo of a {name}.' per class (zero-shot baseline)")
    g.add_argument("--no_prompts", dest="prompts", action="store_false", default=argparse.SUPPRESS,
                   help="do not cache the class prompts")
    # optim (throughput)
    g = p.add_argument_group("optim (throughput)")
    g.add_argument("--batch_size", type=cli.positive_int, default=64, help="images per forward pass")
    g.add_argument("--num_workers", type=cli.nonneg_int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes; the default is 4, or the number of cores if fewer")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="tower precision; default fp16 on cuda, fp32 on cpu")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out", default=None,
                   help="output .safetensors; default <data_root>/features_<model basename>.safetensors")
    g.add_argument("--shard_size", type=cli.positive_int, default=2048,
                   help="images per resumable shard in <out>.parts/ (a killed run loses at most one shard)")
    return p


# ----------------------------------------------------------------------------- images

def check_image(path):
    """None if the file decodes completely, else 'ExcType: message'. verify() misses truncation, so decode;
    draft mode (JPEG DCT scaling) still reads every byte of the stream at a fraction of the cost."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))
            im.load()
        return None
    except Exception as e:  # any failure to decode: missing, not an image, truncated, decompression bomb
        return f"{type(e).__name__}: {e}"


class _CheckSet(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return check_image(self.paths[i])


def find_bad_images(paths, num_workers):
    """Decode every image once (in worker processes) -> list of (position, error) for the unreadable ones."""
    loader = torch.utils.data.DataLoader(_CheckSet(paths), batch_size=32, num_workers=num_workers,
                                         collate_fn=list)
    errors = [e for batch in tqdm(loader, desc="check images", unit="batch", leave=False) for e in batch]
    return [(i, e) for i, e in enumerate(errors) if e is not None]


def augment(img, rng):
    """Light augmentation: random resized crop (50-100% of the area, aspect 3/4..4/3) + horizontal flip."""
    w0, h0 = img.size
    box = (0, 0, w0, h0)
    for _ in range(10):
        area = w0 * h0 * rng.uniform(0.5, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= w0 and 0 < h <= h0:
            x, y = int(rng.integers(0, w0 - w + 1)), int(rng.integers(0, h0 - h + 1))
            box = (x, y, x + w, y + h)
            break
    img = img.crop(box)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


class Collate:
    """Worker-side preprocessing: (row, PIL, captions) items -> pixel_values (B*V, 3, H, W), input_ids (T, 64)."""

    def __init__(self, image_processor, tokenizer, ids, views, max_captions, seed):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.ids, self.views, self.max_captions, self.seed = ids, views, max_captions, seed

    def __call__(self, items):
        unreadable = [row for row, img, _ in items if img is None]
        if unreadable:  # changed on disk since the check: the main process stops with a message
            return {"unreadable": unreadable}
        rows, imgs, caps = [], [], []
        for row, img, captions in items:
            rows.append(row)
            imgs.append(img)
            for v in range(1, self.views):  # seeded by (seed, COCO id, view): the same crops on every rerun
                imgs.append(augment(img, np.random.default_rng([self.seed, int(self.ids[row]), v])))
            caps.append(list(captions)[:self.max_captions])
        texts = [c for cs in caps for c in cs]
        tok = model.tokenize(self.tokenizer, texts) if texts else torch.zeros(0, model.TEXT_MAX_LENGTH).long()
        return {"rows": torch.tensor(rows),
                "pixel_values": model.preprocess_images(self.image_processor, imgs),  # (B*V, 3, H, W)
                "input_ids": tok,  # (T, 64), T = captions of the whole batch
                "n_captions": torch.tensor([len(c) for c in caps])}


# ----------------------------------------------------------------------------- shards

def shard_path(parts, s):
    return os.path.join(parts, f"shard_{s:05d}.safetensors")


def write_shard(path, tensors, meta):
    from safetensors.torch import save_file
    data.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def finished_shards(parts, run, n_shards):
    """Indices of the shards already in `parts` for this exact run; a shard of another run is refused."""
    from safetensors import safe_open
    done = set()
    if not os.path.isdir(parts):
        return done
    for name in sorted(os.listdir(parts)):
        m = re.fullmatch(r"shard_(\d{5})\.safetensors", name)  # temporaries of a killed write do not match
        if not m:
            continue
        path = os.path.join(parts, name)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:
            print(f"note: {path} is unreadable; encoding that shard again")
            os.remove(path)
            continue
        for k, v in run.items():
            if meta.get(k) != v:
                cli.fail(f"{path}: left by a different run ({k} {meta.get(k)!r} there, {v!r} now); "
                     f"delete {parts} to start over, or pass another --out")
        if int(m.group(1)) < n_shards:
            done.add(int(m.group(1)))
    return done


def existing_output(out, want):
    """True if `out` exists with the same identity settings; refuse (exit 2) if it differs; False if absent."""
    from safetensors import safe_open
    if not os.path.exists(out):
        return False
    try:
        with safe_open(out, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        cli.fail(f"{out}: exists but is not a readable feature cache; delete it or pass another --out")
    for k in IDENTITY:
        if meta.get(k) != want[k]:
            cli.fail(f"{out}: exists with {k} {meta.get(k)!r}, this run has {want[k]!r}; "
                 f"pass another --out or delete it")
    return True


# ----------------------------------------------------------------------------- encode + merge

def encode_shards(encoder, coco, rows, todo, parts, run, args):
    """Encode the images rows[s*shard_size : (s+1)*shard_size] of every shard s in `todo`, one shard file each."""
    ids_all, n, size = np.asarray(coco["ids"]), len(rows), args.shard_size
    V, C, D, dtype_name = args.views, args.max_captions, encoder.dim, run["dtype"]
    # batches never straddle two shards, so a shard's content does not depend on which shards were done
    batches = [list(range(b, min(b + args.batch_size, (s + 1) * size, n)))
               for s in todo for b in range(s * size, min((s + 1) * size, n), args.batch_size)]
    dataset = data.ImageCaptionDataset(coco, rows)  # item j -> (row of image j, PIL RGB or None, captions)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=args.num_workers,
        collate_fn=Collate(encoder.image_processor, encoder.tokenizer, ids_all, V, C, args.seed))
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="encode", dynamic_ncols=True)
    buf, t0, n_caps = [], time.time(), 0
    for batch in loader:
        if "unreadable" in batch:
            cli.fail(f"{coco['paths'][batch['unreadable'][0]]}: became unreadable during the run; fix it and "
                 f"rerun (finished shards are kept)")
        img = encoder.encode_pixels(batch["pixel_values"]).view(-1, V, D).half()  # (B, V, D)
        tok, ncap = batch["input_ids"], batch["n_captions"]  # (T, 64) every caption of the batch; (B,)
        txt_flat = encoder.encode_tokens(tok) if len(tok) else torch.zeros(0, D)  # (T, D)
        txt = torch.zeros(len(ncap), C, D, dtype=torch.float16)  # (B, C, D), zero rows past n_captions
        txt[torch.arange(C)[None, :] < ncap[:, None]] = txt_flat.half()  # row-major: image i, captions 0..n_i-1
        if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):  # also catches float16 overflow
            cli.fail(f"--dtype {dtype_name}: non-finite embeddings near COCO id {int(ids_all[batch['rows'][0]])}; "
                 f"rerun with --dtype bf16 or fp32")
        buf.append((batch["rows"], img, txt, ncap))
        n_caps += int(ncap.sum())
        bar.update(len(ncap))
        s = todo[0]
        if sum(len(b[0]) for b in buf) == min((s + 1) * size, n) - s * size:  # shard s complete
            r = torch.cat([b[0] for b in buf]).numpy()
            tensors = {"ids": torch.from_numpy(ids_all[r]).long(), "image": torch.cat([b[1] for b in buf]),
                       "text": torch.cat([b[2] for b in buf]), "n_captions": torch.cat([b[3] for b in buf]).long()}
            write_shard(shard_path(parts, s), tensors, dict(run, shard=str(s)))
            buf, todo = [], todo[1:]
    bar.close()
    if bar.n:
        secs = time.time() - t0
        print(f"encoded {bar.n} images ({bar.n * V} views) and {n_caps} captions in {secs:.1f} s: "
              f"{bar.n / max(secs, 1e-9):.1f} images/s")


def merge_shards(parts, ids, n_shards, size, V, C, D):
    """Shard files -> ids / image / text / n_captions tensors of the whole cache, in row order."""
    from safetensors.torch import load_file
    n = len(ids)
    out = {"ids": torch.from_numpy(ids).long(), "image": torch.empty(n, V, D, dtype=torch.float16),
           "text": torch.empty(n, C, D, dtype=torch.float16), "n_captions": torch.empty(n, dtype=torch.long)}
    for s in range(n_shards):
        part, sl = load_file(shard_path(parts, s)), slice(s * size, min((s + 1) * size, n))
        if not torch.equal(part["ids"], out["ids"][sl]):
            cli.fail(f"{shard_path(parts, s)}: holds other images than expected; delete {parts} and rerun")
        for k in ("image", "text", "n_captions"):
            out[k][sl] = part[k]
    return out


# ----------------------------------------------------------------------------- main

def main(args):
    t0 = time.time()
    name = os.path.basename(args.model.rstrip("/"))
    out = args.out or os.path.join(args.data_root, f"features_{name}.safetensors")
    dtype_name = args.dtype or ("fp16" if str(args.device).startswith("cuda") else "fp32")
    try:
        coco = data.load_coco(args.data_root)
    except data.DataError as e:
        cli.fail(str(e))
    ids_all = np.asarray(coco["ids"])
    dev_rows = np.flatnonzero([s in DEV_SPLITS for s in coco["splits"]])
    test_rows = np.flatnonzero([s == "test" for s in coco["splits"]])
    if args.limit:
        dev_rows, test_rows = dev_rows[:args.limit], test_rows[:args.limit]
    rows = np.sort(np.concatenate([dev_rows, test_rows]))  # load_coco sorts by id: rows ascend by id too
    ident = {"model": args.model, "max_captions": str(args.max_captions), "views": str(args.views),
             "fingerprint": str(coco["fingerprint"]), "limit": str(args.limit or 0), "seed": str(args.seed)}
    if existing_output(out, ident):
        shutil.rmtree(out + ".parts", ignore_errors=True)  # leftovers of a run killed after its final write
        print(f"up to date: {out} ({args.model}, max_captions {args.max_captions}, views {args.views})")
        return out

    # ---- every image decodes, or the user hears about all the bad ones at once
    bad = find_bad_images([coco["paths"][r] for r in rows], args.num_workers)
    if bad and not args.skip_bad_images:
        listing = "; ".join(f"{coco['paths'][rows[i]]} ({e})" for i, e in bad)
        cli.fail(f"{args.data_root}: {len(bad)} unreadable image(s): {listing}; replace them, or pass "
             f"--skip_bad_images to leave them out")
    bad_ids = [int(ids_all[rows[i]]) for i, _ in bad]
    for i, e in bad:
        print(f"skipping unreadable image {coco['paths'][rows[i]]} ({e})")
    rows = np.delete(rows, [i for i, _ in bad])
    n = len(rows)
    if n == 0:
        cli.fail(f"{args.data_root}: no readable dev/test images to encode")

    # ---- shards: fixed slices of `rows`, each stamped with the run's settings and a hash of its image ids
    run = dict(ident, dtype=dtype_name, shard_size=str(args.shard_size),
               rows=hashlib.sha256(ids_all[rows].astype(np.int64).tobytes()).hexdigest()[:16])
    parts = out + ".parts"
    n_shards = (n + args.shard_size - 1) // args.shard_size
    done = finished_shards(parts, run, n_shards)
    if done:
        print(f"resuming: {len(done)} of {n_shards} shards already in {parts}")
    try:
        encoder = model.Siglip2Encoder(args.model, device=args.device, dtype=DTYPES[dtype_name])
    except (OSError, ValueError) as e:
        where = "" if os.path.exists(args.model) else "not a folder here; "
        cli.fail(f"--model {args.model}: cannot load it ({where}{str(e).splitlines()[0] if str(e) else type(e).__name__}); "
             f"give a Hugging Face name or a local folder of a SigLIP model")
    V, C, D = args.views, args.max_captions, encoder.dim
    print(f"{n} images ({len(bad)} skipped) x {V} view(s), <= {C} captions each, {args.model} (dim {D}, "
          f"{encoder.image_size}px) on {args.device} {dtype_name}, {n_shards} shard(s) of {args.shard_size}")
    encode_shards(encoder, coco, rows, [s for s in range(n_shards) if s not in done], parts, run, args)

    # ---- one cache file: shards + labels + class prompts + metadata
    tensors = merge_shards(parts, ids_all[rows], n_shards, args.shard_size, V, C, D)
    tensors["labels"] = torch.from_numpy(np.asarray(coco["labels"])[rows].astype(np.uint8))  # (N, 80)
    if args.prompts:
        prompts = [f"a photo of a {c['name']}." for c in coco["categories"]]
        tensors["prompts"] = encoder.encode_texts(prompts).half()  # (80, D)
    import transformers
    meta = dict(ident, dim=D, image_size=encoder.image_size, transformers_version=transformers.__version__,
                logit_scale=encoder.logit_scale, logit_bias=encoder.logit_bias,
                categories=json.dumps(coco["categories"]), bad_images=json.dumps(bad_ids), dtype=dtype_name,
                n_images=n)
    data.save_features(out, tensors, meta)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"wrote {out}: {n} images, image {tuple(tensors['image'].shape)}, text {tuple(tensors['text'].shape)} "
          f"float16, {len(bad_ids)} bad image(s) left out, {time.time() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""
Run the frozen SigLIP2 towers ONCE over every dev + test image and its captions; cache the raw
pooled embeddings (not normalised) in one safetensors file that train.py and evaluate.py read.

    # cuda fp16 -> <data_root>/features_<model>.safetensors
    python extract_features.py --data_root data/coco
    # + 2 augmented views per image
    python extract_features.py --data_root data/coco --views 3
    # a quick try
    python extract_features.py --data_root data/coco --limit 200 --device cpu --out /tmp/f.st
    # leave unreadable images out
    python extract_features.py --data_root data/coco --skip_bad_images
    # 8 GPUs, the same file as one
    torchrun --nproc_per_node 8 extract_features.py --data_root data/coco

Cache (see features.load_features): ids int64 [N], image float16 [N,V,D] (view 0 = the plain
image), text float16 [N,C,D] (zero rows past n_captions), n_captions int64 [N], labels uint8 [N,80],
prompts float16 [80,D] ("a photo of a {name}."), metadata: model, dim, views, max_captions,
image_size, logit scale/bias, ...

Robustness: every image is decoded once before any encoding; unreadable ones stop the run (exit
2, all listed) unless --skip_bad_images. Work is done in shards written atomically to
<out>.parts/, so a killed run resumes where it stopped and ends with the same file as an
uninterrupted one. An existing --out made with another model / max_captions / views /
augmentation / data is refused; with the same settings it is reported up to date.

Under torchrun (NCCL on cuda, gloo on cpu) shard s belongs to rank s % world_size, each rank writes
its own, rank 0 merges after a barrier; <out>.parts/ must be on a filesystem every node sees. A dead
rank loses only its unfinished shard: a rerun with any number of ranks, or one plain process,
encodes only the missing ones. One extraction per --out (rank 0 holds <out>.lock); SIGTERM / SIGUSR1
(a preemption) stop it after the current batch with exit 75, losing only the shard in work.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from datetime import timedelta

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import encoders
import features
import images
import locks
import preempt
from shards import finished_shards, merge_shards, shard_path, write_shard

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEV_SPLITS = ("train", "restval", "val")
# settings that decide the cache's content: a different value makes a different file
IDENTITY = ("model", "max_captions", "views", "fingerprint", "limit", "seed", "augment")
IDENTITY += ("max_num_patches",)


def get_args_parser():
    p = cli.Parser(
        "extract_features",
        description="Cache frozen SigLIP2 embeddings of COCO images and captions",
    )
    # data
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_root",
        default="data/coco",
        help="COCO root: dataset_coco.json, annotations/, images",
    )
    g.add_argument(
        "--max_captions",
        type=cli.positive_int,
        default=5,
        help="captions kept per image (COCO has 5-7)",
    )
    g.add_argument(
        "--views",
        type=cli.positive_int,
        default=1,
        help="views per image: view 0 plain, the others images.py's seeded light augmentation",
    )
    g.add_argument(
        "--limit",
        type=cli.positive_int,
        default=None,
        help="only the first N dev and the first N test images (by id), for a quick try",
    )
    g.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="leave unreadable images out (metadata bad_images) instead of exit code 2",
    )
    g.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the augmented views")
    # model
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="google/siglip2-base-patch16-256",
        help="Hugging Face name or local folder of a CLIP, SigLIP/SigLIP2 or SigLIP2 NaFlex model",
    )
    g.add_argument(
        "--max_num_patches",
        type=cli.positive_int,
        default=None,
        help="NaFlex (siglip2) only: patches per image; default: the checkpoint processor's",
    )
    g.add_argument(
        "--prompts",
        action="store_true",
        default=True,
        help="also cache the embedding of 'a photo of a {name}.' per class (zero-shot baseline)",
    )
    g.add_argument(
        "--no_prompts",
        dest="prompts",
        action="store_false",
        default=argparse.SUPPRESS,
        help="do not cache the class prompts",
    )
    # optim (throughput)
    g = p.add_argument_group("optim (throughput)")
    g.add_argument(
        "--batch_size", type=cli.positive_int, default=64, help="images per forward pass"
    )
    g.add_argument(
        "--num_workers",
        type=cli.nonneg_int,
        default=None,
        help="DataLoader decode processes per rank; default: this rank's cores less one, <= 16",
    )
    g.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    g.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="tower precision; default fp16 on cuda, fp32 on cpu",
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument(
        "--out",
        default=None,
        help="output .safetensors; default <data_root>/features_<model basename>.safetensors",
    )
    g.add_argument(
        "--shard_size",
        type=cli.positive_int,
        default=2048,
        help="images per resumable shard in <out>.parts/",
    )
    g.add_argument(
        "--dist_timeout",
        type=cli.positive_int,
        default=3600,
        help="torchrun: seconds a rank waits for its peers before an error",
    )
    return p


# ----------------------------------------------------------------------------- images


def find_bad_images(paths, num_workers, rank=0, world=1):
    """Decode every image once (in worker processes) -> sorted (position, error) of the unreadable
    ones. Under torchrun rank r decodes paths[r::world] and the ranks swap their lists: the same
    answer on each."""
    loader = torch.utils.data.DataLoader(
        paths[rank::world], batch_size=32, num_workers=num_workers, collate_fn=images.check_batch
    )
    errors, bar = [], tqdm(loader, desc="check images", unit="batch", leave=False, disable=rank > 0)
    for batch in bar:
        if preempt.pending():  # a stop signal: nothing to keep yet
            bar.close()
        preempt.check("while checking the images")
        errors += batch
    bad = [(i * world + rank, e) for i, e in enumerate(errors) if e is not None]  # in `paths`
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, bad)
        bad = sorted(b for lst in every for b in lst)
    return bad


# ------------------------------------------------------------------- distributed + data loading


def init_distributed(device, timeout_s):
    """torchrun's environment -> (rank, world_size, device): NCCL and this rank's LOCAL_RANK GPU on
    cuda, gloo on cpu. A plain run (no WORLD_SIZE, or 1) -> (0, 1, device) without touching
    torch.distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = str(device).startswith("cuda")
    if cuda:  # one GPU per rank: cuda:LOCAL_RANK, whatever index --device named
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # the timeout bounds every wait on a peer (else a dead rank holds the others for gloo's 30 min)
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s)
    )
    return int(os.environ["RANK"]), world, device


def wait_for_peers(rank, timeout_s, parts):
    """Barrier: every rank has written its shards. A peer that died or stalls raises DataError."""
    dist = torch.distributed
    try:
        dist.barrier(
            device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
        )
    except RuntimeError as e:  # DistBackendError and gloo's timeouts are RuntimeErrors
        raise data.DataError(
            f"rank {rank}: a peer did not reach the barrier within --dist_timeout {timeout_s} s "
            f"(it died or stalls: {type(e).__name__}); finished shards stay in {parts}: rerun "
            f"(any number of ranks) to encode only the missing ones"
        ) from None


def default_workers():
    """-> (cores this process may use: sched_getaffinity sees taskset / cgroup cpusets / a
    scheduler's share, DataLoader workers per rank: those cores split among this node's ranks, less
    one for the process driving the GPU, at most 16 for shared memory, see make_loader)."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return cores, max(0, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def make_loader(dataset, batches, collate, num_workers, device):
    """Decoding + preprocessing in `num_workers` processes. Pinned batches copy to the GPU faster; 2
    batches in flight per worker (16 x 2 x 64 images x V x 3x256x256 float32 = 1.6 GB x V of shared
    memory) keep it fed once the workers keep up at all. Not persistent: iterated once."""
    extra = {"prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=str(device).startswith("cuda"),
        **extra,
    )


# ----------------------------------------------------------------------------- the cache


def existing_output(out, want):
    """True if `out` exists with the same identity settings, False if absent; DataError if it
    differs."""
    from safetensors import safe_open

    if not os.path.exists(out):
        return False
    try:
        with safe_open(out, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        raise data.DataError(
            f"{out}: exists but is not a readable feature cache; delete it or pass another --out"
        ) from None
    # a cache from before "augment" was recorded: with 1 view it had no augmentation
    old = {"augment": "none"} if meta.get("views") == "1" else {}
    old["max_num_patches"] = "0"  # and before NaFlex: no patch budget
    for k in IDENTITY:
        if meta.get(k, old.get(k)) != want[k]:
            raise data.DataError(
                f"{out}: exists with {k} {meta.get(k)!r}, this run has {want[k]!r}; "
                f"pass another --out or delete it"
            )
    return True


# ----------------------------------------------------------------------------- encode + merge


def encode_batch(encoder, batch, V, C):
    """One loader batch through the towers -> image (B, V, D) and text (B, C, D) float16, zero rows
    past each image's n_captions."""
    D = encoder.dim
    pixels = {k: batch[k] for k in encoder.image_keys}  # NaFlex: + the mask and patch grids
    img = encoder.encode_pixels(**pixels).view(-1, V, D).half()  # (B, V, D)
    tok, ncap = batch["input_ids"], batch["n_captions"]  # (T, L) every caption of the batch; (B,)
    mask = batch.get("attention_mask")  # (T, L) where the family passes one
    txt_flat = encoder.encode_tokens(tok, mask) if len(tok) else torch.zeros(0, D)  # (T, D)
    txt = torch.zeros(len(ncap), C, D, dtype=torch.float16)
    txt[torch.arange(C)[None, :] < ncap[:, None]] = txt_flat.half()  # image i, captions 0..n_i-1
    return img, txt


def encode_shards(encoder, coco, rows, todo, parts, run, args, workers, rank=0, world=1):
    """Encode the images rows[s*shard_size : (s+1)*shard_size] of every shard s in `todo`, one
    shard file each. -> images per second of this pass (decode + towers), None if none to do."""
    ids_all, n, size = np.asarray(coco["ids"]), len(rows), args.shard_size
    V, C, dtype_name = args.views, args.max_captions, run["dtype"]
    if not todo:
        return None
    # batches never straddle two shards: a shard's content does not depend on which were done
    batches = [
        list(range(b, min(b + args.batch_size, (s + 1) * size, n)))
        for s in todo
        for b in range(s * size, min((s + 1) * size, n), args.batch_size)
    ]
    # item j -> (row of image j, PIL RGB or None, captions)
    dataset = images.ImageCaptionDataset(coco, rows)
    loader = make_loader(
        dataset,
        batches,
        images.Collate(
            encoder.image_processor, encoder.tokenizer, ids_all, V, C, args.seed, encoder.text_rule
        ),
        workers,
        encoder.device,
    )
    bar = tqdm(
        total=sum(len(b) for b in batches),
        unit="img",
        desc="encode",
        dynamic_ncols=True,
        disable=rank > 0,
    )
    buf, t0, n_imgs, n_caps = [], time.time(), 0, 0
    for batch in loader:
        # a stop signal: drop the shard in work (its batches so far); finished shards are on disk
        if preempt.pending():
            bar.close()
        preempt.check(f"while encoding shard {todo[0]}")
        if "unreadable" in batch:
            raise data.DataError(
                f"{coco['paths'][batch['unreadable'][0]]}: became unreadable during the run; "
                f"fix it and rerun (finished shards are kept)"
            )
        img, txt = encode_batch(encoder, batch, V, C)
        if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):  # float16 overflow too
            raise data.DataError(
                f"--dtype {dtype_name}: non-finite embeddings near COCO id "
                f"{int(ids_all[batch['rows'][0]])}; rerun with --dtype bf16 or fp32"
            )
        ncap = batch["n_captions"]  # (B,)
        buf.append((batch["rows"], img, txt, ncap))
        n_imgs, n_caps = n_imgs + len(ncap), n_caps + int(ncap.sum())
        bar.update(len(ncap))
        s = todo[0]
        if sum(len(b[0]) for b in buf) == min((s + 1) * size, n) - s * size:  # shard s complete
            r = torch.cat([b[0] for b in buf]).numpy()
            tensors = {
                "ids": torch.from_numpy(ids_all[r]).long(),
                "image": torch.cat([b[1] for b in buf]),
                "text": torch.cat([b[2] for b in buf]),
                "n_captions": torch.cat([b[3] for b in buf]).long(),
            }
            write_shard(shard_path(parts, s), tensors, dict(run, shard=str(s)))
            buf, todo = [], todo[1:]
    bar.close()
    if n_imgs:
        secs = time.time() - t0
        print(
            f"{f'rank {rank}: ' if world > 1 else ''}encoded {n_imgs} images ({n_imgs * V} views) "
            f"and {n_caps} captions in {secs:.1f} s: {n_imgs / max(secs, 1e-9):.1f} images/s"
        )
        return n_imgs / max(secs, 1e-9)
    return None


# ----------------------------------------------------------------------------- main


def readable_rows(coco, rows, args, workers, rank, world):
    """Decode every image once -> (rows without the unreadable ones, their ids); every bad one
    named in one error."""
    bad = find_bad_images([coco["paths"][r] for r in rows], workers, rank, world)
    if bad and not args.skip_bad_images:
        listing = "; ".join(f"{coco['paths'][rows[i]]} ({e})" for i, e in bad)
        raise data.DataError(
            f"{args.data_root}: {len(bad)} unreadable image(s): {listing}; replace them, or pass "
            f"--skip_bad_images to leave them out"
        )
    for i, e in bad if rank == 0 else ():
        print(f"skipping unreadable image {coco['paths'][rows[i]]} ({e})")
    if len(bad) == len(rows):
        raise data.DataError(f"{args.data_root}: no readable dev/test images to encode")
    return np.delete(rows, [i for i, _ in bad]), [int(coco["ids"][rows[i]]) for i, _ in bad]


def write_cache(out, parts, encoder, coco, rows, n_shards, meta, args):
    """Rank 0, every shard present: shards + labels + class prompts + metadata -> one cache file."""
    tensors = merge_shards(
        parts,
        np.asarray(coco["ids"])[rows],
        n_shards,
        args.shard_size,
        args.views,
        args.max_captions,
        encoder.dim,
    )
    labels = np.asarray(coco["labels"])[rows].astype(np.uint8)  # (N, C)
    tensors["labels"] = torch.from_numpy(labels)
    if args.prompts:
        prompts = [f"a photo of a {c['name']}." for c in coco["categories"]]
        tensors["prompts"] = encoder.encode_texts(prompts).half()  # (C, D)
    import transformers

    features.save_features(
        out,
        tensors,
        dict(
            {k: meta["run"][k] for k in IDENTITY},
            **encoder.cache_meta(),  # family, dim, resolution, text length, logit scale / bias
            transformers_version=transformers.__version__,
            categories=json.dumps(coco["categories"]),
            bad_images=json.dumps(meta["bad_ids"]),
            dtype=meta["run"]["dtype"],
            n_images=len(rows),
        ),
    )
    shutil.rmtree(parts, ignore_errors=True)
    return tensors


def cost_path(out):
    """<cache>.cost.json: images/s of the extraction that wrote the cache (rank 0's pass: decode
    + towers), its ranks and device; the study's backbone table reads it."""
    return os.path.splitext(out)[0] + ".cost.json"


def out_path(args):
    name = os.path.basename(args.model.rstrip("/"))
    return args.out or os.path.join(args.data_root, f"features_{name}.safetensors")


def lock_output(out, rank, world):
    """Rank 0 takes <out>.lock and every rank learns whether it got it (one broadcast, before any
    work): a second extraction onto one cache stops on all its ranks, none waits at a barrier.
    -> the lock path to release (rank 0) or None."""
    path, err = out + ".lock", None
    if rank == 0:
        try:
            locks.acquire(path, "extract_features.py")
        except data.DataError as e:
            err = str(e)
    if world > 1:
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise data.DataError(err)
    return path if rank == 0 else None


def cache_rows(coco, limit):
    """The dataset's rows the cache holds: the development pool and the test split (each cut to its
    first `limit` with --limit), in id order."""
    dev_rows = np.flatnonzero([s in DEV_SPLITS for s in coco["splits"]])
    test_rows = np.flatnonzero([s == "test" for s in coco["splits"]])
    if limit:
        dev_rows, test_rows = dev_rows[:limit], test_rows[:limit]
    return np.sort(np.concatenate([dev_rows, test_rows]))  # ids are sorted: rows ascend by id too


def identity(args, coco):
    """The settings that make a cache what it is (IDENTITY, in its metadata): a cache with other
    values is another cache."""
    return {
        "model": args.model,
        "max_captions": str(args.max_captions),
        "views": str(args.views),
        "fingerprint": str(coco["fingerprint"]),
        "limit": str(args.limit or 0),
        "seed": str(args.seed),
        "augment": images.RECIPE if args.views > 1 else "none",
        "max_num_patches": str(args.max_num_patches or 0),
    }


def load_model(args, device, dtype_name):
    """--model's towers as an encoders.Encoder; one that cannot be loaded: data.DataError naming
    the supported families."""
    try:
        return encoders.load_encoder(
            args.model, device, DTYPES[dtype_name], max_num_patches=args.max_num_patches
        )
    except (OSError, ValueError) as e:
        where = "" if os.path.exists(args.model) else "not a folder here; "
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise data.DataError(
            f"--model {args.model}: cannot load it ({where}{cause}); "
            f"give a Hugging Face name or a local folder of one of: {encoders.supported()}"
        ) from None


def extract(args, rank, world, device):
    t0, say = time.time(), (print if rank == 0 else lambda *a, **k: None)
    out = out_path(args)
    dtype_name = args.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")
    coco = data.load_dataset(args.data_root)
    rows, ident = cache_rows(coco, args.limit), identity(args, coco)
    if existing_output(out, ident):
        if rank == 0:  # leftovers of a run killed after its final write
            shutil.rmtree(out + ".parts", ignore_errors=True)
        say(
            f"up to date: {out} ({args.model}, max_captions {args.max_captions}, "
            f"views {args.views})"
        )
        return out
    cores, workers = default_workers()
    workers = workers if args.num_workers is None else args.num_workers
    say(
        f"data loading: {workers} worker process(es) per rank ({cores} cores available to this "
        f"process{'' if args.num_workers is None else ', --num_workers'}), {world} rank(s)"
    )
    rows, bad_ids = readable_rows(coco, rows, args, workers, rank, world)
    n, ids_all = len(rows), np.asarray(coco["ids"])

    # ---- shards: fixed slices of `rows`, stamped with the run's settings and a hash of its image
    # ids; shard s belongs to rank s % world whatever is done already, so ranks need not agree on
    # what they saw in `parts`
    run = dict(
        ident,
        dtype=dtype_name,
        shard_size=str(args.shard_size),
        rows=hashlib.sha256(ids_all[rows].astype(np.int64).tobytes()).hexdigest()[:16],
    )
    parts = out + ".parts"
    n_shards = (n + args.shard_size - 1) // args.shard_size
    done = finished_shards(parts, run, n_shards, owns=lambda s: s % world == rank)
    if done:
        say(f"resuming: {len(done)} of {n_shards} shards already in {parts}")
    todo = [s for s in range(n_shards) if s % world == rank and s not in done]
    encoder = load_model(args, device, dtype_name)
    say(
        f"{n} images ({len(bad_ids)} skipped) x {args.views} view(s), <= {args.max_captions} "
        f"captions each, {args.model} (dim {encoder.dim}, {encoder.resolution}) on {device} "
        f"{dtype_name}, {n_shards} shard(s) of {args.shard_size}"
        + (f", {len(todo)} to encode on rank 0 of {world}" if world > 1 else "")
    )
    speed = encode_shards(encoder, coco, rows, todo, parts, run, args, workers, rank, world)
    if world > 1:
        wait_for_peers(rank, args.dist_timeout, parts)
        if rank > 0:
            return None  # rank 0 merges
    tensors = write_cache(
        out, parts, encoder, coco, rows, n_shards, {"run": run, "bad_ids": bad_ids}, args
    )
    # what it cost, beside the cache (not in it: two caches of one setting stay equal)
    if speed is not None:
        data.save_json(
            cost_path(out), {"images_per_s": speed, "ranks": world, "device": str(device)}
        )
    print(
        f"wrote {out}: {n} images, image {tuple(tensors['image'].shape)}, text "
        f"{tuple(tensors['text'].shape)} float16, {len(bad_ids)} bad image(s) left out, "
        f"{time.time() - t0:.1f} s"
    )
    return out


def main(args):
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    lock = None
    try:
        lock = lock_output(out_path(args), rank, world)
        # under torchrun the agent stops its workers with SIGTERM, then SIGKILL 30 s later: a rank
        # blocked on a dead peer must stop at once (finished shards are atomic files either way)
        with preempt.catching() if world == 1 else contextlib.nullcontext():
            return extract(args, rank, world, device)
    except data.DataError as e:  # bad input, a dead peer, a locked cache: one line, exit code 2
        cli.fail(e)
    except Exception as e:  # SIGTERM also reaches DataLoader workers: their death is the signal's
        if not isinstance(e, preempt.Preempted) and not preempt.requested():
            raise
        print(
            f"preempted: {preempt.requested()} received; finished shards are kept in "
            f"{out_path(args)}.parts: rerun to encode only the missing ones "
            f"(exit {preempt.REQUEUE_EXIT}: requeue)"
        )
        raise SystemExit(preempt.REQUEUE_EXIT) from None
    finally:
        if lock:
            locks.release(lock)
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())

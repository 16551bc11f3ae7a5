"""
Benchmark of the product's own functions, each against a reference measured in the same run (ratios:
absolute times on a shared machine are noisy; the references: references.py), on generated inputs
(synthetic.py): planted embeddings, random codes, JPEGs, and SigLIP2 towers built from their config
with random weights. Sections: 1 encoder (towers vs a head step per cached row), 2 epoch
(train_one_epoch, float16 vs float32 fold, vs a naive loop), 3 metrics (vs scikit-learn), 4 splits
(vs KFold), 5 knn (vs a full matrix + argsort), 6 retrieval (vs CalcTopMap), 7 memory (train.py's
peak RSS vs the cache file), 8 decode (extract_features' loader, workers vs in-process). Tables and
what each figure is: docs/BENCHMARKS.md; the learning check on planted data: bench_learning.py; how
it measures (best-of-n wall time, peak RSS of a call or a child process): timing.py.

    python -m bench                                # every section at COCO scale -> bench.json
    python -m bench --quick --out /tmp/bench.json  # small sizes, a tiny encoder (the test)
    python -m bench --sections knn,6               # a subset, by name or number
    python -m bench --device cuda --gpu_check      # on a GPU (< 10 min): towers fp16 / bf16, the
                                                   # fp16 + GradScaler epoch, --compile, decode
                                                   # workers, a 5-fold CV wall-time estimate
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import cli
import data
import encoders
import extract_features
import images
import knn
import make_splits
import metrics
import model
import retrieval
import synthetic
import tiny_models
import train
from bench import references
from bench.timing import best_time, child_peak, peak_during, sync, timed

SECTIONS = ("encoder", "epoch", "metrics", "splits", "knn", "retrieval", "memory", "decode", "fold")
GPU_SECTIONS = ("encoder", "epoch", "knn")
N_DEV, N_TEST, N_TRAIN, N_VAL = (
    118_287,
    5_000,
    94_630,
    23_657,
)  # COCO dev pool, test, one fold's train / val
FOLDS, EPOCHS, CAPTIONS = 5, 20, 5


def sections_type(s):
    names = [
        SECTIONS[int(p) - 1] if p.strip().isdigit() and 0 < int(p) <= len(SECTIONS) else p.strip()
        for p in s.split(",")
    ]
    if any(n not in SECTIONS for n in names):
        raise argparse.ArgumentTypeError(
            f"{s!r}: use names from {','.join(SECTIONS)} or numbers 1-{len(SECTIONS)}"
        )
    return list(dict.fromkeys(names))


def get_args_parser():
    p = cli.Parser(
        "bench", description="benchmark of the product's functions (see the module docstring)"
    )
    # data
    g = p.add_argument_group("data")
    g.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and a tiny encoder: checks that every section runs "
        "(the test); its figures are not the benchmark",
    )
    g.add_argument(
        "--sections",
        type=sections_type,
        default=list(SECTIONS),
        help="comma-separated subset, names or 1-8",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    # model
    g = p.add_argument_group("model")
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the encoder, epoch and knn sections run (the others are CPU code)",
    )
    g.add_argument(
        "--gpu_check",
        action="store_true",
        help="with --device cuda: the GPU record instead of the sections",
    )
    g.add_argument(
        "--threads",
        type=cli.positive_int,
        default=torch.get_num_threads(),
        help="torch CPU threads, also in child processes (1 is steadier on a shared machine)",
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument(
        "--out", default="bench.json", help="every raw figure as JSON (written atomically)"
    )
    return p


# ----------------------------------------------------------------------------- training setup


def rows_of(fold, rows, dtype=None):
    """The training rows `rows` of a fold as a fold of their own; dtype: its embeddings converted
    once."""
    return {
        "train": {
            k: v[rows].to(dtype) if dtype is not None and v.dtype == torch.float16 else v[rows]
            for k, v in fold["train"].items()
        }
    }


def train_setup(fold, device, flags=()):
    """train.py's own run (train.build_run: head, optimizer, scheduler, scaler) on `fold`."""
    args = train.get_args_parser().parse_args(
        ["--features", "-", "--splits", "-", "--out_dir", "-", "--device", device, *flags]
    )
    return train.build_run(args, fold)


def timed_epoch(s, fold, device):
    """Seconds of one train.train_one_epoch over fold["train"] with the run of train_setup."""
    sync(device)
    return timed(lambda: (train.train_one_epoch(dict(s, fold=fold), 1), sync(device)))[1]


# ----------------------------------------------------------------------------- 1. encoder


def bench_encoder(quick, device, seed=0, dtypes=("fp32",)):
    cuda = device.startswith("cuda")
    size = (
        dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
        if quick
        else dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )
    )
    # SigLIP2-base-patch16-256; on the CPU a 32,000-word vocabulary, not 256,000: the embedding is a
    # gather of 64 rows per caption, negligible in time, and it saves 0.7 GB
    vocab = 1000 if quick else 256_000 if cuda else 32_000
    side = 64 if quick else 256  # image size
    net = tiny_models.random_siglip(
        size, vocab, side, 16, seed, pad_token_id=1, bos_token_id=2, eos_token_id=3
    )
    enc = encoders.SiglipEncoder.__new__(
        encoders.SiglipEncoder
    )  # the product's encode_* on the random-weight towers
    batch, repeats = (128, 5) if cuda else (4, 1 if quick else 2)
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(batch, 3, side, side, generator=g)  # (B, 3, H, W)
    ids = torch.randint(
        3, vocab, (batch * CAPTIONS, encoders.SIGLIP_TEXT.max_length), generator=g
    )  # (B*5, 64) as tokenized
    out = {"config": "tiny" if quick else "siglip2-base-patch16-256", "batch": batch}
    for name in (
        dtypes
    ):  # as extract_features: the towers cast to --dtype, embeddings back on the CPU in float32
        dtype = extract_features.DTYPES[name]
        enc.model, enc.device, enc.dtype = net.to(device, dtype), torch.device(device), dtype
        t_img = best_time(lambda: enc.encode_pixels(px), repeats, 1, device) / batch
        t_txt = best_time(lambda: enc.encode_tokens(ids), repeats, 1, device) / (batch * CAPTIONS)
        out.update(
            {
                f"{name}_images_per_s": 1 / t_img,
                f"{name}_texts_per_s": 1 / t_txt,
                f"{name}_s_per_sample": t_img + CAPTIONS * t_txt,
            }
        )
    enc.model = net = None  # free the towers before the head runs
    fold = synthetic.planted_fold(
        512 if quick else 4096, 0, seed, device
    )  # the head's cost per cached training row
    s = train_setup(fold, device)
    timed_epoch(s, fold, device)  # warm-up
    out["head_s_per_row"] = timed_epoch(s, fold, device) / len(fold["train"]["ids"])
    # in-loop (the original): every epoch of every fold encodes 1 image + 1 caption per training
    # sample
    return dict(
        out,
        cost_ratio=out[f"{dtypes[0]}_s_per_sample"] / out["head_s_per_row"],
        pass_ratio=FOLDS * EPOCHS * N_TRAIN / (N_DEV + N_TEST),
    )


# ----------------------------------------------------------------------------- 2. training epoch


def naive_epoch(fold, n_rows, device, seed=0):
    """What the original loop does, timed over n_rows (seconds): Dataset-style per-sample indexing
    with a random caption, collate by stacking, fp16 -> float per batch, torch's default AdamW
    stepping after every micro-batch, a loss .item() per step for the log; fp16 autocast +
    GradScaler on the GPU. The same head as train.py's."""
    s = train_setup(fold, device)
    head, B, cuda = s["head"], s["cfg"].batch_size, device.startswith("cuda")
    opt = torch.optim.AdamW(head.parameters(), lr=2e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    tr = {k: v.cpu() for k, v in fold["train"].items()}
    perm = torch.randperm(len(tr["ids"]))[:n_rows]
    t = time.perf_counter()
    for st in range(0, n_rows - B + 1, B):
        items = []
        for i in perm[st : st + B].tolist():  # __getitem__, one sample at a time
            c = int(torch.randint(int(tr["n_captions"][i]), (1,)))
            items.append((tr["image"][i, 0], tr["text"][i, c], tr["labels"][i]))
        img, txt, y = (
            torch.stack(col).to(device).float() for col in zip(*items)
        )  # (B, D), (B, D), (B, C)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            out = head(img, txt)
        loss, _ = model.head_loss(
            out.logits, y, out.codes, evidence=out.evidence
        )  # floats: a host sync per step
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    sync(device)
    return time.perf_counter() - t


def bench_epoch(quick, device, seed=0):
    n, parts = (1024, 2) if quick else (N_TRAIN, 8)
    fold = synthetic.planted_fold(n, 0, seed, device)
    warm = rows_of(fold, slice(0, 2080))  # an odd number of micro-batches: both step shapes run
    timed_epoch(train_setup(warm, device), warm, device)
    # float16 fold (train.py now) vs the fold converted to float32 once (train.py before): the same
    # function, part by part in alternating order; the median of the parts' ratios is robust to a
    # burst of others' load
    t16, t32, cut = [], [], np.linspace(0, n, parts + 1).astype(int)
    for i in range(parts):
        for dtype in (None, torch.float32) if i % 2 == 0 else (torch.float32, None):
            f = rows_of(fold, slice(cut[i], cut[i + 1]), dtype)
            (t16 if dtype is None else t32).append(timed_epoch(train_setup(f, device), f, device))
    frac = (
        0.25 if quick else 0.05
    )  # the naive loop runs on a fraction of the epoch, scaled linearly
    t_naive = min(naive_epoch(fold, int(n * frac), device, seed) for _ in range(3)) / frac
    a, best = train_setup(warm, device)["args"], float(np.min(np.divide(t16, np.diff(cut)))) * n
    return {
        "rows": n,
        "flags": f"batch {a.batch_size} x accum {a.accum_steps}, amp {device.startswith('cuda')}",
        "epoch_s": sum(t16),
        "epoch_fp32_fold_s": sum(t32),
        "epoch_best_s": best,
        "fp16_over_fp32": float(np.median(np.divide(t16, t32))),
        "parts_text": ", ".join(f"{x / y:.2f}" for x, y in zip(t16, t32)),
        "naive_epoch_s": t_naive,
        "naive_fraction": frac,
        "speedup": t_naive / best,
    }  # best of 3 windows vs the best part, scaled


# ------------------------------------------------------------------------- 3. metrics, 4. splits


def bench_metrics(quick, device="cpu", seed=0):
    n = 1000 if quick else N_VAL
    y, s = synthetic.planted_scores(
        n, seed
    )  # (N, 80) labels, float32 probabilities that follow them
    ours = metrics.compute_all(y, s)
    t_ours = best_time(lambda: metrics.compute_all(y, s), repeats=3, warmup=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, t_ref = timed(
            lambda: references.sklearn_metrics(y, s)
        )  # ~15 s at full size: timed once
    diff = {k: abs(float(ours[k]) - float(ref[k])) for k in metrics.METRIC_NAMES}
    return {
        "n": n,
        "classes": 80,
        "ours_s": t_ours,
        "sklearn_s": t_ref,
        "speedup": t_ref / t_ours,
        "max_abs_diff": max(diff.values()),
        "worst_metric": max(diff, key=diff.get),
        "values": {k: float(ours[k]) for k in metrics.METRIC_NAMES},
    }


def bench_splits(quick, device="cpu", seed=0):
    from sklearn.model_selection import KFold

    n = 2000 if quick else N_DEV
    labels = synthetic.synthetic_labels(n, seed)  # (N, 80) uint8
    strat, t_strat = timed(
        lambda: make_splits.iterative_stratification(labels, FOLDS, seed)
    )  # (N,) fold index
    kfold, t_plain = timed(
        lambda: list(KFold(FOLDS, shuffle=True, random_state=seed).split(labels))
    )
    plain = np.zeros(n, np.int64)
    for k, (_, val) in enumerate(kfold):
        plain[val] = k
    (sm, sx), (km, kx) = (
        (np.nanmean(d), np.nanmax(d))
        for d in (make_splits.fold_deviation(labels, f, FOLDS) for f in (strat, plain))
    )
    return {
        "n": n,
        "folds": FOLDS,
        "stratified_s": t_strat,
        "kfold_s": t_plain,
        "stratified_mean_rel_dev": sm,
        "stratified_max_rel_dev": sx,
        "kfold_mean_rel_dev": km,
        "kfold_max_rel_dev": kx,
    }


# ----------------------------------------------------------------------------- 5. knn, 6. retrieval


def bench_knn(quick, device, seed=0):
    """knn.knn_scores on random codes, real and sign queries (k 100, evaluate.py's), then
    references.naive_knn on a subset."""
    nq, ndb, n_naive, bits, k = (
        (500, 2000, 100, 64, 100) if quick else (N_VAL, N_TRAIN, 500, 64, 100)
    )
    g = torch.Generator().manual_seed(seed)
    db = knn.sign_codes(torch.randn(ndb, bits, generator=g)).to(device)  # (N, bits) +-1
    labels = torch.from_numpy(synthetic.synthetic_labels(ndb, seed)).to(device)  # (N, 80) uint8
    q_real = torch.tanh(torch.randn(nq, bits, generator=g)).to(
        device
    )  # real codes, as evaluate.py's queries
    knn.knn_scores(q_real[:8], db[:1000], labels[:1000], k=k)  # warm-up: threads, CUDA context
    out = dict(
        queries=nq,
        db=ndb,
        bits=bits,
        k=k,
        naive_queries=n_naive,
        naive_full_mb=nq * ndb * 12 / 2**20,
    )
    dbn, ln = db.cpu().numpy(), labels.cpu().numpy().astype(np.float32)
    for name, q in (("real", q_real), ("sign", knn.sign_codes(q_real))):
        # a call takes a minute at full size: timed once, the memory figure from the same call (the
        # reset is free)
        ours, out[f"{name}_s"], out[f"{name}_peak_mb"] = peak_during(
            lambda: (knn.knn_scores(q, db, labels, k=k, query=name), sync(device))[0]
        )
        # the naive side on the queries' own exact grid (knn.exact_queries), so both rank the same
        # products
        qn = (knn.exact_queries(q[:n_naive]) if name == "real" else q[:n_naive]).cpu().numpy()
        t_naive = best_time(lambda: references.naive_knn(qn, dbn, ln, k), 3, 0)
        out[f"naive_{name}_s"] = t_naive * nq / n_naive  # linear in Q
        out[f"{name}_diff"] = float(
            np.abs(references.naive_knn(qn, dbn, ln, k) - ours[:n_naive].cpu().numpy()).max()
        )
        out[f"{name}_speedup"] = out[f"naive_{name}_s"] / out[f"{name}_s"]
    return dict(out, peak_mb=max(out["real_peak_mb"], out["sign_peak_mb"]))


def bench_retrieval(quick, device="cpu", seed=0):
    nq, ndb, n_naive, bits = (200, 3000, 50, 64) if quick else (N_TEST, 117_218, 200, 64)
    labels, codes = synthetic.planted_codes(
        nq + ndb, bits, seed
    )  # (Q + N, 80), (Q + N, bits) that follow them
    q, ql, db, dl = codes[:nq], labels[:nq], codes[nq:], labels[nq:]
    out = {"queries": nq, "db": ndb, "bits": bits, "naive_queries": n_naive}
    for name, k in (("k5000", 5000), ("all", None)):
        out[f"{name}_map"] = retrieval.retrieval_map(q, ql, db, dl, k=k)
        out[f"{name}_s"] = best_time(lambda: retrieval.retrieval_map(q, ql, db, dl, k=k), 2, 0)
        ref, sec = timed(
            lambda: references.calc_top_map(q[:n_naive], ql[:n_naive], db, dl, k or ndb)
        )
        out[f"naive_{name}_s"] = sec * nq / n_naive  # timed once, scaled to all queries
        out[f"{name}_diff"] = abs(
            ref - retrieval.retrieval_map(q[:n_naive], ql[:n_naive], db, dl, k=k)
        )
        out[f"{name}_speedup"] = out[f"naive_{name}_s"] / out[f"{name}_s"]
    return out


# ------------------------------------------------------------------ 7. memory of a training run


def bench_memory(quick, device="cpu", seed=0):
    sizes = (
        (600, 1200) if quick else ((N_DEV + N_TEST) // 2, N_DEV + N_TEST)
    )  # the larger: COCO's 123,287
    # one epoch at batch 256: the peak is the cache and the fold, not the batch (section 2 times the
    # default)
    flags = [
        "--epochs",
        "1",
        "--batch_size",
        "256",
        "--device",
        "cpu",
        "--num_threads",
        str(torch.get_num_threads()),
    ]
    out = {"flags": " ".join(flags[:4]), "imports_mb": child_peak("import sys, train")[0]}
    for i, n in enumerate(sizes):
        with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
            feats, splits = synthetic.write_planted_cache(
                tmp, n, seed
            )  # here: only the child's memory counts
            peak, sec = child_peak(
                "import sys, train\ntrain.main(train.get_args_parser().parse_args(sys.argv[1:]))",
                "--features",
                feats,
                "--splits",
                splits,
                "--fold",
                "0",
                "--out_dir",
                os.path.join(tmp, "run"),
                *flags,
            )  # what python train.py ... runs
            mb = os.path.getsize(feats) / 2**20
            out.update(
                {
                    f"n{i}": n,
                    f"cache{i}_mb": mb,
                    f"peak{i}_mb": peak,
                    f"train{i}_s": sec,
                    f"ratio{i}": peak / mb,
                }
            )
    per_image = [
        (out[f"{k}1_mb"] - out[f"{k}0_mb"]) * 2**20 / (sizes[1] - sizes[0])
        for k in ("peak", "cache")
    ]
    return dict(
        out,
        peak_bytes_per_image=per_image[0],
        cache_bytes_per_image=per_image[1],
        slope_over_cache=per_image[0] / per_image[1],
    )


# ----------------------------------------------------------------------------- 9. one whole fold


def bench_fold(quick, device="cpu", seed=0):
    """One `python train.py` fold at default flags and --epochs 1, as a user runs it (a child
    process: load, the epoch, its validation, the end-of-run KNN head, the writes), its phases from
    its own config.json and log.jsonl, against the naive loop's epoch measured here on as many rows.
    """
    n = 1200 if quick else N_DEV + N_TEST
    flags = ["--epochs", "1", "--device", device, "--num_threads", str(torch.get_num_threads())]
    with tempfile.TemporaryDirectory(prefix="bench_fold_") as tmp:
        feats, splits = synthetic.write_planted_cache(tmp, n, seed, n_val=200 if quick else N_VAL)
        run = os.path.join(tmp, "run")
        _, wall = child_peak(
            "import sys, train\ntrain.main(train.get_args_parser().parse_args(sys.argv[1:]))",
            *["--features", feats, "--splits", splits, "--fold", "0", "--out_dir", run, *flags],
        )
        cfg = data.read_json(os.path.join(run, "config.json"))
        with open(os.path.join(run, "log.jsonl")) as f:
            log = json.loads(f.readline())
    fold = synthetic.planted_fold(cfg["n_train"], 0, seed, device)
    frac = 0.25 if quick else 0.05  # the naive loop runs on a fraction of the epoch, scaled
    t_naive = min(naive_epoch(fold, int(cfg["n_train"] * frac), device, seed) for _ in range(3))
    t_naive /= frac
    phases = dict(
        load_s=cfg["load_seconds"],
        epoch_s=log["train_seconds"],
        val_s=log["val_seconds"],
        knn_s=cfg["knn_seconds"],
    )
    return dict(
        n_train=cfg["n_train"],
        n_val=cfg["n_val"],
        scoring=cfg["scoring"],
        wall_s=wall,
        **phases,
        rest_s=wall - sum(phases.values()),
        naive_epoch_s=t_naive,
        over_naive=wall / t_naive,
        knn_over_epoch=cfg["knn_seconds"] / (log["train_seconds"] + log["val_seconds"]),
    )


# ------------------------------------------------------------------------- 8. decode + preprocess


def bench_decode(quick, device="cpu", seed=0, workers=(1, 2)):
    """extract_features' own loader (images.ImageCaptionDataset + Collate + make_loader) over
    generated JPEGs with SigLIP2-base-patch16-256's image processor (PIL, 256 px, bilinear); images
    only (captions: see the docs)."""
    proc = tiny_models.siglip_image_processor(size={"height": 256, "width": 256}, resample=2)
    n, most = (
        96 if quick else 256 * max(workers),
        max(workers),
    )  # 8 batches of 32 per worker (quick: 3, one timed at w2)
    with tempfile.TemporaryDirectory(prefix="bench_jpeg_") as tmp:
        paths = synthetic.write_jpegs(tmp, n, seed)
        ds = images.ImageCaptionDataset({"paths": paths, "captions": [[] for _ in paths]})
        imgs = [ds[i][1] for i in range(32)]
        out = {
            "images": n,
            "file_kb": float(np.mean([os.path.getsize(p) for p in paths])) / 1024,
            "decode_ms": best_time(lambda: [ds[i] for i in range(32)], 3, 1) / 32e-3,
            "preprocess_ms": best_time(lambda: encoders.preprocess_images(proc, imgs), 3, 1)
            / 32e-3,
        }
        collate = images.Collate(
            proc, None, list(range(n)), 1, CAPTIONS, seed
        )  # no captions: no tokenizer
        for w in (
            0,
            *workers,
        ):  # steady state, timed once each worker delivered a batch (a real run takes minutes)
            batches = [list(range(s, min(s + 32, n))) for s in range(0, n, 32)]
            it = iter(extract_features.make_loader(ds, batches, collate, w, "cpu"))
            for _ in range(max(1, w)):
                next(it)
            out[f"w{w}_images_per_s"] = (n - 32 * max(1, w)) / timed(lambda: sum(1 for _ in it))[1]
    # one worker per free core: the 1-worker rate is a core's (more workers than free cores share
    # them)
    return dict(
        out,
        scaling=out["w2_images_per_s"] / out["w1_images_per_s"],
        most_workers=most,
        workers_for_2000=math.ceil(2000 / out["w1_images_per_s"]),
    )


# ----------------------------------------------------------------------------- the GPU record


def gpu_check(seed=0, dev="cuda"):
    """On a GPU: towers fp16 / bf16, the fp16 + GradScaler epoch eager and compiled (inductor),
    validation and the KNN head as train.py runs them, decode workers, and the wall time of a 5-fold
    CV at default flags from them."""
    res = {"encoder": bench_encoder(False, dev, seed, ("fp16", "bf16"))}
    fold = synthetic.planted_fold(N_TRAIN, N_VAL, seed, dev)
    warm, ep = (
        rows_of(fold, slice(0, 4128)),
        {"rows": N_TRAIN},
    )  # odd micro-batch count: both step shapes compile
    for name, flags in (("eager", ()), ("compile", ("--compile",))):
        s = train_setup(fold, dev, flags)
        ep[f"{name}_warmup_s"] = timed_epoch(s, warm, dev)  # compiled: includes the compilation
        ep[f"{name}_epoch_s"] = timed_epoch(s, fold, dev)
    s = train_setup(
        fold, dev
    )  # validation each epoch and the KNN head once a fold, as train.py runs them
    ep["validate_s"] = best_time(lambda: train.validate(s["net"], fold, s["cfg"], 1), 2, 1, dev)
    ep["knn_val_s"] = best_time(lambda: train.knn_val(s["head"], fold, s["cfg"].scoring), 1, 1, dev)
    cores, workers = extract_features.default_workers()
    res.update(
        epoch_gpu=ep,
        decode=bench_decode(False, "cpu", seed, tuple(sorted({1, 2, max(1, workers)}))),
    )
    towers = (N_DEV + N_TEST) * res["encoder"]["fp16_s_per_sample"]
    decode = (N_DEV + N_TEST) / res["decode"][f"w{res['decode']['most_workers']}_images_per_s"]
    fold_s = (
        EPOCHS * (ep["eager_epoch_s"] + ep["validate_s"]) + ep["knn_val_s"]
    )  # 20 epochs: patience may stop sooner
    res["cv"] = {
        "cores": cores,
        "workers": workers,
        "towers_s": towers,
        "decode_s": decode,
        "fold_s": fold_s,
        "cv_s": max(towers, decode) + FOLDS * fold_s,
    }  # the loader and the towers overlap
    return res


# ----------------------------------------------------------------------------- report

TARGETS = [  # (section, figure, target, check): the project's acceptance figures
    ("epoch", "speedup", ">= 4x", lambda v: v >= 4),
    ("epoch", "fp16_over_fp32", "<= 1.10", lambda v: v <= 1.10),
    ("metrics", "speedup", ">= 8x", lambda v: v >= 8),
    ("metrics", "max_abs_diff", "< 1e-6", lambda v: v < 1e-6),
    ("splits", "stratified_mean_rel_dev", "<= 0.002", lambda v: v <= 0.002),
    ("splits", "stratified_s", "<= 5 s", lambda v: v <= 5),
    ("knn", "peak_mb", "<= 2048 MB", lambda v: v <= 2048),
    ("knn", "real_speedup", ">= 10x", lambda v: v >= 10),
    ("memory", "ratio1", "<= 1.5x", lambda v: v <= 1.5),
    ("fold", "over_naive", "<= 1.5x", lambda v: v <= 1.5),
    ("fold", "knn_over_epoch", "<= 5", lambda v: v <= 5),
]


def targets(res):
    return [
        {
            "section": sec,
            "figure": key,
            "value": float(res[sec][key]),
            "target": text,
            "pass": bool(check(res[sec][key])),
        }
        for sec, key, text, check in TARGETS
        if sec in res
    ]


def print_table(res):
    m = res["meta"]
    print(
        f"\n{m['command']}  {m['date']}  {m['platform']}\ncpu: {m['cpu']} ({m['cores']} cores, "
        f"{m['threads']} torch "
        f"threads); torch {m['torch']}" + (f"; gpu: {m['gpu']}" if "gpu" in m else "")
    )
    verdict = {
        (t["section"], t["figure"]): f"{t['target']:>10} {'PASS' if t['pass'] else 'FAIL'}"
        for t in res["targets"]
    }
    for sec in (
        s for s in (*SECTIONS, "epoch_gpu", "cv") if s in res
    ):  # every scalar figure (docs/BENCHMARKS.md
        for key, v in (
            (k, v) for k, v in res[sec].items() if isinstance(v, (int, float, str))
        ):  # says what each is)
            print(
                f"{sec:<10} {key:<26} {v if isinstance(v, str) else format(v, ',.4g'):>16} "
                f"{verdict.get((sec, key), '')}"
            )
    print(
        "wall s / 1-min load average after each section (others' jobs on a shared machine): "
        + ", ".join(f"{k} {v['wall_s']:.0f} / {v['loadavg']:.1f}" for k, v in m["load"].items())
    )


def main(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.fail("--device: cuda is not available on this machine; use --device cpu")
    if args.gpu_check and args.device != "cuda":
        cli.fail(
            "--gpu_check: it records GPU figures; run it with --device cuda on a machine with a GPU"
        )
    torch.set_num_threads(args.threads)
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    res = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "quick": bool(args.quick),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "load": {},
        }
    }
    if args.device == "cuda":
        res["meta"]["gpu"] = torch.cuda.get_device_name(0)
    for name in ["gpu_check"] if args.gpu_check else args.sections:
        t = time.perf_counter()
        if name == "gpu_check":
            res.update(gpu_check(args.seed))
        else:  # the GPU runs the sections that have a GPU path; the others are CPU code
            res[name] = globals()[f"bench_{name}"](
                args.quick, args.device if name in GPU_SECTIONS else "cpu", args.seed
            )
        wall = time.perf_counter() - t
        res["meta"]["load"][name] = {"wall_s": wall, "loadavg": os.getloadavg()[0]}
        print(f"[{name}] {wall:.1f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    res["targets"] = targets(res)
    print_table(res)
    data.save_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())

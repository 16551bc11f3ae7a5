"""
The literature's methods on planted embeddings, through train.py's own loop: retrieval mAP of the
hashing losses (CSQ, DPSH, HashNet on a plain hash layer) and of our head's codes against random
codes, the classification mAP of ML-GCN, ML-GCN without its graph and our head, and each method's
seconds per training epoch. One planted cache (synthetic's planted cache: 80 classes, 768-d image +
5 captions) per training size, one fixed validation set; every method trains --epochs epochs at
the recipe's defaults and is scored at its last epoch (no early stopping).

    python -m bench.methods                        # sizes 2,500 and 10,000, 32 bits, 5 epochs
    python -m bench.methods --sizes 1000 --epochs 1 --out /tmp/m.json   # the plumbing

Retrieval: the validation images' sign codes (model.score_embeddings under the run's scoring rule)
query the training images' codes; mAP@all and mAP@1000, ties in database order, a query without a
relevant item scores 0 (retrieval.retrieval_map's defaults). Not a timing benchmark: the seconds
are one epoch on this (shared) CPU, for the ratio to the hash head. Results: docs/EXPERIMENTS.md.
"""

import json
import time

import numpy as np
import torch

import cli
import data
import knn
import retrieval
import synthetic
import train

METHODS = {
    "hash_head": [],
    "csq": ["--hash_loss", "csq"],
    "dpsh": ["--hash_loss", "dpsh"],
    "hashnet": ["--hash_loss", "hashnet"],
    "mlgcn": ["--head", "mlgcn"],
    "mlgcn_nograph": ["--head", "mlgcn_nograph"],
    "bits0": ["--bits", "0"],
}  # train.py flags on top of the defaults (and --bits)


def get_args_parser():
    p = cli.Parser("bench_methods", description="the literature's methods on planted data")
    p.add_argument("--sizes", type=cli.int_list, default=(2500, 10000), help="training sizes")
    p.add_argument("--n_val", type=cli.positive_int, default=2000, help="validation images")
    p.add_argument("--bits", type=cli.positive_int, default=32, help="code length (default 32)")
    p.add_argument("--epochs", type=cli.positive_int, default=5, help="epochs per method")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted data and the runs")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    p.add_argument("--out", default="bench_methods.json", help="results as JSON (atomic)")
    return p


def planted_fold(n_train, n_val, seed):
    """synthetic.planted_fold's fold, with the planted cache's class prompts (ML-GCN's nodes)."""
    f = synthetic.make_planted_features(n_train + n_val, seed=seed)
    fold = {
        "skipped": {"train": 0, "val": 0},
        "meta": {},
        "prompts": torch.from_numpy(f["prompts"]),
    }
    for name, rows in (("train", slice(0, n_train)), ("val", slice(n_train, None))):
        keys = ("ids", "image", "text", "n_captions", "labels")
        fold[name] = {k: torch.from_numpy(f[k][rows]) for k in keys}
    return fold


def retrieval_of(net, fold, scoring):
    """mAP of the validation codes against the training codes -> {"mAP@all", "mAP@1000"}."""
    q = knn.sign_codes(train.score(net, fold["val"], scoring).codes).numpy()
    d = knn.sign_codes(train.score(net, fold["train"], scoring).codes).numpy()
    yq, yd = fold["val"]["labels"].numpy(), fold["train"]["labels"].numpy()
    return {f"mAP@{k or 'all'}": retrieval.retrieval_map(q, yq, d, yd, k=k) for k in (None, 1000)}


def random_codes(fold, bits, seed):
    rng = np.random.default_rng(seed)
    yq, yd = fold["val"]["labels"].numpy(), fold["train"]["labels"].numpy()
    q, d = (rng.choice([-1, 1], (len(y), bits)) for y in (yq, yd))
    return {f"mAP@{k or 'all'}": retrieval.retrieval_map(q, yq, d, yd, k=k) for k in (None, 1000)}


def run_method(flags, fold, args):
    """train.py's loop for --epochs epochs on the fold -> (metrics dict, seconds per epoch)."""
    argv = ["--features", "-", "--splits", "-", "--out_dir", "-", "--device", "cpu"]
    argv += ["--bits", str(args.bits), "--epochs", str(args.epochs), "--seed", str(args.seed)]
    a = train.get_args_parser().parse_args(argv + flags)
    r = train.build_run(a, fold=fold)
    seconds = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        train.train_one_epoch(r, epoch)
        seconds.append(time.time() - t0)
    val, _ = train.validate(r["net"], fold, r["cfg"], args.epochs)
    out = {"val_mAP_macro": val["mAP_macro"]}
    if r["head"].bits > 0:
        out.update(retrieval_of(r["net"], fold, r["cfg"].scoring))
    return out, float(np.median(seconds))


def main(args):
    names = [m for m in args.methods.split(",") if m]
    bad = sorted(set(names) - set(METHODS))
    if bad:
        cli.fail(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    rows = []
    for size in args.sizes:
        fold = planted_fold(size, args.n_val, args.seed)
        row = {"size": size, "bits": args.bits, "epochs": args.epochs}
        row["random_codes"] = random_codes(fold, args.bits, args.seed)
        for name in names:
            res, sec = run_method(METHODS[name], fold, args)
            row[name] = dict(res, epoch_seconds=round(sec, 3))
            print(f"size {size} {name}: {json.dumps(row[name])}", flush=True)
        rows.append(row)
        data.save_json(args.out, {"rows": rows, "args": vars(args)})
    print(f"-> {args.out}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())

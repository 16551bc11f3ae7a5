"""
Data efficiency on planted embeddings: val mAP against the number of training images, for a linear
probe and the head at default flags, both text inputs, both heads (MLP and KNN). One planted cache
(synthetic's planted embeddings: labels a probe can recover, but not trivially; COCO's 123,287
images) and one fixed validation set of 5,000 images; the training sets are nested random subsets of
the rest, so every size is scored on the same images and a larger set contains the smaller ones.

    python -m bench.learning                      # sizes 2,500 / 9,000 / 25,000 / 94,630 (~1 h)
    python -m bench.learning --sizes 2500,9000         # some of them (~15 min)
    python -m bench.learning --quick              # 3,000 images, 500 / 1,000, 2 epochs: plumbing

Per size: two scikit-learn probes (one-vs-rest logistic regression, C = 1, on L2-normalised [image,
caption]: "each" trains on one random caption per image and averages its probabilities over the
captions, as the head does; "mean" sees the mean of the captions), and train.py at default flags
(--text_input mean) with --bits 64 / 0, and the same with --text_input each (RUNS). Each probe is
also scored with its weight matrix cut to its top 64 singular directions (probe_<kind>_rank64): a
linear model through a 64-dimensional code, what a code linear in the input could reach (the head's
code, made from the class evidence, is not). The KNN head is the one train.py scores at the end of a
run (val_metrics.json "knn"). Work files go to --work/{full,quick}_seed<seed>/ and are reused
(train.py --resume), so an interrupted study picks up where it stopped. Not timed: it measures
learning. Results: docs/EXPERIMENTS.md.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import cli
import data
import features
import metrics
import report
import model
import synthetic
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
N_IMAGES, N_TEST, N_VAL, FOLDS = 123_287, 5_000, 5_000, 5
SIZES = (2500, 9000, 25000, 94630)  # 94,630: the training set of a Karpathy 5-fold CV fold
RUNS = {
    "bits64": [],
    "bits0": ["--bits", "0"],
    "bits64_each": ["--text_input", "each"],
    "bits0_each": ["--bits", "0", "--text_input", "each"],
    "bits64_subsets": ["--scoring", "subsets"],
    "bits64_mean": ["--scoring", "mean"],
    "bits64_each_mean": ["--scoring", "each_mean"],
}  # train.py flags on top of the defaults (--text_input mean, --scoring each)
PROBES = ("each", "mean")
RANK = model.HeadConfig.bits  # the probe is also scored cut to this rank: the default code length
TARGETS = [
    ("bits64", "mean", 0.02),
    ("bits0", "mean", 0.01),
    ("bits64_each", "each", 0.02),
    ("bits0_each", "each", 0.01),
]  # (run, probe, at most this far below it), issue 21's acceptance


def get_args_parser():
    p = cli.Parser(
        "bench_learning",
        description="planted-data data-efficiency study (see the module docstring)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--quick",
        action="store_true",
        help="3,000 images, sizes 500 and 1,000, 2 epochs: checks the plumbing, not learning",
    )
    g.add_argument(
        "--sizes",
        type=cli.int_list,
        default=None,
        help="training-set sizes, comma-separated (default: 2500,9000,25000,94630; quick 500,1000)",
    )
    g.add_argument(
        "--runs", default=",".join(RUNS), help=f"train.py runs per size, from {','.join(RUNS)}"
    )
    g.add_argument("--probes", default=",".join(PROBES), help="probes per size ('' none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the planted cache and the subsets")
    g.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "bench_learning"),
        help="work folder: WORK/{full,quick}_seed<seed>, reused by a rerun",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--threads",
        type=cli.positive_int,
        default=os.cpu_count() or 1,
        help="train.py runs at a time, one thread each; also the probes' jobs",
    )
    g = p.add_argument_group("io")
    g.add_argument(
        "--out", default="bench_learning.json", help="the figures as JSON (written atomically)"
    )
    g.add_argument(
        "--figure", default="", help="also draw mAP against training-set size to FIGURE.png / .pdf"
    )
    return p


def plot(rows, stem):
    """val mAP (macro) against the number of training images (log axis): probes dashed, runs and KNN
    heads."""
    fig, ax = report._plt().subplots(figsize=(6.4, 4.2))
    x = [r["size"] for r in rows]
    maps = [k for k, v in rows[0].items() if isinstance(v, float) and not k.endswith("_seconds")]
    for key in maps:  # the mAPs, not the fold times
        style = "--" if key.startswith("probe") else ":" if key.endswith("_knn") else "-"
        ax.plot(
            x, [r.get(key, np.nan) for r in rows], style, marker="o", label=key.replace("_", " ")
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="training images (planted)",
        ylabel="val mAP (macro), 5,000 images",
        title="data efficiency",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return report.save_figure(fig, stem)


def write_data(work, n, seed, sizes):
    """The planted cache of n images and one splits file per training size: test = N_TEST images,
    val_folds[0] = the fixed N_VAL validation images, the other folds split the first `size` images
    of a fixed permutation of the rest (nested training sets). A size larger than the pool is an
    error. -> (cache path, validation size)"""
    feats = os.path.join(work, "features.safetensors")
    if not os.path.exists(feats):
        f = synthetic.make_planted_features(n, seed=seed)
        features.save_features(feats, f, f["meta"])
    from safetensors import safe_open

    with safe_open(feats, framework="pt") as f:
        ids = f.get_tensor("ids").numpy()
    ids = np.random.default_rng(seed).permutation(ids)
    n_test, n_val = min(N_TEST, n // 6), min(N_VAL, n // 6)
    test, val, pool = (
        np.sort(ids[:n_test]),
        np.sort(ids[n_test : n_test + n_val]),
        ids[n_test + n_val :],
    )
    for size in sizes:
        if size > len(pool):
            cli.fail(f"--sizes: {size} training images, but the planted pool has {len(pool)}")
        parts = np.array_split(np.sort(pool[:size]), FOLDS - 1)
        val_folds = [val.tolist()] + [p.tolist() for p in parts]
        data.save_json(
            os.path.join(work, f"splits_{size}.json"),
            {
                "method": "nested random subsets",
                "folds": FOLDS,
                "seed": seed,
                "categories": data.COCO_CATEGORIES,
                "dev": np.sort(np.concatenate([pool[:size], val])).tolist(),
                "test": test.tolist(),
                "val_folds": val_folds,
                "stats": [{"size": len(v)} for v in val_folds],
            },
        )
    return feats, n_val


def probe(feats, splits, text_input, jobs, seed=0):
    """The reference: one-vs-rest logistic regression (C = 1) on L2-normalised [image, caption] of
    fold 0, loaded as train.py loads it. text_input "each": trained on one random caption per image,
    probabilities averaged over the captions; "mean": the mean caption. -> metrics.compute_all on
    the validation images, with time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    args = train.get_args_parser().parse_args(
        ["--features", feats, "--splits", splits, "--out_dir", "-"]
    )
    f = features.load_fold(args.features, args.splits, 0, torch.device("cpu"))
    tr, va = f["train"], f["val"]

    def x(split, cap):  # (n, D) image view 0, (n, D) caption -> (n, 2D) numpy
        unit = torch.nn.functional.normalize
        return torch.cat(
            [unit(split["image"][:, 0].float(), dim=1), unit(cap.float(), dim=1)], 1
        ).numpy()

    if text_input == "mean":  # the sum has the mean's direction (padding rows are 0)
        xt = x(tr, tr["text"].float().sum(1))
    else:
        pick = (
            torch.rand(len(tr["ids"]), generator=torch.Generator().manual_seed(seed))
            * tr["n_captions"]
        ).long()
        xt = x(tr, tr["text"][torch.arange(len(pick)), pick])
    t = time.perf_counter()
    clf = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000), n_jobs=jobs).fit(
        xt, tr["labels"].numpy()
    )
    # the same probe with its (C, 2D) weight matrix cut to its top RANK singular directions
    # (truncated SVD): a linear model through a RANK-dimensional code, as the small-data head into
    # 64 bits is (a class without a training positive has a constant predictor, kept as it is)
    lin = [i for i, e in enumerate(clf.estimators_) if hasattr(e, "coef_")]
    w = np.stack([clf.estimators_[i].coef_[0] for i in lin])  # (C', 2D)
    b = np.array([clf.estimators_[i].intercept_[0] for i in lin])
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    w_low = (u[:, :RANK] * sv[:RANK]) @ vt[:RANK]

    def both(xv):  # (n, 2D) -> the probe's and the rank-RANK probe's probabilities, (n, C) each
        full = clf.predict_proba(xv)
        low = full.copy()
        low[:, lin] = 1 / (1 + np.exp(-(xv @ w_low.T + b)))
        return full, low

    if text_input == "mean":
        full, low = both(x(va, va["text"].float().sum(1)))
    else:
        full = low = 0.0
        for c in range(va["text"].shape[1]):
            has = (va["n_captions"] > c).numpy()[:, None]  # (n, 1)
            p_full, p_low = both(x(va, va["text"][:, c]))
            full, low = full + p_full * has, low + p_low * has
        n = va["n_captions"].clamp_min(1).numpy()[:, None]
        full, low = full / n, low / n
    y = va["labels"].numpy()
    return dict(
        metrics.compute_all(y, full),
        n_train=len(xt),
        n_val=len(va["ids"]),
        seconds=round(time.perf_counter() - t, 1),
        rank=RANK,
        low_rank=metrics.compute_all(y, low),
        singular_values=[round(float(v), 4) for v in sv],
    )


def train_runs(jobs, threads):
    """jobs: [(out_dir, train.py argv)], `threads` at a time with one thread each, each resumed
    where an earlier call stopped (a finished run returns at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for s in range(0, len(jobs), threads):
        procs = []
        for out, argv in jobs[s : s + threads]:
            log = open(out + ".log", "a")
            cmd = [
                sys.executable,
                os.path.join(ROOT, "train.py"),
                *argv,
                "--out_dir",
                out,
                "--num_threads",
                "1",
                "--resume",
            ]
            procs.append(
                (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log)
            )
        for p, out, log in procs:
            rc = p.wait()
            log.close()
            if rc != 0:
                cli.fail(f"train.py failed (exit {rc}) for {out}; see {out}.log")


def size_row(work, size, runs, jobs, probes=PROBES):
    """The probes' and the runs' figures at one size (the probes are cached as JSON in the work
    folder)."""
    feats, splits = (
        os.path.join(work, "features.safetensors"),
        os.path.join(work, f"splits_{size}.json"),
    )
    row = {"size": size}
    for kind in probes:
        path = os.path.join(work, str(size), f"probe_{kind}.json")
        res = {}
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
        if "singular_values" not in res:  # new, or written before the rank-64 column
            res = probe(feats, splits, kind, jobs)
            data.save_json(path, res)
        row.update(
            {
                f"probe_{kind}": res["mAP_macro"],
                f"probe_{kind}_rank{RANK}": res["low_rank"]["mAP_macro"],
            }
        )
    for name in runs:
        out = os.path.join(work, str(size), name)
        with open(os.path.join(out, "val_metrics.json")) as f:
            val = json.load(f)
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        row.update(
            {
                name: val["mAP_macro"],
                f"{name}_epoch": val["epoch"],
                f"{name}_n_train": cfg["n_train"],
            }
        )
        if "knn" in val:
            row[f"{name}_knn"] = val["knn"]["mAP_macro"]
        with open(os.path.join(out, "log.jsonl")) as f:  # the whole fold's time: load, epochs, KNN
            epochs = [json.loads(line)["seconds"] for line in f if line.strip()]
        row[f"{name}_seconds"] = round(
            cfg["load_seconds"] + sum(epochs) + cfg.get("knn_seconds", 0.0), 1
        )
    return row


def main(args):
    n, sizes, extra = (
        (3000, [500, 1000], ["--epochs", "2"]) if args.quick else (N_IMAGES, list(SIZES), [])
    )
    sizes = args.sizes or sizes
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        cli.fail(f"--runs: unknown {bad}; choose from {','.join(RUNS)}")
    work = os.path.join(args.work, f"{'quick' if args.quick else 'full'}_seed{args.seed}")
    for size in sizes:
        os.makedirs(os.path.join(work, str(size)), exist_ok=True)
    feats, n_val = write_data(work, n, args.seed, sizes)
    train_runs(
        [
            (
                os.path.join(work, str(size), name),
                [
                    "--features",
                    feats,
                    "--splits",
                    os.path.join(work, f"splits_{size}.json"),
                    "--fold",
                    "0",
                    *RUNS[name],
                    *extra,
                ],
            )
            for size in sizes
            for name in runs
        ],
        args.threads,
    )
    probes = [k for k in args.probes.split(",") if k]
    rows = [size_row(work, size, runs, args.threads, probes) for size in sizes]
    for row in rows:
        row["targets"] = {
            run: {
                "probe": probe_kind,
                "gap": row[f"probe_{probe_kind}"] - row[run],
                "at_most": limit,
                "pass": bool(row[f"probe_{probe_kind}"] - row[run] <= limit),
            }
            for run, probe_kind, limit in TARGETS
            if run in row and f"probe_{probe_kind}" in row
        }
        print(
            f"{row['size']:>6} train images | "
            + " | ".join(
                f"{k} {v:.1f}" if k.endswith("_seconds") else f"{k} {v:.4f}"
                for k, v in row.items()
                if isinstance(v, float)
            )
        )
    res = {
        "n_images": n,
        "n_val": n_val,
        "work": work,
        "command": " ".join(["python -m bench.learning", *sys.argv[1:]]),
        "rows": rows,
    }
    data.save_json(args.out, res)
    if args.figure:
        print("figure:", ", ".join(plot(rows, args.figure)))
    print(f"wrote {args.out} (work files in {work})")
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())

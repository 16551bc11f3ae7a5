"""
Does the head learn what a linear probe finds? Fold 0 of a planted cache at COCO scale (synthetic's planted
embeddings: labels a probe can recover, but not trivially): a scikit-learn logistic-regression probe on
[image, mean caption] against train.py --bits 64 and --bits 0 at default flags, and both heads (evaluate.py
--head both: MLP and KNN) of the default 64-bit model and of the KNN recipe (KNN_RECIPE).

    python bench_learning.py                      # 123,287 images, 20 epochs: ~2 h on 2 cores -> bench_learning.json
    python bench_learning.py --quick              # 1,500 images, 2 epochs: the plumbing only (~1-2 min)

Work files (cache, splits, probe, the three runs, their evaluations) go to --work/{full,quick}_seed<seed> and are
reused, so an interrupted run picks up where it stopped (train.py --resume). Not timed: it measures learning.
The results and the command that reproduced them: docs/EXPERIMENTS.md.
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
import folds
import make_splits
import metrics
import synthetic
import train

HERE = os.path.dirname(os.path.abspath(__file__))
N_IMAGES, N_TEST, FOLDS = 123_287, 5_000, 5  # COCO's dev pool + test; fold 0 trains on 94,630 of the dev images
KNN_RECIPE = ["--code_classifier", "centres", "--sign_weight", "1"]  # the 64-bit model whose KNN head comes closest
RUNS = {"bits64": ["--bits", "64"], "bits0": ["--bits", "0"], "knn64": ["--bits", "64"] + KNN_RECIPE}
TARGETS = [("gap64", 0.02), ("gap0", 0.01), ("knn64_gap", 0.03)]  # (figure, at most)


def get_args_parser():
    p = cli.Parser("bench_learning", description="planted-data learning check (see the module docstring)")
    # data
    g = p.add_argument_group("data")
    g.add_argument("--quick", action="store_true", help="1,500 images and 2 epochs: checks the plumbing, not learning")
    g.add_argument("--seed", type=int, default=0, help="seed of the planted cache and the folds")
    g.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_learning"),
                   help="work files go to WORK/{full,quick}_seed<seed>, reused by a rerun (never across settings)")
    # run
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=cli.positive_int, default=os.cpu_count() or 1,
                   help="train.py runs at a time, one thread each; also the probe's jobs")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out", default="bench_learning.json", help="the figures as JSON (written atomically)")
    return p


def write_cache(n, feats, splits, seed):
    """A planted cache of n images and a random 5-fold splits file: test = 5,000 images (n / 20 when fewer),
    dev = the rest, so at full size fold 0 trains on 94,630 images and validates on 23,657, as COCO's would."""
    f = synthetic.make_planted_features(n, seed=seed)
    data.save_features(feats, f, f["meta"])
    ids = np.random.default_rng(seed).permutation(f["ids"])
    n_test = min(N_TEST, n // 20)
    test, dev = np.sort(ids[:n_test]), np.sort(ids[n_test:])
    fold_of = make_splits.random_folds(len(dev), FOLDS, seed)
    labels = f["labels"][np.searchsorted(f["ids"], dev)]  # ids are sorted in the cache
    data.save_json(splits, {"method": "random", "folds": FOLDS, "seed": seed, "categories": data.COCO_CATEGORIES,
                            "dev": dev.tolist(), "test": test.tolist(),
                            "val_folds": [dev[fold_of == k].tolist() for k in range(FOLDS)],
                            "stats": [{"size": int((fold_of == k).sum()),
                                       "positives": labels[fold_of == k].sum(0).astype(int).tolist()}
                                      for k in range(FOLDS)]})


def planted_probe(feats, splits, fold, jobs):
    """One-vs-rest logistic regression on L2-normalised [image, mean caption] of the fold's rows exactly as
    train.py loads them (folds.load_fold) -> metrics.compute_all on the validation images, with sizes and time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    args = train.get_args_parser().parse_args(["--features", feats, "--splits", splits, "--fold", str(fold),
                                               "--out_dir", "-"])
    f = folds.load_fold(args, torch.device("cpu"))

    def xy(split):  # float16 as cached -> float32; padding caption rows are 0, so the sum / n is the mean
        cap = split["text"].float().sum(1) / split["n_captions"].clamp_min(1)[:, None]  # (n, D)
        x = torch.cat([torch.nn.functional.normalize(split["image"][:, 0].float(), dim=1),
                       torch.nn.functional.normalize(cap, dim=1)], 1)  # (n, 2D)
        return x.numpy(), split["labels"].numpy()
    (xt, yt), (xv, yv) = xy(f["train"]), xy(f["val"])
    t = time.perf_counter()
    clf = OneVsRestClassifier(LogisticRegression(max_iter=1000), n_jobs=jobs).fit(xt, yt)
    return dict(metrics.compute_all(yv, clf.predict_proba(xv)), n_train=len(xt), n_val=len(xv),
                seconds=time.perf_counter() - t)


def train_runs(work, feats, splits, threads, extra):
    """The RUNS with train.py at default flags plus theirs, `threads` at a time with one thread each, each
    resumed where an earlier call stopped (a finished run returns at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = list(RUNS)
    while pending:
        procs = []
        for name in pending[:threads]:
            out = os.path.join(work, name)
            cmd = [sys.executable, os.path.join(HERE, "train.py"), "--features", feats, "--splits", splits, "--fold",
                   "0", "--out_dir", out, "--num_threads", "1", "--resume", *RUNS[name], *extra]
            log = open(out + ".log", "a")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log))
        for p, out, log in procs:
            rc = p.wait()
            log.close()
            if rc != 0:
                cli.fail(f"train.py failed (exit {rc}) for {out}; see {out}.log")
        pending = pending[len(procs):]


def both_heads(work, name, feats, splits):
    """evaluate.py --head both on fold 0's validation images at its defaults (KNN: real queries, k 100)."""
    ev = os.path.join(work, f"eval_{name}")
    cmd = [sys.executable, os.path.join(HERE, "evaluate.py"), "--checkpoint", os.path.join(work, name, "best.pt"),
           "--features", feats, "--splits", splits, "--split", "val", "--fold", "0", "--head", "both",
           "--bootstrap", "0", "--out_dir", ev]  # point metrics only: no intervals needed here
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode != 0:
        cli.fail(f"evaluate.py failed (exit {r.returncode}) for {name}: {r.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(ev, "metrics.json")) as f:
        return json.load(f)["models"]["fold0"]


def main(args):
    n, extra = (1500, ["--epochs", "2"]) if args.quick else (N_IMAGES, [])
    work = os.path.join(args.work, f"{'quick' if args.quick else 'full'}_seed{args.seed}")
    os.makedirs(work, exist_ok=True)
    feats, splits = os.path.join(work, "features.safetensors"), os.path.join(work, "splits.json")
    if not (os.path.exists(feats) and os.path.exists(splits)):
        write_cache(n, feats, splits, args.seed)
    probe_path = os.path.join(work, "probe.json")
    if not os.path.exists(probe_path):
        data.save_json(probe_path, planted_probe(feats, splits, 0, args.threads))
    with open(probe_path) as f:
        probe = json.load(f)
    train_runs(work, feats, splits, args.threads, extra)
    res = {"n_images": n, "work": work, "command": " ".join(["python bench_learning.py", *sys.argv[1:]]),
           "probe_mAP_macro": probe["mAP_macro"], "n_train": probe["n_train"], "n_val": probe["n_val"]}
    for name in RUNS:
        with open(os.path.join(work, name, "val_metrics.json")) as f:
            val = json.load(f)
        with open(os.path.join(work, name, "config.json")) as f:
            cfg = json.load(f)
        res.update({f"{name}_mAP_macro": val["mAP_macro"], f"{name}_best_epoch": val["epoch"],
                    f"{name}_lr": cfg["lr"], f"{name}_input_dropout": cfg["input_dropout"]})
        if name != "bits0":  # both heads, as evaluate.py scores them
            heads = both_heads(work, name, feats, splits)
            res.update({f"{name}_eval_mAP_macro": heads["mlp"]["mAP_macro"],
                        f"{name}_knn_mAP_macro": heads["knn"]["mAP_macro"]})
    res.update(gap64=res["probe_mAP_macro"] - res["bits64_mAP_macro"], gap0=res["probe_mAP_macro"] - res["bits0_mAP_macro"],
               knn_gap=res["bits64_mAP_macro"] - res["bits64_knn_mAP_macro"],
               knn64_gap=res["knn64_mAP_macro"] - res["knn64_knn_mAP_macro"])
    res["targets"] = {k: {"at_most": v, "pass": bool(res[k] <= v)} for k, v in TARGETS}
    for key, v in res.items():
        if isinstance(v, (int, float)):
            t = res["targets"].get(key)
            print(f"{key:<26} {v:>10.4g}" + (f"  <= {t['at_most']} {'PASS' if t['pass'] else 'FAIL'}" if t else ""))
    data.save_json(args.out, res)
    print(f"wrote {args.out} (work files in {work})")
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())

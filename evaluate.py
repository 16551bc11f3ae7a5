"""
Evaluate trained hash heads on the cached SigLIP2 embeddings: one fold model or the K-fold ensemble,
on the hold-out test split (default) or a fold's own validation images; MLP head, Hamming-KNN head,
or both. One raw image and its captions through the towers and heads: predict.py.

    python evaluate.py --ensemble outputs/siglip2_hash64      # -> outputs/siglip2_hash64/eval_test/
    python evaluate.py --ensemble outputs/siglip2_hash64 --head both --thresholds oof --retrieval
    python evaluate.py --ensemble outputs/siglip2_hash64 --data_root data/coco   # + examples.png
    python evaluate.py --checkpoint outputs/siglip2_hash64/fold0/best.pt  # -> .../fold0/eval_test/
    python evaluate.py --checkpoint outputs/siglip2_hash64/fold0/best.pt --split val --fold 0
    python evaluate.py --ensemble outputs/siglip2_hash64 --scoring each   # another scoring rule

--features / --splits default to the files the checkpoints were trained with (their config), and
--scoring to the rule they were validated with (config "scoring").
Writes to --out_dir: metrics.json, metrics.csv (model, head, 15 metrics) and metrics.md (the same to
read: a table per head), per_class.csv (with TP/FP/FN/TN), confusion.csv, errors.md,
<split>_predictions.npz (ids, labels, probs of the ensemble, member_probs, knn_probs,
member_knn_probs), ap_per_class.png, pr_curves.png; thresholds.csv + thresholds.json with
--thresholds oof; examples.png with --data_root; retrieval.csv with --retrieval (on by default for
the hashnet protocol).
per_class.csv, confusion.csv, errors.md and the bootstrap CIs (all 15 metrics) describe the
ensemble's main head (mlp, or knn with --head knn) at the thresholds in use (0.5, or the oof ones);
metrics.csv rows are all at 0.5.

Conventions. Every image is scored by model.score_embeddings, as in train.py, under one scoring rule
(model.SCORING_RULES): probabilities averaged over the rule's passes, and its hash code
sign(mean code), 0 -> +1, one per image for database and queries alike; the KNN head's queries are
the rule's (one per caption under "each", the image's averaged code otherwise). The KNN database of
a fold model is the codes of its own training images (dev minus val_folds[fold]); an ensemble of
KNN heads averages the members' vote scores. Retrieval (the hashing literature's protocol): the
test images' codes are queries against the splits' retrieval database (hashnet: every labelled
image that is not a query), else against the dev pool; mAP@k (k 5000 for hashnet, 1000 otherwise)
and mAP@all, with both empty-query rules (zero: DeepHash-pytorch, skip: HashNet) and both tie rules
(stable, average).
"""

import argparse
import inspect
import os

import numpy as np
import torch

import cli
import data
import features
import knn
import locks
import metrics
import model
import protocols
import retrieval
import runs
from report import evaluation

KNN = {
    k: p.default for k, p in inspect.signature(knn.knn_scores).parameters.items()
}  # the KNN head's defaults
RETRIEVAL_K = {"hashnet": 5000}  # mAP@k as the protocol's literature reports it; others: 1000


def get_args_parser():
    p = cli.Parser(
        "evaluate", description="test / val metrics of one fold model or the fold ensemble"
    )
    # data
    g = p.add_argument_group("data")
    g.add_argument(
        "--features", default=None, help="feature cache; default: the checkpoint's config's"
    )
    g.add_argument(
        "--splits", default=None, help="splits.json the models trained with (defines KNN databases)"
    )
    g.add_argument(
        "--split",
        default="test",
        choices=("test", "val"),
        help="test = hold-out; val = val_folds[--fold]",
    )
    g.add_argument(
        "--fold",
        type=cli.nonneg_int,
        default=None,
        help="with --split val: the checkpoint's own fold",
    )
    g.add_argument(
        "--data_root", default=None, help="data root: adds examples.png (worst-predicted images)"
    )
    # model
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default=None, help="one model: a train.py best.pt")
    src.add_argument(
        "--ensemble", default=None, help="a run dir: every fold*/best.pt, probabilities averaged"
    )
    g.add_argument(
        "--batch_size",
        type=cli.positive_int,
        default=model.SCORE_BATCH,
        help="images per head call",
    )
    g.add_argument(
        "--average_views",
        action="store_true",
        help="average the scores over every cached image view (off: view 0 alone)",
    )
    g.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    g.add_argument(
        "--scoring",
        default=None,
        choices=model.SCORING_RULES,
        help="scoring rule over the captions; default: the checkpoint's config's",
    )
    # heads and analyses (KNN defaults: knn.knn_scores' signature)
    g = p.add_argument_group("heads and analyses")
    g.add_argument(
        "--head", default="mlp", choices=("mlp", "knn", "both"), help="classifier head(s) to score"
    )
    g.add_argument("--knn_k", type=cli.positive_int, default=KNN["k"], help="neighbours per query")
    g.add_argument(
        "--knn_tau",
        type=cli.positive_float,
        default=KNN["tau"],
        help="softmax temperature of the votes",
    )
    g.add_argument(
        "--knn_vote", default=KNN["vote"], choices=knn.KNN_VOTES, help="neighbour vote weights"
    )
    g.add_argument(
        "--knn_query",
        default=KNN["query"],
        choices=knn.KNN_QUERIES,
        help="real: real-valued tanh query codes against the binary database; sign: Hamming",
    )
    g.add_argument(
        "--thresholds",
        default="0.5",
        choices=("0.5", "oof"),
        help="oof: per-class F1-optimal thresholds from the folds' val predictions",
    )
    g.add_argument(
        "--retrieval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Hamming retrieval mAP of the test codes; default: on for the hashnet protocol",
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument(
        "--out_dir", default=None, help="default: <run>/eval_<split> or <fold dir>/eval_<split>"
    )
    g.add_argument(
        "--bootstrap",
        type=cli.nonneg_int,
        default=1000,
        help="bootstrap draws for 95%% CIs; 0 = off",
    )
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (fixed: CIs are repeatable)")
    g.add_argument(
        "--allow_partial", action="store_true", help="ensemble the finished folds, name the others"
    )
    return p


# ----------------------------------------------------------------------------- inputs


def check_folds(args, paths, cks, splits, split_path):
    """The checkpoints' fold numbers: distinct, inside the splits file, and (--split val) the asked
    fold's."""
    folds = [ck["config"].get("fold") for ck in cks]
    if len(set(folds)) != len(folds) or not all(
        isinstance(f, int) and 0 <= f < splits["folds"] for f in folds
    ):
        cli.fail(
            f"{', '.join(paths)}: fold numbers {folds} in the checkpoints' config are missing, "
            f"repeated or outside the {splits['folds']} folds of {split_path}"
        )
    if args.fold is not None and args.fold >= splits["folds"]:
        cli.fail(
            f"--fold: {args.fold} is out of range; {split_path} has folds 0..{splits['folds'] - 1}"
        )
    missing = sorted(set(range(splits["folds"])) - set(folds)) if args.ensemble else []
    if missing:  # fold dirs absent altogether
        msg = f"--ensemble {args.ensemble}: folds {missing} of {split_path} have no best.pt"
        if not args.allow_partial:
            cli.fail(msg + "; train them or pass --allow_partial")
        print(f"warning: {msg}")
    if args.split == "val" and folds[0] != args.fold:
        cli.fail(
            f"--fold {args.fold}: the checkpoint trained on those images (it is fold "
            f"{folds[0]}'s); use --fold {folds[0]}"
        )
    return folds


def load_inputs(args, paths, cks):
    """Feature cache, splits and (with --data_root) the dataset, checked against what the models
    were trained on."""
    cfg = cks[0]["config"]
    if not (args.features or cfg.get("features")) or not (args.splits or cfg.get("splits")):
        cli.fail("--features/--splits: the checkpoint's config does not name them; pass both flags")
    try:
        cache = args.features or runs.config_path(cfg["features"], cfg, "--features")
        split_path = args.splits or runs.config_path(cfg["splits"], cfg, "--splits")
        feats, meta = features.load_features(cache)
        splits = protocols.load_splits(split_path)
        protocols.check_splits(splits, feats["ids"].numpy(), meta, where=cache)
        dataset = data.load_dataset(args.data_root) if args.data_root else None
    except data.DataError as e:
        cli.fail(str(e))
    trained_on = runs.identity(cks[0])["features"]
    if cfg.get("features_meta") and trained_on != (meta.get("model"), meta.get("fingerprint")):
        cli.fail(
            f"--features {cache}: embeddings of {meta.get('model')} / data "
            f"{meta.get('fingerprint')}, but the models were trained on {trained_on}; "
            f"pass the cache they were trained on"
        )
    if cfg.get("splits_sha256") and protocols.splits_sha256(split_path) != cfg["splits_sha256"]:
        cli.fail(
            f"--splits {split_path}: not the splits file the models were trained with "
            f"(sha256 differs)"
        )
    folds = check_folds(args, paths, cks, splits, split_path)
    ids = feats["ids"].numpy()

    def rows(want):  # split ids -> cache rows, the unreadable images left out (as train.py does)
        try:
            return features.cache_rows(ids, want, meta)[0]
        except data.DataError as e:
            cli.fail(f"--features {cache}: {e}")

    return dict(
        features=cache,
        splits_path=split_path,
        feats=feats,
        meta=meta,
        splits=splits,
        dataset=dataset,
        folds=folds,
        rows=rows,
        categories=splits["categories"],
    )


# ----------------------------------------------------------------------------- scoring


def _mean(xs):  # over the image views
    return torch.stack(xs).mean(0) if xs[0] is not None else None


def _cat(xs):  # over the batches
    return torch.cat(xs) if xs[0] is not None else None


def score_rows(head, feats, rows, args, keep_queries=False):
    """model.score_embeddings under --scoring on cache rows (gathered per batch of --batch_size) ->
    Scores; with --average_views the mean over the cached image views of probabilities and codes
    (view 0 alone by default)."""
    views = feats["image"].shape[1] if args.average_views else 1
    out = []
    for s in range(0, len(rows), args.batch_size):
        r = torch.as_tensor(rows[s : s + args.batch_size])
        out.append(
            [
                model.score_embeddings(
                    head,
                    feats["image"][r, v],
                    feats["text"][r],
                    feats["n_captions"][r],
                    rule=args.scoring,
                    batch_size=args.batch_size,
                    keep_queries=keep_queries,
                )
                for v in range(views)
            ]
        )
    return model.Scores(
        *(_cat([_mean([sv[i] for sv in o]) for o in out]) for i in range(3)),
        _cat([o[0].query_mask for o in out]),
    )  # the same queries in every view


def score_member(head, ck, ctx, rows, args):
    """One fold model on the evaluated rows -> ({head: probs (N, C)}, {retrieval mAPs} or None)."""
    feats, splits = ctx["feats"], ctx["splits"]
    head = head.to(args.device)
    s = score_rows(head, feats, rows, args, keep_queries=args.head != "mlp")
    out = {} if args.head == "knn" else {"mlp": s.probs.numpy()}
    if args.head != "mlp":  # database: this fold's training images, one code each
        train_rows = ctx["rows"](protocols.fold_ids(splits, ck["config"]["fold"])[0])
        db = knn.sign_codes(score_rows(head, feats, train_rows, args).codes)
        out["knn"] = knn.knn_head(
            s.query_codes,
            s.query_mask,
            db,
            feats["labels"][train_rows],
            device=args.device,
            k=args.knn_k,
            tau=args.knn_tau,
            vote=args.knn_vote,
            query=args.knn_query,
        ).numpy()
    if not args.retrieval:
        return out, None
    # the protocol's database, else the dev pool; never the queries themselves
    db_rows = ctx["rows"](splits["database"] if "database" in splits else splits["dev"])
    db_rows = db_rows[~np.isin(db_rows, rows)]
    db = knn.sign_codes(score_rows(head, feats, db_rows, args).codes).numpy()
    k = RETRIEVAL_K.get(splits["protocol"], 1000)
    return out, retrieval.retrieval_maps(
        knn.sign_codes(s.codes).numpy(),
        feats["labels"][rows].numpy(),
        db,
        feats["labels"][db_rows].numpy(),
        k,
    )


def oof_thresholds(paths, eval_ids):
    """Per-class F1-optimal thresholds of each fold's val_predictions.npz, averaged ->
    (thr [C], info)."""
    per_fold, n_val = [], 0
    for p in paths:
        f = os.path.join(os.path.dirname(p), "val_predictions.npz")
        try:
            with np.load(f) as z:
                ids, y, prob = z["ids"], z["labels"], z["probs"]
        except Exception as e:
            cli.fail(
                f"{f}: cannot read val predictions ({type(e).__name__}); "
                f"--thresholds oof needs each fold's file"
            )
        if np.isin(ids, eval_ids).any():  # thresholds must never be chosen on the evaluated images
            cli.fail(
                f"{f}: {int(np.isin(ids, eval_ids).sum())} val ids are in the evaluated split; "
                f"use --split test"
            )
        per_fold.append(metrics.best_f1_thresholds(y, prob))
        n_val += len(ids)
    thr = np.mean(per_fold, axis=0)
    return thr, {
        "thresholds": thr.tolist(),
        "per_fold": [t.tolist() for t in per_fold],
        "sources": [os.path.join(os.path.dirname(p), "val_predictions.npz") for p in paths],
        "n_val": n_val,
    }


def score_split(args, paths, heads, cks, ctx):
    """Every member on the split, the ensemble (mean probabilities / vote scores), their metrics ->
    a result dict."""
    splits, feats = ctx["splits"], ctx["feats"]
    want = splits["test"] if args.split == "test" else splits["val_folds"][args.fold]
    rows = ctx["rows"](want)
    if len(rows) == 0:
        cli.fail(
            f"{ctx['splits_path']}: the {args.split} split has no usable images in "
            f"{ctx['features']}"
        )
    if len(rows) < len(want):
        print(f"note: skipped {len(want) - len(rows)} unreadable {args.split} images")
    members = [f"fold{f}" for f in ctx["folds"]]
    preds, maps = {}, {}
    for name, head, ck in zip(members, heads, cks):
        out, ret = score_member(head, ck, ctx, rows, args)
        for hd, pr in out.items():
            preds.setdefault(hd, {})[name] = pr
        if ret:
            maps[name] = ret
    for hd in preds:
        preds[hd]["ensemble"] = np.mean([preds[hd][n] for n in members], axis=0)
    if maps:
        maps["mean"] = {
            k: float(np.mean([r[k] for r in maps.values()])) for k in next(iter(maps.values()))
        }
    y = feats["labels"][rows].numpy()
    main_head = "knn" if args.head == "knn" else "mlp"
    res = dict(
        rows=rows,
        ids=feats["ids"][rows].numpy(),
        y=y,
        members=members,
        preds=preds,
        main=main_head,
        retrieval=maps,
        thr=0.5,
        files={},
        n_skipped=len(want) - len(rows),
        results={
            hd: {n: metrics.compute_all(y, p) for n, p in d.items()} for hd, d in preds.items()
        },
    )
    if args.thresholds == "oof":  # chosen on the folds' val images only; test labels play no part
        res["thr"], res["files"]["thresholds.json"] = oof_thresholds(paths, res["ids"])
        res["at_oof"] = metrics.compute_all(y, preds[main_head]["ensemble"], res["thr"])
    if args.bootstrap:
        res["ci"] = metrics.bootstrap_ci(
            y,
            preds[main_head]["ensemble"],
            n_boot=args.bootstrap,
            seed=args.seed,
            thresholds=res["thr"],
            names=metrics.METRIC_NAMES,
        )
    return res


# ----------------------------------------------------------------------------- main


def main(args):
    if args.split == "val" and args.fold is None:
        cli.fail(
            "--split val: give --fold K, the fold whose val images the checkpoint did not train on"
        )
    if args.fold is not None and args.split != "val":
        cli.fail("--fold: only used with --split val")
    if args.split == "val" and args.ensemble:
        cli.fail(
            "--split val: pass one fold's --checkpoint "
            "(the other ensemble members trained on those images)"
        )
    if args.thresholds == "oof" and (args.split != "test" or args.head == "knn"):
        cli.fail(
            "--thresholds oof: only with --split test and the mlp head "
            "(tuned on the folds' MLP val predictions)"
        )
    out_dir = args.out_dir or os.path.join(
        args.ensemble or os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.split}"
    )
    try:  # one evaluate.py writing into out_dir
        with locks.hold(os.path.join(out_dir, locks.LOCK_NAME), "evaluate.py"):
            return evaluate(args, out_dir)
    except data.DataError as e:
        cli.fail(str(e))


def evaluate(args, out_dir):
    """main's work once out_dir is locked -> the summary dict."""
    try:
        paths, heads, cks = runs.load_members(args.checkpoint, args.ensemble, args.allow_partial)
        args.scoring = runs.scoring_of(args.scoring, paths, cks)
    except data.DataError as e:
        cli.fail(str(e))
    ctx = load_inputs(args, paths, cks)
    if args.retrieval is None:
        args.retrieval = ctx["splits"]["protocol"] == "hashnet"  # that protocol's own metric
    if (args.head != "mlp" or args.retrieval) and not cks[0]["model_args"].get("bits"):
        cli.fail(
            "--head knn/both and --retrieval need hash codes, but these models have bits 0; "
            "use --head mlp"
        )
    res = score_split(args, paths, heads, cks, ctx)
    evaluation.write_split(args, res, ctx, paths, out_dir)
    evaluation.print_summary(args, res)
    return evaluation.summary_of(args, res, ctx, paths)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

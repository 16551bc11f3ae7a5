"""
Evaluate trained hash heads on the cached SigLIP2 embeddings: one fold model or the K-fold ensemble, on the
hold-out test split (default) or a fold's own validation images; MLP head, Hamming-KNN head, or both.

    python evaluate.py --ensemble outputs/siglip2_hash64                    # -> outputs/siglip2_hash64/eval_test/
    python evaluate.py --ensemble outputs/siglip2_hash64 --head both --thresholds oof --retrieval --data_root data/coco
    python evaluate.py --checkpoint outputs/siglip2_hash64/fold0/best.pt    # -> .../fold0/eval_test/
    python evaluate.py --checkpoint outputs/siglip2_hash64/fold0/best.pt --split val --fold 0
    python evaluate.py --checkpoint outputs/siglip2_hash64/fold0/best.pt --image photo.jpg --caption "a dog on a sofa"

--features / --splits default to the files the checkpoints were trained with (their config).
Writes to --out_dir: metrics.json, metrics.csv (model, head, 15 metrics), per_class.csv, errors.md,
<split>_predictions.npz (ids, labels, probs of the ensemble, member_probs, knn_probs), ap_per_class.png,
pr_curves.png; thresholds.csv + thresholds.json with --thresholds oof; examples.png with --data_root.
per_class.csv, errors.md and the bootstrap CIs describe the ensemble's main head (mlp, or knn with --head knn)
at the thresholds in use (0.5, or the oof ones); metrics.csv rows are all at 0.5.

Conventions. An image's probabilities are sigmoid(head(image, caption)) averaged over ALL its captions, so a
score is repeatable. An image's hash code is sign(mean over its captions of the tanh codes h), 0 -> +1: one
code per image, for database entries and queries alike. The KNN database of a fold model is the codes of its
own training images (dev minus val_folds[fold]), recomputed from the cached embeddings; an ensemble of KNN
heads averages the members' vote scores. --thresholds oof tunes per-class F1 thresholds on each fold's
val_predictions.npz (never on the evaluated split) and averages them over the folds.
"""
import glob
import hashlib
import json
import os
import re
import sys
import zipfile

import numpy as np
import torch

import cli
import data
import metrics
import model
import report

SHOWN = ("mAP_macro", "mAP_micro", "auc_macro", "f1_macro", "f1_micro", "hamming_loss")  # terminal table


def get_args_parser():
    p = cli.Parser("evaluate", description="test / val metrics of one fold model or the fold ensemble")
    # data
    g = p.add_argument_group("data")
    g.add_argument("--features", default=None, help="feature cache; default: the one in the checkpoint's config")
    g.add_argument("--splits", default=None, help="splits.json the models trained with (defines KNN databases)")
    g.add_argument("--split", default="test", choices=("test", "val"), help="test = hold-out; val = val_folds[--fold]")
    g.add_argument("--fold", type=cli.nonneg_int, default=None, help="with --split val: the checkpoint's own fold")
    g.add_argument("--data_root", default=None, help="COCO root: adds examples.png (worst-predicted images)")
    # model
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default=None, help="one model: a train.py best.pt")
    src.add_argument("--ensemble", default=None, help="a run dir: every fold*/best.pt, probabilities averaged")
    g.add_argument("--batch_size", type=cli.positive_int, default=4096, help="images per head call")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    # heads and analyses
    g = p.add_argument_group("heads and analyses")
    g.add_argument("--head", default="mlp", choices=("mlp", "knn", "both"), help="classifier head(s) to score")
    g.add_argument("--knn_k", type=cli.positive_int, default=100,
                   help="neighbours per query (the original plan: 20; on planted data 100 scored 0.6-1.9 points more, README)")
    g.add_argument("--knn_tau", type=cli.positive_float, default=0.07, help="softmax temperature of the votes")
    g.add_argument("--knn_vote", default="softmax", choices=model.KNN_VOTES, help="neighbour vote weights")
    g.add_argument("--knn_query", default="real", choices=model.KNN_QUERIES, help="real: each query keeps its "
                   "real-valued tanh code against the binary database codes (asymmetric distance, bits weighted by "
                   "|h|; +0.9 to +2.4 points of mAP on planted data, README); sign: both sides binarised, a plain Hamming search")
    g.add_argument("--thresholds", default="0.5", choices=("0.5", "oof"), help="oof: per-class F1-optimal "
                   "thresholds from the folds' val predictions (never the test split), reported beside 0.5")
    g.add_argument("--retrieval", action="store_true", help="Hamming retrieval mAP@1000/@all against the dev pool")
    # predict one image
    g = p.add_argument_group("predict one image")
    g.add_argument("--image", default=None, help="predict one image file instead (needs --caption)")
    g.add_argument("--caption", action="append", default=None, help="caption of --image; repeat to average")
    g.add_argument("--model", default=None, help="SigLIP2 name/folder for --image; default: from the features")
    g.add_argument("--top", type=cli.positive_int, default=5, help="labels printed for --image")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out_dir", default=None, help="default: <run>/eval_<split> or <fold dir>/eval_<split>")
    g.add_argument("--bootstrap", type=cli.nonneg_int, default=1000, help="bootstrap draws for 95%% CIs; 0 = off")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (fixed: CIs are repeatable)")
    g.add_argument("--allow_partial", action="store_true", help="ensemble the finished folds, name the others")
    return p


# ----------------------------------------------------------------------------- checkpoints

def fold_finished(d):
    """train.py's rule: val_metrics.json exists and config.json (or last.pt) says training ended."""
    try:
        with open(os.path.join(d, "config.json")) as f:
            done = json.load(f).get("finished")
        done = done or torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True)["finished"]
        return bool(done) and os.path.isfile(os.path.join(d, "val_metrics.json"))
    except Exception:
        return False


def checkpoint_paths(args):
    if args.checkpoint:
        return [args.checkpoint]
    if not os.path.isdir(args.ensemble):
        cli.fail(f"--ensemble {args.ensemble}: not a directory")
    dirs = sorted((d for d in glob.glob(os.path.join(args.ensemble, "fold*")) if re.fullmatch(r"fold\d+",
                   os.path.basename(d)) and os.path.isdir(d)), key=lambda d: int(os.path.basename(d)[4:]))
    paths = [os.path.join(d, "best.pt") for d in dirs if os.path.isfile(os.path.join(d, "best.pt"))]
    if not paths:
        cli.fail(f"--ensemble {args.ensemble}: no fold*/best.pt in it; train folds with train.py first")
    bad = [os.path.basename(d) for d in dirs if not fold_finished(d)]
    if bad:
        msg = f"--ensemble {args.ensemble}: unfinished or missing folds: {', '.join(bad)}"
        if not args.allow_partial:
            cli.fail(msg + "; finish them (run_cv.sh resumes) or pass --allow_partial")
        print(f"warning: {msg}; ensembling the others", file=sys.stderr)
        paths = [p for p in paths if os.path.basename(os.path.dirname(p)) not in bad]
        if not paths:
            cli.fail(msg)
    return paths


def load_checkpoint(path):
    """-> (head in eval mode, checkpoint dict). Only weights_only loading: a pickle can run code."""
    if not os.path.isfile(path):
        cli.fail(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        cli.fail(f"{path}: not a checkpoint (not a file written by torch.save); pass a best.pt from train.py")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickled object (refused by weights_only)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])[:200]
        cli.fail(f"{path}: not a loadable train.py checkpoint ({type(e).__name__}: {first}); pass a best.pt from train.py")
    if not isinstance(ck, dict) or not {"model", "model_args", "config"} <= set(ck):
        cli.fail(f"{path}: not a train.py checkpoint (needs keys model, model_args, config); pass a best.pt")
    try:
        head = model.HashHead(**ck["model_args"])
        head.load_state_dict(ck["model"])
    except Exception as e:
        cli.fail(f"{path}: weights do not fit HashHead(**model_args) ({type(e).__name__}); re-train with this model.py")
    return head.eval(), ck


def identity(ck):
    """What must agree between ensemble members: architecture, embeddings (model + data) and splits file."""
    meta = ck["config"].get("features_meta") or {}
    return {"model_args": ck["model_args"], "features": (meta.get("model"), meta.get("fingerprint")),
            "splits": ck["config"].get("splits_sha256")}


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def run_head(head, feats, rows, batch_size, device, keep_captions=True):
    """Cache rows (N,) -> probs (N, 80): mean over each image's captions of sigmoid(logits); the mean tanh
    codes (N, bits); the per-caption tanh codes (N, C, bits) with zero rows past n_captions (both None
    without a hash layer; the last also with keep_captions=False). Rows are gathered per batch."""
    probs, codes, caps = [], [], []
    for s in range(0, len(rows), batch_size):
        r = torch.as_tensor(rows[s:s + batch_size])
        img, txt = feats["image"][r, 0].to(device).float(), feats["text"][r].to(device)  # (b, D), (b, C, D)
        n = feats["n_captions"][r].to(device)  # (b,)
        p_sum, h_cap = 0.0, []
        for c in range(txt.shape[1]):  # caption slot c; rows past an image's n_captions are masked out
            logits, h = head(img, txt[:, c].float())  # (b, 80), (b, bits)
            has = (n > c)[:, None]
            p_sum = p_sum + torch.where(has, torch.sigmoid(logits.float()), 0.0)
            h_cap += [torch.where(has, h.float(), 0.0)] if h is not None else []
        probs.append((p_sum / n[:, None]).cpu())
        if h_cap:
            stacked = torch.stack(h_cap, 1).cpu()  # (b, C, bits)
            codes.append(stacked.sum(1) / n[:, None].cpu())
            caps += [stacked] if keep_captions else []
    cat = (lambda x: torch.cat(x) if x else None)
    return torch.cat(probs), cat(codes), cat(caps)


def knn_head(caps, n_captions, db_codes, db_labels, args):
    """The KNN head under the MLP head's protocol: each (image, caption) code votes with its k nearest
    database codes, and an image's scores are the mean over its captions. caps (N, C, bits), n_captions (N,)."""
    scores = torch.zeros(caps.shape[0], db_labels.shape[1])
    for c in range(caps.shape[1]):
        has = n_captions > c
        if has.any():
            scores[has] += model.knn_scores(caps[has, c].to(args.device), db_codes, db_labels, args.knn_k,
                                            args.knn_tau, args.knn_vote, query=args.knn_query).cpu()
    return scores / n_captions[:, None]


def score_member(head, feats, rows, dev_rows, val_rows, args):
    """One model: rows = evaluated images, dev_rows = dev pool, val_rows = the model's own val fold (all
    cache row indices) -> ({head name: probs (N, 80)}, {retrieval mAP} or None)."""
    probs, h, caps = run_head(head, feats, rows, args.batch_size, args.device)
    out, retrieval = {"mlp": probs.numpy()}, None
    if args.head != "mlp" or args.retrieval:
        q_codes = model.sign_codes(h)  # (N, bits): one code per image (the sign of its mean code)
        dev_codes = model.sign_codes(run_head(head, feats, dev_rows, args.batch_size, args.device, False)[1])  # (Nd, bits)
        dev_labels, y = feats["labels"][dev_rows], feats["labels"][rows]  # (Nd, 80), (N, 80)
        if args.head != "mlp":  # database = this fold's training images, one code each
            train = ~np.isin(dev_rows, val_rows)
            out["knn"] = knn_head(caps, feats["n_captions"][rows], dev_codes[train].to(args.device),
                                  dev_labels[train].to(args.device), args).numpy()
        if args.retrieval:  # database = the dev pool minus the queries themselves
            keep = ~np.isin(dev_rows, rows)
            db, db_y = dev_codes[keep].numpy(), dev_labels[keep].numpy()
            retrieval = {f"mAP@{k or 'all'}": metrics.retrieval_map(q_codes.numpy(), y.numpy(), db, db_y, topk=k)
                         for k in (1000, None)}
    if args.head == "knn":
        del out["mlp"]
    return out, retrieval


def oof_thresholds(paths, eval_ids):
    """Per-class F1-optimal thresholds of each fold's val_predictions.npz, averaged -> (thr [80], info)."""
    per_fold, n_val = [], 0
    for p in paths:
        f = os.path.join(os.path.dirname(p), "val_predictions.npz")
        try:
            with np.load(f) as z:
                ids, y, prob = z["ids"], z["labels"], z["probs"]
        except Exception as e:
            cli.fail(f"{f}: cannot read val predictions ({type(e).__name__}); --thresholds oof needs each fold's file")
        if np.isin(ids, eval_ids).any():  # thresholds must never be chosen on the evaluated images
            cli.fail(f"{f}: {int(np.isin(ids, eval_ids).sum())} val ids are in the evaluated split; use --split test")
        per_fold.append(metrics.best_f1_thresholds(y, prob))
        n_val += len(ids)
    thr = np.mean(per_fold, axis=0)
    return thr, {"thresholds": thr.tolist(), "per_fold": [t.tolist() for t in per_fold],
                 "sources": [os.path.join(os.path.dirname(p), "val_predictions.npz") for p in paths], "n_val": n_val}


# ----------------------------------------------------------------------------- main

def predict_image(args, heads, ck):
    """Run the frozen towers + every head on one image and its caption(s); print the top labels."""
    from PIL import Image
    if not args.caption:
        cli.fail("--image: give its caption with --caption \"...\" (repeat the flag to average several)")
    try:
        with Image.open(args.image) as im:
            img = im.convert("RGB")
    except Exception as e:
        cli.fail(f"--image {args.image}: cannot read the image ({type(e).__name__}); pass a JPEG/PNG file")
    meta = ck["config"].get("features_meta") or {}
    name = args.model or meta.get("model")
    if not name:
        cli.fail("--model: the checkpoint does not name its SigLIP2 model; pass --model NAME_OR_FOLDER")
    # a local model folder saved relative to the folder extract_features.py ran in; run_cv.sh runs every step
    # from the repository folder, so that is train.py's folder too
    cwd = ck["config"].get("cwd")
    if not args.model and cwd and not os.path.exists(name) and os.path.isdir(os.path.join(cwd, name)):
        name = os.path.join(cwd, name)
    try:
        enc = model.Siglip2Encoder(name, device=args.device)
    except Exception as e:
        where = "" if os.path.exists(name) else ", not a folder here"
        cli.fail(f"--model {name}: cannot load the SigLIP2 towers ({type(e).__name__}{where}); pass --model NAME_OR_FOLDER")
    if enc.dim != heads[0].model_args["dim"]:
        cli.fail(f"--model {name}: embeddings are {enc.dim}-d but the head expects {heads[0].model_args['dim']}")
    names = [c["name"] for c in json.loads(meta.get("categories") or "null") or data.COCO_CATEGORIES]
    probs = torch.stack([model.HashModel(enc, h.to(args.device)).predict([img], [args.caption])[0]
                         for h in heads]).mean(0)  # (80,) averaged over the ensemble
    top = torch.argsort(probs, descending=True)[:args.top].tolist()
    print(f"{args.image}: {len(heads)} model(s), {len(args.caption)} caption(s)")
    for c in top:
        print(f"  {probs[c]:.4f}  {names[c]}")
    return {names[c]: float(probs[c]) for c in top}


def config_path(path, cfg, flag):
    """A file path from a checkpoint's config, relative to the folder train.py ran in (config "cwd") when it is
    there, else as saved (absolute, or relative to this folder: checkpoints from before "cwd" was recorded)."""
    there = os.path.join(cfg.get("cwd") or "", path)
    if cfg.get("cwd") and not os.path.isabs(path) and os.path.exists(there):
        return there
    if os.path.exists(path) or os.path.isabs(path):
        return path
    cli.fail(f"{path}: not found from {os.getcwd()} (the checkpoint's config names it relative to the folder train.py "
         f"ran in{', ' + cfg['cwd'] if cfg.get('cwd') else ''}); run from that folder or pass {flag}")


def load_inputs(args, paths, cks):
    """Feature cache, splits and (with --data_root) COCO, checked against what the models were trained on."""
    cfg = cks[0]["config"]
    if not (args.features or cfg.get("features")) or not (args.splits or cfg.get("splits")):
        cli.fail("--features/--splits: the checkpoint's config does not name them; pass both flags")
    features = args.features or config_path(cfg["features"], cfg, "--features")
    split_path = args.splits or config_path(cfg["splits"], cfg, "--splits")
    try:
        feats, meta = data.load_features(features)
        splits = data.load_splits(split_path)
        data.check_split_ids(splits, feats["ids"].numpy(), where=features)
        coco = data.load_coco(args.data_root) if args.data_root else None
    except data.DataError as e:
        cli.fail(str(e))
    if cfg.get("features_meta") and identity(cks[0])["features"] != (meta.get("model"), meta.get("fingerprint")):
        cli.fail(f"--features {features}: embeddings of {meta.get('model')} / data {meta.get('fingerprint')}, but the "
             f"models were trained on {identity(cks[0])['features']}; pass the cache they were trained on")
    with open(split_path, "rb") as f:
        if cfg.get("splits_sha256") and hashlib.sha256(f.read()).hexdigest() != cfg["splits_sha256"]:
            cli.fail(f"--splits {split_path}: not the splits file the models were trained with (sha256 differs)")
    folds = [ck["config"].get("fold") for ck in cks]
    if len(set(folds)) != len(folds) or not all(isinstance(f, int) and 0 <= f < splits["folds"] for f in folds):
        cli.fail(f"{', '.join(paths)}: fold numbers {folds} in the checkpoints' config are missing, repeated or "
             f"outside the {splits['folds']} folds of {split_path}")
    if args.fold is not None and args.fold >= splits["folds"]:
        cli.fail(f"--fold: {args.fold} is out of range; {split_path} has folds 0..{splits['folds'] - 1}")
    missing = sorted(set(range(splits["folds"])) - set(folds)) if args.ensemble else []
    if missing:  # fold dirs absent altogether
        msg = f"--ensemble {args.ensemble}: folds {missing} of {split_path} have no best.pt"
        cli.fail(msg + "; train them or pass --allow_partial") if not args.allow_partial else print(f"warning: {msg}")
    if args.split == "val" and folds[0] != args.fold:
        cli.fail(f"--fold {args.fold}: the checkpoint trained on those images (it is fold {folds[0]}'s); "
             f"use --fold {folds[0]}")
    return features, split_path, feats, meta, splits, coco, folds


def evaluate_split(args, paths, heads, cks):
    """Score every model on the split, ensemble them, write every file and print the summary."""
    features, split_path, feats, meta, splits, coco, folds = load_inputs(args, paths, cks)
    members = [f"fold{f}" for f in folds]
    # rows of the cache; unreadable images and images without captions are skipped, as train.py does
    id2row = {int(i): r for r, i in enumerate(feats["ids"].tolist())}
    good = (feats["n_captions"].numpy() > 0) & ~np.isin(feats["ids"].numpy(), json.loads(meta.get("bad_images", "[]")))

    def to_rows(ids):
        r = np.array([id2row[int(i)] for i in ids], dtype=np.int64)
        return r[good[r]]
    want = splits["test"] if args.split == "test" else splits["val_folds"][args.fold]
    rows, dev_rows = to_rows(want), to_rows(splits["dev"])
    if len(rows) == 0:
        cli.fail(f"{split_path}: the {args.split} split has no usable images in {features}")
    if len(rows) < len(want):
        print(f"note: skipped {len(want) - len(rows)} {args.split} images (unreadable or without captions)")
    eval_ids = feats["ids"][rows].numpy()
    y = feats["labels"][rows].numpy()
    cats = json.loads(meta.get("categories") or "null") or data.COCO_CATEGORIES
    names = [c["name"] for c in cats]
    out_dir = args.out_dir or os.path.join(args.ensemble or os.path.dirname(os.path.abspath(args.checkpoint)),
                                           f"eval_{args.split}")

    # ---- score every member; the ensemble averages probabilities (KNN: vote scores)
    preds, retrieval = {}, {}
    for name, head, fold in zip(members, heads, folds):
        out, ret = score_member(head.to(args.device), feats, rows, dev_rows, to_rows(splits["val_folds"][fold]), args)
        for hd, pr in out.items():
            preds.setdefault(hd, {})[name] = pr
        if ret:
            retrieval[name] = ret
    for hd in preds:
        preds[hd]["ensemble"] = np.mean([preds[hd][n] for n in members], axis=0)
    main_head = "knn" if args.head == "knn" else "mlp"
    p_ens = preds[main_head]["ensemble"]
    results = {hd: {n: metrics.compute_all(y, p) for n, p in d.items()} for hd, d in preds.items()}
    summary = {"split": args.split, "n_images": len(rows), "skipped": len(want) - len(rows), "checkpoints": paths,
              "features": features, "splits": split_path, "heads": list(preds),
              "models": {n: {hd: results[hd][n] for hd in results} for n in members},
              "ensemble": {hd: results[hd]["ensemble"] for hd in results}}
    if args.head != "mlp":
        summary["knn"] = {"k": args.knn_k, "tau": args.knn_tau, "vote": args.knn_vote, "query": args.knn_query,
                         "database": "each fold model's training images (dev - val_folds[fold])"}
    thr, files = 0.5, {}
    if args.thresholds == "oof":  # chosen on the folds' val images only; the test labels play no part
        thr, files["thresholds.json"] = oof_thresholds(paths, eval_ids)
        summary["thresholds"] = {"0.5": results["mlp"]["ensemble"], "oof": metrics.compute_all(y, p_ens, thr)}
        files["thresholds.csv"] = [["metric", "at_0.5", "at_oof"]] + [
            [m, summary["thresholds"]["0.5"][m], summary["thresholds"]["oof"][m]] for m in metrics.METRIC_NAMES]
    if args.bootstrap:
        ci = metrics.bootstrap_ci(y, p_ens, n_boot=args.bootstrap, seed=args.seed, thresholds=thr)
        summary["bootstrap_ci"] = {"n_boot": args.bootstrap, "seed": args.seed, "alpha": 0.05, "head": main_head,
                                  "thresholds": args.thresholds,
                                  **{k: {"value": v, "low": lo, "high": hi} for k, (v, lo, hi) in ci.items()}}
    if retrieval:
        retrieval["mean"] = {k: float(np.mean([r[k] for r in retrieval.values()])) for k in ("mAP@1000", "mAP@all")}
        summary["retrieval"] = retrieval
    pc = metrics.per_class(y, p_ens, thr)  # per-class table of the ensemble, at the thresholds in use
    title = (f"{'ensemble of ' + str(len(members)) if len(members) > 1 else members[0]}, {main_head} head, "
             f"{args.split} split ({len(rows)} images), thresholds {args.thresholds}")
    files["metrics.csv"] = [["model", "head", *metrics.METRIC_NAMES]] + [
        [n, hd, *(r[m] for m in metrics.METRIC_NAMES)] for hd, res in results.items() for n, r in res.items()]
    files["per_class.csv"] = [["class", "coco_id", "name", "ap", "auc", "f1", "precision", "recall", "support", "fp",
                               "fn"]] + [[int(c), cats[c]["id"], names[c], *(pc[k][c] for k in ("ap", "auc", "f1",
                                         "precision", "recall")), *(int(pc[k][c]) for k in ("support", "fp", "fn"))]
                                        for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable")]
    files["errors.md"] = report.errors_md(title, y, p_ens, thr, names, eval_ids, pc)
    arrays = {"ids": eval_ids, "labels": y, "probs": p_ens.astype(np.float32), "members": np.array(members),
              "member_probs": np.stack([preds[main_head][n] for n in members]).astype(np.float32),
              "thresholds": np.broadcast_to(np.asarray(thr, np.float64), (y.shape[1],))}
    if args.head == "both":
        arrays["knn_probs"] = preds["knn"]["ensemble"].astype(np.float32)

    # ---- files, each written atomically (test_predictions.npz is what aggregate.py's paired bootstrap reads)
    earlier = os.path.isfile(os.path.join(out_dir, "metrics.json"))  # an earlier evaluate.py run wrote here
    data.save_json(os.path.join(out_dir, "metrics.json"), summary)
    for name, content in files.items():
        data.save_json(os.path.join(out_dir, name), content) if name.endswith(".json") else \
            data.save_text(os.path.join(out_dir, name), content)
    data.atomic_write(os.path.join(out_dir, f"{args.split}_predictions.npz"), lambda tmp: np.savez(tmp, **arrays))
    examples = report.example_items(coco, eval_ids, y, p_ens, thr, names) if coco else None
    plots = report.save_plots(out_dir, y, p_ens, pc, names, examples)
    stale = [f for f in ("thresholds.json", "thresholds.csv", "examples.png")  # an earlier run's, not this one's
             if earlier and f not in files and f not in plots and os.path.exists(os.path.join(out_dir, f))]
    for f in stale:
        os.remove(os.path.join(out_dir, f))

    # ---- terminal summary
    print(f"{args.split} split: {len(rows)} images, {len(members)} model(s)\n{'model':<10} {'head':<5} "
          + " ".join(f"{m:>12}" for m in SHOWN))
    for hd, res in results.items():
        print("\n".join(f"{n:<10} {hd:<5} " + " ".join(f"{r[m]:>12.4f}" for m in SHOWN) for n, r in res.items()))
    if args.thresholds == "oof":
        t = summary["thresholds"]
        print("thresholds 0.5 -> oof: " + ", ".join(f"{m} {t['0.5'][m]:.4f} -> {t['oof'][m]:.4f}"
                                                   for m in ("f1_macro", "f1_micro", "precision_macro", "recall_macro")))
    if args.bootstrap:
        print(f"95% bootstrap CI ({args.bootstrap} draws): "
              + ", ".join(f"{k} {v:.4f} [{lo:.4f}, {hi:.4f}]" for k, (v, lo, hi) in ci.items()))
    for n, r in retrieval.items():
        print(f"retrieval {n}: mAP@1000 {r['mAP@1000']:.4f}, mAP@all {r['mAP@all']:.4f}")
    print(f"wrote {out_dir}: metrics.json, {', '.join(files)}, {args.split}_predictions.npz, {', '.join(plots)}"
          + (f"; removed an earlier run's {', '.join(stale)}" if stale else ""))
    return summary


def main(args):
    if args.split == "val" and args.fold is None:
        cli.fail("--split val: give --fold K, the fold whose val images the checkpoint did not train on")
    if args.fold is not None and args.split != "val":
        cli.fail("--fold: only used with --split val")
    if args.split == "val" and args.ensemble:
        cli.fail("--split val: pass one fold's --checkpoint (the other ensemble members trained on those images)")
    if args.thresholds == "oof" and (args.split != "test" or args.head == "knn"):
        cli.fail("--thresholds oof: only with --split test and the mlp head (tuned on the folds' MLP val predictions)")
    if args.caption and not args.image:
        cli.fail("--caption: only used with --image")
    paths = checkpoint_paths(args)
    heads, cks = zip(*[load_checkpoint(p) for p in paths])
    for ck, p in zip(cks[1:], paths[1:]):
        for key, val in identity(ck).items():
            if val != identity(cks[0])[key]:
                cli.fail(f"--ensemble: {p} differs from {paths[0]} in {key} ({val} vs {identity(cks[0])[key]}); "
                     f"ensemble only the folds of one run")
    if args.image:
        return predict_image(args, heads, cks[0])
    if (args.head != "mlp" or args.retrieval) and not cks[0]["model_args"].get("bits"):
        cli.fail("--head knn/both and --retrieval need hash codes, but these models have bits 0; use --head mlp")
    return evaluate_split(args, paths, heads, cks)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

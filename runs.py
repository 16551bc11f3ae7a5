"""Run folders: what train.py leaves in <run>/fold<k>/ and how the other scripts find and read it.

    dirs = runs.fold_dirs("outputs/siglip2_hash64")        # {0: ".../fold0", 1: ...}
    runs.fold_finished(dirs[0])                              # finished, val_metrics.json there
    head, ckpt = runs.load_checkpoint(dirs[0] + "/best.pt")  # weights_only; data.DataError if bad

Every failure raises data.DataError (one line naming the file and the fix); scripts turn it into
exit 2.
"""

import glob
import json
import os
import re
import sys
import zipfile

import torch

import data
import hashing
import knn
import mlgcn
import model


def fold_dirs(run):
    """-> {k: path} of the fold<k>/ folders of a run folder (fold numbers, not file order)."""
    out = {}
    for d in glob.glob(os.path.join(run, "fold*")):
        m = re.fullmatch(r"fold(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            out[int(m.group(1))] = d
    return dict(sorted(out.items()))


def save_checkpoint(path, head, opt, scaler, sched, state, config):
    ckpt = {
        "model": head.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": sched.state_dict(),
        **{k: state[k] for k in ("epoch", "best", "best_epoch", "bad_epochs")},
        "model_args": head.model_args,
        "config": config,
        "finished": state["finished"],
        "rng": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def read_resume(last_path, resume, fold, model_args_for):
    """-> the last.pt to continue from (None: a fresh start). Refuses to overwrite a run without
    --resume, and a checkpoint of another fold or other model flags (model_args_for(dim,
    num_classes, n_train): what the flags ask for on the checkpoint's data)."""
    if not os.path.exists(last_path):
        if resume:
            print(f"note: no {last_path} to resume from; starting fresh")
        return None
    if not resume:
        raise data.DataError(
            f"--out_dir: {os.path.dirname(last_path)} already holds a run (last.pt); pass --resume "
            "to continue it or choose another --out_dir"
        )
    try:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.DataError(
            f"{last_path}: unreadable checkpoint ({type(e).__name__}); delete it to start over"
        ) from None
    stored = build_head(ckpt["model_args"]).model_args
    want = build_head(
        model_args_for(stored["dim"], stored["num_classes"], ckpt["config"]["n_train"])
    ).model_args
    diff = [
        f"{k}: {stored[k]} in the checkpoint, {want[k]} now" for k in want if stored[k] != want[k]
    ]
    if diff or ckpt["config"]["fold"] != fold:
        raise data.DataError(
            f"--resume: {last_path} was trained with other model flags or fold "
            f"({', '.join(diff) or 'fold'}); use the original flags or another --out_dir"
        )
    return ckpt


def restore(ckpt, head, opt, scaler, sched, state):
    """Load a checkpoint into the run's objects, its progress into `state` and the RNG (so resume is
    exact)."""
    head.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng_cuda"])
    state.update({k: ckpt[k] for k in ("epoch", "best", "best_epoch", "bad_epochs", "finished")})


def read_log(path, upto_epoch=None):
    """log.jsonl's lines (one JSON object per epoch), those after upto_epoch dropped (a resumed
    run's)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [
            ln
            for ln in f
            if ln.strip() and (upto_epoch is None or json.loads(ln)["epoch"] <= upto_epoch)
        ]


def fold_finished(d):
    """train.py's rule: config.json says finished (written last, after the KNN head's val metrics)
    and val_metrics.json exists."""
    try:
        with open(os.path.join(d, "config.json")) as f:
            return bool(json.load(f).get("finished")) and os.path.isfile(
                os.path.join(d, "val_metrics.json")
            )
    except (OSError, ValueError):
        return False


def build_head(model_args):
    """A head from its model_args (a checkpoint's): "head" names the module, hashlayer
    (hashing.HashLayer, train.py --hash_loss) or mlgcn (mlgcn.MLGCNHead, --head mlgcn); none:
    model.HashHead. The state dict carries the rest."""
    args = dict(model_args)
    kind = args.pop("head", "hash")
    if kind == "hashlayer":
        return hashing.HashLayer(**args)
    if kind == "mlgcn":
        return mlgcn.MLGCNHead(**args)
    return model.HashHead(**args)


def load_checkpoint(path):
    """-> (head in eval mode, checkpoint dict). Only weights_only loading: a pickle can run code."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise data.DataError(
            f"{path}: not a checkpoint (not a file written by torch.save); "
            "pass a best.pt from train.py"
        )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # truncated, not a torch file, or a pickled object (weights_only refuses)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])[:200]
        raise data.DataError(
            f"{path}: not a loadable train.py checkpoint ({type(e).__name__}: {first}); "
            "pass a best.pt from train.py"
        ) from None
    if not isinstance(ck, dict) or not {"model", "model_args", "config"} <= set(ck):
        raise data.DataError(
            f"{path}: not a train.py checkpoint (needs keys model, model_args, config); "
            "pass a best.pt"
        )
    try:
        head = build_head(ck["model_args"])
        head.load_state_dict(ck["model"])
    except Exception as e:
        raise data.DataError(
            f"{path}: weights do not fit build_head(model_args) ({type(e).__name__}); "
            "re-train with this model.py"
        ) from None
    return head.eval(), ck


def identity(ck):
    """What must agree between ensemble members: architecture, embeddings (model + data) and splits
    file."""
    meta = ck["config"].get("features_meta") or {}
    return {
        "model_args": ck["model_args"],
        "features": (meta.get("model"), meta.get("fingerprint")),
        "splits": ck["config"].get("splits_sha256"),
    }


def config_path(path, cfg, flag):
    """A file path from a checkpoint's config: relative to the folder train.py ran in (config
    "cwd"), unless absolute."""
    there = path if os.path.isabs(path) else os.path.join(cfg.get("cwd", ""), path)
    if os.path.exists(there):
        return there
    raise data.DataError(
        f"{there}: not found (the checkpoint's config names {path} from {cfg.get('cwd')}); "
        f"pass {flag}"
    )


def checkpoint_paths(checkpoint, ensemble, allow_partial):
    """--checkpoint, or the best.pt of every finished fold of --ensemble (the unfinished: an error,
    or with --allow_partial a warning)."""
    if checkpoint:
        return [checkpoint]
    if not os.path.isdir(ensemble):
        raise data.DataError(f"--ensemble {ensemble}: not a directory")
    dirs = fold_dirs(ensemble)
    paths = [
        os.path.join(d, "best.pt")
        for d in dirs.values()
        if os.path.isfile(os.path.join(d, "best.pt"))
    ]
    if not paths:
        raise data.DataError(
            f"--ensemble {ensemble}: no fold*/best.pt in it; train folds with train.py first"
        )
    bad = [os.path.basename(d) for d in dirs.values() if not fold_finished(d)]
    if bad:
        msg = f"--ensemble {ensemble}: unfinished or missing folds: {', '.join(bad)}"
        if not allow_partial:
            raise data.DataError(msg + "; finish them (run_cv.sh resumes) or pass --allow_partial")
        print(f"warning: {msg}; ensembling the others", file=sys.stderr)
        paths = [p for p in paths if os.path.basename(os.path.dirname(p)) not in bad]
        if not paths:
            raise data.DataError(msg)
    return paths


def load_members(checkpoint, ensemble, allow_partial):
    """The models evaluate.py / predict.py score -> paths, heads, checkpoints: one run's folds."""
    paths = checkpoint_paths(checkpoint, ensemble, allow_partial)
    heads, cks = zip(*[load_checkpoint(p) for p in paths])
    ref = identity(cks[0])
    for ck, p in zip(cks[1:], paths[1:]):
        for key, val in identity(ck).items():
            if val != ref[key]:
                raise data.DataError(
                    f"--ensemble: {p} differs from {paths[0]} in {key} ({val} vs {ref[key]}); "
                    f"ensemble only the folds of one run"
                )
    return paths, heads, cks


def scoring_of(rule, paths, cks):
    """--scoring, else the one rule the checkpoints were validated with (config "scoring")."""
    if rule:
        return rule
    rules = [ck["config"].get("scoring") for ck in cks]
    if None in rules:
        raise data.DataError(
            f"{paths[rules.index(None)]}: its config names no scoring rule; "
            f"pass --scoring {{{','.join(model.SCORING_RULES)}}} or re-train it with train.py"
        )
    if len(set(rules)) > 1:
        raise data.DataError(
            f"--ensemble: the folds were validated with different scoring rules ({rules}); "
            f"pass --scoring to score them all under one"
        )
    return rules[0]


def knn_database(head, split, scoring, batch_size=model.SCORE_BATCH):
    """The KNN head's database of a fold: the sign codes of its training images' averaged codes
    (model.score_embeddings under the run's scoring rule; one code per image) -> (n, bits) float32.
    """
    s = model.score_embeddings(
        head,
        split["image"][:, 0],
        split["text"],
        split["n_captions"],
        scoring,
        batch_size=batch_size,
    )
    return knn.sign_codes(s.codes)

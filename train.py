"""
Train the hash head on cached frozen SigLIP2 embeddings: one cross-validation fold.

    python train.py --features data/coco/features_siglip2-base-patch16-256.safetensors \
        --splits data/coco/splits.json --fold 0 --out_dir outputs/siglip2_hash64/fold0
    python train.py ... --bits 0                  # plain-MLP baseline (no hash layer)
    python train.py ... --resume                  # continue an interrupted run from out_dir/last.pt
    python train.py ... --input_norm none --hash_norm none --prior_init off --hash_weight 0.1 --hash_warmup 0 \
        --lr 2e-4 --input_dropout 0 --code_classifier_gain 1  # the original recipe

The towers are frozen, so training on their cached outputs is the same computation as running them in the
loop. The whole fold lives in memory as float32; an epoch is one randperm plus tensor slicing (one caption,
and one view if there are several, sampled per image per epoch). Validation averages the probabilities
over all captions of an image, so its score is repeatable. Writes to --out_dir: config.json, log.jsonl,
last.pt, best.pt, val_metrics.json, val_predictions.npz (see README / contract).
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import metrics
import model

TERMS = ("loss", "bce", "bce_sign", "quant", "balance", "decorr", "hash_reg", "h_abs")  # per-step training statistics


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _number(kind, lo, lo_ok):
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if not (x >= lo if lo_ok else x > lo) or (kind is float and not math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"{s} must be {'>=' if lo_ok else '>'} {lo}")
        return x
    return parse


def _fraction(s):
    x = _number(float, 0.0, True)(s)
    if x >= 1:
        raise argparse.ArgumentTypeError(f"{s} must be in [0, 1)")
    return x


def _dims(s):
    try:
        dims = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated widths like 1024,512") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{s!r}: widths must be positive")
    return dims


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None of the flags whose default depends on --bits (their help says it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Fills the defaults that depend on --bits after parsing, so every caller of parse_args sees numbers;
    a bad flag gets one line that names it, instead of the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")

    def parse_known_args(self, *a, **k):
        args, rest = super().parse_known_args(*a, **k)
        if getattr(args, "lr", 0) is None:  # measured best per model (README / issue 3 report)
            args.lr = 3e-4 if args.bits == 0 else 2e-3
        if getattr(args, "input_dropout", 0) is None:
            args.input_dropout = 0.5 if args.bits == 0 else 0.35
        if getattr(args, "code_classifier_gain", 0) is None:
            args.code_classifier_gain = 2.0 if args.code_classifier == "centres" else 5.0
        return args, rest


def get_args_parser():
    p = _Parser("train", description="train the hash head on one fold of cached embeddings",
                formatter_class=_Formatter)
    # data
    g = p.add_argument_group("data")
    g.add_argument("--features", required=True, help="feature cache from extract_features.py (.safetensors)")
    g.add_argument("--splits", required=True, help="splits.json from make_splits.py")
    g.add_argument("--fold", type=_number(int, 0, True), default=0, help="validation fold k; trains on dev minus val_folds[k]")
    # model
    g = p.add_argument_group("model")
    g.add_argument("--fusion", choices=model.FUSIONS, default="hadamard", help="hadamard: [d_i, d_t, d_i*d_t, m_i, m_t]; concat: [d_i, d_t, m_i, m_t]")
    g.add_argument("--no_decompose", dest="decompose", action="store_false", help="feed raw embeddings instead of direction + log-magnitude")
    g.add_argument("--mlp_dims", type=_dims, default=[1024, 512], help="hidden widths of the MLP, comma-separated")
    g.add_argument("--dropout", type=_fraction, default=0.1, help="dropout after each hidden layer")
    g.add_argument("--input_dropout", type=_fraction, default=None, help="dropout on the standardised fusion vector, against memorising the training images; default 0.35 with a hash layer, 0.5 for --bits 0 (original: 0)")
    g.add_argument("--bits", type=int, choices=model.HASH_BITS, default=64, help="hash code length; 0 = no hash layer (plain-MLP baseline)")
    g.add_argument("--input_norm", choices=model.INPUT_NORMS, default="batchnorm", help="non-affine BatchNorm on the fusion input: SigLIP coordinates are ~0.04 and an unscaled MLP barely learns (original: none)")
    g.add_argument("--hash_norm", choices=model.HASH_NORMS, default="batchnorm", help="BatchNorm between the hash Linear and tanh: balanced bits, no early tanh saturation (original: none)")
    g.add_argument("--baseline", choices=("none", "probe", "zeroshot"), default="none", help="instead of training the hash head, fit a linear baseline and write the same outputs: probe = one-vs-rest logistic regression (scikit-learn) on [d_i, d_t, m_i, m_t]; zeroshot = SigLIP's own classifier, scale * cos(image, 'a photo of a {name}.') + bias")
    g.add_argument("--probe_C", type=_number(float, 0.0, False), default=1.0, help="inverse L2 strength of the --baseline probe logistic regressions (standardised inputs)")
    g.add_argument("--code_classifier", choices=model.CODE_CLASSIFIERS, default="learned", help="classifier on the codes: learned = an ordinary trained Linear (original); centres = fixed random +-1 class centres, only the bias trains: images sharing labels get nearby codes, so the KNN head comes closer to the MLP head, which loses accuracy (README)")
    g.add_argument("--code_classifier_gain", type=_number(float, 0.0, False), default=None, help="multiplies the initial weights of the classifier on the tanh codes (not used with --bits 0): bounded codes need larger weights, which Adam grows only slowly from the default init; default 5 (original: 1), and 2 for the fixed --code_classifier centres (their scale: larger lets the codes stay unsaturated, which the KNN head pays for)")
    g.add_argument("--prior_init", choices=("on", "off"), default="on", help="classifier bias = log(p/(1-p)) of the fold's class priors; keeps tanh out of saturation (original: off)")
    # loss
    g = p.add_argument_group("loss")
    g.add_argument("--hash_weight", type=_number(float, 0.0, True), default=0.0, help="weight of the hash regulariser (quantisation + balance + decorrelation); 0 by default: on planted data it cost the MLP head ~2 points of mAP and did not help the KNN head (README; original: 0.1)")
    g.add_argument("--lambda_balance", type=_number(float, 0.0, True), default=0.1, help="bit-balance weight inside the hash regulariser")
    g.add_argument("--lambda_decorr", type=_number(float, 0.0, True), default=0.01, help="bit-decorrelation weight inside the hash regulariser")
    g.add_argument("--sign_weight", type=_number(float, 0.0, True), default=0.0, help="weight of a second BCE on the classifier applied to the binarised codes sign(h) (straight-through gradient)")
    g.add_argument("--hash_warmup", type=_number(float, 0.0, True), default=15.0, help="with --hash_weight > 0: epochs of linear ramp of hash_weight from 0, so codes first learn the labels, then get quantised; keep it below --epochs (original: 0 = full weight from the start)")
    # optim
    g = p.add_argument_group("optim")
    g.add_argument("--epochs", type=_number(int, 1, True), default=20, help="maximum epochs")
    g.add_argument("--patience", type=_number(int, 0, True), default=3, help="stop after this many epochs without a better val mAP_macro (0 = never)")
    g.add_argument("--batch_size", type=_number(int, 2, True), default=32, help="micro-batch size (>= 2 for BatchNorm)")
    g.add_argument("--accum_steps", type=_number(int, 1, True), default=2, help="micro-batches per optimizer step, run as one pass with BatchNorm statistics per micro-batch (equal to accumulating them); effective batch = batch_size * accum_steps")
    g.add_argument("--lr", type=_number(float, 0.0, False), default=None, help="peak AdamW learning rate; default 2e-3 with a hash layer, 3e-4 for --bits 0 (original: 2e-4, too small to train the hash head in 20 epochs)")
    g.add_argument("--weight_decay", type=_number(float, 0.0, True), default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=_fraction, default=0.1, help="fraction of all optimizer steps spent in linear lr warmup")
    g.add_argument("--min_lr", type=_number(float, 0.0, True), default=1e-6, help="lr at the end of the cosine decay")
    g.add_argument("--scheduler", choices=("cosine", "cosine_restarts"), default="cosine", help="after warmup: one cosine decay, or SGDR restarts (periods T_0, T_0*T_mult, ... epochs)")
    g.add_argument("--T_0", type=_number(int, 1, True), default=5, help="first cosine_restarts period in epochs")
    g.add_argument("--T_mult", type=_number(int, 1, True), default=2, help="period growth factor of cosine_restarts")
    g.add_argument("--clip_grad", type=_number(float, 0.0, True), default=1.0, help="max gradient norm (0 = no clipping)")
    # run
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="base seed; fold k uses seed + k")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (default: fp16 + GradScaler on cuda, off on cpu)")
    g.add_argument("--compile", action="store_true", help="torch.compile the head (checkpoints still hold the plain module's weights)")
    g.add_argument("--compile_backend", choices=("inductor", "aot_eager", "eager"), default="inductor", help="torch.compile backend (aot_eager: no C++ codegen, compiles in seconds)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (bit-repeatable on GPU too, slower)")
    g.add_argument("--num_threads", type=_number(int, 0, True), default=0, help="CPU threads for torch (0 = torch default)")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out_dir", required=True, help="output folder of this fold")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt (fresh start if there is none)")
    return p


# ---------------------------------------------------------------------------- data

def load_fold(args, device):
    """Feature cache + splits -> float32 tensors of the fold's train / val images on `device`."""
    try:
        tensors, meta = data.load_features(args.features)
        splits = data.load_splits(args.splits)
        data.check_split_ids(splits, tensors["ids"].numpy(), where=args.features)
    except data.DataError as e:
        fail(str(e))
    n_folds = len(splits["val_folds"])
    if args.fold >= n_folds:
        fail(f"--fold: {args.fold} is out of range; {args.splits} has folds 0..{n_folds - 1}")
    ids = tensors["ids"].numpy()
    val_ids = np.asarray(sorted(splits["val_folds"][args.fold]), dtype=np.int64)
    train_ids = np.setdiff1d(np.asarray(splits["dev"], dtype=np.int64), val_ids)  # sorted
    # images the extractor could not read, and images without a caption, cannot be fed to the head
    bad = set(json.loads(meta.get("bad_images", "[]"))) | set(ids[tensors["n_captions"].numpy() == 0].tolist())
    order = np.argsort(ids)
    out = {"meta": meta, "skipped": {}, "prompts": tensors.get("prompts")}
    for name, want in (("train", train_ids), ("val", val_ids)):
        keep = np.asarray([i not in bad for i in want.tolist()], dtype=bool)
        out["skipped"][name] = int((~keep).sum())
        rows = torch.from_numpy(order[np.searchsorted(ids, want[keep], sorter=order)])  # (n,)
        out[name] = {"ids": torch.from_numpy(want[keep]),
                     "image": tensors["image"][rows].float().to(device),            # (n, V, D) converted once
                     "text": tensors["text"][rows].float().to(device),              # (n, C, D)
                     "n_captions": tensors["n_captions"][rows].to(device),          # (n,)
                     "labels": tensors["labels"][rows].float().to(device)}          # (n, 80)
    if len(out["train"]["ids"]) < args.batch_size:
        fail(f"--batch_size: {args.batch_size} exceeds the {len(out['train']['ids'])} training images of fold {args.fold}")
    if len(out["val"]["ids"]) == 0:
        fail(f"{args.splits}: fold {args.fold} has no usable validation images")
    return out


def lr_multiplier(step, warmup, total, steps_per_epoch, args):
    """LambdaLR factor at optimizer step `step`: linear warmup, then cosine (or SGDR) down to min_lr."""
    if step < warmup:
        return (step + 1) / warmup
    t, period = step - warmup, max(1, total - warmup)
    if args.scheduler == "cosine_restarts":
        period = args.T_0 * steps_per_epoch
        while t >= period:
            t, period = t - period, period * args.T_mult
    frac = min(1.0, t / period)
    floor = args.min_lr / args.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------------- loop

def train_one_epoch(net, fold, opt, sched, scaler, args, epoch, state):
    """One pass over the shuffled training images; returns mean training terms. No .item() per step."""
    net.train()
    tr, B, A = fold["train"], args.batch_size, args.accum_steps
    n, dev = len(tr["ids"]), tr["image"].device
    perm = torch.randperm(n)  # global CPU RNG (saved in checkpoints), so resume is exact
    cap = (torch.rand(n) * tr["n_captions"].cpu()[perm]).long()  # one caption per image, < n_captions
    view = torch.randint(tr["image"].shape[1], (n,))  # one view per image (all 0 when V == 1)
    perm, cap, view = perm.to(dev), cap.to(dev), view.to(dev)
    x_img, x_txt, y = tr["image"][perm, view], tr["text"][perm, cap], tr["labels"][perm]  # (n, D) (n, D) (n, 80)
    n_micro = n // B  # drop the ragged tail: BatchNorm needs >= 2 rows, codes stats want full batches
    stats = torch.zeros(n_micro, len(TERMS), device=dev)  # (n_micro, terms), read once per check
    amp_ctx = torch.autocast(dev.type, dtype=state["amp_dtype"], enabled=state["amp"])
    ramp = args.hash_warmup * state["steps_per_epoch"]
    bar = tqdm(total=n_micro, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty())
    checked = 0
    for s in range(0, n_micro, A):  # one optimizer step: micro-batches s .. e-1 in one forward/backward pass
        e = min(s + A, n_micro)
        hw = args.hash_weight * (min(1.0, sched.last_epoch / ramp) if ramp > 0 else 1.0)
        with amp_ctx:  # BatchNorm per micro-batch (groups), so this equals accumulating e - s separate passes
            logits, h = net(x_img[s * B:e * B], x_txt[s * B:e * B], groups=e - s)  # (rows, 80), (rows, bits) | None
            sign_logits = net.sign_logits(h) if args.sign_weight > 0 and h is not None else None
        total = 0
        for i in range(s, e):
            r = slice((i - s) * B, (i - s + 1) * B)  # micro-batch i: its own BCE and code statistics
            loss, terms = model.head_loss(logits[r], y[i * B:(i + 1) * B], h[r] if h is not None else None,
                                          hash_weight=hw, lambda_balance=args.lambda_balance,
                                          lambda_decorr=args.lambda_decorr, as_float=False,
                                          sign_logits=sign_logits[r] if sign_logits is not None else None,
                                          sign_weight=args.sign_weight)
            total = total + loss / A
            zero = loss.detach() * 0
            stats[i] = torch.stack([loss.detach()] + [terms.get(k, zero) for k in TERMS[1:-1]]
                                   + [h[r].detach().float().abs().mean() if h is not None else zero])
        scaler.scale(total).backward()
        if args.clip_grad > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad, foreach=True)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=False)  # reuse the gradient buffers: no reallocation (page faults) per step
        bar.update(e - s)
        if e // 200 > s // 200 or e == n_micro:  # one host sync per 200 micro-batches: stop on NaN/Inf loss
            finite = torch.isfinite(stats[checked:e, 0])
            if not bool(finite.all()):
                bad = checked + int((~finite).nonzero()[0, 0]) + 1
                bar.close()
                fail(f"non-finite loss at epoch {epoch} step {bad}; lower --lr or check the feature cache")
            checked = e
    bar.close()
    return dict(zip(TERMS, stats.mean(0).tolist())), hw


@torch.no_grad()
def evaluate(net, split, amp, amp_dtype, chunk=8192):
    """Probabilities averaged over all captions of each image (view 0) and the sign of the mean code."""
    net.eval()
    img, txt, ncap = split["image"][:, 0], split["text"], split["n_captions"]
    n, n_cap = len(img), txt.shape[1]
    probs, codes = [], []
    for s in range(0, n, chunk):
        p_sum, h_sum = 0.0, 0.0
        for c in range(n_cap):
            with torch.autocast(img.device.type, dtype=amp_dtype, enabled=amp):
                logits, h = net(img[s:s + chunk], txt[s:s + chunk, c])  # (b, 80), (b, bits) | None
            has = (ncap[s:s + chunk] > c)[:, None]  # (b, 1): zero rows past n_captions are ignored
            p_sum = p_sum + torch.where(has, torch.sigmoid(logits.float()), 0.0)
            if h is not None:
                h_sum = h_sum + torch.where(has, h.float(), 0.0)
        k = ncap[s:s + chunk, None].float()
        probs.append((p_sum / k).cpu())
        if isinstance(h_sum, torch.Tensor):
            codes.append(model.sign_codes(h_sum).to(torch.int8).cpu())  # sign of the mean code, 0 -> +1
    return torch.cat(probs).numpy(), (torch.cat(codes).numpy() if codes else None)


# ---------------------------------------------------------------------------- baselines

@torch.no_grad()
def fit_baseline(head, args, fold, seed):
    """Set a linear HashHead (bits 0, no MLP, concat fusion) to a baseline that needs no gradient descent.

    zeroshot: SigLIP's own classifier, logit_c = logit_scale * cos(image, prompt_c) + logit_bias, with the
    model's scale and bias from the cache metadata (the caption is ignored). probe: one-vs-rest logistic
    regression (scikit-learn L-BFGS, as CLIP's linear probes) on the standardised fusion vector of one
    sampled caption per training image; the standardisation is the eval-mode input BatchNorm.
    As a HashHead the baseline is evaluated, ensembled and aggregated exactly like a trained run.
    """
    W, b = head.classifier.weight, head.classifier.bias  # (80, 2D+2), (80,)
    W.zero_()
    dim = head.model_args["dim"]
    if args.baseline == "zeroshot":
        meta = fold["meta"]
        if fold["prompts"] is None or "logit_scale" not in meta:
            fail(f"{args.features}: no class prompts / logit scale in the cache; re-run extract_features.py "
                 f"with --prompts to use --baseline zeroshot")
        p = fold["prompts"].float()
        W[:, :dim] = float(meta["logit_scale"]) * p / p.norm(dim=1, keepdim=True)  # acts on d_i = v_i / |v_i|
        b.fill_(float(meta["logit_bias"]))
        return
    from sklearn.linear_model import LogisticRegression
    tr = fold["train"]
    n = len(tr["ids"])
    g = torch.Generator().manual_seed(seed)
    cap = (torch.rand(n, generator=g) * tr["n_captions"].cpu()).long()  # one caption per image, seeded
    x = head.fuse(tr["image"][:, 0].cpu(), tr["text"].cpu()[torch.arange(n), cap]).double()  # (n, 2D+2)
    bn = head.input_norm
    mean, var = x.mean(0), x.var(0, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    z = ((x - mean) / (var + bn.eps).sqrt()).numpy()  # exactly what the eval-mode BatchNorm computes
    y = tr["labels"].cpu().numpy()
    for c in tqdm(range(y.shape[1]), desc="probe classes", disable=not sys.stderr.isatty()):
        p = float(y[:, c].mean())
        if p in (0.0, 1.0):  # a class absent (or everywhere) in this fold's training images: its prior
            b[c] = math.log(max(p, 1e-4) / max(1 - p, 1e-4))
            continue
        clf = LogisticRegression(C=args.probe_C, max_iter=1000).fit(z, y[:, c])
        W[c] = torch.from_numpy(clf.coef_[0]).to(W)
        b[c] = float(clf.intercept_[0])


# ---------------------------------------------------------------------------- main

def save_checkpoint(path, head, opt, scaler, sched, state, config, finished):
    ckpt = {"model": head.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": sched.state_dict(), "epoch": state["epoch"], "best": state["best"],
            "best_epoch": state["best_epoch"], "bad_epochs": state["bad_epochs"],
            "model_args": head.model_args, "config": config, "finished": finished,
            "rng": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


def save_best(out_dir, fold, probs, codes, val_metrics):
    va = fold["val"]
    arrays = {"ids": va["ids"].numpy(), "labels": va["labels"].cpu().numpy().astype(np.uint8),
              "probs": probs.astype(np.float32)}
    if codes is not None:
        arrays["codes"] = codes

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    data.atomic_write(os.path.join(out_dir, "val_predictions.npz"), write)
    data.save_json(os.path.join(out_dir, "val_metrics.json"), val_metrics)


def main(args):
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # CPU autocast: bf16 only is useful
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if args.sign_weight > 0 and (args.bits == 0 or args.baseline != "none"):
        fail("--sign_weight: the binarised-code loss needs hash codes, but this run has none (--bits 0 or --baseline); drop it")
    seed = args.seed + args.fold
    torch.manual_seed(seed)

    model_args = dict(dim=0, num_classes=data.NUM_CLASSES, fusion=args.fusion, decompose=args.decompose,
                      mlp_dims=list(args.mlp_dims), dropout=args.dropout, bits=args.bits, input_norm=args.input_norm,
                      hash_norm=args.hash_norm, input_dropout=args.input_dropout, code_classifier=args.code_classifier)
    last_path = os.path.join(args.out_dir, "last.pt")
    ckpt = None
    if os.path.exists(last_path):
        if not args.resume:
            fail(f"--out_dir: {args.out_dir} already holds a run (last.pt); pass --resume to continue it or choose another --out_dir")
        try:
            ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as e:
            fail(f"{last_path}: unreadable checkpoint ({type(e).__name__}); delete it to start over")
        stored = {k: p.default for k, p in inspect.signature(model.HashHead).parameters.items()}
        stored.update(ckpt["model_args"])  # a key the checkpoint predates means HashHead's default
        mismatch = {k: (stored.get(k), v) for k, v in model_args.items() if k != "dim" and stored.get(k) != v}
        if mismatch or ckpt["config"]["fold"] != args.fold:
            fail(f"--resume: {last_path} was trained with other model flags or fold "
                 f"({', '.join(f'{k}: {a} in the checkpoint, {b} now' for k, (a, b) in mismatch.items()) or 'fold'}); "
                 f"use the original flags or another --out_dir")
        if ckpt.get("finished"):
            print(f"{args.out_dir}: already finished (best val mAP_macro {ckpt['best']:.4f} at epoch {ckpt['best_epoch']})")
            return
    elif args.resume:
        print(f"note: no {last_path} to resume from; starting fresh")

    if args.baseline != "none":  # a linear head on [d_i, d_t, m_i, m_t]; standardised inputs for the probe
        model_args.update(fusion="concat", decompose=True, mlp_dims=[], dropout=0.0, bits=0,
                          input_norm="batchnorm" if args.baseline == "probe" else "none")
    fold = load_fold(args, device)
    model_args["dim"] = int(fold["train"]["image"].shape[2])
    if ckpt is not None and ckpt["model_args"]["dim"] != model_args["dim"]:
        fail(f"--resume: {last_path} has embedding dim {ckpt['model_args']['dim']}, {args.features} has "
             f"{model_args['dim']}; use the original feature cache or another --out_dir")

    head = model.HashHead(**model_args).to(device)
    if args.baseline != "none":
        fit_baseline(head, args, fold, seed)
    else:
        head.init_code_classifier(args.code_classifier_gain)
        if args.prior_init == "on":
            head.init_prior(fold["train"]["labels"].mean(0).cpu())
    net = torch.compile(head, backend=args.compile_backend) if args.compile else head  # train through net, save head (no _orig_mod.)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    # derived numbers (printed and stored): the schedule is in optimizer steps
    n_train, n_val = len(fold["train"]["ids"]), len(fold["val"]["ids"])
    n_micro = n_train // args.batch_size
    steps_per_epoch = math.ceil(n_micro / args.accum_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(round(args.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, warmup_steps, total_steps, steps_per_epoch, args))
    with open(args.splits, "rb") as f:
        splits_sha = hashlib.sha256(f.read()).hexdigest()
    config = dict(vars(args), seed_fold=seed, amp=amp, model_args=model_args, n_train=n_train, n_val=n_val,
                  skipped_train=fold["skipped"]["train"], skipped_val=fold["skipped"]["val"],
                  effective_batch=args.batch_size * args.accum_steps, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, warmup_steps=warmup_steps, splits_sha256=splits_sha,
                  features_meta=fold["meta"], torch_version=str(torch.__version__), finished=False,
                  cwd=os.getcwd())  # what relative --features / --splits paths are relative to (evaluate.py)
    print(f"fold {args.fold}: {n_train} train / {n_val} val images (skipped {fold['skipped']}), device {device}, "
          f"amp {amp}, seed {seed}")
    print(f"effective batch {config['effective_batch']} ({args.batch_size} x {args.accum_steps}), "
          f"{steps_per_epoch} steps/epoch, {total_steps} total steps, {warmup_steps} warmup steps, "
          f"lr {args.lr:g} -> {args.min_lr:g} ({args.scheduler})")
    print(f"head: {model_args} ({sum(p.numel() for p in head.parameters()):,} parameters)")

    state = dict(epoch=0, best=-1.0, best_epoch=0, bad_epochs=0, amp=amp, amp_dtype=amp_dtype,
                 steps_per_epoch=steps_per_epoch)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    log_lines = []
    if ckpt is not None:
        head.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        state.update({k: ckpt[k] for k in ("epoch", "best", "best_epoch", "bad_epochs")})
        for k in ("lr", "epochs", "batch_size", "accum_steps", "hash_weight", "scheduler", "seed"):
            if ckpt["config"].get(k) != getattr(args, k):
                print(f"note: --{k} {getattr(args, k)} differs from the checkpoint's {ckpt['config'].get(k)}")
        config = dict(config, resumed_from_epoch=ckpt["epoch"])
        if os.path.exists(log_path):  # drop lines of epochs the checkpoint does not hold
            with open(log_path) as f:
                log_lines = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= state["epoch"]]
        print(f"resumed from {last_path} at epoch {state['epoch']} (best {state['best']:.4f})")
    os.makedirs(args.out_dir, exist_ok=True)
    data.save_json(os.path.join(args.out_dir, "config.json"), config)

    finished = False
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        t0 = time.time()
        if args.baseline == "none":
            train_stats, hw = train_one_epoch(net, fold, opt, sched, scaler, args, epoch, state)
        else:  # fitted in closed form above: evaluate once and finish
            train_stats, hw = {k: 0.0 for k in TERMS}, 0.0
        probs, codes = evaluate(net, fold["val"], amp, amp_dtype)
        labels = fold["val"]["labels"].cpu().numpy().astype(np.uint8)
        val = metrics.compute_all(labels, probs)
        score = val["mAP_macro"]
        state["epoch"] = epoch
        improved = score > state["best"]
        if improved:
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        finished = (epoch == args.epochs or args.baseline != "none"
                    or (args.patience > 0 and state["bad_epochs"] >= args.patience))
        if improved:
            save_best(args.out_dir, fold, probs, codes,
                      dict(val, epoch=epoch, n_images=n_val, skipped_images=fold["skipped"]["val"]))
            save_checkpoint(os.path.join(args.out_dir, "best.pt"), head, opt, scaler, sched, state, config, finished)
        seconds = time.time() - t0
        rec = dict(epoch=epoch, lr=opt.param_groups[0]["lr"], hash_weight=hw, **train_stats,
                   val_mAP_macro=score, best=state["best"], seconds=round(seconds, 2))
        log_lines.append(json.dumps(rec) + "\n")
        data.atomic_write(log_path, lambda tmp: _write_lines(tmp, log_lines))
        save_checkpoint(last_path, head, opt, scaler, sched, state, config, finished)
        print(f"epoch {epoch:3d} | loss {train_stats['loss']:.4f} bce {train_stats['bce']:.4f} "
              f"|h| {train_stats['h_abs']:.3f} | lr {rec['lr']:.2e} | val mAP {score:.4f} "
              f"(best {state['best']:.4f} @ {state['best_epoch']}){' *' if improved else ''} | {seconds:.1f}s")
        if finished:
            break
    config.update(finished=True, best_epoch=state["best_epoch"], best_val_mAP_macro=state["best"],
                  stopped_epoch=state["epoch"])
    data.save_json(os.path.join(args.out_dir, "config.json"), config)
    print(f"done: best val mAP_macro {state['best']:.4f} at epoch {state['best_epoch']} -> {args.out_dir}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""
Train the hash head on cached frozen SigLIP2 embeddings: one cross-validation fold.

    python train.py --features data/coco/features_siglip2-base-patch16-256.safetensors \
        --splits data/coco/splits.json --fold 0 --out_dir outputs/siglip2_hash64/fold0
    python train.py ... --bits 0                  # no-code baseline (linear below 20,000 images, then an MLP)
    python train.py ... --inputs image            # image only, as every published COCO number
    python train.py ... --baseline probe          # logistic-regression probe, written as a linear head
    python train.py ... --resume                  # continue an interrupted run from out_dir/last.pt
    python train.py ... --code_from hidden --mlp_dims 1024,512 --prior_init off --hash_weight 0.1 \
        --hash_warmup 0 --lr 2e-4 --input_dropout 0 --code_classifier_gain 1  # the original recipe

The towers are frozen, so training on their cached outputs is the same computation as running them in the
loop. The fold stays in memory as float16 (as cached) and each batch is converted to float32; an epoch samples
one caption (or a caption subset, --text_input mean) and one view per image. Validation scores every image with
model.score_embeddings, the rule evaluate.py uses (the head is scored as it was trained, on every caption or
caption subset, and its probabilities averaged). At the end the best checkpoint's KNN head is scored on the
validation images too (database: the fold's training images). Writes to --out_dir: config.json, log.jsonl,
last.pt, best.pt, val_metrics.json (MLP head; "knn": the KNN head), val_predictions.npz (probs, codes, knn_probs).
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

import baselines
import cli
import data
import folds
import knn
import metrics
import model
import runs

TERMS = (
    "loss",
    "bce",
    "bce_evidence",
    "bce_sign",
    "quant",
    "balance",
    "decorr",
    "hash_reg",
    "h_abs",
)  # per-step statistics
HEAD = {
    k: p.default for k, p in inspect.signature(model.HashHead).parameters.items()
}  # the recipe's defaults
LOSS = {k: p.default for k, p in inspect.signature(model.head_loss).parameters.items()}
MODEL_FLAGS = (
    "inputs",
    "fusion",
    "decompose",
    "dropout",
    "bits",
    "hash_norm",
    "code_classifier",
    "code_from",
)  # + resolved()'s
AUTO_FLAGS = (
    "lr",
    "input_dropout",
    "code_gain",
    "mlp_dims",
    "input_norm",
)  # default None: resolved()


def get_args_parser():
    p = cli.Parser("train", description="train the hash head on one fold of cached embeddings")
    g = p.add_argument_group("data")
    g.add_argument(
        "--features", required=True, help="feature cache from extract_features.py (.safetensors)"
    )
    g.add_argument("--splits", required=True, help="splits.json from make_splits.py")
    g.add_argument(
        "--fold",
        type=cli.nonneg_int,
        default=0,
        help="validation fold k; trains on dev minus val_folds[k]",
    )
    # model (defaults: model.HashHead's signature)
    g = p.add_argument_group("model")
    g.add_argument(
        "--inputs",
        choices=model.INPUTS,
        default=HEAD["inputs"],
        help="what the head sees: image + text, or one of them (image: the setting of every published COCO number)",
    )
    g.add_argument(
        "--text_input",
        choices=model.TEXT_INPUTS,
        default=model.TEXT_INPUT,
        help="mean (default): the mean of a random non-empty caption subset per step; scored on the mean of every non-empty subset (31 passes for 5 captions), probabilities and codes averaged. each: one caption per step; scored on every caption, averaged",
    )
    g.add_argument(
        "--fusion",
        choices=model.FUSIONS,
        default=HEAD["fusion"],
        help="hadamard: [d_i, d_t, d_i*d_t, m_i, m_t]; concat: [d_i, d_t, m_i, m_t]",
    )
    g.add_argument(
        "--no_decompose",
        dest="decompose",
        action="store_false",
        help="feed raw embeddings instead of direction + log-magnitude (decompose = %(default)s unless given)",
    )
    g.add_argument(
        "--mlp_dims",
        type=cli.int_list,
        default=None,
        help="hidden widths of the MLP, comma-separated ('' = a linear head); default: none (HashHead's: the linear evidence layer on the raw fusion vector); 1024,512 for the --bits 0 baseline from model.SMALL_DATA training images on (model.recipe_defaults)",
    )
    g.add_argument(
        "--dropout",
        type=cli.fraction,
        default=HEAD["dropout"],
        help="dropout after each hidden layer",
    )
    g.add_argument(
        "--input_dropout",
        type=cli.fraction,
        default=None,
        help="dropout on the fusion vector (standardised only for the --bits 0 MLP), against memorising the training images; default: model.recipe_defaults (0.35 with a hash layer; without, 0.5 before an MLP, none before the linear head)",
    )
    g.add_argument(
        "--bits",
        type=cli.nonneg_int,
        default=HEAD["bits"],
        help="hash code length; 0 = no hash layer and no evidence layer (the plain baseline: linear, an MLP from model.SMALL_DATA training images)",
    )
    g.add_argument(
        "--input_norm",
        choices=model.INPUT_NORMS,
        default=None,
        help="non-affine BatchNorm on the fusion input: SigLIP coordinates are ~0.04 and an unscaled MLP barely learns; default: none (a linear head starts from a near-constant function), batchnorm for the --bits 0 MLP (model.recipe_defaults)",
    )
    g.add_argument(
        "--hash_norm",
        choices=model.HASH_NORMS,
        default=HEAD["hash_norm"],
        help="BatchNorm between the hash Linear and tanh (balanced bits); off by default: the codes of the evidence do not need it",
    )
    g.add_argument(
        "--code_classifier",
        choices=model.CODE_CLASSIFIERS,
        default=HEAD["code_classifier"],
        help="classifier on the codes: learned, or fixed random +-1 class centres (only the bias trains: images sharing labels get nearby codes; on planted data it brought the two heads together by lowering the MLP head, docs/EXPERIMENTS.md)",
    )
    g.add_argument(
        "--code_from",
        choices=model.CODE_FROM,
        default=HEAD["code_from"],
        help="what the hash layer reads: evidence = the head's class logits above their priors (a sparse, label-shaped vector that 64 bits hold; the evidence layer learns from its own BCE), hidden = the last hidden layer",
    )
    g.add_argument(
        "--code_classifier_gain",
        dest="code_gain",
        type=cli.positive_float,
        default=None,
        help="multiplies the initial weights of the classifier on the tanh codes (bounded codes need larger weights than the default init); default: model.recipe_defaults (5, or 2 for the centres, whose scale it sets)",
    )
    g.add_argument(
        "--train_views",
        choices=("all", "plain"),
        default="all",
        help="all: each epoch draws one of the cache's image views per image (extract_features.py --views: augmentation); plain: view 0 only (the study's no-augmentation ablation)",
    )
    g.add_argument(
        "--prior_init",
        choices=("on", "off"),
        default="on",
        help="classifier bias = log(p/(1-p)) of the fold's class priors; keeps tanh out of saturation",
    )
    g.add_argument(
        "--baseline",
        choices=("none", "probe", "zeroshot"),
        default="none",
        help="instead of training the head, fit a linear baseline and write the same outputs: probe = one-vs-rest logistic regression on [d_i, d_t, m_i, m_t]; zeroshot = SigLIP's own classifier, scale * cos(image, 'a photo of a {name}.') + bias",
    )
    g.add_argument(
        "--probe_C",
        type=cli.positive_float,
        default=1.0,
        help="inverse L2 strength of the --baseline probe (standardised inputs)",
    )
    # loss (defaults: model.head_loss's signature)
    g = p.add_argument_group("loss")
    g.add_argument(
        "--hash_weight",
        type=cli.nonneg_float,
        default=LOSS["hash_weight"],
        help="weight of the hash regulariser (quantisation + balance + decorrelation); off by default, on planted data it cost both heads 1.6-1.7 points (docs/EXPERIMENTS.md)",
    )
    g.add_argument(
        "--lambda_balance",
        type=cli.nonneg_float,
        default=LOSS["lambda_balance"],
        help="bit-balance weight inside the hash regulariser",
    )
    g.add_argument(
        "--lambda_decorr",
        type=cli.nonneg_float,
        default=LOSS["lambda_decorr"],
        help="bit-decorrelation weight inside the hash regulariser",
    )
    g.add_argument(
        "--sign_weight",
        type=cli.nonneg_float,
        default=LOSS["sign_weight"],
        help="weight of a second BCE on the classifier applied to the binarised codes sign(h) (straight-through gradient)",
    )
    g.add_argument(
        "--hash_warmup",
        type=cli.nonneg_float,
        default=15.0,
        help="with --hash_weight > 0: epochs of linear ramp of hash_weight from 0, so codes first learn the labels, then get quantised",
    )
    # optim
    g = p.add_argument_group("optim")
    g.add_argument("--epochs", type=cli.positive_int, default=20, help="maximum epochs")
    g.add_argument(
        "--patience",
        type=cli.nonneg_int,
        default=3,
        help="stop after this many epochs without a better val mAP_macro (0 = never)",
    )
    g.add_argument(
        "--batch_size",
        type=cli.number(int, 2),
        default=32,
        help="micro-batch size (>= 2 for BatchNorm)",
    )
    g.add_argument(
        "--accum_steps",
        type=cli.positive_int,
        default=2,
        help="micro-batches per optimizer step, run as one pass with BatchNorm statistics per micro-batch; effective batch = batch_size * accum_steps",
    )
    g.add_argument(
        "--lr",
        type=cli.positive_float,
        default=None,
        help="peak AdamW learning rate; default: model.recipe_defaults (1e-2; 3e-4 for the --bits 0 MLP)",
    )
    g.add_argument("--weight_decay", type=cli.nonneg_float, default=0.01, help="AdamW weight decay")
    g.add_argument(
        "--warmup_ratio",
        type=cli.fraction,
        default=0.1,
        help="fraction of all optimizer steps spent in linear lr warmup",
    )
    g.add_argument(
        "--min_lr", type=cli.nonneg_float, default=1e-6, help="lr at the end of the cosine decay"
    )
    g.add_argument(
        "--scheduler",
        choices=("cosine", "cosine_restarts"),
        default="cosine",
        help="after warmup: one cosine decay, or SGDR restarts (periods T_0, T_0*T_mult, ... epochs)",
    )
    g.add_argument(
        "--T_0", type=cli.positive_int, default=5, help="first cosine_restarts period in epochs"
    )
    g.add_argument(
        "--T_mult", type=cli.positive_int, default=2, help="period growth factor of cosine_restarts"
    )
    g.add_argument(
        "--clip_grad",
        type=cli.nonneg_float,
        default=1.0,
        help="max gradient norm (0 = no clipping)",
    )
    # run
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="base seed; fold k uses seed + k")
    g.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (default: fp16 + GradScaler on cuda, off on cpu)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the head (checkpoints still hold the plain module's weights)",
    )
    g.add_argument(
        "--compile_backend",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="torch.compile backend (aot_eager: no C++ codegen, compiles in seconds)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms (bit-repeatable on GPU too, slower)",
    )
    g.add_argument(
        "--num_threads",
        type=cli.nonneg_int,
        default=0,
        help="CPU threads for torch (0 = torch default)",
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out_dir", required=True, help="output folder of this fold")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from out_dir/last.pt (fresh start if there is none)",
    )
    return p


def resolved(args, n_train):
    """The values train.py really uses where a flag's default depends on --bits and the number of training
    images (model.recipe_defaults; HashHead's signature for what that leaves open)."""
    auto = {
        **HEAD,
        "mlp_dims": list(HEAD["mlp_dims"]),
        **model.recipe_defaults(args.bits, n_train, args.code_classifier, args.mlp_dims),
    }
    return {k: auto[k] if getattr(args, k) is None else getattr(args, k) for k in AUTO_FLAGS}


# ---------------------------------------------------------------------------- optimisation


def make_optimizer(head, lr, weight_decay):
    """AdamW over the trainable parameters (the fixed code centres are not), fused kernels on CPU and CUDA."""
    device = next(head.parameters()).device
    return torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def make_scheduler(opt, args, lr, steps_per_epoch):
    """LambdaLR over optimizer steps: linear warmup (--warmup_ratio of all steps), then cosine (or SGDR
    restarts every T_0, T_0 * T_mult, ... epochs) down to --min_lr. -> (scheduler, total steps, warmup steps)."""
    total = steps_per_epoch * args.epochs
    warmup = int(round(args.warmup_ratio * total))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t, period = step - warmup, max(1, total - warmup)
        if args.scheduler == "cosine_restarts":
            period = args.T_0 * steps_per_epoch
            while t >= period:
                t, period = t - period, period * args.T_mult
        floor = args.min_lr / lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / period)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), total, warmup


def train_one_epoch(net, fold, opt, sched, scaler, args, epoch, run):
    """One pass over the shuffled training images; returns (mean training terms, hash weight). No sync per step."""
    net.train()
    tr, B, A = fold["train"], args.batch_size, args.accum_steps
    n, dev = len(tr["ids"]), tr["image"].device
    perm = torch.randperm(n).to(dev)  # global CPU RNG (saved in checkpoints), so resume is exact
    n_views = tr["image"].shape[1] if args.train_views == "all" else 1
    view = torch.randint(n_views, (n,)).to(
        dev
    )  # one view per image (all 0 when V == 1 or --train_views plain)
    n_micro = (
        n // B
    )  # drop the ragged tail: BatchNorm needs >= 2 rows, codes stats want full batches
    stats = torch.zeros(n_micro, len(TERMS), device=dev)  # (n_micro, terms), read once per check
    amp_ctx = torch.autocast(dev.type, dtype=run["amp_dtype"], enabled=run["amp"])
    ramp = args.hash_warmup * run["steps_per_epoch"]
    bar = tqdm(total=n_micro, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty())
    for s in range(
        0, n_micro, A
    ):  # one optimizer step: micro-batches s .. e-1 in one forward/backward pass
        e = min(s + A, n_micro)
        rows = perm[s * B : e * B]
        img = tr["image"][rows, view[s * B : e * B]].float()  # (rows, D)
        txt = (
            folds.sample_text(tr, rows, args.text_input) if args.inputs != "image" else None
        )  # (rows, D)
        y = tr["labels"][rows].float()  # (rows, C)
        hw = args.hash_weight * (min(1.0, sched.last_epoch / ramp) if ramp > 0 else 1.0)
        with (
            amp_ctx
        ):  # BatchNorm per micro-batch (groups), so this equals accumulating e - s separate passes
            out = net(img, txt, groups=e - s)
            sign_logits = net.sign_logits(out.codes) if args.sign_weight > 0 else None
        total = 0
        for i in range(e - s):
            r = slice(i * B, (i + 1) * B)  # micro-batch i: its own BCE and code statistics
            h = out.codes[r] if out.codes is not None else None
            loss, terms = model.head_loss(
                out.logits[r],
                y[r],
                h,
                hash_weight=hw,
                lambda_balance=args.lambda_balance,
                lambda_decorr=args.lambda_decorr,
                as_float=False,
                sign_weight=args.sign_weight,
                sign_logits=sign_logits[r] if sign_logits is not None else None,
                evidence=out.evidence[r] if out.evidence is not None else None,
            )
            total = total + loss / A
            zero = loss.detach() * 0
            stats[s + i] = torch.stack(
                [loss.detach()]
                + [terms.get(k, zero) for k in TERMS[1:-1]]
                + [h.detach().float().abs().mean() if h is not None else zero]
            )
        scaler.scale(total).backward()
        if args.clip_grad > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad, foreach=True)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(
            set_to_none=False
        )  # reuse the gradient buffers: no reallocation (page faults) per step
        bar.update(e - s)
        if (
            e // 200 > s // 200 or e == n_micro
        ):  # one host sync per 200 micro-batches: stop on NaN/Inf loss
            bad = (~torch.isfinite(stats[:e, 0])).nonzero()
            if len(bad):
                bar.close()
                cli.fail(
                    f"non-finite loss at epoch {epoch} step {int(bad[0, 0]) + 1}; lower --lr or check the feature cache"
                )
    bar.close()
    return dict(zip(TERMS, stats.mean(0).tolist())), hw


# ---------------------------------------------------------------------------- scoring


def score(net, split, text_input, keep_captions=False):
    """model.score_embeddings on a split's view-0 images, in float32 even under --amp (the rule evaluate.py
    uses, so a fold's val metrics are the ones evaluate.py reports for it): -> Scores."""
    return model.score_embeddings(
        net,
        split["image"][:, 0],
        split["text"],
        split["n_captions"],
        text_input,
        keep_captions=keep_captions,
    )


def knn_val(net, fold, text_input):
    """The KNN head on the validation images: each validation (image, caption) code votes among the codes of the
    fold's training images (knn.knn_scores' defaults, as evaluate.py --head knn). -> probs (n_val, C) numpy."""
    db = knn.sign_codes(
        score(net, fold["train"], text_input).codes
    )  # (n_train, bits); no per-caption codes
    q = score(net, fold["val"], text_input, keep_captions=True)
    return knn.knn_head(
        q.caption_codes,
        q.caption_mask,
        db,
        fold["train"]["labels"].cpu(),
        device=fold["val"]["image"].device,
    ).numpy()


# ---------------------------------------------------------------------------- checkpoints and outputs


def save_predictions(out_dir, split, arrays, val_metrics):
    """val_predictions.npz (ids, labels, probs, codes, knn_probs) and val_metrics.json, each written atomically."""
    arrays = dict(
        ids=split["ids"].numpy(),
        labels=split["labels"].cpu().numpy().astype(np.uint8),
        **{k: v for k, v in arrays.items() if v is not None},
    )
    data.atomic_write(
        os.path.join(out_dir, "val_predictions.npz"), lambda tmp: np.savez(tmp, **arrays)
    )
    data.save_json(os.path.join(out_dir, "val_metrics.json"), val_metrics)


def model_args_of(args, dim, num_classes, n_train):
    """HashHead arguments from the flags (a baseline: the linear head of baselines.linear_head_args)."""
    if args.baseline != "none":
        return baselines.linear_head_args(dim, num_classes, args.baseline, args.inputs)
    return dict(
        dim=dim,
        num_classes=num_classes,
        **{k: getattr(args, k) for k in MODEL_FLAGS},
        **{k: v for k, v in resolved(args, n_train).items() if k != "lr"},
    )


# ---------------------------------------------------------------------------- main


def setup(args):
    """Threads, device, precision, determinism, seed -> the run's fixed settings."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if args.sign_weight > 0 and (args.bits == 0 or args.baseline != "none"):
        cli.fail(
            "--sign_weight: the binarised-code loss needs hash codes, but this run has none (--bits 0 or --baseline); drop it"
        )
    torch.manual_seed(args.seed + args.fold)
    # CPU autocast: only bf16 is useful
    return dict(
        device=device,
        amp=amp,
        amp_dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
        seed=args.seed + args.fold,
    )


def build_head(args, fold, run):
    """The head of this run, initialised (priors) or fitted in closed form (baselines)."""
    tr = fold["train"]
    head = model.HashHead(
        **model_args_of(args, int(tr["image"].shape[2]), int(tr["labels"].shape[1]), len(tr["ids"]))
    ).to(run["device"])
    if args.baseline == "zeroshot":
        if fold["prompts"] is None or "logit_scale" not in fold["meta"]:
            cli.fail(
                f"{args.features}: no class prompts / logit scale in the cache; re-run extract_features.py "
                f"with --prompts to use --baseline zeroshot"
            )
        baselines.fit_zeroshot(
            head,
            fold["prompts"].to(run["device"]),
            fold["meta"]["logit_scale"],
            fold["meta"]["logit_bias"],
        )
    elif args.baseline == "probe":
        txt = folds.sample_text(
            tr, torch.arange(len(tr["ids"]), device=tr["image"].device), args.text_input
        )  # as an epoch
        baselines.fit_probe(head, tr["image"][:, 0], txt, tr["labels"], args.probe_C)
    elif args.prior_init == "on":
        head.init_prior(tr["labels"].float().mean(0).cpu())
    return head


def describe(args, fold, head, run, steps_per_epoch, total, warmup):
    """Print the derived numbers and return config.json's content (all flags and what follows from them)."""
    n_train, n_val = len(fold["train"]["ids"]), len(fold["val"]["ids"])
    with open(args.splits, "rb") as f:
        splits_sha = hashlib.sha256(f.read()).hexdigest()
    config = dict(
        vars(args),
        **resolved(args, n_train),
        seed_fold=run["seed"],
        amp=run["amp"],
        model_args=head.model_args,
        n_train=n_train,
        n_val=n_val,
        skipped_train=fold["skipped"]["train"],
        skipped_val=fold["skipped"]["val"],
        effective_batch=args.batch_size * args.accum_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        splits_sha256=splits_sha,
        features_meta=fold["meta"],
        torch_version=str(torch.__version__),
        finished=False,
        cwd=os.getcwd(),
    )  # what relative --features / --splits paths are relative to (evaluate.py)
    print(
        f"fold {args.fold}: {n_train} train / {n_val} val images (skipped {fold['skipped']}), device {run['device']}, "
        f"amp {run['amp']}, seed {run['seed']}"
    )
    print(
        f"effective batch {config['effective_batch']} ({args.batch_size} x {args.accum_steps}), {steps_per_epoch} "
        f"steps/epoch, {total} total steps, {warmup} warmup steps, lr {run['lr']:g} -> {args.min_lr:g} ({args.scheduler})"
    )
    print(f"head: {head.model_args} ({sum(p.numel() for p in head.parameters()):,} parameters)")
    return config


def validate(net, fold, args, run, epoch):
    """Score the validation images; -> (metrics of the MLP head, arrays for val_predictions.npz)."""
    s = score(net, fold["val"], args.text_input)
    val = metrics.compute_all(fold["val"]["labels"].cpu().numpy().astype(np.uint8), s.probs.numpy())
    codes = (
        knn.sign_codes(s.codes).to(torch.int8).numpy() if s.codes is not None else None
    )  # sign of the mean code
    return dict(
        val, epoch=epoch, n_images=len(fold["val"]["ids"]), skipped_images=fold["skipped"]["val"]
    ), {"probs": s.probs.numpy().astype(np.float32), "codes": codes}


def fit(args, net, head, fold, opt, sched, scaler, run, state, config, log_lines):
    """Epochs until --epochs or early stopping; best.pt / val outputs on every improvement, last.pt every epoch."""
    log_path, last_path = (
        os.path.join(args.out_dir, "log.jsonl"),
        os.path.join(args.out_dir, "last.pt"),
    )
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        t0 = time.time()
        if args.baseline == "none":
            train_stats, hw = train_one_epoch(net, fold, opt, sched, scaler, args, epoch, run)
        else:  # fitted in closed form: evaluate once and finish
            train_stats, hw = {k: 0.0 for k in TERMS}, 0.0
        val, arrays = validate(net, fold, args, run, epoch)
        improved = val["mAP_macro"] > state["best"]
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best=val["mAP_macro"], best_epoch=epoch)
        state["finished"] = (
            epoch == args.epochs
            or args.baseline != "none"
            or (args.patience > 0 and state["bad_epochs"] >= args.patience)
        )
        if improved:
            save_predictions(args.out_dir, fold["val"], arrays, val)
            runs.save_checkpoint(
                os.path.join(args.out_dir, "best.pt"), head, opt, scaler, sched, state, config
            )
        rec = dict(
            epoch=epoch,
            lr=opt.param_groups[0]["lr"],
            hash_weight=hw,
            **train_stats,
            val_mAP_macro=val["mAP_macro"],
            best=state["best"],
            seconds=round(time.time() - t0, 2),
        )
        log_lines.append(json.dumps(rec) + "\n")
        data.save_text(log_path, "".join(log_lines))
        runs.save_checkpoint(last_path, head, opt, scaler, sched, state, config)
        print(
            f"epoch {epoch:3d} | loss {train_stats['loss']:.4f} bce {train_stats['bce']:.4f} "
            f"|h| {train_stats['h_abs']:.3f} | lr {rec['lr']:.2e} | val mAP {val['mAP_macro']:.4f} "
            f"(best {state['best']:.4f} @ {state['best_epoch']}){' *' if improved else ''} | {rec['seconds']:.1f}s"
        )
        if state["finished"]:
            break


def finish(args, head, fold, run, config):
    """The best checkpoint's KNN head on the validation images (into val_metrics.json / val_predictions.npz),
    then config.json says the fold is finished."""
    if head.bits > 0:
        head.load_state_dict(
            torch.load(
                os.path.join(args.out_dir, "best.pt"), map_location="cpu", weights_only=True
            )["model"]
        )
        probs = knn_val(head, fold, args.text_input)
        with open(os.path.join(args.out_dir, "val_metrics.json")) as f:
            val = json.load(f)
        val["knn"] = metrics.compute_all(
            fold["val"]["labels"].cpu().numpy().astype(np.uint8), probs
        )
        with np.load(os.path.join(args.out_dir, "val_predictions.npz")) as z:
            arrays = {k: z[k] for k in z.files if k not in ("ids", "labels")}
        save_predictions(
            args.out_dir, fold["val"], dict(arrays, knn_probs=probs.astype(np.float32)), val
        )
        print(f"knn head (best epoch {val['epoch']}): val mAP_macro {val['knn']['mAP_macro']:.4f}")
    config.update(
        finished=True,
        best_epoch=config.get("best_epoch"),
        best_val_mAP_macro=config.get("best_val_mAP_macro"),
    )
    data.save_json(os.path.join(args.out_dir, "config.json"), config)


def main(args):
    run = setup(args)
    last_path, log_path = (
        os.path.join(args.out_dir, "last.pt"),
        os.path.join(args.out_dir, "log.jsonl"),
    )
    ckpt = runs.read_resume(
        last_path, args.resume, args.fold, lambda *shape: model_args_of(args, *shape)
    )
    if ckpt is not None and ckpt["finished"] and runs.fold_finished(args.out_dir):
        print(
            f"{args.out_dir}: already finished (best val mAP_macro {ckpt['best']:.4f} at epoch {ckpt['best_epoch']})"
        )
        return
    fold = folds.load_fold(args, run["device"])
    head = build_head(args, fold, run)
    if ckpt is not None and ckpt["model_args"]["dim"] != head.model_args["dim"]:
        cli.fail(
            f"--resume: {last_path} has embedding dim {ckpt['model_args']['dim']}, {args.features} has "
            f"{head.model_args['dim']}; use the original feature cache or another --out_dir"
        )
    net = (
        torch.compile(head, backend=args.compile_backend) if args.compile else head
    )  # save head: no _orig_mod.
    run["lr"] = resolved(args, len(fold["train"]["ids"]))["lr"]
    opt = make_optimizer(head, run["lr"], args.weight_decay)
    scaler = torch.amp.GradScaler(
        run["device"].type, enabled=run["amp"] and run["amp_dtype"] == torch.float16
    )
    run["steps_per_epoch"] = math.ceil(
        (len(fold["train"]["ids"]) // args.batch_size) / args.accum_steps
    )
    sched, total, warmup = make_scheduler(opt, args, run["lr"], run["steps_per_epoch"])
    config = describe(args, fold, head, run, run["steps_per_epoch"], total, warmup)
    state = dict(epoch=0, best=-1.0, best_epoch=0, bad_epochs=0, finished=False)
    log_lines = []
    if ckpt is not None:
        runs.restore(ckpt, head, opt, scaler, sched, state)
        for k in ("lr", "epochs", "batch_size", "accum_steps", "hash_weight", "scheduler", "seed"):
            if ckpt["config"].get(k) != getattr(args, k):
                print(
                    f"note: --{k} {getattr(args, k)} differs from the checkpoint's {ckpt['config'].get(k)}"
                )
        print(f"resumed from {last_path} at epoch {state['epoch']} (best {state['best']:.4f})")
        log_lines = runs.read_log(log_path, state["epoch"])
        config["resumed_from_epoch"] = ckpt["epoch"]
    os.makedirs(args.out_dir, exist_ok=True)
    data.save_json(os.path.join(args.out_dir, "config.json"), config)
    if not state["finished"]:
        fit(args, net, head, fold, opt, sched, scaler, run, state, config, log_lines)
    config.update(
        best_epoch=state["best_epoch"],
        best_val_mAP_macro=state["best"],
        stopped_epoch=state["epoch"],
    )
    finish(args, head, fold, run, config)
    print(
        f"done: best val mAP_macro {state['best']:.4f} at epoch {state['best_epoch']} -> {args.out_dir}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""
Train the hash head on cached frozen SigLIP2 embeddings: one cross-validation fold.

    python train.py --features data/coco/features_siglip2-base-patch16-256.safetensors \
        --splits data/coco/splits.json --fold 0 --out_dir outputs/siglip2_hash64/fold0
    python train.py ... --bits 0                  # the no-code baseline (linear or MLP by size)
    python train.py ... --inputs image            # image only, as every published COCO number
    python train.py ... --baseline probe          # logistic-regression probe, as a linear head
    python train.py ... --resume                  # continue an interrupted run from last.pt
    python train.py ... --hash_loss csq --bits 32  # a plain hash layer trained by CSQ (hashing.py)
    python train.py ... --head mlgcn              # ML-GCN's graph classifier (mlgcn.py)
    python train.py ... --code_from hidden --mlp_dims 1024,512 --prior_init off --hash_weight 0.1 \
        --hash_warmup 0 --lr 2e-4 --input_dropout 0 --code_gain 1   # the original recipe

The head's recipe (architecture, text protocol, loss weights, optimiser) is model.HeadConfig: every
field is a flag here with its default and help, resolved once by its size rule, printed and written
to config.json. The towers are frozen, so training on their cached outputs is the same computation
as running them in the loop. The fold stays in memory as float16 (as cached); each batch is
converted to float32; an epoch draws one text per image (model.sample_text: --text_input) and one
view. Validation scores every image with model.score_embeddings under --scoring, the rule
evaluate.py uses. At the end the best checkpoint's KNN head is scored on the validation images
(database: the fold's training images; at most one query per caption). Writes to --out_dir:
config.json, log.jsonl, last.pt, best.pt, val_metrics.json (MLP head; "knn": the KNN head),
val_predictions.npz (probs, codes, knn_probs). One train.py per --out_dir (locks.py: .lock there).
SIGTERM / SIGUSR1 (a preemption) stop it after the current optimizer step with exit 75: last.pt of
the last finished epoch is kept, and --resume repeats the interrupted epoch bit for bit.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
import time

import numpy as np
import torch
from tqdm import tqdm

import baselines
import cli
import data
import encoders
import features
import hashing
import knn
import locks
import metrics
import mlgcn
import model
import preempt
import protocols
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
    "hash_loss",
    "h_abs",
)
GROUPS = {
    "model": model.ARCH_FIELDS + ("prior_init",),
    "text": ("text_input", "scoring"),
    "loss": model.LOSS_FIELDS + ("hash_warmup",),
}  # every other HeadConfig field: optim
CONFIG = [f.name for f in dataclasses.fields(model.HeadConfig)]


def add_config_flags(p):
    """One flag per model.HeadConfig field: its name, type, default, choices and one-line help."""
    groups = {}
    for f in dataclasses.fields(model.HeadConfig):
        name = next((g for g, names in GROUPS.items() if f.name in names), "optim")
        g = groups.setdefault(name, p.add_argument_group(name))
        m = f.metadata
        if isinstance(f.default, bool):  # on by default: a --no_ flag turns it off
            g.add_argument(
                f"--no_{f.name}",
                dest=f.name,
                action="store_false",
                help=f"turn off: {m['help']} (default: on)",
            )
            continue
        if "choices" in m:
            kw = {"choices": m["choices"]}
        elif m.get("kind") == "int_list":
            kw = {"type": cli.int_list}
        else:  # a number, checked against its bounds
            kw = {"type": cli.number(type(m["lo"]), m["lo"], m.get("strict", False), m.get("hi"))}
        size_rule = " (default: by training-set size, HeadConfig.resolved)"
        text = m["help"] + (size_rule if f.default is None else "")
        g.add_argument(f"--{f.name}", default=f.default, help=text, **kw)


def get_args_parser():
    p = cli.Parser("train", description="train the hash head on one fold of cached embeddings")
    g = p.add_argument_group("data")
    g.add_argument("--features", required=True, help="feature cache from extract_features.py")
    g.add_argument("--splits", required=True, help="splits.json from make_splits.py")
    g.add_argument("--fold", type=cli.nonneg_int, default=0, help="validation fold k")
    g.add_argument(
        "--train_views",
        choices=("all", "plain"),
        default="all",
        help="image views an epoch draws from: all cached views, or view 0 only",
    )
    add_config_flags(p)
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--baseline",
        choices=("none", "probe", "zeroshot"),
        default="none",
        help="fit a linear baseline instead of training the head",
    )
    g.add_argument(
        "--probe_C",
        type=cli.positive_float,
        default=1.0,
        help="inverse L2 strength of the --baseline probe",
    )
    g = p.add_argument_group("methods")
    g.add_argument(
        "--hash_loss",
        choices=("none",) + hashing.HASH_LOSSES,
        default="none",
        help="train a plain hash layer by the paper's loss instead of the head (default none)",
    )
    g.add_argument(
        "--head",
        choices=("hash", "mlgcn", "mlgcn_nograph"),
        default="hash",
        help="the head: ours, ML-GCN, or ML-GCN without its graph (default hash)",
    )
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
    g.add_argument("--compile", action="store_true", help="torch.compile the head")
    g.add_argument(
        "--compile_backend",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="torch.compile backend",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms (bit-repeatable on GPU, slower)",
    )
    g.add_argument(
        "--num_threads",
        type=cli.nonneg_int,
        default=0,
        help="CPU threads for torch (0: torch's default)",
    )
    g = p.add_argument_group("io")
    g.add_argument("--out_dir", required=True, help="output folder of this fold")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from out_dir/last.pt (a fresh start if there is none)",
    )
    return p


def head_config(args, n_train):
    """The flags' HeadConfig, resolved by its size rule for n_train training images."""
    return model.HeadConfig(**{k: getattr(args, k) for k in CONFIG}).resolved(n_train)


def model_args_of(args, cfg, dim, num_classes):
    """HashHead arguments of this run (a baseline: baselines.linear_head_args' linear head)."""
    if args.baseline != "none":
        return baselines.linear_head_args(dim, num_classes, args.baseline, cfg.inputs)
    if args.hash_loss != "none":  # the literature's methods: their own modules
        return hashing.HashLayer(dim, num_classes, args.hash_loss, **cfg.arch()).model_args
    if args.head != "hash":  # node_dim: the class prompts' text embeddings share the image's dim
        graph = args.head == "mlgcn"
        return mlgcn.MLGCNHead(dim, num_classes, dim, graph=graph, **cfg.arch()).model_args
    # HashHead validates and resolves them; building it draws from the seeded global RNG, so the
    # head train.py then builds and trains starts from the next draws (the measured runs did too)
    return model.HashHead(dim, num_classes, **cfg.arch()).model_args


# ---------------------------------------------------------------------------- optimisation


def make_optimizer(head, lr, weight_decay):
    """AdamW over the trainable parameters (not the fixed code centres), fused on CPU and CUDA."""
    device = next(head.parameters()).device
    return torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def make_scheduler(opt, cfg, steps_per_epoch):
    """LambdaLR over optimizer steps: linear warmup (warmup_ratio of all steps), then cosine (or
    SGDR restarts every T_0, T_0 * T_mult, ... epochs) down to min_lr. -> (scheduler, total, warmup
    steps)."""
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_ratio * total))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t, period = step - warmup, max(1, total - warmup)
        if cfg.scheduler == "cosine_restarts":
            period = cfg.T_0 * steps_per_epoch
            while t >= period:
                t, period = t - period, period * cfg.T_mult
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / period)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), total, warmup


def train_one_epoch(r, epoch):
    """One pass over the shuffled training images of run r (build_run); -> (mean training terms,
    hash weight). No host sync per step."""
    net, opt, sched, scaler, cfg = r["net"], r["opt"], r["sched"], r["scaler"], r["cfg"]
    net.train()
    tr, B, A = r["fold"]["train"], cfg.batch_size, cfg.accum_steps
    n, dev = len(tr["ids"]), tr["image"].device
    perm = torch.randperm(n).to(dev)  # global CPU RNG (saved in checkpoints), so resume is exact
    n_views = tr["image"].shape[1] if r["args"].train_views == "all" else 1
    view = torch.randint(n_views, (n,)).to(dev)  # one view per image (0 when V == 1 or plain)
    n_micro = n // B  # drop the ragged tail: BatchNorm needs >= 2 rows
    stats = torch.zeros(n_micro, len(TERMS), device=dev)  # (n_micro, terms), read once per check
    amp_ctx = torch.autocast(dev.type, dtype=r["amp_dtype"], enabled=r["amp"])
    ramp = cfg.hash_warmup * r["steps_per_epoch"]
    bar = tqdm(total=n_micro, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty())
    for s in range(0, n_micro, A):  # one optimizer step: micro-batches s .. e-1 in one pass
        e = min(s + A, n_micro)
        rows = perm[s * B : e * B]
        img = tr["image"][rows, view[s * B : e * B]].float()  # (rows, D)
        txt = None
        if cfg.inputs != "image":  # (rows, D)
            txt = model.sample_text(tr["text"][rows], tr["n_captions"][rows], cfg.text_input)
        y = tr["labels"][rows].float()  # (rows, C)
        hw = cfg.hash_weight * (min(1.0, sched.last_epoch / ramp) if ramp > 0 else 1.0)
        if r.get("hash_fn"):  # HashNet's continuation: beta of this optimizer step
            r["head"].continuation(sched.last_epoch)
        with amp_ctx:  # BatchNorm per micro-batch (groups): equal to e - s separate passes
            out = net(img, txt, groups=e - s)
            sign_logits = net.sign_logits(out.codes) if cfg.sign_weight > 0 else None
        total = 0
        for i in range(e - s):
            m = slice(i * B, (i + 1) * B)  # micro-batch i: its own BCE and code statistics
            h = out.codes[m] if out.codes is not None else None
            loss, terms = model.head_loss(
                out.logits[m],
                y[m],
                h,
                as_float=False,
                evidence=out.evidence[m] if out.evidence is not None else None,
                sign_logits=sign_logits[m] if sign_logits is not None else None,
                hash_weight=hw,
                lambda_balance=cfg.lambda_balance,
                lambda_decorr=cfg.lambda_decorr,
                sign_weight=cfg.sign_weight,
            )
            if r.get("hash_fn"):  # --hash_loss: the paper's loss trains the codes
                hl, _ = r["hash_fn"](h, y[m])
                loss, terms["hash_loss"] = loss + hl, hl.detach()
            total = total + loss / A
            zero = loss.detach() * 0
            h_abs = h.detach().float().abs().mean() if h is not None else zero
            stats[s + i] = torch.stack(
                [loss.detach(), *[terms.get(k, zero) for k in TERMS[1:-1]], h_abs]
            )
        scaler.scale(total).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad, foreach=True)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=False)  # reuse the gradient buffers: no reallocation per step
        bar.update(e - s)
        # a stop signal: abandon the epoch; last.pt (end of the previous one, RNG included) is the
        # exact state this epoch started from, so the requeued run repeats it bit for bit
        if preempt.pending():
            bar.close()
        preempt.check(f"in epoch {epoch} after micro-batch {e} of {n_micro}")
        if e // 200 > s // 200 or e == n_micro:  # a host sync per 200 micro-batches: NaN/Inf loss
            bad = (~torch.isfinite(stats[:e, 0])).nonzero()
            if len(bad):
                bar.close()
                raise data.DataError(
                    f"non-finite loss at epoch {epoch} step {int(bad[0, 0]) + 1};"
                    " lower --lr or check the feature cache"
                )
    bar.close()
    return dict(zip(TERMS, stats.mean(0).tolist())), hw


# ---------------------------------------------------------------------------- scoring


def score(net, split, scoring, keep_queries=False):
    """model.score_embeddings on a split's view-0 images, in float32 even under --amp (the rule
    evaluate.py uses, so a fold's val metrics are the ones evaluate.py reports for it) -> Scores."""
    return model.score_embeddings(
        net,
        split["image"][:, 0],
        split["text"],
        split["n_captions"],
        scoring,
        keep_queries=keep_queries,
    )


def knn_val(net, fold, scoring):
    """The KNN head on the validation images: each query (one per caption under "each", else the
    image's code) votes among the fold's training codes (knn.knn_scores' defaults, as evaluate.py
    --head knn). -> probs (n_val, C) numpy."""
    db = runs.knn_database(net, fold["train"], scoring)  # (n_train, bits)
    q = score(net, fold["val"], scoring, keep_queries=True)
    return knn.knn_head(
        q.query_codes,
        q.query_mask,
        db,
        fold["train"]["labels"].cpu(),
        device=fold["val"]["image"].device,
    ).numpy()


def validate(net, fold, cfg, epoch):
    """Score the validation images; -> (metrics of the MLP head, arrays for val_predictions.npz)."""
    s = score(net, fold["val"], cfg.scoring)
    val = metrics.compute_all(fold["val"]["labels"].cpu().numpy().astype(np.uint8), s.probs.numpy())
    codes = None if s.codes is None else knn.sign_codes(s.codes).to(torch.int8).numpy()
    val.update(epoch=epoch, n_images=len(fold["val"]["ids"]), skipped_images=fold["skipped"]["val"])
    return val, {"probs": s.probs.numpy().astype(np.float32), "codes": codes}


# ---------------------------------------------------------------------------- outputs


def save_predictions(out_dir, split, arrays, val_metrics):
    """val_predictions.npz (ids, labels, probs, codes, knn_probs), val_metrics.json; atomically."""
    arrays = dict(
        ids=split["ids"].numpy(),
        labels=split["labels"].cpu().numpy().astype(np.uint8),
        **{k: v for k, v in arrays.items() if v is not None},
    )
    data.atomic_write(
        os.path.join(out_dir, "val_predictions.npz"), lambda tmp: np.savez(tmp, **arrays)
    )
    data.save_json(os.path.join(out_dir, "val_metrics.json"), val_metrics)


# ---------------------------------------------------------------------------- the run


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
    methods = [
        f
        for f, on in (
            ("--baseline", args.baseline != "none"),
            ("--hash_loss", args.hash_loss != "none"),
            ("--head", args.head != "hash"),
        )
        if on
    ]
    if len(methods) > 1:
        raise data.DataError(f"{' and '.join(methods)}: choose one method per run")
    if args.hash_loss != "none" and args.bits == 0:
        raise data.DataError("--hash_loss needs hash codes: pass --bits K (K >= 1), not 0")
    if args.sign_weight > 0 and (args.bits == 0 or args.baseline != "none"):
        raise data.DataError(
            "--sign_weight: the binarised-code loss needs hash codes, but this run "
            "has none (--bits 0 or --baseline); drop it"
        )
    torch.manual_seed(args.seed + args.fold)
    # CPU autocast: only bf16 is useful
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return dict(device=device, amp=amp, amp_dtype=amp_dtype, seed=args.seed + args.fold)


def build_head(args, cfg, fold, device):
    """The head of this run, initialised (class priors) or fitted in closed form (baselines)."""
    tr = fold["train"]
    dim, num_classes = int(tr["image"].shape[2]), int(tr["labels"].shape[1])
    head = runs.build_head(model_args_of(args, cfg, dim, num_classes)).to(device)
    if args.head != "hash":  # ML-GCN: graph from the training labels only, nodes from the prompts
        if fold["prompts"] is None:
            raise data.DataError(
                f"{args.features}: no class prompts in the cache; "
                "re-run extract_features.py with --prompts for --head mlgcn"
            )
        mlgcn.fit_graph(head, tr["labels"], fold["prompts"])
    if args.baseline == "zeroshot":
        if fold["prompts"] is None or "logit_scale" not in fold["meta"]:
            raise data.DataError(
                f"{args.features}: no class prompts / logit scale in the cache; "
                "re-run extract_features.py with --prompts for --baseline zeroshot"
            )
        baselines.fit_zeroshot(
            head,
            fold["prompts"].to(device),
            fold["meta"]["logit_scale"],
            fold["meta"]["logit_bias"],
        )
    elif args.baseline == "probe":  # fitted on the text one epoch gives each image
        txt = model.sample_text(tr["text"], tr["n_captions"], cfg.text_input)
        baselines.fit_probe(head, tr["image"][:, 0], txt, tr["labels"], args.probe_C)
    elif cfg.prior_init == "on":
        head.init_prior(tr["labels"].float().mean(0).cpu())
    return head


def build_run(args, fold=None):
    """Everything one fold's training needs, built once: settings, the fold (from --features and
    --splits unless given), the resolved HeadConfig, head, optimizer, scheduler, scaler -> dict r.
    main and bench/ call it; raises data.DataError on bad input."""
    r = dict(setup(args), args=args)
    t0 = time.time()
    if fold is None:
        fold = features.load_fold(
            args.features, args.splits, args.fold, r["device"], args.inputs, args.batch_size
        )
    cfg = head_config(args, len(fold["train"]["ids"]))
    head = build_head(args, cfg, fold, r["device"])
    net = torch.compile(head, backend=args.compile_backend) if args.compile else head
    opt = make_optimizer(head, cfg.lr, cfg.weight_decay)
    fp16 = r["amp"] and r["amp_dtype"] == torch.float16
    scaler = torch.amp.GradScaler(r["device"].type, enabled=fp16)
    steps = math.ceil((len(fold["train"]["ids"]) // cfg.batch_size) / cfg.accum_steps)
    sched, total, warmup = make_scheduler(opt, cfg, steps)
    if args.hash_loss != "none":  # CSQ's centres from the run's seed: the same on --resume
        n_cls = int(fold["train"]["labels"].shape[1])
        r["hash_fn"] = hashing.objective(args.hash_loss, cfg.bits, n_cls, r["seed"])
    r.update(
        load_seconds=round(time.time() - t0, 2),
        fold=fold,
        cfg=cfg,
        head=head,
        net=net,
        opt=opt,
        sched=sched,
        scaler=scaler,
        steps_per_epoch=steps,
        total_steps=total,
        warmup_steps=warmup,
    )
    return r


def describe(r):
    """Print the resolved recipe and derived numbers once; -> config.json's content."""
    args, cfg, fold, head = r["args"], r["cfg"], r["fold"], r["head"]
    n_train, n_val = len(fold["train"]["ids"]), len(fold["val"]["ids"])
    config = dict(
        vars(args),
        **dataclasses.asdict(cfg),
        seed_fold=r["seed"],
        amp=r["amp"],
        model_args=head.model_args,
        n_train=n_train,
        n_val=n_val,
        skipped_train=fold["skipped"]["train"],
        skipped_val=fold["skipped"]["val"],
        effective_batch=cfg.batch_size * cfg.accum_steps,
        steps_per_epoch=r["steps_per_epoch"],
        total_steps=r["total_steps"],
        warmup_steps=r["warmup_steps"],
        splits_sha256=protocols.splits_sha256(args.splits),
        features_meta=fold["meta"],
        load_seconds=r["load_seconds"],
        torch_version=str(torch.__version__),
        finished=False,
        cwd=os.getcwd(),
    )  # what relative --features / --splits are relative to
    config["mlp_dims"] = list(cfg.mlp_dims)
    print(
        f"fold {args.fold}: {n_train} train / {n_val} val images (skipped {fold['skipped']}), "
        f"device {r['device']}, amp {r['amp']}, seed {r['seed']}"
    )
    recipe = ", ".join(f"{k} {config[k]}" for k in CONFIG)  # resolved: what this run uses
    print(textwrap.fill(recipe, 100, initial_indent="recipe: ", subsequent_indent="  "))
    print(
        f"effective batch {config['effective_batch']}, {r['steps_per_epoch']} steps/epoch, "
        f"{r['total_steps']} steps, {r['warmup_steps']} warmup, lr {cfg.lr:g} -> {cfg.min_lr:g}"
    )
    kind = {"hashlayer": f"hash layer ({args.hash_loss})", "mlgcn": "ML-GCN"}.get(
        head.model_args.get("head"), "hash head"
    )  # the recipe line names HeadConfig's fields; model_args (config.json) what this head uses
    print(f"head: {kind}, {sum(p.numel() for p in head.parameters()):,} parameters")
    return config


def fit(r, state, config, log_lines):
    """Epochs until --epochs or early stopping; best.pt / val outputs on every improvement, last.pt
    every epoch."""
    args, cfg, fold = r["args"], r["cfg"], r["fold"]
    log_path, last_path = (
        os.path.join(args.out_dir, "log.jsonl"),
        os.path.join(args.out_dir, "last.pt"),
    )

    def ckpt_of(path):
        runs.save_checkpoint(path, r["head"], r["opt"], r["scaler"], r["sched"], state, config)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.time()
        if args.baseline == "none":
            train_stats, hw = train_one_epoch(r, epoch)
        else:  # fitted in closed form: evaluate once and finish
            train_stats, hw = {k: 0.0 for k in TERMS}, 0.0
        t1 = time.time()
        val, arrays = validate(r["net"], fold, cfg, epoch)
        improved = val["mAP_macro"] > state["best"]
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best=val["mAP_macro"], best_epoch=epoch)
        state["finished"] = (
            epoch == cfg.epochs
            or args.baseline != "none"
            or (cfg.patience > 0 and state["bad_epochs"] >= cfg.patience)
        )
        if improved:
            save_predictions(args.out_dir, fold["val"], arrays, val)
            ckpt_of(os.path.join(args.out_dir, "best.pt"))
        rec = dict(
            epoch=epoch,
            lr=r["opt"].param_groups[0]["lr"],
            hash_weight=hw,
            **train_stats,
            val_mAP_macro=val["mAP_macro"],
            best=state["best"],
            seconds=round(time.time() - t0, 2),
            train_seconds=round(t1 - t0, 2),
            val_seconds=round(time.time() - t1, 2),
        )
        log_lines.append(json.dumps(rec) + "\n")
        data.save_text(log_path, "".join(log_lines))
        ckpt_of(last_path)
        print(
            f"epoch {epoch:3d} | loss {train_stats['loss']:.4f} bce {train_stats['bce']:.4f} "
            f"|h| {train_stats['h_abs']:.3f} | lr {rec['lr']:.2e} | val mAP {val['mAP_macro']:.4f} "
            f"(best {state['best']:.4f} @ {state['best_epoch']}){' *' if improved else ''} | "
            f"{rec['seconds']:.1f}s"
        )
        if state["finished"]:
            break


def finish(r, config):
    """The best checkpoint's KNN head on the validation images (into val_metrics.json and
    val_predictions.npz), then config.json says the fold is finished."""
    args, head, fold = r["args"], r["head"], r["fold"]
    if head.bits > 0:
        t0 = time.time()
        best = torch.load(
            os.path.join(args.out_dir, "best.pt"), map_location="cpu", weights_only=True
        )
        head.load_state_dict(best["model"])
        probs = knn_val(head, fold, r["cfg"].scoring)
        val = data.read_json(
            os.path.join(args.out_dir, "val_metrics.json"),
            "val metrics",
            "re-run this fold with --resume",
        )
        val["knn"] = metrics.compute_all(
            fold["val"]["labels"].cpu().numpy().astype(np.uint8), probs
        )
        with np.load(os.path.join(args.out_dir, "val_predictions.npz")) as z:
            arrays = {k: z[k] for k in z.files if k not in ("ids", "labels")}
        arrays["knn_probs"] = probs.astype(np.float32)
        save_predictions(args.out_dir, fold["val"], arrays, val)
        config["knn_seconds"] = round(time.time() - t0, 2)
        print(
            f"knn head (best epoch {val['epoch']}): val mAP_macro {val['knn']['mAP_macro']:.4f} "
            f"| {config['knn_seconds']:.1f}s"
        )
    config.update(finished=True)
    data.save_json(os.path.join(args.out_dir, "config.json"), config)


def resume_notes(stored, config):
    """The resolved recipe values that differ on --resume (the architecture must match)."""
    keys = [k for k in CONFIG if k not in model.ARCH_FIELDS] + ["seed", "train_views"]
    return [
        f"note: --{k} {config[k]} differs from the checkpoint's {stored.get(k)}"
        for k in keys
        if stored.get(k) != config[k]
    ]


def run(args):
    """One fold, end to end (main without the exit): raises data.DataError on bad input."""
    last_path = os.path.join(args.out_dir, "last.pt")
    ckpt = runs.read_resume(
        last_path,
        args.resume,
        args.fold,
        lambda dim, c, n: model_args_of(args, head_config(args, n), dim, c),
    )
    if ckpt is not None:  # the same backbone's cache (a dim check would catch only some)
        meta = features.load_features(args.features, embeddings=False)[1]
        stored = ckpt["config"].get("features_meta") or {}
        encoders.check_same_backbone(meta, stored, f"--features {args.features}", last_path)
    if ckpt is not None and ckpt["finished"] and runs.fold_finished(args.out_dir):
        print(
            f"{args.out_dir}: already finished (best val mAP_macro {ckpt['best']:.4f} at epoch "
            f"{ckpt['best_epoch']})"
        )
        return
    r = build_run(args)
    if ckpt is not None and ckpt["model_args"]["dim"] != r["head"].model_args["dim"]:
        raise data.DataError(
            f"--resume: {last_path} has embedding dim {ckpt['model_args']['dim']}, "
            f"{args.features} has {r['head'].model_args['dim']}; use the original "
            "feature cache or another --out_dir"
        )
    config = describe(r)
    state = dict(epoch=0, best=-1.0, best_epoch=0, bad_epochs=0, finished=False)
    log_lines = []
    if ckpt is not None:
        runs.restore(ckpt, r["head"], r["opt"], r["scaler"], r["sched"], state)
        for note in resume_notes(ckpt["config"], config):
            print(note)
        print(f"resumed from {last_path} at epoch {state['epoch']} (best {state['best']:.4f})")
        log_lines = runs.read_log(os.path.join(args.out_dir, "log.jsonl"), state["epoch"])
        config["resumed_from_epoch"] = ckpt["epoch"]
    os.makedirs(args.out_dir, exist_ok=True)
    data.save_json(os.path.join(args.out_dir, "config.json"), config)
    if not state["finished"]:
        fit(r, state, config, log_lines)
    config.update(
        best_epoch=state["best_epoch"],
        best_val_mAP_macro=state["best"],
        stopped_epoch=state["epoch"],
    )
    finish(r, config)
    print(
        f"done: best val mAP_macro {state['best']:.4f} at epoch {state['best_epoch']} -> "
        f"{args.out_dir}"
    )


def main(args):
    lock = os.path.join(args.out_dir, locks.LOCK_NAME)  # one train.py per --out_dir
    try:
        with locks.hold(lock, "train.py"), preempt.catching():
            run(args)
    except data.DataError as e:
        cli.fail(str(e))
    except preempt.Preempted as e:
        last = os.path.join(args.out_dir, "last.pt")
        kept = f"{last} is kept" if os.path.exists(last) else "no epoch finished yet"
        print(f"preempted: {e}; {kept}; rerun with --resume (exit {preempt.REQUEUE_EXIT}: requeue)")
        sys.exit(preempt.REQUEUE_EXIT)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

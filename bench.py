"""
Performance benchmark: what caching the frozen towers buys, and how fast the head, metrics, splits and KNN are.
All inputs are generated in memory at COCO scale (random weights, synthetic labels, random or planted embeddings).

    python bench.py                                # full run -> table + bench.json (~4-5 min on a 2-core CPU)
    python bench.py --quick --out /tmp/bench.json  # small sizes, ~30 s (what tests/test_bench.py runs)
    python bench.py --sections encoder,metrics     # a subset, by name or number (1-6)
    python bench.py --device cuda                  # also sections 1, 2 and 5 on the GPU (under "cuda")
    python bench.py --sections learning            # opt-in, ~2 h on 2 cores: the learning check (section 7)

1 encoder: SigLIP2-base forward vs one head step; encoder passes and hours, in-loop (original) vs cached once.
2 epoch: train.train_one_epoch on 94,630 cached rows vs a naive loop and vs two floors (bare forward, backward and
  optimizer steps of the same head; the same step written by hand without autograd, profiled by part); achieved
  FLOP/s vs a timed torch.mm.
3 metrics: metrics.compute_all vs the scikit-learn calls. 4 splits: stratified folds vs KFold.
5 knn: model.knn_scores vs a full distance matrix + argsort. 6 memory: peak RSS of one train.py epoch.
7 learning (opt-in, not timed): fold 0 of a planted cache at COCO scale; scikit-learn logistic-regression probe
  on [image, mean caption] vs train.py --bits 64 and --bits 0 at default flags, and both heads (evaluate.py
  --head both) of the default 64-bit model and of the KNN recipe (KNN_RECIPE). Work files go to --work and are
  reused, so an interrupted run picks up where it was.
Timings are the best of a few repeats (noise on a shared machine only adds time); long runs are timed once.
"""
import argparse
import datetime
import inspect
import json
import math
import os
import platform
import resource
import string
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch

import data
import metrics
import model
import synthetic

SECTIONS = ("encoder", "epoch", "metrics", "splits", "knn", "memory", "learning")
DEFAULT_SECTIONS = SECTIONS[:6]  # "learning" takes hours: only when asked for
GPU_SECTIONS = ("encoder", "epoch", "knn")
HERE = os.path.dirname(os.path.abspath(__file__))
N_DEV, N_TEST, N_TRAIN, N_VAL = 118_287, 5_000, 94_630, 23_657  # COCO dev pool, test, one fold's train / val
FOLDS, EPOCHS = 5, 20


def sections_type(s):
    out = []
    for p in s.split(","):
        name = SECTIONS[int(p) - 1] if p.strip().isdigit() and 1 <= int(p) <= len(SECTIONS) else p.strip()
        if name not in SECTIONS:
            raise argparse.ArgumentTypeError(f"unknown section {p!r}; use {','.join(SECTIONS)} or 1-{len(SECTIONS)}")
        out += [name] if name not in out else []
    return out


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return int(s)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line that names the flag, instead of the whole usage
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def get_args_parser():
    p = _Parser("bench", description="Performance benchmark at COCO scale (see the module docstring).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    g = p.add_argument_group("data")
    g.add_argument("--quick", action="store_true", help="small sizes and a tiny encoder: checks that every section "
                   "runs (what the test does); its figures are not the benchmark")
    g.add_argument("--sections", type=sections_type, default=list(DEFAULT_SECTIONS),
                   help="comma-separated subset, names or 1-7 (7 = learning: opt-in, hours)")
    g.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_learning"),
                   help="section 7 keeps its cache, probe and runs in WORK/{full,quick}_seed<seed> and reuses them")
    g.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    # model
    g = p.add_argument_group("model")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: sections 1, 2 and 5 also run on the GPU (the CPU figures are always taken)")
    g.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="torch CPU threads, also in the child processes; the default is this machine's cores, "
                   "1 is steadier when others share them")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out", default="bench.json", help="every raw figure as JSON (written atomically)")
    return p


# ----------------------------------------------------------------------------- helpers

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats=3, warmup=1, device="cpu"):
    """Best wall time of fn() over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def rss_mb(field="VmRSS"):
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024


def reset_peak_rss():
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0). ru_maxrss cannot be reset: in a threaded
    process every exiting thread folds the peak of its time into it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(call, device):
    """-> (call(), seconds, peak MiB, sampled peak MiB, method). CPU: VmHWM is reset to the current RSS, then
    peak = VmHWM after - VmRSS before (page-exact); a thread sampling VmRSS every 2 ms gives a lower bound
    as a cross-check. GPU: the rise of torch.cuda.max_memory_allocated (both figures)."""
    cuda = device.startswith("cuda")
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated rise"
    else:  # without the reset VmHWM may hold an earlier, higher peak: then the figure is an upper bound
        method = "VmHWM after - VmRSS before" + (", HWM reset" if reset_peak_rss() else " (upper bound)")
    base = torch.cuda.memory_allocated() / 2 ** 20 if cuda else rss_mb()
    sampled, done = [base], threading.Event()

    def watch():
        while not done.wait(0.002):
            sampled[0] = max(sampled[0], rss_mb())
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        out = call()
        sync(device)
    finally:
        seconds = time.perf_counter() - t
        done.set()
        th.join()
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else rss_mb("VmHWM")) - base
    return out, seconds, peak, peak if cuda else max(sampled[0], rss_mb()) - base, method


def cpu_seconds():
    """CPU time used so far by this process and its finished children (user + system), s."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def run_child(func, **kwargs):
    """bench.<func>(**kwargs) in a fresh Python process (its own peak memory) -> the dict it returns."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
            f"print('BENCH_RESULT ' + json.dumps(bench.{func}(**json.loads(sys.argv[2]))))")
    r = subprocess.run([sys.executable, "-c", code, HERE, json.dumps(kwargs)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"bench child {func} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def train_matmul_flops(head, rows):
    """Matmul FLOPs of one training pass of the head over `rows` rows: per nn.Linear 2 * in * out for the
    forward, the same for the weight gradient and for the input gradient, which the first Linear does not need
    (its input, the fused embeddings, has no gradient)."""
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return rows * (3 * sum(2 * m.in_features * m.out_features for m in linears)
                   - 2 * linears[0].in_features * linears[0].out_features)


def matmul_flop_per_s(device, n=2048):
    """The machine's float32 matmul throughput: a timed n x n @ n x n torch.mm (2 n^3 FLOPs), best of 5."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / best_time(lambda: torch.mm(a, b), repeats=5, device=device)


# ----------------------------------------------------------------------------- 1. encoder vs head

def siglip_config(quick):
    """SigLIP2-base-patch16-256 sizes (random weights cost what trained ones do). Vocabulary 32,000 instead
    of 256,000: the embedding is a gather of 64 rows per caption, its cost is negligible (it saves 0.7 GB)."""
    from transformers import SiglipConfig
    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2) if quick else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    text = dict(size, vocab_size=1000 if quick else 32000, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=2, eos_token_id=3)
    return SiglipConfig(text_config=text, vision_config=dict(size, image_size=64 if quick else 256, patch_size=16))


def bench_encoder(quick, device, seed=0):
    from transformers import SiglipModel
    torch.manual_seed(seed)
    cfg = siglip_config(quick)
    enc = SiglipModel(cfg).eval().to(device)
    cuda = device.startswith("cuda")
    batch, caps = (32 if cuda else 4), 5  # samples per batch; captions per sample, as extraction
    repeats = 1 if quick else (5 if cuda else 2)
    size = cfg.vision_config.image_size
    px = torch.randn(batch, 3, size, size, device=device)  # (B, 3, H, W)
    ids = torch.randint(4, cfg.text_config.vocab_size, (batch * caps, 64), device=device)  # (B*5, 64) padded
    # the original ran fp16 autocast on its GPU; on the CPU, float32 (what extraction does there)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
        enc.get_image_features(pixel_values=px[:1]), enc.get_text_features(input_ids=ids[:1])  # warm-up
        t_img = best_time(lambda: enc.get_image_features(pixel_values=px), repeats, 0, device) / batch
        t_txt = best_time(lambda: enc.get_text_features(input_ids=ids), repeats, 0, device) / (batch * caps)
    del enc
    # one head training step on as many cached rows (fp16 cache -> float32), as train.py does it
    head = model.HashHead().to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    img, txt = (torch.randn(batch, 768, device=device).half() for _ in range(2))  # (B, D) each
    y = (torch.rand(batch, 80, device=device) < 0.04).float()  # (B, 80)

    def step():
        logits, h = head(img.float(), txt.float())
        loss, _ = model.head_loss(logits, y, h, as_float=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_head = best_time(step, repeats=5 if quick else 20, warmup=3, device=device) / batch
    per_sample = t_img + caps * t_txt  # extraction: 1 image + 5 captions
    n_loop = FOLDS * EPOCHS * N_TRAIN  # in-loop: every epoch of every fold, 1 image + 1 caption per sample
    n_img = N_DEV + N_TEST
    return {"config": "quick-tiny" if quick else "siglip2-base-patch16-256, vocab 32000", "batch": batch,
            "dtype": "fp16 autocast" if cuda else "float32", "image_s_per_image": t_img, "text_s_per_caption": t_txt,
            "encoder_s_per_sample": per_sample, "head_step_s_per_row": t_head, "cost_ratio": per_sample / t_head,
            "inloop_image_passes": n_loop, "inloop_caption_passes": n_loop,
            "once_image_passes": n_img, "once_caption_passes_max": caps * n_img, "image_pass_ratio": n_loop / n_img,
            "inloop_hours": n_loop * (t_img + t_txt) / 3600, "once_hours": n_img * per_sample / 3600}


# ----------------------------------------------------------------------------- 2. training epoch

def naive_epoch(cache, n_rows, batch, device, seed=0, head_kwargs=None):
    """What the original's loop would do, timed over n_rows (seconds): Dataset-style per-sample indexing with a
    random caption, collate by stacking, fp16 -> float per batch, torch's default AdamW stepping after every
    micro-batch, a loss .item() per step for the log; fp16 autocast + GradScaler on the GPU, as it ran.
    head_kwargs: the same head as the loop it is compared with (HashHead's defaults if None)."""
    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    head = model.HashHead(**(head_kwargs or {})).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    perm = torch.randperm(cache["labels"].shape[0])[:n_rows]
    t = time.perf_counter()
    for s in range(0, n_rows, batch):
        items = []
        for i in perm[s:s + batch].tolist():  # __getitem__, one sample at a time
            c = int(torch.randint(int(cache["n_captions"][i]), (1,)))
            items.append((cache["image"][i, 0], cache["text"][i, c], cache["labels"][i]))
        img, txt, y = (torch.stack(col).to(device).float() for col in zip(*items))  # (B, D), (B, D), (B, 80)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            logits, h = head(img, txt)
        loss, terms = model.head_loss(logits, y, h)  # floats: a host sync per step
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    sync(device)
    return time.perf_counter() - t


def ready_rows(rows, device):
    """Random image / text embeddings (rows, 768) and labels (rows, 80) with COCO-like prevalence, on device."""
    img, txt = torch.randn(rows, 768, device=device), torch.randn(rows, 768, device=device)
    return img, txt, (torch.rand(rows, 80, device=device) < 0.04).float()


def time_steps(step, n_steps, device, warmup=3):
    """Seconds for n_steps calls of step() after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync(device)
    return time.perf_counter() - t


def bare_steps(n_steps, rows, device, seed=0, head_kwargs=None):
    """A floor for any training loop of this head, timed over n_steps (seconds): per optimizer step only the
    head's forward on `rows` ready float32 rows, the BCE, backward and a fused AdamW step. No data movement,
    clipping, BatchNorm per micro-batch, statistics or hash terms. On CUDA with fp16 autocast and a GradScaler,
    as the timed loop runs there."""
    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    head = model.HashHead(**(head_kwargs or {})).to(device).train()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    img, txt, y = ready_rows(rows, device)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            logits, _ = head(img, txt)
        scaler.scale(torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)
    return time_steps(step, n_steps, device)


def lean_grads(head, groups):
    """The gradients of train.py's default-flags step written by hand, without autograd, for a floor below
    bare_steps: grads(img, txt, y) -> loss writes every gradient once into its .grad buffer (no zeroing, no
    accumulation add), folds dropout's 1 / (1 - p) into the next matmul's alpha, and takes ReLU's and dropout's
    backward in one pass. BatchNorm per micro-batch (groups) with running statistics, the mean BCE of each
    micro-batch averaged over them; the hash terms have weight 0 at default flags, so they are left out.
    For a head with hash bits and hash BatchNorm (train.py's defaults); tests/test_bench.py checks it against
    autograd."""
    F, nn = torch.nn.functional, torch.nn
    if not (head.training and head.hash is not None and isinstance(head.hash_norm, nn.BatchNorm1d)):
        raise ValueError("lean_grads: a training head with hash bits and hash_norm batchnorm")
    lins = [m for m in head.mlp if isinstance(m, nn.Linear)] + [head.hash]
    drop_p = [head.input_dropout.p] + [m.p for m in head.mlp if isinstance(m, nn.Dropout)]
    params = [p for p in head.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad

    def norm(bn, x):  # training BatchNorm per micro-batch -> output, [(mean, invstd)] per micro-batch
        outs, saved = [], []
        for c in x.chunk(groups):
            out, mean, invstd = torch.native_batch_norm(c, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                        True, bn.momentum, bn.eps)
            bn.num_batches_tracked += 1
            outs.append(out)
            saved.append((mean, invstd))
        return torch.cat(outs), saved

    def drop(x, p):  # dropout's mask, in place; its scale is returned for the next matmul
        if p > 0:
            x.mul_(torch.rand(x.shape, device=x.device) >= p)
        return 1 / (1 - p)

    @torch.no_grad()
    def grads(img, txt, y):
        x = head.fuse(img, txt)
        if isinstance(head.input_norm, nn.BatchNorm1d):
            x = norm(head.input_norm, x)[0]
        acts, scales = [x], [drop(x, drop_p[0])]  # each Linear's input (masked, unscaled) and its scale
        for lin, p in zip(lins[:-1], drop_p[1:]):
            a = torch.addmm(lin.bias, acts[-1], lin.weight.t(), alpha=scales[-1]).relu_()
            scales.append(drop(a, p))
            acts.append(a)
        z = torch.addmm(lins[-1].bias, acts[-1], lins[-1].weight.t(), alpha=scales[-1])
        zn, saved = norm(head.hash_norm, z)
        h = torch.tanh(zn)
        cls = head.classifier
        logits = torch.addmm(cls.bias, h, cls.weight.t())
        loss = F.binary_cross_entropy_with_logits(logits, y)  # the mean of equal micro-batches' means
        d = torch.sigmoid(logits).sub_(y).div_(y.numel())
        if cls.weight.requires_grad:
            torch.mm(d.t(), h, out=cls.weight.grad)
        torch.sum(d, 0, out=cls.bias.grad)
        dz, bn = (d @ cls.weight).mul_(1 - h * h), head.hash_norm  # through tanh
        parts = [torch.ops.aten.native_batch_norm_backward(g, c, bn.weight, bn.running_mean, bn.running_var, mean,
                                                           invstd, True, bn.eps, [True, True, True])
                 for g, c, (mean, invstd) in zip(dz.chunk(groups), z.chunk(groups), saved)]
        torch.sum(torch.stack([p[1] for p in parts]), 0, out=bn.weight.grad)
        torch.sum(torch.stack([p[2] for p in parts]), 0, out=bn.bias.grad)
        g = torch.cat([p[0] for p in parts])
        for i in reversed(range(len(lins))):  # g: the gradient of Linear i's output
            w = lins[i].weight
            torch.addmm(w.grad, g.t(), acts[i], beta=0, alpha=scales[i], out=w.grad)
            torch.sum(g, 0, out=lins[i].bias.grad)
            if i:  # through the scale, dropout's mask and the ReLU in one pass (acts[i] > 0 exactly where both pass)
                g = torch.ops.aten.threshold_backward(g @ w, acts[i], 0).mul_(scales[i])
        return loss

    return grads


def lean_steps(n_steps, rows, groups, seed=0, head_kwargs=None, clip=1.0):
    """lean_grads + train.py's clipping + a fused AdamW step on `rows` ready rows on the CPU (float32, train.py's
    CPU default), timed over n_steps: a floor for a loop at default flags without autograd's and the modules' own
    passes. Returns (seconds, parts): a third as many steps run again under torch.profiler, and the CPU self time
    of their matmuls (of which the first Linear's forward and weight gradient) and of the fused AdamW, as they ran
    inside the steps (the profiler's own cost per op is microseconds: small beside these, not beside the many
    small ops)."""
    torch.manual_seed(seed)
    head = model.HashHead(**(head_kwargs or {})).train()
    grads = lean_grads(head, groups)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    img, txt, y = ready_rows(rows, "cpu")

    def step():
        grads(img, txt, y)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
    seconds = time_steps(step, n_steps, "cpu")
    parts = dict.fromkeys(("matmuls", "first_linear_matmuls", "adamw"), 0.0)
    in_dim = head.mlp[0].in_features  # only the first Linear's matmuls have it as a dimension
    profiled = max(1, n_steps // 3)  # scaled to n_steps below
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(profiled):
            step()
    for e in prof.key_averages(group_by_input_shape=True):
        t = e.self_cpu_time_total / 1e6 * n_steps / profiled
        if e.key in ("aten::mm", "aten::addmm"):
            parts["matmuls"] += t
            if any(in_dim in shape for shape in e.input_shapes if shape):
                parts["first_linear_matmuls"] += t
        elif e.key == "aten::_fused_adamw_":
            parts["adamw"] += t
    return seconds, parts


def matmul_adamw_steps(n_steps, rows, device, seed=0, head_kwargs=None):
    """An optimistic bound, timed over n_steps (seconds): per optimizer step only the matmuls of a training pass on
    `rows` rows, each timed alone at its own shape (x @ W.T; the weight gradient in the faster of g.T @ x and
    (x.T @ g).T, though no single way of storing W makes both it and the forward fast; g @ W, except for the
    first Linear), plus the fused AdamW step alone. No BatchNorm, activations, dropout, loss, bias gradients or
    data. Returns (matmuls, adamw) seconds."""
    torch.manual_seed(seed)
    head = model.HashHead(**(head_kwargs or {})).to(device)
    t_mm = 0.0
    for i, m in enumerate(mod for mod in head.modules() if isinstance(mod, torch.nn.Linear)):
        x, g = torch.randn(rows, m.in_features, device=device), torch.randn(rows, m.out_features, device=device)
        w = m.weight.detach()
        t_mm += best_time(lambda: x @ w.T, device=device)  # forward
        t_mm += min(best_time(lambda: g.T @ x, device=device), best_time(lambda: x.T @ g, device=device))  # weight grad
        t_mm += best_time(lambda: g @ w, device=device) if i else 0.0  # input grad (none for the first Linear)
    params = [p for p in head.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return t_mm * n_steps, best_time(lambda: [opt.step() for _ in range(n_steps)], repeats=3, device=device)


def head_kwargs(args):
    """HashHead arguments from train.py's parsed flags."""
    return {k: getattr(args, k) for k in inspect.signature(model.HashHead).parameters if k != "dim" and hasattr(args, k)}


def bench_epoch(quick, device, seed=0):
    import train
    n, cuda = (512 if quick else N_TRAIN), device.startswith("cuda")
    g = torch.Generator().manual_seed(seed)
    # random rows cost what real ones do; fp16 as the cache file holds them: image (n, 1, D), text (n, 5, D)
    cache = {"image": (torch.randn(n, 1, 768, generator=g) * 0.5).half(), "labels": torch.from_numpy(
        synthetic.synthetic_labels(n, seed)), "text": (torch.randn(n, 5, 768, generator=g) * 0.5).half(),
        "n_captions": torch.full((n,), 5)}
    # train.load_fold converts the fold to float32 on the device once; the epoch slices it
    fold = {"train": {"ids": torch.arange(n), **{k: (v.float() if k != "n_captions" else v).to(device)
                                                 for k, v in cache.items()}}}

    def epoch(flags, fold=fold):  # train.train_one_epoch with train.py's defaults + flags, set up as its main()
        args = train.get_args_parser().parse_args(["--features", "-", "--splits", "-", "--out_dir", "-",
                                                   "--device", device] + flags)
        torch.manual_seed(seed)
        head = model.HashHead(dim=768, **head_kwargs(args)).to(device)  # every head flag of train.py, at its default
        head.init_code_classifier(args.code_classifier_gain)
        if args.prior_init == "on":
            head.init_prior(fold["train"]["labels"].mean(0).cpu())
        opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay, fused=True)
        steps = math.ceil(len(fold["train"]["ids"]) // args.batch_size / args.accum_steps)
        total = steps * args.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_multiplier(
            s, int(round(args.warmup_ratio * total)), total, steps, args))
        state = dict(amp=cuda, amp_dtype=torch.float16 if cuda else torch.bfloat16, steps_per_epoch=steps)
        scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=cuda)
        sync(device)
        t = time.perf_counter()
        train.train_one_epoch(head, fold, opt, sched, scaler, args, 1, state)
        sync(device)
        return time.perf_counter() - t, head, args

    epoch(["--batch_size", "256"], {"train": {k: v[:2048] for k, v in fold["train"].items()}})  # warm-up
    t_def, head, a = epoch([])
    t_256 = epoch(["--batch_size", "256"])[0]
    frac = 0.25 if quick else 0.05  # the naive loop runs on a fraction of the epoch, scaled linearly
    # the same head; best of 3 (a few seconds each: noise only adds time, so this errs against our speedup)
    t_naive = min(naive_epoch(cache, int(n * frac), a.batch_size, device, seed, head_kwargs(a)) for _ in range(3)) / frac
    steps, timed = n // a.batch_size // a.accum_steps, (20 if quick else 300)
    t_floor = bare_steps(timed, a.batch_size * a.accum_steps, device, seed, head_kwargs(a)) / timed * steps
    lean = {}
    if not cuda:  # float32 by hand: not comparable with the fp16 autocast of the CUDA loop and floor
        t_lean, parts = lean_steps(timed, a.batch_size * a.accum_steps, a.accum_steps, seed, head_kwargs(a),
                                   a.clip_grad)
        lean = {"lean_default_s": t_lean / timed * steps,
                **{f"lean_{k}_s": v / timed * steps for k, v in parts.items()}}
        lean.update(speedup_lean_default=t_naive / lean["lean_default_s"], speedup_inloop_bound_default=t_naive / (
            lean["lean_matmuls_s"] + lean["lean_adamw_s"]))
    flops = train_matmul_flops(head, n // 256 * 256)
    peak = matmul_flop_per_s(device, 1024 if quick else 2048)
    t_mm, t_adamw = (t / timed * steps for t in matmul_adamw_steps(timed, a.batch_size * a.accum_steps, device, seed,
                                                                      head_kwargs(a)))
    return {"rows": n, "captions": 5, "default_flags": f"batch {a.batch_size} x accum {a.accum_steps}, amp {cuda}",
            "epoch_default_s": t_def, "epoch_b256_s": t_256, "naive_epoch_s": t_naive, "naive_fraction": frac,
            "speedup_default": t_naive / t_def, "speedup_b256": t_naive / t_256, "b256_flops": flops,
            "floor_default_s": t_floor, "speedup_bound_default": t_naive / t_floor,
            **lean,
            "matmuls_default_s": t_mm, "adamw_default_s": t_adamw, "matmul_bound_default_s": t_mm + t_adamw,
            "speedup_matmul_bound_default": t_naive / (t_mm + t_adamw),
            "matmuls_default_at_peak_s": train_matmul_flops(head, steps * a.batch_size * a.accum_steps) / peak,
            "b256_flop_per_s": flops / t_256, "matmul_flop_per_s": peak, "flops_fraction_b256": flops / t_256 / peak}


# ----------------------------------------------------------------------------- 3. metrics vs sklearn

def sklearn_metrics(y, s, threshold=0.5):
    """The scikit-learn calls that compute_all replaces, under metrics.METRIC_NAMES."""
    from sklearn import metrics as skm
    p = (s > threshold).astype(np.uint8)
    out = {f"{name}_{avg}": f(y, p, average=avg, zero_division=0) for avg in ("macro", "micro")
           for name, f in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score))}
    for avg in ("macro", "micro"):
        out[f"mAP_{avg}"] = skm.average_precision_score(y, s, average=avg)
        out[f"auc_{avg}"] = skm.roc_auc_score(y, s, average=avg)
    return dict(out, hamming_loss=skm.hamming_loss(y, p), coverage_error=skm.coverage_error(y, s),
                ranking_loss=skm.label_ranking_loss(y, s), lrap=skm.label_ranking_average_precision_score(y, s),
                mae=skm.mean_absolute_error(y, s))


def bench_metrics(quick, seed=0):
    n = 1000 if quick else N_VAL
    y = synthetic.synthetic_labels(n, seed)  # (N, 80)
    y[np.arange(80), np.arange(80)] = 1  # every class has a positive (sklearn's macro AP / AUC need one)
    logit = 3.0 * y - 3.0 + 2.0 * np.random.default_rng(seed).standard_normal(y.shape)
    s = (1 / (1 + np.exp(-logit))).astype(np.float32)  # (N, 80) probabilities, float32 as saved; some tie
    ours = metrics.compute_all(y, s)
    t_ours = best_time(lambda: metrics.compute_all(y, s), repeats=3, warmup=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        ref = sklearn_metrics(y, s)  # ~20 s at full size: timed once
        t_ref = time.perf_counter() - t
    diff = {k: abs(float(ours[k]) - float(ref[k])) for k in metrics.METRIC_NAMES}
    return {"n": n, "classes": 80, "ours_s": t_ours, "sklearn_s": t_ref, "speedup": t_ref / t_ours,
            "max_abs_diff": max(diff.values()), "worst_metric": max(diff, key=diff.get),
            "values": {k: float(ours[k]) for k in metrics.METRIC_NAMES}}


# ----------------------------------------------------------------------------- 4. splits

def fold_balance(labels, folds):
    """Mean and max over folds x classes of |p_fold - p_all| / p_all, p = a class's prevalence."""
    p_all = labels.mean(0, dtype=np.float64)  # (80,)
    keep = p_all > 0
    dev = np.stack([np.abs(labels[f].mean(0, dtype=np.float64) - p_all)[keep] / p_all[keep] for f in folds])
    return float(dev.mean()), float(dev.max())


def bench_splits(quick, seed=0):
    import make_splits
    from sklearn.model_selection import KFold
    n = 2000 if quick else N_DEV
    labels = synthetic.synthetic_labels(n, seed)  # (N, 80) uint8
    t = time.perf_counter()
    fold_of = make_splits.iterative_stratification(labels, FOLDS, seed)  # (N,) fold index
    t_strat = time.perf_counter() - t
    t = time.perf_counter()
    plain = [val for _, val in KFold(FOLDS, shuffle=True, random_state=seed).split(labels)]
    t_plain = time.perf_counter() - t
    strat = [np.flatnonzero(fold_of == k) for k in range(FOLDS)]
    (s_mean, s_max), (k_mean, k_max) = fold_balance(labels, strat), fold_balance(labels, plain)
    return {"n": n, "folds": FOLDS, "stratified_s": t_strat, "kfold_s": t_plain, "stratified_mean_rel_dev": s_mean,
            "stratified_max_rel_dev": s_max, "kfold_mean_rel_dev": k_mean, "kfold_max_rel_dev": k_max,
            "fold_sizes": [len(f) for f in strat]}


# ----------------------------------------------------------------------------- 5. knn

def knn_child(n_query, n_db, n_naive, bits, k, device, seed):
    """In a fresh process: model.knn_scores on random codes, then the textbook version on n_naive queries."""
    g = torch.Generator().manual_seed(seed)
    q, db = (torch.randint(0, 2, (m, bits), generator=g).float().mul_(2).sub_(1).to(device) for m in (n_query, n_db))
    labels = torch.from_numpy(synthetic.synthetic_labels(n_db, seed)).to(device)  # (N, 80) uint8
    model.knn_scores(q[:8], db[:1000], labels[:1000], k=k)  # warm-up: code paths, threads, CUDA context
    # peak memory with measure()'s RSS sampler running; the times below without it (on 2 cores a third,
    # sampling thread slows the 2-thread products by 20-30%)
    out, _, peak, sampled, method = measure(lambda: model.knn_scores(q, db, labels, k=k), device)
    finite = bool(torch.isfinite(out).all())
    del out
    # both sides best of 3 (a few seconds each): noise on a shared machine only adds time
    sec = best_time(lambda: model.knn_scores(q, db, labels, k=k), repeats=3, warmup=0, device=device)
    q_real = torch.tanh(torch.randn(q.shape, generator=g).to(device))  # real-valued codes, as evaluate.py's queries
    real_sec = best_time(lambda: model.knn_scores(q_real, db, labels, k=100, query="real"), repeats=3, warmup=0,
                         device=device)
    qn, dbn, ln = q[:n_naive].cpu().numpy(), db.cpu().numpy(), labels.cpu().numpy()

    def naive():  # full (Q, N) Hamming matrix, full argsort, softmax votes
        dist = (bits - qn @ dbn.T) / 2  # (Q, N) float32
        top = np.argsort(dist, axis=1)[:, :k]  # (Q, k)
        w = np.exp((1 - np.take_along_axis(dist, top, 1) / bits) / 0.07)
        return (w[:, :, None] * ln[top]).sum(1) / w.sum(1, keepdims=True)  # (Q, 80)
    naive_peak = measure(naive, "cpu")[2]
    naive_sec = best_time(naive, repeats=3, warmup=0)
    naive_product_sec = best_time(lambda: (bits - qn @ dbn.T) / 2, repeats=3, warmup=0)  # its distances alone
    return dict(seconds=sec, real_k100_seconds=real_sec, peak_mb=peak, sampled_peak_mb=sampled, method=method, finite=finite,
                naive_seconds=naive_sec, naive_peak_mb=naive_peak, naive_product_seconds=naive_product_sec)


def bench_knn(quick, device, seed=0):
    nq, ndb, n_naive, bits, k = (500, 2000, 100, 64, 20) if quick else (N_VAL, N_TRAIN, 500, 64, 20)
    r = run_child("knn_child", n_query=nq, n_db=ndb, n_naive=n_naive, bits=bits, k=k, device=device, seed=seed)
    naive_full = r["naive_seconds"] * nq / n_naive  # linear in the queries: one row sort each
    return {"queries": nq, "db": ndb, "bits": bits, "k": k, "seconds": r["seconds"], "real_k100_s": r["real_k100_seconds"],
            "peak_mb": r["peak_mb"],
            "sampled_peak_mb": r["sampled_peak_mb"], "memory_method": r["method"], "finite": r["finite"],
            "naive_queries": n_naive, "naive_subset_s": r["naive_seconds"], "naive_subset_peak_mb": r["naive_peak_mb"],
            "naive_full_s_scaled": naive_full, "speedup": naive_full / r["seconds"],
            "naive_product_s_scaled": r["naive_product_seconds"] * nq / n_naive,
            "naive_full_mb_analytic": nq * ndb * (4 + 8) / 2 ** 20}  # (Q, N) float32 distances + int64 argsort


# ----------------------------------------------------------------------------- 6. memory of a training run

def write_cache(n_images, path, splits_path, seed):
    """A planted feature cache (dev + 5,000 test at full size) and a random 5-fold splits file -> fold 0 rows.
    Folds are consecutive slices of a random order of the dev ids, the smaller ones first: fold 0 of the
    118,287-image pool is 94,630 train / 23,657 val, as COCO's would be."""
    feats = synthetic.make_planted_features(n_images, seed=seed)
    data.save_features(path, feats, feats["meta"])
    ids, labels = feats["ids"], feats["labels"]
    del feats
    order = np.random.default_rng(seed).permutation(ids)
    n_test = min(N_TEST, n_images // 20)
    test, dev = np.sort(order[:n_test]), order[n_test:]
    base, extra = divmod(len(dev), FOLDS)
    folds = [np.sort(f) for f in np.split(dev, np.cumsum([base] * (FOLDS - extra) + [base + 1] * extra)[:-1])]
    stats = [{"size": len(f), "positives": labels[np.isin(ids, f)].sum(0, dtype=np.int64).tolist()} for f in folds]
    data.save_json(splits_path, {"method": "random", "folds": FOLDS, "seed": seed, "categories": data.COCO_CATEGORIES,
                                 "dev": np.sort(dev).tolist(), "test": test.tolist(),
                                 "val_folds": [f.tolist() for f in folds], "stats": stats})
    return len(dev) - len(folds[0])


def train_child(argv):
    """train.py main() in a fresh process -> its ru_maxrss (the whole process: imports, cache, fold, epoch)."""
    import train
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    train.main(train.get_args_parser().parse_args(argv))
    return {"seconds": time.perf_counter() - t, "after_imports_mb": after_imports,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_memory(quick, seed=0):
    n = 600 if quick else N_DEV + N_TEST
    # batch 256: the peak is the cache and the fold held in float32, not the batch; the default batch would
    # add ~2 minutes (section 2 times it)
    flags = ["--epochs", "1", "--batch_size", "256", "--device", "cpu"]
    with tempfile.TemporaryDirectory(prefix="bench_mem_", dir="/tmp") as tmp:
        feats, splits = os.path.join(tmp, "features.safetensors"), os.path.join(tmp, "splits.json")
        t = time.perf_counter()
        n_train = write_cache(n, feats, splits, seed)  # in this process: only the child's memory counts
        t_write = time.perf_counter() - t
        r = run_child("train_child", argv=["--features", feats, "--splits", splits, "--fold", "0",
                                           "--out_dir", os.path.join(tmp, "run")] + flags)
        size = os.path.getsize(feats)
    return {"n_images": n, "n_train": n_train, "flags": " ".join(flags), "cache_mb": size / 2 ** 20,
            "write_cache_s": t_write, "train_s": r["seconds"], "maxrss_mb": r["maxrss_mb"],
            "maxrss_after_imports_mb": r["after_imports_mb"]}


# ----------------------------------------------------------------------------- 7. learning check (opt-in)

def planted_probe(features, splits, fold, jobs):
    """scikit-learn one-vs-rest logistic regression on L2-normalised [image, mean caption] -> compute_all dict."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    import train
    f = train.load_fold(train.get_args_parser().parse_args(
        ["--features", features, "--splits", splits, "--fold", str(fold), "--out_dir", "-"]), torch.device("cpu"))

    def xy(split):  # the fold's rows exactly as train.py sees them
        cap = split["text"].sum(1) / split["n_captions"][:, None]  # (n, D) mean caption (padding rows are 0)
        x = torch.cat([torch.nn.functional.normalize(split["image"][:, 0], dim=1),
                       torch.nn.functional.normalize(cap, dim=1)], 1)
        return x.numpy(), split["labels"].numpy()
    (xt, yt), (xv, yv) = xy(f["train"]), xy(f["val"])
    t = time.perf_counter()
    clf = OneVsRestClassifier(LogisticRegression(max_iter=1000), n_jobs=jobs).fit(xt, yt)
    return dict(metrics.compute_all(yv, clf.predict_proba(xv)), n_train=len(xt), n_val=len(xv),
                seconds=time.perf_counter() - t)


KNN_RECIPE = ["--code_classifier", "centres", "--sign_weight", "1"]  # the 64-bit model whose KNN head comes closest


def bench_learning(quick, work, threads, seed=0):
    """Planted COCO-scale fold 0: probe vs train.py --bits 64 / --bits 0 (default flags), and both heads of the
    default 64-bit model and of the KNN recipe (KNN_RECIPE)."""
    n = 1500 if quick else N_DEV + N_TEST
    extra = ["--epochs", "2"] if quick else []  # quick: checks the plumbing only
    work = os.path.join(work, f"{'quick' if quick else 'full'}_seed{seed}")  # never reuse another setting's work
    os.makedirs(work, exist_ok=True)
    feats, splits = os.path.join(work, "features.safetensors"), os.path.join(work, "splits.json")
    if not (os.path.exists(feats) and os.path.exists(splits)):
        write_cache(n, feats, splits, seed)
    probe_path = os.path.join(work, "probe.json")
    if not os.path.exists(probe_path):
        data.save_json(probe_path, planted_probe(feats, splits, 0, jobs=threads))
    probe = json.load(open(probe_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"bits64": ["--bits", "64"], "bits0": ["--bits", "0"], "knn64": ["--bits", "64"] + KNN_RECIPE}
    pending = list(runs)  # `threads` runs at a time, one thread each (resumed where an earlier call stopped)
    while pending:
        procs = []
        for name in pending[:max(1, threads)]:
            out = os.path.join(work, name)
            cmd = [sys.executable, os.path.join(HERE, "train.py"), "--features", feats, "--splits", splits, "--fold",
                   "0", "--out_dir", out, "--num_threads", "1", "--resume"] + runs[name] + extra
            log = open(out + ".log", "a")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log))
        for p, out, log in procs:
            if p.wait() != 0:
                raise RuntimeError(f"train.py failed; see {out}.log")
            log.close()
        pending = pending[len(procs):]
    res = {"n_images": n, "work": work, "probe_mAP_macro": probe["mAP_macro"], "probe_s": probe["seconds"],
           "n_train": probe["n_train"], "n_val": probe["n_val"], "knn_recipe": " ".join(KNN_RECIPE)}
    for name in runs:
        out = os.path.join(work, name)
        m = json.load(open(os.path.join(out, "val_metrics.json")))
        cfg = json.load(open(os.path.join(out, "config.json")))
        res.update({f"{name}_mAP_macro": m["mAP_macro"], f"{name}_best_epoch": m["epoch"],
                    f"{name}_stopped_epoch": cfg.get("stopped_epoch"), f"{name}_lr": cfg["lr"],
                    f"{name}_input_dropout": cfg["input_dropout"]})
        if name != "bits0":  # both heads, as evaluate.py scores them by default (KNN: real queries, k = 100)
            ev = os.path.join(work, f"eval_{name}")
            subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--checkpoint", os.path.join(out, "best.pt"),
                            "--features", feats, "--splits", splits, "--split", "val", "--fold", "0", "--head", "both",
                            "--out_dir", ev], check=True, env=env, capture_output=True)
            heads = json.load(open(os.path.join(ev, "metrics.json")))["models"]["fold0"]
            res.update({f"{name}_eval_mAP_macro": heads["mlp"]["mAP_macro"], f"{name}_knn_mAP_macro": heads["knn"]["mAP_macro"]})
    res.update(gap64=res["probe_mAP_macro"] - res["bits64_mAP_macro"], gap0=res["probe_mAP_macro"] - res["bits0_mAP_macro"],
               knn_gap=res["bits64_mAP_macro"] - res["bits64_knn_mAP_macro"],
               knn64_gap=res["knn64_mAP_macro"] - res["knn64_knn_mAP_macro"])
    return res


# ----------------------------------------------------------------------------- report

TARGETS = [  # (section, figure, target, check)
    ("epoch", "speedup_default", ">= 4x", lambda v: v >= 4), ("epoch", "flops_fraction_b256", ">= 30%", lambda v: v >= 0.3),
    ("metrics", "speedup", ">= 8x", lambda v: v >= 8), ("metrics", "max_abs_diff", "< 1e-6", lambda v: v < 1e-6),
    ("splits", "stratified_mean_rel_dev", "<= 0.2%", lambda v: v <= 0.002),
    ("splits", "stratified_s", "<= 5 s", lambda v: v <= 5),
    ("knn", "peak_mb", "<= 2048 MB", lambda v: v <= 2048), ("knn", "speedup", ">= 10x", lambda v: v >= 10),
    ("learning", "gap64", "<= 0.02", lambda v: v <= 0.02), ("learning", "gap0", "<= 0.01", lambda v: v <= 0.01),
    ("learning", "knn64_gap", "<= 0.03", lambda v: v <= 0.03)]

ROWS = {  # section -> (figure, value) templates over its results, and the target figure of the row
    "encoder": [("encode 1 image + 5 captions, s/sample ({config}, batch {batch}, {dtype})", "{encoder_s_per_sample:.3g}", None),
                ("one head training step on as many cached rows, s/row", "{head_step_s_per_row:.3g}", None),
                ("per-sample cost ratio encoder / head step", "{cost_ratio:,.0f}x", None),
                ("encoder passes in-loop, 5 folds x 20 epochs x 94,630 (image + caption)",
                 "{inloop_image_passes:,} + {inloop_caption_passes:,}", None),
                ("encoder passes once, 123,287 images (image + up to 5 captions)",
                 "{once_image_passes:,} + {once_caption_passes_max:,}", None),
                ("estimated encoder hours on this device, in-loop / once", "{inloop_hours:,.1f} / {once_hours:,.1f}", None)],
    "epoch": [("epoch on {rows:,} cached rows x {captions} captions, default flags ({default_flags}), s",
               "{epoch_default_s:.1f}", None),
              ("epoch at batch 256, s", "{epoch_b256_s:.1f}", None),
              ("naive loop epoch, s (best of 3 timings on {naive_fraction:.0%} of it, scaled linearly)", "{naive_epoch_s:.1f}", None),
              ("speedup of the default-flags epoch over the naive loop", "{speedup_default:.2f}x", "speedup_default"),
              ("floor at default flags: bare forward + BCE + backward + fused AdamW on ready rows, s per epoch",
               "{floor_default_s:.1f}", None),
              ("naive loop / that floor", "{speedup_bound_default:.2f}x", None),
              ("the same step written by hand without autograd (lean_grads) + clipping + fused AdamW, s per epoch",
               "{lean_default_s:.1f}", None),
              ("naive loop / that hand-written floor", "{speedup_lean_default:.2f}x", None),
              ("  its steps again, profiled: the matmuls (of which the first Linear's) / the fused AdamW, s per epoch",
               "{lean_matmuls_s:.1f} ({lean_first_linear_matmuls_s:.1f}) / {lean_adamw_s:.1f}", None),
              ("  naive loop / (those matmuls + AdamW, as they ran inside the steps)", "{speedup_inloop_bound_default:.2f}x", None),
              ("the epoch's matmuls alone, each weight gradient in its faster layout "
               "({matmuls_default_s:.1f} s; {matmuls_default_at_peak_s:.1f} s at the torch.mm rate below) "
               "+ fused AdamW alone ({adamw_default_s:.1f} s), s",
               "{matmul_bound_default_s:.1f}", None),
              ("naive loop / that bound", "{speedup_matmul_bound_default:.2f}x", None),
              ("speedup of the batch-256 epoch over the naive loop", "{speedup_b256:.2f}x", None),
              ("batch-256 achieved FLOP/s (forward + backward matmuls, train_matmul_flops)", "{b256_flop_per_s:.3g}", None),
              ("float32 torch.mm FLOP/s on this device", "{matmul_flop_per_s:.3g}", None),
              ("batch-256 fraction of the matmul throughput", "{flops_fraction_b256:.1%}", "flops_fraction_b256")],
    "metrics": [("metrics.compute_all on {n:,} x {classes}, s", "{ours_s:.3f}", None),
                ("scikit-learn equivalent calls, s", "{sklearn_s:.2f}", None),
                ("speedup over scikit-learn", "{speedup:.1f}x", "speedup"),
                ("max abs difference of the 15 values (worst: {worst_metric})", "{max_abs_diff:.2g}", "max_abs_diff")],
    "splits": [("stratified {folds} folds on {n:,} x 80 (make_splits), s", "{stratified_s:.2f}", "stratified_s"),
               ("stratified relative prevalence deviation, mean", "{stratified_mean_rel_dev:.3%}", "stratified_mean_rel_dev"),
               ("stratified relative prevalence deviation, max", "{stratified_max_rel_dev:.2%}", None),
               ("sklearn KFold(shuffle): s / mean / max deviation",
                "{kfold_s:.2f} / {kfold_mean_rel_dev:.2%} / {kfold_max_rel_dev:.1%}", None)],
    "knn": [("model.knn_scores {queries:,} queries x {db:,} codes, {bits} bits, k={k}, s", "{seconds:.2f}", None),
            ("  the same with evaluate.py's defaults (real-valued queries, k=100), s", "{real_k100_s:.2f}", None),
            ("knn_scores peak memory, MB ({memory_method}; 2 ms RSS sampling)", "{peak_mb:,.0f} ({sampled_peak_mb:,.0f})",
             "peak_mb"),
            ("full matrix + numpy argsort, s (timed on {naive_queries:,} queries, scaled)", "{naive_full_s_scaled:.1f}", None),
            ("  of which the full matrix alone (the product of queries and codes), s", "{naive_product_s_scaled:.1f}", None),
            ("full matrix at full size, MB (analytic: float32 distances + int64 argsort)",
             "{naive_full_mb_analytic:,.0f}", None),
            ("speedup over the full matrix", "{speedup:.1f}x", "speedup")],
    "memory": [("planted feature cache of {n_images:,} images, MB", "{cache_mb:,.0f}", None),
               ("train.py main() on {n_train:,} training rows ({flags}), s", "{train_s:.1f}", None),
               ("peak resident memory of that process (ru_maxrss), MB", "{maxrss_mb:,.0f}", None)],
    "learning": [("probe: LogisticRegression on [image, mean caption], {n_train:,} / {n_val:,} rows, val mAP_macro",
                  "{probe_mAP_macro:.4f}", None),
                 ("train.py --bits 64 (lr {bits64_lr:g}, input_dropout {bits64_input_dropout:g}; best epoch "
                  "{bits64_best_epoch}), val mAP_macro", "{bits64_mAP_macro:.4f}", None),
                 ("train.py --bits 0 (lr {bits0_lr:g}, input_dropout {bits0_input_dropout:g}; best epoch "
                  "{bits0_best_epoch}), val mAP_macro", "{bits0_mAP_macro:.4f}", None),
                 ("probe minus the 64-bit head", "{gap64:+.4f}", "gap64"), ("probe minus bits 0", "{gap0:+.4f}", "gap0"),
                 ("64-bit KNN head (evaluate.py --head knn: real queries, k 100), val mAP_macro",
                  "{bits64_knn_mAP_macro:.4f}", None),
                 ("64-bit MLP head minus its KNN head", "{knn_gap:+.4f}", None),
                 ("KNN recipe ({knn_recipe}; best epoch {knn64_best_epoch}): MLP head / KNN head, val mAP_macro",
                  "{knn64_mAP_macro:.4f} / {knn64_knn_mAP_macro:.4f}", None),
                 ("KNN recipe: MLP head minus its KNN head", "{knn64_gap:+.4f}", "knn64_gap")]}


def targets(res, device):
    return [{"device": device, "section": sec, "figure": key, "value": float(res[sec][key]), "target": text,
             "pass": bool(check(res[sec][key]))} for sec, key, text, check in TARGETS if sec in res]


def print_table(res):
    m = res["meta"]
    print(f"\nbench.py{' --quick' if m['quick'] else ''}  {m['date']}  {m['platform']}\ncpu: {m['cpu']} "
          f"({m['cores']} cores, {m['threads']} torch threads); torch {m['torch']}, numpy {m['numpy']}"
          + (f"; gpu: {m['gpu']}" if "gpu" in m else ""))
    verdict = {(t["device"], t["section"], t["figure"]): t for t in res["targets"]}
    rows = [("section", "figure", "value", "target", "")]
    for dev, block in (("cpu", res), ("cuda", res.get("cuda", {}))):
        for sec in (s for s in SECTIONS if s in block):
            for fig, val, key in ROWS[sec]:
                if any(f and f not in block[sec] for _, f, _, _ in string.Formatter().parse(fig + val)):
                    continue  # a figure this device does not have (the hand-written floor is CPU-only)
                t = verdict.get((dev, sec, key), {"target": "", "pass": None})
                rows.append((f"{SECTIONS.index(sec) + 1} {sec}{' cuda' if dev == 'cuda' else ''}",
                             fig.format(**block[sec]), val.format(**block[sec]), t["target"],
                             {True: "PASS", False: "FAIL", None: ""}[t["pass"]]))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
    print(f"contention: cores this run kept busy (CPU-s / wall-s; torch code can use {m['threads']}, numpy / sklearn "
          "1) and the 1-min load average after each section: " + ", ".join(
              f"{k} {v['cores_busy']:.2f} / {v['loadavg_1min']:.1f}" for k, v in m.get("load", {}).items()))


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device: cuda is not available on this machine; use --device cpu")
    torch.set_num_threads(args.threads)
    if args.threads > 1 and os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):  # others are using the cores
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: with --threads {args.threads} "
              "torch's thread barriers stall on shared cores (small ops up to ~20x slower); --threads 1 is stable")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    res = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
                    "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "numpy": np.__version__, "quick": bool(args.quick), "sections": list(args.sections)}}
    if args.device == "cuda":
        res["meta"]["gpu"], res["cuda"] = torch.cuda.get_device_name(0), {}
    run = {"encoder": lambda d: bench_encoder(args.quick, d, args.seed), "epoch": lambda d: bench_epoch(args.quick, d, args.seed),
           "metrics": lambda d: bench_metrics(args.quick, args.seed), "splits": lambda d: bench_splits(args.quick, args.seed),
           "knn": lambda d: bench_knn(args.quick, d, args.seed), "memory": lambda d: bench_memory(args.quick, args.seed),
           "learning": lambda d: bench_learning(args.quick, args.work, args.threads, args.seed)}
    res["meta"]["load"] = {}  # per section: how much of the cores it got (other users of a shared machine)
    for dev in ["cpu"] + (["cuda"] if args.device == "cuda" else []):
        block = res if dev == "cpu" else res["cuda"]
        for name in (s for s in args.sections if dev == "cpu" or s in GPU_SECTIONS):
            t, c = time.perf_counter(), cpu_seconds()
            block[name] = run[name](dev)
            wall, used = time.perf_counter() - t, cpu_seconds() - c
            res["meta"]["load"][f"{name}_{dev}"] = {"wall_s": wall, "cpu_s": used, "cores_busy": used / wall,
                                                   "loadavg_1min": os.getloadavg()[0]}
            print(f"[{name}] {dev}: {wall:.1f} s wall, {used / wall:.2f} cores busy on average, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    res["targets"] = targets(res, "cpu") + targets(res.get("cuda", {}), "cuda")
    print_table(res)
    data.save_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())

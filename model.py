"""
The trainable hash head over frozen towers' embeddings (encoders.py) for multi-label classification
from an image and its text. Imports nothing local: copy this file into your project as it is.

    enc = encoders.load_encoder("google/siglip2-base-patch16-256")  # encoders.py: (B, 768)
    head = HashHead(num_classes=80)                          # the recipe train.py trains
    out = head(img, txt)                                     # HeadOutput(logits, codes (B, 64))
    s = score_embeddings(head, image, text, n_captions)      # probs, codes over the captions
    # the KNN head over these codes: knn.knn_scores (its own file: an exact Hamming-KNN vote)
"""

import functools
import itertools
import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# SECTION: head -- HeadConfig (the recipe), HashHead (fusion -> class evidence -> tanh codes ->
# classifier), head_loss, the caption rules: sample_text (training), score_embeddings (scoring)

INPUTS = ("both", "image", "text")
FUSIONS = ("hadamard", "concat")
INPUT_NORMS = ("batchnorm", "none")
HASH_NORMS = ("batchnorm", "none")
CODE_CLASSIFIERS = ("learned", "centres")
CODE_FROM = ("evidence", "hidden")
TEXT_INPUTS = ("each", "mean")  # what a training step feeds: one caption, or a subset's mean
SCORING_RULES = ("each", "each_mean", "mean", "subsets")  # how an image is scored over its captions
SCHEDULERS = ("cosine", "cosine_restarts")
SCORE_BATCH = 1024  # images per head call when scoring (fastest on a CPU: docs/BENCHMARKS.md)
SMALL_DATA = 20_000  # from this many training images the bits-0 baseline is an MLP (resolved)
BASELINE_MLP = (1024, 512)  # the plain-MLP baseline's hidden widths


def _opt(default, help, **check):
    """A HeadConfig field: its default, train.py's one-line help, and the flag's check (choices; lo,
    hi and strict for numbers; kind "int_list" for comma-separated widths)."""
    return field(default=default, metadata=dict(help=help, **check))


@dataclass
class HeadConfig:
    """The head's recipe, in one place: architecture (HashHead's arguments), text protocol, loss
    weights and optimiser. train.py makes one flag of each field (name, type, default, help); None
    means "by the size rule" (resolved). Why each value: docs/EXPERIMENTS.md."""

    # architecture: HashHead's arguments (ARCH_FIELDS)
    inputs: str = _opt("both", "what the head sees: image + caption, or one alone", choices=INPUTS)
    fusion: str = _opt("hadamard", "hadamard adds d_i*d_t to [d_i, d_t, m_i, m_t]", choices=FUSIONS)
    decompose: bool = _opt(True, "direction + log-magnitude of each embedding, not the raw vector")
    mlp_dims: Optional[tuple] = _opt(
        None, "hidden widths before the evidence ('' none)", kind="int_list"
    )
    dropout: float = _opt(0.1, "dropout after each hidden layer", lo=0.0, hi=1.0)
    bits: int = _opt(64, "code length; 0: no hash layer (the plain baseline)", lo=0)
    input_norm: Optional[str] = _opt(
        None, "non-affine BatchNorm on the fusion vector", choices=INPUT_NORMS
    )
    hash_norm: str = _opt("none", "BatchNorm between the hash Linear and tanh", choices=HASH_NORMS)
    input_dropout: Optional[float] = _opt(None, "dropout on the fusion vector", lo=0.0, hi=1.0)
    code_classifier: str = _opt(
        "learned",
        "classifier on the codes: learned, or fixed +-1 centres",
        choices=CODE_CLASSIFIERS,
    )
    code_gain: Optional[float] = _opt(
        None, "gain of the code classifier's initial weights", lo=0.0, strict=True
    )
    code_from: str = _opt("evidence", "what the hash layer reads", choices=CODE_FROM)
    # text protocol
    text_input: str = _opt(
        "mean", "training text: a caption subset's mean, or one caption", choices=TEXT_INPUTS
    )
    scoring: str = _opt(
        "each_mean",
        "scoring over the captions: each, each + their mean, the mean, every subset",
        choices=SCORING_RULES,
    )
    # loss weights (head_loss)
    hash_weight: float = _opt(
        0.0, "weight of the hash regulariser (quantisation, balance, decorr.)", lo=0.0
    )
    lambda_balance: float = _opt(0.1, "bit-balance weight inside the hash regulariser", lo=0.0)
    lambda_decorr: float = _opt(
        0.01, "bit-decorrelation weight inside the hash regulariser", lo=0.0
    )
    sign_weight: float = _opt(0.0, "weight of a BCE on the binarised codes sign(h)", lo=0.0)
    hash_warmup: float = _opt(15.0, "epochs of linear ramp of hash_weight from 0", lo=0.0)
    prior_init: str = _opt(
        "on", "classifier biases = the fold's class log prior odds", choices=("on", "off")
    )
    # optimiser
    epochs: int = _opt(20, "maximum epochs", lo=1)
    patience: int = _opt(3, "stop after this many epochs without a better val mAP (0: never)", lo=0)
    batch_size: int = _opt(32, "micro-batch size (>= 2 for BatchNorm)", lo=2)
    accum_steps: int = _opt(2, "micro-batches per optimizer step", lo=1)
    lr: Optional[float] = _opt(None, "peak AdamW learning rate", lo=0.0, strict=True)
    weight_decay: float = _opt(0.01, "AdamW weight decay", lo=0.0)
    warmup_ratio: float = _opt(0.1, "fraction of all steps in linear lr warmup", lo=0.0, hi=1.0)
    min_lr: float = _opt(1e-6, "lr at the end of the cosine decay", lo=0.0)
    scheduler: str = _opt(
        "cosine", "after warmup: one cosine, or SGDR restarts", choices=SCHEDULERS
    )
    T_0: int = _opt(5, "first cosine_restarts period in epochs", lo=1)
    T_mult: int = _opt(2, "period growth factor of cosine_restarts", lo=1)
    clip_grad: float = _opt(1.0, "max gradient norm (0: no clipping)", lo=0.0)

    def __post_init__(self):
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices and not (value is None and f.default is None):
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
        if not (isinstance(self.bits, int) and self.bits >= 0):
            raise ValueError(f"bits must be an integer >= 0, got {self.bits!r}")
        if self.mlp_dims is not None:
            self.mlp_dims = tuple(int(h) for h in self.mlp_dims)

    def resolved(self, n_train=None):
        """The size rule: a copy with every None field filled (n_train: training images; None = a
        large set). With a hash layer, at every size: no MLP, lr 1e-2, input dropout 0.35, code gain
        5 (2 for the fixed centres). Without (bits 0): from SMALL_DATA images on an MLP of
        BASELINE_MLP on the BatchNorm-standardised fusion vector at lr 3e-4, below the linear head
        at 1e-2; input dropout 0.5 before an MLP (it memorises), none before the linear head."""
        big = self.bits == 0 and (n_train is None or n_train >= SMALL_DATA)
        mlp = self.mlp_dims if self.mlp_dims is not None else BASELINE_MLP if big else ()
        auto = dict(
            mlp_dims=mlp,
            input_norm="batchnorm" if big else "none",
            lr=3e-4 if big else 1e-2,
            code_gain=2.0 if self.code_classifier == "centres" else 5.0,
            input_dropout=0.35 if self.bits > 0 else 0.5 if mlp else 0.0,
        )
        return replace(self, **{k: v for k, v in auto.items() if getattr(self, k) is None})

    def arch(self):
        """HashHead's keyword arguments (ARCH_FIELDS) of this config."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}


ARCH_FIELDS = (
    "inputs",
    "fusion",
    "decompose",
    "mlp_dims",
    "dropout",
    "bits",
    "input_norm",
    "hash_norm",
    "input_dropout",
    "code_classifier",
    "code_gain",
    "code_from",
)


class HeadOutput(NamedTuple):
    logits: torch.Tensor  # (B, C): the classifier on the codes (on the MLP without a hash layer)
    codes: Optional[torch.Tensor]  # (B, bits) tanh codes in (-1, 1); None without a hash layer
    evidence: Optional[torch.Tensor] = (
        None  # (B, C) the evidence logits the codes are made from (code_from "evidence")
    )


class Dropout(nn.Dropout):
    """nn.Dropout, same distribution and scaling; on CPU the mask comes from torch.rand, about 3x
    faster than the bernoulli_ of nn.Dropout (0.7 vs 2.4 ms for 32 x 2306 on one core), which
    matters at batch 32."""

    def forward(self, x):
        if not self.training or self.p in (0, 1) or x.is_cuda:
            return super().forward(x)
        return (
            x * (torch.rand(x.shape, device=x.device) >= self.p) / (1 - self.p)
        )  # float32 draws, also under bf16


def _per_group(norm, x, groups):
    """norm(x), with a training BatchNorm applied to each of `groups` equal row blocks of x on its
    own."""
    if groups == 1 or not (isinstance(norm, nn.BatchNorm1d) and norm.training):
        return norm(x)
    return torch.cat([norm(c) for c in x.chunk(groups)])


class HashHead(nn.Module):
    """Trainable head on frozen image/text embeddings: fusion -> MLP -> class evidence -> tanh codes
    -> C logits. HashHead(dim, num_classes, **arch): arch is HeadConfig's architecture fields
    (ARCH_FIELDS), resolved by its size rule for a large set; HashHead() is the recipe train.py
    trains with codes: fusion -> Linear (the evidence, C logits) -> 64-bit codes -> classifier.

    inputs: "both" (image + text), "image" or "text". decompose splits each embedding v into its
    direction d = v/|v| and log-magnitude m = log|v|; fusion "hadamard" feeds [d_i, d_t, d_i*d_t,
    m_i, m_t], "concat" [d_i, d_t, m_i, m_t]; one input alone feeds [d, m] (decompose False: the raw
    v, no m). A zero text vector means "no text": its text columns are set to 0 after the input norm
    (to their training mean under BatchNorm), so such an image is scored from its image alone.
    mlp_dims: hidden widths before the evidence. input_norm "batchnorm": a non-affine BatchNorm on
    the fusion vector (an MLP at a small lr needs it). hash_norm "batchnorm": an affine BatchNorm
    between the hash Linear and tanh. code_from "evidence": the MLP (or the fusion vector) goes to C
    class logits, the evidence, trained by its own BCE (head_loss); the hash layer reads
    relu(evidence - prior log-odds), gradient stopped: a sparse, label-shaped vector that few bits
    hold, which the classifier on the codes decodes. "hidden": the hash layer reads the last hidden
    layer (the original design). code_classifier "centres" fixes the classifier on the codes to
    random +-1 class centres / sqrt(bits) (only its bias learns); code_gain multiplies its initial
    weights (bounded codes need larger weights). bits 0 drops the hash layer and the evidence: the
    plain baseline, whose classifier reads the MLP. Rebuild from a checkpoint with
    HashHead(**ckpt["model_args"]); the state dict carries the rest.
    """

    def __init__(self, dim=768, num_classes=80, **arch):
        super().__init__()
        unknown = sorted(set(arch) - set(ARCH_FIELDS))
        if unknown:
            raise TypeError(f"HashHead: unknown arguments {unknown}; its arguments: {ARCH_FIELDS}")
        c = HeadConfig(**arch).resolved()
        inputs, fusion, decompose, bits = c.inputs, c.fusion, bool(c.decompose), c.bits
        mlp_dims, dropout, code_from = [int(h) for h in c.mlp_dims], float(c.dropout), c.code_from
        self.model_args = dict(
            dim=int(dim),
            num_classes=int(num_classes),
            **dict(c.arch(), mlp_dims=mlp_dims, decompose=decompose),
        )
        input_norm, hash_norm, input_dropout = c.input_norm, c.hash_norm, float(c.input_dropout)
        code_classifier, code_gain = c.code_classifier, float(c.code_gain)
        self.inputs, self.fusion, self.decompose, self.bits = inputs, fusion, bool(decompose), bits
        # which fusion columns come from the text (zeroed for an image without text), in fuse's
        # order
        d, m = [dim], [1] if self.decompose else []
        blocks = {
            "image": [(d, 0)] + [(m, 0)] * len(m),
            "text": [(d, 1)] + [(m, 1)] * len(m),
            "both": [(d, 0), (d, 1)]
            + ([(d, 1)] if fusion == "hadamard" else [])
            + [(m, 0), (m, 1)] * len(m),
        }
        self.register_buffer(
            "text_cols",
            torch.cat([torch.full(w, bool(t)) for w, t in blocks[inputs]]),
            persistent=False,
        )  # (in_dim,), not in the state dict
        in_dim = self.text_cols.numel()
        # non-affine: pure standardisation (running stats in the state dict), nothing to learn
        self.input_norm = (
            nn.BatchNorm1d(in_dim, affine=False) if input_norm == "batchnorm" else nn.Identity()
        )
        # dropout on the fusion vector (standardised only with input_norm): against memorising the
        # training images
        self.input_dropout = Dropout(input_dropout)
        layers, width = [], in_dim
        for h in mlp_dims:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True), Dropout(dropout)]
            width = int(h)
        self.mlp = nn.Sequential(*layers)
        # code_from "evidence": class logits first (the plain classifier), the code is made from
        # them
        self.evidence = (
            nn.Linear(width, num_classes) if bits > 0 and code_from == "evidence" else None
        )
        # the class log-odds the evidence is measured from (init_prior; 0 until then), in the state
        # dict
        self.register_buffer(
            "prior_logit", torch.zeros(num_classes) if self.evidence is not None else None
        )
        width = num_classes if self.evidence is not None else width
        self.hash = nn.Linear(width, bits) if bits > 0 else None
        self.hash_norm = (
            nn.BatchNorm1d(bits) if bits > 0 and hash_norm == "batchnorm" else nn.Identity()
        )
        self.classifier = nn.Linear(bits if bits > 0 else width, num_classes)
        if (
            bits > 0 and code_classifier == "centres"
        ):  # stays in the state dict; the optimizer skips it
            with torch.no_grad():
                signs = (
                    torch.randint(0, 2, (num_classes, bits)) * 2.0 - 1.0
                )  # (C, bits) from the global RNG
                self.classifier.weight.copy_(signs / math.sqrt(bits))
            self.classifier.weight.requires_grad_(False)
        if bits > 0:
            with torch.no_grad():
                self.classifier.weight.mul_(code_gain)

    def fuse(self, img, txt):
        """(B, D), (B, D) or None -> fusion vector (B, in_dim), in float32 (log/normalise are
        fp16-unsafe)."""

        def split(v):  # -> direction, [log-magnitude]; a zero vector (no text) gives 0 and [0]
            if not self.decompose:
                return v.float(), []
            n = v.float().norm(dim=-1, keepdim=True)  # (B, 1)
            return v.float() / n.clamp_min(1e-12), [
                torch.where(n > 0, n.clamp_min(1e-12).log(), 0.0)
            ]

        if self.inputs == "image":
            a, m = split(img)
            return torch.cat([a] + m, dim=-1)
        b, mt = split(txt if txt is not None else torch.zeros_like(img))
        if self.inputs == "text":
            return torch.cat([b] + mt, dim=-1)
        a, m = split(img)
        return torch.cat([a, b] + ([a * b] if self.fusion == "hadamard" else []) + m + mt, dim=-1)

    def forward(self, img, txt=None, groups=1):
        """img (B, D), txt (B, D) or None -> HeadOutput(logits (B, C), codes (B, bits) or None).

        A zero txt row (or txt None) means no text: its text columns are 0 after the input norm
        (mean imputation). groups > 1: the batch is `groups` equal micro-batches stacked (gradient
        accumulation run as one pass); in training, BatchNorm takes its statistics and running-stat
        updates per micro-batch, in order, so the result is that of `groups` separate calls, while
        the matmuls run once on the whole batch."""
        x = _per_group(self.input_norm, self.fuse(img, txt), groups)  # (B, in_dim)
        if self.inputs != "image":
            no_text = (
                (txt == 0).all(-1, keepdim=True)
                if txt is not None
                else torch.ones_like(x[:, :1], dtype=torch.bool)
            )
            x = x.masked_fill(no_text & self.text_cols, 0.0)
        z = self.mlp(self.input_dropout(x))  # (B, mlp_dims[-1])
        if self.hash is None:
            return HeadOutput(self.classifier(z), None)
        e = None
        if (
            self.evidence is not None
        ):  # each class's evidence above its prior: sparse, shaped like the label set
            e = self.evidence(z)  # (B, C)
            z = torch.relu(
                e.detach() - self.prior_logit
            )  # detached: the codes' loss does not bend the evidence
        h = torch.tanh(_per_group(self.hash_norm, self.hash(z), groups))
        return HeadOutput(self.classifier(h), h, e)

    def sign_logits(self, h):
        """Logits of the binarised codes sign(h) (0 -> +1), with a straight-through gradient to h:
        what the classifier makes of the codes the KNN head and retrieval see."""
        return self.classifier(h + (torch.where(h >= 0, 1.0, -1.0) - h).detach())

    @torch.no_grad()
    def init_prior(self, prior, eps=1e-4):
        """Set the classifier's and the evidence layer's biases and prior_logit to log(p / (1 - p))
        of the class prevalences p (num_classes,): with rare positives a zero bias spends the first
        epoch pushing every logit down, which saturates tanh. Called once by train.py; a checkpoint
        carries the result."""
        p = torch.as_tensor(prior, dtype=torch.float64).clamp(eps, 1 - eps)
        log_odds = (p / (1 - p)).log().float()
        for b in (self.classifier.bias,) + (
            (self.evidence.bias, self.prior_logit) if self.evidence is not None else ()
        ):
            b.copy_(log_odds.to(b))


LOSS_FIELDS = ("hash_weight", "lambda_balance", "lambda_decorr", "sign_weight")


def head_loss(logits, targets, h, evidence=None, sign_logits=None, as_float=True, **weights):
    """BCE + the evidence layer's BCE (code_from "evidence") + sign_weight * BCE of the binarised
    codes + hash_weight * (quantisation + lambda_balance * balance + lambda_decorr * decorrelation).

    logits (B, C), targets (B, C) in {0, 1}, h (B, bits) tanh codes or None (no hash terms),
    evidence (B, C) HeadOutput.evidence or None, sign_logits HashHead.sign_logits(h) or None.
    weights: LOSS_FIELDS, HeadConfig's defaults where not given. quantisation = mean((|h| - 1)^2);
    balance = mean(bit_mean^2); decorrelation = sum of squared off-diagonal entries of the codes'
    covariance (unbiased) / bits^2. Returns (loss, terms): terms maps bce, bce_evidence, bce_sign,
    quant, balance, decorr, hash_reg to floats, or to detached 0-d tensors with as_float=False (no
    device sync per step in the training loop).
    """
    unknown = sorted(set(weights) - set(LOSS_FIELDS))
    if unknown:
        raise TypeError(f"head_loss: unknown weights {unknown}; its weights: {LOSS_FIELDS}")
    w = {k: weights.get(k, getattr(HeadConfig, k)) for k in LOSS_FIELDS}
    hash_weight, lambda_balance, lambda_decorr, sign_weight = (w[k] for k in LOSS_FIELDS)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    terms = {"bce": bce}
    loss = bce
    if evidence is not None:
        terms["bce_evidence"] = F.binary_cross_entropy_with_logits(
            evidence.float(), targets.float()
        )
        loss = loss + terms["bce_evidence"]
    if sign_logits is not None:
        terms["bce_sign"] = F.binary_cross_entropy_with_logits(sign_logits.float(), targets.float())
        loss = loss + sign_weight * terms["bce_sign"]
    if h is not None:
        h = h.float()
        n, bits = h.shape
        quant = (h.abs() - 1).pow(2).mean()
        mean = h.mean(dim=0)  # (bits,)
        balance = mean.pow(2).mean()
        hc = h - mean
        cov = hc.T @ hc / max(n - 1, 1)  # (bits, bits)
        decorr = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / bits**2
        hash_reg = quant + lambda_balance * balance + lambda_decorr * decorr
        loss = loss + hash_weight * hash_reg
        terms.update(quant=quant, balance=balance, decorr=decorr, hash_reg=hash_reg)
    terms = {k: (v.item() if as_float else v.detach()) for k, v in terms.items()}
    return loss, terms


class Scores(NamedTuple):
    probs: torch.Tensor  # (N, C) float32: sigmoid(logits) averaged over each image's scoring passes
    codes: Optional[
        torch.Tensor
    ]  # (N, bits) float32: tanh codes averaged the same way; None: no codes
    query_codes: Optional[torch.Tensor] = (
        None  # (N, Q, bits): the KNN head's queries (keep_queries)
    )
    query_mask: Optional[torch.Tensor] = None  # (N, Q) bool: the queries each image has


def sample_text(text, n_captions, text_input):
    """The training caption rule: the text each image gets in a step. text (b, T, D) with zero rows
    past n_captions (b,) -> (b, D) float32, a zero row for an image without captions. "each": one
    caption drawn uniformly; "mean": the mean of a random non-empty subset of the captions (each
    kept with probability 1/2, so every non-empty subset is about equally likely, as scoring rule
    "subsets" averages them)."""
    b, dev = len(text), n_captions.device
    if text_input == "each":
        pick = (torch.rand(b).to(dev) * n_captions).long()  # < n (0 when none); CPU RNG, no sync
        return text[torch.arange(b, device=dev), pick].float()
    has = torch.arange(text.shape[1], device=dev) < n_captions[:, None]  # (b, T) real caption slots
    keep = has & (torch.rand(has.shape).to(dev) < 0.5)
    first = (torch.rand(b).to(dev) * n_captions).long()  # an image left with none keeps one caption
    keep[torch.arange(b, device=dev), first] |= ~keep.any(1) & (n_captions > 0)
    return (text.float() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)


def scoring_passes(slots, rule):
    """The scoring rule's passes over T = slots caption slots, as (slot list, need): a pass feeds
    the mean of its slots' captions and is used by the images with at least `need` captions.
    "each": one pass per caption; "each_mean": those and one on the mean of all the image's
    captions; "mean": that one alone; "subsets": one per non-empty subset of the captions (2^T - 1:
    31 for 5). Single captions come first. An image without a caption uses pass 0 alone, no text."""
    singles = [([c], c + 1) for c in range(slots)]
    every = [(list(range(slots)), 1)]  # the mean of the captions an image has
    if rule == "subsets":
        subsets = itertools.chain(
            *(itertools.combinations(range(slots), k) for k in range(1, slots + 1))
        )
        return [(list(t), t[-1] + 1) for t in subsets]
    return {"each": singles, "mean": every, "each_mean": singles + every * (slots > 1)}[rule]


def fill_rows(out, n, name, s, x):
    """out[name][s : s + len(x)] = x; out[name] is an (n, ...) CPU tensor made at the first call."""
    if name not in out:
        out[name] = torch.empty((n, *x.shape[1:]), dtype=x.dtype)
    out[name][s : s + len(x)] = x


@torch.no_grad()
def score_embeddings(
    head,
    image,
    text,
    n_captions,
    rule=HeadConfig.scoring,
    batch_size=SCORE_BATCH,
    amp_dtype=None,
    keep_queries=False,
):
    """The scoring rule, everywhere (validation, test, KNN queries, HashModel): cached embeddings ->
    Scores.

    image (N, D) view 0; text (N, T, D) with zero rows past n_captions (N,). The head's
    probabilities and codes are averaged over the image's scoring passes (scoring_passes: rule
    "each", "each_mean", "mean" or "subsets"). An image without a caption is scored once with no
    text; a head that reads only the image runs once. keep_queries: also the KNN head's queries, at
    most one per caption by design: the single-caption passes' codes (every rule but "mean"), else
    the image's averaged code. Tensors may live on any device: batches go to the head's device,
    results come back to the CPU in float32. amp_dtype: autocast.
    """
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    slots = 1 if head.inputs == "image" else max(1, text.shape[1])
    passes = scoring_passes(slots, rule)
    need = torch.tensor([k for _, k in passes], device=device)  # (P,) captions a pass needs
    first = torch.arange(len(passes), device=device) == 0  # (P,)
    single = [i for i, (p, _) in enumerate(passes) if len(p) == 1]  # the per-caption passes
    kept = {}  # name -> (N, ...) CPU tensor, allocated at the first batch and filled in place
    put = functools.partial(fill_rows, kept, len(image))
    for s in range(0, len(image), batch_size):
        img = image[s : s + batch_size].to(device).float()  # (b, D)
        txt, n = text[s : s + batch_size].to(device), n_captions[s : s + batch_size].to(device)
        if head.inputs == "image":
            txt, n = txt[:, :1] * 0, torch.ones_like(n)
        used = (n[:, None] >= need) | ((n[:, None] == 0) & first)  # (b, P) the passes an image has
        cap = torch.arange(txt.shape[1], device=device) < n[:, None]  # (b, T) real caption slots
        p_sum, h_pass = 0.0, []
        for c, (slot, _) in enumerate(passes):
            sel = txt[:, slot].float() * cap[:, slot, None]  # (b, |slot|, D), zero past n
            mean = sel.sum(1) / cap[:, slot].sum(1, keepdim=True).clamp_min(1)  # (b, D)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                out = head(img, mean)  # a zero text row: "no text"
            has = used[:, c : c + 1]  # (b, 1)
            p_sum = p_sum + torch.where(has, torch.sigmoid(out.logits.float()), 0.0)
            h_pass += [torch.where(has, out.codes.float(), 0.0)] if out.codes is not None else []
        n_used = used.sum(1, keepdim=True)  # (b, 1) >= 1
        put("probs", s, p_sum / n_used)
        if h_pass:
            stacked = torch.stack(h_pass, 1)  # (b, P, bits)
            put("codes", s, stacked.sum(1) / n_used)
            if keep_queries and rule != "mean":  # one query per caption
                put("queries", s, stacked[:, single])
                put("masks", s, used[:, single])
            elif keep_queries:  # one query per image: its averaged code
                put("queries", s, kept["codes"][s : s + len(img), None])
                put("masks", s, torch.ones(len(img), 1, dtype=torch.bool))
    head.train(was_training)
    return Scores(kept["probs"], *(kept.get(k) for k in ("codes", "queries", "masks")))


# ----------------------------------------------------------------------------
# SECTION: HashModel -- towers + head on raw images and captions


class HashModel(nn.Module):
    """Frozen SigLIP2 towers + a trained head, for inference on raw image + caption pairs.

    The encoder is kept as a plain attribute (not a submodule), so state_dict() holds only head.*
    weights. Embeddings are rounded through float16 before the head, exactly as in the feature cache
    the head was trained on, so predict() on raw inputs equals the head applied to cached embeddings
    (score_embeddings).
    """

    def __init__(self, encoder, head, cache_dtype=torch.float16, scoring=HeadConfig.scoring):
        super().__init__()
        self.encoder, self.head, self.cache_dtype, self.scoring = (
            encoder,
            head,
            cache_dtype,
            scoring,
        )

    @torch.no_grad()
    def predict(self, images, captions):
        """images: list of B PIL images; captions: list of B lists of str (an empty list: the image
        alone)
        -> probs float32 (B, C)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        img = self.encoder.encode_images(images).to(self.cache_dtype).float()  # (B, D)
        n = torch.tensor([len(c) for c in captions])  # (B,)
        flat = (
            self.encoder.encode_texts([c for caps in captions for c in caps])
            .to(self.cache_dtype)
            .float()
        )
        txt = torch.zeros(
            len(images), max([1, *n.tolist()]), img.shape[1]
        )  # (B, T, D), zero past n
        txt[torch.arange(txt.shape[1])[None, :] < n[:, None]] = flat
        return score_embeddings(self.head, img, txt, n, self.scoring).probs

"""
Frozen SigLIP2 towers and the trainable hash head for multi-label COCO classification.
Imports nothing local: copy this file into your project as it is.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# SECTION: encoder (owner: encoder engineer) -- Siglip2Encoder, make_tiny_siglip

# ----------------------------------------------------------------------------
# SECTION: head (owner: head/train engineer) -- HashHead, head_loss

HASH_BITS = (0, 16, 32, 64, 128, 256)  # 0 = no hash layer: the plain-MLP baseline
FUSIONS = ("hadamard", "concat")
INPUT_NORMS = ("batchnorm", "none")


class HashHead(nn.Module):
    """Trainable head on frozen image/text embeddings: fusion -> MLP -> tanh hash codes -> 80 logits.

    decompose=True splits each embedding v into its direction d = v/|v| and log-magnitude m = log|v|;
    fusion "hadamard" feeds [d_i, d_t, d_i*d_t, m_i, m_t], "concat" feeds [d_i, d_t, m_i, m_t]
    (decompose=False: the raw v in place of d and no m). input_norm "batchnorm" standardises the fusion
    vector with a non-affine BatchNorm (as MAE's linear probe): frozen SigLIP coordinates are ~0.04, which
    an MLP at a small lr barely moves from. bits=0 drops the hash layer (MLP -> classifier directly).
    Rebuild from a checkpoint with HashHead(**ckpt["model_args"]); the state dict carries everything else.
    """

    def __init__(self, dim=768, num_classes=80, fusion="hadamard", decompose=True, mlp_dims=(1024, 512),
                 dropout=0.1, bits=64, input_norm="batchnorm"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if bits not in HASH_BITS:
            raise ValueError(f"bits must be one of {HASH_BITS}, got {bits!r}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.model_args = dict(dim=int(dim), num_classes=int(num_classes), fusion=fusion,
                               decompose=bool(decompose), mlp_dims=[int(h) for h in mlp_dims],
                               dropout=float(dropout), bits=int(bits), input_norm=input_norm)
        self.fusion, self.decompose, self.bits = fusion, bool(decompose), int(bits)
        in_dim = dim * (3 if fusion == "hadamard" else 2) + (2 if self.decompose else 0)
        # non-affine: pure standardisation (running stats in the state dict), nothing to learn
        self.input_norm = nn.BatchNorm1d(in_dim, affine=False) if input_norm == "batchnorm" else nn.Identity()
        layers, width = [], in_dim
        for h in mlp_dims:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = int(h)
        self.mlp = nn.Sequential(*layers)
        self.hash = nn.Linear(width, bits) if bits > 0 else None
        self.classifier = nn.Linear(bits if bits > 0 else width, num_classes)

    def fuse(self, img, txt):
        """(B, D), (B, D) -> fusion vector (B, in_dim), computed in float32 (log/normalise are fp16-unsafe)."""
        img, txt = img.float(), txt.float()
        if self.decompose:
            n_i = img.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, 1)
            n_t = txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            a, b, mags = img / n_i, txt / n_t, [n_i.log(), n_t.log()]
        else:
            a, b, mags = img, txt, []
        parts = [a, b, a * b] if self.fusion == "hadamard" else [a, b]
        return torch.cat(parts + mags, dim=-1)

    def forward(self, img, txt):
        """img, txt (B, D) -> logits (B, num_classes), codes h (B, bits) in (-1, 1) or None if bits == 0."""
        z = self.mlp(self.input_norm(self.fuse(img, txt)))  # (B, mlp_dims[-1])
        h = torch.tanh(self.hash(z)) if self.hash is not None else None  # (B, bits)
        return self.classifier(h if h is not None else z), h

    @torch.no_grad()
    def init_prior(self, prior, eps=1e-4):
        """Set the classifier bias to log(p / (1 - p)) of the class prevalences p (num_classes,).

        With rare positives, a zero bias makes the first epoch spend its updates pushing every logit down,
        which drives the tanh hash layer into saturation (|h| -> 1, no gradient below it). Starting at the
        priors removes that push. Called once by train.py from the fold's training labels; a checkpoint
        does not need it (the bias lives in the state dict)."""
        p = torch.as_tensor(prior, dtype=torch.float64).clamp(eps, 1 - eps)
        self.classifier.bias.copy_((p / (1 - p)).log().to(self.classifier.bias))


def head_loss(logits, targets, h, hash_weight=0.1, lambda_balance=0.1, lambda_decorr=0.01, as_float=True):
    """BCE + hash_weight * (quantisation + lambda_balance * balance + lambda_decorr * decorrelation).

    logits (B, C), targets (B, C) in {0, 1}, h (B, bits) tanh codes or None (no hash terms).
    quantisation = mean((|h| - 1)^2); balance = mean(bit_mean^2); decorrelation = sum of squared
    off-diagonal entries of the codes' covariance (unbiased, as torch.cov) / bits^2.
    Returns (loss, terms): terms maps bce/quant/balance/decorr/hash_reg to floats, or to detached 0-d
    tensors with as_float=False (no device sync per step in the training loop).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    terms = {"bce": bce}
    loss = bce
    if h is not None:
        h = h.float()
        n, bits = h.shape
        quant = (h.abs() - 1).pow(2).mean()
        mean = h.mean(dim=0)  # (bits,)
        balance = mean.pow(2).mean()
        hc = h - mean
        cov = hc.T @ hc / max(n - 1, 1)  # (bits, bits)
        decorr = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / bits ** 2
        hash_reg = quant + lambda_balance * balance + lambda_decorr * decorr
        loss = bce + hash_weight * hash_reg
        terms.update(quant=quant, balance=balance, decorr=decorr, hash_reg=hash_reg)
    terms = {k: (v.item() if as_float else v.detach()) for k, v in terms.items()}
    return loss, terms

# ----------------------------------------------------------------------------
# SECTION: knn + full model (owner: encoder engineer) -- knn_scores, HashModel

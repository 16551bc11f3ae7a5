"""Baselines that need no gradient descent, written into a linear HashHead so that they are
evaluated, ensembled and aggregated exactly like a trained run (train.py --baseline probe |
zeroshot).

    head = model.HashHead(**linear_head_args(dim, num_classes, "probe"))
    fit_probe(head, image, text, labels, C=1.0)           # one-vs-rest logistic regression
    fit_zeroshot(head, prompts, logit_scale, logit_bias)   # SigLIP's own classifier
"""

import math
import sys

import torch
from tqdm import tqdm


def linear_head_args(dim, num_classes, kind, inputs="both"):
    """HashHead arguments of a baseline: no MLP, no hash layer, concat fusion of [d_i, d_t, m_i,
    m_t] (or one input), standardised inputs for the probe (its eval-mode BatchNorm holds the
    training mean and variance)."""
    return dict(
        dim=dim,
        num_classes=num_classes,
        inputs=inputs,
        fusion="concat",
        decompose=True,
        mlp_dims=[],
        dropout=0.0,
        bits=0,
        input_norm="batchnorm" if kind == "probe" else "none",
        input_dropout=0.0,
    )


@torch.no_grad()
def fit_zeroshot(head, prompts, logit_scale, logit_bias):
    """SigLIP's own classifier: logit_c = logit_scale * cos(image, prompt_c) + logit_bias (the text
    is ignored). prompts (C, D): embeddings of "a photo of a {name}."; the head's first D inputs are
    the image direction."""
    W, b = head.classifier.weight, head.classifier.bias  # (C, in_dim), (C,)
    W.zero_()
    p = prompts.float()
    W[:, : p.shape[1]] = (
        float(logit_scale) * p / p.norm(dim=1, keepdim=True)
    )  # acts on d_i = v_i / |v_i|
    b.fill_(float(logit_bias))


@torch.no_grad()
def fit_probe(head, image, text, labels, C=1.0):
    """One-vs-rest logistic regression (scikit-learn L-BFGS, as CLIP's linear probes) on the
    standardised fusion vector of each training image with one text (train.py gives it what one
    epoch would: model.sample_text).

    image (n, D), text (n, D) (a zero row: no text, the image alone), labels (n, C). The
    standardisation is the head's eval-mode input BatchNorm, set to the training mean and variance;
    a class absent (or everywhere) gets its prior."""
    from sklearn.linear_model import LogisticRegression

    W, b = head.classifier.weight, head.classifier.bias
    W.zero_()
    txt = text.cpu().float()  # (n, D)
    x = head.fuse(image.cpu().float(), txt).double()  # (n, in_dim)
    bn = head.input_norm
    mean, var = x.mean(0), x.var(0, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    z = (x - mean) / (var + bn.eps).sqrt()  # exactly what the eval-mode BatchNorm computes
    z = z.masked_fill(
        (txt == 0).all(-1, keepdim=True) & head.text_cols, 0.0
    ).numpy()  # as HashHead.forward
    y = labels.cpu().numpy()
    for c in tqdm(range(y.shape[1]), desc="probe classes", disable=not sys.stderr.isatty()):
        p = float(y[:, c].mean())
        if p in (0.0, 1.0):
            b[c] = math.log(max(p, 1e-4) / max(1 - p, 1e-4))
            continue
        clf = LogisticRegression(C=C, max_iter=1000).fit(z, y[:, c])
        W[c] = torch.from_numpy(clf.coef_[0]).to(W)
        b[c] = float(clf.intercept_[0])

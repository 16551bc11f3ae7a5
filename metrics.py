"""Multi-label classification metrics, bootstrap intervals and paired tests: numpy arrays in, Python
numbers out, no I/O.

Every value of compute_all / per_class equals scikit-learn's definition (checked to 1e-6 against
sklearn in tests/test_metrics.py), but is vectorised: AP and AUC sort each class column once (and
the flattened array for micro) and count tied scores with searchsorted, exactly as sklearn groups
ties; LRAP, ranking loss and coverage compare each true label with its row's scores; bootstrap
resamples are multiplicity weights on those same counts (one sparse product per batch of draws).

    import metrics
    m = metrics.compute_all(labels, probs)                # {15 METRIC_NAMES: float, skipped_*: int}
    pc = metrics.per_class(labels, probs)                 # {"ap": [C], "auc": [C], "f1": [C], ...}
    err = metrics.error_analysis(labels, probs, top=20)   # fp/fn per class, (missed, wrong) pairs
    thr = metrics.best_f1_thresholds(val_labels, val_probs)  # [C]: compute_all(test_y, test_p, thr)
    ci = metrics.bootstrap_ci(labels, probs, n_boot=1000)    # {"mAP_macro": (point, lo, hi), ...}
    cis = metrics.bootstrap_intervals(labels, [p1, p2])      # all 15, the same resamples for each
    metrics.paired_bootstrap(labels, probs_a, probs_b)       # b - a on the same images
    metrics.interval_rule(1000, n_images=len(labels))        # {"method": "BCa", "level": 0.95, ...}
    metrics.paired_test(fold_maps_a, fold_maps_b)            # paired t-test across CV folds

Intervals: every one (bootstrap_intervals, bootstrap_ci, paired_bootstrap) is the BCa interval
(bias-corrected and accelerated; scipy.stats.bootstrap(method="BCa")) over resamples of the images,
acceleration from a jackknife over the images (leave-one-out up to JACKKNIFE_BLOCKS images, else
JACKKNIFE_BLOCKS blocks), and always holds its own estimate: bootstrap_intervals says how.

Conventions (deliberate, so read them before comparing with a bare sklearn call):
- y_true is 0/1 [N, C]; y_score holds probabilities [N, C]; prediction = score > threshold.
- precision / recall / F1 use zero_division=0 (a class with nothing predicted has precision 0, one
  with no positive has recall 0); macro averages run over all C classes, as sklearn's do.
- macro AP skips classes with no positive (sklearn would count them as AP 0); macro AUC skips
  classes with no positive or no negative (sklearn returns nan); the skip counts are returned. Micro
  AP / AUC are nan when undefined (no positive at all / one class only).
- LRAP gives a row with no positive (or only positives) 1.0, ranking loss gives it 0, coverage 0: as
  sklearn.
- Scores are promoted to float64 (exactly), so ties are those of the input. sklearn keeps float32
  scores in float32 for MAE, which drifts by ~1e-5 over 2M entries; against float64 input it agrees
  to ~1e-16.
"""

import numpy as np
from scipy import sparse  # bootstrap: sums image weights per (class, score interval)
from scipy.special import ndtr, ndtri, stdtr  # normal CDF and its inverse (BCa), Student t CDF

METRIC_NAMES = (
    "mAP_macro",
    "mAP_micro",
    "auc_macro",
    "auc_micro",
    "f1_macro",
    "f1_micro",
    "precision_macro",
    "precision_micro",
    "recall_macro",
    "recall_micro",
    "hamming_loss",
    "coverage_error",
    "ranking_loss",
    "lrap",
    "mae",
)
BOOT_METRICS = ("mAP_macro", "f1_macro", "auc_macro")  # bootstrap_ci's default, paired_bootstrap's
JACKKNIFE_BLOCKS = 100  # BCa acceleration: leave-one-out up to this many images, else blocks


def _check(y_true, y_score):
    """Validate and convert: -> (y bool [N, C], s float64 [N, C])."""
    y, s = np.asarray(y_true), np.asarray(y_score)
    if y.ndim != 2 or y.shape != s.shape or y.shape[0] == 0:
        raise ValueError(
            f"y_true {y.shape} and y_score {s.shape} must be the same non-empty [N, C] shape"
        )
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("y_true must hold only 0/1 labels")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("y_score contains NaN or Inf")
    return y.astype(bool), s


def _predict(s, thresholds):
    """s [N, C] > thresholds (a float or [C]) -> bool [N, C]."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != s.shape[1]):
        raise ValueError(f"thresholds must be a float or an array of {s.shape[1]} per-class values")
    return s > t


def _pos_counts(s_pos, s_neg):
    """s_pos, s_neg: ascending 1-D scores of the positives / negatives. For each positive (same
    order) -> plo, phi: #positives scored < / <= it; nlo, nhi: #negatives scored < / <= it. Ties are
    exact."""
    return (
        np.searchsorted(s_pos, s_pos, "left"),
        np.searchsorted(s_pos, s_pos, "right"),
        np.searchsorted(s_neg, s_pos, "left"),
        np.searchsorted(s_neg, s_pos, "right"),
    )


def _ap_auc(s, y):
    """AP and ROC AUC of 1-D scores s against bool y -> (float, float), nan where undefined.

    AP = mean over positives of the precision at that positive's score (#pos >= s / #all >= s):
    sklearn's step integral over distinct thresholds (a tie group enters at once). AUC = P(s_pos >
    s_neg) + 0.5 P(s_pos == s_neg): sklearn's trapezoid over the ROC curve (a tie group is a
    diagonal segment)."""
    s_pos, s_neg = np.sort(s[y]), np.sort(s[~y])
    P, Nn = s_pos.size, s_neg.size
    plo, _, nlo, nhi = _pos_counts(s_pos, s_neg)
    ap = float(np.mean((P - plo) / (P + Nn - plo - nlo))) if P else float("nan")
    auc = float((nlo + 0.5 * (nhi - nlo)).sum() / (P * Nn)) if P and Nn else float("nan")
    return ap, auc


def _ap_auc_columns(s, y):
    """Per-class AP and AUC -> ([C], [C]): one sort per class column."""
    sT, yT = s.T.copy(), y.T.copy()  # [C, N], contiguous columns
    return np.array([_ap_auc(sT[c], yT[c]) for c in range(s.shape[1])]).reshape(-1, 2).T


def _row_ranks(s, y, chunk=2**15):
    """For every true label (i, j), in np.nonzero(y) order: n_ge = #labels of row i scored >= s_ij
    and pos_ge = #true labels of row i scored >= s_ij (sklearn's rankdata "max" on -score). No sort:
    each positive is compared with its row's C scores, chunked -> (rows [K], n_ge [K], pos_ge
    [K])."""
    r, c = np.nonzero(y)
    n_ge, pos_ge = np.empty(r.size, np.int64), np.empty(r.size, np.int64)
    for k in range(0, r.size, chunk):
        rr, cc = r[k : k + chunk], c[k : k + chunk]
        ge = s[rr] >= s[rr, cc][:, None]  # [chunk, C]
        n_ge[k : k + chunk], pos_ge[k : k + chunk] = ge.sum(1), (ge & y[rr]).sum(1)
    return r, n_ge, pos_ge


def _counts(y, pred):
    """-> tp, fp, fn int64 [C]."""
    return ((y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0))


def _prf(tp, fp, fn):
    """precision, recall, F1 (arrays or scalars), zero_division=0; F1 = 2tp / (2tp + fp + fn) as
    sklearn."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        p, r, f = tp / (tp + fp), tp / (tp + fn), 2 * tp / (2 * tp + fp + fn)
    return tuple(np.nan_to_num(v, nan=0.0) for v in (p, r, f))


def _nanmean(x):
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def compute_all(y_true, y_score, thresholds=0.5):
    """The 15 METRIC_NAMES (floats, in order), then skipped_ap_classes / skipped_auc_classes
    (ints)."""
    y, s = _check(y_true, y_score)
    pred = _predict(s, thresholds)
    ap, auc = _ap_auc_columns(s, y)
    ap_mi, auc_mi = _ap_auc(s.ravel(), y.ravel())  # flattened, as sklearn's micro average
    tp, fp, fn = _counts(y, pred)
    p, r, f = _prf(tp, fp, fn)
    p_mi, r_mi, f_mi = _prf(tp.sum(), fp.sum(), fn.sum())
    img = _per_image(y, s)  # lrap, ranking_loss, coverage_error, mae per image
    out = {
        "mAP_macro": _nanmean(ap),
        "mAP_micro": ap_mi,
        "auc_macro": _nanmean(auc),
        "auc_micro": auc_mi,
        "f1_macro": float(f.mean()),
        "f1_micro": float(f_mi),
        "precision_macro": float(p.mean()),
        "precision_micro": float(p_mi),
        "recall_macro": float(r.mean()),
        "recall_micro": float(r_mi),
        "hamming_loss": float((y != pred).mean()),
        **{k: float(img[k].mean()) for k in ("coverage_error", "ranking_loss", "lrap", "mae")},
    }
    out["skipped_ap_classes"] = int(np.isnan(ap).sum())
    out["skipped_auc_classes"] = int(np.isnan(auc).sum())
    return out


def per_class(y_true, y_score, thresholds=0.5):
    """Per-class arrays [C]: ap (nan without positive), auc (nan without both classes), f1,
    precision, recall (zero_division=0), support, tp, fp, fn (ints)."""
    y, s = _check(y_true, y_score)
    ap, auc = _ap_auc_columns(s, y)
    tp, fp, fn = _counts(y, _predict(s, thresholds))
    p, r, f = _prf(tp, fp, fn)
    return {
        "ap": ap,
        "auc": auc,
        "f1": f,
        "precision": p,
        "recall": r,
        "support": y.sum(0),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def error_analysis(y_true, y_score, thresholds=0.5, top=20):
    """fp / fn counts per class [C], and "confusions": the top (a, b, count) pairs, count = #images
    where true class a was missed AND absent class b was predicted (count desc, then a, b).
    top=None: all pairs with count > 0. "pair_counts" [C, C] holds every count."""
    y, s = _check(y_true, y_score)
    pred = _predict(s, thresholds)
    fn_m, fp_m = (y & ~pred).astype(np.float64), (~y & pred).astype(np.float64)
    pairs = np.rint(fn_m.T @ fp_m).astype(np.int64)  # [C, C], exact: counts << 2**53
    a, b = np.nonzero(pairs)
    cnt = pairs[a, b]
    order = np.lexsort((b, a, -cnt))[:top]
    return {
        "fp": fp_m.sum(0).astype(np.int64),
        "fn": fn_m.sum(0).astype(np.int64),
        "pair_counts": pairs,
        "confusions": [(int(a[i]), int(b[i]), int(cnt[i])) for i in order],
    }


def best_f1_thresholds(y_true, y_score):
    """Per-class thresholds [C] (float64) maximising F1 of (score > threshold), exactly, over all
    distinct scores (the optimum always admits a tie group holding a positive, so those are the
    candidates). The threshold lies midway between the lowest score to predict positive and the next
    lower distinct score (just below the minimum when every image is predicted); if the midpoint is
    not strictly between them in the scores' dtype it is the lower score itself, so float32 and
    float64 comparisons agree. Equal best F1: the highest threshold wins. Classes with no positive
    get 0.5."""
    y, s = _check(y_true, y_score)
    dt = np.asarray(y_score).dtype
    dt = dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)
    thr = np.full(y.shape[1], 0.5)
    for c in range(y.shape[1]):
        s_pos, s_neg = np.sort(s[y[:, c], c]), np.sort(s[~y[:, c], c])
        P = s_pos.size
        if P == 0:
            continue
        plo, _, nlo, _ = _pos_counts(s_pos, s_neg)
        f1 = 2.0 * (P - plo) / ((P - plo) + (s_neg.size - nlo) + P)  # predict all >= s_pos[j]
        j = P - 1 - int(np.argmax(f1[::-1]))  # the last best in ascending order: highest threshold
        best, lower = s_pos[j], -np.inf
        if plo[j] > 0:
            lower = s_pos[plo[j] - 1]
        if nlo[j] > 0:
            lower = max(lower, s_neg[nlo[j] - 1])
        if lower == -np.inf:  # every image is predicted positive
            lower = float(np.nextafter(dt.type(best), dt.type(-np.inf)))
        mid = dt.type((best + lower) / 2)
        thr[c] = float(mid) if dt.type(lower) < mid < dt.type(best) else lower
    return thr


def _interval_layout(y, s):
    """Bootstrap bookkeeping: per class c with m >= 1 distinct positive scores u_1 < ... < u_m, the
    images fall in rows base_c + [0, 2m]: negatives scored < u_1, = u_1, in (u_1, u_2), ..., = u_m,
    > u_m, and base_c + 2m + 1 + k: positives scored = u_k. -> (csr 0/1 matrix [R, N] that sums
    image weights into those rows, blocks: list per class of (base_c, m) or None without
    positives)."""
    N, C = y.shape
    rows, cols, blocks, base = [], [], [], 0
    for c in range(C):
        u = np.unique(s[y[:, c], c])
        m = u.size
        if m == 0:
            blocks.append(None)
            continue
        k = np.searchsorted(u, s[:, c])  # distinct positive scores below each image's score, [N]
        eq = u[np.minimum(k, m - 1)] == s[:, c]
        rows.append(base + np.where(y[:, c], 2 * m + 1 + k, 2 * k + eq))
        cols.append(np.arange(N))
        blocks.append((base, m))
        base += 3 * m + 1
    rows, cols = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in (rows, cols))
    return sparse.csr_array((np.ones(rows.size, np.float32), (rows, cols)), shape=(base, N)), blocks


def _weighted_ap_auc(layout, W):
    """AP and AUC per class for many resamples at once. layout from _interval_layout(y, s), W [N, B]
    image multiplicities -> (ap [B, C], auc [B, C]), nan where undefined: identical to the metrics
    of the resampled images (the copies of an image tie, and ties only ever matter through these
    sums)."""
    mat, blocks = layout
    # [R, B] weight per (class, score interval); float32 counts are exact
    V = (mat @ W).astype(np.float64)
    ap, auc = np.full((W.shape[1], len(blocks)), np.nan), np.full((W.shape[1], len(blocks)), np.nan)
    for c, blk in enumerate(blocks):
        if blk is None:
            continue
        base, m = blk
        # [2m+1, B] negative weight per interval, [m, B] positive weight per score
        neg, pos = V[base : base + 2 * m + 1], V[base + 2 * m + 1 : base + 3 * m + 1]
        wneg, wpos = neg.sum(0), pos.sum(0)  # [B]
        neg_below = np.cumsum(neg, 0)[0 : 2 * m : 2]  # negative weight scored < u_k, [m, B]
        neg_eq = neg[1::2]  # negative weight scored = u_k
        pos_ge = np.cumsum(pos[::-1], 0)[::-1]  # positive weight scored >= u_k
        all_ge = pos_ge + wneg - neg_below
        with np.errstate(divide="ignore", invalid="ignore"):
            ap[:, c] = (pos * pos_ge / np.where(all_ge > 0, all_ge, 1)).sum(0) / wpos
            auc[:, c] = (pos * (neg_below + 0.5 * neg_eq)).sum(0) / (wpos * wneg)
    return ap, auc


def _micro_layout(y, s):
    """_interval_layout of the flattened [N * C] scores (sklearn's micro average), its columns
    summed per image -> (csr [R, N], blocks): a resample weights every label of an image by that
    image's multiplicity."""
    N, C = y.shape
    mat, blocks = _interval_layout(y.reshape(-1, 1), s.reshape(-1, 1))
    to_image = sparse.csr_array(
        (np.ones(N * C, np.float32), (np.arange(N * C), np.repeat(np.arange(N), C))),
        shape=(N * C, N),
    )
    return (mat @ to_image).tocsr(), blocks  # counts <= C: exact in float32


def _per_image(y, s):
    """Per-image terms whose mean over the images is compute_all's lrap, ranking_loss,
    coverage_error and mae, so a bootstrap resample's value is their weighted mean -> {name: float64
    [N]}."""
    N, C = y.shape
    rows, n_ge, pos_ge = _row_ranks(s, y)
    P = y.sum(1)
    undefined = (P == 0) | (P == C)
    with np.errstate(divide="ignore", invalid="ignore"):
        # LRAP: mean over a row's true labels of pos_ge / n_ge; 1.0 where undefined (sklearn)
        lrap = np.bincount(rows, pos_ge / n_ge, minlength=N) / P
        # ranking loss: (true, false) pairs with s_false >= s_true, ties count as errors (sklearn)
        rloss = np.bincount(rows, n_ge - pos_ge, minlength=N) / (P * (C - P))
    lrap[undefined], rloss[undefined] = 1.0, 0.0
    min_pos = np.where(y, s, np.inf).min(1, keepdims=True)  # lowest-scored true label, [N, 1]
    coverage = np.where(P > 0, (s >= min_pos).sum(1), 0).astype(np.float64)
    return {
        "lrap": lrap,
        "ranking_loss": rloss,
        "coverage_error": coverage,
        "mae": np.abs(s - y).mean(1),
    }


def _macro_of_defined(v):
    """[B, C] with nan for classes undefined in a draw -> [B]: the mean over the defined ones (nan
    if none)."""
    n_ok = (~np.isnan(v)).sum(1)
    return np.where(n_ok > 0, np.nansum(v, 1) / np.maximum(n_ok, 1), np.nan)


def _draw_metrics(y, s, pred, layouts, W, names):
    """Every requested metric of one score array under image weights W [N, B] (a resample's
    multiplicities, or a jackknife's 0/1) -> {name: [B]}."""
    C = y.shape[1]
    out = {}
    if layouts:
        for kind, lay in zip(("macro", "micro"), layouts):
            ap, auc = _weighted_ap_auc(lay, W)  # [B, C] (macro) or [B, 1] (micro)
            agg = _macro_of_defined if kind == "macro" else (lambda v: v[:, 0])
            out[f"mAP_{kind}"], out[f"auc_{kind}"] = agg(ap), agg(auc)
    yf = y.astype(np.float32)
    # [B, C] exact counts
    tp, fp, fn = (np.float64(W.T @ m) for m in (yf * pred, (1 - yf) * pred, yf * (1 - pred)))
    for kind, (p, r, f) in (
        ("macro", _prf(tp, fp, fn)),
        ("micro", _prf(tp.sum(1), fp.sum(1), fn.sum(1))),
    ):
        agg = (lambda v: v.mean(1)) if kind == "macro" else (lambda v: v)
        out.update({f"precision_{kind}": agg(p), f"recall_{kind}": agg(r), f"f1_{kind}": agg(f)})
    n = W.sum(0, dtype=np.float64)  # images per draw: N for a resample, fewer for a jackknife
    with np.errstate(divide="ignore", invalid="ignore"):
        out["hamming_loss"] = (fp + fn).sum(1) / (n * C)
        for k, v in _per_image(y, s).items():
            out[k] = (v @ W) / n
    return {k: out[k] for k in names}


def _evaluate(y, scores, thresholds, names, parts, max_elems=2**23):
    """names' values of every score array under image weightings -> one {name: [len(scores), n]}
    per (n, weights) in parts; weights(b0, B) -> W [N, B] float32 gives columns b0 .. b0 + B - 1,
    asked for in order. The layouts are built once, for all parts."""
    bad = [k for k in names if k not in METRIC_NAMES]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {METRIC_NAMES}")
    preds = [_predict(s, thresholds).astype(np.float32) for s in scores]
    ranked = {"mAP_macro", "auc_macro", "mAP_micro", "auc_micro"} & set(names)
    layouts = [(_interval_layout(y, s), _micro_layout(y, s)) if ranked else None for s in scores]
    rows = max([y.shape[0]] + [lay[0].shape[0] for pair in layouts if pair for lay in pair])
    outs = []
    for n, weights in parts:
        out = {k: np.zeros((len(scores), n)) for k in names}
        chunk = max(1, min(n, max_elems // rows))
        for b0 in range(0, n, chunk):
            W = weights(b0, min(chunk, n - b0))
            for i, s in enumerate(scores):
                for k, v in _draw_metrics(y, s, preds[i], layouts[i], W, names).items():
                    out[k][i, b0 : b0 + W.shape[1]] = v
        outs.append(out)
    return outs


def _resampler(N, seed):
    """weights(b0, B) for _evaluate: the next B resamples of N images (multiplicities [N, B]), all
    from one generator: draw b is the same whatever the chunk size."""
    rng = np.random.default_rng(seed)

    def weights(b0, B):
        idx = rng.integers(0, N, size=(B, N)) + N * np.arange(B)[:, None]  # B resamples of N images
        counts = np.bincount(idx.ravel(), minlength=B * N).reshape(B, N)
        return np.ascontiguousarray(counts.T, np.float32)

    return weights


def _jackknife_groups(N, seed, blocks):
    """Image -> jackknife group [N]: leave-one-out (group i = image i) when N <= blocks, else
    `blocks` groups of a fixed random permutation of the images (sizes differ by at most one)."""
    if N <= blocks:
        return np.arange(N)
    group = np.empty(N, np.int64)
    group[np.random.default_rng([seed, 1]).permutation(N)] = np.arange(N) % blocks
    return group


def _boot_draws(y, scores, thresholds, n_boot, seed, names, max_elems=2**23, jackknife=0):
    """names' values on n_boot image resamples shared by every score array -> {name:
    [len(scores), n_boot]}. One generator makes the resamples, so every array (every row of a table)
    sees the same draws. jackknife=blocks (> 0): (those, {name: [len(scores), G]}), the values with
    each _jackknife_groups(N, seed, blocks) group left out in turn."""
    N, names = y.shape[0], tuple(names)
    parts = [(n_boot, _resampler(N, seed))]
    if jackknife:
        group = _jackknife_groups(N, seed, jackknife)
        parts.append(
            (
                int(group.max()) + 1,
                lambda b0, B: (group[:, None] != np.arange(b0, b0 + B)).astype(np.float32),
            )
        )
    outs = _evaluate(y, scores, thresholds, names, parts, max_elems)
    return tuple(outs) if jackknife else outs[0]


def _level_of(v, x):
    """Fraction of the draws v below x, ties (within 1e-12 relative) counted half, as scipy."""
    tie = 1e-12 * max(1.0, abs(x))
    return (np.count_nonzero(v < x - tie) + np.count_nonzero(v <= x + tie)) / (2 * v.size)


def _bca_z0_a(point, v, jack, alpha):
    """BCa's bias correction z0 = Phi^-1(_level_of(v, point)), clipped to +-z_{1-alpha/2}, and
    acceleration a = sum u^3 / (6 (sum u^2)^1.5), u = mean(jack) - jack over the defined jackknife
    values (a = 0 when they are all equal) -> (z0, a)."""
    z = ndtri(1 - alpha / 2)
    u = jack[~np.isnan(jack)]
    u = u.mean() - u if u.size else u
    ss = float((u**2).sum())
    a = float((u**3).sum()) / (6 * ss**1.5) if ss > 0 else 0.0
    return float(np.clip(ndtri(_level_of(v, point)), -z, z)), a


def _bca_level(z0, a, z):
    """The quantile level of the draws at which BCa puts the end for the normal quantile z."""
    w = z0 + z
    d = 1 - a * w  # |a| <= 1/6 and |w| <= 2 z: d > 0 for alpha > 0.003; else the limit
    return float(ndtr(z0 + w / d)) if d > 0 else float(w > 0)


def _bca(point, draws, jack, alpha):
    """(low, high): the BCa interval of point from its draws [B] and jackknife values [G] (nan:
    undefined, left out), extended to point if it still misses it; (nan, nan) without a defined
    draw or point."""
    v = draws[~np.isnan(draws)]
    if not np.isfinite(point) or v.size == 0:
        return float("nan"), float("nan")
    z0, a = _bca_z0_a(point, v, jack, alpha)
    z = ndtri(1 - alpha / 2)
    lo, hi = np.quantile(v, [_bca_level(z0, a, -z), _bca_level(z0, a, z)])  # linear, as scipy
    return float(min(lo, point)), float(max(hi, point))


def interval_rule(n_boot, alpha=0.05, n_images=None, blocks=None):
    """How bootstrap_intervals / paired_bootstrap make every interval, for metrics.json -> dict."""
    out = {"method": "BCa", "level": round(1 - alpha, 10), "resamples": int(n_boot)}
    out["resampled"] = "images (all labels of an image together)"
    if n_images is not None:
        b = JACKKNIFE_BLOCKS if blocks is None else blocks
        out["jackknife"] = "leave-one-out" if n_images <= b else f"{b} blocks of images"
    return out


def interval_text(n_boot, alpha=0.05):
    """The rule in words, for captions: "95% BCa bootstrap interval, 1000 resamples of the
    images"."""
    return f"{100 * (1 - alpha):g}% BCa bootstrap interval, {n_boot} resamples of the images"


def bootstrap_intervals(
    y_true,
    scores,
    n_boot=1000,
    seed=0,
    alpha=0.05,
    thresholds=0.5,
    names=METRIC_NAMES,
    blocks=JACKKNIFE_BLOCKS,
):
    """BCa bootstrap intervals over images for several score arrays on the SAME resamples (rows of
    one table stay comparable) -> one {name: (point, low, high)} per array. point = compute_all on
    all images; a draw's macro runs over the classes defined in that draw; draws (and jackknife
    values) where a metric is undefined are left out.

    The rule (interval_rule; Efron 1987, as scipy.stats.bootstrap(method="BCa"), equal to it given
    the same draws and leave-one-out): low, high = the draws' quantiles (linear interpolation) at
    levels Phi(z0 + w / (1 - a w)), w = z0 -+ z_{1-alpha/2}, with z0 and a from _bca_z0_a. The
    jackknife leaves out one image at a time when N <= blocks, else one of `blocks` fixed random
    blocks of images at a time (a grouped jackknife: `blocks` more evaluations instead of N; its a
    estimates the same skewness). So that low <= point <= high for every finite point: z0 is
    clipped to +-z_{1-alpha/2} (a small set's AP can lie below 97.5% of its draws, where BCa, like
    the percentile interval, would exclude it), and an interval that still misses point (point
    outside the draws' range, or interpolation) is extended to it. No defined draw: (nan, nan)."""
    y = _check(y_true, scores[0])[0]
    ss = [_check(y_true, s)[1] for s in scores]
    draws, jack = _boot_draws(y, ss, thresholds, n_boot, seed, names, jackknife=blocks)
    out = []
    for i, s in enumerate(ss):
        point = compute_all(y, s, thresholds)
        out.append({k: (point[k], *_bca(point[k], draws[k][i], jack[k][i], alpha)) for k in names})
    return out


def bootstrap_ci(
    y_true, y_score, n_boot=1000, seed=0, alpha=0.05, thresholds=0.5, names=BOOT_METRICS
):
    """One score array: bootstrap_intervals(...)[0]; names default to BOOT_METRICS
    (metrics.METRIC_NAMES: all 15)."""
    return bootstrap_intervals(y_true, [y_score], n_boot, seed, alpha, thresholds, names)[0]


def _quantile_level(v, x):
    """The level L at which np.quantile(v, L) (linear interpolation) reaches x: the middle of the
    levels where draws tie at x, 0 / 1 beyond the draws."""
    v = np.sort(v)
    k, j = np.searchsorted(v, x, "left"), np.searchsorted(v, x, "right")
    if j > k:  # draws k .. j - 1 equal x
        return (k + j - 1) / 2 / (v.size - 1) if v.size > 1 else 0.5
    if k in (0, v.size):
        return float(k > 0)
    return (k - 1 + (x - v[k - 1]) / (v[k] - v[k - 1])) / (v.size - 1)


def _bca_p(point, draws, jack, alpha):
    """Two-sided p of "the statistic is 0", the BCa interval inverted: twice the one-sided level at
    which an end reaches 0 (same z0 and a as _bca), so p < alpha exactly when the level-(1 - alpha)
    interval excludes 0 (but where draws tie at 0, or the estimate lies beyond every draw on the
    other side of 0). At least 1 / (B + 1), the resolution of B draws; 1.0 when point is 0."""
    v = draws[~np.isnan(draws)]
    if point == 0 or not np.isfinite(point) or v.size == 0:
        return 1.0
    z0, a = _bca_z0_a(point, v, jack, alpha)
    q = _quantile_level(v, 0.0)
    t = ndtri(q) - z0  # = w / (1 - a w) at the end that reaches 0; -+inf beyond the draws
    beta = float(ndtr(t / (1 + a * t) - z0)) if 0 < q < 1 and 1 + a * t > 0 else float(t > 0)
    return min(1.0, max(2 * min(beta, 1 - beta), 1 / (v.size + 1)))


def paired_bootstrap(
    y_true, score_a, score_b, n_boot=1000, seed=0, metric="mAP_macro", alpha=0.05, thresholds=0.5
):
    """Is b better than a on the same images? d = metric(b) - metric(a), both scored on each of the
    same image resamples as bootstrap_intervals (same seed: the same draws) and on the same
    jackknife groups; low, high: d's BCa interval, the rule of bootstrap_intervals; p: two-sided,
    of "b and a score the same", the BCa interval inverted (p < alpha when the interval excludes
    0, exceptions in _bca_p; 1.0 when d = 0). metric: BOOT_METRICS. -> {diff: d on all images,
    mean_diff: mean over draws, low, high, p, n_boot, interval: the rule's name}."""
    if metric not in BOOT_METRICS:
        raise ValueError(f"metric must be one of {BOOT_METRICS}, got {metric!r}")
    y, sa = _check(y_true, score_a)
    _, sb = _check(y_true, score_b)
    diff = compute_all(y, sb, thresholds)[metric] - compute_all(y, sa, thresholds)[metric]
    draws, jack = _boot_draws(
        y, [sa, sb], thresholds, n_boot, seed, (metric,), jackknife=JACKKNIFE_BLOCKS
    )
    d, dj = draws[metric][1] - draws[metric][0], jack[metric][1] - jack[metric][0]  # b - a
    low, high = _bca(diff, d, dj, alpha)
    return {
        "diff": float(diff),
        "mean_diff": float(np.nanmean(d)),
        "low": low,
        "high": high,
        "p": _bca_p(diff, d, dj, alpha),
        "n_boot": int(n_boot),
        "interval": "BCa",
    }


def paired_test(a, b):
    """Paired t-test across folds of d = b - a (so a positive mean_diff means b is better); t and p
    equal scipy.stats.ttest_rel(b, a) (two-sided). -> {mean_diff, std_diff (ddof=1), t, p, n}."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(
            f"paired_test needs two equal-length sequences of >= 2 values, got {a.size} and "
            f"{b.size}"
        )
    d = b - a
    n, mean, std = d.size, float(d.mean()), float(d.std(ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        # +-inf (p 0) or nan when the folds agree exactly
        t = float(np.float64(mean) / (std / np.sqrt(n)))
    p = float(2 * stdtr(n - 1, -abs(t)))
    return {"mean_diff": mean, "std_diff": std, "t": t, "p": p, "n": int(n)}

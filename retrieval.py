"""Hashing-retrieval mAP of a Hamming ranking, as the hashing literature reports it: numpy in, a
float out. Imports nothing local: copy it as it is.

    import retrieval
    # DeepHash-pytorch's rule
    retrieval.retrieval_map(q_codes, q_labels, db_codes, db_labels, k=5000)
    # HashNet's, ties in expectation
    retrieval.retrieval_map(q_codes, q_labels, db_codes, db_labels, k=5000, empty="skip",
                            ties="average")
"""

import numpy as np
from scipy.special import gammaln  # log-gamma: hypergeometric weights of a tie group cut by k


def _bitsets(b):
    """bool [R, n] -> uint64 [R, ceil(n / 64)] words, bit j of a row in word j // 64
    (little-endian)."""
    b = np.pad(b, ((0, 0), (0, -b.shape[1] % 64)))
    return np.ascontiguousarray(np.packbits(b, axis=1, bitorder="little")).view(np.uint64)


def _hamming(qw, dw, dtype):
    """qw (q, W), dw (W, N) packed sign bits -> (q, N) Hamming distances: popcount of the xor, word
    by word."""
    buf, dist = (
        np.empty((qw.shape[0], dw.shape[1]), np.uint64),
        np.empty((qw.shape[0], dw.shape[1]), dtype),
    )
    np.bitwise_count(np.bitwise_xor(qw[:, :1], dw[0], out=buf), out=dist)  # out=: no temporaries
    for w in range(1, dw.shape[0]):
        dist += np.bitwise_count(np.bitwise_xor(qw[:, w : w + 1], dw[w], out=buf))
    return dist


def _stable_ap(dist, rel, k):
    """Ties in db order. dist, rel (q, N) -> (AP@k [q], 1.0 where a relevant item is in the top k
    else 0.0)."""
    ap, kept = np.zeros(dist.shape[0]), np.zeros(dist.shape[0])
    # one row at a time: numpy's radix argsort is faster on one row than along axis 1
    for i in range(dist.shape[0]):
        d, r = dist[i], rel[i]
        if k < d.size:  # only items no farther than the k-th nearest can be in the top k
            near = np.flatnonzero(d <= np.searchsorted(np.cumsum(np.bincount(d)), k))
            d, r = d[near], r[near]
        rank = np.flatnonzero(r[np.argsort(d, kind="stable")[:k]]) + 1.0  # of the relevant items
        ap[i], kept[i] = (
            (np.arange(1, rank.size + 1) / rank).sum() / max(rank.size, 1),
            rank.size > 0,
        )
    return ap, kept


def _gain(S, H, n, m, hn):
    """E[sum of precision@r over the relevant ranks r] of n items (m relevant, in uniformly random
    order) ranked after S items (H relevant); hn[i] = 1 + 1/2 + ... + 1/i. Arrays broadcast."""
    a = hn[S + n] - hn[S]  # sum_{t=1..n} 1 / (S + t)
    return m / np.maximum(n, 1) * ((H + 1) * a + (m - 1) / np.maximum(n - 1, 1) * (n - (S + 1) * a))


def _tie_average_ap(n, m, k, max_elems):
    """n, m (Q, G): items / relevant items at each Hamming distance -> (E[AP@k] [Q], P(R_k > 0)
    [Q])."""
    N = int(n.sum(1).max())
    hn = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, N + 1))])  # harmonic numbers
    lf = gammaln(np.arange(N + 1) + 1.0)  # log i!
    S, H = np.cumsum(n, 1) - n, np.cumsum(m, 1) - m  # items / relevant ranked before each group
    full = S + n <= k
    # H: relevant before the cut group
    F, H = (_gain(S, H, n, m, hn) * full).sum(1), (m * full).sum(1)
    cut = (S < k) & (S + n > k)  # the group straddling rank k, if any: t places in the top k
    r, c, hc = np.arange(len(n)), cut.argmax(1), cut.any(1)
    n, m, t = (np.where(hc, v[r, c], 0) for v in (n, m, k - S))  # no cut group: t = 0, x = 0 below
    S = k - t
    lo, hi = np.maximum(0, t - (n - m)), np.minimum(m, t)  # support of X ~ Hypergeom(n, m, t)
    x = lo[:, None] + np.arange((hi - lo).max() + 1)  # (Q, L) cut group's relevant in the top k
    ap, kept, step = np.zeros(len(n)), np.ones(len(n)), max(1, max_elems // x.shape[1])
    for q in range(0, len(n), step):
        s = slice(q, q + step)
        ns, ms, ts, Hs = (v[s, None] for v in (n, m, t, H))
        xs, ok = np.minimum(x[s], hi[s, None]), x[s] <= hi[s, None]
        # log P(X = x) + a row constant
        lp = -(lf[xs] + lf[ms - xs] + lf[ts - xs] + lf[ns - ms - ts + xs])
        p = np.where(ok, np.exp(lp - lp.max(1, keepdims=True)), 0.0)
        p /= p.sum(1, keepdims=True)
        num, den = F[s, None] + _gain(S[s, None], Hs, ts, xs, hn), Hs + xs
        ap[s] = (p * np.divide(num, den, out=np.zeros(den.shape), where=den > 0)).sum(1)
        kept[s] = np.where((H[s] == 0) & (lo[s] == 0), 1.0 - p[:, 0], 1.0)  # R_k = 0 iff H = X = 0
    return ap, kept


def _skip_mean(ap, kept):
    """Mean AP over the queries with a relevant item in the top k, each kept independently with
    probability kept[q]: E[sum_q AP_q / K | K > 0] = sum_q E[AP_q] E[1 / (1 + K_-q)] / P(K > 0),
    where K_-q, the number of other queries kept, is Poisson-binomial (exact in O(U^2) for the U
    queries with 0 < kept < 1)."""
    sure, unc = kept >= 1, (kept > 0) & (kept < 1)
    D, p, U = int(sure.sum()), kept[unc], int(unc.sum())
    if D + U == 0:
        return float("nan")
    pmf = np.ones(1)  # distribution of the number of uncertain queries kept, [U + 1]
    for pu in p:
        pmf = np.append(pmf * (1 - pu), 0.0) + np.append(0.0, pmf * pu)
    g = np.zeros(kept.size)
    g[sure] = (pmf / (D + np.arange(U + 1))).sum() if D else 0.0
    # uncertain q: deconvolve [1 - p_q, p_q] out of pmf from the end where p_q <= 1/2, so errors
    # shrink
    flip = p > 0.5
    pp, a, acc = np.where(flip, 1 - p, p), np.zeros(U), np.zeros(U)
    for j in range(U):
        # P(K_-q = j), or = U - 1 - j if flipped
        a = (np.where(flip, pmf[U - j], pmf[j]) - pp * a) / (1 - pp)
        acc += a / (1 + D + np.where(flip, U - 1 - j, j))
    g[unc] = acc
    return float((ap * g).sum() / (1.0 - np.prod(1.0 - kept)))


def _checked(query_codes, query_labels, db_codes, db_labels):
    """The inputs as sign bits and label sets (bool arrays), or ValueError in one line: unsigned
    codes, shapes that do not match, an empty side."""
    if any(np.asarray(c).dtype.kind in "bu" for c in (query_codes, db_codes)):
        raise ValueError(
            "codes must be signed ({-1,+1} or real); convert {0,1} codes with 2 * b - 1"
        )
    qc, dc = (np.asarray(c) >= 0 for c in (query_codes, db_codes))
    ql, dl = (np.asarray(v) != 0 for v in (query_labels, db_labels))
    if (
        qc.ndim != 2
        or dc.ndim != 2
        or qc.shape[1] != dc.shape[1]
        or ql.shape[0] != qc.shape[0]
        or dl.shape[0] != dc.shape[0]
        or ql.shape[1] != dl.shape[1]
        or 0 in (qc.shape[0], dc.shape[0])
    ):
        raise ValueError(
            f"shape mismatch: query codes {qc.shape}, labels {ql.shape}; db codes {dc.shape}, "
            f"labels {dl.shape}"
        )
    return qc, ql, dc, dl


def retrieval_map(
    query_codes,
    query_labels,
    db_codes,
    db_labels,
    k=None,
    ties="stable",
    empty="zero",
    max_elems=2**23,
):
    """Hashing-retrieval mAP@k of a Hamming ranking (k None, or larger than the database: all of
    it).

    Codes: {-1,+1} or real, binarised by sign (0 counts as +1); bool / unsigned {0,1} codes are
    refused (convert them with 2 * b - 1). Labels: 0/1 [Q, C] and [N, C]; a db item is relevant to a
    query when they share >= 1 label. AP@k of a query = (1/R_k) sum over relevant items at rank r <=
    k of precision@r, R_k = #relevant items in the top k (DeepHash-pytorch's CalcTopMap, HashNet's
    mean_average_precision). empty="zero": a query with R_k = 0 scores 0 (CalcTopMap); "skip": it is
    left out of the mean (HashNet; nan if every query is). ties="stable": equal distances keep db
    order. ties="average": the exact expectation when each query's tied items are shuffled uniformly
    (independently per query). A group of n items (m relevant) after S items (H relevant) puts a
    relevant item at its place t with probability m/n, with (t-1)(m-1)/(n-1) other relevant ones
    before it on average, so it adds g(S,H,n,m) = (m/n)[(H+1)A + (m-1)/(n-1) (n - (S+1)A)], A =
    sum_{t=1..n} 1/(S+t), to the precision sum. The group cut by k, with t = k - S places in the top
    k, brings X ~ Hypergeom(n, m, t) relevant items placed uniformly among them: E[AP] = sum_x
    P(X=x) (F + g(S,H,t,x)) / (H+x), F = sum of g over the groups wholly in the top k; with "skip",
    a query is kept with probability P(H + X > 0) (see _skip_mean). Distances are popcounts of
    packed sign bits and relevance a bitset OR over the query's labels, at most ~max_elems (query,
    db) pairs at a time: 5,000 x 117,218 x 64 bits in ~2-4 s on 2 CPU cores."""
    if ties not in ("stable", "average") or empty not in ("zero", "skip"):
        raise ValueError(
            f"ties must be 'stable' or 'average', empty 'zero' or 'skip'; got {ties!r}, {empty!r}"
        )
    qc, ql, dc, dl = _checked(query_codes, query_labels, db_codes, db_labels)
    if k is not None and int(k) < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    (Q, bits), N, C = qc.shape, dc.shape[0], ql.shape[1]
    k = N if k is None else min(int(k), N)
    qw, dw = _bitsets(qc), _bitsets(dc).T.copy()  # (Q, W), (W, N) uint64 words of sign bits
    has = _bitsets(np.vstack([dl.T, np.zeros((1, N), bool)]))  # (C + 1, W): db items per label
    order = np.argsort(~ql, axis=1, kind="stable")[:, : max(1, ql.sum(1).max())]
    # (Q, L) each query's labels, padded with C
    labs = np.where(np.take_along_axis(ql, order, 1), order, C)
    dtype = np.uint8 if 2 * bits + 1 < 256 else np.uint16
    ap, kept, counts = np.zeros(Q), np.zeros(Q), np.zeros((Q, bits + 1, 2), np.int64)
    step = max(1, max_elems // N)
    for q in range(0, Q, step):
        s = slice(q, q + step)
        dist = _hamming(qw[s], dw, dtype)  # (q, N)
        rel = np.unpackbits(
            np.bitwise_or.reduce(has[labs[s]], axis=1).view(np.uint8),
            axis=1,
            count=N,
            bitorder="little",
        ).view(bool)  # (q, N): shares >= 1 label
        if ties == "stable":
            ap[s], kept[s] = _stable_ap(dist, rel, k)
        else:  # per-row bincount of 2 * distance + relevant: (q, bits + 1, [other, relevant])
            key = dist * dtype(2) + rel
            counts[s] = np.stack([np.bincount(row, minlength=2 * bits + 2) for row in key]).reshape(
                -1, bits + 1, 2
            )
    if ties == "average":
        ap, kept = _tie_average_ap(counts.sum(2), counts[:, :, 1], k, max_elems)
    return float(ap.mean()) if empty == "zero" else _skip_mean(ap, kept)


def retrieval_maps(q_codes, q_labels, db_codes, db_labels, k):
    """mAP@k and mAP@all under both empty-query rules and both tie rules -> {"mAP@k": zero/stable,
    "mAP@k_skip", "mAP@k_avgties", "mAP@k_skip_avgties", "mAP@all", ...}: every way the literature
    counts."""
    out = {}
    for top in (k, None):
        for empty in ("zero", "skip"):
            for ties in ("stable", "average"):
                name = (
                    f"mAP@{top or 'all'}"
                    + ("" if empty == "zero" else "_skip")
                    + ("" if ties == "stable" else "_avgties")
                )
                out[name] = retrieval_map(
                    q_codes, q_labels, db_codes, db_labels, k=top, ties=ties, empty=empty
                )
    return out

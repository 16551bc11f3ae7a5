"""
The KNN head: an exact Hamming-KNN vote over a database of binary codes, as a readable reference (a
chunked matmul + topk, as DINO's knn_classifier). Imports only torch: copy it as it is.

    scores = knn.knn_scores(query_codes, db_codes, db_labels)   # (Q, C) in [0, 1]; k 100
    codes = knn.sign_codes(h)                                   # {-1, +1}, 0 -> +1
"""

import torch

KNN_VOTES = ("softmax", "uniform", "rank")
KNN_QUERIES = ("real", "sign")
CHUNK_PRODUCTS = {False: 2**23, True: 2**26}  # similarities per chunk: CPU, CUDA (measured)


def exact_queries(x):
    """Real-valued query codes (Q, bits) -> float32 codes on which every product with +-1 codes is
    exact in float32: each row scaled by a power of two to max |q_j| < 1 (exact; rankings and
    knn_scores' similarities do not change), then rounded to a multiple of 2^-s with s = 23 -
    bit_length(2 * bits), so every partial sum of q.d + |q|_1 (magnitude < 2 * bits) fits float32's
    24-bit mantissa. The rounding moves a code by < 2^-15 at 64 bits; in exchange the search is
    exact and the same for any chunk, BLAS or device."""
    x = torch.as_tensor(x).float()
    s = 23 - (2 * x.shape[-1]).bit_length()
    _, e = torch.frexp(
        x.abs().amax(-1, keepdim=True)
    )  # max |q| = m * 2^e, 0.5 <= m < 1 (e = 0 for a zero row)
    return torch.round(torch.ldexp(x, s - e)) / 2.0**s


def sign_codes(x):
    """Real or {-1, +1} codes (N, bits) -> float32 {-1, +1}; 0 counts as +1 (the h > 0 rule, ties
    up)."""
    x = torch.as_tensor(x)
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def nearest(dot, k):
    """dot (c, N) exact similarities -> (c, k) database rows, nearest first, equal similarities
    lower index first (so any chunk, BLAS or device picks the same neighbours). Each row's 2k + 1
    largest are its candidates; when the last of them is below the k-th similarity, every row equal
    to it is among them, and the first k candidates by similarity, lower index first, are the
    answer. In a row whose candidates end on a tie with the k-th (it may go on past them): every
    row above the k-th similarity is in, and of those equal to it the lowest indices fill the
    places left (one pass over that row)."""
    n = dot.shape[1]
    vals, idx = dot.topk(min(2 * k + 1, n), dim=1)  # (c, m) candidates
    idx = order(dot, idx)[:, :k]
    if vals.shape[1] < n:
        tied = vals[:, -1] == vals[:, k - 1]  # (c,) the tie may go past the candidates
        if tied.any():
            d = dot[tied]  # (t, N)
            top, kth = vals[tied, :k], vals[tied, k - 1 : k]  # (t, k), (t, 1)
            left = k - (top > kth).sum(1, keepdim=True)  # (t, 1) places for the equal ones
            equal = d == kth
            take = (d > kth) | (equal & (equal.cumsum(1, dtype=torch.int32) <= left))  # k per row
            idx[tied] = order(d, take.nonzero()[:, 1].view(-1, k))
    return idx


def order(dot, idx):
    """Rows idx (c, m) of dot (c, N) -> the same rows by similarity, lower index first."""
    idx = idx.sort(dim=1).values  # index order, then a stable sort by similarity
    return idx.gather(1, dot.gather(1, idx).sort(dim=1, descending=True, stable=True).indices)


def knn_scores(
    query_codes, db_codes, db_labels, k=100, tau=0.07, vote="softmax", query="real", chunk=None
):
    """Hamming-KNN multi-label scores: query_codes (Q, bits), db_codes (N, bits), db_labels (N, C)
    -> (Q, C).

    Database codes are binarised with sign (0 -> +1). query "sign" binarises the queries too:
    similarity = 1 - hamming / bits. query "real" (the default) keeps each query's real-valued code
    q against the binary database, a Hamming distance whose bits weigh |q_j|: similarity = (1 + q.d
    / |q|_1) / 2 (= 1 - hamming / bits again for a +-1 query). Each query takes its k nearest
    database codes (k > N clamps to N) and they vote: "softmax" softmax(sim / tau), "uniform" 1/k,
    "rank" 1/rank normalised to sum 1. score[q, c] = sum of the weights of the neighbours with label
    c, in [0, 1]. Exact and deterministic: products of +-1 codes with exact_queries' grid are exact
    in float32 (unless a reduced-precision matmul mode such as TF32 is on), and equal similarities
    go to the lower database index first (nearest). Nothing is excluded: a database that holds the
    queries finds them. Queries run in chunks of `chunk` rows (None: CHUNK_PRODUCTS // N, measured
    in docs/BENCHMARKS.md), so memory stays bounded; runs on the device of query_codes and returns
    float32 there.
    """
    if vote not in KNN_VOTES or query not in KNN_QUERIES:
        raise ValueError(
            f"vote must be one of {KNN_VOTES} and query one of {KNN_QUERIES}, "
            f"got {vote!r}, {query!r}"
        )
    if k < 1 or tau <= 0:
        raise ValueError(f"need k >= 1 and tau > 0, got k={k}, tau={tau}")
    q = sign_codes(query_codes) if query == "sign" else exact_queries(query_codes)  # (Q, bits)
    device = q.device
    d = sign_codes(db_codes).to(device)  # (N, bits)
    labels = torch.as_tensor(db_labels).to(device=device, dtype=torch.float32)  # (N, C)
    (Q, bits), N = q.shape, d.shape[0]
    if d.shape[1] != bits or labels.shape[0] != N or N == 0:
        raise ValueError(
            f"shape mismatch: query {tuple(q.shape)}, db {tuple(d.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    k = min(int(k), N)
    l1 = q.abs().sum(1, keepdim=True).clamp_min(1e-12)  # (Q, 1): bits for +-1 queries
    if chunk is None:
        chunk = max(1, CHUNK_PRODUCTS[device.type == "cuda"] // N)
    rank_w = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)  # (k,)
    scores = torch.empty(Q, labels.shape[1], device=device)
    for s in range(0, Q, chunk):
        dot = q[s : s + chunk] @ d.T  # (c, N), exact
        idx = nearest(dot, k)  # (c, k) database rows, nearest first
        sim = (1 + dot.gather(1, idx) / l1[s : s + chunk]) / 2  # (c, k)
        if vote == "softmax":
            w = torch.softmax(sim / tau, dim=1)
        elif vote == "uniform":
            w = torch.full_like(sim, 1.0 / k)
        else:
            w = (rank_w / rank_w.sum()).expand_as(sim)
        scores[s : s + chunk] = torch.einsum("qk,qkc->qc", w, labels[idx])
    return scores.clamp_(0.0, 1.0)


def knn_head(query_codes, query_mask, db_codes, db_labels, device="cpu", **kwargs):
    """The KNN head: each query of an image (Scores.query_codes: one per caption under scoring rule
    "each", the image's averaged code otherwise; model.score_embeddings) votes with its nearest
    database codes (knn_scores, its defaults unless given), and an image's scores are the mean over
    its queries. query_codes (N, Q, bits), query_mask (N, Q) bool -> (N, C) float32 on the CPU. Runs
    on `device`."""
    db, labels = db_codes.to(device), torch.as_tensor(db_labels).to(device)
    scores = torch.zeros(len(query_codes), labels.shape[1])
    for c in range(query_codes.shape[1]):
        has = query_mask[:, c]
        if has.any():
            scores[has] += knn_scores(query_codes[has, c].to(device), db, labels, **kwargs).cpu()
    return scores / query_mask.sum(1, keepdim=True)

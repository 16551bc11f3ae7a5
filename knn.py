"""
The KNN head: an exact Hamming-KNN vote over a database of binary codes, as a readable reference (a
chunked matmul + topk, as DINO's knn_classifier; on the CPU in integers, and the topk in two steps
for a large database). Imports only torch: copy it as it is.

    scores = knn.knn_scores(query_codes, db_codes, db_labels)   # (Q, C) in [0, 1]; k 100
    codes = knn.sign_codes(h)                                   # {-1, +1}, 0 -> +1
"""

import torch

KNN_VOTES = ("softmax", "uniform", "rank")
KNN_QUERIES = ("real", "sign")
CHUNK_PRODUCTS = {False: 2**21, True: 2**26}  # similarities per chunk: CPU, CUDA (measured)
GRID_BITS = 14  # real queries are rounded to multiples of 2^-14 at most: two int8 bytes (products)
BLOCK = 32  # database rows per block of nearest's first step (measured in docs/BENCHMARKS.md)


def grid_bits(bits):
    """s of exact_queries' grid 2^-s for codes of `bits` bits: at most GRID_BITS, and small enough
    that every partial sum of q.d + |q|_1 (magnitude < 2 * bits) fits float32's 24-bit mantissa."""
    return min(GRID_BITS, 23 - (2 * bits).bit_length())


def exact_queries(x):
    """Real-valued query codes (Q, bits) -> float32 codes on which every product with +-1 codes is
    exact: each row scaled by a power of two to max |q_j| < 1 (exact; rankings and knn_scores'
    similarities do not change), then rounded to a multiple of 2^-s, s = grid_bits(bits), so q * 2^s
    is an integer of magnitude <= 2^s. The rounding moves a code by at most 2^-15 of its row's scale
    (bits <= 127); in exchange the search is exact and the same for any chunk, BLAS or device."""
    x = torch.as_tensor(x).float()
    s = grid_bits(x.shape[-1])
    _, e = torch.frexp(
        x.abs().amax(-1, keepdim=True)
    )  # max |q| = m * 2^e, 0.5 <= m < 1 (e = 0 for a zero row)
    return torch.round(torch.ldexp(x, s - e)) / 2.0**s


def sign_codes(x):
    """Real or {-1, +1} codes (N, bits) -> float32 {-1, +1}; 0 counts as +1 (the h > 0 rule, ties
    up)."""
    x = torch.as_tensor(x)
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def products(q, d):
    """Integer queries q (c, bits) int32, |q| <= 2^GRID_BITS, against +-1 codes d (N, bits) int8 ->
    q.d (c, N), exact: int32 on the CPU, else float32. On the CPU two int8 matmuls, q's high and
    low bytes, summed in int32 (half the time of a float32 matmul on the CPUs of
    docs/BENCHMARKS.md); on other devices, and for 1-bit codes (torch 2.13's CPU _int_mm returns
    garbage for an inner dimension of 1), one float32 matmul, exact as every sum is an integer
    below 2^24."""
    if q.device.type != "cpu" or q.shape[1] < 2:
        return q.float() @ d.float().T
    hi = torch.div(q + 128, 256, rounding_mode="floor")  # q = 256 hi + lo, lo in [-128, 127]
    dot = torch._int_mm((q - 256 * hi).to(torch.int8), d.T)
    if hi.any():  # never for sign queries
        dot.add_(torch._int_mm(hi.to(torch.int8), d.T), alpha=256)
    return dot


def nearest(dot, k):
    """dot (c, N) exact integer-valued similarities, |dot| < 2^24 (int32 or float), k <= N -> (c, k)
    database rows, nearest first, equal similarities lower index first (so any chunk, BLAS or device
    picks the same neighbours). A large database is searched in two steps: the k blocks of BLOCK
    rows with the largest maxima (equal maxima: lower block first) hold every row of the answer,
    since the k-th largest block maximum t is at most the k-th similarity v; so a row above v lies
    in one of the fewer than k blocks above t, and the lowest-index rows equal to v = t in the
    lowest-index blocks whose maximum is t. Then the k best of those k * BLOCK rows."""
    c, n = dot.shape
    cols = torch.arange(n, device=dot.device).expand(c, n)
    if n >= 4 * k * BLOCK:
        full = n // BLOCK * BLOCK
        top = dot[:, :full].unflatten(1, (-1, BLOCK)).amax(2)  # (c, n // BLOCK) block maxima
        top = torch.cat([top, dot[:, full:].amax(1, keepdim=True)], 1) if full < n else top
        blocks = best(top, cols[:, : top.shape[1]], top.shape[1], k)  # (c, k)
        cols = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK, device=dot.device)).flatten(1)
        dot = dot.gather(1, cols.clamp(max=n - 1)).masked_fill(cols >= n, -(2**25))  # past N: last
    return best(dot, cols, n, k)


def best(vals, cols, n, k):
    """vals (c, m) integer similarities of rows cols (c, m) of a database of n -> the k best rows
    (c, k), by similarity, then lower index: the topk of one int64 key per row, all distinct."""
    w = max(1, (n - 1).bit_length())
    key = vals.long() * 2**w + (n - 1 - cols)
    return cols.gather(1, key.topk(k, dim=1).indices)


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
    c, in [0, 1]. Exact and deterministic: the queries on exact_queries' grid, scaled to integers,
    and the +-1 codes give integer products (products; on a GPU exact unless a reduced-precision
    matmul mode such as TF32 is on), and equal similarities go to the lower database index first
    (nearest). Query codes must be finite (ValueError). Nothing is excluded: a database that holds
    the queries finds them. Queries run in chunks of `chunk` rows (None: CHUNK_PRODUCTS // N,
    measured in docs/BENCHMARKS.md), so memory stays bounded; runs on the device of query_codes and
    returns float32 there.
    """
    if vote not in KNN_VOTES or query not in KNN_QUERIES:
        raise ValueError(
            f"vote must be one of {KNN_VOTES} and query one of {KNN_QUERIES}, "
            f"got {vote!r}, {query!r}"
        )
    if k < 1 or tau <= 0:
        raise ValueError(f"need k >= 1 and tau > 0, got k={k}, tau={tau}")
    if not torch.isfinite(torch.as_tensor(query_codes)).all():
        raise ValueError("query codes must be finite (NaN or Inf: has the head diverged?)")
    if query == "sign":
        q = sign_codes(query_codes)  # (Q, bits)
    else:
        q = exact_queries(query_codes)
        q = q * 2.0 ** grid_bits(q.shape[1])  # integers: every product exact (products)
    q, device = q.to(torch.int32), q.device
    d = sign_codes(db_codes).to(device=device, dtype=torch.int8)  # (N, bits)
    labels = torch.as_tensor(db_labels).to(device=device, dtype=torch.float32)  # (N, C)
    (Q, bits), N = q.shape, d.shape[0]
    if d.shape[1] != bits or labels.shape[0] != N or N == 0:
        raise ValueError(
            f"shape mismatch: query {tuple(q.shape)}, db {tuple(d.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    k = min(int(k), N)
    l1 = q.abs().sum(1, keepdim=True).float().clamp_min(1)  # (Q, 1): bits for +-1 queries
    if chunk is None:
        chunk = max(1, CHUNK_PRODUCTS[device.type == "cuda"] // N)
    scores = torch.empty(Q, labels.shape[1], device=device)
    for s in range(0, Q, chunk):
        dot = products(q[s : s + chunk], d)  # (c, N), exact
        idx = nearest(dot, k)  # (c, k) database rows, nearest first
        sim = (1 + dot.gather(1, idx).float() / l1[s : s + chunk]) / 2  # (c, k)
        w = vote_weights(sim, vote, tau)  # (c, k), each row sums to 1
        scores[s : s + chunk] = torch.einsum("qk,qkc->qc", w, labels[idx])
    return scores.clamp_(0.0, 1.0)


def vote_weights(sim, vote, tau):
    """Similarities (c, k) of each query's neighbours, nearest first -> their votes (c, k):
    "softmax" softmax(sim / tau), "uniform" 1/k, "rank" 1/rank normalised to sum 1."""
    if vote == "softmax":
        return torch.softmax(sim / tau, dim=1)
    if vote == "uniform":
        return torch.full_like(sim, 1.0 / sim.shape[1])
    rank = 1.0 / torch.arange(1, sim.shape[1] + 1, device=sim.device, dtype=torch.float32)
    return (rank / rank.sum()).expand_as(sim)


def knn_head(query_codes, query_mask, db_codes, db_labels, device="cpu", **kwargs):
    """The KNN head: each query of an image (Scores.query_codes: one per caption under scoring rule
    "each", the image's averaged code otherwise; model.score_embeddings) votes with its nearest
    database codes (knn_scores, its defaults unless given), and an image's scores are the mean over
    its queries. query_codes (N, Q, bits), query_mask (N, Q) bool -> (N, C) float32 on the CPU. Runs
    on `device`."""
    db = db_codes.to(device)  # knn_scores binarises it
    labels = torch.as_tensor(db_labels).to(device=device, dtype=torch.float32)
    scores = torch.zeros(len(query_codes), labels.shape[1])
    for c in range(query_codes.shape[1]):
        has = query_mask[:, c]
        if has.any():
            scores[has] += knn_scores(query_codes[has, c].to(device), db, labels, **kwargs).cpu()
    return scores / query_mask.sum(1, keepdim=True)

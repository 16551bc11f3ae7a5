"""retrieval.retrieval_map against the two reference mAP codes of the hashing literature,
transcribed here (DeepHash-pytorch utils/tools.py CalcTopMap and HashNet pytorch/src/test.py
mean_average_precision), and ties="average" against exact enumeration and against sampled random tie
orders.

    python -m pytest -q tests/test_retrieval.py
"""

import itertools
import warnings

import numpy as np
import pytest

import retrieval


def calc_top_map(rB, qB, retrievalL, queryL, topk, kind="quicksort"):
    """DeepHash-pytorch's CalcTopMap: rank by 0.5 * (bits - q . r) with np.argsort (its default
    quicksort orders ties arbitrarily), keep gnd[0:topk]; a query with tsum = 0 relevant there adds
    0, and the sum of mean(count / tindex) is divided by the number of queries. (Its topK = -1,
    "all", slices gnd[0:-1] and so drops the last item; we pass topk = N for "all".)"""
    total = 0.0
    for i in range(queryL.shape[0]):
        gnd = (queryL[i] @ retrievalL.T > 0).astype(np.float32)
        hamm = 0.5 * (rB.shape[1] - qB[i] @ rB.T)
        tgnd = gnd[np.argsort(hamm, kind=kind)][0:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        total += np.mean(count / tindex)
    return total / queryL.shape[0]


def hashnet_map(
    database_code, validation_code, database_labels, validation_labels, R, kind="quicksort"
):
    """HashNet's mean_average_precision: ids = argsort(-database . query) per query column, a match
    is any position where the 0/1 db label equals the query's label with 0 turned into -1 (= a
    shared label), AP = sum(Px * imatch) / relevant_num over the first R, queries with relevant_num
    = 0 are left out, and the mean of the rest is returned (nan if none). R must be <= N there (Px
    has R entries); the original also writes the -1s into the caller's labels, which we avoid with a
    copy."""
    ids = np.argsort(-(database_code @ validation_code.T), axis=0, kind=kind)
    APx = []
    for i in range(validation_code.shape[0]):
        label = validation_labels[i].copy()
        label[label == 0] = -1
        imatch = np.sum(database_labels[ids[0:R, i]] == label, axis=1) > 0
        relevant_num = np.sum(imatch)
        Px = np.cumsum(imatch).astype(float) / np.arange(1, R + 1, 1)
        if relevant_num != 0:
            APx.append(np.sum(Px * imatch) / relevant_num)
    with warnings.catch_warnings():  # the mean of no AP is nan, with a RuntimeWarning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean(np.array(APx)))


def labels(rng, n, c=6, p=0.25):
    return (rng.random((n, c)) < p).astype(np.int64)


def tie_free(rng, n_query, blocks=7, pad=0):
    """Codes whose Hamming distances to each query are all distinct: bit blocks of sizes 1, 2, 4,
    ...; item j flips block b iff bit b of j is set, so distance(query a, item j) = a XOR j (a
    bijection in j). A shared random sign pattern, a column shuffle, a db shuffle and positive
    magnitudes keep the distances. -> (query codes [Q, bits] real, db codes [2**blocks, bits] real),
    bits = 2**blocks - 1 + pad."""
    owner = np.concatenate(
        [np.repeat(np.arange(blocks), 2 ** np.arange(blocks)), np.full(pad, blocks)]
    )
    base, cols = (
        rng.choice([-1.0, 1.0], size=owner.size),
        rng.permutation(owner.size),
    )  # owner: block of each bit

    def code(
        ids,
    ):  # bit i of item j is flipped iff bit owner[i] of j is set (the pad bits never are)
        flip = (ids[:, None] >> owner) & 1
        return ((1 - 2 * flip) * base)[:, cols] * rng.uniform(0.1, 2.0, flip.shape)

    return code(rng.integers(0, 2**blocks, n_query)), code(rng.permutation(2**blocks))


def sign(c):
    return np.where(np.asarray(c) >= 0, 1.0, -1.0)


@pytest.mark.parametrize(
    "blocks,pad", [(6, 1), (7, 0), (7, 1)]
)  # 64 bits, 127 (uint8 keys), 128 (uint16)
def test_equals_references_without_ties(blocks, pad):
    rng = np.random.default_rng(blocks + pad)
    qc, dc = tie_free(rng, 30, blocks, pad)
    qy, dy = labels(rng, 30), labels(rng, len(dc))
    qy[:3] = 0  # no label: never a relevant item
    d = (sign(qc)[:, None] != sign(dc)[None]).sum(-1)
    assert all(
        len(np.unique(row)) == len(dc) for row in d
    )  # really tie-free, so argsort's kind cannot matter
    N = len(dc)
    for k in (None, 1, 5, 37, N - 1, N, 10 * N):
        deephash = calc_top_map(sign(dc), sign(qc), dy, qy, N if k is None else k)
        hashnet = hashnet_map(sign(dc), sign(qc), dy, qy, min(k or N, N))
        for ties in ("stable", "average"):  # groups of one item: both rules are the same ranking
            assert retrieval.retrieval_map(qc, qy, dc, dy, k=k, ties=ties) == pytest.approx(
                deephash, abs=1e-12
            )
            assert retrieval.retrieval_map(
                qc, qy, dc, dy, k=k, ties=ties, empty="skip"
            ) == pytest.approx(hashnet, abs=1e-12)
        if k is not None and k < N:  # the two conventions really differ here
            assert abs(deephash - hashnet) > 1e-3


@pytest.mark.parametrize("k", [None, 1, 4, 9, 60, 61, 1000])
def test_stable_equals_stably_sorted_references_with_ties(k):
    """With heavy ties (5 bits, 60 items) the references' argsort made stable rank ties in db order,
    as ours."""
    rng = np.random.default_rng(20 + (k or 0))
    qc, dc = rng.normal(size=(15, 5)), rng.normal(size=(60, 5))
    qy, dy = labels(rng, 15, p=0.15), labels(rng, 60, p=0.15)
    qy[0] = 0
    N = len(dc)
    deephash = calc_top_map(sign(dc), sign(qc), dy, qy, N if k is None else k, kind="stable")
    hashnet = hashnet_map(sign(dc), sign(qc), dy, qy, min(k or N, N), kind="stable")
    assert retrieval.retrieval_map(qc, qy, dc, dy, k=k) == pytest.approx(deephash, abs=1e-12)
    assert retrieval.retrieval_map(qc, qy, dc, dy, k=k, empty="skip") == pytest.approx(
        hashnet, abs=1e-12
    )
    assert retrieval.retrieval_map(
        qc, qy, dc, dy, k=k, empty="skip", max_elems=70
    ) == pytest.approx(hashnet, abs=1e-12)


def dist_rel(qc, qy, dc, dy):
    return (sign(qc)[:, None] != sign(dc)[None]).sum(-1), (qy @ dy.T) > 0  # [Q, N] each


def ap_of_orders(dist, rel, keys, k):
    """AP@k and 'has a relevant item in the top k' for rankings by (distance, key): keys [..., Q, N]
    order each query's ties. -> (ap [..., Q], kept [..., Q])."""
    order = np.argsort(dist + keys / (keys.max() + 1.0), axis=-1, kind="stable")[..., :k]
    r = np.take_along_axis(np.broadcast_to(rel, order.shape[:-1] + rel.shape[-1:]), order, -1)
    hits = np.cumsum(r, -1)
    n = hits[..., -1]
    return (r * hits / np.arange(1, r.shape[-1] + 1)).sum(-1) / np.maximum(n, 1), n > 0


def skip_mean(ap, kept):
    with np.errstate(invalid="ignore"):
        return np.where(kept.any(-1), (ap * kept).sum(-1) / kept.sum(-1), np.nan)


def test_average_equals_exact_enumeration():
    """Every order of a 7-item database (5,040), per query: E[AP] exactly, and for "skip" the exact
    expectation over independent queries by enumerating which queries keep a relevant item in the
    top k."""
    dc = np.array(
        [[1, 1], [1, -1], [-1, 1], [1, 1], [-1, -1], [1, -1], [1, 1]]
    )  # 2 bits: groups of 3, 2, 1, 1
    qc = np.array([[1, 1], [1, -1], [-1, -1], [1, 1]])
    dy = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    qy = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]])
    dist, rel = dist_rel(qc, qy, dc, dy)
    perms = np.array(list(itertools.permutations(range(7))))  # [5040, 7] tie-breaking keys
    for k in (None, 1, 2, 4, 5, 7):
        ap, kept = ap_of_orders(
            dist, rel, np.broadcast_to(perms[:, None, :], (len(perms),) + dist.shape), k or 7
        )
        e_ap = ap.mean(0)  # [Q] exact E[AP_q]
        assert retrieval.retrieval_map(qc, qy, dc, dy, k=k, ties="average") == pytest.approx(
            e_ap.mean(), abs=1e-12
        )
        # skip: queries break ties independently; condition on each query's kept flag
        p = kept.mean(0)
        cond = np.where(
            p > 0, (ap * kept).sum(0) / np.maximum(kept.sum(0), 1), 0.0
        )  # E[AP_q | kept]
        num = den = 0.0
        for pattern in itertools.product([0, 1], repeat=len(qc)):
            s = np.array(pattern, bool)
            if s.any():
                w = np.prod(np.where(s, p, 1 - p))
                num, den = num + w * cond[s].mean(), den + w
        want = num / den if den > 0 else np.nan
        got = retrieval.retrieval_map(qc, qy, dc, dy, k=k, ties="average", empty="skip")
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
        if (
            k == 2
        ):  # k = 2 cuts group(s) with an uncertain query: exercised the Poisson-binomial part
            assert ((p > 0) & (p < 1)).any()


@pytest.mark.parametrize("empty", ["zero", "skip"])
@pytest.mark.parametrize("k", [None, 7, 13])
def test_average_equals_mean_over_random_tie_orders(k, empty):
    """4 bits, 80 items: groups of ~16. 2,000 draws of independent uniform tie orders per query,
    then the stable metric of each draw; ties="average" must sit within 5 standard errors of their
    mean, and "stable" (one fixed order) must not, so the test can fail."""
    rng = np.random.default_rng(40 + (k or 0))
    qc, dc = rng.normal(size=(12, 4)), rng.normal(size=(80, 4))
    qy, dy = labels(rng, 12, c=8, p=0.12), labels(rng, 80, c=8, p=0.12)
    dist, rel = dist_rel(qc, qy, dc, dy)
    if k is not None:  # k falls strictly inside a tie group for most queries
        below, upto = [
            (dist < np.sort(dist, 1)[:, [k - 1]]).sum(1),
            (dist <= np.sort(dist, 1)[:, [k - 1]]).sum(1),
        ]
        assert ((below < k) & (upto > k)).mean() > 0.5
    ap, kept = ap_of_orders(dist, rel, rng.random((2000,) + dist.shape), k or 80)
    draws = ap.mean(1) if empty == "zero" else skip_mean(ap, kept)
    if (
        empty == "skip" and k is not None
    ):  # some query is kept in some draws only: P(R_k = 0) matters
        assert (kept.any(0) & ~kept.all(0)).any()
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    got = retrieval.retrieval_map(qc, qy, dc, dy, k=k, ties="average", empty=empty)
    assert abs(got - draws.mean()) <= 5 * se + 1e-12, (got, draws.mean(), se)
    stable = retrieval.retrieval_map(qc, qy, dc, dy, k=k, empty=empty)
    assert abs(stable - draws.mean()) > 5 * se
    assert retrieval.retrieval_map(
        qc, qy, dc, dy, k=k, ties="average", empty=empty, max_elems=50
    ) == pytest.approx(got, abs=1e-12)


def test_average_skip_is_the_expectation_of_the_ratio():
    """Same code for all queries; the 4 items at distance 0 are cut by k = 3. Query A (and C) has 1
    relevant item among them: kept with probability 3/4, then at rank 1, 2 or 3, AP 11/18; query B
    has all 4: AP 1. E[mean over kept] = E[1 / (1 + X_A + X_C)] + 2 (3/4)(11/18) E[1 / (2 + X_C)] =
    7/16 + 11/32, while the naive E[sum AP] / E[#kept] = (1 + 2 (3/4)(11/18)) / 2.5; 50,000 sampled
    tie orders tell them apart."""
    dc = np.array([[1, 1]] * 4 + [[1, -1]] * 2 + [[-1, -1]] * 2)
    dy = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]] + [[1, 1, 0, 0]] * 4)
    qc, qy = np.ones((4, 2)), np.eye(4, dtype=int)  # queries A, C, B and one with no relevant item
    got = retrieval.retrieval_map(qc, qy, dc, dy, k=3, ties="average", empty="skip")
    assert got == pytest.approx(7 / 16 + 11 / 32, abs=1e-12)
    dist, rel = dist_rel(qc, qy, dc, dy)
    ap, kept = ap_of_orders(dist, rel, np.random.default_rng(50).random((50000,) + dist.shape), 3)
    draws = skip_mean(ap, kept)
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(got - draws.mean()) <= 5 * se
    naive = (1 + 2 * 0.75 * 11 / 18) / 2.5
    assert abs(naive - draws.mean()) > 5 * se  # the naive variant is measurably wrong
    assert retrieval.retrieval_map(qc, qy, dc, dy, k=3, ties="average") == pytest.approx(
        (1 + 2 * 0.75 * 11 / 18) / 4
    )


def test_hand_computed():
    """One query, 4 items at distances 0, 1, 1, 2, relevant: no, yes, no, yes."""
    q, d = np.array([[1, 1]]), np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])
    qy, dy = np.array([[1, 0]]), np.array([[0, 1], [1, 0], [0, 1], [1, 1]])

    def f(**kw):
        return retrieval.retrieval_map(q, qy, d, dy, **kw)

    assert f() == f(empty="skip") == pytest.approx((1 / 2 + 2 / 4) / 2)  # ranks 2 and 4
    # average: the relevant tied item is at rank 2 or 3
    assert f(ties="average") == pytest.approx(((1 / 2 + 2 / 4) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    assert f(k=1) == 0.0 and np.isnan(
        f(k=1, empty="skip")
    )  # the single query has nothing in its top 1
    assert f(k=2) == f(k=2, empty="skip") == 0.5  # db order puts the relevant tied item second
    assert f(k=2, ties="average") == pytest.approx(0.25)  # it is in the top 2 with probability 1/2
    assert f(k=2, ties="average", empty="skip") == pytest.approx(
        0.5
    )  # ... and AP is 1/2 when it is
    assert f(k=4) == f(k=10**6) == f()


def test_edge_cases_and_bad_input():
    rng = np.random.default_rng(60)
    qc, dc = rng.normal(size=(5, 8)), rng.normal(size=(30, 8))
    qy, dy = labels(rng, 5), labels(rng, 30)
    qy[:] = 0  # no query has a relevant item at all
    for ties in ("stable", "average"):
        assert retrieval.retrieval_map(qc, qy, dc, dy, ties=ties) == 0.0
        assert np.isnan(retrieval.retrieval_map(qc, qy, dc, dy, ties=ties, empty="skip"))
    with pytest.raises(ValueError):
        retrieval.retrieval_map(qc, qy, dc, dy, k=0)
    with pytest.raises(ValueError):
        retrieval.retrieval_map(qc, qy, dc, dy, ties="random")
    with pytest.raises(ValueError):
        retrieval.retrieval_map(qc, qy, dc, dy, empty="nan")
    with pytest.raises(ValueError):
        retrieval.retrieval_map(qc > 0, qy, dc, dy)
    with pytest.raises(ValueError):
        retrieval.retrieval_map(qc, qy, dc[:, :7], dy)

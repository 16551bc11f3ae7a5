"""knn.knn_scores (the reference: chunked matmul + topk) against a brute-force numpy Hamming search;
knn.nearest's tie rule and block step; knn.products; the KNN head's vote over an image's queries;
memory bound; optional full-size benchmark.

python -m pytest -q tests/test_knn.py
KNN_BENCH=1 python -m pytest -q -s tests/test_knn.py -k bench   # 23,657 x 94,630 x 64 bits + naive
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import knn

VOTES = ("softmax", "uniform", "rank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact_grid(q):
    """The query rounding knn_scores defines for real queries, in numpy: each row times a power of
    two to max |q_j| < 1, then rounded to a multiple of 2^-min(14, 23 - bit_length(2 * bits))."""
    s = min(14, 23 - (2 * q.shape[1]).bit_length())
    _, e = np.frexp(np.abs(q).max(1, keepdims=True))
    return np.round(np.ldexp(q.astype(np.float64), s - e)) / 2.0**s


def brute_knn(q, d, labels, k, tau, vote, query="sign"):
    """Reference: Hamming by counting differing bits (query "real": the float64 weighted agreement
    (1 + q.sign(d) / |q|_1) / 2 of the rounded query), stable order (nearest first, ties -> lower
    index)."""
    db = np.where(d >= 0, 1, -1)
    q = exact_grid(q) if query == "real" else q
    bits, k = q.shape[1], min(k, len(d))
    out = np.zeros((len(q), labels.shape[1]))
    for i in range(len(q)):
        if query == "sign":
            sim_all = 1.0 - (np.where(q[i] >= 0, 1, -1)[None, :] != db).sum(1) / bits  # (N,)
        else:
            l1 = np.abs(q[i].astype(np.float64)).sum()
            sim_all = (1.0 + db @ q[i].astype(np.float64) / l1) / 2 if l1 > 0 else np.zeros(len(d))
        order = np.lexsort((np.arange(len(d)), -sim_all))[:k]  # nearest first, ties -> lower index
        sim = sim_all[order]
        if vote == "softmax":
            w = np.exp((sim - sim.max()) / tau)
        elif vote == "uniform":
            w = np.ones(k)
        else:
            w = 1.0 / np.arange(1, k + 1)
        out[i] = (w / w.sum()) @ labels[order].astype(np.float64)
    return out


def _case(q_n, n, bits, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (q_n, bits)).astype(np.float32)  # zeros included: they count as +1
    d = rng.standard_normal((n, bits)).astype(np.float32)  # real-valued codes: sign taken
    labels = (rng.random((n, 80)) < 0.2).astype(np.uint8)
    return q, d, labels


@pytest.mark.parametrize("vote", VOTES)
@pytest.mark.parametrize("bits", [8, 64])
def test_equals_brute_force(vote, bits):
    q, d, labels = _case(25, 300, bits, seed=bits)
    for k in (1, 7, 20):
        for tau in (0.07, 1.0):
            ref = brute_knn(q, d, labels, k, tau, vote)
            got = knn.knn_scores(
                torch.from_numpy(q),
                torch.from_numpy(d),
                torch.from_numpy(labels),
                k=k,
                tau=tau,
                vote=vote,
                query="sign",
            )
            assert got.dtype == torch.float32 and got.shape == (25, 80)
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
            assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


@pytest.mark.parametrize("vote", VOTES)
def test_k_larger_than_database_clamps(vote):
    q, d, labels = _case(6, 9, 16, seed=3)
    got = knn.knn_scores(
        q, d, labels, k=50, vote=vote, query="sign"
    )  # numpy inputs are accepted too
    np.testing.assert_allclose(got.numpy(), brute_knn(q, d, labels, 9, 0.07, vote), atol=1e-5)
    if vote == "uniform":  # every database row votes 1/9
        np.testing.assert_allclose(got.numpy(), np.tile(labels.mean(0), (6, 1)), atol=1e-6)


def test_ties_lower_index_first_and_chunk_invariant():
    # 10 identical database codes: the k = 3 nearest must be rows 0, 1, 2 whatever the chunking
    d = np.ones((10, 16), np.float32)
    labels = np.eye(10, 80, dtype=np.uint8)  # row i has label i only
    q = np.ones((4, 16), np.float32)
    for chunk in (None, 1, 3):
        got = knn.knn_scores(q, d, labels, k=3, vote="rank", chunk=chunk, query="sign").numpy()
        w = (1.0 / np.arange(1, 4)) / (1.0 / np.arange(1, 4)).sum()
        np.testing.assert_allclose(got[:, :3], np.tile(w, (4, 1)), atol=1e-6)
        assert np.all(got[:, 3:] == 0)
    q, d, labels = _case(40, 500, 32, seed=5)
    full = knn.knn_scores(q, d, labels, k=20, chunk=None, query="sign")
    assert torch.equal(full, knn.knn_scores(q, d, labels, k=20, chunk=7, query="sign"))
    # the default chunk (knn.CHUNK_PRODUCTS // N queries: 52 on the CPU at 2^21) against chunk 7
    # and one chunk holding all 300
    q, d, labels = _case(300, 40_000, 8, seed=6)
    default = knn.knn_scores(q, d, labels, k=20, query="sign")
    assert torch.equal(default, knn.knn_scores(q, d, labels, k=20, chunk=7, query="sign"))
    assert torch.equal(default, knn.knn_scores(q, d, labels, k=20, chunk=300, query="sign"))


@pytest.mark.parametrize("vote", VOTES)
def test_real_queries_equal_brute_force(vote):
    # asymmetric distance: real-valued query codes against the sign of the database codes. Queries
    # are multiples of 1/4 in [-1, 1] (every float32 sum exact, so ties are real ties), the database
    # repeats codes across blocks, and one query is all zero (every code equally near: the lowest
    # indices win)
    rng = np.random.default_rng(5)
    for bits in (64, 8):
        q = (rng.integers(-4, 5, (15, bits)) / 4).astype(np.float32)
        q[0] = 0
        d = rng.standard_normal((400, bits)).astype(np.float32)
        d[:60] = d[100:160]
        labels = (rng.random((400, 80)) < 0.2).astype(np.uint8)
        for k, tau in ((1, 0.07), (20, 0.07), (20, 1.0)):
            ref = brute_knn(q, d, labels, k, tau, vote, query="real")
            got = knn.knn_scores(q, d, labels, k=k, tau=tau, vote=vote, chunk=4, query="real")
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, err_msg=f"bits {bits} k {k}")
    # a +-1 query is the same search either way
    q, d, labels = _case(10, 300, 64, seed=2)
    pm = np.where(q >= 0, 1.0, -1.0).astype(np.float32)
    np.testing.assert_allclose(
        knn.knn_scores(pm, d, labels, query="real").numpy(),
        knn.knn_scores(pm, d, labels, query="sign").numpy(),
        atol=1e-6,
    )


def test_real_queries_tanh_codes_exact_for_any_chunk():
    # tanh-like codes with near-ties: the rounded queries make every product exact in float32, so a
    # matrix-vector product (chunk 1), odd chunks and the default chunk pick the same neighbours as
    # the float64 reference
    rng = np.random.default_rng(9)
    q = np.tanh(rng.standard_normal((300, 64)) * 0.5).astype(np.float32)
    d = rng.standard_normal((3000, 64)).astype(np.float32)
    labels = (rng.random((3000, 80)) < 0.1).astype(np.uint8)
    ref = brute_knn(q, d, labels, 100, 0.07, "rank", query="real")
    runs = [
        knn.knn_scores(q, d, labels, k=100, vote="rank", chunk=c, query="real")
        for c in (None, 1, 7)
    ]
    for got in runs[1:]:
        assert torch.equal(got, runs[0])
    np.testing.assert_allclose(runs[0].numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(knn.exact_queries(q).numpy(), exact_grid(q))  # the same rounding


def test_large_database_256_bits():
    q, d, labels = _case(3, 66000, 256, seed=7)
    got = knn.knn_scores(q, d, labels, k=20, vote="softmax", tau=0.07, query="sign")
    np.testing.assert_allclose(got.numpy(), brute_knn(q, d, labels, 20, 0.07, "softmax"), atol=1e-5)


def test_heavy_ties_any_bits_and_chunk():
    # 4-bit codes: 16 distinct codes among 500, so nearly every distance is tied; and code lengths
    # that no packing would like (1, 3, 100, 255, 256): every one picks the brute-force neighbours
    q, d, labels = _case(30, 500, 4, seed=11)
    for vote in VOTES:
        ref = brute_knn(q, d, labels, 20, 0.07, vote)
        for chunk in (1, 7, None):
            got = knn.knn_scores(q, d, labels, k=20, vote=vote, chunk=chunk, query="sign")
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, err_msg=f"{vote} chunk {chunk}")
    for bits in (1, 3, 100, 255, 256):
        q, d, labels = _case(12, 700, bits, seed=bits)
        d[:50] = d[50:100]  # repeated database codes: exact ties
        ref = brute_knn(q, d, labels, 20, 0.07, "softmax")
        np.testing.assert_allclose(
            knn.knn_scores(q, d, labels, k=20, chunk=5, query="sign").numpy(),
            ref,
            atol=1e-5,
            err_msg=f"bits {bits}",
        )
        ref = brute_knn(q, d, labels, 20, 0.07, "rank", query="real")
        np.testing.assert_allclose(
            knn.knn_scores(q, d, labels, k=20, vote="rank", chunk=5).numpy(),
            ref,
            atol=1e-5,
            err_msg=f"real bits {bits}",
        )


def test_knn_head_averages_the_queries_votes():
    # each query of an image (one per caption under every scoring rule but "mean") votes on its
    # own and the image's scores are the mean over the queries it has (query_mask; an image
    # without a caption has one, from its image alone)
    rng = np.random.default_rng(3)
    caps = torch.from_numpy(rng.standard_normal((5, 3, 16)).astype(np.float32))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    caps[~mask] = 0
    d = torch.randn(200, 16)
    labels = torch.from_numpy((rng.random((200, 10)) < 0.3).astype(np.float32))
    got = knn.knn_head(caps, mask, d, labels, k=7)
    for i in range(5):
        want = knn.knn_scores(caps[i, mask[i]], d, labels, k=7).mean(0)
        torch.testing.assert_close(got[i], want)
    # one query per image (rule "mean": the averaged code): knn_scores itself
    one = knn.knn_head(caps[:, :1], torch.ones(5, 1, dtype=torch.bool), d, labels, k=7)
    torch.testing.assert_close(one, knn.knn_scores(caps[:, 0], d, labels, k=7))


def test_nearest_is_a_stable_ranking():
    """knn.nearest: the k largest similarities, nearest first, equal similarities lower index first,
    against a stable sort of every row, ties across the k-th place included: databases small enough
    for one step and large enough for the block step (with and without a short last block), int32
    and float similarities."""
    rng = np.random.default_rng(4)
    block = knn.BLOCK
    cases = [(3, 50, 10), (1000, 200, 20), (2, 9, 9), (5, 30, 1), (60, 600, 5), (1, 50, 7)]
    cases += [
        (levels, 4 * k * block + extra, k)
        for levels in (1, 2, 7, 10**6)
        for k, extra in ((1, 0), (5, 1), (20, block - 1), (3, 5 * block))
    ]
    for levels, n, k in cases:
        dot = torch.from_numpy(rng.integers(-levels, levels + 1, (12, n)).astype(np.int32))
        if levels == 7:  # all negative, the best (0) in the last 3 rows only (a short last block
            # where n is not a whole number of blocks)
            dot = -dot.abs() - 1
            dot[:, -3:] = 0
        ref = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in dot.numpy()])
        for x in (dot, dot.float()):
            got = knn.nearest(x, k).numpy()
            np.testing.assert_array_equal(got, ref, err_msg=f"{levels} {n} {k}")


def test_products_are_exact():
    # knn.products (two int8 matmuls on the CPU) against float64 products, at the grid's extremes
    # (+-2^14: both bytes in use), for +-1 queries (the high byte zero) and any code length
    rng = np.random.default_rng(8)
    lim = 2**knn.GRID_BITS
    for bits in (1, 2, 8, 64, 255):
        q = rng.integers(-lim, lim + 1, (9, bits))
        q[0], q[1], q[2] = lim, -lim, np.where(rng.random(bits) < 0.5, 1, -1)
        d = np.where(rng.random((300, bits)) < 0.5, 1, -1)
        got = knn.products(torch.from_numpy(q).int(), torch.from_numpy(d).to(torch.int8))
        np.testing.assert_array_equal(got.numpy(), q @ d.T, err_msg=f"bits {bits}")


def test_real_queries_block_step_equal_brute_force():
    # a database large enough for nearest's block step, with repeated codes (exact ties) and a
    # short last block: real-valued queries pick the brute-force neighbours
    rng = np.random.default_rng(12)
    n = 4 * 20 * knn.BLOCK * 3 + 7
    q = np.tanh(rng.standard_normal((25, 16))).astype(np.float32)
    d = rng.standard_normal((n, 16)).astype(np.float32)
    d[: n // 2] = d[n // 2 : 2 * (n // 2)]
    labels = (rng.random((n, 80)) < 0.1).astype(np.uint8)
    ref = brute_knn(q, d, labels, 20, 0.07, "rank", query="real")
    got = knn.knn_scores(q, d, labels, k=20, vote="rank", chunk=6)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_bad_arguments():
    q, d, labels = _case(2, 5, 8)
    with pytest.raises(ValueError, match="vote"):
        knn.knn_scores(q, d, labels, vote="majority")
    with pytest.raises(ValueError, match="query"):
        knn.knn_scores(q, d, labels, query="hamming")
    for bad in (np.nan, np.inf):  # a diverged head: refused, not scored into plausible numbers
        nonfinite = q.copy()
        nonfinite[0, 3] = bad
        with pytest.raises(ValueError, match="finite"):
            knn.knn_scores(nonfinite, d, labels)
    with pytest.raises(ValueError):
        knn.knn_scores(q, d, labels, k=0)
    with pytest.raises(ValueError, match="shape"):
        knn.knn_scores(q[:, :4], d, labels)
    assert knn.knn_scores(q[:0], d, labels).shape == (0, 80)


# peak-memory probe run inside the child process: reset the RSS high-water mark, then read it back
# (MiB)
PEAK = """
import re
def _status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
    return _status("VmRSS")
def peak():
    return _status("VmHWM")
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS"
)
def test_memory_bounded_at_full_database_size():
    """600 queries (chunks of 88) x 94,630 codes x 64 bits in a fresh process: the extra peak RSS
    stays small."""
    code = PEAK + textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {ROOT!r}); torch.set_num_threads(1)
        import knn
        g = torch.Generator().manual_seed(0)
        q, d = torch.randn(600, 64, generator=g), torch.randn(94630, 64, generator=g)
        lab = (torch.rand(94630, 80, generator=g) < 0.05).to(torch.uint8)
        r0 = reset_peak()
        t = time.time(); s = knn.knn_scores(q, d, lab, k=20, query="sign"); dt = time.time() - t
        print(peak() - r0, dt)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra_mib, seconds = map(float, out.stdout.split())
    print(f"knn 600 x 94630 x 64: {seconds:.2f} s, peak extra {extra_mib:.0f} MiB")
    assert 20 < extra_mib < 1024, extra_mib  # > 20: the probe really saw the chunk buffers


@pytest.mark.skipif(
    not os.environ.get("KNN_BENCH"), reason="set KNN_BENCH=1 for the full-size benchmark"
)
def test_bench_full_size_and_naive():
    """Report only: 23,657 queries x 94,630 codes x 64 bits, and a naive full-matrix search scaled
    up."""
    code = PEAK + textwrap.dedent(f"""
        import sys, time, numpy as np, torch
        sys.path.insert(0, {ROOT!r})
        import knn
        Q, N, B = 23657, 94630, 64
        g = torch.Generator().manual_seed(0)
        q, d = torch.randn(Q, B, generator=g), torch.randn(N, B, generator=g)
        lab = (torch.rand(N, 80, generator=g) < 0.05).to(torch.uint8)
        r0 = reset_peak()
        t = time.time(); s = knn.knn_scores(q, d, lab, k=20, query="sign"); dt = time.time() - t
        extra = peak() - r0
        # naive: full distance matrix for a subset of queries (XOR-count), full stable sort per row
        qs, db, labn = np.sign(q[:64].numpy()) >= 0, d.numpy() >= 0, lab.numpy().astype(np.float32)
        t = time.time()
        ham = (qs[:, None, :] != db[None]).sum(-1)  # (64, N)
        order = np.argsort(ham, axis=1, kind="stable")[:, :20]
        sim = 1 - np.take_along_axis(ham, order, 1) / B
        w = np.exp(sim / 0.07); w /= w.sum(1, keepdims=True)
        naive = np.einsum("qk,qkc->qc", w, labn[order])
        dn = (time.time() - t) * Q / 64
        assert np.allclose(naive, s[:64].numpy(), atol=1e-5)
        print(f"threads {{torch.get_num_threads()}}: chunked {{dt:.1f}} s, "
              f"peak extra {{extra:.0f}} MiB; "
              f"naive full-matrix (64 queries, scaled to {{Q}}) {{dn:.0f}} s, "
              f"its full int64 distance matrix would need {{Q * N * 8 / 2**30:.1f}} GiB")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print(out.stdout.strip())

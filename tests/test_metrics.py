"""metrics.py against independent references: scikit-learn, scipy and brute-force Python loops.

python -m pytest -q tests/test_metrics.py
"""

import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

import metrics
import retrieval

TOL = 1e-6


def sklearn_all(y, s, thresholds=0.5):
    """The 15 metrics with plain sklearn calls (macro AP / AUC on the columns where defined)."""
    pred = s > np.asarray(thresholds, dtype=np.float64)
    has_pos, has_neg = y.sum(0) > 0, y.sum(0) < len(y)
    both = has_pos & has_neg
    kw = dict(zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            {
                "mAP_macro": skm.average_precision_score(
                    y[:, has_pos], s[:, has_pos], average="macro"
                ),
                "mAP_micro": skm.average_precision_score(y, s, average="micro"),
                "auc_macro": skm.roc_auc_score(y[:, both], s[:, both], average="macro"),
                "auc_micro": skm.roc_auc_score(y, s, average="micro"),
                "f1_macro": skm.f1_score(y, pred, average="macro", **kw),
                "f1_micro": skm.f1_score(y, pred, average="micro", **kw),
                "precision_macro": skm.precision_score(y, pred, average="macro", **kw),
                "precision_micro": skm.precision_score(y, pred, average="micro", **kw),
                "recall_macro": skm.recall_score(y, pred, average="macro", **kw),
                "recall_micro": skm.recall_score(y, pred, average="micro", **kw),
                "hamming_loss": skm.hamming_loss(y, pred),
                "coverage_error": skm.coverage_error(y, s),
                "ranking_loss": skm.label_ranking_loss(y, s),
                "lrap": skm.label_ranking_average_precision_score(y, s),
                "mae": skm.mean_absolute_error(y, s),
            },
            int((~has_pos).sum()),
            int((~both).sum()),
        )


def make_data(n=300, c=10, seed=0, decimals=None, dtype=np.float64):
    """Labels with mixed prevalences and scores with some signal; decimals rounds to force ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rng.uniform(0.02, 0.5, c)).astype(np.uint8)
    s = np.clip(0.35 * y + 0.75 * rng.random((n, c)), 0, 1)
    if decimals is not None:
        s = np.round(s, decimals)
    return y, s.astype(dtype)


def assert_matches_sklearn(y, s, thresholds=0.5):
    got = metrics.compute_all(y, s, thresholds)
    ref, skip_ap, skip_auc = sklearn_all(y, s, thresholds)
    assert list(got)[:15] == list(metrics.METRIC_NAMES)
    assert list(got)[15:] == ["skipped_ap_classes", "skipped_auc_classes"]
    for k in metrics.METRIC_NAMES:
        assert isinstance(got[k], float)
        assert abs(got[k] - ref[k]) <= TOL, (k, got[k], ref[k])
    assert (got["skipped_ap_classes"], got["skipped_auc_classes"]) == (skip_ap, skip_auc)
    return got


@pytest.mark.parametrize("seed", [0, 1])
def test_random_scores(seed):
    assert_matches_sklearn(*make_data(seed=seed))


@pytest.mark.parametrize("decimals", [1, 2])
def test_tied_scores(decimals):
    y, s = make_data(n=400, seed=2, decimals=decimals)
    assert (
        len(np.unique(s)) <= 10**decimals + 1
    )  # heavy ties within classes, rows and the flattened array
    assert_matches_sklearn(y, s)


def test_float32_scores():
    assert_matches_sklearn(*make_data(seed=3, decimals=2, dtype=np.float32))


def test_class_without_positives_and_all_positive_class():
    y, s = make_data(seed=4, decimals=1)
    y[:, 2] = 0  # no positive: skipped by AP and AUC
    y[:, 5] = 1  # no negative: skipped by AUC only
    got = assert_matches_sklearn(y, s)
    assert got["skipped_ap_classes"] == 1 and got["skipped_auc_classes"] == 2


def test_rows_without_positive_and_all_positive_rows():
    y, s = make_data(seed=5, decimals=1)
    y[:40] = 0  # LRAP 1, ranking loss 0, coverage 0 for these rows (sklearn)
    y[40:50] = 1
    assert_matches_sklearn(y, s)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_all_one_and_all_zero_predictions(threshold):
    y, s = make_data(seed=6)
    got = assert_matches_sklearn(y, s, threshold)
    if threshold > 0:  # nothing predicted: zero_division=0
        assert got["precision_macro"] == got["recall_micro"] == got["f1_macro"] == 0.0


def test_per_class_thresholds():
    y, s = make_data(seed=7, decimals=1)
    thr = np.linspace(0.1, 0.9, y.shape[1])
    thr[3] = s[0, 3]  # a threshold equal to a score: prediction is strictly greater
    assert_matches_sklearn(y, s, thr)
    with pytest.raises(ValueError):
        metrics.compute_all(y, s, thr[:-1])


def test_bad_input_is_refused():
    y, s = make_data(n=20, c=4)
    with pytest.raises(ValueError):
        metrics.compute_all(y[:, :3], s)
    with pytest.raises(ValueError):
        metrics.compute_all(y * 2, s)
    s[0, 0] = np.nan
    with pytest.raises(ValueError):
        metrics.compute_all(y, s)


def test_per_class_matches_sklearn():
    y, s = make_data(seed=8, decimals=1)
    y[:, 1] = 0
    thr = np.full(y.shape[1], 0.4)
    pc = metrics.per_class(y, s, thr)
    pred = s > thr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, sup = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
        for c in range(y.shape[1]):
            if y[:, c].any():
                assert abs(pc["ap"][c] - skm.average_precision_score(y[:, c], s[:, c])) <= TOL
                assert abs(pc["auc"][c] - skm.roc_auc_score(y[:, c], s[:, c])) <= TOL
            else:
                assert np.isnan(pc["ap"][c]) and np.isnan(pc["auc"][c])
    np.testing.assert_allclose(pc["precision"], p, atol=TOL)
    np.testing.assert_allclose(pc["recall"], r, atol=TOL)
    np.testing.assert_allclose(pc["f1"], f, atol=TOL)
    np.testing.assert_array_equal(pc["support"], sup)
    mcm = skm.multilabel_confusion_matrix(y, pred)  # [C, 2, 2]: [[tn, fp], [fn, tp]]
    np.testing.assert_array_equal(pc["tp"], mcm[:, 1, 1])
    np.testing.assert_array_equal(pc["fp"], mcm[:, 0, 1])
    np.testing.assert_array_equal(pc["fn"], mcm[:, 1, 0])


def test_error_analysis_brute_force():
    y, s = make_data(n=60, c=6, seed=9, decimals=1)
    out = metrics.error_analysis(y, s, thresholds=0.5, top=None)
    pred = s > 0.5
    n, c = y.shape
    fp = [sum(int(pred[i, j] and not y[i, j]) for i in range(n)) for j in range(c)]
    fn = [sum(int(y[i, j] and not pred[i, j]) for i in range(n)) for j in range(c)]
    pairs = {}
    for i in range(n):
        for a in range(c):
            for b in range(c):
                if y[i, a] and not pred[i, a] and pred[i, b] and not y[i, b]:
                    pairs[(a, b)] = pairs.get((a, b), 0) + 1
    assert out["fp"].tolist() == fp and out["fn"].tolist() == fn
    expected = sorted(((a, b, k) for (a, b), k in pairs.items()), key=lambda t: (-t[2], t[0], t[1]))
    assert out["confusions"] == expected and len(expected) > 3
    assert metrics.error_analysis(y, s, top=3)["confusions"] == expected[:3]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_best_f1_thresholds_brute_force(dtype):
    y, s = make_data(n=150, c=8, seed=10, decimals=1, dtype=dtype)
    y[:, 0] = 0  # no positive -> 0.5
    y[:5, 7], y[5:, 7] = 1, 0  # few positives
    thr = metrics.best_f1_thresholds(y, s)
    assert thr[0] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(1, y.shape[1]):
            u = np.unique(s[:, c])
            candidates = np.concatenate([[u[0] - 1.0], u])  # every attainable prediction set
            best = max(skm.f1_score(y[:, c], s[:, c] > t, zero_division=0) for t in candidates)
            got = skm.f1_score(y[:, c], s[:, c] > thr[c], zero_division=0)
            got_native = skm.f1_score(
                y[:, c], s[:, c] > dtype(thr[c]), zero_division=0
            )  # same in the scores' dtype
            assert got == pytest.approx(best, abs=1e-12) and got_native == got, (c, got, best)
        if dtype == np.float64:  # midway between the chosen score and the next lower distinct score
            u = np.unique(s[:, c])
            i = np.searchsorted(u, thr[c])
            assert 0 < i < len(u) and thr[c] == pytest.approx((u[i - 1] + u[i]) / 2, abs=1e-12)


def test_best_f1_threshold_ties_and_predict_all():
    # F1 = 2/3 both when predicting {0.9} and when predicting all four: the higher threshold wins
    y = np.array([[1, 1], [0, 1], [0, 1], [1, 0]])
    s = np.array([[0.9, 0.2], [0.8, 0.3], [0.7, 0.4], [0.6, 0.5]])
    thr = metrics.best_f1_thresholds(y, s)
    assert thr[0] == pytest.approx(0.85)
    assert thr[1] < 0.2 and ((s[:, 1] > thr[1]) == [1, 1, 1, 1]).all()  # best: predict every image


def test_weighted_resample_equals_sklearn_on_repeated_rows():
    """The bootstrap's multiplicity-weighted AP / AUC are the metrics of the resampled set."""
    y, s = make_data(n=120, c=5, seed=11, decimals=1)
    rng = np.random.default_rng(0)
    W = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=4).T.astype(np.float32)  # [N, B]
    ap, auc = metrics._weighted_ap_auc(metrics._interval_layout(y.astype(bool), s), W)
    for b in range(W.shape[1]):
        idx = np.repeat(np.arange(len(y)), W[:, b].astype(int))
        pc = metrics.per_class(y[idx], s[idx])
        np.testing.assert_allclose(ap[b], pc["ap"], atol=1e-9)
        np.testing.assert_allclose(auc[b], pc["auc"], atol=1e-9)
        c = int(np.nanargmax(pc["ap"]))
        assert abs(ap[b, c] - skm.average_precision_score(y[idx, c], s[idx, c])) <= TOL


def test_bootstrap_ci_contains_point_and_narrows():
    widths = []
    for n in (300, 3000):
        y, s = make_data(n=n, c=8, seed=12)
        ci = metrics.bootstrap_ci(y, s, n_boot=200, seed=0)
        assert set(ci) == {"mAP_macro", "f1_macro", "auc_macro"}
        point = metrics.compute_all(y, s)
        for k, (p, lo, hi) in ci.items():
            assert p == point[k] and lo <= p <= hi and lo < hi
        widths.append({k: hi - lo for k, (p, lo, hi) in ci.items()})
    for k in widths[0]:
        assert widths[1][k] < 0.6 * widths[0][k]  # ~ 1/sqrt(10) in theory


def test_paired_bootstrap():
    y, s = make_data(n=500, c=6, seed=13)
    better = np.clip(s + 0.15 * (y - 0.5), 0, 1)
    res = metrics.paired_bootstrap(y, s, better, n_boot=200, seed=0)
    assert res["diff"] > 0 and 0 < res["low"] <= res["high"] and res["p"] < 0.05
    same = metrics.paired_bootstrap(y, s, s, n_boot=50, metric="f1_macro")
    assert same["diff"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError):
        metrics.paired_bootstrap(y, s, s, metric="lrap")


def scipy_bca(y, s, n_boot, seed, names=metrics.METRIC_NAMES):
    """scipy.stats.bootstrap(method="BCa") of compute_all over the images: rng.integers(0, N,
    (n_boot, N)) resamples (the draws of metrics' own generator) and the leave-one-out jackknife."""

    def stat(idx):
        m = metrics.compute_all(y[idx], s[idx])
        return np.array([m[k] for k in names])

    res = scipy.stats.bootstrap(
        (np.arange(len(y)),),
        stat,
        vectorized=False,
        n_resamples=n_boot,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    return {k: (lo[i], hi[i]) for i, k in enumerate(names)}


def biased_small_set(seed=0):
    """30 images, 10 classes of one positive each, the positives ranked low: macro AP ~ 0.04, and a
    resample, whose copies of a positive tie (enter the ranking together), scores higher."""
    rng = np.random.default_rng(seed)
    y = np.zeros((30, 10), np.uint8)
    y[rng.integers(0, 30, 10), np.arange(10)] = 1
    return y, rng.random((30, 10)) * (1 - 0.5 * y)


def test_bca_holds_a_biased_small_sample_estimate():
    y, s = biased_small_set()
    point = metrics.compute_all(y, s)["mAP_macro"]
    draws = metrics._boot_draws(y.astype(bool), [s], 0.5, 1000, 0, ("mAP_macro",))["mAP_macro"][0]
    pct_lo, pct_hi = np.percentile(draws, [2.5, 97.5])
    assert point < pct_lo < pct_hi  # the old percentile interval misses its own estimate
    assert np.mean(draws < point) < 0.025  # below the draws' central 95%: z0 is clipped
    got, lo, hi = metrics.bootstrap_ci(y, s, n_boot=1000, seed=0)["mAP_macro"]
    assert got == point and lo <= point <= hi and lo < hi
    assert hi == pytest.approx(pct_lo)  # clipped z0: the upper end is the draws' 2.5% quantile


def test_bca_equals_scipy_with_the_same_resamples():
    """Same seed, same resamples: scipy's BCa of compute_all equals ours to rounding (N <= blocks:
    leave-one-out); past JACKKNIFE_BLOCKS images the grouped jackknife's ends stay within 3% of the
    interval's width."""
    y, s = make_data(n=40, c=5, seed=21, decimals=2)
    ref = scipy_bca(y, s, 300, seed=7)
    got = metrics.bootstrap_intervals(y, [s], n_boot=300, seed=7)[0]
    for k in metrics.METRIC_NAMES:
        assert got[k][1:] == pytest.approx(ref[k], abs=1e-9), k
    y, s = make_data(n=300, c=4, seed=22)
    names = ("mAP_macro", "auc_micro", "f1_macro", "lrap")
    ref = scipy_bca(y, s, 200, seed=8, names=names)
    full = metrics.bootstrap_intervals(y, [s], n_boot=200, seed=8, names=names, blocks=300)[0]
    grouped = metrics.bootstrap_intervals(y, [s], n_boot=200, seed=8, names=names)[0]
    for k in names:
        assert full[k][1:] == pytest.approx(ref[k], abs=1e-9), k
        width = ref[k][1] - ref[k][0]
        assert np.abs(np.subtract(grouped[k][1:], ref[k])).max() < 0.03 * width, k


def test_bca_formula_on_one_replicate_array():
    """_bca on a given draw array and jackknife values is scipy's formula (Efron & Tibshirani
    14.3, 15.4) written out, and holds an estimate outside the draws' range."""
    rng = np.random.default_rng(23)
    draws, jack = rng.gamma(2.0, size=500), rng.gamma(2.0, size=40)
    point, alpha = 2.1, 0.1
    z0 = scipy.stats.norm.ppf((np.sum(draws < point) + np.sum(draws <= point)) / 1000)
    u = jack.mean() - jack
    a = (u**3).sum() / (6 * (u**2).sum() ** 1.5)
    zs = scipy.stats.norm.ppf([alpha / 2, 1 - alpha / 2])
    levels = scipy.stats.norm.cdf(z0 + (z0 + zs) / (1 - a * (z0 + zs)))
    assert metrics._bca(point, draws, jack, alpha) == pytest.approx(np.quantile(draws, levels))
    for outside in (draws.min() - 1, draws.max() + 1):  # z0 = -+inf before the clip
        lo, hi = metrics._bca(outside, draws, jack, alpha)
        assert lo <= outside <= hi and np.isfinite([lo, hi]).all()
    assert metrics._bca(3.0, np.full(50, 3.0), np.full(5, 3.0), alpha) == (3.0, 3.0)
    assert metrics._bca(2.0, np.full(50, 3.0), np.full(5, 3.0), alpha) == (2.0, 3.0)
    assert np.isnan(metrics._bca(2.0, np.full(5, np.nan), jack, alpha)).all()


@pytest.mark.parametrize("seed", range(4))
def test_every_interval_holds_its_estimate(seed):
    rng = np.random.default_rng(30 + seed)
    for n in (1, 3, 12, 45, 160):
        c = int(rng.integers(1, 7))
        y = (rng.random((n, c)) < rng.uniform(0.02, 0.6, c)).astype(np.uint8)
        s = np.round(rng.random((n, c)) * (0.4 + 0.5 * rng.random()) + 0.3 * y * rng.random(), 2)
        s[:, 0] = s[0, 0]  # a constant score column: ties everywhere
        scores = [s, np.clip(s + 0.2 * y, 0, 1)]
        cis = metrics.bootstrap_intervals(y, scores, n_boot=int(rng.integers(5, 200)), seed=seed)
        for ci in cis:
            for k, (point, lo, hi) in ci.items():
                if np.isfinite(point) and np.isfinite(lo):
                    assert lo <= point <= hi, (n, k, point, lo, hi)
                else:  # undefined on all images, or in every draw
                    assert np.isnan(lo) and np.isnan(hi), (n, k, point, lo, hi)


def test_draws_do_not_depend_on_the_chunk_size():
    y, s = make_data(n=60, c=4, seed=24, decimals=1)
    b = y.astype(bool)
    one = metrics._boot_draws(b, [s], 0.5, 37, 5, metrics.METRIC_NAMES, jackknife=25)
    small = metrics._boot_draws(b, [s], 0.5, 37, 5, metrics.METRIC_NAMES, 1, jackknife=25)
    for part, other in zip(one, small):
        for k in metrics.METRIC_NAMES:
            np.testing.assert_allclose(part[k], other[k], atol=1e-12, err_msg=k)
    groups = metrics._jackknife_groups(60, 5, 25)
    assert sorted(np.bincount(groups)) == [2] * 15 + [3] * 10  # 25 blocks of 2 or 3 images
    ref = metrics.compute_all(y[groups != 3], s[groups != 3])
    for k in metrics.METRIC_NAMES:  # a jackknife value is the metric without its block
        assert one[1][k][0, 3] == pytest.approx(ref[k], abs=1e-12), k


def test_paired_bootstrap_p_agrees_with_its_interval():
    y, s = make_data(n=200, c=5, seed=25)
    rng = np.random.default_rng(25)
    for shift in (0.0, 0.01, 0.02, 0.04):
        b = np.clip(s + shift * (y - 0.5) + rng.normal(0, 0.05, s.shape), 0, 1)
        for m in metrics.BOOT_METRICS:
            for alpha in (0.05, 0.2):
                r = metrics.paired_bootstrap(y, s, b, n_boot=300, seed=1, metric=m, alpha=alpha)
                assert r["low"] <= r["diff"] <= r["high"] and r["interval"] == "BCa"
                assert (r["p"] < alpha) == (not r["low"] <= 0 <= r["high"]), (shift, m, alpha, r)
                assert 0 < r["p"] <= 1


def test_paired_test_matches_scipy_and_flags_planted_gain():
    rng = np.random.default_rng(14)
    a = 60 + rng.normal(0, 1.0, 5)  # per-fold mAP in points
    noise = rng.normal(0, 0.5, 5)
    for b in (a + 2 + noise, a + rng.normal(0, 3, 5)):
        got, ref = metrics.paired_test(a, b), scipy.stats.ttest_rel(b, a)
        assert got["t"] == pytest.approx(ref.statistic, rel=1e-10)
        assert got["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert got["n"] == 5 and got["mean_diff"] == pytest.approx(np.mean(b - a))
        assert got["std_diff"] == pytest.approx(np.std(b - a, ddof=1))
    assert metrics.paired_test(a, a + 2 + noise)["p"] < 0.05  # +2 points across 5 folds
    assert metrics.paired_test(a, a + noise - noise.mean())["p"] > 0.5  # zero mean improvement


def brute_retrieval_map(qc, ql, dc, dl, k=None):
    """Textbook loops: sign codes, Hamming distance, ties in db index order, AP@k over the retrieved
    relevants."""

    def sign(v):
        return [1 if x >= 0 else -1 for x in v]

    aps = []
    for q in range(len(qc)):
        cq = sign(qc[q])
        dist = [sum(u != v for u, v in zip(cq, sign(dc[j]))) for j in range(len(dc))]
        ranked = sorted(range(len(dc)), key=lambda j: (dist[j], j))[: k or len(dc)]
        hits, total = 0, 0.0
        for r, j in enumerate(ranked, 1):
            if any(ql[q][c] and dl[j][c] for c in range(len(ql[q]))):
                hits += 1
                total += hits / r
        aps.append(total / hits if hits else 0.0)
    return float(np.mean(aps))


def test_retrieval_map_brute_force():
    rng = np.random.default_rng(15)
    qc, dc = rng.normal(size=(9, 6)), rng.normal(size=(50, 6))  # 6 bits: many distance ties
    dc[3, 2] = 0.0  # a zero counts as +1
    ql = (rng.random((9, 5)) < 0.25).astype(np.uint8)
    dl = (rng.random((50, 5)) < 0.25).astype(np.uint8)
    ql[0] = 0  # a query with no relevant item scores 0
    for k in (None, 1, 7, 50, 500):
        want = brute_retrieval_map(qc, ql, dc, dl, k)
        assert retrieval.retrieval_map(qc, ql, dc, dl, k=k) == pytest.approx(want, abs=1e-12)
        assert retrieval.retrieval_map(
            qc, ql, dc, dl, k=k, ties="stable", max_elems=70
        ) == pytest.approx(want, abs=1e-12)
    signed = np.where(qc >= 0, 1, -1).astype(np.int8)  # {-1,+1} int8 codes give the same ranking
    assert retrieval.retrieval_map(signed, ql, dc, dl) == pytest.approx(
        brute_retrieval_map(qc, ql, dc, dl)
    )
    with pytest.raises(ValueError):
        retrieval.retrieval_map((qc > 0).astype(np.uint8), ql, dc, dl)

"""The references bench.py times the product against, each written the textbook or the library way
and computing what the product computes (bench.py reports the largest difference beside the times):

    references.sklearn_metrics(y, s)             # scikit-learn's calls for metrics.compute_all
    references.naive_knn(q, db, labels, k)       # the full-matrix vote for knn.knn_scores
    references.calc_top_map(q, ql, db, dl, k)    # DeepHash-pytorch's CalcTopMap (retrieval_map)
"""

import numpy as np


def sklearn_metrics(y, s, threshold=0.5):
    """The scikit-learn calls that compute_all replaces, under metrics.METRIC_NAMES."""
    from sklearn import metrics as skm

    p, avgs = (s > threshold).astype(np.uint8), ("macro", "micro")
    out = {
        f"{name}_{a}": f(y, p, average=a, zero_division=0)
        for a in avgs
        for name, f in (
            ("f1", skm.f1_score),
            ("precision", skm.precision_score),
            ("recall", skm.recall_score),
        )
    }
    out.update(
        {
            f"{name}_{a}": f(y, s, average=a)
            for a in avgs
            for name, f in (("mAP", skm.average_precision_score), ("auc", skm.roc_auc_score))
        }
    )
    return dict(
        out,
        hamming_loss=skm.hamming_loss(y, p),
        coverage_error=skm.coverage_error(y, s),
        ranking_loss=skm.label_ranking_loss(y, s),
        lrap=skm.label_ranking_average_precision_score(y, s),
        mae=skm.mean_absolute_error(y, s),
    )


def naive_knn(q, db, labels, k, tau=0.07):
    """The textbook vote: the full (Q, N) similarity matrix, whole rows sorted (stable: lower index
    first on a tie, knn_scores' rule), softmax weights. Similarity (1 + q.d / |q|_1) / 2, as
    knn_scores defines it."""
    sim = (1 + q @ db.T / np.abs(q).sum(1, keepdims=True)) / 2  # (Q, N) float32
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (Q, k)
    w = np.exp((np.take_along_axis(sim, top, 1) - 1) / tau)
    return (w[:, :, None] * labels[top]).sum(1) / w.sum(1, keepdims=True)  # (Q, C)


def calc_top_map(q_codes, q_labels, db_codes, db_labels, topk):
    """DeepHash-pytorch's CalcTopMap, one query at a time, with a stable sort (ties in database
    order, as retrieval_map's ties='stable'); a query without a relevant item in its top k scores 0
    (empty='zero')."""
    bits, total = q_codes.shape[1], 0.0
    for i in range(len(q_codes)):
        gnd = (q_labels[i] @ db_labels.T > 0).astype(np.float32)  # (N,) shares a label
        tgnd = gnd[np.argsort(0.5 * (bits - q_codes[i] @ db_codes.T), kind="stable")][
            :topk
        ]  # by Hamming distance
        tsum = int(tgnd.sum())
        if tsum:
            total += np.mean(np.arange(1, tsum + 1) / (np.flatnonzero(tgnd) + 1.0))
    return total / len(q_codes)

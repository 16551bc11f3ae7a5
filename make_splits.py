"""Development / test split and K validation folds of a COCO 2014 evaluation protocol ->
splits.json.

--protocol picks the dev / test images (protocols.py holds the rules): karpathy_cv (default, the
thesis's) dev = Karpathy train + restval + val (118,287), test = Karpathy test (5,000); coco2014
(the classification literature) dev = labelled train2014 (82,081), test = labelled val2014 (40,137);
hashnet (the hashing literature) dev = HashNet's 10,000 training images, test = its 5,000 queries,
plus a retrieval `database` of every labelled 2014 image that is not a query. The dev pool is cut
into --folds validation folds (for model selection only); fold k trains on dev minus val_folds[k].
Stratified folds use iterative stratification for multi-label data (Sechidis, Tsoumakas, Vlahavas
2011), so even the rarest classes (hair drier, toaster: ~200 images) are spread evenly; `random` is
a plain shuffled KFold, for comparison.

Usage:
    python make_splits.py --data_root data/coco                       # -> data/coco/splits.json
    python make_splits.py --data_root data/coco --method random --out data/coco/splits_random.json
    python make_splits.py --data_root data/coco --protocol coco2014 \
        --out data/coco/splits_coco2014.json
    python make_splits.py --data_root data/coco --protocol hashnet --lists data/hashnet \
        --out data/coco/splits_hashnet.json                 # reads data/hashnet/{train,test}.txt
"""

import os

import numpy as np

import cli
import data
import protocols


def get_args_parser():
    p = cli.Parser("make_splits", description=__doc__.split("\n\n")[0])
    # data
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_root",
        default="data/coco",
        help="COCO folder with dataset_coco.json and annotations/instances_{train,val}2014.json",
    )
    g.add_argument(
        "--protocol",
        default="karpathy_cv",
        choices=protocols.PROTOCOLS,
        help="which images are dev / test (/ database); see protocols.py",
    )
    g.add_argument(
        "--lists",
        default=None,
        help="hashnet only: folder with HashNet's train.txt and test.txt",
    )
    g.add_argument(
        "--folds",
        type=cli.number(int, 2),
        default=5,
        help="number of cross-validation folds (>= 2)",
    )
    g.add_argument(
        "--seed", type=int, default=42, help="seed of the fold assignment; same seed, same file"
    )
    g.add_argument(
        "--method",
        default="stratified",
        choices=["stratified", "random"],
        help="stratified (iterative stratification, Sechidis 2011) or random (shuffled KFold)",
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument(
        "--out", default="<data_root>/splits.json", help="where to write the splits json"
    )
    return p


def _take_top(level, prio, m):
    """Greedy 'give the next item to the fold with the highest level' m times, in closed form.

    level: float [K] (remaining desired count), prio: float [K] tie-break (higher first). The greedy
    takes the values level[j], level[j]-1, level[j]-2, ... of all folds in descending order, so fold
    j's share is how many of its values are among the m largest. -> int64 [K] counts summing to m.
    """
    k = len(level)
    steps = np.arange(m)
    vals = (level[:, None] - steps[None, :]).ravel()  # (K*m,)
    fold = np.repeat(np.arange(k), m)
    order = np.lexsort((-prio[fold], -vals))[:m]  # value desc, then prio desc
    return np.bincount(fold[order], minlength=k)


def iterative_stratification(labels, n_folds, seed):
    """Sechidis et al. (2011) iterative stratification -> int64 [N] fold index of each row.

    labels: uint8/bool [N, C]. Repeatedly takes the label with the fewest not-yet-assigned examples
    and deals those examples to the folds that most lack that label (ties: the fold that lacks most
    examples overall, then random), updating every fold's desired per-label counts. The paper deals
    the block one example at a time in random order; because the fold choice depends only on the
    counts, the block's share per fold is computed at once (_take_top) and dealt to the randomly
    ordered examples: the same algorithm, ~100x faster than a per-example loop (80 blocks instead of
    N steps).
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels).astype(bool)
    n, c = y.shape
    perm = rng.permutation(n)  # random example order
    yp = y[perm]
    want = np.full(n_folds, n / n_folds)  # desired fold sizes
    want_lab = np.outer(np.full(n_folds, 1.0 / n_folds), yp.sum(0))  # (K, C) desired label counts
    left = np.ones(n, bool)
    left_count = yp.sum(0).astype(np.int64)  # (C,) unassigned positives
    fold_of = np.full(n, -1, np.int64)
    while left_count.sum() > 0:
        cand = np.flatnonzero(left_count == left_count[left_count > 0].min())
        lab = cand[rng.integers(len(cand))] if len(cand) > 1 else cand[0]  # rarest, ties random
        block = np.flatnonzero(left & yp[:, lab])  # its examples, random order
        # tie-break: most missing examples overall, then a random fold order
        prio = np.round(want - want_lab[:, lab], 6) + rng.permutation(n_folds) * 1e-8
        share = _take_top(want_lab[:, lab].copy(), prio, len(block))
        assign = np.repeat(np.arange(n_folds), share)
        fold_of[block] = assign
        for j in range(n_folds):
            rows = yp[block[assign == j]]
            want_lab[j] -= rows.sum(0)
            want[j] -= len(rows)
        left[block] = False
        left_count -= yp[block].sum(0)
    rest = np.flatnonzero(left)  # examples without labels
    if len(rest):
        share = _take_top(want.copy(), rng.permutation(n_folds) * 1e-9, len(rest))
        fold_of[rest] = np.repeat(np.arange(n_folds), share)
    out = np.empty(n, np.int64)
    out[perm] = fold_of
    return out


def random_folds(n, n_folds, seed):
    """Plain shuffled KFold -> int64 [N] fold index (fold sizes differ by at most one)."""
    rng = np.random.default_rng(seed)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    out = np.empty(n, np.int64)
    out[rng.permutation(n)] = np.repeat(np.arange(n_folds), sizes)
    return out


def fold_deviation(labels, fold_of, n_folds):
    """Relative deviation |p_fold - p_pool| / p_pool of every class's prevalence in each val fold.

    -> float [K, C]; classes without positives in the pool are NaN.
    """
    y = np.asarray(labels).astype(np.float64)
    pool = y.mean(0)
    prev = np.stack([y[fold_of == k].mean(0) for k in range(n_folds)])  # (K, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pool > 0, np.abs(prev - pool) / pool, np.nan)


def print_summary(args, categories, dev_y, fold_of, counts, out):
    """Per-fold table: the rarest class (fewest dev positives) and the worst class deviation per
    fold."""
    dev_pos = dev_y.sum(0)
    present = np.flatnonzero(dev_pos > 0)
    rare = present[np.argmin(dev_pos[present])] if len(present) else 0
    dev_rel = fold_deviation(dev_y, fold_of, args.folds)  # (K, C)
    extra = f"; database {counts['database']}" if "database" in counts else ""
    print(
        f"{args.protocol}: {args.method} {args.folds}-fold split of {counts['dev']} dev images "
        f"(seed {args.seed}); test {counts['test']}{extra}; rarest class "
        f"'{categories[rare]['name']}' ({int(dev_pos[rare])} dev positives)"
    )
    print(
        f"{'fold':>4} {'train':>8} {'val':>7} {'rare_train':>10} {'rare_val':>8} "
        f"{'max_rel_dev':>11} {'mean_rel_dev':>12}"
    )
    for k in range(args.folds):
        val = fold_of == k
        rv = int(dev_y[val, rare].sum())
        row = dev_rel[k][present] if len(present) else np.zeros(1)
        print(
            f"{k:>4} {len(dev_y) - int(val.sum()):>8} {int(val.sum()):>7} "
            f"{int(dev_pos[rare]) - rv:>10} {rv:>8} {100 * np.max(row):>10.2f}% "
            f"{100 * np.mean(row):>11.3f}%"
        )
    print(f"wrote {out}")


def main(args):
    out = (
        os.path.join(args.data_root, "splits.json")
        if args.out == "<data_root>/splits.json"
        else args.out
    )
    if args.lists is not None and args.protocol != "hashnet":
        cli.fail(
            f"--lists is only read by --protocol hashnet (got --protocol {args.protocol}); "
            f"drop --lists"
        )
    try:
        coco = data.load_dataset(args.data_root)
        parts = protocols.select(coco, args.protocol, args.lists)  # row indices, ascending
    except data.DataError as e:
        cli.fail(e)
    ids, labels = coco["ids"], coco["labels"]
    dev, test = parts["dev"], parts["test"]
    assert not np.intersect1d(dev, test).size, "dev and test overlap"
    if len(dev) < args.folds:
        cli.fail(
            f"{args.data_root}: only {len(dev)} development images ({args.protocol}) for "
            f"{args.folds} folds"
        )
    dev_ids, dev_y = ids[dev], labels[dev]  # ids ascending
    if args.method == "stratified":
        fold_of = iterative_stratification(dev_y, args.folds, args.seed)
    else:
        fold_of = random_folds(len(dev_ids), args.folds, args.seed)

    val_folds = [dev_ids[fold_of == k].tolist() for k in range(args.folds)]
    stats = [
        {"size": len(v), "positives": dev_y[fold_of == k].sum(0).astype(int).tolist()}
        for k, v in enumerate(val_folds)
    ]
    # key order: the karpathy_cv file is today's file plus `protocol` in front and `counts` at the
    # end
    result = {
        "protocol": args.protocol,
        "method": args.method,
        "folds": args.folds,
        "seed": args.seed,
        "categories": coco["categories"],
        "dev": dev_ids.tolist(),
        "test": ids[test].tolist(),
    }
    if "database" in parts:
        result["database"] = ids[parts["database"]].tolist()
    result.update(val_folds=val_folds, stats=stats)
    result["counts"] = {k: len(result[k]) for k in ("dev", "test", "database") if k in result}
    data.save_json(out, result)
    print_summary(args, coco["categories"], dev_y, fold_of, result["counts"], out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Development / test split and K validation folds of the COCO Karpathy pool -> splits.json.

Dev = Karpathy train + restval + val (118,287 images), test = Karpathy test (5,000). The dev pool is cut
into --folds validation folds; fold k trains on dev minus val_folds[k]. Stratified folds use iterative
stratification for multi-label data (Sechidis, Tsoumakas, Vlahavas 2011), so even the rarest classes
(hair drier, toaster: ~200 images) are spread evenly; `random` is a plain shuffled KFold, for comparison.

Usage:
    python make_splits.py --data_root data/coco                       # -> data/coco/splits.json
    python make_splits.py --data_root data/coco --method random --out data/coco/splits_random.json
"""
import os

import numpy as np

import cli
import data


def get_args_parser():
    p = cli.Parser("make_splits", description=__doc__.split("\n\n")[0])
    # data
    g = p.add_argument_group("data")
    g.add_argument("--data_root", default="data/coco",
                   help="COCO folder with dataset_coco.json and annotations/instances_{train,val}2014.json")
    g.add_argument("--folds", type=cli.number(int, 2), default=5, help="number of cross-validation folds (>= 2)")
    g.add_argument("--seed", type=int, default=42, help="seed of the fold assignment; same seed, same file")
    g.add_argument("--method", default="stratified", choices=["stratified", "random"],
                   help="stratified: iterative stratification (Sechidis 2011) keeps every class's prevalence "
                        "equal across folds; random: plain shuffled KFold")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out", default="<data_root>/splits.json", help="where to write the splits json")
    return p


def _take_top(level, prio, m):
    """Greedy 'give the next item to the fold with the highest level' m times, in closed form.

    level: float [K] (remaining desired count), prio: float [K] tie-break (higher first). The greedy takes
    the values level[j], level[j]-1, level[j]-2, ... of all folds in descending order, so fold j's share
    is how many of its values are among the m largest. -> int64 [K] counts summing to m.
    """
    k = len(level)
    steps = np.arange(m)
    vals = (level[:, None] - steps[None, :]).ravel()                              # (K*m,)
    fold = np.repeat(np.arange(k), m)
    order = np.lexsort((-prio[fold], -vals))[:m]                                  # value desc, then prio desc
    return np.bincount(fold[order], minlength=k)


def iterative_stratification(labels, n_folds, seed):
    """Sechidis et al. (2011) iterative stratification -> int64 [N] fold index of each row.

    labels: uint8/bool [N, C]. Repeatedly takes the label with the fewest not-yet-assigned examples and
    deals those examples to the folds that most lack that label (ties: the fold that lacks most examples
    overall, then random), updating every fold's desired per-label counts. The paper deals the block one
    example at a time in random order; because the fold choice depends only on the counts, the block's
    share per fold is computed at once (_take_top) and dealt to the randomly ordered examples: the same
    algorithm, ~100x faster than a per-example loop (80 blocks instead of N steps).
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels).astype(bool)
    n, c = y.shape
    perm = rng.permutation(n)                                                     # random example order
    yp = y[perm]
    want = np.full(n_folds, n / n_folds)                                          # desired fold sizes
    want_lab = np.outer(np.full(n_folds, 1.0 / n_folds), yp.sum(0))               # (K, C) desired label counts
    left = np.ones(n, bool)
    left_count = yp.sum(0).astype(np.int64)                                       # (C,) unassigned positives
    fold_of = np.full(n, -1, np.int64)
    while left_count.sum() > 0:
        cand = np.flatnonzero(left_count == left_count[left_count > 0].min())
        lab = cand[rng.integers(len(cand))] if len(cand) > 1 else cand[0]       # rarest label, ties random
        block = np.flatnonzero(left & yp[:, lab])                                 # its examples, random order
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
    rest = np.flatnonzero(left)                                                   # examples without labels
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
    sizes[:n % n_folds] += 1
    out = np.empty(n, np.int64)
    out[rng.permutation(n)] = np.repeat(np.arange(n_folds), sizes)
    return out


def fold_deviation(labels, fold_of, n_folds):
    """Relative deviation |p_fold - p_pool| / p_pool of every class's prevalence in each val fold.

    -> float [K, C]; classes without positives in the pool are NaN.
    """
    y = np.asarray(labels).astype(np.float64)
    pool = y.mean(0)
    prev = np.stack([y[fold_of == k].mean(0) for k in range(n_folds)])            # (K, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pool > 0, np.abs(prev - pool) / pool, np.nan)


def main(args):
    out = os.path.join(args.data_root, "splits.json") if args.out == "<data_root>/splits.json" else args.out
    try:
        coco = data.load_coco(args.data_root)
    except data.DataError as e:
        cli.fail(e)
    splits = np.asarray(coco["splits"])
    dev_mask, test_mask = splits != "test", splits == "test"
    ids, labels = coco["ids"], coco["labels"]
    assert not set(ids[dev_mask].tolist()) & set(ids[test_mask].tolist()), "dev and test overlap"
    if dev_mask.sum() < args.folds:
        cli.fail(f"{args.data_root}: only {dev_mask.sum()} development images for {args.folds} folds")
    dev_ids, dev_y = ids[dev_mask], labels[dev_mask]                               # ids ascending
    if args.method == "stratified":
        fold_of = iterative_stratification(dev_y, args.folds, args.seed)
    else:
        fold_of = random_folds(len(dev_ids), args.folds, args.seed)

    val_folds = [dev_ids[fold_of == k].tolist() for k in range(args.folds)]
    stats = [{"size": len(v), "positives": dev_y[fold_of == k].sum(0).astype(int).tolist()}
             for k, v in enumerate(val_folds)]
    result = {"method": args.method, "folds": args.folds, "seed": args.seed, "categories": coco["categories"],
              "dev": dev_ids.tolist(), "test": ids[test_mask].tolist(), "val_folds": val_folds, "stats": stats}
    data.save_json(out, result)

    # per-fold table: the rarest class (fewest dev positives) and the worst class deviation per fold
    dev_pos = dev_y.sum(0)
    present = np.flatnonzero(dev_pos > 0)
    rare = present[np.argmin(dev_pos[present])] if len(present) else 0
    dev_rel = fold_deviation(dev_y, fold_of, args.folds)                          # (K, C)
    print(f"{args.method} {args.folds}-fold split of {len(dev_ids)} dev images (seed {args.seed}); "
          f"test {int(test_mask.sum())}; rarest class '{coco['categories'][rare]['name']}' "
          f"({int(dev_pos[rare])} dev positives)")
    print(f"{'fold':>4} {'train':>8} {'val':>7} {'rare_train':>10} {'rare_val':>8} {'max_rel_dev':>11} "
          f"{'mean_rel_dev':>12}")
    for k in range(args.folds):
        rv = int(stats[k]["positives"][rare])
        row = dev_rel[k][present] if len(present) else np.zeros(1)
        print(f"{k:>4} {len(dev_ids) - stats[k]['size']:>8} {stats[k]['size']:>7} {int(dev_pos[rare]) - rv:>10} "
              f"{rv:>8} {100 * np.max(row):>10.2f}% {100 * np.mean(row):>11.3f}%")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

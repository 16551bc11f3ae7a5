"""The study's backbone table: the same splits and head flags on each backbone's own cache
(study.py --backbones), one row per backbone and method. study.py calls write(); bad result files
raise data.DataError.

    sections = []
    backbones.write(out, {model: {method: run}}, args, sections)   # runs: aggregate.read_run's

backbones.{md,csv,tex}: per backbone and method (hash head, --bits 0, linear probe, zero-shot, and
the hash head's KNN head): CV mAP (macro) mean ± std over the folds, the test ensemble's mAP with
its bootstrap interval, and a paired bootstrap test against the same method on the first backbone
(the same test images). backbone_cost.{md,csv,tex}: per backbone its checkpoint, family, embedding
dim and input resolution (the cache's metadata), the extraction's images/s (<cache>.cost.json) and
the cache's size.
"""

import os

import numpy as np

import data
import extract_features
import metrics
import report
from report.sections import ci_text, load_eval, table

METHODS = {  # the table's methods: (study run, head), as the table names them
    "hash head": ("hash64", "mlp"),
    "--bits 0": ("bits0", "mlp"),
    "linear probe": ("probe", "mlp"),
    "zero-shot": ("zeroshot", "mlp"),
    "KNN head": ("hash64", "knn"),
}


def cost_cells(cfg):
    """A run's config -> [images/s of the extraction that wrote its cache, the cache in MB]."""
    path = cfg.get("features") or ""
    cost, speed = extract_features.cost_path(path), "-"
    if os.path.isfile(cost):
        c = data.read_json(cost, "the extraction's cost", "delete it or re-run extract_features.py")
        speed = f"{c['images_per_s']:.1f} ({c['ranks']} rank(s), {c['device']})"
    size = f"{os.path.getsize(path) / 2**20:.1f}" if os.path.isfile(path) else "-"
    return [speed, size]


def backbone_cells(r):
    meta = r["config"].get("features_meta") or {}
    return [meta.get(k, "-") for k in ("model", "family", "dim", "resolution")]


def test_probs(r, head, test_dir):
    """-> (y, the test ensemble's probabilities of `head`) or None."""
    ev = load_eval(r, test_dir)
    if ev is None or head not in ev["heads"]:
        return None
    return ev["y"], ev["heads"][head][-1][1]


def rows_of(by_backbone, args):
    """{model: {study run name: aggregate run}} -> the table's rows, first backbone first."""
    rows, first = [], next(iter(by_backbone), None)
    for model, runs in by_backbone.items():
        for method, (name, head) in METHODS.items():
            r = runs.get(name)
            if r is None or not r["heads"].get(head):
                continue
            cv = np.array([f["mAP_macro"] for f in r["heads"][head].values()])
            cv_cell = report.MeanStd(cv.mean(), cv.std(ddof=1) if len(cv) > 1 else np.nan)
            got, test, diff, p = test_probs(r, head, args.test_dir), "-", "-", "-"
            if got is not None:
                y, probs = got
                if args.bootstrap:
                    ci = metrics.bootstrap_intervals(
                        y, [probs], n_boot=args.bootstrap, seed=args.seed
                    )
                    test = report.Interval(*ci[0]["mAP_macro"])
                else:
                    test = metrics.compute_all(y, probs)["mAP_macro"]
                ref = by_backbone[first].get(name)
                ref = (
                    None if ref is None or model == first else test_probs(ref, head, args.test_dir)
                )
                if model == first:
                    diff = "reference"
                elif ref is not None and args.bootstrap and np.array_equal(ref[0], y):
                    t = metrics.paired_bootstrap(
                        y, ref[1], probs, n_boot=args.bootstrap, seed=args.seed, metric="mAP_macro"
                    )
                    diff = report.Interval(*(100 * t[k] for k in ("diff", "low", "high")))
                    p = f"{t['p']:.3g}"
            rows.append([model, method, cv_cell, test, diff, p])
    return rows, first


def cost_rows(by_backbone):
    """One row per backbone: checkpoint, family, dim, input, extraction images/s, cache MB."""
    return [
        [*backbone_cells(r), *cost_cells(r["config"])]
        for r in (next(iter(runs.values())) for runs in by_backbone.values() if runs)
    ]


def write(out, by_backbone, args, sections):
    """backbones.* in out when two or more backbones have results, recorded in sections -> the
    rows."""
    rows, first = rows_of(by_backbone, args)
    if len({row[0] for row in rows}) < 2:
        return []
    header = ["backbone", "method", "CV mAP_macro", "test mAP_macro", "- first (points)", "p"]
    table(
        out,
        "backbones",
        header,
        rows,
        f"Backbones on the same splits and head flags (%): CV mean ± std over folds, test ensemble "
        f"[{ci_text(args.bootstrap)}], paired bootstrap against the same method on the first "
        f"backbone, {first}",
        sections,
        "Backbones",
        percent=["CV mAP_macro", "test mAP_macro"],
        digits=1,
        keys=2,
    )
    text = sections[-1]
    header = ["backbone", "family", "dim", "input", "extraction images/s", "cache MB"]
    table(
        out,
        "backbone_cost",
        header,
        cost_rows(by_backbone),
        "What each backbone cost: the extraction that wrote its cache (images/s: decode + towers, "
        "its ranks and device; - where every shard was already on disk) and the cache's size",
        sections,
        "Backbones: cost",
        percent=False,
        keys=1,
    )

    def pct(cell):  # a test cell as the sentence prints it
        if isinstance(cell, report.Interval):
            return f"{100 * cell[0]:.1f} [{100 * cell[1]:.1f}, {100 * cell[2]:.1f}]"
        return cell if isinstance(cell, str) else f"{100 * cell:.1f}"

    said = [
        f"{row[0]} {pct(row[3])}" + ("" if row[5] == "-" else f" (p = {row[5]} against {first})")
        for row in rows
        if row[1] == "hash head"
    ]
    text["text"] = f"The hash head's test mAP_macro (%) by backbone: {'; '.join(said)}."
    return rows

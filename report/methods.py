"""The study's "methods" and "hashing" tables: the literature's methods run on our cache, splits and
evaluation (train.py --head mlgcn, --hash_loss csq|dpsh|hashnet, --baseline, --bits 0) beside our
head. study.py calls write(); bad result files raise data.DataError.

    sections = []
    methods.write(out, runs, args, sections)   # runs: aggregate.read_run's; args: test_dir, ...

methods.{md,csv,tex}: every classification run (hash head, --bits 0, probe, zero-shot, ML-GCN),
CV mAP (macro) mean ± std over the folds, the test ensemble's mAP with its bootstrap interval, and
a paired bootstrap test of each against the first run (the reference). hashing.{md,csv,tex}: every
run with codes (our head and the hashing losses) at its bits, the test retrieval mAP@k and mAP@all
(mean ± std over the fold models, evaluate.py's protocol rule), then the literature's published
mAP@5000 rows (report.literature.RETRIEVAL), each with its source. A row of ours holds only our
numbers; every row names its backbone, resolution and fine-tuning.
"""

import os

import numpy as np

import metrics
import report
from report import literature
from report.sections import ci_text, load_eval, table

HASH_NAMES = {"csq": "CSQ", "dpsh": "DPSH", "hashnet": "HashNet"}


def method_of(cfg):
    """config.json -> (family, method name as the table prints it)."""
    args = cfg.get("model_args") or {}
    bits = args.get("bits", cfg.get("bits", 0))
    if cfg.get("baseline", "none") == "probe":
        return "classification", "linear probe (logistic regression)"
    if cfg.get("baseline", "none") == "zeroshot":
        return "classification", "zero-shot (SigLIP2 prompts)"
    if args.get("head") == "mlgcn":
        graph = "" if args.get("graph", True) else " without the graph"
        return "classification", f"ML-GCN{graph} (class nodes: prompt embeddings, not GloVe)"
    if args.get("head") == "hashlayer":
        return "hashing", f"{HASH_NAMES.get(args.get('hash_loss'), args.get('hash_loss'))} " + (
            "(plain hash layer)"
        )
    if not bits:
        return "classification", "no hash layer (--bits 0)"
    return "classification", f"hash head ({bits} bits)"


def _setting(r, test_dir):
    cells, _ = literature._ours(r, test_dir)
    return [cells["backbone"], cells["resolution"], cells["fine_tuned"], cells["inputs"]]


def _one_head_per_input(runs):
    """{inputs: the hash-head run of the table}: the first (the reference), and for every other
    input the run at the reference's bits (else that input's first)."""
    heads = [r for r in runs if method_of(r["config"])[1].startswith("hash head")]

    def bits(r):
        return (r["config"].get("model_args") or {}).get("bits")

    keep = {}
    for r in heads:
        i = r["config"].get("inputs", "both")
        if i not in keep or (bits(r) == bits(heads[0]) != bits(keep[i])):
            keep[i] = r
    return keep


def methods_rows(runs, args):
    """-> rows of methods.*: method, setting, CV mAP, test mAP [interval], paired test vs the first
    classification run with test predictions."""
    rows, ref = [], None
    keep = _one_head_per_input(runs)
    for r in runs:
        family, name = method_of(r["config"])
        if family != "classification" or not r["heads"].get("mlp"):
            continue
        if name.startswith("hash head") and r is not keep.get(r["config"].get("inputs", "both")):
            continue  # the other hash heads are the ablations' business
        cv = np.array([f["mAP_macro"] for f in r["heads"]["mlp"].values()])
        cv_cell = report.MeanStd(cv.mean(), cv.std(ddof=1) if len(cv) > 1 else np.nan)
        ev = load_eval(r, args.test_dir)
        test, diff, p = "-", "-", "-"
        if ev is not None and "mlp" in ev["heads"]:
            probs = ev["heads"]["mlp"][-1][1]  # the ensemble
            if args.bootstrap:
                ci = metrics.bootstrap_intervals(
                    ev["y"], [probs], n_boot=args.bootstrap, seed=args.seed
                )[0]
                test = report.Interval(*ci["mAP_macro"])
            else:
                test = metrics.compute_all(ev["y"], probs)["mAP_macro"]
            if ref is None:
                ref, diff, p = (r["label"], ev), "reference", "-"
            elif args.bootstrap and len(ev["y"]) == len(ref[1]["y"]):
                t = metrics.paired_bootstrap(
                    ev["y"],
                    ref[1]["heads"]["mlp"][-1][1],
                    probs,
                    n_boot=args.bootstrap,
                    seed=args.seed,
                    metric="mAP_macro",
                )
                diff = report.Interval(*(100 * t[k] for k in ("diff", "low", "high")))
                p = f"{t['p']:.3g}"
        rows.append([name, r["label"], *_setting(r, args.test_dir), cv_cell, test, diff, p])
    return rows, ref[0] if ref else None


def _retrieval_cells(ret, key):
    members = [m for n, m in (ret or {}).items() if n != "mean" and key in m]
    if not members:
        return "-"
    v = np.array([m[key] for m in members])
    return report.MeanStd(v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan)


def hashing_rows(runs, test_dir):
    """-> (k, rows of hashing.*): ours at their bits (mAP@k, mAP@all), then the published rows."""
    ours, k = [], None
    for r in runs:
        bits = (r["config"].get("model_args") or {}).get("bits", 0)
        if not bits:
            continue
        ev = literature._json(os.path.join(r["dir"], test_dir, "metrics.json")) or {}
        ret = ev.get("retrieval")
        keys = [x for x in next(iter((ret or {}).values()), {}) if x != "mAP@all" and "_" not in x]
        k = k or (keys[0] if keys else None)
        src = f"{r['dir']}/{test_dir}/metrics.json" if ret else "no retrieval: evaluate.py"
        ours.append(
            [
                "ours",
                method_of(r["config"])[1],
                r["label"],
                *_setting(r, test_dir),
                bits,
                _retrieval_cells(ret, k) if k else "-",
                _retrieval_cells(ret, "mAP@all"),
                src,
            ]
        )
    published = [
        ["published", a["method"], "-", a["backbone"], a["resolution"], "yes", "image", b]
        + [f"{v:.3f} (mAP@5000, HashNet's lists)", "-", f"{a['source']}; rule: {a['rule']}"]
        for a in literature.RETRIEVAL
        for b, v in sorted(a["values"].items())
    ]
    return k, ours + published


def write(out, runs, args, sections):
    """methods.* and hashing.* in out (the tables that have rows), recorded in sections."""
    rows, ref = methods_rows(runs, args)
    if rows:
        table(
            out,
            "methods",
            [
                "method",
                "run",
                "backbone",
                "resolution",
                "fine-tuned",
                "inputs",
                "CV mAP_macro",
                "test mAP_macro",
                f"- {ref} (points)",
                "p",
            ],
            rows,
            f"Classification methods on the same cache, splits and evaluation (%): CV mean ± std "
            f"over folds, test ensemble [{ci_text(args.bootstrap)}], paired bootstrap against "
            f"{ref}",
            sections,
            "Methods: classification",
            percent=["CV mAP_macro", "test mAP_macro"],
            digits=1,
            keys=2,
        )
    k, hrows = hashing_rows(runs, args.test_dir)
    if any(row[0] == "ours" for row in hrows):
        table(
            out,
            "hashing",
            [
                "",
                "method",
                "run",
                "backbone",
                "resolution",
                "fine-tuned",
                "inputs",
                "bits",
                f"test {k or 'mAP@k'}",
                "test mAP@all",
                "source",
            ],
            hrows,
            f"Hashing methods on our cache and evaluation (test {k or 'mAP@k'}, mean ± std over "
            f"the fold models; empty query 0, ties in database order) beside the published "
            f"numbers, each with its source: published rows are never our runs",
            sections,
            "Methods: hashing",
            percent=False,
            digits=3,
            keys=2,
        )
    return [os.path.join(out, n) for n in ("methods", "hashing")]

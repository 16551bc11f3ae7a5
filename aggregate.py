"""
Cross-validation tables of both heads from train.py's fold folders, comparisons between runs
(ablations), and the runs beside the published numbers of their protocol (report/literature.py).

    python aggregate.py outputs/siglip2_hash64             # -> cv_results.csv, .md in the run
    python aggregate.py outputs/hash64 outputs/hash32 outputs/hash128   # + comparison.{md,csv}
    python aggregate.py outputs/run --allow_partial        # the finished folds only (partial)

A run is a folder of fold<k>/ folders from train.py. Fold k counts when its val_metrics.json exists
and its config.json (or last.pt) says training ended. Missing or unfinished folds are named and stop
the script with exit code 2 unless --allow_partial; a partial run is labelled "partial k/K" in every
table. The expected number of folds is --folds, else the "folds" of the splits file named in the
folds' config.json, else one more than the highest fold<k> found.

Heads: val_metrics.json holds the MLP head's 15 metrics at the top level and, for models with hash
bits, the KNN head's under "knn"; each head gets its mean +/- std over folds, and KNN is tested
against MLP with a paired t-test across folds (metrics.paired_test).
One run: cv_results.csv (rows fold_0..fold_{K-1}, mean, std with ddof=1, then knn_fold_k, knn_mean,
knn_std when the folds have a KNN head; columns the 15 metrics + best_epoch) and cv_results.md,
inside the run folder.
Several runs (the first is the reference): the same per run, plus in --out (default: the first run's
parent) comparison.csv / comparison.md (one row per run, mean +/- std per metric) and
comparison_tests.csv: for each run against the first, the mean over folds of (run - reference) with
a paired t-test across folds, and, when both runs have <run>/eval_test/test_predictions.npz
(evaluate.py --ensemble), a paired bootstrap on the test images (metrics.paired_bootstrap,
threshold 0.5: the BCa interval of the difference and its p, test_interval names the rule) for
metrics.BOOT_METRICS. Runs must share their splits file (config.json
splits_sha256), so fold k of every run was validated on the same images.
Literature: literature.{csv,md,tex} in the run folder (one run) or --out (several): our test numbers
(from <run>/eval_test/metrics.json) beside the anchors of the splits file's protocol (coco2014:
macro mAP on val2014; hashnet: mAP@5000 per bits and empty / tie rule; karpathy_cv: the table says
no published number uses it).
The study's report folder (every table and figure) is study.py's.
"""

import os
import sys

import numpy as np

import cli
import data
import metrics
import report
from report import literature
from runs import fold_dirs, fold_finished

COLUMNS = (*metrics.METRIC_NAMES, "best_epoch")


def get_args_parser():
    p = cli.Parser("aggregate", description="cross-validation tables and run comparisons")
    # data
    g = p.add_argument_group("data")
    g.add_argument(
        "runs",
        nargs="+",
        help="run folders (outputs/<run>) holding fold<k>/; the first is the reference",
    )
    g.add_argument(
        "--folds",
        type=cli.number(int, 2),
        default=None,
        help="expected folds per run; default: the 'folds' of the folds' splits file",
    )
    g.add_argument(
        "--allow_partial",
        action="store_true",
        help="tabulate the finished folds when some are missing or unfinished (still named)",
    )
    g.add_argument(
        "--test_dir",
        default="eval_test",
        help="evaluate.py's out_dir inside each run (test predictions)",
    )
    # statistics
    g = p.add_argument_group("statistics")
    g.add_argument(
        "--bootstrap",
        type=cli.nonneg_int,
        default=1000,
        help="paired-bootstrap draws on the test images (0 = skip the test comparison)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="bootstrap seed (fixed, so p-values are repeatable)"
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument(
        "--out",
        default=None,
        help="folder for comparison.* (several runs); default: first run's parent",
    )
    return p


# ----------------------------------------------------------------------------- reading


FOLD_FIX = "re-run that fold with train.py --resume"


def read_run(run, args):
    """-> {"name", "dir", "folds": {k: val_metrics dict}, "expected": K, "problems": [str],
    "sha": str|None, ...}; an unreadable JSON file: data.DataError."""
    if not os.path.isdir(run):
        cli.fail(
            f"{run}: not a directory; pass run folders written by train.py --out_dir <run>/fold<k>"
        )
    dirs = fold_dirs(run)
    if not dirs:
        cli.fail(f"{run}: no fold<k>/ folders; train folds with train.py --out_dir {run}/fold<k>")
    configs = {
        k: data.read_json(os.path.join(d, "config.json"), "the fold's config", FOLD_FIX)
        for k, d in dirs.items()
        if os.path.isfile(os.path.join(d, "config.json"))
    }
    expected = args.folds
    for cfg in configs.values():  # the splits file says how many folds there are
        if expected is None and cfg.get("splits") and os.path.isfile(cfg["splits"]):
            expected = data.read_json(cfg["splits"], "the splits file", "re-run make_splits.py")
            expected = expected.get("folds")
    expected = expected or max(dirs) + 1
    shas = {cfg.get("splits_sha256") for cfg in configs.values()} - {None}
    if len(shas) > 1:
        cli.fail(
            f"{run}: its folds were trained with different splits files (splits_sha256 differ); "
            f"re-train them"
        )
    folds, knn_folds, problems = {}, {}, []
    for k in range(expected):
        if k not in dirs:
            problems.append(f"fold{k} missing")
        elif not fold_finished(dirs[k]):
            problems.append(f"fold{k} unfinished")
        else:
            vm = data.read_json(os.path.join(dirs[k], "val_metrics.json"), "JSON", FOLD_FIX)
            knn = vm.get("knn")
            absent = [
                m for m in metrics.METRIC_NAMES if m not in vm or (knn is not None and m not in knn)
            ]
            if absent:
                cli.fail(
                    f"{dirs[k]}/val_metrics.json: metrics {absent} missing; "
                    f"re-run the fold with this train.py"
                )
            folds[k] = dict(vm, best_epoch=vm.get("epoch", float("nan")))
            if knn is not None:  # chosen at the MLP head's best epoch: the same one
                knn_folds[k] = dict(knn, best_epoch=folds[k]["best_epoch"])
    extra = sorted(set(dirs) - set(range(expected)))
    if extra:
        problems.append(f"fold{extra[0]} and up are beyond the {expected} folds expected (ignored)")
    name = os.path.normpath(run)
    partial = f"partial {len(folds)}/{expected}" if problems and len(folds) < expected else ""
    return {
        "name": name,
        "dir": run,
        "folds": folds,
        "heads": {"mlp": folds, "knn": knn_folds},
        "expected": expected,
        "problems": problems,
        "sha": shas.pop() if shas else None,
        "dirs": dirs,
        "partial": partial,
        "config": configs[min(configs)] if configs else {},
        "label": os.path.basename(name) + (f" ({partial})" if partial else ""),
    }


# ----------------------------------------------------------------------------- tables


def summary(r, head="mlp"):
    """-> (mean dict, std dict) of one head over the run's finished folds, std ddof=1 (nan for one
    fold)."""
    folds = r["heads"][head]
    vals = {c: np.array([f[c] for f in folds.values()], dtype=float) for c in COLUMNS}
    std = {c: float(v.std(ddof=1)) if len(v) > 1 else float("nan") for c, v in vals.items()}
    return {c: float(v.mean()) for c, v in vals.items()}, std


def fmt(mean, std):
    return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f}"


def heads_of(r):
    return [h for h in ("mlp", "knn") if r["heads"][h]]


def head_tests(r):
    """KNN against MLP over the folds both scored: {metric: paired_test(mlp, knn)} (knn - mlp), {}
    without KNN."""
    common = sorted(set(r["heads"]["mlp"]) & set(r["heads"]["knn"]))
    if len(common) < 2:
        return {}
    return {
        m: metrics.paired_test(
            [r["heads"]["mlp"][k][m] for k in common], [r["heads"]["knn"][k][m] for k in common]
        )
        for m in metrics.METRIC_NAMES
    }


def cv_tables(r):
    """-> (csv rows, markdown text) of one run: both heads, and KNN vs MLP."""
    ks = sorted(r["folds"])
    rows = [["fold", *COLUMNS]]
    md = [f"# Cross-validation: {r['name']} ({len(ks)} of {r['expected']} folds)\n"]
    if r["problems"]:
        md.append(f"Partial ({r['partial'] or 'some folds'}): {'; '.join(r['problems'])}.\n")
    for head in heads_of(r):
        folds, (mean, std), pre = (
            r["heads"][head],
            summary(r, head),
            "" if head == "mlp" else f"{head}_",
        )
        rows += [[f"{pre}fold_{k}", *(folds[k][c] for c in COLUMNS)] for k in sorted(folds)]
        rows += [
            [f"{pre}mean", *(mean[c] for c in COLUMNS)],
            [f"{pre}std", *(std[c] for c in COLUMNS)],
        ]
        md += [
            f"## {head.upper()} head\n",
            report.md_table(
                ["metric", "mean ± std", *(f"fold {k}" for k in sorted(folds))],
                [
                    [
                        report.label(c),
                        fmt(mean[c], std[c]),
                        *(
                            f"{folds[k][c]:.4f}" if c != "best_epoch" else str(folds[k][c])
                            for k in sorted(folds)
                        ),
                    ]
                    for c in COLUMNS
                ],
            ),
        ]
    tests = head_tests(r)
    if tests:
        md += [
            "## KNN head - MLP head: mean over folds, paired t-test across folds\n",
            report.md_table(
                ["metric", "KNN - MLP", "t", "p"],
                [
                    [report.label(m), f"{t['mean_diff']:+.4f}", f"{t['t']:.3g}", f"{t['p']:.3g}"]
                    for m, t in tests.items()
                ],
            ),
        ]
    return rows, "\n".join(md)


def load_test(r, test_dir):
    path = os.path.join(r["dir"], test_dir, "test_predictions.npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            return {"path": path, "ids": z["ids"], "labels": z["labels"], "probs": z["probs"]}
    except Exception as e:
        cli.fail(
            f"{path}: unreadable ({type(e).__name__}); re-run evaluate.py --ensemble {r['dir']}"
        )


def compare(ref, r, args):
    """Rows of run r against the reference run: paired t-test over common folds, paired test
    bootstrap."""
    common = sorted(set(ref["folds"]) & set(r["folds"]))
    rows = []
    for m in metrics.METRIC_NAMES:
        a, b = ([run["folds"][k][m] for k in common] for run in (ref, r))
        t = (
            metrics.paired_test(a, b)
            if len(common) >= 2
            else {
                "mean_diff": float(np.mean(b) - np.mean(a)) if common else float("nan"),
                "t": float("nan"),
                "p": float("nan"),
            }
        )
        rows.append(
            {
                "run": r["name"],
                "vs": ref["name"],
                "metric": m,
                "folds": len(common),
                "mean_diff": t["mean_diff"],
                "t": t["t"],
                "p_folds": t["p"],
            }
        )
    ta, tb = load_test(ref, args.test_dir), load_test(r, args.test_dir)
    if args.bootstrap and ta and tb:
        ids, ia, ib = np.intersect1d(ta["ids"], tb["ids"], return_indices=True)
        if len(ids) == 0 or not np.array_equal(ta["labels"][ia], tb["labels"][ib]):
            cli.fail(
                f"{ta['path']} and {tb['path']}: no common test images or their labels differ; "
                f"evaluate both runs on the same features and splits"
            )
        if len(ids) < max(len(ta["ids"]), len(tb["ids"])):
            print(
                f"note: {r['name']} vs {ref['name']}: paired bootstrap on the {len(ids)} test "
                f"images both scored"
            )
        for row in rows:
            if row["metric"] in metrics.BOOT_METRICS:
                pb = metrics.paired_bootstrap(
                    ta["labels"][ia],
                    ta["probs"][ia],
                    tb["probs"][ib],
                    n_boot=args.bootstrap,
                    seed=args.seed,
                    metric=row["metric"],
                )
                row.update(
                    test_images=len(ids),
                    test_diff=pb["diff"],
                    test_low=pb["low"],
                    test_high=pb["high"],
                    test_interval=pb["interval"],
                    p_test=pb["p"],
                )
    elif args.bootstrap:
        missing = [x["dir"] for x, t in ((ref, ta), (r, tb)) if t is None]
        print(
            f"note: no paired test bootstrap for {r['name']}: no "
            f"{args.test_dir}/test_predictions.npz in {', '.join(missing)} "
            f"(run evaluate.py --ensemble)"
        )
    return rows


# ----------------------------------------------------------------------------- main


def main(args):
    try:
        return tabulate(args)
    except data.DataError as e:  # an unreadable result file, runs of different protocols
        cli.fail(str(e))


def check_runs(runs, allow_partial):
    """Unfinished folds (a warning with allow_partial, else exit 2), runs without a finished fold
    and runs of different splits files (exit 2), each in one line."""
    bad = [f"{r['dir']}: {', '.join(r['problems'])}" for r in runs if r["problems"]]
    if bad and not allow_partial:
        cli.fail(
            f"{'; '.join(bad)}; finish them (run_cv.sh resumes interrupted folds) "
            f"or pass --allow_partial"
        )
    for line in bad:
        print(f"warning: {line}; tabulating the finished folds only", file=sys.stderr)
    empty = [r["dir"] for r in runs if not r["folds"]]
    if empty:
        cli.fail(f"{', '.join(empty)}: no finished fold to tabulate")
    if len(runs) > 1:
        for r in runs[1:]:
            if r["sha"] != runs[0]["sha"]:
                cli.fail(
                    f"{r['dir']}: made with a different splits file than {runs[0]['dir']} "
                    f"(splits_sha256 {str(r['sha'])[:12]} vs {str(runs[0]['sha'])[:12]}); "
                    f"compare only runs trained on the same splits.json"
                )


def write_comparison(out, runs, args):
    """Several runs: comparison.csv / .md (mean +- std over folds) and comparison_tests.csv (paired
    tests against the first run) in `out` -> the tests."""
    stats = [summary(r) for r in runs]
    table = [["run", "folds", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std"))]]
    table += [
        [r["name"], len(r["folds"]), *(st[i][c] for c in COLUMNS for i in (0, 1))]
        for r, st in zip(runs, stats)
    ]
    tests = [row for r in runs[1:] for row in compare(runs[0], r, args)]
    keys = [
        "run",
        "vs",
        "metric",
        "folds",
        "mean_diff",
        "t",
        "p_folds",
        "test_images",
        "test_diff",
        "test_low",
        "test_high",
        "test_interval",
        "p_test",
    ]
    md = [
        f"# Comparison of {len(runs)} runs (mean ± std over folds)\n",
        report.md_table(
            ["run", "folds", *metrics.METRIC_NAMES],
            [
                [r["name"], len(r["folds"]), *(fmt(m[c], s[c]) for c in metrics.METRIC_NAMES)]
                for r, (m, s) in zip(runs, stats)
            ],
        ),
        f"## Against {runs[0]['name']}: mean over folds of (run - {runs[0]['name']}), "
        f"paired t-test across folds; test: paired bootstrap on the test images "
        f"({metrics.interval_text(args.bootstrap)})\n",
        report.md_table(
            ["run", "metric", "mean diff", "p (folds)", "test diff [95% BCa CI]", "p (test)"],
            [
                [
                    t["run"],
                    t["metric"],
                    f"{t['mean_diff']:+.4f}",
                    f"{t['p_folds']:.3g}",
                    f"{t['test_diff']:+.4f} [{t['test_low']:+.4f}, {t['test_high']:+.4f}]"
                    if "test_diff" in t
                    else "-",
                    f"{t['p_test']:.3g}" if "p_test" in t else "-",
                ]
                for t in tests
            ],
        ),
    ]
    data.save_text(os.path.join(out, "comparison.csv"), table)
    data.save_text(
        os.path.join(out, "comparison_tests.csv"),
        [keys] + [[t.get(k, "") for k in keys] for t in tests],
    )
    data.save_text(os.path.join(out, "comparison.md"), "\n".join(md))
    print("\n".join(md))
    print(f"wrote {os.path.join(out, 'comparison.md')}, comparison.csv, comparison_tests.csv")
    return tests


def tabulate(args):
    """Every table of main(args) -> {"runs", "literature"[, "tests"]}; bad input: data.DataError."""
    runs = [read_run(run, args) for run in args.runs]
    check_runs(runs, args.allow_partial)
    for r in runs:
        rows, md = cv_tables(r)
        data.save_text(os.path.join(r["dir"], "cv_results.csv"), rows)
        data.save_text(os.path.join(r["dir"], "cv_results.md"), md)
        print(md)
    out = (
        runs[0]["dir"]
        if len(runs) == 1
        else args.out or os.path.dirname(os.path.abspath(os.path.normpath(args.runs[0])))
    )
    os.makedirs(out, exist_ok=True)
    lit = literature.write(out, runs, args.test_dir)  # beside the published numbers of the protocol
    if len(runs) == 1:
        print(f"wrote {os.path.join(runs[0]['dir'], 'cv_results.csv')} and cv_results.md")
        return {"runs": runs, "literature": lit}
    return {"runs": runs, "tests": write_comparison(out, runs, args), "literature": lit}


if __name__ == "__main__":
    main(get_args_parser().parse_args())

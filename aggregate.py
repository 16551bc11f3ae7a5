"""
Cross-validation tables of both heads from train.py's fold folders, comparisons between runs (ablations), and
(--report) the study's report folder: every table as .csv/.md/.tex, figures as .png/.pdf.

    python aggregate.py outputs/siglip2_hash64                       # -> cv_results.csv, cv_results.md in the run
    python aggregate.py outputs/hash64 outputs/hash32 outputs/hash128  # + comparison.{md,csv}, comparison_tests.csv
    python aggregate.py outputs/run --allow_partial                    # the finished folds only (labelled partial)
    python aggregate.py outputs/study/* --report outputs/study/report  # all tables and figures (study.py calls it)

A run is a folder of fold<k>/ folders from train.py. Fold k counts when its val_metrics.json exists and its
config.json (or last.pt) says training ended. Missing or unfinished folds are named and stop the script with
exit code 2 unless --allow_partial; a partial run is labelled "partial k/K" in every table. The expected number
of folds is --folds, else the "folds" of the splits file named in the folds' config.json, else one more than
the highest fold<k> found.

Heads: val_metrics.json holds the MLP head's 15 metrics at the top level and, for models with hash bits, the
KNN head's under "knn"; each head gets its mean +/- std over folds, and KNN is tested against MLP with a
paired t-test across folds (metrics.paired_test).
One run: cv_results.csv (rows fold_0..fold_{K-1}, mean, std with ddof=1, then knn_fold_k, knn_mean, knn_std
when the folds have a KNN head; columns the 15 metrics + best_epoch) and cv_results.md, inside the run folder.
Several runs (the first is the reference): the same per run, plus in --out (default: the first run's parent)
comparison.csv / comparison.md (one row per run, mean +/- std per metric) and comparison_tests.csv: for each
run against the first, the mean over folds of (run - reference) with a paired t-test across folds, and, when
both runs have <run>/eval_test/test_predictions.npz (evaluate.py --ensemble), a paired bootstrap on the test
images (metrics.paired_bootstrap, threshold 0.5) for metrics.BOOT_METRICS. Runs must share their splits file
(config.json splits_sha256), so fold k of every run was validated on the same images.
"""
import glob
import json
import os
import re
import sys

import numpy as np
import torch

import cli
import data
import metrics
import report

COLUMNS = (*metrics.METRIC_NAMES, "best_epoch")


def get_args_parser():
    p = cli.Parser("aggregate", description="cross-validation tables and run comparisons")
    # data
    g = p.add_argument_group("data")
    g.add_argument("runs", nargs="+", help="run folders (outputs/<run>) holding fold<k>/; the first is the reference")
    g.add_argument("--folds", type=cli.number(int, 2), default=None,
                   help="expected folds per run; default: the splits file's 'folds' (from the folds' config.json)")
    g.add_argument("--allow_partial", action="store_true",
                   help="tabulate the finished folds when some are missing or unfinished (they are still named)")
    g.add_argument("--test_dir", default="eval_test", help="evaluate.py's out_dir inside each run (test predictions)")
    # statistics
    g = p.add_argument_group("statistics")
    g.add_argument("--bootstrap", type=cli.nonneg_int, default=1000,
                   help="paired-bootstrap draws on the test images (0 = skip the test comparison)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (fixed, so p-values are repeatable)")
    # io
    g = p.add_argument_group("io")
    g.add_argument("--out", default=None, help="folder for comparison.* (several runs); default: first run's parent")
    g.add_argument("--report", default=None, help="also write every table (.csv/.md/.tex) and figure (.png/.pdf) "
                   "of these runs into this folder (study.py's report/)")
    return p


# ----------------------------------------------------------------------------- reading

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        cli.fail(f"{path}: unreadable JSON ({type(e).__name__}); re-run that fold with train.py --resume")


def fold_finished(d):
    """train.py's rule: val_metrics.json exists and config.json (or last.pt) says training ended."""
    if not os.path.isfile(os.path.join(d, "val_metrics.json")):
        return False
    if os.path.isfile(os.path.join(d, "config.json")) and read_json(os.path.join(d, "config.json")).get("finished"):
        return True
    try:
        return bool(torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True).get("finished"))
    except Exception:
        return False


def read_run(run, args):
    """-> {"name", "dir", "folds": {k: val_metrics dict}, "expected": K, "problems": [str], "sha": str|None}."""
    if not os.path.isdir(run):
        cli.fail(f"{run}: not a directory; pass run folders written by train.py --out_dir <run>/fold<k>")
    dirs = {}
    for d in glob.glob(os.path.join(run, "fold*")):
        m = re.fullmatch(r"fold(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            dirs[int(m.group(1))] = d
    if not dirs:
        cli.fail(f"{run}: no fold<k>/ folders; train folds with train.py --out_dir {run}/fold<k>")
    configs = {k: read_json(os.path.join(d, "config.json")) for k, d in dirs.items()
               if os.path.isfile(os.path.join(d, "config.json"))}
    expected = args.folds
    for cfg in configs.values():  # the splits file says how many folds there are
        if expected is None and cfg.get("splits") and os.path.isfile(cfg["splits"]):
            expected = read_json(cfg["splits"]).get("folds")
    expected = expected or max(dirs) + 1
    shas = {cfg.get("splits_sha256") for cfg in configs.values()} - {None}
    if len(shas) > 1:
        cli.fail(f"{run}: its folds were trained with different splits files (splits_sha256 differ); re-train them")
    folds, knn_folds, problems = {}, {}, []
    for k in range(expected):
        if k not in dirs:
            problems.append(f"fold{k} missing")
        elif not fold_finished(dirs[k]):
            problems.append(f"fold{k} unfinished")
        else:
            vm = read_json(os.path.join(dirs[k], "val_metrics.json"))
            knn = vm.get("knn")
            absent = [m for m in metrics.METRIC_NAMES if m not in vm or (knn is not None and m not in knn)]
            if absent:
                cli.fail(f"{dirs[k]}/val_metrics.json: metrics {absent} missing; re-run the fold with this train.py")
            folds[k] = dict(vm, best_epoch=vm.get("epoch", float("nan")))
            if knn is not None:  # the KNN head was chosen at the MLP head's best epoch: the same one
                knn_folds[k] = dict(knn, best_epoch=folds[k]["best_epoch"])
    extra = sorted(set(dirs) - set(range(expected)))
    if extra:
        problems.append(f"fold{extra[0]} and up are beyond the {expected} folds expected (ignored)")
    name = os.path.normpath(run)
    partial = f"partial {len(folds)}/{expected}" if problems and len(folds) < expected else ""
    return {"name": name, "dir": run, "folds": folds, "heads": {"mlp": folds, "knn": knn_folds}, "expected": expected,
            "problems": problems, "sha": shas.pop() if shas else None, "dirs": dirs, "partial": partial,
            "config": configs[min(configs)] if configs else {},
            "label": os.path.basename(name) + (f" ({partial})" if partial else "")}


# ----------------------------------------------------------------------------- tables

def summary(r, head="mlp"):
    """-> (mean dict, std dict) of one head over the run's finished folds, std ddof=1 (nan for one fold)."""
    folds = r["heads"][head]
    vals = {c: np.array([f[c] for f in folds.values()], dtype=float) for c in COLUMNS}
    std = {c: float(v.std(ddof=1)) if len(v) > 1 else float("nan") for c, v in vals.items()}
    return {c: float(v.mean()) for c, v in vals.items()}, std


def fmt(mean, std):
    return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f}"


def heads_of(r):
    return [h for h in ("mlp", "knn") if r["heads"][h]]


def head_tests(r):
    """KNN against MLP over the folds both scored: {metric: paired_test(mlp, knn)} (knn - mlp), {} without KNN."""
    common = sorted(set(r["heads"]["mlp"]) & set(r["heads"]["knn"]))
    if len(common) < 2:
        return {}
    return {m: metrics.paired_test([r["heads"]["mlp"][k][m] for k in common], [r["heads"]["knn"][k][m] for k in common])
            for m in metrics.METRIC_NAMES}


def cv_tables(r):
    """-> (csv rows, markdown text) of one run: both heads, and KNN vs MLP."""
    ks = sorted(r["folds"])
    rows = [["fold", *COLUMNS]]
    md = [f"# Cross-validation: {r['name']} ({len(ks)} of {r['expected']} folds)\n"]
    if r["problems"]:
        md.append(f"Partial ({r['partial'] or 'some folds'}): {'; '.join(r['problems'])}.\n")
    for head in heads_of(r):
        folds, (mean, std), pre = r["heads"][head], summary(r, head), "" if head == "mlp" else f"{head}_"
        rows += [[f"{pre}fold_{k}", *(folds[k][c] for c in COLUMNS)] for k in sorted(folds)]
        rows += [[f"{pre}mean", *(mean[c] for c in COLUMNS)], [f"{pre}std", *(std[c] for c in COLUMNS)]]
        md += [f"## {head.upper()} head\n", report.md_table(["metric", "mean ± std", *(f"fold {k}" for k in sorted(folds))], [
            [report.label(c), fmt(mean[c], std[c]), *(f"{folds[k][c]:.4f}" if c != "best_epoch" else str(folds[k][c])
                                                       for k in sorted(folds))] for c in COLUMNS])]
    tests = head_tests(r)
    if tests:
        md += ["## KNN head - MLP head: mean over folds, paired t-test across folds\n", report.md_table(
            ["metric", "KNN - MLP", "t", "p"],
            [[report.label(m), f"{t['mean_diff']:+.4f}", f"{t['t']:.3g}", f"{t['p']:.3g}"] for m, t in tests.items()])]
    return rows, "\n".join(md)


def load_test(r, test_dir):
    path = os.path.join(r["dir"], test_dir, "test_predictions.npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            return {"path": path, "ids": z["ids"], "labels": z["labels"], "probs": z["probs"]}
    except Exception as e:
        cli.fail(f"{path}: unreadable ({type(e).__name__}); re-run evaluate.py --ensemble {r['dir']}")


def compare(ref, r, args):
    """Rows of run r against the reference run: paired t-test over common folds, paired test bootstrap."""
    common = sorted(set(ref["folds"]) & set(r["folds"]))
    rows = []
    for m in metrics.METRIC_NAMES:
        a, b = ([run["folds"][k][m] for k in common] for run in (ref, r))
        t = metrics.paired_test(a, b) if len(common) >= 2 else {"mean_diff": float(np.mean(b) - np.mean(a)) if common
                                                                else float("nan"), "t": float("nan"), "p": float("nan")}
        rows.append({"run": r["name"], "vs": ref["name"], "metric": m, "folds": len(common),
                     "mean_diff": t["mean_diff"], "t": t["t"], "p_folds": t["p"]})
    ta, tb = load_test(ref, args.test_dir), load_test(r, args.test_dir)
    if args.bootstrap and ta and tb:
        ids, ia, ib = np.intersect1d(ta["ids"], tb["ids"], return_indices=True)
        if len(ids) == 0 or not np.array_equal(ta["labels"][ia], tb["labels"][ib]):
            cli.fail(f"{ta['path']} and {tb['path']}: no common test images or their labels differ; "
                 f"evaluate both runs on the same features and splits")
        if len(ids) < max(len(ta["ids"]), len(tb["ids"])):
            print(f"note: {r['name']} vs {ref['name']}: paired bootstrap on the {len(ids)} test images both scored")
        for row in rows:
            if row["metric"] in metrics.BOOT_METRICS:
                pb = metrics.paired_bootstrap(ta["labels"][ia], ta["probs"][ia], tb["probs"][ib], n_boot=args.bootstrap,
                                              seed=args.seed, metric=row["metric"])
                row.update(test_images=len(ids), test_diff=pb["diff"], test_low=pb["low"], test_high=pb["high"],
                           p_test=pb["p"])
    elif args.bootstrap:
        missing = [x["dir"] for x, t in ((ref, ta), (r, tb)) if t is None]
        print(f"note: no paired test bootstrap for {r['name']}: no {args.test_dir}/test_predictions.npz in "
              f"{', '.join(missing)} (run evaluate.py --ensemble)")
    return rows


# ----------------------------------------------------------------------------- report folder (--report)

def table(out, name, header, rows, caption, sections, title, **kw):
    """One table in out/name.{csv,md,tex}, recorded under its section title for report.md."""
    report.write_table(os.path.join(out, name), header, rows, caption=caption, **kw)
    sections.append((title, [f"{name}.{e}" for e in ("md", "csv", "tex")], caption))


def cv_report(runs, out, sections):
    """cv_table: every run side by side (both heads); cv_heads: KNN vs MLP per run; cv_<run>: its folds."""
    M = metrics.METRIC_NAMES
    rows = [[r["label"], h.upper(), len(r["heads"][h]), *(report.MeanStd(*(s[m] for s in summary(r, h))) for m in M)]
            for r in runs for h in heads_of(r)]
    table(out, "cv_table", ["run", "head", "folds", *M], rows, "Cross-validation (validation folds): mean ± std "
          "over folds (ddof 1), threshold 0.5; best per column in bold", sections, "Cross-validation: all runs")
    rows = []
    for r in runs:
        for m, t in head_tests(r).items():
            (a, sa), (b, sb) = ((summary(r, h)[0][m], summary(r, h)[1][m]) for h in ("mlp", "knn"))
            rows.append([r["label"], report.label(m), report.MeanStd(a, sa), report.MeanStd(b, sb),
                         f"{t['mean_diff']:+.4f}", f"{t['t']:.3g}", f"{t['p']:.3g}"])
    if rows:
        table(out, "cv_heads", ["run", "metric", "MLP head", "KNN head", "KNN - MLP", "t", "p"], rows,
              "KNN head against MLP head over folds: paired t-test across folds (two-sided)", sections,
              "Cross-validation: KNN head vs MLP head")
    for r in runs:
        rows = [[f"fold {k}", h.upper(), *(r["heads"][h][k][c] for c in COLUMNS)]
                for h in heads_of(r) for k in sorted(r["heads"][h])]
        rows += [["mean ± std", h.upper(), *(report.MeanStd(*(s[c] for s in summary(r, h))) for c in COLUMNS)]
                 for h in heads_of(r)]
        table(out, f"cv_{safe(r)}", ["fold", "head", *COLUMNS], rows, f"Cross-validation folds of {r['label']}",
              sections, f"Cross-validation per run: {r['label']}", skip_bold=range(len(rows) - len(heads_of(r)), len(rows)))


def safe(r):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(r["name"]))


def load_eval(r, test_dir):
    """<run>/<test_dir>/: metrics.json + test_predictions.npz -> {y, thr, heads: {head: [(row, probs | metrics)]}}."""
    npz, js = (os.path.join(r["dir"], test_dir, f) for f in ("test_predictions.npz", "metrics.json"))
    if not (os.path.isfile(npz) and os.path.isfile(js)):
        return None
    summ = read_json(js)
    try:
        with np.load(npz) as z:
            arr = {k: z[k] for k in z.files}
    except Exception as e:
        cli.fail(f"{npz}: unreadable ({type(e).__name__}); re-run evaluate.py --ensemble {r['dir']}")
    main_head = "knn" if summ.get("heads") == ["knn"] else "mlp"
    members = [str(m) for m in arr.get("members", [])]
    heads = {}
    for h in summ.get("heads", [main_head]):
        ens = arr["probs"] if h == main_head else arr.get(f"{h}_probs")
        mem = arr.get("member_probs") if h == main_head else arr.get(f"member_{h}_probs")
        rows = [(m, mem[i] if mem is not None else summ["models"][m][h]) for i, m in enumerate(members)]
        if ens is not None:
            heads[h] = rows + [("ensemble", ens)]
    return {"y": arr["labels"], "thr": arr.get("thresholds", 0.5), "heads": heads, "members": members}


def test_report(runs, args, out, sections):
    """test_<run>: every fold model, mean ± std over them and the ensemble, both heads, 95% bootstrap CIs of all
    15 metrics (one set of resamples for every row of every run); test_table: the runs side by side."""
    M, side, heads_rows = metrics.METRIC_NAMES, [], []
    for r in runs:
        ev = load_eval(r, args.test_dir)
        if ev is None:
            print(f"note: {r['dir']}: no {args.test_dir}/test_predictions.npz + metrics.json; no test table")
            continue
        arrays = [(h, n, p) for h, rs in ev["heads"].items() for n, p in rs if isinstance(p, np.ndarray)]
        cis = metrics.bootstrap_intervals(ev["y"], [p for *_, p in arrays], n_boot=max(args.bootstrap, 1),
                                          seed=args.seed) if args.bootstrap else [None] * len(arrays)
        ci = {(h, n): c for (h, n, _), c in zip(arrays, cis)}
        rows = []
        for h, rs in ev["heads"].items():
            cells = {n: [report.Interval(*ci[h, n][m]) if ci.get((h, n)) else
                         (metrics.compute_all(ev["y"], p)[m] if isinstance(p, np.ndarray) else p[m]) for m in M]
                     for n, p in rs}
            folds = [n for n, _ in rs if n != "ensemble"]
            vals = np.array([[report._value(c) for c in cells[n]] for n in folds])
            mean = [report.MeanStd(v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan) for v in vals.T]
            rows += [[n, h.upper(), *cells[n]] for n in folds] + [["mean ± std (folds)", h.upper(), *mean],
                                                                  ["ensemble", h.upper(), *cells["ensemble"]]]
            side += [[r["label"], h.upper(), "ensemble", *cells["ensemble"]],
                     [r["label"], h.upper(), f"{len(folds)} fold models", *mean]]
        table(out, f"test_{safe(r)}", ["model", "head", *M], rows, f"Hold-out test of {r['label']}: value [95% "
              f"bootstrap CI, {args.bootstrap} paired resamples of the images], threshold 0.5", sections,
              f"Test per run: {r['label']}")
        if {"mlp", "knn"} <= set(ev["heads"]) and args.bootstrap:
            a, b = ev["heads"]["mlp"][-1][1], ev["heads"]["knn"][-1][1]
            for m in metrics.BOOT_METRICS:
                t = metrics.paired_bootstrap(ev["y"], a, b, n_boot=args.bootstrap, seed=args.seed, metric=m)
                heads_rows.append([r["label"], report.label(m), f"{t['diff']:+.4f}", f"[{t['low']:+.4f}, {t['high']:+.4f}]",
                                   f"{t['p']:.3g}"])
    if side:
        table(out, "test_table", ["run", "head", "model", *M], side, "Hold-out test, every run: the ensemble "
              "[95% bootstrap CI] and mean ± std over the fold models", sections, "Test: all runs")
    if heads_rows:
        table(out, "test_heads", ["run", "metric", "KNN - MLP", "95% CI", "p"], heads_rows, "KNN ensemble against "
              "MLP ensemble on the test images: paired bootstrap", sections, "Test: KNN head vs MLP head")


def figure_report(runs, out, sections):
    """learning_<run> (loss and val mAP per epoch, folds overlaid); bits: CV mAP against hash bits, both heads,
    over the runs that differ from the most common recipe (fusion, code classifier) only in bits."""
    for r in runs:
        logs = {}
        for k in r["folds"]:
            path = os.path.join(r["dirs"][k], "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    logs[k] = [json.loads(line) for line in f if line.strip()]
        if any(logs.values()):
            paths = report.plot_learning(os.path.join(out, f"learning_{safe(r)}"), logs, r["label"])
            sections.append((f"Learning curves: {r['label']}", [os.path.basename(p) for p in paths], ""))
    recipe = lambda c: (c.get("fusion"), c.get("code_classifier"))  # noqa: E731
    sweep = [r for r in runs if r["config"].get("baseline", "none") == "none" and "model_args" in r["config"]]
    if sweep:
        common = max({recipe(r["config"]) for r in sweep}, key=[recipe(r["config"]) for r in sweep].count)
        sweep = [r for r in sweep if recipe(r["config"]) == common]
    points = [(r["config"]["model_args"]["bits"], h, *(s["mAP_macro"] for s in summary(r, h)))
              for r in sweep for h in heads_of(r)]
    if len({p[0] for p in points}) > 1:
        paths = report.plot_bits(os.path.join(out, "bits"), points)
        sections.append(("mAP against hash bits", [os.path.basename(p) for p in paths],
                         f"runs {', '.join(r['label'] for r in sweep)}"))


def write_report(runs, args):
    """Every table and figure of these runs in args.report -> [(section title, [file names], caption)]."""
    os.makedirs(args.report, exist_ok=True)
    sections = []
    cv_report(runs, args.report, sections)
    test_report(runs, args, args.report, sections)
    figure_report(runs, args.report, sections)
    return sections


# ----------------------------------------------------------------------------- main

def main(args):
    runs = [read_run(run, args) for run in args.runs]
    bad = [f"{r['dir']}: {', '.join(r['problems'])}" for r in runs if r["problems"]]
    if bad and not args.allow_partial:
        cli.fail(f"{'; '.join(bad)}; finish them (run_cv.sh resumes interrupted folds) or pass --allow_partial")
    for line in bad:
        print(f"warning: {line}; tabulating the finished folds only", file=sys.stderr)
    empty = [r["dir"] for r in runs if not r["folds"]]
    if empty:
        cli.fail(f"{', '.join(empty)}: no finished fold to tabulate")
    if len(runs) > 1:
        for r in runs[1:]:
            if r["sha"] != runs[0]["sha"]:
                cli.fail(f"{r['dir']}: made with a different splits file than {runs[0]['dir']} (splits_sha256 "
                     f"{str(r['sha'])[:12]} vs {str(runs[0]['sha'])[:12]}); compare only runs trained on the same "
                     f"splits.json")
    for r in runs:
        rows, md = cv_tables(r)
        data.save_text(os.path.join(r["dir"], "cv_results.csv"), rows)
        data.save_text(os.path.join(r["dir"], "cv_results.md"), md)
        print(md)
    sections = write_report(runs, args) if args.report else []
    if sections:
        print(f"wrote {len(sections)} tables and figures to {args.report}")
    if len(runs) == 1:
        print(f"wrote {os.path.join(runs[0]['dir'], 'cv_results.csv')} and cv_results.md")
        return {"runs": runs, "sections": sections}

    # ---- several runs: one comparison table + paired tests against the first run
    out = args.out or os.path.dirname(os.path.abspath(os.path.normpath(args.runs[0])))
    stats = [summary(r) for r in runs]
    table = [["run", "folds", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std"))]]
    table += [[r["name"], len(r["folds"]), *(st[i][c] for c in COLUMNS for i in (0, 1))] for r, st in zip(runs, stats)]
    tests = [row for r in runs[1:] for row in compare(runs[0], r, args)]
    keys = ["run", "vs", "metric", "folds", "mean_diff", "t", "p_folds", "test_images", "test_diff", "test_low",
            "test_high", "p_test"]
    md = [f"# Comparison of {len(runs)} runs (mean ± std over folds)\n",
          report.md_table(["run", "folds", *metrics.METRIC_NAMES],
                   [[r["name"], len(r["folds"]), *(fmt(m[c], s[c]) for c in metrics.METRIC_NAMES)]
                    for r, (m, s) in zip(runs, stats)]),
          f"## Against {runs[0]['name']}: mean over folds of (run - {runs[0]['name']}), paired t-test across folds; "
          f"test: paired bootstrap on the test images (95% CI)\n",
          report.md_table(["run", "metric", "mean diff", "p (folds)", "test diff [95% CI]", "p (test)"], [
              [t["run"], t["metric"], f"{t['mean_diff']:+.4f}", f"{t['p_folds']:.3g}",
               f"{t['test_diff']:+.4f} [{t['test_low']:+.4f}, {t['test_high']:+.4f}]" if "test_diff" in t else "-",
               f"{t['p_test']:.3g}" if "p_test" in t else "-"] for t in tests])]
    data.save_text(os.path.join(out, "comparison.csv"), table)
    data.save_text(os.path.join(out, "comparison_tests.csv"), [keys] + [[t.get(k, "") for k in keys] for t in tests])
    data.save_text(os.path.join(out, "comparison.md"), "\n".join(md))
    print("\n".join(md))
    print(f"wrote {os.path.join(out, 'comparison.md')}, comparison.csv, comparison_tests.csv")
    return {"runs": runs, "tests": tests, "sections": sections}


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""
The review's ablation study in one command: every run an ordinary run_cv.sh run folder, then one
report folder.

    bash run_cv.sh --study             # = python study.py: outputs/study/<run>/ + .../report/
    bash run_cv.sh --demo --study      # offline: synthetic data, 3 folds (own splits), 6 epochs
    FOLD_LIST=0 bash run_cv.sh --study -- --epochs 50 --patience 0   # one fold (runs: partial)
    python study.py --only bits0,bits64     # a subset of the runs

Runs (train.py flags; reference first): hash64 (the default recipe), bits0 (plain MLP), bits16,
bits32, bits128, bits256, concat (--fusion concat), knn_recipe (--code_classifier centres
--sign_weight 1), probe and zeroshot (--baseline). Flags after -- go to every run. Each run is
`RUN=<study>/<name> bash run_cv.sh [--demo] -- <flags>` on one splits file and one feature cache,
with EVAL_ARGS=--head both where the run has hash bits; a run whose folds all hold .done and whose
eval_test/metrics.csv exists is skipped without starting run_cv.sh, and an interrupted one resumes
(run_cv.sh skips finished folds and resumes the interrupted one from last.pt).
Then the report folder <study>/report/: aggregate.py's CV tables and comparisons of the runs, every
table of them as .csv/.md/.tex (CV, both heads and their paired test, test tables with 95% bootstrap
CIs of all 15 metrics, the runs side by side) and figures as .png/.pdf (learning curves, mAP against
bits), the literature table of the splits file's protocol (report/literature.py), the reference
run's per-class, confusion and fold analysis, and report.md linking them in the order of a results
chapter. The report is skipped when no run's results changed since it was written (report/.inputs).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np

import aggregate
import cli
import data
import metrics
import report
from aggregate import COLUMNS, head_tests, heads_of, summary  # what the CV tables show
from report import literature
from runs import fold_dirs

RUNS = [
    ("hash64", []),
    ("bits0", ["--bits", "0"]),
    ("bits16", ["--bits", "16"]),
    ("bits32", ["--bits", "32"]),
    ("bits128", ["--bits", "128"]),
    ("bits256", ["--bits", "256"]),
    ("concat", ["--fusion", "concat"]),
    ("knn_recipe", ["--code_classifier", "centres", "--sign_weight", "1"]),
    ("probe", ["--baseline", "probe"]),
    ("zeroshot", ["--baseline", "zeroshot"]),
]
NO_BITS = {"bits0", "probe", "zeroshot"}  # no hash codes: the MLP head only
VIEWS_RUN = ("plain_view", ["--train_views", "plain"])  # only with augmented views (--views > 1)
DEMO = {"FOLDS": "3", "SPLITS": "demo/coco/splits_study3.json"}  # 3 folds, not the demo's 5
DEMO_FLAGS = ["--epochs", "6", "--patience", "3"]


def get_args_parser():
    p = cli.Parser("study", description="the ablation set of run_cv.sh runs and its report folder")
    p.add_argument(
        "--demo",
        action="store_true",
        help="synthetic data and tiny SigLIP (run_cv.sh --demo), 3 folds, "
        "6 epochs: a few minutes on a CPU",
    )
    p.add_argument(
        "--study_dir", default=None, help="default outputs/study (outputs/demo_study with --demo)"
    )
    p.add_argument("--only", default="", help="comma-separated run names (default: all of them)")
    p.add_argument(
        "--fold_list",
        default=os.environ.get("FOLD_LIST", ""),
        help="folds to train, e.g. 0 (run_cv.sh's FOLD_LIST)",
    )
    p.add_argument(
        "--bootstrap", type=cli.nonneg_int, default=1000, help="bootstrap draws of the test tables"
    )
    p.add_argument(
        "--run_cv",
        default="bash run_cv.sh",
        help="the command that makes one run (tests replace it)",
    )
    p.add_argument("train_args", nargs="*", help="after --: train.py flags for every run")
    return p


def run_done(run, folds):
    return all(
        os.path.isfile(os.path.join(run, f"fold{k}", ".done")) for k in folds
    ) and os.path.isfile(os.path.join(run, "eval_test", "metrics.csv"))


def cache_views(run):
    """Image views of the feature cache a finished run trained on (its folds' config.json), else
    1."""
    for d in fold_dirs(run).values():
        try:
            cfg = data.read_json(os.path.join(d, "config.json"), "the fold's config")
            return int(cfg["features_meta"].get("views", 1))
        except (KeyError, ValueError, data.DataError):
            continue
    return 1


def make_run(name, flags, args, env):
    """One run folder via run_cv.sh (skipped when complete) -> its path."""
    run = os.path.join(args.study_dir, name)
    folds = [int(k) for k in args.fold_list.replace(",", " ").split()] or range(
        int(env.get("FOLDS", 5))
    )
    if run_done(run, folds):
        print(f"== {name}: skipped ({run} is complete)")
        return run
    cmd = args.run_cv.split() + (["--demo"] if args.demo else []) + ["--", *flags, *args.train_args]
    env = dict(
        env,
        RUN=run,
        EVAL_ARGS=env.get("EVAL_ARGS", "") + ("" if name in NO_BITS else " --head both"),
    )
    if args.fold_list:
        env["FOLD_LIST"] = args.fold_list
    print(f"== {name}: RUN={run} {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        cli.fail(
            f"run {name} failed (see above); rerun the same command: finished folds and runs "
            f"are skipped"
        )
    return run


# ------------------------------------------------------------- report folder: tables and figures


def table(out, name, header, rows, caption, sections, title, **kw):
    """One table in out/name.{csv,md,tex}, recorded under its section title for report.md."""
    report.write_table(os.path.join(out, name), header, rows, caption=caption, **kw)
    sections.append((title, [f"{name}.{e}" for e in ("md", "csv", "tex")], caption))


def cv_report(runs, out, sections):
    """cv_table: every run side by side (both heads); cv_heads: KNN vs MLP per run; cv_<run>: its
    folds."""
    M = metrics.METRIC_NAMES
    rows = [
        [
            r["label"],
            h.upper(),
            len(r["heads"][h]),
            *(report.MeanStd(*(s[m] for s in summary(r, h))) for m in M),
        ]
        for r in runs
        for h in heads_of(r)
    ]
    table(
        out,
        "cv_table",
        ["run", "head", "folds", *M],
        rows,
        "Cross-validation (validation folds): mean ± std "
        "over folds (ddof 1), threshold 0.5; best per column in bold",
        sections,
        "Cross-validation: all runs",
    )
    rows = []
    for r in runs:
        for m, t in head_tests(r).items():
            (a, sa), (b, sb) = ((summary(r, h)[0][m], summary(r, h)[1][m]) for h in ("mlp", "knn"))
            rows.append(
                [
                    r["label"],
                    report.label(m),
                    report.MeanStd(a, sa),
                    report.MeanStd(b, sb),
                    f"{t['mean_diff']:+.4f}",
                    f"{t['t']:.3g}",
                    f"{t['p']:.3g}",
                ]
            )
    if rows:
        table(
            out,
            "cv_heads",
            ["run", "metric", "MLP head", "KNN head", "KNN - MLP", "t", "p"],
            rows,
            "KNN head against MLP head over folds: paired t-test across folds (two-sided)",
            sections,
            "Cross-validation: KNN head vs MLP head",
        )
    for r in runs:
        rows = [
            [f"fold {k}", h.upper(), *(r["heads"][h][k][c] for c in COLUMNS)]
            for h in heads_of(r)
            for k in sorted(r["heads"][h])
        ]
        rows += [
            [
                "mean ± std",
                h.upper(),
                *(report.MeanStd(*(s[c] for s in summary(r, h))) for c in COLUMNS),
            ]
            for h in heads_of(r)
        ]
        table(
            out,
            f"cv_{safe(r)}",
            ["fold", "head", *COLUMNS],
            rows,
            f"Cross-validation folds of {r['label']}",
            sections,
            f"Cross-validation per run: {r['label']}",
            skip_bold=range(len(rows) - len(heads_of(r)), len(rows)),
        )


def safe(r):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(r["name"]))


def load_eval(r, test_dir):
    """<run>/<test_dir>/: metrics.json + test_predictions.npz -> {y, thr, heads: {head: [(row,
    probs | metrics)]}}; an unreadable metrics.json: data.DataError."""
    npz, js = (
        os.path.join(r["dir"], test_dir, f) for f in ("test_predictions.npz", "metrics.json")
    )
    if not (os.path.isfile(npz) and os.path.isfile(js)):
        return None
    summ = data.read_json(js, "evaluate.py's metrics", f"re-run evaluate.py --ensemble {r['dir']}")
    try:
        with np.load(npz) as z:
            arr = {k: z[k] for k in z.files}
    except Exception as e:
        cli.fail(
            f"{npz}: unreadable ({type(e).__name__}); re-run evaluate.py --ensemble {r['dir']}"
        )
    main_head = "knn" if summ.get("heads") == ["knn"] else "mlp"
    members = [str(m) for m in arr.get("members", [])]
    heads = {}
    for h in summ.get("heads", [main_head]):
        ens = arr["probs"] if h == main_head else arr.get(f"{h}_probs")
        mem = arr.get("member_probs") if h == main_head else arr.get(f"member_{h}_probs")
        rows = [
            (m, mem[i] if mem is not None else summ["models"][m][h]) for i, m in enumerate(members)
        ]
        if ens is not None:
            heads[h] = rows + [("ensemble", ens)]
    return {
        "y": arr["labels"],
        "thr": arr.get("thresholds", 0.5),
        "heads": heads,
        "members": members,
    }


def test_report(runs, args, out, sections):
    """test_<run>: every fold model, mean ± std over them and the ensemble, both heads, 95%
    bootstrap CIs of all 15 metrics (one set of resamples for every row of every run); test_table:
    the runs side by side."""
    M, side, heads_rows = metrics.METRIC_NAMES, [], []
    for r in runs:
        ev = load_eval(r, args.test_dir)
        if ev is None:
            print(
                f"note: {r['dir']}: no {args.test_dir}/test_predictions.npz + metrics.json; "
                f"no test table"
            )
            continue
        arrays = [
            (h, n, p) for h, rs in ev["heads"].items() for n, p in rs if isinstance(p, np.ndarray)
        ]
        cis = (
            metrics.bootstrap_intervals(
                ev["y"], [p for *_, p in arrays], n_boot=max(args.bootstrap, 1), seed=args.seed
            )
            if args.bootstrap
            else [None] * len(arrays)
        )
        ci = {(h, n): c for (h, n, _), c in zip(arrays, cis)}
        rows = []
        for h, rs in ev["heads"].items():
            cells = {
                n: [
                    report.Interval(*ci[h, n][m])
                    if ci.get((h, n))
                    else (metrics.compute_all(ev["y"], p)[m] if isinstance(p, np.ndarray) else p[m])
                    for m in M
                ]
                for n, p in rs
            }
            folds = [n for n, _ in rs if n != "ensemble"]
            vals = np.array([[report._value(c) for c in cells[n]] for n in folds])
            mean = [
                report.MeanStd(v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan) for v in vals.T
            ]
            rows += [[n, h.upper(), *cells[n]] for n in folds] + [
                ["mean ± std (folds)", h.upper(), *mean],
                ["ensemble", h.upper(), *cells["ensemble"]],
            ]
            side += [
                [r["label"], h.upper(), "ensemble", *cells["ensemble"]],
                [r["label"], h.upper(), f"{len(folds)} fold models", *mean],
            ]
        table(
            out,
            f"test_{safe(r)}",
            ["model", "head", *M],
            rows,
            f"Hold-out test of {r['label']}: value [95% "
            f"bootstrap CI, {args.bootstrap} paired resamples of the images], threshold 0.5",
            sections,
            f"Test per run: {r['label']}",
        )
        if {"mlp", "knn"} <= set(ev["heads"]) and args.bootstrap:
            a, b = ev["heads"]["mlp"][-1][1], ev["heads"]["knn"][-1][1]
            for m in metrics.BOOT_METRICS:
                t = metrics.paired_bootstrap(
                    ev["y"], a, b, n_boot=args.bootstrap, seed=args.seed, metric=m
                )
                heads_rows.append(
                    [
                        r["label"],
                        report.label(m),
                        f"{t['diff']:+.4f}",
                        f"[{t['low']:+.4f}, {t['high']:+.4f}]",
                        f"{t['p']:.3g}",
                    ]
                )
    if side:
        table(
            out,
            "test_table",
            ["run", "head", "model", *M],
            side,
            "Hold-out test, every run: the ensemble "
            "[95% bootstrap CI] and mean ± std over the fold models",
            sections,
            "Test: all runs",
        )
    if heads_rows:
        table(
            out,
            "test_heads",
            ["run", "metric", "KNN - MLP", "95% CI", "p"],
            heads_rows,
            "KNN ensemble against MLP ensemble on the test images: paired bootstrap",
            sections,
            "Test: KNN head vs MLP head",
        )


def recipe(cfg):
    """What a bits sweep holds fixed: the fusion and the code classifier."""
    return cfg.get("fusion"), cfg.get("code_classifier")


def figure_report(runs, out, sections):
    """learning_<run> (loss and val mAP per epoch, folds overlaid); bits: CV mAP against hash bits,
    both heads, over the runs that differ from the most common recipe (fusion, code classifier)
    only in bits."""
    for r in runs:
        logs = {}
        for k in r["folds"]:
            path = os.path.join(r["dirs"][k], "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    logs[k] = [json.loads(line) for line in f if line.strip()]
        if any(logs.values()):
            paths = report.plot_learning(os.path.join(out, f"learning_{safe(r)}"), logs, r["label"])
            sections.append(
                (f"Learning curves: {r['label']}", [os.path.basename(p) for p in paths], "")
            )
    sweep = [
        r
        for r in runs
        if r["config"].get("baseline", "none") == "none" and "model_args" in r["config"]
    ]
    if sweep:
        common = max(
            {recipe(r["config"]) for r in sweep}, key=[recipe(r["config"]) for r in sweep].count
        )
        sweep = [r for r in sweep if recipe(r["config"]) == common]
    points = [
        (r["config"]["model_args"]["bits"], h, *(s["mAP_macro"] for s in summary(r, h)))
        for r in sweep
        for h in heads_of(r)
    ]
    if len({p[0] for p in points}) > 1:
        paths = report.plot_bits(os.path.join(out, "bits"), points)
        sections.append(
            (
                "mAP against hash bits",
                [os.path.basename(p) for p in paths],
                f"runs {', '.join(r['label'] for r in sweep)}",
            )
        )


def write_report(runs, args, out):
    """Every table and figure of these runs (aggregate.read_run dicts; args: aggregate's test_dir,
    bootstrap, seed) in out -> [(section title, [file names], caption)]."""
    os.makedirs(out, exist_ok=True)
    sections = []
    cv_report(runs, out, sections)
    test_report(runs, args, out, sections)
    figure_report(runs, out, sections)
    return sections


def reference_analysis(run, out, sections):
    """The reference run: per-class AP coloured by dev prevalence, per_class table, confusion (test
    ensemble at its evaluate.py thresholds), and the fold analysis (splits.json stats against
    per-fold per-class val AP)."""
    cfg = data.read_json(
        os.path.join(run, "fold0", "config.json"), "the fold's config", "re-run that fold"
    )
    splits = data.read_json(cfg["splits"], "the splits file", "re-run make_splits.py")
    cats, stats = splits["categories"], splits["stats"]
    names = [c["name"] for c in cats]
    pos = np.array([s["positives"] for s in stats], dtype=np.float64)  # [K, C]
    sizes = np.array([s["size"] for s in stats])
    npz = os.path.join(run, "eval_test", "test_predictions.npz")
    if os.path.isfile(npz):
        with np.load(npz) as z:
            y, p, thr = z["labels"], z["probs"], z["thresholds"] if "thresholds" in z.files else 0.5
        ap = metrics.per_class(y, p)["ap"]
        paths = report.plot_class_ap(
            os.path.join(out, "class_ap"),
            ap,
            pos.sum(0) / sizes.sum(),
            names,
            f"{os.path.basename(run)}: test AP per class (ensemble), colour = dev prevalence",
        )
        sections.append(
            ("Per-class AP (reference run, test)", [os.path.basename(x) for x in paths], "")
        )
        rows = report.per_class_rows(y, p, thr, cats)
        table(
            out,
            "per_class",
            rows[0],
            rows[1:],
            f"Per class, {os.path.basename(run)} ensemble on test at its evaluate.py thresholds",
            sections,
            "Per-class table (reference run, test)",
        )
        m = report.confusion(y, p, thr, cats, os.path.join(out, "confusion.csv"))
        paths = report.plot_confusion(
            os.path.join(out, "confusion"),
            m[:, :-1],
            cats,
            f"{os.path.basename(run)}: missed A, predicted B (test)",
        )
        sections.append(
            (
                "Confusion: missed A, predicted B (reference run, test)",
                ["confusion.csv"] + [os.path.basename(x) for x in paths],
                "row A sums to A's false negatives: "
                "each miss is split over the image's false positives",
            )
        )
    fold_ap = np.full(pos.shape, np.nan)
    for k in range(len(stats)):
        f = os.path.join(run, f"fold{k}", "val_predictions.npz")
        if os.path.isfile(f):
            with np.load(f) as z:
                fold_ap[k] = metrics.per_class(z["labels"], z["probs"])["ap"]
    table(
        out,
        "fold_analysis",
        ["fold", "images", "mAP_macro", "classes furthest from their mean AP"],
        report.fold_analysis(fold_ap, pos, sizes, names),
        "Why folds differ: validation mAP (MLP head) "
        "and the classes whose AP deviates most, with their positives in the fold vs the mean",
        sections,
        "Fold analysis",
    )
    rows = [[n, *pos[:, c].astype(int), *fold_ap[:, c]] for c, n in enumerate(names)]
    table(
        out,
        "fold_classes",
        [
            "class",
            *(f"positives fold {k}" for k in range(len(stats))),
            *(f"AP fold {k}" for k in range(len(stats))),
        ],
        rows,
        "Per-fold positives (splits.json stats) and validation AP per class",
        sections,
        "Fold analysis",
    )
    paths = report.plot_folds(os.path.join(out, "folds"), fold_ap, pos, names)
    sections.append(("Fold analysis", [os.path.basename(x) for x in paths], ""))


ORDER = (
    "Cross-validation: all",
    "Cross-validation: KNN",
    "mAP against",
    "Test: all",
    "Test: KNN",
    "Beside the literature",
    "Per-class AP",
    "Per-class table",
    "Confusion",
    "Fold analysis",
    "Learning curves",
    "Cross-validation per run",
    "Test per run",
)


def write_report_md(out, sections, runs, args):
    chapter = sorted(
        sections,
        key=lambda s: next((i for i, o in enumerate(ORDER) if s[0].startswith(o)), len(ORDER)),
    )
    md = [
        f"# Results: {os.path.basename(os.path.normpath(args.study_dir))}\n",
        "Runs (train.py flags; the first is the reference): "
        + "; ".join(f"`{n}` ({' '.join(f) or 'defaults'})" for n, f in runs)
        + ".\n",
        f"Extra flags: `{' '.join(args.train_args) or 'none'}`; folds: {args.fold_list or 'all'}"
        + (f"; demo: {DEMO['FOLDS']} folds, {' '.join(DEMO_FLAGS)}" if args.demo else "")
        + ".\n",
    ]
    last = None
    for title, files, caption in chapter:
        if title != last:
            md.append(f"## {title}\n")
            last = title
        md.append(
            (f"{caption}\n\n" if caption else "")
            + " · ".join(f"![{f}]({f})" if f.endswith(".png") else f"[{f}]({f})" for f in files)
            + "\n"
        )
    data.save_text(os.path.join(out, "report.md"), "\n".join(md))


def inputs_stamp(runs):
    """What the report is made of: each run's result files with their sizes and mtimes."""
    files = [
        os.path.join(r, d, f)
        for r in runs
        for d, f in (
            ("", "cv_results.csv"),
            ("eval_test", "metrics.json"),
            ("eval_test", "test_predictions.npz"),
        )
    ]
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]


def main(args):
    args.study_dir = args.study_dir or ("outputs/demo_study" if args.demo else "outputs/study")
    env = dict(os.environ, **(DEMO if args.demo else {}))
    if args.demo:
        args.train_args = DEMO_FLAGS + args.train_args  # later flags win on train.py's command line
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - {n for n, _ in RUNS} - {VIEWS_RUN[0]})
    if unknown:
        cli.fail(f"--only: unknown runs {unknown}; choose from {', '.join(n for n, _ in RUNS)}")
    runs = [(n, f) for n, f in RUNS if not only or n in only]
    dirs = [make_run(n, f, args, env) for n, f in runs]
    if cache_views(dirs[0]) > 1 and (not only or VIEWS_RUN[0] in only):  # augmentation against none
        runs.append(VIEWS_RUN)
        dirs.append(make_run(*VIEWS_RUN, args, env))
    try:
        return report_folder(args, runs, dirs)
    except data.DataError as e:  # an unreadable result file, runs of different protocols
        cli.fail(str(e))


def report_folder(args, runs, dirs):
    """<study>/report/ from the run folders (skipped when up to date) -> its path; bad input:
    data.DataError."""
    out = os.path.join(args.study_dir, "report")
    stamp = os.path.join(out, ".inputs")
    if (
        os.path.isfile(stamp)
        and data.read_json(stamp, "the report's stamp", "delete it") == inputs_stamp(dirs)
        and os.path.isfile(os.path.join(out, "report.md"))
    ):
        print(f"== report: skipped ({out} is up to date)")
        return out
    os.makedirs(out, exist_ok=True)
    agg = aggregate.get_args_parser().parse_args(
        [*dirs, "--allow_partial", "--out", out, "--bootstrap", str(args.bootstrap)]
    )
    # CV tables in each run, comparison + literature tables in out (several runs)
    res = aggregate.main(agg)
    sections = write_report(res["runs"], agg, out)
    lit = res["literature"] if len(dirs) > 1 else literature.write(out, res["runs"], agg.test_dir)
    if lit:
        sections.append(
            (
                "Beside the literature",
                [f"literature.{e}" for e in ("md", "csv", "tex")],
                "our test numbers beside the published ones of the splits file's protocol",
            )
        )
    reference_analysis(dirs[0], out, sections)
    write_report_md(out, sections, runs, args)
    data.save_json(stamp, inputs_stamp(dirs))
    print(f"== report: {out}/report.md ({len(sections)} entries)")
    return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--" in argv:  # everything after -- goes to train.py, even flags argparse would claim
        i = argv.index("--")
        a = get_args_parser().parse_args(argv[:i])
        a.train_args = argv[i + 1 :]
    else:
        a = get_args_parser().parse_args(argv)
    main(a)

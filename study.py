"""
The review's ablation study in one command: every run an ordinary run_cv.sh run folder, then one report folder.

    bash run_cv.sh --study                  # = python study.py: outputs/study/<run>/ + outputs/study/report/
    bash run_cv.sh --demo --study           # offline: synthetic data, 3 folds (own splits file), 6 epochs
    FOLD_LIST=0 bash run_cv.sh --study -- --epochs 50 --patience 0   # one fold, longer (runs labelled partial)
    python study.py --only bits0,bits64     # a subset of the runs

Runs (train.py flags; reference first): hash64 (the default recipe), bits0 (plain MLP), bits16, bits32, bits128,
bits256, concat (--fusion concat), knn_recipe (--code_classifier centres --sign_weight 1), probe and zeroshot
(--baseline). Flags after -- go to every run. Each run is `RUN=<study>/<name> bash run_cv.sh [--demo] -- <flags>`
on one splits file and one feature cache, with EVAL_ARGS=--head both where the run has hash bits; a run whose
folds all hold .done and whose eval_test/metrics.csv exists is skipped without starting run_cv.sh, and an
interrupted one resumes (run_cv.sh skips finished folds and resumes the interrupted one from last.pt).
Then aggregate.py --report writes every table and figure into <study>/report/, this script adds the reference
run's per-class, confusion and fold analysis, and report.md links them in the order of a results chapter. The
report is skipped when no run's results changed since it was written (report/.inputs).
"""
import json
import os
import subprocess
import sys

import numpy as np

import aggregate
import cli
import data
import metrics
import report

RUNS = [("hash64", []), ("bits0", ["--bits", "0"]), ("bits16", ["--bits", "16"]), ("bits32", ["--bits", "32"]),
        ("bits128", ["--bits", "128"]), ("bits256", ["--bits", "256"]), ("concat", ["--fusion", "concat"]),
        ("knn_recipe", ["--code_classifier", "centres", "--sign_weight", "1"]),
        ("probe", ["--baseline", "probe"]), ("zeroshot", ["--baseline", "zeroshot"])]
NO_BITS = {"bits0", "probe", "zeroshot"}  # no hash codes: the MLP head only
DEMO = {"FOLDS": "3", "SPLITS": "demo/coco/splits_study3.json"}  # 3 complete folds, apart from the 5-fold demo's
DEMO_FLAGS = ["--epochs", "6", "--patience", "3"]


def get_args_parser():
    p = cli.Parser("study", description="the ablation set of run_cv.sh runs and its report folder")
    p.add_argument("--demo", action="store_true", help="synthetic data and tiny SigLIP (run_cv.sh --demo), 3 folds, "
                   "6 epochs: a few minutes on a CPU")
    p.add_argument("--study_dir", default=None, help="default outputs/study (outputs/demo_study with --demo)")
    p.add_argument("--only", default="", help="comma-separated run names (default: all of them)")
    p.add_argument("--fold_list", default=os.environ.get("FOLD_LIST", ""), help="folds to train, e.g. 0 (run_cv.sh's FOLD_LIST)")
    p.add_argument("--bootstrap", type=cli.nonneg_int, default=1000, help="bootstrap draws of the test tables")
    p.add_argument("--run_cv", default="bash run_cv.sh", help="the command that makes one run (tests replace it)")
    p.add_argument("train_args", nargs="*", help="after --: train.py flags for every run")
    return p


def run_done(run, folds):
    return all(os.path.isfile(os.path.join(run, f"fold{k}", ".done")) for k in folds) and \
        os.path.isfile(os.path.join(run, "eval_test", "metrics.csv"))


def make_run(name, flags, args, env):
    """One run folder via run_cv.sh (skipped when complete) -> its path."""
    run = os.path.join(args.study_dir, name)
    folds = [int(k) for k in args.fold_list.replace(",", " ").split()] or range(int(env.get("FOLDS", 5)))
    if run_done(run, folds):
        print(f"== {name}: skipped ({run} is complete)")
        return run
    cmd = args.run_cv.split() + (["--demo"] if args.demo else []) + ["--", *flags, *args.train_args]
    env = dict(env, RUN=run, EVAL_ARGS=env.get("EVAL_ARGS", "") + ("" if name in NO_BITS else " --head both"))
    if args.fold_list:
        env["FOLD_LIST"] = args.fold_list
    print(f"== {name}: RUN={run} {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        cli.fail(f"run {name} failed (see above); rerun the same command: finished folds and runs are skipped")
    return run


def reference_analysis(run, out, sections):
    """The reference run: per-class AP coloured by dev prevalence, per_class table, confusion (test ensemble at
    its evaluate.py thresholds), and the fold analysis (splits.json stats against per-fold per-class val AP)."""
    cfg = aggregate.read_json(os.path.join(run, "fold0", "config.json"))
    splits = aggregate.read_json(cfg["splits"])
    cats, stats = splits["categories"], splits["stats"]
    names = [c["name"] for c in cats]
    pos = np.array([s["positives"] for s in stats], dtype=np.float64)  # [K, C]
    sizes = np.array([s["size"] for s in stats])
    npz = os.path.join(run, "eval_test", "test_predictions.npz")
    if os.path.isfile(npz):
        with np.load(npz) as z:
            y, p, thr = z["labels"], z["probs"], z["thresholds"] if "thresholds" in z.files else 0.5
        ap = metrics.per_class(y, p)["ap"]
        paths = report.plot_class_ap(os.path.join(out, "class_ap"), ap, pos.sum(0) / sizes.sum(), names,
                                     f"{os.path.basename(run)}: test AP per class (ensemble), colour = dev prevalence")
        sections.append(("Per-class AP (reference run, test)", [os.path.basename(x) for x in paths], ""))
        rows = report.per_class_rows(y, p, thr, cats)
        aggregate.table(out, "per_class", rows[0], rows[1:], f"Per class, {os.path.basename(run)} ensemble on test "
                        "at its evaluate.py thresholds", sections, "Per-class table (reference run, test)")
        m = report.confusion(y, p, thr, cats, os.path.join(out, "confusion.csv"))
        paths = report.plot_confusion(os.path.join(out, "confusion"), m[:, :-1], cats,
                                      f"{os.path.basename(run)}: missed A, predicted B (test)")
        sections.append(("Confusion: missed A, predicted B (reference run, test)",
                         ["confusion.csv"] + [os.path.basename(x) for x in paths],
                         "row A sums to A's false negatives: each miss is split over the image's false positives"))
    fold_ap = np.full(pos.shape, np.nan)
    for k in range(len(stats)):
        f = os.path.join(run, f"fold{k}", "val_predictions.npz")
        if os.path.isfile(f):
            with np.load(f) as z:
                fold_ap[k] = metrics.per_class(z["labels"], z["probs"])["ap"]
    aggregate.table(out, "fold_analysis", ["fold", "images", "mAP_macro", "classes furthest from their mean AP"],
                    report.fold_analysis(fold_ap, pos, sizes, names), "Why folds differ: validation mAP (MLP head) "
                    "and the classes whose AP deviates most, with their positives in the fold vs the mean",
                    sections, "Fold analysis")
    rows = [[n, *pos[:, c].astype(int), *fold_ap[:, c]] for c, n in enumerate(names)]
    aggregate.table(out, "fold_classes", ["class", *(f"positives fold {k}" for k in range(len(stats))),
                                          *(f"AP fold {k}" for k in range(len(stats)))], rows,
                    "Per-fold positives (splits.json stats) and validation AP per class", sections, "Fold analysis")
    paths = report.plot_folds(os.path.join(out, "folds"), fold_ap, pos, names)
    sections.append(("Fold analysis", [os.path.basename(x) for x in paths], ""))


ORDER = ("Cross-validation: all", "Cross-validation: KNN", "mAP against", "Test: all", "Test: KNN", "Per-class AP",
         "Per-class table", "Confusion", "Fold analysis", "Learning curves", "Cross-validation per run", "Test per run")


def write_report_md(out, sections, runs, args):
    chapter = sorted(sections, key=lambda s: next((i for i, o in enumerate(ORDER) if s[0].startswith(o)), len(ORDER)))
    md = [f"# Results: {os.path.basename(os.path.normpath(args.study_dir))}\n",
          "Runs (train.py flags; the first is the reference): " + "; ".join(
              f"`{n}` ({' '.join(f) or 'defaults'})" for n, f in runs) + ".\n",
          f"Extra flags: `{' '.join(args.train_args) or 'none'}`; folds: {args.fold_list or 'all'}"
          + (f"; demo: {DEMO['FOLDS']} folds, {' '.join(DEMO_FLAGS)}" if args.demo else "") + ".\n"]
    last = None
    for title, files, caption in chapter:
        if title != last:
            md.append(f"## {title}\n")
            last = title
        md.append((f"{caption}\n\n" if caption else "") + " · ".join(
            f"![{f}]({f})" if f.endswith(".png") else f"[{f}]({f})" for f in files) + "\n")
    data.save_text(os.path.join(out, "report.md"), "\n".join(md))


def inputs_stamp(runs):
    """What the report is made of: each run's result files with their sizes and mtimes."""
    files = [os.path.join(r, d, f) for r in runs for d, f in (("", "cv_results.csv"), ("eval_test", "metrics.json"),
                                                             ("eval_test", "test_predictions.npz"))]
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]


def main(args):
    args.study_dir = args.study_dir or ("outputs/demo_study" if args.demo else "outputs/study")
    env = dict(os.environ, **(DEMO if args.demo else {}))
    if args.demo:
        args.train_args = DEMO_FLAGS + args.train_args  # later flags win on train.py's command line
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - {n for n, _ in RUNS})
    if unknown:
        cli.fail(f"--only: unknown runs {unknown}; choose from {', '.join(n for n, _ in RUNS)}")
    runs = [(n, f) for n, f in RUNS if not only or n in only]
    dirs = [make_run(n, f, args, env) for n, f in runs]
    out = os.path.join(args.study_dir, "report")
    stamp = os.path.join(out, ".inputs")
    if os.path.isfile(stamp) and aggregate.read_json(stamp) == inputs_stamp(dirs) and \
            os.path.isfile(os.path.join(out, "report.md")):
        print(f"== report: skipped ({out} is up to date)")
        return out
    agg = aggregate.get_args_parser().parse_args([*dirs, "--allow_partial", "--report", out, "--out", out,
                                                  "--bootstrap", str(args.bootstrap)])
    sections = aggregate.main(agg)["sections"]
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
        a.train_args = argv[i + 1:]
    else:
        a = get_args_parser().parse_args(argv)
    main(a)

"""
The review's ablation study in one command: every run an ordinary run_cv.sh run folder, then one
report folder.

    bash run_cv.sh --study             # = python study.py: outputs/study/<run>/ + .../report/
    bash run_cv.sh --demo --study      # offline: synthetic data, 3 folds (own splits), 6 epochs
    FOLD_LIST=0 bash run_cv.sh --study -- --epochs 50 --patience 0   # one fold (runs: partial)
    python study.py --only bits0,bits64     # a subset of the runs
    MODELS="google/siglip2-base-patch16-256 openai/clip-vit-base-patch16" bash run_cv.sh --study
                                            # + the backbone table (study.py --backbones)

Runs (train.py flags; reference first): hash64 (the default recipe), bits0 (plain MLP), bits16,
bits32, bits128, bits256, concat (--fusion concat), knn_recipe (--code_classifier centres
--sign_weight 1), probe and zeroshot (--baseline), then the literature's methods (method_runs:
mlgcn and mlgcn_image; csq / dpsh / hashnet<bits> and hash<bits> at 16/32/48/64 bits, 16/64 with
--demo, with _image twins: --inputs image). Flags after -- go to every run (a flag given twice:
its last value, so train.py's command line names each flag once). Each run is
`RUN=<study>/<name> SUMMARY=0 bash run_cv.sh [--demo] -- <flags>` on one splits file and one
feature cache, with EVAL_ARGS="--head both --retrieval" where the run has hash bits; a run whose
folds all hold .done and whose eval_test/metrics.csv exists is skipped without starting run_cv.sh,
and an interrupted one resumes (run_cv.sh skips finished folds and resumes the interrupted one from
last.pt).
Backbones (--backbones, default the MODELS variable; --demo: a tiny SigLIP and a tiny CLIP): the
first is the study's own MODEL; every other one gets the runs hash64, bits0, probe and zeroshot
under <study>/<its folder name>/ with MODEL set to it (its own cache: run_cv.sh's FEATURES for
that model, one extraction each; the same splits and flags), and the report gets backbones.*
(report.backbones: CV, test, paired tests against the first backbone) and backbone_cost.*
(extraction images/s from <cache>.cost.json, cache size).
Then the report folder <study>/report/, a results chapter: report.md states each section's result
(a sentence made from the numbers and its headline table: CV mean ± std and test [interval] of
every run, the ablations against the reference and KNN against MLP with their paired-test
p-values, bits, literature, the methods and hashing tables (report.methods), per class,
confusion, folds) and links every table (.csv/.md/.tex, in
%, each .tex fitting a page: report.latex) and figure (.png/.pdf); report.tex is the same chapter
with every table and figure, compiled to report.pdf where pdflatex is installed (report.chapter).
aggregate.py's output goes to report/aggregate.log. The report is skipped when no run's results
changed since it was written (report/.inputs).
"""

import contextlib
import os
import subprocess
import sys


import aggregate
import cli
import data
from report import backbones as report_backbones
from report import literature
from report import methods as report_methods
from report import sections as report_sections
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
NO_BITS = {"bits0", "probe", "zeroshot", "mlgcn", "mlgcn_image"}  # no codes: the MLP head only
HASH_BITS, DEMO_HASH_BITS = (16, 32, 48, 64), (16, 64)  # the hashing table's code lengths


def method_runs(demo):
    """The literature's methods on our cache (report.methods' tables): ML-GCN, and CSQ / DPSH /
    HashNet and our head at HASH_BITS (DEMO_HASH_BITS with --demo), image + caption and image
    only (the reference 64-bit head is hash64)."""
    out = [
        ("mlgcn", ["--head", "mlgcn"]),
        ("mlgcn_image", ["--head", "mlgcn", "--inputs", "image"]),
    ]
    for bits in DEMO_HASH_BITS if demo else HASH_BITS:
        for inputs in ("both", "image"):
            tail = [] if inputs == "both" else ["--inputs", "image"]
            name = "" if inputs == "both" else "_image"
            if bits not in (16, 32, 64) or inputs == "image":  # bits16/32, hash64 exist
                out.append((f"hash{bits}{name}", ["--bits", str(bits), *tail]))
            for loss in ("csq", "dpsh", "hashnet"):
                out.append(
                    (f"{loss}{bits}{name}", ["--hash_loss", loss, "--bits", str(bits), *tail])
                )
    return out


# the backbone table's runs on every backbone after the first (report.backbones: the KNN head is
# hash64's); --demo's backbones: a tiny SigLIP and a tiny CLIP (run_cv.sh --demo makes both)
BACKBONE_RUNS = ("hash64", "bits0", "probe", "zeroshot")
DEMO_BACKBONES = ("demo/tiny_siglip", "demo/tiny_clip")


def slug(backbone):
    """A checkpoint's name or folder -> the folder of its runs in the study."""
    return os.path.basename(backbone.rstrip("/"))


def backbone_runs(backbones):
    """[(run name <slug>/<run>, its flags, its environment)] of every backbone after the first: the
    same flags as the first backbone's runs, MODEL set (run_cv.sh derives its cache from it)."""
    flags, out = dict(RUNS), []
    slugs = [slug(b) for b in backbones]
    if len(set(slugs)) < len(slugs):
        cli.fail(f"--backbones: two checkpoints share a folder name ({' '.join(backbones)})")
    for b, folder in zip(backbones[1:], slugs[1:]):
        out += [(f"{folder}/{n}", flags[n], {"MODEL": b}) for n in BACKBONE_RUNS]
    return out


VIEWS_RUN = ("plain_view", ["--train_views", "plain"])  # only with augmented views (--views > 1)
DEMO = {"FOLDS": "3", "SPLITS": "demo/coco/splits_study3.json"}  # 3 folds, not the demo's 5
DEMO_FLAGS = ["--epochs", "6", "--patience", "3"]


def get_args_parser():
    p = cli.Parser("study", description="the ablation set of run_cv.sh runs and its report folder")
    p.add_argument(
        "--demo",
        action="store_true",
        help="synthetic data, tiny SigLIP (run_cv.sh --demo), 3 folds, 6 epochs (default: off)",
    )
    p.add_argument(
        "--study_dir", default=None, help="default outputs/study (outputs/demo_study with --demo)"
    )
    p.add_argument(
        "--backbones",
        default=os.environ.get("MODELS", ""),
        help="checkpoints for the backbone table, the first the study's (default: MODELS or none)",
    )
    p.add_argument("--only", default="", help="comma-separated run names (default: all of them)")
    p.add_argument(
        "--fold_list",
        default=os.environ.get("FOLD_LIST", ""),
        help="folds to train, e.g. 0 (default: all; run_cv.sh's FOLD_LIST)",
    )
    p.add_argument(
        "--bootstrap", type=cli.nonneg_int, default=1000, help="resamples of the test intervals"
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


def merge_flags(*lists):
    """train.py flag lists -> one in which each flag appears once, with its last value (a later
    list wins, as on train.py's command line); a flag's value is the token after it unless that
    starts with --."""
    out = {}
    for flags in lists:
        i = 0
        while i < len(flags):
            f, i = flags[i], i + 1
            vals = []
            while i < len(flags) and not flags[i].startswith("--"):
                vals.append(flags[i])
                i += 1
            out.pop(f, None)  # re-inserted: the order of the command line's last word
            out[f] = vals
    return [x for f, vals in out.items() for x in (f, *vals)]


def make_run(name, flags, args, env, own_env=None):
    """One run folder via run_cv.sh (skipped when complete) -> its path. own_env: the run's own
    settings (another backbone: MODEL, and its own cache rather than FEATURES)."""
    run = os.path.join(args.study_dir, name)
    folds = [int(k) for k in args.fold_list.replace(",", " ").split()] or range(
        int(env.get("FOLDS", 5))
    )
    if run_done(run, folds):
        print(f"== {name}: skipped ({run} is complete)")
        return run
    flags = merge_flags(flags, args.train_args)
    cmd = args.run_cv.split() + (["--demo"] if args.demo else []) + ["--", *flags]
    env = dict(
        env,
        RUN=run,
        SUMMARY="0",  # run_cv.sh ends with the result paths: their tables are in the report
        EVAL_ARGS=env.get("EVAL_ARGS", "")
        + ("" if name.split("/")[-1] in NO_BITS else " --head both --retrieval"),
    )
    if own_env:
        env.pop("FEATURES", None)
        env.update(own_env)
    if args.fold_list:
        env["FOLD_LIST"] = args.fold_list
    print(f"== {name}: RUN={run} {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        cli.fail(
            f"run {name} failed (see above); rerun the same command: finished folds and runs "
            f"are skipped"
        )
    return run


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
        args.train_args = merge_flags(DEMO_FLAGS, args.train_args)  # a given flag wins
    only = [s for s in args.only.split(",") if s]
    backbones = args.backbones.replace(",", " ").split() or list(
        DEMO_BACKBONES if args.demo else ()
    )
    if backbones:
        env["MODEL"] = backbones[0]  # the study's own runs
    every = [(n, f, None) for n, f in RUNS + method_runs(args.demo)] + backbone_runs(backbones)
    unknown = sorted(set(only) - {n for n, *_ in every} - {VIEWS_RUN[0]})
    if unknown:
        cli.fail(f"--only: unknown runs {unknown}; choose from {', '.join(n for n, *_ in every)}")
    chosen = [r for r in every if not only or r[0] in only]
    runs = [(n, f) for n, f, _ in chosen]
    dirs = [make_run(n, f, args, env, own) for n, f, own in chosen]
    if cache_views(dirs[0]) > 1 and (not only or VIEWS_RUN[0] in only):  # augmentation against none
        runs.append(VIEWS_RUN)
        dirs.append(make_run(*VIEWS_RUN, args, env))
    try:
        return report_folder(args, runs, dirs, backbones)
    except data.DataError as e:  # an unreadable result file, runs of different protocols
        cli.fail(str(e))


def report_folder(args, runs, dirs, backbones=()):
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
    # CV tables in each run, comparison + literature tables in out (several runs); what aggregate
    # prints (every run's CV tables) goes to its log, the tables are in the report
    log = os.path.join(out, "aggregate.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        res = aggregate.main(agg)
    print(f"== report: aggregate.py's tables of {len(dirs)} runs (its output: {log})")
    sections = report_sections.write_report(res["runs"], agg, out, res.get("tests", []))
    report_methods.write(out, res["runs"], agg, sections)  # the methods and hashing tables
    by_dir = {os.path.normpath(r["dir"]): r for r in res["runs"]}
    table = {}  # the backbone table's runs: {model: {run: aggregate's run}}
    for b in backbones:
        for n in BACKBONE_RUNS:
            d = os.path.join(args.study_dir, n if b == backbones[0] else f"{slug(b)}/{n}")
            if os.path.normpath(d) in by_dir:
                table.setdefault(b, {})[n] = by_dir[os.path.normpath(d)]
    report_backbones.write(out, table, agg, sections)
    lit = res["literature"] if len(dirs) > 1 else literature.write(out, res["runs"], agg.test_dir)
    if lit:
        sections.append(
            dict(
                title="Beside the literature",
                text=literature.summary(res["runs"], agg.test_dir),
                files=[f"literature.{e}" for e in ("md", "csv", "tex")],
                caption="our test numbers beside the published ones of the splits file's protocol",
            )
        )
    report_sections.reference_analysis(dirs[0], out, sections)
    paths = report_sections.write_chapter(out, sections, runs, args, res)
    data.save_json(stamp, inputs_stamp(dirs))
    print(f"== report: {', '.join(paths)} ({len(sections)} entries)")
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

"""The study's report sections: each writes its tables and figures into the report folder and
returns the section for report.md (study.py's report_folder calls write_report, then the chapter).

    sections = report.sections.write_report(aggregated_runs, args, "outputs/study/report")
"""

import json
import os
import re

import numpy as np

import data
import metrics
import report
from aggregate import COLUMNS, head_tests, heads_of, summary  # what the CV tables show
from report import chapter, literature


def pct(m):
    """The factor a metric prints with: 100 for a fraction (in %), 1 otherwise."""
    return 100 if m in report.FRACTIONS else 1


def ms(mean, std, k=100):
    return report.MeanStd(k * mean, k * std)


def ci_text(n_boot):
    """The test intervals in words (the rule of metrics.bootstrap_intervals)."""
    return metrics.interval_text(n_boot)


def table(out, name, header, rows, caption, sections, title, link=None, **kw):
    """One table in out/name.{csv,md,tex} (metrics in %), recorded under its section title (link:
    the words before its links in report.md, default the caption) -> the Markdown text."""
    kw.setdefault("percent", True)
    kw.setdefault("digits", 2)
    md = report.write_table(os.path.join(out, name), header, rows, caption=caption, **kw)
    files = [f"{name}.{e}" for e in ("md", "csv", "tex")]
    sections.append(dict(title=title, files=files, caption=link or caption))
    return md


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
        "Cross-validation (validation folds): mean ± std over folds (ddof 1), threshold 0.5, "
        "in % but coverage error; best per column in bold",
        sections,
        "Main results",
    )
    rows = []
    for r in runs:
        for m, t in head_tests(r).items():
            (a, sa), (b, sb) = ((summary(r, h)[0][m], summary(r, h)[1][m]) for h in ("mlp", "knn"))
            rows.append(
                [
                    r["label"],
                    report.label(m),
                    ms(a, sa, pct(m)),
                    ms(b, sb, pct(m)),
                    f"{pct(m) * t['mean_diff']:+.1f}",
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
            "KNN head against MLP head over folds (% and points but coverage error): paired "
            "t-test across folds (two-sided)",
            sections,
            "KNN head vs MLP head",
            digits=1,
            keys=2,
        )
    sections.append(
        dict(
            title="Per run: cross-validation",
            text="Every fold of each run, both heads, and their mean ± std (%, but coverage error "
            "and best epoch).",
        )
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
            f"Cross-validation folds of {r['label']} (%, but coverage error and best epoch)",
            sections,
            "Per run: cross-validation",
            link=r["label"],
            skip_bold=range(len(rows) - len(heads_of(r)), len(rows)),
            keys=2,
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
        raise data.DataError(
            f"{npz}: unreadable ({type(e).__name__}); re-run evaluate.py --ensemble {r['dir']}"
        ) from None
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


def run_test_cells(r, ev, args):
    """One run's test cells: {head: {row name: [cell per metric]}} (Interval cells where the
    bootstrap ran), its rows on one set of resamples."""
    M = metrics.METRIC_NAMES
    arrays = [
        (h, n, p) for h, rs in ev["heads"].items() for n, p in rs if isinstance(p, np.ndarray)
    ]
    cis = (
        metrics.bootstrap_intervals(
            ev["y"], [p for *_, p in arrays], n_boot=args.bootstrap, seed=args.seed
        )
        if args.bootstrap
        else [None] * len(arrays)
    )
    ci = {(h, n): c for (h, n, _), c in zip(arrays, cis)}
    return {
        h: {
            n: [
                report.Interval(*ci[h, n][m])
                if ci.get((h, n))
                else (metrics.compute_all(ev["y"], p)[m] if isinstance(p, np.ndarray) else p[m])
                for m in M
            ]
            for n, p in rs
        }
        for h, rs in ev["heads"].items()
    }


def test_report(runs, args, out, sections):
    """test_<run>: every fold model, mean ± std over them and the ensemble, both heads, test
    intervals of all 15 metrics (one set of resamples for every row of a run); test_table: the
    runs side by side; test_heads: KNN - MLP ensembles (paired bootstrap). -> {(label, head):
    {"ensemble": {metric: cell}, "folds": {metric: MeanStd}}} and the test_heads rows."""
    M, side, heads_rows, found = metrics.METRIC_NAMES, [], [], {}
    sections.append(
        dict(
            title="Per run: test",
            text=f"Every fold model of each run, their mean ± std and their ensemble on the test "
            f"images, both heads, threshold 0.5 (%, but coverage error); intervals: "
            f"{ci_text(args.bootstrap)}, every row of a run on the same resamples.",
        )
    )
    for r in runs:
        ev = load_eval(r, args.test_dir)
        if ev is None:
            print(
                f"note: {r['dir']}: no {args.test_dir}/test_predictions.npz + metrics.json; "
                f"no test table"
            )
            continue
        rows = []
        for h, cells in run_test_cells(r, ev, args).items():
            folds = [n for n in cells if n != "ensemble"]
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
            found[r["label"], h] = {
                "ensemble": dict(zip(M, cells["ensemble"])),
                "folds": dict(zip(M, mean)),
                "n_images": len(ev["y"]),
            }
        table(
            out,
            f"test_{safe(r)}",
            ["model", "head", *M],
            rows,
            f"Hold-out test of {r['label']} (%, but coverage error): value "
            f"[{ci_text(args.bootstrap)}], threshold 0.5",
            sections,
            "Per run: test",
            link=r["label"],
            keys=2,
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
                        report.Interval(*(100 * t[k] for k in ("diff", "low", "high"))),
                        f"{t['p']:.3g}",
                    ]
                )
    if side:
        table(
            out,
            "test_table",
            ["run", "head", "model", *M],
            side,
            f"Hold-out test, every run (%, but coverage error): the ensemble "
            f"[{ci_text(args.bootstrap)}] and mean ± std over the fold models",
            sections,
            "Main results",
            keys=3,
        )
    if heads_rows:
        table(
            out,
            "test_heads",
            ["run", "metric", "KNN - MLP (points)", "p"],
            heads_rows,
            f"KNN ensemble against MLP ensemble on the test images: difference in points "
            f"[{ci_text(args.bootstrap)}], paired bootstrap p",
            sections,
            "KNN head vs MLP head",
            digits=1,
            keys=2,
        )
    return found, heads_rows


def recipe(cfg):
    """What a bits sweep holds fixed: the fusion, the code classifier, the inputs and the head's
    kind (model_args "head" / "hash_loss": the literature's methods are not points of ours)."""
    args = cfg.get("model_args") or {}
    kind = (args.get("head"), args.get("hash_loss"))
    return cfg.get("fusion"), cfg.get("code_classifier"), cfg.get("inputs", "both"), kind


def learning_report(runs, out, sections):
    """learning_<run>: loss and val mAP per epoch, folds overlaid; a run whose folds trained one
    epoch each (a baseline fitted without gradient descent) gets no figure, and the report says
    so."""
    flat = []
    for r in runs:
        logs = {}
        for k in r["folds"]:
            path = os.path.join(r["dirs"][k], "log.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    logs[k] = [json.loads(line) for line in f if line.strip()]
        if max((len(v) for v in logs.values()), default=0) > 1:
            paths = report.plot_learning(os.path.join(out, f"learning_{safe(r)}"), logs, r["label"])
            sections.append(
                dict(
                    title="Learning curves",
                    files=[os.path.basename(p) for p in paths],
                    caption=r["label"],
                )
            )
        elif logs:
            flat.append(r["label"])
    if flat:
        sections.append(
            dict(
                title="Learning curves",
                text=f"No curve for {', '.join(flat)}: one epoch per fold (fitted without "
                "gradient descent), so there is nothing to draw.",
            )
        )


def bits_report(runs, out, sections):
    """bits: CV mAP against hash bits, both heads, over the runs that differ from the most common
    recipe (fusion, code classifier) only in bits."""
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
        best = {
            h: max((p for p in points if p[1] == h), key=lambda p: p[2])
            for h in dict.fromkeys(p[1] for p in points)
        }
        text = "; ".join(
            f"{h.upper()} head: best CV mAP (macro) at {b} bits, {100 * m:.1f} ± {100 * s:.1f}%"
            for h, (b, _, m, s) in best.items()
        )
        sections.append(
            dict(
                title="mAP against hash bits",
                text=f"{text} (runs {', '.join(r['label'] for r in sweep)}; 0 bits = plain MLP).",
                files=[os.path.basename(p) for p in paths],
                caption="CV mAP (macro) against hash bits, mean ± std over folds",
            )
        )


def write_report(runs, args, out, tests=()):
    """Every table and figure of these runs (aggregate.read_run dicts; args: aggregate's test_dir,
    bootstrap, seed; tests: aggregate's comparison rows) in out -> sections for report/chapter."""
    os.makedirs(out, exist_ok=True)
    sections = []
    cv_report(runs, out, sections)
    found, heads_rows = test_report(runs, args, out, sections)
    headline(runs, found, sections)
    ablation_report(runs, tests, out, sections)
    heads_headline(runs, heads_rows, sections)
    bits_report(runs, out, sections)
    learning_report(runs, out, sections)
    return sections


def cell_text(cell):
    return report._text(cell, d=1)


def headline(runs, found, sections):
    """Main results inline: CV mAP (macro) mean ± std and the test ensemble's [interval] per run
    and head, and the sentence naming the best."""
    rows, cv, test = [], {}, {}
    for r in runs:
        for h in heads_of(r):
            key = (r["label"], h)
            cv[key] = ms(*(s["mAP_macro"] for s in summary(r, h)))
            t = found.get(key)
            if t:
                test[key] = report.scaled(t["ensemble"]["mAP_macro"], 100)
            rows.append(
                [
                    r["label"],
                    h.upper(),
                    cell_text(cv[key]),
                    cell_text(test[key]) if key in test else "-",
                    cell_text(report.scaled(t["folds"]["mAP_macro"], 100)) if t else "-",
                ]
            )
    ref = (runs[0]["label"], heads_of(runs[0])[0])

    def name(k):
        return f"{k[0]} ({k[1].upper()} head)"

    best_cv = max(cv, key=lambda k: cv[k][0])
    text = [f"Best on cross-validation: {name(best_cv)}, mAP (macro) {cell_text(cv[best_cv])}%"]
    if test:
        bt = max(test, key=lambda k: test[k][0])
        text.append(f"best on the test images: {name(bt)}, {cell_text(test[bt])}%")
    text.append(
        f"the reference {name(ref)}: {cell_text(cv[ref])}% on cross-validation"
        + (f", {cell_text(test[ref])}% on test" if ref in test else "")
    )
    n = next(iter(found.values()))["n_images"] if found else None
    sections.insert(
        0,
        dict(
            title="Main results",
            text="; ".join(text)
            + "."
            + (f" Test: {n} images, the fold models' ensemble [interval]." if n else ""),
            table=[
                ["run", "head", "CV mAP (macro), %", "test mAP (macro), %", "test, fold models"],
                *rows,
            ],
        ),
    )


def significant(pairs, alpha=0.05):
    """[(name, diff, p)] -> "a +1.2 (p 0.01), b -0.3 (p 0.04)" for p < alpha, or "none"."""
    hits = [f"{n} {d:+.1f} (p {p:.2g})" for n, d, p in pairs if np.isfinite(p) and p < alpha]
    return ", ".join(hits) or "none"


def ablation_report(runs, tests, out, sections):
    """ablations: every run against the reference, CV (paired t-test over folds) and test (paired
    bootstrap of the MLP / main head), metrics.BOOT_METRICS; its mAP rows inline."""
    if not tests:
        return
    rows = []
    for t in tests:
        if t["metric"] not in metrics.BOOT_METRICS:
            continue
        k = pct(t["metric"])
        rows.append(
            [
                os.path.basename(t["run"]),
                report.label(t["metric"]),
                t["folds"],
                f"{k * t['mean_diff']:+.1f}",
                f"{t['p_folds']:.2g}",
                report.Interval(*(k * t[f"test_{x}"] for x in ("diff", "low", "high")))
                if "test_diff" in t
                else "-",
                f"{t['p_test']:.2g}" if "p_test" in t else "-",
            ]
        )
    ref = os.path.basename(tests[0]["vs"])
    header = ["run", "metric", "folds", "CV diff", "p (folds)", "test diff [interval]", "p (test)"]
    table(
        out,
        "ablations",
        header,
        rows,
        f"Each run minus the reference {ref} (MLP head), in points: mean over folds with a paired "
        f"t-test across folds; on the test images a paired bootstrap",
        sections,
        "Ablations against the reference",
        digits=1,
        keys=2,
    )
    m = [t for t in tests if t["metric"] == "mAP_macro"]
    cv = [(os.path.basename(t["run"]), 100 * t["mean_diff"], t["p_folds"]) for t in m]
    te = [
        (os.path.basename(t["run"]), 100 * t["test_diff"], t["p_test"]) for t in m if "p_test" in t
    ]
    folds = min(t["folds"] for t in m)
    text = (
        f"mAP (macro) against {ref}: at p < 0.05 on cross-validation (paired t-test over "
        f"{folds} folds) {significant(cv)}"
        + (f"; on the test images (paired bootstrap) {significant(te)}" if te else "")
        + ". Best gain on cross-validation: "
        + "{} {:+.1f} points".format(*max(cv, key=lambda x: x[1])[:2])
        + "."
    )
    inline = [r[:2] + r[3:] for r in rows if r[1] == report.label("mAP_macro")]
    sections.insert(
        len(sections) - 1,
        dict(
            title="Ablations against the reference",
            text=text,
            table=[
                ["run", "metric", "CV diff", "p (folds)", "test diff [interval]", "p (test)"],
                *([cell_text(c) for c in r] for r in inline),
            ],
        ),
    )


def heads_headline(runs, heads_rows, sections):
    """KNN head vs MLP head inline: mAP (macro) differences per run on CV and test."""
    rows, cv, te = [], [], []
    test = {r[0]: r for r in heads_rows if r[1] == report.label("mAP_macro")}
    for r in runs:
        t = head_tests(r).get("mAP_macro")
        if not t:
            continue
        cv.append((r["label"], 100 * t["mean_diff"], t["p"]))
        row = test.get(r["label"])
        if row:
            te.append((r["label"], row[2][0], float(row[3])))
        rows.append(
            [
                r["label"],
                f"{100 * t['mean_diff']:+.1f}",
                f"{t['p']:.2g}",
                cell_text(row[2]) if row else "-",
                row[3] if row else "-",
            ]
        )
    if not rows:
        return
    wins = sum(d > 0 for _, d, _ in cv)
    text = (
        f"KNN minus MLP head, mAP (macro): higher on cross-validation in {wins} of {len(cv)} runs; "
        f"at p < 0.05 on cross-validation {significant(cv)}"
        + (f", on the test images {significant(te)}" if te else "")
        + "."
    )
    at = next(i for i, s in enumerate(sections) if s["title"] == "KNN head vs MLP head")
    sections.insert(
        at,
        dict(
            title="KNN head vs MLP head",
            text=text,
            table=[["run", "CV diff", "p (folds)", "test diff [interval]", "p (test)"], *rows],
        ),
    )


def reference_analysis(run, out, sections):
    """The reference run: per-class AP coloured by dev prevalence, per_class table, confusion (test
    ensemble at its evaluate.py thresholds), and the fold analysis (splits.json stats against
    per-fold per-class val AP)."""
    cfg = data.read_json(
        os.path.join(run, "fold0", "config.json"), "the fold's config", "re-run that fold"
    )
    splits = data.read_json(cfg["splits"], "the splits file", "re-run make_splits.py")
    cats, stats = splits["categories"], splits["stats"]
    pos = np.array([s["positives"] for s in stats], dtype=np.float64)  # [K, C]
    sizes = np.array([s["size"] for s in stats])
    npz = os.path.join(run, "eval_test", "test_predictions.npz")
    if os.path.isfile(npz):
        with np.load(npz) as z:
            y, p, thr = z["labels"], z["probs"], z["thresholds"] if "thresholds" in z.files else 0.5
        class_report(run, out, sections, (y, p, thr), cats, pos.sum(0) / sizes.sum())
        confusion_report(run, out, sections, (y, p, thr), cats)
    fold_report(run, out, sections, stats, pos, sizes, [c["name"] for c in cats])


def class_report(run, out, sections, test, cats, prevalence):
    """class_ap figure and per_class table of the reference run's test ensemble."""
    (y, p, thr), names, ref = test, [c["name"] for c in cats], os.path.basename(run)
    ap = metrics.per_class(y, p)["ap"]
    paths = report.plot_class_ap(
        os.path.join(out, "class_ap"),
        ap,
        prevalence,
        names,
        f"{ref}: test AP per class (ensemble)",
    )
    order = [c for c in np.argsort(-np.nan_to_num(ap, nan=-1), kind="stable") if ap[c] == ap[c]]

    def listed(cs):
        return ", ".join(f"{names[c]} {100 * ap[c]:.1f}" for c in cs)

    sections.append(
        dict(
            title="Per class (reference run, test)",
            text=f"{ref} ensemble, AP in %: highest {listed(order[:5])}; lowest "
            f"{listed(order[::-1][:5])}"
            + (
                f"; {len(names) - len(order)} of {len(names)} classes have no positive among "
                f"the {len(y)} test images (no AP)"
                if len(order) < len(names)
                else ""
            )
            + ".",
            files=[os.path.basename(x) for x in paths],
            caption="test AP per class, bars coloured by the class's dev prevalence",
        )
    )
    rows = report.per_class_rows(y, p, thr, cats)
    table(
        out,
        "per_class",
        rows[0],
        rows[1:],
        f"Per class, {ref} ensemble on test at its evaluate.py thresholds (%); "
        f"TN = images - TP - FP - FN",
        sections,
        "Per class (reference run, test)",
        tex_columns=rows[0][2:-1],
    )


def confusion_report(run, out, sections, test, cats):
    """confusion.csv and its figure, the top pairs inline."""
    (y, p, thr), names, ref = test, [c["name"] for c in cats], os.path.basename(run)
    m = report.confusion(y, p, thr, cats, os.path.join(out, "confusion.csv"))
    top = report.top_confusions(m[:, :-1], names, 5)
    paths = report.plot_confusion(
        os.path.join(out, "confusion"), m[:, :-1], cats, f"{ref}: missed A, predicted B (test)"
    )
    sections.append(
        dict(
            title="Confusion (reference run, test)",
            text="The most frequent confusions: true class A missed on an image where absent "
            "class B is predicted, each miss split over the image's false positives (row A of "
            "confusion.csv sums to A's false negatives)."
            if top
            else "No missed class co-occurs with a false positive.",
            table=[
                ["missed A", "predicted B", "images"],
                *([a, b, f"{v:.1f}"] for a, b, v in top),
            ]
            if top
            else None,
            files=["confusion.csv"] + [os.path.basename(x) for x in paths],
            caption="top confused pairs and the full matrix by supercategory",
        )
    )


def fold_report(run, out, sections, stats, pos, sizes, names):
    """fold_analysis, fold_classes and the folds figure: why the reference run's folds differ."""
    ref = os.path.basename(run)
    fold_ap = np.full(pos.shape, np.nan)
    for k in range(len(stats)):
        f = os.path.join(run, f"fold{k}", "val_predictions.npz")
        if os.path.isfile(f):
            with np.load(f) as z:
                fold_ap[k] = metrics.per_class(z["labels"], z["probs"])["ap"]
    rows = report.fold_analysis(fold_ap, pos, sizes, names)
    table(
        out,
        "fold_analysis",
        ["fold", "images", "mAP_macro", "classes furthest from their mean AP (points)"],
        rows,
        "Why folds differ: validation mAP (MLP head, %) and the classes whose AP deviates most "
        "from their mean over folds, with their positives in the fold vs the mean",
        sections,
        "Fold analysis",
    )
    done = [r for r in rows if np.isfinite(r[2])]
    if done:
        lo, hi = min(done, key=lambda r: r[2]), max(done, key=lambda r: r[2])
        sections.insert(
            len(sections) - 1,
            dict(
                title="Fold analysis",
                text=f"Validation mAP (macro) of {ref}'s folds: from {100 * lo[2]:.1f}% "
                f"({lo[0]}) to {100 * hi[2]:.1f}% ({hi[0]}), a spread of "
                f"{100 * (hi[2] - lo[2]):.1f} points.",
                table=[
                    ["fold", "images", "mAP (macro), %", "classes furthest from their mean AP"],
                    *([r[0], str(r[1]), cell_text(100 * r[2]), r[3]] for r in rows),
                ],
            ),
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
        "Per-fold positives (splits.json stats) and validation AP per class (%)",
        sections,
        "Fold analysis",
        percent=[f"AP fold {k}" for k in range(len(stats))],
    )
    paths = report.plot_folds(os.path.join(out, "folds"), fold_ap, pos, names)
    sections.append(
        dict(
            title="Fold analysis",
            files=[os.path.basename(x) for x in paths],
            caption="per-class AP deviation per fold, and positives against AP",
        )
    )


ORDER = (
    "Main results",
    "Ablations against",
    "KNN head vs MLP head",
    "mAP against hash bits",
    "Beside the literature",
    "Per class",
    "Confusion",
    "Fold analysis",
    "Learning curves",
    "Per run: cross-validation",
    "Per run: test",
)


def write_chapter(out, sections, runs, args, res):
    """report.md, report.tex (and report.pdf where pdflatex is) in chapter order."""
    chapter_sections = sorted(
        sections,
        key=lambda s: next(
            (i for i, o in enumerate(ORDER) if s["title"].startswith(o)), len(ORDER)
        ),
    )
    r0 = res["runs"][0]
    cfg = r0["config"]
    proto = literature.protocol(r0, "eval_test") or "unknown"
    folds = r0.get("expected") or len(r0["folds"])
    intro = [
        "Runs (train.py flags; the first is the reference): "
        + "; ".join(f"{n} ({' '.join(f) or 'defaults'})" for n, f in runs)
        + ".",
        f"Protocol {proto}; {folds}-fold cross-validation"
        + (f" ({args.fold_list and 'folds ' + args.fold_list or 'all folds'})")
        + f"; features {cfg.get('features', '?')}; every run also gets: "
        + (" ".join(args.train_args) or "no extra flags")
        + f". Test intervals: {ci_text(args.bootstrap)}. Metrics in % (coverage error in "
        "labels); differences in points.",
    ]
    title = f"Results: {os.path.basename(os.path.normpath(args.study_dir))}"
    return chapter.write(out, title, intro, chapter_sections)

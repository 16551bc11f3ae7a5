"""What evaluate.py leaves behind: the files of one evaluation in --out_dir, its terminal summary.

    from report import evaluation
    evaluation.write_split(args, res, ctx, paths, out_dir)  # metrics.json, CSVs, npz, figures
    evaluation.print_summary(args, res)        # the metrics table, thresholds, CIs, retrieval

res is evaluate.score_split's result, ctx evaluate.load_inputs' and args evaluate.py's flags; the
file list and what each file holds are in evaluate.py's docstring. Every file is written atomically
(data.atomic_write).
"""

import os

import numpy as np

import data
import metrics
import report

SHOWN = (
    "mAP_macro",
    "mAP_micro",
    "auc_macro",
    "f1_macro",
    "f1_micro",
    "hamming_loss",
)  # terminal table


def summary_of(args, res, ctx, paths):
    """metrics.json's content."""
    out = {
        "split": args.split,
        "n_images": len(res["rows"]),
        "skipped": res["n_skipped"],
        "checkpoints": paths,
        "features": ctx["features"],
        "splits": ctx["splits_path"],
        "protocol": ctx["splits"]["protocol"],
        "heads": list(res["preds"]),
        "models": {n: {hd: res["results"][hd][n] for hd in res["results"]} for n in res["members"]},
        "ensemble": {hd: res["results"][hd]["ensemble"] for hd in res["results"]},
    }
    out["scoring"] = args.scoring  # the rule every image was scored with (model.SCORING_RULES)
    if args.head != "mlp":
        out["knn"] = {
            "k": args.knn_k,
            "tau": args.knn_tau,
            "vote": args.knn_vote,
            "query": args.knn_query,
            "database": "each fold model's training images (dev - val_folds[fold])",
        }
    if "at_oof" in res:
        out["thresholds"] = {"0.5": res["results"][res["main"]]["ensemble"], "oof": res["at_oof"]}
    if "ci" in res:  # all 15 metrics, each "value" inside its [low, high] (metrics.bootstrap_ci)
        out["bootstrap_ci"] = {
            "interval": metrics.interval_rule(args.bootstrap, 0.05, len(res["rows"])),
            "n_boot": args.bootstrap,
            "seed": args.seed,
            "alpha": 0.05,
            "head": res["main"],
            "thresholds": args.thresholds,
            **{k: {"value": v, "low": lo, "high": hi} for k, (v, lo, hi) in res["ci"].items()},
        }
    if res["retrieval"]:
        out["retrieval"] = res["retrieval"]
    return out


def metrics_md(results, title):
    """metrics.csv for reading: per head, a metric a row and a model (the folds, the ensemble) a
    column."""
    parts = [f"# {title}\n"]
    for head, by_model in results.items():
        rows = [
            [report.LABELS[m], *(f"{r[m]:.4f}" for r in by_model.values())]
            for m in metrics.METRIC_NAMES
        ]
        parts += [f"## {head.upper()} head\n", report.md_table(["metric", *by_model], rows)]
    return "\n".join(parts)


def tables(args, res, ctx):
    """The CSV / Markdown files of an evaluation: {file name: rows or text}."""
    y, p, thr, cats = res["y"], res["preds"][res["main"]]["ensemble"], res["thr"], ctx["categories"]
    files = dict(res["files"])
    files["metrics.csv"] = [["model", "head", *metrics.METRIC_NAMES]] + [
        [n, hd, *(r[m] for m in metrics.METRIC_NAMES)]
        for hd, d in res["results"].items()
        for n, r in d.items()
    ]
    files["metrics.md"] = metrics_md(
        res["results"], f"{args.split} split, {len(y)} images, thresholds 0.5"
    )
    if "at_oof" in res:
        at = res["results"][res["main"]]["ensemble"]
        files["thresholds.csv"] = [["metric", "at_0.5", "at_oof"]] + [
            [m, at[m], res["at_oof"][m]] for m in metrics.METRIC_NAMES
        ]
    files["per_class.csv"] = report.per_class_rows(y, p, thr, cats)
    if res["retrieval"]:
        keys = list(next(iter(res["retrieval"].values())))
        files["retrieval.csv"] = [["model", *keys]] + [
            [n, *(r[k] for k in keys)] for n, r in res["retrieval"].items()
        ]
    members = res["members"]
    title = (
        f"{'ensemble of ' + str(len(members)) if len(members) > 1 else members[0]}, "
        f"{res['main']} head, {args.split} split ({len(y)} images), thresholds {args.thresholds}"
    )
    files["errors.md"] = report.errors_md(
        title, y, p, thr, [c["name"] for c in cats], res["ids"], metrics.per_class(y, p, thr)
    )
    return files


def write_split(args, res, ctx, paths, out_dir):
    """Every file of the evaluation, each written atomically; an earlier run's optional files are
    removed."""
    y, main, thr, cats = res["y"], res["main"], res["thr"], ctx["categories"]
    p = res["preds"][main]["ensemble"]
    # an earlier evaluate.py run wrote here: its optional files that this run lacks go
    earlier = os.path.isfile(os.path.join(out_dir, "metrics.json"))
    data.save_json(os.path.join(out_dir, "metrics.json"), summary_of(args, res, ctx, paths))
    files = tables(args, res, ctx)
    for name, content in files.items():
        (data.save_json if name.endswith(".json") else data.save_text)(
            os.path.join(out_dir, name), content
        )
    report.confusion(y, p, thr, cats, csv_path=os.path.join(out_dir, "confusion.csv"))
    arrays = {
        "ids": res["ids"],
        "labels": y,
        "probs": p.astype(np.float32),
        "members": np.array(res["members"]),
        "member_probs": np.stack([res["preds"][main][n] for n in res["members"]]).astype(
            np.float32
        ),
        "thresholds": np.broadcast_to(np.asarray(thr, np.float64), (y.shape[1],)),
    }
    if args.head == "both":  # what aggregate.py's test tables read for the KNN head
        arrays["knn_probs"] = res["preds"]["knn"]["ensemble"].astype(np.float32)
        arrays["member_knn_probs"] = np.stack(
            [res["preds"]["knn"][n] for n in res["members"]]
        ).astype(np.float32)
    data.atomic_write(
        os.path.join(out_dir, f"{args.split}_predictions.npz"), lambda tmp: np.savez(tmp, **arrays)
    )
    examples = (
        report.example_items(ctx["dataset"], res["ids"], y, p, thr, [c["name"] for c in cats])
        if ctx["dataset"]
        else None
    )
    plots = report.save_plots(
        out_dir, y, p, metrics.per_class(y, p, thr), [c["name"] for c in cats], examples
    )
    optional = ("thresholds.json", "thresholds.csv", "examples.png", "retrieval.csv")
    stale = [
        f
        for f in optional
        if earlier
        and f not in files
        and f not in plots
        and os.path.exists(os.path.join(out_dir, f))
    ]
    for f in stale:
        os.remove(os.path.join(out_dir, f))
    print(
        f"wrote {out_dir}: metrics.json, {', '.join(files)}, confusion.csv, "
        f"{args.split}_predictions.npz, {', '.join(plots)}"
        + (f"; removed an earlier run's {', '.join(stale)}" if stale else "")
    )


def print_summary(args, res):
    print(
        f"{args.split} split: {len(res['y'])} images, {len(res['members'])} model(s)\n"
        f"{'model':<10} {'head':<5} " + " ".join(f"{m:>12}" for m in SHOWN)
    )
    for hd, d in res["results"].items():
        print(
            "\n".join(
                f"{n:<10} {hd:<5} " + " ".join(f"{r[m]:>12.4f}" for m in SHOWN)
                for n, r in d.items()
            )
        )
    if "at_oof" in res:
        at = res["results"][res["main"]]["ensemble"]
        print(
            "thresholds 0.5 -> oof: "
            + ", ".join(
                f"{m} {at[m]:.4f} -> {res['at_oof'][m]:.4f}"
                for m in ("f1_macro", "f1_micro", "precision_macro", "recall_macro")
            )
        )
    if "ci" in res:
        print(
            f"{metrics.interval_text(args.bootstrap)}: "
            + ", ".join(f"{k} {v:.4f} [{lo:.4f}, {hi:.4f}]" for k, (v, lo, hi) in res["ci"].items())
        )
    for n, r in res["retrieval"].items():
        print(f"retrieval {n}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))

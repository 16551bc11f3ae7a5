"""Reports: Markdown tables, the error analysis, and the figures of an evaluation (per-class AP, PR curves,
worst-predicted images). Arrays in, files out; evaluate.py and aggregate.py call it.
"""
import os

import numpy as np

import data
import metrics


def md_table(header, rows):
    return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows]]) + "\n"


def label_names(row, names):
    return ", ".join(names[c] for c in np.flatnonzero(row)) or "-"


def errors_md(title, y, p, thr, names, ids, pc):
    """Markdown: best / worst 10 classes by AP, most FP / FN classes, top confusions, worst-predicted images."""
    err = metrics.error_analysis(y, p, thr, top=15)
    order = [c for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable") if not np.isnan(pc["ap"][c])]
    by_ap = lambda cs: md_table(["class", "AP", "F1", "support"], [  # noqa: E731
        [names[c], f"{pc['ap'][c]:.4f}", f"{pc['f1'][c]:.4f}", int(pc["support"][c])] for c in cs])
    by_err = lambda k, m: md_table(["class", k.upper(), m, "support"], [  # noqa: E731
        [names[c], int(err[k][c]), f"{pc[m][c]:.4f}", int(pc["support"][c])]
        for c in np.argsort(-err[k], kind="stable")[:10]])
    img_err = np.abs(p - y).sum(1)  # per-image error: sum over classes of |p - y|
    worst = np.argsort(-img_err, kind="stable")[:10]
    return "\n".join([
        f"# Error analysis: {title}\n", f"{len(names) - len(order)} classes without a positive are left out.\n",
        "## Best 10 classes by AP\n", by_ap(order[:10]), "## Worst 10 classes by AP\n", by_ap(order[::-1][:10]),
        "## Most false positives\n", by_err("fp", "precision"), "## Most false negatives\n", by_err("fn", "recall"),
        "## Top confusions: missed A (true), predicted B (absent) on the same image\n",
        md_table(["missed A", "predicted B", "images"], [[names[a], names[b], n] for a, b, n in err["confusions"]]),
        "## Worst-predicted images (sum over classes of |p - y|)\n",
        md_table(["id", "error", "true", "predicted"], [[int(ids[i]), f"{img_err[i]:.2f}", label_names(y[i], names),
                                                        label_names(p[i] > thr, names)] for i in worst])])


def save_plots(out_dir, y, p, pc, names, examples):
    """ap_per_class.png, pr_curves.png (4 best + 4 worst classes), examples.png ([(path, title)], if any)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    order = [c for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable") if not np.isnan(pc["ap"][c])]
    figs = {"ap_per_class.png": plt.subplots(figsize=(18, 5)), "pr_curves.png": plt.subplots(figsize=(7, 6))}
    ax = figs["ap_per_class.png"][1]
    ax.bar(range(len(order)), pc["ap"][order])
    ax.set_xticks(range(len(order)), [names[c] for c in order], rotation=90, fontsize=7)
    ax.set(ylabel="AP", ylim=(0, 1), title="per-class average precision")
    ax = figs["pr_curves.png"][1]
    for c in order[:4] + order[-4:]:
        tp = np.cumsum(y[np.argsort(-p[:, c], kind="stable"), c])  # true positives in the top 1..N
        prec, rec = tp / np.arange(1, len(tp) + 1), tp / max(tp[-1], 1)
        ax.plot(rec, prec, "-" if c in order[:4] else "--", label=f"{names[c]} (AP {pc['ap'][c]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="PR curves: best (solid) and worst (dashed) classes")
    ax.legend(fontsize=7)
    if examples:
        rows = (len(examples) + 3) // 4
        figs["examples.png"] = fig, axes = plt.subplots(rows, 4, figsize=(16, 4.6 * rows), squeeze=False)
        for i, ax in enumerate(axes.ravel()):
            ax.axis("off")
            if i < len(examples):
                with Image.open(examples[i][0]) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title(examples[i][1], fontsize=7, loc="left")
    for name, (fig, _) in figs.items():
        fig.tight_layout()
        data.atomic_write(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    return list(figs)


def example_items(coco, ids, y, p, thr, names, n=12):
    """The n worst-predicted images found on disk -> [(path, "id, error / true / predicted")]."""
    id2path = dict(zip(np.asarray(coco["ids"]).tolist(), coco["paths"]))
    err = np.abs(p - y).sum(1)
    found = [i for i in np.argsort(-err, kind="stable") if os.path.isfile(id2path.get(int(ids[i]), ""))][:n]
    return [(id2path[int(ids[i])], f"id {ids[i]}  error {err[i]:.2f}\ntrue: {label_names(y[i], names)[:70]}\n"
             f"pred: {label_names(p[i] > thr, names)[:70]}") for i in found]

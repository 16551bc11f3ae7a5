"""Reports: tables (one writer for CSV, Markdown and LaTeX), the error analysis (per-class counts, the
missed-A-predicted-B matrix) and the figures of an evaluation or a study. Arrays in, files out; evaluate.py,
aggregate.py and study.py call it.

    report.write_table("out/cv", ["run", *metrics.METRIC_NAMES], rows, caption="5-fold CV")  # cv.csv/.md/.tex
    rows = report.per_class_rows(y, p, thr, categories)        # per_class.csv rows with TP, FP, FN, TN
    m = report.confusion(y, p, thr, categories, "out/confusion.csv")  # [C, C], row sums = FN of each class
"""
import os

import numpy as np

import data
import metrics


def md_table(header, rows):
    return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows]]) + "\n"


# ----------------------------------------------------------------------------- tables

LABELS = {"mAP_macro": "mAP (macro)", "mAP_micro": "mAP (micro)", "auc_macro": "AUC (macro)",
          "auc_micro": "AUC (micro)", "f1_macro": "F1 (macro)", "f1_micro": "F1 (micro)",
          "precision_macro": "precision (macro)", "precision_micro": "precision (micro)",
          "recall_macro": "recall (macro)", "recall_micro": "recall (micro)", "hamming_loss": "Hamming loss",
          "coverage_error": "coverage error", "ranking_loss": "ranking loss", "lrap": "LRAP", "mae": "MAE",
          "best_epoch": "best epoch"}
LOWER_IS_BETTER = {"hamming_loss", "coverage_error", "ranking_loss", "mae"}


class MeanStd(tuple):
    """A "mean ± std" cell (one cell in .md/.tex; two columns <name>_mean, <name>_std in .csv)."""
    __slots__ = ()

    def __new__(cls, mean, std):
        return super().__new__(cls, (float(mean), float(std)))


class Interval(tuple):
    """A "value [low, high]" cell (a bootstrap CI; columns <name>, <name>_low, <name>_high in .csv)."""
    __slots__ = ()

    def __new__(cls, value, low, high):
        return super().__new__(cls, (float(value), float(low), float(high)))


def label(name):
    return LABELS.get(name, name.replace("_", " "))


def _num(x):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


def _text(cell, tex=False):
    """A cell as Markdown or LaTeX text (unbolded)."""
    if isinstance(cell, MeanStd):
        if not np.isfinite(cell[1]):  # one fold: no spread
            return f"${_num(cell[0])}$" if tex else _num(cell[0])
        return f"${_num(cell[0])} \\pm {_num(cell[1])}$" if tex else f"{_num(cell[0])} ± {_num(cell[1])}"
    if isinstance(cell, Interval):
        v, lo, hi = map(_num, cell)
        return f"${v}$ {{\\scriptsize [{lo}, {hi}]}}" if tex else f"{v} [{lo}, {hi}]"
    if isinstance(cell, (float, np.floating)):
        return f"${_num(float(cell))}$" if tex and np.isfinite(cell) else _num(float(cell))
    return tex_escape(str(cell)) if tex else str(cell).replace("|", "\\|")


def _value(cell):
    """The number a cell is ranked by (nan for text)."""
    if isinstance(cell, (MeanStd, Interval)):
        return cell[0]
    return float(cell) if isinstance(cell, (float, np.floating)) else float("nan")


def tex_escape(s):
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}
    return "".join(repl.get(ch, ch) for ch in s)


def best_cells(header, rows, bold=None, skip=()):
    """{(row, col)} of the best value per column: bold[name] "max" / "min" / None; default max for metric
    columns, min for LOWER_IS_BETTER, none for other columns. Rows in skip (e.g. a std row) never count."""
    out = set()
    for j, name in enumerate(header):
        rule = (bold or {}).get(name, ("min" if name in LOWER_IS_BETTER else "max")
                                if name in metrics.METRIC_NAMES else None)
        vals = np.array([_value(r[j]) if i not in skip else np.nan for i, r in enumerate(rows)])
        if rule and np.isfinite(vals).sum() > 1:
            best = np.nanmax(vals) if rule == "max" else np.nanmin(vals)
            out |= {(i, j) for i in np.flatnonzero(vals == best)}
    return out


def _csv_rows(header, rows):
    """CSV: a MeanStd column becomes <name>_mean, <name>_std; an Interval column <name>, _low, _high."""
    kinds = [next((type(r[j]) for r in rows if isinstance(r[j], (MeanStd, Interval))), None)
             for j in range(len(header))]
    width = {MeanStd: 2, Interval: 3, None: 1}
    head = []
    for name, k in zip(header, kinds):
        head += {MeanStd: [f"{name}_mean", f"{name}_std"], Interval: [name, f"{name}_low", f"{name}_high"]}.get(k, [name])
    body = []
    for r in rows:
        line = []
        for cell, k in zip(r, kinds):
            vals = list(cell) if isinstance(cell, (MeanStd, Interval)) else [cell]
            line += (vals + [""] * width[k])[:width[k]]
        body.append(line)
    return [head] + body


def write_table(stem, header, rows, caption="", bold=None, skip_bold=(), note=""):
    """stem.csv, stem.md and stem.tex from the same rows (cells: str, int, float, MeanStd, Interval).
    Metric headers get readable names; the best value per metric column is bold (see best_cells). The .tex
    is a booktabs table in a resizebox: \\usepackage{booktabs,graphicx}. -> the Markdown text."""
    best = best_cells(header, rows, bold, set(skip_bold))
    cell = lambda i, j, tex: _bold(_text(rows[i][j], tex), tex) if (i, j) in best else _text(rows[i][j], tex)  # noqa: E731
    md_rows = [[cell(i, j, False) for j in range(len(header))] for i in range(len(rows))]
    md = (f"**{caption}**\n\n" if caption else "") + (f"{note}\n\n" if note else "") + \
        md_table([label(h) for h in header], md_rows)
    cols = "l" + "r" * (len(header) - 1)
    tex = ["% generated by report.write_table; needs \\usepackage{booktabs,graphicx}", "\\begin{table}[htbp]",
           "\\centering"]
    if caption or note:
        tex.append(f"\\caption{{{tex_escape(' '.join(x for x in (caption, note) if x))}}}")
    tex += [f"\\resizebox{{\\ifdim\\width>\\textwidth\\textwidth\\else\\width\\fi}}{{!}}{{%",
            f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(tex_escape(label(h)) for h in header) + " \\\\",
            "\\midrule"]
    tex += [" & ".join(cell(i, j, True) for j in range(len(header))) + " \\\\" for i in range(len(rows))]
    tex += ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]
    data.save_text(f"{stem}.csv", _csv_rows(header, rows))
    data.save_text(f"{stem}.md", md)
    data.save_text(f"{stem}.tex", "\n".join(tex))
    return md


def _bold(text, tex):
    """Markdown **x**; LaTeX: the first $...$ group in \mathbf (a number stays math), else \textbf."""
    if not tex:
        return f"**{text}**"
    a = text.find("$")
    b = text.find("$", a + 1)
    return f"{text[:a]}$\\mathbf{{{text[a + 1:b]}}}${text[b + 1:]}" if a >= 0 and b > a else f"\\textbf{{{text}}}"


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

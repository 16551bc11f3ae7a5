"""Reports: tables (one writer for CSV, Markdown and LaTeX), the error analysis (per-class counts,
the missed-A-predicted-B matrix) and the figures of an evaluation or a study. Arrays in, files out;
evaluate.py, aggregate.py and study.py call it. Its two modules: report.evaluation (what evaluate.py
writes) and report.literature (the published anchors of each protocol beside our numbers).

    report.write_table("out/cv", ["run", *metrics.METRIC_NAMES], rows, caption="5-fold CV")
    rows = report.per_class_rows(y, p, thr, categories)   # per_class.csv rows with TP, FP, FN, TN
    m = report.confusion(y, p, thr, categories, "out/confusion.csv")  # [C, C], row sums = FN
"""

import os

import numpy as np

import data
import metrics
from report import latex


def md_table(header, rows):
    return (
        "\n".join(
            ["| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows]]
        )
        + "\n"
    )


# ----------------------------------------------------------------------------- tables

LABELS = {
    "mAP_macro": "mAP (macro)",
    "mAP_micro": "mAP (micro)",
    "auc_macro": "AUC (macro)",
    "auc_micro": "AUC (micro)",
    "f1_macro": "F1 (macro)",
    "f1_micro": "F1 (micro)",
    "precision_macro": "precision (macro)",
    "precision_micro": "precision (micro)",
    "recall_macro": "recall (macro)",
    "recall_micro": "recall (micro)",
    "hamming_loss": "Hamming loss",
    "coverage_error": "coverage error",
    "ranking_loss": "ranking loss",
    "lrap": "LRAP",
    "mae": "MAE",
    "best_epoch": "best epoch",
    "ap": "AP",
    "auc": "AUC",
    "f1": "F1",
    "coco_id": "COCO id",
    "tp": "TP",
    "fp": "FP",
    "fn": "FN",
    "tn": "TN",
}
LOWER_IS_BETTER = {"hamming_loss", "coverage_error", "ranking_loss", "mae"}
# columns that are fractions: write_table(percent=True) prints them in % with one decimal
FRACTIONS = (set(metrics.METRIC_NAMES) - {"coverage_error"}) | {
    "ap",
    "auc",
    "f1",
    "precision",
    "recall",
}


class MeanStd(tuple):
    """A "mean ± std" cell (one cell in .md/.tex; two columns <name>_mean, <name>_std in .csv)."""

    __slots__ = ()

    def __new__(cls, mean, std):
        return super().__new__(cls, (float(mean), float(std)))


class Interval(tuple):
    """A "value [low, high]" cell (a bootstrap CI; columns <name>, <name>_low, <name>_high in
    .csv)."""

    __slots__ = ()

    def __new__(cls, value, low, high):
        return super().__new__(cls, (float(value), float(low), float(high)))


def label(name):
    return LABELS.get(name, name.replace("_", " "))


def _num(x, d=4):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{d}f}"


def _text(cell, tex=False, d=4):
    """A cell as Markdown or LaTeX text (unbolded), numbers with d decimals."""
    if isinstance(cell, MeanStd):
        m, s = _num(cell[0], d), _num(cell[1], d)
        if not np.isfinite(cell[1]):  # one fold: no spread
            return f"${m}$" if tex else m
        return f"${m} \\pm {s}$" if tex else f"{m} ± {s}"
    if isinstance(cell, Interval):
        v, lo, hi = (_num(x, d) for x in cell)
        return f"${v}$ {{\\scriptsize [{lo}, {hi}]}}" if tex else f"{v} [{lo}, {hi}]"
    if isinstance(cell, (float, np.floating)):
        return f"${_num(float(cell), d)}$" if tex and np.isfinite(cell) else _num(float(cell), d)
    return tex_escape(str(cell)) if tex else str(cell).replace("|", "\\|")


def _parts(cell, d):
    """What a cell prints, [(text, size pt)], for latex.width."""
    if isinstance(cell, Interval):
        v, lo, hi = (_num(x, d) for x in cell)
        return [(v + " ", latex.SIZE), (f"[{lo}, {hi}]", latex.SCRIPT)]
    return [(_text(cell, False, d), latex.SIZE)]


def _value(cell):
    """The number a cell is ranked by (nan for text)."""
    if isinstance(cell, (MeanStd, Interval)):
        return cell[0]
    return float(cell) if isinstance(cell, (float, np.floating)) else float("nan")


def scaled(cell, k):
    """A number cell (float, MeanStd, Interval) times k; other cells as they are."""
    if isinstance(cell, (MeanStd, Interval)):
        return type(cell)(*(k * x for x in cell))
    return k * float(cell) if isinstance(cell, (float, np.floating, int)) and k != 1 else cell


def tex_escape(s):
    """Plain text -> LaTeX (specials escaped, -- two hyphens, | < > symbols; latex.escape)."""
    return latex.escape(s)


def best_cells(header, rows, bold=None, skip=()):
    """{(row, col)} of the best value per column: bold[name] "max" / "min" / None; default max for
    metric columns, min for LOWER_IS_BETTER, none for other columns. Rows in skip (e.g. a std row)
    never count."""
    out = set()
    for j, name in enumerate(header):
        rule = (bold or {}).get(
            name,
            ("min" if name in LOWER_IS_BETTER else "max") if name in metrics.METRIC_NAMES else None,
        )
        vals = np.array([_value(r[j]) if i not in skip else np.nan for i, r in enumerate(rows)])
        if rule and np.isfinite(vals).sum() > 1:
            best = np.nanmax(vals) if rule == "max" else np.nanmin(vals)
            out |= {(i, j) for i in np.flatnonzero(vals == best)}
    return out


def _csv_rows(header, rows):
    """CSV: a column of MeanStd cells becomes <name>_mean, <name>_std; one with Interval cells
    <name>, <name>_low, <name>_high (and <name>_std for its MeanStd cells, e.g. a mean-over-folds
    row beside fold rows)."""

    def parts(j):
        kinds = {type(r[j]) for r in rows} & {MeanStd, Interval}
        if not kinds:
            return [""]
        return (
            (["_mean", "_std"] if kinds == {MeanStd} else [""])
            if Interval not in kinds
            else ["", *(["_std"] if MeanStd in kinds else []), "_low", "_high"]
        )

    cols = [parts(j) for j in range(len(header))]

    def split(cell, p):
        if isinstance(cell, MeanStd):
            return [cell[0], cell[1]] + [""] * (len(p) - 2)
        if isinstance(cell, Interval):
            return [cell[0]] + [""] * (len(p) - 3) + [cell[1], cell[2]]
        return [cell] + [""] * (len(p) - 1)

    return [[f"{h}{s}" for h, p in zip(header, cols) for s in p]] + [
        [v for cell, p in zip(r, cols) for v in split(cell, p)] for r in rows
    ]


def _keys(rows):
    """Default key columns: the leading ones with no number in them."""
    n = 0
    while n < len(rows[0]) - 1 and not any(
        isinstance(r[n], (float, np.floating, MeanStd, Interval)) for r in rows
    ):
        n += 1
    return max(n, 1)


def write_table(
    stem,
    header,
    rows,
    caption="",
    bold=None,
    skip_bold=(),
    note="",
    percent=False,
    digits=4,
    keys=None,
    tex_columns=None,
):
    """stem.csv, stem.md and stem.tex from the same rows (cells: str, int, float, MeanStd,
    Interval). Metric headers get readable names; the best value per metric column is bold (see
    best_cells). percent: True (the FRACTIONS columns) or the names of the columns that print x100
    with one decimal in .md / .tex (the .csv keeps the values); digits: decimals of the other
    numbers. The .tex fits a page (report.latex: parts that repeat the `keys` leading columns, a
    longtable past a page of rows; \\usepackage{booktabs,longtable,array}); tex_columns: the
    header names it shows (default all). -> the Markdown text."""
    best = best_cells(header, rows, bold, set(skip_bold))
    pct = [h in (FRACTIONS if percent is True else set(percent or ())) for h in header]
    shown = [
        [scaled(c, 100 if p else 1) for c, p in zip(r, pct)] for r in rows
    ]  # what .md / .tex print
    dec = [1 if p else digits for p in pct]

    def cell(i, j, tex):
        text = _text(shown[i][j], tex, dec[j])
        return _bold(text, tex) if (i, j) in best else text

    md_rows = [[cell(i, j, False) for j in range(len(header))] for i in range(len(rows))]
    md = (
        (f"**{caption}**\n\n" if caption else "")
        + (f"{note}\n\n" if note else "")
        + md_table([label(h) for h in header], md_rows)
    )
    cols = [j for j, h in enumerate(header) if tex_columns is None or h in tex_columns]
    cells = [
        [
            latex.Cell(
                cell(i, j, True),
                _parts(shown[i][j], dec[j]),
                (i, j) in best,
                None if _is_num(rows[i][j]) else str(rows[i][j]),
            )
            for j in cols
        ]
        for i in range(len(rows))
    ]
    numeric = [any(_is_num(r[j]) for r in rows) for j in cols]
    tex = latex.tables(
        [header[j] for j in cols],
        [label(header[j]) for j in cols],
        cells,
        caption=caption,
        note=note,
        keys=min(keys or _keys(rows), len(cols)),
        align="".join("r" if n and k else "l" for k, n in enumerate(numeric)),
    )
    data.save_text(f"{stem}.csv", _csv_rows(header, rows))
    data.save_text(f"{stem}.md", md)
    data.save_text(f"{stem}.tex", tex)
    return md


def _is_num(cell):
    return isinstance(cell, (int, float, np.integer, np.floating, MeanStd, Interval)) and not (
        isinstance(cell, bool)
    )


def _bold(text, tex):
    """Markdown **x**; LaTeX: the first $...$ group in \\mathbf (a number stays math), else
    \\textbf."""
    if not tex:
        return f"**{text}**"
    a = text.find("$")
    b = text.find("$", a + 1)
    return (
        f"{text[:a]}$\\mathbf{{{text[a + 1 : b]}}}${text[b + 1 :]}"
        if a >= 0 and b > a
        else f"\\textbf{{{text}}}"
    )


def label_names(row, names):
    return ", ".join(names[c] for c in np.flatnonzero(row)) or "-"


def errors_md(title, y, p, thr, names, ids, pc):
    """Markdown: best / worst 10 classes by AP, most FP / FN classes, top confusions,
    worst-predicted images."""
    err = metrics.error_analysis(y, p, thr, top=15)
    order = [
        c
        for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable")
        if not np.isnan(pc["ap"][c])
    ]

    def by_ap(cs):  # classes cs with their AP
        return md_table(
            ["class", "AP", "F1", "support"],
            [
                [names[c], f"{pc['ap'][c]:.4f}", f"{pc['f1'][c]:.4f}", int(pc["support"][c])]
                for c in cs
            ],
        )

    def by_err(k, m):  # the 10 classes with the most errors of kind k ("fp" / "fn") and metric m
        return md_table(
            ["class", k.upper(), m, "support"],
            [
                [names[c], int(err[k][c]), f"{pc[m][c]:.4f}", int(pc["support"][c])]
                for c in np.argsort(-err[k], kind="stable")[:10]
            ],
        )

    img_err = np.abs(p - y).sum(1)  # per-image error: sum over classes of |p - y|
    worst = np.argsort(-img_err, kind="stable")[:10]
    return "\n".join(
        [
            f"# Error analysis: {title}\n",
            f"{len(names) - len(order)} classes without a positive are left out.\n",
            "## Best 10 classes by AP\n",
            by_ap(order[:10]),
            "## Worst 10 classes by AP\n",
            by_ap(order[::-1][:10]),
            "## Most false positives\n",
            by_err("fp", "precision"),
            "## Most false negatives\n",
            by_err("fn", "recall"),
            "## Top confusions: missed A (true), predicted B (absent) on the same image\n",
            md_table(
                ["missed A", "predicted B", "images"],
                [[names[a], names[b], n] for a, b, n in err["confusions"]],
            ),
            "## Worst-predicted images (sum over classes of |p - y|)\n",
            md_table(
                ["id", "error", "true", "predicted"],
                [
                    [
                        int(ids[i]),
                        f"{img_err[i]:.2f}",
                        label_names(y[i], names),
                        label_names(p[i] > thr, names),
                    ]
                    for i in worst
                ],
            ),
        ]
    )


def save_plots(out_dir, y, p, pc, names, examples):
    """ap_per_class.png, pr_curves.png (4 best + 4 worst classes), examples.png ([(path, title)], if
    any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    order = [
        c
        for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable")
        if not np.isnan(pc["ap"][c])
    ]
    figs = {
        "ap_per_class.png": plt.subplots(figsize=(18, 5)),
        "pr_curves.png": plt.subplots(figsize=(7, 6)),
    }
    ax = figs["ap_per_class.png"][1]
    ax.bar(range(len(order)), pc["ap"][order])
    ax.set_xticks(range(len(order)), [names[c] for c in order], rotation=90, fontsize=7)
    ax.set(ylabel="AP", ylim=(0, 1), title="per-class average precision")
    ax = figs["pr_curves.png"][1]
    for c in order[:4] + order[-4:]:
        tp = np.cumsum(y[np.argsort(-p[:, c], kind="stable"), c])  # true positives in the top 1..N
        prec, rec = tp / np.arange(1, len(tp) + 1), tp / max(tp[-1], 1)
        ax.plot(
            rec, prec, "-" if c in order[:4] else "--", label=f"{names[c]} (AP {pc['ap'][c]:.3f})"
        )
    ax.set(
        xlabel="recall",
        ylabel="precision",
        title="PR curves: best (solid) and worst (dashed) classes",
    )
    ax.legend(fontsize=7)
    if examples:
        rows = (len(examples) + 3) // 4
        figs["examples.png"] = fig, axes = plt.subplots(
            rows, 4, figsize=(16, 4.6 * rows), squeeze=False
        )
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
    found = [
        i for i in np.argsort(-err, kind="stable") if os.path.isfile(id2path.get(int(ids[i]), ""))
    ][:n]
    return [
        (
            id2path[int(ids[i])],
            f"id {ids[i]}  error {err[i]:.2f}\ntrue: {label_names(y[i], names)[:70]}\n"
            f"pred: {label_names(p[i] > thr, names)[:70]}",
        )
        for i in found
    ]


# ---------------------------------------------------------------- per-class counts, confusion


def per_class_rows(y, p, thr, categories):
    """per_class.csv rows (header first), best AP first: AP, AUC, F1, precision, recall, support and
    the counts TP, FP, FN, TN at the thresholds thr (a float or [C]); TP + FN = support,
    TP + FP + FN + TN = N."""
    pc = metrics.per_class(y, p, thr)
    tn = len(y) - pc["tp"] - pc["fp"] - pc["fn"]
    rows = [
        [
            "class",
            "coco_id",
            "name",
            "ap",
            "auc",
            "f1",
            "precision",
            "recall",
            "support",
            "tp",
            "fp",
            "fn",
            "tn",
        ]
    ]
    for c in np.argsort(-np.nan_to_num(pc["ap"], nan=-1), kind="stable"):
        rows.append(
            [
                int(c),
                categories[c].get("id", int(c)),
                categories[c]["name"],
                *(float(pc[k][c]) for k in ("ap", "auc", "f1", "precision", "recall")),
                *(int(v[c]) for v in (pc["support"], pc["tp"], pc["fp"], pc["fn"], tn)),
            ]
        )
    return rows


def class_order(categories):
    """Display order: grouped by supercategory (groups in order of first appearance) when every
    category carries one, else index order -> (order [C], [(group name, first position, size)])."""
    sup = [c.get("supercategory") for c in categories]
    if any(s is None for s in sup):
        return np.arange(len(categories)), []
    groups = list(dict.fromkeys(sup))
    # stable: index order inside a group
    order = np.array(sorted(range(len(sup)), key=lambda c: groups.index(sup[c])))
    spans, pos = [], 0
    for g in groups:
        n = sup.count(g)
        spans.append((g, pos, n))
        pos += n
    return order, spans


def confusion(y, p, thr, categories, csv_path=None):
    """The "missed A, predicted B" matrix [C, C] (+ a last column: misses of A on images with no
    false positive). Each image where true class A is missed splits one count over the absent
    classes B it wrongly predicts (1 / #false positives each), so row A sums to A's false negatives
    exactly. error_analysis's "pair_counts" is the unsplit count (its row A sums to the false
    positives on A's missed images). csv_path: confusion.csv in index order with class names.
    -> float64 [C, C + 1]."""
    yb = np.asarray(y).astype(bool)
    pred = np.asarray(p) > np.asarray(thr, dtype=np.float64)
    fn, fp = (yb & ~pred).astype(np.float64), (~yb & pred).astype(np.float64)  # [N, C]
    n_fp = fp.sum(1, keepdims=True)
    m = np.concatenate([fn.T @ (fp / np.maximum(n_fp, 1)), fn.T @ (n_fp == 0)], axis=1)
    if csv_path:
        names = [c["name"] for c in categories]
        data.save_text(
            csv_path,
            [["missed \\ predicted", *names, "(no false positive)"]]
            + [[names[a], *(round(float(v), 6) for v in m[a])] for a in range(len(names))],
        )
    return m


# ----------------------------------------------------------------- study figures (PNG + PDF)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem):
    """stem.png and stem.pdf, each written atomically -> [paths]."""
    paths = []
    for ext in ("png", "pdf"):
        data.atomic_write(f"{stem}.{ext}", lambda tmp: fig.savefig(tmp, dpi=120, format=ext))
        paths.append(f"{stem}.{ext}")
    _plt().close(fig)
    return paths


def plot_learning(stem, logs, title):
    """logs {fold: [log.jsonl records]}: training loss and validation mAP per epoch, folds
    overlaid, each epoch a marker (a short run still shows its points)."""
    fig, axes = _plt().subplots(1, 2, figsize=(10, 3.6))
    for k, recs in sorted(logs.items()):
        ep = [r["epoch"] for r in recs]
        for ax, key in zip(axes, ("loss", "val_mAP_macro")):
            ax.plot(ep, [r.get(key, np.nan) for r in recs], "o-", ms=3, label=f"fold {k}")
    axes[0].set(xlabel="epoch", ylabel="training loss", title=f"{title}: training loss")
    axes[1].set(xlabel="epoch", ylabel="validation mAP (macro)", title=f"{title}: validation mAP")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_bits(stem, points):
    """points [(bits, head, mean, std)]: mAP (macro) against hash bits, one line per head, std bars
    over folds."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    xs = sorted({b for b, *_ in points})
    for head, marker, dx in (("mlp", "o", -0.06), ("knn", "s", 0.06)):  # dx: bars side by side
        pts = sorted((xs.index(b), m, s) for b, h, m, s in points if h == head)
        if pts:
            x, m, s = (np.array(v, dtype=np.float64) for v in zip(*pts))
            ax.errorbar(
                x + dx,
                100 * m,
                yerr=100 * np.nan_to_num(s),
                marker=marker,
                capsize=3,
                label=f"{head.upper()} head",
            )
    ax.set_xticks(range(len(xs)), [str(b) for b in xs])
    ax.set(
        xlabel="hash bits (0 = plain MLP)",
        ylabel="CV mAP (macro) %, mean ± std over folds",
        title="mAP vs bits",
    )
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_class_ap(stem, ap, prevalence, names, title, per_panel=40):
    """Per-class AP as horizontal bars, best first, in panels of per_panel classes side by side
    (names readable), coloured by the class's dev prevalence on a log scale spanning the classes
    shown; classes without AP (no test positive) are listed under the figure."""
    plt = _plt()
    ap = np.asarray(ap, dtype=np.float64)
    order = [c for c in np.argsort(-np.nan_to_num(ap, nan=-1), kind="stable") if np.isfinite(ap[c])]
    prev = np.asarray(prevalence, dtype=np.float64)
    shown = prev[order][prev[order] > 0]
    lo, hi = (shown.min(), shown.max()) if len(shown) else (1e-3, 1.0)
    norm = plt.matplotlib.colors.LogNorm(lo, max(hi, lo * 1.01))
    cmap = plt.get_cmap("viridis")
    n_panels = max(1, -(-len(order) // per_panel))
    rows = -(-len(order) // n_panels) if order else 1
    fig, axes = plt.subplots(
        1, n_panels, figsize=(4.2 * n_panels + 1.2, 0.16 * rows + 1.4), squeeze=False
    )
    for i, ax in enumerate(axes[0]):
        cs = order[i * rows : (i + 1) * rows]
        colours = [cmap(norm(prev[c])) if prev[c] > 0 else "lightgrey" for c in cs]
        ax.barh(range(len(cs)), ap[cs], color=colours, height=0.8)
        ax.set_yticks(range(len(cs)), [names[c] for c in cs], fontsize=7)
        ax.set_ylim(rows - 0.5, -0.5)  # best at the top
        ax.set_xlim(0, 1)
        ax.set_xlabel("AP", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", lw=0.3, alpha=0.5)
    missing = [names[c] for c in range(len(ap)) if not np.isfinite(ap[c])]
    fig.suptitle(title, fontsize=9)
    if missing:
        fig.text(0.01, 0.005, f"no AP (no test positive): {len(missing)} classes", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="dev prevalence (log)")
    return save_figure(fig, stem)


def top_confusions(m, names, top=20):
    """The top pairs of a C x C "missed A, predicted B" matrix -> [(A, B, value)], largest first,
    zeros left out."""
    m = np.asarray(m, dtype=np.float64)[:, : len(names)]  # confusion()'s last column left out
    flat = np.argsort(-m, axis=None, kind="stable")[:top]
    return [
        (names[a], names[b], float(m[a, b]))
        for a, b in zip(*np.unravel_index(flat, m.shape))
        if m[a, b] > 0
    ]


def plot_confusion(stem, m, categories, title, top=20):
    """Left: the top confused pairs as labelled bars; right: the C x C part of confusion() as a
    heatmap, classes grouped by supercategory (ticks name the groups when there are many
    classes, else the classes). The full matrix is confusion.csv."""
    plt = _plt()
    order, spans = class_order(categories)
    names = [c["name"] for c in categories]
    C = len(order)
    m = np.asarray(m, dtype=np.float64)[:, :C]
    pairs = top_confusions(m, names, top)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1, 1.15]})
    ax = axes[0]
    if pairs:
        ax.barh(range(len(pairs)), [v for *_, v in pairs], color="tab:red")
        ax.set_yticks(range(len(pairs)), [f"{a} \u2192 {b}" for a, b, _ in pairs], fontsize=8)
        ax.set_ylim(len(pairs) - 0.5, -0.5)
    else:
        ax.text(0.5, 0.5, "no missed class beside a false positive", ha="center")
        ax.set_yticks([])
    ax.set(xlabel="images (split over the image's false positives)")
    ax.set_title(f"top {len(pairs)} pairs: missed A \u2192 predicted B", fontsize=9)
    ax = axes[1]
    im = ax.imshow(m[np.ix_(order, order)], cmap="magma_r", interpolation="nearest")
    if C <= 30:
        ax.set_xticks(range(C), [names[c] for c in order], rotation=90, fontsize=6)
        ax.set_yticks(range(C), [names[c] for c in order], fontsize=6)
    elif spans:  # one tick per supercategory, at its middle
        mids = [start + (n - 1) / 2 for _, start, n in spans]
        ax.set_xticks(mids, [g for g, *_ in spans], rotation=90, fontsize=7)
        ax.set_yticks(mids, [g for g, *_ in spans], fontsize=7)
    else:  # too many names to read: class indices, as in confusion.csv
        ticks = list(range(0, C, 10))
        ax.set_xticks(ticks, [str(order[t]) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(order[t]) for t in ticks], fontsize=7)
    for g, start, n in spans[1:]:  # group boundaries
        ax.axhline(start - 0.5, color="grey", lw=0.4)
        ax.axvline(start - 0.5, color="grey", lw=0.4)
    ax.set(xlabel="predicted B (absent)", ylabel="missed A (true)")
    by = "by supercategory" if spans else "by class index"
    ax.set_title(f"all {C} classes {by} (full matrix: confusion.csv)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="images")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


def _class_mean(x):
    """Mean over folds per class [C], nan (and no warning) where no fold has a value."""
    x = np.asarray(x, dtype=np.float64)
    n = np.isfinite(x).sum(0)
    return np.where(n > 0, np.nansum(x, 0) / np.maximum(n, 1), np.nan)


def fold_analysis(ap, pos, sizes, names, top=3):
    """ap, pos [K, C]: per-fold per-class AP and positives; sizes [K]. -> rows: fold, size, mAP,
    and the top classes whose AP deviates most from their mean over folds (in points), each with
    its positive count vs the mean. A fold without AP: mAP nan."""
    dev = ap - _class_mean(ap)  # [K, C] AP minus the class's mean over folds
    rows = []
    for k in range(len(ap)):
        ok = np.isfinite(ap[k])
        cs = [c for c in np.argsort(-np.abs(np.nan_to_num(dev[k])), kind="stable")[:top] if ok[c]]
        rows.append(
            [
                f"fold {k}",
                int(sizes[k]),
                float(ap[k][ok].mean()) if ok.any() else float("nan"),
                "; ".join(
                    f"{names[c]} {100 * dev[k, c]:+.1f} ({int(pos[k, c])} vs "
                    f"{pos[:, c].mean():.1f} pos.)"
                    for c in cs
                )
                or "-",
            ]
        )
    return rows


def plot_folds(stem, ap, pos, names, top=25):
    """Left: AP deviation from the class mean per fold (heatmap, in points) for the top classes
    whose AP moves most across folds (every class: fold_classes.csv); right: positive-count
    deviation against AP deviation of every class, one colour per fold: classes with more (fewer)
    positives in a fold and higher AP make it easier."""
    plt = _plt()
    K, C = ap.shape
    dev = ap - _class_mean(ap)
    rel = pos / np.maximum(pos.mean(0), 1e-9) - 1
    spread = np.nan_to_num(np.nanmax(np.abs(np.where(np.isfinite(dev), dev, 0)), 0))
    cs = [c for c in np.argsort(-spread, kind="stable")[:top] if spread[c] > 0] or list(range(C))[
        :top
    ]
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 0.2 * len(cs) + 1.6), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    lim = max(100 * spread.max(initial=0.0), 1e-6)
    im = axes[0].imshow(
        100 * dev[:, cs].T, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
    )
    axes[0].set_yticks(range(len(cs)), [names[c] for c in cs], fontsize=7)
    axes[0].set_xticks(range(K), [f"fold {k}" for k in range(K)], fontsize=8)
    axes[0].set_title(f"AP minus the class's mean over folds (points): top {len(cs)}", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.08, pad=0.03)
    for k in range(K):
        ok = np.isfinite(ap[k])
        fold_map = f"{100 * ap[k][ok].mean():.1f}%" if ok.any() else "-"
        axes[1].scatter(rel[k], 100 * dev[k], s=10, label=f"fold {k} (mAP {fold_map})")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].axvline(0, color="grey", lw=0.5)
    axes[1].set_xlabel("positives / mean over folds - 1", fontsize=8)
    axes[1].set_ylabel("AP - mean over folds (points)", fontsize=8)
    axes[1].set_title(f"counts vs AP, all {C} classes", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, stem)

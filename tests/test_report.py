"""report.py: one table writer for CSV / Markdown / LaTeX (bold best per column, mean ± std cells,
readable names, escaping; every .tex fits a plain article's page: split into parts, longtables,
wrapped text, checked by pdflatex when installed), the shared-resample bootstrap draws of all 15
metrics against a naive loop, per-class rows with TP / FP / FN / TN, and the
missed-A-predicted-B matrix.

    python -m pytest -q tests/test_report.py
"""

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import metrics
import report
from report import latex

TEX_DOC = (
    "\\documentclass{article}\n\\usepackage{%s}\n"
    "\\begin{document}\n%%s\n\\end{document}\n" % ",".join(latex.PACKAGES)
)
OVERFULL = 5.0  # pt: a box wider than the text by more than this fails


def compile_tex(paths, tmp_path):
    """Each .tex table inside a plain article with latex.PACKAGES, through pdflatex: it compiles,
    no box is more than OVERFULL past the margin and no float is too large for the page; skipped
    where LaTeX is not installed."""
    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended)")
    for i, p in enumerate(paths):
        doc = tmp_path / f"doc{i}.tex"
        doc.write_text(TEX_DOC % Path(p).read_text())
        for _ in range(2):  # a second pass where longtable asks for one (its column widths)
            r = subprocess.run(
                ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, f"{p} does not compile:\n{r.stdout[-2000:]}"
            log = (tmp_path / f"doc{i}.log").read_text(errors="replace")
            if "Rerun LaTeX" not in log:
                break
        bad = tex_problems(log)
        assert not bad, f"{p}: {bad}"


def tex_problems(log):
    """pdflatex log -> its overfull boxes past OVERFULL and floats too large, as lines."""
    bad = [
        m.group(0)
        for m in re.finditer(r"Overfull \\[hv]box \(([0-9.]+)pt too \w+\)[^\n]*", log)
        if float(m.group(1)) > OVERFULL
    ]
    return bad + re.findall(r"Float too large for page by [0-9.]+pt", log)


def table_rows():
    header = ["run", "folds", "mAP_macro", "hamming_loss", "f1_micro"]
    rows = [
        ["hash_64 (50% & #1)", 5, report.MeanStd(0.6787, 0.0129), report.MeanStd(0.03, 0.001), 0.5],
        [
            "bits_0 {x}~^\\",
            5,
            report.MeanStd(0.70, 0.02),
            report.MeanStd(0.02, 0.002),
            float("nan"),
        ],
        ["ensemble", 1, report.Interval(0.71, 0.69, 0.73), report.Interval(0.025, 0.02, 0.03), 0.4],
    ]
    return header, rows


def test_write_table_three_formats(tmp_path):
    header, rows = table_rows()
    md = report.write_table(
        tmp_path / "t", header, rows, caption="CV of 5_folds", note="partial: fold2 missing"
    )
    assert (
        md == (tmp_path / "t.md").read_text()
        and "CV of 5_folds" in md
        and "partial: fold2 missing" in md
    )
    assert "mAP (macro)" in md and "Hamming loss" in md and "F1 (micro)" in md
    assert "0.6787 ± 0.0129" in md and "**0.7100 [0.6900, 0.7300]**" in md  # max for mAP
    assert "**0.0200 ± 0.0020**" in md and "**0.5000**" in md  # min for hamming_loss, max for F1
    tex = (tmp_path / "t.tex").read_text()
    for s in (
        "\\toprule",
        "\\midrule",
        "\\bottomrule",
        "$0.6787 \\pm 0.0129$",
        "$\\mathbf{0.0200 \\pm 0.0020}$",
        "50\\% \\& \\#1",
        "hash\\_64",
        "\\{x\\}\\textasciitilde{}\\textasciicircum{}\\textbackslash{}",
        "mAP (macro)",
        "\\caption{CV of 5\\_folds partial: fold2 missing}",
        "$\\mathbf{0.7100}$",
    ):
        assert s in tex, s
    assert "\\mathbf{5}" not in tex  # the folds column is a count, not a score
    with open(tmp_path / "t.csv") as f:
        got = list(csv.reader(f))

    def four(m):  # the columns of MeanStd and Interval cells
        return [m, f"{m}_std", f"{m}_low", f"{m}_high"]

    assert got[0] == ["run", "folds", *four("mAP_macro"), *four("hamming_loss"), "f1_micro"]
    assert got[1][2:6] == ["0.6787", "0.0129", "", ""] and got[3][2:6] == [
        "0.71",
        "",
        "0.69",
        "0.73",
    ]
    report.write_table(tmp_path / "u", ["run", "mae"], [["a", report.MeanStd(0.1, 0.01)]])
    assert (tmp_path / "u.csv").read_text().splitlines() == ["run,mae_mean,mae_std", "a,0.1,0.01"]
    compile_tex([tmp_path / "t.tex"], tmp_path)


def wide_rows(n_rows, rng):
    """Rows as study.py's test tables: run, head, model, then all 15 metrics as intervals."""
    return [
        [f"run_{i // 2}", "MLP" if i % 2 else "KNN", "ensemble"]
        + [report.Interval(v, v - 0.05, v + 0.04) for v in rng.random(len(metrics.METRIC_NAMES))]
        for i in range(n_rows)
    ]


def test_wide_and_long_tables_fit_the_page(tmp_path):
    """A table wider than the text is split into parts that repeat its keys, metric groups kept
    together; past a page of rows it is a longtable; a long text column wraps; percent prints one
    decimal; no \\resizebox anywhere, and every part compiles within the margins."""
    rng = np.random.default_rng(0)
    header = ["run", "head", "model", *metrics.METRIC_NAMES]
    md = report.write_table(
        tmp_path / "wide", header, wide_rows(6, rng), caption="Test | --protocol x", percent=True
    )
    assert md.count("| run |") == 1  # the .md stays one table
    tex = (tmp_path / "wide.tex").read_text()
    assert "resizebox" not in tex and "Test \\textbar{} -{}-protocol x" in tex  # no dashes
    parts = [p.split("\\midrule")[0] for p in tex.split("\\begin{table}")[1:]]
    assert len(parts) > 1 and all("run & head & model" in p for p in parts)  # keys: 3 text columns
    assert "mAP" in parts[0] and "F1" not in parts[0]  # ranking metrics first, thresholded later
    assert all(any(report.label(m).split(" (")[0] in p for p in parts) for m in header[3:])
    v = rng.random()
    cells = [["a", "MLP", "ensemble"] + [report.Interval(v, v - 0.01, v + 0.01)] * 15]
    report.write_table(tmp_path / "pct", header, cells, percent=True, digits=2)
    row = (tmp_path / "pct.md").read_text().splitlines()[-1]
    assert f"| {100 * v:.1f} [{100 * v - 1:.1f}, {100 * v + 1:.1f}] |" in row  # one decimal
    assert f"| {v:.2f} [{v - 0.01:.2f}, {v + 0.01:.2f}] |" in row  # coverage error: digits
    with open(tmp_path / "pct.csv") as f:
        assert float(list(csv.DictReader(f))[0]["mAP_macro"]) == v  # the .csv keeps the value
    long = [[f"class {i}", *rng.random(4)] for i in range(85)]
    report.write_table(
        tmp_path / "long", ["class", "ap", "auc", "f1", "recall"], long, percent=True
    )
    tex = (tmp_path / "long.tex").read_text()
    assert "\\begin{longtable}" in tex and "\\begin{table}" not in tex and "\\endhead" in tex
    path = "outputs/demo_study/knn_recipe/eval_test/metrics.json, with words that wrap " * 3
    report.write_table(tmp_path / "text", ["a", "source", "mAP_macro"], [["a", path, 0.5]])
    assert "p{" in (tmp_path / "text.tex").read_text()
    compile_tex([tmp_path / f"{n}.tex" for n in ("wide", "pct", "long", "text")], tmp_path)


def test_bold_rules_and_skipped_rows(tmp_path):
    header = ["name", "mae", "lrap", "custom"]
    rows = [["a", 0.2, 0.9, 1.0], ["b", 0.1, 0.8, 2.0], ["std", 0.0, 1.0, 0.0]]
    best = report.best_cells(header, rows, bold={"custom": "min"}, skip={2})
    assert best == {(1, 1), (0, 2), (0, 3)}
    assert report.best_cells(header, rows[:1]) == set()  # one row: nothing to compare


def test_bootstrap_intervals_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    N, C, n_boot, seed = 50, 6, 25, 4
    y = (rng.random((N, C)) < 0.3).astype(np.uint8)
    y[:, 5], y[0, 5] = 0, 1  # a rare class: undefined in many draws
    scores = [
        np.round(rng.random((N, C)) * 0.5 + 0.4 * y, 2),
        np.round(rng.random((N, C)), 1),
    ]  # with ties
    draws = metrics._boot_draws(y.astype(bool), scores, 0.5, n_boot, seed, metrics.METRIC_NAMES)
    idx = np.random.default_rng(seed).integers(
        0, N, size=(n_boot, N)
    )  # the same resamples, one chunk
    for i, s in enumerate(scores):
        for b in range(n_boot):
            ref = metrics.compute_all(y[idx[b]], s[idx[b]])
            for k in metrics.METRIC_NAMES:
                np.testing.assert_allclose(draws[k][i, b], ref[k], atol=1e-12, err_msg=k)
    cis = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=seed)
    for i, ci in enumerate(cis):
        assert set(ci) == set(metrics.METRIC_NAMES)
        for k, (point, lo, hi) in ci.items():  # the BCa rule itself: tests/test_metrics.py
            assert point == metrics.compute_all(y, scores[i])[k]
            assert lo <= point <= hi or not np.isfinite(lo)
    one = metrics.bootstrap_ci(y, scores[1], n_boot=n_boot, seed=seed, names=metrics.METRIC_NAMES)
    assert one == cis[1]  # a row's interval does not depend on the other rows
    assert set(metrics.bootstrap_ci(y, scores[0], n_boot=10)) == set(metrics.BOOT_METRICS)


def test_per_class_rows_and_confusion(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random((200, 5)) < 0.4).astype(np.uint8)
    p = np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0, 1)
    thr = np.array([0.5, 0.4, 0.6, 0.5, 0.7])
    cats = [{"id": 10 + c, "name": f"c{c}", "supercategory": "ab"[c % 2]} for c in range(5)]
    rows = report.per_class_rows(y, p, thr, cats)
    head, body = rows[0], rows[1:]
    assert head[-4:] == ["tp", "fp", "fn", "tn"] and [r[0] for r in body] != list(
        range(5)
    )  # best AP first
    pred = p > thr
    fn = {}
    for r in body:
        c = r[0]
        assert r[-4:] == [
            int((y[:, c] & pred[:, c]).sum()),
            int((~y[:, c].astype(bool) & pred[:, c]).sum()),
            int((y[:, c] & ~pred[:, c]).sum()),
            int((~y[:, c].astype(bool) & ~pred[:, c]).sum()),
        ]
        assert r[1] == 10 + c and sum(r[-4:]) == len(y) and r[-4] + r[-2] == r[8]
        fn[c] = r[-2]
    m = report.confusion(y, p, thr, cats, tmp_path / "confusion.csv")
    np.testing.assert_allclose(m.sum(1), [fn[c] for c in range(5)])  # row sums = false negatives
    pairs = metrics.error_analysis(y, p, thr)["pair_counts"]
    assert ((m[:, :5] > 0) == (pairs > 0)).all() and (m[:, :5] <= pairs + 1e-12).all()
    with open(tmp_path / "confusion.csv") as f:
        got = list(csv.reader(f))
    assert got[0][1:] == [c["name"] for c in cats] + ["(no false positive)"] and got[2][0] == "c1"
    assert sum(map(float, got[3][1:])) == pytest.approx(fn[2])
    order, spans = report.class_order(cats)
    assert list(order) == [0, 2, 4, 1, 3] and spans == [("a", 0, 3), ("b", 3, 2)]
    assert list(report.class_order([{"name": "x"}, {"name": "y"}])[0]) == [
        0,
        1,
    ]  # no supercategory: index order
    for stem, paths in (
        ("conf", report.plot_confusion(tmp_path / "conf", m, cats, "t")),
        (
            "ap",
            report.plot_class_ap(
                tmp_path / "ap",
                np.array([0.5, np.nan, 0.7, 0.2, 0.9]),
                np.array([0.1, 0.0, 0.3, 0.01, 0.5]),
                [c["name"] for c in cats],
                "t",
            ),
        ),
        (
            "folds",
            report.plot_folds(
                tmp_path / "folds",
                rng.random((3, 5)),
                rng.integers(1, 9, (3, 5)),
                [c["name"] for c in cats],
            ),
        ),
    ):
        assert [str(x) for x in paths] == [f"{tmp_path / stem}.png", f"{tmp_path / stem}.pdf"]
        assert all((tmp_path / f"{stem}.{e}").stat().st_size > 1000 for e in ("png", "pdf"))

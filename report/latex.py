"""LaTeX tables that fit a page at a readable size: report.write_table's .tex. No \\resizebox: a
table wider than the text is split into parts that repeat its key columns (metric columns grouped
as ranking / thresholded / other), a table longer than a page is a longtable, and a long text column
wraps. Widths are estimated from Computer Modern's glyph widths at \\small, so no LaTeX is needed to
write them; tests/test_report.py compiles them where pdflatex is installed.

    \\usepackage{booktabs,longtable,array}   % what every table needs

    tex = latex.tables(header, cells, caption="CV", keys=2, align="lrr")  # cells: latex.Cell rows
"""

import math
import re

PACKAGES = ("booktabs", "longtable", "array")
TEXTWIDTH = 345.0  # pt: \textwidth of a plain 10pt article (letter and A4): every table fits it
LONG_ROWS = 28  # more body lines than this: a longtable, which breaks across pages
SIZE, SCRIPT = 9.0, 7.0  # pt: \small (the tables' font) and \scriptsize (an interval's bracket)
COLSEP = 4.0  # pt: \tabcolsep, each side of a column
WRAP = 120.0  # pt: a text column wider than this wraps (p column)
# metric columns of one part stay together: threshold-free ranking, thresholded, the rest
GROUPS = (
    (
        "mAP_macro",
        "mAP_micro",
        "auc_macro",
        "auc_micro",
        "lrap",
        "ranking_loss",
        "coverage_error",
    ),
    (
        "f1_macro",
        "f1_micro",
        "precision_macro",
        "precision_micro",
        "recall_macro",
        "recall_micro",
        "hamming_loss",
    ),
)
# Computer Modern advance widths in em (cmr10; digits 0.5 em); anything else counts as 0.6 em
_EM = {
    **dict.fromkeys("0123456789", 0.5),
    **dict.fromkeys(".,:;'!", 0.28),
    **dict.fromkeys(" -()[]/", 0.36),
    **dict.fromkeys("ijlt", 0.3),
    **dict.fromkeys("mw", 0.8),
    **dict.fromkeys("MW", 1.0),
    **dict.fromkeys("ABCDEFGHIJKLNOPQRSTUVXYZ%&", 0.75),
    **dict.fromkeys("abcdeghknopqrsuvxyz_#", 0.53),
    "+": 0.78,
    "±": 1.22,  # \pm with its binary-operator spacing
}


class Cell:
    """One table cell: its LaTeX text, the plain parts it prints, [(text, size in pt)], for the
    width estimate, and its plain text when it is text (a wrapped column escapes it again, with
    line breaks allowed after / and _)."""

    __slots__ = ("tex", "parts", "bold", "text")

    def __init__(self, tex, parts, bold=False, text=None):
        self.tex, self.parts, self.bold, self.text = tex, parts, bold, text

    def wrapped(self):
        if self.text is None:
            return self.tex
        t = escape(self.text, breakable=True)
        return f"\\textbf{{{t}}}" if self.bold else t


def width(parts, bold=False):
    """Estimated printed width in pt of [(text, size pt)]."""
    w = sum(sum(_EM.get(ch, 0.6) for ch in text) * size for text, size in parts)
    return w * (1.1 if bold else 1.0)


def escape(s, breakable=False):
    """Plain text -> LaTeX text: specials escaped, "--" kept two hyphens, | < > as symbols,
    a few Unicode symbols in math; breakable: line breaks allowed after / and _ (wrapped
    columns)."""
    repl = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_\allowbreak{}" if breakable else r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "|": r"\textbar{}",
        "<": r"\textless{}",
        ">": r"\textgreater{}",
        "/": r"/\allowbreak{}" if breakable else "/",
        "±": r"$\pm$",
        "×": r"$\times$",
        "−": r"$-$",
        "→": r"$\rightarrow$",
        "≤": r"$\leq$",
        "≥": r"$\geq$",
        "Δ": r"$\Delta$",
    }
    out = "".join(repl.get(ch, ch) for ch in s)
    return re.sub(r"-(?=-)", "-{}", out)  # -- and --- print as hyphens, not dashes


def _header_lines(text, body_width):
    """A header on one line, or two (split at the space that makes the longer line shortest) when
    one line is wider than the column's cells."""
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    if width([(text, SIZE)]) <= body_width or not spaces:
        return [text]
    i = min(spaces, key=lambda i: max(width([(text[:i], SIZE)]), width([(text[i + 1 :], SIZE)])))
    return [text[:i], text[i + 1 :]]


def _columns(header, cells, align):
    """Per column: (header lines, width pt, column spec)."""
    cols = []
    for j, h in enumerate(header):
        body = max([width(r[j].parts, r[j].bold) for r in cells] or [0.0])
        if align[j] == "l" and body > WRAP:  # long text wraps; its header too
            cols.append(([h], WRAP, f">{{\\raggedright\\arraybackslash}}p{{{WRAP:.0f}pt}}"))
            continue
        lines = _header_lines(h, body)
        cols.append((lines, max(body, *(width([(x, SIZE)]) for x in lines)), align[j]))
    return cols


def _parts(names, cols, keys):
    """Column indices of each part: the key columns, then the data columns packed greedily in
    order, a metric group (GROUPS) kept in one part where it fits."""

    def w(j):
        return cols[j][1] + 2 * COLSEP

    budget = TEXTWIDTH - sum(w(j) for j in range(keys))
    group = {m: g for g, ms in enumerate(GROUPS) for m in ms}
    data = sorted(range(keys, len(names)), key=lambda j: (group.get(names[j], len(GROUPS)), j))
    runs = []  # consecutive columns of one metric group
    for j in data:
        g = group.get(names[j])
        if runs and g is not None and group.get(names[runs[-1][-1]]) == g:
            runs[-1].append(j)
        else:
            runs.append([j])
    blocks = [b for r in runs for b in ([r] if sum(map(w, r)) <= budget else [[j] for j in r])]
    parts, cur, used = [], [], 0.0
    for block in blocks:
        bw = sum(map(w, block))
        if cur and used + bw > budget:
            parts.append(cur)
            cur, used = [], 0.0
        cur, used = cur + block, used + bw
    parts.append(cur)
    return [list(range(keys)) + p for p in parts]


def _head(cols, idx):
    def one(j):
        lines, _, spec = cols[j]
        if len(lines) == 1:
            return escape(lines[0])
        a = "l" if spec == "l" else "r"
        stack = NL.join(map(escape, lines))
        return f"\\begin{{tabular}}[b]{{@{{}}{a}@{{}}}}{stack}\\end{{tabular}}"

    return " & ".join(one(j) for j in idx) + " \\\\"


NL = "\\\\\\relax "  # a line break inside a header cell (\\relax: a next line's "[" is text)


def tables(names, header, cells, caption="", note="", keys=1, align=None):
    """The .tex text of one table. names: the columns' names (metric names group the parts);
    header: what each column's head prints (plain text); cells: [[Cell]]; keys: the leading
    columns every part repeats; align: "l" / "r" per column (default l, then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    cols = _columns(header, cells, align)
    parts = _parts(names, cols, keys)
    out = [f"% generated by report.write_table; needs \\usepackage{{{','.join(PACKAGES)}}}"]
    long = any(_lines(cells, cols, idx) > LONG_ROWS for idx in parts)  # every part alike: in order
    for i, idx in enumerate(parts):
        cap = caption
        if len(parts) > 1:
            listed = ", ".join(header[j] for j in idx[keys:])
            cap = f"{caption} ({'continued, ' if i else ''}part {i + 1} of {len(parts)}: {listed})"
        if note and i == 0:
            cap = f"{cap} {note}"
        spec = "".join(cols[j][2] for j in idx)
        body = [
            " & ".join(r[j].wrapped() if "p{" in cols[j][2] else r[j].tex for j in idx) + " \\\\"
            for r in cells
        ]
        out += (_long if long else _float)(spec, len(idx), escape(cap), _head(cols, idx), body)
    return "\n".join(out) + "\n"


def _lines(cells, cols, idx):
    """The body's printed lines: a row is as tall as its most wrapped cell."""
    return sum(
        max(
            [1]
            + [
                math.ceil(width(r[j].parts, r[j].bold) / (WRAP - 10))
                for j in idx
                if "p{" in cols[j][2]
            ]
        )
        for r in cells
    )


def _float(spec, n, cap, head, body):
    return [
        "\\begin{table}[htbp]",
        "\\centering\\small\\setlength{\\tabcolsep}{%gpt}" % COLSEP,
        *([f"\\caption{{{cap}}}"] if cap else []),
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        head,
        "\\midrule",
        *body,
        "\\bottomrule",
        "\\end{tabular}",
        "\\end{table}",
    ]


def _long(spec, n, cap, head, body):
    return [
        "\\begingroup\\small\\setlength{\\tabcolsep}{%gpt}" % COLSEP,
        f"\\begin{{longtable}}{{{spec}}}",
        *([f"\\caption{{{cap}}}\\\\"] if cap else []),
        "\\toprule",
        head,
        "\\midrule",
        "\\endfirsthead",
        f"\\multicolumn{{{n}}}{{l}}{{\\emph{{(continued)}}}}\\\\",
        "\\toprule",
        head,
        "\\midrule",
        "\\endhead",
        f"\\midrule\\multicolumn{{{n}}}{{r}}{{\\emph{{(continued on the next page)}}}}\\\\",
        "\\endfoot",
        "\\bottomrule",
        "\\endlastfoot",
        *body,
        "\\end{longtable}",
        "\\endgroup",
    ]

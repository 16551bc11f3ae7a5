"""A results chapter from its sections: report.md (each section's result in words, its headline
table inline, then links to every table and figure), report.tex (the same with every table's .tex
and every figure's .pdf) and report.pdf, compiled by pdflatex where it is installed. study.py
calls it.

    sections = [dict(title="Main results", text="Best: ...", table=[header, *rows],
                     files=["cv_table.md", "cv_table.csv", "cv_table.tex"], caption="...")]
    chapter.write("outputs/study/report", "Results: study", intro, sections)  # -> paths written

A section: title (entries with one title share a heading, in the order given), text (sentences,
plain), table (its headline table inline: a header and rows of plain text), files (links; .tex
tables and .pdf figures go into report.tex), caption.
"""

import os
import re
import shutil
import subprocess
import tempfile

import data
import report
from report import latex

PREAMBLE = [
    "\\documentclass{article}",
    f"\\usepackage{{{','.join(latex.PACKAGES)},graphicx}}",
    "\\setlength{\\LTcapwidth}{\\textwidth}",
    "\\begin{document}",
]


def markdown(title, intro, sections):
    """report.md's text."""
    md, last = [f"# {title}\n", *(f"{p}\n" for p in intro)], None
    for s in sections:
        if s["title"] != last:
            md.append(f"## {s['title']}\n")
            last = s["title"]
        if s.get("text"):
            md.append(s["text"] + "\n")
        if s.get("table"):
            md.append(report.md_table(*_split(s["table"])))
        links = " · ".join(
            f"![{f}]({f})" if f.endswith(".png") else f"[{f}]({f})" for f in s.get("files", ())
        )
        if links:
            md.append((f"{s['caption']}: " if s.get("caption") else "") + links + "\n")
    return "\n".join(md)


def _split(table):
    return table[0], table[1:]


def _tex_table(table, title):
    """A headline table of plain text cells as LaTeX (report.latex: numbers right-aligned)."""
    header, rows = _split(table)
    cells = [[latex.Cell(latex.escape(c), [(c, latex.SIZE)], text=c) for c in r] for r in rows]
    num = [
        all(re.match(r"^[-+]?[0-9.]", r[j]) or r[j] == "-" for r in rows)
        for j in range(len(header))
    ]
    align = "".join("r" if n and j else "l" for j, n in enumerate(num))
    keys = next((j for j, n in enumerate(num) if n), 1) or 1
    return latex.tables(header, header, cells, caption=f"{title}: headline", keys=keys, align=align)


def _floats(path):
    """(floats, longtables) of a table file: its parts."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return 0, 0
    return text.count("\\begin{table}"), text.count("\\begin{longtable}")


def tex(title, intro, sections, out_dir="."):
    """report.tex's text: the tables \\input, the figures' .pdf included, each section on a new
    page (and a new page before the floats pile up)."""
    out, last = [*PREAMBLE, f"\\section*{{{latex.escape(title)}}}"], None
    out += [latex.escape(p, breakable=True) + "\n" for p in intro]
    floats = 0  # placed since the last \clearpage: LaTeX holds at most 18
    for s in sections:
        if s["title"] != last:
            out += ["\\clearpage", f"\\section{{{latex.escape(s['title'])}}}"]
            last, floats = s["title"], 0
        if s.get("text"):
            out.append(latex.escape(s["text"], breakable=True) + "\n")
        if s.get("table"):
            out.append(_tex_table(s["table"], s["title"]))
            floats += 1
        for f in s.get("files", ()):
            stem, ext = os.path.splitext(f)
            n, long = _floats(os.path.join(out_dir, f)) if ext == ".tex" else (ext == ".pdf", 0)
            if floats and (floats + n > 8 or long):  # a longtable goes after the floats above
                out.append("\\clearpage")
                floats = 0
            floats += n
            if ext == ".tex":
                out.append(f"\\input{{{stem}}}")
            elif ext == ".pdf":
                cap = latex.escape(s.get("caption") or s["title"])
                out += [
                    "\\begin{figure}[htbp]",
                    "\\centering",
                    f"\\includegraphics[width=\\textwidth,height=0.8\\textheight,"
                    f"keepaspectratio]{{{stem}}}",
                    f"\\caption{{{cap}}}",
                    "\\end{figure}",
                ]
    return "\n".join(out + ["\\end{document}", ""])


def write(out, title, intro, sections):
    """out/report.md, out/report.tex and, where pdflatex is installed, out/report.pdf -> the paths
    written. intro: paragraphs (plain text) under the title."""
    paths = [os.path.join(out, "report.md"), os.path.join(out, "report.tex")]
    text = tex(title, intro, sections, out)
    pdf = compile_pdf(out, text) if shutil.which("pdflatex") else None
    note = (
        "The same chapter with every table and figure: [report.pdf](report.pdf)."
        if pdf
        else "No report.pdf: pdflatex is not installed (report.tex compiles where it is)."
    )
    data.save_text(paths[0], markdown(title, [*intro, note], sections))
    data.save_text(paths[1], text)
    return paths + ([pdf] if pdf else [])


def compile_pdf(out, text):
    """report.tex compiled in a scratch folder (pdflatex twice: longtable's column widths) ->
    out/report.pdf, or None with a note when it does not compile."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "report.tex"), "w") as f:
            f.write(text)
        for _ in range(2):
            r = subprocess.run(
                ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"],
                cwd=tmp,
                env=dict(os.environ, TEXINPUTS=f"{os.path.abspath(out)}{os.pathsep}"),
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                print(f"note: report.tex did not compile ({r.stdout[-300:].strip()}); no PDF")
                return None
        dest = os.path.join(out, "report.pdf")
        data.atomic_write(dest, lambda t: shutil.copyfile(os.path.join(tmp, "report.pdf"), t))
    return dest

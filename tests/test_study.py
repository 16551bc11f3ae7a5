"""study.py: runs made through run_cv.sh (here a fake one that writes train.py's / evaluate.py's
files), skipped when complete, resumed after an interruption, the report folder and report.md (every
link exists, the fold table's counts equal splits.json's stats), and a rerun that skips everything.

    python -m pytest -q tests/test_study.py
"""

import csv
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import aggregate
import data
import metrics
import study
from report import sections as report_sections
import test_aggregate as ta
import test_report

FAKE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
    import test_aggregate as ta
    run = Path(os.environ["RUN"])
    with open({log!r}, "a") as f:
        f.write(run.name + " " + os.environ.get("EVAL_ARGS", "") + "\\n")
    with open({argv!r}, "a") as f:
        f.write(" ".join([run.name, os.environ.get("SUMMARY", ""), *sys.argv[1:]]) + "\\n")
    if os.environ.get("FAIL_AT") == run.name:
        sys.exit(1)  # killed mid-study
    rng = np.random.default_rng(len(run.name) + len(os.environ.get("MODEL", "")))
    z = np.load({labels!r})
    labels = z["labels"]
    knn = None if run.name in ("bits0", "probe") else [0.5, 0.55, 0.52]
    knn_probs = None if knn is None else ta.fake_probs(rng, labels, 3, 0.3)
    ev = (labels, ta.fake_probs(rng, labels, 3, 0.4), knn_probs)
    bits = {{"bits0": 0, "bits16": 16}}.get(run.name, 64)
    ta.make_run(run, [0.6, 0.62, 0.58], knn=knn, bits=bits, splits={splits!r}, evaluate=ev)
    if os.environ.get("MODEL"):  # the backbone's cache, as run_cv.sh's extraction leaves it
        import data
        own = str(run.parent / (Path(os.environ["MODEL"]).name + ".st"))
        cache = os.environ.get("FEATURES") or own
        Path(cache).write_bytes(b"x" * 2048)
        data.save_json(cache[:-3] + ".cost.json", dict(images_per_s=12.5, ranks=1, device="cpu"))
        for k in range(3):
            cfg = data.read_json(run / f"fold{{k}}" / "config.json")
            cfg.update(features=cache, features_meta=dict(model=os.environ["MODEL"], dim="32"))
            data.save_json(run / f"fold{{k}}" / "config.json", cfg)
    for k in range(3):
        d = run / f"fold{{k}}"
        yk = labels[k::3]
        p = ta.fake_probs(rng, yk, 1, 0.4)[0]
        np.savez(d / "val_predictions.npz", ids=np.arange(len(yk)), labels=yk, probs=p)
        if run.name == "probe":  # fitted in one epoch, as train.py --baseline logs it
            (d / "log.jsonl").write_text('{{"epoch": 1, "loss": 0.0, "val_mAP_macro": 0.5}}\\n')
        (d / ".done").touch()
    (run / "eval_test" / "metrics.csv").write_text("model\\n")
""")


@pytest.fixture
def fake_study(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((90, 5)) < 0.3).astype(np.uint8)
    labels[:3] = 1
    np.savez(tmp_path / "labels.npz", labels=labels)
    cats = [{"id": c + 1, "name": f"class {c}", "supercategory": "ab"[c // 3]} for c in range(5)]
    stats = [
        {"size": len(labels[k::3]), "positives": labels[k::3].sum(0).tolist()} for k in range(3)
    ]
    data.save_json(tmp_path / "splits.json", {"folds": 3, "categories": cats, "stats": stats})
    script = tmp_path / "fake_run_cv.py"
    script.write_text(
        FAKE.format(
            tests=str(Path(__file__).parent),
            root=str(Path(__file__).parents[1]),
            log=str(tmp_path / "calls.log"),
            argv=str(tmp_path / "argv.log"),
            labels=str(tmp_path / "labels.npz"),
            splits=str(tmp_path / "splits.json"),
        )
    )
    return tmp_path, script, stats


def run_study(tmp_path, script, *extra):
    argv = [
        "--study_dir",
        str(tmp_path / "st"),
        "--only",
        "hash64,bits0,bits16,probe",
        "--bootstrap",
        "20",
        "--run_cv",
        f"{sys.executable} {script}",
        *extra,
    ]
    return study.main(study.get_args_parser().parse_args(argv))


def calls(tmp_path):
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def test_study_resume_report_and_rerun(fake_study, monkeypatch, capsys):
    tmp_path, script, stats = fake_study
    monkeypatch.setenv("FOLDS", "3")
    monkeypatch.setenv("FAIL_AT", "bits16")
    with pytest.raises(SystemExit) as e:
        run_study(tmp_path, script)
    assert e.value.code == 2 and "run bits16 failed" in capsys.readouterr().err
    assert [c.split()[0] for c in calls(tmp_path)] == ["hash64", "bits0", "bits16"]
    assert calls(tmp_path)[0].endswith("--head both --retrieval")
    assert "--head" not in calls(tmp_path)[1]
    monkeypatch.delenv("FAIL_AT")
    out = Path(run_study(tmp_path, script, "--", "--epochs", "2", "--bits", "8", "--epochs", "3"))
    argv = (tmp_path / "argv.log").read_text().splitlines()
    assert argv[-2] == "bits16 0 -- --bits 8 --epochs 3"  # each flag once, the last value
    assert argv[-1] == "probe 0 -- --baseline probe --bits 8 --epochs 3"  # SUMMARY=0
    assert [c.split()[0] for c in calls(tmp_path)][3:] == [
        "bits16",
        "probe",
    ]  # finished runs were not redone
    md = (out / "report.md").read_text()
    links = [s.split("](")[1].split(")")[0] for s in md.split("[")[1:] if "](" in s]
    assert links and all((out / f).is_file() for f in links), [
        f for f in links if not (out / f).is_file()
    ]
    for stem in (
        "cv_table",
        "cv_heads",
        "test_table",
        "test_heads",
        "per_class",
        "fold_analysis",
        "fold_classes",
        "methods",
        "hashing",
    ):
        assert f"{stem}.md" in links and f"{stem}.tex" in links and f"{stem}.csv" in links
    for fig in ("bits", "class_ap", "confusion", "folds", "learning_hash64"):
        assert f"{fig}.png" in links and f"{fig}.pdf" in links
    assert (
        md.index("cv_table.md")
        < md.index("test_table.md")
        < md.index("confusion.png")
        < md.index("folds.png")
    )
    with open(out / "fold_classes.csv") as f:
        rows = list(csv.DictReader(f))
    for c, row in enumerate(rows):  # the fold table's counts are splits.json's stats
        assert [int(row[f"positives fold {k}"]) for k in range(3)] == [
            s["positives"][c] for s in stats
        ]
    with open(out / "per_class.csv") as f:
        fn = {r["name"]: int(r["fn"]) for r in csv.DictReader(f)}
    with open(out / "confusion.csv") as f:
        conf = list(csv.reader(f))[1:]
    assert {
        r[0]: pytest.approx(sum(map(float, r[1:]))) for r in conf
    } == fn  # row sums = false negatives
    chapter_says(md, out)
    n_calls = len(calls(tmp_path))
    capsys.readouterr()
    run_study(tmp_path, script)  # everything done: no run_cv.sh call, no report rewrite
    assert len(calls(tmp_path)) == n_calls and "report: skipped" in capsys.readouterr().out


def chapter_says(md, out):
    """report.md states each section's headline numbers, in the order of a results chapter, and
    the PDF exists where pdflatex does; every .tex of the folder fits the page."""
    cv = {r["run"]: r for r in ta.read_csv(out / "cv_table.csv") if r["head"] == "MLP"}
    for run in ("hash64", "bits0", "bits16", "probe"):  # CV mean ± std in %, one decimal
        m, s = (100 * float(cv[run][f"mAP_macro_{x}"]) for x in ("mean", "std"))
        assert f"| {run} | MLP | {m:.1f} ± {s:.1f} |" in md, run
    test = {(r["run"], r["model"]): r for r in ta.read_csv(out / "test_table.csv")}
    t = test["hash64", "ensemble"]
    v, lo, hi = (100 * float(t[f"mAP_macro{x}"]) for x in ("", "_low", "_high"))
    assert f"{v:.1f} [{lo:.1f}, {hi:.1f}]" in md  # the test ensemble with its interval
    abl = [r for r in ta.read_csv(out / "ablations.csv") if r["metric"] == "mAP (macro)"]
    assert [r["run"] for r in abl] == ["bits0", "bits16", "probe"]
    for r in abl:  # each ablation's difference and both p-values inline
        assert f"| {r['run']} | mAP (macro) | {r['CV diff']} | {r['p (folds)']} |" in md
        assert f"| {r['p (test)']} |" in md
    heads = ["Main results", "Ablations against the reference", "KNN head vs MLP head"]
    heads += ["mAP against hash bits", "Per class", "Confusion", "Fold analysis"]
    heads += ["Learning curves", "Per run: cross-validation", "Per run: test"]
    at = [md.index(f"## {h}") for h in heads]
    assert at == sorted(at)
    for h in ("Main results", "Ablations against", "KNN head vs MLP head", "Fold analysis"):
        body = md.split(f"## {h}")[1].split("\n## ")[0]
        assert "%" in body or "points" in body or "p <" in body, h  # a sentence with numbers
    assert "No curve for probe" in md  # a one-epoch run: no empty figure, and the report says why
    if shutil.which("pdflatex"):  # the same chapter as a PDF, linked from report.md
        assert (out / "report.pdf").stat().st_size > 10000 and "[report.pdf](report.pdf)" in md
    test_report.compile_tex(sorted(p for p in out.glob("*.tex") if p.name != "report.tex"), out)


def test_merge_flags():
    assert study.merge_flags(["--epochs", "6", "--patience", "3"], ["--epochs", "50", "--x"]) == [
        "--patience",
        "3",
        "--epochs",
        "50",
        "--x",
    ]
    assert study.merge_flags(["--lr", "-1e-3", "--no_prior_init"], []) == [
        "--lr",
        "-1e-3",
        "--no_prior_init",
    ]


def test_unknown_run_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(
            study.get_args_parser().parse_args(["--study_dir", str(tmp_path), "--only", "nope"])
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_report_folder(tmp_path):
    """write_report on fake runs: every table in .csv/.md/.tex, figures in .png/.pdf, CIs on shared
    resamples."""
    rng = np.random.default_rng(0)
    labels = (rng.random((120, 6)) < 0.3).astype(np.uint8)
    labels[0] = 1
    runs = [
        ta.make_run(
            tmp_path / "bits64",
            [0.60, 0.62, 0.61],
            knn=[0.58, 0.61, 0.57],
            bits=64,
            evaluate=(
                labels,
                ta.fake_probs(rng, labels, 3, 0.4),
                ta.fake_probs(rng, labels, 3, 0.3),
            ),
        ),
        ta.make_run(
            tmp_path / "bits32",
            [0.58, 0.60, 0.59],
            knn=[0.55, 0.58, 0.56],
            bits=32,
            evaluate=(labels, ta.fake_probs(rng, labels, 3, 0.3), None),
        ),
        ta.make_run(tmp_path / "bits0", [0.57, 0.59, 0.60], bits=0, finished={2}),
    ]
    rep = tmp_path / "report"
    agg = aggregate.get_args_parser().parse_args(
        [*map(str, runs), "--allow_partial", "--bootstrap", "50"]
    )
    sections = report_sections.write_report(aggregate.main(agg)["runs"], agg, str(rep))
    for stem in (
        "cv_table",
        "cv_heads",
        "cv_bits64",
        "cv_bits0",
        "test_bits64",
        "test_bits32",
        "test_table",
        "test_heads",
    ):
        for ext in ("csv", "md", "tex"):
            assert (rep / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
    for stem in ("learning_bits64", "learning_bits0", "bits"):
        assert (rep / f"{stem}.png").stat().st_size > 0 and (rep / f"{stem}.pdf").stat().st_size > 0
    assert all((rep / f).is_file() for s in sections for f in s.get("files", ()))
    cv = (rep / "cv_table.md").read_text()
    assert "bits0 (partial 2/3)" in cv and cv.count("KNN") == 2  # bits 0 has no KNN head
    assert "bits0 (partial 2/3)" in (rep / "cv_bits0.tex").read_text()
    test = ta.read_csv(rep / "test_bits64.csv")
    assert [(x["model"], x["head"]) for x in test] == [(f"fold{k}", "MLP") for k in range(3)] + [
        ("mean ± std (folds)", "MLP"),
        ("ensemble", "MLP"),
    ] + [(f"fold{k}", "KNN") for k in range(3)] + [
        ("mean ± std (folds)", "KNN"),
        ("ensemble", "KNN"),
    ]
    z = np.load(runs[0] / "eval_test" / "test_predictions.npz")
    cis = metrics.bootstrap_intervals(
        labels,
        [*z["member_probs"], z["probs"], *z["member_knn_probs"], z["knn_probs"]],
        n_boot=50,
        seed=0,
    )
    for row, ci in zip([x for x in test if x["model"] != "mean ± std (folds)"], cis):
        for m in metrics.METRIC_NAMES:  # every metric has its interval, on the shared resamples
            assert (
                float(row[m]),
                float(row[f"{m}_low"]),
                float(row[f"{m}_high"]),
            ) == pytest.approx(ci[m])
    mean_row = test[3]
    assert float(mean_row["mAP_macro"]) == pytest.approx(
        np.mean([float(x["mAP_macro"]) for x in test[:3]])
    )
    side = ta.read_csv(rep / "test_table.csv")
    assert [(x["run"], x["head"]) for x in side][::2] == [
        ("bits64", "MLP"),
        ("bits64", "KNN"),
        ("bits32", "MLP"),
    ]
    test_report.compile_tex(sorted(rep.glob("*.tex")), tmp_path)


def test_backbone_table(fake_study, monkeypatch):
    """--backbones A B: B's runs (here hash64 and zeroshot of the four) under <study>/<B's
    folder>/ with MODEL=B and their own cache (FEATURES dropped); backbones.{md,csv,tex} has a row
    per backbone and method, its CV and test cells are the runs' own numbers, and B's rows are
    paired against A's."""
    tmp_path, script, _ = fake_study
    monkeypatch.setenv("FOLDS", "3")
    monkeypatch.setenv("FEATURES", str(tmp_path / "a.st"))
    names = "hash64,zeroshot,clip_b/hash64,clip_b/zeroshot"  # of the 8 runs, those 4 (time)
    argv = ["--study_dir", str(tmp_path / "st"), "--only", names, "--bootstrap", "20"]
    argv += ["--run_cv", f"{sys.executable} {script}", "--backbones", "m/sig_a,m/clip_b"]
    out = Path(study.main(study.get_args_parser().parse_args(argv)))
    assert [c.split()[0] for c in calls(tmp_path)][2:] == ["hash64", "zeroshot"]
    assert (tmp_path / "st" / "clip_b" / "hash64" / "fold0" / ".done").is_file()
    assert (tmp_path / "st" / "clip_b" / "clip_b.st").is_file()  # its own cache, not FEATURES
    with open(out / "backbones.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["backbone"] for r in rows} == {"m/sig_a", "m/clip_b"}
    want = {"hash head", "zero-shot", "KNN head"}
    assert {r["method"] for r in rows if r["backbone"] == "m/clip_b"} == want
    assert (out / "backbones.md").is_file() and (out / "backbones.tex").is_file()
    assert "backbones.md" in (out / "report.md").read_text()
    run = aggregate.read_run(str(tmp_path / "st" / "clip_b" / "hash64"), aggregate.get_args_parser()
                             .parse_args([str(tmp_path / "st" / "clip_b" / "hash64")]))  # fmt: skip
    head = next(r for r in rows if r["backbone"] == "m/clip_b" and r["method"] == "hash head")
    cv = [f["mAP_macro"] for f in run["folds"].values()]
    # the csv holds fractions
    assert float(head["CV mAP_macro_mean"]) == pytest.approx(np.mean(cv), abs=1e-4)
    ev = report_sections.load_eval(run, "eval_test")
    got = metrics.compute_all(ev["y"], ev["heads"]["mlp"][-1][1])["mAP_macro"]
    assert float(head["test mAP_macro"]) == pytest.approx(got, abs=1e-4)
    assert 0 <= float(head["p"]) <= 1
    with open(out / "backbone_cost.csv") as f:
        cost = list(csv.DictReader(f))
    assert [c["backbone"] for c in cost] == ["m/sig_a", "m/clip_b"]
    assert all(c["extraction images/s"].startswith("12.5") for c in cost)
    assert (out / "backbone_cost.tex").is_file()
    ref = [r for r in rows if r["backbone"] == "m/sig_a"]
    assert all(r["p"] == "-" for r in ref)

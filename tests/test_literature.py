"""report/literature.py through aggregate.py: on fake run folders of each protocol the literature
table is written (.md/.csv/.tex) with every anchor of that protocol and its source, none of another
protocol, our rows marked "frozen SigLIP2-B/16-256" with their input setting and the numbers of
eval_test/metrics.json; for karpathy_cv it says no published number uses the protocol. Runs of
different protocols never share a table: literature.write raises data.DataError, aggregate.py exits
with one line (code 2).

    python -m pytest -q tests/test_literature.py
"""

import csv
import json

import numpy as np
import pytest
import test_aggregate as ta
import test_report

import aggregate
import data
import metrics
import protocols
from report import literature

SIGLIP = {"model": "google/siglip2-base-patch16-256", "image_size": 256}
RETRIEVAL_KEYS = (
    "mAP@5000",
    "mAP@5000_avgties",
    "mAP@5000_skip",
    "mAP@5000_skip_avgties",
    "mAP@all",
)


def fake_run(
    root, name, protocol, bits=64, inputs="image", knn=None, evaluate=True, retrieval=None
):
    """A fake run (test_aggregate.make_run) on a splits file of this protocol, with features_meta
    and inputs in config.json as train.py writes them, and eval_test/metrics.json as evaluate.py
    --ensemble writes it."""
    splits = root / f"splits_{protocol}.json"
    if not splits.exists():
        data.save_json(
            splits,
            {"folds": 3} if protocol == "karpathy_cv" else {"folds": 3, "protocol": protocol},
        )
    sha = protocols.splits_sha256(splits)
    rng = np.random.default_rng(bits)
    labels = (rng.random((60, 5)) < 0.3).astype(np.uint8)
    labels[0] = 1
    ev = (
        labels,
        ta.fake_probs(rng, labels, 3, 0.4),
        ta.fake_probs(rng, labels, 3, 0.3) if knn else None,
    )
    run = ta.make_run(
        root / name,
        [0.60, 0.62, 0.61],
        sha=sha,
        splits=splits,
        knn=knn,
        bits=bits,
        evaluate=ev if evaluate else None,
    )
    for k in range(3):
        cfg = json.loads((run / f"fold{k}" / "config.json").read_text())
        data.save_json(
            run / f"fold{k}" / "config.json", dict(cfg, features_meta=SIGLIP, inputs=inputs)
        )
    if evaluate:
        m = json.loads((run / "eval_test" / "metrics.json").read_text())
        m.update(n_images=len(labels), protocol=protocol)
        if retrieval is not None:  # evaluate.py: one dict per fold model + their mean
            m["retrieval"] = {
                f"fold{k}": {key: v + 0.001 * i for i, key in enumerate(RETRIEVAL_KEYS)}
                for k, v in enumerate(retrieval)
            }
            m["retrieval"]["mean"] = {
                key: float(np.mean([r[key] for r in m["retrieval"].values()]))
                for key in RETRIEVAL_KEYS
            }
        data.save_json(run / "eval_test" / "metrics.json", m)
    return run


def aggregate_runs(*runs, out=None):
    argv = [str(r) for r in runs] + (["--out", str(out)] if out else []) + ["--bootstrap", "0"]
    return aggregate.main(aggregate.get_args_parser().parse_args(argv))


def rows_of(stem):
    with open(f"{stem}.csv") as f:
        return list(csv.DictReader(f))


def test_coco2014_table(tmp_path):
    run = fake_run(tmp_path, "hash64", "coco2014", knn=[0.55, 0.57, 0.56])
    stem = aggregate_runs(run)["literature"]
    assert stem == str(run / "literature")
    md, tex = (open(f"{stem}.{e}").read() for e in ("md", "tex"))
    for a in literature.CLASSIFICATION:  # every anchor with its backbone, resolution and source
        assert (
            a["method"] in md
            and a["backbone"] in md
            and a["source"] in md
            and f"{a['value']:.1f}" in md
        )
    assert (
        "ML-GCN" in md and "ADDS" in md and "CSQ" not in md and "HashNet" not in md
    )  # no other protocol's
    assert "train2014 to val2014" in md and "No published number" not in md
    rows = rows_of(stem)
    published = [r for r in rows if r[""] == "published"]
    assert len(published) == len(literature.CLASSIFICATION) and all(
        r["fine-tuned"] == "yes" for r in published
    )
    ours = [r for r in rows if r[""] == "ours"]
    assert [r["method"] for r in ours] == ["hash64 (MLP head)", "hash64 (KNN head)"]
    ev = json.loads((run / "eval_test" / "metrics.json").read_text())
    for r, h in zip(ours, ("mlp", "knn")):
        assert (
            r["backbone"] == "frozen SigLIP2-B/16-256"
            and r["inputs"] == "image"
            and r["resolution"] == "256"
        )
        assert r["fine-tuned"].startswith("no") and r["test images"] == "60"
        assert float(r["mAP (%)"]) == pytest.approx(100 * ev["ensemble"][h]["mAP_macro"])
        folds = [100 * m[h]["mAP_macro"] for m in ev["models"].values()]
        assert float(r["fold models mAP (%)_mean"]) == pytest.approx(np.mean(folds))
        assert float(r["fold models mAP (%)_std"]) == pytest.approx(np.std(folds, ddof=1))
    assert float(ours[0]["CV mAP (%)_mean"]) == pytest.approx(100 * np.mean([0.60, 0.62, 0.61]))
    test_report.compile_tex([run / "literature.tex"], tmp_path)


def test_hashnet_table(tmp_path):
    runs = [
        fake_run(tmp_path, "bits16", "hashnet", bits=16, retrieval=[0.70, 0.72, 0.71]),
        fake_run(
            tmp_path, "hash64", "hashnet", bits=64, inputs="both", retrieval=[0.80, 0.81, 0.83]
        ),
        fake_run(tmp_path, "bits0", "hashnet", bits=0),
    ]  # no codes: no retrieval row
    out = tmp_path / "cmp"
    stem = aggregate_runs(*runs, out=out)["literature"]
    assert stem == str(out / "literature")
    md = open(f"{stem}.md").read()
    for a in literature.RETRIEVAL:
        assert a["method"] in md and a["source"] in md and a["rule"] in md
        for b, v in a["values"].items():
            assert f"{v:.3f}" in md
    assert "ML-GCN" not in md and "ADDS" not in md and "mAP@5000" in md and "skip: HashNet" in md
    rows = rows_of(stem)
    # columns 16 / 32 / 48 / 64 bits; the CSV splits a column holding our mean ± std cells into
    # _mean, _std
    assert [c for c in rows[0] if "bits" in c] == [
        "16 bits_mean",
        "16 bits_std",
        "32 bits",
        "48 bits",
        "64 bits_mean",
        "64 bits_std",
    ]
    csq = next(r for r in rows if r["method"] == "CSQ")
    assert [csq[c] for c in ("16 bits_mean", "32 bits", "48 bits", "64 bits_mean")] == [
        "0.796",
        "0.838",
        "-",
        "0.861",
    ]
    ours = [r for r in rows if r[""] == "ours"]
    assert len(ours) == 2 * len(literature.OUR_RULES) and "bits0" not in {r["method"] for r in ours}
    assert {r["empty query; ties"] for r in ours} == {rule for _, rule in literature.OUR_RULES}
    ev = json.loads((runs[1] / "eval_test" / "metrics.json").read_text())["retrieval"]
    for key, rule in literature.OUR_RULES:
        r = next(x for x in ours if x["method"] == "hash64" and x["empty query; ties"] == rule)
        vals = [ev[f"fold{k}"][key] for k in range(3)]
        assert float(r["64 bits_mean"]) == pytest.approx(np.mean(vals)) and r["16 bits_mean"] == ""
        assert float(r["64 bits_std"]) == pytest.approx(np.std(vals, ddof=1))
        assert r["backbone"] == "frozen SigLIP2-B/16-256" and r["inputs"] == "image + caption"
    assert next(x for x in ours if x["method"] == "bits16")["16 bits_mean"] != ""
    test_report.compile_tex([out / "literature.tex"], tmp_path)


def test_karpathy_cv_says_no_published_number(tmp_path):
    run = fake_run(
        tmp_path, "hash64", "karpathy_cv", inputs="both", evaluate=False
    )  # no test evaluation yet
    stem = aggregate_runs(run)["literature"]
    md = open(f"{stem}.md").read()
    assert "No published number uses this protocol" in md
    assert not any(a["method"] in md for a in literature.CLASSIFICATION + literature.RETRIEVAL)
    rows = rows_of(stem)
    assert [r[""] for r in rows] == ["ours"] and rows[0]["backbone"] == "frozen SigLIP2-B/16-256"
    assert rows[0]["inputs"] == "image + caption" and rows[0]["mAP (%)"] == "-"
    assert "run evaluate.py --ensemble" in rows[0]["source"]
    test_report.compile_tex([run / "literature.tex"], tmp_path)


def test_protocols_never_share_a_table(tmp_path, capsys):
    a = aggregate.read_run(
        str(fake_run(tmp_path, "a", "coco2014")), aggregate.get_args_parser().parse_args(["x"])
    )
    b = aggregate.read_run(
        str(fake_run(tmp_path, "b", "hashnet")), aggregate.get_args_parser().parse_args(["x"])
    )
    with pytest.raises(data.DataError, match="different protocols") as e:  # a library raises
        literature.write(str(tmp_path), [a, b])
    assert "\n" not in str(e.value) and str(tmp_path / "a") in str(e.value)
    assert not (tmp_path / "literature.md").exists()
    # the script exits: two runs on one splits file (none on disk) whose metrics.json name
    # different protocols
    rng = np.random.default_rng(0)
    labels = (rng.random((30, 5)) < 0.3).astype(np.uint8)
    runs = []
    for name, proto in (("c", "coco2014"), ("d", "hashnet")):
        r = ta.make_run(
            tmp_path / name,
            [0.6, 0.62],
            evaluate=(labels, ta.fake_probs(rng, labels, 2, 0.4), None),
        )
        m = json.loads((r / "eval_test" / "metrics.json").read_text())
        data.save_json(r / "eval_test" / "metrics.json", dict(m, protocol=proto))
        runs.append(r)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        aggregate_runs(*runs, out=tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "different protocols" in err and not (tmp_path / "out" / "literature.md").exists()


def test_backbone_names():
    assert (
        literature.backbone({"features_meta": {"model": "google/siglip2-large-patch16-512"}})
        == "frozen SigLIP2-L/16-512"
    )
    assert (
        literature.backbone({"features_meta": {"model": "demo/tiny_siglip"}})
        == "frozen demo/tiny_siglip"
    )
    assert metrics.METRIC_NAMES[0] == "mAP_macro"  # what the classification rows read

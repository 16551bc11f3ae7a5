"""report/methods.py: each run's method name from its config, the hashing table's rows (ours from
evaluate.py's retrieval, mean ± std over the fold models; no published number in a row of ours;
every published row with its source), and the files write() leaves."""

from types import SimpleNamespace

import numpy as np

import data
import report
from report import literature, methods


def test_method_of_names_every_kind():
    def name(**cfg):
        return methods.method_of(cfg)

    assert name(model_args={"bits": 64}) == ("classification", "hash head (64 bits)")
    assert name(model_args={"bits": 0}) == ("classification", "no hash layer (--bits 0)")
    assert name(baseline="probe", model_args={"bits": 0})[1].startswith("linear probe")
    assert name(baseline="zeroshot", model_args={"bits": 0})[1].startswith("zero-shot")
    assert name(model_args={"bits": 0, "head": "mlgcn", "graph": True})[1].startswith("ML-GCN (")
    assert "without the graph" in name(model_args={"bits": 0, "head": "mlgcn", "graph": False})[1]
    got = name(model_args={"bits": 32, "head": "hashlayer", "hash_loss": "dpsh"})
    assert got == ("hashing", "DPSH (plain hash layer)")


def _run(root, name, model_args, retrieval=None):
    d = root / name
    (d / "eval_test").mkdir(parents=True)
    if retrieval is not None:
        data.save_json(d / "eval_test" / "metrics.json", {"retrieval": retrieval})
    cfg = {"model_args": model_args, "inputs": "image", "features_meta": {"model": "planted"}}
    return {"config": cfg, "dir": str(d), "label": name, "heads": {"mlp": {}}}


def test_hashing_rows_ours_then_the_published(tmp_path):
    ret = {
        f"fold{k}": {"mAP@1000": v, "mAP@1000_skip": 0.9, "mAP@all": v - 0.1}
        for k, v in enumerate((0.5, 0.6))
    }
    ret["mean"] = {"mAP@1000": 0.55, "mAP@all": 0.45}
    runs = [
        _run(tmp_path, "csq16", {"bits": 16, "head": "hashlayer", "hash_loss": "csq"}, ret),
        _run(tmp_path, "hash64", {"bits": 64}),  # not evaluated: "-" cells
        _run(tmp_path, "bits0", {"bits": 0}),  # no codes: no row
    ]
    k, rows = methods.hashing_rows(runs, "eval_test")
    assert k == "mAP@1000"
    ours = [r for r in rows if r[0] == "ours"]
    assert [r[2] for r in ours] == ["csq16", "hash64"]
    csq = ours[0]
    assert csq[1] == "CSQ (plain hash layer)" and csq[7] == 16 and csq[6] == "image"
    assert np.allclose(csq[8], (0.55, np.std([0.5, 0.6], ddof=1)))
    assert np.allclose(csq[9], (0.45, np.std([0.4, 0.5], ddof=1)))
    assert isinstance(csq[8], report.MeanStd) and ours[1][8] == "-"
    published = {f"{v:.3f}" for a in literature.RETRIEVAL for v in a["values"].values()}
    for r in ours:  # no published number in a row of ours
        assert not any(str(c).startswith(tuple(published)) for c in r[8:10])
    pub = [r for r in rows if r[0] == "published"]
    assert len(pub) == sum(len(a["values"]) for a in literature.RETRIEVAL)
    assert all(r[-1] and "rule" in r[-1] and r[5] == "yes" for r in pub)  # source, fine-tuned


def test_write_leaves_the_hashing_table(tmp_path):
    ret = {"fold0": {"mAP@1000": 0.5, "mAP@all": 0.4}}
    runs = [_run(tmp_path, "dpsh64", {"bits": 64, "head": "hashlayer", "hash_loss": "dpsh"}, ret)]
    sections = []
    args = SimpleNamespace(test_dir="eval_test", bootstrap=0, seed=0)
    methods.write(tmp_path, runs, args, sections)
    assert [s["title"] for s in sections] == ["Methods: hashing"]  # no classification run
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / f"hashing.{ext}").is_file()
    assert "DPSH (plain hash layer)" in (tmp_path / "hashing.md").read_text()


def test_bits_sweep_leaves_out_the_literature_methods():
    from report import sections

    ours = {"fusion": "hadamard", "code_classifier": "learned", "model_args": {"bits": 16}}
    csq = dict(ours, model_args={"bits": 16, "head": "hashlayer", "hash_loss": "csq"})
    image = dict(ours, inputs="image")
    assert sections.recipe(ours) == sections.recipe(dict(ours, model_args={"bits": 64}))
    assert len({sections.recipe(c) for c in (ours, csq, image)}) == 3


def test_methods_table_keeps_one_hash_head_per_input(tmp_path):
    def run(name, bits, inputs="both"):
        cfg = {"model_args": {"bits": bits}, "inputs": inputs}
        d = tmp_path / name
        d.mkdir()
        return {
            "config": cfg,
            "dir": str(d),
            "label": name,
            "heads": {"mlp": {0: {"mAP_macro": 0.5}}},
        }

    runs = [run("hash64", 64), run("bits16", 16), run("hash16_image", 16, "image")]
    runs += [run("hash64_image", 64, "image"), run("bits0", 0)]
    args = SimpleNamespace(test_dir="eval_test", bootstrap=0, seed=0)
    rows, ref = methods.methods_rows(runs, args)
    assert [r[1] for r in rows] == ["hash64", "hash64_image", "bits0"] and ref is None

"""`python -m bench --quick` end to end: every section runs the product's functions and writes
finite figures to bench.json (the fold section: a whole train.py child process, whose phases add
up); the references agree with the product where they compute the same thing; bad flags are
one-line errors; bench.learning's rank-cut probe.

Performance targets are not asserted (timings on a shared CPU are noisy); the full run reports them.
"""

import json
import math
import os

import pytest
import torch

from bench import bench


def numbers(obj, path="bench"):
    """Yield (path, value) for every number in a nested dict / list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # one thread: on a shared CPU multi-threaded small ops stall; main() sets it process-wide, so
    # restore it
    args = bench.get_args_parser().parse_args(
        ["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )
    threads = torch.get_num_threads()
    try:
        returned = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    return returned, json.loads(out.read_text())


def test_every_section_writes_finite_figures(quick, capsys):
    returned, res = quick
    assert set(bench.SECTIONS) <= set(res), f"missing sections: {set(bench.SECTIONS) - set(res)}"
    figures = list(numbers(res))
    assert not [(p, v) for p, v in figures if not math.isfinite(v)], "non-finite figures"
    for sec in bench.SECTIONS:  # each section holds real measurements, not an empty dict
        mine = [(p, v) for p, v in figures if p.startswith(f"bench.{sec}.")]
        assert len(mine) >= 4, sec
        assert all(v > 0 for p, v in mine if p.endswith("_s") or p.endswith("_per_s")), sec
    assert (
        res["metrics"]["values"] == returned["metrics"]["values"]
    )  # what it measured is what it wrote
    assert len(res["targets"]) == len(bench.TARGETS) and all(
        isinstance(t["pass"], bool) for t in res["targets"]
    )
    assert res["meta"]["command"].startswith("python -m bench")


def test_fold_is_a_whole_train_py_run(quick):
    fold = quick[1]["fold"]
    phases = ("load_s", "epoch_s", "val_s", "knn_s")
    assert all(math.isfinite(fold[k]) and fold[k] >= 0 for k in phases + ("wall_s",))
    assert fold["wall_s"] >= sum(fold[k] for k in phases)  # the child's wall time holds them all
    assert fold["rest_s"] == pytest.approx(fold["wall_s"] - sum(fold[k] for k in phases))
    assert fold["epoch_s"] > 0 and fold["naive_epoch_s"] > 0 and fold["over_naive"] > 0
    assert fold["scoring"] == "each_mean" and fold["n_val"] == 200  # train.py's defaults, --quick
    assert fold["n_train"] > fold["n_val"]


def test_references_agree_with_the_product(quick):
    res = quick[1]
    assert res["metrics"]["max_abs_diff"] < 1e-6  # compute_all == scikit-learn
    assert (
        res["knn"]["real_diff"] < 1e-5 and res["knn"]["sign_diff"] < 1e-5
    )  # knn_scores == full matrix + argsort
    assert (
        res["retrieval"]["k5000_diff"] < 1e-9 and res["retrieval"]["all_diff"] < 1e-9
    )  # == CalcTopMap
    assert 0 <= res["splits"]["stratified_mean_rel_dev"] < res["splits"]["kfold_mean_rel_dev"]
    assert res["epoch"]["rows"] == 1024 and res["encoder"]["pass_ratio"] == pytest.approx(
        5 * 20 * 94_630 / 123_287
    )


def test_memory_and_decode_measure_child_processes(quick):
    mem, dec = quick[1]["memory"], quick[1]["decode"]
    assert (
        mem["peak0_mb"] >= mem["imports_mb"] > 100
    )  # a train.py process holds at least torch's imports
    assert mem["cache1_mb"] > mem["cache0_mb"] > 0 and mem["n1"] == 2 * mem["n0"]
    assert dec["file_kb"] > 50 and dec["decode_ms"] > 0 and dec["preprocess_ms"] > 0
    assert dec["workers_for_2000"] >= 1


def test_bad_flags_are_one_line_errors(capsys):
    for argv in (
        ["--sections", "nope"],
        ["--sections", str(len(bench.SECTIONS) + 1)],
        ["--device", "tpu"],
        ["--threads", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            bench.get_args_parser().parse_args(argv)
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1, argv
    assert bench.get_args_parser().parse_args(["--sections", "knn,2,knn"]).sections == [
        "knn",
        "epoch",
    ]
    with pytest.raises(SystemExit) as e:  # the GPU record without --device cuda
        bench.main(bench.get_args_parser().parse_args(["--gpu_check", "--device", "cpu"]))
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_rank_cut_probe_is_the_probe_at_full_rank(tmp_path, monkeypatch):
    """bench.learning's rank-64 reference rebuilds the probe from its weights: uncut, it is the
    probe itself."""
    from bench import learning

    feats, _ = learning.write_data(str(tmp_path), 3000, 0, [500])
    splits = str(tmp_path / "splits_500.json")
    cut = learning.probe(feats, splits, "each", 1)
    monkeypatch.setattr(learning, "RANK", 80)
    full = learning.probe(feats, splits, "mean", 1)
    assert full["low_rank"]["mAP_macro"] == pytest.approx(full["mAP_macro"], abs=1e-9)
    assert full["low_rank"]["f1_micro"] == pytest.approx(full["f1_micro"], abs=1e-9)
    sv = cut["singular_values"]
    assert sv == sorted(sv, reverse=True) and len(sv) <= 80 and cut["rank"] == 64
    assert cut["low_rank"]["mAP_macro"] != cut["mAP_macro"]


@pytest.mark.skipif(
    not os.environ.get("BENCH_LEARNING"),
    reason="set BENCH_LEARNING=1 to run python -m bench.learning "
    "--quick (~30 s: a planted cache, four probes, four train.py runs)",
)
def test_bench_learning_quick(tmp_path):
    from bench import learning

    args = learning.get_args_parser().parse_args(
        [
            "--quick",
            "--threads",
            "1",
            "--runs",
            "bits64,bits0",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "l.json"),
        ]
    )
    res = learning.main(args)
    assert [r["size"] for r in res["rows"]] == [500, 1000] and res["n_val"] == 500  # 3,000 // 6
    for row in res["rows"]:
        for key in (
            "probe_each",
            "probe_each_rank64",
            "probe_mean",
            "probe_mean_rank64",
            "bits64",
            "bits64_knn",
            "bits0",
        ):
            assert 0 < row[key] <= 1, (row["size"], key)
        assert row["bits64_n_train"] == row["size"] and row["bits64_epoch"] in (1, 2)
        assert set(row["targets"]) == {"bits64", "bits0"}
        gap = row["targets"]["bits64"]["gap"]
        assert gap == pytest.approx(row["probe_mean"] - row["bits64"])
    work = (
        tmp_path / "work" / "quick_seed0"
    )  # one folder per setting: a full run never reuses quick work
    assert json.load(open(work / "1000" / "probe_each.json"))["rank"] == 64
    assert learning.main(args)["rows"] == res["rows"]  # a rerun reuses the work


def test_backbones_quick_measures_every_family(tmp_path, capsys):
    """python -m bench.backbones --quick: tiny towers of each family through the product's
    encode_pixels / encode_tokens (NaFlex: patches, mask and shapes); every figure finite and
    positive, each family at its own text length; an unknown model is a one-line error."""
    from bench import backbones

    out = tmp_path / "b.json"
    args = ["--quick", "--batch", "2", "--repeats", "1", "--out", str(out)]
    res = backbones.main(backbones.get_args_parser().parse_args(args))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert {res[n]["family"] for n in backbones.MODELS} == {"clip", "siglip", "siglip2"}
    for name, (family, *_rest) in backbones.MODELS.items():
        r = res[name]
        assert r["family"] == family and r["dim"] == 32, name
        assert r["text_length"] == (77 if family == "clip" else 64), name
        for k in ("images_per_s", "texts_per_s", "coco_hours", "cache_gb", "params_m"):
            assert math.isfinite(r[k]) and r[k] > 0, (name, k)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        backbones.main(backbones.get_args_parser().parse_args(["--only", "vit_h"]))
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1

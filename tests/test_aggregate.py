"""aggregate.py: CV tables (mean, std ddof=1), named missing / unfinished folds, run comparisons
with paired tests across folds and a paired bootstrap on the test predictions, refusal of runs with
other splits, and one-line exit-2 errors.

    python -m pytest -q tests/test_aggregate.py

make_run / write_eval / fake_probs also serve test_study's fake run_cv.sh, a subprocess per run:
scipy.stats (a second at import) is imported only in the tests that use it.
"""

import csv
import json

import numpy as np
import pytest
import torch

import aggregate
import data
import metrics


def run(*argv):
    return aggregate.main(aggregate.get_args_parser().parse_args([str(a) for a in argv]))


def make_run(
    root,
    values,
    sha="a" * 64,
    finished=True,
    splits=None,
    test_probs=None,
    knn=None,
    bits=64,
    evaluate=None,
):
    """A run folder as train.py leaves it: fold<k>/config.json + val_metrics.json (+ last.pt,
    log.jsonl). values[k] is fold k's mAP_macro; the other metrics are derived from it so every
    column differs. knn[k]: fold k's KNN mAP_macro (the "knn" block of val_metrics.json).
    evaluate: (labels, member probs [M, N, C], member knn probs or None) -> eval_test/metrics.json
    + test_predictions.npz as evaluate.py writes them."""
    for k, v in enumerate(values):
        d = root / f"fold{k}"
        d.mkdir(parents=True)
        done = finished if isinstance(finished, bool) else k not in finished
        data.save_json(
            d / "config.json",
            {
                "fold": k,
                "splits_sha256": sha,
                "finished": done,
                "baseline": "none",
                "fusion": "hadamard",
                "code_classifier": "learned",
                "model_args": {"bits": bits},
                "splits": str(splits) if splits else None,
            },
        )
        torch.save({"finished": done, "config": {"fold": k}}, d / "last.pt")
        vm = {m: v + 0.01 * i for i, m in enumerate(metrics.METRIC_NAMES)}
        if knn is not None:
            vm["knn"] = {m: knn[k] + 0.01 * i for i, m in enumerate(metrics.METRIC_NAMES)}
        data.save_json(
            d / "val_metrics.json", dict(vm, epoch=k + 3, n_images=100, skipped_ap_classes=0)
        )
        data.save_text(
            d / "log.jsonl",
            "".join(
                json.dumps({"epoch": e, "loss": 1 / e, "val_mAP_macro": v * e / 4}) + "\n"
                for e in range(1, 5)
            ),
        )
    if test_probs is not None:
        labels, probs = test_probs
        (root / "eval_test").mkdir()
        np.savez(
            root / "eval_test" / "test_predictions.npz",
            ids=np.arange(len(labels)),
            labels=labels,
            probs=probs,
        )
    if evaluate is not None:
        write_eval(root / "eval_test", *evaluate)
    return root


def write_eval(out, labels, member_probs, member_knn=None):
    """evaluate.py --ensemble --head both|mlp output: metrics.json (models, ensemble) +
    test_predictions.npz."""
    members = [f"fold{k}" for k in range(len(member_probs))]
    heads = (
        {"mlp": member_probs} if member_knn is None else {"mlp": member_probs, "knn": member_knn}
    )
    summ = {
        "heads": list(heads),
        "models": {
            n: {h: metrics.compute_all(labels, p[i]) for h, p in heads.items()}
            for i, n in enumerate(members)
        },
        "ensemble": {h: metrics.compute_all(labels, p.mean(0)) for h, p in heads.items()},
    }
    arrays = dict(
        ids=np.arange(len(labels)),
        labels=labels,
        probs=member_probs.mean(0),
        members=np.array(members),
        member_probs=member_probs,
        thresholds=np.full(labels.shape[1], 0.5),
    )
    if member_knn is not None:
        arrays.update(knn_probs=member_knn.mean(0), member_knn_probs=member_knn)
    out.mkdir(parents=True, exist_ok=True)
    data.save_json(out / "metrics.json", summ)
    np.savez(out / "test_predictions.npz", **arrays)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_one_run_table(tmp_path, capsys):
    vals = [0.61, 0.64, 0.66, 0.60, 0.65]
    run(make_run(tmp_path / "r", vals))
    rows = read_csv(tmp_path / "r" / "cv_results.csv")
    assert [r["fold"] for r in rows] == [
        "fold_0",
        "fold_1",
        "fold_2",
        "fold_3",
        "fold_4",
        "mean",
        "std",
    ]
    assert list(rows[0])[1:] == [*metrics.METRIC_NAMES, "best_epoch"]
    assert float(rows[5]["mAP_macro"]) == pytest.approx(np.mean(vals), abs=1e-12)
    assert float(rows[6]["mAP_macro"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    assert float(rows[6]["mae"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    assert [r["best_epoch"] for r in rows[:5]] == ["3", "4", "5", "6", "7"] and float(
        rows[5]["best_epoch"]
    ) == 5
    md = (tmp_path / "r" / "cv_results.md").read_text()
    assert f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" in md and "5 of 5 folds" in md
    assert f"{np.mean(vals):.4f} ± " in capsys.readouterr().out


def test_fold_count_from_splits_file(tmp_path, capsys):
    splits = tmp_path / "splits.json"
    data.save_json(splits, {"folds": 3})
    r = make_run(tmp_path / "r", [0.5, 0.6], splits=splits)  # 2 of the splits' 3 folds exist
    with pytest.raises(SystemExit) as e:
        run(r)
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and "fold2 missing" in err
        and err.startswith("error: ")
        and err.count("\n") == 1
    )


def test_missing_and_unfinished_folds_are_named(tmp_path, capsys):
    r = make_run(tmp_path / "r", [0.5, 0.6, 0.7, 0.8, 0.9], finished={2})
    (r / "fold4" / "val_metrics.json").unlink()  # training died before the first validation
    with pytest.raises(SystemExit) as e:
        run(r, "--folds", 6)
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and "fold2 unfinished" in err
        and "fold4 unfinished" in err
        and "fold5 missing" in err
    )
    assert not (r / "cv_results.csv").exists()
    run(r, "--folds", 6, "--allow_partial")
    rows = read_csv(r / "cv_results.csv")
    assert [x["fold"] for x in rows] == ["fold_0", "fold_1", "fold_3", "mean", "std"]
    assert float(rows[3]["mAP_macro"]) == pytest.approx(np.mean([0.5, 0.6, 0.8]))
    md = (r / "cv_results.md").read_text()
    assert "3 of 6 folds" in md and "fold5 missing" in md and "fold2 unfinished" in md


def test_compare_runs_paired_tests(tmp_path, capsys):
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(0)
    labels = (rng.random((300, 80)) < 0.1).astype(np.uint8)
    labels[0] = 1  # every class has a positive
    pa = np.clip(0.3 * labels + rng.random(labels.shape) * 0.6, 0, 1).astype(np.float32)
    pb = np.clip(0.4 * labels + rng.random(labels.shape) * 0.6, 0, 1).astype(np.float32)
    a = make_run(tmp_path / "a", [0.60, 0.62, 0.61, 0.63, 0.59], test_probs=(labels, pa))
    b = make_run(tmp_path / "b", [0.64, 0.63, 0.66, 0.65, 0.62], test_probs=(labels, pb))
    c = make_run(tmp_path / "c", [0.55, 0.60, 0.58, 0.59, 0.60])  # no test predictions
    run(a, b, c, "--bootstrap", 300, "--seed", 1)
    out = capsys.readouterr().out
    table = read_csv(tmp_path / "comparison.csv")
    assert [r["run"] for r in table] == [str(a), str(b), str(c)]
    assert float(table[1]["mAP_macro_mean"]) == pytest.approx(0.64) and table[1]["folds"] == "5"
    assert float(table[2]["mAP_macro_std"]) == pytest.approx(
        np.std([0.55, 0.60, 0.58, 0.59, 0.60], ddof=1)
    )
    tests = read_csv(tmp_path / "comparison_tests.csv")
    assert len(tests) == 2 * len(metrics.METRIC_NAMES)
    tb = next(t for t in tests if t["run"] == str(b) and t["metric"] == "mAP_macro")
    va, vb = [0.60, 0.62, 0.61, 0.63, 0.59], [0.64, 0.63, 0.66, 0.65, 0.62]
    assert float(tb["mean_diff"]) == pytest.approx(np.mean(np.subtract(vb, va)))
    assert float(tb["p_folds"]) == pytest.approx(ttest_rel(vb, va).pvalue, rel=1e-9)
    pb_ref = metrics.paired_bootstrap(labels, pa, pb, n_boot=300, seed=1, metric="mAP_macro")
    assert float(tb["test_diff"]) == pytest.approx(pb_ref["diff"]) and float(
        tb["p_test"]
    ) == pytest.approx(pb_ref["p"])
    assert (float(tb["test_low"]), float(tb["test_high"])) == pytest.approx(
        (pb_ref["low"], pb_ref["high"])
    )
    for t in tests:  # every test interval is BCa and holds its difference
        if t["test_diff"]:
            assert t["test_interval"] == "BCa"
            assert float(t["test_low"]) <= float(t["test_diff"]) <= float(t["test_high"])
    assert {t["metric"] for t in tests if t["run"] == str(b) and t["test_diff"]} == set(
        metrics.BOOT_METRICS
    )
    assert not any(t["test_diff"] for t in tests if t["run"] == str(c))  # named in a note instead
    assert "no paired test bootstrap" in out and str(c) in out
    md = (tmp_path / "comparison.md").read_text()
    assert "± " in md and "p (folds)" in md and "paired bootstrap" in md
    assert metrics.interval_text(300) in md  # the rule and its resamples, named
    for r in (a, b, c):  # each run's own CV table is written too
        assert (r / "cv_results.csv").is_file()


def test_compare_refuses_other_splits(tmp_path, capsys):
    a = make_run(tmp_path / "a", [0.6, 0.7], sha="a" * 64)
    b = make_run(tmp_path / "b", [0.6, 0.7], sha="b" * 64)
    with pytest.raises(SystemExit) as e:
        run(a, b)
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "splits" in err
    )
    assert not (tmp_path / "comparison.csv").exists()


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = make_run(tmp_path / "broken", [0.5, 0.6])
    (broken / "fold1" / "val_metrics.json").write_text("{not json")
    partial = make_run(tmp_path / "partial", [0.5, 0.6])
    (partial / "fold0" / "val_metrics.json").write_text(json.dumps({"mAP_macro": 0.5}))
    for argv in ([tmp_path / "nope"], [tmp_path / "empty"], [broken], [partial]):
        with pytest.raises(SystemExit) as e:
            run(*argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for argv in (["--folds", "1", "x"], ["--bootstrap", "-1", "x"], []):
        with pytest.raises(SystemExit) as e:
            aggregate.get_args_parser().parse_args(argv)
        assert e.value.code == 2


def fake_probs(rng, labels, m, gain):
    return np.clip(gain * labels + rng.random((m, *labels.shape)) * 0.6, 0, 1).astype(np.float32)


def test_both_heads_cv_and_paired_test(tmp_path):
    from scipy.stats import ttest_rel

    mlp, knn = [0.60, 0.62, 0.61, 0.63, 0.59], [0.58, 0.61, 0.57, 0.60, 0.58]
    r = make_run(tmp_path / "r", mlp, knn=knn)
    run(r)
    rows = {x["fold"]: x for x in read_csv(r / "cv_results.csv")}
    assert float(rows["knn_mean"]["mAP_macro"]) == pytest.approx(np.mean(knn))
    assert float(rows["knn_std"]["lrap"]) == pytest.approx(np.std(knn, ddof=1))
    assert float(rows["mean"]["mAP_macro"]) == pytest.approx(np.mean(mlp))
    md = (r / "cv_results.md").read_text()
    p = ttest_rel(knn, mlp).pvalue
    assert (
        "## KNN head" in md and f"{np.mean(np.subtract(knn, mlp)):+.4f}" in md and f"{p:.3g}" in md
    )

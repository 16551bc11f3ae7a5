"""run_cv.sh's folds (issue 20 item 3): GPUS="cpu cpu" trains two folds at once, each with its own
log, and their val_metrics.json / val_predictions.npz equal a sequential run's; a rerun skips them,
a fold without .done resumes, a failed fold is named with its log, and bad GPUS entries get one
line. On a small planted cache with no COCO under DATA_ROOT (run_cv.sh then uses FEATURES as it
is).

    python -m pytest -q tests/test_run_cv.py
"""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_fold_knn import planted_cache

SCRIPT = str(Path(__file__).resolve().parents[1] / "run_cv.sh")
FLAGS = [
    "--epochs",
    "2",
    "--bits",
    "16",
    "--mlp_dims",
    "32",
    "--batch_size",
    "16",
    "--num_threads",
    "1",
]


def run_cv(root, run, gpus=None, flags=FLAGS, demo=False, **env):
    feats, splits = root / "features.safetensors", root / "splits.json"
    env = {
        **os.environ,
        "DATA_ROOT": str(root / "no_coco"),
        "FEATURES": str(feats),
        "SPLITS": str(splits),
        "RUN": str(root / run),
        "FOLDS": "2",
        "OMP_NUM_THREADS": "1",
        "EVAL_ARGS": "--bootstrap 0 --device cpu",
        **env,
    }
    env.pop("GPUS", None)
    if gpus is not None:
        env["GPUS"] = gpus
    args = ["bash", SCRIPT, *(["--demo"] if demo else []), "--", *flags]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    planted_cache(root, n=200, dim=32, folds=2)
    return root


def test_parallel_folds_equal_sequential(cache):
    seq = run_cv(cache, "seq", flags=[*FLAGS, "--device", "cpu"])
    assert seq.returncode == 0, seq.stderr[-3000:]
    par = run_cv(cache, "par", gpus="cpu,cpu")
    assert par.returncode == 0, par.stderr[-3000:]
    out = par.stdout
    # both folds were started before either finished: they ran at the same time
    assert (
        out.index("fold 1: started on cpu") < out.index("fold 0 done")
        and "fold 0: started on cpu" in out
    )
    assert "in parallel on cpu cpu" in out and "== ensemble test" in out
    for k in (0, 1):
        a, b = cache / "seq" / f"fold{k}", cache / "par" / f"fold{k}"
        assert (b / ".done").is_file() and "done: best val mAP_macro" in (
            b / "train.log"
        ).read_text()
        assert not (a / "train.log").exists()  # sequential: output on the terminal, as before
        va, vb = (json.loads((d / "val_metrics.json").read_text()) for d in (a, b))
        assert "knn" in va and va == vb, k
        with np.load(a / "val_predictions.npz") as za, np.load(b / "val_predictions.npz") as zb:
            assert za.files == zb.files and all(np.array_equal(za[f], zb[f]) for f in za.files)
        assert (b / "config.json").read_text().count('"device": "cpu"') == 1

    # idempotent: a rerun trains nothing
    again = run_cv(cache, "par", gpus="cpu cpu")
    assert (
        again.returncode == 0
        and "fold 0: skipped" in again.stdout
        and "fold 1: skipped" in again.stdout
    )
    assert "started on" not in again.stdout and "ensemble test: skipped" in again.stdout

    # resumable: a fold without .done but with last.pt is rerun with --resume (it is finished:
    # nothing changes);
    # GPUS "0 cpu": a bare integer is cuda:0, and the one fold left to train goes to the first slot
    before = (cache / "par" / "fold1" / "val_metrics.json").read_text()
    (cache / "par" / "fold1" / ".done").unlink()
    res = run_cv(cache, "par", gpus="cpu 0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fold 0: skipped" in res.stdout and "in parallel on cpu cuda:0" in res.stdout
    assert "--resume" in res.stdout.split("fold 1: started on cpu")[1].splitlines()[0]
    assert "already finished" in (cache / "par" / "fold1" / "train.log").read_text()
    assert (cache / "par" / "fold1" / "val_metrics.json").read_text() == before


def test_failed_fold_is_named(cache):
    run = cache / "bad"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "last.pt").write_text("not a checkpoint")  # fold 0 fails, fold 1 trains
    r = run_cv(cache, "bad", gpus="cpu cpu")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-3000:]
    assert (
        "1 of 2 folds failed: fold 0 (exit 2, log " in errors[0]
        and f"{run}/fold0/train.log" in errors[0]
    )
    assert "unreadable checkpoint" in r.stderr  # the end of its log is shown
    assert (run / "fold1" / ".done").is_file() and not (run / "fold0" / ".done").exists()
    assert "== aggregate" not in r.stdout


@pytest.mark.parametrize(
    "gpus,flags,msg",
    [("0 x/y", FLAGS, "GPUS entry 'x/y'"), ("cpu", [*FLAGS, "--device", "cpu"], "drop --device")],
)
def test_bad_gpus_one_line(cache, gpus, flags, msg):
    r = run_cv(cache, "never", gpus=gpus, flags=flags)
    assert (
        r.returncode == 2
        and r.stderr.startswith("error: run_cv.sh: ")
        and r.stderr.count("\n") == 1
    )
    assert msg in r.stderr and not (cache / "never").exists()


def test_demo_flags_once_and_tables_once(cache, tmp_path):
    """--demo: a flag after -- replaces the demo's value, so each fold's command line names every
    flag once; the CV tables are printed once (aggregate's output goes to its log); SUMMARY=0
    (study.py) ends with the result paths instead."""
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text("{}")  # no demo data to generate
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # nor a demo model: the cache is made
    env = dict(DATA_ROOT=str(tmp_path / "coco"), MODEL=str(tmp_path / "model"))
    flags = ["--epochs", "1", "--bits", "16", "--mlp_dims", "32", "--batch_size", "8"]
    env["EVAL_ARGS"] = "--bootstrap 200 --device cpu"  # intervals, checked below
    r = run_cv(cache, "demo", flags=flags, demo=True, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [ln for ln in r.stdout.splitlines() if ln.startswith(("  train.py", "== fold "))]
    cmds = [ln for ln in cmds if "--" in ln]  # the settings line and each fold's command
    assert len(cmds) == 3 and "--lr 3e-3" in cmds[0]  # a demo value no flag replaced stays
    for ln in cmds:
        words = [w for w in ln.split() if w.startswith("--")]
        assert len(words) == len(set(words)), ln
        assert "--epochs 1" in ln and "--batch_size 8" in ln and "--epochs 30" not in ln
    assert r.stdout.count("## MLP head") == 2  # cv_results.md once, eval metrics.md once
    assert "== aggregate done" in r.stdout and (cache / "demo" / "aggregate.log").is_file()
    # every interval the run writes holds its estimate, under the rule metrics.json names
    ci = json.loads((cache / "demo" / "eval_test" / "metrics.json").read_text())["bootstrap_ci"]
    assert ci["interval"]["method"] == "BCa" and ci["interval"]["resamples"] == ci["n_boot"]
    for name, c in ((k, v) for k, v in ci.items() if isinstance(v, dict) and "value" in v):
        assert c["low"] <= c["value"] <= c["high"], (name, c)
    cells = re.findall(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]", r.stdout)
    for path in (cache / "demo").rglob("*.md"):
        cells += re.findall(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]", path.read_text())
    assert cells and all(float(lo) <= float(x) <= float(hi) for x, lo, hi in cells), cells
    again = run_cv(cache, "demo", flags=flags, demo=True, SUMMARY="0", **env)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("eval_test/metrics.md")
    assert "## MLP head" not in again.stdout

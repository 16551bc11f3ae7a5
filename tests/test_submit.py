"""submit.py through submitit's local executor (real job processes, the code path Slurm runs): the
demo pipeline (extraction job, 3 folds as one array, test + aggregate) equals `bash run_cv.sh
--demo`, a rerun submits nothing, and the checkpoint hook stops a fold and requeues it with
--resume to the same result.

    python -m pytest -q tests/test_submit.py
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import features
import preempt
from test_train import _write_cache, argv_of

submitit = pytest.importorskip("submitit")  # requirements-cluster.txt (in requirements-dev.txt)
import submit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_env(tmp, coco, tiny, run, feats):
    return dict(
        os.environ,
        DATA_ROOT=str(coco),
        MODEL=str(tiny),
        RUN=str(tmp / run),
        FEATURES=str(tmp / feats),
        FOLDS="3",
        EVAL_ARGS="--bootstrap 0 --device cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )


def _metrics(path):
    """A results JSON without what names the run's own folder."""
    d = json.loads(Path(path).read_text())
    return {k: v for k, v in d.items() if k not in ("checkpoints", "features")}


def test_demo_pipeline_equals_run_cv(synthetic_coco, tiny_siglip, tmp_path):
    train = ["--", "--epochs", "2"]
    plain = _pipeline_env(tmp_path, synthetic_coco, tiny_siglip, "plain", "fa.safetensors")
    env = _pipeline_env(tmp_path, synthetic_coco, tiny_siglip, "sub", "fb.safetensors")
    # the splits first (both pipelines read them), then the two pipelines at the same time
    split = dict(plain, SPLITS=str(tmp_path / "splits.json"))
    plain["SPLITS"] = env["SPLITS"] = split["SPLITS"]
    subprocess.run(
        [sys.executable, "make_splits.py", "--data_root", str(synthetic_coco), "--folds", "3",
         "--seed", "42", "--out", split["SPLITS"]],
        cwd=ROOT, env=split, check=True, capture_output=True,
    )  # fmt: skip
    cmd = [sys.executable, "submit.py", "--cluster", "local", "--gpus_per_node", "0"]
    cmd += ["--folder", str(tmp_path / "logs"), "--", "--demo", *train]
    logs = [open(tmp_path / name, "w+") for name in ("plain.log", "sub.log")]
    ref = subprocess.Popen(["bash", "run_cv.sh", "--demo", *train], env=plain, cwd=ROOT,
                           stdout=logs[0], stderr=subprocess.STDOUT)  # fmt: skip
    sub = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs[1], stderr=subprocess.STDOUT)
    codes = [ref.wait(300), sub.wait(300)]
    texts = [(f.seek(0), f.read(), f.close())[1] for f in logs]
    assert codes == [0, 0], (texts[0][-2000:], texts[1][-2000:])
    out = texts[1]
    assert "submitted features: job" in out and "submitted fold 0, fold 1, fold 2: jobs" in out
    assert "submitted ensemble test + aggregate" in out
    a, b = tmp_path / "plain", tmp_path / "sub"
    ta, ma = features.load_features(tmp_path / "fa.safetensors")
    tb, mb = features.load_features(tmp_path / "fb.safetensors")
    assert ma == mb and all(torch.equal(ta[k], tb[k]) for k in ta)
    for k in range(3):
        assert (b / f"fold{k}" / ".done").is_file()
        va, vb = (d / f"fold{k}" / "val_metrics.json" for d in (a, b))
        assert va.read_text() == vb.read_text()
    assert _metrics(a / "eval_test" / "metrics.json") == _metrics(b / "eval_test" / "metrics.json")
    assert (a / "cv_results.csv").read_text() == (b / "cv_results.csv").read_text()
    jobs = len(os.listdir(tmp_path / "logs"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing to submit: every step is done" in r.stdout, r.stderr
    assert "up to date" in r.stdout and len(os.listdir(tmp_path / "logs")) == jobs


def test_checkpoint_hook_requeues_with_resume(tmp_path):
    feats, splits = _write_cache(tmp_path)
    flags = ("--epochs", 12, "--patience", 0)
    ref = tmp_path / "ref"
    import train  # the uninterrupted run, in this process

    train.main(train.get_args_parser().parse_args(argv_of(feats, splits, ref, *flags)))
    out = tmp_path / "fold0"
    step = submit.Step(
        "fold 0", [[sys.executable, "train.py", *argv_of(feats, splits, out, *flags)]]
    )
    err = []

    def job():  # the job's main thread; checkpoint() below plays submitit's signal handler
        try:
            step()
        except RuntimeError as e:
            err.append(str(e))

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 60
    while not (out / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    again = step.checkpoint()
    t.join(60)
    assert err and f"preempted (exit {preempt.REQUEUE_EXIT})" in err[0]
    assert 0 < torch.load(out / "last.pt", weights_only=True)["epoch"] < 12
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.argvs[0][-1] == "--resume"
    assert again.function() == "fold 0"  # the requeued job, to the end
    assert (out / ".done").is_file()
    assert (out / "val_metrics.json").read_text() == (ref / "val_metrics.json").read_text()


def test_refusals_in_one_line(capsys):
    for argv, msg in (
        (["--cluster", "local", "--", "--study"], "--study is not submitted as one pipeline"),
        (["--cluster", "local", "--", "--nope"], "run_cv.sh's plan stopped: run_cv.sh: unknown"),
    ):
        with pytest.raises(SystemExit) as e:
            submit.main(submit.parse(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err
    args = submit.parse(["--time", "30", "--", "--demo", "--", "--bits", "32"])
    assert args.time == 30 and args.run_cv_args == ["--demo", "--", "--bits", "32"]

"""One run per output (locks.py) and preemption (preempt.py) in train.py and extract_features.py:
two runs on one folder / one cache (one exits 2 naming the holder, the other finishes untouched),
stale locks taken over, SIGTERM mid-epoch / mid-shard then a rerun equals an uninterrupted run.

    python -m pytest -q tests/test_cluster.py
"""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import encoders
import extract_features
import features
import locks
import model
import preempt
import train
from test_train import _timeless, _write_cache, argv_of

ROOT = Path(__file__).resolve().parents[1]
FORK = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
)
pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS = ("--epochs", 4, "--patience", 0)


# ---------------------------------------------------------------------------- locks.py


def test_lock_refuses_a_live_holder_and_releases(tmp_path):
    path = str(tmp_path / "run" / ".lock")
    rec = locks.acquire(path, "train.py")
    assert rec["pid"] == os.getpid() and json.loads(Path(path).read_text()) == rec
    with pytest.raises(data.DataError) as e:
        locks.acquire(path, "another")
    msg = str(e.value)
    assert f"locked by train.py (host {socket.gethostname()}, pid {os.getpid()}" in msg
    assert "\n" not in msg
    locks.release(path, pid=os.getpid() + 1)  # not the holder: left alone
    assert os.path.exists(path)
    locks.release(path)
    assert not os.path.exists(path)
    with locks.hold(path, "x"):
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_stale_locks_taken_over_others_refused(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / ".lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    host = socket.gethostname()
    Path(path).write_text(json.dumps(dict(host=host, pid=dead.pid, what="train.py")))
    assert locks.acquire(path, "new")["what"] == "new"
    assert f"taking over the stale lock of train.py (host {host}, pid {dead.pid}" in (
        capsys.readouterr().err
    )
    # a live process elsewhere cannot be checked from here: refused
    Path(path).write_text(json.dumps(dict(host="node-7", pid=dead.pid, what="train.py", job="9")))
    with pytest.raises(data.DataError, match="node-7, pid .*Slurm job 9"):
        locks.acquire(path, "new")
    # ... unless it is this Slurm job's earlier run (requeued: the restart count went up)
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    with pytest.raises(data.DataError):  # the same run of job 9 (restart 0): a live holder
        locks.acquire(path, "new")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert locks.acquire(path, "new")["restart"] == 1
    # the shell's CLI: run_cv.sh holds a lock for its own pid
    locks.release(path)
    locks.main(["acquire", path, "--pid", str(os.getpid()), "--what", "run_cv.sh"])
    with pytest.raises(SystemExit) as e:
        locks.main(["acquire", path])
    assert e.value.code == 2 and "locked by run_cv.sh" in capsys.readouterr().err
    locks.main(["release", path, "--pid", str(os.getpid())])
    assert not os.path.exists(path)


# ---------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _write_cache(tmp_path_factory.mktemp("cache"))


def _train(feats, splits, out, *extra):
    train.main(train.get_args_parser().parse_args(argv_of(feats, splits, out, *extra)))


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _train(*cache, out, *EPOCHS)
    return out


def _child(target, log, *args):
    """Forked child body: output into `log`, then target(*args); exit code as a script's."""
    sys.stdout = sys.stderr = open(log, "w", buffering=1)  # pytest's capture is not ours
    try:
        target(*args)
    except SystemExit as e:
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    sys.stdout.flush()
    os._exit(0)


def _race(target, argvs, lock, logs):
    """The first child, then the second once the first holds `lock` -> (exit codes, first pid)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(target, str(logs[0]), *argvs[0]))]
    procs[0].start()
    deadline = time.time() + 60
    while not os.path.exists(lock) and procs[0].is_alive() and time.time() < deadline:
        time.sleep(0.005)
    procs.append(ctx.Process(target=_child, args=(target, str(logs[1]), *argvs[1])))
    procs[1].start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs], procs[0].pid


@FORK
def test_two_trainings_on_one_folder(cache, reference, tmp_path):
    out = tmp_path / "fold0"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    argvs = [(*cache, out, *EPOCHS), (*cache, out, *EPOCHS, "--bits", 8)]
    codes, pid = _race(_train, argvs, str(out / locks.LOCK_NAME), logs)
    second = logs[1].read_text()
    assert codes == [0, 2], (logs[0].read_text()[-2000:], second)
    assert second.count("\n") == 1 and f"pid {pid}" in second and "locked by train.py" in second
    # the first run's files, whole: the same as the run alone, and the lock is gone
    assert (out / "val_metrics.json").read_text() == (reference / "val_metrics.json").read_text()
    assert json.loads((out / "config.json").read_text())["bits"] == 16
    assert not (out / locks.LOCK_NAME).exists()


def test_sigterm_mid_epoch_then_resume_is_bit_identical(cache, reference, tmp_path, monkeypatch):
    out = tmp_path / "fold0"
    real, calls = model.head_loss, {"n": 0}

    def loss_then_signal(*a, **k):  # SIGTERM from outside, in the middle of epoch 3
        calls["n"] += 1
        if calls["n"] == 27:  # 11 micro-batches per epoch here
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(model, "head_loss", loss_then_signal)
    with pytest.raises(SystemExit) as e:
        _train(*cache, out, *EPOCHS)
    assert e.value.code == preempt.REQUEUE_EXIT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and not last["finished"] and not (out / locks.LOCK_NAME).exists()
    monkeypatch.setattr(model, "head_loss", real)
    _train(*cache, out, *EPOCHS, "--resume")  # the requeued job
    assert (out / "val_metrics.json").read_text() == (reference / "val_metrics.json").read_text()
    a = torch.load(out / "best.pt", weights_only=True)["model"]
    b = torch.load(reference / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _timeless(out / "log.jsonl") == _timeless(reference / "log.jsonl")


# ---------------------------------------------------------------------------- extract_features.py


def _extract_args(coco, tiny, out, *extra):
    args = ["--data_root", coco, "--model", tiny, "--out", out, "--device", "cpu"]
    args += ["--num_workers", 0, "--batch_size", 8, "--shard_size", 16, *extra]
    return extract_features.get_args_parser().parse_args([str(a) for a in args])


@pytest.fixture(scope="module")
def clean(synthetic_coco, tiny_siglip, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "f.safetensors"
    extract_features.main(_extract_args(synthetic_coco, tiny_siglip, out))
    return features.load_features(out)


def _assert_same(path, clean):
    t, meta = features.load_features(path)
    assert t.keys() == clean[0].keys() and all(torch.equal(t[k], clean[0][k]) for k in t)
    assert meta == clean[1]


def _slow_extract(args):
    write = extract_features.write_shard

    def slow(*a, **k):  # in the forked child only: the run lasts while the second one tries
        write(*a, **k)
        time.sleep(0.3)

    extract_features.write_shard = slow
    extract_features.main(args)


@FORK
def test_two_extractions_onto_one_cache(synthetic_coco, tiny_siglip, clean, tmp_path):
    out = tmp_path / "f.safetensors"
    args = _extract_args(synthetic_coco, tiny_siglip, out)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    codes, pid = _race(_slow_extract, [(args,), (args,)], str(out) + ".lock", logs)
    second = logs[1].read_text()
    assert codes == [0, 2], (logs[0].read_text()[-2000:], second)
    assert second.count("\n") == 1 and f"pid {pid}" in second
    assert "locked by extract_features.py" in second
    _assert_same(out, clean)
    assert not os.path.exists(str(out) + ".lock")


def test_sigterm_mid_shard_loses_only_that_shard(
    synthetic_coco, tiny_siglip, clean, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "f.safetensors"
    parts = str(out) + ".parts"
    real, calls = encoders.SiglipEncoder.encode_pixels, {"n": 0}

    def encode_then_signal(self, *a, **k):  # batch 5 = the first half of shard 2 (2 per shard)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(encoders.SiglipEncoder, "encode_pixels", encode_then_signal)
    with pytest.raises(SystemExit) as e:
        extract_features.main(_extract_args(synthetic_coco, tiny_siglip, out))
    assert e.value.code == preempt.REQUEUE_EXIT and "preempted: SIGTERM" in capsys.readouterr().out
    assert sorted(os.listdir(parts)) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not out.exists() and not os.path.exists(str(out) + ".lock")
    monkeypatch.setattr(encoders.SiglipEncoder, "encode_pixels", real)
    extract_features.main(_extract_args(synthetic_coco, tiny_siglip, out))
    assert "resuming: 2 of 4 shards" in capsys.readouterr().out
    _assert_same(out, clean)


# ------------------------------------------------------------------------ run_cv.sh, evaluate.py


def test_run_cv_and_evaluate_refuse_a_locked_folder(tmp_path, capsys):
    import evaluate

    run = tmp_path / "run"
    with locks.hold(str(run / locks.LOCK_NAME), "run_cv.sh"):  # this process: a live holder
        env = dict(os.environ, RUN=str(run), DATA_ROOT=str(tmp_path / "none"))
        r = subprocess.run(["bash", "run_cv.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and f"locked by run_cv.sh (host {socket.gethostname()}" in r.stderr
        assert r.stderr.count("\n") == 1 and "settings" not in r.stdout  # stopped before any step
    assert not run.exists()  # released, and the folder made for the lock removed
    out = tmp_path / "eval"
    with locks.hold(str(out / locks.LOCK_NAME), "evaluate.py"):
        argv = ["--ensemble", str(tmp_path / "none"), "--out_dir", str(out)]
        with pytest.raises(SystemExit) as e:
            evaluate.main(evaluate.get_args_parser().parse_args(argv))
        assert e.value.code == 2 and "locked by evaluate.py" in capsys.readouterr().err


def test_preempt_flag_only_inside_catching():
    with preempt.catching():
        preempt.check("here")  # no signal yet
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        with pytest.raises(preempt.Preempted, match="SIGUSR1 received; stopped here"):
            preempt.check("here")
    assert preempt.requested() == "SIGUSR1"  # for the caller's message
    preempt.check("outside")  # a later loop run outside catching() is not stopped
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

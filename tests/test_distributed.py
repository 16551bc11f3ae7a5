"""extract_features.py under torchrun (2 CPU ranks, gloo) on the synthetic COCO with the tiny
random SigLIP.

    python -m pytest -q tests/test_distributed.py

Each torchrun start is slow on a 2-core box (three Python processes import torch; the ranks also
import transformers), so the tests are few and each checks a whole story.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import extract_features
import features

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS = 8  # 60 synthetic images / --shard_size 8: ranks 0 and 1 own shards 0,2,4,6 and 1,3,5,7

# Test-only wrapper run by torchrun instead of the script: extract_features.main() with write_shard
# wrapped so that rank HOOK_RANK, right after writing its first shard, dies (HOOK=die, exit 1 as a
# crash) or stalls (HOOK=stall).
HOOKED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import extract_features
    write = extract_features.write_shard

    def hooked(*a, **k):
        write(*a, **k)
        if os.environ["RANK"] == os.environ["HOOK_RANK"]:
            if os.environ["HOOK"] == "die":
                os._exit(1)
            time.sleep(600)

    extract_features.write_shard = hooked
    extract_features.main(extract_features.get_args_parser().parse_args())
""")


def base_args(coco, tiny, out, *extra):
    return [
        str(a)
        for a in (
            "--data_root",
            coco,
            "--model",
            tiny,
            "--out",
            out,
            "--device",
            "cpu",
            "--num_workers",
            0,
            "--batch_size",
            4,
            "--shard_size",
            8,
            *extra,
        )
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, argv, nproc=2, env=None, timeout=120):
    """sys.executable -m torch.distributed.run --nproc_per_node nproc script argv -> the
    CompletedProcess."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *argv,
    ]
    full_env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **(env or {}),
    )
    return subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain(synthetic_coco, tiny_siglip, tmp_path_factory):
    """A one-process run (no torchrun variables) -> (tensors, meta, wall seconds)."""
    out = tmp_path_factory.mktemp("plain") / "f.safetensors"
    t0 = time.time()
    subprocess.run(
        [sys.executable, "extract_features.py", *base_args(synthetic_coco, tiny_siglip, out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
        check=True,
        capture_output=True,
    )
    secs = time.time() - t0
    tensors, meta = features.load_features(out)
    return tensors, meta, secs


def assert_same_cache(path, plain):
    t, meta = features.load_features(path)
    ref, ref_meta, _ = plain
    assert t.keys() == ref.keys() and all(
        torch.equal(t[k], ref[k]) for k in ref
    )  # tensor for tensor
    assert meta == ref_meta


def test_plain_run_needs_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert extract_features.init_distributed("cpu", 5) == (0, 1, "cpu")
    assert not torch.distributed.is_initialized()


def test_torchrun_two_ranks_equals_one_process(plain, synthetic_coco, tiny_siglip, tmp_path):
    out = tmp_path / "f.safetensors"
    t0 = time.time()
    r = torchrun("extract_features.py", base_args(synthetic_coco, tiny_siglip, out))
    secs = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{N_SHARDS} shard(s) of 8, 4 to encode on rank 0 of 2" in r.stdout
    assert "rank 0: encoded 32 images" in r.stdout and "rank 1: encoded 28 images" in r.stdout
    assert r.stdout.count("wrote ") == 1 and not os.path.exists(
        str(out) + ".parts"
    )  # rank 0 merged alone
    assert_same_cache(out, plain)
    print(f"\nwall: torchrun 2 ranks {secs:.1f} s, one process {plain[2]:.1f} s")


def test_dead_rank_resumed_by_one_plain_process(
    plain, synthetic_coco, tiny_siglip, tmp_path, monkeypatch, capsys
):
    out, script = tmp_path / "f.safetensors", tmp_path / "hooked.py"
    script.write_text(HOOKED.format(root=str(ROOT)))
    parts = str(out) + ".parts"
    r = torchrun(
        script, base_args(synthetic_coco, tiny_siglip, out), env={"HOOK": "die", "HOOK_RANK": "1"}
    )
    assert r.returncode != 0 and not out.exists()  # rank 1 crashed; torchrun stopped rank 0 too
    shards = sorted(n for n in os.listdir(parts) if n.startswith("shard_") and ".tmp" not in n)
    have = {int(n[6:11]) for n in shards}
    assert 1 in have and not have & {3, 5, 7}  # rank 1 lost only what came after its first shard
    written = []
    write = extract_features.write_shard
    monkeypatch.setattr(
        extract_features, "write_shard", lambda p, *a, **k: (written.append(p), write(p, *a, **k))
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    extract_features.main(
        extract_features.get_args_parser().parse_args(base_args(synthetic_coco, tiny_siglip, out))
    )
    assert f"resuming: {len(have)} of {N_SHARDS} shards" in capsys.readouterr().out
    # only the missing shards were encoded; the finished ones were kept as they were
    assert sorted(int(os.path.basename(p)[6:11]) for p in written) == sorted(
        set(range(N_SHARDS)) - have
    )
    assert_same_cache(out, plain)


def test_stalled_peer_ends_in_one_line_error(synthetic_coco, tiny_siglip, tmp_path):
    out, script = tmp_path / "f.safetensors", tmp_path / "hooked.py"
    script.write_text(HOOKED.format(root=str(ROOT)))
    t0 = time.time()
    r = torchrun(
        script,
        base_args(synthetic_coco, tiny_siglip, out, "--dist_timeout", 3),
        env={"HOOK": "stall", "HOOK_RANK": "1"},
    )
    assert (
        r.returncode != 0 and time.time() - t0 < 60 and not out.exists()
    )  # no hang on a peer that never comes
    errors = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert (
        len(errors) == 1
        and "rank 0: a peer did not reach the barrier within --dist_timeout 3 s" in errors[0]
    )
    assert "rerun" in errors[0]


def test_two_nodes_equal_one_process(plain, synthetic_coco, tiny_siglip, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1: two "nodes" (two torchrun agents on this machine,
    static rendezvous on localhost) write the same cache as one plain process."""
    out, port = tmp_path / "f.safetensors", str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(k),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "extract_features.py",
                *base_args(synthetic_coco, tiny_siglip, out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for k in (0, 1)
    ]
    logs = [n.communicate(timeout=180)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "4 to encode on rank 0 of 2" in logs[0] and "rank 1: encoded 28 images" in logs[1]
    assert_same_cache(out, plain)

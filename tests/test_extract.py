"""extract_features.py on the synthetic COCO (conftest `synthetic_coco`) with the tiny random
SigLIP.

python -m pytest -q tests/test_extract.py
"""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoders
import extract_features
import features
import model
import images


def run(*argv):
    return extract_features.main(
        extract_features.get_args_parser().parse_args([str(a) for a in argv])
    )


def base_args(coco, tiny, out, *extra):
    return [
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
        8,
        "--shard_size",
        16,
        *extra,
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clean(synthetic_coco, tiny_siglip, tmp_path_factory):
    """One uninterrupted run over the whole synthetic COCO -> (path, tensors, meta)."""
    out = tmp_path_factory.mktemp("clean") / "features.safetensors"
    run(*base_args(synthetic_coco, tiny_siglip, out))
    tensors, meta = features.load_features(out)
    return out, tensors, meta


@pytest.fixture(scope="module")
def coco(synthetic_coco):
    return data.load_coco(synthetic_coco)


@pytest.fixture(scope="module")
def enc(tiny_siglip):
    return encoders.load_encoder(tiny_siglip)


def copy_coco(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_shapes_dtypes_metadata(clean, coco, tiny_siglip):
    out, t, meta = clean
    keep = np.array([s in ("train", "restval", "val", "test") for s in coco["splits"]])
    n = int(keep.sum())
    assert n > 0 and not os.path.exists(str(out) + ".parts")  # shards merged and removed
    assert t["ids"].tolist() == np.asarray(coco["ids"])[keep].tolist()
    assert t["image"].shape == (n, 1, 32) and t["image"].dtype == torch.float16
    assert t["text"].shape == (n, 5, 32) and t["text"].dtype == torch.float16
    assert t["n_captions"].tolist() == [min(len(c), 5) for c, k in zip(coco["captions"], keep) if k]
    assert torch.equal(
        t["labels"], torch.from_numpy(np.asarray(coco["labels"])[keep].astype(np.uint8))
    )
    assert t["prompts"].shape == (80, 32) and t["prompts"].dtype == torch.float16
    assert meta["model"] == tiny_siglip and meta["dim"] == "32" and meta["views"] == "1"
    assert (
        meta["max_captions"] == "5"
        and meta["image_size"] == "32"
        and meta["fingerprint"] == coco["fingerprint"]
    )
    assert float(meta["logit_scale"]) == pytest.approx(10.0) and float(
        meta["logit_bias"]
    ) == pytest.approx(-10.0)
    assert (
        json.loads(meta["categories"]) == coco["categories"]
        and json.loads(meta["bad_images"]) == []
    )
    import transformers

    assert meta["transformers_version"] == transformers.__version__


def test_cache_equals_encoder_and_zero_rows(clean, coco, enc):
    _, t, _ = clean
    row_of = {int(i): r for r, i in enumerate(np.asarray(coco["ids"]))}
    for j in range(0, len(t["ids"]), 7):
        r = row_of[int(t["ids"][j])]
        img = enc.encode_images([Image.open(coco["paths"][r]).convert("RGB")])  # (1, D)
        torch.testing.assert_close(
            t["image"][j, 0].float(), img[0].half().float(), rtol=2e-3, atol=2e-3
        )
        caps = coco["captions"][r][:5]
        nc = int(t["n_captions"][j])
        torch.testing.assert_close(
            t["text"][j, :nc].float(), enc.encode_texts(caps).half().float(), rtol=2e-3, atol=2e-3
        )
        assert bool((t["text"][j, nc:] == 0).all())
    names = [f"a photo of a {c['name']}." for c in coco["categories"]]
    torch.testing.assert_close(
        t["prompts"].float(), enc.encode_texts(names).half().float(), rtol=2e-3, atol=2e-3
    )


def test_hash_model_predict_equals_head_on_cache(clean, coco, enc):
    """The inference path (raw image + captions -> encoder -> head) agrees with the cache path."""
    _, t, _ = clean
    torch.manual_seed(0)
    head = model.HashHead(dim=32, mlp_dims=(16,), bits=16).eval()
    hm = model.HashModel(enc, head)
    row_of = {int(i): r for r, i in enumerate(np.asarray(coco["ids"]))}
    js = list(range(0, len(t["ids"]), 9))
    rows = [row_of[int(t["ids"][j])] for j in js]
    probs = hm.predict(
        [Image.open(coco["paths"][r]).convert("RGB") for r in rows],
        [coco["captions"][r][:5] for r in rows],
    )
    for p, j in zip(probs, js):
        nc = int(t["n_captions"][j])
        with torch.no_grad():
            logits = head(t["image"][j, 0].float().expand(nc, -1), t["text"][j, :nc].float()).logits
        torch.testing.assert_close(p, torch.sigmoid(logits).mean(0), rtol=1e-3, atol=1e-3)


def test_views_seeded_and_view0_plain(clean, coco, synthetic_coco, tiny_siglip, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(*base_args(synthetic_coco, tiny_siglip, a, "--views", 3, "--limit", 4, "--no_prompts"))
    run(
        *base_args(
            synthetic_coco,
            tiny_siglip,
            b,
            "--views",
            3,
            "--limit",
            4,
            "--no_prompts",
            "--num_workers",
            2,
        )
    )
    ta, ma = features.load_features(a)
    tb, _ = features.load_features(b)
    assert (
        ta["image"].shape[1] == 3
        and ma["views"] == "3"
        and ma["limit"] == "4"
        and "prompts" not in ta
    )
    ids, splits = np.asarray(coco["ids"]), np.asarray(coco["splits"])
    first = np.concatenate(
        [ids[splits != "test"][:4], ids[splits == "test"][:4]]
    )  # --limit: N dev + N test
    assert ta["ids"].tolist() == sorted(first.tolist())
    assert torch.equal(
        ta["image"], tb["image"]
    )  # seeded per image: reruns agree, in worker processes too
    assert not torch.equal(
        ta["image"][:, 0], ta["image"][:, 1]
    )  # augmented views differ from the plain one
    _, full, _ = clean
    pos = [full["ids"].tolist().index(i) for i in ta["ids"].tolist()]
    torch.testing.assert_close(ta["image"][:, 0], full["image"][pos, 0], rtol=2e-3, atol=2e-3)


def _stalled_main(argv):
    """Child process body: the script's main(), stalled forever once its first shard is written."""
    write = extract_features.write_shard

    def stall(*a, **k):
        write(*a, **k)
        time.sleep(600)

    extract_features.write_shard = stall  # in the child's (forked) memory only
    extract_features.main(extract_features.get_args_parser().parse_args(argv))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_sigkill_resume_equals_clean(clean, synthetic_coco, tiny_siglip, tmp_path):
    out = tmp_path / "features.safetensors"
    parts = str(out) + ".parts"
    argv = [str(a) for a in base_args(synthetic_coco, tiny_siglip, out)]
    # a real child process (forked: no second import of transformers), killed mid-run with SIGKILL
    proc = multiprocessing.get_context("fork").Process(
        target=_stalled_main, args=(argv,), daemon=True
    )
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and proc.is_alive():  # wait for the first finished shard
        if os.path.isdir(parts) and "shard_00000.safetensors" in os.listdir(parts):
            break
        time.sleep(0.05)
    assert proc.is_alive(), f"child ended early with exit code {proc.exitcode}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and not out.exists()
    assert sorted(os.listdir(parts)) == ["shard_00000.safetensors"]
    with open(
        os.path.join(parts, "shard_00001.tmp999.safetensors"), "wb"
    ) as f:  # as a kill mid-write leaves
        f.write(b"half a shard")
    run(*argv)  # resumes: shard 0 is kept, the rest encoded, then merged
    t, meta = features.load_features(out)
    _, ref, ref_meta = clean
    assert t.keys() == ref.keys() and all(torch.equal(t[k], ref[k]) for k in t)
    assert meta == ref_meta
    assert not os.path.exists(parts)


def test_foreign_shards_refused(synthetic_coco, tiny_siglip, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    parts = str(out) + ".parts"
    os.makedirs(parts)
    extract_features.write_shard(
        os.path.join(parts, "shard_00000.safetensors"),
        {"ids": torch.zeros(1).long()},
        {"model": tiny_siglip, "max_captions": "3"},
    )
    with pytest.raises(SystemExit) as e:
        run(*base_args(synthetic_coco, tiny_siglip, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "max_captions '3'" in err and "'5'" in err and not out.exists()


def test_bad_images_listed_then_skipped(synthetic_coco, tiny_siglip, coco, tmp_path, capsys):
    root = copy_coco(synthetic_coco, tmp_path / "coco")
    c = data.load_coco(root)
    trunc, text = c["paths"][3], c["paths"][10]
    raw = open(trunc, "rb").read()
    open(trunc, "wb").write(raw[: len(raw) // 2])  # truncated JPEG: Image.verify() would not notice
    open(text, "w").write("not an image\n")  # a text file named .jpg
    out = tmp_path / "f.safetensors"
    with pytest.raises(SystemExit) as e:
        run(*base_args(root, tiny_siglip, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and trunc in err and text in err and "--skip_bad_images" in err
    assert (
        len([ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]) == 1
    )  # one line
    assert not out.exists() and not os.path.exists(str(out) + ".parts")
    run(*base_args(root, tiny_siglip, out, "--skip_bad_images"))
    t, meta = features.load_features(out)
    bad = sorted([int(c["ids"][3]), int(c["ids"][10])])
    assert sorted(json.loads(meta["bad_images"])) == bad
    assert not set(bad) & set(t["ids"].tolist())
    assert len(t["ids"]) == len(c["ids"]) - 2


def test_existing_output_up_to_date_or_refused(
    clean, synthetic_coco, tiny_siglip, tmp_path, capsys
):
    out = clean[0]
    before = os.stat(out).st_mtime_ns
    run(*base_args(synthetic_coco, tiny_siglip, out))
    assert "up to date" in capsys.readouterr().out and os.stat(out).st_mtime_ns == before
    for extra, needle in (
        (["--max_captions", 3], "max_captions '5'"),
        (["--views", 2], "views '1'"),
    ):
        with pytest.raises(SystemExit) as e:
            run(*base_args(synthetic_coco, tiny_siglip, out, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "--out" in err
    other_model = tmp_path / "other_model"
    with pytest.raises(SystemExit) as e:
        run(*base_args(synthetic_coco, other_model, out))
    assert e.value.code == 2 and str(other_model) in capsys.readouterr().err
    # the data changed (Karpathy json rewritten): the fingerprint differs, so the cache is stale
    root = copy_coco(synthetic_coco, tmp_path / "coco")
    karpathy = os.path.join(root, "dataset_coco.json")
    os.utime(karpathy, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(SystemExit) as e:
        run(*base_args(root, tiny_siglip, out))
    assert e.value.code == 2 and "fingerprint" in capsys.readouterr().err
    assert os.stat(out).st_mtime_ns == before


@pytest.mark.parametrize(
    "flag", [["--views", "0"], ["--dtype", "fp8"], ["--limit", "-1"], ["--num_workers", "-1"]]
)
def test_bad_flags_rejected_by_argparse(flag):
    with pytest.raises(SystemExit) as e:
        extract_features.get_args_parser().parse_args(flag)
    assert e.value.code == 2


# ---------------------------------------------------------------------- augmented views (images.py)


def test_views_deterministic_per_image_and_view(coco):
    img = Image.open(coco["paths"][0]).convert("RGB")
    a = np.asarray(images.view(img, seed=0, image_id=9, v=1))
    assert np.array_equal(
        a, np.asarray(images.view(img.copy(), seed=0, image_id=9, v=1))
    )  # same pixels on a rerun
    for other in (
        dict(seed=0, image_id=9, v=2),
        dict(seed=1, image_id=9, v=1),
        dict(seed=0, image_id=10, v=1),
    ):
        b = np.asarray(images.view(img, **other))
        assert a.shape != b.shape or not np.array_equal(a, b), other


def test_view_steps_do_what_they_say():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    plain = np.asarray(img).astype(float)
    # brightness / contrast factors in [0.8, 1.2]: the mean moves by at most ~20%
    jit = np.asarray(images.colour_jitter(img, np.random.default_rng(1))).astype(float)
    assert 0.75 < jit.mean() / plain.mean() < 1.25 and not np.array_equal(jit, plain)
    # no rotation, unit scale, no shift: the identity (PIL's affine maps output pixels to input
    # points)
    same = images.shift_scale_rotate(
        img, np.random.default_rng(2), degrees=0, shift=0, scale=(1, 1)
    )
    assert np.array_equal(np.asarray(same), np.asarray(img))
    out = images.augment(img, np.random.default_rng(3))
    assert out.mode == "RGB" and min(out.size) >= 1


def test_old_cache_without_augment_key(tmp_path):
    """Caches written before 'augment' was recorded: 1 view is accepted, more views are refused by
    name."""
    want = {k: "x" for k in extract_features.IDENTITY}
    for views_n, ok in (("1", True), ("3", False)):
        out = tmp_path / f"old{views_n}.safetensors"
        meta = {k: "x" for k in extract_features.IDENTITY if k != "augment"}
        meta["views"] = views_n
        extract_features.write_shard(str(out), {"ids": torch.zeros(1).long()}, meta)
        w = dict(want, views=views_n, augment="none" if views_n == "1" else images.RECIPE)
        if ok:
            assert extract_features.existing_output(str(out), w)
        else:
            with pytest.raises(data.DataError, match="augment"):
                extract_features.existing_output(str(out), w)


# ----------------------------------------------------------------------------- data loading


def test_default_workers_from_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert extract_features.default_workers() == (
        12,
        11,
    )  # one core left for the process driving the GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks on this node share the 12 cores
    assert extract_features.default_workers() == (12, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert extract_features.default_workers()[1] == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert extract_features.default_workers()[1] == 16


def test_loader_options():
    ds, batches = list(range(4)), [[0, 1], [2, 3]]
    cpu0 = extract_features.make_loader(ds, batches, list, 0, "cpu")
    cuda2 = extract_features.make_loader(ds, batches, list, 2, "cuda:0")
    assert not cpu0.pin_memory and cuda2.pin_memory and cuda2.prefetch_factor == 2
    assert not cuda2.persistent_workers and list(cpu0) == [[0, 1], [2, 3]]


def test_default_worker_count_printed(clean, synthetic_coco, tiny_siglip, tmp_path, capsys):
    run(
        *[
            a
            for a in base_args(
                synthetic_coco,
                tiny_siglip,
                tmp_path / "w.safetensors",
                "--limit",
                2,
                "--no_prompts",
            )
            if a not in ("--num_workers", 0)
        ]
    )
    cores, workers = extract_features.default_workers()
    assert (
        f"data loading: {workers} worker process(es) per rank ({cores} cores"
        in capsys.readouterr().out
    )


# ------------------------------------------------------------- run_cv.sh never reuses a stale cache


def test_run_cv_features_step_checks_settings(clean, synthetic_coco, tiny_siglip, tmp_path):
    """run_cv.sh always asks extract_features.py: the same settings -> "up to date" (kept as is);
    other EXTRACT_ARGS (--views 2 on a --views 1 cache) -> a one-line error naming the setting, and
    the run stops."""
    feats = tmp_path / "features.safetensors"
    shutil.copy(clean[0], feats)
    (tmp_path / "splits.json").write_text("{}")  # exists: the splits step is skipped
    # runs extract_features.py (and run_cv.sh's install check) for real; any later step stops the
    # script (exit 3)
    stub = tmp_path / "python"
    stub.write_text(
        f'#!/usr/bin/env bash\ncase "$1" in extract_features.py|locks.py|-c) '
        f'exec {sys.executable} "$@";; *) echo "stub: $*"; exit 3;; esac\n'
    )
    stub.chmod(0o755)
    same = (
        "--device cpu --num_workers 0 --batch_size 8 --shard_size 16"  # clean's flags (base_args)
    )
    env = dict(
        os.environ,
        PYTHON=str(stub),
        DATA_ROOT=synthetic_coco,
        MODEL=tiny_siglip,
        FEATURES=str(feats),
        SPLITS=str(tmp_path / "splits.json"),
        RUN=str(tmp_path / "run"),
        FOLDS="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    before = os.stat(feats).st_mtime_ns
    script = str(extract_features.__file__).replace("extract_features.py", "run_cv.sh")
    r = subprocess.run(
        ["bash", script], env=dict(env, EXTRACT_ARGS=same), capture_output=True, text=True
    )
    assert r.returncode == 3 and "up to date" in r.stdout and "stub: train.py" in r.stdout, (
        r.stderr[-2000:]
    )
    r = subprocess.run(
        ["bash", script],
        env=dict(env, EXTRACT_ARGS=same + " --views 2"),
        capture_output=True,
        text=True,
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert (
        r.returncode == 2 and "stub: train.py" not in r.stdout
    )  # stopped before any fold trained on it
    assert (
        len(errors) == 1
        and "views '1'" in errors[0]
        and "'2'" in errors[0]
        and "--out" in errors[0]
    )
    assert os.stat(feats).st_mtime_ns == before

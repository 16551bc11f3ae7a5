"""train.py on a small planted feature cache: outputs and formats, exact resume, determinism,
torch.compile, the lr schedule, and one-line errors with exit code 2 for bad input."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import data
import features
import metrics
import model
import synthetic
import train

SMALL = ["--mlp_dims", "48", "--bits", "16", "--batch_size", "16"]
SMALL += ["--device", "cpu", "--num_threads", "1"]
CKPT_KEYS = ("model", "optimizer", "scaler", "scheduler", "epoch", "best", "bad_epochs")
CKPT_KEYS += ("model_args", "config", "finished", "rng")


def _write_cache(root, n=300, seed=0, drop_ids=()):
    """Planted features + a 3-fold random splits file (the real formats) -> (features, splits)."""
    feats = synthetic.make_planted_features(n, seed=seed)
    ids = feats["ids"].tolist()
    rng = np.random.default_rng(seed)
    order = rng.permutation(ids).tolist()
    test, dev = sorted(order[:20]), sorted(order[20:])
    folds = [sorted(dev[k::3]) for k in range(3)]
    splits = {
        "method": "random",
        "folds": 3,
        "seed": seed,
        "categories": data.COCO_CATEGORIES,
        "dev": dev,
        "test": test,
        "val_folds": folds,
        "stats": [{"size": len(f), "positives": [0] * 80} for f in folds],
    }
    keep = ~np.isin(feats["ids"], list(drop_ids))
    tensors = {k: v[keep] for k, v in feats.items() if k not in ("meta", "prompts")}
    features.save_features(root / "features.safetensors", tensors, feats["meta"])
    data.save_json(root / "splits.json", splits)
    return root / "features.safetensors", root / "splits.json"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _write_cache(tmp_path_factory.mktemp("cache"))


def argv_of(feats, splits, out_dir, *extra):
    """train.py's command line: the cache, SMALL's flags, then `extra` (which win)."""
    return [
        *("--features", str(feats), "--splits", str(splits), "--out_dir", str(out_dir)),
        *SMALL,
        *(str(a) for a in extra),
    ]


def run(feats, splits, out_dir, *extra):
    return train.main(train.get_args_parser().parse_args(argv_of(feats, splits, out_dir, *extra)))


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    """An uninterrupted 4-epoch run (patience off), shared by the resume and determinism tests."""
    out = tmp_path_factory.mktemp("full")
    run(*cache, out, "--epochs", 4, "--patience", 0)
    return out


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_outputs_and_formats(cache, full_run):
    out = full_run
    ckpt = _load(out / "best.pt")
    assert set(CKPT_KEYS) <= set(ckpt), set(CKPT_KEYS) - set(ckpt)
    assert ckpt["rng"].dtype == torch.uint8 and _load(out / "last.pt")["finished"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["effective_batch"] == 32
    assert cfg["steps_per_epoch"] == math.ceil((cfg["n_train"] // 16) / 2)
    assert cfg["total_steps"] == 4 * cfg["steps_per_epoch"]
    assert cfg["warmup_steps"] == round(0.1 * cfg["total_steps"])
    assert len(cfg["splits_sha256"]) == 64 and cfg["features_meta"]["model"] == "planted"
    assert cfg["finished"]
    # the resolved recipe, flat: every HeadConfig field, no None left (SMALL + the size rule)
    fields = [f.name for f in dataclasses.fields(model.HeadConfig)]
    assert set(fields) <= set(cfg) and all(cfg[k] is not None for k in fields)
    got = {k: cfg[k] for k in ("lr", "input_dropout", "code_gain", "input_norm", "mlp_dims")}
    assert got == dict(lr=0.01, input_dropout=0.35, code_gain=5.0, input_norm="none", mlp_dims=[48])
    assert (cfg["scoring"], cfg["text_input"], cfg["bits"]) == ("each_mean", "mean", 16)
    assert cfg["load_seconds"] >= 0 and cfg["knn_seconds"] >= 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    keys = {"lr", "bce", "quant", "val_mAP_macro", "seconds", "train_seconds", "val_seconds"}
    assert all(keys <= set(r) for r in log)
    assert all(r["train_seconds"] + r["val_seconds"] <= r["seconds"] + 0.02 for r in log)
    val = json.loads((out / "val_metrics.json").read_text())
    assert list(val)[:15] == list(metrics.METRIC_NAMES) and val["epoch"] == ckpt["epoch"]
    assert val["n_images"] == cfg["n_val"] and "skipped_ap_classes" in val
    assert val["mAP_macro"] == max(r["val_mAP_macro"] for r in log) == ckpt["best"]

    # predictions: recompute them independently from best.pt, one image and one caption at a time
    pred = np.load(out / "val_predictions.npz")
    assert pred["ids"].dtype == np.int64 and pred["probs"].dtype == np.float32
    assert pred["codes"].dtype == np.int8
    assert pred["codes"].shape == (cfg["n_val"], 16) and set(np.unique(pred["codes"])) <= {-1, 1}
    head = model.HashHead(**ckpt["model_args"]).eval()
    head.load_state_dict(ckpt["model"])
    tensors, _ = features.load_features(cache[0])
    row = {int(i): r for r, i in enumerate(tensors["ids"].tolist())}
    with torch.no_grad():
        for j in (0, 7, len(pred["ids"]) - 1):
            r = row[int(pred["ids"][j])]
            img = tensors["image"][r : r + 1, 0].float()
            # the default scoring rule "each_mean": every real caption alone and their mean,
            # probabilities and codes averaged over those passes
            caps = tensors["text"][r : r + 1, : int(tensors["n_captions"][r])].float()  # (1, n, D)
            texts = [caps[:, c] for c in range(caps.shape[1])] + [caps.mean(1)] * (
                caps.shape[1] > 1
            )
            outs = [head(img, t) for t in texts]
            p = np.mean([torch.sigmoid(o.logits)[0].numpy() for o in outs], 0)
            code = np.where(np.mean([o.codes[0].numpy() for o in outs], 0) >= 0, 1, -1)  # 0 -> +1
            np.testing.assert_allclose(pred["probs"][j], p, rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(pred["codes"][j], code)
            np.testing.assert_array_equal(pred["labels"][j], tensors["labels"][r].numpy())
    again = metrics.compute_all(pred["labels"], pred["probs"])
    assert abs(again["mAP_macro"] - val["mAP_macro"]) < 1e-9


def test_centres_stay_fixed(cache, tmp_path):
    out = tmp_path / "centres"
    run(*cache, out, "--code_classifier", "centres", "--epochs", 2, "--patience", 0)
    ckpt = _load(out / "best.pt")
    assert ckpt["model_args"]["code_classifier"] == "centres" and ckpt["config"]["code_gain"] == 2.0
    w = ckpt["model"][
        "classifier.weight"
    ]  # (80, 16): +-2 / sqrt(16) after training, as initialised
    assert torch.equal(w.abs(), torch.full_like(w, 0.5)) and 0.3 < (w > 0).float().mean() < 0.7
    learned = [
        k
        for k in ckpt["model"]
        if "running" not in k and "num_batches" not in k and k != "prior_logit"
    ]
    assert len(ckpt["optimizer"]["state"]) == len(learned) - 1  # all but classifier.weight


def _notes(text):
    return [line for line in text.splitlines() if "differs" in line]


def _timeless(path):
    """log.jsonl's records without their wall times (seconds, train_seconds, val_seconds)."""
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if not k.endswith("seconds")} for ln in lines]


def test_resume_is_exact(cache, full_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real_evaluate = train.validate

    def interrupted(*a, **k):  # Ctrl-C during the 3rd epoch's evaluation: last.pt holds epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(*cache, out, "--epochs", 4, "--patience", 0)
    monkeypatch.setattr(train, "validate", real_evaluate)
    assert _load(out / "last.pt")["epoch"] == 2 and not _load(out / "last.pt")["finished"]
    # a flag that really differs from the checkpoint's recipe is named, and nothing else is
    other = tmp_path / "longer"
    shutil.copytree(out, other)
    capsys.readouterr()
    run(*cache, other, "--epochs", 5, "--patience", 0, "--resume")
    assert _notes(capsys.readouterr().out) == ["note: --epochs 5 differs from the checkpoint's 4"]
    # a plain resume of the interrupted run: no note, and the run of an uninterrupted one
    run(*cache, out, "--epochs", 4, "--patience", 0, "--resume")
    assert _notes(capsys.readouterr().out) == []
    assert (out / "val_metrics.json").read_text() == (full_run / "val_metrics.json").read_text()
    a, b = _load(out / "best.pt")["model"], _load(full_run / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _timeless(out / "log.jsonl") == _timeless(full_run / "log.jsonl")
    run(*cache, out, "--epochs", 4, "--patience", 0, "--resume")  # finished: nothing to do, exit 0
    printed = capsys.readouterr().out
    assert "already finished" in printed and _notes(printed) == []


def test_deterministic_on_cpu(cache, full_run, tmp_path):
    run(*cache, tmp_path, "--epochs", 4, "--patience", 0)
    want = (full_run / "val_metrics.json").read_text()
    assert (tmp_path / "val_metrics.json").read_text() == want
    p, q = np.load(tmp_path / "val_predictions.npz"), np.load(full_run / "val_predictions.npz")
    assert all(np.array_equal(p[k], q[k]) for k in ("ids", "labels", "probs", "codes"))


def test_compile_saves_plain_keys(cache, tmp_path):
    # aot_eager: the full dynamo + autograd capture, without inductor's minutes of C++ codegen
    run(*cache, tmp_path, "--epochs", 1, "--compile", "--compile_backend", "aot_eager", "--bits", 0)
    for name in ("best.pt", "last.pt"):
        ckpt = _load(tmp_path / name)
        assert ckpt["model"] and not any("_orig_mod" in k for k in ckpt["model"])
        model.HashHead(**ckpt["model_args"]).load_state_dict(ckpt["model"])


def _lr_curve(cfg, steps_per_epoch, n):
    """The lr of train.make_scheduler's first n steps (lr[i]: before step i), on a throwaway
    parameter; cfg: a resolved HeadConfig."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched, total, warm = train.make_scheduler(opt, cfg, steps_per_epoch)
    lr = []
    for _ in range(n):
        lr.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lr, total, warm


def test_lr_schedule_warmup_then_cosine():
    a = train.get_args_parser().parse_args(
        ["--features", "f", "--splits", "s", "--out_dir", "o", "--lr", "1e-3"]
    )
    cfg = train.head_config(a, 1000)  # the flags' recipe: --lr 1e-3, 20 epochs, warmup 0.1
    lr, total, warm = _lr_curve(cfg, 10, 201)  # 20 epochs of 10 steps; lr[total]: after the last
    assert (total, warm) == (200, 20)
    assert lr[0] == pytest.approx(1e-3 / warm) and lr[warm - 1] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lr[: warm - 1], lr[1:warm]))  # warmup really rises
    assert all(x >= y for x, y in zip(lr[warm:-1], lr[warm + 1 :]))
    assert lr[-1] == pytest.approx(1e-6)
    # periods T_0 = 5 epochs, then 10: restarts at warm + 50 and warm + 150
    lr = _lr_curve(dataclasses.replace(cfg, scheduler="cosine_restarts"), 10, 200)[0]
    assert lr[warm + 49] < 2e-6
    assert lr[warm + 50] == pytest.approx(1e-3) and lr[warm + 150] == pytest.approx(1e-3)


def _fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train.main(train.get_args_parser().parse_args([str(a) for a in argv] + SMALL))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_exits_2(cache, tmp_path, capsys):
    feats, splits = cache
    a = tmp_path / "a"
    nope = tmp_path / "nope.safetensors"
    assert "nope.safetensors" in _fails(
        capsys, "--features", nope, "--splits", splits, "--out_dir", a
    )
    (tmp_path / "junk.safetensors").write_text("not a cache")
    junk = tmp_path / "junk.safetensors"
    assert "junk.safetensors" in _fails(
        capsys, "--features", junk, "--splits", splits, "--out_dir", a
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    dev = json.loads(splits.read_text())["dev"]
    part_feats, part_splits = _write_cache(sub, drop_ids=dev[:5])  # the cache lacks 5 split ids
    err = _fails(capsys, "--features", part_feats, "--splits", part_splits, "--out_dir", a)
    assert "missing" in err
    err = _fails(capsys, "--features", feats, "--splits", splits, "--fold", 3, "--out_dir", a)
    assert "--fold" in err
    with pytest.raises(SystemExit) as e:  # after SMALL, whose --bits 16 would win
        run(feats, splits, a, "--bits", 0, "--sign_weight", 1)
    assert e.value.code == 2 and "--sign_weight" in capsys.readouterr().err
    assert not a.exists()  # nothing half-written

    out = tmp_path / "r"
    run(feats, splits, out, "--epochs", 2, "--patience", 0)
    common = ("--features", feats, "--splits", splits, "--out_dir", out)
    assert "--resume" in _fails(capsys, *common)  # no silent overwrite
    err = _fails(capsys, *common, "--resume", "--epochs", 3, "--fusion", "concat")
    assert "--resume" in err and "concat" in err
    # a checkpoint whose model_args lack a field: HashHead's default for it holds
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["model_args"]["code_classifier"]
    torch.save(ckpt, out / "last.pt")
    err = _fails(capsys, *common, "--resume", "--epochs", 3, "--code_classifier", "centres")
    assert "code_classifier: learned in the checkpoint, centres now" in err


def test_sign_weight_adds_the_binarised_codes_bce(cache, full_run, tmp_path):
    run(*cache, tmp_path, "--epochs", 1, "--sign_weight", 0.5)
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert rec["bce_sign"] > 0.05
    assert rec["loss"] == pytest.approx(
        rec["bce"] + rec["bce_evidence"] + 0.5 * rec["bce_sign"], rel=1e-5
    )
    # the default --sign_weight 0: not computed
    off = json.loads((full_run / "log.jsonl").read_text().splitlines()[0])
    assert off["bce_sign"] == 0
    assert off["loss"] == pytest.approx(off["bce"] + off["bce_evidence"], rel=1e-6)


def test_argparse_rejects_bad_flags(capsys):
    base = ["--features", "f", "--splits", "s", "--out_dir", "o"]
    for bad in (
        ["--bits", "-1"],
        ["--lr", "-1"],
        ["--fusion", "foo"],
        ["--batch_size", "1"],
        ["--dropout", "1.5"],
        ["--mlp_dims", "10,x"],
        ["--input_norm", "x"],
        ["--warmup_ratio", "1"],
        ["--scoring", "all"],
        ["--text_input", "subsets"],
        ["--code_classifier_gain", "1"],  # renamed --code_gain
    ):
        with pytest.raises(SystemExit) as e:
            train.get_args_parser().parse_args(base + bad)
        assert e.value.code == 2


def test_non_finite_loss_stops(cache, tmp_path, monkeypatch, capsys):
    real = model.head_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, terms = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(model, "head_loss", poisoned)
    err = _fails(
        capsys, "--features", cache[0], "--splits", cache[1], "--out_dir", tmp_path, "--epochs", 2
    )
    assert "non-finite loss at epoch 1 step 3" in err
    assert not (tmp_path / "last.pt").exists()

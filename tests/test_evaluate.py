"""evaluate.py: ensemble vs per-checkpoint equality, every scoring rule and KNN / retrieval against
brute force, oof thresholds that never see the test split, bootstrap CIs, one-line exit-2 errors.

    python -m pytest -q tests/test_evaluate.py

Fold checkpoints are built here (random HashHead + the files train.py writes), so the tests do not
depend on training; one test also runs the real train.py for 2 epochs on 300 planted rows.
"""

import csv
import hashlib
import itertools
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import data
import evaluate
import features
import metrics
import model
import retrieval
import synthetic
from report import evaluation

MODEL_ARGS = dict(
    dim=32, num_classes=80, fusion="hadamard", decompose=True, mlp_dims=[24], dropout=0.1, bits=16
)
SCORING = "subsets"  # the fixture checkpoints' config "scoring": the rule with the most passes
FILES = (
    "metrics.json",
    "metrics.csv",
    "metrics.md",
    "per_class.csv",
    "errors.md",
    "test_predictions.npz",
    "ap_per_class.png",
    "pr_curves.png",
)


def run(*argv):
    return evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))


def make_data(root, n=160, dim=32, folds=5, n_test=40, seed=0, ids=None, labels=None):
    """Planted feature cache (n_captions 1..3) + a splits.json with `folds` val folds ->
    (feats path, splits path)."""
    f = synthetic.make_planted_features(n, dim=dim, n_captions=3, seed=seed)
    if ids is not None:
        f["ids"] = np.asarray(ids, dtype=np.int64)
    if labels is not None:
        f["labels"] = np.asarray(labels, dtype=np.uint8)
    features.save_features(root / "feat.safetensors", f, f["meta"])
    perm = np.random.default_rng(seed).permutation(f["ids"])
    test, dev = sorted(perm[:n_test].tolist()), sorted(perm[n_test:].tolist())
    val = [sorted(dev[k::folds]) for k in range(folds)]
    data.save_json(
        root / "splits.json",
        {
            "method": "random",
            "folds": folds,
            "seed": seed,
            "categories": data.COCO_CATEGORIES,
            "dev": dev,
            "test": test,
            "val_folds": val,
            "stats": [{"size": len(v), "positives": [0] * 80} for v in val],
        },
    )
    return root / "feat.safetensors", root / "splits.json"


def make_fold(
    fold_dir,
    k,
    feats_path,
    splits_path,
    model_args=MODEL_ARGS,
    finished=True,
    meta=None,
    scoring=SCORING,
):
    """What train.py leaves in a fold dir, with a randomly initialised head (seeded by k)."""
    torch.manual_seed(100 + k)
    head = model.HashHead(**model_args).eval()
    tensors, fmeta = features.load_features(feats_path) if meta is None else ({}, meta)
    sha = (
        hashlib.sha256(open(splits_path, "rb").read()).hexdigest()
        if os.path.isfile(splits_path)
        else "x"
    )
    config = {
        "features": str(feats_path),
        "splits": str(splits_path),
        "fold": k,
        "seed": 42,
        "splits_sha256": sha,
        "features_meta": fmeta,
        "finished": finished,
        "text_input": "mean",
        "scoring": scoring,
    }
    ck = {
        "model": head.state_dict(),
        "model_args": head.model_args,
        "config": config,
        "epoch": 2,
        "finished": finished,
    }
    os.makedirs(fold_dir, exist_ok=True)
    torch.save(ck, fold_dir / "best.pt")
    torch.save(ck, fold_dir / "last.pt")
    data.save_json(fold_dir / "config.json", config)
    if tensors:  # val predictions from a noisy copy of the labels: realistic for threshold tuning
        vids = np.asarray(json.loads(open(splits_path).read())["val_folds"][k])
        y = tensors["labels"].numpy()[np.searchsorted(tensors["ids"].numpy(), vids)]
        p = np.clip(0.6 * y + np.random.default_rng(k).random(y.shape) * 0.5, 0, 1).astype(
            np.float32
        )
        np.savez(fold_dir / "val_predictions.npz", ids=vids, labels=y, probs=p)
        data.save_json(
            fold_dir / "val_metrics.json",
            dict(metrics.compute_all(y, p), epoch=2, n_images=len(vids)),
        )
    return head


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_run")
    feats, splits = make_data(root)
    heads = [make_fold(root / "run" / f"fold{k}", k, feats, splits) for k in range(5)]
    return {"root": root, "feats": feats, "splits": splits, "run": root / "run", "heads": heads}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def text_passes(txt, n, rule=SCORING):
    """Independent reference of the scoring rule -> [(text (N, D), used (N,) bool)] per pass: "each"
    every caption slot alone, "subsets" the mean of every non-empty subset of the slots (a pass is
    used by an image that has all of its captions, the first also by one without any: its text is
    zero, none); "mean" one pass on the mean of the image's captions, used by every image;
    "each_mean" the passes of "each" and that one (which an image without captions skips)."""
    has = (torch.arange(txt.shape[1])[None, :] < n[:, None]).float()  # (N, T)
    mean = (txt * has[..., None]).sum(1) / has.sum(1, keepdim=True).clamp(min=1)
    if rule == "mean":
        return [(mean, torch.ones(len(n), dtype=torch.bool))]
    if rule == "each_mean":
        return text_passes(txt, n, "each") + [(mean, n > 0)] * (txt.shape[1] > 1)
    slots = range(txt.shape[1])
    sets = (
        [(c,) for c in slots]
        if rule == "each"
        else [s for k in range(1, len(slots) + 1) for s in itertools.combinations(slots, k)]
    )
    return [(txt[:, list(s)].mean(1), (n > max(s)) | ((n == 0) & (max(s) == 0))) for s in sets]


def head_passes(head, feats_path, ids, rule=SCORING):
    """The head on every pass of the evaluated images -> [(HeadOutput, used (N,))], labels."""
    t, _ = features.load_features(feats_path)
    r = np.searchsorted(t["ids"].numpy(), np.asarray(ids))
    img, txt, n = t["image"][r, 0].float(), t["text"][r].float(), t["n_captions"][r]
    with torch.no_grad():
        outs = [(head(img, tx), used) for tx, used in text_passes(txt, n, rule)]
    return outs, t["labels"].numpy()[r]


def mean_codes(outs):
    """The masked mean over the passes of the tanh codes (float32, as scored) -> (N, bits)."""
    count = sum(used.float() for _, used in outs)[:, None]
    return sum(o.codes.float() * used[:, None] for o, used in outs) / count


def codes_and_probs(head, feats_path, ids, rule=SCORING):
    """Independent reference: masked mean over the passes of sigmoid / tanh codes, then sign."""
    outs, y = head_passes(head, feats_path, ids, rule)
    count = sum(used.double() for _, used in outs)[:, None]
    p = sum(torch.sigmoid(o.logits.double()) * used[:, None] for o, used in outs) / count
    return np.where(mean_codes(outs).numpy() >= 0, 1.0, -1.0), p.numpy(), y


def brute_knn_head(head, feats_path, ids, db, dby, k, tau, vote, query="sign", rule=SCORING):
    """KNN head reference: the votes of every caption's code alone, averaged over the image's
    captions (the single-caption passes of every rule but "mean"); under "mean" the votes of the
    image's averaged code, one query each."""
    if rule == "mean":
        outs, _ = head_passes(head, feats_path, ids, rule)
        outs = [(SimpleNamespace(codes=mean_codes(outs)), torch.ones(len(ids), dtype=torch.bool))]
    else:
        outs, _ = head_passes(head, feats_path, ids, "each")
    acc, count = np.zeros((len(ids), dby.shape[1])), np.zeros((len(ids), 1))
    for o, used in outs:
        h = o.codes.double().numpy()
        rows = np.flatnonzero(used.numpy())
        codes = h if query == "real" else np.where(h >= 0, 1.0, -1.0)
        acc[rows] += brute_knn(codes[rows], db, dby, k, tau, vote)
        count[rows] += 1
    return acc / count


def brute_knn(q, db, labels, k, tau, vote):
    """+-1 queries: Hamming distance; real queries: similarity (1 + q.db / |q|_1) / 2 (float64) of
    the query rounded as knn_scores defines it (a power-of-two scale to max |q_j| < 1, then a
    2^-min(14, 23 - bit_length(2 * bits)) grid)."""
    k = min(k, len(db))
    if not np.isin(q, (-1.0, 1.0)).all():
        _, e = np.frexp(np.abs(q).max(1, keepdims=True))
        s = min(14, 23 - (2 * q.shape[1]).bit_length())
        q = np.round(np.ldexp(q.astype(np.float32).astype(np.float64), s - e)) / 2.0**s
    sim_all = (
        1 + q @ db.T / np.abs(q).sum(1, keepdims=True)
    ) / 2  # (Q, N); 1 - hamming / bits for +-1 q
    order = np.argsort(-sim_all, axis=1, kind="stable")[:, :k]  # ties: lower database index first
    sim = np.take_along_axis(sim_all, order, 1)
    w = {
        "softmax": np.exp((sim - sim.max(1, keepdims=True)) / tau),
        "uniform": np.ones_like(sim),
        "rank": np.broadcast_to(1 / np.arange(1, k + 1), sim.shape),
    }[vote]
    w = w / w.sum(1, keepdims=True)
    return np.einsum("qk,qkc->qc", w, labels[order].astype(np.float64))


# ----------------------------------------------------------------------------- acceptance


def test_scoring_rule_from_the_checkpoint_or_the_flag(fake_run, tmp_path):
    # the checkpoints were validated under SCORING (their config); --scoring scores the same heads
    # under another rule, and metrics.json records the rule in use
    splits = json.loads(open(fake_run["splits"]).read())
    probs = {}
    for rule in (None, "each", "each_mean", "mean"):
        out = tmp_path / str(rule)
        run(
            "--checkpoint",
            fake_run["run"] / "fold1" / "best.pt",
            "--bootstrap",
            0,
            "--out_dir",
            out,
            "--device",
            "cpu",
            *(["--scoring", rule] if rule else []),
        )
        probs[rule] = np.load(out / "test_predictions.npz")["probs"]
        _, p, _ = codes_and_probs(
            fake_run["heads"][1], fake_run["feats"], splits["test"], rule or SCORING
        )
        np.testing.assert_allclose(probs[rule], p, atol=1e-5)
        assert json.loads((out / "metrics.json").read_text())["scoring"] == (rule or SCORING)
    for a, b in itertools.combinations(probs.values(), 2):  # four rules, four scorings
        assert not np.allclose(a, b, atol=1e-3)


def test_ensemble_files_and_member_rows_equal_single_checkpoints(fake_run, tmp_path, monkeypatch):
    out = tmp_path / "ens"
    rep = run(
        "--ensemble",
        fake_run["run"],
        "--head",
        "both",
        "--bootstrap",
        0,
        "--out_dir",
        out,
        "--device",
        "cpu",
    )
    for name in FILES:
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["model", "head", *metrics.METRIC_NAMES]
    assert [(r["model"], r["head"]) for r in rows] == [
        (m, h) for h in ("mlp", "knn") for m in [*(f"fold{k}" for k in range(5)), "ensemble"]
    ]
    z = np.load(out / "test_predictions.npz")
    splits = json.loads(open(fake_run["splits"]).read())
    assert z["ids"].tolist() == splits["test"] and z["member_probs"].shape == (5, 40, 80)
    # the ensemble = mean of the members; its row = compute_all on that mean
    np.testing.assert_allclose(z["probs"], z["member_probs"].mean(0), atol=1e-7)
    ens = metrics.compute_all(z["labels"], z["probs"])
    assert all(abs(float(rows[5][m]) - ens[m]) < 1e-6 for m in metrics.METRIC_NAMES)
    # metrics.md: the same numbers, a table per head, a metric a row, a model a column
    md = (out / "metrics.md").read_text().split("## KNN head")
    assert len(md) == 2 and "| metric | fold0 | fold1 | fold2 | fold3 | fold4 | ensemble |" in md[0]
    lrap = (
        next(ln for ln in md[0].splitlines() if ln.startswith("| LRAP |"))
        .strip("| ")
        .split(" | ")[1:]
    )
    assert lrap == [f"{float(r['lrap']):.4f}" for r in rows[:6]]
    # member probabilities = caption-averaged sigmoid, computed independently
    for k in (0, 3):
        _, p, y = codes_and_probs(fake_run["heads"][k], fake_run["feats"], z["ids"])
        np.testing.assert_allclose(z["member_probs"][k], p, atol=1e-5)
        np.testing.assert_array_equal(z["labels"], y)
    # each checkpoint alone gives exactly its row of the ensemble's table (both heads); no plots
    monkeypatch.setattr(evaluation.report, "save_plots", lambda *a, **kw: [])
    for k in range(5):
        single = tmp_path / f"single{k}"
        run(
            "--checkpoint",
            fake_run["run"] / f"fold{k}" / "best.pt",
            "--head",
            "both",
            "--bootstrap",
            0,
            "--out_dir",
            single,
            "--device",
            "cpu",
        )
        srows = read_csv(single / "metrics.csv")
        for head in ("mlp", "knn"):
            mine = next(r for r in srows if r["model"] == f"fold{k}" and r["head"] == head)
            assert mine == next(r for r in rows if r["model"] == f"fold{k}" and r["head"] == head)
    assert rep["models"]["fold2"]["mlp"]["mAP_macro"] == pytest.approx(
        float(rows[2]["mAP_macro"]), abs=0
    )
    # per-class table: 80 rows sorted by AP, values as sklearn's
    pc = read_csv(out / "per_class.csv")
    assert len(pc) == 80 and list(pc[0])[:3] == ["class", "coco_id", "name"]
    aps = [float(r["ap"]) for r in pc if r["ap"] != "nan"]
    assert aps == sorted(aps, reverse=True) and all(r["ap"] == "nan" for r in pc[len(aps) :])
    for r in pc[:3]:
        c = int(r["class"])
        assert float(r["ap"]) == pytest.approx(
            average_precision_score(z["labels"][:, c], z["probs"][:, c]), abs=1e-6
        )
        assert (
            r["name"] == data.COCO_CATEGORIES[c]["name"]
            and int(r["coco_id"]) == data.COCO_CATEGORIES[c]["id"]
        )
    text = (out / "errors.md").read_text()
    for section in (
        "Best 10 classes",
        "Worst 10 classes",
        "Most false positives",
        "Most false negatives",
        "missed A",
        "Worst-predicted images",
    ):
        assert section in text


@pytest.mark.parametrize(
    "vote,query,rule",
    [
        ("softmax", "real", None),
        ("softmax", "sign", "each"),
        ("uniform", "sign", "mean"),
        ("rank", "real", "each"),
        ("rank", "sign", "each_mean"),
    ],
)
def test_knn_and_retrieval_equal_brute_force(fake_run, tmp_path, vote, query, rule):
    """softmax: the 5-fold KNN ensemble + retrieval; uniform / rank: fold 1 alone, k above the
    database size. query real: the real-valued tanh codes against the binary database (the
    default), sign: both binary. rule: --scoring (None: the checkpoints' SCORING); "mean" queries
    with the image's averaged code, the others with every caption's code."""
    k, folds = (
        (7, range(5)) if vote == "softmax" else (1000, [1])
    )  # 1000 > database: every training image votes
    src = (
        ["--ensemble", fake_run["run"], "--retrieval"]
        if vote == "softmax"
        else ["--checkpoint", fake_run["run"] / "fold1" / "best.pt"]
    )
    rep = run(
        *src,
        "--head",
        "knn",
        "--knn_k",
        k,
        "--knn_tau",
        0.5,
        "--knn_vote",
        vote,
        "--knn_query",
        query,
        *(["--scoring", rule] if rule else []),
        "--bootstrap",
        0,
        "--out_dir",
        tmp_path,
        "--device",
        "cpu",
    )
    z = np.load(tmp_path / "test_predictions.npz")
    splits = json.loads(open(fake_run["splits"]).read())
    rule = rule or SCORING
    for i, fold in enumerate(folds):
        head, feats = fake_run["heads"][fold], fake_run["feats"]
        q, _, qy = codes_and_probs(head, feats, splits["test"], rule)
        val = set(splits["val_folds"][fold])
        train_ids = [j for j in splits["dev"] if j not in val]  # the fold's database
        db, _, dby = codes_and_probs(head, feats, train_ids, rule)
        ref = brute_knn_head(head, feats, splits["test"], db, dby, k, 0.5, vote, query, rule)
        np.testing.assert_allclose(z["member_probs"][i], ref, atol=1e-5)
        if vote == "softmax":  # retrieval: test codes ranked against the whole dev pool's codes
            dev, _, devy = codes_and_probs(head, feats, splits["dev"], rule)
            r = rep["retrieval"][f"fold{fold}"]
            assert r["mAP@1000"] == pytest.approx(
                retrieval.retrieval_map(q, qy, dev, devy, k=1000), abs=1e-9
            )
            assert r["mAP@all"] == pytest.approx(
                retrieval.retrieval_map(q, qy, dev, devy), abs=1e-9
            )
    np.testing.assert_allclose(
        z["probs"], z["member_probs"].mean(0), atol=1e-7
    )  # KNN ensemble: mean votes
    assert (
        list(rep["ensemble"]) == ["knn"] and rep["knn"]["k"] == k and rep["knn"]["query"] == query
    )


def test_thresholds_oof_never_look_at_test(fake_run, tmp_path):
    a = run(
        "--ensemble",
        fake_run["run"],
        "--thresholds",
        "oof",
        "--bootstrap",
        0,
        "--out_dir",
        tmp_path / "a",
        "--device",
        "cpu",
    )
    info = json.loads((tmp_path / "a" / "thresholds.json").read_text())
    per_fold, val_ids = [], []
    for k in range(5):
        z = np.load(fake_run["run"] / f"fold{k}" / "val_predictions.npz")
        per_fold.append(metrics.best_f1_thresholds(z["labels"], z["probs"]))
        val_ids += z["ids"].tolist()
    np.testing.assert_allclose(info["thresholds"], np.mean(per_fold, 0), atol=1e-12)
    splits = json.loads(open(fake_run["splits"]).read())
    assert not set(val_ids) & set(splits["test"]) and info["n_val"] == len(val_ids)
    # side by side: 0.5 and tuned; the tuned row is compute_all at those thresholds
    table = read_csv(tmp_path / "a" / "thresholds.csv")
    assert [r["metric"] for r in table] == list(metrics.METRIC_NAMES)
    z = np.load(tmp_path / "a" / "test_predictions.npz")
    tuned = metrics.compute_all(z["labels"], z["probs"], np.asarray(info["thresholds"]))
    assert all(float(r["at_oof"]) == pytest.approx(tuned[r["metric"]], abs=1e-12) for r in table)
    assert a["thresholds"]["0.5"]["f1_macro"] == a["ensemble"]["mlp"]["f1_macro"]
    # different test labels: the same thresholds (the test split chooses nothing), other metrics
    t, meta = features.load_features(fake_run["feats"])
    test_rows = np.isin(t["ids"].numpy(), splits["test"])
    labels = t["labels"].numpy().copy()
    labels[test_rows] = 1 - labels[test_rows]
    other = dict({k: v.numpy() for k, v in t.items()}, labels=labels)
    features.save_features(tmp_path / "flipped.safetensors", other, meta)
    b = run(
        "--ensemble",
        fake_run["run"],
        "--features",
        tmp_path / "flipped.safetensors",
        "--thresholds",
        "oof",
        "--bootstrap",
        0,
        "--out_dir",
        tmp_path / "b",
        "--device",
        "cpu",
    )
    assert (
        json.loads((tmp_path / "b" / "thresholds.json").read_text())["thresholds"]
        == info["thresholds"]
    )
    assert b["thresholds"]["oof"]["f1_macro"] != a["thresholds"]["oof"]["f1_macro"]


def test_bootstrap_ci_in_metrics_json(fake_run, tmp_path):
    rep = run(
        "--checkpoint",
        fake_run["run"] / "fold1" / "best.pt",
        "--bootstrap",
        200,
        "--seed",
        3,
        "--out_dir",
        tmp_path,
        "--device",
        "cpu",
    )
    z = np.load(tmp_path / "test_predictions.npz")
    ref = metrics.bootstrap_ci(z["labels"], z["probs"], n_boot=200, seed=3)
    stored = json.loads((tmp_path / "metrics.json").read_text())["bootstrap_ci"]
    assert stored["n_boot"] == 200 and rep["bootstrap_ci"]["n_boot"] == 200
    assert stored["interval"] == metrics.interval_rule(200, 0.05, len(z["labels"]))
    assert stored["interval"]["method"] == "BCa" and stored["interval"]["resamples"] == 200
    for name in ("mAP_macro", "f1_macro", "auc_macro"):
        assert (stored[name]["value"], stored[name]["low"], stored[name]["high"]) == pytest.approx(
            ref[name]
        )
        assert stored[name]["low"] <= stored[name]["value"] <= stored[name]["high"]
    again = run(
        "--checkpoint",
        fake_run["run"] / "fold1" / "best.pt",
        "--bootstrap",
        0,
        "--out_dir",
        tmp_path / "nob",
        "--device",
        "cpu",
    )
    assert "bootstrap_ci" not in again


def test_split_val_scores_the_fold_own_val_images(fake_run, tmp_path, capsys):
    rep = run(
        "--checkpoint",
        fake_run["run"] / "fold2" / "best.pt",
        "--split",
        "val",
        "--fold",
        2,
        "--bootstrap",
        0,
        "--out_dir",
        tmp_path,
        "--device",
        "cpu",
    )
    z = np.load(tmp_path / "val_predictions.npz")
    assert z["ids"].tolist() == json.loads(open(fake_run["splits"]).read())["val_folds"][2]
    assert rep["n_images"] == len(z["ids"])
    with pytest.raises(SystemExit) as e:  # fold 1's val images were fold 2's training images
        run(
            "--checkpoint",
            fake_run["run"] / "fold2" / "best.pt",
            "--split",
            "val",
            "--fold",
            1,
            "--device",
            "cpu",
        )
    assert e.value.code == 2 and "--fold" in capsys.readouterr().err


def test_examples_png_from_data_root(synthetic_coco, tmp_path):
    coco = data.load_coco(synthetic_coco)
    feats, splits = make_data(
        tmp_path, n=len(coco["ids"]), folds=2, n_test=20, ids=coco["ids"], labels=coco["labels"]
    )
    for k in range(2):
        make_fold(tmp_path / "run" / f"fold{k}", k, feats, splits)
    run(
        "--ensemble",
        tmp_path / "run",
        "--data_root",
        synthetic_coco,
        "--bootstrap",
        0,
        "--device",
        "cpu",
    )
    assert (
        tmp_path / "run" / "eval_test" / "examples.png"
    ).stat().st_size > 10_000  # default out_dir


def test_rerun_removes_an_earlier_runs_optional_files(fake_run, tmp_path, capsys):
    # thresholds.* from an earlier --thresholds oof run must not sit beside the results of a run
    # without it
    out = tmp_path / "out"
    run(
        "--ensemble",
        fake_run["run"],
        "--thresholds",
        "oof",
        "--bootstrap",
        0,
        "--out_dir",
        out,
        "--device",
        "cpu",
    )
    assert (out / "thresholds.csv").is_file() and (out / "thresholds.json").is_file()
    capsys.readouterr()
    run("--ensemble", fake_run["run"], "--bootstrap", 0, "--out_dir", out, "--device", "cpu")
    assert not (out / "thresholds.csv").exists() and not (out / "thresholds.json").exists()
    assert "removed an earlier run's thresholds.json, thresholds.csv" in capsys.readouterr().out
    assert all((out / f).is_file() for f in FILES)
    mine = (
        tmp_path / "mine"
    )  # a folder evaluate.py never wrote to: nothing of the user's is removed
    mine.mkdir()
    (mine / "examples.png").write_bytes(b"the user's own file")
    run("--ensemble", fake_run["run"], "--bootstrap", 0, "--out_dir", mine, "--device", "cpu")
    assert (mine / "examples.png").read_bytes() == b"the user's own file"


def test_fold_out_of_range_is_named(fake_run, capsys):
    with pytest.raises(SystemExit) as e:
        run(
            "--checkpoint",
            fake_run["run"] / "fold0" / "best.pt",
            "--split",
            "val",
            "--fold",
            7,
            "--device",
            "cpu",
        )
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.count("\n") == 1
        and "--fold: 7 is out of range" in err
        and "folds 0..4" in err
    )


def test_config_paths_relative_to_the_training_folder(fake_run, tmp_path, monkeypatch, capsys):
    # train.py saves --features / --splits as given (run_cv.sh gives them relative) and the folder
    # it ran in; evaluate.py finds them from any folder, and where that folder no longer holds them
    # says which flag to pass
    root, rel = fake_run["root"], tmp_path / "rel"
    _copy_run(fake_run, rel, folds=range(5))
    for k in range(5):
        ck = torch.load(rel / f"fold{k}" / "best.pt", weights_only=True)
        ck["config"].update(
            features=os.path.relpath(fake_run["feats"], root),
            cwd=str(root),
            splits=os.path.relpath(fake_run["splits"], root),
        )
        torch.save(ck, rel / f"fold{k}" / "best.pt")
    monkeypatch.chdir(tmp_path)
    rep = run("--ensemble", rel, "--bootstrap", 0, "--device", "cpu")
    assert rep["features"] == str(fake_run["feats"]) and rep["splits"] == str(fake_run["splits"])
    for k in range(5):
        ck = torch.load(rel / f"fold{k}" / "best.pt", weights_only=True)
        ck["config"]["cwd"] = str(tmp_path / "moved")
        torch.save(ck, rel / f"fold{k}" / "best.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run("--ensemble", rel, "--bootstrap", 0, "--device", "cpu")
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.count("\n") == 1
        and "feat.safetensors" in err
        and "--features" in err
    )


# ------------------------------------------------------------------- bad input: one line, exit 2


def _copy_run(fake_run, dst, folds=(0, 1)):
    for k in folds:
        shutil.copytree(fake_run["run"] / f"fold{k}", dst / f"fold{k}")
    return dst


def _bad_cases(fake_run, tmp):
    ck = fake_run["run"] / "fold0" / "best.pt"
    (tmp / "empty").mkdir()
    mixed = _copy_run(fake_run, tmp / "mixed")
    make_fold(
        mixed / "fold1",
        1,
        fake_run["feats"],
        fake_run["splits"],
        model_args=dict(MODEL_ARGS, bits=32),
    )
    other_splits = tmp / "splits2.json"
    s = json.loads(open(fake_run["splits"]).read())
    data.save_json(other_splits, dict(s, seed=1))
    mixed_splits = _copy_run(fake_run, tmp / "mixed_splits")
    make_fold(mixed_splits / "fold1", 1, fake_run["feats"], other_splits)
    unfinished = _copy_run(fake_run, tmp / "unfinished")
    data.save_json(unfinished / "fold1" / "config.json", {"finished": False})
    torch.save(
        dict(torch.load(ck, weights_only=True), finished=False), unfinished / "fold1" / "last.pt"
    )
    old = torch.load(ck, weights_only=True)
    del old["config"]["scoring"]  # a checkpoint that does not say how it was validated
    torch.save(old, tmp / "noscoring.pt")
    (tmp / "trunc.pt").write_bytes(ck.read_bytes()[:300])
    (tmp / "text.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, tmp / "other.pt")
    with open(
        tmp / "pickled.pt", "wb"
    ) as f:  # a pickled object: weights_only must refuse to build it
        pickle.dump({"model": collections_counter()}, f)
    torch.save(
        {"model": collections_counter(), "model_args": {}, "config": {}}, tmp / "pickled_torch.pt"
    )
    return {
        "empty ensemble": ["--ensemble", tmp / "empty"],
        "missing ensemble dir": ["--ensemble", tmp / "nope"],
        "mixed model_args": ["--ensemble", mixed],
        "mixed splits": ["--ensemble", mixed_splits],
        "unfinished fold": ["--ensemble", unfinished],
        "absent folds": ["--ensemble", _copy_run(fake_run, tmp / "absent", folds=(0, 1, 2, 3))],
        "split val without fold": ["--checkpoint", ck, "--split", "val"],
        "val with ensemble": ["--ensemble", fake_run["run"], "--split", "val", "--fold", 0],
        "oof on val": ["--checkpoint", ck, "--split", "val", "--fold", 0, "--thresholds", "oof"],
        "truncated checkpoint": ["--checkpoint", tmp / "trunc.pt"],
        "text file checkpoint": ["--checkpoint", tmp / "text.pt"],
        "non-checkpoint dict": ["--checkpoint", tmp / "other.pt"],
        "pickled object": ["--checkpoint", tmp / "pickled.pt"],
        "torch-pickled object": ["--checkpoint", tmp / "pickled_torch.pt"],
        "missing checkpoint": ["--checkpoint", tmp / "missing.pt"],
        "no scoring rule in the config": ["--checkpoint", tmp / "noscoring.pt"],
        "other splits file": ["--checkpoint", ck, "--splits", other_splits],
        "missing features": ["--checkpoint", ck, "--features", tmp / "missing.safetensors"],
    }


def collections_counter():
    import collections

    return collections.Counter(a=1)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_input_one_line_exit_2(fake_run, tmp_path, capsys):
    cases = _bad_cases(fake_run, tmp_path)
    for name, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            run(*argv, "--bootstrap", 0, "--out_dir", tmp_path / "out", "--device", "cpu")
        err = capsys.readouterr().err
        assert e.value.code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1, f"{name}: {err!r}"
    assert not (tmp_path / "out").exists()  # nothing half-written
    # --allow_partial names the unfinished fold and ensembles the rest
    rep = run(
        "--ensemble",
        tmp_path / "unfinished",
        "--allow_partial",
        "--bootstrap",
        0,
        "--device",
        "cpu",
    )
    assert list(rep["models"]) == ["fold0"] and "fold1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--split", "train"],
        ["--knn_k", "0"],
        ["--knn_k", "-3"],
        ["--knn_tau", "0"],
        ["--knn_vote", "max"],
        ["--head", "svm"],
        ["--bootstrap", "-1"],
        ["--thresholds", "0.3"],
        ["--scoring", "all"],
    ],
)
def test_bad_flags_rejected_by_argparse(argv, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.get_args_parser().parse_args(["--checkpoint", "x.pt", *argv])
    assert e.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_one_image_is_predict_py(capsys):
    # evaluate.py scores cached embeddings only; one raw image goes to predict.py
    with pytest.raises(SystemExit) as e:
        evaluate.get_args_parser().parse_args(["--checkpoint", "x.pt", "--image", "photo.jpg"])
    assert e.value.code == 2 and "unrecognized arguments: --image" in capsys.readouterr().err


# ---------------------------------------------------------------------- really trained (train.py)


def test_trained_ensemble(tmp_path):
    train = pytest.importorskip("train")
    feats, splits = make_data(tmp_path, n=300, dim=32, folds=3, n_test=60)
    for k in range(3):
        train.main(
            train.get_args_parser().parse_args(
                [
                    "--features",
                    str(feats),
                    "--splits",
                    str(splits),
                    "--fold",
                    str(k),
                    "--out_dir",
                    str(tmp_path / f"fold{k}"),
                    "--epochs",
                    "2",
                    "--batch_size",
                    "32",
                    "--mlp_dims",
                    "32",
                    "--bits",
                    "16",
                    "--device",
                    "cpu",
                ]
            )
        )
    rep = run(
        "--ensemble",
        tmp_path,
        "--head",
        "both",
        "--thresholds",
        "oof",
        "--bootstrap",
        20,
        "--device",
        "cpu",
    )
    for name in (*FILES, "thresholds.csv", "thresholds.json"):
        assert (tmp_path / "eval_test" / name).is_file(), name
    assert sorted(rep["models"]) == [f"fold{k}" for k in range(3)] and rep["n_images"] == 60
    single = run(
        "--checkpoint",
        tmp_path / "fold2" / "best.pt",
        "--head",
        "both",
        "--bootstrap",
        0,
        "--device",
        "cpu",
    )
    assert single["models"]["fold2"] == rep["models"]["fold2"]

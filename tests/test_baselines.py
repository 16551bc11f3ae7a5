"""train.py --baseline probe|zeroshot: the comparison rows of the results table, written as
ordinary runs.

Zero-shot scores are checked against SigLIP's formula computed here directly; the probe against an
independent scikit-learn probe; both must come out of aggregate.py and evaluate.py like trained
runs.
"""

import csv
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import aggregate
import data
import evaluate
import features
import metrics
import train
import synthetic

N_FOLDS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Planted features with class prompts (logit scale 10, bias -10) and a 2-fold splits file."""
    root = tmp_path_factory.mktemp("baseline_cache")
    feats = synthetic.make_planted_features(
        1500, dim=256, seed=3
    )  # small D: the probe fits in seconds
    ids = feats["ids"].tolist()
    order = np.random.default_rng(3).permutation(ids).tolist()
    test, dev = sorted(order[:200]), sorted(order[200:])
    folds = [sorted(dev[k::N_FOLDS]) for k in range(N_FOLDS)]
    splits = {
        "method": "random",
        "folds": N_FOLDS,
        "seed": 3,
        "categories": data.COCO_CATEGORIES,
        "dev": dev,
        "test": test,
        "val_folds": folds,
        "stats": [{"size": len(f), "positives": [0] * 80} for f in folds],
    }
    features.save_features(
        root / "features.safetensors",
        {k: v for k, v in feats.items() if k != "meta"},
        feats["meta"],
    )
    data.save_json(root / "splits.json", splits)
    return root / "features.safetensors", root / "splits.json", feats, splits


def run_baseline(cache, out, kind):
    feats_path, splits_path = cache[:2]
    for k in range(N_FOLDS):
        argv = [
            "--features",
            feats_path,
            "--splits",
            splits_path,
            "--fold",
            k,
            "--out_dir",
            out / f"fold{k}",
            "--baseline",
            kind,
            "--device",
            "cpu",
            "--num_threads",
            "1",
        ]
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    aggregate.main(aggregate.get_args_parser().parse_args([str(out)]))
    evaluate.main(
        evaluate.get_args_parser().parse_args(
            [
                "--ensemble",
                str(out),
                "--features",
                str(feats_path),
                "--splits",
                str(splits_path),
                "--split",
                "test",
                "--bootstrap",
                "0",
                "--device",
                "cpu",
                "--out_dir",
                str(out / "eval_test"),
            ]
        )
    )


def rows(path):
    return list(csv.DictReader(open(path)))


def test_zeroshot_is_siglips_formula(cache, tmp_path):
    run_baseline(cache, tmp_path, "zeroshot")
    feats = cache[2]
    # SigLIP zero-shot, computed here: sigmoid(scale * cos(image, prompt) + bias), caption ignored
    img = feats["image"][:, 0].astype(np.float64)
    prm = feats["prompts"].astype(np.float64)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
        prm / np.linalg.norm(prm, axis=1, keepdims=True)
    ).T
    want = 1 / (
        1
        + np.exp(-(float(feats["meta"]["logit_scale"]) * cos + float(feats["meta"]["logit_bias"])))
    )
    row = {int(i): r for r, i in enumerate(feats["ids"])}
    pred = np.load(tmp_path / "fold0" / "val_predictions.npz")
    np.testing.assert_allclose(pred["probs"], want[[row[int(i)] for i in pred["ids"]]], atol=2e-5)
    assert "codes" not in pred.files
    assert [
        r["fold"] if "fold" in r else next(iter(r.values()))
        for r in rows(tmp_path / "cv_results.csv")
    ] == ["fold_0", "fold_1", "mean", "std"]
    assert "ensemble" in {r["model"] for r in rows(tmp_path / "eval_test" / "metrics.csv")}


def test_probe_matches_an_independent_probe(cache, tmp_path):
    run_baseline(cache, tmp_path, "probe")
    _, _, feats, splits = cache
    val_metrics = json.loads((tmp_path / "fold0" / "val_metrics.json").read_text())
    # reference: scikit-learn logistic regression on L2-normalised [image, mean caption], fold 0
    img = feats["image"][:, 0].astype(np.float64)
    cap = feats["text"].astype(np.float64).sum(1) / feats["n_captions"][:, None]
    x = np.hstack(
        [
            img / np.linalg.norm(img, axis=1, keepdims=True),
            cap / np.linalg.norm(cap, axis=1, keepdims=True),
        ]
    )
    row = {int(i): r for r, i in enumerate(feats["ids"])}
    val = [row[i] for i in splits["val_folds"][0]]
    tr = [row[i] for i in splits["dev"] if i not in set(splits["val_folds"][0])]
    y = feats["labels"]
    ref = np.zeros((len(val), 80))
    for c in range(80):
        if 0 < y[tr, c].sum() < len(tr):
            ref[:, c] = (
                LogisticRegression(C=10.0, max_iter=1000)
                .fit(x[tr], y[tr, c])
                .predict_proba(x[val])[:, 1]
            )
    ref_map = metrics.compute_all(y[val], ref)["mAP_macro"]
    chance = metrics.compute_all(y[val], np.random.default_rng(0).random((len(val), 80)))[
        "mAP_macro"
    ]
    print(
        f"probe baseline val mAP {val_metrics['mAP_macro']:.4f}, reference probe {ref_map:.4f}, "
        f"chance {chance:.4f}"
    )
    assert val_metrics["mAP_macro"] > 2 * chance
    assert abs(val_metrics["mAP_macro"] - ref_map) < 0.1
    assert len(rows(tmp_path / "cv_results.csv")) == N_FOLDS + 2
    assert {"fold0", "fold1", "ensemble"} <= {
        r["model"] for r in rows(tmp_path / "eval_test" / "metrics.csv")
    }


def test_zeroshot_needs_prompts(cache, tmp_path):
    feats_path, splits_path, feats, _ = cache
    t, meta = features.load_features(feats_path)
    features.save_features(
        tmp_path / "f.safetensors", {k: v for k, v in t.items() if k != "prompts"}, meta
    )
    argv = [
        "--features",
        tmp_path / "f.safetensors",
        "--splits",
        splits_path,
        "--out_dir",
        tmp_path / "z",
        "--baseline",
        "zeroshot",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as e:
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    assert e.value.code == 2

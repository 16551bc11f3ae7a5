"""Issue 19's acceptance check: the per-fold KNN metrics train.py writes into val_metrics.json "knn"
(best checkpoint, database = the fold's training images) equal `evaluate.py --checkpoint
<fold>/best.pt --split val --fold k --head knn` on the same fold, metric for metric, and so do the
probabilities behind them: under every scoring rule (evaluate.py takes the run's from its config),
with images the extractor could not read, and with --amp (train.py's default on cuda) too: both
score in float32, whatever the training precision.

    python -m pytest -q tests/test_fold_knn.py
"""

import json

import numpy as np
import pytest

import data
import evaluate
import features
import metrics
import synthetic
import train


def planted_cache(root, n=240, dim=32, folds=3, seed=0, n_bad=0):
    """A small planted cache (some images with fewer captions; n_bad dev images the extractor could
    not read, which both scripts skip) + a random K-fold splits file."""
    feats = synthetic.make_planted_features(n, dim=dim, seed=seed)
    ids = feats["ids"].tolist()
    order = np.random.default_rng(seed).permutation(ids).tolist()
    test, dev = sorted(order[:30]), sorted(order[30:])
    val_folds = [sorted(dev[k::folds]) for k in range(folds)]
    feats["meta"] = dict(feats["meta"], bad_images=json.dumps(sorted(dev[:n_bad])))
    splits = {
        "method": "random",
        "folds": folds,
        "seed": seed,
        "categories": data.COCO_CATEGORIES,
        "dev": dev,
        "test": test,
        "val_folds": val_folds,
        "stats": [{"size": len(f), "positives": [0] * 80} for f in val_folds],
    }
    tensors = {k: v for k, v in feats.items() if k != "meta"}
    features.save_features(root / "features.safetensors", tensors, feats["meta"])
    data.save_json(root / "splits.json", splits)
    return root / "features.safetensors", root / "splits.json"


SMALL = ["--epochs", "2", "--bits", "16", "--mlp_dims", "32", "--batch_size", "16"]
SMALL += ["--num_threads", "1", "--device", "cpu"]


@pytest.mark.parametrize(
    "fold,extra,n_bad,scoring",
    [
        (1, [], 0, "each_mean"),  # the defaults: --text_input mean, --scoring each_mean
        (0, ["--scoring", "subsets"], 0, "subsets"),
        (2, ["--scoring", "each"], 0, "each"),
        (2, ["--text_input", "each", "--scoring", "mean"], 6, "mean"),
        (1, ["--amp"], 0, "each_mean"),
    ],
)
def test_fold_knn_equals_evaluate(tmp_path, fold, extra, n_bad, scoring):
    feats, splits = planted_cache(tmp_path, n_bad=n_bad)
    out = tmp_path / f"fold{fold}"
    argv = ["--features", str(feats), "--splits", str(splits), "--fold", str(fold)]
    train.main(train.get_args_parser().parse_args(argv + ["--out_dir", str(out), *SMALL, *extra]))
    assert json.loads((out / "config.json").read_text())["scoring"] == scoring
    mine = json.loads((out / "val_metrics.json").read_text())["knn"]
    ev_argv = ["--checkpoint", str(out / "best.pt"), "--split", "val", "--fold", str(fold)]
    ev_argv += ["--head", "knn", "--bootstrap", "0", "--device", "cpu"]
    ev = evaluate.main(evaluate.get_args_parser().parse_args(ev_argv))
    written = json.loads((out / "eval_val" / "metrics.json").read_text())
    theirs = written["models"][f"fold{fold}"]["knn"]
    assert ev["models"][f"fold{fold}"]["knn"] == theirs
    assert ev["skipped"] == n_bad // 3  # dev[:n_bad]: n_bad / 3 per fold
    with (
        np.load(out / "val_predictions.npz") as a,
        np.load(out / "eval_val" / "val_predictions.npz") as b,
    ):
        assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["labels"], b["labels"])
        diff = float(np.abs(a["knn_probs"] - b["probs"]).max())
        assert diff == 0.0, f"KNN probabilities differ by up to {diff}"
    for m in metrics.METRIC_NAMES:
        assert mine[m] == pytest.approx(theirs[m], abs=1e-12), (m, mine[m], theirs[m])

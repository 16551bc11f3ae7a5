"""The default path's cost, counted, not timed: one train.py fold at default flags on a small
planted cache, with the KNN head's query rows (what the fold sends to knn.knn_scores) and the rows
the head scores in eval mode (HashHead.forward outside training) counted by wrappers.

By design the KNN head asks at most one query per caption under every scoring rule (one per image
under "mean"), and a validation pass set runs the head at most T + 1 times per image under the
default "each_mean" (each of T caption slots alone, then their mean): a default that scores every
caption subset (2^5 - 1 = 31 passes, and a KNN vote per subset) fails here whatever the machine's
speed.

    python -m pytest -q tests/test_cost.py
"""

import json

import pytest

import features
import knn
import model
import synthetic
import train

N_IMAGES = 1200  # planted: 1..5 captions per image; fold 0 validates on 228 of them


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(features path, splits path, n_captions of fold 0's validation images, caption slots T,
    training images)."""
    root = tmp_path_factory.mktemp("cost")
    feats, splits = synthetic.write_planted_cache(str(root), N_IMAGES)
    tensors, _ = features.load_features(feats)
    with open(splits) as f:
        s = json.load(f)
    val = set(s["val_folds"][0])
    row = {int(i): r for r, i in enumerate(tensors["ids"].tolist())}
    n_val = [int(tensors["n_captions"][row[i]]) for i in sorted(val)]
    n_train = len(set(s["dev"]) - val)
    return feats, splits, n_val, int(tensors["text"].shape[1]), n_train


def counted_fold(cache, out_dir, monkeypatch, *flags):
    """train.main on fold 0 (--epochs 2, CPU) -> (KNN query rows, eval rows of each validation,
    eval rows outside validation: the end-of-run KNN head's database and queries)."""
    feats, splits = cache[:2]
    counts = {"knn": 0, "validations": [], "other": 0}
    in_validation = [False]
    real_knn, real_forward, real_validate = knn.knn_scores, model.HashHead.forward, train.validate

    def knn_scores(query_codes, *a, **k):
        counts["knn"] += len(query_codes)
        return real_knn(query_codes, *a, **k)

    def forward(self, img, *a, **k):
        if not self.training:  # scoring, not a training step
            if in_validation[0]:
                counts["validations"][-1] += len(img)
            else:
                counts["other"] += len(img)
        return real_forward(self, img, *a, **k)

    def validate(*a, **k):
        counts["validations"].append(0)
        in_validation[0] = True
        try:
            return real_validate(*a, **k)
        finally:
            in_validation[0] = False

    monkeypatch.setattr(knn, "knn_scores", knn_scores)
    monkeypatch.setattr(model.HashHead, "forward", forward)
    monkeypatch.setattr(train, "validate", validate)
    argv = ["--features", feats, "--splits", splits, "--fold", "0", "--out_dir", str(out_dir)]
    argv += ["--epochs", "2", "--device", "cpu", "--num_threads", "1", *flags]
    train.main(train.get_args_parser().parse_args(argv))
    return counts


def test_default_fold_cost_is_bounded_by_the_captions(cache, tmp_path, monkeypatch):
    _, _, n_val, T, n_train = cache
    counts = counted_fold(cache, tmp_path / "default", monkeypatch)
    # (a) the KNN head: at most one query per caption (one for an image without any)
    bound = sum(max(1, n) for n in n_val)
    assert 0 < counts["knn"] <= bound, (
        f"the KNN head sent {counts['knn']} query rows for {len(n_val)} validation images "
        f"({counts['knn'] / len(n_val):.1f} per image); by design at most one per caption: {bound}"
    )
    # (b) each validation runs the head at most T + 1 times per image (each slot, then the mean)
    assert len(counts["validations"]) == 2
    for rows in counts["validations"]:
        assert 0 < rows <= len(n_val) * (T + 1), (
            f"a validation scored {rows} rows for {len(n_val)} images "
            f"({rows / len(n_val):.1f} passes per image); by design at most T + 1 = {T + 1}"
        )
    # and the end-of-run KNN head scores the training images (its database) and the validation
    # images (its queries) the same way, once each
    assert counts["other"] <= (n_train + len(n_val)) * (T + 1), counts["other"]


@pytest.mark.parametrize("rule", ["each", "subsets", "mean"])
def test_every_rule_keeps_the_knn_head_within_the_captions(cache, tmp_path, monkeypatch, rule):
    """Whatever the rule's passes, the KNN head asks the single-caption passes' codes (at most one
    query per caption), and under "mean" one query per image, its averaged code."""
    n_val = cache[2]
    counts = counted_fold(cache, tmp_path / rule, monkeypatch, "--scoring", rule)
    if rule == "mean":
        assert counts["knn"] == len(n_val), counts["knn"]
    else:
        assert 0 < counts["knn"] <= sum(max(1, n) for n in n_val), counts["knn"]

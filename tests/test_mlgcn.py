"""mlgcn.py: the label graph against a transcription of the paper's formulas, built from the
training labels only, ML-GCN against the same model without the graph on planted labels, and
train.py --head mlgcn end to end (checkpoint rebuilt by runs.build_head, evaluate.py)."""

import numpy as np
import pytest
import torch

import data
import evaluate
import features
import metrics
import mlgcn
import runs
import synthetic
import train


def graph_reference(labels, tau, p):
    """ML-GCN's re-weighted correlation matrix, entry by entry (C x C loops over the images)."""
    y = labels.tolist()
    n, c = len(y), len(y[0])
    count = [sum(y[r][i] for r in range(n)) for i in range(c)]
    a = [[0.0] * c for _ in range(c)]
    for i in range(c):
        for j in range(c):
            both = sum(y[r][i] * y[r][j] for r in range(n))
            if i != j and count[i] > 0 and both / count[i] >= tau:
                a[i][j] = 1.0
    out = [[0.0] * c for _ in range(c)]
    for i in range(c):
        deg = sum(a[i][j] for j in range(c) if j != i)
        for j in range(c):
            if i == j:
                out[i][j] = 1.0 - p if deg > 0 else 1.0
            elif deg > 0:
                out[i][j] = p * a[i][j] / deg
    return torch.tensor(out)


def test_graph_equals_its_transcription():
    g = np.random.default_rng(0)
    y = (g.random((60, 7)) < 0.3).astype(np.float32)
    y[:, 1] = y[:, 0] * (g.random(60) < 0.7)  # class 1 implies class 0: an edge 1 -> 0
    y[:, 6] = 0  # a class never seen: no row, no neighbours
    y = torch.from_numpy(y)
    for tau, p in ((0.4, 0.2), (0.25, 0.3)):
        got = mlgcn.correlation_matrix(y, tau, p)
        assert torch.allclose(got, graph_reference(y, tau, p), atol=1e-6)
    a = mlgcn.correlation_matrix(y)
    assert a[1, 0] > 0 and a[6, 6] == 1.0 and torch.allclose(a.sum(1), torch.ones(7))


def _fold(n_train=80, n_val=40, seed=0):
    """A fold as features.load_fold returns it, with class prompts."""
    f = synthetic.make_planted_features(n_train + n_val, dim=32, num_classes=6, seed=seed)
    fold = {"skipped": {"train": 0, "val": 0}, "meta": f["meta"]}
    fold["prompts"] = torch.from_numpy(f["prompts"])
    for name, rows in (("train", slice(0, n_train)), ("val", slice(n_train, None))):
        fold[name] = {
            k: torch.from_numpy(f[k][rows])
            for k in ("ids", "image", "text", "n_captions", "labels")
        }
    return fold


def _args(*extra):
    argv = ["--features", "f", "--splits", "s", "--out_dir", "o", "--head", "mlgcn"]
    return train.get_args_parser().parse_args(argv + ["--device", "cpu", *extra])


def test_graph_comes_from_the_training_labels_only():
    fold = _fold()
    adj = train.build_run(_args(), fold=fold)["head"].classifier.adj.clone()
    assert not torch.equal(adj, torch.eye(len(adj)))  # the planted labels co-occur: edges
    fold["val"]["labels"] = 1 - fold["val"]["labels"]  # every validation label flipped
    assert torch.equal(train.build_run(_args(), fold=fold)["head"].classifier.adj, adj)
    fold["train"]["labels"] = fold["train"]["labels"].roll(1, dims=1)  # the training labels move
    assert not torch.equal(train.build_run(_args(), fold=fold)["head"].classifier.adj, adj)
    plain = train.build_run(_args("--head", "mlgcn_nograph"), fold=fold)["head"]
    assert torch.equal(plain.classifier.adj, torch.eye(len(adj)))  # the ablation: no edges


def _fit(graph, x, y, seed=0, epochs=20):
    """ML-GCN (graph) or the same model over the identity, image only, trained by BCE (AdamW lr
    1e-2, batch 32) -> the head."""
    torch.manual_seed(seed)
    head = mlgcn.MLGCNHead(
        x.shape[1],
        y.shape[1],
        16,
        graph=graph,
        inputs="image",
        decompose=False,
        input_norm="none",
        input_dropout=0.0,
        dropout=0.0,
    )
    nodes = torch.randn(y.shape[1], 16, generator=torch.Generator().manual_seed(seed))
    mlgcn.fit_graph(head, y, nodes)
    head.init_prior(y.mean(0))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 32):
            r = perm[s : s + 32]
            logits = head(x[r]).logits
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def _test_map(head, x, y):
    with torch.no_grad():
        probs = torch.sigmoid(head(x).logits).numpy()
    return metrics.compute_all(y.numpy().astype(np.uint8), probs)["mAP_macro"]


def graph_gain(n_train, cooccur, seed):
    """val mAP of ML-GCN minus that of the same model without the graph, trained on n_train planted
    images (synthetic.planted_concepts: 10 classes, two per concept) and scored on 2,000 more."""
    x, y = map(
        torch.from_numpy, synthetic.planted_concepts(n_train + 2000, cooccur=cooccur, seed=seed)
    )
    (xt, yt), (xv, yv) = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    return _test_map(_fit(True, xt, yt), xv, yv) - _test_map(_fit(False, xt, yt), xv, yv)


@pytest.mark.parametrize("cooccur", [True, False])
def test_graph_helps_when_labels_cooccur(cooccur, one_thread):
    """Seeds 0-3, 100 training images each: co-occurring labels gain (measured +0.017, +0.033,
    -0.016, +0.024), independent ones do not lose (+0.0003, -0.004, +0.001, 0.0)."""
    gains = [graph_gain(100, cooccur, seed) for seed in range(4)]
    if cooccur:
        assert np.mean(gains) > 0.01 and sum(g > 0 for g in gains) >= 3, gains
    else:  # few chance edges (a rare class's P(j | i) >= tau), so nearly the same model
        assert np.mean(gains) > -0.005, gains


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Planted features WITH class prompts, and a 3-fold random splits file."""
    root = tmp_path_factory.mktemp("mlgcn_cache")
    f = synthetic.make_planted_features(300, seed=0)
    ids = f["ids"].tolist()
    order = np.random.default_rng(0).permutation(ids).tolist()
    test, dev = sorted(order[:40]), sorted(order[40:])
    folds = [sorted(dev[k::3]) for k in range(3)]
    splits = dict(method="random", folds=3, seed=0, categories=data.COCO_CATEGORIES, dev=dev)
    splits.update(test=test, val_folds=folds, stats=[{"size": len(v)} for v in folds])
    features.save_features(
        root / "features.safetensors", {k: v for k, v in f.items() if k != "meta"}, f["meta"]
    )
    data.save_json(root / "splits.json", splits)
    return root / "features.safetensors", root / "splits.json"


def _train(cache, out, *extra):
    argv = ["--features", str(cache[0]), "--splits", str(cache[1]), "--out_dir", str(out)]
    argv += ["--batch_size", "16", "--device", "cpu", "--num_threads", "1", "--epochs", "2"]
    train.main(train.get_args_parser().parse_args(argv + [str(a) for a in extra]))


@pytest.mark.parametrize("inputs", ["image", "both"])
def test_train_mlgcn_end_to_end(inputs, cache, tmp_path, one_thread):
    out = tmp_path / inputs
    _train(cache, out, "--head", "mlgcn", "--inputs", inputs)
    head, ck = runs.load_checkpoint(str(out / "best.pt"))
    assert isinstance(head, mlgcn.MLGCNHead) and ck["model_args"]["head"] == "mlgcn"
    assert ck["model_args"]["inputs"] == inputs and ck["model_args"]["bits"] == 0
    assert not torch.equal(head.classifier.adj, torch.eye(80))  # the fold's graph, saved
    argv = ["--checkpoint", str(out / "best.pt"), "--bootstrap", "0"]
    res = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    assert 0 < res["ensemble"]["mlp"]["mAP_macro"] <= 1


def test_train_mlgcn_needs_prompts(tmp_path, capsys):
    import test_train

    feats, splits = test_train._write_cache(tmp_path)  # a cache without prompts
    with pytest.raises(SystemExit) as e:
        _train((feats, splits), tmp_path / "out", "--head", "mlgcn")
    assert e.value.code == 2 and "--prompts" in capsys.readouterr().err

"""One recipe and nothing COCO-only after the cache: the defaults of HashHead / head_loss / knn_scores are the ones
train.py and evaluate.py use; any class count trains and evaluates end to end; a dataset without captions goes
through the second loader (data.load_jsonl) with --inputs image; an image without text is scored from its image."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import aggregate
import data
import features
import evaluate
import extract_features
import knn
import make_splits
import metrics
import model
import synthetic
import train

BASE = ["--features", "f", "--splits", "s", "--out_dir", "o"]


def run(script, *argv):
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def test_defaults_are_one_recipe():
    args = train.get_args_parser().parse_args(BASE)
    for n in (
        100,
        model.SMALL_DATA - 1,
        model.SMALL_DATA,
        10**6,
    ):  # with a hash layer: one recipe at every size
        assert (
            train.model_args_of(args, 768, 80, n) == model.HashHead().model_args
        )  # HashHead() is train.py's model
        assert train.resolved(args, n)["lr"] == model.recipe_defaults(64)["lr"] == 1e-2
    assert (
        model.HashHead().model_args["mlp_dims"] == []
        and model.HashHead().model_args["code_from"] == "evidence"
    )
    loss = {
        k: getattr(args, k)
        for k in ("hash_weight", "lambda_balance", "lambda_decorr", "sign_weight")
    }
    assert loss == {k: train.inspect.signature(model.head_loss).parameters[k].default for k in loss}
    # the bits-0 baseline: an MLP from SMALL_DATA training images on, the linear head below
    zero = train.get_args_parser().parse_args(BASE + ["--bits", "0"])
    big = model.recipe_defaults(0, model.SMALL_DATA)
    assert (
        train.model_args_of(zero, 768, 80, model.SMALL_DATA)
        == model.HashHead(bits=0, **{k: big[k] for k in ("mlp_dims", "input_norm")}).model_args
    )
    assert (
        big["mlp_dims"] == model.BASELINE_MLP
        and train.resolved(zero, model.SMALL_DATA)["lr"] == 3e-4
    )
    assert (
        train.model_args_of(zero, 768, 80, model.SMALL_DATA - 1)
        == model.HashHead(bits=0).model_args
    )
    assert (
        train.resolved(zero, 100)["lr"] == 1e-2
        and model.HashHead(bits=0).model_args["input_dropout"] == 0.0
    )
    assert big["input_dropout"] == 0.5 and model.HashHead().model_args["input_dropout"] == 0.35
    # input dropout follows the architecture: an explicit MLP without codes gets the MLP's at any size
    wide = train.get_args_parser().parse_args(BASE + ["--bits", "0", "--mlp_dims", "256"])
    assert (
        train.resolved(wide, 100)["input_dropout"] == 0.5
        and train.resolved(zero, 100)["input_dropout"] == 0.0
    )
    mlp = train.get_args_parser().parse_args(
        BASE + ["--mlp_dims", "256", "--lr", "1e-3"]
    )  # a flag beats the rule
    assert (
        train.model_args_of(mlp, 768, 80, 100)["mlp_dims"] == [256]
        and train.resolved(mlp, 100)["lr"] == 1e-3
    )
    ev = evaluate.get_args_parser().parse_args(["--ensemble", "r"])
    sig = train.inspect.signature(knn.knn_scores).parameters
    assert (ev.knn_k, ev.knn_tau, ev.knn_vote, ev.knn_query) == tuple(
        sig[k].default for k in ("k", "tau", "vote", "query")
    )
    assert (ev.knn_k, ev.knn_query) == (100, "real")


def test_image_without_text_is_scored_from_its_image():
    torch.manual_seed(0)
    head = model.HashHead(dim=16, num_classes=5, mlp_dims=(8,), bits=16, input_norm="batchnorm")
    head.train()
    head(torch.randn(64, 16) * 5, torch.randn(64, 16) * 3)  # running stats away from their init
    head.eval()
    img = torch.randn(4, 16) * 5
    none = head(img, torch.zeros(4, 16))
    # by hand: the text columns of the standardised fusion vector at 0, i.e. at their training mean
    x = head.input_norm(head.fuse(img, torch.ones(4, 16)))  # any text: its columns are replaced
    x[:, head.text_cols] = 0
    h = torch.tanh(head.hash(torch.relu(head.evidence(head.mlp(x)) - head.prior_logit)))
    torch.testing.assert_close(none.logits, head.classifier(h))
    torch.testing.assert_close(head(img).logits, none.logits)  # txt None: the same
    # score_embeddings: an image with no caption is one pass with no text; others average their captions
    txt = torch.randn(4, 3, 16)
    n = torch.tensor([0, 3, 1, 2])
    txt[n[:, None] <= torch.arange(3)] = 0
    s = model.score_embeddings(head, img, txt, n, text_input="each")
    torch.testing.assert_close(s.probs[0], torch.sigmoid(none.logits[0]))
    want = torch.stack(
        [torch.sigmoid(head(img[1:2], txt[1:2, c]).logits[0]) for c in range(3)]
    ).mean(0)
    torch.testing.assert_close(s.probs[1], want)
    # "mean": one pass per non-empty subset of the image's captions, on its mean; per-pass codes and mask
    mean = model.score_embeddings(head, img, txt, n, text_input="mean", keep_captions=True)
    assert mean.caption_mask.sum(1).tolist() == [1, 7, 1, 3]  # 2^n - 1 passes; one with no text
    subsets = [
        txt[1, list(c)].mean(0) for k in (1, 2, 3) for c in itertools.combinations(range(3), k)
    ]
    out = head(img[1:2].expand(7, -1), torch.stack(subsets))
    torch.testing.assert_close(mean.probs[1], torch.sigmoid(out.logits).mean(0))
    torch.testing.assert_close(mean.codes[1], out.codes.mean(0))
    torch.testing.assert_close(mean.caption_codes[1], out.codes)
    two = head(img[3:4].expand(3, -1), torch.stack([txt[3, 0], txt[3, 1], txt[3, :2].mean(0)]))
    torch.testing.assert_close(mean.probs[3], torch.sigmoid(two.logits).mean(0))
    torch.testing.assert_close(mean.probs[0], s.probs[0])
    assert not mean.caption_codes[3, ~mean.caption_mask[3]].any()


def _planted_run(root, num_classes, categories, *flags, n=360, folds=2, dim=32, train_folds=None):
    feats = synthetic.make_planted_features(
        n, dim=dim, seed=3, num_classes=num_classes, categories=categories
    )
    features.save_features(root / "f.safetensors", feats, feats["meta"])
    ids = feats["ids"].tolist()
    test, dev = sorted(ids[:60]), sorted(ids[60:])
    splits = {
        "protocol": "karpathy_cv",
        "method": "random",
        "folds": folds,
        "seed": 0,
        "categories": json.loads(feats["meta"]["categories"]),
        "dev": dev,
        "test": test,
        "val_folds": [dev[k::folds] for k in range(folds)],
        "stats": [{}] * folds,
    }
    data.save_json(root / "s.json", splits)
    for k in range(folds if train_folds is None else train_folds):
        run(
            train,
            "--features",
            root / "f.safetensors",
            "--splits",
            root / "s.json",
            "--fold",
            k,
            "--out_dir",
            root / "run" / f"fold{k}",
            "--epochs",
            2,
            "--bits",
            16,
            "--mlp_dims",
            32,
            "--batch_size",
            16,
            "--device",
            "cpu",
            "--num_threads",
            1,
            *flags,
        )
    return feats


def test_81_classes_not_cocos_train_and_evaluate(tmp_path, capsys):
    cats = [{"id": 100 + i, "name": f"thing {i}"} for i in range(81)]
    _planted_run(tmp_path, 81, cats)
    val = json.loads((tmp_path / "run" / "fold0" / "val_metrics.json").read_text())
    assert set(metrics.METRIC_NAMES) <= set(val) and set(metrics.METRIC_NAMES) <= set(val["knn"])
    rep = run(
        evaluate,
        "--ensemble",
        tmp_path / "run",
        "--head",
        "both",
        "--bootstrap",
        20,
        "--device",
        "cpu",
    )
    assert rep["heads"] == ["mlp", "knn"] and rep["n_images"] == 60
    rows = (tmp_path / "run" / "eval_test" / "per_class.csv").read_text().splitlines()
    assert len(rows) == 82 and "thing 80" in "".join(rows)
    confusion = (tmp_path / "run" / "eval_test" / "confusion.csv").read_text().splitlines()
    assert len(confusion) == 82
    # a splits file naming other classes than the cache is refused in one line
    s = json.loads((tmp_path / "s.json").read_text())
    s["categories"][5]["name"] = "something else"
    data.save_json(tmp_path / "s2.json", s)
    with pytest.raises(SystemExit) as e:
        run(
            train,
            "--features",
            tmp_path / "f.safetensors",
            "--splits",
            tmp_path / "s2.json",
            "--out_dir",
            tmp_path / "bad",
            "--device",
            "cpu",
        )
    assert e.value.code == 2 and "categories are not the" in capsys.readouterr().err


def test_image_only_inputs_learn(tmp_path):
    # the image alone carries every planted label (its caption only some): at the calibrated 768 dimensions the
    # image-only head learns them (measured here: 0.147 val mAP_macro, chance 0.037, 1,455 training images, 8 epochs)
    feats = _planted_run(
        tmp_path,
        80,
        None,
        "--inputs",
        "image",
        "--epochs",
        8,
        "--patience",
        0,
        "--mlp_dims",
        256,
        "--bits",
        64,
        n=2000,
        folds=4,
        dim=768,
        train_folds=1,
    )
    ck = torch.load(tmp_path / "run" / "fold0" / "best.pt", weights_only=True)
    assert ck["model_args"]["inputs"] == "image" and ck["model_args"]["dim"] == 768
    z = np.load(tmp_path / "run" / "fold0" / "val_predictions.npz")
    keep = z["labels"].sum(0) > 0
    chance = z["labels"][:, keep].mean()  # AP of a random ranking = the prevalence
    got = metrics.compute_all(z["labels"][:, keep], z["probs"][:, keep])["mAP_macro"]
    print(f"image-only head: val mAP_macro {got:.3f}, chance {chance:.3f}")
    assert got > 3 * chance
    assert feats["labels"].shape[1] == 80


def _jsonl_dataset(root, n=48, classes=20, seed=0):
    """A generated 20-class image dataset without captions, as a JSON-lines manifest (the second loader)."""
    rng = np.random.default_rng(seed)
    names = [f"shape{c:02d}" for c in range(classes)]
    lines = []
    for i in range(n):
        present = sorted(rng.choice(classes, size=int(rng.integers(1, 4)), replace=False).tolist())
        img = Image.new("RGB", (40, 40), (120, 120, 120))
        for c in present:  # a coloured block per class at its own place
            img.paste(
                (37 * c % 256, 91 * c % 256, 53 * c % 256),
                (8 * (c % 5), 8 * (c // 5), 8 * (c % 5) + 7, 8 * (c // 5) + 7),
            )
        (root / "img").mkdir(exist_ok=True)
        img.save(root / "img" / f"{i}.png")
        lines.append(
            json.dumps(
                {
                    "id": 1000 + i,
                    "image": f"img/{i}.png",
                    "labels": [names[c] for c in present],
                    "split": "test" if i % 6 == 0 else "train",
                }
            )
        )
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def test_second_loader_20_classes_without_captions(tmp_path, tiny_siglip, capsys):
    manifest = _jsonl_dataset(tmp_path)
    ds = data.load_dataset(manifest)
    assert ds["labels"].shape == (48, 20) and all(c == [] for c in ds["captions"])
    run(make_splits, "--data_root", manifest, "--folds", 2, "--out", tmp_path / "s.json")
    run(
        extract_features,
        "--data_root",
        manifest,
        "--model",
        tiny_siglip,
        "--out",
        tmp_path / "f.safetensors",
        "--device",
        "cpu",
        "--num_workers",
        0,
        "--batch_size",
        16,
    )
    tensors, meta = features.load_features(tmp_path / "f.safetensors")
    assert tensors["labels"].shape == (48, 20) and int(tensors["n_captions"].max()) == 0
    common = [
        "--features",
        tmp_path / "f.safetensors",
        "--splits",
        tmp_path / "s.json",
        "--epochs",
        2,
        "--bits",
        16,
        "--mlp_dims",
        16,
        "--batch_size",
        8,
        "--device",
        "cpu",
        "--num_threads",
        1,
    ]
    with pytest.raises(SystemExit) as e:  # nothing to read in the text slot: said in one line
        run(train, *common, "--out_dir", tmp_path / "both")
    assert e.value.code == 2 and "--inputs image" in capsys.readouterr().err
    for k in range(2):
        run(
            train,
            *common,
            "--inputs",
            "image",
            "--fold",
            k,
            "--out_dir",
            tmp_path / "run" / f"fold{k}",
        )
    rep = run(
        evaluate,
        "--ensemble",
        tmp_path / "run",
        "--head",
        "both",
        "--bootstrap",
        0,
        "--device",
        "cpu",
    )
    assert rep["n_images"] == 8 and len(rep["ensemble"]["knn"]) >= len(metrics.METRIC_NAMES)
    run(aggregate, tmp_path / "run")  # the image-only run's CV table, both heads
    assert "knn_mean" in (tmp_path / "run" / "cv_results.csv").read_text()


def _views_cache(root, views=3):
    """Planted features with `views` image views: view v = view 0 + a small, view-specific offset."""
    feats = synthetic.make_planted_features(240, dim=32, seed=5)
    img = feats["image"].astype(np.float32)  # (N, 1, D)
    offsets = np.random.default_rng(0).standard_normal((1, views, 32)).astype(np.float32) * 0.5
    offsets[:, 0] = 0
    feats["image"] = (img + offsets).astype(np.float16)  # (N, V, D)
    feats["meta"]["views"] = views
    features.save_features(root / "f.safetensors", feats, feats["meta"])
    ids = feats["ids"].tolist()
    test, dev = sorted(ids[:40]), sorted(ids[40:])
    data.save_json(
        root / "s.json",
        {
            "protocol": "karpathy_cv",
            "method": "random",
            "folds": 2,
            "seed": 0,
            "categories": data.COCO_CATEGORIES,
            "dev": dev,
            "test": test,
            "val_folds": [dev[0::2], dev[1::2]],
            "stats": [{}, {}],
        },
    )
    return feats


def test_views_sampled_per_epoch_and_averaged_at_evaluation(tmp_path, monkeypatch):
    feats = _views_cache(tmp_path)
    seen = []
    real = model.HashHead.forward

    def spy(self, img, txt=None, groups=1):
        if self.training:
            seen.append(img.detach().clone())
        return real(self, img, txt, groups)

    monkeypatch.setattr(model.HashHead, "forward", spy)
    run(
        train,
        "--features",
        tmp_path / "f.safetensors",
        "--splits",
        tmp_path / "s.json",
        "--out_dir",
        tmp_path / "run" / "fold0",
        "--epochs",
        2,
        "--patience",
        0,
        "--bits",
        16,
        "--mlp_dims",
        16,
        "--batch_size",
        10,
        "--device",
        "cpu",
    )
    monkeypatch.setattr(model.HashHead, "forward", real)
    per_epoch = len(seen) // 2
    table = torch.from_numpy(feats["image"]).float()  # (N, V, D)
    for epoch in (seen[:per_epoch], seen[per_epoch:]):
        rows = torch.cat(epoch)  # (n_train, D): which view of which image each training row is
        match = (rows[:, None, None] == table[None]).all(-1)  # (n_train, N, V)
        assert bool((match.flatten(1).sum(1) == 1).all())  # every row is exactly one cached view
        used = match.any(1).float().mean(0)  # (V,) share of the rows taken from each view
        assert bool((used > 0.2).all()), used  # all three views are drawn, about a third each
    first, second = (torch.cat(e) for e in (seen[:per_epoch], seen[per_epoch:]))
    assert not torch.equal(first, second)  # a fresh draw each epoch
    seen.clear()
    monkeypatch.setattr(model.HashHead, "forward", spy)
    run(
        train,
        "--features",
        tmp_path / "f.safetensors",
        "--splits",
        tmp_path / "s.json",
        "--out_dir",
        tmp_path / "plain_view",
        "--epochs",
        1,
        "--bits",
        16,
        "--mlp_dims",
        16,
        "--batch_size",
        10,
        "--device",
        "cpu",
        "--train_views",
        "plain",
    )
    monkeypatch.setattr(model.HashHead, "forward", real)
    match = (torch.cat(seen)[:, None, None] == table[None]).all(-1)
    assert bool(match[:, :, 0].any(1).all()) and not bool(match[:, :, 1:].any())  # view 0 only
    plain = run(
        evaluate,
        "--checkpoint",
        tmp_path / "run" / "fold0" / "best.pt",
        "--bootstrap",
        0,
        "--device",
        "cpu",
        "--out_dir",
        tmp_path / "plain",
    )
    tta = run(
        evaluate,
        "--checkpoint",
        tmp_path / "run" / "fold0" / "best.pt",
        "--bootstrap",
        0,
        "--device",
        "cpu",
        "--average_views",
        "--out_dir",
        tmp_path / "tta",
    )
    p0 = np.load(tmp_path / "plain" / "test_predictions.npz")["probs"]
    pa = np.load(tmp_path / "tta" / "test_predictions.npz")["probs"]
    head = model.HashHead(
        **torch.load(tmp_path / "run" / "fold0" / "best.pt", weights_only=True)["model_args"]
    )
    head.load_state_dict(
        torch.load(tmp_path / "run" / "fold0" / "best.pt", weights_only=True)["model"]
    )
    rows = np.searchsorted(
        feats["ids"], np.load(tmp_path / "plain" / "test_predictions.npz")["ids"]
    )
    t = torch.from_numpy(feats["text"][rows])
    n = torch.from_numpy(feats["n_captions"][rows])
    want = torch.stack(
        [model.score_embeddings(head, table[rows, v], t, n).probs for v in range(3)]
    ).mean(0)
    np.testing.assert_allclose(pa, want.numpy(), atol=1e-6)
    assert not np.allclose(p0, pa) and plain["n_images"] == tta["n_images"] == 40


def test_hashnet_protocol_retrieval_end_to_end(tmp_path):
    """A splits file with a retrieval database: evaluate.py ranks the test codes against the database's codes
    (minus the queries) and reports mAP@5000 / @all under every counting rule, each equal to retrieval_map."""
    import retrieval

    feats = synthetic.make_planted_features(400, dim=32, seed=6)
    features.save_features(tmp_path / "f.safetensors", feats, feats["meta"])
    ids = feats["ids"].tolist()
    test, dev, rest = sorted(ids[:50]), sorted(ids[50:250]), ids[250:]
    database = sorted(
        dev + rest
    )  # every labelled image that is not a query, the training images included
    data.save_json(
        tmp_path / "s.json",
        {
            "protocol": "hashnet",
            "method": "random",
            "folds": 2,
            "seed": 0,
            "categories": data.COCO_CATEGORIES,
            "dev": dev,
            "test": test,
            "database": database,
            "val_folds": [dev[0::2], dev[1::2]],
            "stats": [{}, {}],
        },
    )
    ck_path = tmp_path / "run" / "fold0" / "best.pt"
    run(
        train,
        "--features",
        tmp_path / "f.safetensors",
        "--splits",
        tmp_path / "s.json",
        "--out_dir",
        ck_path.parent,
        "--epochs",
        2,
        "--bits",
        16,
        "--mlp_dims",
        16,
        "--batch_size",
        16,
        "--device",
        "cpu",
    )
    rep = run(
        evaluate, "--checkpoint", ck_path, "--bootstrap", 0, "--device", "cpu"
    )  # retrieval on by protocol
    got = rep["retrieval"]["fold0"]
    assert set(got) == {
        f"mAP@{k}{e}{t}" for k in (5000, "all") for e in ("", "_skip") for t in ("", "_avgties")
    }
    ck = torch.load(ck_path, weights_only=True)
    head = model.HashHead(**ck["model_args"])
    head.load_state_dict(ck["model"])

    def codes(which):
        r = np.searchsorted(feats["ids"], which)
        s = model.score_embeddings(
            head,
            torch.from_numpy(feats["image"][r, 0]),
            torch.from_numpy(feats["text"][r]),
            torch.from_numpy(feats["n_captions"][r]),
        )
        return knn.sign_codes(s.codes).numpy(), feats["labels"][r]

    want = retrieval.retrieval_maps(*codes(test), *codes(database), 5000)
    assert got == pytest.approx(want, abs=1e-12)

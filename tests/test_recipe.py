"""One recipe and nothing COCO-only after the cache: model.HeadConfig holds the defaults train.py's
flags, HashHead() and head_loss use (and knn_scores' those of evaluate.py's KNN flags); the scoring
rules score an image over its captions; any class count trains and evaluates end to end; a dataset
without captions goes through the second loader (data.load_jsonl) with --inputs image; an image
without text is scored from its image."""

import dataclasses
import inspect
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


def _resolved_arch(n_train=None, **flags):
    """HashHead's model_args for HeadConfig(**flags) resolved for n_train images (768-d, 80)."""
    cfg = model.HeadConfig(**flags).resolved(n_train)
    return model.HashHead(768, 80, **cfg.arch()).model_args


def test_defaults_are_one_recipe():
    """HeadConfig is the one home of the recipe: train.py's flags default to its fields, HashHead()
    is its resolved architecture, head_loss's weights are its loss fields."""
    parser = train.get_args_parser()
    args = parser.parse_args(BASE)
    for f in dataclasses.fields(model.HeadConfig):
        assert parser.get_default(f.name) == f.default == getattr(args, f.name), f.name
    big = model.HeadConfig().resolved()  # n_train None: a large set
    assert model.HashHead().model_args == dict(
        dim=768, num_classes=80, **dict(big.arch(), mlp_dims=list(big.mlp_dims))
    )
    for n in (100, model.SMALL_DATA - 1, model.SMALL_DATA, 10**6):  # with codes: one recipe
        cfg = train.head_config(args, n)
        assert train.model_args_of(args, cfg, 768, 80) == model.HashHead().model_args
        assert cfg.lr == 1e-2 and cfg.scoring == "each_mean" and cfg.text_input == "mean"
    head = model.HashHead().model_args
    assert head["mlp_dims"] == [] and head["code_from"] == "evidence" and head["bits"] == 64
    assert head["input_dropout"] == 0.35 and head["code_gain"] == 5.0
    # head_loss without weights is head_loss with HeadConfig's
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) < 0.3).float()
    h, sl = torch.tanh(torch.randn(8, 16, generator=g)), torch.randn(8, 5, generator=g)
    weights = {k: getattr(model.HeadConfig(), k) for k in model.LOSS_FIELDS}
    weights.update(hash_weight=0.5, sign_weight=0.3)  # the defaults are 0: show the others act
    loss, terms = model.head_loss(logits, y, h, sign_logits=sl, hash_weight=0.5, sign_weight=0.3)
    want, want_terms = model.head_loss(logits, y, h, sign_logits=sl, **weights)
    assert loss.item() == want.item() and terms == want_terms
    with pytest.raises(TypeError):
        model.head_loss(logits, y, h, code_gain=1.0)  # not a loss weight

    # the bits-0 baseline: from SMALL_DATA training images an MLP (HashHead(bits=0), the large
    # set's), below it the linear head
    zero = parser.parse_args(BASE + ["--bits", "0"])
    cfg = train.head_config(zero, model.SMALL_DATA)
    big0 = train.model_args_of(zero, cfg, 768, 80)
    assert big0 == model.HashHead(bits=0).model_args == _resolved_arch(bits=0)
    assert big0["mlp_dims"] == list(model.BASELINE_MLP) and big0["input_norm"] == "batchnorm"
    assert big0["input_dropout"] == 0.5 and cfg.lr == 3e-4
    cfg = train.head_config(zero, model.SMALL_DATA - 1)
    small0 = train.model_args_of(zero, cfg, 768, 80)
    # the linear head: no MLP, no input norm (HashHead's large-set rule would standardise)
    assert small0 == model.HashHead(bits=0, mlp_dims=(), input_norm="none").model_args
    assert small0["mlp_dims"] == [] and small0["input_norm"] == "none"
    assert small0["input_dropout"] == 0.0 and cfg.lr == 1e-2
    assert train.head_config(zero, 100).input_dropout == 0.0
    # input dropout follows the architecture: an explicit MLP without codes gets the MLP's
    wide = parser.parse_args(BASE + ["--bits", "0", "--mlp_dims", "256"])
    assert train.head_config(wide, 100).input_dropout == 0.5
    mlp = parser.parse_args(BASE + ["--mlp_dims", "256", "--lr", "1e-3"])  # a flag beats the rule
    cfg = train.head_config(mlp, 100)
    assert train.model_args_of(mlp, cfg, 768, 80)["mlp_dims"] == [256] and cfg.lr == 1e-3
    # the KNN head's defaults live in knn.knn_scores' signature; evaluate.py's flags follow them
    ev = evaluate.get_args_parser().parse_args(["--ensemble", "r"])
    sig = inspect.signature(knn.knn_scores).parameters
    assert (ev.knn_k, ev.knn_tau, ev.knn_vote, ev.knn_query) == tuple(
        sig[k].default for k in ("k", "tau", "vote", "query")
    )
    assert (ev.knn_k, ev.knn_query) == (100, "real")


def _help_line(parser, flag):
    """The --help line of one flag, unwrapped."""
    text = parser.format_help()
    return next(ln for ln in text.splitlines() if ln.strip().startswith(flag + " "))


def test_one_default_changes_help_config_and_head_together(tmp_path, monkeypatch, capsys):
    """Changing one default in the dataclass changes train.py's help, the printed (and written)
    config and HashHead() together: nothing else holds a copy."""
    monkeypatch.setenv("COLUMNS", "250")  # one help entry per line
    meta = {f.name: f.metadata for f in dataclasses.fields(model.HeadConfig)}["bits"]
    bits = dataclasses.field(default=32, metadata=meta)  # the dataclass, one default changed
    patched = dataclasses.make_dataclass(
        "HeadConfig", [("bits", int, bits)], bases=(model.HeadConfig,)
    )
    assert "(default: 64)" in _help_line(train.get_args_parser(), "--bits BITS")
    monkeypatch.setattr(model, "HeadConfig", patched)
    assert "(default: 32)" in _help_line(train.get_args_parser(), "--bits BITS")
    assert model.HashHead().bits == 32 and model.HashHead().model_args["bits"] == 32
    assert model.HashHead().hash.out_features == 32
    feats = synthetic.make_planted_features(200, dim=32, seed=4)
    features.save_features(tmp_path / "f.safetensors", feats, feats["meta"])
    dev = sorted(feats["ids"].tolist())
    splits = {
        "method": "random",
        "folds": 2,
        "seed": 0,
        "categories": data.COCO_CATEGORIES,
        "dev": dev,
        "test": [],
        "val_folds": [dev[0::2], dev[1::2]],
        "stats": [{}, {}],
    }
    data.save_json(tmp_path / "s.json", splits)
    out = tmp_path / "run"
    capsys.readouterr()
    data_flags = ["--features", tmp_path / "f.safetensors", "--splits", tmp_path / "s.json"]
    run(train, *data_flags, "--out_dir", out, "--epochs", 1, "--device", "cpu", "--num_threads", 1)
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("recipe: "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    recipe = " ".join(ln.strip() for ln in lines[start:end])  # printed wrapped at 100 columns
    assert ", bits 32," in recipe and all(len(ln) <= 100 for ln in lines[start:end])
    config = json.loads((out / "config.json").read_text())
    assert config["bits"] == 32 and config["model_args"]["bits"] == 32
    assert np.load(out / "val_predictions.npz")["codes"].shape[1] == 32


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
    txt = torch.randn(4, 3, 16)
    n = torch.tensor([0, 3, 1, 2])
    txt[n[:, None] <= torch.arange(3)] = 0

    def by_hand(i, texts):  # image i scored on each text row: (probs, codes) of every pass
        out = head(img[i : i + 1].expand(len(texts), -1), torch.stack(texts))
        return torch.sigmoid(out.logits), out.codes

    # "each": one pass per real caption, alone. The KNN head's queries, under every rule but
    # "mean": the single-caption passes' codes (one per caption; an image without a caption has
    # one, from its image alone)
    s = model.score_embeddings(head, img, txt, n, rule="each", keep_queries=True)
    torch.testing.assert_close(s.probs[0], torch.sigmoid(none.logits[0]))
    torch.testing.assert_close(s.codes[0], none.codes[0])
    for i in (1, 2, 3):
        p, c = by_hand(i, [txt[i, j] for j in range(int(n[i]))])
        torch.testing.assert_close(s.probs[i], p.mean(0))
        torch.testing.assert_close(s.codes[i], c.mean(0))

    def per_caption_queries(scores):
        assert scores.query_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
        torch.testing.assert_close(scores.query_codes[0, 0], none.codes[0])
        for i in (1, 2, 3):
            c = by_hand(i, [txt[i, j] for j in range(int(n[i]))])[1]
            torch.testing.assert_close(scores.query_codes[i, : int(n[i])], c)
        assert not scores.query_codes[~scores.query_mask].any()

    per_caption_queries(s)
    # "each_mean" (the default): those passes and one on the mean of all the image's captions
    both = model.score_embeddings(head, img, txt, n, keep_queries=True)
    for i in (1, 2, 3):
        texts = [txt[i, j] for j in range(int(n[i]))] + [txt[i, : int(n[i])].mean(0)]
        p, c = by_hand(i, texts)
        torch.testing.assert_close(both.probs[i], p.mean(0))
        torch.testing.assert_close(both.codes[i], c.mean(0))
    torch.testing.assert_close(both.probs[0], s.probs[0])
    per_caption_queries(both)
    # "subsets": one pass per non-empty subset of the image's captions, on its mean
    sub = model.score_embeddings(head, img, txt, n, rule="subsets", keep_queries=True)
    for i in (1, 2, 3):
        caps = range(int(n[i]))
        sets = [list(c) for k in range(1, len(caps) + 1) for c in itertools.combinations(caps, k)]
        assert len(sets) == 2 ** int(n[i]) - 1
        p, c = by_hand(i, [txt[i, c].mean(0) for c in sets])
        torch.testing.assert_close(sub.probs[i], p.mean(0))
        torch.testing.assert_close(sub.codes[i], c.mean(0))
    torch.testing.assert_close(sub.probs[0], s.probs[0])
    per_caption_queries(sub)
    # "mean": one pass on the mean of all the image's captions; one query per image, its code
    mean = model.score_embeddings(head, img, txt, n, rule="mean", keep_queries=True)
    for i in (1, 2, 3):
        p, c = by_hand(i, [txt[i, : int(n[i])].mean(0)])
        torch.testing.assert_close(mean.probs[i], p[0])
        torch.testing.assert_close(mean.codes[i], c[0])
    torch.testing.assert_close(mean.probs[0], s.probs[0])
    assert mean.query_codes.shape == (4, 1, 16) and mean.query_mask.all()
    torch.testing.assert_close(mean.query_codes[:, 0], mean.codes)
    # one rule, one result: batching does not change it
    for rule in model.SCORING_RULES:
        whole = model.score_embeddings(head, img, txt, n, rule=rule)
        parts = model.score_embeddings(head, img, txt, n, rule=rule, batch_size=3)
        torch.testing.assert_close(whole.probs, parts.probs)


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
    # the image alone carries every planted label (its caption only some): at the calibrated 768
    # dimensions the image-only head learns them (measured here: 0.147 val mAP_macro, chance
    # 0.037, 1,455 training images, 8 epochs)
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
    """A generated 20-class image dataset without captions, as a JSON-lines manifest (the second
    loader)."""
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
    """Planted features with `views` image views: view v = view 0 + a small view-specific offset."""
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
    """A splits file with a retrieval database: evaluate.py ranks the test codes against the
    database's codes (minus the queries) and reports mAP@5000 / @all under every counting rule, each
    equal to retrieval_map."""
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

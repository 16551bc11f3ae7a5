"""encoders.py: one interface over CLIP and fixed-resolution SigLIP, each family's text rule checked
against the family's own model (a tiny random CLIP saved with its real CLIPProcessor, conftest's
tiny SigLIP); extraction + training end to end on the tiny CLIP; backbones are never mixed.

python -m pytest -q tests/test_encoders.py
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import baselines
import data
import encoders
import evaluate
import extract_features
import features
import make_splits
import model
import predict
import tiny_models
import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_models.make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return encoders.load_encoder(tiny_clip)


@pytest.fixture(scope="module")
def siglip(tiny_siglip):
    return encoders.load_encoder(tiny_siglip)


CAPTIONS = ["a dog", "A cat sits on the red sofa near a window.", "pizza", "two dogs and a cat"]
LONG = " ".join((["cats", "ride", "huge", "blue", "bikes"] * 4)[:18])  # 64 < tokens <= 77


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 48), (20, 90)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)
    ]


def _clip_reference(net, ids):
    """CLIP's text embedding by hand: final hidden state at the FIRST end-of-text token of the
    unpadded caption, through text_projection. ids (1, L) -> (1, P)."""
    with torch.no_grad():
        hidden = net.text_model(input_ids=ids).last_hidden_state  # (1, L, 32), after final LN
        eos = int((ids[0] == net.config.text_config.eos_token_id).nonzero()[0])
        return net.text_projection(hidden[:, eos])


def test_families_are_chosen_from_the_config(clip, siglip, tiny_clip, tmp_path):
    assert isinstance(clip, encoders.ClipEncoder) and clip.family == "clip"
    assert isinstance(siglip, encoders.SiglipEncoder) and siglip.family == "siglip"
    assert clip.dim == 24 and siglip.dim == 32  # CLIP: projection_dim, not the hidden size
    assert clip.text_length == 77 and siglip.text_length == 64
    assert clip.logit_bias == 0.0 and clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert siglip.logit_bias == pytest.approx(-10.0)
    assert clip.encode_images(_images(3)).shape == (3, 24)
    meta = clip.cache_meta()
    assert meta["family"] == "clip" and meta["text_length"] == "77" and meta["dim"] == "24"
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(data.DataError, match=r"'bert' is not supported; supported: clip .*siglip"):
        encoders.load_encoder(str(tmp_path))
    with pytest.raises(data.DataError, match="not 'siglip'"):
        encoders.SiglipEncoder(tiny_clip)


def test_clip_text_rule_against_clip_itself(clip):
    """The cached embedding is CLIP's own text feature of the caption; SigLIP's rules are not."""
    tok = clip.tokenizer
    for caption in CAPTIONS + [LONG]:
        ids = tok([caption], return_tensors="pt")["input_ids"]  # unpadded, as CLIP was trained
        ref = _clip_reference(clip.model, ids)
        mine = clip.encode_texts([caption])
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
        own = encoders.pooled_output(clip.model.get_text_features(input_ids=ids))
        torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-5)
    # the tokenizer lowercases itself; the mask is a no-op for the causal, EOS-pooled tower
    assert torch.equal(clip.encode_texts(["A DOG"]), clip.encode_texts(["a dog"]))
    t = clip.tokenize([CAPTIONS[1]])
    assert t["input_ids"].shape == t["attention_mask"].shape == (1, 77)
    torch.testing.assert_close(
        clip.encode_tokens(t["input_ids"], torch.ones_like(t["attention_mask"])),
        clip.encode_tokens(**t),
    )
    # wrong rule 1: SigLIP's 64 tokens truncate a 65-77 token caption and move the pooled token
    n_long = len(tok([LONG])["input_ids"][0])
    assert 64 < n_long <= 77
    s = encoders.SIGLIP_TEXT(tok, [LONG])
    with torch.no_grad():
        wrong = encoders.pooled_output(clip.model.get_text_features(**s))
    assert not torch.allclose(wrong, clip.encode_texts([LONG]), atol=1e-3)
    # wrong rule 2: SigLIP's pooling (the last of the 77 padded positions)
    with torch.no_grad():
        hidden = clip.model.text_model(**t).last_hidden_state
        last = clip.model.text_projection(hidden[:, -1])
    assert not torch.allclose(last, clip.encode_tokens(**t), atol=1e-3)


def test_siglip_padding_to_64_matters(siglip):
    tok = siglip.tokenizer
    for caption in CAPTIONS:
        mine = siglip.encode_texts([caption])
        ids = tok([caption.lower()], padding="max_length", max_length=64, return_tensors="pt")
        with torch.no_grad():
            ref = encoders.pooled_output(siglip.model.get_text_features(input_ids=ids["input_ids"]))
            short = tok([caption.lower()], padding="longest", return_tensors="pt")["input_ids"]
            wrong = encoders.pooled_output(siglip.model.get_text_features(input_ids=short))
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(wrong, mine, atol=1e-3)  # the tower pools the last position
    assert set(siglip.tokenize(CAPTIONS)) == {"input_ids"}  # no attention mask, by design


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_batched_equals_one_by_one(family, clip, siglip):
    """Padding must not leak between captions / images of one batch."""
    enc = clip if family == "clip" else siglip
    texts = CAPTIONS + [LONG]
    batched = enc.encode_texts(texts)
    alone = torch.cat([enc.encode_texts([t]) for t in texts])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    imgs = _images(4, seed=3)
    torch.testing.assert_close(
        enc.encode_images(imgs),
        torch.cat([enc.encode_images([im]) for im in imgs]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_check_same_backbone_names_both():
    a = {"model": "openai/clip-vit-base-patch16", "family": "clip", "dim": "512"}
    b = {"model": "google/siglip2-base-patch16-256", "dim": "768"}  # from before "family"
    with pytest.raises(data.DataError) as e:
        encoders.check_same_backbone(a, b, "x.safetensors", "last.pt")
    msg = str(e.value)
    assert "\n" not in msg and "openai/clip-vit-base-patch16 (clip" in msg
    assert "google/siglip2-base-patch16-256 (siglip" in msg
    encoders.check_same_backbone(a, dict(a), "x", "y")  # the same backbone passes
    encoders.check_same_backbone(a, {"model": "p/clip", "family": "clip"}, "x", "y", ("family",))


# ---------------------------------------------------------------- end to end on the tiny CLIP


def _extract(coco, tiny, out):
    argv = ["--data_root", coco, "--model", tiny, "--out", out, "--device", "cpu"]
    argv += ["--num_workers", "0", "--batch_size", "8", "--shard_size", "16"]
    return extract_features.main(extract_features.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def clip_cache(synthetic_coco, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_cache") / "features.safetensors"
    _extract(synthetic_coco, tiny_clip, str(out))
    return str(out)


def test_extract_on_clip_records_the_backbone(clip_cache, clip, synthetic_coco, tiny_clip):
    t, meta = features.load_features(clip_cache)
    assert meta["model"] == tiny_clip and meta["family"] == "clip" and meta["dim"] == "24"
    assert meta["text_length"] == "77" and meta["resolution"] == "32px"
    assert float(meta["logit_bias"]) == 0.0 and float(meta["logit_scale"]) == clip.logit_scale
    assert t["image"].shape[2] == t["text"].shape[2] == t["prompts"].shape[1] == 24
    coco = data.load_coco(synthetic_coco)
    row_of = {int(i): r for r, i in enumerate(np.asarray(coco["ids"]))}
    for j in (0, len(t["ids"]) // 2):  # the cache (DataLoader path) is the encoder's own output
        r = row_of[int(t["ids"][j])]
        nc = int(t["n_captions"][j])
        want = clip.encode_texts(coco["captions"][r][:nc]).half().float()
        torch.testing.assert_close(t["text"][j, :nc].float(), want, rtol=2e-3, atol=2e-3)
        img = clip.encode_images([Image.open(coco["paths"][r]).convert("RGB")])
        torch.testing.assert_close(
            t["image"][j, 0].float(), img[0].half().float(), atol=2e-3, rtol=2e-3
        )


def test_other_backbone_into_the_same_cache_is_refused(clip_cache, synthetic_coco, tiny_siglip):
    with pytest.raises(SystemExit) as e:
        _extract(synthetic_coco, tiny_siglip, clip_cache)
    assert e.value.code == 2


def test_zeroshot_uses_clips_rule(clip_cache):
    """CLIP's logits are cos * scale, no bias: the head fitted from the cache gives exactly that."""
    t, meta = features.load_features(clip_cache)
    head = model.HashHead(**baselines.linear_head_args(24, 80, "zeroshot")).eval()
    baselines.fit_zeroshot(head, t["prompts"], meta["logit_scale"], meta["logit_bias"])
    img, txt = t["image"][:5, 0].float(), t["text"][:5, 0].float()
    cos = F.normalize(img, dim=1) @ F.normalize(t["prompts"].float(), dim=1).T  # (5, 80)
    with torch.no_grad():
        got = head(img, txt).logits
    torch.testing.assert_close(got, float(meta["logit_scale"]) * cos, rtol=1e-5, atol=1e-4)
    assert float(head.classifier.bias.detach().abs().max()) == 0.0


def test_train_one_fold_on_clip_cache_and_no_resume_across_backbones(
    clip_cache, synthetic_coco, tiny_siglip, tiny_clip, tmp_path, capsys
):
    splits = tmp_path / "splits.json"
    make_splits.main(
        make_splits.get_args_parser().parse_args(
            ["--data_root", synthetic_coco, "--folds", "2", "--out", str(splits)]
        )
    )
    argv = ["--features", clip_cache, "--splits", str(splits), "--out_dir", str(tmp_path / "r")]
    argv += ["--mlp_dims", "16", "--bits", "16", "--batch_size", "8", "--epochs", "1"]
    argv += ["--device", "cpu", "--num_threads", "1"]
    train.main(train.get_args_parser().parse_args(argv))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["features_meta"]["family"] == "clip"
    # resuming that run on a cache of another backbone is refused, naming both
    sig = tmp_path / "siglip.safetensors"
    _extract(synthetic_coco, tiny_siglip, str(sig))
    argv[1] = str(sig)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(train.get_args_parser().parse_args(argv + ["--resume", "--epochs", "2"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"{tiny_siglip} (siglip" in err and "(clip, dim 24)" in err
    # evaluating the CLIP-trained head on the SigLIP cache: refused, naming both
    best = str(tmp_path / "r" / "best.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(
            evaluate.get_args_parser().parse_args(
                ["--checkpoint", best, "--features", str(sig), "--device", "cpu"]
            )
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert tiny_siglip in err and tiny_clip in err
    # the single-image prediction: on CLIP's towers it runs; SigLIP's towers are refused
    img = data.load_coco(synthetic_coco)["paths"][0]
    probs = predict.main(
        predict.get_args_parser().parse_args(
            ["--image", img, "--checkpoint", best, "--caption", "a dog", "--device", "cpu"]
        )
    )
    assert len(probs) == 5
    with pytest.raises(SystemExit) as e:
        predict.main(
            predict.get_args_parser().parse_args(
                ["--image", img, "--checkpoint", best, "--model", tiny_siglip, "--device", "cpu"]
            )
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert e.value.code == 2 and err.startswith("error: --model")
    assert f"{tiny_siglip} (siglip" in err and f"{tiny_clip} (clip" in err

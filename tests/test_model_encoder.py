"""encoders.SiglipEncoder on a tiny random SigLIP (conftest `tiny_siglip`), make_tiny_siglip,
HashModel.predict.

python -m pytest -q tests/test_model_encoder.py
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import encoders
import model
import tiny_models


@pytest.fixture(scope="module")
def enc(tiny_siglip):
    return encoders.load_encoder(tiny_siglip)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 48), (20, 90)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)
    ]


def test_attributes_and_frozen(enc, tiny_siglip):
    assert enc.name == tiny_siglip and enc.dim == 32 and enc.image_size == 32
    assert enc.model.config.model_type == "siglip"  # as the real fixed-res SigLIP2 checkpoints
    assert enc.logit_scale == pytest.approx(10.0) and enc.logit_bias == pytest.approx(-10.0)
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    x = enc.encode_images(_images(2))
    assert x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
    assert not x.is_inference()  # an ordinary tensor: in-place ops and autograd downstream work
    x /= x.norm(dim=-1, keepdim=True)


def test_make_tiny_siglip_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(f"{tiny_models.make_tiny_siglip(tmp_path / 'a', seed=0)}/model.safetensors")
    b = load_file(f"{tiny_models.make_tiny_siglip(tmp_path / 'b', seed=0)}/model.safetensors")
    c = load_file(f"{tiny_models.make_tiny_siglip(tmp_path / 'c', seed=1)}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_embeddings_are_raw_pooled_outputs_not_normalised(enc):
    imgs = _images(4)
    texts = ["a dog on a bench", "two cats", "a red car parked near the street", "pizza"]
    x, t = enc.encode_images(imgs), enc.encode_texts(texts)
    assert x.shape == (4, 32) and t.shape == (4, 32)
    for e in (x, t):
        norms = e.norm(dim=-1)
        assert not torch.allclose(norms, torch.ones(4), atol=1e-3)  # not L2-normalised
        assert float(norms.std()) > 1e-3  # magnitudes carry information: they vary across inputs
    # independent path: the model's own forward; its image_embeds / text_embeds are our vectors
    # normalised
    pix = enc.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    ids = enc.tokenizer(
        texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = enc.model(pixel_values=pix, input_ids=ids)
    torch.testing.assert_close(x, out.vision_model_output.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, out.text_model_output.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        nn.functional.normalize(x, dim=-1), out.image_embeds, rtol=1e-5, atol=1e-5
    )


def test_text_padding_truncation_and_lowercasing(enc):
    ids = enc.tokenize(["a dog", "a photo of a cat"])["input_ids"]
    assert ids.shape == (2, 64) and ids.dtype == torch.int64
    pad = enc.tokenizer.pad_token_id
    assert int(ids[0, 2]) == enc.tokenizer.eos_token_id and bool((ids[0, 3:] == pad).all())
    # padded to 64 whatever the batch: alone or next to a longer text, the same embedding
    alone = enc.encode_texts(["a dog"])
    batched = enc.encode_texts(
        ["a dog", "a man riding a horse next to a large white truck on the road"]
    )
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-5, atol=1e-6)
    # the padding matters (the tower pools the last position): unpadded input gives another vector
    with torch.no_grad():
        short = enc.tokenizer(["a dog"], return_tensors="pt")["input_ids"]
        unpadded = encoders.pooled_output(enc.model.get_text_features(input_ids=short))
    assert not torch.allclose(unpadded[0], alone[0], atol=1e-3)
    # longer than 64 tokens: truncated, no error
    assert enc.tokenize(["dog " * 200])["input_ids"].shape == (1, 64)
    # lowercased by the encoder (the test tokenizer itself is case-sensitive, as Gemma's)
    raw = enc.tokenizer(["A DOG", "a dog"])["input_ids"]
    assert raw[0] != raw[1]
    e = enc.encode_texts(["A DOG", "a dog"])
    assert torch.equal(e[0], e[1])


def test_v4_tensor_and_v5_output_object_returns(enc, monkeypatch):
    imgs, texts = _images(3, seed=1), ["a cat", "a bus"]
    v5_img, v5_txt = enc.encode_images(imgs), enc.encode_texts(texts)
    # transformers 5.x returns BaseModelOutputWithPooling: check that is what we were given
    pix = enc.preprocess_images(imgs)
    with torch.no_grad():
        assert not isinstance(enc.model.get_image_features(pixel_values=pix), torch.Tensor)
    orig_img, orig_txt = enc.model.get_image_features, enc.model.get_text_features
    # transformers 4.x returned the pooled tensor itself
    monkeypatch.setattr(enc.model, "get_image_features", lambda **kw: orig_img(**kw).pooler_output)
    monkeypatch.setattr(enc.model, "get_text_features", lambda **kw: orig_txt(**kw).pooler_output)
    assert torch.equal(enc.encode_images(imgs), v5_img) and torch.equal(
        enc.encode_texts(texts), v5_txt
    )
    # return_dict=False: a tuple (last_hidden_state, pooler_output)
    monkeypatch.setattr(enc.model, "get_image_features", lambda **kw: orig_img(**kw).to_tuple())
    assert torch.equal(enc.encode_images(imgs), v5_img)
    with pytest.raises(TypeError):
        encoders.pooled_output({"nothing": 1})


def test_empty_inputs_and_other_dtype(enc, tiny_siglip):
    assert enc.encode_images([]).shape == (0, 32) and enc.encode_texts([]).shape == (0, 32)
    bf = encoders.load_encoder(tiny_siglip, dtype=torch.bfloat16)
    x, x32 = bf.encode_images(_images(2)), enc.encode_images(_images(2))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, x32, rtol=0.1, atol=0.1)


class StandInHead(nn.Module):
    """HashHead's interface: forward(img (B, D), txt (B, D)) -> (logits (B, 80), h (B, bits))."""

    inputs = "both"

    def __init__(self, dim=32):
        super().__init__()
        self.fc = nn.Linear(2 * dim, 80)
        self.drop = nn.Dropout(0.5)  # must be off in predict

    def forward(self, img, txt):
        h = torch.tanh(img * txt)
        return model.HeadOutput(self.fc(self.drop(torch.cat([img, txt], dim=-1))), h)


def test_hash_model_predict_matches_manual_average(enc):
    torch.manual_seed(0)
    head = StandInHead().train()
    hm = model.HashModel(enc, head, scoring="each")  # the manual average below: each caption alone
    # no frozen backbone in checkpoints
    assert set(hm.state_dict()) == {"head.fc.weight", "head.fc.bias"}
    imgs = _images(3, seed=2)
    caps = [["a dog"], ["a cat on a bed", "two cats", "A CAT"], ["a red bus", "a bus"]]
    probs = hm.predict(imgs, caps)
    assert probs.shape == (3, 80) and probs.dtype == torch.float32
    assert head.training  # mode restored
    # reference: one image at a time, embeddings rounded to float16 as in the feature cache
    head.eval()
    for i in range(3):
        v = enc.encode_images([imgs[i]]).half().float()
        ps = [torch.sigmoid(head(v, enc.encode_texts([c]).half().float())[0]) for c in caps[i]]
        torch.testing.assert_close(probs[i], torch.cat(ps).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        hm.predict(imgs, caps[:2])
    v = enc.encode_images(imgs[:1]).half().float()  # no caption: one pass with a zero text vector
    torch.testing.assert_close(
        hm.predict(imgs[:1], [[]]), torch.sigmoid(head(v, torch.zeros_like(v))[0])
    )

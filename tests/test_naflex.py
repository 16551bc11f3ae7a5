"""encoders.NaflexEncoder on a tiny random SigLIP2 NaFlex (model_type "siglip2") saved with its real
Siglip2Processor: patches, their mask and each image's patch grid through the DataLoader's collate,
batched == one by one (the padding patches must not leak), extraction with --max_num_patches, one
training fold and predict.py end to end.

python -m pytest -q tests/test_naflex.py
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoders
import extract_features
import features
import images
import make_splits
import predict
import train

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGET = 16  # patches per image of the tiny model's processor (a 4 x 4 position grid)


def make_tiny_naflex(out_dir, tokenizer_from, seed=0):
    """A tiny randomly initialised Siglip2Model (patch 8, 16 patches) + Siglip2Processor (its PIL
    NaFlex image processor, the tiny SigLIP's tokenizer) saved to out_dir -> str."""
    import transformers
    from transformers import AutoTokenizer, Siglip2Config, Siglip2Model, Siglip2Processor

    try:
        from transformers import Siglip2ImageProcessorPil as ImageProcessor
    except ImportError:  # 4.x
        from transformers import Siglip2ImageProcessor as ImageProcessor

    assert int(transformers.__version__.split(".")[0]) >= 4
    encoders.quiet_default_token_ids()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(size, vocab_size=len(tokenizer), max_position_embeddings=64, projection_size=32)
    text.update(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    config = Siglip2Config(
        text_config=text, vision_config=dict(size, patch_size=8, num_patches=BUDGET)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Siglip2Model(config).eval()
    image_processor = ImageProcessor(patch_size=8, max_num_patches=BUDGET)
    out_dir = str(out_dir)
    net.save_pretrained(out_dir)
    Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_naflex(tmp_path_factory, tiny_siglip):
    return make_tiny_naflex(tmp_path_factory.mktemp("tiny_naflex"), tiny_siglip)


@pytest.fixture(scope="module")
def enc(tiny_naflex):
    return encoders.load_encoder(tiny_naflex)


def _images(n, seed=0):
    """Different aspect ratios: each gets its own patch grid within the budget."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (30, 90), (64, 16), (100, 30)]  # 16, 12, 16, 14 patches
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)
    ]


def test_naflex_family_and_budget(enc, tiny_naflex, tiny_siglip):
    assert isinstance(enc, encoders.NaflexEncoder) and enc.family == "siglip2"
    assert enc.dim == 32 and enc.max_num_patches == BUDGET and enc.resolution == "16patches"
    meta = enc.cache_meta()
    assert meta["family"] == "siglip2" and "image_size" not in meta and meta["text_length"] == "64"
    small = encoders.load_encoder(tiny_naflex, max_num_patches=9)
    assert encoders.image_inputs(small.image_processor, _images(1))["pixel_values"].shape[1] == 9
    with pytest.raises(data.DataError, match="--max_num_patches: only for NaFlex"):
        encoders.load_encoder(tiny_siglip, max_num_patches=9)


def test_masks_and_shapes_through_the_collate(enc):
    """The DataLoader's collate carries patches, mask and grids; the mask covers exactly each
    image's rows x columns of patches, and the image tower's output is the collate's."""
    imgs = _images(4)
    items = [(i, im, [f"caption {i}"]) for i, im in enumerate(imgs)]
    collate = images.Collate(
        enc.image_processor, enc.tokenizer, list(range(4)), 1, 5, 0, enc.text_rule
    )
    loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, BUDGET, 3 * 8 * 8)
    mask, grid = batch["pixel_attention_mask"], batch["spatial_shapes"]
    assert mask.shape == (4, BUDGET) and grid.shape == (4, 2)
    assert mask.sum(1).tolist() == (grid[:, 0] * grid[:, 1]).tolist()
    assert bool((grid[:, 0] * grid[:, 1] <= BUDGET).all())
    assert len({tuple(g) for g in grid.tolist()}) > 1  # native aspect ratios, not one square size
    assert batch["input_ids"].shape == (4, 64) and "attention_mask" not in batch
    pixels = {k: batch[k] for k in enc.image_keys}
    torch.testing.assert_close(enc.encode_pixels(**pixels), enc.encode_images(imgs))


def test_naflex_batched_equals_one_by_one(enc):
    imgs = _images(4, seed=5)
    torch.testing.assert_close(
        enc.encode_images(imgs),
        torch.cat([enc.encode_images([im]) for im in imgs]),
        rtol=1e-5,
        atol=1e-5,
    )
    texts = ["a dog", "two cats on a red sofa", "pizza"]
    torch.testing.assert_close(
        enc.encode_texts(texts), torch.cat([enc.encode_texts([t]) for t in texts])
    )
    # the padding patches are masked: garbage in them changes nothing
    xs = [encoders.image_inputs(enc.image_processor, [im]) for im in imgs]
    x = next(x for x in xs if int(x["pixel_attention_mask"].sum()) < BUDGET)  # one has padding
    noisy = x["pixel_values"].clone()
    noisy[x["pixel_attention_mask"] == 0] = 5.0
    torch.testing.assert_close(
        enc.encode_pixels(**dict(x, pixel_values=noisy)), enc.encode_pixels(**x)
    )


def _extract(coco, tiny, out, *extra):
    argv = ["--data_root", coco, "--model", tiny, "--out", out, "--device", "cpu"]
    argv += ["--num_workers", "0", "--batch_size", "8", "--shard_size", "16", *extra]
    return extract_features.main(extract_features.get_args_parser().parse_args(argv))


def test_extract_train_predict_on_naflex(synthetic_coco, tiny_naflex, tmp_path, capsys):
    cache = str(tmp_path / "naflex.safetensors")
    _extract(synthetic_coco, tiny_naflex, cache, "--max_num_patches", "12")
    t, meta = features.load_features(cache)
    assert meta["family"] == "siglip2" and meta["max_num_patches"] == "12"
    assert meta["resolution"] == "12patches" and t["image"].shape[1:] == (1, 32)
    enc12 = encoders.load_encoder(tiny_naflex, max_num_patches=12)
    coco = data.load_coco(synthetic_coco)
    r = {int(i): k for k, i in enumerate(coco["ids"])}[int(t["ids"][3])]
    img = enc12.encode_images([Image.open(coco["paths"][r]).convert("RGB")])
    torch.testing.assert_close(
        t["image"][3, 0].float(), img[0].half().float(), rtol=2e-3, atol=2e-3
    )
    # another budget is another cache: refused in one line
    with pytest.raises(SystemExit):
        _extract(synthetic_coco, tiny_naflex, cache, "--max_num_patches", "16")
    assert "max_num_patches '12'" in capsys.readouterr().err
    splits = tmp_path / "splits.json"
    make_splits.main(
        make_splits.get_args_parser().parse_args(
            ["--data_root", synthetic_coco, "--folds", "2", "--out", str(splits)]
        )
    )
    argv = ["--features", cache, "--splits", str(splits), "--out_dir", str(tmp_path / "r")]
    argv += ["--mlp_dims", "16", "--bits", "16", "--batch_size", "8", "--epochs", "1"]
    train.main(train.get_args_parser().parse_args(argv + ["--device", "cpu", "--num_threads", "1"]))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["features_meta"]["family"] == "siglip2"
    best = str(tmp_path / "r" / "best.pt")
    probs = predict.main(
        predict.get_args_parser().parse_args(
            ["--image", coco["paths"][r], "--checkpoint", best, "--device", "cpu"]
        )
    )
    assert len(probs) == 5

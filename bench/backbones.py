"""
What each backbone family costs to extract on this machine: images/s and captions/s of the product's
own encode_pixels / encode_tokens (encoders.py) on real-size towers built from their configs with
random weights (a trained checkpoint costs the same; none can be downloaded here), and what that
means for COCO's 123,287 images and 616,767 captions, with the cache's size at the family's dim.

    python -m bench.backbones                  # the four real-size models, fp32 (~5 min, 2 cores)
    python -m bench.backbones --only clip_b16 --out /tmp/b.json
    python -m bench.backbones --quick          # tiny towers of each family (the test)

Models: CLIP ViT-B/16 (224 px, 77 tokens), SigLIP2-B/16-256, SigLIP2-B/16 NaFlex at 256 patches and
SigLIP2-so400m/14-384 (64 tokens). On the CPU the SigLIP vocabularies are 32,000 words, not 256,000:
the embedding is a gather of 64 rows per caption, negligible in time, and saves 1.6 GB. Inputs are
random pixels / patches and token ids of the family's text length (decode and preprocessing are
bench.py's section 8). Results: docs/BENCHMARKS.md, "Backbones".
"""

import os
import time

import torch

import cli
import data
import encoders
from bench.bench import CAPTIONS, N_DEV, N_TEST
from bench.timing import best_time

COCO_IMAGES, COCO_CAPTIONS = N_DEV + N_TEST, 616_767  # Karpathy's 123,287 images, their captions
BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16
)
CLIP_TEXT = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# name -> (family, image tower, text tower, image side or patch budget, patch, projection dim
# (CLIP), label): the published checkpoints' configs
MODELS = {
    "clip_b16": ("clip", BASE, CLIP_TEXT, 224, 16, 512, "CLIP ViT-B/16"),
    "siglip2_b16_256": ("siglip", BASE, BASE, 256, 16, None, "SigLIP2-B/16-256"),
    "siglip2_b16_naflex": (
        "siglip2",
        BASE,
        BASE,
        256,
        16,
        None,
        "SigLIP2-B/16 NaFlex, 256 patches",
    ),
    "siglip2_so400m_14_384": ("siglip", SO400M, SO400M, 384, 14, None, "SigLIP2-so400m/14-384"),
}


def build(family, size, text_size, side, patch, proj, vocab, seed=0):
    """A random-weight model of the family from its config, in eval mode (global RNG untouched)."""
    import transformers as tf

    encoders.quiet_default_token_ids()
    length = text_rule(family).max_length
    text = dict(text_size, vocab_size=vocab, max_position_embeddings=length)
    vision = dict(size, patch_size=patch)
    if family == "clip":
        text.update(pad_token_id=1, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
        cfg = tf.CLIPConfig(
            text_config=text, vision_config=dict(vision, image_size=side), projection_dim=proj
        )
        cls = tf.CLIPModel
    elif family == "siglip":
        text.update(pad_token_id=1, bos_token_id=None, eos_token_id=1)
        cfg = tf.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=side))
        cls = tf.SiglipModel
    else:  # NaFlex: the position table is a 16 x 16 grid, resized to each image's patch grid
        text.update(pad_token_id=1, bos_token_id=None, eos_token_id=1)
        cfg = tf.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=256))
        cls = tf.Siglip2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def text_rule(family):
    return encoders.FAMILIES[family][0].text_rule


def image_batch(family, side, patch, batch, g):
    """What the family's processor hands the image tower for `batch` images: pixels (B, 3, H, W),
    or NaFlex's `side` patches of a square grid with their mask and shapes."""
    if family != "siglip2":
        return {"pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    grid = int(side**0.5)
    return {
        "pixel_values": torch.randn(batch, side, 3 * patch * patch, generator=g),
        "pixel_attention_mask": torch.ones(batch, side, dtype=torch.long),
        "spatial_shapes": torch.tensor([[grid, grid]] * batch),
    }


def bench_model(name, quick, batch, repeats, seed=0):
    family, size, text_size, side, patch, proj, label = MODELS[name]
    if quick:
        size = text_size = TINY
    vocab = 1000 if quick else 49_408 if family == "clip" else 32_000
    side = (8 * 8 if family == "siglip2" else 32) if quick else side
    patch = 8 if quick else patch
    t = time.perf_counter()
    net = build(family, size, text_size, side, patch, 32 if quick else proj, vocab, seed)
    built_s = time.perf_counter() - t
    enc = encoders.FAMILIES[family][0].__new__(encoders.FAMILIES[family][0])  # product's encode_*
    enc.model, enc.device, enc.dtype = net, torch.device("cpu"), torch.float32
    g = torch.Generator().manual_seed(seed)
    img = image_batch(family, side, patch, batch, g)
    rule = text_rule(family)
    ids = torch.randint(3, vocab - 2, (batch * CAPTIONS, rule.max_length), generator=g)
    tok = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # the mask: CLIP only
    t_img = best_time(lambda: enc.encode_pixels(**img), repeats, 1) / batch
    t_txt = best_time(lambda: enc.encode_tokens(**tok), repeats, 1) / (batch * CAPTIONS)
    dim = int(enc.encode_tokens(**{k: v[:1] for k, v in tok.items()}).shape[1])
    params = sum(p.numel() for p in net.parameters())
    # the cache: float16 image + 5 captions per image (features.py), COCO's images
    cache_gb = COCO_IMAGES * (1 + CAPTIONS) * dim * 2 / 1e9
    return {
        "label": label,
        "family": family,
        "dim": dim,
        "resolution": f"{side} patches" if family == "siglip2" else f"{side} px",
        "text_length": rule.max_length,
        "params_m": params / 1e6,
        "built_s": built_s,
        "batch": batch,
        "images_per_s": 1 / t_img,
        "texts_per_s": 1 / t_txt,
        "coco_hours": (COCO_IMAGES * t_img + COCO_CAPTIONS * t_txt) / 3600,
        "cache_gb": cache_gb,
    }


def get_args_parser():
    p = cli.Parser("bench_backbones", description="extraction cost of each backbone family")
    p.add_argument("--only", default=",".join(MODELS), help="comma-separated models (default all)")
    p.add_argument("--quick", action="store_true", help="tiny towers of each family (default off)")
    p.add_argument("--batch", type=cli.positive_int, default=4, help="images per call (default 4)")
    p.add_argument("--repeats", type=cli.positive_int, default=2, help="timed calls (default 2)")
    p.add_argument("--out", default="bench_backbones.json", help="results as JSON (atomic)")
    return p


def main(args):
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        cli.fail(f"--only: unknown models {unknown}; choose from {', '.join(MODELS)}")
    res = {"meta": {"threads": torch.get_num_threads(), "torch": torch.__version__}}
    res["meta"]["load_before"] = os.getloadavg()[0]  # others' jobs on a shared machine
    for name in names:
        r = res[name] = bench_model(name, args.quick, args.batch, args.repeats)
        print(
            f"{name:22s} {r['params_m']:7.1f} M params  dim {r['dim']:5d}  "
            f"{r['images_per_s']:8.2f} images/s  {r['texts_per_s']:8.2f} captions/s  "
            f"COCO {r['coco_hours']:7.2f} h  cache {r['cache_gb']:.2f} GB",
            flush=True,
        )
    res["meta"]["load_after"] = os.getloadavg()[0]
    data.save_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())

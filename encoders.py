"""
Frozen image and text towers of a contrastive backbone behind one interface, the family chosen from
the checkpoint's config (model_type): CLIP ("clip"), fixed-resolution SigLIP / SigLIP2 ("siglip")
and SigLIP2 NaFlex ("siglip2"). Each family's text rule (length, lowercasing, attention mask) and
logit rule is written once, below, with why.

    enc = encoders.load_encoder("openai/clip-vit-base-patch16", device="cpu")
    img = enc.encode_images(pil_images)          # raw pooled embeddings float32 (B, D), on the CPU
    txt = enc.encode_texts(["a dog on a sofa"])  # (B, D)
    tok = enc.tokenize(texts)                    # {"input_ids": (T, L)[, "attention_mask": (T, L)]}
    enc.encode_tokens(**tok)                     # what the DataLoader's workers feed
    enc.cache_meta()                             # family, dim, resolution, text length, logit rule
"""

import logging
from dataclasses import dataclass

import torch

import data


@dataclass(frozen=True)
class TextRule:
    """How a family's text tower must be fed. Picklable: DataLoader workers tokenize with it.

    max_length: tokens per caption (padded to it, longer ones truncated); lowercase: we lowercase
    before tokenizing; attention_mask: passed to the text tower (else it attends to the padding).
    """

    max_length: int
    lowercase: bool
    attention_mask: bool

    def keys(self):
        return ("input_ids", "attention_mask") if self.attention_mask else ("input_ids",)

    def __call__(self, tokenizer, texts):
        """list of str -> {"input_ids": int64 (T, max_length)[, "attention_mask": int64 (T, L)]}."""
        if len(texts) == 0:
            return {k: torch.zeros(0, self.max_length, dtype=torch.long) for k in self.keys()}
        enc = tokenizer(
            [t.lower() for t in texts] if self.lowercase else list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {k: enc[k].long() for k in self.keys()}


# SigLIP / SigLIP2: the text towers were trained (big_vision) on 64 lowercased tokens, padded, with
# no mask: they attend to the padding and pool the LAST position, so padding to 64 is part of the
# embedding and a mask would change it
SIGLIP_TEXT = TextRule(max_length=64, lowercase=True, attention_mask=False)
# CLIP: 77 tokens (its position table); its tokenizer lowercases itself; the causal tower pools the
# first end-of-text token, so neither the padding nor the mask reaches the pooled token: the mask is
# passed so a checkpoint padding with another token is read the same way
CLIP_TEXT = TextRule(max_length=77, lowercase=False, attention_mask=True)


def pooled_output(out):
    """get_image_features / get_text_features result -> (B, D) tensor of raw pooled embeddings.

    transformers 4.x returns the tensor itself, 5.x a BaseModelOutputWithPooling (the same tensor in
    .pooler_output), and return_dict=False a tuple (last_hidden_state, pooler_output, ...).
    """
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)) and len(out) > 1:
        pooled = out[1]
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find pooled embeddings in a {type(out).__name__}")
    return pooled


def preprocess_images(image_processor, images):
    """list of PIL images -> pixel_values float32 (B, 3, H, W): the checkpoint's own resize +
    normalisation."""
    return image_inputs(image_processor, images)["pixel_values"]


def image_inputs(image_processor, images):
    """list of PIL images -> every tensor the image tower takes (the processor's model_input_names):
    {"pixel_values": float32 (B, 3, H, W)} at a fixed resolution; NaFlex: pixel_values float32
    (B, N, 3*p*p), pixel_attention_mask (B, N), spatial_shapes (B, 2) patch rows and columns."""
    out = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    names = getattr(image_processor, "model_input_names", None) or ["pixel_values"]
    got = {k: out[k] for k in names if k in out}
    return dict(got, pixel_values=got["pixel_values"].float())


class DefaultTokenIdsFilter(logging.Filter):
    """Drops transformers 5.x's warning that SiglipTextConfig's class defaults (bos 49406, eos
    49407: CLIP's ids, against the default vocabulary of 32,000) lie outside the vocabulary. It
    validates a throwaway default instance whenever it prints or saves any SigLIP config, ours
    included (huggingface/transformers#47612); an id outside a real config's vocabulary names
    that vocabulary's size, and still warns."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("(between 0 and 31999), got 4940" in msg and "token_id" in msg)


def quiet_default_token_ids():
    """Install DefaultTokenIdsFilter on transformers' config logger (once)."""
    log = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, DefaultTokenIdsFilter) for f in log.filters):
        log.addFilter(DefaultTokenIdsFilter())


def pil_processor_kwargs():
    """The PIL image processor by name, so a cache does not depend on whether torchvision is
    installed: 5.x spells it backend="pil" (its use_fast is deprecated and warns), 4.x
    use_fast=False (unset, it warns)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


class Encoder:
    """Frozen image and text towers -> UNNORMALISED pooled embeddings, float32 (B, D) on the CPU.

    A plain object, not an nn.Module, so a module holding it (HashModel) saves only its own weights.
    A family subclass sets `family`, `text_rule` and `_dims` / `_logits`. logit_scale is the
    multiplier (exp of the stored log parameter): logits = cos * logit_scale + logit_bias.
    """

    family = None
    text_rule = None
    image_keys = ("pixel_values",)  # what encode_pixels takes, as image_inputs returns it

    def __init__(self, name_or_path, device="cpu", dtype=torch.float32):
        from transformers import AutoModel, AutoProcessor  # lazy: the head alone needs none

        self.name, self.device, self.dtype = str(name_or_path), torch.device(device), dtype
        quiet_default_token_ids()  # transformers' own SiglipTextConfig defaults warn, not ours
        model = AutoModel.from_pretrained(name_or_path)
        if model.config.model_type != self.family:
            raise data.DataError(
                f"{name_or_path}: model_type {model.config.model_type!r}, not {self.family!r}; "
                "load it with encoders.load_encoder"
            )
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(name_or_path, **pil_processor_kwargs())
        self.tokenizer, self.image_processor = (
            self.processor.tokenizer,
            self.processor.image_processor,
        )
        self.dim, text_dim = self._dims(model.config)
        if text_dim != self.dim:
            raise data.DataError(f"{name_or_path}: image dim {self.dim} != text dim {text_dim}")
        self.image_size = getattr(model.config.vision_config, "image_size", None)  # NaFlex: none
        self.resolution = f"{self.image_size}px"
        self.text_length = self.text_rule.max_length
        self.logit_scale, self.logit_bias = self._logits(model)

    def cache_meta(self):
        """What a feature cache records about the towers that made it (str values)."""
        size = {} if self.image_size is None else {"image_size": str(self.image_size)}
        return {
            "family": self.family,
            "dim": str(self.dim),
            **size,
            "resolution": self.resolution,
            "text_length": str(self.text_length),
            "logit_scale": str(self.logit_scale),
            "logit_bias": str(self.logit_bias),
        }

    # -- CPU preprocessing (module functions / the picklable text rule: workers call those) --
    def preprocess_images(self, images):
        return preprocess_images(self.image_processor, images)

    def tokenize(self, texts):
        """list of str -> {"input_ids": (T, L)[, "attention_mask": (T, L)]} by the family's rule."""
        return self.text_rule(self.tokenizer, texts)

    # -- frozen towers (inference_mode inside; the copy out of it is an ordinary tensor) --
    def encode_pixels(self, pixel_values, **extra):
        """pixel_values (B, 3, H, W) [NaFlex: + pixel_attention_mask, spatial_shapes, see
        image_inputs] -> raw pooled image embeddings float32 (B, D) on the CPU."""
        kw = {"pixel_values": pixel_values.to(self.device, self.dtype)}
        kw.update({k: extra[k].to(self.device) for k in self.image_keys[1:]})
        with torch.inference_mode():
            out = pooled_output(self.model.get_image_features(**kw))
        return out.to("cpu", torch.float32, copy=True)

    def encode_tokens(self, input_ids, attention_mask=None):
        """input_ids (T, L) [+ attention_mask (T, L), used only where the family's rule passes one]
        -> raw pooled text embeddings float32 (T, D) on the CPU."""
        kw = {"input_ids": input_ids.to(self.device)}
        if self.text_rule.attention_mask:
            if attention_mask is None:
                raise ValueError(f"{self.family}: encode_tokens needs the attention_mask")
            kw["attention_mask"] = attention_mask.to(self.device)
        with torch.inference_mode():
            out = pooled_output(self.model.get_text_features(**kw))
        return out.to("cpu", torch.float32, copy=True)

    def encode_images(self, images):
        """list of PIL images -> float32 (B, D), not normalised."""
        if len(images) == 0:
            return torch.zeros(0, self.dim)
        return self.encode_pixels(**image_inputs(self.image_processor, images))

    def encode_texts(self, texts):
        """list of str -> float32 (B, D), not normalised."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        return self.encode_tokens(**self.tokenize(texts))


class SiglipEncoder(Encoder):
    """SigLIP v1 and SigLIP2 at a fixed resolution (e.g. google/siglip2-base-patch16-256)."""

    family, text_rule = "siglip", SIGLIP_TEXT

    @staticmethod
    def _dims(cfg):  # pooled by the towers' heads at their hidden size
        t = cfg.text_config
        return int(cfg.vision_config.hidden_size), int(
            getattr(t, "projection_size", None) or t.hidden_size
        )

    @staticmethod
    def _logits(model):  # sigmoid loss: logits = cos * exp(t') + b, both learned
        scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        return scale, float(model.logit_bias.detach().float().reshape(-1)[0])


class ClipEncoder(Encoder):
    """CLIP in transformers' format (openai/clip-vit-base-patch16, LAION / MetaCLIP / DFN ports)."""

    family, text_rule = "clip", CLIP_TEXT

    @staticmethod
    def _dims(cfg):  # both towers projected to projection_dim
        return int(cfg.projection_dim), int(cfg.projection_dim)

    @staticmethod
    def _logits(model):  # softmax loss: logits = cos * exp(t'), no bias (0 here)
        return float(model.logit_scale.detach().float().exp().reshape(-1)[0]), 0.0


class NaflexEncoder(SiglipEncoder):
    """SigLIP2 NaFlex (google/siglip2-base-patch16-naflex): each image at its own aspect ratio,
    resized to at most max_num_patches patches (the resolution is that budget, not a size) and
    padded to it; the image tower takes the patches, their mask and each image's patch grid."""

    family = "siglip2"
    # the text tower is SigLIP2's, trained as SigLIP's: 64 lowercased tokens, padded, no mask
    text_rule = SIGLIP_TEXT
    image_keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    def __init__(self, name_or_path, device="cpu", dtype=torch.float32, max_num_patches=None):
        super().__init__(name_or_path, device=device, dtype=dtype)
        if max_num_patches is not None:  # the processor pads every image to this many patches
            self.image_processor.max_num_patches = int(max_num_patches)
        self.max_num_patches = int(self.image_processor.max_num_patches)
        self.resolution = f"{self.max_num_patches}patches"


Siglip2Encoder = SiglipEncoder  # the name it had in model.py
FAMILIES = {
    "clip": (ClipEncoder, "openai/clip-vit-base-patch16"),
    "siglip": (SiglipEncoder, "google/siglip2-base-patch16-256"),
    "siglip2": (NaflexEncoder, "google/siglip2-base-patch16-naflex"),
}


def supported():
    """One line naming the supported families and an example checkpoint of each."""
    return ", ".join(f"{k} (e.g. {ex})" for k, (_, ex) in FAMILIES.items())


def family_of(name_or_path):
    """The checkpoint's config model_type -> its family name; DataError if not supported. An
    unreachable checkpoint raises transformers' OSError."""
    from transformers import AutoConfig

    quiet_default_token_ids()
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in FAMILIES:
        raise data.DataError(
            f"{name_or_path}: model_type {model_type!r} is not supported; supported: {supported()}"
        )
    return model_type


def load_encoder(name_or_path, device="cpu", dtype=torch.float32, max_num_patches=None):
    """The frozen towers of a checkpoint, by the family its config names; max_num_patches: the
    patch budget of a NaFlex checkpoint (None: its processor's), refused for the others."""
    family = family_of(name_or_path)
    if family != "siglip2":
        if max_num_patches is not None:
            raise data.DataError(
                f"--max_num_patches: only for NaFlex checkpoints (siglip2), {name_or_path} is "
                f"{family}; drop it"
            )
        return FAMILIES[family][0](name_or_path, device=device, dtype=dtype)
    return NaflexEncoder(name_or_path, device=device, dtype=dtype, max_num_patches=max_num_patches)


def check_same_backbone(a, b, what_a, what_b, keys=("model", "family", "dim")):
    """Two metadata dicts (a feature cache's, a checkpoint's features_meta, an encoder's
    cache_meta() + model) must name one backbone: DataError naming both otherwise. A field absent
    from either (a cache from before "family" was recorded: SigLIP) is not compared."""
    for k in keys:
        if a.get(k) is not None and b.get(k) is not None and str(a[k]) != str(b[k]):
            raise data.DataError(
                f"{what_a} is from {a.get('model')} ({a.get('family', 'siglip')}, dim "
                f"{a.get('dim')}) but {what_b} from {b.get('model')} ({b.get('family', 'siglip')}, "
                f"dim {b.get('dim')}); use one backbone for both"
            )

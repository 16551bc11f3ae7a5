"""
Frozen SigLIP2 towers and the trainable hash head for multi-label COCO classification.
Imports nothing local: copy this file into your project as it is.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# SECTION: encoder (owner: encoder engineer) -- Siglip2Encoder, make_tiny_siglip

TEXT_MAX_LENGTH = 64  # SigLIP text towers were trained on 64 tokens, padded, and pool the LAST position


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
    """list of PIL images -> pixel_values float32 (B, 3, H, W): the checkpoint's own resize + normalisation."""
    images = [im.convert("RGB") for im in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"].float()


def tokenize(tokenizer, texts):
    """list of str -> input_ids int64 (B, 64): lowercased, truncated and padded to max_length 64."""
    enc = tokenizer([t.lower() for t in texts], padding="max_length", max_length=TEXT_MAX_LENGTH,
                    truncation=True, return_tensors="pt")
    return enc["input_ids"].long()


class Siglip2Encoder:
    """Frozen SigLIP2 image and text towers -> UNNORMALISED pooled embeddings, float32 (B, D) on the CPU.

    A plain object, not an nn.Module, so a module holding it (HashModel) saves only its own weights.
    Texts are lowercased (SigLIP was trained on lowercased text) and padded to max_length 64 (the text
    tower pools the last position, so the padding changes the embedding). Only input_ids go in: as in
    big_vision, SigLIP's text tower attends to its padding, so no attention mask is passed.
    Fixed-resolution checkpoints only (config model_type "siglip", e.g. google/siglip2-base-patch16-256).
    logit_scale is the multiplier (exp of the stored log parameter): logits = cos * logit_scale + logit_bias.
    """

    def __init__(self, name_or_path="google/siglip2-base-patch16-256", device="cpu", dtype=torch.float32):
        from transformers import AutoModel, AutoProcessor  # lazy: the head alone needs no transformers

        self.name, self.device, self.dtype = str(name_or_path), torch.device(device), dtype
        model = AutoModel.from_pretrained(name_or_path)
        if model.config.model_type != "siglip":
            raise ValueError(f"{name_or_path}: model_type {model.config.model_type!r} is not a fixed-resolution "
                             "SigLIP/SigLIP2 model (model_type 'siglip'); use e.g. google/siglip2-base-patch16-256")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(name_or_path)
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        self.dim = int(vcfg.hidden_size)
        text_dim = int(getattr(tcfg, "projection_size", None) or tcfg.hidden_size)
        if text_dim != self.dim:
            raise ValueError(f"{name_or_path}: image dim {self.dim} != text dim {text_dim}")
        self.image_size = int(vcfg.image_size)
        self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        self.logit_bias = float(model.logit_bias.detach().float().reshape(-1)[0])

    # -- CPU preprocessing (the module functions below; DataLoader workers can call those directly) --
    def preprocess_images(self, images):
        return preprocess_images(self.image_processor, images)

    def tokenize(self, texts):
        return tokenize(self.tokenizer, texts)

    # -- frozen towers (inference_mode inside; the copy out of it is an ordinary tensor callers may modify) --
    def encode_pixels(self, pixel_values):
        """pixel_values (B, 3, H, W) -> raw pooled image embeddings float32 (B, D) on the CPU."""
        with torch.inference_mode():
            out = pooled_output(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        return out.to("cpu", torch.float32, copy=True)

    def encode_tokens(self, input_ids):
        """input_ids (B, 64) -> raw pooled text embeddings float32 (B, D) on the CPU."""
        with torch.inference_mode():
            out = pooled_output(self.model.get_text_features(input_ids=input_ids.to(self.device)))
        return out.to("cpu", torch.float32, copy=True)

    def encode_images(self, images):
        """list of PIL images -> float32 (B, D), not normalised."""
        if len(images) == 0:
            return torch.zeros(0, self.dim)
        return self.encode_pixels(self.preprocess_images(images))

    def encode_texts(self, texts):
        """list of str -> float32 (B, D), not normalised."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        return self.encode_tokens(self.tokenize(texts))


# ----------------------------------------------------------------------------
# SECTION: head (owner: head/train engineer) -- HashHead, head_loss

HASH_BITS = (0, 16, 32, 64, 128, 256)  # 0 = no hash layer: the plain-MLP baseline
FUSIONS = ("hadamard", "concat")
INPUT_NORMS = ("batchnorm", "none")
HASH_NORMS = ("batchnorm", "none")
CODE_CLASSIFIERS = ("learned", "centres")


class Dropout(nn.Dropout):
    """nn.Dropout, same distribution and scaling; on CPU the mask comes from torch.rand, about 3x faster than
    the bernoulli_ of nn.Dropout (0.7 vs 2.4 ms for 32 x 2306 on one core), which matters at batch 32."""

    def forward(self, x):
        if not self.training or self.p in (0, 1) or x.is_cuda:
            return super().forward(x)
        return x * (torch.rand(x.shape, device=x.device) >= self.p) / (1 - self.p)  # float32 draws, also under bf16


def _per_group(norm, x, groups):
    """norm(x), with a training BatchNorm applied to each of `groups` equal row blocks of x on its own."""
    if groups == 1 or not (isinstance(norm, nn.BatchNorm1d) and norm.training):
        return norm(x)
    return torch.cat([norm(c) for c in x.chunk(groups)])


class HashHead(nn.Module):
    """Trainable head on frozen image/text embeddings: fusion -> MLP -> tanh hash codes -> 80 logits.

    decompose=True splits each embedding v into its direction d = v/|v| and log-magnitude m = log|v|;
    fusion "hadamard" feeds [d_i, d_t, d_i*d_t, m_i, m_t], "concat" feeds [d_i, d_t, m_i, m_t]
    (decompose=False: the raw v in place of d and no m). input_norm "batchnorm" standardises the fusion
    vector with a non-affine BatchNorm (as MAE's linear probe): frozen SigLIP coordinates are ~0.04, which
    an MLP at a small lr barely moves from. hash_norm "batchnorm" puts an (affine) BatchNorm between the hash
    Linear and tanh: the pre-activations stay centred (balanced bits) and their scale is learnt slowly by
    BatchNorm's weight instead of exploding under Adam, which saturated tanh and stopped all gradient below
    it. code_classifier "centres" fixes the classifier on the codes to random +-1 class centres / sqrt(bits)
    (not trained; only its bias learns): class c's logit is then the agreement of the code with centre c, so
    every class, rare or common, owns its share of the code and images sharing labels get nearby codes
    (what the KNN vote over Hamming codes needs); "learned" trains it as an ordinary Linear.
    bits=0 drops the hash layer (MLP -> classifier directly).
    Rebuild from a checkpoint with HashHead(**ckpt["model_args"]); the state dict carries everything else.
    """

    def __init__(self, dim=768, num_classes=80, fusion="hadamard", decompose=True, mlp_dims=(1024, 512),
                 dropout=0.1, bits=64, input_norm="batchnorm", hash_norm="batchnorm", input_dropout=0.0,
                 code_classifier="learned"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if bits not in HASH_BITS:
            raise ValueError(f"bits must be one of {HASH_BITS}, got {bits!r}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if hash_norm not in HASH_NORMS:
            raise ValueError(f"hash_norm must be one of {HASH_NORMS}, got {hash_norm!r}")
        if code_classifier not in CODE_CLASSIFIERS:
            raise ValueError(f"code_classifier must be one of {CODE_CLASSIFIERS}, got {code_classifier!r}")
        self.model_args = dict(dim=int(dim), num_classes=int(num_classes), fusion=fusion,
                               decompose=bool(decompose), mlp_dims=[int(h) for h in mlp_dims],
                               dropout=float(dropout), bits=int(bits), input_norm=input_norm, hash_norm=hash_norm,
                               input_dropout=float(input_dropout), code_classifier=code_classifier)
        self.fusion, self.decompose, self.bits = fusion, bool(decompose), int(bits)
        in_dim = dim * (3 if fusion == "hadamard" else 2) + (2 if self.decompose else 0)
        # non-affine: pure standardisation (running stats in the state dict), nothing to learn
        self.input_norm = nn.BatchNorm1d(in_dim, affine=False) if input_norm == "batchnorm" else nn.Identity()
        # dropout on the standardised fusion vector: without it the MLP memorises the training images
        self.input_dropout = Dropout(input_dropout)  # no parameters: state-dict keys do not change
        layers, width = [], in_dim
        for h in mlp_dims:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True), Dropout(dropout)]
            width = int(h)
        self.mlp = nn.Sequential(*layers)
        self.hash = nn.Linear(width, bits) if bits > 0 else None
        self.hash_norm = nn.BatchNorm1d(bits) if bits > 0 and hash_norm == "batchnorm" else nn.Identity()
        self.classifier = nn.Linear(bits if bits > 0 else width, num_classes)
        if bits > 0 and code_classifier == "centres":  # stays in the state dict; the optimizer skips it
            with torch.no_grad():
                signs = torch.randint(0, 2, (num_classes, bits)) * 2.0 - 1.0  # (C, bits) from the global RNG
                self.classifier.weight.copy_(signs / math.sqrt(bits))
            self.classifier.weight.requires_grad_(False)

    def fuse(self, img, txt):
        """(B, D), (B, D) -> fusion vector (B, in_dim), computed in float32 (log/normalise are fp16-unsafe)."""
        img, txt = img.float(), txt.float()
        if self.decompose:
            n_i = img.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, 1)
            n_t = txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            a, b, mags = img / n_i, txt / n_t, [n_i.log(), n_t.log()]
        else:
            a, b, mags = img, txt, []
        parts = [a, b, a * b] if self.fusion == "hadamard" else [a, b]
        return torch.cat(parts + mags, dim=-1)

    def forward(self, img, txt, groups=1):
        """img, txt (B, D) -> logits (B, num_classes), codes h (B, bits) in (-1, 1) or None if bits == 0.

        groups > 1: the batch is `groups` equal micro-batches stacked (gradient accumulation run as one pass);
        in training, BatchNorm takes its statistics and running-stat updates per micro-batch, in order, so the
        result is that of `groups` separate calls, while the matmuls run once on the whole batch."""
        z = self.mlp(self.input_dropout(_per_group(self.input_norm, self.fuse(img, txt), groups)))  # (B, mlp_dims[-1])
        h = torch.tanh(_per_group(self.hash_norm, self.hash(z), groups)) if self.hash is not None else None
        return self.classifier(h if h is not None else z), h

    def sign_logits(self, h):
        """Logits of the binarised codes sign(h) (0 -> +1), with a straight-through gradient to h: what the
        classifier makes of the codes the KNN head and retrieval see."""
        return self.classifier(h + (torch.where(h >= 0, 1.0, -1.0) - h).detach())

    @torch.no_grad()
    def init_code_classifier(self, gain):
        """Multiply the initial weights of the classifier on the codes by `gain` (no-op for bits == 0); with
        code_classifier "centres" this sets their fixed scale: logit_c = gain * <h, centre_c> / sqrt(bits) + b_c.

        Codes are bounded (|h| < 1): with PyTorch's default init (weights ~U(+-1/sqrt(bits))) the logits can
        move only ~+-0.4 away from their bias, and Adam needs epochs of steps of ~lr to grow the weights, while
        the layers below learn from gradients filtered through that small, random matrix. A ReLU MLP (bits 0)
        can grow its features instead. Called once by train.py before training; a checkpoint does not need it."""
        if self.hash is not None:
            self.classifier.weight.mul_(gain)

    @torch.no_grad()
    def init_prior(self, prior, eps=1e-4):
        """Set the classifier bias to log(p / (1 - p)) of the class prevalences p (num_classes,).

        With rare positives, a zero bias makes the first epoch spend its updates pushing every logit down,
        which drives the tanh hash layer into saturation (|h| -> 1, no gradient below it). Starting at the
        priors removes that push. Called once by train.py from the fold's training labels; a checkpoint
        does not need it (the bias lives in the state dict)."""
        p = torch.as_tensor(prior, dtype=torch.float64).clamp(eps, 1 - eps)
        self.classifier.bias.copy_((p / (1 - p)).log().to(self.classifier.bias))


def head_loss(logits, targets, h, hash_weight=0.1, lambda_balance=0.1, lambda_decorr=0.01, as_float=True,
              sign_logits=None, sign_weight=0.0):
    """BCE + hash_weight * (quantisation + lambda_balance * balance + lambda_decorr * decorrelation).

    logits (B, C), targets (B, C) in {0, 1}, h (B, bits) tanh codes or None (no hash terms).
    quantisation = mean((|h| - 1)^2); balance = mean(bit_mean^2); decorrelation = sum of squared
    off-diagonal entries of the codes' covariance (unbiased, as torch.cov) / bits^2.
    Returns (loss, terms): terms maps bce/quant/balance/decorr/hash_reg to floats, or to detached 0-d
    tensors with as_float=False (no device sync per step in the training loop).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    terms = {"bce": bce}
    loss = bce
    if sign_logits is not None:
        terms["bce_sign"] = F.binary_cross_entropy_with_logits(sign_logits.float(), targets.float())
        loss = loss + sign_weight * terms["bce_sign"]
    if h is not None:
        h = h.float()
        n, bits = h.shape
        quant = (h.abs() - 1).pow(2).mean()
        mean = h.mean(dim=0)  # (bits,)
        balance = mean.pow(2).mean()
        hc = h - mean
        cov = hc.T @ hc / max(n - 1, 1)  # (bits, bits)
        decorr = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / bits ** 2
        hash_reg = quant + lambda_balance * balance + lambda_decorr * decorr
        loss = loss + hash_weight * hash_reg
        terms.update(quant=quant, balance=balance, decorr=decorr, hash_reg=hash_reg)
    terms = {k: (v.item() if as_float else v.detach()) for k, v in terms.items()}
    return loss, terms

# ----------------------------------------------------------------------------
# SECTION: knn + full model (owner: encoder engineer) -- knn_scores, HashModel

KNN_VOTES = ("softmax", "uniform", "rank")
KNN_QUERIES = ("real", "sign")


def exact_queries(x):
    """Real-valued query codes (Q, bits) -> float32 codes on which every product with +-1 codes is exact in float32:
    each row scaled by a power of two to max |q_j| < 1 (exact; rankings and knn_scores' similarities do not
    change), then rounded to a multiple of 2^-s with s = 23 - bit_length(2 * bits), so every partial sum of
    q.d + |q|_1 (magnitude < 2 * bits) fits float32's 24-bit mantissa. The rounding moves a code by < 2^-15 at
    64 bits; in exchange the search is exact and the same for any chunk, BLAS or device."""
    x = torch.as_tensor(x).float()
    s = 23 - (2 * x.shape[-1]).bit_length()
    _, e = torch.frexp(x.abs().amax(-1, keepdim=True))  # max |q| = m * 2^e, 0.5 <= m < 1 (e = 0 for a zero row)
    return torch.round(torch.ldexp(x, s - e)) / 2.0 ** s


def sign_codes(x):
    """Real or {-1, +1} codes (N, bits) -> float32 {-1, +1}; 0 counts as +1 (the h > 0 rule, ties up)."""
    x = torch.as_tensor(x)
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def _dot_dtype(device):
    """dtype of the code products in knn_scores. They are even integers in [0, 2 * bits] <= 512, exact in all
    three (bfloat16 holds every even integer up to 512). float16 on CUDA; bfloat16 on CPUs with bf16 matrix
    units (AMX or AVX512-BF16: this product runs several times faster than in float32 there), else float32."""
    if device.type == "cuda":
        return torch.float16
    fast = [getattr(torch.cpu, f, None) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return torch.bfloat16 if device.type == "cpu" and any(f is not None and f() for f in fast) else torch.float32


def _pack_fields(bits):
    """Database codes per float32 in knn_scores' packed sign search: one byte per code, so that every partial
    sum of the product stays an integer below 2^24 (exact): 3 codes up to 127 bits, 2 up to 255, else 1."""
    return 3 if bits * (1 + 2 ** 8 + 2 ** 16) < 2 ** 23 else 2 if bits < 256 else 1


def _full_float32_matmul():
    """Whether float32 matmuls run in full float32, which the packed sign search needs to be exact: not after
    torch.set_float32_matmul_precision("high" or "medium") or a reduced oneDNN fp32 precision (bf16, tf32)."""
    onednn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return torch.get_float32_matmul_precision() == "highest" and onednn in ("none", "ieee")


def knn_scores(query_codes, db_codes, db_labels, k=20, tau=0.07, vote="softmax", chunk=None, block=64,
               query="sign"):
    """Hamming-KNN multi-label scores: query_codes (Q, bits), db_codes (N, bits), db_labels (N, C) -> (Q, C).
    (The function's defaults, k 20 and query "sign", are the plain search; evaluate.py defaults to 100 and "real".)

    Database codes are binarised with sign (0 -> +1). query "sign" binarises the queries too, and the
    similarity is 1 - hamming / bits. query "real" keeps each query's real-valued code q (an asymmetric
    distance: only the database is binary) and ranks by q.d, a Hamming distance whose bits weigh |q_j|;
    similarity = (1 + q.d / |q|_1) / 2, which is 1 - hamming / bits again for a +-1 query. Real queries go
    through exact_queries first (scaled by a power of two, rounded to a grid finer than 2^-15 at 64 bits), so
    their products are exact too. Each query takes its k nearest database codes (k > N clamps to N) and the
    neighbours vote: "softmax" softmax(sim / tau), "uniform" 1/k, "rank" 1/rank normalised to sum 1.
    score[q, c] = sum of weights of the neighbours with label c: float32 in [0, 1]. Ties are broken
    deterministically: equal similarity -> lower database index first (so CPU, GPU and any chunk or block
    size pick the same neighbours). Nothing is excluded (the database must not hold the queries).

    Exact, but it never sorts a whole row: the database is cut into blocks of `block` consecutive codes,
    each block is ranked by its best code (largest similarity, then lowest index), and the k nearest codes all
    lie in the k best blocks (a code outside them is beaten by each of those blocks' best codes, which are k
    distinct codes). So a row needs a max over its blocks, a top-k over ~N / block block maxima and a top-k
    over k * block candidates. Queries run in chunks of `chunk` (None: ~12 MiB of scratch on CPU, 32 MiB
    on CUDA), so memory stays bounded. Runs on the device of query_codes; returns float32 there.

    The products, all exact: "real" in float32, [q, |q|_1] . [d, 1] = q.d + |q|_1 >= 0. "sign" on CUDA in
    float16, on CPUs with bf16 matrix units in bfloat16 (see _dot_dtype), the same product (even integers up to
    2 * bits). "sign" on other CPUs (float32) packs 3 database codes into each float32 (2 above 127 bits,
    _pack_fields): code f * P + r is byte f of row r, [q, #(q_j < 0), 1] . [sum_f 256^f [b_f, 1], 2^23] with
    the 0/1 bits b_f, so byte f of the result's integer view counts the bits where query and code agree
    (2^23 pins the exponent). One float32 product then ranks 3 codes: 3x fewer FLOPs, and one uint8 max gives
    the block maxima of all three (on a 2-core AVX2 CPU 2.8x faster end to end than the unpacked product).
    It needs full float32 matmuls (_full_float32_matmul); with reduced precision set, the search runs unpacked.
    """
    if vote not in KNN_VOTES:
        raise ValueError(f"vote must be one of {KNN_VOTES}, got {vote!r}")
    if query not in KNN_QUERIES:
        raise ValueError(f"query must be one of {KNN_QUERIES}, got {query!r}")
    if k < 1 or tau <= 0 or block < 1:
        raise ValueError(f"need k >= 1, tau > 0 and block >= 1, got k={k}, tau={tau}, block={block}")
    q = sign_codes(query_codes) if query == "sign" else exact_queries(query_codes)
    device = q.device
    d = sign_codes(db_codes).to(device)  # (N, bits)
    labels = torch.as_tensor(db_labels).to(device=device, dtype=torch.float32)  # (N, C)
    (Q, bits), N = q.shape, d.shape[0]
    if d.shape[1] != bits or labels.shape[0] != N or N == 0:
        raise ValueError(f"shape mismatch: query {tuple(q.shape)}, db {tuple(d.shape)}, "
                         f"labels {tuple(labels.shape)}")
    k = min(int(k), N)
    dtype = _dot_dtype(device) if query == "sign" else torch.float32
    packed = query == "sign" and dtype == torch.float32 and device.type == "cpu" and _full_float32_matmul()
    fields = _pack_fields(bits) if packed else 1
    if fields > 1:  # packed: P rows of `fields` codes each, every field a whole number of blocks
        per_field = -(-N // fields)
        P = -(-per_field // block) * block
        slots = torch.zeros(fields * P, bits + 1, device=device)  # [0/1 bits, 1]; all zero past N: agreement 0
        slots[:N, :bits] = d > 0
        slots[:N, bits] = 1
        scale = 256.0 ** torch.arange(fields, device=device)
        d = torch.cat([(slots.view(fields, P, bits + 1) * scale[:, None, None]).sum(0),
                       torch.full((P, 1), 2.0 ** 23, device=device)], 1)  # (P, bits + 2)
        q = torch.cat([q, (q < 0).sum(1, keepdim=True).float(), torch.ones(Q, 1, device=device)], 1)
        as_int = torch.int32  # byte f of a product: the agreements of query and code f, (q.d + bits) / 2
    else:
        # one extra column makes every product non-negative: [q, |q|_1] . [d, 1] = q.d + |q|_1, so block
        # maxima and the tie-breaking keys can run on the integer view of the floats (same order for
        # non-negative floats; a vectorised integer max, ~8x faster than a bfloat16 amax on CPU); zero rows pad
        # the database to whole blocks (product 0: never above a real code of their block)
        P = -(-N // block) * block
        l1 = q.abs().sum(1, keepdim=True)  # (Q, 1): bits for +-1 queries
        q = torch.cat([q, l1], 1).to(dtype)  # (Q, bits + 1)
        d = torch.cat([torch.cat([d, torch.ones(N, 1, device=device)], 1),
                       torch.zeros(P - N, bits + 1, device=device)]).to(dtype)  # (P, bits + 1), row-major
        as_int = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    M = fields * P  # code slots; slot m >= N is padding
    n_blocks = M // block
    kb = min(k, n_blocks)
    # unique block keys: larger = better block (best similarity, then lower block index); exact in int64
    block_rev = torch.arange(n_blocks - 1, -1, -1, device=device)  # (n_blocks,) int64
    offsets = torch.arange(block, device=device)  # (block,)
    if chunk is None:
        # ~12 MiB of products per chunk on CPU (the fastest of 6-32 MiB on a 2-core AVX2 CPU, 1 or 2 threads),
        # a multiple of 32 queries (there 10-30% faster than 33 or 99: whole BLAS panels)
        chunk = max(1, ((12 if device.type == "cpu" else 32) << 20) // (P * d.element_size() + 1))
        chunk -= chunk % 32 if chunk > 32 else 0
    if vote == "uniform":
        w_fixed = torch.full((k,), 1.0 / k, device=device)
    else:
        w_fixed = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)
        w_fixed = w_fixed / w_fixed.sum()
    scores = torch.empty(Q, labels.shape[1], device=device, dtype=torch.float32)

    def value(xt, slot):  # (c, P) products, (c, m) slots -> similarity keys: agreements, or the integer view
        if fields == 1:
            return xt.gather(1, slot)
        f = torch.div(slot, P, rounding_mode="floor")
        return (xt.gather(1, slot - f * P) >> 8 * f) & 255

    for s in range(0, Q, chunk):
        # database-major products (P, c): the small query chunk is the matrix the BLAS packs, not the whole
        # database (1.6-2.5x faster than (c, P) = q @ d.T on a 2-core AVX2 CPU), and block maxima reduce a
        # middle dimension, which vectorises over the queries
        dot = d @ q[s:s + chunk].T  # (P, c)
        c = dot.shape[1]
        if query == "real":
            dot.clamp_min_(0.0)  # a float rounding below 0 would break the integer-view order
        x = dot.view(as_int)
        if fields > 1:
            best = x.view(torch.uint8).view(P // block, block, c, 4).amax(1)[:, :, :fields]  # (P // block, c, fields)
            best = best.permute(1, 2, 0).reshape(c, n_blocks)  # block f * P // block + i: codes of field f
        else:
            best = x.view(P // block, block, c).amax(1).T  # (c, n_blocks), integer view
        xt = x.T  # (c, P) view: the gathers below read only k * block entries per query
        top_blocks = (best.long() * n_blocks + block_rev).topk(kb, dim=1).indices  # (c, kb)
        cand = (top_blocks[:, :, None] * block + offsets).view(c, kb * block)  # (c, kb * block) code slots
        # unique code keys: larger = nearer (similarity, then lower index), exact in int64 for M < 2^32. Padding
        # slots (>= N) score 0, the minimum, and come after every code, so they rank below all N codes
        key = value(xt, cand).long() * M + (M - 1 - cand)
        idx = cand.gather(1, key.topk(k, dim=1, sorted=True).indices)  # (c, k) database rows, nearest first
        near = value(xt, idx)  # (c, k) agreements (packed) or the products' integer view
        sim = near.float() / bits if fields > 1 else near.view(dtype).float() / (2 * l1[s:s + chunk]).clamp_min(1e-12)
        del dot, x, xt
        if vote == "softmax":
            w = torch.softmax(sim / tau, dim=1)  # (c, k)
        else:
            w = w_fixed.expand(c, k)
        scores[s:s + chunk] = torch.einsum("qk,qkc->qc", w, labels[idx])
    return scores.clamp_(0.0, 1.0)


class HashModel(nn.Module):
    """Frozen SigLIP2 towers + a trained head, for inference on raw image + caption pairs.

    The encoder is kept as a plain attribute (not a submodule), so state_dict() holds only head.* weights.
    Embeddings are rounded through float16 before the head, exactly as in the feature cache the head was
    trained on, so predict() on raw inputs equals the head applied to cached embeddings.
    """

    def __init__(self, encoder, head, cache_dtype=torch.float16):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.cache_dtype = cache_dtype

    @torch.no_grad()
    def predict(self, images, captions):
        """images: list of B PIL images; captions: list of B lists of str (>= 1 each) -> probs float32 (B, C).

        Each caption is paired with its image's embedding; sigmoid(head(img, cap)) is averaged over the
        image's captions.
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        if any(len(c) == 0 for c in captions):
            raise ValueError("every image needs at least one caption")
        device = next(self.head.parameters()).device
        img = self.encoder.encode_images(images).to(self.cache_dtype).float()  # (B, D)
        txt = self.encoder.encode_texts([c for caps in captions for c in caps]).to(self.cache_dtype).float()  # (T, D)
        counts = torch.tensor([len(c) for c in captions])  # (B,)
        owner = torch.repeat_interleave(torch.arange(len(images)), counts)  # (T,) image of each caption
        was_training = self.head.training
        self.head.eval()
        try:
            logits, _ = self.head(img[owner].to(device), txt.to(device))  # (T, C)
        finally:
            self.head.train(was_training)
        probs = torch.sigmoid(logits.float()).cpu()  # (T, C)
        out = torch.zeros(len(images), probs.shape[1]).index_add_(0, owner, probs)  # (B, C) sums
        return out / counts[:, None].float()

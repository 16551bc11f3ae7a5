"""Tiny randomly initialised towers saved as real checkpoints, for the demo, the tests and bench/: a
SigLIP (random_siglip at any size, make_tiny_siglip with its real processor classes) and a CLIP
(make_tiny_clip), each loadable by encoders.load_encoder(out_dir) through AutoModel / AutoProcessor.

    import tiny_models
    tiny_models.make_tiny_siglip("demo/tiny_siglip")   # run_cv.sh --demo's model
    tiny_models.make_tiny_clip("demo/tiny_clip")       # the demo study's second backbone

None of it is needed on real data: the real towers come from from_pretrained(name).
"""

import json
import math
import os

import encoders

# words of the tiny test tokenizer: the 80 COCO category names plus common caption words
_TINY_WORDS = """
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking
meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie
suitcase
frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket bottle
wine
glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot pizza donut cake
chair
couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven
toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush
a an the of on in at with and or to from by for near next under over above behind front top
is are was be being sitting standing walking riding holding playing eating looking lying flying
parked running jumping laying waiting carrying wearing driving crossing taking showing filled
man woman men women boy girl child children people group couple player players kid kids
photo picture image view close up small large big little two three four several many some
white black red blue green yellow brown gray grey pink purple colorful dark bright old young
street road city field grass water beach snow sky room kitchen bathroom living area house building
wall window door floor plate food tray shelf counter desk park air ocean lake river tree trees
it its his her their this that there other each one side background several together around
very while out into down along across like has have shown made set full empty sits stands
circle square triangle shape shapes color colored drawn scene object objects thing things
. , ' - !
"""


def siglip_image_processor(**kwargs):
    """transformers' PIL SigLIP image processor (SiglipImageProcessorPil in 5.x; in 4.x
    SiglipImageProcessor is the PIL one, and in 5.x the old name wants torchvision, else it
    warns)."""
    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return Processor(**kwargs)


def random_siglip(size, vocab_size, image_size, patch_size, seed=0, **text):
    """A SiglipModel built from its config with random weights, in eval mode; the global torch RNG
    is left untouched. size: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads
    of both towers; text: more of the text config (token ids, projection_size)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    length = encoders.SIGLIP_TEXT.max_length
    text = dict(size, vocab_size=vocab_size, max_position_embeddings=length, **text)
    config = SiglipConfig(
        text_config=text, vision_config=dict(size, image_size=image_size, patch_size=patch_size)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SiglipModel(config).eval()


def make_tiny_siglip(out_dir, image_size=32, seed=0):
    """Save a tiny randomly initialised SiglipModel + tokenizer + processor to out_dir -> out_dir
    (str).

    Offline stand-in for google/siglip2-base-patch16-256 in tests and demos: same class, same
    preprocessing path, loadable by encoders.load_encoder(out_dir) via AutoModel / AutoProcessor.
    hidden 32, 2 layers, patch 8; a case-sensitive WordLevel tokenizer (unknown words -> <unk>) that
    appends </s>. Deterministic for a seed; the global torch RNG is left untouched.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipProcessor

    encoders.quiet_default_token_ids()  # our config's ids are valid (bos None, eos 1 < 274 words)

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _TINY_WORDS.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=encoders.SIGLIP_TEXT.max_length,
    )
    image_processor = siglip_image_processor(size={"height": image_size, "width": image_size})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    net = random_siglip(
        small,
        len(vocab),
        image_size,
        8,
        seed,
        projection_size=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    # SigLIP's initial temperature and bias (log 10, -10), not transformers' zeros
    with torch.no_grad():
        net.logit_scale.fill_(math.log(10.0))
        net.logit_bias.fill_(-10.0)
    out_dir = str(out_dir)
    net.save_pretrained(out_dir)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _bytes_to_unicode():
    """GPT-2 / CLIP's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tiny_clip(out_dir, image_size=32, seed=0):
    """A tiny randomly initialised CLIPModel + its real CLIPProcessor (a byte-level BPE tokenizer
    over the 256 byte characters, with and without </w>, and a few merges; CLIPImageProcessor),
    saved to out_dir -> str. Offline stand-in for openai/clip-vit-base-patch16 in tests and the demo
    study. Projection 24 != hidden 32, so a wrong dim shows; end-of-text is the last id, as in
    OpenAI's vocabulary. Deterministic for a seed; the global torch RNG is left untouched."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    else:  # 4.x: the fast tokenizer from files
        from transformers import CLIPTokenizerFast

        os.makedirs(out_dir, exist_ok=True)
        with open(f"{out_dir}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{out_dir}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizerFast(f"{out_dir}/vocab.json", f"{out_dir}/merges.txt")
    tokenizer.model_max_length = encoders.CLIP_TEXT.max_length
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(size, vocab_size=len(vocab), max_position_embeddings=77)
    text.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(
        text_config=text,
        vision_config=dict(size, image_size=image_size, patch_size=8),
        projection_dim=24,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CLIPModel(config).eval()
    try:  # 5.x: the PIL processor by name (CLIPImageProcessor wants torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        pass
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    out_dir = str(out_dir)
    net.save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir

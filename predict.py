"""
Predict one image: the frozen SigLIP2 towers and the trained head(s) of one fold model or the fold
ensemble on a raw image and its caption(s); prints the top labels with their probabilities.

    python predict.py --checkpoint outputs/siglip2_hash64/fold0/best.pt --image photo.jpg
    python predict.py --checkpoint outputs/siglip2_hash64/fold0/best.pt --image photo.jpg \\
        --caption "a dog on a sofa"
    python predict.py --ensemble outputs/siglip2_hash64 --image photo.jpg --caption "a dog" \\
        --caption "a sofa" --top 10

The SigLIP2 model is the one the feature cache was extracted with (the checkpoint's config
features_meta "model"; a local folder is found from the folder train.py ran in), else --model. The
image is scored as evaluate.py scores cached embeddings (model.HashModel: embeddings rounded through
float16, model.score_embeddings under the checkpoint's scoring rule or --scoring), probabilities
averaged over the ensemble. Without --caption the image is scored alone (no text).
"""

import json
import os

import torch

import cli
import data
import encoders
import model
import runs


def get_args_parser():
    p = cli.Parser("predict", description="top labels of one image (+ captions) from trained heads")
    # data
    g = p.add_argument_group("data")
    g.add_argument("--image", required=True, help="the image file (JPEG, PNG, ...)")
    g.add_argument(
        "--caption", action="append", default=None, help="a caption of the image; repeat for more"
    )
    # model
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default=None, help="one model: a train.py best.pt")
    src.add_argument(
        "--ensemble", default=None, help="a run dir: every fold*/best.pt, probabilities averaged"
    )
    g.add_argument(
        "--allow_partial", action="store_true", help="ensemble the finished folds, name the others"
    )
    g.add_argument(
        "--model", default=None, help="SigLIP2 name or folder; default: the checkpoint's features'"
    )
    g.add_argument(
        "--scoring",
        default=None,
        choices=model.SCORING_RULES,
        help="scoring rule over the captions; default: the checkpoint's config's",
    )
    g.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    # io
    g = p.add_argument_group("io")
    g.add_argument("--top", type=cli.positive_int, default=5, help="labels printed")
    return p


def load_image(path):
    """The image as RGB, or a one-line error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        cli.fail(
            f"--image {path}: cannot read the image ({type(e).__name__}); pass a JPEG/PNG file"
        )


def load_encoder(name, ck, device, dim):
    """The SigLIP2 towers the head was trained on (--model, else the features' model) -> encoder."""
    if name is None:
        name = (ck["config"].get("features_meta") or {}).get("model")
        if not name:
            cli.fail(
                "--model: the checkpoint does not name its SigLIP2 model; "
                "pass --model NAME_OR_FOLDER"
            )
        # a local model folder saved relative to the folder extract_features.py ran in (run_cv.sh
        # runs every step from the repository folder, so that is train.py's folder too)
        cwd = ck["config"].get("cwd")
        if cwd and not os.path.exists(name) and os.path.isdir(os.path.join(cwd, name)):
            name = os.path.join(cwd, name)
    meta = ck["config"].get("features_meta") or {}
    try:  # a NaFlex cache's patch budget (0: the checkpoint's own): the image seen as in training
        naflex = meta.get("family") == "siglip2" and encoders.family_of(name) == "siglip2"
        budget = int(meta.get("max_num_patches") or 0) or None if naflex else None
        enc = encoders.load_encoder(name, device=device, max_num_patches=budget)
    except data.DataError as e:
        cli.fail(f"--model {e}")
    except Exception as e:
        where = "" if os.path.exists(name) else ", not a folder here"
        cli.fail(
            f"--model {name}: cannot load the SigLIP2 towers ({type(e).__name__}{where}); "
            f"pass --model NAME_OR_FOLDER"
        )
    try:  # the checkpoint's name may be a folder found from cwd: family and dim decide
        mine = dict(enc.cache_meta(), model=name)
        encoders.check_same_backbone(mine, meta, f"--model {name}", "the checkpoint", ("family",))
    except data.DataError as e:
        cli.fail(str(e))
    if enc.dim != dim:
        cli.fail(f"--model {name}: embeddings are {enc.dim}-d but the head expects {dim}")
    return enc


def main(args):
    img = load_image(args.image)
    try:
        paths, heads, cks = runs.load_members(args.checkpoint, args.ensemble, args.allow_partial)
        scoring = runs.scoring_of(args.scoring, paths, cks)
    except data.DataError as e:
        cli.fail(str(e))
    enc = load_encoder(args.model, cks[0], args.device, heads[0].model_args["dim"])
    meta = cks[0]["config"].get("features_meta") or {}
    cats = json.loads(meta.get("categories") or "null") or data.COCO_CATEGORIES
    names = [c["name"] for c in cats]
    captions = args.caption or []
    probs = torch.stack(
        [
            model.HashModel(enc, h.to(args.device), scoring=scoring).predict([img], [captions])[0]
            for h in heads
        ]
    ).mean(0)  # (C,) averaged over the ensemble
    top = torch.argsort(probs, descending=True)[: args.top].tolist()
    print(f"{args.image}: {len(heads)} model(s), {len(captions)} caption(s)")
    for c in top:
        print(f"  {probs[c]:.4f}  {names[c]}")
    return {names[c]: float(probs[c]) for c in top}


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""One cross-validation fold in memory: the cached embeddings of its training and validation images on a device
(float16, as cached), and what a training step draws from them.

    fold = folds.load_fold(args, device)       # args: features, splits, fold, batch_size, inputs (train.py's flags)
    txt = folds.sample_text(fold["train"], rows, "each")   # (b, D): one caption per image, zero rows for none
"""

import json

import numpy as np
import torch

import cli
import data
import features
import protocols


def load_fold(args, device):
    """Feature cache + splits -> the fold's train / val images on `device` (embeddings float16, as cached). Only
    the fold's rows are kept, read chunk by chunk (features.load_embeddings): the peak is the fold, not the cache
    too."""
    try:
        tensors, meta = features.load_features(
            args.features, embeddings=False
        )  # ids, n_captions, labels, prompts
        splits = protocols.load_splits(args.splits)
        protocols.check_splits(splits, tensors["ids"].numpy(), meta, where=args.features)
    except data.DataError as e:
        cli.fail(str(e))
    n_folds = len(splits["val_folds"])
    if args.fold >= n_folds:
        cli.fail(f"--fold: {args.fold} is out of range; {args.splits} has folds 0..{n_folds - 1}")
    ids = tensors["ids"].numpy()
    val_ids = np.asarray(sorted(splits["val_folds"][args.fold]), dtype=np.int64)
    train_ids = np.setdiff1d(np.asarray(splits["dev"], dtype=np.int64), val_ids)  # sorted
    bad = set(json.loads(meta.get("bad_images", "[]")))  # images the extractor could not read
    order = np.argsort(ids)
    fold = {
        "meta": meta,
        "categories": splits["categories"],
        "skipped": {},
        "prompts": tensors.get("prompts"),
    }
    rows = {}
    for name, want in (("train", train_ids), ("val", val_ids)):
        keep = np.asarray([i not in bad for i in want.tolist()], dtype=bool)
        fold["skipped"][name] = int((~keep).sum())
        fold[name] = {"ids": torch.from_numpy(want[keep])}
        rows[name] = torch.from_numpy(
            order[np.searchsorted(ids, want[keep], sorter=order)]
        )  # (n,) cache rows
    n_train = len(rows["train"])
    if n_train < args.batch_size:  # checked before the embeddings are read
        cli.fail(
            f"--batch_size: {args.batch_size} exceeds the {n_train} training images of fold {args.fold}"
        )
    if len(rows["val"]) == 0:
        cli.fail(f"{args.splits}: fold {args.fold} has no usable validation images")
    if args.inputs != "image" and not bool((tensors["n_captions"][rows["train"]] > 0).any()):
        cli.fail(
            f"--inputs {args.inputs}: no training image of {args.features} has a text; use --inputs image"
        )
    try:
        embeddings = features.load_embeddings(args.features, list(rows.values()), tensors["ids"])
    except data.DataError as e:
        cli.fail(str(e))
    for (name, r), emb in zip(rows.items(), embeddings):  # (n, V, D) (n, T, D) (n,) (n, C)
        fold[name].update(
            {
                k: v.to(device)
                for k, v in (
                    ("image", emb["image"]),
                    ("text", emb["text"]),
                    ("n_captions", tensors["n_captions"][r]),
                    ("labels", tensors["labels"][r]),
                )
            }
        )
    return fold


def sample_text(tr, rows, text_input):
    """The text each training image gets this step: rows (b,) -> (b, D) float32, a zero row for no text.
    each: one caption drawn uniformly; mean: the mean of a random non-empty subset of the image's captions (each
    kept with probability 1/2: every non-empty subset about equally likely, as model.score_embeddings averages
    over them at scoring)."""
    text, n = tr["text"][rows], tr["n_captions"][rows]  # (b, T, D), (b,)
    has = torch.arange(text.shape[1], device=n.device) < n[:, None]  # (b, T) real caption slots
    if text_input == "each":
        pick = (
            torch.rand(len(rows)).to(n.device) * n
        ).long()  # < n_captions (0 when there is none); CPU RNG, no sync
        return text[torch.arange(len(rows), device=n.device), pick].float()
    keep = has & (torch.rand(has.shape).to(n.device) < 0.5)
    first = (
        torch.rand(len(rows)).to(n.device) * n
    ).long()  # an image left with none keeps one caption
    keep[torch.arange(len(rows), device=n.device), first] |= ~keep.any(1) & (n > 0)
    return (text.float() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)

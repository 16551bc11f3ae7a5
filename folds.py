"""One cross-validation fold: the cached embeddings of its training and validation images on a
device (float16, as cached), and its KNN database (the codes of its training images).

    fold = folds.load_fold(features, splits, 0, device)   # raises data.DataError on bad input
    db = folds.knn_database(head, fold["train"], "each")  # (n_train, bits) {-1, +1}
"""

import numpy as np
import torch

import data
import features
import knn
import model
import protocols


def load_fold(features_path, splits_path, fold, device, inputs="both", batch_size=2):
    """Feature cache + splits -> the fold's train / val images on `device` (embeddings float16, as
    cached). Only the fold's rows are kept, read chunk by chunk (features.load_embeddings): the peak
    is the fold, not the cache too. Images the extractor could not read are left out (counted in
    "skipped")."""
    tensors, meta = features.load_features(features_path, embeddings=False)  # all but image / text
    splits = protocols.load_splits(splits_path)
    protocols.check_splits(splits, tensors["ids"].numpy(), meta, where=features_path)
    n_folds = len(splits["val_folds"])
    if fold >= n_folds:
        raise data.DataError(
            f"--fold: {fold} is out of range; {splits_path} has folds 0..{n_folds - 1}"
        )
    val_ids = np.asarray(sorted(splits["val_folds"][fold]), dtype=np.int64)
    train_ids = np.setdiff1d(np.asarray(splits["dev"], dtype=np.int64), val_ids)  # sorted
    out = {"meta": meta, "categories": splits["categories"], "skipped": {}}
    out["prompts"] = tensors.get("prompts")
    rows = {}
    for name, want in (("train", train_ids), ("val", val_ids)):
        r, kept = features.cache_rows(tensors["ids"].numpy(), want, meta)
        out["skipped"][name] = int((~kept).sum())
        out[name] = {"ids": torch.from_numpy(want[kept])}
        rows[name] = torch.from_numpy(r)  # (n,) cache rows
    n_train = len(rows["train"])
    if n_train < batch_size:  # checked before the embeddings are read
        raise data.DataError(
            f"--batch_size: {batch_size} exceeds the {n_train} training images of fold {fold}"
        )
    if len(rows["val"]) == 0:
        raise data.DataError(f"{splits_path}: fold {fold} has no usable validation images")
    if inputs != "image" and not bool((tensors["n_captions"][rows["train"]] > 0).any()):
        raise data.DataError(
            f"--inputs {inputs}: no training image of {features_path} has a text; "
            "use --inputs image"
        )
    embeddings = features.load_embeddings(features_path, list(rows.values()), tensors["ids"])
    for (name, r), emb in zip(rows.items(), embeddings):  # (n, V, D) (n, T, D) (n,) (n, C)
        split = dict(
            image=emb["image"],
            text=emb["text"],
            n_captions=tensors["n_captions"][r],
            labels=tensors["labels"][r],
        )
        out[name].update({k: v.to(device) for k, v in split.items()})
    return out


def knn_database(head, split, scoring, batch_size=4096):
    """The KNN head's database of a fold: the sign codes of its training images' averaged codes
    (model.score_embeddings under the run's scoring rule; one code per image) -> (n, bits) float32.
    """
    s = model.score_embeddings(
        head,
        split["image"][:, 0],
        split["text"],
        split["n_captions"],
        scoring,
        batch_size=batch_size,
    )
    return knn.sign_codes(s.codes)

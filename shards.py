"""The extraction's shards: one safetensors file per block of rows, written atomically with the
run's identity in its metadata, found again on a rerun (a resumed or requeued extraction encodes
only what is missing) and merged, in row order, into the whole cache. extract_features.py uses it.
"""

import os
import re

import torch

import data


def shard_path(parts, s):
    return os.path.join(parts, f"shard_{s:05d}.safetensors")


def write_shard(path, tensors, meta):
    from safetensors.torch import save_file

    data.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def finished_shards(parts, run, n_shards, owns=lambda s: True):
    """Indices of the shards already in `parts` for this exact run; a shard of another run is
    refused. An unreadable one is deleted only by its owner rank (owns(s)): two ranks never race on
    one file."""
    from safetensors import safe_open

    done = set()
    if not os.path.isdir(parts):
        return done
    for name in sorted(os.listdir(parts)):
        # temporaries of a killed write do not match
        m = re.fullmatch(r"shard_(\d{5})\.safetensors", name)
        if not m:
            continue
        path = os.path.join(parts, name)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:
            if owns(int(m.group(1))):
                print(f"note: {path} is unreadable; encoding that shard again")
                os.remove(path)
            continue
        for k, v in run.items():
            if meta.get(k) != v:
                raise data.DataError(
                    f"{path}: left by a different run ({k} {meta.get(k)!r} there, {v!r} now); "
                    f"delete {parts} to start over, or pass another --out"
                )
        if int(m.group(1)) < n_shards:
            done.add(int(m.group(1)))
    return done


def merge_shards(parts, ids, n_shards, size, V, C, D):
    """Shard files -> ids / image / text / n_captions tensors of the whole cache, in row order."""
    from safetensors.torch import load_file

    n = len(ids)
    out = {
        "ids": torch.from_numpy(ids).long(),
        "image": torch.empty(n, V, D, dtype=torch.float16),
        "text": torch.empty(n, C, D, dtype=torch.float16),
        "n_captions": torch.empty(n, dtype=torch.long),
    }
    for s in range(n_shards):
        path = shard_path(parts, s)
        if not os.path.exists(path):  # its rank died unseen (the barrier normally catches that)
            raise data.DataError(f"{path}: missing after every rank finished; rerun to encode it")
        part, sl = load_file(path), slice(s * size, min((s + 1) * size, n))
        if not torch.equal(part["ids"], out["ids"][sl]):
            raise data.DataError(
                f"{path}: holds other images than expected; delete {parts} and rerun"
            )
        for k in ("image", "text", "n_captions"):
            out[k][sl] = part[k]
    return out

"""predict.py: one raw image (+ captions) through a tiny SigLIP and the heads of one fold model or
the ensemble equals model.HashModel under the checkpoint's rule; bad input: one line, exit 2.

    python -m pytest -q tests/test_predict.py
"""

import json

import numpy as np
import pytest
import torch

import data
import encoders
import model
import predict
import test_evaluate as te


def run(*argv):
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def image_run(tiny_siglip, tmp_path_factory):
    """Two finished fold checkpoints on the tiny SigLIP's embeddings and a photo -> dict."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("predict")
    enc = encoders.load_encoder(tiny_siglip)
    meta = {
        "model": tiny_siglip,
        "fingerprint": "x",
        "categories": json.dumps(data.COCO_CATEGORIES),
    }
    args = dict(te.MODEL_ARGS, dim=enc.dim)
    heads = [
        te.make_fold(tmp / "run" / f"fold{k}", k, "f", "s", model_args=args, meta=meta)
        for k in range(2)
    ]
    for k in range(2):  # --ensemble wants finished folds: val_metrics.json
        data.save_json(tmp / "run" / f"fold{k}" / "val_metrics.json", {"epoch": 1})
    img = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    img.save(tmp / "photo.png")
    return {"tmp": tmp, "enc": enc, "heads": heads, "img": img.convert("RGB")}


def test_top_labels_equal_hash_model(image_run, capsys):
    tmp, enc, heads, img = (image_run[k] for k in ("tmp", "enc", "heads", "img"))
    caps = ["a red square on a table", "two dogs"]
    want = [model.HashModel(enc, h, scoring=te.SCORING).predict([img], [caps])[0] for h in heads]
    for src, p in (
        ("--checkpoint", tmp / "run" / "fold1" / "best.pt"),
        ("--ensemble", tmp / "run"),
    ):
        got = run(
            src,
            p,
            "--image",
            tmp / "photo.png",
            "--caption",
            caps[0],
            "--caption",
            caps[1],
            "--top",
            3,
            "--device",
            "cpu",
        )
        ref = want[1] if src == "--checkpoint" else torch.stack(want).mean(0)
        top = torch.argsort(ref, descending=True)[:3].tolist()
        assert list(got) == [data.COCO_CATEGORIES[c]["name"] for c in top]
        assert list(got.values()) == pytest.approx([float(ref[c]) for c in top], abs=1e-5)
        out = capsys.readouterr().out
        assert out.startswith(f"{tmp / 'photo.png'}: ") and list(got)[0] in out
    # --scoring: another rule than the checkpoint's; no caption: the image alone (no text)
    each = run(
        "--checkpoint",
        tmp / "run" / "fold0" / "best.pt",
        "--image",
        tmp / "photo.png",
        "--caption",
        caps[0],
        "--caption",
        caps[1],
        "--scoring",
        "each",
        "--top",
        80,
        "--device",
        "cpu",
    )
    ref = model.HashModel(enc, heads[0], scoring="each").predict([img], [caps])[0]
    assert sorted(each.values()) == pytest.approx(sorted(ref.tolist()), abs=1e-5)
    alone = run(
        "--checkpoint",
        tmp / "run" / "fold0" / "best.pt",
        "--image",
        tmp / "photo.png",
        "--top",
        80,
        "--device",
        "cpu",
    )
    ref = model.HashModel(enc, heads[0]).predict([img], [[]])[0]
    assert sorted(alone.values()) == pytest.approx(sorted(ref.tolist()), abs=1e-5)


def test_bad_input_one_line_exit_2(image_run, capsys):
    tmp = image_run["tmp"]
    ck = tmp / "run" / "fold0" / "best.pt"
    (tmp / "text.png").write_text("not an image\n")
    for argv in (
        ["--checkpoint", ck, "--image", tmp / "missing.png", "--caption", "x"],
        ["--checkpoint", ck, "--image", tmp / "text.png"],
        ["--checkpoint", ck, "--image", tmp / "photo.png", "--model", tmp / "nope"],
        ["--checkpoint", tmp / "missing.pt", "--image", tmp / "photo.png"],
        ["--ensemble", tmp / "nope", "--image", tmp / "photo.png"],
    ):
        with pytest.raises(SystemExit) as e:
            run(*argv, "--device", "cpu")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for argv in (
        ["--checkpoint", ck],  # no --image
        ["--image", "photo.png"],  # no model
        ["--checkpoint", ck, "--image", "photo.png", "--scoring", "all"],
        ["--checkpoint", ck, "--image", "photo.png", "--top", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            predict.get_args_parser().parse_args([str(a) for a in argv])
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: predict: ")

"""
End-to-end smoke test: the real scripts' main() on a generated COCO and a tiny random SigLIP.

    python test_smoke.py        # standalone, prints where it worked and what it produced
    python -m pytest -q         # part of the suite

splits -> features -> two folds x 2 epochs -> aggregate -> ensemble evaluation on the test split,
all in a temporary folder, in well under a minute on a 2-core CPU.
"""

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aggregate  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402
import extract_features  # noqa: E402
import features  # noqa: E402
import make_splits  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
import synthetic_coco  # noqa: E402
import tiny_models  # noqa: E402


def run(script, *argv):
    """Call a script as its command line would: parse argv with its own parser, then main()."""
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def smoke(work):
    work = Path(work)
    t0 = time.time()
    coco = synthetic_coco.make_synthetic_coco(work / "coco", n_images=120, seed=0)
    tiny = tiny_models.make_tiny_siglip(work / "tiny_siglip", image_size=32, seed=0)
    splits, feats, out = work / "splits.json", work / "features.safetensors", work / "run"

    run(make_splits, "--data_root", coco, "--folds", 2, "--seed", 0, "--out", splits)
    run(
        extract_features,
        "--data_root",
        coco,
        "--model",
        tiny,
        "--out",
        feats,
        "--device",
        "cpu",
        "--batch_size",
        32,
        "--num_workers",
        0,
    )
    for k in range(2):
        run(
            train,
            "--features",
            feats,
            "--splits",
            splits,
            "--fold",
            k,
            "--out_dir",
            out / f"fold{k}",
            "--epochs",
            2,
            "--batch_size",
            16,
            "--device",
            "cpu",
        )
    run(aggregate, out)
    run(
        evaluate,
        "--ensemble",
        out,
        "--features",
        feats,
        "--splits",
        splits,
        "--split",
        "test",
        "--head",
        "both",
        "--bootstrap",
        50,
        "--out_dir",
        out / "eval_test",
        "--device",
        "cpu",
    )

    # what the pipeline promised to leave behind, with real numbers in it
    split = json.loads(splits.read_text())
    tensors, meta = features.load_features(feats)
    assert len(tensors["ids"]) == len(split["dev"]) + len(split["test"])
    for k in range(2):
        fold = out / f"fold{k}"
        for name in (
            "config.json",
            "log.jsonl",
            "best.pt",
            "last.pt",
            "val_metrics.json",
            "val_predictions.npz",
        ):
            assert (fold / name).is_file(), f"missing {fold / name}"
        val = json.loads((fold / "val_metrics.json").read_text())
        assert all(0.0 <= val[m] <= 1.0 for m in metrics.METRIC_NAMES if m != "coverage_error")
    rows = list(csv.DictReader(open(out / "cv_results.csv")))
    names = [r[next(iter(r))] for r in rows]  # the MLP head's rows, then the KNN head's
    assert names[:4] == ["fold_0", "fold_1", "mean", "std"] and "knn_mean" in names
    rows = list(csv.DictReader(open(out / "eval_test" / "metrics.csv")))
    assert "ensemble" in {r["model"] for r in rows} and len(rows) >= 3
    for name in ("metrics.json", "per_class.csv", "errors.md"):
        assert (out / "eval_test" / name).is_file(), f"missing {name}"
    return time.time() - t0


def test_smoke(tmp_path):
    seconds = smoke(tmp_path)
    assert seconds < 120, f"smoke test took {seconds:.0f} s"


def test_tiny_siglip_is_made_quietly(tmp_path):
    """The demo's towers: a valid config (no BOS, EOS inside the vocabulary) and no transformers
    warning while they are made; the warning about transformers' own SiglipTextConfig defaults is
    dropped, one about a real config's ids is not."""
    import subprocess

    code = f"import tiny_models; tiny_models.make_tiny_siglip({str(tmp_path / 'tiny')!r})"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "token_id" not in r.stderr and "arning" not in r.stderr, r.stderr
    text = json.loads((tmp_path / "tiny" / "config.json").read_text())["text_config"]
    assert text["bos_token_id"] is None and 0 <= text["eos_token_id"] < text["vocab_size"]
    import logging

    import encoders

    drop = encoders.DefaultTokenIdsFilter().filter
    msg = "Model config: {}_token_id must be `None` or an integer within the vocabulary (between 0"
    for ids, kept in ((" and 31999), got 49406.", False), (" and 273), got 300.", True)):
        rec = logging.LogRecord("t", logging.WARNING, "", 0, msg.format("bos") + ids, None, None)
        assert drop(rec) == kept


if __name__ == "__main__":
    cli.Parser(
        "test_smoke", description=__doc__.strip().split("\n\n")[0]
    ).parse_args()  # --help, one-line errors
    with tempfile.TemporaryDirectory() as d:
        print(f"smoke test passed in {smoke(d):.1f} s")

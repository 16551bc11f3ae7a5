"""data.load_jsonl's value checks: a split other than "train" / "test" and, with a class list, an
unknown label are refused naming the line and the value; the class list fixes the columns."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data

ROOT = Path(__file__).resolve().parents[1]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECS = [
    {"image": "a.png", "labels": ["cat"], "split": "train"},
    {"image": "b.png", "labels": ["dog", "cat"], "split": "test"},
    {"image": "c.png", "labels": ["dog"]},
]


def test_unknown_split_is_refused_naming_line_and_value(tmp_path):
    bad = RECS[:2] + [{"image": "c.png", "labels": ["dog"], "split": "tset"}]
    with pytest.raises(data.DataError) as e:
        data.load_jsonl(_write(tmp_path / "m.jsonl", bad))
    msg = str(e.value)
    assert "line 3" in msg and "'tset'" in msg and "\n" not in msg and "m.jsonl" in msg
    for split in (None, 1, "Train", "val"):  # only the two names, spelt exactly
        rec = {"image": "c.png", "labels": ["dog"], "split": split}
        with pytest.raises(data.DataError, match="line 1 has"):
            data.load_jsonl(_write(tmp_path / "one.jsonl", [rec]))


def test_without_class_list_every_label_is_a_class(tmp_path):
    ds = data.load_jsonl(_write(tmp_path / "m.jsonl", RECS))
    assert [c["name"] for c in ds["categories"]] == ["cat", "dog"]  # sorted, as before
    assert ds["splits"] == ["train", "test", "train"]  # the default
    np.testing.assert_array_equal(ds["labels"], [[1, 0], [1, 1], [0, 1]])


def test_class_list_fixes_order_and_refuses_a_misspelt_label(tmp_path):
    head = {"classes": ["dog", "cat", "bird"]}
    ds = data.load_jsonl(_write(tmp_path / "m.jsonl", [head, *RECS]))
    assert [(c["id"], c["name"]) for c in ds["categories"]] == [(1, "dog"), (2, "cat"), (3, "bird")]
    # columns in the list's order; "bird" occurs nowhere and is an empty column, not dropped
    np.testing.assert_array_equal(ds["labels"], [[0, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert ds["ids"].tolist() == [2, 3, 4]  # default ids stay line numbers (the header is line 1)
    typo = [head, *RECS[:2], {"image": "c.png", "labels": ["dgo"]}]
    with pytest.raises(data.DataError) as e:
        data.load_jsonl(_write(tmp_path / "typo.jsonl", typo))
    assert "line 4" in str(e.value) and "'dgo'" in str(e.value)
    # the same list given by the caller instead of the file
    ds2 = data.load_jsonl(_write(tmp_path / "plain.jsonl", RECS), classes=["dog", "cat", "bird"])
    np.testing.assert_array_equal(ds2["labels"], ds["labels"])
    with pytest.raises(data.DataError, match="line 2 has label 'dog'"):
        data.load_jsonl(tmp_path / "plain.jsonl", classes=["cat"])


@pytest.mark.parametrize(
    "header, fix",
    [({"classes": []}, "non-empty list"), ({"classes": ["a", "a"]}, "twice")],
)
def test_bad_class_list(tmp_path, header, fix):
    with pytest.raises(data.DataError, match=fix):
        data.load_jsonl(_write(tmp_path / "m.jsonl", [header, *RECS]))


def test_make_splits_exits_2_in_one_line(tmp_path):
    bad = RECS[:2] + [{"image": "c.png", "labels": ["dog"], "split": "tset"}]
    manifest = _write(tmp_path / "m.jsonl", bad)
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "make_splits.py"),
            "--data_root",
            str(manifest),
            "--out",
            "s.json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "line 3" in r.stderr and "'tset'" in r.stderr

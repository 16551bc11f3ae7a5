"""
Our numbers beside the published ones, one protocol per table: literature.{csv,md,tex}. aggregate.py
and study.py call it; bad input raises data.DataError (one line naming the file and the fix).

    import literature
    literature.write("outputs/hash64", [run], test_dir="eval_test")  # run: aggregate.read_run's

The protocol is the splits file's "protocol" (make_splits.py --protocol; the folds' config.json
names the file):
- coco2014: macro mAP on val2014 (train2014 to val2014) of our ensemble, beside ML-GCN, Query2Label,
  ML-Decoder, ADDS (fine-tuned backbones, image only).
- hashnet: mAP@5000 of sign codes (5,000 queries against the database) at each bits setting, beside
  CSQ, OrthoHash and HashNet, with the empty-query and tie rule of every number: ours under all four
  combinations.
- karpathy_cv: no published number uses it, and the table says so (ours alone).
Numbers are never mixed across protocols: aggregate.py refuses runs with different splits files, and
write() refuses runs whose protocols differ. Our rows: "frozen <backbone>" from config.json
features_meta "model" and the input the head saw (config "inputs"); the test numbers come from
evaluate.py's <run>/<test_dir>/metrics.json.
"""

import json
import os
import re

import numpy as np

import data
import protocols
import report

# Where a number was checked, its source says where; "not re-checked here": from a survey, not the
# paper itself.
CLASSIFICATION = [  # macro mAP (%) on val2014, models trained on train2014
    dict(
        method="ML-GCN",
        backbone="ResNet-101 (ImageNet)",
        resolution="448",
        value=83.0,
        source="Chen et al., CVPR 2019 (not re-checked here)",
    ),
    dict(
        method="Query2Label",
        backbone="ResNet-101 (ImageNet)",
        resolution="448",
        value=84.9,
        source="Liu et al., arXiv 2107.10834, 2021 (Papers with Code results table)",
    ),
    dict(
        method="Query2Label",
        backbone="CvT-w24 (ImageNet-21k)",
        resolution="384",
        value=91.3,
        source="Liu et al., arXiv 2107.10834, 2021 (abstract; Papers with Code results table)",
    ),
    dict(
        method="ML-Decoder",
        backbone="TResNet-M",
        resolution="224",
        value=84.2,
        source="Ridnik et al., WACV 2023 (not re-checked here)",
    ),
    dict(
        method="ML-Decoder",
        backbone="TResNet-XL",
        resolution="640",
        value=91.4,
        source="Ridnik et al., WACV 2023 (abstract; Papers with Code results table)",
    ),
    dict(
        method="ADDS",
        backbone="ViT-L/14-336 (CLIP-initialised)",
        resolution="640",
        value=93.4,
        source="Xu et al., arXiv 2208.09562, 2022 (Papers with Code: 93.41)",
    ),
    dict(
        method="ADDS",
        backbone="ViT-L/14-336 (CLIP-initialised)",
        resolution="1344",
        value=93.5,
        source="Xu et al., arXiv 2208.09562, 2022 (Papers with Code: 93.54)",
    ),
]
# mAP@5000 of sign codes on HashNet's COCO lists; rule = what the authors' evaluation code does
RETRIEVAL = [
    dict(
        method="CSQ",
        backbone="ResNet-50 (ImageNet)",
        resolution="224",
        values={16: 0.796, 32: 0.838, 64: 0.861},
        rule="zero; ties: unstable argsort",
        source="Yuan et al., CVPR 2020 (README, and test.py of "
        "yuanli2333/Hadamard-Matrix-for-hashing: rule, 224 px crop of a 255 px resize)",
    ),
    dict(
        method="CSQ (DeepHash-pytorch re-run)",
        backbone="ResNet-50 (ImageNet)",
        resolution="224",
        values={64: 0.883},
        rule="zero (CalcTopMap); ties: unstable argsort",
        source="swuxyj/DeepHash-pytorch README",
    ),
    dict(
        method="OrthoHash",
        backbone="AlexNet (ImageNet)",
        resolution="224",
        values={16: 0.718, 32: 0.765, 64: 0.778},
        rule="zero; ties: torch.topk order",
        source="Hoe et al., NeurIPS 2021 (numbers not re-checked here; "
        "rule from kamwoh/orthohash calculate_mAP; "
        "224 px = the usual AlexNet crop, not checked here)",
    ),
    dict(
        method="HashNet",
        backbone="AlexNet (ImageNet)",
        resolution="224",
        values={48: 0.730},
        rule="skip; ties: unstable argsort",
        source="Cao et al., ICCV 2017 (0.7301 in swuxyj/DeepHash-pytorch's "
        "paper column; rule: HashNet's mean_average_precision; "
        "224 px = the usual AlexNet crop, not checked here)",
    ),
]
ANCHOR_BITS = (16, 32, 48, 64)
OUR_RULES = [
    ("mAP@5000", "zero; ties: database order"),
    ("mAP@5000_avgties", "zero; ties: expectation over orders"),
    ("mAP@5000_skip", "skip; ties: database order"),
    ("mAP@5000_skip_avgties", "skip; ties: expectation over orders"),
]
INPUTS = {"image": "image", "text": "caption only", "both": "image + caption"}
SIZES = {"base": "B", "large": "L", "so400m": "So400m", "giant-opt": "g-opt"}


def _json(path):
    """A result file's object; None when it is absent, data.DataError when it is unreadable."""
    if not os.path.isfile(path):
        return None
    return data.read_json(path, "JSON", "re-run the script that wrote it")


def backbone(cfg):
    """config.json -> "frozen SigLIP2-B/16-256" (features_meta "model"; the name as given when it
    is no SigLIP2)."""
    name = str((cfg.get("features_meta") or {}).get("model") or "SigLIP2 (model not recorded)")
    m = re.search(r"siglip2-(base|large|so400m|giant-opt)-patch(\d+)-(\d+)", name)
    return (
        f"frozen SigLIP2-{SIZES[m.group(1)]}/{m.group(2)}-{m.group(3)}" if m else f"frozen {name}"
    )


def protocol(r, test_dir="eval_test"):
    """A run's protocol: its splits file's (when it is the file the folds trained with), else
    evaluate.py's metrics.json's."""
    cfg = r["config"]
    for path in dict.fromkeys(
        (os.path.join(cfg.get("cwd") or "", cfg.get("splits") or ""), cfg.get("splits") or "")
    ):
        if path and os.path.isfile(path):
            same = cfg.get("splits_sha256") in (None, protocols.splits_sha256(path))
            s = _json(path) if same else None
            if isinstance(s, dict):  # absent: the original protocol (protocols.load_splits' rule)
                return s.get("protocol", "karpathy_cv")
    return (_json(os.path.join(r["dir"], test_dir, "metrics.json")) or {}).get("protocol")


def _ours(r, test_dir):
    """The fixed cells of our rows + evaluate.py's metrics.json (or None)."""
    cfg = r["config"]
    meta = cfg.get("features_meta") or {}
    res = str(
        meta.get("image_size") or (re.findall(r"-(\d+)$", str(meta.get("model", ""))) or ["-"])[0]
    )
    return dict(
        backbone=backbone(cfg),
        resolution=res,
        inputs=INPUTS.get(cfg.get("inputs", "both"), cfg.get("inputs")),
        fine_tuned="no (frozen towers, head trained)",
    ), _json(os.path.join(r["dir"], test_dir, "metrics.json"))


def classification_rows(runs, test_dir, anchors):
    """-> header, rows: the anchors (if any), then every run and head with its test macro mAP."""
    header = [
        "",
        "method",
        "backbone",
        "resolution",
        "fine-tuned",
        "inputs",
        "test images",
        "mAP (%)",
        "fold models mAP (%)",
        "CV mAP (%)",
        "source",
    ]
    rows = [
        [
            "published",
            a["method"],
            a["backbone"],
            a["resolution"],
            "yes",
            "image",
            "40,137 (val2014)",
            f"{a['value']:.1f}",
            "-",
            "-",
            a["source"],
        ]
        for a in anchors
    ]
    for r in runs:
        cells, ev = _ours(r, test_dir)
        for h in [h for h in ("mlp", "knn") if r["heads"][h]]:
            cv = np.array([f["mAP_macro"] for f in r["heads"][h].values()]) * 100
            cv_cell = report.MeanStd(cv.mean(), cv.std(ddof=1) if len(cv) > 1 else np.nan)
            test, folds, n = "-", "-", "-"
            if ev and h in ev.get("ensemble", {}):
                test = 100 * float(ev["ensemble"][h]["mAP_macro"])
                n = f"{ev['n_images']:,}" if "n_images" in ev else "-"
                v = np.array([m[h]["mAP_macro"] for m in ev["models"].values() if h in m]) * 100
                folds = report.MeanStd(v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan)
            rows.append(
                [
                    "ours",
                    f"{r['label']} ({h.upper()} head)",
                    cells["backbone"],
                    cells["resolution"],
                    cells["fine_tuned"],
                    cells["inputs"],
                    n,
                    test,
                    folds,
                    cv_cell,
                    f"{r['dir']}/{test_dir}/metrics.json"
                    if test != "-"
                    else f"no {test_dir}/metrics.json: run evaluate.py --ensemble {r['dir']}",
                ]
            )
    return header, rows


def retrieval_rows(runs, test_dir):
    """-> header, rows: the anchors at their bits, then ours (mean ± std over the fold models)
    under four rules."""
    ours = []
    for r in runs:
        bits = (r["config"].get("model_args") or {}).get("bits", 0)
        cells, ev = _ours(r, test_dir)
        if bits:
            ours.append((r, bits, cells, (ev or {}).get("retrieval")))
    all_bits = sorted(set(ANCHOR_BITS) | {b for _, b, _, _ in ours})
    header = [
        "",
        "method",
        "backbone",
        "resolution",
        "fine-tuned",
        "inputs",
        *(f"{b} bits" for b in all_bits),
        "empty query; ties",
        "source",
    ]
    rows = [
        [
            "published",
            a["method"],
            a["backbone"],
            a["resolution"],
            "yes",
            "image",
            *(f"{a['values'][b]:.3f}" if b in a["values"] else "-" for b in all_bits),
            a["rule"],
            a["source"],
        ]
        for a in RETRIEVAL
    ]
    for key, rule in OUR_RULES:
        for r, bits, cells, ret in ours:
            members = [m for n, m in (ret or {}).items() if n != "mean" and key in m]
            if members:
                v = np.array([m[key] for m in members])
                cell, src = (
                    report.MeanStd(v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan),
                    f"{r['dir']}/{test_dir}/metrics.json ({len(v)} fold models)",
                )
            else:
                cell, src = (
                    "-",
                    f"no retrieval in {test_dir}/metrics.json: "
                    f"run evaluate.py --ensemble {r['dir']}",
                )
            rows.append(
                [
                    "ours",
                    r["label"],
                    cells["backbone"],
                    cells["resolution"],
                    cells["fine_tuned"],
                    cells["inputs"],
                    *(cell if b == bits else "" for b in all_bits),
                    rule,
                    src,
                ]
            )
    return header, rows


TEXT = {  # {folds}, {test}, {classes}: the run's own counts (counts())
    "coco2014": (
        "COCO 2014 classification (train2014 to val2014): macro mAP (%) over the {classes} "
        "classes, {test} test images",
        "Published models fine-tune their backbone on the images alone; ours train a head on "
        "frozen embeddings (inputs: what the head saw). mAP = the fold ensemble on val2014; "
        "fold models = mean ± std of the fold models; CV = {folds}-fold validation inside "
        "train2014 (model selection, not comparable).",
    ),
    "hashnet": (
        "Hashing retrieval on HashNet's COCO lists: mAP@5000 of sign codes ({test} queries, "
        "database = the other labelled train2014 + val2014 images)",
        "Empty query: a query with no relevant item in its top 5,000 counts as AP 0 (zero: "
        "DeepHash-pytorch CalcTopMap, CSQ, OrthoHash) or is left out (skip: HashNet). Published "
        "numbers break Hamming ties by an unstable sort (known to move mAP by 1-2 points); ours "
        "give the database order and the exact expectation over tie orders. Ours: mean ± std over "
        "the {folds} fold models, each trained on dev minus its val fold.",
    ),
    "karpathy_cv": (
        "Karpathy protocol ({folds}-fold CV on the Karpathy dev pool, {test} Karpathy test images)",
        "No published number uses this protocol, so none is listed: the anchors use coco2014 "
        "(classification) or hashnet (retrieval); make_splits.py with --protocol coco2014 or "
        "--protocol hashnet gives numbers that stand beside them.",
    ),
}


def counts(runs, test_dir="eval_test"):
    """What the captions count, from the runs themselves: {folds, test, classes} as text ("?"
    where no file says)."""
    r = runs[0]
    ev = _json(os.path.join(r["dir"], test_dir, "metrics.json")) or {}
    test = f"{ev['n_images']:,}" if "n_images" in ev else "the"
    cats = (r["config"].get("features_meta") or {}).get("categories")
    classes = str(len(json.loads(cats) if isinstance(cats, str) else cats)) if cats else "?"
    folds = r.get("expected") or len(r.get("folds", ())) or "?"
    return {"folds": folds, "test": test, "classes": classes}


def summary(runs, test_dir="eval_test"):
    """One sentence for the report: the protocol, and our best test macro mAP beside the best
    published one (coco2014) or alone."""
    proto = {protocol(r, test_dir) for r in runs}
    if len(proto) != 1 or None in proto:
        return ""
    proto = proto.pop()
    best = None
    for r in runs:
        ev = _json(os.path.join(r["dir"], test_dir, "metrics.json")) or {}
        for h, m in (ev.get("ensemble") or {}).items():
            if "mAP_macro" in m and (best is None or m["mAP_macro"] > best[0]):
                best = (m["mAP_macro"], f"{r['label']} ({h.upper()} head)")
    ours = f"our best test mAP (macro): {best[1]}, {100 * best[0]:.1f}%" if best else ""
    if proto == "coco2014":
        top = max(CLASSIFICATION, key=lambda a: a["value"])
        return (
            f"Protocol coco2014: {ours}; the best published anchor, {top['method']} "
            f"({top['backbone']}, fine-tuned), {top['value']:.1f}%."
        )
    if proto == "hashnet":
        return (
            "Protocol hashnet: mAP@5000 of sign codes at each bits setting beside CSQ, OrthoHash "
            "and HashNet (retrieval table)."
        )
    return f"Protocol {proto}: no published number uses it, so ours stand alone" + (
        f"; {ours}." if ours else "."
    )


def write(out, runs, test_dir="eval_test"):
    """out/literature.{csv,md,tex} for these runs (one protocol) -> the path stem, or None (protocol
    unknown). Runs of different protocols: data.DataError."""
    protos = {r["dir"]: protocol(r, test_dir) for r in runs}
    if None in protos.values():
        print(
            f"note: no literature table: no splits file or {test_dir}/metrics.json names the "
            f"protocol of {', '.join(d for d, p in protos.items() if p is None)}"
        )
        return None
    if len(set(protos.values())) > 1:
        raise data.DataError(
            f"{', '.join(f'{d}: {p}' for d, p in protos.items())}: runs of different protocols; "
            f"numbers on different protocols never share a literature table, aggregate them "
            f"separately"
        )
    proto = next(iter(protos.values()))
    if proto == "hashnet":
        header, rows = retrieval_rows(runs, test_dir)
    else:
        header, rows = classification_rows(
            runs, test_dir, CLASSIFICATION if proto == "coco2014" else []
        )
    title, note = (
        t.format(**counts(runs, test_dir))
        for t in TEXT.get(
            proto, (f"protocol {proto}", "No published anchors are recorded for this protocol.")
        )
    )
    stem = os.path.join(out, "literature")
    report.write_table(
        stem,
        header,
        rows,
        caption=f"Beside the literature: {title}",
        note=note,
        digits=3 if proto == "hashnet" else 1,
        keys=2,
        tex_columns=[h for h in header if h != "fine-tuned"],
    )
    print(f"wrote {stem}.md, .csv, .tex (protocol {proto})")
    return stem

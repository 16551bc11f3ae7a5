"""bench.py --quick end to end: every section runs and writes finite figures to bench.json.

Performance targets are not asserted here (timings on a shared CPU are noisy); the full run reports them.
"""
import json
import math

import pytest
import torch

import bench


def finite_numbers(obj, path="bench"):
    """Yield (path, value) for every number in a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # one thread: on a shared CPU, multi-threaded small ops stall; main() sets it process-wide, so restore it
    args = bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        returned = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert set(bench.DEFAULT_SECTIONS) <= set(res), f"missing sections: {set(bench.DEFAULT_SECTIONS) - set(res)}"
    assert "learning" not in res  # opt-in: hours at full size
    numbers = list(finite_numbers(res))
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, f"non-finite figures: {bad}"
    for sec in bench.DEFAULT_SECTIONS:  # each section holds real measurements, not an empty dict
        assert sum(1 for p, _ in numbers if p.startswith(f"bench.{sec}.")) >= 3, sec
        assert all(v >= 0 for p, v in numbers if p.startswith(f"bench.{sec}.") and p.endswith("_s")), sec
    # what the run measured is what it wrote, and the table names every target with a verdict
    assert res["metrics"]["values"] == returned["metrics"]["values"]
    assert len(res["targets"]) == sum(sec in bench.DEFAULT_SECTIONS for sec, *_ in bench.TARGETS)
    assert all(isinstance(t["pass"], bool) for t in res["targets"])
    table = capsys.readouterr().out
    assert all(t["target"] in table for t in res["targets"]) and "torch" in table
    # figures that are computable exactly, whatever the timing noise
    enc = res["encoder"]
    assert enc["inloop_image_passes"] == 5 * 20 * 94_630 and enc["once_image_passes"] == 123_287
    assert res["metrics"]["max_abs_diff"] < 1e-6  # compute_all agrees with scikit-learn
    assert res["knn"]["finite"] and res["knn"]["peak_mb"] >= 0


def test_train_matmul_flops_equals_torch_flop_counter():
    # the FLOPs behind the batch-256 throughput fraction and the matmul bound, against torch's own count of
    # one forward + backward pass (only matmuls count; the first Linear's input needs no gradient)
    from torch.utils.flop_counter import FlopCounterMode
    for kwargs in ({}, {"fusion": "concat", "mlp_dims": [256], "bits": 16}):
        head = bench.model.HashHead(**kwargs).train()
        with FlopCounterMode(display=False) as fc:
            logits, _ = head(torch.randn(64, 768), torch.randn(64, 768), groups=2)
            logits.sum().backward()
        assert fc.get_total_flops() == bench.train_matmul_flops(head, 64)


@pytest.mark.parametrize("kwargs,groups,rows", [
    (dict(mlp_dims=[24, 12], input_dropout=0.35, dropout=0.1), 2, 8),  # the default structure: 2 micro-batches
    (dict(mlp_dims=[24], input_dropout=0.0, dropout=0.2, fusion="concat", input_norm="none",
          code_classifier="centres"), 1, 6)])
def test_lean_grads_equal_autograd(kwargs, groups, rows):
    # the hand-written floor computes what train.py's step computes: the loss, every gradient and the
    # BatchNorm running statistics of a forward/backward pass (the same dropout masks: the same RNG draws)
    F = torch.nn.functional
    torch.manual_seed(0)
    ref = bench.model.HashHead(dim=16, num_classes=5, bits=16, **kwargs).train()
    ref.init_code_classifier(5.0)
    lean = bench.model.HashHead(dim=16, num_classes=5, bits=16, **kwargs).train()
    lean.load_state_dict(ref.state_dict())
    img, txt, y = torch.randn(rows, 16), torch.randn(rows, 16), (torch.rand(rows, 5) < 0.3).float()
    torch.manual_seed(1)
    logits, _ = ref(img, txt, groups=groups)
    b = rows // groups
    loss = sum(F.binary_cross_entropy_with_logits(logits[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
               for i in range(groups)) / groups
    loss.backward()
    torch.manual_seed(1)
    lean_loss = bench.lean_grads(lean, groups)(img, txt, y)
    torch.testing.assert_close(lean_loss, loss.detach())
    for (name, p), q in zip(ref.named_parameters(), lean.parameters()):  # hash.bias: 0 under BatchNorm, both ~1e-8
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), c in zip(ref.named_buffers(), lean.buffers()):
        torch.testing.assert_close(c, a, msg=name)
    assert any(p.grad.abs().max() > 1e-3 for p in lean.parameters() if p.grad is not None)


def test_bench_bad_flags():
    for argv in (["--sections", "nope"], ["--device", "tpu"], ["--threads", "0"], ["--sections", "8"]):
        with pytest.raises(SystemExit) as e:
            bench.get_args_parser().parse_args(argv)
        assert e.value.code == 2


def test_bench_learning_quick(tmp_path):
    """Section 7's plumbing on 1,500 planted images and 2 epochs: cache, probe, the three train.py runs, both heads."""
    args = bench.get_args_parser().parse_args(["--quick", "--sections", "learning", "--threads", "1",
                                               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "b.json")])
    threads = torch.get_num_threads()
    try:
        res = bench.main(args)["learning"]
    finally:
        torch.set_num_threads(threads)
    for key in ("probe_mAP_macro", "bits64_mAP_macro", "bits0_mAP_macro", "bits64_knn_mAP_macro", "knn64_mAP_macro",
                "knn64_knn_mAP_macro"):
        assert 0 < res[key] <= 1, key
    assert res["bits64_best_epoch"] in (1, 2) and res["n_train"] + res["n_val"] == 1425  # 1,500 - 75 test images
    for name in ("bits64", "knn64"):  # evaluate.py agrees with train.py
        assert abs(res[f"{name}_eval_mAP_macro"] - res[f"{name}_mAP_macro"]) < 1e-6, name
    work = tmp_path / "work" / "quick_seed0"  # one folder per setting: a full run never reuses quick work
    assert (work / "bits64" / "best.pt").exists() and (work / "probe.json").exists()
    assert json.load(open(work / "knn64" / "config.json"))["code_classifier"] == "centres"

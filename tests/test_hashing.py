"""hashing.py: CSQ / DPSH / HashNet against plain-loop transcriptions of the papers' formulas (value
and gradient), the hash centres (Hadamard / Bernoulli, multi-label centres), learning on planted
data (each loss beats random codes on retrieval mAP), and train.py --hash_loss end to end."""

import math

import numpy as np
import pytest
import torch

import evaluate
import hashing
import retrieval
import runs
import synthetic
import train
from test_train import _write_cache

# ---------------------------------------------------------------------------- transcriptions


def _codes_and_labels(seed=0, b=7, k=8, c=5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(b, k, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = (torch.rand(b, c, generator=g) < 0.35).float()
    y[0] = 0  # an image without labels: CSQ's random centre, dissimilar to every other image
    return h, y


def _share(y, i, j):
    return 1.0 if any(y[i, c] > 0 and y[j, c] > 0 for c in range(y.shape[1])) else 0.0


def csq_reference(h, y, centres, tie, lam):
    """CSQ, element by element: c_ik = sign(sum_c y_ic C_ck) (tie_k where 0); t = (c + 1) / 2,
    p = (h + 1) / 2; mean of -[t log p + (1 - t) log(1 - p)] + lam mean (|h| - 1)^2."""
    b, k = h.shape
    bce, quant = 0.0, 0.0
    for i in range(b):
        for j in range(k):
            s = sum(float(y[i, c]) * float(centres[c, j]) for c in range(y.shape[1]))
            cij = float(tie[j]) if s == 0 else math.copysign(1.0, s)
            t, p = (cij + 1) / 2, (h[i, j] + 1) / 2
            bce = bce - (t * torch.log(p) + (1 - t) * torch.log(1 - p))
            quant = quant + (torch.abs(h[i, j]) - 1) ** 2
    return bce / (b * k) + lam * quant / (b * k)


def dpsh_reference(h, y, eta):
    """DPSH: mean over pairs i < j of log(1 + e^theta) - s theta, theta = u_i . u_j / 2, plus eta
    times the mean of (u - b)^2 with b = sign(u)."""
    b, k = h.shape
    nll, pairs, quant = 0.0, 0, 0.0
    for i in range(b):
        for j in range(i + 1, b):
            theta = sum(h[i, t] * h[j, t] for t in range(k)) / 2
            nll = nll + torch.log(1 + torch.exp(theta)) - _share(y, i, j) * theta
            pairs += 1
        for t in range(k):
            quant = quant + (h[i, t] - (1.0 if h[i, t] > 0 else -1.0)) ** 2
    return nll / pairs + eta * quant / (b * k)


def hashnet_reference(h, y, alpha):
    """HashNet as the paper writes it: sum over pairs of w_ij (log(1 + exp(alpha <h_i, h_j>)) -
    alpha s_ij <h_i, h_j>), w_ij = |S| / |S_1| or |S| / |S_0|, divided by |S|."""
    b, k = h.shape
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    n1 = sum(_share(y, i, j) for i, j in pairs)
    n0 = len(pairs) - n1
    total = 0.0
    for i, j in pairs:
        s = _share(y, i, j)
        ip = alpha * sum(h[i, t] * h[j, t] for t in range(k))
        w = len(pairs) / n1 if s else len(pairs) / n0
        total = total + w * (torch.log(1 + torch.exp(ip)) - s * ip)
    return total / len(pairs)


def _check(fast, ref, h):
    (g_fast,) = torch.autograd.grad(fast, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    assert abs(fast.item() - ref.item()) < 1e-6
    assert torch.allclose(g_fast, g_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 6])  # 8: Hadamard rows (2K >= C); 6: Bernoulli centres
def test_csq_equals_its_transcription(bits):
    h, y = _codes_and_labels(k=bits)
    centres, tie = hashing.hash_centres(5, bits, seed=3), hashing.tie_centre(bits, seed=3)
    fast, _ = hashing.csq_loss(h, y, centres, tie, lam=0.3)
    _check(fast, csq_reference(h, y, centres, tie, 0.3), h)


def test_dpsh_equals_its_transcription():
    h, y = _codes_and_labels(seed=1)
    fast, _ = hashing.dpsh_loss(h, y, eta=0.7)
    _check(fast, dpsh_reference(h, y, 0.7), h)


def test_hashnet_equals_its_transcription():
    h, y = _codes_and_labels(seed=2)
    fast, terms = hashing.hashnet_loss(h, y, alpha=0.9)
    _check(fast, hashnet_reference(h, y, 0.9), h)
    assert terms["similar"] > 0 and terms["dissimilar"] > 0  # both kinds of pair present
    default, _ = hashing.hashnet_loss(h, y)  # alpha 10 / K
    assert abs(default.item() - hashnet_reference(h, y, 10 / h.shape[1]).item()) < 1e-6


# ---------------------------------------------------------------------------- hash centres


@pytest.mark.parametrize("n", [1, 2, 4, 12, 16, 20, 24, 48, 64, 96])
def test_hadamard_is_orthogonal(n):
    h = hashing.hadamard(n)
    assert h.shape == (n, n) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n))


def test_no_hadamard_of_order_6_or_36():
    assert hashing.hadamard(6) is None and hashing.hadamard(36) is None


def test_centres_hadamard_where_2k_covers_the_classes_else_bernoulli():
    h64 = hashing.hadamard(64)
    c = hashing.hash_centres(80, 64)
    assert torch.equal(c, torch.cat([h64, -h64])[:80])  # CSQ's H_2K rows
    c48 = hashing.hash_centres(80, 48)  # 96 >= 80 via Paley's 48
    assert torch.equal(c48 @ c48[:48].T, torch.cat([48 * torch.eye(48), -48 * torch.eye(48)])[:80])
    b = hashing.hash_centres(80, 16, seed=5)  # 32 < 80: Bernoulli(1/2) bits, seeded
    assert b.shape == (80, 16) and set(b.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(b, hashing.hash_centres(80, 16, seed=5))
    assert not torch.equal(b, hashing.hash_centres(80, 16, seed=6))
    assert abs(float((b > 0).float().mean()) - 0.5) < 0.1


def test_multi_label_centre_is_the_sign_of_its_labels_sum():
    centres = torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1], [1, 1, 1, -1]])
    tie = torch.tensor([-1.0, 1, 1, 1])
    y = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    got = hashing.label_centres(y, centres, tie)
    want = torch.tensor([[1.0, 1, -1, -1], [1, 1, 1, -1], [1, 1, 1, -1], [-1, 1, 1, 1]])
    assert torch.equal(got, want)  # row 1: bits 1 and 2 tie (1 - 1 = 0) -> the tie centre's


# ---------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def planted_small():
    f = synthetic.make_planted_features(3000, dim=64, num_classes=10, seed=0, n_captions=1)
    return torch.from_numpy(f["image"][:, 0]).float(), torch.from_numpy(f["labels"]).float()


@pytest.mark.parametrize("loss", hashing.HASH_LOSSES)
def test_each_loss_beats_random_codes(loss, planted_small, one_thread):
    """16-bit codes of a hash layer trained 5 epochs by the loss alone (Adam, image only) against
    random codes: retrieval mAP@all of 1,000 held-out queries over the 2,000 training images."""
    img, y = planted_small
    tr, te = slice(0, 2000), slice(2000, 3000)
    torch.manual_seed(0)
    head = hashing.HashLayer(64, 10, loss, bits=16, inputs="image", input_dropout=0.0)
    fn, opt, step = hashing.objective(loss, 16, 10, seed=0), torch.optim.Adam(head.parameters()), 0
    for g in opt.param_groups:
        g["lr"] = 1e-2
    for _ in range(5):
        perm = torch.randperm(2000)
        for s in range(0, 2000, 64):
            r = perm[s : s + 64]
            head.continuation(step)
            value, _ = fn(head(img[tr][r]).codes, y[tr][r])
            opt.zero_grad()
            value.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        q, d = head(img[te]).codes.numpy(), head(img[tr]).codes.numpy()
    got = retrieval.retrieval_map(q, y[te].numpy(), d, y[tr].numpy())
    rng = np.random.default_rng(0)
    rand = retrieval.retrieval_map(
        rng.choice([-1, 1], q.shape), y[te].numpy(), rng.choice([-1, 1], d.shape), y[tr].numpy()
    )
    assert got > rand + 0.08, (loss, got, rand)  # measured: random 0.38, each loss 0.49-0.50


def test_readout_never_shapes_the_codes():
    head = hashing.HashLayer(16, 4, "dpsh", bits=8, inputs="image")
    out = head(torch.randn(6, 16))
    torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.ones(6, 4)).backward()
    assert head.hash.weight.grad is None and head.classifier.weight.grad is not None


def test_hashnet_continuation_raises_beta():
    head = hashing.HashLayer(16, 4, "hashnet", bits=8, inputs="image")
    head.continuation(200)
    assert math.isclose(float(head.hash.beta), math.sqrt(1 + 0.005 * 200), rel_tol=1e-6)
    other = hashing.HashLayer(16, 4, "csq", bits=8, inputs="image")
    other.continuation(200)
    assert float(other.hash.beta) == 1.0


# ---------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _write_cache(tmp_path_factory.mktemp("hash_cache"))


def _train(cache, out, *extra):
    argv = ["--features", str(cache[0]), "--splits", str(cache[1]), "--out_dir", str(out)]
    argv += ["--batch_size", "16", "--device", "cpu", "--num_threads", "1", *map(str, extra)]
    train.main(train.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("loss", hashing.HASH_LOSSES)
def test_train_hash_loss_end_to_end(loss, cache, tmp_path, one_thread):
    """train.py --hash_loss: a HashLayer checkpoint runs.build_head rebuilds (HashNet's beta in
    it), and evaluate.py scores its codes with retrieval mAP@k / mAP@all."""
    out = tmp_path / loss
    _train(cache, out, "--hash_loss", loss, "--bits", 24, "--epochs", 2)
    head, ck = runs.load_checkpoint(str(out / "best.pt"))
    assert isinstance(head, hashing.HashLayer) and head.bits == 24
    assert ck["model_args"]["head"] == "hashlayer" and ck["model_args"]["hash_loss"] == loss
    assert (float(head.hash.beta) > 1.0) == (loss == "hashnet")
    res = evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--checkpoint", str(out / "best.pt"), "--retrieval", "--bootstrap", "0"]
        )
    )
    assert res is not None
    text = (out / "eval_test" / "retrieval.csv").read_text()
    assert "mAP@1000" in text and "mAP@all" in text


def test_train_hash_loss_refuses_bad_combinations(cache, tmp_path, capsys):
    for extra in (["--bits", 0], ["--baseline", "probe"], ["--head", "mlgcn"]):
        with pytest.raises(SystemExit) as e:
            _train(cache, tmp_path / "bad", "--hash_loss", "csq", *extra)
        assert e.value.code == 2
    assert "--hash_loss" in capsys.readouterr().err


def test_hashnet_resume_is_exact(cache, tmp_path, monkeypatch, one_thread):
    """Interrupted after epoch 1 and resumed: the same weights and beta as an uninterrupted run
    (beta follows the restored scheduler's step)."""
    flags = ("--hash_loss", "hashnet", "--bits", 16, "--epochs", 3, "--patience", 0)
    _train(cache, tmp_path / "full", *flags)
    out, real = tmp_path / "resumed", train.validate
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(cache, out, *flags)
    monkeypatch.setattr(train, "validate", real)
    _train(cache, out, *flags, "--resume")
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    assert float(a["hash.beta"]) > 1 and all(torch.equal(a[k], b[k]) for k in a)

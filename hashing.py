"""The hashing literature's own losses on a plain hash layer (train.py --hash_loss): CSQ (Yuan
et al., CVPR 2020), DPSH (Li et al., IJCAI 2016) and HashNet (Cao et al., ICCV 2017), written from
the papers' formulas (constants from the authors' / DeepHash-pytorch's code, named in
LOSS_DEFAULTS), and the hash layer they train: fusion vector -> K-bit tanh code.

    centres = hash_centres(80, 64, seed=0)         # (C, K) +-1: Hadamard rows where 2K >= C
    loss, terms = csq_loss(h, y, centres, tie)     # h (B, K) tanh codes, y (B, C) 0/1 labels
    loss, terms = dpsh_loss(h, y)
    loss, terms = hashnet_loss(h, y)               # h = tanh(beta z): HashLayer.continuation
    head = HashLayer(768, 80, hash_loss="csq", bits=64)   # runs.build_head rebuilds it

The codes are the only thing the hash loss trains. So that a run is validated, early-stopped,
scored and evaluated like the hash head, HashLayer also carries a linear readout on the DETACHED
codes (trained by its own BCE): it reports what the codes hold and never shapes them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model

HASH_LOSSES = ("csq", "dpsh", "hashnet")
LOSS_DEFAULTS = {
    # CSQ: weight of the quantisation term mean((|h| - 1)^2) (DeepHash-pytorch's CSQ "lambda")
    "csq_lambda": 1e-4,
    # DPSH: eta of the quantisation term mean((h - sign h)^2) (DeepHash-pytorch's DPSH "alpha")
    "dpsh_eta": 0.1,
    # HashNet: the likelihood's alpha = 10 / K (the authors' pytorch code, sigmoid_param)
    "hashnet_alpha_times_bits": 10.0,
    # HashNet continuation: beta_t = (1 + gamma t)^power per optimizer step t (the authors' code)
    "hashnet_gamma": 0.005,
    "hashnet_power": 0.5,
}


# ---------------------------------------------------------------------------- hash centres


def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def hadamard(n):
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) as float32 (n, n), or None where
    neither construction reaches n: Sylvester doubling of 1, 2, or of Paley's construction I of
    order q + 1 for a prime q = 3 mod 4 (12, 20, 24, 44, 48, ...)."""
    n, h = int(n), None
    for d in range(n.bit_length()):  # n = 2^d m: the first m a construction reaches
        m = n >> d
        if m << d != n:
            break
        if m in (1, 2):
            h = torch.ones(1, 1) if m == 1 else torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            h = _paley(m - 1)
        if h is not None:
            for _ in range(d):
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
            return h
    return None


def _paley(q):
    """Paley's construction I for a prime q = 3 mod 4 -> (q + 1, q + 1): S + I, S the skew matrix
    [[0, 1^T], [-1, Q]] around the Jacobsthal matrix Q_ij = chi(j - i), chi the quadratic
    character mod q."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in residues else -1.0 for r in range(1, q)])
    idx = torch.arange(q)
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, chi[(idx[None, :] - idx[:, None]) % q]
    return s + torch.eye(q + 1)


def hash_centres(num_classes, bits, seed=0):
    """CSQ's class centres, float32 (C, K) of +-1: the rows of [H_K; -H_K] where 2K >= C and a
    Hadamard matrix of order K exists (hadamard), else each bit drawn from Bernoulli(1/2) (from a
    generator seeded with seed, so a resumed run draws the same)."""
    h = hadamard(bits) if 2 * bits >= num_classes else None
    if h is not None:
        return torch.cat([h, -h])[:num_classes].contiguous()
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (num_classes, bits), generator=g).float() * 2 - 1


def tie_centre(bits, seed=0):
    """CSQ's fixed random +-1 centre (K,) that decides a multi-label centre's tied bits."""
    g = torch.Generator().manual_seed(int(seed) + 1)
    return torch.randint(0, 2, (bits,), generator=g).float() * 2 - 1


def label_centres(labels, centres, tie):
    """A multi-label image's centre: the sign of the sum of its labels' centres, a zero bit (a tie,
    or no label) taken from `tie` (CSQ's label2center). labels (B, C) 0/1 -> (B, K) +-1."""
    s = labels.float() @ centres.to(labels.device)  # (B, K)
    return torch.where(s == 0, tie.to(s.device), torch.sign(s))


# ---------------------------------------------------------------------------- the losses


def csq_loss(h, labels, centres, tie, lam=LOSS_DEFAULTS["csq_lambda"]):
    """CSQ: BCE between the code and its image's centre in {0, 1} coordinates, mean over B x K,
    plus lam * mean((|h| - 1)^2). h (B, K) tanh codes -> (loss, terms)."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))  # float32, or float64 kept
    c = label_centres(labels, centres, tie).to(h.dtype)  # (B, K)
    centre = F.binary_cross_entropy((h + 1) / 2, (c + 1) / 2)
    quant = (h.abs() - 1).pow(2).mean()
    return centre + lam * quant, {"centre": centre.detach(), "quant": quant.detach()}


def similarity(labels):
    """s_ij = 1 where images i and j share a label, else 0 -> (B, B) float."""
    y = labels.float()
    return (y @ y.T > 0).float()


def _pairs(n, device):
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)  # i < j


def dpsh_loss(h, labels, eta=LOSS_DEFAULTS["dpsh_eta"]):
    """DPSH: the negative log-likelihood of the batch's pairwise labels, theta_ij = h_i . h_j / 2,
    -log p(s_ij | h) = log(1 + e^theta) - s_ij theta, mean over the pairs i < j, plus eta * mean of
    (h - sign h)^2 (the relaxation's ||b_i - u_i||^2, b = sign(u) held fixed). -> (loss, terms)."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))  # float32, or float64 kept
    theta = h @ h.T / 2  # (B, B)
    nll = F.softplus(theta) - similarity(labels).to(h.dtype) * theta
    pairwise = nll[_pairs(len(h), h.device)].mean()
    quant = (h - torch.sign(h).detach()).pow(2).mean()
    return pairwise + eta * quant, {"pairwise": pairwise.detach(), "quant": quant.detach()}


def hashnet_loss(h, labels, alpha=None):
    """HashNet: the weighted likelihood of the pairwise labels, l_ij = log(1 + exp(alpha h_i . h_j))
    - alpha s_ij h_i . h_j over the pairs i < j, each weighted |S| / |S_1| (similar) or |S| / |S_0|
    (dissimilar) and summed / |S|: the mean over the similar pairs plus the mean over the dissimilar
    ones. alpha None: 10 / K. h = tanh(beta z) (HashLayer's continuation). -> (loss, terms)."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))  # float32, or float64 kept
    alpha = LOSS_DEFAULTS["hashnet_alpha_times_bits"] / h.shape[1] if alpha is None else alpha
    ip = alpha * (h @ h.T)  # (B, B)
    s = similarity(labels).to(h.dtype)
    nll = F.softplus(ip) - s * ip
    pairs = _pairs(len(h), h.device)
    sim, dis = pairs & (s > 0), pairs & (s == 0)
    zero = nll.sum() * 0
    loss_sim = nll[sim].mean() if sim.any() else zero
    loss_dis = nll[dis].mean() if dis.any() else zero
    return loss_sim + loss_dis, {"similar": loss_sim.detach(), "dissimilar": loss_dis.detach()}


def objective(name, bits, num_classes, seed=0):
    """The loss of --hash_loss `name` -> f(h (B, K), labels (B, C)) -> (loss, terms)."""
    if name == "csq":
        centres, tie = hash_centres(num_classes, bits, seed), tie_centre(bits, seed)
        return lambda h, y: csq_loss(h, y, centres, tie)
    if name == "dpsh":
        return dpsh_loss
    if name == "hashnet":
        return hashnet_loss
    raise ValueError(f"hash_loss must be one of {HASH_LOSSES}, got {name!r}")


# ---------------------------------------------------------------------------- the hash layer


class ScaledLinear(nn.Linear):
    """nn.Linear times beta (a buffer in the state dict, so scoring uses the trained beta): the
    hash layer's pre-activation beta * (W x + b), HashNet's tanh(beta z)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.register_buffer("beta", torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.beta


class DetachedLinear(nn.Linear):
    """nn.Linear on a detached input: the readout learns from the codes, its loss never reaches
    them."""

    def forward(self, x):
        return super().forward(x.detach())


class HashLayer(model.HashHead):
    """A plain hash layer: fusion vector (model.HashHead.fuse, its input norm and dropout) -> Linear
    -> tanh -> K-bit code, no MLP, no class evidence, trained by the hash loss alone; plus the
    readout on the detached codes (see the module doc). HashLayer(dim, num_classes, hash_loss,
    **arch): arch as HashHead's (code_from, mlp_dims and hash_norm are fixed here). model_args
    carry head "hashlayer" and hash_loss, so runs.build_head rebuilds it from a checkpoint."""

    def __init__(self, dim=768, num_classes=80, hash_loss="csq", **arch):
        if hash_loss not in HASH_LOSSES:
            raise ValueError(f"hash_loss must be one of {HASH_LOSSES}, got {hash_loss!r}")
        arch = dict(arch, code_from="hidden", mlp_dims=[], hash_norm="none")
        if not arch.get("bits"):
            raise ValueError("a hash layer needs bits >= 1")
        super().__init__(dim, num_classes, **arch)
        self.hash_loss = hash_loss
        old_hash, old_cls = self.hash, self.classifier
        self.hash = ScaledLinear(old_hash.in_features, old_hash.out_features)
        self.classifier = DetachedLinear(old_cls.in_features, old_cls.out_features)
        with torch.no_grad():  # keep HashHead's initialisation (code_gain included)
            for new, old in ((self.hash, old_hash), (self.classifier, old_cls)):
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
                new.weight.requires_grad_(old.weight.requires_grad)
        self.model_args = dict(self.model_args, head="hashlayer", hash_loss=hash_loss)

    @torch.no_grad()
    def continuation(self, step):
        """HashNet's beta at optimizer step t: (1 + gamma t)^power; 1 for the other losses."""
        if self.hash_loss == "hashnet":
            g, p = LOSS_DEFAULTS["hashnet_gamma"], LOSS_DEFAULTS["hashnet_power"]
            self.hash.beta.fill_(math.pow(1.0 + g * step, p))

"""ML-GCN (Chen et al., CVPR 2019) on the cached embeddings (train.py --head mlgcn): a label graph
from the co-occurrence of the TRAINING labels, two graph-convolution layers that map each class's
node embedding to a classifier vector, logits = the image's feature times those vectors.

    A = correlation_matrix(train_labels)          # (C, C): binarised at tau, re-weighted with p
    head = MLGCNHead(768, 80, node_dim=768)       # inputs / fusion as model.HashHead's
    fit_graph(head, train_labels, prompts)        # the graph and the class nodes (train.py does it)
    out = head(img, txt)                          # model.HeadOutput(logits (B, C), None)

Deviations from the paper, all for our cache: the class nodes start from the text tower's embedding
of each class prompt ("a photo of a {name}.", the cache's `prompts`; their mean, the template's
shared part, removed, then L2-normalised: the raw prompts are so alike that the classifier vectors
start alike and barely separate) instead of GloVe; the image feature is model.HashHead's fusion
vector ([d_i, m_i] image-only; with captions [d_i, d_t, d_i * d_t, m_i, m_t]: the caption enters
through the feature the classifier vectors multiply, not through the graph); a per-class bias,
started at the class log prior odds as every head here, is added to the logits. graph=False keeps
every other part and propagates over the identity (no edges): the same model without the graph.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model

TAU, P, HIDDEN = 0.4, 0.2, 1024  # the paper's threshold, re-weighting and first layer's width


@torch.no_grad()
def correlation_matrix(labels, tau=TAU, p=P):
    """The paper's re-weighted correlation matrix from 0/1 labels (n, C) -> float32 (C, C).

    M_ij = #images with labels i and j, N_i = M_ii; P_ij = M_ij / N_i (0 where N_i = 0);
    A_ij = [P_ij >= tau] for j != i; A'_ij = p A_ij / sum_{k != i} A_ik for j != i and
    A'_ii = 1 - p: each node keeps 1 - p of its own weight. A node without neighbours keeps all of
    it (A'_ii = 1; the paper's p / 0 leaves that case open), so a graph without edges is the
    identity: the model without the graph."""
    y = labels.double()
    m = y.T @ y  # (C, C) co-occurrence counts
    n = m.diagonal().clone()  # (C,) N_i
    cond = torch.where(n[:, None] > 0, m / n.clamp_min(1)[:, None], 0.0)  # P(L_j | L_i)
    a = (cond >= tau).double()
    a.fill_diagonal_(0.0)
    deg = a.sum(1, keepdim=True)  # (C, 1) neighbours of each node
    a = torch.where(deg > 0, p * a / deg.clamp_min(1), 0.0)
    a += torch.diag(torch.where(deg[:, 0] > 0, 1.0 - p, 1.0))
    return a.float()


class GraphClassifier(nn.Module):
    """ML-GCN's classifier: W = A' gc2(LeakyReLU_0.2(A' gc1(nodes))) (C, in_dim), logits =
    x W^T + bias. nodes (C, node_dim) and the propagation matrix adj (C, C) are buffers (in the
    state dict: a checkpoint carries its graph); gc1, gc2 are the bias-free graph-convolution
    weights, initialised U(-1/sqrt(out), 1/sqrt(out)) as in the authors' GraphConvolution."""

    def __init__(self, in_dim, num_classes, node_dim, hidden=HIDDEN):
        super().__init__()
        self.register_buffer("nodes", torch.zeros(num_classes, node_dim))
        self.register_buffer("adj", torch.eye(num_classes))
        self.gc1 = nn.Linear(node_dim, hidden, bias=False)
        self.gc2 = nn.Linear(hidden, in_dim, bias=False)
        for layer in (self.gc1, self.gc2):
            bound = 1.0 / math.sqrt(layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def vectors(self):
        """The classifier vectors (C, in_dim): two graph convolutions of the class nodes."""
        h = F.leaky_relu(self.adj @ self.gc1(self.nodes), 0.2)  # (C, hidden)
        return self.adj @ self.gc2(h)  # (C, in_dim)

    def forward(self, x):  # x (B, in_dim) -> logits (B, C)
        return x @ self.vectors().T + self.bias


class MLGCNHead(model.HashHead):
    """model.HashHead without a hash layer or MLP (bits 0), its classifier replaced by
    GraphClassifier: fusion vector (with the recipe's input norm and dropout) -> ML-GCN's logits.
    MLGCNHead(dim, num_classes, node_dim, hidden, graph, tau, p, **arch): arch as HashHead's
    (bits, mlp_dims and the code fields are fixed here). model_args carry head "mlgcn", so
    runs.build_head rebuilds it; fit_graph fills the graph and nodes."""

    def __init__(
        self, dim=768, num_classes=80, node_dim=768, hidden=HIDDEN, graph=True, tau=TAU, p=P, **arch
    ):
        super().__init__(dim, num_classes, **dict(arch, bits=0, mlp_dims=[]))
        self.graph, self.tau, self.p = bool(graph), float(tau), float(p)
        in_dim = self.classifier.in_features
        self.classifier = GraphClassifier(in_dim, num_classes, int(node_dim), int(hidden))
        self.model_args = dict(
            self.model_args,
            head="mlgcn",
            node_dim=int(node_dim),
            hidden=int(hidden),
            graph=self.graph,
            tau=self.tau,
            p=self.p,
        )


@torch.no_grad()
def fit_graph(head, train_labels, prompts):
    """Set an MLGCNHead's propagation matrix from the TRAINING labels (n, C) alone
    (correlation_matrix; the identity when head.graph is False) and its class nodes from the class
    prompts' text embeddings (C, node_dim), centred on their mean and L2-normalised."""
    c = head.classifier
    adj = correlation_matrix(train_labels.cpu(), head.tau, head.p) if head.graph else None
    c.adj.copy_(adj if adj is not None else torch.eye(len(c.adj)))
    pr = prompts.float().cpu()
    pr = pr - pr.mean(0)  # (C, D) without the prompt template's shared part: the classes' own
    c.nodes.copy_(pr / pr.norm(dim=1, keepdim=True).clamp_min(1e-12))

"""Shared pytest fixtures: the repo root on sys.path, real-format COCO excerpts (tests/fixtures),
a tiny SigLIP, synthetic data."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tiny tensors: one intra-op thread is fastest; two threads on a shared 2-core machine can stall
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # verbatim excerpts; SOURCES.md per folder


@pytest.fixture(scope="session")
def fixtures_dir():
    """Real COCO annotation and Karpathy excerpts (tests/fixtures/coco)."""
    return FIXTURES / "coco"


@pytest.fixture(scope="session")
def hashnet_dir():
    """HashNet's verbatim train.txt / test.txt (tests/fixtures/hashnet)."""
    return FIXTURES / "hashnet"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one intra-op thread beats two on a busy 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    import tiny_models

    return str(
        tiny_models.make_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"), image_size=32, seed=0)
    )


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    import synthetic_coco  # this fixture's module (the name is local here)

    return str(
        synthetic_coco.make_synthetic_coco(tmp_path_factory.mktemp("coco"), n_images=60, seed=0)
    )


@pytest.fixture(scope="session")
def planted():
    import synthetic

    return synthetic.make_planted_features(n_images=1200, seed=0)

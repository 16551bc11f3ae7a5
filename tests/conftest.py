"""Shared pytest fixtures: the repo root on sys.path, real-format COCO fixtures, a tiny SigLIP, synthetic data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tiny tensors: one intra-op thread is fastest, and two threads on a shared 2-core machine can stall badly
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = ROOT.parent / "shared" / "fixtures" / "coco"


@pytest.fixture(scope="session")
def fixtures_dir():
    """Verbatim COCO / Karpathy excerpts from ../shared; a user's clone has none, so skip cleanly."""
    if not FIXTURES.is_dir():
        pytest.skip(f"real-format fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    import synthetic
    return str(synthetic.make_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"), image_size=32, seed=0))


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    import synthetic
    return str(synthetic.make_synthetic_coco(tmp_path_factory.mktemp("coco"), n_images=60, seed=0))


@pytest.fixture(scope="session")
def planted():
    import synthetic
    return synthetic.make_planted_features(n_images=1200, seed=0)

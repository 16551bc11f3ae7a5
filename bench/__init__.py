"""What measures the product, apart from it (run from the repository root):

    python -m bench            # the benchmark: speed and memory against references (BENCHMARKS.md)
    python -m bench.learning   # data efficiency on planted embeddings (docs/EXPERIMENTS.md)

bench.py times the product's own functions against references.py (textbook / library versions of the
same computations) with timing.py (best-of-n wall time, peak RSS); learning.py trains train.py
folds.
"""

"""Training-step cost of SVD form vs dense: ResNet-20, 3×32×32, batch 128, SGD.

    python benchmarks/train_overhead.py [--rounds 15] [--steps 3] [--threads 2]

The same as `svdtrain bench overhead`. The SVD model carries both regularizers in its
loss (λ_o = 1, Hoyer λ_s = 1e-3); dense and SVD steps alternate in one process and
the figure is the median over rounds of (SVD time / dense time). Writes
benchmarks/results/train_overhead.json and the "train_overhead" section of RESULTS.md.
"""

import sys

from svdtrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overhead", *sys.argv[1:]]))

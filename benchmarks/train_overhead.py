"""Training-step cost of SVD form vs dense: ResNet-20, 3×32×32, batch 128, SGD.

The SVD model carries both regularizers in its loss (λ_o = 1, Hoyer λ_s = 1e-3).
Dense and SVD steps alternate in one process (A/B rounds) so machine noise hits
both alike; the figure is the median over rounds of (SVD time / dense time).

    python benchmarks/train_overhead.py [--rounds 15] [--steps 3] [--threads 2]

Writes benchmarks/results/train_overhead.json and its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import svdtrain
from svdtrain.recipes.models import resnet20
from svdtrain.recipes.report import write_section


def make_step(model, regularized: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        if regularized:
            loss = loss + 1.0 * svdtrain.orthogonality_loss(model) + 1e-3 * svdtrain.sparsity_loss(model, "hoyer")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(step, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="A/B rounds (default 15)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per side per round (default 3)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_overhead.json")
    parser.add_argument("--results", type=Path, default=Path(__file__).parents[1] / "RESULTS.md",
                        help="Markdown file that gets the section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = resnet20()
    svd = copy.deepcopy(dense)
    report = svdtrain.decompose_(svd, svdtrain.SVDConfig(decomposition="channel"))
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    dense_step, svd_step = make_step(dense, False), make_step(svd, True)
    for _ in range(2):  # warm-up: allocator, oneDNN kernels
        for step in (dense_step, svd_step):
            timed(step, x, y, args.steps)

    ratios, dense_times, svd_times = [], [], []
    for i in range(args.rounds):
        # Alternate which side goes first so drift within a round cancels.
        if i % 2 == 0:
            d, s = timed(dense_step, x, y, args.steps), timed(svd_step, x, y, args.steps)
        else:
            s, d = timed(svd_step, x, y, args.steps), timed(dense_step, x, y, args.steps)
        dense_times.append(d)
        svd_times.append(s)
        ratios.append(s / d)
        print(f"round {i + 1:2d}: dense {d * 1e3:7.1f} ms  svd {s * 1e3:7.1f} ms  ratio {s / d:.3f}", flush=True)

    q = statistics.quantiles(ratios, n=4)
    result = {
        "benchmark": "train_overhead",
        "model": "resnet20", "input": [args.batch, 3, 32, 32], "optimizer": "SGD momentum 0.9",
        "regularizers": {"orthogonality": 1.0, "hoyer": 1e-3},
        "decomposed_layers": len(report.replaced),
        "rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads,
        "dense_step_ms_median": statistics.median(dense_times) * 1e3,
        "svd_step_ms_median": statistics.median(svd_times) * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratio_iqr": [q[0], q[2]], "ratio_min": min(ratios), "ratio_max": max(ratios),
        "torch": torch.__version__, "svdtrain": svdtrain.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
    }
    print(f"SVD-form step / dense step: median {result['ratio_median']:.3f} "
          f"(IQR {q[0]:.3f}–{q[2]:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} rounds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_section(args.results, "train_overhead", "\n".join([
        "## Training-step overhead of the SVD form (`benchmarks/train_overhead.py`)",
        "",
        f"Command: `python benchmarks/train_overhead.py {' '.join(sys.argv[1:])}`".rstrip() + f" — {result['machine']}, "
        f"{args.threads} threads, torch {torch.__version__}.",
        "",
        f"ResNet-20, batch {args.batch}×3×32×32, SGD; the SVD model ({len(report.replaced)} layers decomposed, full "
        "rank) has the orthogonality (λ_o = 1) and Hoyer (λ_s = 1e-3) regularizers in its loss. Dense and SVD steps "
        f"alternate in one process, {args.rounds} rounds of {args.steps} steps each.",
        "",
        f"SVD-form step / dense step: median **{result['ratio_median']:.3f}** (IQR {q[0]:.3f}–{q[2]:.3f}, min "
        f"{min(ratios):.3f}, max {max(ratios):.3f}); dense step median {result['dense_step_ms_median']:.0f} ms, "
        f"SVD step {result['svd_step_ms_median']:.0f} ms.",
        ""]))


if __name__ == "__main__":
    main()

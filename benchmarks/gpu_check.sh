#!/usr/bin/env bash
# One GPU, end to end: the Fashion-MNIST ResNet-20 pipeline (configs/gpu_check.toml), sized for ≤ 8 minutes
# on an H100. Prints dense vs SVD-form training throughput, final accuracy, FLOPs reduction and the GPU
# latency speed-up; on a GPU it also writes benchmarks/results/gpu_check.json and RESULTS.md's section.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh device=cpu train_subset=2000 train_epochs=1 sparsify_epochs=1 \
#        finetune_epochs=1 export_backend=eager  # a dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
out=$(mktemp -d)
started=$(date +%s)
"$python" -m svdtrain.cli run configs/gpu_check.toml "out_dir=$out" "$@" | tee "$out/stdout.txt"
folder=$(tail -n 1 "$out/stdout.txt")
"$python" - "$folder" "$(( $(date +%s) - started ))" <<'PY'
import csv, json, statistics, sys
from pathlib import Path

from svdtrain.recipes.files import write_section

folder, wall = Path(sys.argv[1]), int(sys.argv[2])
report = json.loads((folder / "report.json").read_text())


def throughput(stage):
    """Median images/s over the stage's epochs after the first (which pays for warm-up)."""
    with (folder / stage / "log.csv").open() as f:
        rates = [float(row["images_per_second"]) for row in csv.DictReader(f)]
    return statistics.median(rates[1:] or rates)


final, dense, env = report["final"], report["dense"], report["environment"]
summary = {
    "device": env.get("gpu", "cpu"), "torch": env["torch"], "wall_seconds": wall,
    "images_per_second": {"dense (train)": throughput("train"), "svd form, full rank (sparsify)":
                          throughput("sparsify"), "svd form, pruned (finetune)": throughput("finetune")},
    "dense_accuracy": dense["accuracy"], "final_accuracy": final["accuracy"],
    "flops_reduction": final["flops_reduction"], "gpu_latency": final.get("gpu_latency"),
    "config": {k: report["config"][k] for k in ("amp", "channels_last", "compile", "batch_size", "train_subset",
                                                "train_epochs", "sparsify_epochs", "finetune_epochs")},
}
rates = summary["images_per_second"]
lines = [f"Device: {summary['device']} (torch {summary['torch']}); whole script {wall} s.", "",
         "| training | images/s |", "|---|---:|", *[f"| {k} | {v:,.0f} |" for k, v in rates.items()], "",
         f"SVD-form / dense throughput: {rates['svd form, full rank (sparsify)'] / rates['dense (train)']:.2f}.",
         f"Accuracy: dense {dense['accuracy']:.2f} %, final {final['accuracy']:.2f} %; "
         f"{final['flops_reduction']:.2f}× fewer FLOPs.", ""]
for batch, g in (final.get("gpu_latency") or {}).items():
    lines.append(f"GPU latency at batch {batch}: {g['final_ms']:.3f} ms vs dense {g['dense_ms']:.3f} ms "
                 f"({g['speedup']:.2f}× faster).")
text = "\n".join(lines)
print("\n" + text)
if summary["device"] != "cpu":
    Path("benchmarks/results/gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_section(Path("RESULTS.md"), "gpu_check",
                  "## One GPU, end to end (`bash benchmarks/gpu_check.sh`)\n\n" + text)
PY

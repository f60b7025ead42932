"""What rounding ranks to multiples costs and buys: two runs of the quick recipe, one with the default rank
multiples and one with `rank_multiple=1`, compared at the same FLOPs budget.

    svdtrain run progress=false out_dir=runs/multiples                   # the default: rounded ranks
    svdtrain run progress=false rank_multiple=1 out_dir=runs/multiples   # every rank allowed
    python benchmarks/rank_multiples.py runs/multiples/quick-A runs/multiples/quick-B

Both runs' fine-tuned models are exported by FLOPs and by latency (the run's deployment: export_backend at
export_batch on export_threads), and each export is timed against the dense model, alternated in one process,
at the deployment and on every backend at batch 1 and 32 on 2 threads. Writes
benchmarks/results/rank_multiples.json and the "rank_multiples" section of RESULTS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import svdtrain
from svdtrain.forms import dense_copy
from svdtrain.latency import paired_timing, runner, threads
from svdtrain.layers import svd_layers
from svdtrain.recipes.run import Run
from svdtrain.recipes.files import write_section
from svdtrain.recipes.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("onnxruntime", 1, 2), ("eager", 1, 2), ("compiled", 1, 2), ("onnxruntime", 32, 2), ("eager", 32, 2),
            ("compiled", 32, 2)]  # (backend, batch, threads), after the run's own deployment


def speedup(dense, small, x, backend: str) -> dict:
    timed = paired_timing(runner(dense, x, backend), runner(small, x, backend), budget_s=4.0)
    return {"dense_ms": timed["dense_ms"], "ms": timed["small_ms"], "speedup": timed["speedup"],
            "speedup_iqr": timed["speedup_iqr"]}


def measure(folder: Path) -> dict:
    run = Run.open(folder, echo=lambda *a: None)
    cfg = run.cfg
    model, x1 = run.model_after("finetune").eval(), run.example_input(1)
    dense = dense_copy(model).eval()
    record = {"run": folder.name, "rank_multiple": cfg.rank_multiple, "prune_flops": cfg.prune_flops,
              "accuracy": run.result("finetune")["accuracy"], "dense_accuracy": run.result("train")["accuracy"],
              "ranks": {name: layer.rank for name, layer in svd_layers(model)}, "points": []}
    deployment = (cfg.export_backend, cfg.export_batch, cfg.export_threads)
    for backend, batch, n in [deployment, *[s for s in SETTINGS if s != deployment]]:
        x = run.example_input(batch)
        with threads(n):
            for strategy in ("flops", "latency"):
                small = svdtrain.export(model, x, strategy=strategy, backend=backend).eval()
                point = {"backend": backend, "batch": batch, "threads": n, "strategy": strategy,
                         "flops_reduction": svdtrain.count_flops(dense, x1) / svdtrain.count_flops(small, x1),
                         **speedup(dense, small, x, backend)}
                record["points"].append(point)
                print(f"{folder.name} rank_multiple={cfg.rank_multiple} {backend:11s} batch {batch:2d} {n} thr "
                      f"{strategy:7s} FLOPs ÷{point['flops_reduction']:.2f}  ×{point['speedup']:.2f} "
                      f"({point['dense_ms']:.3f} → {point['ms']:.3f} ms)", flush=True)
    return record


def markdown(records: list[dict]) -> str:
    lines = ["## Rank multiples: what rounding costs and buys (`benchmarks/rank_multiples.py`)", "",
             "The quick recipe (`svdtrain run`) with its default rank multiples (16 for every ResNet-20 layer but "
             "the stem and the 1×1 shortcuts) and with `rank_multiple=1`, at the same FLOPs budget "
             f"({records[0]['prune_flops']}), each export timed against its dense model (speed-up = median of "
             "alternated dense / export times; IQR in brackets).", "",
             "| rank_multiple | accuracy (dense) | backend | batch | threads | export | FLOPs | speed-up |",
             "|---|---:|---|---:|---:|---|---:|---:|"]
    for r in records:
        for p in r["points"]:
            lines.append(f"| {r['rank_multiple'] or 'default'} | {r['accuracy']:.2f} % ({r['dense_accuracy']:.2f} %) "
                         f"| {p['backend']} | {p['batch']} | {p['threads']} | {p['strategy']} | "
                         f"÷{p['flops_reduction']:.2f} | {p['speedup']:.2f}× ({p['speedup_iqr'][0]:.2f}–"
                         f"{p['speedup_iqr'][1]:.2f}) |")
    lines += ["", "Ranks (rounded / exact): " + ", ".join(
        f"{name} {a}/{b}" for (name, a), b in zip(records[0]["ranks"].items(), records[1]["ranks"].values())), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    records = [measure(Path(folder)) for folder in sys.argv[1:3]]
    out = ROOT / "benchmarks" / "results" / "rank_multiples.json"
    write_atomic(out, json.dumps({"benchmark": "rank_multiples", "records": records,
                                  "torch": torch.__version__}, indent=2) + "\n")
    write_section(ROOT / "RESULTS.md", "rank_multiples", markdown(records))

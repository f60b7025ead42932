"""Benchmarks behind `svdtrain bench` (and the scripts in benchmarks/): measured, alternated, with spread."""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.latency import paired_timing, runner, timings

from .models import build_model, resnet20
from .files import write_atomic, write_section

ROOT = Path(__file__).resolve().parents[2]


def _environment(threads: int) -> dict:
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": threads,
            "torch": torch.__version__, "svdtrain": svdtrain.__version__, "python": platform.python_version()}


# --- training-step overhead ------------------------------------------------------------------------------------

def overhead(rounds: int = 15, steps: int = 3, batch: int = 128, threads: int = 2,
             out: Path = ROOT / "benchmarks" / "results" / "train_overhead.json", results: Path | None = None,
             command: str = "svdtrain bench overhead") -> dict:
    """Dense ResNet-20 step vs its SVD form with both regularizers (λ_o = 1, Hoyer λ_s = 1e-3), A/B alternated."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dense = resnet20()
    svd = copy.deepcopy(dense)
    report = svdtrain.decompose_(svd, svdtrain.SVDConfig(decomposition="channel"))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def make_step(model, regularized: bool):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step():
            loss = F.cross_entropy(model(x), y)
            if regularized:
                loss = loss + 1.0 * svdtrain.orthogonality_loss(model) + 1e-3 * svdtrain.sparsity_loss(model, "hoyer")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return lambda: [step() for _ in range(steps)]

    ms = timings({"dense": make_step(dense, False), "svd": make_step(svd, True)}, rounds, warmup=2)
    ratios = [s / d for d, s in zip(ms["dense"], ms["svd"])]
    for i, (d, s) in enumerate(zip(ms["dense"], ms["svd"])):
        print(f"round {i + 1:2d}: dense {d / steps:7.1f} ms  svd {s / steps:7.1f} ms  ratio {s / d:.3f}", flush=True)
    q = statistics.quantiles(ratios, n=4)
    result = {
        "benchmark": "train_overhead", "command": command,
        "model": "resnet20", "input": [batch, 3, 32, 32], "optimizer": "SGD momentum 0.9",
        "regularizers": {"orthogonality": 1.0, "hoyer": 1e-3}, "decomposed_layers": len(report.replaced),
        "rounds": rounds, "steps_per_round": steps,
        "dense_step_ms_median": statistics.median(ms["dense"]) / steps,
        "svd_step_ms_median": statistics.median(ms["svd"]) / steps,
        "ratio_median": statistics.median(ratios), "ratio_iqr": [q[0], q[2]],
        "ratio_min": min(ratios), "ratio_max": max(ratios), "environment": _environment(threads),
    }
    print(f"SVD-form step / dense step: median {result['ratio_median']:.3f} (IQR {q[0]:.3f}–{q[2]:.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}) over {rounds} rounds")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    if results is not None:
        write_section(results, "train_overhead", "\n".join([
            "## Training-step overhead of the SVD form (`svdtrain bench overhead`)",
            "",
            f"Command: `{command}` — {result['environment']['machine']}, {threads} threads, torch {torch.__version__}.",
            "",
            f"ResNet-20, batch {batch}×3×32×32, SGD; the SVD model ({len(report.replaced)} layers decomposed, full "
            "rank) has the orthogonality (λ_o = 1) and Hoyer (λ_s = 1e-3) regularizers in its loss. Dense and SVD "
            f"steps alternate in one process, {rounds} rounds of {steps} steps each.",
            "",
            f"SVD-form step / dense step: median **{result['ratio_median']:.3f}** (IQR {q[0]:.3f}–{q[2]:.3f}, min "
            f"{min(ratios):.3f}, max {max(ratios):.3f}); dense step median {result['dense_step_ms_median']:.0f} ms, "
            f"SVD step {result['svd_step_ms_median']:.0f} ms.",
            ""]))
    return result


# --- inference latency -----------------------------------------------------------------------------------------

LATENCY_MODELS = {  # name: (builder arguments, input shape without batch, rank multiple; None = prune_'s default)
    # ResNet-20's 16-channel layers need 8 to be factored at all. ResNet-50 takes prune_'s default (16 on every
    # one of its layers: 16 floats fill an AVX-512 register), so its points are the plain library calls.
    "resnet20": ((10, 3, 32), (3, 32, 32), 8),
    "resnet50": ((1000, 3, 224), (3, 224, 224), None),
    "lenet300": ((10, 1, 28), (1, 28, 28), 8),
    "vit_b16": ((1000, 3, 224), (3, 224, 224), None),
}
# A model timed at its own points, (FLOPs level, batch), instead of every level × batch: ViT-B/16 at half its FLOPs
# at batch 8 (its bar) and 1 (each forward takes seconds on 2 cores).
MODEL_POINTS = {"vit_b16": [(0.5, 8), (0.5, 1)]}
BAR_NEEDS = {"resnet50": {"onnxruntime": 2.6, "compiled": 2.6, "eager": 2.2, "eager_prepared": 2.2},
             "vit_b16": {"onnxruntime": 1.6}}


def _compare(dense_runner, small: nn.Module, x: torch.Tensor, backend: str, budget_s: float) -> dict:
    """Alternated timing of dense vs small; repeats sized so the point takes about `budget_s` seconds."""
    timed = paired_timing(dense_runner, runner(small, x, backend), budget_s)
    return {"dense_ms": timed["dense_ms"], "ms": timed["small_ms"], "speedup": timed["speedup"],
            "speedup_iqr": timed["speedup_iqr"], "repeats": timed["repeats"]}


CNN_MODELS = ("resnet20", "resnet50", "lenet300")


def latency(models=CNN_MODELS, levels=(0.6, 0.45, 0.35), batches=(1, 32),
            backends=("eager", "eager_prepared", "compiled", "onnxruntime"), bar_batch: int = 8,
            rank_multiple: int | None = None,
            threads: int = 2, budget_s: float = 3.0, out: Path | None = None, results: Path | None = None,
            command: str = "svdtrain bench latency") -> dict:
    """Measured speed-up of exported models over their dense originals, per model, FLOPs level, batch, backend.

    The default models write benchmarks/results/latency.json and RESULTS.md's "latency" section; another set
    (e.g. the transformer, vit_b16) its own, latency_<models>.json and section, so that neither overwrites the other.

    Each model (random weights, decomposed channel-wise except its classifier) is pruned to each FLOPs
    level with ranks rounded to `rank_multiple` (default: per model, LATENCY_MODELS), then exported with
    strategy="latency" for each backend and batch (decisions timed on that backend), and timed against the
    dense model alternately on it. "eager_prepared" and "compiled" prepare both models the same way.
    """
    torch.set_num_threads(threads)
    section = "latency" if tuple(models) == CNN_MODELS else "latency_" + "_".join(models)
    out = out or ROOT / "benchmarks" / "results" / f"{section}.json"
    records = []
    started = time.perf_counter()
    for name in models:
        (classes, channels, size), shape, multiple = LATENCY_MODELS[name]
        multiple = rank_multiple or multiple
        torch.manual_seed(0)
        dense = build_model(name, classes, channels, size).eval()
        exclude = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)][-1:]
        base = copy.deepcopy(dense)
        svdtrain.decompose_(base, svdtrain.SVDConfig(exclude_modules=exclude))
        x1 = torch.randn(1, *shape)
        dense_flops = svdtrain.count_flops(dense, x1)
        points = MODEL_POINTS.get(name) or [(level, batch) for level in levels for batch in batches]
        if name == "resnet50":
            points.append((1 / 3, bar_batch))
        pruned, dense_runners = {}, {}
        for level, batch in points:
            if level not in pruned:
                pruned[level] = copy.deepcopy(base)
                svdtrain.prune_(pruned[level], flops=level, example_inputs=x1, rank_multiple=multiple)
            x = torch.randn(batch, *shape)
            for backend in backends:
                t0 = time.perf_counter()
                layout = svdtrain.export_layout(pruned[level], x, strategy="latency", backend=backend)
                small = svdtrain.export(pruned[level], x, strategy="latency", backend=backend).eval()
                if (backend, batch) not in dense_runners:  # compiled once per batch, not per level
                    dense_runners[backend, batch] = runner(dense, x, backend)
                flops = svdtrain.count_flops(small, x1)
                # the whole-model check handed back the dense model although some layers were faster thin
                fell_back = flops == dense_flops and any(e["form"] == "thin" for e in layout.values())
                thin = 0 if fell_back else sum(e["form"] == "thin" for e in layout.values())
                record = {"model": name, "input": list(shape), "flops_level": level, "batch": batch,
                          "backend": backend, "rank_multiple": multiple or "default", "dense_flops": dense_flops,
                          "flops": flops, "flops_speedup": dense_flops / flops, "thin_layers": thin,
                          "layers": len(layout), "fell_back_to_dense": fell_back,
                          **_compare(dense_runners[backend, batch], small, x, backend, budget_s)}
                record["efficiency"] = record["speedup"] / record["flops_speedup"]
                record["wall_s"] = time.perf_counter() - t0
                records.append(record)
                print(f"{name} {shape} level {level:.2f} batch {batch:2d} {backend:15s} FLOPs ÷{record['flops_speedup']:.2f}"
                      f"  measured ×{record['speedup']:.2f} (IQR {record['speedup_iqr'][0]:.2f}–"
                      f"{record['speedup_iqr'][1]:.2f})  {record['dense_ms']:.2f} → {record['ms']:.2f} ms  "
                      f"efficiency {record['efficiency']:.2f}  thin {thin}/{len(layout)}", flush=True)
    result = {"benchmark": "latency", "command": command, "models": list(models), "levels": list(levels),
              "batches": list(batches),
              "bar_batch": bar_batch, "backends": list(backends), "points": records,
              "wall_s": time.perf_counter() - started, "environment": _environment(threads)}
    result["bars"] = {
        "every_point_at_least_0.97": all(r["speedup"] >= 0.97 for r in records),
        "slowest_point": min(records, key=lambda r: r["speedup"]) if records else None,
        **{f"{model}_batch8": {r["backend"]: {"flops_speedup": r["flops_speedup"], "speedup": r["speedup"],
                                              "efficiency": r["efficiency"]}
                               for r in records if r["model"] == model and r["batch"] == bar_batch}
           for model in BAR_NEEDS if model in models},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    if results is not None:
        write_section(results, section, _latency_markdown(result))
    return result


def _latency_markdown(result: dict) -> str:
    env = result["environment"]
    multiples = {r["model"]: r["rank_multiple"] for r in result["points"]}
    rounding = "; ".join(f"{name}: m = {m}" if m != "default" else f"{name}: none, prune_'s default, 16 on all its layers"
                         for name, m in multiples.items())
    lines = [
        "## Real speed of exported models (`svdtrain bench latency"
        + ("`)" if tuple(result.get("models", CNN_MODELS)) == CNN_MODELS else f" --models {','.join(result['models'])}`)"),
        "",
        f"Command: `{result['command']}` — {env['machine']}, {env['threads']} threads, torch {env['torch']}, "
        f"{result['wall_s'] / 60:.0f} min wall.",
        "",
        "Random-weight models decomposed channel-wise (classifier dense), pruned to a FLOPs level with "
        f"`prune_(flops=level, rank_multiple=m)` ({rounding}), "
        "exported with `export(strategy=\"latency\", backend=...)` at each batch, then timed against the dense model, "
        "alternating in one process (ms: median of repeats; speed-up: median of the paired dense / exported ratios, "
        "with their IQR). *eager* is the nn.Module as "
        "exported; *eager_prepared* applies the usual CPU inference preparation (conv-BN folding with torch.fx and "
        "channels_last) to **both** models; *compiled* is `torch.compile` (inductor, freezing: batch norm folded, "
        "weights prepacked) of both; *onnxruntime* is ONNX Runtime's CPU provider (its own graph optimizations, "
        "same threads). Each backend's export decisions are timed on that backend (for *compiled*, per layer as "
        "inductor runs a lone convolution, the whole-model never-slower check compiled).",
        "",
        "| model | FLOPs level | batch | backend | FLOPs speed-up | measured speed-up (IQR) | dense → exported (ms) "
        "| efficiency | thin layers (exported) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["points"]:
        lines.append(f"| {r['model']} | {r['flops_level']:.2f} | {r['batch']} | {r['backend']} | "
                     f"{r['flops_speedup']:.2f}× | {r['speedup']:.2f}× ({r['speedup_iqr'][0]:.2f}–"
                     f"{r['speedup_iqr'][1]:.2f}) | {r['dense_ms']:.2f} → {r['ms']:.2f} | {r['efficiency']:.2f} | "
                     f"{r['thin_layers']}/{r['layers']}"
                     + (" (fell back to dense)" if r.get("fell_back_to_dense") else "") + " |")
    bars = result["bars"]
    slow = bars["slowest_point"]
    lines += ["", "Bars:",
              f"- every point ≥ 0.97×: **{'met' if bars['every_point_at_least_0.97'] else 'not met'}** (slowest: "
              + (f"{slow['model']} level {slow['flops_level']:.2f} batch {slow['batch']} {slow['backend']} "
                 f"{slow['speedup']:.2f}×)" if slow else "—)")]
    for model, needs in BAR_NEEDS.items():
        for backend, r in bars.get(f"{model}_batch8", {}).items():
            if backend in needs:
                lines.append(f"- {model}, batch {result['bar_batch']}, FLOPs ÷{r['flops_speedup']:.2f}, {backend}: "
                             f"×{r['speedup']:.2f} (efficiency {r['efficiency']:.2f}; bar ≥ {needs[backend]}×: "
                             f"**{'met' if r['speedup'] >= needs[backend] else 'not met'}**)")
    return "\n".join(lines + [""])

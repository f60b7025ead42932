"""Where the time of a layer goes at the deployment: each convolution of ResNet-20 (28² images) timed alone on
ONNX Runtime at batch 1 on 1 thread, dense, as a spatial-wise thin pair at each rank prune_ may give it, and as
a convolution with fewer output channels (what filter pruning leaves) of the same FLOPs.

    python benchmarks/layer_profile.py

Writes benchmarks/results/layer_profile.json and the "layer_profile" section of RESULTS.md. The times include
the backend's fixed cost of a call (measured here as the time of a 1×1 convolution on one pixel), which a layer
pays once inside the whole model; `prune_` takes it off each layer's time when it predicts a model's latency.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch import nn

import svdtrain
from svdtrain.latency import threads, time_forms
from svdtrain.layers import svd_layers
from svdtrain.prune import _truncated, default_multiple, rank_grid
from svdtrain.recipes.models import resnet20
from svdtrain.recipes.report import write_section
from svdtrain.recipes.train import write_atomic
from svdtrain.stats import trace_svd_layers

ROOT = Path(__file__).resolve().parents[1]


def conv_flops(conv: nn.Conv2d, shape: tuple) -> int:
    return svdtrain.count_flops(conv, torch.zeros(shape))


def narrower(conv: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)


def profile(backend: str, batch: int) -> dict:
    torch.manual_seed(0)
    model = resnet20(10, 1).eval()
    svdtrain.decompose_(model, svdtrain.SVDConfig(decomposition="spatial", exclude_modules=("fc",)))
    shapes = trace_svd_layers(model, torch.zeros(batch, 1, 28, 28)).input_shapes
    call_ms = time_forms({"call": nn.Conv2d(1, 1, 1)}, (1, 1, 1, 1), backend)["call"]
    rows = []
    for name, layer in svd_layers(model):
        shape = shapes[name][0]
        dense = layer.to_dense()
        if not isinstance(dense, nn.Conv2d):
            continue
        dense_flops = conv_flops(dense, shape)
        ranks = [r for r in rank_grid(layer.rank, default_multiple(layer.full_rank)) if r < layer.rank]
        forms = {"dense": dense, **{f"thin{r}": _truncated(layer, r).to_thin_pair() for r in ranks}}
        thin_flops = {r: svdtrain.count_flops(forms[f"thin{r}"], torch.zeros(shape)) for r in ranks}
        # the filter-pruned conv of the same FLOPs: output channels in proportion, at least one
        for r in ranks:
            forms[f"pruned{r}"] = narrower(dense, max(1, round(dense.out_channels * thin_flops[r] / dense_flops)))
        ms = time_forms(forms, shape, backend)
        rows.append({"name": name, "input": list(shape), "out_channels": dense.out_channels,
                     "kernel": list(dense.kernel_size), "stride": dense.stride[0], "dense_ms": ms["dense"],
                     "dense_flops": dense_flops,
                     "ranks": [{"rank": r, "flops_fraction": thin_flops[r] / dense_flops, "thin_ms": ms[f"thin{r}"],
                                "pruned_out_channels": forms[f"pruned{r}"].out_channels,
                                "pruned_ms": ms[f"pruned{r}"]} for r in ranks]})
    return {"backend": backend, "batch": batch, "threads": torch.get_num_threads(), "call_ms": call_ms,
            "layers": rows}


def markdown(result: dict) -> str:
    p = result["profile"]
    lines = [
        "## Where a layer's time goes at the deployment (`benchmarks/layer_profile.py`)",
        "",
        f"Command: `{result['command']}` — {result['environment']}.",
        "",
        f"Each convolution of ResNet-20 at its input shape (28² images, batch {p['batch']}), timed alone on "
        f"{p['backend']} on {p['threads']} thread(s): dense, as a spatial-wise thin pair at each rank prune_ may "
        "give it (kh×1 then 1×kw convolution), and as a convolution with fewer output channels of the same FLOPs "
        f"(what filter pruning leaves). Times in µs, each including the backend's fixed cost of a call, "
        f"{p['call_ms'] * 1e3:.1f} µs here. Per row: the thin pair at the rank with about half the layer's FLOPs "
        "(the nearest below 0.5), and the lowest rank there is.",
        "",
        "| layer | input | dense (µs) | rank: FLOPs fraction | thin pair (µs) | channel-pruned conv, same FLOPs (µs) | "
        "lowest rank: FLOPs | thin (µs) | pruned (µs) |",
        "|---|---|---:|---|---:|---:|---|---:|---:|",
    ]
    totals = {"dense": 0.0, "thin": 0.0, "pruned": 0.0, "thin_low": 0.0, "pruned_low": 0.0}
    for row in p["layers"]:
        if not row["ranks"]:
            continue
        half = min(row["ranks"], key=lambda r: (r["flops_fraction"] > 0.5, abs(r["flops_fraction"] - 0.5)))
        low = row["ranks"][0]
        totals["dense"] += row["dense_ms"]
        totals["thin"] += half["thin_ms"]
        totals["pruned"] += half["pruned_ms"]
        totals["thin_low"] += low["thin_ms"]
        totals["pruned_low"] += low["pruned_ms"]
        lines.append(f"| {row['name']} | {'×'.join(map(str, row['input'][1:]))} | {row['dense_ms'] * 1e3:.1f} | "
                     f"{half['rank']}: {half['flops_fraction']:.2f} | {half['thin_ms'] * 1e3:.1f} | "
                     f"{half['pruned_ms'] * 1e3:.1f} ({half['pruned_out_channels']} ch) | "
                     f"{low['rank']}: {low['flops_fraction']:.2f} | {low['thin_ms'] * 1e3:.1f} | "
                     f"{low['pruned_ms'] * 1e3:.1f} |")
    lines.append(f"| sum | | {totals['dense'] * 1e3:.1f} | | {totals['thin'] * 1e3:.1f} | {totals['pruned'] * 1e3:.1f} | "
                 f"| {totals['thin_low'] * 1e3:.1f} | {totals['pruned_low'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_profile.json"))
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    args = parser.parse_args(argv)
    with threads(args.threads):
        result = {"benchmark": "layer_profile", "profile": profile(args.backend, args.batch),
                  "command": " ".join(["python benchmarks/layer_profile.py", *(argv or [])]),
                  "environment": f"{platform.machine()}, torch {torch.__version__}"}
    write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
    write_section(Path(args.results), "layer_profile", markdown(result))
    return result


if __name__ == "__main__":
    main()

"""Where the time of a layer goes at the deployment: each convolution of ResNet-20 (28² images) timed alone on
ONNX Runtime at batch 1 on 1 thread, dense, as a spatial-wise thin pair at each rank prune_ may give it, and as
the convolution filter pruning leaves at the same FLOPs (fewer input and output channels, as a uniform channel
ratio gives an inner layer), with its channel counts as they come and rounded up to multiples of 8.

    python benchmarks/layer_profile.py

Writes benchmarks/results/layer_profile.json and the "layer_profile" section of RESULTS.md. The times include
the backend's fixed cost of a call (measured here as the time of a 1×1 convolution on one pixel), which a layer
pays once inside the whole model; `prune_` takes it off each layer's time when it predicts a model's latency.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from torch import nn

import svdtrain
from svdtrain.latency import threads, time_forms
from svdtrain.layers import svd_layers
from svdtrain.forms import default_multiple, latency_grid, truncated
from svdtrain.recipes.models import resnet20
from svdtrain.recipes.files import write_section
from svdtrain.recipes.files import write_atomic
from svdtrain.stats import trace_svd_layers

ROOT = Path(__file__).resolve().parents[1]


def conv_flops(conv: nn.Conv2d, shape: tuple) -> int:
    return svdtrain.count_flops(conv, torch.zeros(shape))


def narrower(conv: nn.Conv2d, fraction: float, multiple: int = 1) -> nn.Conv2d:
    """`conv` with its channels cut as filter pruning at one ratio cuts an inner layer: input and output by √fraction
    (the stem keeps its input), each count rounded up to `multiple`."""
    def cut(channels: int) -> int:
        return min(channels, multiple * math.ceil(max(1, round(channels * fraction ** 0.5)) / multiple))

    in_channels = conv.in_channels if conv.in_channels < 4 else cut(conv.in_channels)
    out_channels = cut(conv.out_channels) if conv.in_channels >= 4 else \
        min(conv.out_channels, multiple * math.ceil(max(1, round(conv.out_channels * fraction)) / multiple))
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)


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
        multiple = default_multiple(layer.full_rank)
        ranks = [r for r in latency_grid(layer.rank, multiple, True) if r < layer.rank]
        forms = {"dense": dense, **{f"thin{r}": truncated(layer, r).to_thin_pair() for r in ranks}}
        thin_flops = {r: svdtrain.count_flops(forms[f"thin{r}"], torch.zeros(shape)) for r in ranks}
        for r in ranks:  # the filter-pruned conv of the same FLOPs, and with its channels rounded up to 8
            forms[f"pruned{r}"] = narrower(dense, thin_flops[r] / dense_flops)
            forms[f"pruned8_{r}"] = narrower(dense, thin_flops[r] / dense_flops, 8)
        ms = time_forms({k: m for k, m in forms.items() if not k.startswith("pruned")}, shape, backend)
        for form, conv in forms.items():  # a pruned conv has its own input shape
            if form.startswith("pruned"):
                ms.update(time_forms({form: conv}, (shape[0], conv.in_channels, *shape[2:]), backend))
        rows.append({"name": name, "input": list(shape), "out_channels": dense.out_channels, "multiple": multiple,
                     "kernel": list(dense.kernel_size), "stride": dense.stride[0], "dense_ms": ms["dense"],
                     "dense_flops": dense_flops,
                     "ranks": [{"rank": r, "flops_fraction": thin_flops[r] / dense_flops, "thin_ms": ms[f"thin{r}"],
                                **{f"{kind}_channels": [forms[f"{kind}{r}"].in_channels, forms[f"{kind}{r}"].out_channels]
                                   for kind in ("pruned", "pruned8_")},
                                **{f"{kind}_flops_fraction": conv_flops(forms[f"{kind}{r}"], (
                                    shape[0], forms[f"{kind}{r}"].in_channels, *shape[2:])) / dense_flops
                                   for kind in ("pruned", "pruned8_")},
                                "pruned_ms": ms[f"pruned{r}"], "pruned8_ms": ms[f"pruned8_{r}"]} for r in ranks]})
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
        f"{p['backend']} on {p['threads']} thread(s), random weights: dense; as a spatial-wise thin pair (kh×1 then "
        "1×kw convolution) at the lowest rank prune_'s default multiples allow (16, or a third of the full rank "
        "in smaller layers), and at its fastest rank of all a latency budget may give it (the powers of two below "
        "the multiple too); and as the convolution filter pruning "
        "leaves at the same FLOPs (input and output channels cut by the same ratio, as a uniform ratio cuts an "
        "inner layer; the stem keeps its one input channel), with the channel counts as they come and rounded up "
        f"to multiples of 8 (`round_to=8`; its FLOPs fraction beside it). Times in µs, each including the "
        f"backend's fixed cost of a call, {p['call_ms'] * 1e3:.1f} µs here, which a layer inside the whole model "
        "pays once for all.",
        "",
        "| layer | input | dense (µs) | thin pair: rank, FLOPs | thin (µs) | pruned, same FLOPs: in→out | pruned (µs) | "
        "pruned to ×8: in→out, FLOPs | ×8 (µs) | fastest thin pair: rank, FLOPs | fastest (µs) |",
        "|---|---|---:|---|---:|---|---:|---|---:|---|---:|",
    ]
    totals = {"dense": 0.0, "thin": 0.0, "pruned": 0.0, "pruned8": 0.0, "fastest": 0.0}
    for row in p["layers"]:
        if not row["ranks"]:
            continue
        low = next((r for r in row["ranks"] if r["rank"] >= row["multiple"]), row["ranks"][0])
        fastest = min(row["ranks"], key=lambda r: r["thin_ms"])
        for key, value in (("dense", row["dense_ms"]), ("thin", low["thin_ms"]), ("pruned", low["pruned_ms"]),
                           ("pruned8", low["pruned8_ms"]), ("fastest", fastest["thin_ms"])):
            totals[key] += value
        lines.append(f"| {row['name']} | {'×'.join(map(str, row['input'][1:]))} | {row['dense_ms'] * 1e3:.1f} | "
                     f"{low['rank']}, {low['flops_fraction']:.2f} | {low['thin_ms'] * 1e3:.1f} | "
                     f"{'→'.join(map(str, low['pruned_channels']))} | {low['pruned_ms'] * 1e3:.1f} | "
                     f"{'→'.join(map(str, low['pruned8__channels']))}, {low['pruned8__flops_fraction']:.2f} | "
                     f"{low['pruned8_ms'] * 1e3:.1f} | {fastest['rank']}, {fastest['flops_fraction']:.2f} | "
                     f"{fastest['thin_ms'] * 1e3:.1f} |")
    lines.append(f"| sum | | {totals['dense'] * 1e3:.1f} | | {totals['thin'] * 1e3:.1f} | | "
                 f"{totals['pruned'] * 1e3:.1f} | | {totals['pruned8'] * 1e3:.1f} | | {totals['fastest'] * 1e3:.1f} |")
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

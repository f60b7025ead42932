"""Where the ViT's batch-1 time goes on ONNX Runtime, and so how much faster any low-rank export of it can be.

    python benchmarks/vit_profile.py        # about 2 minutes, after benchmarks/transformer.py

From the transformer sweep's run folders (benchmarks/results/transformer.json: its seed-0 dense ViT and the
svd_gradual exports, seed 0), timed alternately in one process on ONNX Runtime at batch 1 on 1 thread
(`--repeats` calls each; median ms and the median of the paired ratios against dense, with their IQR):
- dense: the ViT as trained (nn.MultiheadAttention);
- dense, attention split: the same weights with the exported model's attention (SplitMultiheadAttention);
- each svd_gradual export of the sweep;
- the floor: the first export with every thin pair at rank 1 — what does not shrink with the ranks (layer
  norms, attention's products and softmax, reshapes and transposes, GELU, two nodes per thin pair);
- q, k, v fused: the first export with the first factors of q, k and v as one MatMul (in self-attention they
  read the same input), an export the library does not make: what it would add.
Then ONNX Runtime's profiler splits the dense model's and the first export's kernel time by operator type
(shares only: profiling slows every node).

Writes benchmarks/results/vit_profile.json and the "vit_profile" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.attention import SplitMultiheadAttention
from svdtrain.latency import _onnx_bytes, paired_speedup, runner, threads, timings
from svdtrain.recipes.run import Run, load_exported
from svdtrain.recipes.files import write_section

ROOT = Path(__file__).resolve().parents[1]


def _thin(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) == 2 and all(isinstance(m, nn.Linear) for m in module)


def at_rank_one(model: nn.Module) -> nn.Module:
    """`model` with every thin pair (Linear, Linear) at rank 1: the same graph, the least work per pair."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _thin(child):
                first, second = child
                setattr(parent, name, nn.Sequential(nn.Linear(first.in_features, 1, bias=False),
                                                    nn.Linear(1, second.out_features, bias=second.bias is not None)))
    return model


class FusedQKV(nn.Module):
    """Self-attention computed from an exported SplitMultiheadAttention whose q, k and v are thin pairs, with
    their three first factors stacked into one Linear (need_weights=False, no masks: as the ViT calls it)."""

    def __init__(self, attention: SplitMultiheadAttention):
        super().__init__()
        self.attention = attention
        firsts = [getattr(attention, p)[0].weight for p in ("q_proj", "k_proj", "v_proj")]
        self.ranks = [w.shape[0] for w in firsts]
        self.first = nn.Linear(attention.embed_dim, sum(self.ranks), bias=False)
        self.first.weight = nn.Parameter(torch.cat(firsts))

    def forward(self, query, key, value, need_weights=False):
        a = self.attention
        batch, length, _ = query.shape
        codes = self.first(query).split(self.ranks, -1)
        q, k, v = (getattr(a, p)[1](c).reshape(batch, length, a.num_heads, a.head_dim).transpose(1, 2)
                   for p, c in zip(("q_proj", "k_proj", "v_proj"), codes))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, a.embed_dim)
        return a.out_proj(out), None


def fused(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        a = block.self_attention
        if isinstance(a, SplitMultiheadAttention) and all(_thin(getattr(a, p)) for p in ("q_proj", "k_proj", "v_proj")):
            block.self_attention = FusedQKV(a)
    return model


def split_attention(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.self_attention = SplitMultiheadAttention.from_dense(block.self_attention).eval()
    return model


def op_shares(model: nn.Module, x: torch.Tensor, calls: int) -> dict:
    """Kernel time per ONNX Runtime operator type over `calls` runs (profiled): share of the total and nodes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(_onnx_bytes(model, x), options, providers=["CPUExecutionProvider"])
        for _ in range(calls):
            session.run(None, {"x": x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    time_by_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(time_by_op.values())
    return {op: {"share": t / total, "nodes": nodes[op] // calls} for op, t in time_by_op.most_common()}


def profile(args) -> dict:
    sweep = json.loads(Path(args.sweep).read_text())
    dense_run = Run.open(sweep["dense"]["seeds"][0]["folder"])
    x = dense_run.example_input(1)
    dense = dense_run.model_after("train").eval()
    exports = {f"svd_gradual, {p['flops_reduction']:.2f}× fewer FLOPs": load_exported(Path(p["folder"])).eval()
               for p in sweep["points"] if p["method"] == "svd_gradual" and p["seed"] == 0}
    first_name, first = next(iter(exports.items()))
    reduction = first_name.split(", ")[1].split(" ")[0]
    split, fused_name = "dense, attention split", f"the {reduction} export, q/k/v first factors fused"
    models = {"dense": dense, split: split_attention(dense), **exports,
              f"floor: the {reduction} export, every thin pair at rank 1": at_rank_one(first), fused_name: fused(first)}
    with torch.no_grad():  # the rewritten forms compute what they stand for
        for name, reference in ((split, dense), (fused_name, first)):
            error = (models[name](x) - reference(x)).abs().max().item()
            if error > 1e-4:
                raise RuntimeError(f"{name} does not compute the same function ({error:.2e})")
    with threads(1):
        times = timings({name: runner(m, x, "onnxruntime") for name, m in models.items()}, args.repeats, warmup=20)
        shares = {"dense": op_shares(dense, x, args.profile_calls),
                  first_name: op_shares(first, x, args.profile_calls)}
    rows = {name: {"median_ms": statistics.median(t), "flops": svdtrain.count_flops(models[name], x),
                   **paired_speedup(times["dense"], t)} for name, t in times.items()}
    return {"benchmark": "vit_profile", "command": args.command, "repeats": args.repeats, "models": rows,
            "op_shares": shares,
            "environment": {"device": f"CPU ({platform.machine()}), ONNX Runtime, batch 1, 1 thread",
                            "torch": torch.__version__, "svdtrain": svdtrain.__version__}}


def markdown(result: dict) -> str:
    rows = result["models"]
    dense_ms = rows["dense"]["median_ms"]
    lines = ["## Where the ViT's batch-1 time goes (`benchmarks/vit_profile.py`)", "",
             f"Command: `{result['command']}` — {result['environment']['device']}, {result['repeats']} calls of "
             "each model, alternately; speed-up = median of the paired ratios to dense (IQR).", "",
             "| model | MFLOPs | median ms | speed-up vs dense (IQR) |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        low, high = r["speedup_iqr"]
        lines.append(f"| {name} | {r['flops'] / 1e6:.1f} | {r['median_ms']:.3f} | {r['speedup']:.2f}× "
                     f"({low:.2f}–{high:.2f}) |")
    (floor,) = [r for name, r in rows.items() if name.startswith("floor")]
    lines += ["", f"The floor takes {floor['median_ms'] / dense_ms:.0%} of the dense model's time: what no rank "
              f"can cut. No export with this graph is more than {floor['speedup']:.2f}× faster at batch 1.", "",
              "Kernel time by operator type (ONNX Runtime's profiler; share of the kernel time, nodes per call):", ""]
    names = list(result["op_shares"])
    ops = list(dict.fromkeys(op for shares in result["op_shares"].values() for op in shares))
    lines += ["| operator | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for op in ops:
        cells = [f"{s[op]['share']:.0%} ({s[op]['nodes']})" if op in s else "—"
                 for s in result["op_shares"].values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(ROOT / "benchmarks" / "results" / "transformer.json"))
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--profile-calls", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vit_profile.json"))
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/vit_profile.py", *(argv if argv is not None else sys.argv[1:])])
    result = profile(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_section(Path(args.results), "vit_profile", markdown(result))
    return result


if __name__ == "__main__":
    main()

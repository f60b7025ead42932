"""Counting: FLOPs (measured by torch's FlopCounterMode), parameters, a per-layer summary."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import SVD_LAYERS, is_gpt2_conv1d, recording, svd_layers


def run_model(model: nn.Module, example_inputs):
    """model(x), model(*inputs) or model(**inputs) for a tensor, a tuple/list or a dict."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def logits_of(output):
    """A model's logits: the output itself (a tensor), its first item (a tuple or list), or its `.logits` (an
    object such as Hugging Face's outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned a {type(output).__name__}; allowed: logits (a tensor), a tuple or list "
                    "whose first item is the logits, or an object with a `logits` tensor")


@contextmanager
def inference(model: nn.Module):
    """Eval mode and no autograd for a measuring forward; restores every module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one inference forward (2 per multiply-accumulate), counted by torch's FlopCounterMode.

    The model runs in eval mode without autograd; its train/eval flags are restored.

    Args:
        model: any nn.Module (dense, SVD form or exported).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Example:
        >>> count_flops(model, torch.randn(1, 3, 32, 32))
    """
    return _flops(model, example_inputs)[0]


def _fused_attention_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of nn.MultiheadAttention's fused inference kernel, which torch's counter does not know: the q, k, v
    and output projections (E × E each, per token) and the two attention products (L × S × E each)."""
    batch, length, _ = query
    source = key[1]
    return 2 * batch * embed_dim * (2 * length * embed_dim + 2 * source * embed_dim + 2 * length * source)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled_dot_product_attention's CPU kernel, which torch's counter does not know: q·kᵀ and the
    weights times v, L × S × head_dim each, per batch and head."""
    *lead, length, dim = query
    return 4 * math.prod(lead) * length * key[-2] * dim


_UNCOUNTED = {torch.ops.aten._native_multi_head_attention: _fused_attention_flops,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _flops(model, example_inputs) -> tuple[int, dict[str, int]]:
    """Total FLOPs and FLOPs per module name (as nn.Module.named_modules names them)."""
    with inference(model), FlopCounterMode(display=False, custom_mapping=_UNCOUNTED) as counter:
        run_model(model, example_inputs)
    root = type(model).__name__
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root or key.startswith(root + "."):
            per_module[key[len(root) + 1:]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerTrace:
    """What one measuring forward tells about each SVD layer of a model."""

    input_shapes: dict[str, list[tuple[int, ...]]]  # layer name -> input shape of each call
    weight_read: set[str]  # layers whose .weight a parent read outside the layer's own forward


def trace_svd_layers(model: nn.Module, example_inputs) -> LayerTrace:
    """Run one inference forward and record the SVD layers' input shapes and outside `.weight` reads."""
    layers = svd_layers(model)
    with inference(model), recording() as seen:
        run_model(model, example_inputs)
    return LayerTrace({name: seen.input_shapes.get(layer, []) for name, layer in layers},
                      {name for name, layer in layers if layer in seen.weight_reads})


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts as an aligned text table; numbers right-aligned, floats to 4 digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


@dataclass
class Summary:
    """Per-layer rows (name, kind, shape, rank, channels, energy_kept, flops) and whole-model totals."""

    rows: list[dict]
    total_flops: int
    total_params: int

    def to_dict(self) -> dict:
        return {"rows": self.rows, "total_flops": self.total_flops, "total_params": self.total_params}

    def __str__(self) -> str:
        table = format_table(self.rows, ["name", "kind", "shape", "rank", "channels", "energy_kept", "flops"])
        return f"{table}\ntotal: {self.total_flops:,} FLOPs, {self.total_params:,} parameters"


def summary(model: nn.Module, example_inputs) -> Summary:
    """One row per Linear/Conv/SVD layer: name, kind, weight shape, rank / full rank, channels kept, energy kept,
    FLOPs. Channels kept: for an SVD layer "all", or after `prune_(channels=True)` the input and output channels
    (features) kept of those it was built with; empty for a plain layer.

    A split attention's projections are rows like any Linear; an nn.MultiheadAttention is one row
    (its four E × E projections and its attention products).

    Example:
        >>> print(summary(model, torch.randn(1, 3, 32, 32)))
    """
    total, per_module = _flops(model, example_inputs)
    inside_attention = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}
    rows = []
    for name, m in model.named_modules():
        if id(m) in inside_attention:  # its forward never runs: the attention's row counts it
            continue
        if isinstance(m, nn.MultiheadAttention):  # packed q, k, v: one row, the attention products included
            rows.append({"name": name, "kind": "MultiheadAttention", "shape": f"{m.embed_dim}×{m.embed_dim}×4",
                         "rank": "dense", "channels": "", "energy_kept": None, "flops": per_module.get(name, 0)})
            continue
        if isinstance(m, SVD_LAYERS):
            kind = type(m).__name__ + (f"{m.dims}d {m.decomposition}" if hasattr(m, "dims") else "")
            rank, energy = f"{m.rank}/{m.full_rank}", float(m.energy_kept)
            (inputs, outputs), (dense_in, dense_out) = m._widths(), m.dense_widths
            kept = "all" if (inputs, outputs) == (dense_in, dense_out) else \
                f"in {inputs}/{dense_in}, out {outputs}/{dense_out}"
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or is_gpt2_conv1d(m):
            kind, rank, energy, kept = type(m).__name__, "dense", None, ""
        else:
            continue
        rows.append({"name": name, "kind": kind, "shape": "×".join(map(str, m.weight.shape)), "rank": rank,
                     "channels": kept, "energy_kept": energy, "flops": per_module.get(name, 0)})
    return Summary(rows, total, count_params(model))

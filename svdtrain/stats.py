"""Counting: FLOPs (measured by torch's FlopCounterMode), parameters, a per-layer summary."""

from __future__ import annotations

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


def _flops(model, example_inputs) -> tuple[int, dict[str, int]]:
    """Total FLOPs and FLOPs per module name (as nn.Module.named_modules names them)."""
    with inference(model), FlopCounterMode(display=False) as counter:
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
    """Per-layer rows (name, kind, shape, rank, energy_kept, flops) and whole-model totals."""

    rows: list[dict]
    total_flops: int
    total_params: int

    def to_dict(self) -> dict:
        return {"rows": self.rows, "total_flops": self.total_flops, "total_params": self.total_params}

    def __str__(self) -> str:
        table = format_table(self.rows, ["name", "kind", "shape", "rank", "energy_kept", "flops"])
        return f"{table}\ntotal: {self.total_flops:,} FLOPs, {self.total_params:,} parameters"


def summary(model: nn.Module, example_inputs) -> Summary:
    """One row per Linear/Conv/SVD layer: name, kind, weight shape, rank / full rank, energy kept, FLOPs.

    Example:
        >>> print(summary(model, torch.randn(1, 3, 32, 32)))
    """
    total, per_module = _flops(model, example_inputs)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, SVD_LAYERS):
            kind = type(m).__name__ + (f"{m.dims}d {m.decomposition}" if hasattr(m, "dims") else "")
            rank, energy = f"{m.rank}/{m.full_rank}", float(m.energy_kept)
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or is_gpt2_conv1d(m):
            kind, rank, energy = type(m).__name__, "dense", None
        else:
            continue
        rows.append({"name": name, "kind": kind, "shape": "×".join(map(str, m.weight.shape)), "rank": rank,
                     "energy_kept": energy, "flops": per_module.get(name, 0)})
    return Summary(rows, total, count_params(model))

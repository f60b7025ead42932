"""The forms an SVD layer takes in an export (dense, or a thin pair at some rank), the ranks a budget offers each
layer, and a copy of a model with every SVD layer in a chosen form: what `export` and `prune_` both decide with."""

from __future__ import annotations

import copy
import math

from torch import nn

from .attention import PROJECTIONS, SplitMultiheadAttention
from .decompose import swap_modules
from .layers import SVD_LAYERS


def default_multiple(full_rank: int) -> int:
    """The rank multiple a budget rounds a layer's rank to by default: the largest power of two ≤ 16 and ≤ a
    third of the layer's full rank. CPU convolution and GEMM kernels work on blocks of 8 or 16 channels
    (ONNX Runtime's NCHWc layout uses 16 with AVX-512), and a thin pair whose inner size is off those blocks
    runs slower than its FLOPs say; the cap keeps at least three ranks to choose from in small layers."""
    return 1 << max(0, min(4, (max(1, full_rank // 3)).bit_length() - 1))


def rank_grid(rank: int, multiple: int) -> list[int]:
    """The ranks at which a layer's thin pair is timed: multiples of `multiple`, denser at low rank, plus `rank`."""
    fractions = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)
    return sorted({min(rank, max(multiple, multiple * math.ceil(rank * f / multiple))) for f in fractions})


def latency_grid(rank: int, multiple: int, below_multiple: bool) -> list[int]:
    """The ranks a latency budget may give a layer, each timed: `rank_grid`, and with `below_multiple` the powers
    of two under the multiple too. Below a kernel's block of channels a thin pair's time can fall again (the
    kernel changes), which the rounded grid never sees; the measured times decide which of them pay."""
    grid = set(rank_grid(rank, multiple))
    if below_multiple:
        grid |= {2 ** k for k in range(1, multiple.bit_length()) if 2 ** k < min(multiple, rank)}
    return sorted(grid)


def truncated(layer, rank: int):
    """A copy of the SVD layer `layer` at `rank` (its largest singular values); `layer` is not changed."""
    out = copy.deepcopy(layer)
    out.truncate_(rank)
    return out


def with_forms(model: nn.Module, make) -> nn.Module:
    """A copy of `model` in which every SVD layer `layer` named `name` becomes `make(name, layer)`, and every
    split attention whose projections all came out dense is nn.MultiheadAttention again."""
    copied = swap_modules(copy.deepcopy(model), lambda m, fqn: make(fqn, m) if isinstance(m, SVD_LAYERS) else None)
    return swap_modules(copied, lambda m, fqn: _merged(m) if isinstance(m, SplitMultiheadAttention) else None)


def _merged(attention: SplitMultiheadAttention) -> nn.Module:
    """nn.MultiheadAttention (its fused fast paths included) for a split attention of plain Linear projections."""
    if all(type(getattr(attention, name)) is nn.Linear for name in PROJECTIONS):
        return attention.to_dense()
    return attention


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every SVD layer as one plain dense layer (the same function, the original shapes)."""
    return with_forms(model, lambda name, layer: layer.to_dense())

"""SVD-form layers: each weight is held as W = U · diag(s) · Vᵀ and trained in that form.

Conventions (METHOD.md §1):
- U is the output side (a × r), V the input side (b × r); s is used as is
  (signed), the sparsity regularizers act on |s|.
- groups == 1: U (a, r), s (r,), V (b, r). groups > 1: one SVD per group,
  U (g, a, r), s (g, r), V (g, b, r); all groups of a layer share one rank.
- Linear (out n, in m): a = n, b = m.
- Conv channel-wise: a = n/g, b = (c/g)·k1·k2…  (V side: a conv with the layer's
  own geometry to r channels; U side: a 1×1 conv).
- Conv spatial-wise (2-D only): a = (n/g)·kw, b = (c/g)·kh  (V side: kh×1 conv;
  U side: 1×kw conv).
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DECOMPOSITIONS, INITS
from .geometry import CONV_CLASSES, PADDING_MODES, ConvGeometry, as_tuple


class Recording:
    """What SVD layers saw while `recording()` was active."""

    def __init__(self):
        self.input_shapes: dict[nn.Module, list[tuple[int, ...]]] = defaultdict(list)
        # A layer's own forward never reads `.weight`, so every read recorded here comes from outside.
        self.weight_reads: set[nn.Module] = set()


# Set by `recording()`; forward hooks would do the same but switch off PyTorch fast paths
# (TransformerEncoderLayer's) and so change what is being recorded.
_recording: Recording | None = None


@contextmanager
def recording():
    """Record every SVD layer's input shapes and outside `.weight` reads while the block runs."""
    global _recording
    previous, _recording = _recording, Recording()
    try:
        yield _recording
    finally:
        _recording = previous


class LayerCost(NamedTuple):
    """Multiply-accumulates of one forward at a given input shape."""

    dense: int  # one ordinary op with the rebuilt weight
    thin_per_rank: int  # the two thin ops cost thin_per_rank × rank
    rebuild_per_rank: int  # rebuilding W = U·diag(s)·Vᵀ costs rebuild_per_rank × rank

    def thin(self, rank: int) -> int:
        return self.thin_per_rank * rank


class _Factorized(nn.Module):
    """What SVDLinear and SVDConv share: the factors, the rebuilt weight, truncation.

    A subclass sets `groups`, `_a`, `_b` (the a × b matrix per group) and
    `_weight_shape`, implements `_weight_from_matrix`, `_matrix_from_weight`,
    `_positions` and `forward`, then calls `_init_factors`.
    """

    def _init_factors(self, rank: int | None, device=None, dtype=None):
        self.full_rank = min(self._a, self._b)
        if rank is None:
            rank = self.full_rank
        if not isinstance(rank, int) or not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank={rank!r}; allowed: an int in [1, {self.full_rank}] for this layer")
        self._make_factors(rank, device, dtype)
        # Fraction of Σ s² kept by truncation so far (for reports); a buffer, so checkpoints carry it.
        self.register_buffer("energy_kept", torch.ones((), device=device, dtype=torch.float32))

    def _make_factors(self, rank: int, device=None, dtype=None):
        lead = (self.groups,) if self.groups > 1 else ()
        for name, rows in (("U", self._a), ("V", self._b), ("s", None)):
            old = getattr(self, name, None)
            shape = lead + ((rank,) if rows is None else (rows, rank))
            kw = dict(device=old.device, dtype=old.dtype) if old is not None else dict(device=device, dtype=dtype)
            grad = old.requires_grad if old is not None else True
            setattr(self, name, nn.Parameter(torch.empty(shape, **kw), requires_grad=grad))

    def _init_bias(self, bias: bool, size: int, device, dtype):
        if bias:
            self.bias = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        return self.s.shape[-1]

    @property
    def weight(self) -> torch.Tensor:
        """The rebuilt dense weight (a tensor, not a Parameter), in the original layer's layout."""
        if _recording is not None:
            _recording.weight_reads.add(self)
        return self._dense_weight()

    def _dense_weight(self) -> torch.Tensor:
        return self._weight_from_matrix((self.U * self.s.unsqueeze(-2)) @ self.V.mT)

    @torch.no_grad()
    def reset_parameters(self):
        """A random layer with PyTorch's default dense init, stored as its exact SVD."""
        weight = torch.empty(self._weight_shape, device=self.s.device, dtype=self.s.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._set_from_weight(weight)
        if self.bias is not None:
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _set_from_weight(self, weight: torch.Tensor):
        # float64 SVD: a float32 SVD alone leaves ~1e-6 relative reconstruction error.
        u, s, vh = torch.linalg.svd(self._matrix_from_weight(weight).double(), full_matrices=False)
        r = self.rank
        self.U.copy_(u[..., :r])
        self.s.copy_(s[..., :r])
        self.V.copy_(vh[..., :r, :].mT)
        self.energy_kept.fill_((s[..., :r].square().sum() / s.square().sum().clamp_min(1e-300)).item())

    def _init_from(self, layer: nn.Module, init: str, weight: torch.Tensor):
        """Copy bias and factors from a dense `layer` (init "svd"), or keep the random init."""
        if init not in INITS:
            raise ValueError(f"init={init!r}; allowed: {', '.join(INITS)}")
        if init == "svd":
            self._set_from_weight(weight.detach())
            if self.bias is not None:
                with torch.no_grad():
                    self.bias.copy_(layer.bias)
        self.train(layer.training)
        return self

    @torch.no_grad()
    def truncate_(self, rank: int) -> float:
        """Keep the `rank` largest |s| of every group, physically shrinking U, s, V.

        Returns the fraction of Σ s² kept. The parameters are new objects: rebuild
        the optimizer afterwards.
        """
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank={rank}; allowed: 1 ≤ rank ≤ {self.rank} (the current rank)")
        energy = self.s.square()
        keep = self.s.abs().topk(rank, dim=-1).indices
        kept = energy.gather(-1, keep).sum() / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
        U = self.U.gather(-1, keep.unsqueeze(-2).expand(*self.U.shape[:-1], rank))
        V = self.V.gather(-1, keep.unsqueeze(-2).expand(*self.V.shape[:-1], rank))
        s = self.s.gather(-1, keep)
        self._make_factors(rank)
        self.U.copy_(U)
        self.s.copy_(s)
        self.V.copy_(V)
        self.energy_kept.mul_(kept.float())
        return float(kept)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A pruned checkpoint loads into a freshly decomposed model: adopt its widths (channels removed) and rank.
        U, V = state_dict.get(prefix + "U"), state_dict.get(prefix + "V")
        if U is not None and V is not None and self.groups == 1 and (U.shape[-2], V.shape[-2]) != (self._a, self._b):
            self._set_widths(V.shape[-2] // self._per_input(), U.shape[-2] // self._per_output())
            self._make_factors(self.rank)
        s = state_dict.get(prefix + "s")
        if s is not None and s.shape[:-1] == self.s.shape[:-1] and s.shape[-1] != self.rank:
            self._make_factors(s.shape[-1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _per_output(self) -> int:
        """Rows of U per output channel (per group): kw spatial-wise, else 1."""
        return self._a * self.groups // self._widths()[1]

    def _per_input(self) -> int:
        """Rows of V per input channel (per group): kh spatial-wise, the kernel's size channel-wise, 1 for Linear."""
        return self._b * self.groups // self._widths()[0]

    def _set_widths(self, inputs: int, outputs: int, groups: int | None = None):
        """Set the layer's input and output channels (features), its matrix size and full rank to match; the
        factors are not touched (channels.py cuts them, `_load_from_state_dict` loads them)."""
        per_in, per_out = self._per_input(), self._per_output()
        self.groups = self.groups if groups is None else groups
        self._a, self._b = outputs // self.groups * per_out, inputs // self.groups * per_in
        self._weight_shape = (outputs, inputs // self.groups, *self._weight_shape[2:])
        self.full_rank = min(self._a, self._b)
        self._store_widths(inputs, outputs)

    def cost(self, input_shape) -> LayerCost:
        """MACs of one forward at `input_shape`, for each way of running the layer."""
        positions_mid, positions_out = self._positions(tuple(input_shape))
        g, a, b = self.groups, self._a, self._b
        return LayerCost(
            dense=positions_out * g * a * b,
            thin_per_rank=g * (positions_mid * b + positions_out * a),
            rebuild_per_rank=g * a * b,
        )

    def _thin_is_cheaper(self, input_shape) -> bool:
        c = self.cost(input_shape)
        return c.thin(self.rank) < c.dense + c.rebuild_per_rank * self.rank

    def exported_thin(self, input_shapes, rank: int | None = None) -> bool:
        """Whether `export` makes this layer a thin pair: fewer FLOPs over the calls seen with
        `input_shapes`, or fewer parameters when the layer was never seen running."""
        rank = self.rank if rank is None else rank
        if not input_shapes:
            return rank * (self._a + self._b) < self._a * self._b
        costs = [self.cost(shape) for shape in input_shapes]
        return sum(c.thin(rank) for c in costs) < sum(c.dense for c in costs)

    def exported_params(self, thin: bool, rank: int | None = None) -> int:
        rank = self.rank if rank is None else rank
        bias = 0 if self.bias is None else self.bias.numel()
        return self.groups * (rank * (self._a + self._b) if thin else self._a * self._b) + bias


class SVDLinear(_Factorized):
    """A Linear layer trained as W = U · diag(s) · Vᵀ.

    Args:
        in_features, out_features, bias: as nn.Linear.
        rank: number of singular values kept (default: full rank min(in, out)).

    Example:
        >>> layer = SVDLinear.from_dense(nn.Linear(64, 32))
        >>> layer.U.shape, layer.s.shape, layer.V.shape
        (torch.Size([32, 32]), torch.Size([32]), torch.Size([64, 32]))
    """

    groups = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dense_widths = (in_features, out_features)  # as built: channel removal narrows the layer, not this
        self._a, self._b = out_features, in_features
        self._weight_shape = (out_features, in_features)
        # Set for layers made from a Hugging Face GPT-2 `Conv1D`, whose weight is stored (in, out).
        self.transposed_weight = False
        self._init_factors(rank, device, dtype)
        self._init_bias(bias, out_features, device, dtype)
        self.reset_parameters()

    @classmethod
    def from_dense(cls, layer: nn.Module, init: str = "svd", rank: int | None = None) -> "SVDLinear":
        """An SVDLinear computing what `layer` (nn.Linear or GPT-2 `Conv1D`) computes.

        Args:
            layer: the dense layer; it is not modified.
            init: "svd" (exact SVD of its weight) or "random" (from scratch).
            rank: keep only the largest `rank` singular values (default: all).
        """
        transposed = is_gpt2_conv1d(layer)
        if not (transposed or isinstance(layer, nn.Linear)):
            raise TypeError(f"SVDLinear.from_dense expects nn.Linear or a GPT-2 Conv1D, got {type(layer).__name__}")
        weight = layer.weight.T if transposed else layer.weight
        new = cls(weight.shape[1], weight.shape[0], bias=layer.bias is not None, rank=rank,
                  device=weight.device, dtype=weight.dtype)
        new.transposed_weight = transposed
        return new._init_from(layer, init, weight)

    @property
    def weight(self) -> torch.Tensor:
        w = _Factorized.weight.fget(self)
        return w.T if self.transposed_weight else w

    def _widths(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _store_widths(self, inputs: int, outputs: int):
        self.in_features, self.out_features = inputs, outputs

    def _matrix_from_weight(self, weight):
        return weight

    def _weight_from_matrix(self, matrix):
        return matrix

    def _positions(self, input_shape):
        rows = math.prod(input_shape[:-1])
        return rows, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _recording is not None:
            _recording.input_shapes[self].append(tuple(x.shape))
        if self._thin_is_cheaper(x.shape):
            return F.linear(F.linear(x, (self.V * self.s).T), self.U, self.bias)
        return F.linear(x, self._dense_weight(), self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the rebuilt weight (GPT-2 layers come back as nn.Linear too)."""
        kw = dict(device=self.s.device, dtype=self.s.dtype)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **kw)
        dense.weight.copy_(self._dense_weight())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

    @torch.no_grad()
    def to_thin_pair(self) -> nn.Sequential:
        """nn.Sequential(Linear(in → r), Linear(r → out)) computing the same function."""
        kw = dict(device=self.s.device, dtype=self.s.dtype)
        first = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, **kw)
        first.weight.copy_((self.V * self.s).T)
        second.weight.copy_(self.U)
        if self.bias is not None:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}/{self.full_rank}, bias={self.bias is not None}")


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 `Conv1D` (y = x @ W + b, W stored (in, out)), recognised without importing it."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


class SVDConv(_Factorized):
    """A Conv1d/2d/3d trained as one W = U · diag(s) · Vᵀ per group.

    Args:
        in_channels … padding_mode: as nn.Conv2d (padding: numbers, "same" or "valid").
        dims: 1, 2 or 3 spatial dimensions.
        decomposition: "channel" (any dims) or "spatial" (dims == 2 only).
        rank: number of singular values kept per group (default: full rank).

    Example:
        >>> layer = SVDConv.from_dense(nn.Conv2d(16, 32, 3, padding=1), decomposition="spatial")
        >>> layer.rank, layer.full_rank
        (48, 48)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, dims: int = 2,
                 decomposition: str = "channel", rank: int | None = None, device=None, dtype=None):
        super().__init__()
        if dims not in CONV_CLASSES:
            raise ValueError(f"dims={dims!r}; allowed: 1, 2, 3")
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition={decomposition!r}; allowed: {', '.join(DECOMPOSITIONS)}")
        if decomposition == "spatial" and dims != 2:
            raise ValueError(f"decomposition='spatial' needs a 2-D convolution, this one has dims={dims}; "
                             "use decomposition='channel'")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must be ≥ 1 and divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r}; allowed: {', '.join(PADDING_MODES)}")
        stride = as_tuple(stride, dims)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding={padding!r}; allowed: 'same', 'valid', an int or a tuple of ints")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv)")
        else:
            padding = as_tuple(padding, dims)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.dense_widths = (in_channels, out_channels)  # as built: channel removal narrows the layer, not this
        self.kernel_size, self.stride, self.padding = as_tuple(kernel_size, dims), stride, padding
        self.dilation, self.padding_mode = as_tuple(dilation, dims), padding_mode
        self.transposed, self.output_padding = False, (0,) * dims
        self.dims, self.decomposition = dims, decomposition
        self._weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._dense_geometry = ConvGeometry(self.kernel_size, stride, padding, self.dilation, padding_mode)
        n, c = out_channels // groups, in_channels // groups
        if decomposition == "channel":
            self._a, self._b = n, c * math.prod(self.kernel_size)
            self._in_geometry = self._dense_geometry
            ones = (1,) * dims
            self._out_geometry = ConvGeometry(ones, ones, (0,) * dims, ones, "zeros")
        else:
            (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, stride, self.dilation
            self._a, self._b = n * kw, c * kh
            pad_h, pad_w = (padding, padding) if isinstance(padding, str) else ((padding[0], 0), (0, padding[1]))
            self._in_geometry = ConvGeometry((kh, 1), (sh, 1), pad_h, (dh, 1), padding_mode)
            self._out_geometry = ConvGeometry((1, kw), (1, sw), pad_w, (1, dw), padding_mode)
        self._init_factors(rank, device, dtype)
        self._init_bias(bias, out_channels, device, dtype)
        self.reset_parameters()

    @classmethod
    def from_dense(cls, layer: nn.Module, decomposition: str = "channel", init: str = "svd",
                   rank: int | None = None) -> "SVDConv":
        """An SVDConv computing what `layer` (nn.Conv1d/2d/3d) computes.

        Args:
            layer: the dense convolution; it is not modified.
            decomposition: "channel" or "spatial" (2-D only).
            init: "svd" (exact SVD of its weight) or "random" (from scratch).
            rank: keep only the largest `rank` singular values per group (default: all).
        """
        if not isinstance(layer, tuple(CONV_CLASSES.values())):
            raise TypeError(f"SVDConv.from_dense expects nn.Conv1d/2d/3d, got {type(layer).__name__}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                  dims=len(layer.kernel_size), decomposition=decomposition, rank=rank, device=w.device, dtype=w.dtype)
        return new._init_from(layer, init, w)

    def _widths(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels

    def _store_widths(self, inputs: int, outputs: int):
        self.in_channels, self.out_channels = inputs, outputs

    def _matrix_from_weight(self, weight):
        g, n, c = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        if self.decomposition == "spatial":
            weight = weight.reshape(g, n, c, *self.kernel_size).permute(0, 1, 4, 2, 3)
        return weight.reshape(*((g,) if g > 1 else ()), self._a, self._b)

    def _weight_from_matrix(self, matrix):
        if self.decomposition == "spatial":
            g, n, c = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
            kh, kw = self.kernel_size
            matrix = matrix.reshape(g, n, kw, c, kh).permute(0, 1, 3, 4, 2)
        return matrix.reshape(self._weight_shape)

    def _in_weight(self):
        """The V side as a conv weight (g·r, c/g, kh, kw | kh, 1), with s folded in."""
        w = (self.V * self.s.unsqueeze(-2)).mT
        k = self.kernel_size if self.decomposition == "channel" else (self.kernel_size[0], 1)
        return w.reshape(self.groups * self.rank, self.in_channels // self.groups, *k)

    def _out_weight(self):
        """The U side as a conv weight (n, r, 1, 1 | 1, kw)."""
        if self.decomposition == "channel":
            return self.U.reshape(self.out_channels, self.rank, *(1,) * self.dims)
        kw = self.kernel_size[1]
        u = self.U.reshape(self.groups, self.out_channels // self.groups, kw, self.rank).permute(0, 1, 3, 2)
        return u.reshape(self.out_channels, self.rank, 1, kw)

    def _positions(self, input_shape):
        size = input_shape[-self.dims:]
        batch = math.prod(input_shape[:-self.dims - 1])
        mid = self._in_geometry.out_size(size)
        out = self._out_geometry.out_size(mid)
        return batch * math.prod(mid), batch * math.prod(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _recording is not None:
            _recording.input_shapes[self].append(tuple(x.shape))
        if self._thin_is_cheaper(x.shape):
            h = self._in_geometry.conv(x, self._in_weight(), None, self.groups)
            return self._out_geometry.conv(h, self._out_weight(), self.bias, self.groups)
        return self._dense_geometry.conv(x, self._dense_weight(), self.bias, self.groups)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A plain nn.Conv1d/2d/3d with the rebuilt weight."""
        return self._dense_geometry.module(self.in_channels, self.out_channels, self.groups, self.bias is not None,
                                           self._dense_weight(), self.bias).train(self.training)

    @torch.no_grad()
    def to_thin_pair(self) -> nn.Sequential:
        """nn.Sequential of two plain convs (V side to g·r channels, then U side) computing the same function."""
        mid = self.groups * self.rank
        first = self._in_geometry.module(self.in_channels, mid, self.groups, False, self._in_weight(), None)
        second = self._out_geometry.module(mid, self.out_channels, self.groups, self.bias is not None,
                                           self._out_weight(), self.bias)
        return nn.Sequential(first, second).train(self.training)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
             f"bias={self.bias is not None}, dims={self.dims}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", decomposition={self.decomposition!r}, rank={self.rank}/{self.full_rank}"


SVD_LAYERS = (SVDLinear, SVDConv)


def svd_layers(model: nn.Module) -> list[tuple[str, _Factorized]]:
    """(fully-qualified name, layer) for every SVD layer in `model`, each once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVD_LAYERS)]

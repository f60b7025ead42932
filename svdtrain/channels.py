"""Channels in SVD form: which channels can be removed together (coupled through residual additions), how much each
holds, and their removal, so that a cut can take whole channels as well as singular values (Hinge, Li et al. 2020).

A channel group is one space of channels: the layers that write it (their output channels: a row block of U scaled
by s), the per-channel layers it passes through (batch norm, depthwise convolutions), and the layers that read it
(their input channels: a row block of V scaled by s). Removing channel c of a group removes it from all of them at
once; the function is unchanged when what the readers see of c is zero.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .attention import SplitMultiheadAttention
from .layers import SVD_LAYERS, SVDConv, SVDLinear

# Layers and functions that map a zero channel to a zero channel and never mix channels.
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.ELU,
                        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.modules.pooling._MaxPoolNd,
                        nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                        nn.modules.pooling._AdaptiveMaxPoolNd)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, torch.tanh, F.elu,
                          F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                          F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                          F.adaptive_max_pool2d, operator.neg}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach", "neg"}
_ADDITIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SCALINGS = {operator.mul, operator.imul, operator.truediv, torch.mul}
_NOT_TENSORS = {"size", "dim"}  # methods whose result carries no channels


@dataclass
class ChannelGroup:
    """One space of channels and the layers it spans (module names)."""

    name: str  # the first layer that writes it, plus ".out"
    channels: int
    producers: list[str] = field(default_factory=list)  # layers whose output channels these are
    per_channel: list[str] = field(default_factory=list)  # batch norms, depthwise convolutions on the way
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, input columns per channel)
    why_kept: str = ""  # why its channels cannot be removed; "" when they can

    @property
    def removable(self) -> bool:
        return not self.why_kept

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Tracer(fx.Tracer):
    """SVD layers and split attentions (whose head reshapes hold their channels anyway) are traced as one call."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, (*SVD_LAYERS, SplitMultiheadAttention)) or super().is_leaf_module(module, qualname)


class _Spaces:
    """Union-find over channel spaces, each with the layers found on it and, once pinned, why it must stay whole."""

    def __init__(self):
        self.parent, self.info = [], []

    def new(self, channels: int, why: str = "") -> int:
        self.parent.append(len(self.parent))
        self.info.append({"channels": channels, "producers": [], "per_channel": [], "consumers": [], "why": why})
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int):
        i, j = self.find(i), self.find(j)
        if i != j:
            self.parent[j] = i
            for key in ("producers", "per_channel", "consumers"):
                self.info[i][key] += self.info[j][key]
            self.info[i]["why"] = self.info[i]["why"] or self.info[j]["why"]

    def pin(self, i: int, why: str):
        root = self.info[self.find(i)]
        root["why"] = root["why"] or why

    def add(self, i: int, key: str, item):
        self.info[self.find(i)][key].append(item)


def _kind(module: nn.Module) -> str:
    """"conv" (groups 1), "depthwise", "grouped", "linear", "norm" or "" for a layer channel groups know."""
    if isinstance(module, (SVDConv, nn.modules.conv._ConvNd)) and not getattr(module, "transposed", False):
        if module.groups == 1:
            return "conv"
        depthwise = module.groups == module.in_channels == module.out_channels
        return "depthwise" if depthwise else "grouped"
    if isinstance(module, (SVDLinear, nn.Linear)):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return "norm"
    return ""


def channel_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[ChannelGroup]:
    """The model's channel groups, traced by torch.fx at `example_inputs` (SVD layers and torch's layers as leaves).

    A group is removable when every layer that writes it is a convolution (groups 1) or Linear, SVD or plain, and
    every use of it is one that keeps channels apart and a zero channel zero (batch norm, depthwise convolutions,
    ReLU-like activations, pooling, additions of such groups, flatten into a Linear); otherwise `why_kept` says
    what holds it: the model's input or output, a grouped convolution, an attention layer, a concatenation, a
    normalisation over channels, an operation not known here.

    Example:
        >>> for group in channel_groups(model, torch.randn(1, 3, 32, 32)):
        ...     print(group.name, group.channels, group.why_kept or "removable")
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same to the user
        raise ValueError(f"channel removal traces the model with torch.fx, which failed: {type(e).__name__}: {e}; "
                         "allowed: a model torch.fx can trace (no control flow on tensor values), or prune ranks "
                         "only (channels=False)") from None
    module, training = fx.GraphModule(model, graph), model.training
    model.eval()  # the traced forward must not move batch-norm statistics
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(example_inputs)
    finally:
        model.train(training)
    order = {node.target: i for i, node in enumerate(graph.nodes) if node.op == "call_module"}
    spaces, value = _Spaces(), {}  # value: node -> (space, channel dim, columns per channel) of a channelled tensor

    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def inputs(node) -> list:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n in value else None)
        return found

    def pin_inputs(node, why: str):
        for n in inputs(node):
            spaces.pin(value[n][0], why)

    for node in graph.nodes:
        out = shape(node)
        if node.op == "placeholder":
            if out is not None and len(out) >= 2:
                value[node] = (spaces.new(out[1], "the model's input"), 1, 1)
            continue
        if node.op == "output":
            pin_inputs(node, "the model's output")
            continue
        if node.op == "get_attr":
            continue
        if node.op == "call_module":
            layer = model.get_submodule(node.target)
            kind = _kind(layer)
            src = value.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if kind in ("conv", "linear"):
                if src is not None:
                    space, dim, columns = src
                    reads_channels = dim == 1 if kind == "conv" else dim == len(shape(node.args[0]) or ()) - 1
                    if reads_channels and (kind == "linear" or columns == 1):
                        spaces.add(space, "consumers", (node.target, columns))
                    else:
                        spaces.pin(space, f"{node.target} reads it in another layout")
                channels = layer.out_channels if kind == "conv" else layer.out_features
                new = spaces.new(channels)
                spaces.add(new, "producers", node.target)
                value[node] = (new, 1 if kind == "conv" else len(out) - 1, 1)
            elif kind in ("norm", "depthwise") and src is not None and src[1] == 1 and src[2] == 1:
                spaces.add(src[0], "per_channel", node.target)
                value[node] = src
            elif isinstance(layer, _ELEMENTWISE_MODULES) and src is not None and src[2] == 1:
                value[node] = src
            elif isinstance(layer, nn.Flatten) and src is not None:
                flat = _flattened(src, shape(node.args[0]), out, layer.start_dim, layer.end_dim)
                if flat is None:
                    spaces.pin(src[0], f"flattened by {node.target}")
                else:
                    value[node] = flat
            else:
                why = f"{node.target} ({type(layer).__name__}" + (f", groups={layer.groups})" if kind == "grouped"
                                                                 else ")")
                pin_inputs(node, f"used by {why}")
                if kind == "grouped":  # its output channels: a group of their own, listed with why it stays whole
                    new = spaces.new(layer.out_channels, f"written by {why}")
                    spaces.add(new, "producers", node.target)
                    value[node] = (new, 1, 1)
            continue
        # call_function / call_method
        target = node.target
        seen = inputs(node)
        if not seen:
            continue
        first = value[seen[0]]
        if node.op == "call_method" and target in _NOT_TENSORS:
            continue
        if target in _ADDITIONS and len(seen) == 2 and all(isinstance(a, fx.Node) for a in node.args[:2]) \
                and shape(seen[0]) == shape(seen[1]) and value[seen[0]][1:] == value[seen[1]][1:]:
            spaces.union(value[seen[0]][0], value[seen[1]][0])
            value[node] = (spaces.find(first[0]), first[1], first[2])
        elif target in _SCALINGS and len(seen) == 1 and all(
                isinstance(a, (int, float)) for a in node.args if a is not seen[0]):
            value[node] = first
        elif (target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS)) \
                and len(seen) == 1 and first[2] == 1:
            value[node] = first
        elif _is_flatten(node) and len(seen) == 1:
            reshaped = node.target not in ("flatten", torch.flatten)
            start = 1 if reshaped else node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = -1 if reshaped else node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            flat = _flattened(first, shape(seen[0]), out, start, end)
            if flat is None:
                spaces.pin(first[0], f"flattened by {_name(target)}")
            else:
                value[node] = flat
        elif _is_spatial_mean(node, shape(seen[0]), out) and len(seen) == 1 and first[1] == 1:
            value[node] = (first[0], 1, 1)
        else:
            pin_inputs(node, f"used by {_name(target)}")
            if out is not None and len(out) >= 2 and len(seen) >= 1:
                value[node] = (spaces.new(out[1], f"written by {_name(target)}"), 1, 1)

    groups = []
    for i in range(len(spaces.parent)):
        if spaces.find(i) != i or not spaces.info[i]["producers"]:
            continue
        info = spaces.info[i]
        for key in ("producers", "per_channel"):
            info[key].sort(key=order.get)
        info["consumers"].sort(key=lambda consumer: order[consumer[0]])
        groups.append(ChannelGroup(f"{info['producers'][0]}.out", info["channels"], info["producers"],
                                   info["per_channel"], info["consumers"], info["why"]))
    return groups


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _is_flatten(node: fx.Node) -> bool:
    """flatten, or a view / reshape to (batch, everything else), as `x.view(x.size(0), -1)`."""
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        return True
    before, after = (n.meta.get("tensor_meta") for n in (node.args[0], node)) if node.args and isinstance(
        node.args[0], fx.Node) else (None, None)
    reshaped = (node.op == "call_method" and node.target in ("view", "reshape")) or \
        (node.op == "call_function" and node.target is torch.reshape)
    return reshaped and before is not None and after is not None and len(after.shape) == 2 and \
        tuple(after.shape) == (before.shape[0], math.prod(before.shape[1:]))


def _flattened(src, before, after, start: int, end: int):
    """The channelled value of flatten(start..end) of a tensor whose channels are dim 1: the channels become the
    last dim's columns (spatial positions per channel) when dims 1.. are flattened into the last; else None."""
    if before is None or after is None or src[1] != 1 or src[2] != 1:
        return None
    start, end = start % len(before), end % len(before)
    if start != 1 or end != len(before) - 1:
        return None
    return (src[0], len(after) - 1, math.prod(before[2:]))


def _is_spatial_mean(node: fx.Node, before, after) -> bool:
    """x.mean(spatial dims) / torch.mean over dims ≥ 2 of a channels-at-dim-1 tensor."""
    if before is None or after is None or len(before) < 3:
        return False
    if not ((node.op == "call_method" and node.target == "mean") or
            (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    return dims is not None and all(d % len(before) >= 2 for d in dims)


# --- what each channel holds -------------------------------------------------------------------------------------

def _out_rows(layer: nn.Module, channels: int) -> torch.Tensor:
    """(channels, k) of the parameters writing each output channel: U's rows scaled by s (a spatial-wise layer's kw
    rows per channel together), or the dense weight's."""
    if isinstance(layer, SVD_LAYERS):
        return (layer.U * layer.s.unsqueeze(-2)).reshape(channels, -1)
    return layer.weight.reshape(channels, -1)


def _in_rows(layer: nn.Module, channels: int, columns: int) -> torch.Tensor:
    """(channels, k) of the parameters reading each input channel: V's rows scaled by s, or the dense weight's."""
    if isinstance(layer, SVD_LAYERS):
        return (layer.V * layer.s.unsqueeze(-2)).reshape(channels, -1)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return weight.reshape(weight.shape[0], channels, columns).transpose(0, 1).reshape(channels, -1)
    return weight.transpose(0, 1).reshape(channels, -1)


def _per_channel_rows(layer: nn.Module, channels: int) -> torch.Tensor:
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return torch.stack([layer.weight, layer.bias], 1)
    if isinstance(layer, SVDConv):
        return (layer.U * layer.s.unsqueeze(-2)).reshape(channels, -1)
    return layer.weight.reshape(channels, -1)


def channel_norms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """(channels,) the norm of each channel's parameters over every layer of the group, each layer's part divided
    by its root-mean-square over the channels: a layer weighs the same however large its weights (batch-norm
    scales near 1, factors near 1/√width). Differentiable: the channel regularizer is a function of these."""
    total = 0
    parts = [_out_rows(model.get_submodule(n), group.channels) for n in group.producers]
    parts += [_per_channel_rows(model.get_submodule(n), group.channels) for n in group.per_channel]
    parts += [_in_rows(model.get_submodule(n), group.channels, c) for n, c in group.consumers]
    for rows in parts:
        squares = rows.square().sum(-1)
        total = total + squares / squares.mean().clamp_min(torch.finfo(squares.dtype).tiny)
    return (total + torch.finfo(torch.float32).tiny).sqrt()


# --- removal -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def remove_channels_(model: nn.Module, group: ChannelGroup, keep: torch.Tensor):
    """Keep only the channels `keep` (sorted indices) of `group` in every layer it spans, in place. SVD layers keep
    their W's kept rows / columns, re-factored to orthonormal U, V (`refactor_`). The parameters are new objects."""
    keep = keep.sort().values
    for name in group.producers:
        _cut_out(model.get_submodule(name), keep)
    for name in group.per_channel:
        _cut_per_channel(model.get_submodule(name), keep)
    for name, columns in group.consumers:
        _cut_in(model.get_submodule(name), keep, columns)
    group.channels = len(keep)


def _rows(keep: torch.Tensor, per: int) -> torch.Tensor:
    """Row indices of channels `keep` in a matrix with `per` consecutive rows per channel."""
    return (keep[:, None] * per + torch.arange(per, device=keep.device)).reshape(-1)


def _parameter(like: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.contiguous(), requires_grad=like.requires_grad)


def _cut_out(layer: nn.Module, keep: torch.Tensor):
    n = len(keep)
    if layer.bias is not None:
        layer.bias = _parameter(layer.bias, layer.bias[keep])
    if isinstance(layer, SVD_LAYERS):
        layer.U = _parameter(layer.U, layer.U[_rows(keep, layer._per_output())])
        layer._set_widths(layer._widths()[0], n)
        refactor_(layer)
        return
    layer.weight = _parameter(layer.weight, layer.weight[keep])
    if isinstance(layer, nn.Linear):
        layer.out_features = n
    else:
        layer.out_channels = n


def _cut_in(layer: nn.Module, keep: torch.Tensor, columns: int):
    n = len(keep)
    if isinstance(layer, SVD_LAYERS):
        layer.V = _parameter(layer.V, layer.V[_rows(keep, columns * layer._per_input())])
        layer._set_widths(n * columns, layer._widths()[1])
        refactor_(layer)
        return
    if isinstance(layer, nn.Linear):
        layer.weight = _parameter(layer.weight, layer.weight[:, _rows(keep, columns)])
        layer.in_features = n * columns
    else:
        layer.weight = _parameter(layer.weight, layer.weight[:, keep])
        layer.in_channels = n


def _cut_per_channel(layer: nn.Module, keep: torch.Tensor):
    n = len(keep)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.weight = _parameter(layer.weight, layer.weight[keep])
        layer.bias = _parameter(layer.bias, layer.bias[keep])
        layer.running_mean = layer.running_mean[keep].clone()
        layer.running_var = layer.running_var[keep].clone()
        layer.num_features = n
        return
    if layer.bias is not None:
        layer.bias = _parameter(layer.bias, layer.bias[keep])
    if isinstance(layer, SVDConv):  # depthwise: one SVD per channel
        for name in ("U", "s", "V"):
            setattr(layer, name, _parameter(getattr(layer, name), getattr(layer, name)[keep]))
        layer._set_widths(n, n, groups=n)
    else:
        layer.weight = _parameter(layer.weight, layer.weight[keep])
        layer.in_channels = layer.out_channels = layer.groups = n


@torch.no_grad()
def refactor_(layer: nn.Module):
    """Make U, V orthonormal again and s the singular values of the layer's W = U·diag(s)·Vᵀ (W unchanged), after
    rows of U or V were removed: QR of each factor, then the SVD of the small core. The rank becomes at most
    min(a, b), the new full rank."""
    u, v, s = layer.U.double(), layer.V.double(), layer.s.double()
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    p, sigma, qh = torch.linalg.svd((ru * s.unsqueeze(-2)) @ rv.mT, full_matrices=False)
    rank = min(layer.rank, layer._a, layer._b)
    before = s.square().sum()
    layer._make_factors(rank)
    layer.U.copy_((qu @ p)[..., :rank])
    layer.s.copy_(sigma[..., :rank])
    layer.V.copy_((qv @ qh.mT)[..., :rank])
    layer.energy_kept.mul_(float(sigma[..., :rank].square().sum() / before.clamp_min(1e-300)))


def adopt_(model: nn.Module, other: nn.Module):
    """Make `model` the network `other` (a cut copy of it) in place: the same module tree, `other`'s layers and
    weights, `model`'s own mode."""
    for name, child in other.named_children():
        setattr(model, name, child)
    for name, p in other.named_parameters(recurse=False):
        setattr(model, name, p)
    for name, b in other.named_buffers(recurse=False):
        setattr(model, name, b)
    model.train(model.training)


def resize_to_state_(model: nn.Module, state: dict) -> nn.Module:
    """Rebuild the plain Conv/Linear/BatchNorm layers whose saved weights have fewer channels (a filter-pruned model,
    or the plain layers of a model whose channels `prune_(channels=True)` removed), in place; returns `model`.
    SVD layers adopt their saved widths as they load."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or not hasattr(module, "weight") or weight.shape == module.weight.shape:
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            groups = module.groups if module.groups == 1 else weight.shape[0]  # depthwise stays depthwise
            new = type(module)(weight.shape[1] * groups, weight.shape[0], module.kernel_size, module.stride,
                               module.padding, module.dilation, groups, module.bias is not None, module.padding_mode)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            new = type(module)(weight.shape[0], module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        else:
            raise ValueError(f"{name}: saved weight {tuple(weight.shape)} does not fit {type(module).__name__} "
                             f"{tuple(module.weight.shape)}; is this checkpoint from a different model?")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model

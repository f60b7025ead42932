"""The methods SVD training is compared with (METHOD.md §6), as pieces the pipeline stages call.

- truncated_svd: dense → per-layer SVD truncated by energy or to a FLOPs budget → fine-tune.
- trp (Trained Rank Pruning, Xu et al. 2020): dense training in which every
  `trp_period` steps each weight is replaced by its energy-truncated SVD, with a
  nuclear-norm regularizer; then truncation and fine-tuning.
- filter_pruning: L1-norm filter pruning by Torch-Pruning (which keeps the coupled
  channels of residual blocks consistent), then fine-tuning.
- group_sl: DepGraph's group sparsity learning (Torch-Pruning's GroupNormPruner) during the
  sparsify epochs, then pruning by group norm, then fine-tuning.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import svdtrain
from svdtrain.decompose import select_layers, split_attention_
from svdtrain.export import TIE
from svdtrain.latency import paired_timing, runner
from svdtrain.prune import rank_for_energy, tail_energy

METHODS = ("svd", "truncated_svd", "trp", "filter_pruning", "group_sl")
FILTER_METHODS = ("filter_pruning", "group_sl")  # they remove channels: the model stays dense


def _matrices(layer: nn.Module) -> torch.Tensor:
    """A dense layer's weight as one (groups, out/groups, rest) matrix per group: the channel-wise view."""
    groups = getattr(layer, "groups", 1)
    return layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)


def trp_layers(model: nn.Module, config: svdtrain.SVDConfig) -> list[nn.Module]:
    """The dense layers TRP works on: those `decompose_` would decompose with `config` (attention layers are
    split first, in place, so that their projections are layers of their own)."""
    split_attention_(model, config)
    return [module for _, module in select_layers(model, config)[0]]


def nuclear_norm(layers: list[nn.Module]) -> torch.Tensor:
    """Σ over layers (and groups) of the nuclear norm ‖W‖_* (its gradient U·Vᵀ comes from an SVD in autograd)."""
    return sum(torch.linalg.svdvals(_matrices(layer)).sum() for layer in layers)


@torch.no_grad()
def trp_truncate_(layers: list[nn.Module], energy: float):
    """Replace each weight by its SVD truncated by the energy rule (one rank for all groups of a layer)."""
    for layer in layers:
        u, s, vh = torch.linalg.svd(_matrices(layer).double(), full_matrices=False)
        r = rank_for_energy(tail_energy(s), energy)
        layer.weight.copy_(((u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]).reshape(layer.weight.shape))


def _torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError("filter pruning (filter_pruning, group_sl) needs Torch-Pruning: pip install "
                         "'svdtrain[tool]'") from None
    return tp


def _importance(kind: str):
    """L1 norm of each filter (filter_pruning), or the L2 norm of each group of coupled channels over every layer
    it spans (group_sl: DepGraph's group norm, the importance its sparsity learning drives apart)."""
    tp = _torch_pruning()
    return tp.importance.MagnitudeImportance(p=1) if kind == "l1" else tp.importance.GroupMagnitudeImportance(p=2)


def group_sparsity_pruner(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module], reg: float):
    """DepGraph's group sparsity learning (Fang et al. 2023, Torch-Pruning's GroupNormPruner): call
    `.regularize(model)` after each backward pass; it adds to the gradients a group-lasso term on every group of
    coupled channels, stronger on the groups that matter least, so that whole groups fade before they are cut."""
    tp = _torch_pruning()
    return tp.pruner.GroupNormPruner(model, example_inputs, importance=_importance("group"), reg=reg,
                                     ignored_layers=ignored)


def filter_prune_(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module], *,
                  flops: float | None = None, speedup: float | None = None, backend: str = "onnxruntime",
                  importance: str = "l1", round_to: int | None = None) -> dict:
    """Filter pruning (Torch-Pruning, which keeps the coupled channels of residual blocks consistent) to at most
    `flops` of the model's FLOPs, or to at least `speedup`× its speed measured on `backend` at example_inputs
    (dense and pruned timed alternately, median of the paired ratios). In place.

    One ratio for every layer (Torch-Pruning's uniform local pruning), the least that meets the budget (steps of
    0.1, then bisection to 1e-3); `round_to` keeps each layer's channel count a multiple of it. Candidates are
    traced in eval mode, so the trace leaves the batch-norm statistics as they were. Returns {"channel_ratio",
    "flops", "dense_flops"} and, for a speed target, the measured "speedup" and "speedup_iqr".
    """
    tp = _torch_pruning()
    if (flops is None) == (speedup is None):
        raise ValueError("filter_prune_ needs exactly one of flops=, speedup=")
    dense = svdtrain.count_flops(model, example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = [names[id(m)] for m in ignored]

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model).eval()
        keep_out = [candidate.get_submodule(n) for n in ignored_names]
        tp.pruner.MetaPruner(candidate, example_inputs, importance=_importance(importance), pruning_ratio=ratio,
                             ignored_layers=keep_out, round_to=round_to).step()
        return candidate

    dense_runner = runner(copy.deepcopy(model).eval(), example_inputs, backend) if speedup is not None else None

    def speed(candidate: nn.Module) -> dict:
        timed = paired_timing(dense_runner, runner(candidate, example_inputs, backend), budget_s=1.0, min_repeats=15)
        return {"speedup": timed["speedup"], "speedup_iqr": timed["speedup_iqr"]}

    def fits(candidate: nn.Module) -> bool:
        if flops is not None:
            return svdtrain.count_flops(candidate, example_inputs) <= flops * dense
        return speed(candidate)["speedup"] >= speedup

    # The cost is not monotone in the ratio once channel counts are rounded (a ratio past what rounding allows
    # prunes nothing), so the least fitting ratio on a coarse grid comes first, then bisection below it.
    grid = [i / 10 for i in range(1, 10)]
    hi = next((ratio for ratio in grid if fits(pruned(ratio))), None)
    if hi is None:
        what = f"prune_flops={flops}" if flops is not None else f"target_speedup={speedup} on {backend}"
        raise ValueError(f"filter pruning cannot reach {what} with up to {grid[-1]:.0%} of every layer's channels "
                         f"removed{f' (round_to={round_to})' if round_to else ''}; allowed: a smaller target"
                         + (", or a smaller round_to" if round_to else ""))
    lo = hi - 0.1
    for _ in range(7):  # ratio to 1e-3: finer than one channel of a 64-channel layer
        mid = (lo + hi) / 2
        if fits(pruned(mid)):
            hi = mid
        else:
            lo = mid
    result = pruned(hi)
    measured = speed(result) if speedup is not None else {}
    # A model that passed the search by timing noise alone, timed afresh, may fall short: a little more is removed
    # until the fresh timing is within the tie of the target.
    while measured and measured["speedup"] * TIE < speedup and hi < grid[-1]:
        hi = min(grid[-1], hi + 0.02)
        result = pruned(hi)
        measured = speed(result)
    out = {"channel_ratio": hi, "flops": svdtrain.count_flops(result, example_inputs), "dense_flops": dense,
           **measured}
    _adopt(model, result)
    return out


def _adopt(model: nn.Module, pruned: nn.Module):
    """Make `model` the pruned network in place: same module tree, the pruned layers and weights."""
    for name, child in pruned.named_children():
        setattr(model, name, child)
    for name, p in pruned.named_parameters(recurse=False):
        setattr(model, name, p)


def resize_to_state_(model: nn.Module, state: dict) -> nn.Module:
    """Rebuild Conv/Linear/BatchNorm layers whose saved weights have fewer channels (a filter-pruned model)."""
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

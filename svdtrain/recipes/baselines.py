"""The methods SVD training is compared with (METHOD.md §6), as pieces the pipeline stages call.

- truncated_svd: dense → per-layer SVD truncated by energy or to a FLOPs budget → fine-tune.
- trp (Trained Rank Pruning, Xu et al. 2020): dense training in which every
  `trp_period` steps each weight is replaced by its energy-truncated SVD, with a
  nuclear-norm regularizer; then truncation and fine-tuning.
- filter_pruning: L1-norm filter pruning by Torch-Pruning (which keeps the coupled
  channels of residual blocks consistent), then fine-tuning.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import svdtrain
from svdtrain.decompose import select_layers
from svdtrain.prune import rank_for_energy, tail_energy

METHODS = ("svd", "truncated_svd", "trp", "filter_pruning")


def _matrices(layer: nn.Module) -> torch.Tensor:
    """A dense layer's weight as one (groups, out/groups, rest) matrix per group: the channel-wise view."""
    groups = getattr(layer, "groups", 1)
    return layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)


def trp_layers(model: nn.Module, config: svdtrain.SVDConfig) -> list[nn.Module]:
    """The dense layers TRP works on: those `decompose_` would decompose with `config`."""
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


def filter_prune_(model: nn.Module, flops: float, example_inputs: torch.Tensor, ignored: list[nn.Module]) -> float:
    """L1-norm filter pruning (Torch-Pruning) to at most `flops` of the model's FLOPs; returns the channel ratio.

    One ratio for every layer (Torch-Pruning's uniform local pruning), found by bisection.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError("method filter_pruning needs Torch-Pruning: pip install 'svdtrain[tool]'") from None
    dense = svdtrain.count_flops(model, example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = [names[id(m)] for m in ignored]

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model)
        keep_out = [candidate.get_submodule(n) for n in ignored_names]
        tp.pruner.MetaPruner(candidate, example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                             pruning_ratio=ratio, ignored_layers=keep_out).step()
        return candidate

    lo, hi = 0.0, 0.95
    for _ in range(10):  # ratio to 1e-3: finer than one channel of a 64-channel layer
        mid = (lo + hi) / 2
        if svdtrain.count_flops(pruned(mid), example_inputs) <= flops * dense:
            hi = mid
        else:
            lo = mid
    result = pruned(hi)
    if svdtrain.count_flops(result, example_inputs) > flops * dense:
        raise ValueError(f"filter pruning cannot reach prune_flops={flops}; allowed: a larger fraction")
    _adopt(model, result)
    return hi


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

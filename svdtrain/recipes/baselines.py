"""The methods SVD training is compared with (METHOD.md §6), as pieces the pipeline stages call.

- truncated_svd: dense → per-layer SVD truncated by energy or to a FLOPs budget → fine-tune.
- whitened_svd (SVD-LLM's truncation-aware whitening, Wang et al. 2024): as truncated_svd, but each layer's
  SVD is of W·S, S the Cholesky factor of its input covariance (S·Sᵀ = X·Xᵀ over calibration images), so
  that the smallest singular values are those whose loss changes the layer's output least; the factors are
  un-whitened after (V ← S⁻ᵀ·V). The same measure of a component's output, |s_i|·‖Xᵀv_i‖, can rank what SVD
  training's cuts remove (rank_score=output: `weigh_by_inputs_`, `normalize_v_`).
- trp (Trained Rank Pruning, Xu et al. 2020): dense training in which every
  `trp_period` steps each weight is replaced by its energy-truncated SVD, with a
  nuclear-norm regularizer; then truncation and fine-tuning.
- filter_pruning: L1-norm filter pruning by Torch-Pruning (which keeps the coupled
  channels of residual blocks consistent), then fine-tuning. With prune_cuts the channels are
  cut toward the budget that many times while the sparsify epochs train, on SVD training's
  cubic schedule; without, once in the prune stage.
- group_sl: DepGraph's group sparsity learning (Torch-Pruning's GroupNormPruner) during the
  sparsify epochs, with SGD and momentum as published, then pruning by group norm (gradually
  during those epochs with prune_cuts, as filter_pruning), then fine-tuning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.channels import adopt_
from svdtrain.decompose import select_layers, split_attention_
from svdtrain.export import TIE
from svdtrain.layers import SVDConv, SVDLinear, svd_layers
from svdtrain.latency import paired_timing, runner
from svdtrain.prune import rank_for_energy, tail_energy

METHODS = ("svd", "truncated_svd", "whitened_svd", "trp", "filter_pruning", "group_sl")
FILTER_METHODS = ("filter_pruning", "group_sl")  # they remove channels: the model stays dense


def one_shot(method: str, prune_cuts: int) -> bool:
    """No training phase of its own: the method cuts once and fine-tunes for the sparsify epochs too, so that every
    method gets as many epochs. Filter pruning with gradual cuts trains through the sparsify epochs instead."""
    return method in ("truncated_svd", "whitened_svd") or (method == "filter_pruning" and not prune_cuts)


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


def _matrix_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The columns the layer's weight matrix multiplies, as (groups, rows, b): a Linear's input vectors, a 2-D
    channel-wise convolution's input patches (c/g·kh·kw each, as its weight is matricised); None for a layer whose
    matrix has no such columns (spatial-wise, 1-D and 3-D convolutions)."""
    if isinstance(layer, SVDLinear):
        return x.reshape(1, -1, x.shape[-1])
    if isinstance(layer, SVDConv) and layer.decomposition == "channel" and layer.dims == 2:
        geometry = layer._dense_geometry
        mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
        patches = F.unfold(F.pad(x, geometry._fpad, mode=mode), layer.kernel_size, layer.dilation, 0, layer.stride)
        g = layer.groups
        return patches.reshape(x.shape[0], g, -1, patches.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, layer._b)
    return None


@torch.no_grad()
def input_covariances(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """{layer name: X·Xᵀ (groups, b, b), float64} of each SVD layer's matrix inputs over `batches` (model in eval
    mode; its mode is restored)."""
    sums, hooks = {}, []
    for name, layer in svd_layers(model):
        def add(module, args, name=name):
            columns = _matrix_inputs(module, args[0].double())
            if columns is not None:
                sums[name] = sums.get(name, 0) + columns.mT @ columns
        hooks.append(layer.register_forward_pre_hook(add))
    training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return sums


@torch.no_grad()
def whiten_(model: nn.Module, covariances: dict[str, torch.Tensor]) -> list[str]:
    """Set each SVD layer with a covariance C to the SVD of W·S (S·Sᵀ = C, Cholesky), un-whitened: U, s from it and
    V ← S⁻ᵀ·V, so W = U·diag(s)·Vᵀ still (V is no longer orthonormal) and truncating the smallest |s| removes
    the least of the layer's output on those inputs (SVD-LLM). Full rank kept; returns the names whitened."""
    done = []
    for name, layer in svd_layers(model):
        if name not in covariances:
            continue
        c = covariances[name]
        # A covariance is only semi-definite (fewer samples than columns, dead inputs): a little ridge, as
        # SVD-LLM adds, makes it invertible without moving its large directions.
        ridge = 1e-6 * c.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
        s_factor = torch.linalg.cholesky(c + ridge * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device))
        matrix = ((layer.U.double() * layer.s.double().unsqueeze(-2)) @ layer.V.double().mT)
        u, s, vh = torch.linalg.svd(matrix.reshape(layer.groups, layer._a, layer._b) @ s_factor, full_matrices=False)
        v = torch.linalg.solve_triangular(s_factor.mT, vh.mT, upper=True)
        r, squeeze = layer.rank, (lambda t: t if layer.groups > 1 else t[0])
        layer.U.copy_(squeeze(u[..., :r]))
        layer.s.copy_(squeeze(s[..., :r]))
        layer.V.copy_(squeeze(v[..., :r]))
        done.append(name)
    return done


@torch.no_grad()
def weigh_by_inputs_(model: nn.Module, covariances: dict[str, torch.Tensor]) -> list[str]:
    """Rescale each SVD layer with an input covariance C so that |s_i| measures component i's share of the layer's
    output on those inputs: a_i = √(v_iᵀ·C·v_i), s ← s·a, V ← V/a (W = U·diag(s)·Vᵀ unchanged). With U
    orthonormal the output's energy is Σ s_i²·a_i², so a cut by size (the energy rule, a budget) then removes
    the components whose loss changes the output least, as whitened SVD's truncation does, while U and V stay
    the trained, orthogonal factors. `normalize_v_` undoes it after the cut. Returns the names rescaled."""
    done = []
    for name, layer in svd_layers(model):
        if name not in covariances:
            continue
        v = layer.V.double() if layer.groups > 1 else layer.V.double()[None]
        a = ((covariances[name] @ v) * v).sum(-2).clamp_min(0).sqrt()
        # A direction no input reaches carries no output: a tiny scale ranks it last without dividing by zero.
        a = a.clamp_min(1e-12 * float(a.max().clamp_min(1e-300)))
        a = a if layer.groups > 1 else a[0]
        layer.s.mul_(a.to(layer.s.dtype))
        layer.V.div_(a.unsqueeze(-2).to(layer.V.dtype))
        done.append(name)
    return done


@torch.no_grad()
def normalize_v_(model: nn.Module, names: list[str]):
    """Bring the named SVD layers' V to unit columns, the norms moved into s (W unchanged). After
    `weigh_by_inputs_` and a cut: the factors as training left them, less the cut components. After `whiten_` and
    a cut: V's columns carry S⁻ᵀ's scale, orders of magnitude below s, where Adam's steps, about lr in every entry
    whatever its size, wreck them."""
    for name, layer in svd_layers(model):
        if name not in names:
            continue
        norms = layer.V.norm(dim=-2).clamp_min(torch.finfo(layer.V.dtype).tiny)
        layer.s.mul_(norms)
        layer.V.div_(norms.unsqueeze(-2))


def _torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError("filter pruning (filter_pruning, group_sl) needs Torch-Pruning: pip install "
                         "'svdtrain[tool]'") from None
    return tp


FLOPS_TIE = 0.98  # a FLOPs budget is met to within this: the pruned model keeps between 98 and 100 % of it


def _importance(kind: str):
    """L1 norm of each filter (filter_pruning), or the L2 norm of each group of coupled channels over every layer
    it spans (group_sl: DepGraph's group norm, the importance its sparsity learning drives apart)."""
    tp = _torch_pruning()
    return tp.importance.MagnitudeImportance(p=1) if kind == "l1" else tp.importance.GroupMagnitudeImportance(p=2)


def group_sparsity_pruner(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module], reg: float):
    """DepGraph's group sparsity learning (Fang et al. 2023, Torch-Pruning's GroupNormPruner): call
    `.regularize(model)` after each backward pass; to the gradient of every weight of a group of coupled channels
    (the producing layer's filters, the batch-norm scales, the consuming layers' input columns) it adds reg·γ_c·w,
    γ_c = 16^((max − g_c) / (max − min)) with g_c the channel's group norm: a decay that is strongest on the groups
    that matter least, so that whole groups fade before they are cut. Published with SGD and momentum (Adam would
    rescale the term per parameter and undo the ordering γ sets): the sparsify stage steps it so."""
    tp = _torch_pruning()
    return tp.pruner.GroupNormPruner(model, example_inputs, importance=_importance("group"), reg=reg,
                                     ignored_layers=ignored)


def filter_prune_(model: nn.Module, example_inputs: torch.Tensor, ignored: list[nn.Module], *,
                  flops: float | None = None, speedup: float | None = None, backend: str = "onnxruntime",
                  importance: str = "l1", round_to: int | None = None, reference: nn.Module | None = None) -> dict:
    """Filter pruning (Torch-Pruning, which keeps the coupled channels of residual blocks consistent) to at most
    `flops` of the reference model's FLOPs, or to at least `speedup`× its speed measured on `backend` at
    example_inputs (reference and pruned timed alternately, median of the paired ratios). In place. The reference
    is the dense model a gradual cut measures against; default: `model` as it is.

    One ratio for every layer (Torch-Pruning's uniform local pruning; of the reference's widths when one is given),
    the least that meets the budget (steps of 0.1, then bisection to 1e-3); `round_to` keeps each layer's channel
    count a multiple of it. A model that meets the budget already (a speed within the tie of timing noise) is left
    as it is (channel_ratio 0). Candidates are traced in eval mode, so the trace leaves the batch-norm statistics as
    they were; `model` keeps its mode.
    Returns {"cut" (whether channels were removed), "channel_ratio", "global_steps", "flops", "dense_flops"} and,
    for a speed target, the measured "speedup" and "speedup_iqr".
    """
    tp = _torch_pruning()
    if (flops is None) == (speedup is None):
        raise ValueError("filter_prune_ needs exactly one of flops=, speedup=")
    reference = model if reference is None else reference
    dense = svdtrain.count_flops(reference, example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = [names[id(m)] for m in ignored]
    # Against a reference (a gradual cut), the ratio is of the reference's widths, as in Torch-Pruning's iterative
    # pruning: one ratio of the widths as they are, each layer rounded down at every cut, would take the narrow
    # layers far below the wide ones over a schedule of cuts.
    widths = {} if reference is model else {n: _width(m) for n, m in reference.named_modules() if _width(m)}

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model).eval()
        keep_out = [candidate.get_submodule(n) for n in ignored_names]
        of_reference = {m: max(0.0, 1 - (widths[n] * (1 - ratio) + 1e-6) / _width(m))
                        for n, m in candidate.named_modules() if n in widths and _width(m)}
        tp.pruner.MetaPruner(candidate, example_inputs, importance=_importance(importance), pruning_ratio=ratio,
                             pruning_ratio_dict=of_reference or None, ignored_layers=keep_out, round_to=round_to).step()
        return candidate

    dense_runner = runner(copy.deepcopy(reference).eval(), example_inputs, backend) if speedup is not None else None

    def speed(candidate: nn.Module) -> dict:
        timed = paired_timing(dense_runner, runner(candidate, example_inputs, backend), budget_s=1.0, min_repeats=15)
        return {"speedup": timed["speedup"], "speedup_iqr": timed["speedup_iqr"]}

    def fits(candidate: nn.Module) -> bool:
        if flops is not None:
            return svdtrain.count_flops(candidate, example_inputs) <= flops * dense
        return speed(candidate)["speedup"] >= speedup

    if reference is not model:
        as_it_is = copy.deepcopy(model).eval()
        current = svdtrain.count_flops(as_it_is, example_inputs)
        measured = speed(as_it_is) if speedup is not None else {}
        if (measured["speedup"] * TIE >= speedup) if measured else current <= flops * dense:
            return {"cut": False, "channel_ratio": 0.0, "global_steps": 0, "flops": current, "dense_flops": dense,
                    **measured}
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
    result, steps = pruned(hi), 0
    if flops is not None and svdtrain.count_flops(result, example_inputs) < FLOPS_TIE * flops * dense:
        # One ratio moves every layer by whole channels at once (a small layer by several per cent), so the least ratio
        # can land well under the budget: from the largest ratio above it, channels are removed globally, by the
        # same importance, in small steps until the budget is met (Torch-Pruning's global pruning).
        hi, (result, steps) = lo, _global_steps(pruned(lo), example_inputs, ignored_names, importance, round_to, fits)
    measured = speed(result) if speedup is not None else {}
    # A model that passed the search by timing noise alone, timed afresh, may fall short: a little more is removed
    # until the fresh timing is within the tie of the target.
    while measured and measured["speedup"] * TIE < speedup and hi < grid[-1]:
        hi = min(grid[-1], hi + 0.02)
        result = pruned(hi)
        measured = speed(result)
    out = {"cut": True, "channel_ratio": hi, "global_steps": steps,
           "flops": svdtrain.count_flops(result, example_inputs), "dense_flops": dense, **measured}
    adopt_(model, result)
    return out


def _width(module: nn.Module) -> int:
    """The output channels (features) of a layer filter pruning can thin; 0 for any other module."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return module.out_features if isinstance(module, nn.Linear) else 0


def _global_steps(model: nn.Module, example_inputs: torch.Tensor, ignored_names: list[str], importance: str,
                  round_to: int | None, fits) -> tuple[nn.Module, int]:
    """`model` with its least important channels (over all layers) removed step by step, about 0.1 % of the
    channels a step, until `fits(model)`; and the number of steps."""
    tp = _torch_pruning()
    steps = 900
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=_importance(importance), global_pruning=True,
                                  pruning_ratio=0.9, iterative_steps=steps, round_to=round_to,
                                  ignored_layers=[model.get_submodule(n) for n in ignored_names])
    for step in range(steps):
        if fits(model):
            return model, step
        pruner.step()
    return model, steps

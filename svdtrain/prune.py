"""prune_: drop small singular values by the energy rule (METHOD.md §3), or to a FLOPs / parameter budget."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import svd_layers
from .stats import _flops, count_params, format_table, trace_svd_layers


def tail_energy(s: torch.Tensor) -> torch.Tensor:
    """tail[..., k] = fraction of Σ s² held by all but the k largest |s| (k = 0 … r), per group."""
    energy = s.detach().double().square().sort(dim=-1, descending=True).values
    tail = energy.flip(-1).cumsum(-1).flip(-1)
    tail = torch.cat([tail, torch.zeros_like(tail[..., :1])], dim=-1)
    return tail / tail[..., :1].clamp_min(torch.finfo(torch.float64).tiny)


def rank_for_energy(tail: torch.Tensor, energy: float, min_rank: int = 1) -> int:
    """The energy rule: the fewest values whose Σ s² is ≥ (1 − energy) of the total, in every group.

    `tail` comes from `tail_energy`; the result is clamped to [min_rank, r]. With
    energy == 0 the rank is r: nothing is removed, not even exact zeros.
    """
    r = tail.shape[-1] - 1
    if energy == 0:
        return r
    needed = (tail <= energy).to(torch.int8).argmax(dim=-1)  # first k whose tail fits
    return max(min(min_rank, r), min(r, int(needed.max())))


@dataclass
class PruneReport:
    """Per-layer ranks and the model's exported FLOPs / parameters before and after `prune_`.

    FLOPs and parameters are those of `export(model, example_inputs)`; `dense_*`
    are the model with every SVD layer dense (the model before decomposition).
    FLOPs are None when no example inputs were given.
    """

    energy: float  # the energy knob applied to every layer
    layers: list[dict] = field(default_factory=list)  # name, rank_before, rank_after, full_rank, energy_kept
    dense_flops: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    dense_params: int = 0
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        table = format_table(self.layers, ["name", "rank_before", "rank_after", "full_rank", "energy_kept"])
        lines = [f"energy {self.energy:.3g}", table]
        if self.flops_after is not None:
            lines.append(f"FLOPs  {self.flops_before:,} -> {self.flops_after:,}  "
                         f"({self.flops_after / self.dense_flops:.3f} of dense {self.dense_flops:,})")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,}  "
                     f"({self.params_after / self.dense_params:.3f} of dense {self.dense_params:,})")
        return "\n".join(lines)


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r}; allowed: a fraction of the dense model's {name} in (0, 1]")
    return float(value)


class _ExportCost:
    """FLOPs and parameters of the exported model as a function of the SVD layers' ranks."""

    def __init__(self, model: nn.Module, example_inputs):
        self.layers = svd_layers(model)
        self.rest_params = count_params(model) - sum(count_params(layer) for _, layer in self.layers)
        self.shapes, self.rest_flops = {name: [] for name, _ in self.layers}, None
        if example_inputs is not None:
            self.shapes = trace_svd_layers(model, example_inputs).input_shapes
            total, per_module = _flops(model, example_inputs)
            self.rest_flops = total - sum(per_module.get(name, 0) for name, _ in self.layers)

    def __call__(self, ranks: list[int] | None = None) -> tuple[int | None, int]:
        """(FLOPs, params) of the export at `ranks` (None = every layer dense)."""
        flops, params = self.rest_flops, self.rest_params
        for i, (name, layer) in enumerate(self.layers):
            thin = ranks is not None and layer.exported_thin(self.shapes[name], ranks[i])
            params += layer.exported_params(thin, ranks[i] if thin else None)
            if flops is not None:
                costs = [layer.cost(shape) for shape in self.shapes[name]]
                flops += 2 * sum(c.thin(ranks[i]) if thin else c.dense for c in costs)
        return flops, params


def prune_(model: nn.Module, energy: float | None = None, *, flops: float | None = None, params: float | None = None,
           example_inputs=None, min_rank: int = 1) -> PruneReport:
    """Remove small singular values of every SVD layer, physically shrinking U, s, V. In place.

    Give exactly one of:
        energy: each layer keeps its largest singular values until they hold at
            least (1 − energy) of its Σ s² (METHOD.md §3); 0 ≤ energy < 1, 0 changes nothing.
        flops: the exported model may have at most this fraction of the dense
            model's FLOPs (needs example_inputs); one energy for all layers is searched for.
        params: the same for the parameter count.

    Args:
        example_inputs: inputs for counting FLOPs (optional for energy / params).
        min_rank: no layer goes below this rank.

    Rebuild the optimizer afterwards: the parameters are new.

    Example:
        >>> print(prune_(model, energy=1e-3))
        >>> prune_(model, flops=0.3, example_inputs=torch.randn(1, 3, 32, 32))
    """
    given = {k: v for k, v in (("energy", energy), ("flops", flops), ("params", params)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"prune_ needs exactly one of energy=, flops=, params=; got {sorted(given) or 'none'}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank={min_rank!r}; allowed: an int ≥ 1")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or math.isnan(energy) or not 0 <= energy < 1):
        raise ValueError(f"energy={energy!r}; allowed: 0 ≤ energy < 1, the fraction of each layer's Σ s² "
                         "that may be removed (reference values 1e-6 … 0.3)")
    if flops is not None and example_inputs is None:
        raise ValueError("prune_(flops=...) needs example_inputs to count FLOPs")
    knob = next(iter(given))
    fraction = None if knob == "energy" else _fraction(knob, given[knob])
    layers = svd_layers(model)
    if not layers:
        raise ValueError("prune_: the model has no SVD layers; call svdtrain.decompose_(model, config) first")

    cost = _ExportCost(model, example_inputs)
    tails = [tail_energy(layer.s) for _, layer in layers]
    current = [layer.rank for _, layer in layers]

    def ranks_at(e: float) -> list[int]:
        return [rank_for_energy(t, e, min_rank) for t in tails]

    dense_flops, dense_params = cost(None)
    flops_before, params_before = cost(current)
    if fraction is not None:
        index, dense = (0, dense_flops) if knob == "flops" else (1, dense_params)
        budget = fraction * dense
        smallest = cost([min(r, min_rank) for r in current])[index] / dense
        if smallest > fraction:
            raise ValueError(f"{knob}={fraction} is impossible: with every layer at min_rank={min_rank} the export "
                             f"still has {smallest:.4f} of the dense model's {knob}; "
                             f"allowed: {smallest:.4f} ≤ {knob} ≤ 1, or a lower min_rank")
        # Cost only falls as the energy knob rises, and ranks only change where the knob
        # crosses some layer's tail energy: bisect over those values for the least pruning.
        values = torch.cat([t[..., 1:].flatten() for t in tails]).unique()
        candidates = [0.0] + values[(values > 0) & (values < 1)].tolist()
        first_fit = bisect.bisect_left(range(len(candidates)), True,
                                       key=lambda i: cost(ranks_at(candidates[i]))[index] <= budget)
        energy = candidates[first_fit] if first_fit < len(candidates) else math.nextafter(1.0, 0.0)

    report = PruneReport(energy=energy, dense_flops=dense_flops, flops_before=flops_before,
                         dense_params=dense_params, params_before=params_before)
    new_ranks = ranks_at(energy)
    for (name, layer), rank in zip(layers, new_ranks):
        before = layer.rank
        kept = layer.truncate_(rank) if rank < before else 1.0
        report.layers.append({"name": name, "rank_before": before, "rank_after": rank,
                              "full_rank": layer.full_rank, "energy_kept": kept})
    report.flops_after, report.params_after = cost(new_ranks)
    return report

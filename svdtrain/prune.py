"""prune_: drop small singular values by the energy rule (METHOD.md §3), or to a FLOPs / parameter budget."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .cost import ExportCost, LatencyTables
from .forms import default_multiple, latency_grid
from .latency import check_backend
from .layers import svd_layers
from .stats import format_table


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
    """Per-layer ranks and the model's exported FLOPs / parameters (/ latency) before and after `prune_`.

    FLOPs and parameters are those of `export(model, example_inputs)`; `dense_*`
    are the model with every SVD layer dense (the model before decomposition).
    FLOPs are None without example inputs; latencies (milliseconds, predicted from
    per-layer timings on `backend`) only for a latency budget.
    """

    energy: float | None  # the energy knob applied to every layer (None: ranks chosen per layer for latency)
    layers: list[dict] = field(default_factory=list)  # name, rank_before, rank_after, full_rank, energy_kept
    dense_flops: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    dense_params: int = 0
    params_before: int = 0
    params_after: int = 0
    backend: str | None = None
    dense_latency_ms: float | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    # Where the whole model was timed ("as it stands", or "at its lowest ranks" before any layer is thin), as the
    # tables predicted it and as measured there (fractions of the dense latency), and the scale the predicted
    # savings took from them (see LatencyTables._anchor in cost.py); None when not measured.
    latency_anchor: dict | None = None

    @property
    def cut(self) -> bool:
        """Whether any layer lost rank."""
        return any(row["rank_after"] < row["rank_before"] for row in self.layers)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        table = format_table(self.layers, ["name", "rank_before", "rank_after", "full_rank", "energy_kept"])
        lines = [f"energy {self.energy:.3g}" if self.energy is not None else "ranks chosen per layer for latency",
                 table]
        if self.flops_after is not None:
            lines.append(f"FLOPs  {self.flops_before:,} -> {self.flops_after:,}  "
                         f"({self.flops_after / self.dense_flops:.3f} of dense {self.dense_flops:,})")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,}  "
                     f"({self.params_after / self.dense_params:.3f} of dense {self.dense_params:,})")
        if self.latency_after_ms is not None:
            lines.append(f"latency ({self.backend}, predicted) {self.latency_before_ms:.3f} -> "
                         f"{self.latency_after_ms:.3f} ms  ({self.latency_after_ms / self.dense_latency_ms:.3f} of "
                         f"dense {self.dense_latency_ms:.3f} ms)")
        if self.latency_anchor:
            lines.append(f"  anchored: the model {self.latency_anchor['at']} predicted at "
                         f"{self.latency_anchor['predicted']:.3f} of dense, "
                         f"measured at {self.latency_anchor['measured']:.3f}; savings scaled by "
                         f"{self.latency_anchor['scale']:.2f}")
        return "\n".join(lines)


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r}; allowed: a fraction of the dense model's {name} in (0, 1]")
    return float(value)


def _ranks_for_latency(tables: LatencyTables, tails: list[torch.Tensor], current: list[int], budget_ms: float,
                       min_rank: int, reach: bool = False) -> list[int]:
    """Ranks that meet `budget_ms` (predicted) removing as little of any layer's energy as can be; with `reach`, the
    fastest ranks there are when none meet it (else an error).

    As the energy rule of a FLOPs budget, with time in place of FLOPs: at an energy e, each layer takes the rank
    its table predicts fastest among those (timed) that remove at most e of its Σ s², and e is the least that meets
    the budget. No layer is cut far below the others: a greedy cut, one layer at a time wherever the most time is
    saved for its energy, takes single layers to their lowest ranks once the rank multiples run out, and costs far
    more accuracy than one energy for all. Predicted time only falls as e rises (each layer's choice widens), so e
    is bisected over the values where some layer's choice changes.
    """
    removed = [t.max(dim=0).values if t.dim() > 1 else t for t in tails]  # per layer: energy removed at rank k
    options = []
    for i, rank in enumerate(current):
        floor = max(1, min(min_rank, rank))
        options.append(sorted({max(r, floor) for r, _ in tables.tables[i][1] if r < rank} | {rank}))

    def ranks_at(e: float) -> list[int]:
        return [min((r for r in rs if float(removed[i][r]) <= e), key=lambda r: (tables.layer_ms(i, r), -r))
                for i, rs in enumerate(options)]

    values = sorted({0.0} | {float(removed[i][r]) for i, rs in enumerate(options) for r in rs})
    first_fit = bisect.bisect_left(range(len(values)), True, key=lambda k: tables(ranks_at(values[k])) <= budget_ms)
    if first_fit < len(values):
        return ranks_at(values[first_fit])
    fastest = ranks_at(values[-1])
    if reach:
        return fastest
    share = tables(fastest) / tables(None)
    raise ValueError(f"latency={budget_ms / tables(None):.3g} is impossible: the fastest export predicted is "
                     f"{share:.3f} of the dense model's time ({1 / share:.2f}× its speed) on {tables.backend}; allowed: "
                     f"latency ≥ {share:.3f} (target_speedup ≤ {1 / share:.2f}), or a smaller rank_multiple, or "
                     "another backend or batch")


def prune_(model: nn.Module, energy: float | None = None, *, flops: float | None = None, params: float | None = None,
           latency: float | None = None, example_inputs=None, backend: str = "eager", min_rank: int = 1,
           rank_multiple: int | None = None, reach: bool = False) -> PruneReport:
    """Remove small singular values of every SVD layer, physically shrinking U, s, V. In place.

    Give exactly one of:
        energy: each layer keeps its largest singular values until they hold at
            least (1 − energy) of its Σ s² (METHOD.md §3); 0 ≤ energy < 1, 0 changes nothing.
        flops: the exported model may have at most this fraction of the dense
            model's FLOPs (needs example_inputs); one energy for all layers is searched for.
        params: the same for the parameter count.
        latency: the same for latency on `backend` at example_inputs (needs them),
            predicted from per-layer timings of the dense layer and of thin pairs
            at a grid of ranks (see svdtrain.latency), for `export(..., strategy="latency")`.

    Args:
        example_inputs: inputs at the deployment shape (optional for energy / params).
        backend: one of svdtrain.latency.BACKENDS, for a latency budget.
        min_rank: no layer goes below this rank.
        rank_multiple: ranks are rounded up to a multiple of this (capped at the
            current rank), sizes the backend runs well. Default for a budget
            (flops, params, latency): per layer, the largest power of two ≤ 16
            and ≤ a third of the layer's full rank (`default_multiple`); for
            energy: 1, the energy rule as it is. 1 turns rounding off. A latency
            budget by default also offers each layer the powers of two below its
            multiple (`latency_grid`), taken where measured faster.
        reach: latency only: when no ranks are predicted to meet the budget, cut to the
            fastest there are instead of raising (the report's latency_after_ms says
            how far that is); for a schedule of cuts that must not stop mid-training.

    Rebuild the optimizer afterwards: the parameters are new.

    Example:
        >>> print(prune_(model, energy=1e-3))
        >>> prune_(model, flops=0.3, example_inputs=torch.randn(1, 3, 32, 32))
        >>> prune_(model, latency=0.5, example_inputs=torch.randn(8, 3, 224, 224), backend="onnxruntime")
    """
    given = {k: v for k, v in (("energy", energy), ("flops", flops), ("params", params), ("latency", latency))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"prune_ needs exactly one of energy=, flops=, params=, latency=; got {sorted(given) or 'none'}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank={min_rank!r}; allowed: an int ≥ 1")
    if rank_multiple is not None and (isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int)
                                      or rank_multiple < 1):
        raise ValueError(f"rank_multiple={rank_multiple!r}; allowed: an int ≥ 1, or None for the default")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or math.isnan(energy) or not 0 <= energy < 1):
        raise ValueError(f"energy={energy!r}; allowed: 0 ≤ energy < 1, the fraction of each layer's Σ s² "
                         "that may be removed (reference values 1e-6 … 0.3)")
    knob = next(iter(given))
    if knob in ("flops", "latency") and example_inputs is None:
        raise ValueError(f"prune_({knob}=...) needs example_inputs at the deployment shape")
    fraction = None if knob == "energy" else _fraction(knob, given[knob])
    if knob == "latency":
        check_backend(backend)
    layers = svd_layers(model)
    if not layers:
        raise ValueError("prune_: the model has no SVD layers; call svdtrain.decompose_(model, config) first")

    multiples = [rank_multiple or (1 if knob == "energy" else default_multiple(layer.full_rank))
                 for _, layer in layers]
    if knob == "latency":
        grids = [latency_grid(layer.rank, m, below_multiple=rank_multiple is None)
                 for (_, layer), m in zip(layers, multiples)]
        cost = ExportCost(model, example_inputs, backend, grids)
    else:
        cost = ExportCost(model, example_inputs)
    tails = [tail_energy(layer.s) for _, layer in layers]
    current = [layer.rank for _, layer in layers]

    def ranks_at(e: float) -> list[int]:
        return [min(r, m * math.ceil(rank_for_energy(t, e, min_rank) / m))
                for t, r, m in zip(tails, current, multiples)]

    dense, before = cost(None), cost(current)
    if knob == "latency":
        new_ranks = _ranks_for_latency(cost.latency, tails, current, fraction * dense["latency"], min_rank, reach)
        energy = None
    else:
        if fraction is not None:
            budget = fraction * dense[knob]
            smallest = cost(ranks_at(math.nextafter(1.0, 0.0)))[knob] / dense[knob]
            if smallest > fraction:
                levers = [lever for lever, used in (("a lower min_rank", min_rank > 1),
                                                    ("a lower rank_multiple", max(multiples) > 1)) if used]
                raise ValueError(f"{knob}={fraction} is impossible: with every layer at min_rank={min_rank} "
                                 f"(rank_multiple={rank_multiple or 'default'}) the export still has "
                                 f"{smallest:.4f} of the dense model's {knob}; allowed: {smallest:.4f} ≤ {knob} ≤ 1"
                                 + "".join(f", or {lever}" for lever in levers))
            # Cost only falls as the energy knob rises, and ranks only change where the knob
            # crosses some layer's tail energy: bisect over those values for the least pruning.
            values = torch.cat([t[..., 1:].flatten() for t in tails]).unique()
            candidates = [0.0] + values[(values > 0) & (values < 1)].tolist()
            first_fit = bisect.bisect_left(range(len(candidates)), True,
                                           key=lambda i: cost(ranks_at(candidates[i]))[knob] <= budget)
            energy = candidates[first_fit] if first_fit < len(candidates) else math.nextafter(1.0, 0.0)
        new_ranks = ranks_at(energy)
    report = PruneReport(energy=energy, dense_flops=dense["flops"], flops_before=before["flops"],
                         dense_params=dense["params"], params_before=before["params"])
    for (name, layer), rank in zip(layers, new_ranks):
        rank_before = layer.rank
        kept = layer.truncate_(rank) if rank < rank_before else 1.0
        report.layers.append({"name": name, "rank_before": rank_before, "rank_after": rank,
                              "full_rank": layer.full_rank, "energy_kept": kept})
    after = cost(new_ranks)
    report.flops_after, report.params_after = after["flops"], after["params"]
    if cost.latency is not None:
        report.backend, report.dense_latency_ms = backend, dense["latency"]
        report.latency_before_ms, report.latency_after_ms = before["latency"], after["latency"]
        report.latency_anchor = cost.latency.anchor
    return report

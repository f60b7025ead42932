"""prune_: drop small singular values by the energy rule (METHOD.md §3), or to a FLOPs / parameter / latency budget,
with whole channels as well (channels=True)."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from .channels import adopt_, channel_groups, channel_norms, remove_channels_
from .cost import ExportCost, LatencyTables
from .forms import default_multiple, dense_copy, latency_grid, with_forms
from .latency import check_backend, paired_speedup, runner, timings_for
from .layers import svd_layers
from .stats import count_flops, count_params, format_table


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
    # With channels=True: per channel group, name, channels_before, channels_after, why_kept ("" when removable).
    channels: list[dict] = field(default_factory=list)

    @property
    def cut(self) -> bool:
        """Whether any layer lost rank or any group lost channels."""
        return any(row["rank_after"] < row["rank_before"] for row in self.layers) or \
            any(row["channels_after"] < row["channels_before"] for row in self.channels)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        table = format_table(self.layers, ["name", "rank_before", "rank_after", "full_rank", "energy_kept"])
        lines = [f"energy {self.energy:.3g}" if self.energy is not None else "ranks chosen per layer for latency",
                 table]
        if self.channels:
            lines.append(format_table(self.channels, ["name", "channels_before", "channels_after", "why_kept"]))
        if self.flops_after is not None:
            lines.append(f"FLOPs  {self.flops_before:,} -> {self.flops_after:,}  "
                         f"({self.flops_after / self.dense_flops:.3f} of dense {self.dense_flops:,})")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,}  "
                     f"({self.params_after / self.dense_params:.3f} of dense {self.dense_params:,})")
        if self.latency_after_ms is not None:
            lines.append(f"latency ({self.backend}, {'measured' if self.channels else 'predicted'}) {self.latency_before_ms:.3f} -> "
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


def _fastest_ranks(tables: LatencyTables, tails: list[torch.Tensor], current: list[int], min_rank: int):
    """(ranks_at, values): ranks_at(e) gives each layer the rank its table predicts fastest among those (timed) that
    remove at most e of its Σ s² (a tie: the higher rank); values are the energies where some layer's choice
    changes."""
    removed = [t.max(dim=0).values if t.dim() > 1 else t for t in tails]  # per layer: energy removed at rank k
    options = []
    for i, rank in enumerate(current):
        floor = max(1, min(min_rank, rank))
        options.append(sorted({max(r, floor) for r, _ in tables.tables[i][1] if r < rank} | {rank}))

    def ranks_at(e: float) -> list[int]:
        return [min((r for r in rs if float(removed[i][r]) <= e), key=lambda r: (tables.layer_ms(i, r), -r))
                for i, rs in enumerate(options)]

    return ranks_at, sorted({0.0} | {float(removed[i][r]) for i, rs in enumerate(options) for r in rs})


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
    ranks_at, values = _fastest_ranks(tables, tails, current, min_rank)
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


def _channel_shares(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, removed): a group's channels from the least to the most held (by squared norm), and removed[k] the
    fraction of the group's Σ norm² held by its k least held channels (k = 0 … channels)."""
    squares = norms.detach().double().square()
    order = squares.argsort()
    removed = torch.cat([squares.new_zeros(1), squares[order].cumsum(0)]) / squares.sum().clamp_min(1e-300)
    return order, removed


def _prune_with_channels(model: nn.Module, knob: str, value: float, example_inputs, backend: str, min_rank: int,
                         rank_multiple: int | None, reach: bool, reference: nn.Module | None,
                         rank_energy: float) -> PruneReport:
    """prune_(channels=True). Singular values go first, while they are cheap: each layer takes the rank the energy
    rule keeps at the least energy e ≤ rank_energy that meets the budget (for a latency budget, the rank its
    per-layer timings predict fastest among those removing at most e: a rank below the thin pair's floor buys no
    time and is not cut). Where that falls short, channels take the rest: every removable group keeps the same
    fraction 1 − ρ of its channels in the reference (its most held ones, by `channel_norms`; Torch-Pruning's uniform
    local pruning, which keeps narrow groups from being emptied), ρ the least that meets the budget. Candidates are
    cut on a copy and counted (FLOPs, parameters of the export) or timed whole against the reference on `backend`
    (the export by FLOPs, or every layer dense at the new widths, the faster; where dense layers are faster, the
    candidate keeps its ranks: they would cost accuracy and buy no time). An energy budget cuts both by it: ranks
    by the energy rule, each group's least held channels while they hold at most that share of its Σ norm²."""
    x = example_inputs
    reference = dense_copy(model) if reference is None else reference
    groups = channel_groups(model, x)
    removable = [g for g in groups if g.removable]
    widths = {n: m.out_channels if hasattr(m, "out_channels") else m.out_features
              for n, m in reference.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    full = [widths.get(g.producers[0], g.channels) for g in removable]  # each group's channels in the reference
    with torch.no_grad():
        shares = [_channel_shares(channel_norms(model, g)) for g in removable]
    layers = svd_layers(model)
    tails = [tail_energy(layer.s) for _, layer in layers]
    multiples = [rank_multiple or default_multiple(layer.full_rank) for _, layer in layers]
    tables = None
    if knob == "latency":
        grids = [latency_grid(layer.rank, m, below_multiple=rank_multiple is None)
                 for (_, layer), m in zip(layers, multiples)]
        tables = ExportCost(model, x, backend, grids).latency
        fastest, _ = _fastest_ranks(tables, tails, [layer.rank for _, layer in layers], min_rank)

    def ranks_at(e: float) -> list[int]:
        if tables is not None:
            return fastest(e)
        return [min(layer.rank, m * math.ceil(rank_for_energy(t, e, min_rank) / m))
                for (_, layer), t, m in zip(layers, tails, multiples)]

    def cut(e: float, keep: list[int], ranks: bool = True) -> nn.Module:
        candidate = copy.deepcopy(model)
        for group, (order, _), k in zip(removable, shares, keep):
            if k < group.channels:
                remove_channels_(candidate, dataclasses.replace(group), order[group.channels - k:])
        if ranks:
            for (_, layer), rank in zip(svd_layers(candidate), ranks_at(e)):
                if rank < layer.rank:
                    layer.truncate_(rank)
        return candidate

    def keep_at(rho: float) -> list[int]:
        return [min(g.channels, max(1, math.ceil((1 - rho) * c - 1e-9))) for g, c in zip(removable, full)]

    dense = {"flops": count_flops(reference, x), "params": count_params(reference)}
    if knob == "latency":
        dense_runner = runner(copy.deepcopy(reference).eval(), x, backend)

    def evaluate(e: float, keep: list[int]) -> dict:
        candidate = cut(e, keep)
        out = {"e": e, "keep": keep, "candidate": candidate}
        if knob == "latency":
            cost = ExportCost(candidate, x)
            thin = with_forms(candidate, lambda name, layer: layer.to_thin_pair()
                              if layer.exported_thin(cost.shapes[name]) else layer.to_dense())
            ms = timings_for({"dense": dense_runner, "thin": runner(thin, x, backend),
                              "narrow": runner(dense_copy(candidate), x, backend)}, budget_s=0.75, min_repeats=10)
            form = max(("thin", "narrow"), key=lambda f: paired_speedup(ms["dense"], ms[f])["speedup"])
            out["timed"] = {"dense_ms": statistics.median(ms["dense"]), **paired_speedup(ms["dense"], ms[form])}
            if form == "narrow":
                out["candidate"] = cut(e, keep, ranks=False)
        cost = ExportCost(out["candidate"], x)
        return {**out, **cost([layer.rank for _, layer in cost.layers])}

    def fraction(out: dict) -> float:
        return 1 / out["timed"]["speedup"] if knob == "latency" else out[knob] / dense[knob]

    def least(values: list[float], at, steps: int) -> dict | None:
        """The candidate at the least of `values` (ascending) that meets the budget, bisected over that range;
        None when the last does not."""
        last = at(values[-1])
        if fraction(last) > value:
            return None
        lo, hi, found = values[0], values[-1], last
        for _ in range(steps):
            mid = at((lo + hi) / 2)
            if fraction(mid) <= value:
                found, hi = mid, (lo + hi) / 2
            else:
                lo = (lo + hi) / 2
        return found

    current = [g.channels for g in removable]
    before = evaluate(0.0, current)
    steps = 8 if knob == "latency" else 20
    if knob == "energy":
        chosen = evaluate(value, [g.channels - int((removed[1:] <= value).sum())
                                  for g, (_, removed) in zip(removable, shares)])
    elif fraction(before) <= value:
        chosen = before
    else:  # ranks alone, up to rank_energy (bisected in log10 e); then channels at a uniform ratio
        chosen = least([-12.0, math.log10(rank_energy)], lambda t: evaluate(10 ** t, current), steps) or \
            least([0.0, 1.0], lambda rho: evaluate(rank_energy, [min(k, c) for k, c in zip(keep_at(rho), current)]),
                  steps)
        if chosen is None:
            fastest_cut = evaluate(rank_energy, [1] * len(removable))
            if not reach:
                raise ValueError(f"{knob}={value} is impossible with channels: with one channel left in every group "
                                 f"the export still has {fraction(fastest_cut):.4f} of the dense model's {knob}; "
                                 f"allowed: {fraction(fastest_cut):.4f} ≤ {knob} ≤ 1, or a larger rank_energy")
            chosen = fastest_cut
    report = PruneReport(energy=chosen["e"], dense_flops=dense["flops"], flops_before=before["flops"],
                         flops_after=chosen["flops"], dense_params=dense["params"], params_before=before["params"],
                         params_after=chosen["params"])
    new_layers = dict(svd_layers(chosen["candidate"]))
    for name, layer in layers:
        after = new_layers[name]
        report.layers.append({"name": name, "rank_before": layer.rank, "rank_after": after.rank,
                              "full_rank": after.full_rank, "energy_kept": float(after.energy_kept)})
    kept = dict(zip([g.name for g in removable], chosen["keep"]))
    report.channels = [{"name": g.name, "channels_before": g.channels, "channels_after": kept.get(g.name, g.channels),
                        "why_kept": g.why_kept} for g in groups]
    if knob == "latency":
        dense_ms = chosen["timed"]["dense_ms"]
        report.backend, report.dense_latency_ms = backend, dense_ms
        report.latency_before_ms = dense_ms * fraction(before)
        report.latency_after_ms = dense_ms * fraction(chosen)
    adopt_(model, chosen["candidate"])
    return report


def prune_(model: nn.Module, energy: float | None = None, *, flops: float | None = None, params: float | None = None,
           latency: float | None = None, example_inputs=None, backend: str = "eager", min_rank: int = 1,
           rank_multiple: int | None = None, reach: bool = False, channels: bool = False,
           reference: nn.Module | None = None, rank_energy: float = 0.05) -> PruneReport:
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
        channels: remove whole channels as well as singular values: the groups of
            channels that can go together (coupled through residual additions, see
            `svdtrain.channels.channel_groups`; traced with torch.fx) lose their least
            held channels under the same energy as the ranks (`_prune_with_channels`);
            a latency budget is then timed on whole candidate models, not predicted.
            The report's `channels` lists every group, kept ones with the reason.
            Needs example_inputs.
        reference: with channels, the dense model the budget is a fraction of (default:
            `model` with every SVD layer dense, at its current widths); a schedule of
            cuts passes the model before the first.
        rank_energy: with a budget and channels, the most of a layer's Σ s² its cut
            singular values may hold; channels, removed at one ratio in every group,
            take what the ranks leave of the budget.

    Rebuild the optimizer afterwards: the parameters are new.

    Example:
        >>> print(prune_(model, energy=1e-3))
        >>> prune_(model, flops=0.3, example_inputs=torch.randn(1, 3, 32, 32))
        >>> prune_(model, latency=0.5, example_inputs=torch.randn(8, 3, 224, 224), backend="onnxruntime")
        >>> print(prune_(model, flops=0.2, example_inputs=torch.randn(1, 3, 32, 32), channels=True).channels)
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
    if channels:
        if example_inputs is None:
            raise ValueError("prune_(channels=True) needs example_inputs: the channel groups are traced at them")
        if not svd_layers(model):
            raise ValueError("prune_: the model has no SVD layers; call svdtrain.decompose_(model, config) first")
        if isinstance(rank_energy, bool) or not isinstance(rank_energy, (int, float)) or not 0 < rank_energy < 1:
            raise ValueError(f"rank_energy={rank_energy!r}; allowed: 0 < rank_energy < 1")
        return _prune_with_channels(model, knob, energy if knob == "energy" else fraction, example_inputs, backend,
                                    min_rank, rank_multiple, reach, reference, rank_energy)
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

"""The exported model's FLOPs, parameters and predicted latency as a function of its SVD layers' ranks: what a
budget of `prune_` searches over."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from .forms import dense_copy, truncated, with_forms
from .latency import paired_timing, runner, time_forms, timings_for
from .layers import svd_layers
from .stats import _flops, count_params, trace_svd_layers

# A latency prediction is anchored to a measurement of the whole model once the thin pairs are predicted to save this
# fraction of the dense time: below it the measured saving is mostly timing noise.
ANCHOR_MIN = 0.1


class LatencyTables:
    """Predicted latency of the exported model: measured dense and thin-pair times per layer (thin at a grid of
    ranks, interpolated), plus the rest of the model (whole dense model minus its decomposed layers); the time the
    thin pairs save is scaled to what the whole model, as it stands, is measured to save (`anchor`)."""

    def __init__(self, model: nn.Module, example_inputs, shapes: dict, backend: str, grids: list[list[int]]):
        self.backend = backend
        x = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
        # Whole models are timed before the tables open a session for each form they time: right after many
        # sessions open, ONNX Runtime runs slower for a while, thin pairs more than dense.
        dense = runner(dense_copy(model), x, backend)
        # The rest of the model is what the whole dense model takes beyond its decomposed layers. Its noise moves
        # every prediction, and one session of a backend can run a few per cent off another of the same model:
        # the median of three, each timed for a third of a second.
        self.whole_dense = statistics.median(
            statistics.median(timings_for({"dense": dense}, budget_s=0.3)["dense"]) for _ in range(3))
        where, anchor_ranks = self._anchor_point(model, shapes, grids)
        measured = self._measure(model, anchor_ranks, x, dense) if anchor_ranks else None

        self.tables = []  # per layer: (dense ms, [(rank, thin ms), ...]); empty for a layer that never runs
        # A layer timed alone pays the backend's fixed cost of a call, which inside the whole model it pays once for
        # all layers: taken off each layer's time, so that the sum over layers predicts the whole model's time.
        self.call_ms = time_forms({"call": nn.Conv2d(1, 1, 1)}, (1, 1, 1, 1), backend)["call"]
        dense_sum = 0.0
        for (name, layer), grid in zip(svd_layers(model), grids):
            if not shapes[name]:
                self.tables.append((0.0, [(layer.rank, 0.0)]))
                continue
            forms = {"dense": layer.to_dense()}
            for r in grid:
                forms[r] = truncated(layer, r).to_thin_pair()
            ms = {form: max(0.0, t - self.call_ms) for form, t in time_forms(forms, shapes[name][0], backend).items()}
            self.tables.append((ms.pop("dense"), sorted(ms.items())))
            dense_sum += self.tables[-1][0]
        self.rest = max(0.0, self.whole_dense - dense_sum)
        self.saving_scale = 1.0  # until the anchor measures it
        self.anchor = self._anchor(model, where, anchor_ranks, measured) if anchor_ranks else None

    @staticmethod
    def _anchor_point(model: nn.Module, shapes: dict, grids: list[list[int]]) -> tuple[str, dict]:
        """(where, {layer: rank} of the layers the anchor times as thin pairs): the model as it stands, each layer
        thin where that has fewer FLOPs; while none is (at full rank, before a first cut), every layer that runs at
        the lowest rank its grid offers, the far end of what a budget cuts to: there the per-layer tables
        mispredict most, and a reachable target would be refused as out of reach."""
        now = {name: layer.rank for name, layer in svd_layers(model) if layer.exported_thin(shapes[name])}
        if now:
            return "as it stands", now
        return "at its lowest ranks", {name: grid[0] for (name, _), grid in zip(svd_layers(model), grids)
                                       if shapes[name]}

    def _measure(self, model: nn.Module, ranks: dict, x: torch.Tensor, dense) -> float:
        """The fraction of the dense time `model` takes with the layers in `ranks` as thin pairs at those ranks
        (the rest dense), timed against dense alternately."""
        small = with_forms(model, lambda name, layer: truncated(layer, ranks[name]).to_thin_pair() if name in ranks
                           else layer.to_dense())
        return 1 / paired_timing(dense, runner(small, x, self.backend), budget_s=1.0)["speedup"]

    def _anchor(self, model: nn.Module, where: str, ranks: dict, measured: float) -> dict | None:
        """Scale the time thin pairs save to what the model at the anchor's ranks was measured to save against
        dense; None (no scale) while the tables predict it saves under ANCHOR_MIN of the dense time, too little to
        measure a scale from.

        Layers timed alone mispredict the whole model by more than a budget's margin (RESULTS.md). The scale is
        measured again at every cut, so the error it leaves shrinks as the ranks near the budget."""
        predicted = self.rest + sum(interpolate(thin_ms, ranks[name]) if name in ranks else dense_ms
                                    for (name, _), (dense_ms, thin_ms) in zip(svd_layers(model), self.tables))
        saved = 1 - predicted / self(None)
        if saved < ANCHOR_MIN:
            return None
        self.saving_scale = min(2.0, max(0.5, (1 - measured) / saved))
        return {"at": where, "predicted": 1 - saved, "measured": measured, "scale": self.saving_scale}

    def layer_ms(self, i: int, rank: int) -> float:
        """Layer i in the form the latency export picks at `rank`: the faster of dense and thin pair."""
        dense, thin = self.tables[i]
        return min(dense, interpolate(thin, rank))

    def __call__(self, ranks: list[int] | None) -> float:
        dense = self.rest + sum(dense for dense, _ in self.tables)
        if ranks is None:
            return dense
        return dense - self.saving_scale * sum(self.tables[i][0] - self.layer_ms(i, r) for i, r in enumerate(ranks))


def interpolate(points: list[tuple[int, float]], rank: int) -> float:
    """Linear interpolation of (rank, ms) points; below the first point its time (a thinner pair is no faster)."""
    if rank <= points[0][0]:
        return points[0][1]
    for (r0, t0), (r1, t1) in zip(points, points[1:]):
        if rank <= r1:
            return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
    return points[-1][1]


class ExportCost:
    """FLOPs, parameters and (optionally) latency of the exported model as a function of the SVD layers' ranks."""

    def __init__(self, model: nn.Module, example_inputs, backend: str | None = None,
                 grids: list[list[int]] | None = None):
        self.layers = svd_layers(model)
        self.rest_params = count_params(model) - sum(count_params(layer) for _, layer in self.layers)
        self.shapes, self.rest_flops, self.latency = {name: [] for name, _ in self.layers}, None, None
        if example_inputs is not None:
            self.shapes = trace_svd_layers(model, example_inputs).input_shapes
            total, per_module = _flops(model, example_inputs)
            self.rest_flops = total - sum(per_module.get(name, 0) for name, _ in self.layers)
        if backend is not None:
            self.latency = LatencyTables(model, example_inputs, self.shapes, backend, grids)

    def __call__(self, ranks: list[int] | None = None) -> dict:
        """{"flops", "params", "latency"} of the export at `ranks` (None = every layer dense)."""
        flops, params = self.rest_flops, self.rest_params
        for i, (name, layer) in enumerate(self.layers):
            thin = ranks is not None and layer.exported_thin(self.shapes[name], ranks[i])
            params += layer.exported_params(thin, ranks[i] if thin else None)
            if flops is not None:
                costs = [layer.cost(shape) for shape in self.shapes[name]]
                flops += 2 * sum(c.thin(ranks[i]) if thin else c.dense for c in costs)
        return {"flops": flops, "params": params, "latency": self.latency(ranks) if self.latency else None}

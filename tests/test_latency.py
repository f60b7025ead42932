import copy
import sys

import pytest
import torch
from torch import nn

import svdtrain.latency as latency
import svdtrain.cost as cost_module
from conftest import rel_err
from svdtrain import SVDConfig, count_flops, decompose_, export, export_layout, prune_
from svdtrain.forms import dense_copy, default_multiple, latency_grid
from svdtrain.layers import svd_layers
from svdtrain.recipes.models import CifarResNet

X = torch.randn(4, 3, 16, 16)


def pruned_resnet(energy=0.3, depth=20):
    torch.manual_seed(0)
    model = CifarResNet(depth, 10, 3).eval()
    decompose_(model, SVDConfig(exclude_modules=("fc",)))
    prune_(model, energy=energy)
    return model


def has_thin_pairs(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Sequential) and len(m) == 2 and all(isinstance(c, nn.Conv2d) for c in m)
               for m in model.modules())


def fake_times(monkeypatch, thin_factor: float, whole_small_factor: float):
    """Deterministic 'timings': a form takes FLOPs/1e6 ms (thin pairs × thin_factor); whole models as measured
    by export's final check: small = dense × whole_small_factor."""

    def time_forms(forms, input_shape, backend, budget_s=0.5):
        x = torch.randn(input_shape)
        return {name: count_flops(m, x) / 1e6 * (thin_factor if isinstance(m, nn.Sequential) else 1.0)
                for name, m in forms.items()}

    def timings_for(runners, budget_s=0.0, *a, **kw):
        if set(runners) == {"dense", "small"}:  # export's whole-model check
            return {"dense": [10.0] * 7, "small": [10.0 * whole_small_factor] * 7}
        return {name: [50.0] * 7 for name in runners}  # prune_'s whole dense model

    export_module = sys.modules["svdtrain.export"]  # the module; svdtrain.export is the function
    for module in (export_module, cost_module, latency):
        monkeypatch.setattr(module, "time_forms", time_forms)
    for module in (cost_module, latency):  # prune_'s whole dense model; export's check, through paired_timing
        monkeypatch.setattr(module, "timings_for", timings_for)
    monkeypatch.setattr(latency, "median_ms", lambda runners, *a, **k: {name: 50.0 for name in runners})


def test_latency_layout_follows_the_measured_times(monkeypatch):
    model = pruned_resnet(energy=0.1)
    by_flops = {n: e["form"] for n, e in export_layout(model, X).items()}
    assert set(by_flops.values()) == {"dense", "thin"}  # 19 thin, 2 dense
    for tie in (1.0, 1.02):  # within 3 %: fewer FLOPs decide
        fake_times(monkeypatch, thin_factor=tie, whole_small_factor=0.5)
        assert {n: e["form"] for n, e in export_layout(model, X, "latency").items()} == by_flops
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.5)  # thin clearly faster, even with more FLOPs
    assert {e["form"] for e in export_layout(model, X, "latency").values()} == {"thin"}
    fake_times(monkeypatch, thin_factor=100.0, whole_small_factor=0.5)  # thin pairs measured very slow
    assert {e["form"] for e in export_layout(model, X, "latency").values()} == {"dense"}


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_latency_export_is_never_slower_than_dense(monkeypatch, backend):
    model = pruned_resnet(depth=8 if backend == "compiled" else 20)  # compiling is slow: a small ResNet
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.99)  # per layer faster, whole model not 3 %
    small = export(model, X, strategy="latency", backend=backend)
    assert not has_thin_pairs(small)
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.8)
    small = export(model, X, strategy="latency", backend=backend)
    assert has_thin_pairs(small)
    with torch.no_grad():
        assert rel_err(small(X), model(X)) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "eager_prepared", "compiled", "onnxruntime"])
def test_real_latency_export_keeps_the_function(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = pruned_resnet(depth=8 if backend == "compiled" else 20)
    small = export(model, X, strategy="latency", backend=backend)
    with torch.no_grad():
        assert rel_err(small(X), model(X)) <= 1e-5
    assert not [m for m in small.modules() if type(m).__module__ == "svdtrain.layers"]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_latency_budget_is_met_as_predicted(monkeypatch, backend):
    """prune_(latency=f): ranks chosen from the (here deterministic) per-layer tables until the export is
    predicted at ≤ f of the dense latency; ranks stay on each layer's grid (multiples of the default rank
    multiple, or the powers of two below it)."""
    model = pruned_resnet(energy=0, depth=8)  # full rank: every thin pair has more FLOPs than its layer, so the
    fake_times(monkeypatch, thin_factor=1.0, whole_small_factor=0.5)  # tables predict no saving and measure none
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 2.0)  # the tables alone (the anchor: the tests below)
    report = prune_(model, latency=0.6, example_inputs=X, backend=backend)
    assert report.latency_anchor is None and report.latency_before_ms == report.dense_latency_ms
    assert report.backend == backend and report.energy is None
    assert report.latency_after_ms <= 0.6 * report.dense_latency_ms < report.latency_before_ms
    assert report.cut
    for (_, layer), row in zip(svd_layers(model), report.layers):
        assert row["rank_after"] in latency_grid(row["rank_before"], default_multiple(layer.full_rank), True)


def test_latency_budget_takes_ranks_below_the_multiple_only_where_measured_faster(monkeypatch):
    """A deep latency budget may give a layer a power of two below its rank multiple (2, 4, 8 under 16), but
    not a rank its thin pair is measured slower at (here every pair of inner size 8 takes 3× its FLOPs' time,
    as ONNX Runtime's 16-channel blocks make it); a rank_multiple the user names keeps ranks its multiples."""
    model = pruned_resnet(energy=0, depth=8)
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.5)
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 2.0)  # the tables alone: the fake whole model does not add up
    flops_ms = latency.time_forms

    def time_forms(forms, input_shape, backend, budget_s=0.5):
        ms = flops_ms(forms, input_shape, backend, budget_s)
        return {name: t * 3 if isinstance(forms[name], nn.Sequential) and forms[name][0].out_channels == 8 else t
                for name, t in ms.items()}

    monkeypatch.setattr(cost_module, "time_forms", time_forms)
    deep = copy.deepcopy(model)
    report = prune_(deep, latency=0.2, example_inputs=X, backend="eager", reach=True)
    multiples = [default_multiple(layer.full_rank) for _, layer in svd_layers(model)]
    after = [row["rank_after"] for row in report.layers]
    assert any(r < m for r, m in zip(after, multiples))  # below the multiple …
    assert 8 not in [r for r, row in zip(after, report.layers) if row["rank_before"] != 8]  # … but never at 8
    named = prune_(model, latency=0.2, example_inputs=X, backend="eager", reach=True, rank_multiple=4)
    assert all(row["rank_after"] % 4 == 0 or row["rank_after"] == row["rank_before"] for row in named.layers)


def test_timings_are_cached():
    layer = nn.Conv2d(8, 8, 3, padding=1)
    first = latency.time_forms({"a": layer}, (1, 8, 12, 12), "eager")
    size = len(latency._CACHE)
    again = latency.time_forms({"b": nn.Conv2d(8, 8, 3, padding=1)}, (1, 8, 12, 12), "eager")  # same signature
    assert again["b"] == first["a"] and len(latency._CACHE) == size
    compiled = latency.time_forms({"a": layer}, (1, 8, 12, 12), "compiled")  # another backend: its own entry
    assert len(latency._CACHE) == size + 1
    assert latency.time_forms({"b": nn.Conv2d(8, 8, 3, padding=1)}, (1, 8, 12, 12), "compiled") == {"b": compiled["a"]}
    assert len(latency._CACHE) == size + 1


def test_compiled_backend_computes_what_eager_does():
    """Inductor with freezing folds batch norm into the convolutions, which reorders float sums: equal to
    eager within 1e-4 (relative), for the dense model and its export, at two batch sizes (each compiled
    on its own, neither disturbing the other)."""
    model = pruned_resnet(depth=8)
    models = {"dense": dense_copy(model).eval(), "small": export(model, X).eval()}
    fast = {(name, b): latency.compiled(m, X[:b]) for name, m in models.items() for b in (1, 4)}
    with torch.no_grad():
        for (name, b), f in fast.items():
            assert rel_err(f(X[:b]), models[name](X[:b])) <= 1e-4, (name, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="speed"), "strategy='speed'; allowed: flops, latency"),
    (dict(strategy="latency", backend="tpu"), "backend='tpu'; allowed: eager, eager_prepared, compiled, onnxruntime"),
    (dict(backend="tpu"), "backend='tpu'; allowed: eager"),  # with strategy flops too: never silently ignored
    (dict(strategy="latency", example_inputs=None), "needs example_inputs: one input tensor"),
])
def test_bad_export_arguments(kwargs, message):
    kwargs = {"example_inputs": X, **kwargs}
    with pytest.raises(ValueError, match=message):
        export(pruned_resnet(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(latency=0.5), r"prune_\(latency=...\) needs example_inputs"),
    (dict(latency=0.5, example_inputs=X, backend="tpu"), "backend='tpu'; allowed: eager"),
])
def test_latency_budget_needs_inputs_and_a_backend(kwargs, message):
    model = pruned_resnet()
    ranks = [layer.rank for _, layer in svd_layers(model)]
    with pytest.raises(ValueError, match=message):
        prune_(model, **kwargs)
    assert [layer.rank for _, layer in svd_layers(model)] == ranks  # refused before anything was cut


def test_paired_speedup_is_the_median_of_paired_ratios():
    base, other = [10.0, 12.0, 30.0, 11.0, 10.0], [5.0, 4.0, 10.0, 5.5, 20.0]  # ratios 2, 3, 3, 2, 0.5
    out = latency.paired_speedup(base, other)
    assert out["speedup"] == 2.0  # the ratio of the medians would say 11 / 5.5 = 2.0 by chance; see next
    assert latency.paired_speedup([10, 10, 40], [5, 20, 10])["speedup"] == 2.0  # medians: 10 / 10 = 1.0
    assert out["speedup_iqr"][0] <= out["speedup"] <= out["speedup_iqr"][1]
    assert latency.paired_speedup([3.0], [1.5]) == {"speedup": 2.0, "speedup_iqr": [2.0, 2.0]}


def test_dense_vs_final_measures_a_known_speed_up():
    """Against an independent truth: modules that sleep 6 ms and 2 ms per forward run (6 + ε) / (2 + ε) ≈ 2.9×
    apart; the report's figure must find that within 25 % on a loaded machine."""
    import time

    from svdtrain.recipes.report import dense_vs_final

    class Sleeps(nn.Module):
        def __init__(self, ms: float):
            super().__init__()
            self.ms = ms

        def forward(self, x):
            time.sleep(self.ms / 1e3)
            return x

    out = dense_vs_final(Sleeps(6.0), Sleeps(2.0), torch.zeros(1), repeats=15, backend="eager")
    assert 6.0 <= out["dense_ms"] < 9.0 and 2.0 <= out["final_ms"] < 5.0
    assert 2.9 / 1.25 <= out["speedup"] <= 2.9 * 1.25, out


def test_bench_latency_says_when_the_export_fell_back_to_dense(monkeypatch, tmp_path):
    """`svdtrain bench latency`: thin layers measured faster alone but the whole thin model slower (faked), so the
    export hands back the dense model: the point and its table row say so, with no thin layer counted."""
    from svdtrain.recipes import bench

    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=2.0)
    results = tmp_path / "RESULTS.md"
    out = bench.latency(models=("lenet300",), levels=(0.35,), batches=(1,), backends=("eager",), budget_s=0.05,
                        threads=1, out=tmp_path / "latency.json", results=results)
    (point,) = out["points"]
    assert point["fell_back_to_dense"] and point["thin_layers"] == 0 and point["flops_speedup"] == 1.0
    assert point["speedup_iqr"][0] <= point["speedup"] <= point["speedup_iqr"][1] and point["repeats"] >= 7
    assert "| 0/2 (fell back to dense) |" in results.read_text()


@pytest.mark.parametrize("latency", [0.8, 0.6, 0.45])
def test_latency_budget_cuts_alike_layers_alike(monkeypatch, latency):
    """Two layers with the same weights and inputs lose the same energy: each layer takes the fastest rank that
    removes at most the least energy e meeting the budget, as a FLOPs budget's energy rule does (a greedy cut,
    one layer at a time, takes one of them far below the other)."""
    torch.manual_seed(0)
    first = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    second = copy.deepcopy(first)
    model = nn.Sequential(first, nn.ReLU(), second)
    decompose_(model, SVDConfig(decomposition="spatial"))
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.5)
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 2.0)  # the tables alone
    x = torch.randn(1, 16, 64, 64)  # fake times: each layer FLOPs / 1e6 ms (19 ms dense), the whole model 50 ms
    with torch.no_grad():
        model[2].U.copy_(model[0].U), model[2].s.copy_(model[0].s), model[2].V.copy_(model[0].V)
    report = prune_(model, latency=latency, example_inputs=x, backend="eager")
    assert report.latency_after_ms <= latency * report.dense_latency_ms + 1e-9
    assert report.layers[0]["rank_after"] == report.layers[1]["rank_after"] < 48


def test_latency_prediction_is_anchored_to_the_whole_model_as_measured(monkeypatch):
    """Once the thin pairs are predicted to save ≥ ANCHOR_MIN of the dense time, the whole model at its current
    ranks (each layer in its form with fewer FLOPs) is timed against dense and the tables' savings scaled to match
    it: a model measured faster than its tables say is not cut for a budget it already meets; one measured slower
    is cut deeper."""
    model = pruned_resnet(energy=0.3, depth=8)
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.5)
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 2.0)
    alone = prune_(copy.deepcopy(model), latency=0.999, example_inputs=X, backend="eager", reach=True)
    tables = alone.latency_before_ms / alone.dense_latency_ms  # the tables' own prediction, their fastest forms
    assert alone.latency_anchor is None and 0.3 < tables < 0.8
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 0.1)
    first = prune_(copy.deepcopy(model), latency=0.999, example_inputs=X, backend="eager", reach=True)
    predicted = first.latency_anchor["predicted"]  # the same tables, read at the forms with fewer FLOPs
    assert tables - 1e-9 <= predicted < 0.9
    for measured in (predicted - 0.1, predicted + 0.1):
        fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=measured)
        report = prune_(copy.deepcopy(model), latency=predicted, example_inputs=X, backend="eager", reach=True)
        anchor = report.latency_anchor
        scale = (1 - measured) / (1 - predicted)
        assert anchor["predicted"] == pytest.approx(predicted, rel=1e-9)
        assert anchor["measured"] == pytest.approx(measured, rel=1e-9)
        assert anchor["scale"] == pytest.approx(scale, rel=1e-9)
        assert report.latency_before_ms / report.dense_latency_ms == pytest.approx(1 - scale * (1 - tables), rel=1e-9)
        if measured > predicted:  # measured slower than the tables say: cut (here to the fastest ranks there are)
            assert report.cut and report.latency_after_ms < report.latency_before_ms
        else:  # measured faster: the budget is met as it stands
            assert not report.cut


def test_latency_prediction_of_a_full_rank_model_is_anchored_at_its_lowest_ranks(monkeypatch):
    """Before any layer is thin (full rank, as before a first cut or at a run's reach check), the whole model is
    timed with every layer at the lowest rank its grid offers, the far end of what a budget cuts to: a budget the
    tables alone call impossible is met when the model is measured faster there, and the reach error names the
    anchored prediction."""
    model = pruned_resnet(energy=0, depth=8)
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.5)
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 2.0)
    alone = prune_(copy.deepcopy(model), latency=0.01, example_inputs=X, backend="eager", reach=True)
    fastest = alone.latency_after_ms / alone.dense_latency_ms  # the tables alone: their fastest ranks
    assert alone.latency_anchor is None and 0.3 < fastest < 0.9
    with pytest.raises(ValueError, match=f"fastest export predicted is {fastest:.3f}"):
        prune_(copy.deepcopy(model), latency=fastest - 0.05, example_inputs=X, backend="eager")
    monkeypatch.setattr(cost_module, "ANCHOR_MIN", 0.1)
    lowest = prune_(copy.deepcopy(model), latency=0.999, example_inputs=X, backend="eager", reach=True).latency_anchor
    assert lowest["at"] == "at its lowest ranks" and fastest - 1e-9 <= lowest["predicted"] < 0.9
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=lowest["predicted"] - 0.15)  # measured faster
    report = prune_(copy.deepcopy(model), latency=fastest - 0.05, example_inputs=X, backend="eager")
    assert report.latency_anchor["at"] == "at its lowest ranks"
    assert report.latency_anchor["scale"] == pytest.approx(
        (1 - (lowest["predicted"] - 0.15)) / (1 - lowest["predicted"]), rel=1e-9)
    assert report.cut and report.latency_after_ms <= (fastest - 0.05) * report.dense_latency_ms + 1e-9
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=lowest["predicted"] + 0.05)  # measured slower
    with pytest.raises(ValueError, match="is impossible"):
        prune_(copy.deepcopy(model), latency=fastest - 0.05, example_inputs=X, backend="eager")


def test_a_model_returning_a_tuple_or_an_output_object_is_timed_on_onnx_runtime():
    pytest.importorskip("onnxruntime")
    from types import SimpleNamespace

    from svdtrain.latency import runner

    class Net(nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.fc, self.wrap = nn.Linear(8, 3), wrap

        def forward(self, x):
            return self.wrap(self.fc(x))

    x = torch.randn(2, 8)
    for wrap in (lambda y: (y, y.sum()), lambda y: SimpleNamespace(logits=y, extra=1)):
        outputs = runner(Net(wrap), x, "onnxruntime")()
        assert len(outputs) == 1 and outputs[0].shape == (2, 3)  # the session's outputs: the logits alone


def test_timing_on_onnx_runtime_leaves_the_model_in_eval_mode():
    """The exporter restores the exported module's mode afterwards: the model must not end up training
    (its batch norms would then use batch statistics in every later forward)."""
    pytest.importorskip("onnxruntime")
    from svdtrain.latency import runner

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.fill_(5.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    runner(model, x, "onnxruntime")()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)

import io
import json
import sys

import pytest
import torch
from torch import nn

import svdtrain.latency as latency
from conftest import rel_err
from svdtrain import SVDConfig, count_flops, decompose_, export, export_layout, prune_, rebuild
from svdtrain.layers import svd_layers
from svdtrain.recipes.models import CifarResNet

X = torch.randn(4, 3, 16, 16)


def pruned_resnet(energy=0.3):
    torch.manual_seed(0)
    model = CifarResNet(20, 10, 3).eval()
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

    def timings_for(runners, budget_s, **kw):
        return {"dense": [10.0] * 7, "small": [10.0 * whole_small_factor] * 7}

    export_module = sys.modules["svdtrain.export"]  # the module; svdtrain.export is the function
    monkeypatch.setattr(export_module, "time_forms", time_forms)
    monkeypatch.setattr(export_module, "timings_for", timings_for)
    monkeypatch.setattr(latency, "time_forms", time_forms)
    monkeypatch.setattr(latency, "median_ms", lambda runners, *a, **k: {name: 50.0 for name in runners})


def test_latency_layout_follows_the_measured_times(monkeypatch):
    model = pruned_resnet()
    fake_times(monkeypatch, thin_factor=1.0, whole_small_factor=0.5)
    by_flops = {n: e["form"] for n, e in export_layout(model, X).items()}
    assert {n: e["form"] for n, e in export_layout(model, X, "latency").items()} == by_flops
    fake_times(monkeypatch, thin_factor=100.0, whole_small_factor=0.5)  # thin pairs measured very slow
    assert {e["form"] for e in export_layout(model, X, "latency").values()} == {"dense"}


def test_latency_export_is_never_slower_than_dense(monkeypatch):
    model = pruned_resnet()
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.99)  # per layer faster, whole model not 3 %
    small = export(model, X, strategy="latency")
    assert not has_thin_pairs(small)
    fake_times(monkeypatch, thin_factor=0.5, whole_small_factor=0.8)
    small = export(model, X, strategy="latency")
    assert has_thin_pairs(small)
    with torch.no_grad():
        assert rel_err(small(X), model(X)) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_real_latency_export_keeps_the_function(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = pruned_resnet()
    small = export(model, X, strategy="latency", backend=backend)
    with torch.no_grad():
        assert rel_err(small(X), model(X)) <= 1e-5
    assert not [m for m in small.modules() if type(m).__module__ == "svdtrain.layers"]


def test_timings_are_cached():
    layer = nn.Conv2d(8, 8, 3, padding=1)
    first = latency.time_forms({"a": layer}, (1, 8, 12, 12), "eager")
    size = len(latency._CACHE)
    again = latency.time_forms({"b": nn.Conv2d(8, 8, 3, padding=1)}, (1, 8, 12, 12), "eager")  # same signature
    assert again["b"] == first["a"] and len(latency._CACHE) == size


def test_latency_budget_is_met_in_the_prediction(monkeypatch):
    model = pruned_resnet(energy=0.0)
    fake_times(monkeypatch, thin_factor=1.0, whole_small_factor=0.5)
    report = prune_(model, latency=0.6, example_inputs=X)
    assert report.latency_after_ms <= 0.6 * report.dense_latency_ms
    assert report.energy is None and "latency" in str(report)
    for row in report.layers:  # ranks on multiples of 8, or untouched
        assert row["rank_after"] % 8 == 0 or row["rank_after"] == row["rank_before"]


def test_rank_multiple_rounds_up():
    model = pruned_resnet(energy=0.0)
    report = prune_(model, flops=0.5, example_inputs=X[:1], rank_multiple=8)
    for row in report.layers:
        assert row["rank_after"] % 8 == 0 or row["rank_after"] == row["rank_before"]
    assert report.flops_after <= 0.5 * report.dense_flops


def test_layout_and_state_dict_rebuild_the_exported_model():
    model = pruned_resnet()
    layout = export_layout(model, X)
    small = export(model, X)
    text = json.dumps(layout)  # the layout is plain JSON
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = rebuild(CifarResNet(20, 10, 3), json.loads(text))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), small.eval()(X))


def test_torch_export_of_the_exported_model():
    small = export(pruned_resnet(), X).eval()
    program = torch.export.export(small, (X,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert rel_err(torch.export.load(buffer).module()(X), small(X)) <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="speed"), "allowed: flops, latency"),
    (dict(strategy="latency", backend="tpu"), "allowed: eager, onnxruntime, cuda"),
    (dict(strategy="latency", example_inputs=None), "one input tensor"),
])
def test_bad_export_arguments(kwargs, message):
    kwargs = {"example_inputs": X, **kwargs}
    with pytest.raises(ValueError, match=message):
        export(pruned_resnet(), **kwargs)


def test_latency_budget_needs_inputs_and_a_backend():
    with pytest.raises(ValueError, match="example_inputs"):
        prune_(pruned_resnet(), latency=0.5)
    with pytest.raises(ValueError, match="allowed: eager"):
        prune_(pruned_resnet(), latency=0.5, example_inputs=X, backend="tpu")
    with pytest.raises(ValueError, match="rank_multiple"):
        prune_(pruned_resnet(), energy=0.1, rank_multiple=0)
    assert svd_layers(pruned_resnet())

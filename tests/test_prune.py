import copy
import math

import pytest
import torch
from torch import nn

from conftest import SmallNet, rel_err
from svdtrain import SVDConfig, SVDLinear, count_flops, count_params, decompose_, export, prune_
from svdtrain.layers import svd_layers
from svdtrain.forms import default_multiple
from svdtrain.recipes.models import resnet20

X = torch.randn(1, 3, 16, 16)


def decomposed(decomposition="channel"):
    torch.manual_seed(0)
    model = SmallNet().eval()
    dense_flops, dense_params = count_flops(model, X), count_params(model)
    decompose_(model, SVDConfig(decomposition=decomposition))
    return model, dense_flops, dense_params


def test_energy_zero_changes_nothing():
    model, _, _ = decomposed()
    with torch.no_grad():  # exact zeros must survive energy=0 too
        model.stem.s[-1] = 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(X)
    report = prune_(model, energy=0)
    assert all(r["rank_before"] == r["rank_after"] for r in report.layers)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(X), expected)


def test_energy_rule_on_known_singular_values():
    layer = SVDLinear(8, 8)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.5, 3.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0]))  # energies 9, 4, 1, .25 of 14.25
    model = nn.Sequential(layer)
    report = prune_(model, energy=0.1)  # keep ≥ 12.825: 9 + 4 = 13
    assert layer.rank == 2 and torch.equal(layer.s.detach(), torch.tensor([3.0, 2.0]))
    assert math.isclose(report.layers[0]["energy_kept"], 13 / 14.25, rel_tol=1e-6)
    assert math.isclose(float(layer.energy_kept), 13 / 14.25, rel_tol=1e-6)
    prune_(model, energy=0.5)  # keep ≥ 6.5 of 13: 9
    assert layer.rank == 1


def test_energy_prune_keeps_accuracy_when_little_is_removed():
    model, _, _ = decomposed()
    expected = model(X)
    prune_(model, energy=1e-6)
    assert rel_err(model(X), expected) < 3e-3


def test_grouped_layers_share_one_rank():
    model, _, _ = decomposed()
    report = prune_(model, energy=0.2)
    row = next(r for r in report.layers if r["name"] == "grouped")
    assert model.grouped.s.shape == (2, row["rank_after"]) and row["rank_after"] < row["rank_before"]


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("budget", [0.6, 0.35])
def test_flops_budget_is_met_by_the_exported_model(decomposition, budget):
    torch.manual_seed(0)
    model, x = resnet20().eval(), torch.randn(1, 3, 32, 32)
    dense_flops = count_flops(model, x)
    decompose_(model, SVDConfig(decomposition=decomposition))
    report = prune_(model, flops=budget, example_inputs=x, rank_multiple=1)  # every rank allowed: a tight fit
    achieved = count_flops(export(model, x), x) / dense_flops
    assert report.dense_flops == dense_flops
    assert report.flops_after == count_flops(export(model, x), x)
    assert budget - 0.02 <= achieved <= budget


def test_default_multiples():
    assert [default_multiple(r) for r in (1, 3, 6, 16, 24, 47, 48, 192, 4096)] == [1, 1, 2, 4, 8, 8, 16, 16, 16]


@pytest.mark.parametrize("decomposition, budget", [("channel", 0.35), ("spatial", 0.5)])
def test_budgets_round_ranks_to_the_default_multiples(decomposition, budget):
    torch.manual_seed(0)
    model, x = resnet20().eval(), torch.randn(1, 3, 32, 32)
    dense_flops = count_flops(model, x)
    decompose_(model, SVDConfig(decomposition=decomposition))
    unrounded = prune_(copy.deepcopy(model), flops=budget, example_inputs=x, rank_multiple=1)
    report = prune_(model, flops=budget, example_inputs=x)
    for (_, layer), row in zip(svd_layers(model), report.layers):
        assert row["rank_after"] % default_multiple(layer.full_rank) == 0 or row["rank_after"] == row["rank_before"]
    assert [r["rank_after"] for r in report.layers] != [r["rank_after"] for r in unrounded.layers]
    assert budget - 0.1 <= count_flops(export(model, x), x) / dense_flops <= budget
    assert report.flops_after == count_flops(export(model, x), x)


@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_params_budget_is_met_by_the_exported_model(budget):
    model, _, dense_params = decomposed()
    report = prune_(model, params=budget, rank_multiple=1)
    achieved = count_params(export(model, None)) / dense_params
    assert report.dense_params == dense_params and report.params_after == count_params(export(model, None))
    assert budget - 0.02 <= achieved <= budget


def test_min_rank_is_respected():
    model, _, _ = decomposed()
    prune_(model, energy=0.99, min_rank=2)
    assert all(layer.rank >= min(2, layer.full_rank) for _, layer in svd_layers(model))


def test_report_counts_match_the_export():
    model, dense_flops, dense_params = decomposed()
    before = count_flops(export(model, X), X)
    report = prune_(model, energy=0.05, example_inputs=X)
    assert (report.dense_flops, report.dense_params) == (dense_flops, dense_params)
    assert report.flops_before == before
    assert report.flops_after == count_flops(export(model, X), X)
    assert report.params_after == count_params(export(model, X))
    assert "of dense" in str(report) and report.to_dict()["layers"][0]["name"] == "stem"


@pytest.mark.parametrize("kwargs, message", [
    (dict(energy=1.0), "0 ≤ energy < 1"),
    (dict(energy=-0.1), "0 ≤ energy < 1"),
    (dict(energy=float("nan")), "0 ≤ energy < 1"),
    (dict(energy="0.1"), "0 ≤ energy < 1"),
    (dict(energy=True), "0 ≤ energy < 1"),
    (dict(), "exactly one"),
    (dict(energy=0.1, params=0.5), "exactly one"),
    (dict(flops=0.5), "example_inputs"),
    (dict(params=1.5), r"\(0, 1\]"),
    (dict(params=0.0), r"\(0, 1\]"),
    (dict(flops=1e-4, example_inputs=X), "impossible"),
    (dict(params=1e-4), "impossible"),
    (dict(energy=0.1, min_rank=0), "min_rank"),
    (dict(energy=0.1, rank_multiple=0), "rank_multiple"),
    (dict(params=0.02, rank_multiple=8), r"impossible.*rank_multiple=8"),
])
def test_bad_input_raises(kwargs, message):
    model, _, _ = decomposed()
    with pytest.raises(ValueError, match=message):
        prune_(model, **kwargs)


def test_model_without_svd_layers_raises():
    with pytest.raises(ValueError, match="decompose_"):
        prune_(nn.Sequential(nn.Linear(3, 3)), energy=0.1)


def test_budget_on_a_bare_svd_layer():
    layer = SVDLinear.from_dense(nn.Linear(64, 64))
    x = torch.randn(8, 64)
    dense_flops = count_flops(nn.Linear(64, 64), x)
    report = prune_(layer, flops=0.5, example_inputs=x)
    assert report.dense_flops == dense_flops
    assert 0.48 <= count_flops(export(layer, x), x) / dense_flops <= 0.5

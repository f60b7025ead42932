import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import svdtrain
from conftest import rel_err
from svdtrain.prune import rank_for_energy, tail_energy
from svdtrain.recipes.baselines import filter_prune_, nuclear_norm, resize_to_state_, trp_layers, trp_truncate_
from svdtrain.recipes.config import ConfigError, RunConfig
from svdtrain.recipes.data import FASHION_MNIST_DIR
from svdtrain.recipes.models import CifarResNet

CONFIG = svdtrain.SVDConfig(exclude_modules=("fc",))


def test_trp_layers_are_the_ones_decompose_would_take():
    model = CifarResNet(20, 10, 1)
    names = {id(m): n for n, m in model.named_modules()}
    report = svdtrain.decompose_(copy.deepcopy(model), CONFIG)
    assert [names[id(m)] for m in trp_layers(model, CONFIG)] == [r["name"] for r in report.replaced]


def test_nuclear_norm_and_its_gradient():
    torch.manual_seed(0)
    model = CifarResNet(20, 10, 1)
    layers = trp_layers(model, CONFIG)[:3]
    value = nuclear_norm(layers)
    expected = sum(torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), "nuc") for m in layers)
    assert torch.allclose(value, expected, rtol=1e-5)
    value.backward()
    u, _, vh = torch.linalg.svd(layers[0].weight.detach().reshape(layers[0].weight.shape[0], -1),
                                full_matrices=False)
    assert rel_err(layers[0].weight.grad.reshape(u.shape[0], -1), u @ vh) < 1e-4  # subgradient U·Vᵀ


def test_trp_truncation_lowers_the_rank_by_the_energy_rule():
    torch.manual_seed(1)
    model = CifarResNet(20, 10, 1)
    layers = trp_layers(model, CONFIG)

    def svals(layer):
        return torch.linalg.svdvals(layer.weight.detach().reshape(layer.weight.shape[0], -1).double())

    before = [svals(layer) for layer in layers]
    trp_truncate_(layers, 0.3)
    for layer, s in zip(layers, before):
        expected = rank_for_energy(tail_energy(s), 0.3)
        after = svals(layer)
        assert int((after > after[0] * 1e-5).sum()) == expected < len(s)
        assert torch.allclose(after[:expected], s[:expected], rtol=1e-4)  # the kept values are unchanged


def test_filter_pruning_meets_the_budget_and_reloads():
    torch.manual_seed(2)
    pytest.importorskip("torch_pruning")
    model, x = CifarResNet(20, 10, 1).eval(), torch.randn(1, 1, 28, 28)
    dense_flops = svdtrain.count_flops(model, x)
    ratio = filter_prune_(model, 0.4, x, ignored=[model.fc])
    achieved = svdtrain.count_flops(model, x) / dense_flops
    assert 0.36 <= achieved <= 0.4 and 0.2 < ratio < 0.6
    assert model.fc.out_features == 10
    fresh = resize_to_state_(CifarResNet(20, 10, 1), model.state_dict()).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_resize_refuses_a_checkpoint_of_another_model():
    state = {"weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="different model"):
        resize_to_state_(torch.nn.LayerNorm(4), state)


def test_method_settings_are_validated():
    with pytest.raises(ConfigError, match="train_mode=dense"):
        RunConfig(method="trp", train_mode="svd")
    with pytest.raises(ConfigError, match="prune_flops"):
        RunConfig(method="filter_pruning", prune_flops=0.0)
    with pytest.raises(ConfigError, match="allowed: svd, truncated_svd, trp, filter_pruning"):
        RunConfig(method="magic")


def load_pareto():
    path = Path(__file__).parents[1] / "benchmarks" / "pareto.py"
    spec = importlib.util.spec_from_file_location("pareto", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pareto_sweep_on_a_tiny_budget(tmp_path):
    pareto = load_pareto()
    data = "fashion_mnist" if Path(FASHION_MNIST_DIR).is_dir() else "synthetic"
    tuning = ["--tune-subset", "256", "--val-subset", "256"] if data == "fashion_mnist" else ["--tune-subset", "-1"]
    result = pareto.main(["--data", data, "--train-subset", "512", "--test-subset", "256", "--dense-epochs", "1",
                          "--compress-epochs", "1", "--finetune-epochs", "1", "--targets", "0.6,0.3", "--seeds", "2",
                          "--max-batches", "2", "--latency-repeats", "2", "--ablation-target", "0.3", *tuning,
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                          "--results", str(tmp_path / "RESULTS.md")])
    saved = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert saved["points"] == json.loads(json.dumps(result["points"]))
    assert {p["method"] for p in saved["points"]} == set(pareto.DEFAULT_METHODS)
    assert len(saved["points"]) == 2 * len(pareto.DEFAULT_METHODS) and len(saved["dense"]["seeds"]) == 2
    recipe_settings = saved["tuning"]["methods"].get(pareto.NEW_RECIPE, {}).get("picked", {})
    if data == "fashion_mnist":  # every method tried four settings on the validation split and kept one
        for name in pareto.DEFAULT_METHODS:
            tried = saved["tuning"]["methods"][name]["tried"]
            assert len(tried) == 4 and saved["tuning"]["methods"][name]["picked"] in [t["settings"] for t in tried]
            first = max(tried[:3], key=lambda t: t["validation_accuracy"])  # the fourth: the best with distillation
            assert tried[3]["settings"] == {**first["settings"], **pareto.DISTILL}
            picked = saved["tuning"]["methods"][name]["picked"]
            assert all(p["settings"] == picked for p in saved["points"] if p["method"] == name)
    ablation = saved["ablation"]["points"]
    distilled = bool(recipe_settings.get("distill"))  # the recipe as tuned; distillation has its own row when it is in it
    assert [a["ablation"] for a in ablation][0] == "the recipe as tuned" and len(ablation) == 4 + distilled
    assert ("no distillation" in [a["ablation"] for a in ablation]) == distilled
    assert all(a["knob_value"] == 0.3 for a in ablation)
    # a setting that acts after the compress phase shares it, and still reaches the point's own config
    recipe, no_bn, one_cut = ablation[0], ablation[1 + distilled], ablation[2 + distilled]
    assert no_bn["compress_phase"] == recipe["compress_phase"] != one_cut["compress_phase"]
    no_bn_config = json.loads((Path(no_bn["folder"]) / "config.json").read_text())
    assert no_bn_config["bn_recalibrate"] == 0 and no_bn["accuracy_after_prune_before_bn_recalibration"] is None
    for p in saved["points"]:
        config = json.loads((Path(p["folder"]) / "config.json").read_text())
        assert config["finetune_lr"] == p["settings"].get("finetune_lr", RunConfig().finetune_lr)
        assert config["distill"] == p["settings"].get("distill", 0.0)
        assert config["bn_recalibrate"] == pareto.HELP["bn_recalibrate"]
        assert p["accuracy_after_prune"] is not None
        # every method gets the same help: batch-norm recalibration right after its cut
        assert p["accuracy_after_prune_before_bn_recalibration"] is not None
        assert 0 <= p["accuracy"] <= 100 and p["epochs"] == 2
        assert 0 < p["flops"] < saved["dense"]["flops"] and 0 < p["conv_flops"] < saved["dense"]["conv_flops"]
        assert p["flops"] <= p["knob_value"] * saved["dense"]["flops"] * 1.001
        assert p["latency_b1_ms"] > 0 and p["latency_b32_ms"] > 0 and p["params"] > 0
        assert p["wall_s"] > 0 and p["seed"] == 0
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- pareto:start -->" in text and "Bars (the new recipe" in text and "python benchmarks/pareto.py" in text
    assert "Ablation of `svd_gradual`" in text


def test_interpolation_along_a_curve():
    pareto = load_pareto()
    points = [{"conv_flops_reduction": 2.0, "accuracy": 90.0}, {"conv_flops_reduction": 8.0, "accuracy": 80.0}]
    assert pareto.interpolate(points, 4.0) == pytest.approx(85.0)  # halfway in log scale
    assert pareto.interpolate(points, 1.5) is None and pareto.interpolate(points, 9) is None

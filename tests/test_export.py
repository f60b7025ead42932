import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SmallNet, rel_err
from svdtrain import SVDConfig, count_flops, decompose_, export, prune_

X = torch.randn(2, 3, 16, 16)


def pruned_net(decomposition, energy):
    torch.manual_seed(0)
    model = SmallNet().eval()
    decompose_(model, SVDConfig(decomposition=decomposition))
    if energy:
        prune_(model, energy=energy)
    return model


def svdtrain_modules(model):
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("svdtrain")]


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("energy", [0, 0.3])  # full rank: dense layers; pruned: mostly thin pairs
def test_export_is_equivalent_and_plain(decomposition, energy):
    model = pruned_net(decomposition, energy)
    small = export(model, X)
    assert svdtrain_modules(small) == []
    assert small is not model and svdtrain_modules(model) != []
    with torch.no_grad():
        assert rel_err(small(X), model(X)) <= 1e-5
    pairs = [m for m in small.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and all(isinstance(c, (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)) for c in m)]
    assert (len(pairs) > 0) == (energy > 0)


def test_export_picks_the_form_with_fewer_flops():
    model = pruned_net("channel", 0.3)
    small = export(model, X)
    all_dense = export(model, X)
    for name, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "to_dense")]:
        parent, _, child = name.rpartition(".")
        setattr(all_dense.get_submodule(parent) if parent else all_dense, child, layer.to_dense())
    assert count_flops(small, X) < count_flops(all_dense, X)


def test_state_dict_round_trips_with_weights_only():
    small = export(pruned_net("spatial", 0.3), X)
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = export(pruned_net("spatial", 0.3), X)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(X), small(X))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    small = export(pruned_net("channel", 0.3), X).eval()
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (X,), str(path), dynamo=True, external_data=False)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        expected = small(X).numpy()
    assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()


def test_layer_whose_weight_a_parent_reads_stays_dense():
    torch.manual_seed(1)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    decompose_(model, SVDConfig(exclude_modules=("self_attn",)))  # packed attention: the layer's fast path runs
    prune_(model, energy=0.5)  # thin pairs would be cheaper, but the parent reads linear1.weight
    x = torch.randn(2, 5, 16)
    small = export(model, x)
    assert type(small[0].linear1) is nn.Linear and type(small[0].linear2) is nn.Linear
    with torch.inference_mode():
        assert rel_err(small(x), model(x)) <= 1e-5


def test_layer_never_run_is_exported_by_parameter_count():
    model = nn.ModuleDict({"used": nn.Linear(64, 64), "unused": nn.Linear(64, 64)})
    decompose_(model)
    prune_(model, energy=0.5)
    small = export(model, None)
    assert isinstance(small["unused"], nn.Sequential)  # 2·64·r < 64·64 for the pruned rank


def test_export_of_a_bare_svd_layer():
    from svdtrain import SVDLinear

    layer = SVDLinear.from_dense(nn.Linear(32, 32))
    layer.truncate_(4)
    x = torch.randn(3, 32)
    small = export(layer, x)
    assert isinstance(small, nn.Sequential) and rel_err(small(x), layer(x)) <= 1e-5

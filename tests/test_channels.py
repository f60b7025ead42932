"""Channels in SVD form: groups coupled through residual additions, their removal, prune_(channels=True), the
channel regularizer, checkpoints and the export at the new widths."""

import copy
import io
import json

import pytest
import torch
from torch import nn

import svdtrain
from svdtrain.channels import channel_norms, remove_channels_, resize_to_state_
from svdtrain.recipes.models import CifarResNet

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def resnet(decomposition: str = "spatial", seed: int = 0) -> nn.Module:
    """A ResNet-8 in SVD form with batch-norm statistics and affines far from their defaults (eval mode)."""
    torch.manual_seed(seed)
    model = CifarResNet(8, 10, 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    svdtrain.decompose_(model, svdtrain.SVDConfig(decomposition=decomposition))
    return model.eval()


def groups_by_name(model: nn.Module) -> dict:
    return {g.name: g for g in svdtrain.channel_groups(model, X)}


def test_resnet_groups_couple_every_layer_a_residual_addition_joins():
    groups = groups_by_name(resnet())
    # The stem and every block's second conv of a stage write one space (identity shortcuts add them); the next
    # stage's first conv and projection shortcut read it.
    stage1 = groups["conv1.out"]
    assert stage1.producers == ["conv1", "layer1.0.conv2"]
    assert stage1.per_channel == ["bn1", "layer1.0.bn2"]
    assert [name for name, _ in stage1.consumers] == ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"]
    assert groups["layer1.0.conv1.out"].producers == ["layer1.0.conv1"]
    assert groups["layer1.0.conv1.out"].consumers == [("layer1.0.conv2", 1)]
    # The last stage feeds the classifier through the mean pool: its columns are the channels.
    last = groups["layer3.0.conv2.out"]
    assert ("fc", 1) in last.consumers and last.removable
    assert groups["fc.out"].why_kept == "the model's output"
    assert sum(g.removable for g in groups.values()) == 6


@pytest.mark.parametrize("decomposition", ["spatial", "channel"])
def test_removing_zero_channels_across_residual_blocks_keeps_the_function(decomposition):
    model = resnet(decomposition)
    removed = {}
    with torch.no_grad():
        for group in svdtrain.channel_groups(model, X):
            if group.removable:
                drop = torch.randperm(group.channels, generator=torch.Generator().manual_seed(1))[:group.channels // 2]
                for name in group.per_channel:  # the channel leaves each batch norm as 0, so every reader sees 0
                    model.get_submodule(name).weight[drop] = 0
                    model.get_submodule(name).bias[drop] = 0
                removed[group.name] = drop
        before = model(X)
        for group in svdtrain.channel_groups(model, X):
            if group.name in removed:
                keep = torch.tensor(sorted(set(range(group.channels)) - set(removed[group.name].tolist())))
                remove_channels_(model, group, keep)
        after = model(X)
    assert (after - before).abs().max() <= 1e-5
    assert model.layer1[0].conv1.in_channels == 8 and model.layer2[0].conv2.out_channels == 16
    # U, V orthonormal again, and s the singular values of each layer's W (re-factored after the rows went).
    assert svdtrain.orthogonality_loss(model) <= 1e-10
    assert svdtrain.summary(model, X).rows[1]["channels"] == "in 8/16, out 8/16"


def test_prune_to_flops_with_channels_meets_the_budget_and_exports_at_the_new_widths():
    model = resnet()
    dense_flops = svdtrain.count_flops(svdtrain.export(model, X[:1]), X[:1])
    report = svdtrain.prune_(model, flops=0.3, example_inputs=X[:1], channels=True)
    small = svdtrain.export(model, X[:1])
    flops = svdtrain.count_flops(small, X[:1])
    assert 0.98 * 0.3 <= flops / dense_flops <= 0.3 and report.flops_after == flops
    assert report.dense_flops == dense_flops
    rows = {row["name"]: row for row in report.channels}
    assert any(row["channels_after"] < row["channels_before"] for row in rows.values()) and report.cut
    assert rows["fc.out"]["channels_after"] == 10 and rows["fc.out"]["why_kept"]
    assert "channels_before" in str(report)
    # The export is plain layers of the new widths, and ONNX Runtime runs it to the same outputs.
    assert small.layer1[0].bn1.num_features == model.layer1[0].bn1.num_features
    assert not any(isinstance(m, svdtrain.SVDConv) for m in small.modules())
    assert (small(X) - model(X)).abs().max() <= 1e-5
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    torch.onnx.export(small, (X[:1],), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: X[:1].numpy()})[0]
    assert abs(out - small(X[:1]).detach().numpy()).max() <= 1e-5
    # Deployed without pickled code: the layout (JSON) and the state_dict rebuild it at those widths.
    layout = json.loads(json.dumps(svdtrain.export_layout(model, X[:1])))
    fresh = svdtrain.rebuild(CifarResNet(8, 10, 1), layout, small.state_dict())
    fresh.load_state_dict(small.state_dict())
    assert (fresh.eval()(X) - small(X)).abs().max() <= 1e-6


def test_a_pruned_checkpoint_loads_into_a_freshly_decomposed_model():
    model = resnet()
    svdtrain.prune_(model, flops=0.4, example_inputs=X[:1], channels=True)
    fresh = CifarResNet(8, 10, 1)
    svdtrain.decompose_(fresh, svdtrain.SVDConfig(decomposition="spatial"))
    resize_to_state_(fresh, model.state_dict())  # the plain layers (batch norms); SVD layers adopt their widths
    fresh.load_state_dict(model.state_dict())
    assert (fresh.eval()(X) - model(X)).abs().max() <= 1e-6


def test_the_energy_knob_removes_what_holds_nothing_and_a_budget_with_channels_is_checked():
    model = resnet()
    group = groups_by_name(model)["layer1.0.conv1.out"]
    with torch.no_grad():  # channel 3 of the block's inner space: zero in every layer it spans (kw rows of U each)
        model.layer1[0].conv1.U[3 * 3:4 * 3] = 0
        model.layer1[0].bn1.weight[3] = model.layer1[0].bn1.bias[3] = 0
        model.layer1[0].conv2.V[3 * 3:4 * 3] = 0
    assert channel_norms(model, group)[3] <= 1e-6
    before = model(X)
    report = svdtrain.prune_(model, energy=1e-9, example_inputs=X[:1], channels=True)
    kept = {row["name"]: row["channels_after"] for row in report.channels}
    assert kept["layer1.0.conv1.out"] == 15 and kept["conv1.out"] == 16
    assert (model(X) - before).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="needs example_inputs"):
        svdtrain.prune_(model, flops=0.5, channels=True)
    with pytest.raises(ValueError, match="impossible with channels"):
        svdtrain.prune_(model, flops=1e-6, example_inputs=X[:1], channels=True)


class Mixed(nn.Module):
    """Depthwise, grouped and attention layers around convolutions."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        x = self.bn2(self.dw(x)).relu()
        x = self.grouped(self.pw(x))
        t = x.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


def test_depthwise_grouped_and_attention_layers_are_cut_where_safe_and_listed_where_not():
    torch.manual_seed(0)
    model = Mixed()
    svdtrain.decompose_(model, svdtrain.SVDConfig())  # the attention is split: its projections are SVD layers
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in svdtrain.channel_groups(model.eval(), x)}
    assert groups["stem.out"].removable and groups["stem.out"].per_channel == ["bn", "dw", "bn2"]
    assert groups["pw.out"].why_kept == "used by grouped (SVDConv, groups=4)"
    assert groups["grouped.out"].why_kept == "written by grouped (SVDConv, groups=4)"
    assert sum(g.removable for g in groups.values()) == 1
    with torch.no_grad():  # two of the stem's channels carry nothing
        model.bn.weight[:2] = model.bn.bias[:2] = 0
        model.stem.U[:2] = 0
        model.dw.weight[:2] = 0
        model.bn2.weight[:2] = model.bn2.bias[:2] = 0
        model.pw.V[:2] = 0
    before = model(x)
    report = svdtrain.prune_(model, energy=1e-9, example_inputs=x, channels=True)
    assert {row["name"]: row["channels_after"] for row in report.channels}["stem.out"] == 6
    assert model.dw.groups == model.dw.in_channels == 6 and model.bn2.num_features == 6
    assert (model(x) - before).abs().max() <= 1e-5


def test_a_model_torch_fx_cannot_trace_is_refused_with_what_to_do():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)

    model = Branchy()
    svdtrain.decompose_(model, svdtrain.SVDConfig())
    with pytest.raises(ValueError, match="torch.fx.*channels=False"):
        svdtrain.prune_(model, energy=0.1, example_inputs=X, channels=True)


def test_channel_sparsity_loss_is_the_hoyer_measure_of_each_groups_channel_norms():
    model = resnet()
    groups = [g for g in svdtrain.channel_groups(model, X) if g.removable]
    norms = [channel_norms(model, g) for g in groups]
    expected = sum(float(n.sum() / n.norm()) for n in norms)
    assert float(svdtrain.channel_sparsity_loss(model, groups)) == pytest.approx(expected, rel=1e-6)
    l1 = sum(float(n.mean()) for n in norms)
    assert float(svdtrain.channel_sparsity_loss(model, groups, "l1")) == pytest.approx(l1, rel=1e-6)
    # One channel left holding anything: its group's Hoyer measure is 1, its least.
    one = copy.deepcopy(model)
    group = next(g for g in groups if g.name == "layer1.0.conv1.out")
    with torch.no_grad():
        one.layer1[0].conv1.U[3:] = 0
        one.layer1[0].bn1.weight[1:] = one.layer1[0].bn1.bias[1:] = 0
        one.layer1[0].conv2.V[3:] = 0
    assert float(svdtrain.channel_sparsity_loss(one, [group])) == pytest.approx(1.0, abs=1e-4)
    # Uniform norms: √(channels), its most; and it trains: gradients reach the factors and batch norms.
    loss = svdtrain.channel_sparsity_loss(model.train(), groups)
    loss.backward()
    assert model.layer1[0].conv1.U.grad.abs().sum() > 0 and model.layer1[0].bn1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kind="):
        svdtrain.channel_sparsity_loss(model, groups, "l2")


def test_a_latency_budget_with_channels_is_met_as_measured_on_whole_candidates():
    model = resnet()
    reference = svdtrain.export(copy.deepcopy(model), X[:1])  # the dense model (SVD layers at full rank: exact)
    report = svdtrain.prune_(model, latency=0.6, example_inputs=X[:1], backend="eager", channels=True,
                             reference=reference)
    assert report.cut and report.latency_after_ms <= 0.6 * report.dense_latency_ms
    assert report.latency_anchor is None and "measured" in str(report)
    # A second cut toward the same budget, measured against the same dense model, finds it met: nothing goes.
    again = svdtrain.prune_(model, latency=0.9, example_inputs=X[:1], backend="eager", channels=True,
                            reference=reference)
    assert not again.cut


def test_a_view_into_a_linear_makes_each_channel_a_block_of_its_columns():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.conv(x).relu().view(x.size(0), -1))

    torch.manual_seed(0)
    model = Flat()
    svdtrain.decompose_(model, svdtrain.SVDConfig())
    x = torch.randn(2, 1, 8, 8)
    (group, _) = svdtrain.channel_groups(model, x)
    assert group.removable and group.consumers == [("fc", 36)]
    with torch.no_grad():  # channel 1: its filter and its 36 columns of the Linear
        model.conv.U[1] = model.conv.bias[1] = 0
        model.fc.V[36:72] = 0
    before = model(x)
    svdtrain.prune_(model, energy=1e-9, example_inputs=x, channels=True)
    assert model.fc.in_features == 3 * 36 and model.conv.out_channels == 3
    assert (model(x) - before).abs().max() <= 1e-5

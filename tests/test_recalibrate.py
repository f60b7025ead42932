import pytest
import torch
from torch import nn

from conftest import SmallNet
from svdtrain import SVDConfig, decompose_, prune_, recalibrate_bn

X = torch.randn(1, 3, 16, 16)


def batches(n=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=generator) * 2 + 1 for _ in range(n)]


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_running_statistics_are_the_average_over_the_batches():
    model = bn_model().eval()
    data = batches()
    assert recalibrate_bn(model, data) == 2
    with torch.no_grad():
        out = torch.stack([model[0](x) for x in data])  # (batches, N, C, H, W): what the first BN sees
    per_batch = out.transpose(1, 2).flatten(2)  # (batches, C, N·H·W)
    torch.testing.assert_close(model[1].running_mean, per_batch.mean(-1).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, per_batch.var(-1, unbiased=True).mean(0), rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == len(data)


def test_only_batch_norm_buffers_change_and_modes_and_momenta_are_restored():
    model = SmallNet()
    decompose_(model, SVDConfig())
    prune_(model, energy=0.3)
    model.train()
    model.stem.eval()  # a mixed set of modes must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns, "SmallNet has batch norm"
    for bn in bns:
        bn.momentum = 0.3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, batches())
    after = model.state_dict()
    bn_buffers = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    for key in before:
        if key in bn_buffers:
            continue
        assert torch.equal(before[key], after[key]), key  # weights, factors, energy_kept: untouched
    assert any(not torch.equal(before[k], after[k]) for k in bn_buffers if "running_mean" in k)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(bn.momentum == 0.3 for bn in bns)


def test_dropout_is_off_while_measuring():
    """Statistics are those of the inference network: with dropout on, the second BN would see other inputs."""
    model = bn_model().train()
    recalibrate_bn(model, batches())
    first = model[5].running_var.clone()
    recalibrate_bn(model, batches())
    torch.testing.assert_close(model[5].running_var, first, rtol=0, atol=0)  # no random dropout masks involved


def test_recalibration_repairs_a_pruned_network():
    """A cut changes the activations BN normalises: its old statistics are wrong, the re-estimated ones fit."""
    torch.manual_seed(0)
    model = bn_model()
    data = batches(8, 64)
    recalibrate_bn(model, data)  # the dense network's own statistics
    decompose_(model, SVDConfig())
    prune_(model, energy=0.5)
    stale = model[5].running_mean.clone()
    recalibrate_bn(model, data)
    with torch.no_grad():
        seen = torch.cat([model[:5].eval()(x) for x in data]).mean((0, 2, 3))
    torch.testing.assert_close(model[5].running_mean, seen, rtol=1e-4, atol=1e-5)
    assert (stale - seen).abs().max() > 10 * (model[5].running_mean - seen).abs().max()


def test_empty_batches_are_refused_and_change_nothing():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="yielded nothing"):
        recalibrate_bn(model, iter([]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_batch_norm_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 3))
    assert recalibrate_bn(model, [torch.randn(2, 4)]) == 0


def test_keyword_and_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a, b=0):
            return self.bn(a + b)

    model = TwoInputs()
    recalibrate_bn(model, [(torch.ones(4, 3), torch.ones(4, 3))])
    torch.testing.assert_close(model.bn.running_mean, torch.full((3,), 2.0))
    recalibrate_bn(model, [{"a": torch.zeros(4, 3), "b": torch.full((4, 3), 3.0)}])
    torch.testing.assert_close(model.bn.running_mean, torch.full((3,), 3.0))

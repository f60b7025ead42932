import pytest
import torch
from torch import nn

from conftest import SmallNet
from svdtrain import SVDConfig, decompose_, orthogonality_loss, sparsity_loss
from svdtrain.layers import svd_layers


def perturbed_net(dtype=torch.float64):
    torch.manual_seed(0)
    model = SmallNet().to(dtype)
    decompose_(model, SVDConfig(decomposition="spatial"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def groups_of(t, dims):
    """The per-group matrices (or vectors) of a factor, as a list."""
    return list(t.reshape(-1, *t.shape[-dims:]))


def test_orthogonality_loss_matches_the_formula():
    model = perturbed_net()
    expected = 0.0
    for _, layer in svd_layers(model):
        for U, V in zip(groups_of(layer.U, 2), groups_of(layer.V, 2)):
            r = U.shape[1]
            eye = torch.eye(r, dtype=U.dtype)
            expected += (torch.linalg.matrix_norm(U.T @ U - eye) ** 2 + torch.linalg.matrix_norm(V.T @ V - eye) ** 2) / r**2
    assert torch.allclose(orthogonality_loss(model), expected, rtol=1e-10)
    assert orthogonality_loss(model) > 1e-3


def test_orthogonality_loss_is_zero_for_svd_factors():
    torch.manual_seed(0)
    model = SmallNet().double()
    decompose_(model, SVDConfig(decomposition="spatial"))
    assert orthogonality_loss(model).item() < 1e-20


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity_loss_matches_the_formula(kind):
    model = perturbed_net()
    expected = 0.0
    for _, layer in svd_layers(model):
        for s in groups_of(layer.s, 1):
            l1, l2 = s.abs().sum(), s.norm()
            expected += {"l1": l1, "hoyer": l1 / l2, "hoyer_square": (l1 / l2) ** 2}[kind]
    assert torch.allclose(sparsity_loss(model, kind), expected, rtol=1e-10)


def test_hoyer_is_scale_invariant_and_l1_is_not():
    model = perturbed_net()
    hoyer, l1 = sparsity_loss(model, "hoyer"), sparsity_loss(model, "l1")
    with torch.no_grad():
        for _, layer in svd_layers(model):
            layer.s.mul_(3.0)
    assert torch.allclose(sparsity_loss(model, "hoyer"), hoyer, rtol=1e-12)
    assert torch.allclose(sparsity_loss(model, "l1"), 3 * l1, rtol=1e-12)


def test_hoyer_with_all_zero_singular_values_is_finite():
    model = perturbed_net()
    with torch.no_grad():
        for _, layer in svd_layers(model):
            layer.s.zero_()
    assert torch.isfinite(sparsity_loss(model, "hoyer"))


def test_regularizers_have_gradients_on_every_factor():
    model = perturbed_net(torch.float32)
    (orthogonality_loss(model) + sparsity_loss(model, "hoyer")).backward()
    for _, layer in svd_layers(model):
        assert layer.U.grad.abs().sum() > 0 and layer.V.grad.abs().sum() > 0 and layer.s.grad.abs().sum() > 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="allowed: l1, hoyer, hoyer_square"):
        sparsity_loss(perturbed_net(), "l2")
    with pytest.raises(ValueError, match="decompose_"):
        orthogonality_loss(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_a_grouped_layer_is_regularised_per_group_like_an_ungrouped_one(decomposition):
    """Each group of a grouped conv gets exactly the orthogonality term, and gradient, of an ungrouped conv holding
    that group's factors: the regularizer reaches grouped layers as it reaches any other."""
    torch.manual_seed(0)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False).double()
    model = nn.Sequential(grouped)
    decompose_(model, SVDConfig(decomposition=decomposition))
    layer = model[0]
    with torch.no_grad():
        for p in (layer.U, layer.V):
            p.add_(0.1 * torch.randn_like(p))
    alone = []
    for g in range(2):
        single = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False).double())
        decompose_(single, SVDConfig(decomposition=decomposition))
        with torch.no_grad():
            single[0].U.copy_(layer.U[g])
            single[0].V.copy_(layer.V[g])
        alone.append(single)
    total = orthogonality_loss(model)
    parts = [orthogonality_loss(single) for single in alone]
    assert total.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-12) and parts[0].item() > 1e-3
    total.backward()
    for g, single in enumerate(alone):
        parts[g].backward()
        assert torch.allclose(layer.U.grad[g], single[0].U.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(layer.V.grad[g], single[0].V.grad, rtol=1e-10, atol=1e-14)

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import rel_err
from svdtrain import SVDConv, SVDLinear, orthogonality_loss

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(2, 4))  # ≥ 2 per group: depthwise is not decomposed
    out_channels = groups * draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * dims if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    decomposition = draw(st.sampled_from(["channel", "spatial"])) if dims == 2 else "channel"
    size = tuple(draw(st.integers(5, 8)) for _ in range(dims))
    return dict(dims=dims, groups=groups, in_channels=in_channels, out_channels=out_channels, kernel=kernel,
                dilation=dilation, padding=padding, stride=stride, mode=mode, decomposition=decomposition,
                bias=draw(st.booleans()), size=size, batch=draw(st.integers(1, 3)))


@settings(max_examples=120, deadline=None)
@given(conv_cases(), st.integers(0, 2**31 - 1))
def test_conv_from_dense_is_exact_on_both_paths(case, seed):
    torch.manual_seed(seed)
    conv = CONVS[case["dims"]](case["in_channels"], case["out_channels"], case["kernel"], case["stride"],
                               case["padding"], case["dilation"], case["groups"], case["bias"], case["mode"])
    layer = SVDConv.from_dense(conv, decomposition=case["decomposition"])
    x = torch.randn(case["batch"], case["in_channels"], *case["size"])
    expected = conv(x)
    for thin in (False, True):  # force each forward path
        layer._thin_is_cheaper = lambda shape: thin
        assert rel_err(layer(x), expected) <= 1e-5
    assert rel_err(layer.weight, conv.weight) <= 1e-5
    with torch.no_grad():
        assert rel_err(layer.to_dense()(x), expected) <= 1e-5
        assert rel_err(layer.to_thin_pair()(x), expected) <= 1e-5


def test_conv_attributes_match_the_dense_layer():
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4, padding_mode="reflect")
    layer = SVDConv.from_dense(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert layer.U.shape == (4, 3, 3) and layer.s.shape == (4, 3) and layer.V.shape == (4, 30, 3)
    assert isinstance(layer.U, nn.Parameter) and isinstance(layer.s, nn.Parameter)


def test_spatial_factor_shapes_and_rank():
    layer = SVDConv.from_dense(nn.Conv2d(16, 32, 3, padding=1), decomposition="spatial")
    assert (layer.rank, layer.full_rank) == (48, 48)  # min(32·3, 16·3)
    pair = layer.to_thin_pair()
    assert pair[0].kernel_size == (3, 1) and pair[1].kernel_size == (1, 3)


def test_unbatched_conv_input():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = SVDConv.from_dense(conv)
    x = torch.randn(3, 9, 9)
    assert rel_err(layer(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("shape", [(7, 20), (2, 5, 20), (20,)])
def test_linear_from_dense_is_exact(shape):
    torch.manual_seed(1)
    lin = nn.Linear(20, 9)
    layer = SVDLinear.from_dense(lin)
    x = torch.randn(*shape)
    assert rel_err(layer(x), lin(x)) <= 1e-5
    assert rel_err(layer.weight, lin.weight) <= 1e-5
    assert (layer.in_features, layer.out_features) == (20, 9)
    with torch.no_grad():
        assert rel_err(layer.to_thin_pair()(x), lin(x)) <= 1e-5


def test_both_forward_paths_are_taken_and_agree():
    torch.manual_seed(2)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    layer = SVDConv.from_dense(conv)
    x = torch.randn(2, 32, 16, 16)
    assert not layer._thin_is_cheaper(x.shape)  # full rank: rebuild W, one conv
    layer.truncate_(4)
    assert layer._thin_is_cheaper(x.shape)  # rank 4: two thin convs
    with torch.no_grad():
        assert rel_err(layer(x), layer.to_dense()(x)) <= 1e-5
        assert rel_err(layer.to_thin_pair()(x), layer.to_dense()(x)) <= 1e-5


def test_random_init_is_orthonormal_and_scaled_like_pytorch():
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 32, 3)
    layer = SVDConv.from_dense(conv, init="random")
    assert orthogonality_loss(nn.Sequential(layer)).item() < 1e-8
    assert rel_err(layer.weight, conv.weight) > 0.5  # not the dense weights
    # Same scale as PyTorch's default init: Frobenius norms within 20 %.
    assert math.isclose(layer.weight.norm().item(), conv.weight.norm().item(), rel_tol=0.2)


def test_truncated_init_keeps_the_largest_singular_values():
    torch.manual_seed(4)
    lin = nn.Linear(30, 20)
    layer = SVDLinear.from_dense(lin, rank=5)
    s_full = torch.linalg.svdvals(lin.weight.detach().double())
    assert torch.allclose(layer.s.double(), s_full[:5], rtol=1e-5)
    assert math.isclose(float(layer.energy_kept), float(s_full[:5].square().sum() / s_full.square().sum()),
                        rel_tol=1e-5)


def _functional(layer, x):
    params = dict(layer.named_parameters())
    names = list(params)

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    return f, (x, *params.values())


@pytest.mark.parametrize("rank", [None, 2])  # full rank: rebuild path; rank 2: thin path
@pytest.mark.parametrize("kind", ["linear", "channel", "spatial", "grouped"])
def test_gradcheck_float64(kind, rank):
    torch.manual_seed(5)
    if kind == "linear":
        layer, x = SVDLinear.from_dense(nn.Linear(6, 5).double(), rank=rank), torch.randn(3, 6, dtype=torch.float64)
    else:
        groups = 2 if kind == "grouped" else 1
        conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
        layer = SVDConv.from_dense(conv, decomposition="spatial" if kind == "spatial" else "channel", rank=rank)
        x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    f, inputs = _functional(layer, x)
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_gradients_reach_u_s_v():
    layer = SVDConv.from_dense(nn.Conv2d(4, 6, 3))
    layer(torch.randn(2, 4, 7, 7)).square().sum().backward()
    for name in ("U", "s", "V", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pruned_state_dict_loads_into_a_fresh_decomposed_layer():
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 8, 3)
    pruned = SVDConv.from_dense(conv)
    pruned.truncate_(3)
    fresh = SVDConv.from_dense(conv)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.rank == 3
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(fresh(x), pruned(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(decomposition="spatial", dims=1), "2-D"),
    (dict(decomposition="tucker"), "allowed"),
    (dict(padding="full"), "allowed"),
    (dict(padding="same", stride=2), "strided"),
    (dict(padding_mode="mirror"), "allowed"),
    (dict(groups=3), "divide"),
    (dict(rank=99), "allowed"),
])
def test_bad_conv_arguments_raise(kwargs, message):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SVDConv(**args)


def test_from_dense_rejects_other_modules():
    with pytest.raises(TypeError):
        SVDConv.from_dense(nn.Linear(3, 3))
    with pytest.raises(TypeError):
        SVDLinear.from_dense(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="init"):
        SVDLinear.from_dense(nn.Linear(3, 3), init="zeros")


@pytest.mark.slow
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_torch_compile_gives_the_same_numbers(decomposition):
    """torch.compile (default inductor backend) on a decomposed model, before and after pruning changes the ranks."""
    import svdtrain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    svdtrain.decompose_(model, svdtrain.SVDConfig(decomposition=decomposition))
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):  # full rank (W rebuilt), then pruned (thin pairs where they are cheaper)
        outputs, grads = [], []
        for forward in (model, compiled):
            model.zero_grad()
            out = forward(x)
            (out.square().mean() + orthogonality_loss(model)).backward()
            outputs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert rel_err(outputs[1], outputs[0]) < 1e-5
        assert rel_err(grads[1], grads[0]) < 1e-4
        svdtrain.prune_(model, energy=0.3)

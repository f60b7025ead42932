"""Attention layers: nn.MultiheadAttention split into its projections, each in SVD form, pruned and exported."""

import itertools
import json

import pytest
import torch
from torch import nn

from conftest import onnx_runtime_output, rel_err
from svdtrain import (SVDConfig, SVDLinear, SplitMultiheadAttention, count_flops, decompose_, export, export_layout,
                      prune_, rebuild, summary)

E, HEADS, BATCH, L, S = 16, 4, 3, 5, 7

# Every variant the issue names: packed or separate q/k/v (kdim/vdim), batch_first either way, bias or not.
VARIANTS = [dict(batch_first=bf, bias=bias, kdim=kv[0], vdim=kv[1])
            for bf, bias, kv in itertools.product([True, False], [True, False], [(None, None), (12, 20)])]


class Wrapped(nn.Module):
    """A model holding one attention layer, called with masks the way encoder layers call it."""

    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, **kw)

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None, need_weights=False):
        out, weights = self.attn(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=need_weights)
        return out if weights is None else (out, weights)


def inputs(variant: dict):
    q, k, v = torch.randn(BATCH, L, E), torch.randn(BATCH, S, variant["kdim"] or E), \
        torch.randn(BATCH, S, variant["vdim"] or E)
    if not variant["batch_first"]:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.zeros(BATCH, S, dtype=torch.bool)
    padding[0, -2:] = True
    return q, k, v, padding, torch.randn(BATCH * HEADS, L, S)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_attention_decomposition_is_exact_at_full_rank(variant):
    """Tolerance 1e-5 (relative to the largest output): the factors come from a float64 SVD, rounded to float32."""
    torch.manual_seed(0)
    model = Wrapped(**variant).eval()
    q, k, v, padding, mask = inputs(variant)
    with torch.no_grad():
        expected = [model(q, k, v), model(q, k, v, padding, mask), model(q, k, v, need_weights=True)]
    report = decompose_(model)
    assert isinstance(model.attn, SplitMultiheadAttention)
    assert [r["name"] for r in report.replaced] == [f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert all(isinstance(getattr(model.attn, p), SVDLinear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    with torch.no_grad():
        got = [model(q, k, v), model(q, k, v, padding, mask), model(q, k, v, need_weights=True)]
    assert rel_err(got[0], expected[0]) <= 1e-5
    assert rel_err(got[1], expected[1]) <= 1e-5
    assert rel_err(got[2][0], expected[2][0]) <= 1e-5 and rel_err(got[2][1], expected[2][1]) <= 1e-5
    model.train()
    model(q, k, v).square().sum().backward()
    assert model.attn.q_proj.s.grad is not None and model.attn.k_proj.U.grad is not None


def test_split_attention_is_nn_multihead_attention_unbatched_and_in_training():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.0)
    split = SplitMultiheadAttention.from_dense(mha)
    x = torch.randn(L, E)  # unbatched
    for need_weights, average in ((True, True), (True, False), (False, True)):
        a, b = mha(x, x, x, need_weights=need_weights, average_attn_weights=average), \
            split(x, x, x, need_weights=need_weights, average_attn_weights=average)
        assert rel_err(b[0], a[0]) <= 1e-6
        assert (a[1] is None) == (b[1] is None) and (a[1] is None or rel_err(b[1], a[1]) <= 1e-6)
    back = split.to_dense()
    assert type(back) is nn.MultiheadAttention and rel_err(back(x, x, x)[0], mha(x, x, x)[0]) <= 1e-6
    with pytest.raises(ValueError, match="add_bias_kv"):
        SplitMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS, add_bias_kv=True))


def test_pruning_an_attention_projection_cuts_its_flops_as_counted():
    torch.manual_seed(0)
    model = Wrapped(batch_first=True).eval()
    x = torch.randn(BATCH, L, E)
    dense_flops = count_flops(model, (x, x, x))
    decompose_(model)
    model.attn.q_proj.truncate_(2)
    small = export(model, (x, x, x))
    assert isinstance(small.attn.q_proj, nn.Sequential)  # 2·(16 + 16) < 16·16 multiply-adds per token
    # The query projection goes from E·E to r·(E + E) multiply-adds per token, 2 FLOPs each; nothing else changes.
    tokens = BATCH * L
    assert count_flops(small, (x, x, x)) == dense_flops - 2 * tokens * (E * E - 2 * (E + E))
    with torch.no_grad():
        assert rel_err(small(x, x, x), model(x, x, x)) <= 1e-5


def test_exported_attention_matches_the_pruned_model_and_runs_in_onnx_runtime_and_torch_export():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 4 * E, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(2, L, E)
    decompose_(model)
    prune_(model, energy=0.3)
    small = export(model, x)
    attention = small[0].layers[0].self_attn
    assert isinstance(attention, SplitMultiheadAttention)
    assert any(isinstance(getattr(attention, p), nn.Sequential) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert not any(type(m).__module__.startswith("svdtrain") and not isinstance(m, SplitMultiheadAttention)
                   for m in small.modules())
    with torch.no_grad():
        expected = model(x)
        assert rel_err(small(x), expected) <= 1e-4
    assert (onnx_runtime_output(small, x) - expected).abs().max() <= 1e-4 * expected.abs().max()
    program = torch.export.export(small, (x,))
    assert rel_err(program.module()(x), expected) <= 1e-4


def test_an_attention_whose_projections_all_stay_dense_exports_as_nn_multihead_attention():
    torch.manual_seed(0)
    model = Wrapped(batch_first=True).eval()
    x = torch.randn(BATCH, L, E)
    decompose_(model)  # full rank: every thin pair costs more than its dense layer
    small = export(model, (x, x, x))
    assert type(small.attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert rel_err(small(x, x, x), model(x, x, x)) <= 1e-5


def test_rebuild_from_the_layout_splits_the_fresh_models_attention():
    torch.manual_seed(0)
    make = lambda: nn.TransformerEncoderLayer(E, HEADS, 4 * E, dropout=0.0, batch_first=True)  # noqa: E731
    model = make().eval()
    x = torch.randn(2, L, E)
    decompose_(model)
    model.self_attn.v_proj.truncate_(2)
    small = export(model, x)
    layout = json.loads(json.dumps(export_layout(model, x)))
    fresh = rebuild(make(), layout).eval()
    fresh.load_state_dict(small.state_dict())
    assert isinstance(fresh.self_attn, SplitMultiheadAttention)
    with torch.no_grad():
        assert rel_err(fresh(x), small(x)) <= 1e-6


def test_patterns_match_a_projection_by_its_own_name_or_the_attentions():
    model = nn.TransformerEncoderLayer(E, HEADS, 4 * E, batch_first=True)
    report = decompose_(model, SVDConfig(target_modules=("self_attn",)))
    assert [r["name"] for r in report.replaced] == [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    model = nn.TransformerEncoderLayer(E, HEADS, 4 * E, batch_first=True)
    report = decompose_(model, SVDConfig(exclude_modules=("self_attn.out_proj", "linear1", "linear2")))
    assert [r["name"] for r in report.replaced] == [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert {r["name"]: r["reason"] for r in report.skipped}["self_attn.out_proj"] == "matched by exclude_modules"
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, add_zero_attn=True))
    report = decompose_(model)
    assert report.replaced == [] and {r["reason"] for r in report.skipped} == {"add_zero_attn=True is not supported"}


def test_transformer_encoder_projections_carry_nearly_all_linear_flops_and_export():
    """The bar: ≥ 95 % of the Linear/attention-projection FLOPs in SVD-form layers after decompose_; the export
    matches the pruned model and runs in ONNX Runtime."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 4 * E, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 3), nn.Linear(E, 10))
    x = torch.randn(2, L, E)
    decompose_(model, SVDConfig(exclude_modules=("1",)))
    rows = summary(model, x).rows
    svd_flops = sum(r["flops"] for r in rows if r["rank"] != "dense")
    assert svd_flops >= 0.95 * sum(r["flops"] for r in rows)
    assert {r["name"] for r in rows} >= {f"0.layers.{i}.self_attn.{p}" for i in range(3)
                                         for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    # Pruned and exported: the same function as the pruned model (≤ 1e-4), in ONNX Runtime too.
    model.eval()
    prune_(model, energy=0.3)
    small = export(model, x)
    assert any(isinstance(m, nn.Sequential) and len(m) == 2 for m in small.modules())  # some thin pairs
    with torch.no_grad():
        expected = model(x)
        assert rel_err(small(x), expected) <= 1e-4
    pytest.importorskip("onnxruntime")
    assert (onnx_runtime_output(small, x) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_the_tools_vision_transformer_is_decomposed_pruned_and_exported_to_onnx():
    """The tool's ViT (torchvision's block layout: ln_1, self_attention, ln_2, mlp): ≥ 95 % of its
    Linear/projection FLOPs in SVD form, the export within 1e-4 of the pruned model, in ONNX Runtime too."""
    pytest.importorskip("onnxruntime")
    from svdtrain.recipes.models import ViT

    torch.manual_seed(0)
    model = ViT(10, 1, 28, width=32, depth=2, heads=4, mlp_width=64).eval()
    x = torch.randn(2, 1, 28, 28)
    decompose_(model, SVDConfig(exclude_modules=("head",)))
    rows = summary(model, x).rows
    assert sum(r["flops"] for r in rows if r["rank"] != "dense") >= 0.95 * sum(r["flops"] for r in rows)
    prune_(model, energy=0.3)
    small = export(model, x)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(small(x), expected) <= 1e-4
    assert (onnx_runtime_output(small, x) - expected).abs().max() <= 1e-4 * expected.abs().max()

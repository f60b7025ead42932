"""Hugging Face BERT and GPT-2 (small random configs, nothing downloaded): decomposed, pruned, exported, in ONNX."""

import pytest
import torch
from torch import nn

from conftest import onnx_runtime_output, rel_err
from svdtrain import decompose_, export, prune_, summary

transformers = pytest.importorskip("transformers")


class Logits(nn.Module):
    """The model's `.logits` alone: what ONNX export and the tool take from a Hugging Face output object."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(config)


@pytest.mark.parametrize("make", [bert, gpt2])
def test_hugging_face_transformers_are_decomposed_pruned_and_exported(make):
    torch.manual_seed(0)
    model = Logits(make()).eval()
    ids = torch.randint(2, 100, (2, 7))
    with torch.no_grad():
        expected = model(ids)
    report = decompose_(model)
    assert report.skipped == []
    rows = summary(model, ids).rows
    # The bar: ≥ 95 % of the Linear / attention-projection FLOPs in SVD-form layers (here all of them).
    assert sum(r["flops"] for r in rows if r["rank"] != "dense") >= 0.95 * sum(r["flops"] for r in rows)
    with torch.no_grad():
        assert rel_err(model(ids), expected) <= 1e-5  # full rank: the same function
    prune_(model, energy=0.3)
    small = export(model, ids)
    assert any(isinstance(m, nn.Sequential) and len(m) == 2 for m in small.modules())  # some thin pairs
    with torch.no_grad():
        pruned = model(ids)
        assert rel_err(small(ids), pruned) <= 1e-4
    assert (onnx_runtime_output(small, ids, "input_ids") - pruned).abs().max() <= 1e-4 * pruned.abs().max()

"""export: a new model of plain torch.nn layers, loadable without svdtrain."""

from __future__ import annotations

import copy

from torch import nn

from .decompose import swap_modules
from .layers import SVD_LAYERS, SVDLinear
from .stats import trace_svd_layers


def export(model: nn.Module, example_inputs) -> nn.Module:
    """A new model in which every SVD layer is a plain dense layer or a pair of thin plain layers.

    Per layer the form with fewer FLOPs at `example_inputs` is kept (channel-wise:
    k×k conv to r channels then 1×1 conv; spatial-wise: kh×1 then 1×kw conv;
    Linear: two Linears); s is folded into the first factor. A layer whose
    `.weight` is read by a parent outside the layer's own forward stays one dense
    layer, so the parent still finds its weight. `model` is not changed.

    Args:
        model: a model holding SVD layers (others are copied as they are).
        example_inputs: inputs at the deployment shape (tensor, tuple or dict), or
            None to choose by parameter count.

    Example:
        >>> small = export(model, torch.randn(1, 3, 32, 32))
        >>> torch.save(small.state_dict(), "small.pt")
    """
    trace = trace_svd_layers(model, example_inputs) if example_inputs is not None else None
    new = copy.deepcopy(model)

    def replace(module: nn.Module, fqn: str) -> nn.Module | None:
        if not isinstance(module, SVD_LAYERS):
            return None
        if trace is None:
            return module.to_plain()
        if fqn in trace.weight_read:
            if isinstance(module, SVDLinear) and module.transposed_weight:
                raise ValueError(f"{fqn}: a parent reads the weight of this GPT-2 Conv1D layer directly; export "
                                 "would have to rebuild a Conv1D, which needs transformers: exclude it from decompose_")
            return module.to_dense()
        return module.to_plain(trace.input_shapes.get(fqn))

    return swap_modules(new, replace)

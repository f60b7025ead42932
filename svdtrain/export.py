"""export: a new model of plain torch.nn layers, loadable without svdtrain; its layout, to rebuild it."""

from __future__ import annotations

import torch
from torch import nn

from .attention import PROJECTIONS, SplitMultiheadAttention
from .channels import resize_to_state_
from .decompose import swap_modules
from .forms import default_multiple, dense_copy, latency_grid, truncated, with_forms
from .latency import BACKENDS, check_backend, paired_timing, runner, time_forms
from .layers import SVDConv, SVDLinear, is_gpt2_conv1d, svd_layers
from .stats import trace_svd_layers

STRATEGIES = ("flops", "latency")
TIE = 1.03  # forms or models within 3 % of each other's time are a tie on a shared machine


def export_layout(model: nn.Module, example_inputs, strategy: str = "flops", backend: str = "eager") -> dict:
    """The form `export` gives each SVD layer: {name: {"form": "dense" | "thin", "rank", "decomposition", "why"}}.

    strategy "flops": the form with fewer FLOPs at example_inputs (by parameters
    when None). "latency": the form measured faster at the layer's input shape on
    `backend` (timings are cached per layer shape, rank, input shape and backend);
    within 3 % of each other, the one with fewer FLOPs.
    A layer whose `.weight` a parent reads outside the layer's forward is always
    dense, so the parent still finds its weight.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if backend not in BACKENDS:  # a misspelt backend is an error whatever the strategy, never silently ignored
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if strategy == "latency":
        if not isinstance(example_inputs, torch.Tensor):
            raise ValueError("export(strategy='latency') needs example_inputs: one input tensor at the deployment "
                             "shape")
        check_backend(backend)
    trace = trace_svd_layers(model, example_inputs) if example_inputs is not None else None
    layout = {}
    for name, layer in svd_layers(model):
        shapes = trace.input_shapes[name] if trace else []
        entry = {"rank": layer.rank, "decomposition": getattr(layer, "decomposition", "channel")}
        if trace and name in trace.weight_read:
            if isinstance(layer, SVDLinear) and layer.transposed_weight:
                raise ValueError(f"{name}: a parent reads the weight of this GPT-2 Conv1D layer directly; export "
                                 "would have to rebuild a Conv1D, which needs transformers: exclude it from decompose_")
            entry.update(form="dense", why="weight read by its parent")
        elif strategy == "latency" and shapes:
            ms = time_forms({"dense": layer.to_dense(), "thin": layer.to_thin_pair()}, shapes[0], backend)
            form = min(ms, key=ms.get)
            if max(ms.values()) <= TIE * min(ms.values()):  # a tie within timing noise: fewer FLOPs decide
                form = "thin" if layer.exported_thin(shapes) else "dense"
            entry.update(form=form, why=f"{backend}: dense {ms['dense']:.3f} ms, thin {ms['thin']:.3f} ms",
                         dense_ms=ms["dense"], thin_ms=ms["thin"])
            if form == "dense":
                entry["thin_pays_at_rank"] = _rank_that_pays(layer, shapes[0], backend, ms["dense"])
        else:
            entry.update(form="thin" if layer.exported_thin(shapes) else "dense",
                         why="fewer FLOPs" if shapes else "fewer parameters (never ran)")
        layout[name] = entry
    return layout


def _rank_that_pays(layer, input_shape: tuple, backend: str, dense_ms: float) -> int | None:
    """The largest rank below the layer's at which its thin pair is measured clearly faster than its dense form
    (timed at the ranks a latency budget may give it), or None when none is: what a deeper cut of this layer would buy."""
    lower = [r for r in latency_grid(layer.rank, default_multiple(layer.full_rank), True) if r < layer.rank]
    ms = time_forms({r: truncated(layer, r).to_thin_pair() for r in lower}, input_shape, backend)
    return max((r for r, t in ms.items() if t * TIE < dense_ms), default=None)


def export_decisions(model: nn.Module, example_inputs, strategy: str = "flops",
                     backend: str = "eager") -> tuple[nn.Module, dict]:
    """`export`, and what it decided: {"layers": export_layout(...), "whole": None, or for strategy "latency"
    with thin layers {"dense_ms", "thin_ms", "speedup", "speedup_iqr", "kept_thin"}: the whole model timed both
    ways on `backend`, alternately}."""
    layout = export_layout(model, example_inputs, strategy, backend)
    small = with_forms(model, lambda name, layer: layer.to_thin_pair() if layout[name]["form"] == "thin"
                   else layer.to_dense())
    whole = None
    if strategy == "latency" and any(entry["form"] == "thin" for entry in layout.values()):
        dense = dense_copy(model)
        timed = paired_timing(runner(dense, example_inputs, backend), runner(small, example_inputs, backend), 2.0)
        whole = {"dense_ms": timed["dense_ms"], "thin_ms": timed["small_ms"], "speedup": timed["speedup"],
                 "speedup_iqr": timed["speedup_iqr"]}
        # Keep the thin pairs only when clearly faster: per-layer timings can promise a gain that the
        # whole model, within the noise of a shared machine, does not deliver.
        whole["kept_thin"] = whole["thin_ms"] * TIE <= whole["dense_ms"]
        if not whole["kept_thin"]:
            small = dense
    return small, {"layers": layout, "whole": whole}


def export(model: nn.Module, example_inputs, strategy: str = "flops", backend: str = "eager") -> nn.Module:
    """A new model in which every SVD layer is a plain dense layer or a pair of thin plain layers.

    The thin pair is: channel-wise, a k×k conv to r channels then a 1×1 conv;
    spatial-wise, a kh×1 then a 1×kw conv; Linear, two Linears; s is folded into
    the first factor. Which layer gets which form: see `export_layout`. With
    strategy "latency" the whole exported model is then timed against the
    all-dense model on `backend`, and unless it is at least 3 % faster the
    all-dense model is returned: the export is never slower than dense. `model` is
    not changed.

    Args:
        model: a model holding SVD layers (others are copied as they are).
        example_inputs: inputs at the deployment shape (tensor, tuple or dict), or
            None to choose by parameter count.
        strategy: "flops" (default) or "latency".
        backend: one of svdtrain.latency.BACKENDS, for strategy "latency".

    Example:
        >>> small = export(model, torch.randn(1, 3, 32, 32))
        >>> fast = export(model, torch.randn(8, 3, 224, 224), strategy="latency", backend="onnxruntime")
        >>> torch.save(small.state_dict(), "small.pt")
    """
    return export_decisions(model, example_inputs, strategy, backend)[0]


def rebuild(model: nn.Module, layout: dict, state_dict: dict | None = None) -> nn.Module:
    """Turn a freshly built dense model into the architecture `export` produced, in place, from its layout.

    The weights are placeholders: load the exported state_dict next, e.g.
    `rebuild(build_my_model(), json.load(f)).load_state_dict(torch.load(path, weights_only=True))`.
    No code is unpickled: the layout is JSON, the weights a state_dict.

    Args:
        state_dict: the exported state_dict, needed when channels were removed (`prune_(channels=True)`): every
            layer is rebuilt at the widths of its saved weights.
    """
    if state_dict is not None:
        resize_to_state_(model, state_dict)
    for name, entry in layout.items():
        if entry["form"] != "thin":
            continue
        parent, _, child = name.rpartition(".")
        attention = model.get_submodule(parent) if parent else model
        if isinstance(attention, nn.MultiheadAttention) and child in PROJECTIONS:  # split, as export left it
            swap_modules(model, lambda m, fqn: SplitMultiheadAttention.from_dense(m) if m is attention else None)
        dense = model.get_submodule(name)
        if isinstance(dense, nn.Linear) or is_gpt2_conv1d(dense):
            layer = SVDLinear.from_dense(dense, init="random", rank=1)
        else:
            layer = SVDConv.from_dense(dense, decomposition=entry["decomposition"], init="random", rank=1)
        first, second = (state_dict or {}).get(f"{name}.0.weight"), (state_dict or {}).get(f"{name}.1.weight")
        if first is not None and second is not None:  # the widths it was exported at
            layer._set_widths(first.shape[1] * layer.groups, second.shape[0])
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.new_empty(second.shape[0]))
        layer._make_factors(entry["rank"])
        thin = layer.to_thin_pair()
        setattr(model.get_submodule(parent) if parent else model, child, thin)
    return model

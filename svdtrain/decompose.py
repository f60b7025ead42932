"""decompose_: put the chosen layers of any model into SVD form, in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .attention import PROJECTIONS, SplitMultiheadAttention, attention_unsupported
from .config import SVDConfig, name_matches
from .layers import SVD_LAYERS, SVDConv, SVDLinear, is_gpt2_conv1d
from .stats import format_table

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAZY = (nn.LazyLinear, nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d)


def swap_modules(root: nn.Module, replace: Callable[[nn.Module, str], nn.Module | None], prefix: str = "") -> nn.Module:
    """The one recursive walk that swaps modules: depth first, parents before children.

    `replace(module, fqn)` returns the module to put in its place (which is not
    walked further) or None to descend into its children. A module reached along
    several paths is replaced by the same new module everywhere, so sharing is kept.
    Returns the (possibly new) root.
    """
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, fqn: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = replace(module, fqn)
        if new is None:
            new = module
            # _modules, not named_children(): the latter hides a second occurrence of a shared module.
            for name, child in list(module._modules.items()):
                if child is None:
                    continue
                swapped = visit(child, f"{fqn}.{name}" if fqn else name)
                if swapped is not child:
                    setattr(module, name, swapped)
        done[id(module)] = new
        return new

    return visit(root, prefix)


@dataclass
class DecomposeReport:
    """What `decompose_` replaced and what it skipped, with the reason."""

    replaced: list[dict] = field(default_factory=list)  # name, type, shape, rank, decomposition
    skipped: list[dict] = field(default_factory=list)  # name, type, reason

    def to_dict(self) -> dict:
        return {"replaced": self.replaced, "skipped": self.skipped}

    def __str__(self) -> str:
        text = f"decomposed {len(self.replaced)} layer(s)\n"
        if self.replaced:
            text += format_table(self.replaced, ["name", "type", "shape", "rank", "decomposition"]) + "\n"
        if self.skipped:
            text += f"skipped {len(self.skipped)}\n" + format_table(self.skipped, ["name", "type", "reason"]) + "\n"
        return text


def _chooser(model: nn.Module, config: SVDConfig, filter_fn: Callable[[nn.Module, str], bool] | None):
    """`why_not(module, fqn, parent=None)`: why `decompose_` leaves a layer of `model` dense, or None. A projection
    of an attention layer is also matched by the attention's own name (`parent`)."""
    # parameter -> (the parameter, {owning module: its name}). Holding the parameter keeps its id from being
    # reused: a module made later (an attention's fresh projections) could otherwise be taken for its owner.
    owners: dict[int, tuple[nn.Parameter, dict[int, str]]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), (p, {}))[1].setdefault(id(m), fqn)

    def why_not(module: nn.Module, fqn: str, parent: str | None = None) -> str | None:
        names = (fqn,) if parent is None else (fqn, parent)
        if isinstance(module, SVD_LAYERS):
            return "already decomposed"
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return "transposed convolution is not supported"
        if isinstance(module, _LAZY):
            return "lazy module not initialised yet: run one forward first"
        if isinstance(module, (nn.Linear, *_CONVS)) and type(module).forward not in (nn.Linear.forward,
                                                                                     *(c.forward for c in _CONVS)):
            return f"{type(module).__name__} overrides forward; its behaviour would be lost"
        tied = [name for owner, name in owners.get(id(module.weight), (None, {}))[1].items() if owner != id(module)]
        if tied:
            return f"weight shared with {', '.join(sorted(set(tied)))}"
        if isinstance(module, _CONVS) and module.groups > 1 and module.in_channels == module.groups:
            return "depthwise convolution: one input channel per group, nothing to factor"
        if config.target_modules is not None and not any(name_matches(n, config.target_modules) for n in names):
            return "not matched by target_modules"
        if any(name_matches(n, config.exclude_modules) for n in names):
            return "matched by exclude_modules"
        if filter_fn is not None and not filter_fn(module, fqn):
            return "filter_fn returned False"
        return None

    return why_not


def _attention_choices(mha: nn.MultiheadAttention, fqn: str, why_not) -> tuple[SplitMultiheadAttention | None,
                                                                              dict[str, str | None]]:
    """`mha` split into its projections (None when it cannot be), and why each projection would stay dense."""
    unsupported = attention_unsupported(mha)
    if unsupported:
        return None, {name: unsupported for name in PROJECTIONS}
    split = SplitMultiheadAttention.from_dense(mha)
    return split, {name: why_not(getattr(split, name), f"{fqn}.{name}", parent=fqn) for name in PROJECTIONS}


def split_attention_(model: nn.Module, config: SVDConfig | None = None,
                     filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Put every nn.MultiheadAttention of `model` that has a projection `decompose_` would decompose (with
    `config` and `filter_fn`) in the equivalent SplitMultiheadAttention form, in place, so that its q, k, v
    and output projections are layers of their own. Returns the names of the attention layers split."""
    why_not = _chooser(model, SVDConfig() if config is None else config, filter_fn)
    done = []

    def replace(module: nn.Module, fqn: str) -> nn.Module | None:
        if not isinstance(module, nn.MultiheadAttention):
            return None
        split, reasons = _attention_choices(module, fqn, why_not)
        if split is None or all(reasons.values()):
            return module
        done.append(fqn)
        return split

    swap_modules(model, replace)
    return done


def select_layers(model: nn.Module, config: SVDConfig,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> tuple[list[tuple[str, nn.Module]],
                                                                                    list[dict]]:
    """The layers `decompose_` would replace, as (fqn, module), and those it skips, as {name, type, reason}. The
    projections of an nn.MultiheadAttention are layers only once split (`split_attention_`); before, each is
    listed as skipped, with the reason it would stay dense or "attention not split yet"."""
    why_not = _chooser(model, config, filter_fn)
    inside_attention = {id(child) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                        for child in m.modules() if child is not m}
    # A split attention's projections are matched by the attention's name too, as before the split.
    split_parent = {id(getattr(m, p)): fqn for fqn, m in model.named_modules()
                    if isinstance(m, SplitMultiheadAttention) for p in PROJECTIONS}
    targets, skipped = [], []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            _, reasons = _attention_choices(module, fqn, why_not)
            skipped += [{"name": f"{fqn}.{name}", "type": "MultiheadAttention projection",
                         "reason": reason or "attention not split yet (split_attention_)"}
                        for name, reason in reasons.items()]
            continue
        if module is model or id(module) in inside_attention or \
                not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, *SVD_LAYERS)) and not is_gpt2_conv1d(module):
            continue
        reason = why_not(module, fqn, split_parent.get(id(module)))
        if reason is None:
            targets.append((fqn, module))
        else:
            skipped.append({"name": fqn, "type": type(module).__name__, "reason": reason})
    return targets, skipped


def decompose_(model: nn.Module, config: SVDConfig | None = None,
               filter_fn: Callable[[nn.Module, str], bool] | None = None) -> DecomposeReport:
    """Replace, in place, every target Linear / Conv1d/2d/3d / GPT-2 Conv1D by its SVD form.

    An nn.MultiheadAttention becomes a SplitMultiheadAttention (the same function) whose q, k, v and
    output projections are layers like any other: each target projection is put in SVD form. Target
    and exclude patterns match a projection by its own name (`…self_attn.q_proj`) or by the attention's.

    Layers that cannot be decomposed are left as they are and listed in
    `report.skipped` with the reason; calling `decompose_` again changes nothing.
    Rebuild the optimizer afterwards: the parameters are new.

    Args:
        model: any nn.Module holding the layers (not a bare layer: a module cannot
            replace itself in place; use SVDLinear/SVDConv.from_dense for one layer).
        config: SVDConfig (decomposition, init, target_modules, exclude_modules).
        filter_fn: optional `filter_fn(module, fqn) -> bool`; False leaves the layer dense.

    Example:
        >>> report = decompose_(model, SVDConfig(exclude_modules=("fc",)))
        >>> print(report)
    """
    config = SVDConfig() if config is None else config
    if not isinstance(config, SVDConfig):
        raise TypeError(f"config must be an SVDConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, *_CONVS, *SVD_LAYERS, nn.MultiheadAttention)) or is_gpt2_conv1d(model):
        raise TypeError(f"decompose_ works in place on a model that holds layers, got a bare {type(model).__name__}; "
                        "use SVDLinear.from_dense / SVDConv.from_dense for a single layer")
    split_attention_(model, config, filter_fn)
    targets, skipped = select_layers(model, config, filter_fn)
    report = DecomposeReport(skipped=skipped)
    chosen = {id(module) for _, module in targets}

    def replace(module: nn.Module, fqn: str) -> nn.Module | None:
        if id(module) not in chosen:
            return None
        if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
            new = SVDLinear.from_dense(module, init=config.init)
        else:
            decomposition = config.decomposition if len(module.kernel_size) == 2 else "channel"
            new = SVDConv.from_dense(module, decomposition=decomposition, init=config.init)
        report.replaced.append({"name": fqn, "type": type(module).__name__, "shape": tuple(module.weight.shape),
                                "rank": new.rank, "decomposition": getattr(new, "decomposition", "channel")})
        return new

    swap_modules(model, replace)
    return report

"""The two regularizers of SVD training (METHOD.md §2), as pure functions of the model.

Both are called every training step, so factors of equal shape are stacked and
handled by one batched op instead of one small op per layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .channels import channel_norms
from .layers import svd_layers

SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")


def _layers(model: nn.Module, what: str):
    layers = [layer for _, layer in svd_layers(model)]
    if not layers:
        raise ValueError(f"{what}: the model has no SVD layers; call svdtrain.decompose_(model, config) first")
    return layers


def _stacked(tensors: list[torch.Tensor], dims: int) -> list[torch.Tensor]:
    """Batches of the tensors' trailing `dims` dims: one (batch, *shape) tensor per distinct shape."""
    groups = defaultdict(list)
    for t in tensors:
        shape = tuple(t.shape[-dims:])
        groups[shape].append(t.reshape(-1, *shape))
    return [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in groups.values()]


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Σ over SVD layers (and groups) of (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r².

    Zero when every U and V has orthonormal columns. Uses the r×r Gram matrices.

    Example:
        >>> loss = task_loss + 1.0 * orthogonality_loss(model)
    """
    layers = _layers(model, "orthogonality_loss")
    total = 0
    for factors in _stacked([f for layer in layers for f in (layer.U, layer.V)], dims=2):  # (batch, a, r)
        r = factors.shape[-1]
        gram = factors.mT @ factors
        eye = torch.eye(r, device=gram.device, dtype=gram.dtype)
        total = total + (gram - eye).square().sum() / r**2
    return total


def sparsity_loss(model: nn.Module, kind: str = "hoyer") -> torch.Tensor:
    """Σ over SVD layers (and groups) of a sparsity measure of the singular values s.

    Args:
        kind: "l1" = ‖s‖₁; "hoyer" = ‖s‖₁ / ‖s‖₂ (scale-invariant, the paper's
            choice; the authors' code subtracts a constant 1, which changes no
            gradient); "hoyer_square" = ‖s‖₁² / ‖s‖₂².

    Example:
        >>> loss = task_loss + 1e-3 * sparsity_loss(model, kind="hoyer")
    """
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity_loss kind={kind!r}; allowed: {', '.join(SPARSITY_KINDS)}")
    layers = _layers(model, "sparsity_loss")
    if kind == "l1":
        return torch.cat([layer.s.reshape(-1) for layer in layers]).abs().sum()
    total = 0
    for s in _stacked([layer.s for layer in layers], dims=1):  # (batch, r): one row per layer and group
        l1 = s.abs().sum(-1)
        l2 = s.norm(dim=-1).clamp_min(torch.finfo(s.dtype).tiny)  # all-zero s: no NaN
        total = total + (l1 / l2 if kind == "hoyer" else (l1 / l2).square()).sum()
    return total


def channel_sparsity_loss(model: nn.Module, groups: list, kind: str = "hoyer") -> torch.Tensor:
    """Σ over the removable channel groups of a sparsity measure of the group's channel norms (`channel_norms`:
    each channel's U rows·s where it is written, batch-norm scale and shift on the way, V rows·s where it is read),
    so that whole channels fade before a cut removes them (group sparsity, as Hinge and DeepHoyer's Group-HS).

    Args:
        groups: `svdtrain.channel_groups(model, example_inputs)`; call it again after channels are removed.
        kind: as `sparsity_loss` ("hoyer", scale-invariant, the default; "l1"; "hoyer_square").

    Example:
        >>> groups = svdtrain.channel_groups(model, torch.randn(1, 3, 32, 32))
        >>> loss = task_loss + 1e-2 * channel_sparsity_loss(model, groups)
    """
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"channel_sparsity_loss kind={kind!r}; allowed: {', '.join(SPARSITY_KINDS)}")
    total = torch.zeros(())
    for group in groups:
        if not group.removable:
            continue
        norms = channel_norms(model, group)
        if kind == "l1":
            total = total + norms.mean()
        else:
            ratio = norms.sum() / norms.norm()
            total = total + (ratio if kind == "hoyer" else ratio.square())
    return total

"""recalibrate_bn: re-estimate batch-norm statistics after a structural change (prune_, truncation, channel removal).

A batch-norm layer's running mean and variance describe the activations of the
network it was trained in. Cutting ranks or channels upstream changes those
activations, so the stored statistics normalise with the wrong numbers: that,
more than the lost weights, is why a freshly pruned network can fall to chance
accuracy. A forward pass over some training images with no gradient step
re-estimates them; nothing but the batch-norm buffers changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import run_model


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> int:
    """Replace every batch-norm layer's running statistics by their average over `batches`. In place.

    Only `running_mean`, `running_var` and `num_batches_tracked` of layers that track
    running statistics change; weights and every other buffer are untouched. The
    batch-norm layers run in training mode (to measure), every other module in eval
    mode, so dropout is off and the statistics are those the model sees at inference.
    Modes and momenta are restored afterwards.

    Args:
        model: any nn.Module; layers are the subclasses of torch's `_BatchNorm`
            (BatchNorm1d/2d/3d, SyncBatchNorm) with `track_running_stats=True`.
        batches: an iterable of model inputs, each a tensor, a tuple of positional
            inputs or a dict of keyword inputs (as `count_flops` takes them). For a
            loader of (images, labels) pass `(x for x, _ in loader)`. A few thousand
            training images are enough.

    Returns:
        The number of batch-norm layers recalibrated (0: the model has none, nothing changed).

    Example:
        >>> svdtrain.prune_(model, flops=0.33, example_inputs=x)
        >>> svdtrain.recalibrate_bn(model, (x for x, _ in itertools.islice(train_loader, 16)))
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    seen = 0
    try:
        for inputs in batches:
            if seen == 0:  # reset only once there is data: an empty iterable must not leave zeroed statistics
                model.eval()
                for layer in layers:
                    layer.reset_running_stats()
                    layer.momentum = None  # cumulative average over the batches, not an exponential one
                    layer.train()
            run_model(model, inputs)
            seen += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_bn: `batches` yielded nothing; give an iterable of model inputs "
                         "(e.g. a few batches of training images)")
    return len(layers)

"""Batch norm over sub-batches in one forward pass (MoCo's shuffle-BN emulation on one device).

Encoding ``splits`` sub-batches one after another runs every layer ``splits`` times on small
tensors. Only the batch-norm layers care about the split, so here the encoder runs once on the
whole batch and each batch-norm layer normalises its input as ``splits`` groups, in one call:
the batch (n, C, ...) is viewed as (n / splits, splits * C, ...), which puts sample
``i * splits + k`` in channel group ``k``, so group ``k`` holds samples ``k, k + splits, ...``
and gets its own statistics (the reference's single-GPU ``SplitBatchNorm`` uses the same view).
For a contiguous batch the view copies nothing.

Only torch batch-norm layers are split; :func:`splittable_batch_norms` says whether they are the
only layers of an encoder that mix samples. The encoder is not changed: each layer's ``forward``
is replaced only inside :func:`sub_batch_norm`, so its parameters, buffers and state-dict keys stay
as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm


def splittable_batch_norms(encoder: nn.Module) -> list[_BatchNorm] | None:
    """The encoder's batch-norm layers, or None when something else in it may mix samples.

    None when the encoder holds a layer from outside ``torch.nn`` that has no sub-layers or keeps
    parameters or buffers of its own (its forward is unknown: keras layers, a custom norm), a
    ``SyncBatchNorm`` or lazy batch norm, or an instance norm that tracks running statistics
    (updated from the whole batch). Containers of ``torch.nn`` layers (ResNet blocks) are fine.
    """
    layers = []
    for module in encoder.modules():
        if isinstance(module, (nn.SyncBatchNorm, _LazyNormBase)):
            return None
        if isinstance(module, _BatchNorm):
            layers.append(module)
            continue
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            return None
        from_torch = type(module).__module__.startswith("torch.nn.") and type(module) is not nn.Module
        is_leaf = next(module.children(), None) is None
        owns_state = next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None
        if not from_torch and (is_leaf or owns_state):
            return None
    return layers


@contextlib.contextmanager
def sub_batch_norm(layers: Sequence[_BatchNorm], splits: int) -> Iterator[None]:
    """Within, each layer normalises samples ``k, k + splits, ...`` as sub-batch ``k``.

    What each layer computes equals ``splits`` calls on the sub-batches in order of ``k``,
    including the running statistics (updated once per sub-batch) and the gradients of its
    weight and bias (summed over the sub-batches). The batch size must be divisible by ``splits``.
    """
    patched = []
    try:
        for layer in layers:
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = partial(_grouped_forward, layer, splits)
        yield
    finally:
        for layer, previous in patched:
            del layer.forward
            if previous is not None:
                layer.forward = previous


def _grouped_forward(layer: _BatchNorm, splits: int, x: Tensor) -> Tensor:
    batch_statistics = layer.training or layer.running_mean is None
    if not batch_statistics:
        return type(layer).forward(layer, x)  # running statistics: the split changes nothing
    layer._check_input_dim(x)
    n, channels = x.shape[:2]
    grouped = x.reshape(n // splits, splits * channels, *x.shape[2:])
    weight = layer.weight.repeat(splits) if layer.weight is not None else None
    bias = layer.bias.repeat(splits) if layer.bias is not None else None
    update = layer.training and layer.track_running_stats
    if update:
        # momentum 1 on zeros: these come back holding each group's batch mean and unbiased
        # variance, which then enter the running statistics one sub-batch at a time below.
        means = torch.zeros(splits * channels, device=x.device, dtype=layer.running_mean.dtype)
        variances = torch.zeros_like(means)
        out = F.batch_norm(grouped, means, variances, weight, bias, True, 1.0, layer.eps)
        with torch.no_grad():
            for mean, variance in zip(means.view(splits, channels), variances.view(splits, channels)):
                factor = layer.momentum
                if layer.num_batches_tracked is not None:
                    layer.num_batches_tracked.add_(1)
                    if layer.momentum is None:  # a cumulative average, as nn.BatchNorm's
                        factor = 1.0 / float(layer.num_batches_tracked)
                layer.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                layer.running_var.mul_(1 - factor).add_(variance, alpha=factor)
    else:
        out = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, layer.eps)
    # Not a view of `out`: the next layer is often an in-place ReLU, and autograd handles an
    # in-place write into a view by copying the whole base.
    return torch.ops.aten._unsafe_view(out, x.shape)

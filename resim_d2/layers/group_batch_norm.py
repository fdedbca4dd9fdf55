"""Batch norm over groups of a batch: several GPUs' per-GPU batch norm emulated in one process.

MoCo trains with one batch norm per GPU (32 images each in the paper's 8 x 32) and shuffles the key
batch across GPUs (shuffle-BN). One process at batch 256 would normalise all 256 images together,
and its key encoder would see the statistics of exactly the query encoder's images. MoCo's own
single-GPU demo and lightly normalise slices of the batch separately ("split" batch norm); this is
that layer.

:class:`GroupBatchNorm2d` is a ``torch.nn.BatchNorm2d`` (same parameters, buffers and state-dict
keys, so checkpoints and ``tools/convert.py`` are unchanged) whose training forward normalises
``G = num_groups(N, group_size)`` groups of ``group_size`` images separately, with one native
``batch_norm`` call (cuDNN on CUDA) and no loop over groups: the groups are folded into the channel
axis and the affine weights repeated ``G`` times. **Sample ``k`` of the batch belongs to group
``k % G``** (interleaved), because that is the fold a contiguous (N, C, H, W) tensor allows for
free: the ``G`` samples ``i*G .. i*G + G-1`` are adjacent in memory, so the batch is the view
``(N/G, G*C, H, W)`` whose channel ``g*C + c`` is channel ``c`` of group ``g``. A channels-last
batch, memory ``(N/G, G, H*W, C)``, becomes channels-last ``(N/G, G*C, H, W)`` by swapping the
``G`` and ``H*W`` axes, which moves whole ``C``-vectors (in eager mode one copy there and one
back, in the forward and in the backward pass: the cost of this layout). Callers that want
consecutive blocks of images as groups reorder the (cheap, 3-channel) input images first
(:func:`interleave_groups`), as :class:`~resim_d2.modeling.ReSim` does.

Running statistics are those of one batch norm: each group updates them as ``BatchNorm2d`` would
(unbiased variance), and the buffers keep the mean over groups. In eval mode, or when the batch has
one group (``N <= group_size``), the layer is ``BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GroupBatchNorm2d",
    "convert_group_batchnorm",
    "num_groups",
    "interleave_groups",
    "deinterleave_groups",
]


def num_groups(batch: int, group_size: int, what: str = "RESIM.BN_GROUP_IMAGES") -> int:
    """Groups of ``group_size`` images in a batch of ``batch``: ``batch // group_size``, or 1 when
    ``group_size`` is 0 or ``batch <= group_size``. A batch larger than ``group_size`` must be a
    multiple of it (``what`` names the setting in the error)."""
    if group_size < 0:
        raise ValueError(f"{what} must be >= 0, got {group_size}")
    if group_size == 0 or batch <= group_size:
        return 1
    if batch % group_size:
        raise ValueError(
            f"{what} is {group_size}, but this process has {batch} images: the per-process batch "
            "must be a multiple of it, or at most it"
        )
    return batch // group_size


def _reorder_rows(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rows of x (B, ...) viewed as ``shape`` (a, b) -> transposed to (b, a), flattened back. A
    channels-last 4-D tensor stays channels-last (convolutions are slow on anything else)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        y = _reorder_rows(x.permute(0, 2, 3, 1), shape)  # contiguous (B, H, W, C) rows
        return y.permute(0, 3, 1, 2)
    return x.unflatten(0, shape).transpose(0, 1).flatten(0, 1)


def interleave_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, ...) with group g = rows ``g*n .. g*n + n-1`` -> (B, ...) with group g = rows ``k``,
    ``k % groups == g`` (the order :class:`GroupBatchNorm2d` normalises). A copy when groups > 1,
    in x's memory format."""
    return x if groups == 1 else _reorder_rows(x, (groups, -1))


def deinterleave_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`interleave_groups`."""
    return x if groups == 1 else _reorder_rows(x, (-1, groups))


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands on its gradient in channels-last layout.

    Put on the output of a batch norm whose input is channels-last, it makes the batch norm's
    incoming gradient channels-last too. With the two in different layouts, native batch norm's
    backward returns the input's layout while its shape function (what torch.compile traces with)
    announces the gradient's, and the traced backward then fails on a view."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


class GroupBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are per group of ``group_size`` images.

    ``forward(x (N, C, H, W)) -> (N, C, H, W)`` in x's memory format; sample ``k`` is in group
    ``k % G`` with ``G = num_groups(N, group_size)`` (see the module docstring). ``group_size`` 0
    or ``N <= group_size``, and eval mode: exactly ``BatchNorm2d``.
    """

    def __init__(self, num_features: int, group_size: int = 0, **kwargs):
        super().__init__(num_features, **kwargs)
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {group_size}")
        self.group_size = int(group_size)

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        groups = num_groups(x.shape[0], self.group_size) if use_batch_stats else 1
        if groups == 1:
            return super().forward(x)
        self._check_input_dim(x)
        N, C, H, W = x.shape
        n = N // groups
        if x.is_contiguous():  # samples i*G .. i*G+G-1 adjacent: fold them into channels, free
            return self._folded(x.view(n, groups * C, H, W), groups).view_as(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            return self._folded(x.contiguous().view(n, groups * C, H, W), groups).view_as(x)
        # channels-last, memory (n, G, H*W, C): swap the G and H*W axes, moving whole C-vectors,
        # so that (g, c) becomes one channels-last channel axis, and back afterwards
        xt = x.permute(0, 2, 3, 1).view(n, groups, H * W, C).transpose(1, 2).contiguous()
        y = self._folded(xt.view(n, H, W, groups * C).permute(0, 3, 1, 2), groups)
        y = _ChannelsLastGrad.apply(y)
        y = y.permute(0, 2, 3, 1).reshape(n, H * W, groups, C).transpose(1, 2).contiguous()
        return y.view(N, H, W, C).permute(0, 3, 1, 2)

    def _folded(self, xf: torch.Tensor, groups: int) -> torch.Tensor:
        """Native batch norm of xf (n, G*C, H, W), channel g*C + c being channel c of group g,
        with the affine weights repeated per group; running statistics: the mean over groups."""
        C = self.num_features
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.training and self.track_running_stats
        rm = rv = None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
            rm, rv = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        w = self.weight.repeat(groups) if self.weight is not None else None
        b = self.bias.repeat(groups) if self.bias is not None else None
        y = F.batch_norm(xf, rm, rv, w, b, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(groups, C).mean(0))
                self.running_var.copy_(rv.view(groups, C).mean(0))
        return y


def convert_group_batchnorm(module: nn.Module, group_size: int) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm2d`` of ``module`` (exactly that type: not SyncBN, frozen
    or other subclasses) by a :class:`GroupBatchNorm2d` holding the same parameters and buffers;
    returns the module (itself converted when it is such a batch norm). State-dict keys and values
    are unchanged."""
    if type(module) is nn.BatchNorm2d:
        new = GroupBatchNorm2d(
            module.num_features,
            group_size,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.weight, new.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_group_batchnorm(child, group_size)
        if new_child is not child:
            setattr(module, name, new_child)
    return module

"""Projection heads of ReSim: the global MLPs (MoCo-v2, SimSiam) and the region projection.

Sizes follow the paper (§3.4, Table 7): MoCo-v2's MLP C5 2048 -> 2048 -> 128; SimSiam's 3-layer
projection (2048 wide, BN) and 2048 -> 512 -> 2048 predictor; the region projection is two 3x3 convs
to 128 channels with BN + ReLU after the first, or nothing ("none", the released code's raw maps).
For ReSim on SimSiam, Table 7 also gives per-level region MLPs on the pooled window features:
projection C -> C -> C and prediction C -> C/4 -> C (C4: 1024 -> 256 -> 1024, C3: 512 -> 128 ->
512), :class:`RegionSimSiamMLP`, whose batch norms count only the valid windows
(:class:`MaskedBatchNorm1d`).

One reading of Table 7 for every SimSiam MLP: each row lists input -> hidden -> output widths, and
the depth is the one SimSiam specifies (the caption: "as specified in [7]"): 3 linear layers for a
projection (C5 2048 -> 2048 -> 2048 and C4 1024 -> 1024 -> 1024 alike,
``RESIM.SIMSIAM.PROJ_LAYERS``) and 2 for a prediction (2048 -> 512 -> 2048, 1024 -> 256 -> 1024).
"""

from __future__ import annotations

import torch
from torch import nn

from detectron2.layers import get_norm
from detectron2.utils.comm import get_world_size
from fvcore.nn.distributed import differentiable_all_reduce

__all__ = [
    "MoCoMLP",
    "SimSiamProjector",
    "SimSiamPredictor",
    "RegionProjection",
    "build_region_head",
    "norm_1d",
    "MaskedBatchNorm1d",
    "RegionSimSiamMLP",
]


class _Norm2dOn1d(nn.Module):
    """A 2-D norm layer (e.g. detectron2's NaiveSyncBatchNorm) applied to (N, C) as (N, C, 1, 1)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x[:, :, None, None]).flatten(1)


def norm_1d(norm: str, channels: int, affine: bool = True) -> nn.Module:
    """A batch norm for (N, C) features that follows the backbone's norm choice.

    norm: "BN" -> BatchNorm1d; "SyncBN" -> torch SyncBatchNorm (accepts (N, C)); any other
    detectron2 norm name (e.g. "naiveSyncBN", which also runs on gloo/CPU) -> that 2-D norm applied
    on (N, C, 1, 1).
    """
    if norm in ("BN", "", None):
        return nn.BatchNorm1d(channels, affine=affine)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels, affine=affine)
    layer = get_norm(norm, channels)
    if not affine:
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"norm '{norm}' cannot be made non-affine")
        layer = type(layer)(channels, affine=False)
    return _Norm2dOn1d(layer)


class MoCoMLP(nn.Module):
    """MoCo-v2 projection: Linear(in, hidden) -> ReLU -> Linear(hidden, out): (B, in) -> (B, out)"""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class SimSiamProjector(nn.Module):
    """SimSiam's projection: [Linear-BN-ReLU] x (num_layers - 1) -> Linear -> BN (no affine).

    (B, in) -> (B, dim); ``num_layers`` 3 is SimSiam's ImageNet projector.

    Linear layers have no bias (each is followed by BN), as the official SimSiam code effectively
    does.
    """

    def __init__(self, in_dim: int, dim: int = 2048, norm: str = "BN", num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"RESIM.SIMSIAM.PROJ_LAYERS must be >= 1, got {num_layers}")
        layers = []
        for i in range(num_layers - 1):
            layers += [
                nn.Linear(in_dim if i == 0 else dim, dim, bias=False),
                norm_1d(norm, dim),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.Linear(in_dim if num_layers == 1 else dim, dim, bias=False),
            norm_1d(norm, dim, affine=False),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class SimSiamPredictor(nn.Module):
    """SimSiam's predictor: Linear(dim, hidden)-BN-ReLU -> Linear(hidden, dim); (B, dim) -> same."""

    def __init__(self, dim: int = 2048, hidden_dim: int = 512, norm: str = "BN"):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False),
            norm_1d(norm, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )

    def forward(self, x):
        return self.layers(x)


class RegionProjection(nn.Module):
    """The paper's region projection (§3.4): conv3x3 -> BN -> ReLU -> conv3x3, to ``dim`` channels.

    (B, in_channels, H, W) -> (B, dim, H, W); spatial size and stride are kept.
    """

    def __init__(self, in_channels: int, dim: int = 128, norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)
        self.norm = get_norm(norm, dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(self.relu(self.norm(self.conv1(x))))


def build_region_head(kind: str, in_channels: int, dim: int, norm: str) -> tuple[nn.Module, int]:
    """Region head by name: "conv" -> :class:`RegionProjection`, "none" -> identity (raw maps).

    Returns (module, output channels).
    """
    kind = kind.lower()
    if kind == "conv":
        return RegionProjection(in_channels, dim, norm), dim
    if kind == "none":
        return nn.Identity(), in_channels
    raise ValueError(f"RESIM.REGION.HEAD must be 'conv' or 'none', got '{kind}'")


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics use only the rows where ``mask`` is True.

    ``forward(x (R, C), mask (R,) bool) -> (R, C)``. ReSim pads every image to the same number of
    windows; padded rows must not enter the statistics (they are normalised too, and then ignored
    by the loss). No host synchronisation: the masked moments are weighted sums. Running statistics
    are updated as BatchNorm1d does (unbiased variance), and not at all for a batch with fewer than
    two valid rows. With ``sync`` the statistics are those of the valid rows of all processes
    (SyncBN, differentiable all-reduce of the masked sums); otherwise per process. Computed and
    returned in float32 at least (autocast's policy for batch norm).
    """

    def __init__(self, num_features: int, *args, sync: bool = False, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.sync = bool(sync)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training:
            return super().forward(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, as autocast BN
        # moments as weighted sums with one matrix-vector product each: few kernels per call (the
        # SimSiam region MLPs call this 12 times a step)
        m = mask.to(x.dtype)
        if self.sync and get_world_size() > 1:
            # sums over every process's valid rows, one all-reduce: count, sum, sum of squares
            C = x.shape[1]
            sums = differentiable_all_reduce(torch.cat([m.sum()[None], m @ x, m @ x.square()]))
            n = sums[0].detach()
            mean = sums[1 : C + 1] / n.clamp_min(1.0)
            var = (sums[C + 1 :] / n.clamp_min(1.0) - mean.square()).clamp_min(0.0)
            xc = x - mean
        else:
            n = m.sum()
            w = m / n.clamp_min(1.0)  # (R,) 1/n on valid rows, 0 on padding
            mean = w @ x  # (C,)
            xc = x - mean
            var = w @ xc.square()  # biased, as batch norm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                mom = self.momentum if self.momentum is not None else 0.1
                ok = n >= 2  # fewer than two valid rows: no update (rate 0)
                rate = ok.to(x.dtype) * mom
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), rate)
                self.num_batches_tracked.add_(ok.to(self.num_batches_tracked.dtype))
        inv_std = torch.rsqrt(var + self.eps)
        if self.affine:
            return torch.addcmul(self.bias, xc, inv_std * self.weight)
        return xc * inv_std


class RegionSimSiamMLP(nn.Module):
    """Per-window MLP of ReSim on SimSiam (paper Table 7): [Linear -> masked BN -> ReLU] x
    (num_layers - 1) -> Linear (-> masked BN without affine for a projection, as SimSiam's
    projector ends).

    ``forward(x (R, in_dim), mask (R,) bool) -> (R, out_dim)``. Projection: ``in -> in -> in``,
    3 layers as SimSiam's projector (``final_norm=True``); prediction: ``in -> in/4 -> in``, 2
    layers (``final_norm=False``). ``sync``: batch statistics over all processes.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        final_norm: bool,
        num_layers: int = 2,
        sync: bool = False,
    ):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"a region MLP has at least 2 layers, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.fcs = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.bns = nn.ModuleList(MaskedBatchNorm1d(hidden_dim, sync=sync) for _ in self.fcs)
        self.relu = nn.ReLU(inplace=True)
        self.fc_out = nn.Linear(hidden_dim, out_dim, bias=not final_norm)
        self.bn_out = MaskedBatchNorm1d(out_dim, affine=False, sync=sync) if final_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for fc, bn in zip(self.fcs, self.bns):
            x = self.relu(bn(fc(x), mask))
        x = self.fc_out(x)
        return self.bn_out(x, mask) if self.bn_out is not None else x

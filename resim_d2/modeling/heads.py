"""Projection heads of ReSim: the global MLPs (MoCo-v2, SimSiam) and the region projection.

Sizes follow the paper (§3.4, Table 7): MoCo-v2's MLP C5 2048 -> 2048 -> 128; SimSiam's 3-layer
projection (2048 wide, BN) and 2048 -> 512 -> 2048 predictor; the region projection is two 3x3 convs
to 128 channels with BN + ReLU after the first, or nothing ("none", the released code's raw maps).
"""

from __future__ import annotations

from torch import nn

from detectron2.layers import get_norm

__all__ = [
    "MoCoMLP",
    "SimSiamProjector",
    "SimSiamPredictor",
    "RegionProjection",
    "build_region_head",
    "norm_1d",
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
    """SimSiam's 3-layer projection: [Linear-BN-ReLU] x 2 -> Linear -> BN (no affine).

    (B, in) -> (B, dim).

    Linear layers have no bias (each is followed by BN), as the official SimSiam code effectively
    does.
    """

    def __init__(self, in_dim: int, dim: int = 2048, norm: str = "BN"):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False),
            norm_1d(norm, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            norm_1d(norm, dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            norm_1d(norm, dim, affine=False),
        )

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

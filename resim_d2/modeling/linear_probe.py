"""ImageNet linear probe: a frozen detectron2 ResNet, global average pooling, one linear layer.

MoCo's ``main_lincls.py`` protocol (the paper's appendix A.2 reports its top-1: MoCo-v2 67.5% vs
ReSim-C4 66.1% at 200 epochs): the pre-trained backbone is frozen, weights *and* batch-norm
statistics (the backbone stays in eval mode while the classifier trains), and only a linear layer on
globally pooled C5 features is learned, initialised N(0, 0.01²) with zero bias.

``cfg.MODEL.META_ARCHITECTURE = "LinearProbe"``; inputs come from
:class:`resim_d2.data.classification.ClassificationMapper`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone

__all__ = ["LinearProbe"]


# Where detector weights keep the ResNet, and where LinearProbe keeps it (``backbone.*``).
_DETECTOR_PREFIXES = (
    ("roi_heads.res5.", "backbone.res5."),  # R-C4 detectors: res5 runs in the box head
    ("backbone.bottom_up.", "backbone."),  # R-FPN detectors and ReSim-FPN pre-training
)


def _detector_keys_to_probe(state_dict, prefix, *args):
    """Load-state-dict pre-hook: rename detector-layout ResNet keys to LinearProbe's, in place.

    So MODEL.WEIGHTS can be what ``tools/convert.py`` writes for either detector (``--target c4``:
    res5 under ``roi_heads.res5``; ``--target fpn``: ``backbone.bottom_up``), a fine-tuned detector,
    or a ReSim pre-training checkpoint (query encoder ``backbone.*``), with exact names.
    Keys the probe has no place for (FPN, RPN, box head, key encoder) stay and are reported unused.
    """
    for src, dst in _DETECTOR_PREFIXES:
        src, dst = prefix + src, prefix + dst
        for key in [k for k in state_dict if k.startswith(src)]:
            new = dst + key[len(src) :]
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)


@META_ARCH_REGISTRY.register()
class LinearProbe(nn.Module):
    """Frozen backbone → global average pool of ``in_feature`` → ``nn.Linear`` → class logits.

    Weights: detectron2 names (``backbone.res2.0.conv1.weight``, ...); R-C4 / R-FPN detector layouts
    are renamed on load (see :func:`_detector_keys_to_probe`). The classifier is ``fc.*``.

    Input: a list of N dicts, each ``{"image": uint8 (3, H, W) in cfg.INPUT.FORMAT order, "label":
    int}`` (same H, W for all). Training returns ``{"loss_cls": cross-entropy}``; inference returns
    a list of N dicts ``{"logits": float (num_classes,)}``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        num_classes: int,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        in_feature: str = "res5",
    ):
        """
        Args:
            backbone: its ``in_feature`` output is classified; frozen here (no gradient, eval mode).
            num_classes: number of classes of the linear layer.
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 input, as detectron2's.
            in_feature: name of the backbone output to pool (C5: "res5").
        """
        super().__init__()
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"LinearProbe classifies backbone feature '{in_feature}' but the backbone outputs "
                f"{sorted(shapes)}; add it to MODEL.RESNETS.OUT_FEATURES"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.fc = nn.Linear(shapes[in_feature].channels, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.backbone.eval()
        self._register_load_state_dict_pre_hook(_detector_keys_to_probe)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_backbone(cfg),
            "num_classes": cfg.RESIM.LINEAR_PROBE.NUM_CLASSES,
            "in_feature": cfg.RESIM.LINEAR_PROBE.IN_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        """Set the classifier's mode; the backbone stays in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.backbone.train(False)
        return self

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) → globally average-pooled frozen features (N, C)."""
        with torch.no_grad():
            return self.backbone(images)[self.in_feature].mean(dim=(2, 3))

    def forward(self, batched_inputs):
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device)
        images = (images.float() - self.pixel_mean) / self.pixel_std
        logits = self.fc(self.pooled_features(images))  # (N, num_classes)
        if self.training:
            labels = torch.as_tensor([int(x["label"]) for x in batched_inputs], device=self.device)
            return {"loss_cls": F.cross_entropy(logits, labels)}
        return [{"logits": row} for row in logits]

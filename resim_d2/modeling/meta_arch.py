"""ReSim pre-training as a detectron2 meta-architecture (paper §3; ReSim-C4, ReSim-FPN, baselines).

Input (one dict per image, from the two-view mapper)::

    {"image_q": uint8 (3, S, S) RGB, "image_k": uint8 (3, S, S) RGB,
     "windows": {feature: {"boxes_q": float32 (M, 4) x0,y0,x1,y1 in query-view pixels,
                           "boxes_k": float32 (M, 4) in key-view pixels,
                           "valid": bool (M,)}}}        # M fixed per feature (padded)

Training output (``model.train()``): a dict of 0-dim loss tensors, all to be summed (as
detectron2's ``SimpleTrainer`` does with every value).

* ``loss_global``: the global loss (MoCo-v2 InfoNCE or SimSiam's cosine loss) times
  ``RESIM.GLOBAL.LOSS_WEIGHT`` (λ).
* ``loss_region_<feature>``: region InfoNCE of that feature times its ``RESIM.REGION.LOSS_WEIGHTS``
  entry (absent for the baselines, ``RESIM.REGION.ENABLED False``).

Log-only metrics are NOT in the returned dict (detectron2 v0.6 sums every returned value). Each
training forward stores them, detached and still on the device (no host synchronisation inside the
step), in ``model.last_metrics``: ``global/{pos_sim,neg_sim,acc_top1}`` (SimSiam adds
``global/z_std``) and ``region_<feature>/{pos_sim,neg_sim,acc_top1,valid_per_image}``.
:meth:`ReSim.put_metrics` writes them to detectron2's current ``EventStorage`` with one host sync;
call it after the step, e.g. from a hook's ``after_step``.

Eval output (``model.eval()``), for the region-correspondence evaluator. Both views go through the
query backbone in eval mode; ``region_*`` are windows of the raw backbone maps, ``head_*`` of the
query region head's output on them (what the region loss trains), for every windowed feature that
has a region head other than the identity::

    {"region_q": {feature: (B, M, C) L2-normalised query-window features},
     "region_k": {feature: (B, M, C) L2-normalised key-window features},
     "head_q":   {feature: (B, M, D) the same from the region head's output},
     "head_k":   {feature: (B, M, D)},
     "valid":    {feature: (B, M) bool},
     "global_q": (B, C5) L2-normalised average-pooled res5 of the query view,
     "global_k": (B, C5) the same for the key view}

Raw backbone features are what transfers to detectors, and they exist for the baselines as well, so
MoCo-v2 and ReSim are compared on the same footing; the head's output shows what the objective
itself learned.

Composition, as detectron2's ``GeneralizedRCNN`` composes a backbone, a proposal generator and ROI
heads (paper Figure 2):

* the query encoder: ``backbone`` (a detectron2 ResNet, or an FPN over one; :mod:`.encoder`), the
  global head ``global_head`` on the pooled ``RESIM.GLOBAL.IN_FEATURE`` map and one region head per
  level, ``region_heads``;
* the key encoder: a momentum copy of all three (MoCo) or the query encoder itself (SimSiam);
* the global objective (:mod:`.global_objective`, ``RESIM.GLOBAL.FRAMEWORK``: :class:`~.moco.MoCo`,
  :class:`~.simsiam.SimSiam`): the key encoder, the global loss, what follows the step;
* one region branch per level (:mod:`.region_branch`): windows pooled from both views' maps,
  negatives, the region loss.

Every setting is validated in one place, :func:`resim_d2.config_checks.check_pretrain_model`, which
names the key at fault. Modules keep their registered names (``backbone``, ``global_head``,
``region_heads``, ``predictor``, ``region_mlps``, ``backbone_k``, ``global_head_k``,
``region_heads_k``, buffers ``queue``, ``queue_ptr``) so checkpoints load, resume and convert
whichever part built them.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..config_checks import check_pretrain_model
from ..layers.group_batch_norm import convert_group_batchnorm
from . import moco, simsiam  # noqa: F401  (register the global objectives)
from .encoder import all_output_shapes, backbone_features, freeze_unused_fpn
from .global_objective import EncodedView, GlobalObjective, build_global_objective
from .precision import AMP_DTYPES, CUDAGRAPH_MODES, autocast
from .region_branch import RegionBranch, RegionWindows, build_region_branches
from .region_pooling import pool_regions

__all__ = ["ReSim", "backbone_features", "all_output_shapes", "CUDAGRAPH_MODES"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class ReSim(nn.Module):
    """ReSim pre-training model (see the module docstring for inputs, outputs and design)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        objective: GlobalObjective,
        global_heads: dict[str, nn.Module],
        region_branches: dict[str, RegionBranch],
        pixel_mean,
        pixel_std,
        global_in_feature: str = "res5",
        pooler_type: str = "PrRoIPool",
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile_encoders: bool = False,
        compile_mode: str = "default",
    ):
        """
        Args:
            backbone: the query encoder, a detectron2 Backbone (ResNet, or FPN over a ResNet).
            objective: the global objective (MoCo, SimSiam, ...).
            global_heads: the objective's modules, :meth:`GlobalObjective.build_heads`.
            region_branches: {feature: branch}, one per region level; {} for the baselines.
            pixel_mean, pixel_std: per-channel input normalisation, in the 0-255 range (RGB).
            global_in_feature: map average-pooled for the global branch ("res5").
            pooler_type: the windows' pooler of the evaluation output ("PrRoIPool" or
                "ROIAlign"; each region branch has its own for training).
            amp_dtype: autocast dtype around encoders and heads (None: float32).
            channels_last: channels-last memory format for encoders and inputs.
            compile_encoders, compile_mode: ``torch.compile`` the encoder function (backbone +
                heads) with this mode.
        """
        super().__init__()
        heads = dict(global_heads)
        self.backbone = backbone
        self.global_head = heads.pop("global_head")
        self.region_heads = nn.ModuleDict({f: b.head for f, b in region_branches.items()})
        for name, module in heads.items():  # e.g. SimSiam's predictor
            self.add_module(name, module)
        mlps = {f: b.mlp for f, b in region_branches.items() if getattr(b, "mlp", None) is not None}
        self.region_mlps = nn.ModuleDict(mlps)
        self.objective = objective
        self.region_branches = dict(region_branches)
        self.global_in_feature = global_in_feature
        self.feature_strides = {n: s.stride for n, s in all_output_shapes(backbone).items()}
        self.pooler_type = pooler_type
        self.amp_dtype = amp_dtype
        self.channels_last = bool(channels_last)
        self.compile_encoders = bool(compile_encoders)
        self.compile_mode = compile_mode
        # log-only metrics of the last training forward (see the module docstring)
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        frozen = freeze_unused_fpn(self.backbone, list(self.region_branches))
        if frozen:
            logger.info(
                "ReSim: FPN convs unused by pre-training kept frozen: %s", ", ".join(frozen)
            )
        if objective.bn_group_images:
            # before the key encoder is copied from the query encoder, so both are converted
            for module in (self.backbone, self.region_heads):
                convert_group_batchnorm(module, objective.bn_group_images)
        objective.attach(self)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        check_pretrain_model(cfg)  # settings that need no backbone, before building one
        backbone = build_backbone(cfg)
        shapes = all_output_shapes(backbone)
        check_pretrain_model(cfg, shapes)
        r = cfg.RESIM
        in_shape = shapes[r.GLOBAL.IN_FEATURE]
        objective = build_global_objective(cfg, in_shape)
        return {
            "backbone": backbone,
            "objective": objective,
            "global_heads": objective.build_heads(in_shape),
            "region_branches": build_region_branches(cfg, shapes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "global_in_feature": r.GLOBAL.IN_FEATURE,
            "pooler_type": r.REGION.POOLER_TYPE,
            "amp_dtype": AMP_DTYPES[r.SPEED.AMP_DTYPE],
            "channels_last": r.SPEED.CHANNELS_LAST,
            "compile_encoders": r.SPEED.COMPILE,
            "compile_mode": r.SPEED.COMPILE_MODE,
        }

    # ------------------------------------------------------------------ the step (Figure 2)
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        if self.compile_encoders and self.compile_mode in CUDAGRAPH_MODES:
            # a new training step: outputs of the previous step's CUDA graphs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        x_q = self.preprocess_image(batched_inputs, "image_q")
        x_k = self.preprocess_image(batched_inputs, "image_k")
        windows = self.windows(batched_inputs, self.region_branches)

        query = self.encode(x_q, self.objective.query_order(x_q.shape[0]))
        key = self.objective.encode_keys(self, x_k)
        loss_global, stats = self.objective.loss(self, query, key)
        losses = {"loss_global": loss_global}
        metrics = {f"global/{name}": value for name, value in stats.items()}
        for f, branch in self.region_branches.items():
            region_losses, region_metrics = branch(
                query.maps[f], key.maps[f], windows[f], query.order, key.order
            )
            losses.update(region_losses)
            metrics.update(region_metrics)
        self.objective.after_step(self, key)
        self.last_metrics = metrics
        return losses

    def encode(self, x: torch.Tensor, order, key_encoder: bool = False, region_grad: bool = True):
        """One view (B, 3, S, S), batch order, through the query encoder and heads (or the
        momentum key encoder's), seen in ``order`` (a :class:`BatchOrder`) -> :class:`EncodedView`.
        ``region_grad`` False: the region heads run without gradient."""
        if key_encoder:
            parts = (self.backbone_k, self.global_head_k, self.region_heads_k)
        else:
            parts = (self.backbone, self.global_head, self.region_heads)
        with autocast(x.device, self.amp_dtype):
            embedding, maps = self._encoder_fn()(*parts, order.to_encoder(x), region_grad)
        return EncodedView(order.to_batch(embedding), maps, order)

    def _encode(self, backbone, global_head, region_heads, x, region_grad: bool = True):
        """Encoder + heads on one view -> (global embedding (B, D), {feature: map (B, C, H, W)})."""
        names = list(dict.fromkeys([*self.region_branches, self.global_in_feature]))
        feats = backbone_features(backbone, x, names)
        embedding = global_head(feats[self.global_in_feature].mean(dim=(2, 3)))
        with contextlib.nullcontext() if region_grad else torch.no_grad():
            maps = {f: region_heads[f](feats[f]) for f in self.region_branches}
        return embedding, maps

    def _encoder_fn(self):
        if not self.compile_encoders:
            return self._encode
        fn = self.__dict__.get("_compiled_encode")
        if fn is None:
            fn = torch.compile(self._encode, mode=self.compile_mode)
            self.__dict__["_compiled_encode"] = fn
        return fn

    def __getstate__(self):
        # the compiled encoder is a cache bound to this instance: copies and pickles rebuild it
        state = self.__dict__.copy()
        state.pop("_compiled_encode", None)
        return state

    # ------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs, key: str) -> torch.Tensor:
        """Stack, move and normalise one view: (B, 3, S, S) float32."""
        x = torch.stack([torch.as_tensor(d[key]) for d in batched_inputs])
        x = x.to(self.device, non_blocking=True).float()
        x = (x - self.pixel_mean) / self.pixel_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def windows(self, batched_inputs, features) -> dict[str, RegionWindows]:
        """{feature: :class:`RegionWindows`} of the batch, on the device, padding zeroed."""
        return {f: RegionWindows.from_inputs(batched_inputs, f, self.device) for f in features}

    # ------------------------------------------------------------------ for the trainer
    def encoder_backbone(self) -> Backbone:
        """The encoder to convert to detectron2 detectors: the query backbone (ResNet or FPN)."""
        return self.backbone

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """SimSiam's predictors (global, and per level for ReSim on SimSiam): the parameters
        ``RESIM.SIMSIAM.FIX_PRED_LR`` keeps at a fixed learning rate (resim_d2.solver)."""
        modules = self.objective.fixed_lr_modules(self)
        modules += [mlps["pred"] for mlps in self.region_mlps.values()]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def leaks_batch_statistics(self, batch: int, world: int | None = None) -> bool:
        """Whether a step at ``batch`` images per process on ``world`` processes shares batch
        statistics between query and key encoders (MoCo without an effective shuffle-BN)."""
        world = comm.get_world_size() if world is None else world
        return self.objective.leaks_batch_statistics(self, batch, world)

    def put_metrics(self, storage=None) -> dict:
        """Write :attr:`last_metrics` to ``storage`` (default: detectron2's current EventStorage).

        One host synchronisation for all metrics; call it after the training step. Returns the
        values written ({} when there is no storage or no metrics yet).
        """
        if not self.last_metrics:
            return {}
        if storage is None:
            try:
                storage = get_event_storage()
            except AssertionError:  # not inside an EventStorage context
                return {}
        names = list(self.last_metrics)
        values = torch.stack([self.last_metrics[n].float() for n in names]).tolist()
        scalars = dict(zip(names, values))
        storage.put_scalars(**scalars)
        return scalars

    @torch.no_grad()
    def inference(self, batched_inputs) -> dict:
        """Region (and global) embeddings of both views from the query backbone; see module doc.

        Every windowed feature of the inputs that the backbone produces is evaluated, whether or not
        the region branch trained it (so the baselines can be scored too).
        """
        x_q = self.preprocess_image(batched_inputs, "image_q")
        x_k = self.preprocess_image(batched_inputs, "image_k")
        windowed = batched_inputs[0].get("windows", {}) if batched_inputs else {}
        features = [f for f in windowed if f in self.feature_strides]
        names = list(dict.fromkeys(features + [self.global_in_feature]))
        with autocast(self.device, self.amp_dtype):
            fq = backbone_features(self.backbone, x_q, names)
            fk = backbone_features(self.backbone, x_k, names)
        g = self.global_in_feature
        out = {"region_q": {}, "region_k": {}, "head_q": {}, "head_k": {}, "valid": {}}
        out["global_q"] = F.normalize(fq[g].float().mean(dim=(2, 3)), dim=1)
        out["global_k"] = F.normalize(fk[g].float().mean(dim=(2, 3)), dim=1)
        for f, w in self.windows(batched_inputs, features).items():
            scale = 1.0 / self.feature_strides[f]

            def pooled(feature_map, boxes, scale=scale):
                return F.normalize(
                    pool_regions(feature_map, boxes, scale, self.pooler_type), dim=-1
                )

            out["region_q"][f] = pooled(fq[f], w.boxes_q)
            out["region_k"][f] = pooled(fk[f], w.boxes_k)
            out["valid"][f] = w.valid
            head = self.region_heads[f] if f in self.region_heads else None
            if head is not None and not isinstance(head, nn.Identity):
                with autocast(self.device, self.amp_dtype):
                    hq, hk = head(fq[f]), head(fk[f])
                out["head_q"][f], out["head_k"][f] = pooled(hq, w.boxes_q), pooled(hk, w.boxes_k)
        return out

"""Start-up checks for settings that make a whole branch of a run do nothing.

Some mistakes do not fail: a run whose region windows never fit in the views trains to the end
with ``valid_per_image 0`` and no region loss, so ReSim silently becomes MoCo-v2.
:func:`check_config` looks for such settings before anything is built and

* raises :class:`ConfigError` listing every setting that can never work, naming its keys;
* logs a warning for settings that leave a branch idle but that a user may mean, or that the data
  may still make work (e.g. windows that fit only when the two views nearly coincide).

:func:`check_pretrain_model` validates every setting the ReSim model reads, with the backbone's
output shapes (a feature the backbone does not produce), where the model is built
(``ReSim.from_config``); the model's parts then trust their arguments.
"""

from __future__ import annotations

import logging
import re

import numpy as np

__all__ = ["ConfigError", "check_config", "config_problems", "check_pretrain_model"]

logger = logging.getLogger(__name__)

# a view pair with no valid window trains no region loss; below this share of pairs with at least
# one window (view pairs of a 4:3 image), the region branch is said to be mostly idle
MIN_PAIRS_WITH_WINDOWS = 0.05
_PAIRS_SAMPLED = 256


class ConfigError(ValueError):
    """Settings that can never work; the message names every key at fault."""


def _level_stride(name: str) -> int | None:
    """detectron2's naming: res<k> / p<k> have stride 2**k (res4: 16, p3: 8)."""
    m = re.fullmatch(r"(?:res|p)(\d)", name)
    return 2 ** int(m.group(1)) if m else None


def _share_of_pairs_with_windows(cfg, window: int, stride: int) -> float:
    """Share of training view pairs (of a 4:3 image) with at least one valid window."""
    from .data.view_geometry import make_windows, sample_view_pair

    views = cfg.RESIM.VIEWS
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(_PAIRS_SAMPLED):
        crop_q, crop_k, _ = sample_view_pair(
            rng, (375, 500), scale=views.SCALE, ratio=views.RATIO, flip_prob=0.0
        )
        valid = make_windows(crop_q, crop_k, views.SIZE, window, stride, views.WINDOW_PLACEMENT)[2]
        hits += bool(valid.any())
    return hits / _PAIRS_SAMPLED


def _pretrain_problems(cfg) -> tuple[list[str], list[str]]:
    from .data.view_geometry import windows_per_axis

    errors, warnings = [], []
    r, size = cfg.RESIM, cfg.RESIM.VIEWS.SIZE
    region = r.REGION.ENABLED
    weights = list(r.REGION.LOSS_WEIGHTS)
    features = list(r.REGION.IN_FEATURES)
    if region and not features:
        errors.append(
            "RESIM.REGION.ENABLED is True but RESIM.REGION.IN_FEATURES is empty: no region loss "
            "can be computed (set ENABLED False for the MoCo-v2/SimSiam baseline)"
        )
    if any(w < 0 for w in weights) or r.GLOBAL.LOSS_WEIGHT < 0:
        errors.append(
            f"negative loss weight (RESIM.REGION.LOSS_WEIGHTS {weights}, RESIM.GLOBAL.LOSS_WEIGHT "
            f"{r.GLOBAL.LOSS_WEIGHT}): the loss would be maximised"
        )
    region_trains = region and any(w > 0 for w in weights[: len(features)])
    if r.GLOBAL.LOSS_WEIGHT == 0 and not region_trains:
        errors.append(
            "every loss weight is 0 (RESIM.GLOBAL.LOSS_WEIGHT 0 and no region level with a "
            "positive RESIM.REGION.LOSS_WEIGHTS, or RESIM.REGION.ENABLED False): nothing would "
            "be trained"
        )
    elif r.GLOBAL.LOSS_WEIGHT == 0:
        warnings.append(
            "RESIM.GLOBAL.LOSS_WEIGHT is 0: the global branch is still built and computed but "
            "trains nothing (the region loss alone trains the encoder)"
        )
    if r.GLOBAL.FRAMEWORK.lower() == "moco" and r.MOCO.QUEUE_SIZE <= 0 and r.GLOBAL.LOSS_WEIGHT:
        errors.append(
            f"RESIM.MOCO.QUEUE_SIZE is {r.MOCO.QUEUE_SIZE}: the global InfoNCE has no "
            "negatives, so its loss is 0 whatever the weights"
        )
    if not region:
        return errors, warnings
    sizes, strides = list(r.REGION.WINDOW_SIZES), list(r.REGION.WINDOW_STRIDES)
    kernels = list(r.REGION.NEG_POOL_KERNELS)
    for i, f in enumerate(features):
        if i >= min(len(sizes), len(strides)):
            break  # a length mismatch is reported where the windows are built
        w, s = sizes[i], strides[i]
        if i < len(weights) and weights[i] == 0:
            warnings.append(
                f"RESIM.REGION.LOSS_WEIGHTS for '{f}' is 0: that level's windows are pooled and "
                "its head computed, but it trains nothing (drop it from RESIM.REGION.IN_FEATURES)"
            )
        if w <= 0 or s <= 0:
            errors.append(
                f"RESIM.REGION.WINDOW_SIZES/WINDOW_STRIDES for '{f}' must be > 0 ({w}/{s})"
            )
            continue
        if windows_per_axis(size, w, s) == 0:
            errors.append(
                f"no region window can ever fit: RESIM.REGION.WINDOW_SIZES for '{f}' is {w} px and "
                f"the views are RESIM.VIEWS.SIZE {size} px; the region branch would never have a "
                "window (ReSim would silently train as MoCo-v2)"
            )
            continue
        share = _share_of_pairs_with_windows(cfg, w, s)
        if share < MIN_PAIRS_WITH_WINDOWS:
            warnings.append(
                f"region windows of '{f}' (RESIM.REGION.WINDOW_SIZES {w}, WINDOW_STRIDES {s}) fit "
                f"in only {100 * share:.1f}% of view pairs (RESIM.VIEWS.SIZE {size}, SCALE "
                f"{tuple(r.VIEWS.SCALE)}, 4:3 images): the region loss will mostly be absent"
            )
        level = _level_stride(f)
        if level and i < len(kernels):
            side = -(-size // level)
            if kernels[i] > side:
                errors.append(
                    f"RESIM.REGION.NEG_POOL_KERNELS for '{f}' is {kernels[i]}, larger than its "
                    f"feature map ({side}x{side} at RESIM.VIEWS.SIZE {size}): no negative can be "
                    "pooled"
                )
    return errors, warnings


def config_problems(cfg) -> tuple[list[str], list[str]]:
    """(errors, warnings): one line each, naming the keys."""
    errors, warnings = [], []
    if cfg.SOLVER.BASE_LR <= 0 and cfg.SOLVER.MAX_ITER > 0:
        keys = "SOLVER.BASE_LR" + (
            " (set from RESIM.SCHEDULE.LR_PER_256)" if cfg.RESIM.SCHEDULE.LR_PER_256 > 0 else ""
        )
        errors.append(f"{keys} is {cfg.SOLVER.BASE_LR}: no weight would change")
    if cfg.TEST.EVAL_PERIOD > 0 and not cfg.DATASETS.TEST:
        warnings.append(f"TEST.EVAL_PERIOD is {cfg.TEST.EVAL_PERIOD} but DATASETS.TEST is empty")
    if cfg.MODEL.META_ARCHITECTURE == "ReSim":
        e, w = _pretrain_problems(cfg)
        errors += e
        warnings += w
    elif cfg.RESIM.FINETUNE.TRANSFER_FPN and "fpn" not in cfg.MODEL.BACKBONE.NAME.lower():
        errors.append(
            f"RESIM.FINETUNE.TRANSFER_FPN is True but MODEL.BACKBONE.NAME "
            f"'{cfg.MODEL.BACKBONE.NAME}' has no FPN to load the FPN weights into"
        )
    return errors, warnings


def check_config(cfg) -> list[str]:
    """Raise :class:`ConfigError` for settings that can never work; log (and return) warnings."""
    errors, warnings = config_problems(cfg)
    if errors:
        raise ConfigError(
            "the config makes part of the run do nothing:\n" + "\n".join(f"  - {e}" for e in errors)
        )
    for w in warnings:
        logger.warning(f"config: {w}")
    return warnings


# ---------------------------------------------------------------- the ReSim model's settings
_TRAINABLE_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN", "GN")
_SYNC_NORMS = ("SyncBN", "naiveSyncBN", "nnSyncBN")
_POOLER_TYPES = ("PrRoIPool", "ROIAlign")
_REGION_HEADS = ("conv", "none")


def _model_problems(cfg, shapes: dict | None) -> list[str]:
    from .modeling.precision import AMP_DTYPES, COMPILE_MODES

    r, rn = cfg.RESIM, cfg.MODEL.RESNETS
    errors = []
    if rn.NORM not in _TRAINABLE_NORMS:
        errors.append(
            f"ReSim pre-training needs trainable norms: MODEL.RESNETS.NORM must be one of "
            f"{_TRAINABLE_NORMS}, got '{rn.NORM}'"
        )
    if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
        errors.append("ReSim pre-training trains the whole encoder: set MODEL.BACKBONE.FREEZE_AT 0")
    if rn.STRIDE_IN_1X1:
        errors.append(
            "ReSim uses torchvision-style ResNets (stride in the 3x3 conv): set "
            "MODEL.RESNETS.STRIDE_IN_1X1 False"
        )
    framework = r.GLOBAL.FRAMEWORK.lower()
    if framework == "moco":
        if r.MOCO.BN not in ("shuffle", "sync"):
            errors.append(f"RESIM.MOCO.BN must be 'shuffle' or 'sync', got '{r.MOCO.BN}'")
        if r.MOCO.BN == "sync" and rn.NORM not in _SYNC_NORMS:
            errors.append(
                "RESIM.MOCO.BN 'sync' needs synchronised norms: set MODEL.RESNETS.NORM 'SyncBN'"
            )
        if r.MOCO.QUEUE_SIZE % cfg.SOLVER.IMS_PER_BATCH != 0:
            errors.append(
                f"RESIM.MOCO.QUEUE_SIZE ({r.MOCO.QUEUE_SIZE}) must be divisible by the global "
                f"batch SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH})"
            )
    if r.BN_GROUP_IMAGES < 0:
        errors.append(f"RESIM.BN_GROUP_IMAGES must be >= 0, got {r.BN_GROUP_IMAGES}")
    if r.SIMSIAM.REGION_LOSS.lower() not in ("cosine", "infonce"):
        errors.append(
            "RESIM.SIMSIAM.REGION_LOSS must be 'cosine' or 'infonce', got "
            f"'{r.SIMSIAM.REGION_LOSS}'"
        )
    if shapes is not None and r.GLOBAL.IN_FEATURE not in shapes:
        errors.append(
            f"RESIM.GLOBAL.IN_FEATURE '{r.GLOBAL.IN_FEATURE}' is not a backbone output "
            f"({sorted(shapes)}); add it to MODEL.RESNETS.OUT_FEATURES"
        )
    if r.SPEED.AMP_DTYPE not in AMP_DTYPES:
        errors.append(f"RESIM.SPEED.AMP_DTYPE must be one of {sorted(AMP_DTYPES)}")
    if r.SPEED.COMPILE_MODE not in COMPILE_MODES:
        errors.append(
            f"RESIM.SPEED.COMPILE_MODE must be one of {COMPILE_MODES}, got "
            f"'{r.SPEED.COMPILE_MODE}'"
        )
    if r.REGION.ENABLED:
        errors += _region_problems(cfg, shapes)
    return errors


def _region_problems(cfg, shapes: dict | None) -> list[str]:
    region = cfg.RESIM.REGION
    features = list(region.IN_FEATURES)
    errors = []
    for key in ("LOSS_WEIGHTS", "NEG_POOL_KERNELS", "GATHER_NEGATIVES", "NEG_GROUP_IMAGES"):
        if len(region[key]) != len(features):
            errors.append(
                f"RESIM.REGION.{key} has {len(region[key])} entries but IN_FEATURES has "
                f"{len(features)} ({features})"
            )
    if region.POOLER_TYPE not in _POOLER_TYPES:
        errors.append(f"RESIM.REGION.POOLER_TYPE must be one of {_POOLER_TYPES}")
    if region.HEAD.lower() not in _REGION_HEADS:
        errors.append(f"RESIM.REGION.HEAD must be 'conv' or 'none', got '{region.HEAD}'")
    for f in features if shapes is not None else ():
        if f not in shapes:
            errors.append(
                f"RESIM.REGION.IN_FEATURES '{f}' is not a backbone output ({sorted(shapes)})"
            )
    for f, g, gather in zip(features, region.NEG_GROUP_IMAGES, region.GATHER_NEGATIVES):
        if g < -1 or (g != 0 and gather):
            what = "-1 (RESIM.BN_GROUP_IMAGES)" if g == -1 else str(g)
            errors.append(
                f"RESIM.REGION.NEG_GROUP_IMAGES for '{f}' is {what}: it must be >= 0 (or -1), and "
                "0 when its GATHER_NEGATIVES is True (gathered negatives are one set)"
            )
    return errors


def check_pretrain_model(cfg, shapes: dict | None = None) -> None:
    """Raise :class:`ConfigError` naming every ReSim model setting that cannot work.

    ``shapes``: {name: ShapeSpec} of the built backbone's outputs (bottom-up maps included); None
    (before the backbone is built) skips the checks that need them."""
    errors = _model_problems(cfg, shapes)
    if errors:
        raise ConfigError(
            "the ReSim model cannot be built:\n" + "\n".join(f"  - {e}" for e in errors)
        )

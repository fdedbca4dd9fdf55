"""The checkpointer a training or evaluation run of ``tools/train_net.py`` uses."""

from .checkpointer import ResumableCheckpointer
from .convert import TransferCheckpointer

__all__ = ["build_checkpointer"]


def build_checkpointer(cfg, model, save_dir=None, **checkpointables):
    """A :class:`ResumableCheckpointer` (atomic saves, ``--resume`` past unreadable files) for
    ``model``; for detectors, the :class:`TransferCheckpointer` variant that applies
    ``RESIM.FINETUNE.TRANSFER_FPN`` to converted weights. ``checkpointables`` as detectron2's
    (e.g. ``trainer=weakref.proxy(trainer)``)."""
    save_dir = cfg.OUTPUT_DIR if save_dir is None else save_dir
    if cfg.MODEL.META_ARCHITECTURE == "ReSim":  # pre-training: MODEL.WEIGHTS is no conversion
        return ResumableCheckpointer(model, save_dir, **checkpointables)
    return TransferCheckpointer(
        model, save_dir, transfer_fpn=cfg.RESIM.FINETUNE.TRANSFER_FPN, **checkpointables
    )

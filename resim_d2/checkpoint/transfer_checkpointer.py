"""The fine-tuning checkpointer: :class:`~.checkpointer.ResumableCheckpointer` that applies
``RESIM.FINETUNE.TRANSFER_FPN`` to the files :func:`~.conversion.save_conversion` writes."""

from __future__ import annotations

from .checkpointer import ResumableCheckpointer
from .conversion import AUTHOR

__all__ = ["TransferCheckpointer"]


class TransferCheckpointer(ResumableCheckpointer):
    """The training checkpointer, applying ``RESIM.FINETUNE.TRANSFER_FPN`` to converted files.

    For a file written by :func:`save_conversion` (``__author__ == "resim_d2"``): with
    ``transfer_fpn`` False its ``backbone.fpn_*`` tensors are ignored (ReSim-FPN transfers the
    ResNet only; the FPN starts from detectron2's init); with ``transfer_fpn`` True a file without
    FPN tensors is an error (a ReSim-FPN^T config given a ResNet-only conversion). Other files
    (detectron2 checkpoints, ``--resume``) load unchanged.
    """

    def __init__(self, model, save_dir="", *, transfer_fpn: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.transfer_fpn = bool(transfer_fpn)

    def _load_file(self, filename):
        data = super()._load_file(filename)
        if not (isinstance(data, dict) and data.get("__author__") == AUTHOR):
            return data
        fpn = [k for k in data["model"] if k.startswith("backbone.fpn_")]
        if self.transfer_fpn and not fpn:
            raise ValueError(
                f"{filename} holds no FPN weights, but RESIM.FINETUNE.TRANSFER_FPN is True "
                "(ReSim-FPN^T): convert a ReSim-FPN checkpoint with tools/convert.py --fpn, or "
                "use the config without FPN transfer"
            )
        if not self.transfer_fpn and fpn:
            self.logger.info(
                f"RESIM.FINETUNE.TRANSFER_FPN is False: ignoring {len(fpn)} FPN tensors of "
                f"{filename} (the FPN keeps detectron2's initialisation)"
            )
            drop = set(fpn)
            data["model"] = {k: v for k, v in data["model"].items() if k not in drop}
        return data

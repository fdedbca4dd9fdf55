"""Training hooks for ReSim pre-training."""

from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase

__all__ = ["ReSimMetricsHook"]


class ReSimMetricsHook(HookBase):
    """After each step, writes the model's metrics (similarities, contrastive accuracy, valid
    windows per image) to the EventStorage: console, metrics.json, TensorBoard.

    The model keeps them as device tensors during the step; writing them costs one host sync, here
    rather than inside the forward pass.
    """

    def after_step(self):
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        model.put_metrics(self.trainer.storage)

"""torch's random state in checkpoints, so that ``--resume`` draws what the uninterrupted run drew.

The data stream is a function of (seed, position) and needs no state; but MoCo's shuffle-BN draws
its permutation of the batch from torch's generator on the first process (then broadcasts it),
and a resumed run started from a fresh seed draws another one. With GroupNorm the permutation
changes no value, only the order of sums (float32 rounding); with batch norm it changes which
samples share statistics. :class:`RNGStateHook` saves the first process's CPU (and current CUDA
device's) generator state with each checkpoint and restores it on every process when the resumed
run starts.
"""

import torch

from detectron2.engine import HookBase

__all__ = ["RNGStateHook"]


class RNGStateHook(HookBase):
    """Checkpoints torch's generator states (see the module docstring)."""

    def __init__(self):
        self._loaded = None

    def state_dict(self):
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict):
        # applied in before_train: building the resumed data loader still draws from torch's
        # generator, which the uninterrupted run did before the checkpoint
        self._loaded = state_dict

    def before_train(self):
        state, self._loaded = self._loaded, None
        if not state:
            return
        if "cpu" in state:
            torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())

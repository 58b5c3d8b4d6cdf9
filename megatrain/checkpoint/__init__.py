"""Checkpoints: the on-disk layout (``layout``), writing one (``save``), choosing and verifying one
(``select``: one rule for training and conversion), loading one (``resume``, ``optim_state``,
``rng``), and whether a run may continue from it (``compat``). :class:`Checkpointer` ties them to
the parts of a run."""

from megatrain.checkpoint.layout import CheckpointError
from megatrain.checkpoint.manager import Checkpointer
from megatrain.checkpoint.parts import Progress, RunParts

__all__ = ["CheckpointError", "Checkpointer", "Progress", "RunParts"]

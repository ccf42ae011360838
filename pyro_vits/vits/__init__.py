"""Trained VITS-family checkpoints: reading them, the generator's latent path, and exporting one."""

from __future__ import annotations

from .config import read_vits_config
from .export import export_vits_generator, vits_config, vits_generator_state
from .flow_checkpoint import MAX_MESSAGE, VITSFlowCheckpoint, load_vits_flow, read_vits_checkpoint
from .generator import ENC_Q_DILATION, VITSGenerator, VITSPosteriorEncoder, load_vits_generator
from .layouts import LAYOUTS, Layout
from .reader import Checkpoint, read_checkpoint

__all__ = ["vits_generator_state", "vits_config", "export_vits_generator", "load_vits_flow", "read_vits_checkpoint", "VITSFlowCheckpoint", "MAX_MESSAGE", "ENC_Q_DILATION", "VITSPosteriorEncoder", "VITSGenerator", "read_vits_config", "load_vits_generator", "LAYOUTS", "Layout", "Checkpoint", "read_checkpoint"]

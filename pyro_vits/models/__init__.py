"""Pyro models and guides: VITS's prior model on teacher data, the speech model, Gaussian guides and the
synthetic teacher."""

from __future__ import annotations

from .guides import GaussianGuide, LocalGuide, ObservationGuide, PosteriorEncoder
from .prior_model import DECODERS, VITSPriorModel
from .speech import (
    LIKELIHOODS,
    LOG_FLOOR,
    N_MELS,
    PRESETS,
    SIZE_KEYS,
    SpectrogramDecoder,
    SpeechModel,
    build_pair,
    log_spectrogram,
    speech_model_and_guide,
)
from .teacher import make_teacher, sample_dataset

__all__ = ["GaussianGuide", "PosteriorEncoder", "LocalGuide", "ObservationGuide", "DECODERS", "VITSPriorModel", "LIKELIHOODS", "LOG_FLOOR", "N_MELS", "log_spectrogram", "SpectrogramDecoder", "SpeechModel", "speech_model_and_guide", "SIZE_KEYS", "PRESETS", "build_pair", "make_teacher", "sample_dataset"]

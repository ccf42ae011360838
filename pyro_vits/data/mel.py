"""VITS's mel spectrogram (``mel_processing.mel_spectrogram_torch``) with librosa's Slaney mel filterbank.

``mel_filterbank(sr, n_fft, n_mels, fmin, fmax)`` is ``librosa.filters.mel(sr=, n_fft=, n_mels=, fmin=, fmax=)``
with its defaults (``htk=False``: the Slaney mel scale, linear below 1 kHz and logarithmic above;
``norm="slaney"``: each triangle divided by half its width in Hz, so every filter has unit area), written in
numpy so librosa is not needed. :func:`mel_spectrogram` is VITS's: reflect pad ``(n_fft - hop) / 2`` on each
side, ``torch.stft`` with a periodic Hann window of ``win_length``, ``center=False``, magnitude
``sqrt(re^2 + im^2 + 1e-6)``, the filterbank, ``log(clamp(x, 1e-5))``; its last two steps are
:func:`spec_to_mel` (VITS's ``spec_to_mel_torch``), the log-mel of a linear magnitude spectrogram.
Defaults: VITS's ``ljs_base`` (80 mels, ``n_fft = win = 1024``, ``hop = 256``, ``fmin = 0``, ``fmax = None``
= Nyquist)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from .audio import linear_spectrogram

__all__ = ["hz_to_mel", "mel_to_hz", "mel_filterbank", "mel_basis", "spec_to_mel", "mel_spectrogram"]

_F_SP = 200.0 / 3  # Slaney: 66.67 Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """librosa's ``hz_to_mel(htk=False)`` (Slaney): linear below 1 kHz, logarithmic above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    mels = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mels)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """The inverse of :func:`hz_to_mel` (librosa's ``mel_to_hz(htk=False)``)."""
    mels = np.asanyarray(mels, dtype=np.float64)
    freqs = _F_SP * mels
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL))
    return np.where(mels >= _MIN_LOG_MEL, log_part, freqs)


def mel_filterbank(sr: int, n_fft: int, n_mels: int = 80, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` float32 Slaney-normalised triangular filters (``librosa.filters.mel``)."""
    if fmax is None:
        fmax = sr / 2.0
    if not 0 <= fmin < fmax <= sr / 2.0 or n_mels < 1 or n_fft < 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sr/2, n_mels >= 1, n_fft >= 2; got sr={sr}, n_fft={n_fft}, "
                         f"n_mels={n_mels}, fmin={fmin}, fmax={fmax}")
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> Tensor:
    return torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax))


def mel_basis(sr: int, n_fft: int, n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """:func:`mel_filterbank` as a tensor (cached on CPU, copied to ``dtype``/``device``)."""
    return _basis(int(sr), int(n_fft), int(n_mels), float(fmin), None if fmax is None else float(fmax)).to(
        dtype=dtype, device=device)


def spec_to_mel(spec: Tensor, sr: int = 22050, n_fft: int = 1024, n_mels: int = 80, fmin: float = 0.0,
                fmax: float | None = None) -> Tensor:
    """VITS's ``spec_to_mel_torch``: linear magnitudes ``(..., n_fft // 2 + 1, frames)`` -> log mel magnitudes
    ``(..., n_mels, frames)``, ``log(clamp(mel_basis @ spec, 1e-5))`` (natural log). Differentiable."""
    mel = torch.matmul(mel_basis(sr, n_fft, n_mels, fmin, fmax, dtype=spec.dtype, device=spec.device), spec)
    return torch.log(torch.clamp(mel, min=1e-5))


def mel_spectrogram(wav: Tensor, sr: int = 22050, n_fft: int = 1024, hop_length: int = 256,
                    win_length: int = 1024, n_mels: int = 80, fmin: float = 0.0,
                    fmax: float | None = None) -> Tensor:
    """VITS's ``mel_spectrogram_torch``: ``(..., samples) -> (..., n_mels, frames)`` log mel magnitudes,
    ``frames = samples // hop_length`` for ``samples`` a multiple of ``hop_length``. Differentiable."""
    return spec_to_mel(linear_spectrogram(wav, n_fft, hop_length, win_length), sr, n_fft, n_mels, fmin, fmax)

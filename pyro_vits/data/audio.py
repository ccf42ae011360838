"""WAV files and linear spectrograms as VITS computes them (``torch.stft``, no torchaudio)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .._validate import check_positive_ints


def linear_spectrogram(wav: Tensor, n_fft: int, hop_length: int, win_length: int) -> Tensor:
    """VITS's ``mel_processing.spectrogram_torch``: ``(..., samples) -> (..., n_fft // 2 + 1, frames)``.

    Reflect-pads ``(n_fft - hop_length) // 2`` samples on each side, then an STFT with a periodic Hann window
    of ``win_length``, ``center=False``, one-sided and unnormalised; returns ``sqrt(re^2 + im^2 + 1e-6)``.
    ``frames = (samples + 2 pad - n_fft) // hop_length + 1``. Dtype and device follow ``wav``.
    """
    check_positive_ints(n_fft=n_fft, hop_length=hop_length, win_length=win_length)
    if not isinstance(wav, Tensor) or not wav.is_floating_point() or wav.dim() < 1:
        raise TypeError(f"wav must be a floating Tensor of shape (..., samples), got {wav!r:.80}")
    if win_length > n_fft or hop_length > n_fft:
        raise ValueError(
            f"win_length and hop_length must be <= n_fft={n_fft}, got {win_length}, {hop_length}"
        )
    pad = (n_fft - hop_length) // 2
    samples = wav.shape[-1]
    if samples + 2 * pad < n_fft or samples <= pad:
        raise ValueError(f"wav has {samples} samples: too short for n_fft={n_fft}, hop_length={hop_length}")
    flat = wav.reshape(-1, 1, samples)
    flat = F.pad(flat, (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(win_length, dtype=wav.dtype, device=wav.device)
    stft = torch.stft(
        flat,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.sqrt(stft.real.pow(2) + stft.imag.pow(2) + 1e-6)
    return spec.reshape(wav.shape[:-1] + spec.shape[-2:])


def read_wav(path: str | Path, sampling_rate: int, resample: bool = False) -> Tensor:
    """A mono WAV (any format ``soundfile`` reads) as float32 ``(samples,)`` in ``[-1, 1]``.

    A file at another rate raises ``ValueError`` naming it, unless ``resample`` (then
    ``scipy.signal.resample_poly`` converts it to ``sampling_rate``). 16-bit PCM gives VITS's
    ``audio / 32768`` exactly.
    """
    import soundfile

    check_positive_ints(sampling_rate=sampling_rate)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"wav file not found: {path}")
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from err
    if audio.shape[1] != 1:
        raise ValueError(f"{path}: {audio.shape[1]} channels, VITS expects mono audio")
    audio = audio[:, 0]
    if rate != sampling_rate:
        if not resample:
            raise ValueError(
                f"{path}: sampling rate {rate} Hz, the config expects {sampling_rate} Hz "
                "(resample the corpus, or ask for resampling)"
            )
        from scipy.signal import resample_poly

        g = math.gcd(rate, sampling_rate)
        audio = resample_poly(audio, sampling_rate // g, rate // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(audio))

"""VITS's mel spectrogram: the Slaney filterbank against its defining properties (and librosa when present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_vits.data.mel import hz_to_mel, mel_filterbank, mel_spectrogram, mel_to_hz


def test_slaney_scale_is_linear_below_1khz_and_log_above():
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(200.0) == pytest.approx(3.0)
    assert hz_to_mel(6400.0) - hz_to_mel(1000.0) == pytest.approx(27.0)  # log step: 6.4x per 27 mels
    f = np.array([0.0, 50.0, 999.0, 1000.0, 4000.0, 11025.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, rtol=1e-12, atol=1e-9)


def test_filterbank_shape_area_and_overlap():
    fb = mel_filterbank(22050, 1024, 80)
    assert fb.shape == (80, 513) and fb.dtype == np.float32 and (fb >= 0).all()
    assert (fb.sum(1) > 0).all()  # every filter sees some bin
    # Slaney norm: triangle of height 2/(f_hi - f_lo) over [f_lo, f_hi] -> unit area in Hz (Riemann sum)
    bin_hz = 22050 / 1024
    area = fb.sum(1) * bin_hz
    np.testing.assert_allclose(area[10:], 1.0, rtol=0.05)
    peaks = fb.argmax(1)
    assert (np.diff(peaks) >= 0).all()  # centres increase


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    for args in [(22050, 1024, 80, 0.0, None), (16000, 512, 40, 50.0, 7000.0)]:
        want = librosa.filters.mel(sr=args[0], n_fft=args[1], n_mels=args[2], fmin=args[3], fmax=args[4])
        np.testing.assert_allclose(mel_filterbank(*args), want, rtol=1e-5, atol=1e-7)


def test_mel_spectrogram_frames_and_tone_peak():
    sr, hop = 22050, 256
    t = torch.arange(hop * 40) / sr
    wav = 0.5 * torch.sin(2 * np.pi * 2000.0 * t)
    mel = mel_spectrogram(wav[None])
    assert mel.shape == (1, 80, 40)
    assert torch.isfinite(mel).all() and float(mel.min()) >= np.log(1e-5) - 1e-6
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), 82))[1:-1]
    assert abs(centres[int(mel[0, :, 20].argmax())] - 2000.0) < 150.0
    wav.requires_grad_(True)
    mel_spectrogram(wav[None]).sum().backward()
    assert torch.isfinite(wav.grad).all()

"""The speech model's likelihoods: ``laplace-mel`` is VITS's ``c_mel * mel L1`` per frame (by hand), padded
frames contribute 0, its target is VITS's log-mel of the waveform; ``gaussian-linear`` stays the default."""

from __future__ import annotations

import math

import pytest
import soundfile
import torch
from pyro import poutine
from speech_helpers import SIZES, SPEECH, TINY

from pyro_vits.data.audio import linear_spectrogram
from pyro_vits.data.mel import mel_basis, mel_spectrogram
from pyro_vits.data.speech_data import SpeechData, read_corpus
from pyro_vits.data.text import VITS_SYMBOLS
from pyro_vits.distributions import MaskedLaplace, MaskedNormal
from pyro_vits.models import LIKELIHOODS, N_MELS, SpeechModel, speech_model_and_guide
from pyro_vits.models.refit import C_MEL


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(TINY, SPEECH)


def mel_pair(dtype=torch.float64):
    torch.manual_seed(0)
    model, guide = speech_model_and_guide(len(VITS_SYMBOLS), SPEECH.n_freq, likelihood="laplace-mel",
                                          n_speakers=2, gin_channels=4, **SIZES)
    return model.to(dtype), guide.to(dtype)


def as_double(d: SpeechData) -> SpeechData:
    return SpeechData(d.spec.double(), d.lengths, d.text, d.text_lengths, d.speaker)


def traced(model, guide, data):
    """The model's trace at the guide's draw."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(data)
        return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data)


def test_laplace_mel_log_likelihood_is_minus_c_mel_times_mel_l1_per_frame(corpus):
    model, guide = mel_pair()
    data = as_double(corpus.train)
    assert len(set(data.lengths.tolist())) > 1  # the batch has padding
    trace = traced(model, guide, data)
    site = trace.nodes["x"]
    assert isinstance(site["fn"], MaskedLaplace) and site["value"].shape == (4, N_MELS, data.frames)
    with torch.no_grad():  # by hand: VITS's spec_to_mel target, the decoder's mean, 45 x mean L1 per frame
        target = torch.log(torch.clamp(mel_basis(22050, 256, dtype=torch.float64) @ data.spec, min=1e-5))
        loc = model.dec(trace.nodes["z"]["value"], data.mask)
        frames = data.lengths.double()
        mean_l1 = ((target - loc).abs() * data.mask).sum((-2, -1)) / (N_MELS * frames)
        b = N_MELS / 45.0
        want = -45.0 * mean_l1 * frames - frames * N_MELS * math.log(2 * b)
        got = site["fn"].log_prob(site["value"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert C_MEL == 45.0 and float(site["fn"].scale.max()) == float(site["fn"].scale.min()) == b


def test_laplace_mel_padded_frames_contribute_zero(corpus):
    model, guide = mel_pair()
    data = as_double(corpus.train)
    trace = traced(model, guide, data)
    site = trace.nodes["x"]
    noisy = site["value"] + 1e6 * (1 - data.mask)  # anything on padded frames
    torch.testing.assert_close(site["fn"].log_prob(noisy), site["fn"].log_prob(site["value"]), rtol=0, atol=0)
    for i, n in enumerate(data.lengths.tolist()):  # each utterance alone, without padding
        alone = data.subset(torch.tensor([i]))
        assert alone.frames == n
        z = trace.nodes["z"]["value"][i : i + 1, :, :n]
        with torch.no_grad():
            single = model.likelihood(z, alone).log_prob(model.observation(alone.spec))
        torch.testing.assert_close(single[0], site["fn"].log_prob(site["value"])[i], rtol=1e-12, atol=1e-9)


def test_laplace_mel_target_is_vits_mel_of_the_waveform():
    model, _ = mel_pair(torch.float32)
    wav = torch.from_numpy(soundfile.read(str(next((TINY / "wavs").glob("*.wav"))), dtype="float32")[0])
    wav = wav[: wav.shape[0] // 128 * 128]
    spec = linear_spectrogram(wav, 256, 128, 256)
    torch.testing.assert_close(model.observation(spec), mel_spectrogram(wav, 22050, 256, 128, 256),
                               rtol=0, atol=0)


def test_gaussian_linear_stays_the_default_and_the_choice_is_recorded(corpus):
    assert tuple(LIKELIHOODS) == ("gaussian-linear", "laplace-mel")
    torch.manual_seed(0)
    model, _ = speech_model_and_guide(len(VITS_SYMBOLS), SPEECH.n_freq, **SIZES)
    assert model.config["likelihood"] == "gaussian-linear" and model.dec.proj.out_channels == SPEECH.n_freq
    assert model.log_sigma_x.shape == (SPEECH.n_freq,)
    batch = corpus.train.subset(torch.arange(2))
    z = torch.zeros(2, SIZES["inter_channels"], batch.frames)
    assert isinstance(model.likelihood(z, batch), MaskedNormal)
    mel_model, _ = mel_pair()
    assert mel_model.config["likelihood"] == "laplace-mel" and mel_model.dec.proj.out_channels == N_MELS
    assert not hasattr(mel_model, "log_sigma_x")
    with pytest.raises(ValueError, match="likelihood"):
        SpeechModel(len(VITS_SYMBOLS), SPEECH.n_freq, likelihood="laplace-linear")

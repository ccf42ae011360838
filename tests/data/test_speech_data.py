"""VITS's data path: symbols, spectrogram, WAV reading, filelists, LJSpeech folders, streaming batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from pyro_vits.data.audio import linear_spectrogram, read_wav
from pyro_vits.data.filelists import open_corpus, read_filelist
from pyro_vits.data.speech_batches import SpeechConfig, speech_batches
from pyro_vits.data.text import VITS_SYMBOLS, cleaned_text_to_sequence, intersperse


def stft_reference(wav: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """VITS's spectrogram written out: reflect pad (n_fft - hop) / 2, frames every hop, a periodic Hann
    window of win samples centred in n_fft, one-sided DFT, sqrt(|X|^2 + 1e-6)."""
    pad = int((n_fft - hop) / 2)
    x = torch.nn.functional.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    frames = x.unfold(-1, n_fft, hop)  # (B, frames, n_fft)
    n = torch.arange(win, dtype=wav.dtype)
    window = torch.zeros(n_fft, dtype=wav.dtype)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * torch.cos(2 * math.pi * n / win)
    spectrum = torch.fft.rfft(frames * window, dim=-1)
    return torch.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-6).transpose(1, 2)


def vits_spectrogram_torch(y: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """VITS's ``spectrogram_torch`` call sequence with torch.stft (its real/imag pairs, squared and summed)."""
    pad = int((n_fft - hop) / 2)
    y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        y,
        n_fft,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win, dtype=y.dtype),
        center=False,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    return torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-6)


@pytest.mark.parametrize("n_fft,hop,win", [(64, 16, 64), (64, 16, 48), (512, 128, 512)])
def test_linear_spectrogram_matches_vits_formula(n_fft, hop, win):
    wav = (
        torch.rand(2, 2000, generator=torch.Generator().manual_seed(n_fft + win), dtype=torch.float64) * 2 - 1
    )
    spec = linear_spectrogram(wav, n_fft, hop, win)
    expected = stft_reference(wav, n_fft, hop, win)
    torch.testing.assert_close(spec, vits_spectrogram_torch(wav, n_fft, hop, win), rtol=1e-5, atol=1e-7)
    assert (
        spec.shape
        == expected.shape
        == (2, n_fft // 2 + 1, (2000 + 2 * ((n_fft - hop) // 2) - n_fft) // hop + 1)
    )
    torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(linear_spectrogram(wav[1], n_fft, hop, win), spec[1])  # any leading dims
    assert (
        linear_spectrogram(wav.float().reshape(1, 2, 2000), n_fft, hop, win).shape == (1, 2) + spec.shape[1:]
    )


def test_linear_spectrogram_rejects_bad_input():
    with pytest.raises(ValueError, match="too short"):
        linear_spectrogram(torch.zeros(10), 64, 16, 64)
    with pytest.raises(ValueError, match="win_length"):
        linear_spectrogram(torch.zeros(100), 64, 16, 128)
    with pytest.raises(TypeError, match="wav"):
        linear_spectrogram(torch.zeros(100, dtype=torch.long), 64, 16, 64)


def test_symbols_and_sequences():
    assert len(VITS_SYMBOLS) == 178 and VITS_SYMBOLS[0] == "_" and VITS_SYMBOLS.index(" ") == 16
    assert cleaned_text_to_sequence("ab ") == [VITS_SYMBOLS.index("a"), VITS_SYMBOLS.index("b"), 16]
    assert cleaned_text_to_sequence("ðə") == [VITS_SYMBOLS.index("ð"), VITS_SYMBOLS.index("ə")]
    assert cleaned_text_to_sequence("'") == [len(VITS_SYMBOLS) - 2]  # listed twice: the later id, as VITS
    assert intersperse([5, 6], 0) == [0, 5, 0, 6, 0] and intersperse([], 0) == [0]
    with pytest.raises(ValueError, match=r"unknown symbol '7' \(U\+0037\) at character 2"):
        cleaned_text_to_sequence("ab7")


def write_wav(path, seconds=0.3, rate=8000, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    soundfile.write(str(path), (chirp + noise).astype(np.float32), rate, subtype="PCM_16")


def test_read_wav_rate_check_and_resampling(tmp_path):
    write_wav(tmp_path / "a.wav", rate=8000)
    audio = read_wav(tmp_path / "a.wav", 8000)
    pcm, _ = soundfile.read(str(tmp_path / "a.wav"), dtype="int16")
    assert audio.dtype == torch.float32 and torch.equal(audio, torch.from_numpy(pcm / 32768.0).float())
    with pytest.raises(ValueError, match=r"a\.wav: sampling rate 8000 Hz, the config expects 16000 Hz"):
        read_wav(tmp_path / "a.wav", 16000)
    assert read_wav(tmp_path / "a.wav", 16000, resample=True).shape == (2 * audio.shape[0],)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav", 8000)
    soundfile.write(str(tmp_path / "stereo.wav"), np.zeros((100, 2), np.float32), 8000)
    with pytest.raises(ValueError, match="2 channels"):
        read_wav(tmp_path / "stereo.wav", 8000)


def make_corpus(tmp_path, lines):
    for i in range(3):
        write_wav(tmp_path / f"u{i}.wav", seconds=0.2 + 0.1 * i, seed=i)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "list.txt"


CONFIG = SpeechConfig(sampling_rate=8000, filter_length=256, hop_length=64, win_length=256)


def test_filelist_batches_are_padded_and_streamed(tmp_path):
    filelist = make_corpus(tmp_path, ["u0.wav|ab", "", "u1.wav|abc d", "u2.wav|ðə"])
    batches = list(speech_batches(read_filelist(filelist, tmp_path), CONFIG, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    first = batches[0]
    assert first.text_lengths.tolist() == [5, 11]  # add_blank: 2 n + 1
    assert first.text.shape == (2, 11) and first.text[0, 5:].eq(0).all()
    assert first.spec.shape[:2] == (2, 129) and first.spec_lengths.tolist() == [1600 // 64, 2400 // 64]
    assert first.spec[0, :, 25:].eq(0).all() and first.speakers is None
    assert first.sources == (f"{filelist}:1", f"{filelist}:3")
    assert len(list(speech_batches(read_filelist(filelist, tmp_path), CONFIG, 2, max_utterances=1))) == 1


def test_multispeaker_filelist_and_ljspeech_folder(tmp_path):
    filelist = make_corpus(tmp_path, ["u0.wav|3|ab", "u1.wav|0|cd"])
    (batch,) = speech_batches(open_corpus(filelist, tmp_path), CONFIG, batch_size=4)
    assert batch.speakers.tolist() == [3, 0]
    (tmp_path / "wavs").mkdir()
    for i in range(2):
        (tmp_path / f"u{i}.wav").rename(tmp_path / "wavs" / f"LJ{i}.wav")
    (tmp_path / "metadata.csv").write_text("LJ0|Raw 1|raw one\nLJ1|Two|two\n", encoding="utf-8")
    (batch,) = speech_batches(open_corpus(tmp_path), CONFIG, batch_size=4)
    assert batch.text_lengths.tolist() == [15, 7]


@pytest.mark.parametrize(
    "lines,error,match",
    [
        (
            ["u0.wav|ab", "missing.wav|ab"],
            FileNotFoundError,
            r"list\.txt:2: wav file not found: .*missing\.wav",
        ),
        (["u0.wav|a7"], ValueError, r"list\.txt:1: unknown symbol '7'"),
        (["u0.wav|ab", "u1.wav|1|ab"], ValueError, r"list\.txt:2: 3 fields where earlier lines have 2"),
        (["u0.wav|x|ab"], ValueError, r"list\.txt:1: speaker id must be"),
        (["u0.wav"], ValueError, r"list\.txt:1: expected 'wav_path\|text'"),
        (["u0.wav|"], ValueError, r"list\.txt:1: empty text"),
        ([""], ValueError, r"list\.txt: the filelist has no utterances"),
    ],
)
def test_bad_corpus_lines_name_file_and_line(tmp_path, lines, error, match):
    filelist = make_corpus(tmp_path, lines)
    with pytest.raises(error, match=match):
        list(speech_batches(open_corpus(filelist, tmp_path), CONFIG, batch_size=1))


def test_wrong_rate_names_line_and_config_from_vits(tmp_path):
    filelist = make_corpus(tmp_path, ["u0.wav|ab"])
    config = SpeechConfig.from_vits_config(
        {
            "data": {
                "sampling_rate": 22050,
                "filter_length": 256,
                "hop_length": 64,
                "win_length": 256,
                "add_blank": False,
            }
        }
    )
    assert config.n_freq == 129 and not config.add_blank and config.symbols == VITS_SYMBOLS
    with pytest.raises(ValueError, match=r"list\.txt:1: .*u0\.wav: sampling rate 8000 Hz"):
        list(speech_batches(open_corpus(filelist, tmp_path), config, batch_size=1))
    with pytest.raises(ValueError, match="no 'data' section"):
        SpeechConfig.from_vits_config({"model": {}})
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        open_corpus(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="no metadata.csv"):
        list(open_corpus(tmp_path))

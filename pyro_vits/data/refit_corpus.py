"""A corpus for refitting a trained voice's posterior encoder: VITS's linear spectrograms, the waveforms
(for the mel reconstruction loss) and symbol ids in the *voice's* symbol table.

Text ids: a Piper voice (``phoneme_id_map``) maps the espeak IPA text as Piper's ``phonemes_to_ids`` does
(NFD-decomposed characters; ``^``, then each phoneme's ids followed by the pad ``_``, then ``$``; phonemes
not in the map are skipped, as Piper does, and counted); otherwise VITS's ``cleaned_text_to_sequence`` in
``symbols`` with ``intersperse(ids, 0)`` when ``add_blank``."""

from __future__ import annotations

import copy
import logging
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from .audio import linear_spectrogram, read_wav
from .filelists import open_corpus, read_ljspeech
from .speech_data import SpeechData
from .text import VITS_SYMBOLS, cleaned_text_to_sequence, intersperse, piper_phoneme_ids

logger = logging.getLogger("pyro_vits")

MAX_SKIPPED = 0.01
"""The largest fraction of a corpus's phonemes a Piper voice may skip (not in its ``phoneme_id_map``); more
means the corpus is in another symbol table."""

__all__ = ["MAX_SKIPPED", "RefitData", "TextIds", "read_refit_corpus"]


@dataclass(frozen=True)
class TextIds:
    """How text becomes ids: a Piper ``phoneme_id_map``, or VITS's ``symbols`` (+ ``add_blank``)."""

    phoneme_id_map: Mapping[str, Sequence[int]] | None = None
    symbols: tuple[str, ...] = VITS_SYMBOLS
    add_blank: bool = True

    def __call__(self, text: str) -> tuple[list[int], int]:
        if self.phoneme_id_map is not None:
            return piper_phoneme_ids(text, self.phoneme_id_map)
        ids = cleaned_text_to_sequence(text, self.symbols)
        return (intersperse(ids, 0) if self.add_blank else ids), 0


@dataclass
class RefitData(SpeechData):
    """:class:`~pyro_vits.data.speech_data.SpeechData` plus the waveforms: ``wav (N, S)`` float (0 beyond
    each utterance's audio) and ``hop`` samples per frame (``wav`` has at least ``frames * hop`` samples)."""

    wav: Tensor | None = None
    hop: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.wav, Tensor) or self.wav.dim() != 2 or self.wav.shape[0] != self.n:
            raise ValueError(f"wav must be an (N={self.n}, samples) tensor, got {self.wav!r:.60}")
        if self.wav.shape[1] < self.frames * self.hop:
            self.wav = F.pad(self.wav, (0, self.frames * self.hop - self.wav.shape[1]))

    def _derive(self, fn: Callable[[Tensor], Tensor]) -> RefitData:
        new = super()._derive(fn)
        new.wav = fn(self.wav)
        return new

    def subset(self, idx: Tensor) -> RefitData:
        new = super().subset(idx)
        new.wav = new.wav[:, : new.frames * new.hop]
        return new

    def describe(self) -> dict:
        return dict(super().describe(), kind="refit", samples=int(self.wav.shape[1]), hop=self.hop)


def _load(utterances, text_ids: TextIds, sampling_rate: int, n_fft: int, hop: int, win: int,
          max_utterances: int | None, max_frames: int | None) -> RefitData:
    texts, specs, wavs, speakers, skipped, texts_read = [], [], [], [], 0, []
    for utt in utterances:
        if max_utterances is not None and len(texts) >= max_utterances:
            break
        try:
            ids, n_skip = text_ids(utt.text)
            wav = read_wav(utt.wav_path, sampling_rate)
            spec = linear_spectrogram(wav, n_fft, hop, win)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{utt.source}: {err}") from err
        if max_frames is not None and spec.shape[-1] > max_frames:
            continue
        if spec.shape[-1] < len(ids):
            raise ValueError(f"{utt.source}: {spec.shape[-1]} frames for {len(ids)} symbols")
        skipped += n_skip
        texts_read.append(utt.text)
        texts.append(torch.tensor(ids, dtype=torch.long))
        specs.append(spec)
        wavs.append(wav)
        speakers.append(utt.speaker)
    if not texts:
        raise ValueError("no utterances read (all longer than max_frames?)")
    total = sum(len(unicodedata.normalize("NFD", u)) for u in texts_read)
    if skipped > MAX_SKIPPED * total:
        raise ValueError(f"{skipped} of {total} phonemes of the corpus are not in the voice's phoneme_id_map: the "
                         "corpus is in another symbol table (build it with espeak IPA: pyro-vits corpus "
                         "--symbols phonemes)")
    if skipped:
        logger.warning("%d phonemes not in the voice's phoneme_id_map were skipped (as Piper does)", skipped)

    def pad(ts: list[Tensor]) -> Tensor:
        longest = max(t.shape[-1] for t in ts)
        return torch.stack([F.pad(t, (0, longest - t.shape[-1])) for t in ts])

    speaker = None if speakers[0] is None else torch.tensor(speakers, dtype=torch.long)
    return RefitData(pad(specs), torch.tensor([s.shape[-1] for s in specs]), pad(texts),
                     torch.tensor([len(t) for t in texts]), speaker, wav=pad(wavs), hop=hop)


def read_refit_corpus(folder: str | Path, text_ids: TextIds, *, sampling_rate: int = 22050, n_fft: int = 1024,
                      hop_length: int = 256, win_length: int = 1024, max_utterances: int | None = None,
                      max_frames: int | None = None, speakers: bool = True, split: str = "train") -> RefitData:
    """The training utterances of an LJSpeech-format ``folder`` (``train.txt`` when present, else
    ``metadata.csv``), or with ``split="val"`` its held-out ones (``val.txt``); utterances longer than
    ``max_frames`` frames are dropped; without ``speakers`` (or for a single-speaker voice) the filelists'
    speaker ids are dropped."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"corpus {folder} is not a folder (expected an LJSpeech-format folder)")
    next(read_ljspeech(folder))
    filelist = folder / f"{split}.txt"
    if split == "val" and not filelist.is_file():
        raise FileNotFoundError(f"corpus {folder} has no val.txt (held-out utterances)")
    source = open_corpus(filelist, folder) if filelist.is_file() else open_corpus(folder)
    data = _load(source, text_ids, sampling_rate, n_fft, hop_length, win_length, max_utterances, max_frames)
    if not speakers:
        data = copy.copy(data)
        data.speaker = None
    return data

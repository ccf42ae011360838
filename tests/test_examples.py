"""examples/fit_vits_prior.py (the tutorial) end to end, and the options of pyro_vits.apps.fit behind
``pyro-vits fit``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vits.apps import fit as fit_app

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fit_vits_prior.py"
TINY = ["--steps", "5", "--n-train", "16", "--n-heldout", "4", "--frames", "12", "--hidden", "8",
        "--channels", "4", "--n-flows", "2", "--batch-size", "4", "--log-every", "5", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("fit_vits_prior", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_runs_and_writes_its_files(example, tmp_path, capsys):
    out = tmp_path / "run"
    result = example.main(example.parse_args([*TINY, "--out", str(out)]))
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 5
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    for who in ("student", "teacher"):
        for key in ("elbo_per_frame", "loglik_iwae_per_frame", "kl_per_frame"):
            assert math.isfinite(result[who][key]), (who, key)
    assert result["teacher"]["loglik_iwae_per_frame"] > result["student"]["loglik_iwae_per_frame"]
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "nats/frame" in printed


@pytest.mark.slow
def test_tutorial_into_a_used_folder_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(EXAMPLE), *TINY, "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "is not empty" in proc.stderr, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_command_line_flags():
    args = fit_app.parse_args([])
    assert (args.mean_only, args.vectorize, args.device, args.out) == (True, True, "auto", None)
    assert fit_app.parse_args(["--affine"]).mean_only is False
    assert fit_app.parse_args(["--no-mean-only"]).mean_only is False
    assert fit_app.parse_args(["--no-vectorize"]).vectorize is False
    args = fit_app.parse_args(["--particles", "4", "--batch-size", "8", "--channels", "6", "--frames", "20"])
    assert (args.particles, args.batch_size, args.channels, args.frames) == (4, 8, 6, 20)
    config = fit_app.fit_config(args, Path("runs/x"))
    assert (config.steps, config.batch_size, config.out_dir, config.resume) == (400, 8, Path("runs/x"), False)
    assert config.lrd == pytest.approx(0.05 ** (1 / 400))

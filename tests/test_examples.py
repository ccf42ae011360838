"""examples/fit_vits_prior.py end to end (few steps) and its command line."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fit_vits_prior.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("fit_vits_prior", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_vits_prior_runs_and_writes_its_files(example, tmp_path, capsys):
    out = tmp_path / "run"
    result = example.main(example.parse_args(["--steps", "5", "--out", str(out), "--no-progress"]))
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "figures/training_curves.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 5
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["steps"] == 5 and config["seed"] == 0
    for who in ("student", "teacher"):
        for key in ("elbo_per_frame", "loglik_iwae_per_frame", "kl_per_frame"):
            assert math.isfinite(result[who][key]), (who, key)
    assert result["teacher"]["loglik_iwae_per_frame"] > result["student"]["loglik_iwae_per_frame"]
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "nats/frame" in printed


def test_command_line_flags(example):
    args = example.parse_args([])
    assert (args.mean_only, args.vectorize, args.device, args.out) == (True, True, "auto", None)
    assert example.parse_args(["--affine"]).mean_only is False
    assert example.parse_args(["--no-mean-only"]).mean_only is False
    assert example.parse_args(["--no-vectorize"]).vectorize is False
    args = example.parse_args(["--particles", "4", "--batch-size", "8", "--channels", "6", "--frames", "20"])
    assert (args.particles, args.batch_size, args.channels, args.frames) == (4, 8, 6, 20)

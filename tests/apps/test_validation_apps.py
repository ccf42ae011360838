"""``pyro-vits fit`` rejects bad option values with exit code 2 and a one-line message naming the option
(no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from validation_helpers import HIDDEN, NO_CUDA, C, cli_error, vits_state

from pyro_vits import cli
from pyro_vits.flows import ResidualCouplingBlock

pytestmark = pytest.mark.usefixtures("single_thread")


def test_odd_channel_count_cli(capsys):
    err = cli_error(capsys, "--channels", "5")
    assert "argument --channels: must be an even positive int (couplings split it in halves), got '5'" in err


def test_nan_or_inf_cli_values(capsys):
    assert "argument --lr: must be a positive float, got 'inf'" in cli_error(capsys, "--lr", "inf")
    assert "argument --sigma-x: must be a positive float, got 'nan'" in cli_error(capsys, "--sigma-x", "nan")


def test_particles_k_below_one_cli(capsys):
    assert "argument --particles: must be a positive int, got '0'" in cli_error(capsys, "--particles", "0")


def test_negative_steps_cli(capsys):
    assert "argument --steps: must be a positive int, got '-3'" in cli_error(capsys, "--steps", "-3")
    err = cli_error(capsys, "--checkpoint-every", "0")
    assert "argument --checkpoint-every: must be a positive int, got '0'" in err
    err = cli_error(capsys, "--final-lr-ratio", "0")
    assert "argument --final-lr-ratio: must be a float in (0, 1], got '0'" in err


def test_unknown_estimator_nan_policy_and_device_cli(capsys):
    assert ("argument --elbo: invalid choice: 'foo' (choose from 'trace', 'vits', 'stl', 'iwae_dreg')"
            in cli_error(capsys, "--elbo", "foo"))
    assert "argument --nan-policy: invalid choice: 'ignore'" in cli_error(capsys, "--nan-policy", "ignore")
    assert ("argument --device: device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got 'tpu'"
            in cli_error(capsys, "--device", "tpu"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_cli_exits_2_without_traceback(capsys):
    assert f"argument --device: {NO_CUDA}" in cli_error(capsys, "--device", "cuda")
    script = Path(sys.executable).with_name("pyro-vits")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pyro_vits.cli"]
    proc = subprocess.run([*command, "fit", "--device", "cuda"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and f"argument --device: {NO_CUDA}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_state_dict_without_flow_or_with_wrong_shapes_cli(tmp_path, capsys):
    state = vits_state(ResidualCouplingBlock(C, HIDDEN, 3, 1, 2, n_flows=2))
    state["flow.flows.0.enc.in_layers.0.bias"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    assert cli.main(["fit", "--init-flow", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.pth'}: flow.flows.0.enc.in_layers.0.bias: shape (3,), but the VITS flow" in err
    assert "Traceback" not in err

"""Bad inputs get a ValueError/TypeError naming the argument and what it expects, from the API and from the
``pyro-vits`` command line (exit code 2, no traceback)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fit_helpers import fit_with

from pyro_vits import cli
from pyro_vits.data.batch import Batch
from pyro_vits.distributions import FlowPrior, MaskedNormal
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.infer import evaluate
from pyro_vits.kl import kl_estimate
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.train import geometric_lrd, make_elbo, read_vits_flow, resolve_device
from pyro_vits.vits import load_vits_flow

pytestmark = pytest.mark.usefixtures("single_thread")

C, T, N, HIDDEN = 4, 8, 6, 8
NO_CUDA = "device='cuda' but CUDA is not available (use 'cpu' or 'auto')"


@pytest.fixture(scope="module")
def data():
    return sample_dataset(make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, seed=0), N, T, seed=1)


def build():
    torch.manual_seed(0)
    return VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2), PosteriorEncoder(C, C, HIDDEN, 3, n_layers=1)


def quick_fit(data, **kwargs):
    return fit_with(*build(), data, **dict(dict(steps=2, device="cpu", progress=False, eval_samples=2), **kwargs))


def fields(d, **changes):
    values = dict(x=d.x, m_p=d.m_p, logs_p=d.logs_p, mask=d.mask, lengths=d.lengths)
    return Batch(**dict(values, **changes))


def cli_error(capsys, *argv: str) -> str:
    """Run ``pyro-vits fit ARGV`` expecting exit code 2; returns stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_odd_channel_count():
    message = re.escape("channels must be even (the coupling splits them in halves), got 5")
    for build_odd in (lambda: VITSPriorModel(5, 8), lambda: make_teacher(5, 8),
                      lambda: ResidualCouplingBlock(5, 8, 3, 1, 1)):
        with pytest.raises(ValueError, match=message):
            build_odd()


def test_odd_channel_count_cli(capsys):
    err = cli_error(capsys, "--channels", "5")
    assert "argument --channels: must be an even positive int (couplings split it in halves), got '5'" in err


def test_mismatched_shapes_of_m_p_logs_p_mask_and_z(data):
    d = data
    with pytest.raises(ValueError, match=r"m_p must have the shape of x \(6, 4, 8\), got \(6, 4, 7\)"):
        fields(d, m_p=d.m_p[..., :-1])
    with pytest.raises(ValueError, match=r"logs_p must have the shape of x \(6, 4, 8\), got \(6, 3, 8\)"):
        fields(d, logs_p=d.logs_p[:, :-1])
    with pytest.raises(ValueError, match=r"mask must have shape \(N=6, 1, T=8\), got \(6, 1, 7\)"):
        fields(d, mask=d.mask[..., :-1])
    flow = ResidualCouplingBlock(C, HIDDEN, 3, 1, 1)
    with pytest.raises(ValueError, match=r"m_p must have shape \(\.\.\., C=4, T\), got \(6, 3, 8\)"):
        FlowPrior(d.m_p[:, :3], d.logs_p[:, :3], flow)
    with pytest.raises(ValueError, match=r"logs_p must have the shape of m_p \(6, 4, 8\), got \(6, 4, 7\)"):
        FlowPrior(d.m_p, d.logs_p[..., :-1], flow)
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., 1, T=8\), got \(6, 2, 8\)"):
        FlowPrior(d.m_p, d.logs_p, flow, mask=torch.ones(6, 2, 8))
    prior = FlowPrior(d.m_p, d.logs_p, flow, d.mask, validate_args=False)
    message = re.escape("z must have shape (..., C, T) = (..., 4, 8), got (6, 4, 7)")
    with pytest.raises(ValueError, match=message):
        prior.log_prob(torch.zeros(6, 4, 7))
    normal = MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask, validate_args=False)
    message = re.escape("value must have shape (..., C, T) = (..., 4, 8), got (6, 8, 4)")
    with pytest.raises(ValueError, match=message):
        normal.log_prob(torch.zeros(6, 8, 4))
    with pytest.raises(TypeError, match="z must be a Tensor, got list"):
        prior.log_prob([0.0])


def test_mask_not_zero_one_or_wrong_shape(data):
    d = data
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        fields(d, mask=d.mask * 0.5)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask * 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., 1, T=8\), got \(6, 1, 5\)"):
        MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask[..., :5])
    with pytest.raises(ValueError, match="mask must equal the prefix mask of lengths"):
        fields(d, mask=d.mask.flip(-1))


@pytest.mark.parametrize("field, bad", [("x", math.nan), ("m_p", math.inf), ("logs_p", -math.inf)])
def test_nan_or_inf_in_data(data, field, bad):
    values = getattr(data, field).clone()
    values[1, 2, 3] = bad
    message = f"batch.{field} has 1 non-finite value(s) (NaN/Inf), the first at utterance 1, channel 2, " \
              "frame 3"
    with pytest.raises(ValueError, match=re.escape(message)):
        fields(data, **{field: values})
    poisoned = data.subset(torch.arange(N))  # derived batches skip validation; fit checks again
    setattr(poisoned, field, values)
    with pytest.raises(ValueError, match=rf"^data\.{field} has 1 non-finite"):
        quick_fit(poisoned)
    with pytest.raises(ValueError, match=rf"^heldout\.{field} has 1 non-finite"):
        quick_fit(data, heldout=poisoned)


def test_nan_or_inf_cli_values(capsys):
    assert "argument --lr: must be a positive float, got 'inf'" in cli_error(capsys, "--lr", "inf")
    assert "argument --sigma-x: must be a positive float, got 'nan'" in cli_error(capsys, "--sigma-x", "nan")


def test_particles_k_below_one(data):
    with pytest.raises(ValueError, match="particles must be a positive int or None, got 0"):
        quick_fit(data, particles=0)
    with pytest.raises(ValueError, match="particles must be a positive int, got 0"):
        make_elbo("trace", particles=0)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        evaluate(*build(), data, num_samples=0)


def test_particles_k_below_one_cli(capsys):
    assert "argument --particles: must be a positive int, got '0'" in cli_error(capsys, "--particles", "0")


def test_negative_steps_and_other_counts(data):
    for kwargs, message in [(dict(steps=-1), "steps must be a positive int, got -1"),
                            (dict(steps=2.5), "steps must be a positive int, got 2.5"),
                            (dict(log_every=0), "log_every must be a positive int, got 0"),
                            (dict(checkpoint_every=-2, out_dir="x"),
                             "checkpoint_every must be a positive int or None"),
                            (dict(checkpoint_every=2), "resume and checkpoint_every need out_dir"),
                            (dict(resume=True), "resume and checkpoint_every need out_dir")]:
        with pytest.raises(ValueError, match=message):
            quick_fit(data, **kwargs)
    with pytest.raises(ValueError, match="steps must be a positive int, got -1"):
        geometric_lrd(0.05, -1)
    with pytest.raises(ValueError, match=r"final_lr_ratio must be in \(0, 1\], got -0.5"):
        geometric_lrd(-0.5, 10)


def test_negative_steps_cli(capsys):
    assert "argument --steps: must be a positive int, got '-3'" in cli_error(capsys, "--steps", "-3")
    err = cli_error(capsys, "--checkpoint-every", "0")
    assert "argument --checkpoint-every: must be a positive int, got '0'" in err
    err = cli_error(capsys, "--final-lr-ratio", "0")
    assert "argument --final-lr-ratio: must be a float in (0, 1], got '0'" in err


def test_unknown_estimator_nan_policy_and_device(data):
    message = "elbo must be one of ('trace', 'vits', 'stl', 'iwae_dreg'), got 'foo'"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_elbo("foo")
    with pytest.raises(ValueError, match="name must be one of"):
        kl_estimate("foo", data.x, data.m_p, data.logs_p, MaskedNormal(data.m_p, torch.ones_like(data.m_p)))
    with pytest.raises(TypeError, match="elbo must be a pyro.infer.ELBO, got str"):
        quick_fit(data, elbo="trace")
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('stop', 'skip'\), got 'ignore'"):
        quick_fit(data, nan_policy="ignore")
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got 'tpu'"):
        quick_fit(data, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=re.escape(NO_CUDA)):
            quick_fit(data, device="cuda")
    elif torch.cuda.device_count() < 9:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device("cuda:9")


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


def vits_state(block: ResidualCouplingBlock) -> dict[str, torch.Tensor]:
    return {f"flow.{k}": v for k, v in block.state_dict().items()}


def test_state_dict_without_flow_or_with_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match="no flow found: expected keys 'flow.flows.<i>.…'"):
        load_vits_flow({"model": {"enc_p.emb.weight": torch.zeros(3, 2)}})
    state = vits_state(ResidualCouplingBlock(C, HIDDEN, 3, 1, 2, n_flows=2))
    state["flow.flows.2.pre.weight"] = torch.zeros(HIDDEN, C // 2 + 1, 1)
    message = "flow.flows.2.pre.weight: shape .* but the VITS flow inferred from flow.flows.0 expects"
    with pytest.raises(ValueError, match=message):
        load_vits_flow({"model": state})
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.pth'}: flow.flows.2.pre.weight: shape"):
        read_vits_flow(tmp_path / "bad.pth")
    with pytest.raises(TypeError, match="expected a state dict"):
        load_vits_flow([1, 2])


def test_state_dict_without_flow_or_with_wrong_shapes_cli(tmp_path, capsys):
    state = vits_state(ResidualCouplingBlock(C, HIDDEN, 3, 1, 2, n_flows=2))
    state["flow.flows.0.enc.in_layers.0.bias"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    assert cli.main(["fit", "--init-flow", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.pth'}: flow.flows.0.enc.in_layers.0.bias: shape (3,), but the VITS flow" in err
    assert "Traceback" not in err


def test_resume_from_a_checkpoint_with_wrong_shapes(data, tmp_path):
    out = tmp_path / "run"
    quick_fit(data, out_dir=out)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["model"]["dec.weight"] = torch.zeros(C, C, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    message = "the checkpoint's parameters do not fit this model/guide.*dec.weight"
    with pytest.raises(ValueError, match=message):
        quick_fit(data, out_dir=out, resume=True, steps=3)
    del checkpoint["model"]
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"is not a resumable pyro_vits checkpoint: it lacks \['model'\]"):
        quick_fit(data, out_dir=out, resume=True, steps=3)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3", None])
def test_check_positive_ints_names_the_argument(value):
    from pyro_vits._validate import check_positive_ints

    with pytest.raises(ValueError, match=r"^steps must be a positive int, got "):
        check_positive_ints(steps=value)
    check_positive_ints(steps=1, batch_size=None, allow_none=True)


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_check_nonnegative_ints_names_the_argument(value):
    from pyro_vits._validate import check_nonnegative_ints

    with pytest.raises(ValueError, match=r"^n_speakers must be a non-negative int, got "):
        check_nonnegative_ints(n_speakers=value)
    check_nonnegative_ints(n_speakers=0, gin_channels=3)


def test_small_public_helpers_name_the_bad_argument():
    import pandas as pd

    from pyro_vits.data.batch import sequence_mask
    from pyro_vits.distributions import CosFlow
    from pyro_vits.infer import markdown_table, minibatch_indices

    with pytest.raises(ValueError, match=r"^lengths must be a 1-D Tensor \(N,\), got \(2, 1\)"):
        sequence_mask(torch.tensor([[3], [2]]), 4)
    with pytest.raises(ValueError, match=r"^lengths must be a 1-D Tensor \(N,\), got list"):
        sequence_mask([3, 2], 4)
    with pytest.raises(ValueError, match=r"^frames must be a non-negative int, got -1"):
        sequence_mask(torch.tensor([3, 2]), -1)
    assert sequence_mask(torch.tensor([3, 0]), 4).tolist() == [[[1, 1, 1, 0]], [[0, 0, 0, 0]]]
    with pytest.raises(ValueError, match=r"^n must be a positive int, got 0"):
        minibatch_indices(0, 0, 0, None)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int or None, got 0"):
        minibatch_indices(0, 0, 5, 0)
    with pytest.raises(ValueError, match=r"^digits must be a positive int, got 0"):
        markdown_table(pd.DataFrame({"a": [1.0]}), digits=0)
    with pytest.raises(ValueError, match=r"^a must be a finite real number, got nan"):
        CosFlow(math.nan)
    with pytest.raises(ValueError, match=r"^a must be a finite real number, got '1'"):
        CosFlow("1")
    shape_message = r"^mask must be None or a Tensor of shape \(\.\.\., 1, T\), got \(2, 3\)"
    with pytest.raises(ValueError, match=shape_message):
        CosFlow(0.5, torch.ones(2, 3))


def test_study_helpers_name_the_bad_argument():
    import numpy as np

    from pyro_vits.studies.kl.negative import one_utterance_quadrature
    from pyro_vits.studies.kl.variance import log_crossing, ratio_se

    with pytest.raises(ValueError, match=r"^nodes must be a positive int, got 0"):
        one_utterance_quadrature("vits", nodes=0)
    with pytest.raises(ValueError, match=r"^x \(3,\) and y \(4,\) must have the same shape"):
        ratio_se(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match=r"^ratios must be a 1-D numpy array, got \(2, 2\)"):
        log_crossing(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"^values must be a 1-D numpy array, got <class 'list'>"):
        log_crossing(np.ones(2), [1.0, 2.0])
    assert log_crossing(np.array([0.5, 1.0, 2.0]), np.array([0.5, 1.0, 2.0])) == pytest.approx(1.0)

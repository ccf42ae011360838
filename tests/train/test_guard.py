"""fit's deferred NaN/Inf checks (used on CUDA under nan_policy="stop"): losses and finiteness stay on the
device between logging / checkpoint steps, with the same losses and the same error as the per-step check."""

from __future__ import annotations

import math

import pytest
import torch
from fit_helpers import fit_with

import pyro_vits.train.loop as loop
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.train import NonFiniteError, load_checkpoint
from pyro_vits.train.guard import defers_checks

pytestmark = pytest.mark.usefixtures("single_thread")
RUN = dict(steps=6, lr=1e-2, device="cpu", progress=False, log_every=3, eval_samples=2, batch_size=5,
           particles=2)


@pytest.fixture(scope="module")
def data():
    return sample_dataset(make_teacher(4, 8, 3, n_layers=1, n_flows=2, seed=0), 10, 8, seed=1)


def build():
    torch.manual_seed(0)
    return VITSPriorModel(4, 8, 3, n_layers=1, n_flows=2), PosteriorEncoder(4, 4, 8, 3, n_layers=1)


def test_checks_are_deferred_on_cuda_under_stop_only():
    assert defers_checks(torch.device("cuda"), "stop")
    assert not defers_checks(torch.device("cuda"), "skip") and not defers_checks(torch.device("cpu"), "stop")


def test_deferred_run_has_the_per_step_losses(data, monkeypatch):
    runs = []
    for deferred in (False, True):
        monkeypatch.setattr(loop, "defers_checks", lambda dev, policy, on=deferred: on)
        runs.append(fit_with(*build(), data, **RUN))
    assert len(runs[1].losses) == 6 and all(isinstance(x, float) for x in runs[1].losses)
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-5)
    for a, b in zip(runs[1].metrics, runs[0].metrics):
        assert a["elbo_per_frame"] == pytest.approx(b["elbo_per_frame"], rel=1e-4)


def test_deferred_nonfinite_step_is_named_and_the_checkpoint_kept(data, monkeypatch, tmp_path):
    monkeypatch.setattr(loop, "defers_checks", lambda dev, policy: True)
    model, guide = build()
    calls = []

    def poison(grad):
        calls.append(1)
        return torch.full_like(grad, math.nan) if len(calls) == 4 else grad

    model.flow.flows[0].pre.bias.register_hook(poison)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        fit_with(model, guide, data, out_dir=out, checkpoint_every=2, **dict(RUN, log_every=6))
    message = str(info.value)
    assert info.value.step == 4 and message.startswith("step 4: loss = ")
    assert "training stopped at step 4" in message
    assert f"the last checkpoint ({out / 'checkpoint.pt'}, step 2) is intact" in message
    assert load_checkpoint(out)["step"] == 2

"""fit's reliability: atomic checkpoints, bit-identical resume, the NaN/Inf guard, run-folder protection."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from fit_helpers import fit_with
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vits.data.batch import utterance_plate
from pyro_vits.distributions import MaskedNormal
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.train import NonFiniteError, load_checkpoint
from pyro_vits.train.guard import grads_finite as _grads_finite

pytestmark = pytest.mark.usefixtures("single_thread")

C, T, N, HIDDEN = 4, 8, 12, 8
TIMING = ("wall_s", "it_per_s")
RUN = dict(steps=12, lr=1e-2, lrd=0.99, device="cpu", progress=False, log_every=3, eval_samples=2,
           batch_size=5, particles=2, checkpoint_every=4)


@pytest.fixture(scope="module")
def data():
    return sample_dataset(make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, seed=0), N, T, seed=1)


class ParamStoreGuide(nn.Module):
    """A guide holding its parameters in Pyro's param store (``pyro.param``), one constrained."""

    pyro_name = "param_guide"
    config: dict = {}

    def forward(self, batch, subsample_size=None, subsample=None):
        loc = pyro.param("loc", lambda: torch.zeros(batch.n, C, T))
        scale = pyro.param("scale", lambda: torch.full((batch.n, C, T), 0.5), constraint=constraints.positive)
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            q = MaskedNormal(loc[sub.index], scale[sub.index], sub.mask, validate_args=False)
            return pyro.sample("z", q)


def build(guide_kind: str = "encoder"):
    torch.manual_seed(0)
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2)
    guide = PosteriorEncoder(C, C, HIDDEN, 3, n_layers=2) if guide_kind == "encoder" else ParamStoreGuide()
    return model, guide


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def before_each_step(monkeypatch, effect) -> None:
    """Run ``effect(step)`` before every ``Trace_ELBO.loss_and_grads`` (steps count from 1)."""
    original = Trace_ELBO.loss_and_grads
    calls = []

    def patched(self, *args, **kwargs):
        calls.append(1)
        effect(len(calls))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trace_ELBO, "loss_and_grads", patched)


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C at the start of ``step``."""
    def effect(current):
        if current == step:
            raise KeyboardInterrupt
    before_each_step(monkeypatch, effect)


def poison_grad(monkeypatch, steps: set[int], model) -> None:
    """Make the gradient of one parameter NaN at ``steps``."""
    handles = []

    def effect(step):
        while handles:
            handles.pop().remove()
        if step in steps:
            handles.append(model.flow.flows[0].pre.bias.register_hook(lambda g: torch.full_like(g, math.nan)))
    before_each_step(monkeypatch, effect)


@pytest.mark.parametrize("guide_kind", ["encoder", "param_store"])
def test_interrupted_and_resumed_run_is_bit_identical(data, tmp_path, monkeypatch, guide_kind):
    full = fit_with(*build(guide_kind), data, heldout=data, out_dir=tmp_path / "full", **RUN)

    interrupt_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        fit_with(*build(guide_kind), data, heldout=data, out_dir=tmp_path / "cut", **RUN)
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path / "cut")
    assert checkpoint["step"] == 4 and [r["step"] for r in checkpoint["metrics"]] == [3]
    assert {"torch", "numpy", "python", "cuda"} <= set(checkpoint["rng"])
    assert bool(checkpoint["param_store"]) == (guide_kind == "param_store")

    resumed = fit_with(*build(guide_kind), data, heldout=data, out_dir=tmp_path / "cut", resume=True, **RUN)
    assert resumed.resumed_from == 4 and resumed.config["resumed"][0]["step"] == 4
    assert resumed.losses == full.losses and len(full.losses) == 12
    assert untimed(resumed.metrics) == untimed(full.metrics)
    assert [r["step"] for r in full.metrics] == [3, 6, 9, 12]
    for a, b in ((full.model, resumed.model), (full.guide, resumed.guide)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert untimed(lines) == untimed(full.metrics)
    final = [load_checkpoint(tmp_path / run) for run in ("full", "cut")]
    assert final[0]["step"] == final[1]["step"] == 12
    assert torch.equal(final[0]["losses"], final[1]["losses"])
    for key in ("model", "guide", "param_store"):
        assert all(torch.equal(final[0][key][k], final[1][key][k]) for k in final[0][key])
    opt = [f["optimizer"] for f in final]
    assert opt[0]["param_groups"] == opt[1]["param_groups"]
    assert all(torch.equal(opt[0]["state"][i][k], opt[1]["state"][i][k])
               for i in opt[0]["state"] for k in ("exp_avg", "exp_avg_sq"))
    if guide_kind == "param_store":  # pyro.param sites are trained, constrained ones stay constrained
        assert not torch.equal(pyro.param("loc").detach(), torch.zeros(N, C, T))
        assert bool((pyro.param("scale") > 0).all())


def test_resume_extends_a_finished_run_and_refuses_another_problem(data, tmp_path):
    out = tmp_path / "run"
    fit_with(*build(), data, out_dir=out, **dict(RUN, steps=6))
    longer = fit_with(*build(), data, out_dir=out, resume=True, **dict(RUN, steps=9))
    assert longer.resumed_from == 6 and len(longer.losses) == 9 and longer.metrics[-1]["step"] == 9
    with pytest.raises(ValueError, match="beyond steps=5"):
        fit_with(*build(), data, out_dir=out, resume=True, **dict(RUN, steps=5))
    torch.manual_seed(0)
    other = VITSPriorModel(C, HIDDEN, 3, n_layers=2, n_flows=2)
    with pytest.raises(ValueError, match="differs from the checkpoint's in model"):
        fit_with(other, build()[1], data, out_dir=out, resume=True, **RUN)
    with pytest.raises(ValueError, match="batch_size"):
        fit_with(*build(), data, out_dir=out, resume=True, **dict(RUN, batch_size=3))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit_with(*build(), data, out_dir=tmp_path / "empty", resume=True, **RUN)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from pyro_vits.models import PosteriorEncoder
    from pyro_vits.models import VITSPriorModel
    from pyro_vits.models import make_teacher, sample_dataset
    from pyro_vits.train import FitConfig, fit
    torch.set_num_threads(1)
    saves, real_save = [], torch.save
    def dying_save(obj, f, *args, **kwargs):  # the 2nd checkpoint: write half of it, then die
        saves.append(1)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os._exit(3)
    torch.save = dying_save
    data = sample_dataset(make_teacher(4, 8, 3, n_layers=1, n_flows=2, seed=0), 12, 8, seed=1)
    torch.manual_seed(0)
    model, guide = VITSPriorModel(4, 8, 3, n_layers=1, n_flows=2), PosteriorEncoder(4, 4, 8, 3, n_layers=2)
    fit(model, guide, data, FitConfig(steps=6, progress=False, log_every=2, eval_samples=2,
                                      checkpoint_every=2, out_dir=sys.argv[1]), device="cpu")
""")


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_keeps_the_previous_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert [p.name for p in out.glob(".checkpoint.pt.*.tmp")], "the half-written temporary file"
    checkpoint = load_checkpoint(out)  # weights_only=True
    assert checkpoint["step"] == 2 and len(checkpoint["losses"]) == 2
    torch.manual_seed(0)
    model, guide = build()
    resumed = fit_with(model, guide, data, steps=6, device="cpu", progress=False, log_every=2, eval_samples=2,
                  checkpoint_every=2, out_dir=out, resume=True)
    assert resumed.resumed_from == 2 and load_checkpoint(out)["step"] == 6
    assert not list(out.glob(".checkpoint.pt.*.tmp"))


def test_nonfinite_gradient_stops_naming_step_and_parameter_keeping_the_checkpoint(data, tmp_path,
                                                                                    monkeypatch):
    model, guide = build()
    poison_grad(monkeypatch, {6}, model)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        fit_with(model, guide, data, out_dir=out, **RUN)
    message = str(info.value)
    assert info.value.step == 6 and message.startswith("step 6: loss = ")
    assert "non-finite gradient of model.flow.flows.0.pre.bias" in message
    assert f"the last checkpoint ({out / 'checkpoint.pt'}, step 4) is intact" in message
    checkpoint = load_checkpoint(out)
    assert checkpoint["step"] == 4 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_nonfinite_loss_names_the_parameter_and_the_site(data, monkeypatch):
    model, guide = build()

    def poison(step):
        if step == 3:
            with torch.no_grad():
                model.dec.bias[0] = math.inf
    before_each_step(monkeypatch, poison)
    with pytest.raises(NonFiniteError, match=r"step 3: loss = (nan|inf)") as info:
        fit_with(model, guide, data, **dict(RUN, checkpoint_every=None))
    assert "non-finite values in model.dec.bias" in str(info.value)
    assert "model site 'x' (its log-density)" in str(info.value)


def test_nan_policy_skip_drops_the_update_and_counts_it(data, monkeypatch, caplog):
    model, guide = build()
    poison_grad(monkeypatch, {2, 5}, model)
    result = fit_with(model, guide, data, nan_policy="skip", **dict(RUN, checkpoint_every=None))
    assert result.skipped_steps == 2 and [r["skipped_steps"] for r in result.metrics] == [1, 2, 2, 2]
    assert len(result.losses) == 12 and all(math.isfinite(x) for x in result.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum("update skipped" in r.message for r in caplog.records) == 2


def test_grads_finite_is_exact():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    assert _grads_finite([a, b])  # no gradients yet
    a.grad, b.grad = torch.full((3,), 1e30), torch.ones(2, dtype=torch.float64)  # huge but finite: fine
    assert _grads_finite([a, b])
    for bad in (math.nan, math.inf, -math.inf):
        b.grad = torch.tensor([1.0, bad], dtype=torch.float64)
        assert not _grads_finite([a, b])


def test_non_empty_run_folder_is_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    kwargs = dict(RUN, steps=3, checkpoint_every=None)
    with pytest.raises(FileExistsError, match=r"is not empty \(notes.txt\).*--overwrite.*--resume"):
        fit_with(*build(), data, out_dir=out, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    fit_with(*build(), data, out_dir=out, overwrite=True, **kwargs)
    (out / "metrics.jsonl").write_text('{"step": 999}\n')
    fit_with(*build(), data, out_dir=out, overwrite=True, **kwargs)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3]
    with pytest.raises(ValueError, match="pass one"):
        fit_with(*build(), data, out_dir=out, overwrite=True, resume=True, **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        fit_with(*build(), data, out_dir=tmp_path / "file", **kwargs)


def test_checkpoint_loads_weights_only_and_rejects_garbage(data, tmp_path):
    out = tmp_path / "run"
    fit_with(*build(), data, out_dir=out, **dict(RUN, steps=2, checkpoint_every=None))
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    assert raw["format"] == 1 and isinstance(raw["rng"]["numpy"][1], list) and raw["config"]["steps"] == 2
    (tmp_path / "half.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "half.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a resumable pyro_vits checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"step": Path(".")}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="WeightsUnpickler"):
        load_checkpoint(tmp_path / "pickle.pt")

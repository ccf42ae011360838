"""Data-parallel SVI (pyro_vits.infer.distributed): two gloo processes on the CPU against one process.

The equality checks use a guide whose reparameterisation noise is fixed per utterance id
(``FixedNoiseEncoder``), so that a rank's share of a minibatch sees exactly the noise the same utterances
see in a single process, and float64, so that the summation order of the all-reduce is the only difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from parallel_helpers import FixedNoiseNormal, free_port
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam

from pyro_vits.data.batch import utterance_plate
from pyro_vits.distributions import MaskedNormal
from pyro_vits.infer import (
    DistributedContext,
    init_distributed,
    launched_by_torchrun,
    minibatch_indices,
    noise_seed,
    shard,
    teardown,
)
from pyro_vits.infer.distributed import _device
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.train import FitConfig, fit, load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
C, T, N, HIDDEN = 4, 8, 12, 8
B = 7  # combined minibatch: shards of 4 and 3 utterances (unequal on purpose)
SEED, STEPS, LR, LRD = 3, 4, 2e-2, 0.97
WORLD = 2


# --------------------------------------------------------------------------------------------------
# A guide with per-utterance fixed noise, and the tiny problem
# --------------------------------------------------------------------------------------------------


class FixedNoiseEncoder(PosteriorEncoder):
    """VITS's posterior encoder; utterance ``i``'s sample uses the fixed noise ``eps[i]``."""

    def __init__(self, eps, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps  # a plain attribute: not a parameter, not a buffer

    def forward(self, batch, subsample_size=None, subsample=None):
        pyro.module(self.pyro_name, self)
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            m_q, logs_q = self.posterior(sub)
            return pyro.sample("z", FixedNoiseNormal(m_q, torch.exp(logs_q), sub.mask, self.eps[sub.index]))


def problem(fixed_noise: bool = True):
    """float64 data, model and guide, identical in every process (seeded)."""
    data = sample_dataset(make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, seed=0), N, T, seed=1)
    data = data._derive(lambda t: t.double() if t.is_floating_point() else t)
    torch.manual_seed(0)
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2).double()
    if fixed_noise:
        eps = torch.randn(N, C, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        guide = FixedNoiseEncoder(eps, C, C, HIDDEN, 3, n_layers=2).double()
    else:
        guide = PosteriorEncoder(C, C, HIDDEN, 3, n_layers=2).double()
    return data, model, guide


def elbo():
    return Trace_ELBO(num_particles=1, max_plate_nesting=1)


def quiet_fit(model, guide, data, distributed=None, **kwargs):
    settings = dict(steps=STEPS, lr=LR, lrd=LRD, batch_size=B, seed=SEED, progress=False, log_every=2,
                    eval_samples=2)
    return fit(model, guide, data, FitConfig(**dict(settings, **kwargs)), elbo=elbo(), device="cpu",
               distributed=distributed)


def state(model, guide):
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"guide.{k}": v.clone() for k, v in guide.state_dict().items()}}


# --------------------------------------------------------------------------------------------------
# The worker: every rank runs this in its own process
# --------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    tmp = Path(tmp)
    ctx = init_distributed("cpu", timeout_s=60)
    try:
        result = {}
        # (1) the first step's gradient, straight from DataParallelELBO
        data, model, guide = problem()
        pyro.clear_param_store()
        parallel = ctx.data_parallel(model, guide, elbo(), data, B, SEED)
        parallel.begin(1)
        result["loss1"] = parallel.loss_and_grads()
        result["grads1"] = {name: p.grad.clone() for name, p in parallel.elbo_module.named_parameters()}
        store = pyro.get_param_store()
        pairs = [(f"{who}$$${k}", p) for who, module in (("model", model), ("guide", guide))
                 for k, p in module.named_parameters()]
        result["store_is_module"] = all(store[name] is p for name, p in pairs)
        del parallel

        # (2) fit: a few steps, rank 0 writing the run folder
        data, model, guide = problem()
        run = quiet_fit(model, guide, data, out_dir=tmp / "run", checkpoint_every=2, distributed=ctx)
        result.update(losses=run.losses, metrics=run.metrics, out_dir=run.out_dir, state=state(model, guide),
                      config=run.config)

        # (3) real noise: an uninterrupted run, and one stopped at step 2 and resumed
        data, model, guide = problem(fixed_noise=False)
        full = quiet_fit(model, guide, data, distributed=ctx)
        result.update(noisy_losses=full.losses, noisy_state=state(model, guide))
        data, model, guide = problem(fixed_noise=False)
        quiet_fit(model, guide, data, steps=2, out_dir=tmp / "resumed", distributed=ctx)
        data, model, guide = problem(fixed_noise=False)
        resumed = quiet_fit(model, guide, data, out_dir=tmp / "resumed", resume=True, distributed=ctx)
        result.update(resumed_losses=resumed.losses, resumed_state=state(model, guide))
        torch.save(result, tmp / f"rank{rank}.pt")
    finally:
        teardown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference_training(fixed_noise: bool = True):
    """One process, the same combined minibatches, the same fixed noise: the loop fit runs."""
    data, model, guide = problem(fixed_noise)
    pyro.clear_param_store()
    module = elbo()(model, guide)
    optim = ClippedAdam(list(module.parameters()), lr=LR, clip_norm=10.0, lrd=LRD)
    losses, grads1 = [], None
    for step in range(1, STEPS + 1):
        loss = module(data, subsample=minibatch_indices(SEED, step, N, B))
        loss.backward()
        if step == 1:
            grads1 = {name: p.grad.clone() for name, p in module.named_parameters()}
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, grads1, state(model, guide)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_minibatches_shards_and_seeds():
    a, b = minibatch_indices(SEED, 5, N, B), minibatch_indices(SEED, 5, N, B)
    assert torch.equal(a, b) and len(set(a.tolist())) == B
    assert not torch.equal(a, minibatch_indices(SEED, 6, N, B))
    parts = [shard(a, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2] and torch.equal(torch.cat(parts), a)
    assert torch.equal(minibatch_indices(SEED, 1, N, None), torch.arange(N))
    assert torch.equal(minibatch_indices(SEED, 1, N, 50), torch.arange(N))
    seeds = {noise_seed(SEED, s, r) for s in range(3) for r in range(4)}
    assert len(seeds) == 12 and noise_seed(-1, 0, 0) == noise_seed(-1, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        shard(a, 2, 2)


def test_outside_torchrun_and_bad_devices_are_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        _device("cuda:1", 0)
    assert _device("cpu", 3) == torch.device("cpu")


class ParamStoreGuide(torch.nn.Module):
    """A guide with a ``pyro.param`` outside any module (which DDP would not synchronise)."""

    def forward(self, batch, subsample_size=None, subsample=None):
        loc = pyro.param("loc", lambda: torch.zeros(batch.n, C, T, dtype=torch.float64))
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            return pyro.sample("z", MaskedNormal(loc[sub.index], torch.ones_like(sub.x), sub.mask))


def test_unsupported_setups_are_refused_before_any_collective():
    data, model, guide = problem()
    ctx = DistributedContext(rank=0, world_size=2, local_rank=0, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one utterance per process"):
        ctx.data_parallel(model, guide, elbo(), data.subset(torch.arange(1)), None, SEED)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"pyro.param entries are outside them: \['loc'\]"):
        ctx.data_parallel(model, ParamStoreGuide(), elbo(), data, B, SEED)
    pyro.clear_param_store()


@pytest.mark.slow
def test_first_step_gradient_equals_the_single_process_gradient(ranks):
    _, results = ranks
    losses, grads, _ = reference_training()
    for name, g in grads.items():
        assert torch.equal(results[0]["grads1"][name], results[1]["grads1"][name]), name  # all-reduced
        torch.testing.assert_close(results[0]["grads1"][name], g, rtol=1e-10, atol=1e-12, msg=name)
    assert results[0]["loss1"] == results[1]["loss1"]
    assert results[0]["loss1"] == pytest.approx(losses[0], rel=1e-12)
    assert all(r["store_is_module"] for r in results)  # the param store holds the DDP-synced tensors


@pytest.mark.slow
def test_training_keeps_ranks_identical_and_matches_one_process(ranks):
    _, results = ranks
    losses, _, reference = reference_training()
    for key in ("state", "noisy_state"):
        for name, value in results[0][key].items():
            assert torch.equal(value, results[1][key][name]), (key, name)  # bitwise, every rank
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["losses"] == pytest.approx(losses, rel=1e-10)
    for name, value in reference.items():
        torch.testing.assert_close(results[0]["state"][name], value, rtol=1e-8, atol=1e-10, msg=name)
    # real noise: each rank draws its own, and the run is reproducible through a checkpoint
    assert results[0]["resumed_losses"] == results[0]["noisy_losses"]
    for name, value in results[0]["noisy_state"].items():
        assert torch.equal(results[0]["resumed_state"][name], value), name


@pytest.mark.slow
def test_rank_zero_alone_writes_the_run_folder(ranks):
    tmp, results = ranks
    run = tmp / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert results[0]["out_dir"] == run and results[1]["out_dir"] is None
    assert [m["step"] for m in results[0]["metrics"]] == [2, 4] and results[1]["metrics"] == []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"]["world_size"] == WORLD and config["distributed"]["backend"] == "gloo"
    assert config["batch_size"] == B
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == STEPS and checkpoint["losses"].tolist() == results[0]["losses"]
    for name, value in checkpoint["model"].items():
        assert torch.equal(value, results[1]["state"][f"model.{name}"]), name


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo needs a POSIX host")
def test_example_under_torchrun(tmp_path):
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "pyro_vits.cli", "fit", "--distributed", "--device", "cpu",
               *"--steps 6 --log-every 3 --n-train 16 --batch-size 6 --n-heldout 4 --channels 4 --hidden 8 "
                "--frames 12 --n-flows 2 --enc-layers 2 --eval-samples 2 --teacher-samples 4".split(),
               "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "figures/training_curves.png",
                 "inference_data.nc", "summary.csv", "summary.md"):
        assert (out / name).is_file(), name
    assert done.stdout.count("held-out:") == 1 and done.stdout.count(f"wrote {out}") == 1  # rank 0 only
    assert done.stderr.count("INFO: SVI on cpu") == 1  # rank 1 logs nothing
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["distributed"] is True and config["distributed"]["world_size"] == 2

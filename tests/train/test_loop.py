"""SVI loop: loss decreases, bit-for-bit reproducibility, particles, devices, run files, the plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fit_helpers import fit_with
from pyro.infer import Trace_ELBO

from pyro_vits.models import LocalGuide, PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.plots import plot_training_curves
from pyro_vits.train import resolve_device
from pyro_vits.vits import load_vits_flow

pytestmark = pytest.mark.usefixtures("single_thread")

C, T, N, HIDDEN = 4, 8, 16, 8


@pytest.fixture(scope="module")
def data():
    return sample_dataset(make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, seed=0), N, T, seed=1)


def build(seed: int = 0, local: bool = False):
    torch.manual_seed(seed)
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2)
    guide = LocalGuide(N, C, T) if local else PosteriorEncoder(C, C, HIDDEN, 3, n_layers=2)
    return model, guide


def quiet_fit(model, guide, data, **kwargs):
    defaults = dict(steps=10, lr=1e-2, device="cpu", progress=False, log_every=1000, eval_samples=2)
    kwargs = dict(defaults, **kwargs)
    return fit_with(model, guide, data, **kwargs)


def test_loss_decreases(data):
    result = quiet_fit(*build(), data, steps=100)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first
    assert result.metrics[-1]["step"] == 100 and math.isfinite(result.metrics[-1]["elbo_per_frame"])


def test_bit_for_bit_reproducible_for_the_same_seed(data):
    settings = dict(steps=15, batch_size=5, particles=2, seed=3, log_every=5)
    runs = [quiet_fit(*build(), data, **settings) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    assert [{k: v for k, v in m.items() if k not in ("wall_s", "it_per_s")} for m in runs[0].metrics] == [
        {k: v for k, v in m.items() if k not in ("wall_s", "it_per_s")} for m in runs[1].metrics
    ]
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)
    other = quiet_fit(*build(), data, steps=15, batch_size=5, particles=2, seed=4)
    assert other.losses != runs[0].losses


def test_logging_does_not_change_the_trajectory(data):
    a = quiet_fit(*build(), data, steps=12, batch_size=4, log_every=3, heldout=data)
    b = quiet_fit(*build(), data, steps=12, batch_size=4, log_every=1000)
    assert a.losses == b.losses and len(a.metrics) == 4 and len(b.metrics) == 1


@pytest.mark.parametrize("vectorize", [True, False])
def test_particles_vectorised_or_not(data, vectorize):
    result = quiet_fit(*build(local=True), data, particles=3, vectorize=vectorize, batch_size=4)
    assert all(math.isfinite(v) for v in result.losses)
    elbo = result.config["elbo"]
    assert (elbo["type"], elbo["num_particles"], elbo["vectorize_particles"]) == ("Trace_ELBO", 3, vectorize)


def test_custom_elbo(data):
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    result = quiet_fit(*build(), data, elbo=elbo)
    assert result.config["elbo"]["num_particles"] == 2
    with pytest.raises(ValueError, match="particles/vectorize"):
        quiet_fit(*build(), data, elbo=elbo, particles=2)
    with pytest.raises(TypeError, match="elbo"):
        quiet_fit(*build(), data, elbo="trace")


def test_run_files(data, tmp_path):
    model, guide = build()
    out = tmp_path / "run"
    result = quiet_fit(model, guide, data, steps=20, log_every=7, heldout=data, out_dir=out, seed=5)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 5 and config["device"] == "cpu" and config["steps"] == 20
    assert config["versions"]["torch"] == torch.__version__ and "pyro" in config["versions"]
    assert config["model"]["channels"] == C and config["guide"]["type"] == "PosteriorEncoder"
    assert config["data"]["n"] == N and config["heldout"]["num_frames"] == data.num_frames
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [7, 14, 20] and records == result.metrics
    for key in ("loss_nats", "elbo_per_frame", "kl_per_frame", "heldout_loglik_iwae_per_frame", "wall_s",
                "it_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 20 and checkpoint["config"] == config
    assert checkpoint["optimizer"]["state"]
    fresh = VITSPriorModel(**{k: v for k, v in config["model"].items() if k != "type"})
    fresh.load_state_dict(checkpoint["model"])
    flow = load_vits_flow(checkpoint)  # VITS's key layout: flow.flows.<i>...
    z = torch.randn(2, C, T)
    torch.testing.assert_close(flow(z), model.flow(z))
    PosteriorEncoder(C, C, HIDDEN, 3, n_layers=2).load_state_dict(checkpoint["guide"])


def test_devices_and_validation(data):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "meta", 3.5):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    model, guide = build()
    cases = [(dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"),
             (dict(lrd=1.5), "lrd"), (dict(log_every=0), "log_every"), (dict(device="tpu"), "device")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            quiet_fit(model, guide, data, **kwargs)
    with pytest.raises(TypeError, match="Batch"):
        quiet_fit(model, guide, data.x)


def test_plot_training_curves(data, tmp_path):
    result = quiet_fit(*build(), data, steps=6, log_every=2, heldout=data)
    path = tmp_path / "curves.png"
    plot_training_curves(result.metrics, path, reference_loglik=-3.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], path)
    with pytest.raises(ValueError, match="kl_per_frame"):
        plot_training_curves([{"step": 1, "elbo_per_frame": 0.0}], path)

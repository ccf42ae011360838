"""gradient_stats against the exact gradient distribution of a conjugate model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vits.infer import gradient_stats

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")

# z_d ~ N(0, 1), x_d ~ N(z_d, S^2), guide N(mu_d, sigma_d^2). With z = mu + sigma eps, Trace_ELBO's gradient
# of -ELBO w.r.t. mu is -(x - z)/S^2 + z (d/dmu log q(z(eps, mu)) = 0): Normal with mean -(x - mu)/S^2 + mu
# and variance sigma^2 (1 + 1/S^2)^2 per particle. "offset" is a parameter with a constant gradient (1) and
# "unused" one with none.
S = 0.8
X = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=D64)
MU = torch.tensor([0.1, -0.5, 1.0, 0.0], dtype=D64)
LOG_SIGMA = torch.tensor([-0.3, 0.0, -1.0, 0.2], dtype=D64)


def model(x: torch.Tensor) -> None:
    offset = pyro.param("offset", torch.tensor(1.0, dtype=D64))
    pyro.sample("y", dist.Normal(offset, 1.0), obs=torch.tensor(0.0, dtype=D64))
    with pyro.plate("d", 4):
        z = pyro.sample("z", dist.Normal(torch.zeros(4, dtype=D64), 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def guide(x: torch.Tensor) -> None:
    pyro.param("unused", torch.zeros(2, dtype=D64))
    mu, log_sigma = pyro.param("mu", MU.clone()), pyro.param("log_sigma", LOG_SIGMA.clone())
    with pyro.plate("d", 4):
        pyro.sample("z", dist.Normal(mu, log_sigma.exp()))


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("num_particles", [1, 4])
def test_mean_and_variance_match_the_exact_gradient_distribution(num_particles):
    repeats = 400
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    stats = gradient_stats(model, guide, elbo, X, num_repeats=repeats, param_groups={"mu": "mu"}, seed=3)
    stats = stats["mu"]
    mean = (-(X - MU) / S**2 + MU).numpy()
    variance = (torch.exp(2 * LOG_SIGMA) * (1 + 1 / S**2) ** 2 / num_particles).numpy()
    assert stats.names == ("mu",) and stats.num_repeats == repeats
    assert (abs(stats.mean - mean) < 4 * stats.mcse).all()
    assert (abs(stats.variance - variance) < 4 * variance * math.sqrt(2 / (repeats - 1))).all()
    assert np.allclose(stats.mcse, np.sqrt(stats.variance / repeats))
    assert np.allclose(stats.snr, abs(stats.mean) / np.sqrt(stats.variance))
    assert stats.mean_snr == pytest.approx(stats.snr.mean())
    assert stats.mean_norm == pytest.approx(np.linalg.norm(stats.mean))
    assert stats.norm_snr == pytest.approx(stats.mean_norm / math.sqrt(stats.variance.sum()))


def test_groups_zero_variance_rng_and_grads():
    groups = {
        "constant": "offset",
        "none": lambda name: name == "unused",
        "guide": lambda name: name in {"mu", "log_sigma"},
    }
    rng = torch.get_rng_state()
    stats = gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=3, param_groups=groups)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for _, p in pyro.get_param_store().named_parameters())
    assert stats["guide"].names == ("mu", "log_sigma") and stats["guide"].mean.shape == (8,)
    constant, unused = stats["constant"], stats["none"]
    assert constant.mean.tolist() == [1.0] and constant.variance.tolist() == [0.0]
    assert constant.snr.tolist() == [math.inf] and math.isnan(constant.mean_snr)
    assert unused.mean.tolist() == [0.0, 0.0] and np.isnan(unused.snr).all()
    again = gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=3, param_groups=groups)
    assert np.array_equal(again["guide"].mean, stats["guide"].mean)  # seeded


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_repeats"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=1, param_groups={"g": "mu"})
    with pytest.raises(TypeError, match="param_groups"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={})
    with pytest.raises(TypeError, match=r"param_groups\['g'\]"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={"g": 3})
    with pytest.raises(ValueError, match="matches no parameter"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={"g": "flow$$$"})


# ------------------------------------------------------------------------------------------- ArviZ, PSIS

from pyro_vits import _arviz_compat  # noqa: E402
from pyro_vits.infer import (
    KHAT_THRESHOLDS,
    guide_samples,
    khat_counts,
    markdown_table,
    psis_khat_per_utterance,
    run_to_inference_data,
    summary_table,
    sweep_to_inference_data,
    trace_arrays,
    utterance_log_weights,
    write_run_inference_data,
    write_summary,
)

# N utterances of D elements: z ~ N(0, 1), x ~ N(z, S^2); the exact posterior is
# N(x / (1 + S^2), S^2 / (1 + S^2)).
N_UTT, DIM = 6, 3
X_UTT = torch.linspace(-1.0, 1.0, N_UTT * DIM, dtype=D64).reshape(N_UTT, DIM)
POST_LOC, POST_SCALE = X_UTT / (1 + S**2), S / math.sqrt(1 + S**2)


def utterance_model(x: torch.Tensor) -> None:
    with pyro.plate("utterances", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, S).to_event(1), obs=x)


def scaled_guide(scale_ratio: float):
    """The exact posterior with its standard deviation multiplied by ``scale_ratio``."""

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("utterances", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(POST_LOC, scale_ratio * POST_SCALE).to_event(1))

    return guide


def test_utterance_log_weights_are_exact_and_seeded():
    log_w = utterance_log_weights(utterance_model, scaled_guide(1.0), X_UTT, num_samples=7, seed=1)
    assert log_w.shape == (7, N_UTT)
    # the exact posterior as proposal: log w = log p(x) for every draw
    marginal = dist.Normal(torch.zeros_like(X_UTT), math.sqrt(1 + S**2)).log_prob(X_UTT).sum(-1)
    assert torch.allclose(log_w, marginal.expand(7, N_UTT), atol=1e-10)
    again = utterance_log_weights(utterance_model, scaled_guide(0.5), X_UTT, num_samples=7, seed=1)
    repeat = utterance_log_weights(utterance_model, scaled_guide(0.5), X_UTT, num_samples=7, seed=1)
    assert torch.equal(again, repeat)
    with pytest.raises(ValueError, match="num_samples"):
        utterance_log_weights(utterance_model, scaled_guide(1.0), X_UTT, num_samples=1)


def test_psis_khat_per_utterance_follows_the_gaussian_tail_index():
    """Proposal N(0, r^2 s^2) for target N(0, s^2): weights have Pareto tail index k = 1 - r^2 (r < 1)."""
    narrow = psis_khat_per_utterance(utterance_model, scaled_guide(0.3), X_UTT, num_samples=4000, seed=2)
    wide = psis_khat_per_utterance(utterance_model, scaled_guide(1.3), X_UTT, num_samples=4000, seed=2)
    assert narrow.shape == wide.shape == (N_UTT,)
    assert abs(float(narrow.mean()) - (1 - 0.3**2)) < 0.1 and (narrow > KHAT_THRESHOLDS[0]).all()
    assert (wide < KHAT_THRESHOLDS[0]).all()
    assert khat_counts(np.array([0.1, 0.5, 0.69, 0.7, 2.0])) == {"good": 1, "ok": 2, "bad": 2}


def test_guide_samples_come_from_the_guide():
    z = guide_samples(utterance_model, scaled_guide(1.0), X_UTT, num_samples=3000, seed=3)["z"]
    assert z.shape == (3000, N_UTT, DIM) and z.dtype == np.float64
    assert np.abs(z.mean(0) - POST_LOC.numpy()).max() < 4 * POST_SCALE / math.sqrt(3000) * 1.5
    assert np.array_equal(z[:5], guide_samples(utterance_model, scaled_guide(1.0), X_UTT, num_samples=3000,
                                               seed=3)["z"][:5])


def test_run_and_sweep_inference_data_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    traces = [[{"step": 10 * (i + 1), "elbo": float(rng.normal()), "label": "x"} for i in range(n)]
              for n in (30, 28)]
    arrays = trace_arrays(traces)
    assert set(arrays) == {"step", "elbo"} and arrays["elbo"].shape == (2, 28)
    idata = run_to_inference_data(
        traces, posterior={"z": rng.normal(size=(2, 50, N_UTT, DIM))},
        observed_data={"x": X_UTT.numpy()},
        dims={"z": ["utterance", "channel"], "x": ["utterance", "channel"]},
        config={"seed": [0, 1]},
    )
    idata = _arviz_compat.load(_arviz_compat.save(idata, tmp_path / "run.nc"))
    assert set(_arviz_compat.group_names(idata)) == {"posterior", "sample_stats", "observed_data"}
    assert _arviz_compat.group(idata, "posterior")["z"].dims == ("chain", "draw", "utterance", "channel")
    assert _arviz_compat.group(idata, "sample_stats")["elbo"].shape == (2, 28)
    table = summary_table(idata, "sample_stats", tail_fraction=0.5)
    assert {"mean", "mcse_mean", "ess_bulk", "r_hat"} <= set(table.columns) and "elbo" in table.index
    csv, md = write_summary(table, tmp_path / "tables" / "run")
    assert csv.exists() and md.read_text().startswith("| ") and "r_hat" in md.read_text()
    sweep = sweep_to_inference_data({"kl": rng.normal(size=(3, 100))}, config={"truth": 0.5})
    assert _arviz_compat.group(sweep, "posterior").attrs["truth"] == "0.5"
    with pytest.raises(ValueError, match="missing"):
        trace_arrays([[{"a": 1.0}, {"b": 2.0}]])
    with pytest.raises(ValueError, match=r"\(seed, draw"):
        sweep_to_inference_data({"kl": np.zeros(3)})
    with pytest.raises(ValueError, match="tail_fraction"):
        summary_table(idata, "sample_stats", tail_fraction=0.0)


def test_markdown_table_formats_floats():
    frame = pd.DataFrame({"mean": [0.123456789, 2.0], "n": [1, 2]}, index=pd.Index(["a", "b"], name="var"))
    assert markdown_table(frame).splitlines() == ["| var | mean | n |", "|---|---|---|", "| a | 0.1235 | 1 |",
                                                  "| b | 2 | 2 |"]


def test_write_run_inference_data_from_a_fit_run(tmp_path):
    from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
    from pyro_vits.train import FitConfig, fit

    teacher = make_teacher(2, 4, kernel_size=3, n_layers=1, n_flows=1, seed=0)
    data = sample_dataset(teacher, 6, 8, seed=1)
    model, guide = VITSPriorModel(2, 4, 3, 1, 1, 1), PosteriorEncoder(2, 2, 4, 3, n_layers=1)
    fit(model, guide, data, FitConfig(steps=8, log_every=1, out_dir=tmp_path, progress=False, eval_samples=2),
        device="cpu")
    path = write_run_inference_data(tmp_path, model, guide, data, num_samples=20, max_utterances=3)
    idata = _arviz_compat.load(path)
    assert set(_arviz_compat.group_names(idata)) == {"posterior", "sample_stats", "observed_data"}
    z = _arviz_compat.group(idata, "posterior")["z"]
    assert z.dims == ("chain", "draw", "utterance", "channel", "frame") and z.shape == (1, 20, 3, 2, 8)
    stats = _arviz_compat.group(idata, "sample_stats")
    assert stats["elbo_per_frame"].shape == (1, 8) and list(stats["step"].values[0]) == list(range(1, 9))
    attrs = stats.attrs
    assert json.loads(attrs["config"])["steps"] == 8 and len(json.loads(attrs["psis_khat"])) == 3
    assert _arviz_compat.group(idata, "observed_data")["x"].shape == (3, 2, 8)
    table = pd.read_csv(tmp_path / "summary.csv", index_col=0)
    assert "heldout_elbo_per_frame" not in table.index and {"ess_bulk", "r_hat"} <= set(table.columns)
    with pytest.raises(ValueError, match="run_dir"):
        write_run_inference_data(tmp_path / "missing", model, guide, data)

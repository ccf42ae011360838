import json

import numpy as np
import pytest

from pyro_vits import _arviz_compat as compat


@pytest.fixture
def idata(tmp_path):
    rng = np.random.default_rng(0)
    data = compat.make_inference_data(
        {
            "posterior": {"z": rng.normal(size=(4, 200, 3)).astype(np.float32)},
            "sample_stats": {"elbo": rng.normal(size=(4, 200))},
        },
        observed_data={"x": rng.normal(size=(5, 3))},
        attrs={"config": {"seed": 1, "lr": 0.01}},
        dims={"z": ["channel"], "x": ["utterance", "channel"]},
    )
    return compat.load(compat.save(data, tmp_path / "run.nc"))


def test_round_trip_groups_dtypes_and_attrs(idata):
    assert set(compat.group_names(idata)) == {"posterior", "sample_stats", "observed_data"}
    post = compat.group(idata, "posterior")
    assert post["z"].dims == ("chain", "draw", "channel")
    assert post["z"].dtype == np.float64
    assert compat.group(idata, "observed_data")["x"].dims == ("utterance", "channel")
    assert json.loads(post.attrs["config"]) == {"seed": 1, "lr": 0.01}
    with pytest.raises(ValueError, match="no group 'prior'"):
        compat.group(idata, "prior")


def test_diagnostics_on_iid_draws_match_theory(idata):
    stats = compat.group(idata, "sample_stats")
    n = 4 * 200
    ess = float(compat.ess(stats, method="bulk")["elbo"])
    assert 0.7 * n < ess < 1.3 * n  # iid draws: ESS ~ number of draws
    assert abs(float(compat.rhat(stats, method="rank")["elbo"]) - 1) < 0.02
    sd = float(stats["elbo"].std())
    assert float(compat.mcse(stats, method="mean")["elbo"]) == pytest.approx(sd / np.sqrt(ess), rel=0.05)
    table = compat.summary(stats)
    assert {"ess_bulk", "r_hat", "mcse_mean"} <= set(table.columns)


def test_psis_khat_small_for_exact_proposal_and_large_for_heavy_tail():
    rng = np.random.default_rng(1)
    exact = np.zeros((2, 2000))  # proposal equals target: all weights equal
    heavy = rng.standard_cauchy(size=(2, 2000))
    heavy_lw = np.log(np.abs(heavy))  # Pareto(1)-tailed weights: k ~ 1
    assert np.all(compat.psis_khat(exact + 1e-12 * rng.normal(size=exact.shape)) < 0.5)
    assert np.all(compat.psis_khat(heavy_lw) > 0.7)
    with pytest.raises(ValueError, match="log_weights"):
        compat.psis_khat(np.zeros(3))


def test_single_chain_summary_has_nan_rhat_and_logs_no_shape_warning():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    arviz_logger = getattr(compat.az, "_log", logging.getLogger("arviz"))
    arviz_logger.addHandler(handler)
    try:
        data = compat.make_inference_data({"sample_stats": {"elbo": np.random.default_rng(2).normal(size=(1, 8))}})
        table = compat.summary(compat.group(data, "sample_stats"))
        compat.ess(compat.group(data, "sample_stats"), method="bulk")
        compat.az.summary(compat.group(data, "sample_stats"))  # unwrapped: ArviZ does log it
    finally:
        arviz_logger.removeHandler(handler)
    assert np.isnan(table.loc["elbo", "r_hat"])
    assert len([r for r in records if "Shape validation" in r.getMessage()]) == 1

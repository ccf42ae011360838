"""The audit's batch statistics on constructed per-utterance arrays (no generator): P(batch KL < 0) measured on
independent batches and predicted by the empirical saddlepoint, and the three batch sds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pyro_vits.audit.draws import AuditDraws
from pyro_vits.audit.measure import _batch_spread, _prob_negative, summarize
from pyro_vits.audit.report import _markdown


def draws_of(x: np.ndarray, frames: np.ndarray, batch_size: int) -> AuditDraws:
    """An :class:`AuditDraws` holding ``x (N, K)`` as the ``vits`` and ``mc`` estimates (2 channels)."""
    n, k = x.shape
    return AuditDraws(
        k, batch_size, frames=[int(t) for t in frames], sources=[f"u{i}" for i in range(n)],
        estimates={"vits": [x], "mc": [x.copy()]}, channel_kl=np.array([2.0 * frames.sum(), -0.5]),
        channel_kl_var=np.ones(2), channel_log_ratio=np.zeros(2), same_token=1.0, compared=1.0,
    )


def rows(x: np.ndarray, sizes, replicas: int = 2000, seed: int = 0) -> dict:
    return _prob_negative({"vits": x}, sizes, np.random.default_rng(seed), replicas)["vits"]


def test_zero_count_bound_counts_only_independent_batches():
    x = np.ones((10, 3))  # never negative
    got = rows(x, (1, 4, 10))
    one, four, ten = got["1"], got["4"], got["10"]
    assert (one["independent_batches"], one["resampled"]) == (30, 30)  # every (utterance, draw) value
    # floor(10 / 4) = 2 disjoint batches of distinct utterances per draw index, 3 draw indices
    assert four["independent_batches"] == 6 and four["resampled"] >= 2000
    assert ten["independent_batches"] == 3 and ten["resampled"] == 3  # the whole corpus, per draw
    for row in (one, four, ten):
        assert row["measured"] == 0 and row["negative"] == 0 and row["measured_se"] == 0
        assert row["upper_95"] == pytest.approx(1 - 0.05 ** (1 / row["independent_batches"]))
        assert row["warning"] is None
    assert four["upper_95"] > 0.39  # not 1 - 0.05^(1 / 2000) = 0.0015 from the resampled batches


def test_measured_uses_distinct_utterances_and_independent_se():
    """Values -3, 1, 1, 1 (one draw): every partition into two pairs has exactly one negative pair, so the
    measured P is 1/2 exactly (with replacement it would be 7/16); the SE counts the 2 independent pairs."""
    row = rows(np.array([[-3.0], [1.0], [1.0], [1.0]]), (2,))["2"]
    assert row["measured"] == 0.5 and row["independent_batches"] == 2 and row["upper_95"] is None
    assert row["negative"] == row["resampled"] // 2 and row["measured_se"] == pytest.approx(math.sqrt(0.25 / 2))


def test_batch_larger_than_the_corpus_warns_and_is_not_measured():
    rng = np.random.default_rng(1)
    frames = np.array([40, 50, 60, 70])
    x = frames[:, None] * 1.0 + rng.normal(0, 20, (4, 3))
    report = summarize(draws_of(x, frames, 64), batch_sizes=(1, 4), replicas=500)
    row = report["prob_negative"]["64"]
    assert row["measured"] is None and row["measured_se"] is None and row["upper_95"] is None
    assert row["independent_batches"] == 0 and row["resampled"] == 0 and 0 <= row["predicted"] <= 1
    assert "batch size 64 exceeds the 4 utterances" in row["warning"]
    assert report["warnings"] == [row["warning"]] and report["prob_negative"]["4"]["warning"] is None
    text = _markdown(report)
    assert "**Warning:** batch size 64 exceeds the 4 utterances" in text
    assert "| 64 | 0 | not measured (batch > corpus) |" in text
    assert "0 of 12 resampled, 12 independent (95 % bound < 0.22)" in text  # no value negative: count and bound, never a bare 0
    assert math.isfinite(report["kl_per_frame"]["vits"]["sd_batch_total"])


def test_saddlepoint_prediction_matches_the_exact_gamma_tail():
    """X = G - c, G ~ Gamma(2): the sum of n copies is Gamma(2 n) - n c, an exact tail to compare with. The
    per-utterance values are 20,000 quantiles of X; the empirical saddlepoint recovers the tail within 1 %
    where the normal approximation is off by a factor."""
    shape, c = 2.0, 1.2
    x = (stats.gamma.ppf((np.arange(20000) + 0.5) / 20000, shape) - c).reshape(2500, 8)
    got = rows(x, (16, 64), replicas=100)
    for n in (16, 64):
        exact = stats.gamma.cdf(n * c, n * shape)
        assert got[str(n)]["predicted"] == pytest.approx(exact, rel=0.01), n
    exact = stats.gamma.cdf(64 * c, 64 * shape)
    assert got["64"]["predicted_normal"] > 3 * exact  # the gamma's left tail is lighter than the normal's


def test_batch_sds_recover_known_draw_and_composition_variances():
    """Equal lengths T: x[n, k] = T (1 + a_n + e_nk), a with variance 1 over the corpus, e with variance 9:
    per frame, Var_B E(L | B) = var(a) / B, E_B Var(L | B) = 9 / B (the draw noise of the utterance means,
    9 / K / B, must not count as composition)."""
    rng = np.random.default_rng(3)
    n, k, size, t = 4000, 4, 16, 50.0
    a = rng.normal(0, 1, n)
    x = t * (1 + a[:, None] + rng.normal(0, 3, (n, k)))
    batches = rng.integers(n, size=(20000, size))
    got = _batch_spread(x, np.full(n, t), batches)
    assert got["sd_batch_draw"] ** 2 == pytest.approx(9 / size, rel=0.05)
    assert got["sd_batch_composition"] ** 2 == pytest.approx(a.var() / size, rel=0.15)
    assert got["sd_batch_total"] ** 2 == pytest.approx(
        got["sd_batch_draw"] ** 2 + got["sd_batch_composition"] ** 2
    )


def test_total_batch_sd_is_the_sd_of_the_logged_batch_loss():
    """Unequal lengths: sd_batch_total equals the sd of the brute-force per-frame batch loss, random
    utterances each with one of their K draws."""
    rng = np.random.default_rng(4)
    n, k, size = 300, 5, 8
    frames = rng.integers(20, 200, n).astype(float)
    x = frames[:, None] * rng.gamma(2.0, 0.5, n)[:, None] + 4 * np.sqrt(frames)[:, None] * rng.normal(
        size=(n, k)
    )
    got = _batch_spread(x, frames, rng.integers(n, size=(40000, size)))
    who, which = rng.integers(n, size=(200000, size)), rng.integers(k, size=(200000, size))
    brute = (x[who, which].sum(1) / frames[who].sum(1)).std()
    assert got["sd_batch_total"] == pytest.approx(brute, rel=0.03)
    assert 0 < got["sd_batch_draw"] < got["sd_batch_total"] and got["sd_batch_composition"] > 0


def test_summary_fields_and_the_mean_of_draws():
    rng = np.random.default_rng(5)
    frames = rng.integers(40, 90, 40)
    x = frames[:, None] * (1 + rng.normal(0, 0.2, 40))[:, None] + rng.normal(0, 30, (40, 4))
    report = summarize(draws_of(x, frames, 16), batch_sizes=(1,), replicas=2000)
    vits, mean4 = report["kl_per_frame"]["vits"], report["kl_per_frame"]["vits_mean_of_4"]
    assert {"sd_batch_draw", "sd_batch_composition", "sd_batch_total"} <= set(vits) and "sd_batch" not in vits
    assert mean4["sd_batch_draw"] == pytest.approx(vits["sd_batch_draw"] / 2)
    assert mean4["sd_batch_composition"] == vits["sd_batch_composition"]
    assert set(report["prob_negative"]) == {"1", "16"} and report["warnings"] == []
    assert "flow_displacement" not in report and "gaussian_closed_form_error" not in report
    text = _markdown(report)
    assert "not per-channel KLs, they can be negative" in text and "batch sd: composition" in text

"""The benchmark runner (quick mode) and the fairness of its raw-vs-Pyro comparison."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "run.py"

TINY = dict(channels=6, hidden=8, kernel_size=3, dilation_rate=1, n_layers=2, n_flows=2, T=12, B=3)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pyro_vits_bench_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_run_writes_complete_json(tmp_path):
    out = tmp_path / "cpu.json"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--device", "cpu", "--repeats", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["mode"] == "quick"
    assert res["device"]["type"] == "cpu" and res["device"]["name"]
    assert res["versions"]["torch"] == torch.__version__
    assert res["versions"]["pyro"] == pyro.__version__
    assert res["particles"] == [1, 2, 4, 8]

    expected = {"raw", "pyro_k1"} | {f"vec_k{k}" for k in (1, 2, 4, 8)} | {f"seq_k{k}" for k in (2, 4, 8)}
    assert expected <= set(res["timings"])
    for t in res["timings"].values():
        assert len(t["repeats_s"]) == 2 and all(_finite_positive(x) for x in t["repeats_s"])
        assert _finite_positive(t["median_s"])

    ratio_names = ["pyro_k1_over_raw", "vec_k4_over_k1", "vec_k8_over_k1"]
    ratio_names += ["vec_over_seq_k2", "vec_over_seq_k8"]
    for name in ratio_names:
        assert name in res["ratios"], name
    for r in res["ratios"].values():
        assert len(r["repeats"]) == 2 and all(_finite_positive(x) for x in r["repeats"])
        assert _finite_positive(r["median"]) and _finite_positive(r["ratio_of_medians"])

    names = {t["name"] for t in res["targets"]}
    assert {
        "pyro_step_overhead",
        "vectorised_k4_cpu",
        "vectorised_k8_gpu",
        "vectorised_beats_sequential_k2",
        "vectorised_beats_sequential_k4",
        "vectorised_beats_sequential_k8",
        "memory_linear_k8",
        "no_memory_growth_1000_steps",
    } <= names
    for t in res["targets"]:
        assert t["pass"] in (True, False, None)
        assert isinstance(t["applicable"], bool) and (t["pass"] is None) == (not t["applicable"])
        assert isinstance(t["threshold"], (int, float))
    gpu_only = next(t for t in res["targets"] if t["name"] == "vectorised_k8_gpu")
    assert gpu_only["applicable"] is False
    assert isinstance(res["all_applicable_pass"], bool)

    per_k = res["memory"]["per_k"]
    assert set(per_k) == {"1", "2", "4", "8"}
    for m in per_k.values():
        assert m["peak_bytes"] >= m["base_bytes"] > 0
        assert m["autograd_saved_bytes"] > 0
    # what autograd keeps for backward is deterministic and must grow with K
    assert per_k["8"]["autograd_saved_bytes"] > per_k["1"]["autograd_saved_bytes"]

    leak = res["leak"]
    assert leak["steps"] == 1000 and {"100", "1000"} <= set(leak["samples"])
    assert isinstance(leak["rss_growth_bytes"], int)


def _fixed_sample(bench, seed: int = 3):
    """Trace_ELBO loss (log q - log p) and the guide's sample z drawn under the same seed."""
    prob = bench.make_problem(TINY, "cpu", seed=1)
    pyro.clear_param_store()
    model, guide = bench.make_model_guide(prob)
    args = (prob.m_p, prob.logs_p, prob.mask)
    pyro.set_rng_seed(seed)
    elbo_loss = Trace_ELBO(max_plate_nesting=1).loss(model, guide, *args)
    pyro.set_rng_seed(seed)
    z = poutine.trace(guide).get_trace(*args).nodes["z"]["value"].detach()
    return prob, model, guide, args, elbo_loss, z


def test_raw_kl_equals_trace_elbo_up_to_the_entropy_constant(bench):
    prob, _, _, _, elbo_loss, z = _fixed_sample(bench)
    mask = prob.mask
    m_q, logs_q = pyro.param("m_q").detach(), pyro.param("logs_q").detach()
    assert torch.all(z * (1 - mask) == 0)
    eps = (z - m_q) * torch.exp(-logs_q) * mask  # the standard normal draw behind z (0 on padding)

    with torch.no_grad():
        raw = bench.raw_loss(prob.flow, m_q, logs_q, prob.m_p, prob.logs_p, mask, eps).item()
        # hand formula (VITS losses.kl_loss * sum(mask)), independent of the benchmark's helpers
        z_raw = (m_q + eps * torch.exp(logs_q)) * mask
        torch.testing.assert_close(z_raw, z)
        z_p = prob.flow(z_raw, mask)
        kl = prob.logs_p - logs_q - 0.5 + 0.5 * (z_p - prob.m_p) ** 2 * torch.exp(-2.0 * prob.logs_p)
        hand = (kl * mask).sum().item()
        # log q(z) - log p(z) by hand (mean-only flow: log|det| = 0; the log 2pi terms cancel)
        log_q = ((-0.5 * eps**2 - logs_q) * mask).sum()
        log_p = ((-0.5 * (z_p - prob.m_p) ** 2 * torch.exp(-2.0 * prob.logs_p) - prob.logs_p) * mask).sum()
        hand_elbo = (log_q - log_p).item()
        # Trace_ELBO uses log q(z) where VITS uses -H(q): they differ by 0.5 * sum_valid(1 - eps^2)
        const = (0.5 * (1.0 - eps**2) * mask).sum().item()

    assert raw == pytest.approx(hand, rel=1e-5, abs=1e-4)
    assert elbo_loss == pytest.approx(hand_elbo, rel=1e-5, abs=1e-3)
    assert elbo_loss - const == pytest.approx(raw, rel=1e-5, abs=1e-3)


def test_raw_and_pyro_gradients_match_on_the_same_sample(bench):
    """With the same eps, d(log q - log p) and d(VITS KL sum) agree for every parameter."""
    prob, model, guide, args, _, z = _fixed_sample(bench)
    m_q, logs_q = pyro.param("m_q"), pyro.param("logs_q")
    eps = ((z - m_q) * torch.exp(-logs_q) * prob.mask).detach()
    params = [*prob.flow.parameters(), m_q, logs_q]

    pyro.set_rng_seed(3)
    surrogate = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, *args)
    g_pyro = torch.autograd.grad(surrogate, params)
    raw = bench.raw_loss(prob.flow, m_q, logs_q, prob.m_p, prob.logs_p, prob.mask, eps)
    g_raw = torch.autograd.grad(raw, params)
    for a, b in zip(g_pyro, g_raw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_raw[:-2])  # the flow does get gradient


def test_steps_run_and_change_the_shared_flow(bench):
    prob = bench.make_problem(TINY, "cpu", seed=0)
    pyro.clear_param_store()
    before = [p.detach().clone() for p in prob.flow.parameters()]
    raw, pyro_step = bench.RawStep(prob), bench.PyroStep(prob, 4, vectorize=True)
    assert math.isfinite(float(raw())) and math.isfinite(pyro_step())
    assert any(not torch.equal(a, b) for a, b in zip(before, prob.flow.parameters()))

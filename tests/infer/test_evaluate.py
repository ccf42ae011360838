"""``evaluate`` in memory-bounded chunks of samples and utterances gives the unchunked numbers."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vits.infer import EVAL_CHUNK_ELEMENTS, default_eval_chunk, evaluate
from pyro_vits.models import ObservationGuide, PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset

pytestmark = pytest.mark.usefixtures("single_thread")
C, HIDDEN, T, N = 4, 8, 6, 5
KEYS = ("elbo_per_frame", "elbo_stderr_per_frame", "kl_per_frame", "recon_per_frame", "loglik_iwae_per_frame")


@pytest.fixture(scope="module")
def problem():
    teacher = make_teacher(C, HIDDEN, kernel_size=3, n_layers=2, n_flows=2, seed=0)
    data = sample_dataset(teacher, N, T, seed=1)
    torch.manual_seed(2)
    model = VITSPriorModel(C, HIDDEN, kernel_size=3, n_layers=2, n_flows=2)
    guide = PosteriorEncoder(C, C, HIDDEN, kernel_size=3, n_layers=2)
    with torch.no_grad():
        for p in [*model.parameters(), *guide.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return teacher, data, model, guide


def evaluate_reference(model, guide, data, num_samples, seed, batch_size):
    """The unchunked evaluation: every sample of ``batch_size`` utterances in one vectorised call."""
    def vectorised(fn):
        def wrapped(*args):
            with pyro.plate("_evaluate_particles", num_samples, dim=-2):
                return fn(*args)
        return wrapped

    def sums(trace):
        trace.compute_log_prob()
        latent = sum(s["log_prob"] for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]
                     and s["fn"].__class__.__name__ != "_Subsample")
        observed = sum(s["log_prob"] for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"])
        return latent, observed

    elbo_k = kl = recon = iwae = 0.0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, data.n, batch_size):
            chunk = data.subset(torch.arange(start, min(start + batch_size, data.n)))
            guide_trace = poutine.trace(vectorised(guide)).get_trace(chunk)
            model_trace = poutine.trace(poutine.replay(vectorised(model), trace=guide_trace)).get_trace(chunk)
            log_q, _ = sums(guide_trace)
            log_prior, log_lik = sums(model_trace)
            log_w = log_lik + log_prior - log_q
            elbo_k = elbo_k + log_w.sum(-1)
            kl = kl + (log_q - log_prior).mean(0).sum()
            recon = recon + log_lik.mean(0).sum()
            iwae = iwae + (torch.logsumexp(log_w, 0) - math.log(num_samples)).sum()
    frames = float(data.lengths.sum())
    return {"elbo_per_frame": float(elbo_k.mean()) / frames,
            "elbo_stderr_per_frame": float(elbo_k.std()) / math.sqrt(num_samples) / frames,
            "kl_per_frame": float(kl) / frames, "recon_per_frame": float(recon) / frames,
            "loglik_iwae_per_frame": float(iwae) / frames}


def test_one_chunk_is_the_unchunked_evaluation_bit_for_bit(problem):
    _, data, model, guide = problem
    got = evaluate(model, guide, data, num_samples=12, seed=3)
    expected = evaluate_reference(model, guide, data, 12, 3, batch_size=N)
    assert {k: got[k] for k in KEYS} == expected
    assert got["num_samples"] == 12 and got["num_utterances"] == N


@pytest.mark.parametrize("eval_chunk", [16, 20, 33])
def test_sample_chunks_combine_exactly(problem, eval_chunk):
    """40 samples of one utterance per call split in blocks of 16 or 32: the same numbers (float tolerance),
    the IWAE bound's log-sum-exp taken over all 40."""
    _, data, model, guide = problem
    got = evaluate(model, guide, data, num_samples=40, seed=4, eval_chunk=eval_chunk)
    expected = evaluate_reference(model, guide, data, 40, 4, batch_size=1)
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def test_utterance_chunks_are_batch_size_chunks(problem):
    _, data, model, guide = problem
    got = evaluate(model, guide, data, num_samples=8, seed=5, eval_chunk=2 * 8 + 3)
    expected = evaluate_reference(model, guide, data, 8, 5, batch_size=2)
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def test_teacher_truth_is_unchanged_by_chunking(problem):
    teacher, data, _, _ = problem
    proposal = ObservationGuide.for_teacher(teacher)
    whole = evaluate(teacher, proposal, data, num_samples=48, seed=6, batch_size=1)
    chunked = evaluate(teacher, proposal, data, num_samples=48, seed=6, eval_chunk=16)
    for key in KEYS:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("eval_chunk", [16, 24, 40, 200])
def test_every_call_respects_the_bound(problem, eval_chunk):
    _, data, model, guide = problem
    rows = []

    def recording_guide(batch):
        z = guide(batch)
        rows.append(z.shape[0] * z.shape[1])  # (samples, utterances, C, T)
        return z

    evaluate(model, recording_guide, data, num_samples=32, seed=7, eval_chunk=eval_chunk)
    assert max(rows) <= eval_chunk and sum(rows) == 32 * N


def test_default_chunk_is_sized_from_the_latent():
    assert default_eval_chunk(192, 200) == EVAL_CHUNK_ELEMENTS // (192 * 200)
    assert default_eval_chunk(10**4, 10**4) == 1
    with pytest.raises(ValueError, match="channels"):
        default_eval_chunk(0, 5)


def test_eval_chunk_is_validated(problem):
    _, data, model, guide = problem
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="eval_chunk"):
            evaluate(model, guide, data, num_samples=4, eval_chunk=bad)

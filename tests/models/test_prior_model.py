"""The generative model, the teacher and its data, and ``evaluate`` against independent truths."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from pyro import poutine
from scipy.stats import norm
from torch.distributions import Normal

from pyro_vits.data.batch import Batch
from pyro_vits.distributions import FlowPrior
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.infer import evaluate
from pyro_vits.models import LocalGuide, ObservationGuide, VITSPriorModel, make_teacher, sample_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

C, T, N, HIDDEN = 4, 7, 6, 8


def small_teacher(seed: int = 0, **kwargs) -> VITSPriorModel:
    kwargs = dict(dict(kernel_size=3, n_layers=2, n_flows=2), **kwargs)
    return make_teacher(C, HIDDEN, seed=seed, **kwargs).double()


@pytest.fixture
def speaker_data() -> Batch:
    teacher = small_teacher(n_speakers=3, gin_channels=2)
    return sample_dataset(teacher, N, T, seed=1, min_frames=2)


def test_batch_validation_and_views(speaker_data):
    d = speaker_data
    with pytest.raises(ValueError, match="mask must have shape"):
        Batch(d.x, d.m_p, d.logs_p, d.mask[:, :, :-1], d.lengths)
    with pytest.raises(ValueError, match="prefix mask of lengths"):
        Batch(d.x, d.m_p, d.logs_p, d.mask, d.lengths.clamp(max=1))
    with pytest.raises(ValueError, match="logs_p"):
        Batch(d.x, d.m_p, d.logs_p[:, :-1], d.mask, d.lengths)
    with pytest.raises(ValueError, match="speaker"):
        Batch(d.x, d.m_p, d.logs_p, d.mask, d.lengths, speaker=d.speaker.float())
    with pytest.raises(ValueError, match="only 0 and 1"):
        Batch(d.x, d.m_p, d.logs_p, d.mask * 0.5, d.lengths)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        Batch(d.x.numpy(), d.m_p, d.logs_p, d.mask, d.lengths)
    assert d.index.tolist() == list(range(N))
    sub = d.subset(torch.tensor([4, 1]))
    assert sub.n == 2 and sub.index.tolist() == [4, 1] and torch.equal(sub.x, d.x[[4, 1]])
    assert torch.equal(sub.speaker, d.speaker[[4, 1]]) and d.n == N
    assert d.to("cpu").num_frames == int(d.mask.sum())


def test_trace_log_probs_equal_flow_prior_and_hand_computed_gaussian(speaker_data, randomize):
    d = speaker_data
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=2, n_flows=2, n_speakers=3, gin_channels=2, mean_only=False,
                           sigma_x=0.3).double()
    randomize(model, seed=5, scale=0.3)
    trace = poutine.trace(model).get_trace(d)
    trace.compute_log_prob()
    z = trace.nodes["z"]["value"]
    assert z.shape == (N, C, T) and bool((z * (1 - d.mask) == 0).all())

    g = model.emb_g(d.speaker).unsqueeze(-1)
    expected_z = FlowPrior(d.m_p, d.logs_p, model.flow, d.mask, g).log_prob(z)
    torch.testing.assert_close(trace.nodes["z"]["log_prob"], expected_z, rtol=1e-12, atol=1e-10)

    weight = model.dec.weight.detach().numpy()[:, :, 0]
    loc = np.einsum("oc,nct->not", weight, z.detach().numpy()) + model.dec.bias.detach().numpy()[:, None]
    dens = norm.logpdf(d.x.numpy(), loc=loc, scale=0.3) * d.mask.numpy()
    assert trace.nodes["x"]["is_observed"] and torch.equal(trace.nodes["x"]["value"], d.x)
    np.testing.assert_allclose(trace.nodes["x"]["log_prob"].detach().numpy(), dens.sum((1, 2)), rtol=1e-12)


def test_model_subsampling_scales_sites(speaker_data):
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2, n_speakers=3, gin_channels=2).double()
    trace = poutine.trace(model).get_trace(speaker_data, subsample_size=2)
    for name in ("z", "x"):
        assert trace.nodes[name]["scale"] == pytest.approx(N / 2)
    assert trace.nodes["x"]["value"].shape == (2, C, T)


def test_model_validation():
    with pytest.raises(ValueError, match="gin_channels"):
        VITSPriorModel(C, HIDDEN, n_speakers=2)
    with pytest.raises(ValueError, match="decoder"):
        VITSPriorModel(C, HIDDEN, decoder="hifigan")
    with pytest.raises(ValueError, match="sigma_x"):
        VITSPriorModel(C, HIDDEN, sigma_x=0)
    model = VITSPriorModel(C + 2, HIDDEN, 3, n_layers=1)
    data = sample_dataset(small_teacher(), 2, T, seed=0)
    with pytest.raises(ValueError, match="channels"):
        model(data)
    speakers = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_speakers=2, gin_channels=2).double()
    with pytest.raises(ValueError, match="speaker"):
        speakers(data)
    conv = VITSPriorModel(C, HIDDEN)
    assert torch.equal(conv.dec.weight[:, :, 0], torch.eye(C)) and not conv.dec.bias.any()


def test_teacher_is_seeded_frozen_and_nonzero():
    state = torch.get_rng_state()
    a, b, c = small_teacher(seed=3), small_teacher(seed=3), small_teacher(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (key, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), key
        assert not torch.equal(pa, pc), key
    assert not any(p.requires_grad for p in a.parameters())
    assert a.config["decoder"] == "identity" and a.pyro_name == "teacher"
    for layer in a.flow.flows[::2]:
        assert bool((layer.post.weight != 0).all())


def gaussian_loglik(d: Batch, sigma: float) -> torch.Tensor:
    """Exact ``log p(x)`` per utterance for an identity flow: ``N(x; m_p, e^(2 logs_p) + sigma^2)``."""
    var = torch.exp(2 * d.logs_p) + sigma**2
    return (Normal(d.m_p, var.sqrt()).log_prob(d.x) * d.mask).sum((1, 2))


def test_teacher_prior_is_clearly_non_gaussian():
    """The teacher fits its own data far better than the same model with VITS's zero-initialised couplings."""
    teacher = make_teacher(C, 16, seed=0).double()
    data = sample_dataset(teacher, 16, 16, seed=1)
    truth = evaluate(teacher, ObservationGuide.for_teacher(teacher), data, num_samples=64)
    gaussian = float(gaussian_loglik(data, teacher.sigma_x).sum()) / data.num_frames
    assert truth["loglik_iwae_per_frame"] > gaussian + 1.0


def test_sample_dataset_shapes_padding_and_seeding():
    teacher = small_teacher(n_speakers=3, gin_channels=2)
    state = torch.get_rng_state()
    d = sample_dataset(teacher, 40, 12, seed=7, min_frames=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert d.x.shape == d.m_p.shape == d.logs_p.shape == (40, C, 12) and d.x.dtype == torch.float64
    assert int(d.lengths.min()) >= 3 and int(d.lengths.max()) <= 12 and len(set(d.lengths.tolist())) > 3
    pads = (d.mask == 0).expand_as(d.x)
    for field in (d.x, d.m_p, d.logs_p):
        assert bool((field[pads] == 0).all())
    assert float(d.logs_p.abs().max()) <= 0.5 and float(d.logs_p.abs().max()) > 0.3
    assert set(d.speaker.tolist()) == {0, 1, 2}
    again = sample_dataset(teacher, 40, 12, seed=7, min_frames=3)
    assert torch.equal(again.x, d.x) and torch.equal(again.speaker, d.speaker)
    assert not torch.equal(sample_dataset(teacher, 40, 12, seed=8, min_frames=3).x, d.x)
    with pytest.raises(ValueError, match="min_frames"):
        sample_dataset(teacher, 4, 12, seed=0, min_frames=13)


def test_sample_dataset_matches_gaussian_marginal_for_identity_flow():
    """With zero couplings (identity flow), x ~ N(m_p, e^(2 logs_p) + sigma^2) on valid frames."""
    teacher = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2, sigma_x=0.4, decoder="identity").double()
    d = sample_dataset(teacher, 300, 16, seed=0)
    r = ((d.x - d.m_p) / torch.sqrt(torch.exp(2 * d.logs_p) + 0.16))[(d.mask > 0).expand_as(d.x)]
    assert r.numel() > 10_000
    assert abs(float(r.mean())) < 4 / math.sqrt(r.numel())
    assert float(r.var()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("mean_only, speakers", [(True, False), (False, True)])
def test_teacher_iwae_loglik_matches_quadrature(mean_only, speakers):
    """C=2, T=1: log p(x) = log ∫ N(x; z, σ²) p(z) dz on a 2-D grid, p(z) from the flow and a Normal."""
    sigma = 0.1  # the proposal N(x, σ²) is close to the posterior: IWAE std ≈ 6e-4 nats/frame at K=20000
    teacher = make_teacher(2, HIDDEN, 3, n_layers=2, n_flows=2, mean_only=mean_only, sigma_x=sigma, seed=2,
                           n_speakers=2 if speakers else 0, gin_channels=2 if speakers else 0).double()
    data = sample_dataset(teacher, 3, 1, seed=3)
    g = teacher.emb_g(data.speaker).unsqueeze(-1) if speakers else None
    truth = []
    for n in range(data.n):
        axes = [torch.linspace(float(data.x[n, c, 0]) - 8 * sigma, float(data.x[n, c, 0]) + 8 * sigma, 241,
                               dtype=torch.float64) for c in range(2)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2, 1)
        z_p, logdet = teacher.flow.forward_and_logdet(grid, None, None if g is None else g[n : n + 1])
        log_prior = Normal(data.m_p[n], data.logs_p[n].exp()).log_prob(z_p).sum((1, 2)) + logdet
        log_lik = Normal(grid, sigma).log_prob(data.x[n]).sum((1, 2))
        cell = float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))
        truth.append(float(torch.logsumexp(log_prior + log_lik, 0)) + math.log(cell))
    result = evaluate(teacher, ObservationGuide.for_teacher(teacher), data, num_samples=20000, seed=0)
    assert result["num_frames"] == 3
    assert result["loglik_iwae_per_frame"] == pytest.approx(sum(truth) / 3, abs=3e-3)
    assert result["elbo_per_frame"] < result["loglik_iwae_per_frame"]


def exact_posterior_case():
    """Identity flow and decoder: p(z|x) is Gaussian; a LocalGuide holding it makes every weight log p(x)."""
    sigma = 0.5
    model = VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2, sigma_x=sigma, decoder="identity").double()
    data = sample_dataset(model, 10, T, seed=4, min_frames=2)
    var_p = torch.exp(2 * data.logs_p)
    var_q = 1 / (1 / var_p + 1 / sigma**2)
    mean_q = var_q * (data.m_p / var_p + data.x / sigma**2)
    guide = LocalGuide(data.n, C, T, init_loc=mean_q)
    with torch.no_grad():
        guide.logs_q.copy_(0.5 * torch.log(var_q))
    valid = (data.mask > 0).expand_as(data.x)
    kl = 0.5 * torch.log(var_p / var_q) + (var_q + (mean_q - data.m_p) ** 2) / (2 * var_p) - 0.5
    kl = kl[valid].sum()
    return model, guide, data, float(gaussian_loglik(data, sigma).sum()), float(kl)


def test_evaluate_with_exact_posterior_matches_closed_forms():
    model, guide, data, loglik, kl = exact_posterior_case()
    frames = data.num_frames
    state = torch.get_rng_state()
    result = evaluate(model, guide, data, num_samples=512, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert result["elbo_per_frame"] == pytest.approx(loglik / frames, rel=1e-10)
    assert result["loglik_iwae_per_frame"] == pytest.approx(loglik / frames, rel=1e-10)
    assert result["elbo_stderr_per_frame"] < 1e-10
    assert result["kl_per_frame"] == pytest.approx(kl / frames, abs=0.03)
    recon_minus_kl = result["recon_per_frame"] - result["kl_per_frame"]
    assert recon_minus_kl == pytest.approx(result["elbo_per_frame"], rel=1e-10)
    chunked = evaluate(model, guide, data, num_samples=16, seed=2, batch_size=3)
    assert chunked["elbo_per_frame"] == pytest.approx(loglik / frames, rel=1e-10)
    assert chunked["num_utterances"] == data.n and chunked["num_frames"] == frames


def test_evaluate_seeding_and_validation(speaker_data):
    teacher = small_teacher(n_speakers=3, gin_channels=2)
    guide = ObservationGuide.for_teacher(teacher)
    a = evaluate(teacher, guide, speaker_data, num_samples=8, seed=0)
    assert a == evaluate(teacher, guide, speaker_data, num_samples=8, seed=0)
    assert a != evaluate(teacher, guide, speaker_data, num_samples=8, seed=1)
    assert a["elbo_per_frame"] <= a["loglik_iwae_per_frame"]
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(teacher, guide, speaker_data, num_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(teacher, guide, speaker_data, batch_size=0)
    with pytest.raises(TypeError, match="Batch"):
        evaluate(teacher, guide, speaker_data.x)


def test_odd_channel_count():
    message = re.escape("channels must be even (the coupling splits them in halves), got 5")
    for build_odd in (lambda: VITSPriorModel(5, 8), lambda: make_teacher(5, 8),
                      lambda: ResidualCouplingBlock(5, 8, 3, 1, 1)):
        with pytest.raises(ValueError, match=message):
            build_odd()

"""VITS's per-draw MAS prior against a fixed alignment and the alignment-marginal prior
(:mod:`pyro_vits.kl.alignment_gap`).

Truths: brute-force enumeration of every monotonic alignment on tiny ragged batches, the binomial count
``C(T - 1, L - 1)``, the prior's own ``log_prob`` / ``aligned(path).log_prob``, and the three-frame example's
closed forms (``1/2 - |z|``, ``1/2 - z``, ``1/2 - log cosh z`` per draw; Gauss-Hermite for ``E log cosh z``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from speech_helpers import SPEECH, TINY, make_pair

from pyro_vits.data.speech_data import SpeechData, read_corpus
from pyro_vits.distributions import AlignedFlowPrior, MaskedNormal
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.kl.alignment_gap import (
    aligned_log_priors,
    alignment_gap,
    alignment_log_priors,
    log_alignment_count,
    log_sum_alignments,
    posterior_mean_alignment,
    three_frame_example,
)
from pyro_vits.nn.alignment import attention_mask, even_alignment

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")
FRAMES, TOKENS = (7, 5, 4, 6, 3), (4, 2, 1, 3, 3)  # a ragged batch (T = 7, L = 4), L_n = T_n included


def lengths_mask(lengths, size: int) -> torch.Tensor:
    return (torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]).to(D64).unsqueeze(1)


def ragged_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(5, 7, 4)`` with non-finite garbage in the masked cells, and the valid-pair mask."""
    gen = torch.Generator().manual_seed(seed)
    mask = attention_mask(lengths_mask(TOKENS, max(TOKENS)), lengths_mask(FRAMES, max(FRAMES)))
    scores = 3 * torch.randn(mask.shape, generator=gen, dtype=D64)
    garbage = torch.tensor([math.nan, math.inf, -math.inf], dtype=D64)[torch.arange(mask.numel()) % 3]
    return torch.where(mask > 0, scores, garbage.reshape(mask.shape)), mask


def alignments(frames: int, tokens: int) -> torch.Tensor:
    """Every monotonic alignment as the symbol of each frame, ``(C(frames - 1, tokens - 1), frames)``."""
    rows = [torch.tensor([sum(t >= c for c in cuts) for t in range(frames)])
            for cuts in itertools.combinations(range(1, frames), tokens - 1)]
    return torch.stack(rows)


def as_path(index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Symbols per frame ``(..., T_n)`` -> 0/1 path ``(..., T, L)`` (zero past ``T_n``)."""
    path = torch.zeros(index.shape[:-1] + shape, dtype=D64)
    path[..., : index.shape[-1], :] = torch.nn.functional.one_hot(index, shape[1]).to(D64)
    return path


def enumerated(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``log p(z | A)`` of utterance ``n`` for every alignment ``A``."""
    index = alignments(FRAMES[n], TOKENS[n])
    return scores[n, torch.arange(FRAMES[n]), index].sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recursion_max_and_count_equal_brute_force_enumeration(seed):
    scores, mask = ragged_case(seed)
    index = [alignments(f, t)[seed % len(alignments(f, t))] for f, t in zip(FRAMES, TOKENS)]
    fixed = torch.stack([as_path(i, scores.shape[1:]) for i in index])
    priors = alignment_log_priors(scores, mask, fixed)
    for n in range(len(FRAMES)):
        values = enumerated(scores, n)
        assert len(values) == math.comb(FRAMES[n] - 1, TOKENS[n] - 1)
        torch.testing.assert_close(priors.log_count[n], torch.tensor(math.log(len(values)), dtype=D64))
        torch.testing.assert_close(priors.mas[n], values.max())  # MAS (pyro_vits.nn.alignment) = the maximum
        torch.testing.assert_close(priors.marginal[n], torch.logsumexp(values, 0) - math.log(len(values)))
        torch.testing.assert_close(priors.fixed[n], scores[n, torch.arange(FRAMES[n]), index[n]].sum())
    torch.testing.assert_close(log_sum_alignments(scores, mask), priors.marginal + priors.log_count)
    assert priors.mas.dtype == priors.marginal.dtype == D64


def test_bounds_between_max_and_mixture_on_long_utterances():
    gen = torch.Generator().manual_seed(3)
    frames, tokens = (120, 97, 60), (40, 97, 1)
    mask = attention_mask(lengths_mask(tokens, 97), lengths_mask(frames, 120))
    scores = 5 * torch.randn(mask.shape, generator=gen, dtype=D64)
    fixed = even_alignment(lengths_mask(frames, 120), lengths_mask(tokens, 97))
    priors = alignment_log_priors(scores, mask, fixed)
    binomial = [math.lgamma(f) - math.lgamma(t) - math.lgamma(f - t + 1) for f, t in zip(frames, tokens)]
    torch.testing.assert_close(priors.log_count, torch.tensor(binomial, dtype=D64), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(log_alignment_count(mask), priors.log_count)
    assert bool((priors.marginal <= priors.mas + 1e-9).all())
    assert bool((priors.mas <= priors.marginal + priors.log_count + 1e-9).all())
    assert bool((priors.fixed <= priors.mas + 1e-9).all())
    # one alignment (L = T, or L = 1): all three coincide
    torch.testing.assert_close(priors.mas[1:], priors.marginal[1:])
    torch.testing.assert_close(priors.mas[1:], priors.fixed[1:])


def test_bad_inputs_are_named():
    scores, mask = ragged_case(0)
    fixed = torch.stack([as_path(alignments(f, t)[0], scores.shape[1:]) for f, t in zip(FRAMES, TOKENS)])
    with pytest.raises(ValueError, match="2 text tokens for 1 frames"):
        log_sum_alignments(scores[:1, :1, :2], mask[:1, :1, :2])
    with pytest.raises(ValueError, match="shape"):
        log_sum_alignments(scores[0], mask[0])
    with pytest.raises(TypeError, match="scores"):
        log_sum_alignments(scores.numpy(), mask)
    skip = fixed.clone()
    skip[0, :, :] = as_path(torch.tensor([0, 0, 2, 2, 2, 3, 3]), scores.shape[1:])
    back = fixed.clone()
    back[0, :, :] = as_path(torch.tensor([0, 1, 0, 1, 2, 3, 3]), scores.shape[1:])
    late = fixed.clone()
    late[1, :, :] = as_path(torch.tensor([0, 0, 0, 0, 0]), scores.shape[1:])
    double = fixed.clone()
    double[0, 0, 1] = 1.0
    outside = fixed.clone()
    outside[1, 6, 0] = 1.0
    for bad in (skip, back, late, double, outside, fixed[:2]):
        with pytest.raises(ValueError, match="fixed_path"):
            alignment_log_priors(scores, mask, bad)


def random_prior(make_block) -> AlignedFlowPrior:
    gen = torch.Generator().manual_seed(4)
    m_p, logs_p = torch.randn(2, 2, 4, 3, generator=gen, dtype=D64).unbind(0)
    text_mask, mask = lengths_mask((3, 2), 3), lengths_mask((5, 4), 5)
    return AlignedFlowPrior(m_p, 0.3 * logs_p, text_mask, make_block(False, 0), mask)


def test_aligned_log_priors_are_the_flow_prior_at_each_alignment(make_block):
    prior = random_prior(make_block)
    z = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(5), dtype=D64) * prior.mask
    fixed = even_alignment(prior.mask, prior.text_mask)
    priors = aligned_log_priors(prior, z, fixed)
    assert priors.mas.shape == priors.log_count.shape == (3, 2)
    torch.testing.assert_close(priors.mas, prior.log_prob(z), rtol=0, atol=1e-9)
    torch.testing.assert_close(priors.fixed, prior.aligned(fixed).log_prob(z), rtol=0, atol=1e-9)
    for n, (frames, tokens) in enumerate(((5, 3), (4, 2))):
        paths = fixed.expand(len(alignments(frames, tokens)), 2, 5, 3).clone()
        paths[:, n] = as_path(alignments(frames, tokens), (5, 3))
        each = torch.stack([prior.aligned(path).log_prob(z)[:, n] for path in paths])  # (n_A, K)
        torch.testing.assert_close(priors.marginal[:, n], torch.logsumexp(each, 0) - math.log(len(paths)))
        torch.testing.assert_close(priors.mas[:, n], each.max(0).values)
    with pytest.raises(TypeError, match="AlignedFlowPrior"):
        aligned_log_priors(prior.aligned(fixed), z, fixed)
    with pytest.raises(ValueError, match="z must be"):
        aligned_log_priors(prior, z[..., :4], fixed)
    with pytest.raises(ValueError, match="fixed_path"):
        aligned_log_priors(prior, z, fixed[..., :2])


def test_three_frame_example_number():
    example = three_frame_example()
    assert example.closed_form == 0.5 - math.sqrt(2 / math.pi)
    assert abs(example.closed_form - (-0.2979)) < 1e-4
    assert abs(example.mas - example.closed_form) < 1e-6 and example.error < 1e-6
    assert abs(example.fixed - 0.5) < 1e-12
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)  # E f(z), z ~ N(0, 1), f smooth
    log_cosh = float(np.sum(weights * (np.logaddexp(nodes, -nodes) - math.log(2))) / math.sqrt(2 * math.pi))
    assert abs(example.marginal - (0.5 - log_cosh)) < 1e-9
    assert example.log_count == pytest.approx(math.log(2), abs=1e-15)
    assert example.closed_form < 0 < example.marginal < example.closed_form + example.log_count
    with pytest.raises(ValueError, match="num_points"):
        three_frame_example(num_points=100)


def three_frame_prior() -> tuple[AlignedFlowPrior, MaskedNormal]:
    """The example on 2 channels (channel 2: every mean 0, q = prior) and an identity flow (VITS's zero-
    initialised couplings, two flips)."""
    flow = ResidualCouplingBlock(2, 4, 3, 1, 1, n_flows=2).to(D64)
    m_p = torch.tensor([[[-1.0, 1.0], [0.0, 0.0]]], dtype=D64)
    m_q = torch.tensor([[[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]], dtype=D64)
    ones = torch.ones(1, 1, 3, dtype=D64)
    prior = AlignedFlowPrior(m_p, torch.zeros_like(m_p), ones[..., :2], flow, ones)
    return prior, MaskedNormal(m_q, torch.ones_like(m_q), ones)


def test_alignment_gap_reproduces_the_three_frame_example_by_monte_carlo():
    prior, q = three_frame_prior()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        z = q.sample((4000,))  # (K, 1, 2, 3)
    torch.testing.assert_close(prior.flow(z, prior.mask), z)
    fixed = posterior_mean_alignment(prior, q.mean)
    assert fixed[0].argmax(-1).tolist() == [0, 1, 1]  # the tie at q's mean: MAS keeps the later symbol
    log_q, priors = q.log_prob(z), aligned_log_priors(prior, z, fixed)
    middle = z[:, 0, 0, 1]  # draw by draw: only the middle frame's first channel differs from its prior
    torch.testing.assert_close(log_q[:, 0] - priors.mas[:, 0], 0.5 - middle.abs())
    torch.testing.assert_close(log_q[:, 0] - priors.fixed[:, 0], 0.5 - middle)
    torch.testing.assert_close(log_q[:, 0] - priors.marginal[:, 0], 0.5 - torch.log(torch.cosh(middle)))
    gap, example = alignment_gap(log_q, priors, torch.tensor([3])), three_frame_example()
    for (mean, mcse), truth in ((gap.mas, example.mas), (gap.fixed, example.fixed),
                                (gap.marginal, example.marginal),
                                (gap.marginal_minus_mas, example.marginal - example.mas),
                                (gap.fixed_minus_mas, example.fixed - example.mas)):
        assert 0 < mcse < 0.01 and abs(3 * mean - truth) < 4 * 3 * mcse, (mean, mcse, truth)
    assert gap.mas[0] + 4 * gap.mas[1] < 0  # VITS's term: significantly negative
    assert gap.log_count == pytest.approx(math.log(2) / 3)
    with pytest.raises(ValueError, match="K >= 2"):
        alignment_gap(log_q[:1], priors, torch.tensor([3]))
    with pytest.raises(ValueError, match="frames"):
        alignment_gap(log_q, priors, torch.tensor([3, 3]))


def test_speech_model_prior_and_guide_end_to_end():
    model, guide = make_pair(False, 0, seed=2)
    train = read_corpus(TINY, SPEECH).train
    data = SpeechData(train.spec, train.lengths, train.text, train.text_lengths, None)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        prior, (m_q, logs_q) = model.prior(data), guide.posterior(data)
        q = MaskedNormal(m_q, torch.exp(logs_q), data.mask)
        z = q.sample((3,))
        fixed = posterior_mean_alignment(prior, m_q)
        priors = aligned_log_priors(prior, z, fixed)
        torch.testing.assert_close(priors.mas, prior.log_prob(z).double(), rtol=1e-5, atol=1e-3)
        at_fixed = prior.aligned(fixed).log_prob(z).double()
        torch.testing.assert_close(priors.fixed, at_fixed, rtol=1e-5, atol=1e-3)
        gap = alignment_gap(q.log_prob(z), priors, data.lengths)
    assert priors.mas.shape == (3, data.n)
    assert gap.fixed_minus_mas[0] >= 0 and 0 <= gap.marginal_minus_mas[0] <= gap.log_count
    assert all(math.isfinite(v) for field in gap[:5] for v in field)

"""Monotonic alignment and VITS's KL term: what ``E_q[log q(z) - max_A log p(z | A)]`` estimates.

For a monotonic alignment ``A`` of an utterance's ``T`` frames to its ``L`` symbols (each frame maps to one
symbol, symbols in order, each symbol gets at least one frame) the prior
``p(z | A) = N(f(z); A m_p, A s_p) |det f'(z)|`` is a normalised density. VITS evaluates its prior at the
alignment that MAS (:func:`~pyro_vits.nn.alignment.maximum_path`) picks on ``z_p = f(z)`` for that very draw,
i.e. the density ``max_A p(z | A)``. With ``n_A = C(T - 1, L - 1)`` alignments:

- the alignment-marginal prior ``p_mix(z) = (1 / n_A) sum_A p(z | A)`` (the uniform mixture) is normalised;
- ``max_A p(z | A) >= p(z | A)`` for every ``A``; it is not normalised: it integrates to ``Z`` with
  ``1 <= Z <= n_A``;
- pointwise ``log p_mix(z) <= max_A log p(z | A) <= log p_mix(z) + log n_A``.

So VITS's term ``E_q[log q - max_A log p(z | A)] = KL(q || max/Z) - log Z`` lies between
``KL(q || p_mix) - log n_A`` and ``KL(q || p_mix)``, and, unlike a KL, its expectation can be negative
(:func:`three_frame_example`). A fixed alignment ``A_0`` (e.g. MAS on the posterior mean) keeps the prior
normalised: ``E_q[log q - log p(z | A_0)] = KL(q || p(. | A_0)) >= 0``, and pointwise it is at least VITS's
term.

Contents: the three log priors from MAS's score matrix (:func:`alignment_log_priors`, with the forward
recursion :func:`log_sum_alignments` and the count :func:`log_alignment_count`), the same for an
:class:`~pyro_vits.distributions.aligned.AlignedFlowPrior` at draws ``z`` (:func:`aligned_log_priors`), their
per-frame KL estimates with MCSE (:func:`alignment_gap`), and the three-frame example.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Normal
from torch.nn import functional as F

from .._validate import check_positive_ints
from ..distributions.aligned import AlignedFlowPrior
from ..nn.alignment import alignment_lengths, maximum_path

__all__ = ["AlignmentLogPriors", "log_sum_alignments", "log_alignment_count", "alignment_log_priors",
           "posterior_mean_alignment", "aligned_log_priors", "AlignmentGap", "alignment_gap",
           "ThreeFrameExample", "three_frame_example"]


class AlignmentLogPriors(NamedTuple):
    """Log priors of one latent per utterance, float64 nats per utterance, each of the same shape."""

    mas: Tensor
    """``max_A log p(z | A)``: the alignment MAS picks for this draw (VITS's prior)."""
    fixed: Tensor
    """``log p(z | A_0)`` for the caller's fixed alignment ``A_0``."""
    marginal: Tensor
    """``log p_mix(z) = log sum_A p(z | A) - log n_A``: the uniform mixture over the monotonic alignments."""
    log_count: Tensor
    """``log n_A``: the number of monotonic alignments (``mas - marginal`` lies in ``[0, log_count]``)."""


def _check_path(path: Tensor, mask: Tensor, frames: Tensor, tokens: Tensor) -> None:
    """Raise unless ``path (N, T, L)`` is a monotonic alignment of each utterance (module docstring)."""
    if not isinstance(path, Tensor) or path.shape != mask.shape:
        raise ValueError(f"fixed_path must be a Tensor of shape {tuple(mask.shape)}, got "
                         f"{getattr(path, 'shape', type(path).__name__)}")
    valid = mask[:, :, 0] > 0  # (N, T)
    if not bool(((path == 0) | (path == 1)).all()) or bool(((path != 0) & (mask == 0)).any()) \
            or not torch.equal(path.sum(-1) == 1, valid):
        raise ValueError("fixed_path must be 0/1, 0 outside mask, with exactly one symbol per valid frame")
    index = path.argmax(-1)  # (N, T)
    steps = index.diff(dim=1)
    monotone = (((steps == 0) | (steps == 1)) | ~valid[:, 1:]).all(1)
    ends = (index[:, 0] == 0) & (index.gather(1, (frames - 1)[:, None])[:, 0] == tokens - 1)
    if not bool((monotone & ends).all()):
        raise ValueError("fixed_path must be monotonic: from symbol 0, steps of 0 or 1, to the last symbol")


def log_sum_alignments(scores: Tensor, mask: Tensor) -> Tensor:
    """``log sum_A exp(sum_t scores[n, t, A(t)])`` over the monotonic alignments ``A`` of each utterance.

    ``scores (N, T, L)`` nats (e.g. :func:`~pyro_vits.nn.alignment.neg_cent`: frame ``t`` against symbol
    ``l``) and ``mask (N, T, L)`` (:func:`~pyro_vits.nn.alignment.attention_mask`): utterance ``n`` has
    ``T_n = mask[n, :, 0].sum()`` frames and ``L_n = mask[n, 0, :].sum()`` symbols, ``1 <= L_n <= T_n``;
    masked cells are never read. The forward (log-sum-exp) recursion over MAS's lattice,
    ``alpha[t, l] = scores[t, l] + logaddexp(alpha[t-1, l], alpha[t-1, l-1])`` from
    ``alpha[0] = (scores[0, 0], -inf, ...)``, read at ``(T_n - 1, L_n - 1)``: a loop of ``T`` steps, each
    vectorised over ``(N, L)``. Returns ``(N,)`` float64 (computed in float64), without gradient.
    """
    frames, tokens = alignment_lengths(scores, mask, "scores")
    with torch.no_grad():
        s = torch.where(mask > 0, scores.detach().double(), 0.0)
        alpha = torch.where(torch.arange(s.shape[2], device=s.device) == 0, s[:, 0], -math.inf)
        last = (tokens - 1)[:, None]
        out = alpha.gather(1, last)[:, 0]
        for t in range(1, s.shape[1]):
            alpha = s[:, t] + torch.logaddexp(alpha, F.pad(alpha[:, :-1], (1, 0), value=-math.inf))
            out = torch.where(frames == t + 1, alpha.gather(1, last)[:, 0], out)
    return out


def log_alignment_count(mask: Tensor) -> Tensor:
    """``log n_A = log C(T_n - 1, L_n - 1)``, the number of monotonic alignments of each utterance of
    ``mask (N, T, L)`` (as in :func:`log_sum_alignments`), by the same recursion on zero scores: ``(N,)``
    float64."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    return log_sum_alignments(torch.zeros_like(mask, dtype=torch.float64), mask)


def _along(scores: Tensor, path: Tensor, mask: Tensor) -> Tensor:
    """``sum_{t, l} scores[n, t, l]`` over the cells of ``path`` (and ``mask``), float64 ``(N,)``."""
    return torch.where((mask > 0) & (path > 0), scores.detach().double(), 0.0).sum((-2, -1))


def alignment_log_priors(scores: Tensor, mask: Tensor, fixed_path: Tensor) -> AlignmentLogPriors:
    """The three log priors of :class:`AlignmentLogPriors` from MAS's inputs, each ``(N,)`` float64 nats.

    ``scores, mask (N, T, L)`` as in :func:`log_sum_alignments`:
    ``scores[n, t, l] = log p(frame t | symbol l)``
    (for VITS ``log N(z_p[:, t]; m_p[:, l], s_p[:, l])`` summed over channels), so that
    ``log p(z | A) = sum_t scores[t, A(t)]``. ``fixed_path (N, T, L)``: a 0/1 monotonic alignment (checked).
    ``mas`` is the value of the path :func:`~pyro_vits.nn.alignment.maximum_path` picks (float32 scores and
    tie-breaking as VITS), summed in float64; ``marginal`` and ``log_count`` come from the forward recursion.
    No gradient.
    """
    frames, tokens = alignment_lengths(scores, mask, "scores")
    _check_path(fixed_path, mask, frames, tokens)
    log_count = log_alignment_count(mask)
    mas_path = maximum_path(torch.where(mask > 0, scores.detach(), 0.0), mask)  # masked cells: never read
    return AlignmentLogPriors(_along(scores, mas_path, mask), _along(scores, fixed_path, mask),
                              log_sum_alignments(scores, mask) - log_count, log_count)


def posterior_mean_alignment(prior: AlignedFlowPrior, m_q: Tensor) -> Tensor:
    """The alignment MAS picks on ``f(m_q)`` for the posterior mean ``m_q (B, C, T)``: a 0/1 ``(B, T, L)``
    path, e.g. the ``fixed_path`` of :func:`aligned_log_priors`."""
    if not isinstance(prior, AlignedFlowPrior):
        raise TypeError(f"prior must be an AlignedFlowPrior, got {type(prior).__name__}")
    with torch.no_grad():
        return prior.alignment(prior.flow(m_q, prior.mask, prior.g))


def aligned_log_priors(prior: AlignedFlowPrior, z: Tensor, fixed_path: Tensor) -> AlignmentLogPriors:
    """The three log priors of ``z (..., C, T)`` (e.g. ``(K, B, C, T)`` draws from ``q``) under ``prior``.

    ``log p(z | A) = log N(f(z); A m_p, A s_p) + log|det f'(z)|``; ``mas`` (alignment per draw) is
    ``prior.log_prob(z)``, ``fixed`` uses ``fixed_path`` (``(B, T, L)`` or broadcasting to ``z``'s leading
    dims; e.g. :func:`posterior_mean_alignment`), ``marginal`` the uniform mixture over alignments. Works for
    any model whose ``prior(batch)`` is an :class:`~pyro_vits.distributions.aligned.AlignedFlowPrior`
    (:class:`~pyro_vits.models.speech.SpeechModel`, :class:`~pyro_vits.models.refit.RefitModel`). Fields have
    ``z``'s leading shape broadcast with the batch shape, float64 nats per utterance (scores in float64); no
    gradient.
    """
    if not isinstance(prior, AlignedFlowPrior):
        raise TypeError(f"prior must be an AlignedFlowPrior, got {type(prior).__name__}")
    if not isinstance(z, Tensor) or z.shape[-2:] != prior.event_shape:
        raise ValueError(f"z must be a Tensor (..., {prior.event_shape[0]}, {prior.event_shape[1]}), got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    with torch.no_grad():
        z_p, logdet = prior.flow.forward_and_logdet(z, prior.mask, prior.g)
        cent, pairs = prior.scores(z_p.double())
        lead, cells = cent.shape[:-2], cent.shape[-2:]
        if not isinstance(fixed_path, Tensor) or fixed_path.shape[-2:] != cells:
            raise ValueError(f"fixed_path must be a (..., T, L) = (..., {cells[0]}, {cells[1]}) Tensor, got "
                             f"{getattr(fixed_path, 'shape', type(fixed_path).__name__)}")
        flat = [x.expand(cent.shape).reshape((-1,) + cells) for x in (cent, pairs, fixed_path)]
        priors = alignment_log_priors(*flat)
    logdet = logdet.double().expand(lead)
    return AlignmentLogPriors(priors.mas.reshape(lead) + logdet, priors.fixed.reshape(lead) + logdet,
                              priors.marginal.reshape(lead) + logdet, priors.log_count.reshape(lead))


class AlignmentGap(NamedTuple):
    """KL-like estimates ``E_q[log q(z) - log p(z)]`` in nats per valid frame (summed over utterances and
    channels, divided by the summed frames: VITS's normalisation), each ``(mean, mcse)`` over the draws."""

    mas: tuple[float, float]
    """VITS's term: the prior at the alignment MAS picks per draw, ``max_A p(z | A)``."""
    fixed: tuple[float, float]
    """``KL(q || p(. | A_0))`` for the fixed alignment ``A_0``."""
    marginal: tuple[float, float]
    """``KL(q || p_mix)``, the alignment-marginal (uniform-mixture) prior."""
    fixed_minus_mas: tuple[float, float]
    """``fixed - mas`` (paired over the draws), ``>= 0`` draw by draw."""
    marginal_minus_mas: tuple[float, float]
    """``marginal - mas`` (paired), in ``[0, log_count]`` draw by draw."""
    log_count: float
    """``sum_n log n_A / sum_n T_n``: the bound on ``marginal_minus_mas``."""


def _mean_mcse(x: Tensor, total: float) -> tuple[float, float]:
    """``x (K, N)`` nats per utterance -> per-frame mean and its MCSE over the ``K`` draws."""
    return float(x.mean(0).sum() / total), float(math.sqrt(float(x.var(0).sum()) / x.shape[0]) / total)


def alignment_gap(log_q: Tensor, log_priors: AlignmentLogPriors, frames: Tensor) -> AlignmentGap:
    """Per-frame means and MCSEs of ``log q - log p`` for the three priors of ``log_priors``.

    ``log_q (K, N)``: ``log q(z_kn)`` in nats per utterance for ``K >= 2`` i.i.d. draws of each of ``N``
    utterances; ``log_priors``: :func:`aligned_log_priors` of the same draws (fields ``(K, N)``; for a corpus,
    concatenate batches along ``N``); ``frames (N,)``: valid frames per utterance. With ``F = sum_n T_n``:
    mean ``= sum_n mean_k x_kn / F`` and ``mcse = sqrt(sum_n var_k x_kn / K) / F`` (utterances fixed).
    """
    if not isinstance(log_q, Tensor) or log_q.dim() != 2 or log_q.shape[0] < 2:
        raise ValueError(f"log_q must be a (K, N) Tensor with K >= 2, got {getattr(log_q, 'shape', log_q)!r}")
    if any(value.shape != log_q.shape for value in log_priors[:3]):
        raise ValueError(f"log_priors' fields must have log_q's shape {tuple(log_q.shape)}")
    if not isinstance(frames, Tensor) or frames.shape != log_q.shape[1:]:
        got = getattr(frames, "shape", frames)
        raise ValueError(f"frames must be a ({log_q.shape[1]},) Tensor, got {got!r}")
    total = float(frames.sum())
    mas, fixed, marginal = (log_q.double() - value for value in log_priors[:3])
    log_count = float(log_priors.log_count.expand(log_q.shape)[0].sum()) / total
    return AlignmentGap(_mean_mcse(mas, total), _mean_mcse(fixed, total), _mean_mcse(marginal, total),
                        _mean_mcse(fixed - mas, total), _mean_mcse(marginal - mas, total), log_count)


class ThreeFrameExample(NamedTuple):
    """The three-frame example's expectations ``E_q[log q(z) - log p(z)]``, nats per utterance (3 frames)."""

    closed_form: float
    """``1/2 - sqrt(2/pi) = -0.29788``: VITS's term (per-draw MAS) in closed form."""
    mas: float
    """VITS's term by quadrature through :func:`alignment_log_priors`."""
    fixed: float
    """With ``A_0`` = MAS on ``q``'s mean (a tie: the middle frame goes to symbol 2): ``1/2`` exactly."""
    marginal: float
    """``KL(q || p_mix) = 1/2 - E log cosh(z)``, by quadrature."""
    log_count: float
    """``log n_A = log 2``."""
    error: float
    """``max |I(h) - I(2h)|`` over the three quadratures: a conservative bound on their step error."""


def _trapezoid(values: Tensor, step: float) -> tuple[float, float]:
    """Trapezoid rule on an odd number of equally spaced points: ``(I(h), |I(h) - I(2h)|)``."""
    fine, coarse = float(torch.trapezoid(values, dx=step)), float(torch.trapezoid(values[::2], dx=2 * step))
    return fine, abs(fine - coarse)


def three_frame_example(num_points: int = 24001, width: float = 12.0) -> ThreeFrameExample:
    """The referee's example, where VITS's term has a negative expectation: :class:`ThreeFrameExample`.

    ``T = 3`` frames, ``L = 2`` symbols with ``m_p = (-1, +1)``, ``s_p = 1``, one channel, identity flow;
    ``q = N(-1, 1), N(0, 1), N(+1, 1)`` on the three frames. Both monotonic alignments pin frame 1 to
    symbol 1 and frame 3 to symbol 2, where ``q`` equals the prior, so ``log q - log p`` is 0 there draw by
    draw; only the middle frame's symbol ``m`` is free, and ``log N(z; 0, 1) - log N(z; m, 1) = 1/2 - m z``.
    With ``z ~ N(0, 1)`` (all per utterance; divide by 3 for per frame):

    - VITS's term: MAS picks the nearer mean, ``m = sign(z)``: ``E[1/2 - |z|] = 1/2 - sqrt(2/pi) = -0.29788``;
    - fixed alignment ``A_0`` (MAS on ``q``'s mean): ``E[1/2 - z] = 1/2``;
    - alignment-marginal: ``E[1/2 - log cosh z] = KL(q || p_mix) > 0``.

    The quadratures integrate ``N(z; 0, 1) (log q - log p)`` over the middle frame's ``z`` by the trapezoid
    rule on ``num_points`` (odd) points spanning ``+-width``, each point one utterance of a batched
    ``(num_points, 3, 2)`` score matrix through :func:`alignment_log_priors`.
    """
    check_positive_ints(num_points=num_points)
    if num_points < 5 or num_points % 2 == 0 or not width > 0:
        raise ValueError(f"num_points must be an odd int >= 5 and width > 0, got {num_points!r}, {width!r}")
    grid = torch.cat([torch.zeros(1, dtype=torch.float64),  # q's mean (for A_0), then the quadrature points
                      torch.linspace(-width, width, num_points, dtype=torch.float64)])
    middle = Normal(torch.tensor([-1.0, 1.0], dtype=torch.float64), 1.0).log_prob(grid[:, None])  # (P, L)
    scores = F.pad(middle[:, None, :], (0, 0, 1, 1))  # frames 1 and 3: 0, their log q - log p
    mask = torch.ones_like(scores)
    fixed_path = maximum_path(scores[:1], mask[:1]).expand_as(scores)
    priors = alignment_log_priors(scores, mask, fixed_path)
    log_q = Normal(0.0, 1.0).log_prob(grid)
    step = 2 * width / (num_points - 1)
    (mas, e1), (fixed, e2), (marginal, e3) = (
        _trapezoid((log_q.exp() * (log_q - value))[1:], step) for value in priors[:3])
    return ThreeFrameExample(0.5 - math.sqrt(2 / math.pi), mas, fixed, marginal, float(priors.log_count[0]),
                             max(e1, e2, e3))

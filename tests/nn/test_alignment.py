"""Monotonic alignment search against a straightforward dynamic programme written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_vits.nn.alignment import attention_mask, expand_prior, maximum_path, neg_cent


def reference_path(scores: np.ndarray, t_spec: int, t_text: int) -> np.ndarray:
    """Best monotonic path through ``scores[:t_spec, :t_text]`` (each frame one token, tokens advance by 0
    or 1 per frame, start at (0, 0), end at (t_spec-1, t_text-1)), float32 sums; on a tie the backward
    pass stays on the current token."""
    neg = np.float32(-1e9)
    best = np.full((t_spec, t_text), neg, dtype=np.float32)
    for y in range(t_spec):
        for x in range(t_text):
            if x > y or x < t_text - t_spec + y:
                continue  # unreachable from (0, 0) or cannot reach the end
            if y == 0:
                prev = np.float32(0.0)
            else:
                stay = best[y - 1, x] if x < y else neg
                move = best[y - 1, x - 1] if x > 0 else neg
                prev = max(stay, move)
            best[y, x] = np.float32(scores[y, x]) + prev
    path = np.zeros(scores.shape, dtype=np.float32)
    x = t_text - 1
    for y in range(t_spec - 1, -1, -1):
        path[y, x] = 1
        if x > 0 and (x == y or best[y - 1, x] < best[y - 1, x - 1]):
            x -= 1
    return path


def ragged_case(seed: int, batch: int = 5, frames: int = 23, tokens: int = 9):
    gen = torch.Generator().manual_seed(seed)
    t_text = torch.randint(1, tokens + 1, (batch,), generator=gen)
    t_spec = t_text + torch.randint(0, frames - tokens + 1, (batch,), generator=gen)
    t_text[0], t_spec[0] = tokens, frames  # one utterance fills the padding exactly
    scores = torch.randn(batch, frames, tokens, generator=gen) * 3
    x_mask = (torch.arange(tokens) < t_text[:, None]).float().unsqueeze(1)
    y_mask = (torch.arange(frames) < t_spec[:, None]).float().unsqueeze(1)
    return scores, attention_mask(x_mask, y_mask), t_spec, t_text


@pytest.mark.parametrize("seed", range(6))
def test_maximum_path_equals_reference_dp(seed):
    scores, mask, t_spec, t_text = ragged_case(seed)
    path = maximum_path(scores, mask)
    assert path.shape == scores.shape and path.dtype == scores.dtype
    for b in range(scores.shape[0]):
        expected = reference_path(scores[b].numpy(), int(t_spec[b]), int(t_text[b]))
        np.testing.assert_array_equal(path[b].numpy(), expected)
        valid = path[b, : t_spec[b], : t_text[b]]
        assert torch.equal(valid.sum(1), torch.ones(int(t_spec[b])))  # one token per frame
        assert bool((valid.sum(0) >= 1).all())  # every token used
        assert float(path[b].sum()) == int(t_spec[b])  # nothing on padding


def test_maximum_path_ties_and_edges():
    scores = torch.zeros(1, 4, 2)  # every path ties: stay on the last token as long as possible backwards
    mask = torch.ones(1, 4, 2)
    np.testing.assert_array_equal(
        maximum_path(scores, mask)[0].numpy(), reference_path(np.zeros((4, 2)), 4, 2)
    )
    assert maximum_path(scores, mask)[0, :, 0].tolist() == [1, 0, 0, 0]
    square = maximum_path(torch.randn(1, 3, 3), torch.ones(1, 3, 3))[0]
    assert torch.equal(square, torch.eye(3))  # T_text == T_spec: the diagonal is the only path


def test_maximum_path_rejects_bad_input():
    with pytest.raises(ValueError, match="utterance 0 .* 3 text tokens for 2 frames"):
        maximum_path(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="mask must have"):
        maximum_path(torch.zeros(1, 2, 3), torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match=r"\(B, T_spec, T_text\)"):
        maximum_path(torch.zeros(2, 3), torch.ones(2, 3))


def test_neg_cent_is_summed_gaussian_log_density():
    gen = torch.Generator().manual_seed(0)
    z_p, m_p, logs_p = (torch.randn(2, 4, n, generator=gen) for n in (7, 3, 3))
    scores = neg_cent(z_p, m_p, logs_p.double().float())
    direct = (
        torch.distributions.Normal(m_p.unsqueeze(2), torch.exp(logs_p).unsqueeze(2))
        .log_prob(z_p.unsqueeze(3))
        .sum(1)
    )  # (B, T_spec, T_text)
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-4)
    assert math.isfinite(float(scores.sum()))


def test_expand_prior_copies_token_stats_to_frames():
    path = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 0]]])  # 3 valid frames, 2 tokens
    m_p = torch.tensor([[[1.0, 2.0]]])
    m, logs = expand_prior(path, m_p, -m_p)
    assert m.tolist() == [[[1.0, 1.0, 2.0, 0.0]]] and logs.tolist() == [[[-1.0, -1.0, -2.0, 0.0]]]

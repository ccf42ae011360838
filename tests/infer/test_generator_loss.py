"""VITSGeneratorLoss: VITS's 45 * mel L1 + kl_loss (per-draw MAS), every KL estimator, KL particles."""

from __future__ import annotations

import pyro
import pytest
import torch
from refit_helpers import tiny_parts
from speech_helpers import TINY

from pyro_vits.data.mel import mel_spectrogram
from pyro_vits.data.refit_corpus import TextIds, read_refit_corpus
from pyro_vits.infer.generator_loss import VITSGeneratorLoss
from pyro_vits.kl.estimators import ESTIMATORS
from pyro_vits.models.refit import C_MEL, RefitModel, rand_slice_segments, refit_guide
from pyro_vits.nn.alignment import maximum_path

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")]


@pytest.fixture(scope="module")
def data():
    return read_refit_corpus(TINY, TextIds(), n_fft=256, hop_length=128, win_length=256)


def _pair():
    parts = tiny_parts(2)
    model = RefitModel(parts["enc_p"], parts["flow"], parts["dec"], parts["emb_g"], n_fft=256, win_length=256,
                       segment_frames=8)
    guide = refit_guide(129, 6, 16, n_layers=2, emb_g=parts["emb_g"], seed=0)
    return model, guide, parts


def _vits_generator_loss(parts, guide, data, idx, seed):
    """VITS's train.py + losses.kl_loss, written out: enc_q draw, flow, MAS on z_p (monotonic_align with
    VITS's neg_cent), expanded m_p/logs_p, rand_slice_segments, dec, 45 * l1 + kl_loss."""
    sub = data.subset(idx)
    g = parts["emb_g"](sub.speaker).unsqueeze(-1)
    torch.manual_seed(seed)
    y_mask = sub.mask
    m_q, logs_q = guide.encode(sub.spec, y_mask, g)
    z = (m_q + torch.randn_like(m_q) * torch.exp(logs_q)) * y_mask
    _, m_p, logs_p, x_mask = parts["enc_p"](sub.text, sub.text_lengths)
    z_p = parts["flow"](z, y_mask, g=g)
    s_p_sq_r = torch.exp(-2 * logs_p)
    neg_cent = (torch.sum(-0.5 * torch.log(2 * torch.pi * torch.ones(1)) - logs_p, [1], keepdim=True)
                + torch.matmul(-0.5 * (z_p**2).transpose(1, 2), s_p_sq_r)
                + torch.matmul(z_p.transpose(1, 2), m_p * s_p_sq_r)
                + torch.sum(-0.5 * (m_p**2) * s_p_sq_r, [1], keepdim=True))
    attn_mask = x_mask.unsqueeze(2) * y_mask.unsqueeze(-1)
    attn = maximum_path(neg_cent.detach(), attn_mask.squeeze(1).detach())
    m_p = torch.matmul(attn, m_p.transpose(1, 2)).transpose(1, 2)
    logs_p = torch.matmul(attn, logs_p.transpose(1, 2)).transpose(1, 2)
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2.0 * logs_p)
    kl_loss = torch.sum(kl * y_mask) / torch.sum(y_mask)
    starts = rand_slice_segments(sub.lengths, 8)
    index = starts[:, None] + torch.arange(8)
    z_slice = torch.gather(z, 2, index[:, None, :].expand(-1, z.shape[1], -1))
    y_hat = parts["dec"](z_slice, g)[:, 0]
    mel = lambda w: mel_spectrogram(w, 22050, 256, 128, 256)  # noqa: E731
    y_mel = torch.gather(mel(sub.wav), 2, index[:, None, :].expand(-1, 80, -1))
    return C_MEL * torch.nn.functional.l1_loss(mel(y_hat), y_mel) + kl_loss


def test_the_loss_is_vits_generator_loss_on_the_same_draws(data):
    model, guide, parts = _pair()
    idx = torch.tensor([2, 0])
    torch.manual_seed(3)
    got = VITSGeneratorLoss("vits").differentiable_loss(model, guide, data, subsample=idx)
    want = _vits_generator_loss(parts, guide, data, idx, seed=3)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_gives_a_finite_loss_and_gradient(data, estimator):
    pyro.clear_param_store()
    model, guide, _ = _pair()
    loss = VITSGeneratorLoss(estimator, kl_particles=2).loss_and_grads(model, guide, data, subsample_size=2)
    grads = [p.grad for p in guide.parameters() if p.requires_grad and p.grad is not None]
    assert torch.isfinite(torch.tensor(loss)) and grads and all(torch.isfinite(g).all() for g in grads)


def test_estimators_with_vits_gradient_agree_and_fixes_reduce_the_batch_mean(data):
    model, guide, _ = _pair()
    terms = {}
    for name in ("vits", "mc", "clamp", "abs"):
        torch.manual_seed(5)
        terms[name] = VITSGeneratorLoss(name).terms(model, guide, data, subsample_size=3)
    assert torch.equal(terms["vits"]["recon"], terms["mc"]["recon"])
    kl = float(terms["vits"]["kl"].detach())
    assert float(terms["clamp"]["kl"].detach()) == pytest.approx(max(kl, 0.0))
    assert float(terms["abs"]["kl"].detach()) == pytest.approx(abs(kl))
    assert kl == pytest.approx(float(terms["vits"]["kl_per_utterance"].detach().sum()
                                     / terms["vits"]["frames"].sum()))


def test_kl_particles_average_the_first_draw_with_extra_ones(data):
    model, guide, _ = _pair()
    torch.manual_seed(7)
    one = VITSGeneratorLoss("vits").terms(model, guide, data, subsample=torch.tensor([1, 3]))
    torch.manual_seed(7)
    four = VITSGeneratorLoss("vits", kl_particles=4).terms(model, guide, data, subsample=torch.tensor([1, 3]))
    assert torch.equal(one["frames"], four["frames"])
    assert not torch.equal(one["kl"], four["kl"])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="estimator"):
        VITSGeneratorLoss("nope")
    with pytest.raises(ValueError, match="kl_particles"):
        VITSGeneratorLoss(kl_particles=0)


def test_a_shared_alignment_never_lowers_the_kl_of_the_extra_draws(data):
    """Each draw's own MAS path maximises its prior density, so scoring draws 2..K with draw 1's path can
    only raise VITS's estimate (same draws: same seed)."""
    model, guide, _ = _pair()
    kl = {}
    for shared in (False, True):
        torch.manual_seed(11)
        terms = VITSGeneratorLoss("vits", kl_particles=4, shared_alignment=shared).terms(
            model, guide, data, subsample=torch.tensor([0, 1, 2]))
        kl[shared] = terms["kl_per_utterance"]
    assert bool((kl[True] >= kl[False] - 1e-4).all())


def test_a_data_parallel_share_scales_the_loss_and_one_process_is_left_alone(data):
    """Under DataParallel a process's sites carry poutine.scale(share): its VITS loss is weighted by it."""
    model, guide, _ = _pair()
    idx = torch.tensor([3, 1])
    torch.manual_seed(2)
    alone = VITSGeneratorLoss("vits").terms(model, guide, data, subsample=idx)
    torch.manual_seed(2)
    with pyro.poutine.scale(scale=0.25):
        shared = VITSGeneratorLoss("vits").terms(model, guide, data, subsample=idx)
    assert torch.equal(alone["loss"], alone["recon"] + alone["kl"])
    assert float(shared["loss"].detach()) == pytest.approx(0.25 * float(alone["loss"].detach()), rel=1e-6)

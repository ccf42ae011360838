"""The refit model: VITS's prior and decoder frozen, the posterior encoder trained on 45 * mel L1 + KL."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from refit_helpers import tiny_parts
from speech_helpers import TINY

from pyro_vits.data.refit_corpus import RefitData, TextIds, read_refit_corpus
from pyro_vits.infer.elbo import make_elbo
from pyro_vits.models.refit import C_MEL, RefitModel, rand_slice_segments, refit_guide

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    return read_refit_corpus(TINY, TextIds(), n_fft=256, hop_length=128, win_length=256)


def _pair(speakers=2):
    parts = tiny_parts(speakers)
    model = RefitModel(parts["enc_p"], parts["flow"], parts["dec"], parts["emb_g"], n_fft=256, win_length=256,
                       segment_frames=8)
    guide = refit_guide(129, 6, 16, n_layers=2, emb_g=parts["emb_g"], seed=0)
    return model, guide


def test_data_carries_the_waveform_through_subsets(data):
    assert isinstance(data, RefitData) and data.n == 4 and data.hop == 128
    assert data.wav.shape[1] >= data.frames * 128
    sub = data.subset(torch.tensor([3, 1]))
    assert sub.wav.shape == (2, sub.frames * 128) and torch.equal(sub.wav[0], data.wav[3, : sub.wav.shape[1]])


def test_rand_slice_segments_stay_inside():
    torch.manual_seed(0)
    lengths = torch.tensor([40, 32, 10] * 50)
    starts = rand_slice_segments(lengths, 32)
    assert int(starts.min()) >= 0 and bool((starts <= (lengths - 32).clamp(min=0)).all())
    assert int(starts[::3].max()) > 0


@pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")
@pytest.mark.parametrize("speakers", [0, 2])
def test_steps_are_finite_train_only_enc_q_and_keep_the_voice_frozen(data, speakers):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = _pair(speakers)
    if not speakers:
        data = RefitData(data.spec, data.lengths, data.text, data.text_lengths, None, wav=data.wav, hop=128)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in guide.state_dict().items() if not k.startswith("emb_g")}
    svi = SVI(model, guide, Adam({"lr": 1e-2}), make_elbo("vits"))
    losses = [svi.step(data, subsample_size=2) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, guide.state_dict()[k]) for k, v in before.items())
    names = set(pyro.get_param_store().keys())
    assert names and all(n.startswith("enc_q$$$") and "emb_g" not in n for n in names)
    assert not any(p.requires_grad for p in model.parameters())


def test_the_recon_factor_is_vits_mel_term_times_frames(data, monkeypatch):
    """sum of the factor over the minibatch = -45 * (mean L1 over B x mels x S) * F_b, times N/B in the ELBO."""
    model, guide = _pair()
    l1 = torch.tensor([0.5, 1.5])
    monkeypatch.setattr(model, "l1", lambda z, sub: l1)
    idx = torch.tensor([0, 2])
    trace = pyro.poutine.trace(model).get_trace(data, subsample=idx)
    site = trace.nodes["recon"]
    frames = float(data.lengths[idx].sum())
    assert float(site["fn"].log_factor.sum()) == pytest.approx(-C_MEL * float(l1.mean()) * frames)
    assert site["scale"] == pytest.approx(data.n / 2)


@pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")
def test_vectorised_particles_and_kl_particles_run(data):
    pyro.clear_param_store()
    model, guide = _pair()
    for elbo in (make_elbo("vits", particles=2), make_elbo("stl", kl_particles=2)):
        loss = elbo.differentiable_loss(model, guide, data, subsample_size=2)
        assert torch.isfinite(loss)


def test_the_target_mel_is_vits_spec_to_mel_of_the_training_spectrogram(data):
    """VITS's y_mel = spec_to_mel_torch(spec): the mel of the waveform equals the filterbank on ``spec``."""
    from pyro_vits.data.mel import mel_basis, mel_spectrogram

    n = int(data.lengths[0])
    mel = mel_spectrogram(data.wav[0, : n * 128], 22050, 256, 128, 256)
    want = torch.log(torch.clamp(mel_basis(22050, 256) @ data.spec[0, :, :n], min=1e-5))
    torch.testing.assert_close(mel, want, rtol=1e-4, atol=1e-4)

"""Guides: Pyro sites and shapes, exact zeros on padded frames, subsampling and local indexing."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vits.distributions import MaskedNormal
from pyro_vits.models import (
    LocalGuide,
    ObservationGuide,
    PosteriorEncoder,
    VITSPriorModel,
    make_teacher,
    sample_dataset,
)

pytestmark = pytest.mark.usefixtures("single_thread")

C, T, N, HIDDEN = 4, 6, 5, 8


@pytest.fixture
def data():
    teacher = make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, n_speakers=3, gin_channels=2, seed=0)
    return sample_dataset(teacher, N, T, seed=1, min_frames=2)


def encoder(speakers: bool = True) -> PosteriorEncoder:
    torch.manual_seed(0)
    return PosteriorEncoder(C, C, HIDDEN, 3, n_layers=2, n_speakers=3 if speakers else 0,
                            gin_channels=2 if speakers else 0)


def local_guide(data) -> LocalGuide:
    gen = torch.Generator().manual_seed(2)
    return LocalGuide(N, C, T, init_loc=torch.randn(N, C, T, generator=gen), init_scale=0.3)


def z_site(guide, data, **kwargs):
    trace = poutine.trace(guide).get_trace(data, **kwargs)
    return trace.nodes["z"], trace


@pytest.mark.parametrize("kind", ["encoder", "local", "observation"])
def test_site_shape_distribution_and_padded_zeros(data, kind):
    makers = {"encoder": encoder, "local": lambda: local_guide(data),
              "observation": lambda: ObservationGuide(0.2)}
    guide = makers[kind]()
    site, _ = z_site(guide, data)
    assert site["type"] == "sample" and not site["is_observed"]
    assert isinstance(site["fn"], MaskedNormal)
    assert site["value"].shape == (N, C, T) and site["fn"].batch_shape == (N,)
    pads = (data.mask == 0).expand(N, C, T)
    assert pads.any()
    assert bool((site["value"][pads] == 0).all())
    m_q, logs_q = guide.posterior(data)
    assert m_q.shape == logs_q.shape == (N, C, T)
    assert bool((m_q[pads] == 0).all()) and bool((logs_q[pads] == 0).all())
    torch.testing.assert_close(site["fn"].loc, m_q)
    torch.testing.assert_close(site["fn"].scale, torch.exp(logs_q))


def test_observation_guide_is_n_x_sigma(data):
    m_q, logs_q = ObservationGuide(0.2).posterior(data)
    torch.testing.assert_close(m_q, data.x * data.mask)
    torch.testing.assert_close(logs_q, math.log(0.2) * data.mask.expand(N, C, T))


def test_observation_guide_for_teacher_requires_identity_decoder():
    assert ObservationGuide.for_teacher(make_teacher(C, HIDDEN, seed=0, sigma_x=0.3)).config["sigma_x"] == 0.3
    with pytest.raises(ValueError, match="decoder='identity'"):
        ObservationGuide.for_teacher(VITSPriorModel(C, HIDDEN))
    with pytest.raises(ValueError, match="sigma_x"):
        ObservationGuide(0.0)


def test_encoder_speaker_conditioning(data):
    guide = encoder()
    m_q, _ = guide.posterior(data)
    other = data.subset(torch.arange(N))
    other.speaker = (data.speaker + 1) % 3
    assert not torch.allclose(guide.posterior(other)[0], m_q)
    other.speaker = None
    with pytest.raises(ValueError, match="speaker"):
        guide.posterior(other)


def test_subsample_size_scales_and_matches_posterior_of_subset(data):
    guide = encoder()
    site, trace = z_site(guide, data, subsample_size=2)
    idx = trace.nodes["utterances"]["value"]
    assert idx.shape == (2,) and site["value"].shape == (2, C, T)
    assert site["scale"] == pytest.approx(N / 2)
    m_q, logs_q = guide.posterior(data.subset(idx))
    torch.testing.assert_close(site["fn"].loc, m_q)
    torch.testing.assert_close(site["fn"].scale, torch.exp(logs_q))


def test_local_guide_indexes_by_dataset_ids(data):
    guide = local_guide(data)
    idx = torch.tensor([3, 0])
    site, _ = z_site(guide, data, subsample=idx)
    expected_loc = guide.m_q.detach()[idx] * data.mask[idx]
    torch.testing.assert_close(site["fn"].loc, expected_loc)
    torch.testing.assert_close(site["fn"].scale, torch.exp(guide.logs_q.detach()[idx] * data.mask[idx]))
    # a subset batch keeps the dataset ids, so its rows are the same parameters
    sub = data.subset(idx)
    assert sub.index.tolist() == [3, 0]
    torch.testing.assert_close(guide.posterior(sub)[0], expected_loc)


def test_parameters_registered_with_pyro(data):
    pyro.clear_param_store()
    guide = local_guide(data)
    _, trace = z_site(guide, data)
    assert "guide$$$m_q" in trace.nodes and "guide$$$logs_q" in trace.nodes
    assert pyro.get_param_store()["guide$$$m_q"] is guide.m_q
    enc = encoder()
    enc.pyro_name = "enc"
    z_site(enc, data)
    assert "enc$$$proj.weight" in pyro.get_param_store()
    pyro.clear_param_store()


def test_vectorised_particles_and_gradients(data):
    guide = encoder()

    def particles(batch):
        with pyro.plate("particles", 3, dim=-2):
            return guide(batch)

    site, trace = z_site(particles, data)
    assert site["value"].shape == (3, N, C, T)
    assert bool((site["value"] * (1 - data.mask) == 0).all())
    trace.compute_log_prob()
    assert site["log_prob"].shape == (3, N)
    site["value"].sum().backward()
    assert guide.proj.weight.grad is not None and guide.proj.weight.grad.abs().sum() > 0


def test_validation_errors(data):
    with pytest.raises(ValueError, match="init_loc"):
        LocalGuide(N, C, T, init_loc=torch.zeros(N, C, T + 1))
    with pytest.raises(ValueError, match="init_scale"):
        LocalGuide(N, C, T, init_scale=-1.0)
    with pytest.raises(ValueError, match="num_data"):
        LocalGuide(0, C, T)
    with pytest.raises(ValueError, match=r"\(C, T\)"):
        LocalGuide(N, C, T + 1).posterior(data)
    with pytest.raises(ValueError, match="gin_channels"):
        PosteriorEncoder(C, C, HIDDEN, n_speakers=2)
    with pytest.raises(ValueError, match="channels"):
        PosteriorEncoder(C + 2, C, HIDDEN, 3, n_layers=1).posterior(data)

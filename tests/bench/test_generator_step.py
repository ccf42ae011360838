"""bench.generator_step: the K-KL-particle configurations of VITS's generator step run and are timed."""

from __future__ import annotations

import pytest
from refit_helpers import tiny_parts
from speech_helpers import TINY

from pyro_vits.bench.generator_step import GENERATOR_KS, generator_step_bench
from pyro_vits.data.refit_corpus import TextIds, read_refit_corpus
from pyro_vits.models.refit import RefitModel, refit_guide

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")]


def test_generator_step_bench_times_every_configuration():
    parts = tiny_parts(2)
    model = RefitModel(parts["enc_p"], parts["flow"], parts["dec"], parts["emb_g"], n_fft=256, win_length=256,
                       segment_frames=8)
    guide = refit_guide(129, 6, 16, n_layers=2, emb_g=parts["emb_g"], seed=0)
    batch = read_refit_corpus(TINY, TextIds(), n_fft=256, hop_length=128, win_length=256, max_utterances=2)
    out = generator_step_bench(model, guide, batch, repeats=2, warmup=0, log=lambda _: None)
    names = {f"kl_k{k}" for k in GENERATOR_KS} | {f"shared_k{k}" for k in GENERATOR_KS[1:]}
    assert set(out["seconds_per_step"]) == names and all(t > 0 for t in out["seconds_per_step"].values())
    assert set(out["ratios"]) == names - {"kl_k1"} and out["ratios"]["kl_k8"]["median"] > 0
    assert out["mas_per_particle_s"] > 0 and out["batch"] == 2

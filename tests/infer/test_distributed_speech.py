"""Data-parallel SVI on speech: two gloo processes' first-step gradient equals one process's on the same
combined minibatch (tiny corpus, float64, a posterior encoder with fixed per-utterance noise)."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from parallel_helpers import FixedNoiseNormal, free_port

from pyro_vits.data.speech_batches import SpeechConfig
from pyro_vits.data.speech_data import SpeechData, read_corpus
from pyro_vits.data.text import VITS_SYMBOLS
from pyro_vits.infer import HybridEntropyELBO, init_distributed, minibatch_indices, teardown
from pyro_vits.models import PosteriorEncoder, SpeechModel

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_corpus"
SPEECH = SpeechConfig(filter_length=256, hop_length=128, win_length=256)
B, SEED, WORLD = 3, 5, 2  # 4 training utterances; the combined minibatch of 3 splits 2 + 1


class FixedNoiseEncoder(PosteriorEncoder):
    """VITS's posterior encoder; utterance ``i`` always draws with the noise ``eps[i]``."""

    def __init__(self, eps, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, batch, subsample_size=None, subsample=None):
        pyro.module(self.pyro_name, self)
        with pyro.plate("utterances", batch.n, subsample_size=subsample_size, subsample=subsample, dim=-1):
            sub = batch.subset(subsample if subsample is not None else torch.arange(batch.n))
            m_q, logs_q = self.posterior(sub)
            eps = self.eps[sub.index][..., : sub.frames]
            return pyro.sample("z", FixedNoiseNormal(m_q, torch.exp(logs_q), sub.mask, eps))


def problem():
    """float64 data, model and guide (sharing emb_g), identical in every process."""
    d = read_corpus(TINY, SPEECH).train
    data = SpeechData(d.spec.double(), d.lengths, d.text, d.text_lengths, d.speaker)
    torch.manual_seed(0)
    model = SpeechModel(len(VITS_SYMBOLS), SPEECH.n_freq, 4, 8, 16, 2, 1, flow_n_layers=1, n_flows=2,
                        mean_only=False, n_speakers=2, gin_channels=3, decoder_channels=8).double()
    eps = torch.randn(data.n, 4, data.frames, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    guide = FixedNoiseEncoder(eps, SPEECH.n_freq, 4, 8, 5, 1, 1, n_speakers=2, gin_channels=3).double()
    guide.emb_g = model.emb_g
    with torch.no_grad():
        for layer in model.flow.flows[::2]:
            layer.post.weight.normal_(0, 0.3)
    return data, model, guide


def elbo():
    return HybridEntropyELBO(num_particles=1, max_plate_nesting=1)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed("cpu", timeout_s=60)
    try:
        data, model, guide = problem()
        pyro.clear_param_store()
        parallel = ctx.data_parallel(model, guide, elbo(), data, B, SEED)
        parallel.begin(1)
        loss = parallel.loss_and_grads()
        grads = {name: p.grad.clone() for name, p in parallel.elbo_module.named_parameters()}
        torch.save(dict(loss=loss, grads=grads), Path(tmp) / f"rank{rank}.pt")
    finally:
        teardown()


def test_two_processes_give_the_single_process_gradient(tmp_path):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    data, model, guide = problem()
    pyro.clear_param_store()
    module = elbo()(model, guide)
    loss = module(data, subsample=minibatch_indices(SEED, 1, data.n, B))
    loss.backward()
    reference = {name: p.grad for name, p in module.named_parameters()}
    assert set(reference) == set(ranks[0]["grads"])
    assert any(name.startswith("model.enc_p") for name in reference)
    for name, grad in reference.items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-9, atol=1e-11, msg=name)
    assert ranks[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-10)

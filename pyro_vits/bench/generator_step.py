"""The cost of K KL particles inside VITS's generator step (``pyro-vits bench --generator-step``).

The step is the refit's (:mod:`pyro_vits.models.refit` with :class:`~pyro_vits.infer.generator_loss.
VITSGeneratorLoss`): ``enc_q`` on ``B`` utterances' spectrograms, one draw through the flow and MAS, the
HiFi-GAN decoder on one random 32-frame segment per utterance, the mel L1, the KL with ``K`` draws, and
the backward pass (no optimiser update). Configurations: ``kl_kK`` (K = 1, 2, 4, 8, each extra draw with its
own MAS), ``shared_kK`` (the extra draws reuse the first draw's alignment). Separately, ``mas_per_particle_s``:
the alignment search alone (VITS's ``neg_cent`` and ``maximum_path``) for one particle of the batch.

Times are interleaved in one process (:func:`~pyro_vits.bench.timing.measure`); ratios are medians of
per-round ratios, the K = 1 step's time the denominator."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data.refit_corpus import RefitData
from ..infer.generator_loss import VITSGeneratorLoss
from ..models.refit import RefitModel
from ..nn.alignment import attention_mask, maximum_path, neg_cent
from .timing import Block, measure, ratio

__all__ = ["GENERATOR_KS", "generator_step_bench"]

GENERATOR_KS = (1, 2, 4, 8)


def _step(model: RefitModel, guide: torch.nn.Module, batch: RefitData, k: int, shared: bool, seed: int):
    loss_fn = VITSGeneratorLoss("vits", k, shared_alignment=shared)
    params = [p for p in guide.parameters() if p.requires_grad]

    def step() -> float:
        torch.manual_seed(seed)
        for p in params:
            p.grad = None
        loss = loss_fn.differentiable_loss(model, guide, batch)
        loss.backward()
        return float(loss.detach())

    return step


def _mas_seconds(model: RefitModel, guide: torch.nn.Module, batch: RefitData, calls: int) -> float:
    """Seconds of one particle's alignment search for the whole batch (mean over ``calls``)."""
    with torch.no_grad():
        prior = model.prior(batch)
        z = guide(batch)
        z_p = model.flow(z, batch.mask, model.speaker_embedding(batch))
        mask = attention_mask(prior.text_mask, batch.mask)
        start = time.process_time()
        for _ in range(calls):
            maximum_path(neg_cent(z_p, prior.m_p, prior.logs_p), mask)
        return (time.process_time() - start) / calls


def generator_step_bench(model: RefitModel, guide: torch.nn.Module, batch: RefitData, *, repeats: int = 5,
                         warmup: int = 1, seed: int = 0, log: Any = print) -> dict[str, Any]:
    """Time the module docstring's configurations on ``batch`` (B utterances) with one thread's CPU clock;
    returns seconds per step, the ratios against ``kl_k1`` and the MAS cost per particle (JSON-able)."""
    names = [f"kl_k{k}" for k in GENERATOR_KS] + [f"shared_k{k}" for k in GENERATOR_KS[1:]]
    configs = {("generator", n): _step(model, guide, batch, int(n.rsplit("k", 1)[1]), n.startswith("shared"),
                                       seed) for n in names}
    pairs = [(n, "kl_k1") for n in names[1:]]
    times, paired = measure(configs, [Block("generator", names, pairs)], repeats=repeats, warmup=warmup,
                            inner=1, seed=seed, device=torch.device("cpu"), clock="cpu", log=log)
    median = {n: sorted(times[("generator", n)])[len(times[("generator", n)]) // 2] for n in names}
    mas = _mas_seconds(model, guide, batch, calls=3)
    return dict(
        description=__doc__.split("\n\n")[0], batch=batch.n, frames=int(batch.lengths.sum()),
        segment_frames=model.config["segment_frames"], clock="cpu", threads=torch.get_num_threads(),
        repeats=repeats, seconds_per_step=median,
        ratios={n: ratio(times, paired, "generator", n, "kl_k1", f"{n} / kl_k1") for n in names[1:]},
        mas_per_particle_s=mas, mas_fraction_of_k1=mas / median["kl_k1"],
    )

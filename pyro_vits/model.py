"""The VITS prior as a Pyro generative model, a synthetic teacher, its data, and an evaluator.

Generative model (one utterance ``n``; latents ``(C, T)``, ``T_n`` valid frames)::

    z_n ~ FlowPrior(m_p[n], logs_p[n], flow, mask[n], g[n])       # VITS: N(f(z); m_p, e^logs_p)|det df/dz|
    x_n ~ MaskedNormal(dec(z_n), sigma_x, mask[n])                 # observation

``m_p, logs_p`` stand for the text encoder's (duration-expanded) outputs and are part of the data.
All ``*_per_frame`` numbers are nats per valid frame with channels summed (VITS's normalisation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from ._validate import check_positive_ints
from .flows import ResidualCouplingBlock, flatten_leading
from .prior import FlowPrior, MaskedNormal, check_mask

__all__ = [
    "Batch",
    "sequence_mask",
    "utterance_plate",
    "VITSPriorModel",
    "make_teacher",
    "sample_dataset",
    "evaluate",
    "default_eval_chunk",
    "EVAL_CHUNK_ELEMENTS",
]

DECODERS = ("conv1x1", "identity")


@dataclass
class Batch:
    """A padded set of utterances.

    ``x, m_p, logs_p``: ``(N, C, T)``; ``mask``: ``(N, 1, T)`` 0/1 prefix mask; ``lengths``: ``(N,)`` long;
    ``speaker``: ``(N,)`` long or None; ``index``: ``(N,)`` long ids of the utterances in the dataset they
    were drawn from (defaults to ``arange(N)``; :class:`~pyro_vits.guide.LocalGuide` indexes by it).
    """

    x: Tensor
    m_p: Tensor
    logs_p: Tensor
    mask: Tensor
    lengths: Tensor
    speaker: Tensor | None = None
    index: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("x", "m_p", "logs_p", "mask", "lengths"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(getattr(self, name)).__name__}")
        if self.x.dim() != 3 or not self.x.is_floating_point():
            raise ValueError(f"x must be a floating (N, C, T) tensor, got {self.x.dtype} "
                             f"{tuple(self.x.shape)}")
        n, _, t = self.x.shape
        for name in ("m_p", "logs_p"):
            if getattr(self, name).shape != self.x.shape:
                raise ValueError(f"{name} must have the shape of x {tuple(self.x.shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.mask.shape != (n, 1, t):
            raise ValueError(f"mask must have shape (N={n}, 1, T={t}), got {tuple(self.mask.shape)}")
        self.mask = check_mask(self.mask, self.x)
        if self.lengths.shape != (n,) or self.lengths.dtype != torch.long:
            raise ValueError(f"lengths must be a long tensor of shape ({n},), got {self.lengths.dtype} "
                             f"{tuple(self.lengths.shape)}")
        if not torch.equal(self.mask, sequence_mask(self.lengths, t).to(self.mask)):
            raise ValueError("mask must equal the prefix mask of lengths (frame t is valid iff t < length)")
        for name in ("speaker", "index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)
                                      or value.dtype != torch.long):
                raise ValueError(f"{name} must be None or a long tensor of shape ({n},), got {value!r}")
        if self.index is None:
            self.index = torch.arange(n, device=self.x.device)
        self.check_finite()

    def check_finite(self, name: str = "batch") -> None:
        """Raise ValueError if ``x``, ``m_p`` or ``logs_p`` holds NaN/Inf (one fused check; ``name`` labels
        the batch in the message)."""
        fields = ("x", "m_p", "logs_p")
        if bool(torch.stack([torch.isfinite(getattr(self, f)).all() for f in fields]).all()):
            return
        for f in fields:
            bad = ~torch.isfinite(getattr(self, f))
            if bool(bad.any()):
                n, c, t = bad.nonzero()[0].tolist()
                raise ValueError(f"{name}.{f} has {int(bad.sum())} non-finite value(s) (NaN/Inf), the first "
                                 f"at utterance {n}, channel {c}, frame {t}")

    @property
    def n(self) -> int:
        """Number of utterances N."""
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def frames(self) -> int:
        """Padded length T."""
        return self.x.shape[2]

    @property
    def num_frames(self) -> int:
        """Number of valid frames (synchronises with the device)."""
        return int(self.lengths.sum())

    def _derive(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """Apply ``fn`` to every tensor field, skipping validation (the result derives from a valid batch)."""
        new = copy.copy(self)
        for name in ("x", "m_p", "logs_p", "mask", "lengths", "speaker", "index"):
            value = getattr(self, name)
            setattr(new, name, None if value is None else fn(value))
        return new

    def to(self, device: torch.device | str) -> Batch:
        return self._derive(lambda t: t.to(device))

    def subset(self, idx: Tensor) -> Batch:
        """Utterances ``idx`` (``(B,)`` long, positions in this batch); ``index`` keeps the dataset ids."""
        return self._derive(lambda t: t[idx])


def sequence_mask(lengths: Tensor, frames: int) -> Tensor:
    """``(N,)`` lengths -> ``(N, 1, T)`` float mask, 1 where ``t < length``."""
    return (torch.arange(frames, device=lengths.device) < lengths[:, None]).unsqueeze(1).float()


def utterance_plate(
    batch: Batch, subsample_size: int | None = None, subsample: Tensor | None = None
) -> pyro.plate:
    """The ``"utterances"`` plate (dim -1) over ``batch.n``, shared by the model and every guide."""
    return pyro.plate(
        "utterances", batch.n, subsample_size=subsample_size, subsample=subsample, dim=-1,
        device=batch.x.device,
    )


class VITSPriorModel(nn.Module):
    """VITS's prior flow as a Pyro model; call it as ``model(batch, subsample_size=None, subsample=None)``.

    Owns ``flow`` (:class:`ResidualCouplingBlock`, so parameter names are VITS's ``flow.flows.…``),
    ``emb_g`` (``nn.Embedding(n_speakers, gin_channels)``, only when ``n_speakers > 0``) and ``dec``:
    ``decoder="conv1x1"`` is a learnable ``Conv1d(C, C, 1)`` initialised to the identity,
    ``decoder="identity"`` a fixed identity (used by the teacher, whose log-likelihood is then exactly
    importance-sampled by :class:`~pyro_vits.guide.ObservationGuide`). ``sigma_x`` is fixed.
    Parameters are registered with ``pyro.module(name, self)`` on every call.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 5,
        dilation_rate: int = 1,
        n_layers: int = 4,
        n_flows: int = 4,
        *,
        n_speakers: int = 0,
        gin_channels: int = 0,
        mean_only: bool = True,
        sigma_x: float = 0.1,
        decoder: str = "conv1x1",
        name: str = "model",
    ) -> None:
        super().__init__()
        if not isinstance(n_speakers, int) or n_speakers < 0:
            raise ValueError(f"n_speakers must be a non-negative int, got {n_speakers!r}")
        if (n_speakers > 0) != (gin_channels > 0):
            raise ValueError(f"n_speakers and gin_channels must be both 0 or both positive, got "
                             f"n_speakers={n_speakers}, gin_channels={gin_channels}")
        if not isinstance(sigma_x, (int, float)) or not sigma_x > 0:
            raise ValueError(f"sigma_x must be a positive float, got {sigma_x!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.config: dict[str, Any] = dict(
            channels=channels, hidden_channels=hidden_channels, kernel_size=kernel_size,
            dilation_rate=dilation_rate, n_layers=n_layers, n_flows=n_flows, n_speakers=n_speakers,
            gin_channels=gin_channels, mean_only=mean_only, sigma_x=float(sigma_x), decoder=decoder,
            name=name,
        )
        self.channels = channels
        self.sigma_x = float(sigma_x)
        self.pyro_name = name
        self.flow = ResidualCouplingBlock(
            channels, hidden_channels, kernel_size, dilation_rate, n_layers, n_flows,
            gin_channels=gin_channels, mean_only=mean_only,
        )
        if n_speakers > 0:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)
        if decoder == "conv1x1":
            self.dec: nn.Module = nn.Conv1d(channels, channels, 1)
            with torch.no_grad():
                self.dec.weight.copy_(torch.eye(channels).unsqueeze(-1))
                self.dec.bias.zero_()
        else:
            self.dec = nn.Identity()

    @property
    def n_speakers(self) -> int:
        return self.config["n_speakers"]

    def speaker_embedding(self, batch: Batch) -> Tensor | None:
        """``g (B, gin, 1)`` or None."""
        if self.n_speakers == 0:
            return None
        if batch.speaker is None:
            raise ValueError(f"this model has {self.n_speakers} speakers but batch.speaker is None")
        return self.emb_g(batch.speaker).unsqueeze(-1)

    def prior(self, batch: Batch) -> FlowPrior:
        """``p(z)`` for every utterance of ``batch``; batch shape ``(B,)``, event ``(C, T)``."""
        return FlowPrior(batch.m_p, batch.logs_p, self.flow, batch.mask, self.speaker_embedding(batch),
                         validate_args=False)

    def decode(self, z: Tensor) -> Tensor:
        """``z (..., C, T) -> (..., C, T)``."""
        h, _, _, lead = flatten_leading(z, z.new_ones(z.shape[:-2] + (1, z.shape[-1])), None)
        out = self.dec(h)
        return out.reshape(lead + out.shape[-2:])

    def likelihood(self, z: Tensor, batch: Batch) -> MaskedNormal:
        """``p(x | z) = MaskedNormal(dec(z), sigma_x, mask)`` for ``z (..., B, C, T)``."""
        return MaskedNormal(self.decode(z), z.new_tensor(self.sigma_x), batch.mask, validate_args=False)

    def forward(
        self, batch: Batch, subsample_size: int | None = None, subsample: Tensor | None = None
    ) -> Tensor:
        """Pyro model: sample sites ``"z"`` (latent) and ``"x"`` (observed); returns ``z (B, C, T)``."""
        if batch.channels != self.channels:
            raise ValueError(f"batch has {batch.channels} channels, the model {self.channels}")
        pyro.module(self.pyro_name, self)
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            z = pyro.sample("z", self.prior(sub))
            pyro.sample("x", self.likelihood(z, sub), obs=sub.x)
        return z


def make_teacher(
    channels: int,
    hidden_channels: int,
    kernel_size: int = 5,
    dilation_rate: int = 1,
    n_layers: int = 2,
    n_flows: int = 4,
    *,
    n_speakers: int = 0,
    gin_channels: int = 0,
    mean_only: bool = True,
    sigma_x: float = 0.1,
    post_std: float = 2.0,
    seed: int = 0,
) -> VITSPriorModel:
    """A frozen random :class:`VITSPriorModel` with an identity decoder to generate data from.

    VITS zero-initialises each coupling's ``post`` conv (identity flow, Gaussian prior); here its weights
    are ``N(0, (post_std / sqrt(hidden))^2)`` (the log-scale half of affine couplings 4x smaller, for
    stability), so each coupling shifts by O(``post_std``) nonlinearly and the prior is clearly
    non-Gaussian. Built under ``seed`` without touching the global RNG; parameters have no gradients.
    """
    if not post_std > 0:
        raise ValueError(f"post_std must be positive, got {post_std!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = VITSPriorModel(
            channels, hidden_channels, kernel_size, dilation_rate, n_layers, n_flows, n_speakers=n_speakers,
            gin_channels=gin_channels, mean_only=mean_only, sigma_x=sigma_x, decoder="identity",
            name="teacher",
        )
        with torch.no_grad():
            for layer in teacher.flow.flows[::2]:
                std = torch.full((layer.post.out_channels, 1, 1), post_std / math.sqrt(hidden_channels))
                std[layer.half_channels:] /= 4
                layer.post.weight.normal_().mul_(std)
                layer.post.bias.normal_().mul_(std[:, 0, 0])
    return teacher.requires_grad_(False).eval()


def sample_dataset(
    teacher: VITSPriorModel,
    n: int,
    frames: int,
    *,
    seed: int,
    min_frames: int | None = None,
    phone_frames: float = 4.0,
) -> Batch:
    """Draw ``n`` utterances of at most ``frames`` frames from ``teacher``'s joint.

    Lengths are uniform on ``[min_frames, frames]`` (default ``frames // 2``, at least 1). ``m_p, logs_p``
    mimic VITS's duration-expanded text encoder: piecewise constant over "phones" of geometric length (mean
    ``phone_frames``), ``m_p ~ N(0, 1)``, ``logs_p ~ U[-0.5, 0.5]`` per phone and channel. Then
    ``z ~ p_teacher(z)``, ``x = dec(z) + sigma_x * eps``; padded frames of every field are exactly 0.
    Uses ``seed`` without touching the global RNG; tensors are on the teacher's device and dtype.
    """
    min_frames = max(1, frames // 2) if min_frames is None else min_frames
    check_positive_ints(n=n)
    if not (isinstance(frames, int) and isinstance(min_frames, int) and 1 <= min_frames <= frames):
        raise ValueError(f"need 1 <= min_frames <= frames, got min_frames={min_frames!r}, frames={frames!r}")
    if not phone_frames >= 1:
        raise ValueError(f"phone_frames must be >= 1, got {phone_frames!r}")
    param = next(teacher.parameters())
    device, dtype, c = param.device, param.dtype, teacher.channels
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        lengths = torch.randint(min_frames, frames + 1, (n,), device=device)
        mask = sequence_mask(lengths, frames).to(dtype)
        new_phone = torch.rand(n, 1, frames, device=device) < 1.0 / phone_frames
        new_phone[..., 0] = False
        phone = new_phone.cumsum(-1).expand(n, c, frames)
        m_p = torch.randn(n, c, frames, device=device, dtype=dtype).gather(-1, phone) * mask
        logs_p = (torch.rand(n, c, frames, device=device, dtype=dtype) - 0.5).gather(-1, phone) * mask
        speaker = torch.randint(teacher.n_speakers, (n,), device=device) if teacher.n_speakers else None
        data = Batch(torch.zeros_like(m_p), m_p, logs_p, mask, lengths, speaker)
        z = teacher.prior(data).sample()
        data.x = teacher.likelihood(z, data).sample()
    return data


def _vectorised(fn: Callable[..., Any], num_samples: int) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate("_evaluate_particles", num_samples, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


def _site_sums(trace: poutine.Trace) -> tuple[Tensor, Tensor]:
    """Sum of latent and of observed sites' log-probs, each ``(K, B)``."""
    trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
    latent = observed = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            if site["is_observed"]:
                observed = observed + site["log_prob"]
            else:
                latent = latent + site["log_prob"]
    return torch.as_tensor(latent), torch.as_tensor(observed)


EVAL_CHUNK_ELEMENTS = 2**22
"""Default memory bound of :func:`evaluate`: latent elements (samples x utterances x C x T) per vectorised call."""

_SAMPLE_BLOCK = 16  # sample chunks smaller than all samples hold a multiple of this many samples


def default_eval_chunk(channels: int, frames: int) -> int:
    """``evaluate``'s default ``eval_chunk`` for latents ``(C, T)``: rows (sample, utterance pairs) of
    :data:`EVAL_CHUNK_ELEMENTS` latent elements in all, at least 1."""
    check_positive_ints(channels=channels, frames=frames)
    return max(1, EVAL_CHUNK_ELEMENTS // (channels * frames))


def _data_device(data: Any) -> torch.device:
    device = getattr(data, "device", None)
    return device if isinstance(device, torch.device) else data.x.device


def _default_rows(data: Any) -> int:
    """:func:`default_eval_chunk` of the data's ``(C, T)``: ``channels``/``frames``, else ``x``'s last two
    dims (a spectrogram for speech data: larger than the latent, so a smaller chunk)."""
    if isinstance(getattr(data, "channels", None), int) and isinstance(getattr(data, "frames", None), int):
        return default_eval_chunk(data.channels, data.frames)
    return default_eval_chunk(*data.x.shape[-2:])


def _chunk_shape(utterances: int, samples: int, rows: int) -> tuple[int, int]:
    """``(utterances, samples)`` per vectorised call with at most ``rows`` pairs where possible: all samples
    of as many utterances as fit, else one utterance and samples in blocks of a multiple of
    ``_SAMPLE_BLOCK`` (at least one block)."""
    if utterances * samples <= rows:
        return utterances, samples
    if samples <= rows:
        return rows // samples, samples
    return 1, min(samples, max(_SAMPLE_BLOCK, rows // _SAMPLE_BLOCK * _SAMPLE_BLOCK))


@dataclass
class _Sums:
    """Running sums of :func:`evaluate`: per-sample ELBO over utterances ``(K,)``, sums over utterances of
    the sample means of the KL and of the log-likelihood, and of the per-utterance IWAE bound."""

    elbo_k: Tensor
    kl: Tensor
    recon: Tensor
    iwae: Tensor

    def add_utterances(self, log_q: list[Tensor], log_prior: list[Tensor], log_lik: list[Tensor]) -> None:
        """Fold in one utterance chunk given its sample chunks (each ``(k_i, B)``, sum of k_i = K)."""
        log_q_all, prior_all, lik_all = (torch.cat(t) for t in (log_q, log_prior, log_lik))
        log_w = lik_all + prior_all - log_q_all  # (K, B)
        k = log_w.shape[0]
        self.elbo_k = self.elbo_k + log_w.sum(-1)
        self.kl = self.kl + (log_q_all - prior_all).mean(0).sum()
        self.recon = self.recon + lik_all.mean(0).sum()
        self.iwae = self.iwae + (torch.logsumexp(log_w, 0) - math.log(k)).sum()


def _evaluate_chunk(model: Callable[..., Any], guide: Callable[..., Any], chunk: Batch,
                    samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """``log q, log p(z), log p(x | z)``, each ``(samples, B)``, for ``samples`` guide draws on ``chunk``."""
    guide_trace = poutine.trace(_vectorised(guide, samples)).get_trace(chunk)
    replayed = poutine.replay(_vectorised(model, samples), trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(chunk)
    log_q, _ = _site_sums(guide_trace)
    log_prior, log_lik = _site_sums(model_trace)
    return log_q, log_prior, log_lik


def evaluate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Batch,
    num_samples: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    eval_chunk: int | None = None,
) -> dict[str, float]:
    """Monte-Carlo measures of ``model``/``guide`` on ``data`` with ``num_samples`` guide particles.

    Returns nats per valid frame: ``elbo_per_frame`` (and ``elbo_stderr_per_frame``, its MC standard
    error), ``kl_per_frame`` = E_q[log q(z|x) - log p(z)], ``recon_per_frame`` = E_q[log p(x|z)],
    ``loglik_iwae_per_frame`` = sum_n logmeanexp_k w_nk with the guide as proposal (a lower bound on
    log p(x) converging as ``num_samples`` grows); plus ``num_frames``, ``num_utterances``, ``num_samples``.
    ``data``: a :class:`Batch`, or any data with ``n``, ``num_frames``, ``subset(idx)`` (and ``device`` or an
    ``x`` tensor) that model and guide accept. Model and guide take ``(batch)`` and use only the
    ``"utterances"`` plate (dim -1). The teacher's truth:
    ``evaluate(teacher, ObservationGuide.for_teacher(teacher), data)``. Runs without gradients, seeded by
    ``seed`` without touching the global RNG.

    Memory: utterances go in chunks of ``batch_size`` (None: all), and each vectorised call holds at most
    ``eval_chunk`` (sample, utterance) pairs (None: :func:`default_eval_chunk`, about 2^22 latent elements;
    time is then linear in ``num_samples``): all samples of as many utterances as fit, else one utterance
    with its samples split in blocks (a multiple of 16 samples, at least 16). Sample blocks are combined
    exactly (the IWAE bound is a log-sum-exp over all ``num_samples``), and one random stream runs through
    the chunks in order: on CPU the draws of a guide with one latent site do not depend on how the samples
    are split, only on the utterances per call (as with ``batch_size``).
    """
    check_positive_ints(num_samples=num_samples)
    if not all(hasattr(data, name) for name in ("n", "num_frames", "subset")):
        raise TypeError(f"data must be a Batch (or have n, num_frames and subset), got {type(data).__name__}")
    check_positive_ints(batch_size=batch_size, eval_chunk=eval_chunk, allow_none=True)
    rows = _default_rows(data) if eval_chunk is None else eval_chunk
    per_call, per_draw = _chunk_shape(min(data.n if batch_size is None else batch_size, data.n),
                                      num_samples, rows)
    device = _data_device(data)
    zero = torch.zeros((), device=device)
    sums = _Sums(torch.zeros(num_samples, device=device), zero, zero, zero)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, data.n, per_call):
            chunk = data.subset(torch.arange(start, min(start + per_call, data.n), device=device))
            parts = [_evaluate_chunk(model, guide, chunk, min(per_draw, num_samples - first))
                     for first in range(0, num_samples, per_draw)]
            sums.add_utterances(*(list(t) for t in zip(*parts)))
    frames = data.num_frames
    stderr = float(sums.elbo_k.std()) / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return {
        "elbo_per_frame": float(sums.elbo_k.mean()) / frames,
        "elbo_stderr_per_frame": stderr / frames,
        "kl_per_frame": float(sums.kl) / frames,
        "recon_per_frame": float(sums.recon) / frames,
        "loglik_iwae_per_frame": float(sums.iwae) / frames,
        "num_frames": frames,
        "num_utterances": data.n,
        "num_samples": num_samples,
    }

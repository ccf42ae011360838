"""A prior-only audit of a VITS generator without ``enc_q`` (e.g. a released Piper voice): text encoder and
flow on sentences, no audio.

For each sentence (token ids ``L``): ``enc_p`` gives ``m_p, logs_p (C, L)``; without audio there is no
monotonic alignment search, so each token is expanded to a fixed ``frames_per_token`` frames
(``T = L * frames_per_token``). Then, with ``sigma_p = exp(logs_p)`` and ``K`` i.i.d. draws per sentence:

* ``sigma_p``: its distribution over (valid token, channel) pairs (quantiles) and its per-channel mean over
  tokens (token level, before the expansion).
* flow displacement: ``z_p ~ N(m_p, noise_scale * sigma_p)`` (the voice's inference noise scale, as at
  synthesis), ``z = f^{-1}(z_p)`` (VITS inference direction), ``||z - z_p||_2`` over channels per frame;
  mean and sd over all frames of all draws.
* non-Gaussianity ``KL(p_flow || N(m_p, sigma_p))`` in nats per frame: ``z_p ~ N(m_p, sigma_p)`` (noise
  scale 1: the trained prior itself), ``z = f^{-1}(z_p)``, and per sentence ``u`` and draw ``k``
  ``D_uk = log p_flow(z) - log N(z; m_p, sigma_p)`` summed over channels and frames, where
  ``log p_flow(z) = log N(f(z); m_p, sigma_p) + log|det df/dz|`` (:class:`~pyro_vits.distributions.FlowPrior`;
  the log-det is exactly 0 for VITS's mean-only couplings). Normalised per frame per sentence:
  ``x_uk = D_uk / T_u``; reported ``mean`` = average of ``x_uk`` over all ``(u, k)`` (each sentence weighs
  the same); ``mcse`` = the Monte-Carlo standard error of that mean with the sentences fixed,
  ``sqrt(sum_u s_u^2 / K) / U`` (``s_u``: the sd of ``x_uk`` over the draws of sentence ``u``); ``se_pooled``
  = ``sd(x) / sqrt(U K)`` over all values (also counts the spread between sentences, so larger).
  ``E[D] >= 0``; it is exactly 0 when the flow is a permutation (zero couplings).

Draws are seeded per sentence (``seed``, sentence index), so results do not depend on anything else; CPU
runs are reproducible."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import check_folder, publish_folder
from .._validate import check_positive_ints
from ..data.text import VITS_SYMBOLS, cleaned_text_to_sequence, intersperse
from ..distributions import FlowPrior, MaskedNormal
from ..distributions.transforms import FlowTransform
from .draws import NonFiniteResult
from .measure import first_non_finite

__all__ = ["PRIOR_REPORT_FILES", "Sentence", "prior_only_audit", "read_sentences_or_filelist", "token_ids",
           "write_prior_report"]

logger = logging.getLogger("pyro_vits")

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
PRIOR_REPORT_FILES = ("report.md", "report.json")
_REFUSAL = dict(what="--out", hint="it already holds an audit report or other files: pass overwrite=True "
                                   "(--overwrite) to replace the folder")


@dataclass(frozen=True)
class Sentence:
    """``text`` (phonemes / cleaned text when ``phonemized``, else plain text), ``speaker`` and ``source``."""

    text: str
    phonemized: bool
    speaker: int | None
    source: str


def read_sentences_or_filelist(path: str | os.PathLike) -> list[Sentence]:
    """A VITS filelist (``wav|text`` or ``wav|speaker|text``: the text is taken as cleaned/phonemized text,
    the wav is not read) or, when no line holds ``|``, a plain text file with one sentence per line (to be
    phonemized with espeak-ng). Empty lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"filelist not found: {path}")
    lines = [(i, line.rstrip("\r\n")) for i, line in
             enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no sentences")
    if not any("|" in line for _, line in lines):
        return [Sentence(line.strip(), False, None, f"{path}:{i}") for i, line in lines]
    from ..data.filelists import read_filelist

    return [Sentence(u.text, True, u.speaker, u.source) for u in read_filelist(path)]


def token_ids(sentence: Sentence, config: Mapping[str, Any], vits_config: Mapping[str, Any] | None = None,
              espeak_voice: str = "en-us") -> tuple[list[int], int]:
    """Token ids of ``sentence`` for a generator with ``config`` (its ``.config``) and the number of phoneme
    symbols dropped. A Piper voice (``config["phoneme_id_map"]``): Piper's ``phonemes_to_ids`` (``^``, pad
    ``_`` after every phoneme, ``$``; symbols not in the map are dropped, as Piper does). Otherwise VITS's
    ``cleaned_text_to_sequence`` (``vits_config["symbols"]`` or VITS's table), interspersed with 0 when
    ``data.add_blank`` (default true). Plain sentences are phonemized with ``espeak-ng`` first."""
    text = sentence.text
    if not sentence.phonemized:
        from ..data.corpus import phonemize

        text = phonemize(text, espeak_voice)
    id_map = config.get("phoneme_id_map")
    if id_map:
        ids, dropped = [*id_map["^"], *id_map["_"]], 0
        for ch in text:
            if ch in id_map:
                ids += [*id_map[ch], *id_map["_"]]
            else:
                dropped += 1
        return ids + [*id_map["$"]], dropped
    vits_config = vits_config or {}
    try:
        ids = cleaned_text_to_sequence(text, vits_config.get("symbols", VITS_SYMBOLS))
    except ValueError as err:
        raise ValueError(f"{sentence.source}: {err}") from None
    if vits_config.get("data", {}).get("add_blank", True):
        ids = intersperse(ids, 0)
    return ids, 0


def _mcse(x: np.ndarray) -> float:
    """``x (U, K)``: the MC standard error of ``x.mean()`` with the rows fixed, ``sqrt(sum_u s_u^2 / K) / U``."""
    u, k = x.shape
    return float(math.sqrt(x.var(axis=1, ddof=1).sum() / k) / u)


@torch.no_grad()
def prior_only_audit(
    generator: Any,
    sentences: Sequence[Sentence],
    *,
    particles: int = 8,
    seed: int = 0,
    frames_per_token: int = 1,
    noise_scale: float | None = None,
    vits_config: Mapping[str, Any] | None = None,
    espeak_voice: str = "en-us",
    device: torch.device | str = "cpu",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The prior-only audit (module docstring) of ``generator`` (a
    :class:`~pyro_vits.vits.VITSGenerator`; ``enc_q`` is not used) on ``sentences``; returns the report
    (``report["prior"]``) and, with ``out``, writes it (:func:`write_prior_report`). ``noise_scale`` for the
    displacement draws: None -> the voice's ``inference.noise_scale``, else 0.667 (VITS's inference
    default). ``particles >= 2`` (the MCSE needs two draws per sentence)."""
    check_positive_ints(particles=particles, frames_per_token=frames_per_token)
    if particles < 2:
        raise ValueError(f"particles must be >= 2 (the MCSE needs two draws per sentence), got {particles}")
    if not sentences:
        raise ValueError("no sentences to audit")
    if out is not None:
        check_folder(Path(out), overwrite, **_REFUSAL)
    if noise_scale is None:
        noise_scale = float(((generator.config or {}).get("inference") or {}).get("noise_scale", 0.667))
    device = torch.device(device)
    generator = generator.to(device).eval()
    start = time.perf_counter()
    draws = [_sentence_draws(generator, sentence, index, particles=particles, seed=seed,
                             frames_per_token=frames_per_token, noise_scale=noise_scale, vits_config=vits_config,
                             espeak_voice=espeak_voice, device=device)
             for index, sentence in enumerate(sentences)]
    tokens, frames = [d["tokens"] for d in draws], [d["frames"] for d in draws]
    channel_sum = draws[0]["sigma_sum"]
    for d in draws[1:]:
        channel_sum = channel_sum + d["sigma_sum"]
    x = np.stack([d["kl"] for d in draws]).astype(np.float64)  # (U, K), nats per frame
    sig = np.concatenate([d["sigma"] for d in draws]).astype(np.float64)  # (tokens, C)
    disp = np.concatenate([d["displacement"] for d in draws]).astype(np.float64)
    channel_mean = (channel_sum / sum(tokens)).cpu().numpy().astype(np.float64)
    prior_report = _prior_summary(x, sig, disp, channel_mean, frames_per_token, noise_scale,
                                  bool(generator.flow.mean_only))
    dropped = sum(d["dropped"] for d in draws)
    report = {
        "kind": "prior_only",
        "sentences": len(sentences),
        "tokens": int(sum(tokens)),
        "frames": int(sum(frames)),
        "particles": particles,
        "seed": seed,
        "channels": int(sig.shape[1]),
        "dropped_symbols": dropped,
        "prior": prior_report,
        "seconds": time.perf_counter() - start,
        **dict(extra or {}),
    }
    bad = first_non_finite(report)
    if bad is not None:
        raise NonFiniteResult(f"the report's {bad} is not finite; the audit stops, no report is written")
    if out is not None:
        write_prior_report(report, out, overwrite)
    return report


def _sentence_draws(generator: Any, sentence: Sentence, index: int, *, particles: int, seed: int,
                    frames_per_token: int, noise_scale: float, vits_config: Mapping[str, Any] | None,
                    espeak_voice: str, device: torch.device) -> dict[str, Any]:
    """One sentence's measurements: ``kl`` (K,) nats per frame (z_p ~ N(m_p, sigma_p), z = f^-1(z_p),
    ``[log p_flow(z) - log N(z; m_p, sigma_p)] / T``), ``sigma`` (L, C), ``sigma_sum`` (C,), the flow's
    ``displacement`` per frame (K * T,) at ``noise_scale``, ``tokens``, ``frames`` and ``dropped`` symbols.
    Seeded by ``(seed, index)``."""
    ids, dropped = token_ids(sentence, generator.config or {}, vits_config, espeak_voice)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    _, m_p, logs_p, _ = generator.enc_p(x, torch.tensor([len(ids)], device=device))
    m_p, logs_p = m_p[0], logs_p[0]  # (C, L)
    m = m_p.repeat_interleave(frames_per_token, dim=-1).expand(particles, -1, -1)  # (K, C, T)
    logs = logs_p.repeat_interleave(frames_per_token, dim=-1).expand(particles, -1, -1)
    t = m.shape[-1]
    mask = m.new_ones(particles, 1, t)
    sid = None if sentence.speaker is None else torch.tensor([sentence.speaker], device=device)
    if generator.n_speakers and sid is None:
        sid = torch.zeros(1, dtype=torch.long, device=device)
    g = generator.speaker_embedding(sid)
    g = None if g is None else g.expand(particles, -1, -1)
    rng = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    eps = torch.randn((2, particles, m.shape[1], t), generator=rng).to(device)
    sigma = torch.exp(logs)
    inverse = FlowTransform(generator.flow, mask, g).inv
    z = inverse(m + sigma * eps[0])  # non-Gaussianity: z_p ~ N(m_p, sigma_p), z = f^{-1}(z_p)
    d = FlowPrior(m, logs, generator.flow, mask, g).log_prob(z) - MaskedNormal(m, sigma, mask).log_prob(z)
    z_p = m + noise_scale * sigma * eps[1]  # displacement at the inference noise scale
    logger.debug("%s: %d tokens, KL %.4g nats/frame", sentence.source, len(ids), float(d.mean() / t))
    return {"kl": (d / t).cpu().numpy(), "sigma": torch.exp(logs_p).T.cpu().numpy(),
            "sigma_sum": torch.exp(logs_p).sum(1),
            "displacement": (inverse(z_p) - z_p).norm(dim=1).reshape(-1).cpu().numpy(),
            "tokens": len(ids), "frames": t, "dropped": dropped}


def _prior_summary(x: np.ndarray, sig: np.ndarray, disp: np.ndarray, channel_mean: np.ndarray,
                   frames_per_token: int, noise_scale: float, mean_only: bool) -> dict[str, Any]:
    """``report["prior"]`` from the per-(sentence, draw) values ``x`` (U, K) nats per frame, the per-token
    scales ``sig`` (tokens, C), the displacements ``disp`` and the per-channel mean scale."""
    prior_report = {
        "non_gaussianity_per_frame": {
            "mean": float(x.mean()),
            "mcse": _mcse(x),
            "se_pooled": float(x.std(ddof=1) / math.sqrt(x.size)),
            "sd": float(x.std(ddof=1)),
            "min_sentence": float(x.mean(1).min()),
            "max_sentence": float(x.mean(1).max()),
        },
        "sigma_p": {
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(sig, QUANTILES))},
            "mean": float(sig.mean()),
            "channel_mean": channel_mean.tolist(),
            "channel_mean_min": float(channel_mean.min()),
            "channel_mean_max": float(channel_mean.max()),
        },
        "flow_displacement_per_frame": {
            "mean": float(disp.mean()),
            "sd": float(disp.std(ddof=1)),
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(disp, QUANTILES))},
        },
        "frames_per_token": frames_per_token,
        "noise_scale_displacement": noise_scale,
        "noise_scale_kl": 1.0,
        "mean_only_flow": mean_only,
        "estimator": "x_uk = [log p_flow(z) - log N(z; m_p, sigma_p)] / T_u, z = f^-1(z_p), "
                     "z_p ~ N(m_p, sigma_p); mean over (u, k); mcse = sqrt(sum_u var_k(x_uk) / K) / U",
    }
    return prior_report


def _markdown(report: Mapping[str, Any]) -> str:
    p = report["prior"]
    ng, sp, fd = p["non_gaussianity_per_frame"], p["sigma_p"], p["flow_displacement_per_frame"]
    q = sp["quantiles"]
    dq = fd["quantiles"]
    lines = [
        f"# VITS prior-only audit: {report['sentences']} sentences, {report['tokens']} tokens, "
        f"{report['frames']} frames ({p['frames_per_token']} per token), {report['particles']} draws each",
        "",
        "No audio and no posterior encoder: the text encoder's prior N(m_p, sigma_p) per token, each token "
        f"expanded to {p['frames_per_token']} frame(s) (no alignment search), and the flow f (z -> z_p).",
        "",
        "## Prior",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| non-Gaussianity KL(p_flow ‖ N(m_p, sigma_p)), nats/frame | {ng['mean']:.5g} ± {ng['mcse']:.2g} (MCSE) |",
        f"| ... sd of one draw's per-frame value; pooled SE | {ng['sd']:.4g}; {ng['se_pooled']:.2g} |",
        f"| ... per-sentence mean, min / max | {ng['min_sentence']:.4g} / {ng['max_sentence']:.4g} |",
        f"| flow displacement ‖z − z_p‖ per frame (noise scale {p['noise_scale_displacement']:g}) | "
        f"{fd['mean']:.4g} (sd {fd['sd']:.3g}; median {dq['0.5']:.4g}, 99 % {dq['0.99']:.4g}) |",
        f"| sigma_p over (token, channel): 1 % / 25 % / median / 75 % / 99 % | {q['0.01']:.4g} / {q['0.25']:.4g} / "
        f"{q['0.5']:.4g} / {q['0.75']:.4g} / {q['0.99']:.4g} |",
        f"| sigma_p per-channel mean over tokens: min / max (C = {report['channels']}) | "
        f"{sp['channel_mean_min']:.4g} / {sp['channel_mean_max']:.4g} |",
        "",
        "Estimator: for sentence u and draw k, z_p ~ N(m_p, sigma_p), z = f^-1(z_p), "
        "x_uk = [log N(f(z); m_p, sigma_p) + log|det df/dz| − log N(z; m_p, sigma_p)] / T_u "
        f"(log-det {'exactly 0: mean-only couplings' if p['mean_only_flow'] else 'from the flow'}); "
        "mean over all (u, k); MCSE = sqrt(Σ_u var_k(x_uk) / K) / U (sentences fixed).",
    ]
    if report.get("dropped_symbols"):
        lines += ["", f"{report['dropped_symbols']} phoneme symbols not in the voice's phoneme_id_map were "
                      "dropped (as Piper does)."]
    return "\n".join(lines) + "\n"


def write_prior_report(report: Mapping[str, Any], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``report.md`` and ``report.json`` as the folder ``out``, atomically
    (:func:`pyro_vits._io.publish_folder`)."""
    out = Path(out)
    with publish_folder(out, overwrite=overwrite, **_REFUSAL) as tmp:
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return out

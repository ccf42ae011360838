"""Training at equal compute with early stopping, VP vs NVP students of VP and NVP teachers, PSIS k-hat
(Q4, Q7), and the per-step timing of vectorised particles. Every comparison is over ``config.seeds``
(mean, SE and 95 % t-interval; differences paired by seed)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyro
import torch

from ...data.batch import Batch
from ...infer import diagnostics
from ...infer.elbo import HybridEntropyELBO
from ...infer.evaluate import evaluate
from ...models.guides import ObservationGuide, PosteriorEncoder
from ...models.prior_model import VITSPriorModel
from ...models.teacher import make_teacher, sample_dataset
from ...train import FitConfig, fit
from .common import Sweep, mean_ci
from .config import TEACHER_SEED, StudyConfig, check_config

__all__ = ["TRAINING_RUNS", "training_data", "student", "prior_kl_to_teacher", "training_study",
           "timing_study", "run_name"]

_TRACE_KEYS = ("step", "loss_nats", "elbo_per_frame", "kl_per_frame", "heldout_elbo_per_frame",
               "heldout_kl_per_frame", "heldout_loglik_iwae_per_frame", "wall_s", "it_per_s")
_POSTERIOR_UTTERANCES = 4  # held-out utterances whose guide draws go into each run's InferenceData
TEACHERS = ("vp", "nvp")
TRAINING_RUNS = "K<k>_<student> (VP teacher, every K) and <teacher>teacher_K1_<student> (both teachers, K = 1)"


def _coupling(mean_only: bool) -> str:
    return "vp" if mean_only else "nvp"


def run_name(particles: int, student_mean_only: bool, teacher: str = "vp") -> str:
    """``K<k>_<vp|nvp>`` for the VITS-like (mean-only) teacher, ``nvpteacher_K<k>_<vp|nvp>`` otherwise."""
    name = f"K{particles}_{_coupling(student_mean_only)}"
    return name if teacher == "vp" else f"{teacher}teacher_{name}"


def training_data(
    config: StudyConfig, device: torch.device | str = "cpu", teacher: str = "vp"
) -> tuple[VITSPriorModel, Batch, Batch]:
    """The teacher (``train_sizes``, 2 WN layers, 4 couplings; ``"vp"``: mean-only like VITS, ``"nvp"``:
    affine) and its training and held-out utterances, on ``device``; the same for every seed."""
    check_config(config)
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    c, hidden, frames = config.train_sizes
    model = make_teacher(c, hidden, kernel_size=5, n_layers=2, n_flows=4, seed=TEACHER_SEED,
                         mean_only=teacher == "vp")
    n_train, n_heldout = config.train_utterances
    train = sample_dataset(model, n_train, frames, seed=TEACHER_SEED + 1)
    heldout = sample_dataset(model, n_heldout, frames, seed=TEACHER_SEED + 2)
    return model.to(device), train.to(device), heldout.to(device)


def student(
    config: StudyConfig, teacher: VITSPriorModel, mean_only: bool
) -> tuple[VITSPriorModel, PosteriorEncoder]:
    """A student prior (the teacher's architecture and identity decoder, VITS's zero-initialised couplings,
    mean-only or affine) and a VITS posterior encoder guide (2 WN layers). Built under the global RNG."""
    check_config(config)
    c, hidden, _ = config.train_sizes
    model = VITSPriorModel(c, hidden, 5, 1, 2, 4, mean_only=mean_only, sigma_x=teacher.sigma_x,
                           decoder="identity")
    return model, PosteriorEncoder(c, c, hidden, 5, n_layers=2)


def prior_kl_to_teacher(
    teacher: VITSPriorModel, model: VITSPriorModel, data: Batch, num_samples: int, seed: int = 0
) -> tuple[float, float]:
    """Monte Carlo ``KL(p_teacher(z) || p_model(z))`` of the two flow priors on ``data``'s conditioning, in
    nats per valid frame, and its MCSE: ``z ~ p_teacher``, mean of ``log p_teacher(z) - log p_model(z)``."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        p_teacher = teacher.prior(data)
        z = p_teacher.sample((num_samples,))
        per_draw = (p_teacher.log_prob(z) - model.prior(data).log_prob(z)).sum(-1).double() / data.num_frames
    return float(per_draw.mean()), float(per_draw.std() / math.sqrt(num_samples))


def _svi_seconds(records: list[dict[str, float]]) -> list[float]:
    """Cumulative SVI-only wall time at each record (``fit``'s ``wall_s`` also counts evaluations)."""
    steps = [0] + [r["step"] for r in records]
    return np.cumsum([(b - a) / r["it_per_s"] for a, b, r in zip(steps, steps[1:], records)]).tolist()


def _fit(config: StudyConfig, data: tuple[VITSPriorModel, Batch, Batch], particles: int, mean_only: bool,
         seed: int, device: torch.device, steps: int, vectorize: bool = True, logs: int | None = None) -> Any:
    teacher, train, heldout = data
    pyro.set_rng_seed(seed)
    model, guide = student(config, teacher, mean_only)
    elbo = HybridEntropyELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    settings = FitConfig(steps=steps, lr=config.lr, lrd=config.final_lr_ratio ** (1 / steps),
                         batch_size=config.batch_size, seed=seed, log_every=steps // (logs or config.train_logs),
                         progress=False, eval_samples=8, eval_size=config.train_utterances[1])
    return fit(model, guide, train, settings, elbo=elbo, heldout=heldout, device=device)


def _seed_record(
    config: StudyConfig, data: tuple[VITSPriorModel, Batch, Batch], result: Any, seed: int
) -> dict[str, Any]:
    """Final held-out numbers of one seed's run and its early-stopping point (the logged step with the best
    held-out ELBO: ``fit`` evaluates ``eval_samples=8`` particles on the held-out set every log)."""
    teacher, _, heldout = data
    final = evaluate(result.model, result.guide, heldout, config.eval_samples, seed=seed)
    kl_teacher, kl_mcse = prior_kl_to_teacher(teacher, result.model, heldout, config.eval_samples, seed)
    khat = diagnostics.psis_khat_per_utterance(result.model, result.guide, heldout,
                                               num_samples=config.psis_samples, seed=seed)
    trace = [r["heldout_elbo_per_frame"] for r in result.metrics]
    best = int(np.argmax(trace))
    return {
        "seed": seed, "heldout_elbo_per_frame": final["elbo_per_frame"],
        "heldout_elbo_mcse": final["elbo_stderr_per_frame"],
        "heldout_loglik_iwae_per_frame": final["loglik_iwae_per_frame"],
        "heldout_kl_per_frame": final["kl_per_frame"],
        "prior_kl_to_teacher_per_frame": kl_teacher, "prior_kl_to_teacher_mcse": kl_mcse,
        "early_stop_heldout_elbo_per_frame": trace[best], "early_stop_step": int(result.metrics[best]["step"]),
        "psis_khat": khat.tolist(), "khat_counts": diagnostics.khat_counts(khat),
        "wall_s": result.wall_s, "svi_wall_s": _svi_seconds(result.metrics)[-1],
    }


_FINALS = ("heldout_elbo_per_frame", "heldout_loglik_iwae_per_frame", "heldout_kl_per_frame",
           "prior_kl_to_teacher_per_frame", "early_stop_heldout_elbo_per_frame", "early_stop_step",
           "svi_wall_s", "wall_s")


def _run_results(records: list[dict], fits: list[Any]) -> dict[str, Any]:
    """Per-seed finals, their mean/SE/t-interval over seeds and the trace curve (mean over seeds)."""
    metrics = [f.metrics for f in fits]
    draws = min(len(m) for m in metrics)
    curve = {key: np.mean([[r[key] for r in m[:draws]] for m in metrics], 0).tolist()
             for key in ("step", "heldout_elbo_per_frame", "heldout_kl_per_frame")}
    curve["svi_wall_s"] = np.mean([_svi_seconds(m)[:draws] for m in metrics], 0).tolist()
    curve["heldout_elbo_per_seed"] = [[r["heldout_elbo_per_frame"] for r in m[:draws]] for m in metrics]
    khat = np.concatenate([r["psis_khat"] for r in records])
    return {
        "per_seed": records, "final": {k: mean_ci([r[k] for r in records]) for k in _FINALS},
        "khat_counts": diagnostics.khat_counts(khat), "khat_median": float(np.median(khat)),
        "khat_max": float(khat.max()), "curve": curve,
    }


def _paired(runs: dict[str, Any], a: str, b: str, key: str) -> dict[str, float]:
    """``a - b`` of ``key`` per seed (paired: same seed, same minibatch order): mean, SE, 95 % t-interval
    and ``conclusive`` (the interval excludes 0)."""
    diff = [ra[key] - rb[key] for ra, rb in zip(runs[a]["per_seed"], runs[b]["per_seed"])]
    out = mean_ci(diff)
    return {**out, "conclusive": abs(out["mean"]) > out["ci95"]}


def _configurations(config: StudyConfig) -> list[tuple[str, int, bool]]:
    """``(teacher, K, student mean_only)``: every K with VP students of the VP teacher, then K = 1 with the
    other student, then both students of the affine teacher."""
    return ([("vp", k, True) for k in config.particles] + [("vp", 1, False)]
            + [("nvp", 1, True), ("nvp", 1, False)])


def training_study(config: StudyConfig, device: torch.device | str = "cpu") -> tuple[Sweep, dict[str, Any]]:
    """Fit students to a teacher's utterances with the VITS estimator (:class:`HybridEntropyELBO`) at equal
    compute ``K x steps = train_budget`` (same learning-rate schedule for every K when ``final_lr_ratio =
    1``), for every seed: mean-only (VP) students of the VP teacher for every K, the affine (NVP) student at
    K = 1, and both students of an affine teacher. Per run: final and early-stopped held-out ELBO, IWAE
    log-likelihood (``eval_samples`` particles), KL(q || p), KL(p_teacher || p_student), PSIS k-hat per
    held-out utterance, SVI wall time; all nats per valid frame; paired differences in ``comparisons``.

    Returns the :class:`Sweep` (InferenceData ``training_<run>``: traces as ``sample_stats`` with seeds as
    chains and logged steps as draws, guide draws of ``z`` for 4 held-out utterances as ``posterior``) and
    the fitted ``(model, guide)`` of each run's first seed.
    """
    check_config(config)
    device = torch.device(device)
    results: dict[str, Any] = {"budget": config.train_budget, "teachers": {}, "runs": {},
                               "unit": "nats per valid frame (channels summed); seconds; steps"}
    sweep, fitted = Sweep(results), {}
    for teacher_name in TEACHERS:
        data = training_data(config, device, teacher_name)
        teacher, _, heldout = data
        truth = evaluate(teacher, ObservationGuide.for_teacher(teacher), heldout, config.eval_samples, seed=0)
        results["teachers"][teacher_name] = {"heldout_loglik_per_frame": truth["loglik_iwae_per_frame"],
                                             "heldout_frames": heldout.num_frames}
        shown = heldout.subset(torch.arange(min(_POSTERIOR_UTTERANCES, heldout.n), device=device))
        for t_name, particles, mean_only in _configurations(config):
            if t_name != teacher_name:
                continue
            name = run_name(particles, mean_only, teacher_name)
            steps = config.train_budget // particles
            fits = [_fit(config, data, particles, mean_only, seed, device, steps) for seed in config.seeds]
            records = [_seed_record(config, data, f, seed) for f, seed in zip(fits, config.seeds)]
            z = np.stack([diagnostics.guide_samples(f.model, f.guide, shown, num_samples=config.psis_samples,
                                                    seed=seed)["z"] for f, seed in zip(fits, config.seeds)])
            run_config = {"particles": particles, "coupling": _coupling(mean_only), "teacher": teacher_name,
                          "steps": steps, "seeds": list(config.seeds), "fit_config": fits[0].config,
                          "psis_khat": [r["psis_khat"] for r in records]}
            sweep.inference_data[f"training_{name}"] = diagnostics.run_to_inference_data(
                [f.metrics for f in fits], keys=_TRACE_KEYS, posterior={"z": z},
                observed_data={"x": shown.x.cpu().numpy(), "mask": shown.mask[:, 0].cpu().numpy()},
                dims={"z": ["utterance", "channel", "frame"], "x": ["utterance", "channel", "frame"],
                      "mask": ["utterance", "frame"]}, config=run_config)
            results["runs"][name] = {"particles": particles, "coupling": _coupling(mean_only),
                                     "teacher": teacher_name, "steps": steps, **_run_results(records, fits)}
            fitted[name] = (fits[0].model, fits[0].guide)
    results["comparisons"] = _comparisons(config, results["runs"])
    return sweep, fitted


def _comparisons(config: StudyConfig, runs: dict[str, Any]) -> dict[str, Any]:
    """Paired-by-seed differences quoted by Q4 and Q7 (nats per frame)."""
    out: dict[str, Any] = {}
    for teacher in TEACHERS:
        vp, nvp = run_name(1, True, teacher), run_name(1, False, teacher)
        out[f"{teacher}teacher_vp_minus_nvp"] = {
            key: _paired(runs, vp, nvp, key) for key in ("heldout_elbo_per_frame",
                                                         "early_stop_heldout_elbo_per_frame")}
    for k in config.particles[1:]:
        out[f"K{k}_minus_K1"] = {key: _paired(runs, f"K{k}_vp", "K1_vp", key)
                                 for key in ("heldout_elbo_per_frame", "early_stop_heldout_elbo_per_frame")}
    return out


def timing_study(config: StudyConfig, device: torch.device | str = "cpu") -> Sweep:
    """Milliseconds per SVI step with K particles, vectorised vs sequential (``timing_steps`` steps from a
    fresh student, one logged window, seed 0). No draws (single timings)."""
    check_config(config)
    device = torch.device(device)
    data = training_data(config, device)
    out: dict[str, Any] = {"unit": "milliseconds per SVI step", "steps": config.timing_steps,
                           "by_particles": {}}
    for k in config.particles:
        row = {}
        for label, vectorize in (("vectorized", True), ("sequential", False)):
            result = _fit(config, data, k, True, 0, device, config.timing_steps, vectorize=vectorize, logs=1)
            row[label] = 1e3 / result.metrics[-1]["it_per_s"]
        row["speedup"] = row["sequential"] / row["vectorized"]
        out["by_particles"][str(k)] = row
    return Sweep(out)

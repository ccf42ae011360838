"""The whole study: :func:`run_study` (results.json, netCDF, summary tables, figures) and
:func:`publish_docs` (copies them into ``docs/`` and renders the write-up from its template)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ... import _arviz_compat, plots
from ..._io import atomic_write
from ...infer import diagnostics
from ...kl import format_negative_count, three_frame_example
from .common import Sweep
from .config import COS_A, StudyConfig, check_config
from .fixes import fix_gradient_study, gradient_identity, sigma_optimum_study
from .flowfacts import cos_density_grid, logdet_study
from .negative import negative_batch_study, refresh_exact_tails, regime_study, skew_example
from .quality import estimator_quality_study
from .snr import PARAM_GROUPS, SNR_NOISE, dreg_linear_gaussian_study, snr_study
from .template import render_markdown
from .training import timing_study, training_data, training_study
from .variance import variance_ratio_study

__all__ = ["FIGURES", "DOCS_TABLES", "LINKED", "REFRESHED", "run_study", "redraw_figures", "publish_docs",
           "refresh_docs", "render_context"]

FIGURES = (
    "estimator_histograms", "negative_vs_batch_size", "negative_regime", "variance_ratio", "sigma_optimum",
    "snr_vs_particles", "dreg_linear_gaussian", "elbo_vs_wall_time", "vp_vs_nvp", "psis_khat",
    "cos_flow_density",
)
"""The PNG files (``figures/<name>.png``) :func:`run_study` writes."""

DOCS_TABLES = ("quality_cos2d", "quality_cos2d_thread", "quality_coupling2d", "quality_vits", "negative")
"""The summary tables :func:`publish_docs` copies next to the write-up."""


def _derived(results: Mapping[str, Any], config: StudyConfig) -> dict[str, Any]:
    """Headline comparisons quoted by the docs (each from the numbers above it in ``results``)."""
    k_max, b_max = str(max(config.particles)), f"B{max(config.snr_batch_sizes)}"
    runs = results["training"]["runs"]
    by_elbo = results["snr"]["by_elbo"]
    snr = by_elbo["vits"]
    gain = {noise: {group: snr[noise][b_max][k_max][group]["mean"] / snr[noise][b_max]["1"][group]["mean"]
                    for group in PARAM_GROUPS} for noise in SNR_NOISE}
    stl_gain = {noise: by_elbo["stl"][noise][b_max]["1"]["guide"]["mean"]
                / snr[noise][b_max]["1"]["guide"]["mean"] for noise in SNR_NOISE}
    vp = {k: runs[f"K{k}_vp"]["final"] for k in config.particles}
    dreg = results["dreg"]["by_dim"]
    return {
        "snr_gain_kmax": gain,
        "stl_over_vits_guide_snr_k1": stl_gain,
        "dreg_guide_snr_gain_kmax": {d: dreg[d][k_max]["dreg_snr"]["mean"] / dreg[d]["1"]["dreg_snr"]["mean"]
                                     for d in dreg},
        "dreg_guide_snr_gain_kmax_trained": by_elbo["iwae_dreg"]["fixed"][b_max][k_max]["guide"]["mean"]
        / by_elbo["iwae_dreg"]["fixed"][b_max]["1"]["guide"]["mean"],
        "best_k_early_stop": max(vp, key=lambda k: vp[k]["early_stop_heldout_elbo_per_frame"]["mean"]),
        "sqrt_kmax": math.sqrt(max(config.particles)),
        "abs_elementwise_bias_per_element": 1.0,
        "sigma_optimum_abs_elementwise_theory": math.exp(-0.5),
        "clamp_positive_share": 1.0 - results["fix_gradient"]["p_negative_loss"],
        "p_negative_counts": _negative_counts(results["quality"]),
    }


def _negative_counts(quality: Mapping[str, Any]) -> dict[str, Any]:
    """``{setting: {estimator: {K: "count / draws ..."}}}`` of the quality sweep's P(< 0) for the unbiased
    estimators at K = 1 and the largest K, with a 95 % upper bound where the count is 0
    (:func:`~pyro_vits.kl.negative.format_negative_count`)."""
    out: dict[str, Any] = {}
    for setting, r in quality.items():
        out[setting] = {}
        for name in ("vits", "mc", "control_variate"):
            rows = r["estimators"][name]
            k_max = max(rows, key=int)
            counts = {k: (round(rows[k]["p_negative"] * rows[k]["num_draws"]), rows[k]["num_draws"])
                      for k in ("1", k_max)}
            out[setting][name] = {k: format_negative_count(*count) for k, count in counts.items()}
    return out


def _figures(results: Mapping[str, Any], hist: Mapping[str, Mapping[str, np.ndarray]], config: StudyConfig,
             folder: Path) -> None:
    """Every figure of :data:`FIGURES` into ``folder`` from ``results`` and the quality sweeps' draws
    ``hist`` (setting -> estimator -> ``(seed, draw)``)."""
    quality = results["quality"]
    plots.plot_estimator_histograms(
        hist, {s: quality[s]["truth"] for s in quality},
        {s: quality[s]["estimators"]["gaussian_closed_form"]["value"] for s in quality},
        folder / "estimator_histograms.png")
    _result_figures(results, config, folder)


def _result_figures(results: Mapping[str, Any], config: StudyConfig, folder: Path) -> None:
    """The figures of :data:`FIGURES` drawn from ``results`` alone (all but the estimator histograms)."""
    plots.plot_negative_vs_batch_size(results["negative"], folder / "negative_vs_batch_size.png")
    plots.plot_negative_regime(results["regime"], folder / "negative_regime.png")
    plots.plot_variance_ratio(results["variance_ratio"], folder / "variance_ratio.png")
    plots.plot_sigma_optimum(results["sigma_optimum"], folder / "sigma_optimum.png")
    plots.plot_snr_vs_particles(results["snr"], f"B{max(config.snr_batch_sizes)}",
                                folder / "snr_vs_particles.png")
    plots.plot_dreg_check(results["dreg"], folder / "dreg_linear_gaussian.png")
    runs = results["training"]["runs"]
    teacher = results["training"]["teachers"]["vp"]["heldout_loglik_per_frame"]
    plots.plot_elbo_vs_wall_time({k: runs[f"K{k}_vp"]["curve"] for k in config.particles}, teacher,
                                 folder / "elbo_vs_wall_time.png")
    couplings = {"VP student, VP teacher": runs["K1_vp"]["curve"], "NVP student, VP teacher": runs["K1_nvp"]["curve"],
                 "VP student, NVP teacher": runs["nvpteacher_K1_vp"]["curve"],
                 "NVP student, NVP teacher": runs["nvpteacher_K1_nvp"]["curve"]}
    plots.plot_coupling_comparison(couplings, folder / "vp_vs_nvp.png")
    plots.plot_khat({name: np.concatenate([r["psis_khat"] for r in run["per_seed"]]).tolist()
                     for name, run in runs.items()}, diagnostics.KHAT_THRESHOLDS, folder / "psis_khat.png")
    plots.plot_cos_density(cos_density_grid(), COS_A, folder / "cos_flow_density.png")


def _sweeps(config: StudyConfig, device: torch.device, timed: Callable[..., Any]) -> dict[str, Sweep]:
    sweeps: dict[str, Sweep] = {}
    sweeps["quality"] = timed("quality", estimator_quality_study, config, device)
    sweeps["negative"] = timed("negative", negative_batch_study, config)
    sweeps["regime"] = timed("regime", regime_study, config)
    sweeps["variance_ratio"] = timed("variance_ratio", variance_ratio_study, config)
    sweeps["fix_gradient"] = timed("fix_gradient", fix_gradient_study, config)
    sweeps["sigma_optimum"] = timed("sigma_optimum", sigma_optimum_study, config)
    sweeps["training"], fitted = timed("training", training_study, config, device)
    sweeps["timing"] = timed("timing", timing_study, config, device)
    model, guide = fitted["K1_vp"]
    sweeps["snr"] = timed("snr", snr_study, config, model, guide, training_data(config, device)[1])
    sweeps["dreg"] = timed("dreg", dreg_linear_gaussian_study, config)
    return sweeps


def run_study(
    config: StudyConfig, out_dir: str | Path, device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every sweep of ``config`` and write to ``out_dir``: ``results.json`` (all numbers, JSON),
    ``netcdf/<stem>.nc`` (every sweep's and training configuration's InferenceData, seeds as chains),
    ``tables/<name>.{csv,md}`` (``az.summary``) and ``figures/<name>.png`` (:data:`FIGURES`). The 2-D
    sweeps run on the CPU; the VITS-sized setting and the training on ``device``. Returns the results."""
    check_config(config)
    device = torch.device(device)
    out = Path(out_dir)
    for sub in ("netcdf", "tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": config.to_dict(), "device": str(device), "wall_s": {},
                               "versions": {"torch": torch.__version__, "pyro": pyro.__version__}}
    started = time.perf_counter()

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        log(f"[{config.name}] {name} ...")
        start = time.perf_counter()
        value = fn(*args)
        results["wall_s"][name] = time.perf_counter() - start
        return value

    sweeps = _sweeps(config, device, timed)
    results.update({name: sweep.results for name, sweep in sweeps.items()})
    results["logdet"] = timed("logdet", logdet_study)
    results["gradient_identity"] = gradient_identity()
    results["skew_example"] = skew_example()
    results["three_frame"] = _three_frame()
    results["derived"] = _derived(results, config)
    for sweep in sweeps.values():
        for stem, idata in sweep.inference_data.items():
            _arviz_compat.save(idata, out / "netcdf" / f"{stem}.nc")
        for stem, table in sweep.tables.items():
            diagnostics.write_summary(table, out / "tables" / stem)
    hist = {s: sweeps["quality"].draws(f"quality_{s}") for s in results["quality"]}
    timed("figures", _figures, results, hist, config, out / "figures")
    results["wall_s"]["total"] = time.perf_counter() - started
    _write_text(out / "results.json", json.dumps(results, indent=1, sort_keys=True, default=_json_default) + "\n")
    return results


def redraw_figures(out_dir: str | Path) -> None:
    """Redraw ``out_dir/figures/*.png`` of a finished :func:`run_study` from its ``results.json`` and
    ``netcdf/quality_*.nc`` (after a change to :mod:`pyro_vits.plots`; no sweep is rerun)."""
    out = Path(out_dir)
    if not (out / "results.json").is_file():
        raise FileNotFoundError(f"missing {out / 'results.json'}: run run_study into out_dir first")
    results = json.loads((out / "results.json").read_text())
    config = _config_of(results)
    hist = {}
    for setting in results["quality"]:
        data = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / f"quality_{setting}.nc"), "posterior")
        hist[setting] = {str(name): data[name].values for name in data.data_vars}
    _figures(results, hist, config, out / "figures")


def _config_of(results: Mapping[str, Any]) -> StudyConfig:
    """The :class:`StudyConfig` a ``results.json`` was made with."""
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()})


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (never half-written)."""
    atomic_write(path, lambda f: f.write(text))


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src``'s bytes to ``dst`` atomically."""
    atomic_write(dst, lambda f: f.write(src.read_bytes()), mode="wb")


LINKED = {"real_vits": "real_vits.json"}
"""Other pages' results the template quotes (key in the render context -> file in the docs folder): the
real-regime study's (:mod:`pyro_vits.studies.real`)."""


def render_context(results: Mapping[str, Any], docs: Path) -> dict[str, Any]:
    """The template's render context: ``results`` plus each :data:`LINKED` page's results present in ``docs`` (a
    placeholder into a missing one fails naming its path: regenerate that page first)."""
    context = dict(results)
    for key, name in LINKED.items():
        if (docs / name).is_file():
            context[key] = json.loads((docs / name).read_text())
    return context


def publish_docs(out_dir: str | Path, docs_dir: str | Path) -> Path:
    """Copy a :func:`run_study` output's ``results.json``, figures and :data:`DOCS_TABLES` (markdown) into
    ``docs_dir`` (``figures/``, ``tables/``) and render ``docs_dir/kl_estimators.template.md`` into
    ``docs_dir/kl_estimators.md`` (:func:`render_markdown`). Returns the rendered file's path."""
    out, docs = Path(out_dir), Path(docs_dir)
    template = docs / "kl_estimators.template.md"
    for path in (out / "results.json", template):
        if not path.exists():
            raise FileNotFoundError(f"missing {path}: run run_study into out_dir and keep the template in "
                                    "docs_dir")
    results = json.loads((out / "results.json").read_text())
    rendered = render_markdown(template.read_text(), render_context(results, docs))
    for sub in ("figures", "tables"):
        (docs / sub).mkdir(parents=True, exist_ok=True)
    _copy(out / "results.json", docs / "results.json")
    for name in FIGURES:
        _copy(out / "figures" / f"{name}.png", docs / "figures" / f"{name}.png")
    for name in DOCS_TABLES:
        if (out / "tables" / f"{name}.md").exists():
            _copy(out / "tables" / f"{name}.md", docs / "tables" / f"{name}.md")
    target = docs / "kl_estimators.md"
    _write_text(target, rendered)
    return target


def _three_frame() -> dict[str, float]:
    """Q10's three-frame example (:func:`~pyro_vits.kl.three_frame_example`, nats per utterance) with the gap
    of the mixture over VITS's term and ``E log N_eff`` (the identity VITS = mixture - log n_A + E log N_eff)."""
    ex = three_frame_example()._asdict()
    return dict(ex, marginal_minus_mas=ex["marginal"] - ex["mas"],
                log_n_eff=ex["mas"] - ex["marginal"] + ex["log_count"])


REFRESHED = ("fix_gradient", "sigma_optimum", "negative.p_exact", "skew_example", "three_frame", "derived")
"""What :func:`refresh_docs` recomputes: the two cheap sweeps (about a minute on one CPU core together), the
exact tails of the stored negative-batch counts, the closed forms, and the derived numbers."""


def refresh_docs(docs_dir: str | Path) -> Path:
    """Re-render ``docs_dir/kl_estimators.md`` from ``docs_dir/results.json`` without the full study: rerun
    the cheap parts of :data:`REFRESHED` with the results' own config (seeded: what a full run gives for
    them), redraw the figures that need only the results, write ``results.json`` back (with a
    ``refreshed`` list) and render the template. Returns the rendered file's path."""
    docs = Path(docs_dir)
    template, path = docs / "kl_estimators.template.md", docs / "results.json"
    for needed in (path, template):
        if not needed.exists():
            raise FileNotFoundError(f"missing {needed}: refresh_docs needs a published study in docs_dir")
    results = json.loads(path.read_text())
    config = _config_of(results)
    results["fix_gradient"] = fix_gradient_study(config).results
    results["sigma_optimum"] = sigma_optimum_study(config).results
    refresh_exact_tails(results["negative"])
    results["skew_example"] = skew_example()
    results["three_frame"] = _three_frame()
    results["derived"] = _derived(results, config)
    results["refreshed"] = list(REFRESHED)
    text = json.dumps(results, indent=1, sort_keys=True, default=_json_default) + "\n"
    rendered = render_markdown(template.read_text(), render_context(json.loads(text), docs))  # fails before writing
    _result_figures(results, config, docs / "figures")
    _write_text(path, text)
    target = docs / "kl_estimators.md"
    _write_text(target, rendered)
    return target

"""Figures (matplotlib's Agg canvas; no pyplot state)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import atomic_write
from ._rundir import FIGURES
from .kl.estimators import ESTIMATORS
from .kl.estimators import names as registry_names

__all__ = [
    "write_run_figures",
    "plot_training_curves",
    "plot_estimator_histograms",
    "plot_negative_vs_batch_size",
    "plot_variance_ratio",
    "plot_snr_vs_particles",
    "plot_elbo_vs_wall_time",
    "plot_coupling_comparison",
    "plot_khat",
    "plot_cos_density",
]

_PANELS = (
    ("elbo_per_frame", "ELBO (nats/frame)", "ELBO"),
    ("kl_per_frame", "KL(q || p) (nats/frame)", "KL"),
)


def write_run_figures(run_dir: str | os.PathLike, metrics: Sequence[Mapping[str, float]], *,
                      reference_loglik: float | None = None) -> Path:
    """The figures of a finished :func:`~pyro_vits.train.fit` run: ``run_dir/figures/training_curves.png``
    (:func:`plot_training_curves` of its ``metrics``, e.g. ``FitResult.metrics``); returns the path."""
    path = Path(run_dir) / FIGURES / "training_curves.png"
    path.parent.mkdir(exist_ok=True)
    plot_training_curves(metrics, path, reference_loglik=reference_loglik)
    return path


def plot_training_curves(
    metrics: Sequence[Mapping[str, float]], path: str | os.PathLike, *, reference_loglik: float | None = None
) -> None:
    """ELBO/frame and KL/frame against SVI step, training subset and (when logged) ``heldout_*``, to ``path``.

    ``metrics``: the records of ``metrics.jsonl`` (each with ``step``, ``elbo_per_frame``, ``kl_per_frame``).
    ``reference_loglik``: a true held-out log p(x) per frame (e.g. the teacher's), drawn on the ELBO panel.
    """
    if not metrics:
        raise ValueError("metrics is empty: nothing to plot")
    missing = {"step", "elbo_per_frame", "kl_per_frame"} - set(metrics[0])
    if missing:
        raise ValueError(f"metrics records lack keys {sorted(missing)}")
    steps = [m["step"] for m in metrics]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, label, title) in zip(fig.subplots(1, 2), _PANELS):
        ax.plot(steps, [m[key] for m in metrics], marker=".", label="train subset")
        if f"heldout_{key}" in metrics[0]:
            ax.plot(steps, [m[f"heldout_{key}"] for m in metrics], marker=".", label="held out")
        if key == "elbo_per_frame" and reference_loglik is not None:
            ax.axhline(reference_loglik, color="k", linestyle="--", label="true held-out log p(x)")
        ax.set_xlabel("SVI step")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# Figures of the KL-estimator study (pyro_vits.studies.kl); inputs are the study's plain results
# ---------------------------------------------------------------------------------------------------------

_DPI = 100


def _save(fig: Figure, path: str | os.PathLike, dpi: int = _DPI) -> None:
    """Save ``fig`` to ``path`` via a temporary file, so a failed save leaves no partial image. The format
    is the suffix's; without one, PNG and ``.png`` appended (as ``Figure.savefig`` does)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    fmt = path.suffix[1:].lower()
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi), mode="wb")


def _figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _require(mapping: Mapping[str, Any], keys: Sequence[str], name: str) -> None:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{name} lacks keys {missing}")


def _finish(fig: Figure, axes: Sequence[Any], path: str | os.PathLike, shared_legend: bool = False,
            ncol: int = 4, fontsize: str = "small") -> None:
    """Grids and legends (one below the panels with ``shared_legend``), then save as PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if not shared_legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=fontsize, framealpha=0.85)
    if shared_legend:
        _shared_legend(fig, axes[0], ncol)
    _save(fig, path)


def _shared_legend(fig: Figure, ax: Any, ncol: int) -> None:
    """One legend of ``ax``'s entries below the panels, with at most ``ncol`` columns and fewer when the rows
    would be wider than the figure (so no entry is clipped at the edges)."""
    handles, labels = ax.get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for n in range(min(ncol, len(labels)), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=n, fontsize="small")
        if n == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            return
        legend.remove()


_HISTOGRAMS = registry_names(plot="histogram")
"""Estimators whose draws the estimator histograms show (registry ``plot.kind``)."""
_MEAN_LINES = registry_names(plot="mean line")
"""Estimators drawn as a line at their mean (registry ``plot.kind``): they can sit on top of the truth."""
_CLOSED_FORM = ESTIMATORS["gaussian_closed_form"].plot


def _vline(ax: Any, label: str, value: float, color: str, style: str, lo: float, hi: float, row: int) -> None:
    """A vertical line inside ``[lo, hi]``, else an arrow at the edge (row ``row`` from the top)."""
    if lo <= value <= hi:
        ax.axvline(value, color=color, ls=style, lw=1.6, label=f"{label} = {value:.3g}", zorder=3)
    else:  # far outside the draws: an arrow at the edge instead of an axis squeezing them
        edge, align = (hi, "right") if value > hi else (lo, "left")
        ax.annotate(f"{label} = {value:.4g} {'→' if value > hi else '←'}", (edge, 0.95 - 0.07 * row),
                    xycoords=("data", "axes fraction"), ha=align, color=color, fontsize="small")


def plot_estimator_histograms(
    draws: Mapping[str, Mapping[str, np.ndarray]],
    truths: Mapping[str, float],
    closed_forms: Mapping[str, float],
    path: str | os.PathLike,
) -> None:
    """One panel per setting: histograms of the one-particle draws (any shape, nats per frame) of the
    registry's ``"histogram"`` estimators (``vits``, ``mc``, ``control_variate``, ``k3``), the means of its
    ``"mean line"`` ones (``clamp``, ``abs``, ``abs_elementwise``; their value is in the legend: they can sit
    on top of the truth), the truth (thin black) and the Gaussian closed form, in the registry's colours. The
    x range covers the 0.5-99.5 % of the pooled draws."""
    if not draws:
        raise ValueError("draws is empty: nothing to plot")
    _require(truths, list(draws), "truths")
    _require(closed_forms, list(draws), "closed_forms")
    fig, axes = _figure(len(draws), height=4.4)
    for ax, (setting, by_estimator) in zip(axes, draws.items()):
        _require(by_estimator, _HISTOGRAMS + _MEAN_LINES, f"draws[{setting!r}]")
        pooled = np.concatenate([np.ravel(by_estimator[name]) for name in _HISTOGRAMS])
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        lo, hi = min(lo, truths[setting]), max(hi, truths[setting])
        for name in _HISTOGRAMS:
            ax.hist(np.ravel(by_estimator[name]), bins=np.linspace(lo, hi, 60), density=True, histtype="step",
                    color=ESTIMATORS[name].plot.colour, lw=1.3, label=name)
        lines = [("truth", truths[setting], "black", "-"),
                 (_CLOSED_FORM.label, closed_forms[setting], _CLOSED_FORM.colour, "--")]
        lines += [(f"mean {name}", float(np.mean(by_estimator[name])), ESTIMATORS[name].plot.colour,
                   (0, (1 + i, 1 + i))) for i, name in enumerate(_MEAN_LINES)]
        for row, (label, value, color, style) in enumerate(lines):
            _vline(ax, label, value, color, style, lo, hi, row)
        if lo <= 0.0 <= hi:
            ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("KL estimate (nats per frame)")
        ax.set_ylabel("density (1 / nats)")
        ax.set_title(setting)
    _finish(fig, axes, path, fontsize="x-small")


def plot_negative_vs_batch_size(negative: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Measured P(batch-mean KL estimate < 0) against batch size per estimator (binomial 2-SE bars; batch
    sizes with no negative batch drawn as open markers at the exact value), the exact saddlepoint tail
    (solid) and the normal approximation (dotted). ``negative``: ``negative_batch_study``'s results."""
    _require(negative, ("by_estimator",), "negative")
    fig, (ax,) = _figure(1, width=7.0, height=5.6)
    for i, (name, row) in enumerate(negative["by_estimator"].items()):
        _require(row, ("by_batch_size", "curve"), f"negative[{name!r}]")
        rows = row["by_batch_size"]
        n = np.array([int(k) for k in rows])
        p = np.array([rows[k]["p_negative"] for k in rows])
        se = np.array([rows[k]["p_negative_se"] for k in rows])
        exact = np.array([rows[k]["p_exact"] for k in rows])
        seen = p > 0
        lower = np.minimum(2 * se[seen], 0.9 * p[seen])  # a log axis cannot show a bar below 0
        ax.errorbar(n[seen], p[seen], yerr=(lower, 2 * se[seen]), fmt="o", ms=7 - 2 * i, capsize=3,
                    color=f"C{i}", label=f"{name}: measured (±2 SE)")
        if (~seen).any():
            ax.plot(n[~seen], exact[~seen], "o", mfc="none", ms=8 - 2 * i, color=f"C{i}",
                    label=f"{name}: none measured")
        curve = row["curve"]
        width = 3.0 - 0.8 * i  # later estimators drawn thinner on top: coinciding curves stay visible
        ax.plot(curve["batch_size"], curve["p_exact"], color=f"C{i}", lw=width, label=f"{name}: exact tail")
        ax.plot(curve["batch_size"], curve["p_normal_approx"], color=f"C{i}", ls=":", lw=width,
                label=f"{name}: normal approx.")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-12, top=1.0)
    ax.set_xlabel("batch size N (utterances)")
    ax.set_ylabel("P(batch-mean KL estimate < 0)")
    _finish(fig, [ax], path, shared_legend=True, ncol=3)


def plot_negative_regime(regime: Mapping[str, Any], path: str | os.PathLike) -> None:
    """log10 P(batch loss < 0) against batch frames, one line per KL (nats per frame), a panel per
    estimator, exact (solid) and normal approximation (dotted); the simulated points at ``sim_frames``.
    ``regime``: ``regime_study``'s results."""
    _require(regime, ("by_kl", "frames", "sim_frames"), "regime")
    names = list(next(iter(regime["by_kl"].values()))["by_estimator"])
    fig, axes = _figure(len(names), height=3.8)
    frames = np.array(regime["frames"], dtype=float)
    for ax, name in zip(axes, names):
        for i, (kl, row) in enumerate(regime["by_kl"].items()):
            cells = row["by_estimator"][name]
            ax.plot(frames, [cells[str(int(f))]["log10_p"] for f in frames], "o-", color=f"C{i}",
                    label=f"KL = {kl} nats/frame")
            ax.plot(frames, [cells[str(int(f))]["log10_p_normal"] for f in frames], ":", color=f"C{i}")
            sim = cells["simulation"]
            if sim["p_negative"] > 0:
                ax.errorbar([regime["sim_frames"]], [math.log10(sim["p_negative"])], fmt="s", mfc="none",
                            color=f"C{i}")
        ax.set_xscale("log")
        ax.set_ylim(bottom=-20, top=0.2)
        ax.set_xlabel("frames in the batch")
        ax.set_ylabel("log10 P(batch loss < 0)")
        ax.set_title(f"{name} ({regime['channels']} channels)")
    _finish(fig, axes, path, shared_legend=True)


def plot_variance_ratio(ratio: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Var(hybrid = vits) / Var(full MC) and Var(control variate) / Var(full MC) (each estimator of
    ``theory_curve``, labelled by the registry) against sigma_q / sigma_p: the Gaussian theory curves, the
    measured ratios (±2 pooled SE) for the Gaussian and cos priors, the 1/sqrt(2) line. ``ratio``:
    ``variance_ratio_study``'s results."""
    _require(ratio, ("ratios", "theory_curve", "gaussian", "cos", "theory_crossing"), "ratio")
    fig, (ax,) = _figure(1, width=6.6, height=5.0)
    curve = ratio["theory_curve"]
    for j, name in enumerate(k for k in curve if k != "ratios"):
        label = ESTIMATORS[name].plot.label
        ax.plot(curve["ratios"], curve[name], color="black", ls=("-", "--", ":", "-.")[j % 4],
                label=f"{label}: theory")
        for i, prior in enumerate(("gaussian", "cos")):
            row = ratio[prior][name]
            ax.errorbar(ratio["ratios"], row["ratio"], yerr=2 * np.asarray(row["ratio_se"]),
                        fmt=("o", "s", "^", "D")[j % 4], ms=4, capsize=2, color=f"C{i + 2 * j}",
                        label=f"{label}: {prior} prior")
    ax.axvline(ratio["theory_crossing"], color="grey", ls="--", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [0.2, 0.3, 0.5, 1 / np.sqrt(2), 1.0, 1.5, 2.0]
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel(r"$\sigma_q / \sigma_p$ (dimensionless)")
    ax.set_ylabel("Var(estimator) / Var(full MC)")
    _finish(fig, [ax], path, shared_legend=True, ncol=3)


def plot_sigma_optimum(optimum: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Expected d(batch loss)/d(logs_q) against sigma_q / sigma_p per loss (±2 MCSE), with the optima
    (zero crossings) of the unbiased loss (1) and of the element-wise abs (e^(-1/2)); a loss whose gradient
    jumps across 0 (``crossing[name]["kind"] == "kink"``) is drawn without a line across the jump.
    ``optimum``: ``sigma_optimum_study``'s results."""
    _require(optimum, ("ratios", "by_fix", "theory_optimum", "crossing"), "optimum")
    fig, (ax,) = _figure(1, width=5.6)
    ratios = np.asarray(optimum["ratios"])
    for i, (name, row) in enumerate(optimum["by_fix"].items()):
        mean = np.asarray(row["mean"])
        ax.errorbar(ratios, mean, yerr=2 * np.asarray(row["mcse"]), ls="none", marker=".", ms=4, capsize=2,
                    color=f"C{i}", label=name)
        crossing = optimum["crossing"][name]  # None where the gradient does not change sign on the grid
        kink = crossing is not None and crossing["kind"] == "kink"
        above = ratios > crossing["optimum"] if kink else np.zeros(ratios.size, bool)
        for part in (~above, above):
            ax.plot(ratios[part], mean[part], color=f"C{i}")
    for name, value in optimum["theory_optimum"].items():
        ax.axvline(value, color="grey", ls="--", lw=0.8)
        ax.annotate(f" optimum of {name}: {value:.3f}", (value, 0.98), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", fontsize="small", color="grey")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ticks = [0.3, 0.5, float(np.exp(-0.5)), 1.0, 1.5]
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel(r"$\sigma_q / \sigma_p$ (dimensionless)")
    ax.set_ylabel("E d(loss)/d(logs_q) (nats per frame)")
    _finish(fig, [ax], path)


def plot_dreg_check(dreg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Guide-gradient SNR of IWAE-DReG and plain IWAE against K on the linear-Gaussian check, one line per
    latent size D (±2 SE over seeds). ``dreg``: ``dreg_linear_gaussian_study``'s results."""
    _require(dreg, ("by_dim",), "dreg")
    fig, (ax,) = _figure(1, width=5.6)
    for i, (d, rows) in enumerate(dreg["by_dim"].items()):
        k = np.array([int(x) for x in rows])
        for name, style in (("dreg", "-"), ("iwae", ":")):
            mean = np.array([rows[x][f"{name}_snr"]["mean"] for x in rows])
            se = np.array([rows[x][f"{name}_snr"]["se"] for x in rows])
            ax.errorbar(k, mean, yerr=2 * se, ls=style, marker="o", ms=3, capsize=2, color=f"C{i}",
                        label=f"{'DReG' if name == 'dreg' else 'IWAE'}, D = {d}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("particles K")
    ax.set_ylabel("guide gradient SNR (dimensionless)")
    _finish(fig, [ax], path, shared_legend=True)


_NOISE_LABELS = {"fixed": "same batch each repeat", "minibatch": "fresh minibatch each repeat"}


def plot_snr_vs_particles(snr: Mapping[str, Any], batch: str, path: str | os.PathLike) -> None:
    """Gradient SNR against K per parameter group (one panel each), a line per estimator and noise source
    (±2 SE over seeds), and ``SNR_1 sqrt(K)`` (what K independent particles would give) for the fixed batch.
    ``snr``: :func:`pyro_vits.studies.kl.snr_study`'s results; ``batch``: e.g. ``"B16"``."""
    _require(snr, ("by_elbo",), "snr")
    by_elbo = snr["by_elbo"]
    first = next(iter(by_elbo.values()))
    groups = list(next(iter(first["fixed"][batch].values())))
    fig, axes = _figure(len(groups), height=4.2)
    for ax, group in zip(axes, groups):
        for i, (elbo, by_noise) in enumerate(by_elbo.items()):
            for noise, style in (("fixed", "-"), ("minibatch", ":")):
                rows = by_noise[noise][batch]
                k = np.array([int(x) for x in rows])
                mean = np.array([rows[x][group]["mean"] for x in rows])
                se = np.array([rows[x][group]["se"] for x in rows])
                ax.errorbar(k, mean, yerr=2 * se, ls=style, marker="o", ms=3, capsize=2, color=f"C{i}",
                            label=f"{elbo}, {_NOISE_LABELS[noise]}")
        rows = first["fixed"][batch]
        k = np.array([int(x) for x in rows])
        ax.plot(k, rows["1"][group]["mean"] * np.sqrt(k), color="grey", ls="--", label=r"$SNR_1\sqrt{K}$")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles K")
        ax.set_ylabel("gradient SNR (dimensionless)")
        ax.set_title(f"{group}, {batch[1:]} utterances")
    _finish(fig, axes, path, shared_legend=True)


def plot_elbo_vs_wall_time(curves: Mapping[int, Mapping[str, Sequence[float]]], teacher_loglik: float,
                           path: str | os.PathLike) -> None:
    """The gap between the teacher's exact held-out log-likelihood and the held-out ELBO (mean over seeds;
    log scale) against SVI wall time and against particle-steps (K x step), one line per K.
    ``curves``: K -> a run's ``curve`` (``step``, ``svi_wall_s``, ``heldout_elbo_per_frame``)."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    for k, curve in curves.items():
        _require(curve, ("step", "svi_wall_s", "heldout_elbo_per_frame"), f"curves[{k}]")
    fig, axes = _figure(2)
    for i, (k, curve) in enumerate(curves.items()):
        gap = np.maximum(teacher_loglik - np.asarray(curve["heldout_elbo_per_frame"]), 1e-3)
        axes[0].plot(curve["svi_wall_s"], gap, marker=".", color=f"C{i}", label=f"K = {k}")
        axes[1].plot(np.asarray(curve["step"]) * int(k), gap, marker=".", color=f"C{i}", label=f"K = {k}")
    for ax, xlabel in zip(axes, ("SVI wall time (s)", "particle-steps K × step (equal compute)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("teacher log p(x) − held-out ELBO\n(nats/frame, log scale)")
    _finish(fig, axes, path)


def plot_coupling_comparison(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Held-out ELBO per seed (thin) and its mean (bold), and held-out KL(q || p), against SVI step for each
    coupling. ``curves``: label -> a run's ``curve`` (``step``, ``heldout_elbo_per_frame``,
    ``heldout_elbo_per_seed``, ``heldout_kl_per_frame``)."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    for label, curve in curves.items():
        _require(curve, ("step", "heldout_elbo_per_frame", "heldout_elbo_per_seed", "heldout_kl_per_frame"),
                 f"curves[{label!r}]")
    fig, axes = _figure(2)
    for i, (label, curve) in enumerate(curves.items()):
        for seed_curve in curve["heldout_elbo_per_seed"]:
            axes[0].plot(curve["step"], seed_curve, color=f"C{i}", lw=0.6, alpha=0.5)
        axes[0].plot(curve["step"], curve["heldout_elbo_per_frame"], color=f"C{i}", lw=2, label=label)
        axes[1].plot(curve["step"], curve["heldout_kl_per_frame"], color=f"C{i}", lw=2, label=label)
    lo = np.percentile(np.concatenate([np.ravel(c["heldout_elbo_per_seed"]) for c in curves.values()]), 10)
    axes[0].set_ylim(bottom=lo)
    for ax, ylabel in zip(axes, ("held-out ELBO (nats/frame)", "held-out KL(q || p) (nats/frame)")):
        ax.set_xlabel("SVI step")
        ax.set_ylabel(ylabel)
    _finish(fig, axes, path)


def plot_khat(
    khats: Mapping[str, Sequence[float]], thresholds: Sequence[float], path: str | os.PathLike,
    clip: float = 2.0,
) -> None:
    """PSIS k-hat per utterance for each run (jittered strip, one row per run) with the threshold lines;
    k-hats above ``clip`` are drawn at ``clip`` as triangles."""
    if not khats:
        raise ValueError("khats is empty: nothing to plot")
    fig, (ax,) = _figure(1, width=5.5, height=0.9 + 0.45 * len(khats))
    rng = np.random.default_rng(0)
    for i, (name, values) in enumerate(khats.items()):
        values = np.asarray(values, dtype=float)
        y = i + rng.uniform(-0.2, 0.2, values.size)
        inside = values <= clip
        ax.plot(values[inside], y[inside], "o", ms=3, alpha=0.6, color=f"C{i}")
        ax.plot(np.full((~inside).sum(), clip), y[~inside], ">", ms=4, alpha=0.6, color=f"C{i}")
    for t, style in zip(thresholds, ("--", "-")):
        ax.axvline(t, color="red", ls=style, label=f"k-hat = {t}")
    ax.set_yticks(range(len(khats)), list(khats))
    ax.set_xlabel("PSIS k-hat of the guide per held-out utterance\n"
                  f"(dimensionless; values > {clip:g} drawn at {clip:g})")
    _finish(fig, [ax], path)


def plot_cos_density(grid: Mapping[str, np.ndarray], a: float, path: str | os.PathLike) -> None:
    """Density of the standard Gaussian base next to the cos-flow prior (unit Jacobian) on the same grid.
    ``grid``: :func:`pyro_vits.studies.kl.cos_density_grid`'s ``x``, ``log_base``, ``log_prior``."""
    _require(grid, ("x", "log_base", "log_prior"), "grid")
    fig, axes = _figure(2, width=4.0, height=3.6)
    x = np.asarray(grid["x"])
    for ax, key, title in zip(axes, ("log_base", "log_prior"),
                              ("Gaussian base N(0, I)", f"cos-flow prior, a = {a:g}, |det J| = 1")):
        image = ax.contourf(x, x, np.exp(np.asarray(grid[key])), levels=20, cmap="viridis")
        fig.colorbar(image, ax=ax, label="density (1 / unit²)")
        ax.set_xlabel("z₀ (latent units)")
        ax.set_ylabel("z₁ (latent units)")
        ax.set_title(title)
        ax.set_aspect("equal")
    _save(fig, path)

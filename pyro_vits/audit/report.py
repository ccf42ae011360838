"""The audit's report folder: ``report.md``, ``report.json``, ``audit.nc`` and figures, published atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _arviz_compat as azc
from .._io import check_folder, publish_folder
from ..kl import names, prob_negative_normal_approx, prob_negative_saddlepoint
from .draws import COLLAPSE_THRESHOLD, REFERENCE, AuditDraws


def _peak_memory_mb(device: torch.device | str) -> dict[str, float]:
    """The process's peak resident memory (POSIX) and, on CUDA, the peak allocated by torch, in MiB."""
    peak = {}
    try:
        import resource
    except ImportError:  # not on Windows
        pass
    else:
        peak["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = torch.device(device)
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


REPORT_FILES = ("figures", "audit.nc", "report.md", "report.json")
"""What :func:`write_report` puts in ``out``, in the order it moves them in (``report.json``, last, marks
completion)."""


_REFUSAL = dict(what="--out", hint="it already holds an audit report or other files: pass overwrite=True "
                                   "(--overwrite) to replace the folder")


def _check_out(out: Path, overwrite: bool) -> None:
    check_folder(out, overwrite, **_REFUSAL)


def _measured_cell(row: Mapping[str, Any]) -> str:
    """A measured P(batch KL < 0): the fraction with its count, or the 95 % bound when none was negative."""
    if row["measured"] is None:
        return "not measured (batch > corpus)"
    if row["negative"] == 0:
        return (f"0 of {row['resampled']} resampled, {row['independent_batches']} independent "
                f"(95 % bound < {row['upper_95']:.2g})")
    return f"{row['measured']:.4g} ({row['negative']} of {row['resampled']})"


def _estimator_lines(report: Mapping[str, Any]) -> list[str]:
    """The per-estimator table of ``report.md``."""
    lines = [
        "KL per frame (nats; channels summed; summed KL / summed frames, VITS's normalisation). The sd of "
        f"the batch loss at batch size {report['batch_size']}: draw noise for a fixed batch, spread of the "
        "batch's expected value over which utterances form it (composition), and both (total: the per-step "
        "value logged with random batches).",
        "",
        "| estimator | mean | MCSE | sd (one draw, one utterance) | batch sd: draw | batch sd: composition "
        "| batch sd: total | P(< 0), one utterance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["kl_per_frame"].items():
        one = report["prob_negative_by_estimator"].get(name, {}).get("1")
        lines.append(
            f"| {name} | {s['mean']:.5g} | {s['mcse']:.2g} | {s['sd']:.4g} | {s['sd_batch_draw']:.4g} | "
            f"{s['sd_batch_composition']:.4g} | {s['sd_batch_total']:.4g} | "
            f"{'' if one is None else _measured_cell(one)} |"
        )
    return lines


def _channel_lines(report: Mapping[str, Any]) -> list[str]:
    """The per-channel paragraph of ``report.md``: contributions in ``z_p`` coordinates, not channel KLs."""
    ratio, part = (
        np.asarray(report["channels"]["log_scale_ratio"]),
        np.asarray(report["channels"]["kl_per_frame"]),
    )
    return [
        f"Per-channel contributions in z_p coordinates (C = {ratio.size}): VITS's KL term split by channel "
        "of z_p = flow(z), logs_p - logs_q - 1/2 + (z_p - m_p)^2 exp(-2 logs_p) / 2 per channel. The flow "
        "mixes the channels of z, so these are not per-channel KLs, they can be negative, and a small one "
        "does not mean a channel carries no information. Median "
        f"{np.median(part):.4g}, min {part.min():.4g}, max {part.max():.4g} nats/frame; fraction below "
        f"{COLLAPSE_THRESHOLD} nats/frame (`collapsed_fraction`): {report['collapsed_fraction']:.3f}. Mean "
        f"log(sigma_q / sigma_p) {ratio.mean():.4g} (min {ratio.min():.4g}, max {ratio.max():.4g}; "
        "sigma_q of z, sigma_p of z_p).",
    ]


def _negative_lines(report: Mapping[str, Any]) -> list[str]:
    """The P(batch KL < 0) table of ``report.md`` for ``vits``."""
    lines = [
        "P(VITS batch KL < 0). Measured on disjoint batches of distinct utterances, one draw each; the SE "
        "and the bound count only the independent batches (those of one partition of the corpus), the "
        "fraction uses every resampled partition. Predicted for sums of i.i.d. one-draw utterance values: saddlepoint "
        "of their empirical distribution (0 when no value is negative) and normal approximation.",
        "",
        "| batch size | independent batches | measured (negative of resampled) | ± SE "
        "| predicted (saddlepoint) | normal approx. |",
        "|---|---|---|---|---|---|",
    ]
    for size, row in report["prob_negative"].items():
        se = "" if row["measured"] is None or row["negative"] == 0 else f"{row['measured_se']:.2g}"
        lines.append(
            f"| {size} | {row['independent_batches']} | {_measured_cell(row)} | {se} | "
            f"{row['predicted']:.4g} | {row['predicted_normal']:.4g} |"
        )
    return lines


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# VITS KL audit: {report['utterances']} utterances, {report['frames']} frames, "
        f"{report['particles']} draws each",
        "",
    ]
    if report["warnings"]:
        lines += [f"**Warning:** {w}" for w in report["warnings"]] + [""]
    lines += _estimator_lines(report) + [""] + _channel_lines(report) + [""] + _negative_lines(report)
    shift = report.get("flow_displacement")
    if shift:
        lines += [
            "",
            f"Flow displacement: `gaussian_closed_form` minus `{shift['reference']}`, {shift['mean']:.5g} "
            f"± {shift['mcse']:.2g} nats/frame. The closed form compares m_q, logs_q (z coordinates) with "
            "m_p, logs_p (z_p coordinates) as if the flow were the identity: this measures how far the flow "
            "moves z, not the error of an approximation.",
        ]
    lines += ["", f"Alignment agreement between draws: {report['alignment_agreement']:.4f} of frames."]
    return "\n".join(lines) + "\n"


def _inference_data(report: Mapping[str, Any], draws: AuditDraws) -> Any:
    frames, estimates = draws.arrays()
    return azc.make_inference_data(
        {"posterior": {f"kl_{name}": x.T[None] for name, x in estimates.items()}},
        observed_data={
            "frames": frames,
            "channel_kl_per_frame": np.asarray(report["channels"]["kl_per_frame"]),
            "channel_log_scale_ratio": np.asarray(report["channels"]["log_scale_ratio"]),
        },
        dims={
            **{f"kl_{name}": ["utterance"] for name in estimates},
            "frames": ["utterance"],
            "channel_kl_per_frame": ["channel"],
            "channel_log_scale_ratio": ["channel"],
        },
        coords={"utterance": np.arange(frames.size)},
        attrs={"units": "nats per utterance (kl_*), frames per utterance", "sources": draws.sources},
    )


def _figures(report: Mapping[str, Any], draws: AuditDraws, folder: Path) -> None:
    from ..plots import plot_estimator_histograms

    frames, estimates = draws.arrays()
    per_frame = {name: x / frames[:, None] for name, x in estimates.items()}
    truth = report["kl_per_frame"][REFERENCE]["mean"]
    closed = report["kl_per_frame"].get("gaussian_closed_form", {}).get("mean", float("nan"))
    plot_estimator_histograms(
        {"corpus": per_frame}, {"corpus": truth}, {"corpus": closed}, folder / "kl_per_frame.png"
    )
    _plot_prob_negative(report, estimates, folder / "prob_negative.png")
    _plot_channels(report, folder / "channels.png")


SIGNED = names(unbiased=True, can_be_negative=True)
"""The unbiased estimators whose value can be negative (registry properties), drawn in the P(negative)
figure."""


def _prediction_curves(ax: Any, x: np.ndarray, top: int, color: str, name: str) -> None:
    """The saddlepoint and normal predictions of P(sum of n one-draw values < 0) for ``x (N, K)``, n = 1 ..
    ``top`` (a log-spaced grid)."""
    curve = np.unique(np.geomspace(1, top, 12).round().astype(int))
    saddle = [prob_negative_saddlepoint(x, n=int(n)) for n in curve]
    ax.plot(curve, saddle, color=color, ls="--", label=f"{name}: saddlepoint (empirical)")
    mu, sigma = float(x.mean()), float(x.std(ddof=1))
    if sigma > 0:
        normal = [float(prob_negative_normal_approx(mu, sigma, int(n))) for n in curve]
        ax.plot(curve, normal, color=color, ls=":", label=f"{name}: normal approx.")


def _plot_prob_negative(report: Mapping[str, Any], estimates: Mapping[str, np.ndarray], path: Path) -> None:
    """Measured P(batch loss < 0) against batch size (±2 SE over the independent batches; 95 % upper bounds
    where none was negative; nothing where the batch exceeds the corpus) and the saddlepoint and normal
    predictions, for each estimator of :data:`SIGNED`, to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, name in enumerate(n for n in SIGNED if n in estimates):
        rows = [(int(size), r) for size, r in report["prob_negative_by_estimator"][name].items()]
        seen = [(size, r) for size, r in rows if r["measured"]]
        if seen:
            measured, se = np.array([[r["measured"], r["measured_se"]] for _, r in seen]).T
            bars = (np.minimum(2 * se, 0.9 * measured), 2 * se)  # a log axis cannot show a bar below 0
            ax.errorbar([s for s, _ in seen], measured, yerr=bars, fmt="o", capsize=3, color=f"C{i}",
                        label=f"{name}: measured (±2 SE)")
        bounds = [(size, r["upper_95"]) for size, r in rows if r["upper_95"] is not None]
        if bounds:
            ax.plot(*zip(*bounds), "v", color=f"C{i}", mfc="none", label=f"{name}: none negative, 95 % bound")
        _prediction_curves(ax, estimates[name], max(size for size, _ in rows), f"C{i}", name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-12, top=1.0)
    ax.set_xlabel("batch size (utterances)")
    ax.set_ylabel("P(batch KL loss < 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower left")  # the tails fall to the right: the corner stays free
    fig.savefig(path, dpi=100)


def _plot_channels(report: Mapping[str, Any], path: Path) -> None:
    """Histogram of the per-channel sigma_q / sigma_p and the per-channel contributions to VITS's KL term in
    ``z_p`` coordinates (sorted; not per-channel KLs, can be negative), to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratio = np.exp(np.asarray(report["channels"]["log_scale_ratio"]))
    part = np.sort(np.asarray(report["channels"]["kl_per_frame"]))[::-1]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.hist(ratio, bins=min(40, max(5, ratio.size // 2)), color="C0")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel(r"per-channel $\exp(\overline{\log\sigma_q - \log\sigma_p})$"
                    "\n" r"($\sigma_q$ of z, $\sigma_p$ of z_p)")
    left.set_ylabel("channels")
    right.bar(np.arange(part.size), part, width=1.0, color="C1")
    right.axhline(COLLAPSE_THRESHOLD, color="k", ls="--", lw=0.8, label=f"threshold {COLLAPSE_THRESHOLD}")
    right.set_yscale("symlog", linthresh=COLLAPSE_THRESHOLD)
    right.set_xlabel("channel of z_p (sorted by contribution)")
    right.set_ylabel("contribution in z_p coordinates\n(nats / frame; not a per-channel KL)")
    right.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def write_report(
    report: Mapping[str, Any], draws: AuditDraws, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``report.json``, ``report.md``, ``figures/*.png`` and ``audit.nc`` as the folder ``out``: it is
    built in a temporary folder next to it and renamed into place when complete
    (:func:`pyro_vits._io.publish_folder`; a non-empty ``out`` is replaced only with ``overwrite``)."""
    out = Path(out)
    with publish_folder(out, overwrite=overwrite, **_REFUSAL) as tmp:
        (tmp / "figures").mkdir()
        _figures(report, draws, tmp / "figures")
        azc.save(_inference_data(report, draws), tmp / "audit.nc")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return out

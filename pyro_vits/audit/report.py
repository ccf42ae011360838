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
from ..kl import names, prob_negative_normal_approx
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


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# VITS KL audit: {report['utterances']} utterances, {report['frames']} frames, "
        f"{report['particles']} draws each",
        "",
        "KL per frame (nats; channels summed; summed KL / summed frames, VITS's normalisation).",
        "",
        "| estimator | mean | MCSE | sd (one draw, one utterance) | sd (batch of "
        f"{report['batch_size']}) | P(< 0), one utterance |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["kl_per_frame"].items():
        neg = report["prob_negative_by_estimator"].get(name, {}).get("1", {}).get("measured")
        lines.append(
            f"| {name} | {s['mean']:.5g} | {s['mcse']:.2g} | {s['sd']:.4g} | {s['sd_batch']:.4g} | "
            f"{'' if neg is None else f'{neg:.4g}'} |"
        )
    ratio, kl_c = (
        np.asarray(report["channels"]["log_scale_ratio"]),
        np.asarray(report["channels"]["kl_per_frame"]),
    )
    lines += [
        "",
        f"Channels: C = {ratio.size}; collapsed (KL < {COLLAPSE_THRESHOLD} nats/frame): "
        f"{report['collapsed_fraction']:.3f}; mean log(sigma_q / sigma_p) {ratio.mean():.4g} "
        f"(min {ratio.min():.4g}, max {ratio.max():.4g}); KL per channel: median {np.median(kl_c):.4g}, "
        f"max {kl_c.max():.4g} nats/frame.",
        "",
        "| batch size | P(VITS batch KL < 0) measured | ± SE | normal approx. |",
        "|---|---|---|---|",
    ]
    for size, row in report["prob_negative"].items():
        measured = f"{row['measured']:.4g}" if row["measured"] > 0 else f"0 (< {row['upper_95']:.2g})"
        lines.append(f"| {size} | {measured} | {row['measured_se']:.2g} | {row['predicted']:.4g} |")
    error = report.get("gaussian_closed_form_error")
    if error:
        lines += [
            "",
            f"Gaussian closed form (ignoring the flow) minus `{error['reference']}`: {error['mean']:.5g} "
            f"± {error['mcse']:.2g} nats/frame.",
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


def _plot_prob_negative(report: Mapping[str, Any], estimates: Mapping[str, np.ndarray], path: Path) -> None:
    """Measured P(batch loss < 0) against batch size (±2 SE; 95 % upper bounds where none was negative) and
    the normal approximation, for each estimator of :data:`SIGNED`, to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, name in enumerate(n for n in SIGNED if n in estimates):
        rows = report["prob_negative_by_estimator"][name]
        sizes = np.array([int(k) for k in rows])
        measured = np.array([r["measured"] for r in rows.values()])
        seen = measured > 0
        se = np.array([r["measured_se"] for r in rows.values()])[seen]
        if seen.any():
            bars = (np.minimum(2 * se, 0.9 * measured[seen]), 2 * se)  # a log axis cannot show a bar below 0
            ax.errorbar(
                sizes[seen],
                measured[seen],
                yerr=bars,
                fmt="o",
                capsize=3,
                color=f"C{i}",
                label=f"{name}: measured (±2 SE)",
            )
        bounds = [r["upper_95"] for r in rows.values() if r["measured"] == 0]
        if bounds:
            ax.plot(sizes[~seen], bounds, "v", color=f"C{i}", mfc="none", label=f"{name}: none, 95 % bound")
        x = estimates[name]
        mu, sigma = float(x.mean()), float(x.std(ddof=1))
        curve = np.arange(1, sizes.max() + 1)
        if sigma > 0:
            ax.plot(
                curve,
                [float(prob_negative_normal_approx(mu, sigma, int(n))) for n in curve],
                color=f"C{i}",
                ls=":",
                label=f"{name}: normal approx.",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-12, top=1.0)
    ax.set_xlabel("batch size (utterances)")
    ax.set_ylabel("P(batch KL loss < 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _plot_channels(report: Mapping[str, Any], path: Path) -> None:
    """Histogram of the per-channel sigma_q / sigma_p and the per-channel KL (sorted), to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratio = np.exp(np.asarray(report["channels"]["log_scale_ratio"]))
    kl_c = np.sort(np.asarray(report["channels"]["kl_per_frame"]))[::-1]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.hist(ratio, bins=min(40, max(5, ratio.size // 2)), color="C0")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel(r"per-channel $\exp(\overline{\log\sigma_q - \log\sigma_p})$")
    left.set_ylabel("channels")
    right.bar(np.arange(kl_c.size), kl_c, width=1.0, color="C1")
    right.axhline(
        COLLAPSE_THRESHOLD, color="k", ls="--", lw=0.8, label=f"collapse threshold {COLLAPSE_THRESHOLD}"
    )
    right.set_yscale("symlog", linthresh=COLLAPSE_THRESHOLD)
    right.set_xlabel("channel (sorted by KL)")
    right.set_ylabel("KL (nats / frame)")
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

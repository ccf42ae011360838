"""Figures (matplotlib's Agg canvas; no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_training_curves"]

_PANELS = (
    ("elbo_per_frame", "ELBO (nats/frame)", "ELBO"),
    ("kl_per_frame", "KL(q || p) (nats/frame)", "KL"),
)


def plot_training_curves(metrics: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """ELBO/frame and KL/frame against SVI step, training subset and (when logged) ``heldout_*``, to ``path``.

    ``metrics``: the records of ``metrics.jsonl`` (each with ``step``, ``elbo_per_frame``, ``kl_per_frame``).
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
        ax.set_xlabel("SVI step")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)

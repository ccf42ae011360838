"""The real-regime study's results (``docs/real_vits.json``), figures and page (``docs/real_vits.md``).

:func:`collect` gathers the stages' outputs into one JSON-able dict; :func:`figures` draws the refit's
trajectory and the per-channel scale ratios; :func:`render` writes the page from the dict alone."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..speech.variants import paired_difference, t_interval

__all__ = ["FIX_KEYS", "collect", "figures", "render"]

FIX_KEYS = ("kl_per_frame", "mel_l1", "sigma_ratio_median", "channels_sigma_above_1")
"""The held-out measurements compared across fixes (see :mod:`.evaluate`)."""


def _training_log(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _fix_tables(cfg: Mapping[str, Any], evals: Mapping[str, Mapping[str, Any]],
                runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    records = []
    for fix in cfg["fixes"]:
        for seed in cfg["seeds"]:
            key = f"{fix['name']}-s{seed}"
            run = runs.get(key, {})
            records.append({"variant": fix["name"], "seed": seed, **{k: evals[key][k] for k in FIX_KEYS},
                            "s_per_step": (run.get("wall_s") or math.nan) / cfg["fix_steps"]})
    names = [f["name"] for f in cfg["fixes"]]
    summary = {n: {k: t_interval([r[k] for r in records if r["variant"] == n]) for k in FIX_KEYS}
               for n in names}
    paired = {n: {k: paired_difference(records, k, n) for k in FIX_KEYS} for n in names[1:]}
    return dict(records=records, summary=summary, paired=paired)


def collect(cfg: Mapping[str, Any], root: Path, evals: Mapping[str, Mapping[str, Any]],
            audit_report: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]],
            setup: Mapping[str, Any]) -> dict[str, Any]:
    """The results dict: ``setup`` (command, corpus, versions, wall time), the refit's ``trajectory`` (one
    held-out evaluation per checkpoint, and the training log), the ``audit`` of the refit, the ``fixes``
    (records per fix and seed, t-intervals over seeds, paired differences against ``vits``)."""
    trajectory = [{"step": s, **evals[f"refit-{s}"]} for s in cfg["refit_steps"]]
    keep = ("utterances", "frames", "particles", "batch_size", "kl_per_frame", "prob_negative",
            "prob_negative_by_estimator", "alignment_agreement", "skewness_per_utterance", "channels")
    return dict(setup=dict(setup), config=dict(cfg), trajectory=trajectory,
                training_log=_training_log(root / "refit"),
                audit={k: audit_report[k] for k in keep if k in audit_report},
                fixes=_fix_tables(cfg, evals, runs), runs=dict(runs))


def figures(results: Mapping[str, Any], folder: Path) -> list[str]:
    """``real_vits_trajectory.png`` and ``real_vits_sigma.png`` in ``folder``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    traj = results["trajectory"]
    steps = [t["step"] for t in traj]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = (("kl_per_frame", "kl_mcse", "KL (nats/frame)"), ("mel_l1", "mel_l1_se", "mel L1 (log-mel)"),
              ("sigma_ratio_median", None, "median channel σ_q/σ_p"))
    for ax, (key, err, label) in zip(axes, panels):
        ax.errorbar(steps, [t[key] for t in traj], yerr=None if err is None else [t[err] for t in traj],
                    marker="o")
        ax.set_xlabel("refit step")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "real_vits_trajectory.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bins = np.linspace(0, 1.6, 33)
    ax.hist(traj[-1]["sigma_ratio"], bins=bins, alpha=0.8, label=f"refit (step {steps[-1]})")
    for rec in results["fixes_sigma"]:
        ax.hist(rec["sigma_ratio"], bins=bins, histtype="step", label=rec["label"])
    ax.axvline(math.exp(-0.5), color="k", ls=":", label="e^-1/2")
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("per-channel σ_q/σ_p (geometric mean over held-out frames)")
    ax.set_ylabel("channels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "real_vits_sigma.png", dpi=110)
    plt.close(fig)
    return ["real_vits_trajectory.png", "real_vits_sigma.png"]


def _pm(stat: Mapping[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}g} ± {stat['half_width']:.2g}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _plateau(traj: Sequence[Mapping[str, Any]], key: str) -> str:
    """The change of ``key`` over the last two checkpoints, relative to its change over the whole refit."""
    first, prev, last = traj[0][key], traj[-2][key], traj[-1][key]
    total = abs(last - first)
    return f"{last - prev:+.3g} ({abs(last - prev) / total:.1%} of the refit's total change)" if total else "0"


def _trajectory(results: Mapping[str, Any]) -> list[str]:
    traj = results["trajectory"]
    lines = [_row(["step", "KL (nats/frame) ± MCSE", "mel L1 ± SE", "median σ_q/σ_p", "channels σ_q > σ_p"]),
             _row(["---"] * 5)]
    for t in traj:
        lines.append(_row([t["step"], f"{t['kl_per_frame']:.4g} ± {t['kl_mcse']:.2g}",
                           f"{t['mel_l1']:.4g} ± {t['mel_l1_se']:.2g}", f"{t['sigma_ratio_median']:.3f}",
                           f"{t['channels_sigma_above_1']} / {len(t['sigma_ratio'])}"]))
    lines += ["", f"Change over the last two checkpoints: KL {_plateau(traj, 'kl_per_frame')} nats/frame; "
              f"mel L1 {_plateau(traj, 'mel_l1')}; median σ_q/σ_p {_plateau(traj, 'sigma_ratio_median')}."]
    return lines


def _audit(results: Mapping[str, Any]) -> list[str]:
    a = results["audit"]
    lines = [_row(["estimator", "KL (nats/frame)", "MCSE"]), _row(["---"] * 3)]
    lines += [_row([name, f"{s['mean']:.5g}", f"{s['mcse']:.2g}"]) for name, s in a["kl_per_frame"].items()]
    lines += ["", _row(["batch size", "P(batch KL < 0) measured", "predicted (from the per-utterance values)"]),
              _row(["---"] * 3)]
    for size, p in a["prob_negative"].items():
        predicted = p.get("predicted_saddlepoint", p.get("predicted"))
        measured = f"{p['measured']:.3g}" if p["measured"] else f"0 (< {p.get('upper_95') or 0:.2g})"
        lines.append(_row([size, measured, f"{predicted:.3g}" if predicted is not None else "-"]))
    return lines


def _fixes(results: Mapping[str, Any]) -> list[str]:
    fx = results["fixes"]
    head = ["fix", "KL (nats/frame)", "mel L1", "median σ_q/σ_p", "channels σ_q > σ_p"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, stats in fx["summary"].items():
        lines.append(_row([name, *(_pm(stats[k], 4) for k in FIX_KEYS)]))
    lines += ["", "Paired differences against `vits` (same initial enc_q, seed and minibatch sequence), mean ± "
              "95 % t half-width over seeds:", "", _row(head), _row(["---"] * len(head))]
    for name, stats in fx["paired"].items():
        lines.append(_row([name, *(_pm(stats[k], 3) for k in FIX_KEYS)]))
    return lines


def render(results: Mapping[str, Any], sections: Mapping[str, str] | None = None) -> str:
    """The page: the setup line, the trajectory, the audit, the fixes; ``sections`` (title -> markdown)
    are prose written after the numbers (the findings), inserted first."""
    s, cfg = results["setup"], results["config"]
    lines = ["# VITS's KL regime on a real trained VITS", "",
             f"Generated by `{s['command']}` ({s['created_utc']}, {s['wall_h']:.2f} h wall time on "
             f"{s['machine']}). Voice: {s['voice']}. Corpus: {s['corpus']}.", ""]
    for title, text in (sections or {}).items():
        lines += [f"## {title}", "", text, ""]
    lines += ["## The refit's trajectory", "",
              f"Held-out: the first {results['trajectory'][-1]['utterances']} utterances of `val.txt` "
              f"({results['trajectory'][-1]['frames']} frames), {cfg['eval_draws']} draws each.", "",
              *_trajectory(results), "", "![trajectory](figures/real_vits_trajectory.png)", "",
              "## Audit of the refit", "", *_audit(results), "",
              "## The fixes", "", *_fixes(results), "", "![sigma](figures/real_vits_sigma.png)", ""]
    return "\n".join(lines)

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

__all__ = ["FIX_KEYS", "collect", "figures", "findings", "render"]

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
            "prob_negative_by_estimator", "alignment_agreement", "skewness_per_utterance", "channels",
            "sd_batch_by_size", "warnings")
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


def _negative_cell(row: Mapping[str, Any]) -> str:
    if row["measured"] is None:
        return "not measured (batch > held-out set)"
    if row["negative"]:
        return f"{row['measured']:.3g} ± {row['measured_se']:.2g} ({row['negative']} of {row['resampled']})"
    return (f"0 of {row['resampled']} ({row['independent_batches']} independent; 95 % bound "
            f"< {row['upper_95']:.2g})")


def _audit(results: Mapping[str, Any]) -> list[str]:
    a = results["audit"]
    lines = [f"{a['utterances']} held-out utterances (all of `val.txt`), {a['frames']} frames, {a['particles']} "
             "draws each; nats per frame (channels summed, summed over utterances / summed frames).", "",
             _row(["estimator", "KL (nats/frame)", "MCSE", "sd, one utterance's draw"]), _row(["---"] * 4)]
    lines += [_row([name, f"{s['mean']:.5g}", f"{s['mcse']:.2g}", f"{s['sd']:.3g}"])
              for name, s in a["kl_per_frame"].items()]
    lines += ["", "VITS's logged value (`vits`, one draw) per batch: sd over random batches of held-out utterances, "
              "split into draw noise (fixed batch) and batch composition; P(batch KL < 0) counted on disjoint "
              "batches of distinct utterances, and predicted by the saddlepoint of the sum of per-utterance "
              "values (the measured per-utterance distribution; the normal approximation beside it).", "",
              _row(["batch", "sd draw", "sd composition", "sd total", "P(< 0) counted",
                    "P(< 0) saddlepoint", "normal approx."]), _row(["---"] * 7)]
    spread = a.get("sd_batch_by_size", {})
    for size, p in a["prob_negative"].items():
        sd = spread.get(size, {})
        lines.append(_row([size, *(f"{sd[k]:.3g}" if k in sd else "-" for k in
                                   ("sd_batch_draw", "sd_batch_composition", "sd_batch_total")),
                           _negative_cell(p), f"{p['predicted']:.3g}", f"{p.get('predicted_normal', 0):.3g}"]))
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


def _method(results: Mapping[str, Any]) -> list[str]:
    s, cfg = results["setup"], results["config"]
    corpus = s.get("corpus_summary", {})
    return [
        f"**The voice** ({s['voice']}): a VITS (192 latent channels; text encoder, 4 mean-only coupling flow, "
        "stochastic duration predictor, HiFi-GAN decoder) trained by Piper on real recorded speech. A released "
        "voice has no posterior encoder; its text encoder, flow and decoder are read as VITS modules "
        "(`pyro_vits.vits`, equal to onnxruntime's to 1e-6) and frozen.",
        "",
        f"**The corpus** ({s['corpus']}: {corpus.get('utterances', '?')} utterances, "
        f"{corpus.get('hours', float('nan')):.2f} h; `pyro-vits corpus --engine piper`): the voice itself "
        "reading Debian fortunes through onnxruntime (noise scales 0.667 / 0.8, seeded). It is the speech the "
        "voice's prior and decoder model best, a best case for reconstruction; recorded speech is not tested.",
        "",
        "**The refit** (`pyro-vits refit-posterior`, `pyro_vits.models.refit`): VITS's `PosteriorEncoder` "
        f"({cfg['enc_q_layers']} WaveNet layers, 192 channels) from a random initialisation, trained with VITS's "
        "generator loss without the adversarial, feature-matching and duration terms, `45 · L1(mel(dec(z_seg)), "
        "mel(y_seg)) + kl_loss` on one random 32-frame segment per utterance (80 mel bins, 1024/256/1024), the "
        "KL with MAS chosen per draw, exactly as VITS's training step computes it "
        f"(`VITSGeneratorLoss`); batch {cfg['batch_size']} (VITS: 64), Adam (`ClippedAdam`) at lr {cfg['lr']:g} "
        f"decaying by {cfg['final_lr_ratio']:g} every {cfg['lr_decay_steps']} steps, one seed "
        f"({cfg['seeds'][0]}), checkpoints at steps {', '.join(map(str, cfg['refit_steps']))}. "
        f"The refit's training took {results['training_log'][-1]['wall_s'] / 3600:.2f} h of wall time (its own "
        f"clock; {cfg['jobs']} torch threads); the fine-tunes {s.get('fixes_cpu_h', float('nan')):.2f} CPU hours "
        "(one thread each).",
        "",
        "**Held-out measurements** (`pyro_vits.studies.real.evaluate`): KL per frame is VITS's logged value "
        "(`vits` estimator) summed over utterances and channels divided by the valid frames, averaged over "
        "draws, ± its MCSE over the i.i.d. draws (the utterances fixed); σ_q/σ_p per channel is the geometric "
        "mean over held-out frames and draws of `exp(logs_q − logs_p)` with `logs_p` of the token each draw's "
        "MAS aligns the frame to (the ratio VITS's loss compares; its flow preserves volume); mel L1 is VITS's "
        "on whole held-out utterances decoded from one draw of `z`. The fixes table gives means over seeds ± "
        "the 95 % Student-t half-width.",
        ""]


def render(results: Mapping[str, Any], sections: Mapping[str, str] | None = None) -> str:
    """The page: the setup line, ``sections`` (title -> markdown: the findings), how it was measured, the
    trajectory, the audit, the fixes and the listening samples."""
    s, cfg = results["setup"], results["config"]
    lines = ["# VITS's KL regime on a real trained VITS", "",
             f"Generated by `{s['command']}` (last run {s['created_utc']}, {s['wall_h']:.2f} h wall time on "
             f"{s['machine']}; the command resumes its stored runs, whose CPU time is given below).", ""]
    for title, text in (sections or {}).items():
        lines += [f"## {title}", "", text, ""]
    samples = ", ".join(f"[{name}](samples/real_vits/{name}.wav)" for name in results.get("samples", []))
    lines += ["## How it was measured", "", *_method(results),
              "## The refit's trajectory", "",
              f"Held-out: the first {results['trajectory'][-1]['utterances']} utterances of `val.txt` "
              f"({results['trajectory'][-1]['frames']} frames), {cfg['eval_draws']} draws each.", "",
              *_trajectory(results), "", "![trajectory](figures/real_vits_trajectory.png)", "",
              "## Audit of the refit", "", *_audit(results), "",
              "## The fixes", "", *_fixes(results), "", "![sigma](figures/real_vits_sigma.png)", "",
              "## Listening samples", "",
              f"`dec(z)`, `z ~ q` (one seeded draw), of the first held-out utterance for the refit and each fix "
              f"(seed {cfg['seeds'][0]}), and the corpus's recording: {samples}.", ""]
    return "\n".join(lines)


def _differs(stat: Mapping[str, float]) -> bool:
    """A paired difference whose 95 % t interval excludes 0."""
    return abs(stat["mean"]) > stat["half_width"]


def _settle(results: Mapping[str, Any]) -> str:
    traj, cfg = results["trajectory"], results["config"]
    last, prev, first = traj[-1], traj[-2], traj[0]
    share = abs(last["kl_per_frame"] - prev["kl_per_frame"]) / abs(last["kl_per_frame"] - first["kl_per_frame"])
    verdict = ("close to a plateau" if share < 0.1 else
               "still falling: the refit is not converged, and a longer run would lower the KL further")
    ratio = np.array(last["sigma_ratio"])
    return (f"After {last['step']} refit steps the held-out KL is {last['kl_per_frame']:.4g} ± "
            f"{last['kl_mcse']:.2g} nats per frame ({len(ratio)} channels summed: "
            f"{last['kl_per_frame'] / len(ratio):.3g} per element); from step {prev['step']} to {last['step']} it "
            f"changed by {last['kl_per_frame'] - prev['kl_per_frame']:+.3g}, {share:.0%} of its change since step "
            f"{first['step']}: {verdict}. The held-out mel L1 is {last['mel_l1']:.3f} (log-mel units; "
            f"{cfg['refit_steps'][0]} steps: {first['mel_l1']:.3f}). Per channel, σ_q/σ_p has median "
            f"{np.median(ratio):.3f} (range {ratio.min():.3f} to {ratio.max():.3f}); {int((ratio > 1).sum())} of "
            f"{len(ratio)} channels have σ_q > σ_p.")


def _negative(results: Mapping[str, Any]) -> str:
    a = results["audit"]
    rows = a["prob_negative"]
    parts = [f"batch {size}: counted {_negative_cell(rows[size])}; predicted from the per-utterance values by "
             f"the saddlepoint {rows[size]['predicted']:.2g} (the normal approximation "
             f"{rows[size].get('predicted_normal', float('nan')):.2g})" for size in ("16", "64") if size in rows]
    one = rows.get("1")
    if one is not None and one["negative"] == 0:
        parts.append(f"not one of the {one['resampled']} one-draw per-utterance values is negative (95 % bound "
                     f"< {one['upper_95']:.2g}), so no sum of them can be, which is why the saddlepoint is 0")
    spread = a.get("sd_batch_by_size", {}).get("16")
    kl = a["kl_per_frame"]["vits"]["mean"]
    extra = (f" At batch 16 the logged value has mean {kl:.4g} and sd {spread['sd_batch_total']:.3g} nats per "
             f"frame over random batches ({spread['sd_batch_draw']:.3g} of it draw noise): a negative batch is "
             f"{kl / spread['sd_batch_total']:.0f} sd away.") if spread else ""
    return "; ".join(parts) + "." + extra


def _mas(results: Mapping[str, Any]) -> str:
    gap = results["trajectory"][-1]["alignment_gap"]
    cell = lambda key: f"{gap[key][0]:.4g} ± {gap[key][1]:.2g}"  # noqa: E731
    bias = results["trajectory"][-1]["shared_alignment_bias"]
    a = results["audit"]
    kl = a["kl_per_frame"]
    cv, vits = kl["control_variate"], kl["vits"]
    audit = (f" In the audit ({a['particles']} draws of each of {a['utterances']} held-out utterances) two draws "
             f"of the same utterance align {a['alignment_agreement']:.1%} of frames to the same token; the "
             f"control variate, whose zero-mean correction assumes a fixed alignment, gives "
             f"{cv['mean']:.4g} ± {cv['mcse']:.2g} against `vits`'s {vits['mean']:.4g} ± {vits['mcse']:.2g} and "
             f"`mc`'s {kl['mc']['mean']:.4g} ± {kl['mc']['mcse']:.2g} nats per frame (difference from `vits` "
             f"{cv['mean'] - vits['mean']:+.3g}).")
    return (f"On the held-out utterances `log q − log p` per frame is {cell('mas')} with VITS's per-draw MAS "
            f"alignment, {cell('fixed')} with the alignment MAS picks on the posterior mean, and "
            f"{cell('marginal')} against the uniform mixture over monotonic alignments (its excess over VITS's "
            f"term, {cell('marginal_minus_mas')}, is bounded by log #A = {gap['log_count']:.3g} per frame). Scoring "
            f"extra KL draws with the first draw's alignment raises the `vits` estimate by {bias[0]:.3g} ± "
            f"{bias[1]:.2g} nats per frame." + audit)


def _fix_sentence(name: str, stats: Mapping[str, Mapping[str, float]]) -> str:
    words = []
    for key, label in (("sigma_ratio_median", "median σ_q/σ_p"), ("kl_per_frame", "KL/frame"),
                       ("mel_l1", "mel L1")):
        s = stats[key]
        words.append(f"{label} {s['mean']:+.3g} ± {s['half_width']:.2g}{'' if _differs(s) else ' (n.s.)'}")
    return f"`{name}`: " + ", ".join(words)


def findings(results: Mapping[str, Any], bench: Mapping[str, Any] | None) -> dict[str, str]:
    """The page's answers, each computed from ``results`` (and the generator-step benchmark ``bench``)."""
    cfg, fx = results["config"], results["fixes"]
    paired = "; ".join(_fix_sentence(n, s) for n, s in fx["paired"].items())
    fixes = (f"Each fine-tuned {cfg['fix_steps']} steps from the refit (lr {cfg['fix_lr']:g}, batch "
             f"{cfg['batch_size']}, seeds {', '.join(map(str, cfg['seeds']))}), paired against `vits` fine-tuned "
             f"the same way (mean ± 95 % t half-width over seeds; n.s.: the interval contains 0): {paired}. "
             f"Theory for the element-wise `abs` at its optimum: σ_q/σ_p = e^−½ = {math.exp(-0.5):.3f}.")
    answers = {"Where σ_q/σ_p and KL/frame settle": _settle(results),
               "Does the logged KL go negative?": _negative(results),
               "What monotonic alignment does to the term": _mas(results),
               "What each fix does": fixes}
    if bench:
        r = bench["ratios"]
        answers["What K KL particles cost"] = (
            f"In VITS's generator step without the discriminator (enc_q, flow, MAS, HiFi-GAN on {bench['batch']} × "
            f"{bench['segment_frames']}-frame segments, mel L1, KL; one CPU thread, the `generator_step` entry of "
            f"benchmarks/results/cpu.json) K = 2, 4, 8 KL particles cost {r['kl_k2']['median']:.2f}×, "
            f"{r['kl_k4']['median']:.2f}×, {r['kl_k8']['median']:.2f}× a K = 1 step. MAS is "
            f"{bench['mas_fraction_of_k1']:.1%} of a K = 1 step per particle, so reusing the first draw's "
            f"alignment saves little ({r['shared_k8']['median']:.2f}× at K = 8): the cost is each particle's "
            f"pass through the flow and back.")
    return answers

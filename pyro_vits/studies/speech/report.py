"""The speech study page: tables, cost ratios and findings rendered from the per-run records."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...kl import format_negative_count, prob_negative_upper_bound
from ...models.speech import LIKELIHOODS
from .variants import (
    cost_ratios,
    paired_difference,
    summarise,
    t_interval,
)

logger = logging.getLogger("pyro_vits")


LABELS = {"heldout_elbo_per_frame": "held-out ELBO (nats/frame)",
          "heldout_kl_per_frame": "held-out KL (nats/frame)",
          "heldout_recon_db": "reconstruction error (dB RMS)",
          "heldout_mel_l1": "mel L1 (log-mel, mean over bins and frames)",
          "prob_negative_kl": "P(logged KL < 0)",
          "s_per_step": "s / step",
          "cpu_s_per_step": "CPU s / step"}


KEYS = tuple(LABELS)

DELTAS = {"heldout_elbo_per_frame": "Δ held-out ELBO", "heldout_kl_per_frame": "Δ held-out KL",
          "heldout_recon_db": "Δ reconstruction error (dB)", "heldout_mel_l1": "Δ mel L1"}
"""The measures paired with ``vits`` by seed (those the runs have), with their column headers."""

RECONSTRUCTION_NOTES = {
    "gaussian-linear": "reconstruction error: RMS in dB of `dec(m_q)` against the log-magnitude spectrogram",
    "laplace-mel": "mel L1: mean |`dec(m_q)` − log-mel| over the 80 mel bins and valid frames, in log-mel "
                   "units (VITS's `l1_loss(y_mel, y_hat_mel)`, with `dec(m_q)` for the vocoded `y_hat`)",
}
"""How the page describes the reconstruction measure of each likelihood."""


def _cell(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:.4g} ± {stat['half_width']:.2g}"


def _difference_cell(stat: Mapping[str, float]) -> str:
    """A paired difference; ``0 (identical)`` when every seed's difference is exactly 0."""
    if stat["mean"] == 0 and stat["half_width"] == 0:
        return "0 (identical)"
    return _cell(stat) + (" *" if abs(stat["mean"]) > stat["half_width"] else "")


def _budget(run: Mapping[str, Any]) -> str:
    return run.get("budget", "steps")


def comparisons(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The runs of each comparison: ``"steps"`` (every variant, the same steps) and, when the study has
    equal-compute runs, ``"compute"`` (those runs in place of their variant's equal-steps runs)."""
    steps = [r for r in runs if _budget(r) == "steps"]
    retrained = [r for r in runs if _budget(r) == "compute"]
    out = {"steps": steps}
    if retrained:
        names = {r["variant"] for r in retrained}
        out["compute"] = [r for r in steps if r["variant"] not in names] + retrained
    return out


def _keys(runs: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(k for k in KEYS if all(k in r for r in runs))


def negative_counts(runs: Sequence[Mapping[str, Any]], batches: int, equal_compute_apart: bool = False
                    ) -> dict[str, tuple[int, int]]:
    """Per variant, the minibatches whose logged KL was negative, pooled over its runs (seeds), and how many
    were drawn: ``{variant: (count, total)}`` from each run's ``prob_negative_kl`` over ``batches``. With
    ``equal_compute_apart`` a variant's equal-compute runs count apart (``"<variant> at equal compute"``)."""
    out: dict[str, tuple[int, int]] = {}
    for r in runs:
        name = r["variant"] + (" at equal compute" if equal_compute_apart and _budget(r) == "compute" else "")
        count, total = out.get(name, (0, 0))
        out[name] = (count + round(r["prob_negative_kl"] * batches), total + batches)
    return out


def _tables(runs: Sequence[Mapping[str, Any]], batches: int) -> list[str]:
    """The variants' table (with their steps; P(logged KL < 0) as negative minibatches / minibatches drawn,
    pooled over seeds, ``batches`` per run) and their differences from ``vits`` paired by seed."""
    keys = _keys(runs)
    table = summarise(runs, keys)
    counts = negative_counts(runs, batches)
    steps = {v: sorted({r["steps"] for r in runs if r["variant"] == v}) for v in table}

    def cell(v: str, k: str) -> str:
        return format_negative_count(*counts[v]) if k == "prob_negative_kl" else _cell(table[v][k])

    lines = ["| variant | steps | " + " | ".join(LABELS[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {v} | {'/'.join(map(str, steps[v]))} | " + " | ".join(cell(v, k) for k in keys) + " |"
              for v in table]
    deltas = [k for k in DELTAS if k in keys]
    lines += ["", "Difference from `vits`, paired by seed (95 % t-interval; * where it excludes 0):", "",
              "| variant | " + " | ".join(DELTAS[k] for k in deltas) + " |", "|---" * (len(deltas) + 1) + "|"]
    for v in (v for v in table if v != "vits" and "vits" in table):
        cells = [_difference_cell(paired_difference(runs, key, v)) for key in deltas]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + [""]


def _took(setup: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The command's wall time, how many runs it reused from an earlier invocation, and the runs' total
    training time."""
    if "wall_s" not in setup:
        return ""
    reused = setup.get("reused", 0)
    wall = setup["wall_s"]
    text = f", {wall / 60:.1f} min" if wall >= 60 else f", {wall:.0f} s"
    text += " wall time on a shared 2-core CPU"
    if reused:
        text += f", {reused} of the {len(runs)} runs reused from the study folder"
    if all("cpu_s" in r for r in runs):
        text += (f"; the {len(runs)} runs' training took {sum(r['cpu_s'] for r in runs) / 60:.1f} CPU-min, "
                 f"{sum(r['wall_s'] for r in runs) / 60:.1f} min of wall time summed over runs")
    return text


def _likelihood(setup: Mapping[str, Any]) -> str:
    """The study's likelihood (studies from before the option: ``gaussian-linear``)."""
    return setup.get("likelihood", "gaussian-linear")


def _header(setup: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    corpus = setup["corpus"]
    used = (f"{corpus['hours_used']:.2f} h of audio" if "hours_used" in corpus
            else "hours of audio used not recorded")
    return [
        "# The KL-loss variants on speech", "",
        f"Generated by `{setup['command']}` ({setup['utc']}" + _took(setup, runs) + "); numbers are means over "
        f"{len(setup['seeds'])} seeds ± the half-width of the 95 % Student-t interval over seeds.", "",
        f"Corpus: {corpus['train']} training / {corpus['heldout']} held-out utterances ({used}) of "
        f"`{corpus['folder']}` (the whole folder: {corpus['description']}). Model: the CPU preset of "
        f"`pyro_vits.apps.fit_speech` ({setup['sizes']}), minibatches of {setup['batch_size']} "
        "utterances, the same seed (initialisation, minibatches, noise) for every variant. The variants "
        "differ only in the KL term of the loss (see `pyro_vits.studies.speech.variants`)."
        + (f" Code: {setup['code']}." if setup.get("code") else ""), "",
        f"Likelihood `{_likelihood(setup)}` (`pyro_vits.models.speech`): {LIKELIHOODS[_likelihood(setup)]}; "
        "the held-out ELBO includes this log-likelihood (it is not comparable across likelihoods).", "",
    ]


def _costs(runs: Sequence[Mapping[str, Any]], setup: Mapping[str, Any]) -> list[str]:
    """The per-step cost ratios measured in the equal-steps runs and the equal-compute rule."""
    if not any(r["variant"] == "vits" for r in runs):
        return []
    key = "cpu_s_per_step" if all("cpu_s_per_step" in r for r in runs) else "s_per_step"
    unit = "CPU seconds" if key == "cpu_s_per_step" else "wall seconds"
    ratios = cost_ratios(runs, key)
    cells = ", ".join(f"`{v}` {_cell(r)}" for v, r in ratios.items() if v != "vits")
    lines = [f"Cost per step over `vits`'s, measured in these equal-steps runs ({unit} of training per step, "
             f"paired by seed, 95 % t-interval): {cells}."]
    retrained = setup.get("equal_compute", [])
    if retrained:
        lines[0] += (f" Equal compute: every variant gets the compute of {setup['steps']} steps of `vits`; "
                     + ", ".join(f"`{v}`" for v in retrained) + f" {'is' if len(retrained) == 1 else 'are'} "
                     "retrained for round(steps / ratio) steps with the ratio's mean above"
                     + (" (the variants whose ratio's interval excludes 1)" if setup.get("equal_compute_rule")
                        == "auto" else "") + "; the other variants' equal-steps runs stand for them.")
    elif setup.get("equal_compute_rule") == "auto":
        lines[0] += (" Equal compute: no variant's ratio interval excludes 1, so the equal-steps runs are the "
                     "equal-compute comparison within what this run can resolve.")
    return lines + [""]


def _verdict(runs: Sequence[Mapping[str, Any]], v: str, label: str = "") -> str:
    """One variant's held-out ELBO and KL against ``vits``'s, paired by seed, in words."""
    elbo = paired_difference(runs, "heldout_elbo_per_frame", v)
    kl = paired_difference(runs, "heldout_kl_per_frame", v)
    resolved = abs(elbo["mean"]) > elbo["half_width"]
    verdict = "differs from `vits`" if resolved else "is not distinguishable from `vits` here"
    if elbo["mean"] == elbo["half_width"] == kl["mean"] == 0:
        verdict = "is identical to `vits`, run for run"
    return (f"- `{v}`{label}: held-out ELBO {verdict} ({elbo['mean']:+.3g} ± {elbo['half_width']:.2g} "
            f"nats/frame); held-out KL {kl['mean']:+.3g} ± {kl['half_width']:.2g} nats/frame.")


def _negative_finding(runs: Sequence[Mapping[str, Any]], batches: int, batch_size: int) -> str:
    """P(logged KL < 0) at the end of training as pooled counts per variant, with a 95 % upper bound."""
    counts = negative_counts(runs, batches, equal_compute_apart=True)
    text = (f"- At the end of training the logged one-draw VITS KL of a minibatch of {batch_size} utterances "
            f"({batches} minibatches per run, pooled over each variant's seeds) was ")
    if any(count for count, _ in counts.values()):
        cells = (f"`{v}` {format_negative_count(*c)}" for v, c in counts.items())
        return text + "negative in " + ", ".join(cells) + "."
    totals = {total for _, total in counts.values()}
    fewest = min(totals)
    bound = prob_negative_upper_bound(0, fewest)
    return text + (f"never negative: 0 of {'' if len(totals) == 1 else 'at least '}{fewest} minibatches per "
                   f"variant, so P(negative) ≤ "
                   f"{bound:.2g} for each (95 % upper bound, 1 − 0.05^(1/{fewest})); a zero count is not a "
                   "zero probability.")


def _compute_verdicts(compute: Sequence[Mapping[str, Any]], steps: int) -> list[str]:
    """Each retrained variant at equal compute, with the steps it got: a shorter run of an unconverged model
    mostly measures the missing steps."""
    lines = []
    for v in dict.fromkeys(r["variant"] for r in compute if _budget(r) == "compute"):
        own = sorted({r["steps"] for r in compute if r["variant"] == v})
        lines.append(_verdict(compute, v, " at equal compute")[:-1] + f" — with {'/'.join(map(str, own))} "
                     f"steps against `vits`'s {steps}, early in a training that has not converged, so this "
                     "difference mostly measures the missing steps, not what the particles buy.")
    return lines


def _findings(runs: Sequence[Mapping[str, Any]], setup: Mapping[str, Any],
              compute: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Sentences read off the numbers (no judgement that the numbers do not carry): ``runs`` the equal-steps
    comparison, ``compute`` the equal-compute one (or nothing)."""
    table = summarise(runs, KEYS[:2])
    lines = ["## What the numbers say", ""]
    patched = [r for r in runs if r["variant"] in ("clamp", "abs")]
    if patched:
        negative = sum(r["training_steps_kl_negative"] for r in patched)
        total = sum(r["steps"] for r in patched)
        lines.append(f"- The unpatched one-draw minibatch KL was negative on {negative} of {total} training "
                     "steps of the `clamp`/`abs` runs" + (": they never acted, so these runs train "
                     "exactly as `vits` does." if negative == 0 else "."))
    every = list({id(r): r for r in [*runs, *compute]}.values())
    lines.append(_negative_finding(every, setup["negative_batches"], setup["batch_size"]))
    for v in (v for v in table if v != "vits" and "vits" in table):
        lines.append(_verdict(runs, v))
    lines += _compute_verdicts(compute, setup["steps"])
    if "vits" in table:
        kl = table["vits"]["heldout_kl_per_frame"]["mean"]
        lines.append(f"- Scope: {kl:.3g} nats/frame of KL here, short training and a small latent (see the "
                     "sizes above), far from a converged VITS; what `clamp`/`abs` do where the logged KL "
                     "does go negative is not measured here.")
    return lines + [""]


def _stat(values: Sequence[float]) -> dict[str, float]:
    return t_interval(values) if len(values) > 1 else dict(mean=values[0], half_width=math.nan)


def regime_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Over the ``vits`` runs (equal steps) that recorded them: the held-out KL per frame at each logged step
    and Q10's alignment gap fields at the end, each the mean over seeds with its 95 % t half-width
    (``{"steps", "kl_per_frame", "alignment_gap", "seeds"}``); None when no run recorded them."""
    mine = [r for r in runs if r["variant"] == "vits" and r.get("budget", "steps") == "steps"
            and r.get("kl_trajectory") and r.get("heldout_alignment_gap")]
    if not mine:
        return None
    steps = [s for s, _ in mine[0]["kl_trajectory"]]
    return dict(seeds=len(mine), steps=steps,
                kl_per_frame=[_stat([r["kl_trajectory"][i][1] for r in mine]) for i in range(len(steps))],
                alignment_gap={k: _stat([r["heldout_alignment_gap"][k][0] for r in mine])
                               for k in ("mas", "fixed", "marginal", "marginal_minus_mas", "fixed_minus_mas")})


def _regime(summary: Mapping[str, Any] | None) -> list[str]:
    """The page's section on :func:`regime_summary` (empty without one)."""
    if summary is None:
        return []
    gap = summary["alignment_gap"]
    return ["## The KL regime of `vits` and what monotonic alignment does to it", "",
            f"Held-out KL per frame through training (mean over {summary['seeds']} seeds ± the 95 % t "
            "half-width):", "",
            "| step | " + " | ".join(map(str, summary["steps"])) + " |", "|---" * (len(summary["steps"]) + 1) + "|",
            "| KL (nats/frame) | " + " | ".join(_cell(c) for c in summary["kl_per_frame"]) + " |", "",
            f"`log q − log p` per held-out frame at the end (Q10 of kl_estimators.md; mean over seeds of each "
            f"run's Monte-Carlo mean): per-draw MAS (VITS's term) {_cell(gap['mas'])}, the posterior mean's "
            f"alignment {_cell(gap['fixed'])}, the uniform mixture over alignments {_cell(gap['marginal'])}; "
            f"mixture − VITS {_cell(gap['marginal_minus_mas'])}.", ""]


def render(results: Mapping[str, Any]) -> str:
    """``docs/speech_study.md`` from ``results.json``'s content."""
    runs, setup = results["runs"], results["setup"]
    groups = comparisons(runs)
    batches = setup["negative_batches"]
    lines = _header(setup, runs) + [f"## Equal steps ({setup['steps']} steps)", ""]
    lines += _tables(groups["steps"], batches) + _costs(groups["steps"], setup)
    if "compute" in groups:
        lines += [f"## Equal compute (the compute of {setup['steps']} steps of `vits`)", ""]
        lines += _tables(groups["compute"], batches)
    lines += _findings(groups["steps"], setup, groups.get("compute", ()))
    lines += _regime(results.get("regime"))
    lines += [f"Held-out ELBO and KL: {setup['eval_samples']} guide draws per utterance "
              f"(`pyro_vits.infer.evaluate`); {RECONSTRUCTION_NOTES[_likelihood(setup)]}; "
              f"P(logged KL < 0): how many of {batches} training minibatches of {setup['batch_size']} "
              "utterances per run, pooled over the variant's seeds, have a negative one-draw VITS KL "
              "(`-H(q) - log p(z)`, per frame) at the end of training, with a 95 % upper bound when none "
              "has; "
              "s / step: wall time of the run's training (its one final logging evaluation included) over its "
              "steps, on a shared CPU; CPU s / step: the CPU time of the same, the cost the ratios use.", ""]
    return "\n".join(lines)

"""Settle VITS's KL-loss questions by measurement: one- vs multi-sample KL estimators, ArviZ diagnostics.

Runs :func:`pyro_vits.study.run_study`: estimator bias/sd/P(<0) against quadrature and large-sample ground
truths, P(batch-mean KL < 0) against batch size, the hybrid-vs-MC variance ratio over sigma_q / sigma_p,
what clamp()/abs() do to the loss and its gradient, training at equal compute (K x steps) for K = 1..16,
VP vs NVP couplings, gradient SNR against K, PSIS k-hat of the guide. Writes ``results.json``,
``netcdf/*.nc`` (InferenceData, seeds as chains), ``tables/*.{csv,md}`` (az.summary), ``figures/*.png``.

    python examples/compare_kl_estimators.py --preset quick           # < 1 min on one CPU core
    python examples/compare_kl_estimators.py --preset docs --docs docs  # the docs/ numbers (make docs)
    python examples/compare_kl_estimators.py --preset docs --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from pyro_vits.study import PRESETS, publish_docs, run_study
from pyro_vits.train import resolve_device


def headline(results: dict[str, Any]) -> str:
    """A few of the numbers, with their MCSE / SE and normalisation."""
    quality, runs = results["quality"], results["training"]["runs"]
    lines = ["KL estimators at fixed parameters (nats per frame, K = 1; bias ± MCSE):"]
    for setting, r in quality.items():
        vits, closed = r["estimators"]["vits"]["1"], r["estimators"]["gaussian_closed_form"]
        lines.append(f"  {setting:11s} truth {r['truth']:9.4f}  vits bias {vits['bias']:+.4f} ± "
                     f"{vits['bias_mcse']:.4f}  P(<0) {vits['p_negative']:.3f}  "
                     f"Gaussian closed-form error {closed['bias']:+.4f}")
    clamp, abs_ = results["fix_gradient"]["clamp"], results["fix_gradient"]["abs"]
    lines.append(f"clamp / abs near convergence: loss bias {clamp['loss_bias']:+.4f} / "
                 f"{abs_['loss_bias']:+.4f} "
                 f"nats per frame; gradient projection on the true gradient "
                 f"{clamp['projection']:.2f} / {abs_['projection']:.2f} (1 = unbiased)")
    lines.append("training at equal compute (held-out, nats per frame, mean ± SE over seeds):")
    for name, run in runs.items():
        final = run["final"]
        elbo, loglik = final["heldout_elbo_per_frame"], final["heldout_loglik_iwae_per_frame"]
        lines.append(f"  {name:8s} ELBO {elbo['mean']:8.3f} ± {elbo['se']:.3f}  "
                     f"IWAE log p(x) {loglik['mean']:8.3f}"
                     f"  KL(p_teacher || p) {final['prior_kl_to_teacher_per_frame']['mean']:.3f}"
                     f"  SVI {final['svi_wall_s']['mean']:.1f} s")
    teacher = results["training"]["teacher_heldout_loglik_per_frame"]
    lines.append(f"teacher's exact held-out log p(x): {teacher:.3f}")
    lines.append(f"wall time: {results['wall_s']['total']:.0f} s on {results['device']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study; returns its results (as written to ``<out>/results.json``)."""
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset].with_seed(args.seed)
    out = Path(args.out or Path("runs") / f"kl-study-{args.preset}")
    results = run_study(config, out, device=resolve_device(args.device))
    print(headline(results))
    print(f"wrote {out}")
    if args.docs:
        print(f"rendered {publish_docs(out, args.docs)}")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: < 1 min on one CPU core; docs: the documentation's numbers")
    parser.add_argument("--device", default="cpu", help="cpu (reproducible), cuda, cuda:<i> or auto")
    parser.add_argument("--out", default=None, help="output folder (default runs/kl-study-<preset>)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; the preset's seeds count up from it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the tensors are small: 1 is fastest on a busy machine)")
    parser.add_argument("--docs", default=None,
                        help="also publish results.json, figures and tables into this folder and render "
                             "its kl_estimators.template.md into kl_estimators.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

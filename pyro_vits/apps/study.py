"""``pyro-vits study``: run the KL-estimator study and optionally publish the docs page.

    pyro-vits study --preset test --out D          # seconds
    pyro-vits study --preset quick                  # about a minute on one CPU core
    pyro-vits study --preset docs --docs docs       # the docs/ numbers (make docs)
    pyro-vits study --config study.toml             # [study] keys (TOML or JSON) override a preset
    pyro-vits study --render-only --docs docs       # re-render docs/ from docs/results.json (~1 min)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..studies.kl.config import PRESETS, load_config
from ..studies.kl.report import publish_docs, refresh_docs, run_study
from ..train import resolve_device

__all__ = ["build_parser", "main", "run", "headline"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="test: seconds; quick: ~1 min on one CPU core; docs: the documentation's numbers")
    parser.add_argument("--config", default=None,
                        help="TOML or JSON file whose ([study]) keys override the preset's sizes "
                             "(a 'preset' key picks the preset)")
    parser.add_argument("--device", default="cpu", help="cpu (reproducible), cuda, cuda:<i> or auto")
    parser.add_argument("--out", default=None, help="output folder (default runs/kl-study-<preset>)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; the preset's seeds count up from it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the tensors are small: 1 is fastest on a busy machine)")
    parser.add_argument("--docs", default=None,
                        help="also publish results.json, figures and tables into this folder and render "
                             "its kl_estimators.template.md into kl_estimators.md")
    parser.add_argument("--render-only", action="store_true",
                        help="with --docs: no full study; rerun only its cheap parts on the config of "
                             "<docs>/results.json (pyro_vits.studies.kl.refresh_docs) and re-render the page")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks for errors")
    return parser


def headline(results: dict[str, Any]) -> str:
    """A few of the numbers, with their MCSE / SE and normalisation."""
    lines = ["KL estimators at fixed parameters (nats per frame, K = 1; bias ± MCSE):"]
    for setting, r in results["quality"].items():
        vits, closed = r["estimators"]["vits"]["1"], r["estimators"]["gaussian_closed_form"]
        cv = r["estimators"]["control_variate"]["1"]
        lines.append(f"  {setting:12s} truth {r['truth']:9.4f}  vits bias {vits['bias']:+.4f} ± "
                     f"{vits['bias_mcse']:.4f}  sd vits/cv {vits['sd']:.3f}/{cv['sd']:.3f}  "
                     f"P(vits<0) {vits['p_negative']:.3f}  closed-form error {closed['bias']:+.4f}")
    fix = results["fix_gradient"]
    lines.append("near convergence, loss bias (nats/frame) / gradient projection: " + ", ".join(
        f"{name} {fix[name]['loss_bias']:+.3f}/{fix[name]['projection']:.2f}"
        for name in ("clamp", "abs", "abs_elementwise")))
    lines.append("training (held-out ELBO at early stopping, nats/frame, mean ± 95 % t-interval over seeds):")
    for name, run in results["training"]["runs"].items():
        es = run["final"]["early_stop_heldout_elbo_per_frame"]
        lines.append(f"  {name:20s} {es['mean']:8.3f} ± {es['ci95']:.3f}")
    lines.append(f"wall time: {results['wall_s']['total']:.0f} s on {results['device']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` the study; returns the exit code."""
    return run(build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv)))


def run(args: argparse.Namespace) -> int:
    """Run the study for parsed arguments (:func:`build_parser`); user errors (a bad preset/config/device,
    a missing docs template) are raised, not printed."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    config = load_config(args.config, PRESETS[args.preset]) if args.config else PRESETS[args.preset]
    config = config.with_seed(args.seed)
    device = resolve_device(args.device)
    if args.docs and not (Path(args.docs) / "kl_estimators.template.md").is_file():
        raise FileNotFoundError(f"--docs {args.docs} holds no kl_estimators.template.md")
    torch.set_num_threads(args.threads)
    if args.render_only:
        if not args.docs:
            raise ValueError("--render-only needs --docs (the folder with results.json and the template)")
        print(f"rendered {refresh_docs(args.docs)}")
        return 0
    out = Path(args.out or Path("runs") / f"kl-study-{config.name}")
    results = run_study(config, out, device=device)
    print(headline(results))
    print(f"wrote {out}")
    if args.docs:
        print(f"rendered {publish_docs(out, args.docs)}")
    return 0


if __name__ == "__main__":
    from . import run_main

    raise SystemExit(run_main(main, prog="pyro-vits study"))

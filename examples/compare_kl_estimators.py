"""Compare one-sample KL estimators of VITS's loss, then run the whole study.

A short tour of :mod:`pyro_vits.kl.estimators` on the cos-flow prior (unit Jacobian, not Gaussian): the hybrid
``vits`` estimator, full Monte Carlo ``mc``, the ``control_variate`` one, the element-wise ``abs`` patch and
``k3``: their mean against the quadrature truth, their spread and how often they are negative. Then
:mod:`pyro_vits.studies.kl` (the docs' numbers; ``pyro-vits study`` has every option):

    python examples/compare_kl_estimators.py --preset test               # seconds
    python examples/compare_kl_estimators.py --preset docs --docs docs   # what make docs runs
"""

from __future__ import annotations

import argparse

import torch

from pyro_vits.apps import run_main
from pyro_vits.cli import positive_int
from pyro_vits.distributions import CosFlowPrior, MaskedNormal
from pyro_vits.kl import quadrature_kl_2d, sample_kl_estimates
from pyro_vits.studies.kl import PRESETS, publish_docs, run_study

NAMES = ("vits", "mc", "control_variate", "abs_elementwise", "k3")


def tour(num_samples: int) -> None:
    """Print mean ± MCSE, sd and P(< 0) of each estimator against the quadrature KL (nats)."""
    zero = torch.zeros(2, 1, dtype=torch.float64)
    m_q = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    logs_q = torch.tensor([[0.8], [0.6]], dtype=torch.float64).log()
    prior = CosFlowPrior(zero, zero, a=1.0)
    truth, _ = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior)
    draws = sample_kl_estimates(NAMES, m_q, logs_q, prior, num_samples, seed=0)
    print(f"KL(q || p) by quadrature: {truth:.4f} nats")
    for name, x in draws.items():
        print(f"  {name:16s} mean {x.mean():.4f} ± {x.std() / num_samples ** 0.5:.4f}  sd {x.std():.3f}  "
              f"P(<0) {(x < 0).double().mean():.3f}")


def main(args: argparse.Namespace) -> int:
    tour(args.tour_samples)
    out = args.out or f"runs/kl-study-{args.preset}"
    run_study(PRESETS[args.preset].with_seed(args.seed), out)
    if args.docs:
        print(f"rendered {publish_docs(out, args.docs)}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="test: seconds; docs: the docs")
    parser.add_argument("--out", default=None, help="output folder (default runs/kl-study-<preset>)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--docs", default=None, help="also publish the results into this docs folder")
    parser.add_argument("--tour-samples", type=positive_int, default=20000, help="draws per estimator in the tour")
    return parser.parse_args(argv)


if __name__ == "__main__":  # every user error: one line on stderr, exit code 2
    raise SystemExit(run_main(lambda argv: main(parse_args(argv)), prog="compare_kl_estimators.py"))

#!/usr/bin/env python
"""The committed benchmark numbers: ``pyro-vits bench`` writing into ``benchmarks/results/``.

    python benchmarks/run.py --device cpu --threads 1 --profile   # benchmarks/results/cpu.json
    python benchmarks/run.py --device cuda --profile              # benchmarks/results/<card name>.json
    python benchmarks/run.py --quick                              # tiny sizes, seconds (checks the machinery)

Every option is ``pyro-vits bench``'s (``--help``); ``--out``/``--out-dir`` override the destination. Needs
the ``pyro_vits`` package importable (installed, or ``PYTHONPATH=.`` in a checkout).
"""

import sys
from pathlib import Path

from pyro_vits.apps import run_main
from pyro_vits.apps.bench import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.split("=")[0] in ("--out", "--out-dir") for a in argv):
        argv += ["--out-dir", str(RESULTS)]
    sys.exit(run_main(main, argv, prog="benchmarks/run.py"))

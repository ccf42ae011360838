"""Small builders shared by the bad-input tests (each in the test file of the module it checks): a tiny
prior/encoder pair, a two-step fit, a ``Batch`` with some fields changed, and the ``pyro-vits fit`` exit-2
check. The tiny teacher data set is the ``small_data`` fixture of ``conftest.py``."""

from __future__ import annotations

import pytest
import torch
from fit_helpers import fit_with

from pyro_vits import cli
from pyro_vits.data.batch import Batch
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset

C, T, N, HIDDEN = 4, 8, 6, 8
NO_CUDA = "device='cuda' but CUDA is not available (use 'cpu' or 'auto')"


def small_dataset():
    return sample_dataset(make_teacher(C, HIDDEN, 3, n_layers=1, n_flows=2, seed=0), N, T, seed=1)


def build():
    torch.manual_seed(0)
    return VITSPriorModel(C, HIDDEN, 3, n_layers=1, n_flows=2), PosteriorEncoder(C, C, HIDDEN, 3, n_layers=1)


def quick_fit(data, **kwargs):
    return fit_with(*build(), data, **dict(dict(steps=2, device="cpu", progress=False, eval_samples=2), **kwargs))


def fields(d, **changes):
    values = dict(x=d.x, m_p=d.m_p, logs_p=d.logs_p, mask=d.mask, lengths=d.lengths)
    return Batch(**dict(values, **changes))


def cli_error(capsys, *argv: str) -> str:
    """Run ``pyro-vits fit ARGV`` expecting exit code 2; returns stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def vits_state(block: ResidualCouplingBlock) -> dict[str, torch.Tensor]:
    return {f"flow.{k}": v for k, v in block.state_dict().items()}

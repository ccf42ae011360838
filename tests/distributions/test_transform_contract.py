"""One contract for every ``torch.distributions.Transform`` the package defines (found by walking the
package, so a new Transform without a case here fails): inverse both ways, the autograd Jacobian's
log-determinant against ``log_abs_det_jacobian``, shapes, leading dims, and masks (padded frames do not
reach the valid outputs or the log-determinant)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import pytest
import torch
from torch.distributions import Transform

import pyro_vits
from pyro_vits.distributions import CosFlow, FlowTransform
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.flows.transformer import ResidualCouplingTransformersBlock, TransformerCouplingBlock

pytestmark = pytest.mark.usefixtures("single_thread")
D64 = torch.float64
C, T = 4, 5


def _package_transforms() -> set[type]:
    def unimportable(name: str) -> None:  # walk_packages would otherwise skip a package that fails to import
        pytest.fail(f"{name} does not import, so its Transforms cannot be checked")

    found = set()
    for info in pkgutil.walk_packages(pyro_vits.__path__, "pyro_vits.", onerror=unimportable):
        try:
            module = importlib.import_module(info.name)
        except ImportError as error:  # a module that does not import hides its Transforms: fail, not skip
            pytest.fail(f"{info.name} does not import ({error!r}), so its Transforms cannot be checked")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Transform) and obj.__module__.startswith("pyro_vits"):
                found.add(obj)
    return found


def _randomised(block: ResidualCouplingBlock) -> ResidualCouplingBlock:
    """``block`` in float64, eval mode, with random non-zero ``post`` layers (VITS zero-initialises them)."""
    block = block.double().eval()
    with torch.no_grad():
        for name, param in block.named_parameters():
            if ".post." in f".{name}":
                param.normal_(0.0, 0.3 if name.endswith("weight") else 0.1)
    return block


def _block(mean_only: bool, gin: int = 0) -> ResidualCouplingBlock:
    torch.manual_seed(1)
    return _randomised(ResidualCouplingBlock(C, 6, 3, 1, 2, n_flows=2, gin_channels=gin, mean_only=mean_only))


def _vits2_block() -> ResidualCouplingBlock:
    torch.manual_seed(2)
    return _randomised(ResidualCouplingTransformersBlock(C, 6, 3, 1, 2, n_flows=2, transformer_flow_type="pre_conv"))


def _bert_vits2_block() -> ResidualCouplingBlock:
    torch.manual_seed(3)
    return _randomised(TransformerCouplingBlock(C, 4, 8, 2, 1, 3, n_flows=2, mean_only=False))


def _mask(lengths: list[int]) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(D64)[:, None, :]  # (B, 1, T)


# name -> (make(mask or None) -> transform, channels)
CASES: dict[str, tuple[Callable[[torch.Tensor | None], Transform], int]] = {
    "flow_mean_only": (lambda mask: FlowTransform(_block(True), mask), C),
    "flow_affine": (lambda mask: FlowTransform(_block(False), mask), C),
    "flow_affine_speaker": (lambda mask: FlowTransform(
        _block(False, gin=3), mask, torch.linspace(-1, 1, 3 * 2, dtype=D64).reshape(2, 3, 1)), C),
    "flow_vits2_pre_conv": (lambda mask: FlowTransform(_vits2_block(), mask), C),
    "flow_bert_vits2_affine": (lambda mask: FlowTransform(_bert_vits2_block(), mask), C),
    "cos_flow": (lambda mask: CosFlow(0.7, mask), 2),
}
COVERED = {FlowTransform, CosFlow}


def test_every_package_transform_has_a_contract_case():
    assert _package_transforms() <= COVERED, "add a CASES entry for each new Transform"


def _x(channels: int, lead: tuple[int, ...] = (2,), seed: int = 0) -> torch.Tensor:
    return torch.randn(lead + (channels, T), generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_inverse_shapes_and_leading_dims(name, masked):
    make, channels = CASES[name]
    mask = _mask([T, 3]) if masked else None
    t = make(mask)
    x = _x(channels, (3, 2))  # (S, B, C, T): particles x batch
    y = t(x)
    assert y.shape == x.shape and t.event_dim == 2 and t.bijective
    ldj = t.log_abs_det_jacobian(x, y)
    assert ldj.shape == (3, 2)
    full = torch.ones(2, 1, T, dtype=D64) if mask is None else mask
    torch.testing.assert_close(t.inv(y) * full, x * full, rtol=0, atol=1e-10)
    torch.testing.assert_close(t(t.inv(x)) * full, x * full, rtol=0, atol=1e-10)
    for s in range(3):  # leading dims are independent items
        torch.testing.assert_close(t(x[s]), y[s], rtol=0, atol=1e-12)
        torch.testing.assert_close(t.log_abs_det_jacobian(x[s], t(x[s])), ldj[s], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_autograd_jacobian_matches_log_abs_det_jacobian(name, masked):
    """``log|det|`` of the dense Jacobian of one item over its valid ``(C, T_valid)`` entries (padded
    frames form a separate block: valid outputs do not depend on them) equals the transform's value."""
    make, channels = CASES[name]
    mask = _mask([T, 3]) if masked else None
    t = make(mask)
    x = _x(channels, (2,), seed=3)
    ldj = t.log_abs_det_jacobian(x, t(x))
    for b in range(2):
        valid = T if mask is None else int(mask[b].sum())

        def item(v: torch.Tensor, b: int = b) -> torch.Tensor:
            batch = x.clone()
            batch[b] = v
            return t(batch)[b, :, :valid]

        jac = torch.autograd.functional.jacobian(item, x[b])[:, :, :, :valid]  # (C, Tv, C, Tv)
        logdet = torch.linalg.slogdet(jac.reshape(channels * valid, channels * valid))[1]
        torch.testing.assert_close(logdet, ldj[b], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_padded_frames_do_not_reach_valid_outputs_or_logdet(name):
    make, channels = CASES[name]
    mask = _mask([T, 3])
    t = make(mask)
    x = _x(channels, (2,), seed=5)
    y, ldj = t(x), t.log_abs_det_jacobian(x, t(x))
    x2 = x.clone()
    x2[1, :, 3:] = 1e3  # garbage in the padded frames of utterance 1
    y2 = t(x2)
    torch.testing.assert_close(y2 * mask, y * mask, rtol=0, atol=1e-10)
    torch.testing.assert_close(t.log_abs_det_jacobian(x2, y2), ldj, rtol=0, atol=1e-10)

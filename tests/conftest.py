"""Shared small fixtures: seeded VITS flows with non-zero random weights, and their inputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pyro_vits.distributions import FlowPrior
from pyro_vits.flows import ResidualCouplingBlock

C, HIDDEN, KERNEL, N_LAYERS, N_FLOWS, T, GIN = 4, 8, 3, 2, 3, 5, 3
LENGTHS = (5, 3)  # per-utterance valid lengths used by masked configurations (B = 2)


@dataclass(frozen=True)
class FlowConfig:
    mean_only: bool
    gin: int
    masked: bool

    @property
    def id(self) -> str:
        return f"{'mean' if self.mean_only else 'affine'}-gin{self.gin}-{'masked' if self.masked else 'full'}"


ALL_CONFIGS = [
    FlowConfig(mean_only, gin, masked)
    for mean_only in (True, False)
    for gin in (0, GIN)
    for masked in (False, True)
]
MASKED_CONFIGS = [cfg for cfg in ALL_CONFIGS if cfg.masked]


def randomize_(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Overwrite every parameter (weight-norm g/v, biases, the zero-initialised ``post``) with seeded
    non-zero Gaussian values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
            assert bool((p != 0).all())
    return module


def build_block(
    mean_only: bool = True,
    gin: int = 0,
    *,
    channels: int = C,
    hidden: int = HIDDEN,
    kernel_size: int = KERNEL,
    n_layers: int = N_LAYERS,
    n_flows: int = N_FLOWS,
    seed: int = 0,
    scale: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> ResidualCouplingBlock:
    block = ResidualCouplingBlock(
        channels, hidden, kernel_size, 1, n_layers, n_flows=n_flows, gin_channels=gin, mean_only=mean_only
    )
    return randomize_(block.to(dtype), seed, scale).eval()


def length_mask(lengths, t: int = T, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(B, 1, t)`` 0/1 mask with the given valid lengths."""
    return (torch.arange(t)[None, :] < torch.as_tensor(lengths)[:, None]).to(dtype).unsqueeze(1)


@dataclass
class FlowCase:
    """A configured block with matching batch inputs ``x (B, C, T)``, ``mask (B, 1, T)`` or None, ``g``."""

    cfg: FlowConfig
    block: ResidualCouplingBlock
    x: torch.Tensor
    mask: torch.Tensor | None
    g: torch.Tensor | None

    @property
    def full_mask(self) -> torch.Tensor:
        return self.mask if self.mask is not None else torch.ones_like(self.x[..., :1, :])

    def with_pads(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """``x`` with its padded frames replaced by fresh random values."""
        gen = torch.Generator().manual_seed(seed)
        noise = 3.0 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return torch.where(self.full_mask > 0, x, noise)


def make_case(cfg: FlowConfig, seed: int = 0, batch_shape=(len(LENGTHS),)) -> FlowCase:
    gen = torch.Generator().manual_seed(1000 + seed)
    block = build_block(cfg.mean_only, cfg.gin, seed=seed)
    x = torch.randn(tuple(batch_shape) + (C, T), generator=gen, dtype=torch.float64)
    mask = length_mask(LENGTHS) if cfg.masked else None
    g = torch.randn(len(LENGTHS), cfg.gin, 1, generator=gen, dtype=torch.float64) if cfg.gin else None
    if mask is not None:
        x = x * mask  # padded input frames start at 0, like VITS's masked posterior samples
    return FlowCase(cfg, block, x, mask, g)


@pytest.fixture(params=ALL_CONFIGS, ids=lambda cfg: cfg.id)
def flow_case(request) -> FlowCase:
    return make_case(request.param)


@pytest.fixture(params=MASKED_CONFIGS, ids=lambda cfg: cfg.id)
def masked_flow_case(request) -> FlowCase:
    return make_case(request.param)


@pytest.fixture
def make_block():
    """Factory ``make_block(mean_only, gin, **sizes) -> ResidualCouplingBlock`` (seeded, float64)."""
    return build_block


@pytest.fixture(name="make_case")
def make_case_fixture():
    """Factory ``make_case(FlowConfig, seed=0, batch_shape=(B,)) -> FlowCase``."""
    return make_case


@pytest.fixture(name="length_mask")
def length_mask_fixture():
    """Factory ``length_mask(lengths, t=T) -> (B, 1, t)`` float64 0/1 mask."""
    return length_mask


@pytest.fixture
def randomize():
    """``randomize(module, seed, scale=0.5)``: every parameter seeded, non-zero (in place; returns it)."""
    return randomize_


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: these tensors are tiny, and on a busy machine torch's thread
    pool costs ~10x the work itself. Opt in per module with ``pytestmark = pytest.mark.usefixtures(...)``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_normalised_2d(flow: nn.Module, g, *, half_width: float, points: int, min_reshape: float,
                         tol: float) -> None:
    """``FlowPrior`` of a C=2, T=1 ``flow`` (fixed ``m_p``, ``logs_p``): no mass on the border of the box
    ``[-half_width, half_width]^2``, the flow moves the log-density by more than ``min_reshape`` nats
    somewhere, and the trapezoid rule over ``points^2`` grid points integrates ``exp(log_prob)`` to 1 +- tol."""
    m_p = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    logs_p = torch.tensor([[-0.2], [0.1]], dtype=torch.float64)
    prior = FlowPrior(m_p, logs_p, flow, g=g)
    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2, 1)
    with torch.no_grad():
        log_p = prior.log_prob(z).reshape(len(grid), len(grid))
        base_log_p = prior.base_dist.log_prob(z).reshape(log_p.shape)
    density = log_p.exp()
    assert float(torch.cat([density[0], density[-1], density[:, 0], density[:, -1]]).max()) < 1e-6
    assert float((log_p - base_log_p).abs().max()) > min_reshape  # the flow reshapes the base density
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert abs(float(mass) - 1.0) < tol


@pytest.fixture(name="assert_normalised_2d")
def assert_normalised_2d_fixture():
    """``assert_normalised_2d(flow, g, *, half_width, points, min_reshape, tol)``: a C=2 flow prior
    integrates to one."""
    return assert_normalised_2d


@pytest.fixture(scope="module")
def small_data():
    """A tiny teacher data set (N=6 utterances, C=4 channels, T=8 frames; ``validation_helpers``)."""
    from validation_helpers import small_dataset

    return small_dataset()

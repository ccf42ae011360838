"""VITS2's five transformer flow types and Bert-VITS2's TransformerCouplingBlock against the reference.

Checkpoints are written in upstream's layout (``{"model": …, "iteration": …, "optimizer": …,
"learning_rate": …}``) with random non-zero weights (``post`` included) under upstream's key names by
``vits_reference.checkpoint_state``, saved, read back with :func:`read_vits_checkpoint` and compared with the
reference on variable-length masks with speaker conditioning.
"""

from __future__ import annotations

import pytest
import torch
from vits_reference import checkpoint_state, ref_flow, upstream_checkpoint

from pyro_vits.flows import (
    ResidualCouplingBlock,
    ResidualCouplingTransformersBlock,
    TransformerCouplingBlock,
)
from pyro_vits.vits import load_vits_flow, read_vits_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_FAMILIES = (
    "vits",
    "pre_conv",
    "pre_conv2",
    "fft",
    "mono_layer_inter_residual",
    "mono_layer_post_residual",
    "bert",
)
TRANSFORMER_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "vits")
HEADS = {"fft": 4}  # upstream: VITS2's fft flow gets the block's n_layers (4) as its head count; others 2


def load_kwargs(family):
    return {"transformer_flow_type": family} if family.startswith("mono") else {}


def batch(gin, channels=4, t=9, lengths=(9, 6), seed=11):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), channels, t, generator=gen, dtype=torch.float64)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).double().unsqueeze(1)
    g = torch.randn(len(lengths), gin, 1, generator=gen, dtype=torch.float64) if gin else None
    return x, mask, g


def cast(*tensors, dtype):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


@pytest.mark.parametrize("gin", [0, 3], ids=lambda g: f"gin{g}")
@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_saved_checkpoint_loads_and_matches_reference(family, gin, tmp_path):
    state = checkpoint_state(family, gin=gin, layout="weight_g" if gin else "parametrizations", seed=3)
    torch.save(upstream_checkpoint(state), tmp_path / "G_1000.pth")
    found = read_vits_checkpoint(tmp_path / "G_1000.pth", **load_kwargs(family))
    expected_type = TransformerCouplingBlock if family == "bert" else ResidualCouplingTransformersBlock
    assert type(found.flow) is expected_type and isinstance(found.flow, ResidualCouplingBlock)
    assert found.flow.gin_channels == gin and found.n_speakers == (3 if gin else 0)
    assert found.flow.mean_only == (family != "mono_layer_post_residual")
    flow64 = load_vits_flow(upstream_checkpoint(state), dtype=torch.float64, **load_kwargs(family))
    reference = {k: v.double() for k, v in state.items()}
    x, mask, g = batch(gin)
    with torch.no_grad():
        for reverse in (False, True):
            y_ref, ld_ref = ref_flow(family, reference, x, mask, g, reverse, n_heads=HEADS.get(family, 2))
            assert float((y_ref - x).abs().max()) > 0.5  # non-trivial weights, post included
            y, ld = flow64.forward_and_logdet(x, mask, g, reverse)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(ld, ld_ref, rtol=0, atol=1e-10)
            y32, ld32 = found.flow.forward_and_logdet(*cast(x, mask, g, dtype=torch.float32), reverse)
            torch.testing.assert_close(y32.double(), y_ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(ld32.double(), ld_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_transformer_flows_keep_the_flow_contract(family):
    """Inverse, padded frames, leading dims and the log-determinant (autograd Jacobian) on valid frames."""
    flow = load_vits_flow(checkpoint_state(family, gin=3, seed=5), dtype=torch.float64, **load_kwargs(family))
    x, mask, g = batch(3, t=6, lengths=(6, 4))
    x = x * mask
    y, logdet = flow.forward_and_logdet(x, mask, g)
    x_back, neg = flow.forward_and_logdet(y, mask, g, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(neg, -logdet, rtol=0, atol=1e-10)
    noisy = torch.where(mask > 0, x, 3.0)
    valid = mask.expand_as(x) > 0
    torch.testing.assert_close(flow(noisy, mask, g)[valid], y[valid], rtol=0, atol=1e-12)
    stacked, ld_stacked = flow.forward_and_logdet(torch.stack([x, x.flip(0)]), mask, g)
    torch.testing.assert_close(stacked[0], y, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_stacked[0], logdet, rtol=0, atol=1e-12)
    n = 4  # utterance 1: Jacobian over its 4 valid frames
    x1 = x[1]

    def valid_map(v):
        full = torch.cat([v.reshape(4, n), x1[:, n:]], -1)
        return flow(full, mask[1], g[1])[:, :n].reshape(-1)

    jac = torch.autograd.functional.jacobian(valid_map, x1[:, :n].reshape(-1))
    torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_flow_prior_of_a_loaded_two_channel_flow_integrates_to_one(family, assert_normalised_2d):
    """C=2, T=1, n_heads=1 (upstream's 2 heads need C/2 >= 2): trapezoid rule over a box with all the mass."""
    state = checkpoint_state(family, c=2, gin=3, seed=7, scale=0.3)
    n_heads = None if family in ("pre_conv2", "fft", "bert") else 1
    flow = load_vits_flow(state, dtype=torch.float64, n_heads=n_heads, **load_kwargs(family))
    g = torch.randn(3, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_normalised_2d(flow, g, half_width=10.0, points=201, min_reshape=0.1, tol=1e-4)


def test_gradients_reach_every_used_parameter():
    flow = load_vits_flow(checkpoint_state("pre_conv", gin=3, seed=2))
    x, mask, g = cast(*batch(3), dtype=torch.float32)
    flow(x, mask, g).square().sum().backward()
    names = {n for n, p in flow.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)}
    assert names and all(".post_transformer." in n for n in names)  # upstream's unused twin only


def test_constructors_validate_and_default_like_upstream():
    block = ResidualCouplingTransformersBlock(
        192, 192, 5, 1, 4, gin_channels=256, transformer_flow_type="fft"
    )
    assert block.config["transformer"]["n_heads"] == 4 and block.config["transformer"]["n_layers"] == 1
    assert block.config["transformer"]["filter_channels"] == 768
    layer = ResidualCouplingTransformersBlock(4, 8, 5, 1, 2).flows[0]
    assert layer.pre_transformer.attn_layers[0].n_heads == 2 and len(layer.pre_transformer.attn_layers) == 2
    with pytest.raises(ValueError, match="transformer_flow_type"):
        ResidualCouplingTransformersBlock(4, 8, 5, 1, 2, transformer_flow_type="glow")
    with pytest.raises(ValueError, match="n_heads"):
        ResidualCouplingTransformersBlock(2, 8, 5, 1, 2)  # width C/2 = 1 cannot hold 2 heads
    with pytest.raises(ValueError, match="mean_only"):
        ResidualCouplingTransformersBlock(
            4, 8, 5, 1, 2, transformer_flow_type="mono_layer_post_residual", mean_only=False
        )
    with pytest.raises(ValueError, match="transformer accepts"):
        ResidualCouplingTransformersBlock(4, 8, 5, 1, 2, transformer={"heads": 1})
    with pytest.raises(ValueError, match="cond_layer_idx"):
        TransformerCouplingBlock(4, 8, 12, 2, 2, 5, gin_channels=3)  # speaker at layer 2 needs 3 layers


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cpu_bf16_autocast_stays_within_the_documented_tolerance(family):
    """The README's autocast figure (<= 0.7 % of max |y| at VITS size) with margin, on a small flow."""
    flow = load_vits_flow(checkpoint_state(family, gin=3, seed=12, scale=0.3), **load_kwargs(family))
    x, mask, g = cast(*batch(3), dtype=torch.float32)
    with torch.no_grad():
        for reverse in (False, True):
            y = flow(x, mask, g, reverse)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y_bf16 = flow(x, mask, g, reverse)
            assert y_bf16.dtype == torch.float32
            relative = float((y_bf16 - y).abs().max() / y.abs().max())
            assert 0 < relative < 2e-2

"""pyro_vits.nn.hifigan.Generator against an independent functional reference written from VITS's published
models.Generator / modules.ResBlock1 / ResBlock2 equations (old-style weight norm folded by hand)."""

from __future__ import annotations

import pytest
import torch
from hifigan_reference import ref_generator

from pyro_vits.nn.hifigan import Generator

pytestmark = pytest.mark.usefixtures("single_thread")


CASES = {
    "1": dict(kernels=[3, 5], dilations=[[1, 3, 5], [1, 2, 3]], rates=[4, 2], ups_kernels=[8, 4]),
    "2": dict(kernels=[3, 7], dilations=[[1, 3], [2, 1]], rates=[3, 2], ups_kernels=[7, 4]),
}


@pytest.mark.parametrize("resblock", ["1", "2"])
@pytest.mark.parametrize("gin", [0, 3])
def test_generator_matches_the_reference(resblock, gin):
    c = CASES[resblock]
    torch.manual_seed(0)
    dec = Generator(5, resblock, c["kernels"], c["dilations"], c["rates"], 16, c["ups_kernels"], gin).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in dec.parameters():
            param.copy_(0.15 * torch.randn(param.shape, generator=gen))
    assert "conv_post.bias" not in dec.state_dict() and ("cond.weight" in dec.state_dict()) == bool(gin)
    x = torch.randn(2, 5, 9, generator=gen)
    g = torch.randn(2, gin, 1, generator=gen) if gin else None
    with torch.no_grad():
        got = dec(x, g)
        want = ref_generator(dec.state_dict(), x, g, resblock, c["kernels"], c["dilations"], c["rates"],
                             c["ups_kernels"])
    hop = c["rates"][0] * c["rates"][1]
    assert got.shape == (2, 1, 9 * hop) and dec.hop_length == hop
    assert 0.01 < float(got.std()) and float(got.abs().max()) < 0.99  # non-trivial, not saturated
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_norm_variant_has_upstream_keys_and_same_output():
    plain = Generator(4, "1", [3], [[1, 3, 5]], [2], 8, [4], 2).eval()
    normed = Generator(4, "1", [3], [[1, 3, 5]], [2], 8, [4], 2, weight_norm=True).eval()
    keys = set(normed.state_dict())
    assert "ups.0.parametrizations.weight.original0" in keys and "conv_pre.weight" in keys
    assert "resblocks.0.convs1.2.parametrizations.weight.original1" in keys
    state = {}
    for key, value in plain.state_dict().items():
        base = key.removesuffix(".weight")
        if base + ".parametrizations.weight.original1" in keys:
            state[base + ".parametrizations.weight.original1"] = value
            state[base + ".parametrizations.weight.original0"] = torch._weight_norm_interface(
                value, torch.ones(value.shape[0], 1, 1), 0)[1].reshape(-1, 1, 1)
        else:
            state[key] = value
    normed.load_state_dict(state)
    x = torch.randn(1, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(normed(x, torch.randn(1, 2, 1) * 0), plain(x, torch.zeros(1, 2, 1)))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="resblock"):
        Generator(4, "3", [3], [[1]], [2], 8, [4])
    with pytest.raises(ValueError, match="upsample_rates"):
        Generator(4, "1", [3], [[1]], [2, 2], 8, [4])

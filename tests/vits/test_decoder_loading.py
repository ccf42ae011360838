"""The HiFi-GAN decoder ``dec`` of a VITS file (weight_g/weight_v on ups and resblocks, as upstream) loads
into VITSGenerator.dec and reproduces the functional reference of tests/nn/test_hifigan.py."""

from __future__ import annotations

import pytest
import torch
from hifigan_reference import ref_generator
from vits_generator_reference import RefGenerator, randomized, vits_config

from pyro_vits.vits import load_vits_generator

pytestmark = pytest.mark.usefixtures("single_thread")

DEC = dict(resblock="1", resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3]],
           upsample_rates=[4, 2], upsample_initial_channel=16, upsample_kernel_sizes=[8, 4])


def _dec_state(gin, seed=5):
    """Upstream-named dec weights: conv_pre/conv_post/cond plain, ups/resblocks as weight_g/weight_v."""
    from pyro_vits.nn.hifigan import Generator

    plain = Generator(6, **DEC, gin_channels=gin)
    gen = torch.Generator().manual_seed(seed)
    state, folded = {}, {}
    for key, value in plain.state_dict().items():
        value = 0.15 * torch.randn(value.shape, generator=gen)
        folded[key] = value
        base = key.removesuffix(".weight")
        if key.endswith(".weight") and base.startswith(("ups.", "resblocks.")):
            g = 0.5 + torch.rand(value.shape[0], 1, 1, generator=gen)
            state[base + ".weight_g"], state[base + ".weight_v"] = g, value
            folded[key] = g * value / value.norm(dim=(1, 2), keepdim=True)
        else:
            state[key] = value
    return state, folded


@pytest.mark.parametrize("gin", [0, 5])
def test_vits_decoder_loads_with_the_config(gin):
    ref = randomized(RefGenerator(n_speakers=3 if gin else 0, gin=gin), seed=2)
    dec_state, folded = _dec_state(gin)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("dec.")}
    state.update({"dec." + k: v for k, v in dec_state.items()})
    config = vits_config({"n_speakers": 3 if gin else 0, "gin": gin})
    config["model"].update(resblock="1", upsample_rates=DEC["upsample_rates"],
                           resblock_dilation_sizes=DEC["resblock_dilation_sizes"])
    gen = load_vits_generator({"model": state}, config)
    x = torch.randn(2, 6, 5)
    g = torch.randn(2, gin, 1) if gin else None
    with torch.no_grad():
        want = ref_generator(folded, x, g, "1", DEC["resblock_kernel_sizes"], DEC["resblock_dilation_sizes"],
                             DEC["upsample_rates"], DEC["upsample_kernel_sizes"])
        torch.testing.assert_close(gen.dec(x, g), want, rtol=1e-5, atol=1e-5)
    assert load_vits_generator({"model": state}).dec is None  # no config: rates unknown, skipped
    assert load_vits_generator({"model": state}, config, decoder=False).dec is None
    with pytest.raises(ValueError, match="upsample_rates and resblock_dilation_sizes are not stored"):
        load_vits_generator({"model": state}, decoder=True)

"""ESPnet2 VITS (``espnet2.gan_tts.vits``) checkpoints: the ``espnet2`` layout reproduces ESPnet's text encoder,
posterior encoder and flow (the from-source reference in tests/espnet_reference.py always; ESPnet's own
``VITSGenerator`` too when ``espnet2`` imports) to 1e-5."""

from __future__ import annotations

import pytest
import torch
from espnet_reference import LS, LT, SIZES, check_against_reference, espnet_state, flow, inputs

from pyro_vits.vits import MAX_MESSAGE, load_vits_flow, load_vits_generator
from pyro_vits.vits.espnet import espnet_config

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-5, atol=1e-5)
PREFIX = "tts.generator."


def test_espnet_generator_matches_the_reference():
    state = espnet_state(seed=5)
    gen = load_vits_generator({PREFIX + k: v for k, v in state.items()})
    assert type(gen.enc_p).__name__ == "ConformerTextEncoder"
    check_against_reference(gen, state)
    named = load_vits_generator({PREFIX + k: v for k, v in state.items()}, layout="espnet2")
    check_against_reference(named, state)


def test_weight_norm_removed_checkpoint_loads_the_same():
    state = espnet_state(seed=6)
    plain = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            base = key[: -len(".weight_v")]
            plain[base + ".weight"] = state[base + ".weight_g"] * value / value.norm(dim=(1, 2), keepdim=True)
        elif not key.endswith(".weight_g"):
            plain[key] = value
    check_against_reference(load_vits_generator({PREFIX + k: v for k, v in plain.items()}), state)


def test_flow_alone_loads_with_load_vits_flow():
    state = espnet_state(seed=7)
    block = load_vits_flow({PREFIX + k: v for k, v in state.items()})
    ref = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    z = torch.randn(2, SIZES["hidden"], 9, dtype=torch.float64)
    mask = torch.ones(2, 1, 9, dtype=torch.float64)
    g = torch.randn(2, SIZES["gin"], 1, dtype=torch.float64)
    with torch.no_grad():
        got = block(z.float(), mask.float(), g.float())
    torch.testing.assert_close(got.double(), flow(ref, z, mask, g), **TOL)


@pytest.mark.parametrize("drop", ["flow.flows.2.proj.weight", "posterior_encoder.encoder.conv_layers.1.conv1x1_out.bias",
                                  "posterior_encoder.encoder.conv_layers.2.conv1x1_out.weight_v",
                                  "text_encoder.encoder.encoders.0.feed_forward.w_1.weight"])
def test_truncated_checkpoint_is_refused_in_one_line(drop):
    state = {PREFIX + k: v for k, v in espnet_state(seed=8).items() if k != drop}
    with pytest.raises(ValueError) as err:
        load_vits_generator(state)
    message = str(err.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    assert "missing" in message and drop.rsplit(".", 1)[0].split(".", 1)[-1] in message, message


def _espnet_yaml_config(**overrides):
    gp = dict(hidden_channels=SIZES["hidden"], text_encoder_attention_heads=SIZES["heads"],
              text_encoder_ffn_expand=SIZES["units"] // SIZES["hidden"], text_encoder_blocks=SIZES["blocks"],
              text_encoder_positionwise_conv_kernel_size=SIZES["ff_kernel"], global_channels=SIZES["gin"],
              spks=SIZES["spks"], posterior_encoder_layers=SIZES["pe_layers"])
    gp.update(overrides)
    return {"tts": "vits", "tts_conf": {"generator_params": gp}, "token_list": [f"t{i}" for i in range(SIZES["vocab"])],
            "feats_extract_conf": {"n_fft": 2 * (SIZES["aux"] - 1)}}


def test_espnet_config_yaml_and_dict_are_checked(tmp_path):
    state = {PREFIX + k: v for k, v in espnet_state(seed=9).items()}
    gen = load_vits_generator(state, _espnet_yaml_config())
    assert gen.config["hidden_channels"] == SIZES["hidden"]
    with pytest.raises(ValueError, match="text_encoder_blocks|n_layers"):
        load_vits_generator(state, _espnet_yaml_config(text_encoder_blocks=3))
    with pytest.raises(ValueError, match="posterior_encoder_stacks"):
        load_vits_generator(state, _espnet_yaml_config(posterior_encoder_stacks=2))
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_espnet_yaml_config()), encoding="utf-8")
    assert espnet_config(path) == espnet_config(_espnet_yaml_config())
    check_against_reference(load_vits_generator(state, path), espnet_state(seed=9))


def test_matches_espnet2_vits_generator_itself():
    """ESPnet's own module as the reference (skipped where espnet2 is not installed)."""
    vits = pytest.importorskip("espnet2.gan_tts.vits.generator")
    torch.manual_seed(0)
    ref = vits.VITSGenerator(
        vocabs=SIZES["vocab"], aux_channels=SIZES["aux"], hidden_channels=SIZES["hidden"], spks=SIZES["spks"],
        global_channels=SIZES["gin"], text_encoder_attention_heads=SIZES["heads"],
        text_encoder_ffn_expand=SIZES["units"] // SIZES["hidden"], text_encoder_blocks=SIZES["blocks"],
        text_encoder_positionwise_conv_kernel_size=SIZES["ff_kernel"],
        text_encoder_conformer_kernel_size=SIZES["conv_kernel"], decoder_channels=8, decoder_upsample_scales=[2],
        decoder_upsample_kernel_sizes=[4], decoder_resblock_kernel_sizes=[3], decoder_resblock_dilations=[[1]],
        posterior_encoder_kernel_size=SIZES["pe_kernel"], posterior_encoder_layers=SIZES["pe_layers"],
        flow_flows=SIZES["flows"], flow_kernel_size=SIZES["flow_kernel"], flow_layers=SIZES["flow_layers"],
        stochastic_duration_predictor_flows=1, stochastic_duration_predictor_dds_conv_layers=1,
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0, 0.4)
        for name, b in ref.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    gen = load_vits_generator({PREFIX + k: v for k, v in ref.state_dict().items()})
    ids, y, sid, g = inputs()
    with torch.no_grad():
        for got, want in zip(gen.enc_p(ids, LT), ref.text_encoder(ids, LT)):
            torch.testing.assert_close(got, want, **TOL)
        g_ref = ref.global_emb(sid).unsqueeze(-1)
        _, m_ref, logs_ref, mask = ref.posterior_encoder(y, LS, g=g_ref)
        _, m_q, logs_q, _ = gen.enc_q(y, LS, g=gen.speaker_embedding(sid))
        torch.testing.assert_close(m_q, m_ref, **TOL)
        torch.testing.assert_close(logs_q, logs_ref, **TOL)
        z = torch.randn(m_ref.shape, generator=g) * mask
        torch.testing.assert_close(gen.flow(z, mask, g=g_ref), ref.flow(z, mask, g=g_ref), **TOL)
        torch.testing.assert_close(gen.flow(z, mask, g=g_ref, reverse=True),
                                   ref.flow(z, mask, g=g_ref, inverse=True), **TOL)

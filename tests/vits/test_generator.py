"""load_vits_generator against a VITS generator written in the tests (tests/vits_generator_reference.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from vits_generator_reference import RefGenerator, randomized, save_like_vits, vits_config

from pyro_vits.nn.text_encoder import TextEncoder
from pyro_vits.vits import load_vits_generator

LENGTHS_TEXT, LENGTHS_SPEC = torch.tensor([7, 4, 1]), torch.tensor([11, 6, 9])


def inputs(gen_kwargs, seed=3):
    gen = torch.Generator().manual_seed(seed)
    n_vocab, spec = gen_kwargs.get("n_vocab", 20), gen_kwargs.get("spec", 17)
    x = torch.randint(0, n_vocab, (3, 7), generator=gen) * (torch.arange(7) < LENGTHS_TEXT[:, None])
    y = torch.randn(3, spec, 11, generator=gen).abs() * (torch.arange(11) < LENGTHS_SPEC[:, None]).unsqueeze(
        1
    )
    return x, y


CASES = {"single": {}, "multi": {"n_speakers": 3, "gin": 5}}


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path):
    kwargs = CASES[request.param]
    ref = randomized(RefGenerator(**kwargs), seed=11).eval()
    path = tmp_path / "G_1000.pth"
    save_like_vits(ref, path)
    (tmp_path / "config.json").write_text(json.dumps(vits_config(kwargs)))
    return ref, kwargs, path, tmp_path / "config.json"


def test_loaded_generator_reproduces_reference(saved, caplog):
    ref, kwargs, path, config = saved
    with caplog.at_level(logging.INFO, logger="pyro_vits.vits"):
        gen = load_vits_generator(path, config)
    assert "ignoring dec, dp" in caplog.text
    x, y = inputs(kwargs)
    with torch.no_grad():
        expected_p = ref.enc_p(x, LENGTHS_TEXT)
        got_p = gen.enc_p(x, LENGTHS_TEXT)
        for got, want in zip(got_p, expected_p):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sid = torch.tensor([2, 0, 1]) if kwargs else None
        g = gen.speaker_embedding(sid)
        g_ref = None if sid is None else ref.emb_g(sid).unsqueeze(-1)
        m_ref, logs_ref, mask_ref = ref.enc_q(y, LENGTHS_SPEC, g_ref)
        torch.manual_seed(0)
        z, m_q, logs_q, y_mask = gen.enc_q(y, LENGTHS_SPEC, g=g)
        torch.testing.assert_close(m_q, m_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logs_q, logs_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(y_mask, mask_ref)
        torch.manual_seed(0)
        torch.testing.assert_close(z, (m_ref + torch.randn_like(m_ref) * torch.exp(logs_ref)) * mask_ref)
        torch.testing.assert_close(
            gen.flow(z, y_mask, g=g), ref.flow(z, mask_ref, g_ref), rtol=1e-5, atol=1e-5
        )
    assert gen.config["n_speakers"] == kwargs.get("n_speakers", 0) and gen.config["n_heads"] == 2
    assert isinstance(gen.enc_p, TextEncoder) and not gen.training


def test_state_dict_coqui_names_and_module_prefix(saved):
    ref, kwargs, _, _ = saved
    renames = {"enc_p.": "text_encoder.", "enc_q.": "posterior_encoder.", "dec.": "waveform_decoder."}
    state = {}
    for key, value in ref.state_dict().items():
        for old, new in renames.items():
            key = new + key[len(old) :] if key.startswith(old) else key
        state["module." + key] = value
    gen = load_vits_generator(state)
    x, _ = inputs(kwargs)
    with torch.no_grad():
        torch.testing.assert_close(
            gen.enc_p(x, LENGTHS_TEXT)[1], ref.enc_p(x, LENGTHS_TEXT)[1], rtol=1e-5, atol=1e-5
        )
    gen2 = load_vits_generator({"model": ref.state_dict()})  # a checkpoint dict in memory
    assert gen2.config == gen.config


def test_bad_checkpoints_and_configs(saved, tmp_path):
    ref, kwargs, path, _ = saved
    state = ref.state_dict()
    for part in ("enc_p", "flow"):
        with pytest.raises(ValueError, match=f"no {part} weights"):
            load_vits_generator({k: v for k, v in state.items() if not k.startswith(part + ".")})
    without_q = load_vits_generator({k: v for k, v in state.items() if not k.startswith("enc_q.")})
    assert without_q.enc_q is None and without_q.n_speakers == (ref.emb_g.num_embeddings if hasattr(ref, "emb_g")
                                                                else 0)
    if hasattr(ref, "emb_g"):
        torch.testing.assert_close(without_q.emb_g.weight, ref.emb_g.weight)
    bad = vits_config({**kwargs, "hidden": 16})
    with pytest.raises(
        ValueError, match="config says hidden_channels=16 but the weights in .* have hidden_channels=8"
    ):
        load_vits_generator(path, bad)
    with pytest.raises(ValueError, match="spec_channels=9"):
        load_vits_generator(path, vits_config(kwargs, filter_length=16))
    with pytest.raises(ValueError, match="no 'model' section"):
        load_vits_generator(path, {"data": {}})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_vits_generator(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot load as a torch checkpoint"):
        load_vits_generator(tmp_path / "junk.pth")
    with pytest.raises(TypeError, match="expected a state dict"):
        load_vits_generator(3)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_vits_generator(path, tmp_path / "bad.json")
    if kwargs:
        with pytest.raises(ValueError, match="speaker ids are required"):
            load_vits_generator(path).speaker_embedding(None)
        with pytest.raises(ValueError, match="speaker conditioning needs emb_g"):
            load_vits_generator({k: v for k, v in state.items() if not k.startswith("emb_g")})

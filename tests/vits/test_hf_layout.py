"""The ``hf-vits`` layout against the real implementation: a small randomised ``transformers.VitsModel`` saved
with ``save_pretrained`` loads by path (folder or weights file) and its text encoder, posterior encoder, flow
(both directions), speaker embedding and decoder match the transformers modules to 1e-5."""

from __future__ import annotations

import pytest
import torch

from pyro_vits.vits import load_vits_generator

transformers = pytest.importorskip("transformers", reason="the hf-vits tests need transformers "
                                                          "(pip install pyro_vits[layouts])")
pytest.importorskip("safetensors", reason="the hf-vits tests need safetensors (pip install pyro_vits[layouts])")

from hf_helpers import CONFIG

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-5, atol=1e-5)
DIFFS: dict[str, float] = {}


def _close(name, got, want):
    DIFFS[name] = max(DIFFS.get(name, 0.0), float((got - want).abs().max()))
    torch.testing.assert_close(got, want, **TOL)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.VitsModel(transformers.VitsConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.15 if name.startswith("decoder.") else 0.3
            param.copy_(scale * torch.randn(param.shape, generator=gen))
    folder = tmp_path_factory.mktemp("hf") / "vits"
    model.save_pretrained(folder)
    return model, folder


def test_hf_model_matches_transformers(saved, capsys):
    model, folder = saved
    gen = load_vits_generator(folder)
    assert gen.enc_q is not None and gen.dec is not None and gen.n_speakers == 3
    g = torch.Generator().manual_seed(3)
    lengths_text, lengths_spec = torch.tensor([7, 4]), torch.tensor([11, 6])
    x = torch.randint(0, 20, (2, 7), generator=g) * (torch.arange(7) < lengths_text[:, None])
    text_mask = (torch.arange(7) < lengths_text[:, None]).float()
    spec_mask = (torch.arange(11) < lengths_spec[:, None]).float().unsqueeze(1)
    y = torch.randn(2, 17, 11, generator=g) * spec_mask
    sid = torch.tensor([2, 0])
    with torch.no_grad():
        out = model.text_encoder(x, text_mask.unsqueeze(-1), attention_mask=text_mask)
        _, m_p, logs_p, _ = gen.enc_p(x, lengths_text)
        _close("enc_p m_p", m_p, out.prior_means.transpose(1, 2))
        _close("enc_p logs_p", logs_p, out.prior_log_variances.transpose(1, 2))

        g_hf = model.embed_speaker(sid).unsqueeze(-1)
        g_ours = gen.speaker_embedding(sid)
        _close("emb_g", g_ours, g_hf)

        _, m_q_hf, logs_q_hf = model.posterior_encoder(y, spec_mask, g_hf)
        _, m_q, logs_q, _ = gen.enc_q(y, lengths_spec, g=g_ours)
        _close("enc_q m_q", m_q, m_q_hf)
        _close("enc_q logs_q", logs_q, logs_q_hf)

        z = torch.randn(2, 6, 11, generator=g) * spec_mask
        z_p_hf = model.flow(z, spec_mask, g_hf, reverse=False)
        assert float((z_p_hf - z.flip(1) if CONFIG["prior_encoder_num_flows"] % 2 else z_p_hf - z).abs().max()) > 1e-2
        _close("flow forward", gen.flow(z, spec_mask, g=g_ours), z_p_hf)
        _close("flow reverse", gen.flow(z, spec_mask, g=g_ours, reverse=True),
               model.flow(z, spec_mask, g_hf, reverse=True))

        wav_hf = model.decoder(z, g_hf)
        assert 0.01 < float(wav_hf.std()) and float(wav_hf.abs().max()) < 0.99
        _close("dec", gen.dec(z, g_ours), wav_hf)
    with capsys.disabled():
        print("\nlargest |pyro_vits - transformers|:", ", ".join(f"{k} {v:.2e}" for k, v in DIFFS.items()))


def test_hf_weights_file_path_and_named_layout(saved):
    model, folder = saved
    for path, layout in ((folder / "model.safetensors", None), (folder, "hf-vits")):
        gen = load_vits_generator(path, layout=layout)
        torch.testing.assert_close(gen.emb_g.weight, model.embed_speaker.weight)
        assert gen.config["n_flows"] == CONFIG["prior_encoder_num_flows"]
        assert gen.dec.upsample_rates == (4, 2)


def test_hf_layout_without_safetensors_names_the_extra(saved, monkeypatch):
    import importlib.util

    _, folder = saved
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else real(name, *a))
    state = {"text_encoder.embed_tokens.weight": torch.zeros(3, 8)}
    with pytest.raises(ImportError, match=r"pip install pyro_vits\[layouts\]") as err:
        load_vits_generator(state)
    assert "\n" not in str(err.value)


def test_missing_weights_in_a_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*model.safetensors"):
        load_vits_generator(tmp_path)

"""The contract every registered checkpoint layout (``pyro_vits.vits.layouts.LAYOUTS``) keeps: a checkpoint
written in that layout with non-trivial random weights loads (detected, and named with ``layout=``) and
reproduces the independent reference (tests/vits_reference.py, tests/vits_generator_reference.py) to 1e-5; a
truncated one is refused with a one-line ``ValueError`` naming what is missing.

Adding a layout: one entry in ``LAYOUTS`` and one builder in :data:`CASES`.
"""

from __future__ import annotations

import pytest
import torch
from vits_generator_reference import RefGenerator, randomized
from vits_reference import checkpoint_state, ref_flow, upstream_checkpoint

from pyro_vits.vits import LAYOUTS, MAX_MESSAGE, load_vits_flow, load_vits_generator

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS_TEXT, LENGTHS_SPEC = torch.tensor([7, 4]), torch.tensor([11, 6])


def _same_latent_path(gen, ref):
    """``gen``'s enc_p, enc_q (with the speaker embedding) and flow equal the reference generator's to TOL on
    a padded 2-utterance batch; the flow is non-trivial."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 20, (2, 7), generator=g) * (torch.arange(7) < LENGTHS_TEXT[:, None])
    y = torch.randn(2, 17, 11, generator=g) * (torch.arange(11) < LENGTHS_SPEC[:, None]).unsqueeze(1)
    sid = torch.tensor([2, 0])
    with torch.no_grad():
        for got, want in zip(gen.enc_p(x, LENGTHS_TEXT), ref.enc_p(x, LENGTHS_TEXT)):
            torch.testing.assert_close(got, want, **TOL)
        g_ref = ref.emb_g(sid).unsqueeze(-1)
        m_ref, logs_ref, mask = ref.enc_q(y, LENGTHS_SPEC, g_ref)
        _, m_q, logs_q, _ = gen.enc_q(y, LENGTHS_SPEC, g=gen.speaker_embedding(sid))
        torch.testing.assert_close(m_q, m_ref, **TOL)
        torch.testing.assert_close(logs_q, logs_ref, **TOL)
        z = torch.randn(m_ref.shape, generator=g) * mask
        torch.testing.assert_close(gen.flow(z, mask, g=g_ref), ref.flow(z, mask, g_ref), **TOL)
        assert float((ref.flow(z, mask, g_ref) - z).abs().max()) > 1e-2  # non-trivial flow


def _generator_case(rename):
    """A multi-speaker RefGenerator saved under ``rename(key)``; loaded with :func:`load_vits_generator`."""
    ref = randomized(RefGenerator(n_speakers=3, gin=5), seed=11).eval()
    state = {rename(k): v for k, v in ref.state_dict().items()}

    def check(layout):
        _same_latent_path(load_vits_generator(upstream_checkpoint(state), layout=layout), ref)

    return [(state, check, lambda s, **kw: load_vits_generator(upstream_checkpoint(s), **kw))]


def _flow_cases(families):
    """Flow checkpoints of each family (``checkpoint_state``) loaded with :func:`load_vits_flow`."""
    cases = []
    for family in families:
        state = checkpoint_state(family, gin=3, seed=13)
        kwargs = {"transformer_flow_type": family} if family.startswith("mono") else {}

        def load(s, family=family, kwargs=kwargs, **kw):
            return load_vits_flow(upstream_checkpoint(s), **kwargs, **kw)

        def check(layout, state=state, family=family, load=load):
            flow = load(state, layout=layout)
            reference = {k: v.double() for k, v in state.items()}
            g = torch.Generator().manual_seed(21)
            x = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
            mask = (torch.arange(7)[None, :] < torch.tensor([7, 4])[:, None]).double().unsqueeze(1)
            spk = torch.randn(2, 3, 1, generator=g, dtype=torch.float64)
            with torch.no_grad():
                for reverse in (False, True):
                    want, _ = ref_flow(family, reference, x, mask, spk, reverse, 1, 4 if family == "fft" else 2)
                    got = flow(x.float(), mask.float(), spk.float(), reverse)
                    torch.testing.assert_close(got.double(), want, **TOL)

        cases.append((state, check, load))
    return cases


def _coqui_name(key):
    for old, new in (("enc_p.", "text_encoder."), ("enc_q.", "posterior_encoder."), ("dec.", "waveform_decoder.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("flow.flows."):  # coqui numbers the couplings 0, 1, 2, … (no Flip modules)
        _, _, index, rest = key.split(".", 3)
        return f"flow.flows.{int(index) // 2}.{rest}"
    return key


def _hf_case():
    """A small randomised transformers VitsModel saved with save_pretrained, loaded by folder path and compared
    with the transformers modules (tests/vits/test_hf_layout.py holds the full comparison)."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install pyro_vits[layouts])")
    pytest.importorskip("safetensors", reason="needs safetensors (pip install pyro_vits[layouts])")
    import tempfile
    from pathlib import Path

    from hf_helpers import CONFIG

    torch.manual_seed(0)
    model = randomized(transformers.VitsModel(transformers.VitsConfig(**CONFIG)), seed=11, scale=0.15).eval()
    folder = Path(tempfile.mkdtemp(prefix="hf-vits-"))
    model.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def check(layout):
        gen = load_vits_generator(folder, layout=layout)
        g = torch.Generator().manual_seed(3)
        x = torch.randint(0, 20, (2, 7), generator=g) * (torch.arange(7) < LENGTHS_TEXT[:, None])
        text_mask = (torch.arange(7) < LENGTHS_TEXT[:, None]).float()
        mask = (torch.arange(11) < LENGTHS_SPEC[:, None]).float().unsqueeze(1)
        y = torch.randn(2, 17, 11, generator=g) * mask
        sid = torch.tensor([2, 0])
        with torch.no_grad():
            out = model.text_encoder(x, text_mask.unsqueeze(-1), attention_mask=text_mask)
            _, m_p, logs_p, _ = gen.enc_p(x, LENGTHS_TEXT)
            torch.testing.assert_close(m_p, out.prior_means.transpose(1, 2), **TOL)
            torch.testing.assert_close(logs_p, out.prior_log_variances.transpose(1, 2), **TOL)
            g_hf = model.embed_speaker(sid).unsqueeze(-1)
            _, m_q, logs_q, _ = gen.enc_q(y, LENGTHS_SPEC, g=gen.speaker_embedding(sid))
            _, m_ref, logs_ref = model.posterior_encoder(y, mask, g_hf)
            torch.testing.assert_close(m_q, m_ref, **TOL)
            torch.testing.assert_close(logs_q, logs_ref, **TOL)
            z = torch.randn(m_ref.shape, generator=g) * mask
            for reverse in (False, True):
                torch.testing.assert_close(gen.flow(z, mask, g=g_hf, reverse=reverse),
                                           model.flow(z, mask, g_hf, reverse=reverse), **TOL)
            torch.testing.assert_close(gen.dec(z, g_hf), model.decoder(z, g_hf), **TOL)

    return [(state, check, lambda s, **kw: load_vits_generator(s, **kw))]


def _espnet_cases():
    """An ESPnet2 VITS state dict (``tts.generator.`` keys, as an ESPnet model file holds it) against the
    from-source reference in tests/espnet_reference.py."""
    from espnet_reference import check_against_reference, espnet_state

    raw = espnet_state(seed=17)
    state = {"tts.generator." + k: v for k, v in raw.items()}

    def check(layout):
        check_against_reference(load_vits_generator(state, layout=layout), raw)

    return [(state, check, lambda s, **kw: load_vits_generator(s, **kw))]


CASES = {
    "vits": lambda: _generator_case(lambda k: k),
    "coqui": lambda: _generator_case(_coqui_name),
    "vits2": lambda: _flow_cases(("pre_conv", "pre_conv2", "fft", "mono_layer_inter_residual",
                                  "mono_layer_post_residual")),
    "bert-vits2": lambda: _flow_cases(("bert",)),
    "hf-vits": _hf_case,
    "espnet2": _espnet_cases,
}


def test_every_layout_has_a_contract_case():
    assert set(CASES) == set(LAYOUTS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loads_and_matches_the_reference(name):
    for _, check, _ in CASES[name]():
        check(None)  # detected from the keys
        check(name)  # named


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_truncated_checkpoint_is_refused_in_one_line(name):
    for state, _, load in CASES[name]():
        last = sorted(k for k in state if "flow.flows." in k)[-1]  # "tts.generator.flow.flows." (espnet2) too
        truncated = {k: v for k, v in state.items() if k != last}
        with pytest.raises(ValueError) as err:
            load(truncated, layout=name)
        message = str(err.value)
        assert "\n" not in message and len(message) <= MAX_MESSAGE
        convert = LAYOUTS[name].convert  # a renaming layout's errors name VITS's key
        names = {last, *(convert({last: state[last]}) if convert else ())}
        assert "missing" in message and any(n.rsplit(".", 1)[0].split(".", 3)[-1] in message for n in names), message


def _folded(state):
    """``state`` with weight norm folded into plain ``weight`` s, as Piper's ONNX export stores them."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            base = key[: -len(".weight_g")]
            out[base + ".weight"] = torch._weight_norm(state[base + ".weight_v"], value, 0)
        elif not key.endswith(".weight_v"):
            out[key] = value
    return out


def write_piper_onnx(state, path):
    """A Piper-voice-shaped ONNX file (a graph of unconnected nodes: only names and initializers are read):
    embeddings as ``/…/emb/Gather`` input 0, convolutions as ``/…/Conv`` inputs 1 (anonymous
    ``onnx::Conv_<n>`` under ``flow.…enc``, as folded weight norm leaves them) and 2, the rest as named
    initializers."""
    import onnx
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    for n, (key, value) in enumerate(sorted(state.items())):
        base, leaf = key.rsplit(".", 1)
        scope = "/" + base.replace(".", "/")
        name = key
        if leaf == "weight" and base.endswith(("emb", "emb_g")):
            name = f"onnx::Gather_{n}"
            nodes.append(helper.make_node("Gather", [name, "ids"], [f"{scope}/out"], name=f"{scope}/Gather"))
        elif leaf == "weight" and value.dim() == 3:
            name = f"onnx::Conv_{n}" if ".enc." in key and key.startswith("flow.") else key
            bias = [base + ".bias"] if base + ".bias" in state else []
            nodes.append(helper.make_node("Conv", ["x", name, *bias], [f"{scope}/out"], name=f"{scope}/Conv"))
        inits.append(numpy_helper.from_array(value.detach().numpy(), name))
    graph = helper.make_graph(nodes, "piper", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))


def _piper_onnx_case():
    """A released Piper voice: the prior path (enc_p, flow, emb_g) of a RefGenerator, folded, in ONNX."""
    pytest.importorskip("onnx")
    ref = randomized(RefGenerator(n_speakers=3, gin=5), seed=17).eval()
    state = {k: v for k, v in _folded(ref.state_dict()).items() if k.startswith(("enc_p.", "flow.", "emb_g."))}

    def load(s, **kw):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as folder:
            write_piper_onnx(s, Path(folder) / "voice.onnx")
            return load_vits_generator(Path(folder) / "voice.onnx", **kw)

    def check(layout):
        gen = load(state, layout=layout)
        assert gen.enc_q is None
        g = torch.Generator().manual_seed(5)
        x = torch.randint(0, 20, (2, 7), generator=g) * (torch.arange(7) < LENGTHS_TEXT[:, None])
        sid = torch.tensor([2, 0])
        with torch.no_grad():
            for got, want in zip(gen.enc_p(x, LENGTHS_TEXT), ref.enc_p(x, LENGTHS_TEXT)):
                torch.testing.assert_close(got, want, **TOL)
            g_ref = ref.emb_g(sid).unsqueeze(-1)
            torch.testing.assert_close(gen.speaker_embedding(sid), g_ref, **TOL)
            mask = (torch.arange(11) < LENGTHS_SPEC[:, None]).float().unsqueeze(1)
            z = torch.randn(2, 6, 11, generator=g) * mask
            torch.testing.assert_close(gen.flow(z, mask, g=g_ref), ref.flow(z, mask, g_ref), **TOL)

    return [(state, check, load)]


def _piper_ckpt_case():
    """A Piper Lightning checkpoint: ``state_dict`` under ``model_g.`` (and ``model_d.``), sizes in
    ``hyper_parameters``."""
    def lightning(s):
        return {"state_dict": {**{"model_g." + k: v for k, v in s.items()},
                               "model_d.discriminators.0.conv_post.weight": torch.ones(1, 4, 3)},
                "hyper_parameters": {"sample_rate": 8000, "resblock": "2"}, "epoch": 1}

    ref = randomized(RefGenerator(n_speakers=3, gin=5), seed=11).eval()
    state = ref.state_dict()  # weight_g / weight_v, as Piper trains

    def load(s, **kw):
        return load_vits_generator(lightning(s), **kw)

    def check_ckpt(layout):
        gen = load(state, layout=layout)
        assert gen.config["sample_rate"] == 8000
        _same_latent_path(gen, ref)

    return [(state, check_ckpt, load)]


CASES["piper-onnx"] = _piper_onnx_case
CASES["piper-ckpt"] = _piper_ckpt_case

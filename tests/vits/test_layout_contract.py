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


def _generator_case(rename):
    """A multi-speaker RefGenerator saved under ``rename(key)``; loaded with :func:`load_vits_generator`."""
    ref = randomized(RefGenerator(n_speakers=3, gin=5), seed=11).eval()
    state = {rename(k): v for k, v in ref.state_dict().items()}

    def check(layout):
        gen = load_vits_generator(upstream_checkpoint(state), layout=layout)
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
        assert "missing" in message and last.rsplit(".", 1)[0].split(".", 3)[-1] in message, message

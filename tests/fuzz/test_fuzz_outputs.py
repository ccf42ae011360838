"""Output and interrupt failures of every entry point (fit, fit-speech, audit, corpus, the examples): a
read-only or full ``--out``, a failed checkpoint save, SIGINT/SIGTERM, ``--overwrite`` after an interrupt and
a diverging ``--nan-policy skip`` run. Each ends in its exit code and exactly one stderr line naming the path,
with no partial output left behind."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pyro_vits import _io
from pyro_vits.apps import run_main
from pyro_vits.apps.audit import main as audit_main
from pyro_vits.apps.corpus import main as corpus_main
from pyro_vits.apps.fit import main as fit_main
from pyro_vits.apps.fit_speech import main as fit_speech_main

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY_CORPUS = ROOT / "tests" / "fixtures" / "tiny_corpus"
TINY = ["--steps", "2", "--n-train", "8", "--n-heldout", "4", "--frames", "8", "--hidden", "8",
        "--channels", "4", "--kernel-size", "3", "--n-layers", "1", "--n-flows", "2", "--enc-layers", "1",
        "--eval-samples", "2", "--teacher-samples", "4", "--log-every", "1", "--batch-size", "4", "--device", "cpu",
        "--no-progress", "-q"]
SPEECH = ["--corpus", str(TINY_CORPUS), "--n-fft", "256", "--hop-length", "128", "--inter-channels", "4",
          "--hidden-channels", "8", "--filter-channels", "16", "--n-layers", "1", "--flow-n-layers", "1",
          "--n-flows", "2", "--guide-layers", "1", "--decoder-channels", "8", "--gin-channels", "3",
          "--batch-size", "2", "--eval-samples", "2", "--heldout-size", "2", "--log-every", "1", "-q"]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def assert_one_line(err: str, *names: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Warning" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------ read-only --out, before any work


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write into; as root (chmod has no effect) the write function fails instead."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root: inject the failure where the probe (and every write) starts
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(folder):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(_io.tempfile, "mkstemp", mkstemp)
    yield folder
    folder.chmod(0o755)


def _speech_example(argv):
    return example("fit_vits_speech").main(argv)


def _audit_example(argv):
    module = example("audit_vits")
    return module.main(module.parse_args(argv)) and 0


def _prior_example(argv):
    module = example("fit_vits_prior")
    return module.main(module.parse_args(argv)) and 0


READ_ONLY_CASES = {
    "fit": (fit_main, lambda out: [*TINY, "--out", str(out)]),
    "fit-speech": (fit_speech_main, lambda out: [*SPEECH, "--steps", "1", "--out", str(out)]),
    "audit": (audit_main, lambda out: ["G_1.pth", "--config", "config.json", "--filelist", "f.txt",
                                        "--out", str(out)]),
    "corpus": (corpus_main, lambda out: ["--out", str(out), "--max-utterances", "2"]),
    "example fit_vits_prior": (_prior_example, lambda out: [
        "--steps", "2", "--n-train", "8", "--n-heldout", "4", "--frames", "8", "--hidden", "8", "--channels",
        "4", "--n-flows", "2", "--batch-size", "4", "--log-every", "1", "--device", "cpu", "--no-progress",
        "--out", str(out)]),
    "example fit_vits_speech": (_speech_example, lambda out: ["--corpus", str(TINY_CORPUS), "--steps", "1",
                                                              "--out", str(out)]),
}


@pytest.mark.parametrize("case", sorted(READ_ONLY_CASES))
def test_a_read_only_out_is_one_line_exit_2_and_leaves_nothing(case, read_only, capsys):
    main, argv = READ_ONLY_CASES[case]
    out = read_only / "run"
    assert run_main(main, argv(out), prog=case) == 2
    line = assert_one_line(capsys.readouterr().err, out)
    assert "not writable" in line or "Permission denied" in line
    assert sorted(read_only.iterdir()) == []


def test_the_audit_example_ends_in_run_main(tmp_path, capsys):
    assert run_main(_audit_example, [str(tmp_path / "G_1.pth"), str(tmp_path / "c.json"), "f.txt"],
                    prog="audit_vits.py") == 2
    assert_one_line(capsys.readouterr().err, "audit_vits.py: error:")


# ------------------------------------------------------------------ a full disk during a save


@pytest.mark.parametrize("wrapped", [False, True], ids=["OSError", "torch RuntimeError"])
def test_a_full_disk_during_the_checkpoint_is_one_line_exit_2(wrapped, tmp_path, monkeypatch, capsys):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if hasattr(f, "write"):  # fit's checkpoint (written through _io.atomic_write)
            full = OSError(errno.ENOSPC, "No space left on device")
            if wrapped:
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from full
            raise full
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert run_main(fit_main, [*TINY, "--out", str(out)], prog="pyro-vits fit") == 2
    assert_one_line(capsys.readouterr().err, out / "checkpoint.pt", "No space left on device")
    assert not out.exists()  # no checkpoint was ever saved: nothing to resume, nothing left behind


# ------------------------------------------------------------------ nan-policy skip on a diverging run


def test_a_diverged_skip_run_is_one_line_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(fit_main, [*TINY, "--lr", "1e30", "--nan-policy", "skip", "--out", str(out)],
                    prog="pyro-vits fit") == 1
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "training diverged" in errors[0] and str(out) in errors[0]
    # written: the run files; not written: the diagnostics
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt"}


# ------------------------------------------------------------------ --overwrite removes exactly the run's files


def test_overwrite_removes_the_run_outputs_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "inference_data.nc", "summary.csv", "summary.md",
                 "figures/stale.png", "notes.txt"):
        (out / name).write_text("old")
    assert run_main(fit_main, [*TINY, "--out", str(out), "--overwrite"], prog="pyro-vits fit") == 0
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "old"
    assert not (out / "figures" / "stale.png").exists() and (out / "figures" / "training_curves.png").is_file()
    for name in ("inference_data.nc", "summary.csv", "summary.md"):
        assert (out / name).read_bytes() != b"old", name


def test_fit_speech_example_refuses_zero_steps_and_a_used_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse: its usage line, then the error
        run_main(_speech_example, ["--corpus", str(TINY_CORPUS), "--steps", "0", "--out", str(tmp_path / "r")])
    assert info.value.code == 2
    assert "error: argument --steps: must be a positive int, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "G_9.pth").write_text("x")
    assert run_main(_speech_example, ["--corpus", str(TINY_CORPUS), "--out", str(tmp_path / "r")],
                    prog="fit_vits_speech.py") == 2
    assert_one_line(capsys.readouterr().err, tmp_path / "r", "--overwrite")


@pytest.mark.slow
def test_fit_speech_overwrite_drops_the_old_generators(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "vits").mkdir(parents=True)
    for name in ("G_2.pth", "G_3.pth"):
        (out / "vits" / name).write_text("stale")
    (out / "keep.txt").write_text("mine")
    assert run_main(fit_speech_main, [*SPEECH, "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "vits").iterdir()) == ["G_1.pth", "config.json"]
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ SIGINT / SIGTERM, then --resume


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pyro_vits.cli", *argv]


ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
LONG = [*TINY[:1], "40", *TINY[2:]]  # 40 steps, a record every step


def params(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"guide.{k}": v for k, v in state["guide"].items()}, "losses": state["losses"]}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_resumable_run_that_ends_bit_for_bit(signum, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli("fit", *LONG, "--out", str(out)), env=ENV, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    line = assert_one_line(err, f"--resume {out}", signal.Signals(signum).name)
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 40, line

    # reusing the folder is refused, --resume completes
    used = subprocess.run(cli("fit", *LONG, "--out", str(out)), env=ENV, capture_output=True, text=True)
    assert used.returncode == 2 and "--resume" in assert_one_line(used.stderr)
    resumed = subprocess.run(cli("fit", "--resume", str(out), "-q"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "inference_data.nc").is_file() and (out / "figures" / "training_curves.png").is_file()

    whole = tmp_path / "whole"
    done = subprocess.run(cli("fit", *LONG, "--out", str(whole)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = params(out / "checkpoint.pt"), params(whole / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "it_per_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records(out) == records(whole)


@pytest.mark.slow
def test_overwrite_after_an_interrupt_leaves_only_the_new_run(tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "training_curves.png").write_text("old run")
    (out / "inference_data.nc").write_text("old run")
    (out / "config.json").write_text("{}")
    proc = subprocess.Popen(cli("fit", *LONG, "--out", str(out), "--overwrite"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    # the interrupted run's folder holds only the new run's files: no old figures or netCDF beside them
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt"}

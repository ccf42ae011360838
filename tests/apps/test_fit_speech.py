"""fit drives the speech model: one step per configuration, the fit-speech application end to end (export,
reload, resume) and the tutorial example, on the committed tiny corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from speech_helpers import SPEECH, TINY, make_pair

from pyro_vits.apps import run_main
from pyro_vits.apps.fit_speech import main as fit_speech_main
from pyro_vits.data.speech_data import SpeechData, read_corpus
from pyro_vits.train import FitConfig, fit
from pyro_vits.vits import load_vits_generator

SMALL_ARGS = ["--n-fft", "256", "--hop-length", "128", "--inter-channels", "4", "--hidden-channels", "8",
              "--filter-channels", "16", "--n-layers", "1", "--flow-n-layers", "1", "--n-flows", "2",
              "--guide-layers", "1", "--decoder-channels", "8", "--gin-channels", "3", "--batch-size", "2",
              "--eval-samples", "2", "--heldout-size", "2", "-q"]


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(TINY, SPEECH)


@pytest.mark.parametrize("mean_only", [True, False], ids=["mean_only", "affine"])
@pytest.mark.parametrize("speakers", [0, 2], ids=["single", "speakers"])
def test_fit_takes_one_step_on_the_tiny_corpus(corpus, mean_only, speakers):
    model, guide = make_pair(mean_only, speakers)
    d = corpus.train
    data = d if speakers else SpeechData(d.spec, d.lengths, d.text, d.text_lengths, None)
    config = FitConfig(steps=1, elbo="vits", particles=2, batch_size=3, seed=0, progress=False, eval_samples=2,
                       eval_size=2)
    result = fit(model, guide, data, config, device="cpu")
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    assert math.isfinite(result.metrics[-1]["kl_per_frame"])


@pytest.mark.slow
def test_fit_speech_app_trains_exports_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--corpus", str(TINY), "--out", str(run), "--steps", "2", "--log-every", "1", *SMALL_ARGS]
    assert run_main(fit_speech_main, argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and math.isfinite(summary["heldout_elbo_per_frame"])
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "vits"} <= {p.name for p in run.iterdir()}
    gen = load_vits_generator(run / "vits" / "G_2.pth", run / "vits" / "config.json")
    assert gen.n_speakers == 2 and gen.config["spec_channels"] == 129
    argv[argv.index("--steps") + 1] = "3"
    assert run_main(fit_speech_main, [*argv, "--resume"]) == 0
    assert (run / "vits" / "G_3.pth").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_fit_speech_app_trains_the_laplace_mel_likelihood(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--corpus", str(TINY), "--out", str(run), "--steps", "1", "--likelihood", "laplace-mel", *SMALL_ARGS]
    assert run_main(fit_speech_main, argv) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["heldout_elbo_per_frame"])
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["likelihood"] == "laplace-mel" and model["sampling_rate"] == 22050
    assert (run / "vits" / "G_1.pth").is_file()


@pytest.mark.slow
def test_tutorial_example_runs_on_the_tiny_corpus(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "fit_vits_speech.py"
    out = subprocess.run([sys.executable, str(script), "--corpus", str(TINY), "--steps", "2", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "vits" / "G_2.pth").is_file()
    assert "elbo_per_frame" in out.stdout

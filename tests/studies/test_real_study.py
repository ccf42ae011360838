"""pyro-vits real-study: the quick preset end to end on a tiny random voice, resumable; its settings."""

from __future__ import annotations

import json

import pytest
import soundfile
from refit_helpers import write_tiny_voice
from speech_helpers import TINY

from pyro_vits.cli import main
from pyro_vits.studies.real.config import Fix, RealStudyConfig, preset

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:emb_g.weight was not registered")]


def test_quick_study_writes_page_json_figures_samples_and_resumes(tmp_path, capsys):
    voice = write_tiny_voice(tmp_path / "voice")
    argv = ["-q", "real-study", "--voice", str(voice), "--corpus", str(TINY), "--out", str(tmp_path / "runs"),
            "--docs", str(tmp_path / "docs"), "--preset", "quick"]
    assert main(argv) == 0
    docs = tmp_path / "docs"
    results = json.loads((docs / "real_vits.json").read_text())
    cfg = preset("quick")
    assert [t["step"] for t in results["trajectory"]] == list(cfg.refit_steps)
    last = results["trajectory"][-1]
    assert len(last["sigma_ratio"]) == 6 and last["draws"] == cfg.eval_draws
    gap = last["alignment_gap"]
    assert gap["marginal_minus_mas"][0] >= 0 and gap["marginal_minus_mas"][0] <= gap["log_count"] + 1e-9
    assert set(results["fixes"]["summary"]) == {f.name for f in cfg.fixes}
    assert set(results["fixes"]["paired"]) == {f.name for f in cfg.fixes[1:]}
    assert {"16", "64"} <= set(results["audit"]["prob_negative"]) or results["audit"]["prob_negative"]
    page = (docs / "real_vits.md").read_text()
    assert "pyro-vits real-study" in page and "## The fixes" in page
    assert (docs / "figures" / "real_vits_trajectory.png").is_file()
    rate = {soundfile.info(str(w)).samplerate for w in (docs / "samples" / "real_vits").glob("*.wav")}
    assert rate == {22050}
    before = (tmp_path / "runs" / "evals" / "vits-s0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # everything stored: nothing retrained or re-evaluated
    assert (tmp_path / "runs" / "evals" / "vits-s0.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("bad, match", [(dict(refit_steps=(4, 2)), "refit_steps"),
                                        (dict(fixes=(Fix("abs", "abs"),)), "first fix"),
                                        (dict(fixes=(Fix("vits"), Fix("x", "nope"))), "estimator"),
                                        (dict(eval_draws=1), "eval_draws")])
def test_bad_settings_name_themselves(bad, match):
    with pytest.raises(ValueError, match=match):
        RealStudyConfig(**bad)


def test_a_corpus_without_val_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    code = main(["real-study", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val.txt" in err[0]

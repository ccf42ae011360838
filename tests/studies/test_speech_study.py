"""The KL-loss variants of the speech study: each patched loss against its formula, and the statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vits.apps import run_main
from pyro_vits.apps.speech_study import build_parser
from pyro_vits.apps.speech_study import main as study_main
from pyro_vits.data.speech_batches import SpeechConfig
from pyro_vits.data.speech_data import read_corpus
from pyro_vits.data.text import VITS_SYMBOLS
from pyro_vits.infer import HybridEntropyELBO
from pyro_vits.models import speech_model_and_guide
from pyro_vits.studies.speech.report import comparisons, render
from pyro_vits.studies.speech.run import hours_used, stored_run, study_settings
from pyro_vits.studies.speech.variants import (
    RECONSTRUCTION,
    KLVariantELBO,
    cost_ratios,
    equal_compute_steps,
    mel_l1_error,
    negative_kl_fraction,
    paired_difference,
    reconstruction_error_db,
    t_interval,
    unequal_cost,
    variant_elbo,
)

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_corpus"
SPEECH = SpeechConfig(filter_length=256, hop_length=128, win_length=256)


@pytest.fixture(scope="module")
def setup():
    corpus = read_corpus(TINY, SPEECH)
    torch.manual_seed(0)
    model, guide = speech_model_and_guide(len(VITS_SYMBOLS), SPEECH.n_freq, inter_channels=4,
                                          hidden_channels=8, filter_channels=16, n_layers=1,
                                          flow_n_layers=1, n_flows=2, decoder_channels=8, guide_layers=1, n_speakers=2, gin_channels=3)
    return corpus, model, guide


def traces(model, guide, data, seed=0):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(data, subsample_size=3)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(data, subsample_size=3)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    return model_trace, guide_trace


@pytest.mark.parametrize("shift", [0.0, 1e5, -1e5], ids=["as-is", "positive", "negative"])
def test_patched_losses_follow_their_formulas(setup, shift):
    corpus, model, guide = setup
    model_trace, guide_trace = traces(model, guide, corpus.train)
    p_site, q_site = model_trace.nodes["z"], guide_trace.nodes["z"]
    p_site["log_prob_sum"] = p_site["log_prob_sum"] - shift  # move the minibatch KL across 0
    scale = q_site["scale"]
    assert scale == pytest.approx(4 / 3)
    kl = -(q_site["fn"].entropy() * scale).sum() - p_site["log_prob_sum"]
    recon = model_trace.nodes["x"]["log_prob_sum"]
    prior, q = p_site["fn"], q_site["fn"]
    path = prior.alignment(prior.flow(q_site["value"], prior.mask, prior.g))
    d = (prior.expanded(path)[1] - torch.log(q.scale) - 0.5) * prior.mask
    expected = {"clamp": kl.clamp(min=0) - recon, "abs": kl.abs() - recon,
                "abs_elementwise": kl + scale * (d.abs() - d).sum() - recon}
    for name, want in expected.items():
        elbo = KLVariantELBO(name)
        value, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
        torch.testing.assert_close(surrogate, want, rtol=1e-6, atol=1e-3)
        assert value == pytest.approx(float(want.detach()), rel=1e-6)
        assert elbo.negative_steps == int(float(kl.detach()) < 0)


def test_unpatched_loss_is_the_vits_elbo(setup):
    corpus, model, guide = setup
    model_trace, guide_trace = traces(model, guide, corpus.train, seed=2)
    kl = -(guide_trace.nodes["z"]["fn"].entropy() * 4 / 3).sum() - model_trace.nodes["z"]["log_prob_sum"]
    want = float((kl - model_trace.nodes["x"]["log_prob_sum"]).detach())
    pyro.set_rng_seed(2)
    with torch.no_grad():
        got = HybridEntropyELBO(max_plate_nesting=1).loss(model, guide, corpus.train, subsample_size=3)
    assert got == pytest.approx(want, rel=1e-6)


def test_abs_elementwise_only_adds_where_logs_q_exceeds_logs_p_minus_half(setup):
    corpus, model, guide = setup
    model_trace, guide_trace = traces(model, guide, corpus.train, seed=1)
    clamp, _ = KLVariantELBO("clamp")._differentiable_loss_particle(model_trace, guide_trace)
    elementwise, _ = KLVariantELBO("abs_elementwise")._differentiable_loss_particle(model_trace, guide_trace)
    assert elementwise >= clamp  # KL > 0 here, so clamp = vits and the element-wise patch only adds


def test_variant_registry():
    assert variant_elbo("vits_k4").num_particles == 4 and isinstance(variant_elbo("vits"), HybridEntropyELBO)
    assert isinstance(variant_elbo("clamp"), KLVariantELBO)
    for bad in ("mc", "k3"):
        with pytest.raises(ValueError):
            variant_elbo(bad)
    with pytest.raises(ValueError):
        KLVariantELBO("vits")


def test_measures_on_the_tiny_corpus(setup):
    corpus, model, guide = setup
    db = reconstruction_error_db(model, guide, corpus.heldout, batch_size=1)
    assert db == pytest.approx(reconstruction_error_db(model, guide, corpus.heldout, batch_size=2), rel=1e-5)
    assert 0 < db < 200
    neg = negative_kl_fraction(model, guide, corpus.train, batch_size=2, batches=5, seed=3)
    assert neg == negative_kl_fraction(model, guide, corpus.train, batch_size=2, batches=5, seed=3)
    assert 0 <= neg["prob_negative"] <= 1 and math.isfinite(neg["kl_per_frame_mean"])


def test_mel_l1_is_vits_mel_l1_of_the_posterior_mean(setup):
    corpus, _, _ = setup
    torch.manual_seed(0)
    model, guide = speech_model_and_guide(len(VITS_SYMBOLS), SPEECH.n_freq, inter_channels=4, hidden_channels=8,
                                          filter_channels=16, n_layers=1, flow_n_layers=1, n_flows=2,
                                          decoder_channels=8, guide_layers=1, n_speakers=2, gin_channels=3,
                                          likelihood="laplace-mel")
    data = corpus.heldout
    l1 = mel_l1_error(model, guide, data, batch_size=1)
    assert l1 == pytest.approx(mel_l1_error(model, guide, data, batch_size=2), rel=1e-5)
    with torch.no_grad():  # by hand: mean |dec(m_q) - log-mel| over the 80 bins and the valid frames
        m_q, _ = guide.posterior(data)
        err = (model.dec(m_q, data.mask) - model.observation(data.spec)).abs() * data.mask
    assert l1 == pytest.approx(float(err.sum()) / (80 * data.num_frames), rel=1e-5)
    assert RECONSTRUCTION["laplace-mel"] == ("heldout_mel_l1", mel_l1_error)
    with pytest.raises(ValueError, match="gaussian-linear"):
        reconstruction_error_db(model, guide, data)
    with pytest.raises(ValueError, match="laplace-mel"):
        mel_l1_error(setup[1], setup[2], data)


def test_hours_used_counts_the_utterances_read(setup):
    corpus = setup[0]
    frames = int(corpus.train.lengths.sum()) + int(corpus.heldout.lengths.sum())
    assert hours_used(corpus) == pytest.approx(frames * SPEECH.hop_length / SPEECH.sampling_rate / 3600)
    whole = json.loads((TINY / "corpus.json").read_text())["seconds"] / 3600
    assert 0.9 * whole < hours_used(corpus) < 1.1 * whole  # the tiny corpus is read whole


def test_t_interval_and_paired_difference():
    stat = t_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["se"] == pytest.approx(1 / math.sqrt(3))
    assert stat["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2}
    runs = [dict(variant=v, seed=s, x=s + (0.5 if v == "abs" else 0.0) + 0.01 * s * (v == "abs"))
            for v in ("vits", "abs") for s in (0, 1, 2)]
    diff = paired_difference(runs, "x", "abs")
    assert diff["mean"] == pytest.approx(0.51) and diff["half_width"] < 0.1
    with pytest.raises(ValueError):
        t_interval([1.0])


def fake_results():
    runs = []
    for seed in (0, 1, 2):
        for i, variant in enumerate(("vits", "clamp", "abs_elementwise")):
            runs.append(dict(variant=variant, seed=seed, steps=10, s_per_step=1.0 + i, cpu_s_per_step=1.0 + i,
                             heldout_elbo_per_frame=-100.0 - 5 * i - seed, heldout_kl_per_frame=3.0 + i,
                             heldout_recon_db=10.0, prob_negative_kl=0.0, logged_kl_per_frame=3.0,
                             logged_kl_sd_per_frame=0.1, training_steps_kl_negative=0 if i == 1 else None))
    setup = dict(command="python -m pyro_vits.apps.speech_study ...", utc="now", seeds=[0, 1, 2], steps=10,
                 batch_size=8, negative_batches=4, eval_samples=2, sizes={},
                 corpus=dict(folder="c", train=5, heldout=2, description="d"))
    return dict(setup=setup, runs=runs)


def test_render_states_the_command_table_and_findings():
    text = render(fake_results())
    assert "python -m pyro_vits.apps.speech_study" in text and "| abs_elementwise |" in text
    assert "Likelihood `gaussian-linear` (`pyro_vits.models.speech`): a Gaussian on the log-magnitude" in text
    assert "| Δ reconstruction error (dB) |" in text and "mel L1" not in text
    assert "negative on 0 of 30 training steps" in text
    assert "`abs_elementwise`: held-out ELBO differs from `vits` (-10 ± 0 nats/frame)" in text
    assert "hours of audio used not recorded" in text


def test_render_gives_zero_counts_with_a_bound_and_the_hours_used():
    """No "0 ± 0" for P(logged KL < 0): the negative minibatches pooled over seeds, with the 95 % bound
    1 - 0.05^(1/n) when there are none; the hours of audio the study read, not the corpus's."""
    results = fake_results()
    results["setup"]["corpus"]["hours_used"] = 0.186
    text = render(results)
    assert "(0.19 h of audio)" in text
    assert "| 0 / 12 (P ≤ 0.22, 95 % bound) |" in text  # 3 seeds x 4 minibatches, 1 - 0.05^(1/12)
    assert "never negative: 0 of 12 minibatches per variant, so P(negative) ≤ 0.22" in text
    assert "normal-approximation" not in text and "| 0 ± 0 |" not in text
    assert "| clamp | 0 (identical) |" not in text  # clamp differs from vits in fake_results
    results["runs"][1]["prob_negative_kl"] = 0.5  # clamp, seed 0: 2 of its 4 minibatches
    text = render(results)
    assert "| 2 / 12 = 0.167 |" in text and "`clamp` 2 / 12 = 0.167" in text


def test_render_states_the_laplace_mel_likelihood_and_the_mel_l1():
    results = fake_results()
    results["setup"]["likelihood"] = "laplace-mel"
    for r in results["runs"]:
        r["heldout_mel_l1"] = r.pop("heldout_recon_db") / 10
    text = render(results)
    assert "Likelihood `laplace-mel` (`pyro_vits.models.speech`): VITS's loss balance" in text
    assert "45 × (mean over bins of |mel − dec(z)|) + 80 log(2b)" in text and "c_mel = 45" in text
    assert "| mel L1 (log-mel, mean over bins and frames) |" in text and "| Δ mel L1 |" in text
    assert "| abs_elementwise | -10 ± 0 * | 2 ± 0 * | 0 (identical) |" in text
    assert "| 0 / 12 (P ≤ 0.22, 95 % bound) |" in text and "pooled over the variant's seeds" in text
    assert "dB" not in text and "mel L1: mean |`dec(m_q)` − log-mel| over the 80 mel bins" in text


def test_render_only_needs_results(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(fake_results()))
    assert run_main(study_main, ["--corpus", "x", "--out", str(tmp_path), "--render-only", "--docs",
                                 str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "speech_study.md").read_text().startswith("# The KL-loss variants on speech")
    assert json.loads((tmp_path / "docs" / "speech_study_results.json").read_text()) == fake_results()
    capsys.readouterr()
    assert run_main(study_main, ["--corpus", "x", "--out", str(tmp_path / "none"), "--render-only"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cost_ratios_pair_by_seed_and_set_the_equal_compute_steps():
    runs = [dict(variant=v, seed=s, cpu_s_per_step=(1.0 + s) * (1.3 if v == "vits_k4" else 1.0))
            for v in ("vits", "vits_k4") for s in (0, 1, 2)]
    ratios = cost_ratios(runs)
    assert ratios["vits"]["mean"] == 1.0 and ratios["vits"]["half_width"] == 0.0
    assert ratios["vits_k4"]["mean"] == pytest.approx(1.3) and ratios["vits_k4"]["half_width"] < 1e-9
    assert unequal_cost(ratios) == ["vits_k4"]
    noisy = dict(ratios, clamp=t_interval([0.9, 1.1, 1.05]), abs=t_interval([0.8, 0.81, 0.79]))
    assert unequal_cost(noisy) == ["vits_k4", "abs"]
    assert equal_compute_steps(100, 1.3) == 77 and equal_compute_steps(100, 0.8) == 125
    assert equal_compute_steps(2, 10.0) == 1
    for bad in (0.0, -1.0, math.nan, "2"):
        with pytest.raises(ValueError, match="ratio"):
            equal_compute_steps(100, bad)
    with pytest.raises(ValueError, match="vits"):
        cost_ratios([r for r in runs if r["variant"] != "vits"])


def with_equal_compute():
    results = fake_results()
    for seed in (0, 1, 2):
        results["runs"].append(dict(results["runs"][3 * seed], variant="vits_k4", budget="compute", steps=8,
                                    heldout_elbo_per_frame=-200.0 - seed))
    for r in results["runs"][:9]:
        if r["variant"] == "abs_elementwise":
            r["variant"] = "vits_k4"
    results["setup"]["equal_compute"] = ["vits_k4"]
    return results


def test_render_with_an_equal_compute_comparison():
    results = with_equal_compute()
    results["setup"].update(wall_s=90.0, reused=3)
    groups = comparisons(results["runs"])
    assert len(groups["steps"]) == 9 and len(groups["compute"]) == 9
    assert {r["steps"] for r in groups["compute"] if r["variant"] == "vits_k4"} == {8}
    text = render(results)
    assert "## Equal steps (10 steps)" in text and "## Equal compute (the compute of 10 steps of `vits`)" in text
    assert "| vits_k4 | 8 |" in text and "| vits_k4 | 10 |" in text
    assert "`vits_k4` 3 ± 0" in text  # CPU s / step 3 against vits's 1, every seed
    assert "`vits_k4` at equal compute: held-out ELBO differs from `vits` (-100 ± 0 nats/frame)" in text
    assert "with 8 steps against `vits`'s 10" in text and "mostly measures the missing steps" in text
    assert "retrained for round(steps / ratio) steps" in text
    assert "now, 1.5 min wall time on a shared 2-core CPU, 3 of the 12 runs reused from the study folder)" in text


def test_stored_runs_are_reused_only_with_the_same_settings(tmp_path):
    args = build_parser().parse_args(["--corpus", "c", "--out", str(tmp_path), "--steps", "5"])
    folder = tmp_path / "vits_k4-s1-compute"
    folder.mkdir()
    record = dict(variant="vits_k4", seed=1, steps=4, settings=study_settings(args))
    (folder / "study_run.json").write_text(json.dumps(record))
    assert stored_run(args, "vits_k4", 1, 4, "compute") == record
    assert stored_run(args, "vits_k4", 1, 5, "compute") is None  # other steps
    assert stored_run(args, "vits_k4", 1, 4, "steps") is None  # another folder
    args.eval_samples += 1
    assert stored_run(args, "vits_k4", 1, 4, "compute") is None  # other settings
    args.eval_samples -= 1
    args.overwrite = True
    assert stored_run(args, "vits_k4", 1, 4, "compute") is None
    args.overwrite = False
    del record["settings"]["likelihood"]  # a run from before --likelihood: a gaussian-linear one
    (folder / "study_run.json").write_text(json.dumps(record))
    assert stored_run(args, "vits_k4", 1, 4, "compute") == record
    args.likelihood = "laplace-mel"
    assert stored_run(args, "vits_k4", 1, 4, "compute") is None


@pytest.mark.slow
def test_speech_study_smoke_run_with_the_laplace_mel_likelihood(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--corpus", str(TINY), "--out", str(out), "--docs", str(tmp_path / "docs"), "--likelihood",
            "laplace-mel", "--variants", "vits", "clamp", "--seeds", "0", "1", "--steps", "2", "--batch-size",
            "2", "--eval-samples", "2", "--negative-batches", "2", "--equal-compute", "--log-every", "1"]
    assert run_main(study_main, argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["likelihood"] == "laplace-mel" and len(results["runs"]) == 4
    for run in results["runs"]:
        assert run["settings"]["likelihood"] == "laplace-mel" and run["steps"] == 2
        assert "heldout_recon_db" not in run and 0 < run["heldout_mel_l1"] < 20
        assert math.isfinite(run["heldout_elbo_per_frame"]) and math.isfinite(run["heldout_kl_per_frame"])
        model = json.loads((out / f"{run['variant']}-s{run['seed']}" / "config.json").read_text())["model"]
        assert model["likelihood"] == "laplace-mel"
        assert [s for s, _ in run["kl_trajectory"]] == [1, 2]
        gap = run["heldout_alignment_gap"]
        assert 0 <= gap["marginal_minus_mas"][0] <= gap["log_count"] + 1e-9
    page = (tmp_path / "docs" / "speech_study.md").read_text()
    assert "Likelihood `laplace-mel`" in page and "--likelihood laplace-mel" in page
    assert "## The KL regime of `vits`" in page and "per-draw MAS (VITS's term)" in page
    capsys.readouterr()

"""The study's quick preset end to end: files, InferenceData layout, summaries, figures, and numbers that
must agree with the estimators' theory (unbiasedness within MCSE, closed-form variances, skewness)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_vits import _arviz_compat
from pyro_vits.study import (
    FIGURES,
    PRESETS,
    QUALITY_ESTIMATORS,
    StudyConfig,
    cos_density_grid,
    logdet_study,
    negative_batch_study,
    prior_kl_to_teacher,
    publish_docs,
    render_markdown,
    run_study,
    training_data,
)

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]
QUICK = PRESETS["quick"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compare_kl_estimators.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``(out_dir, results)`` of one quick-preset run (module scope: it takes ~30 s on one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("quick")
    try:
        results = run_study(QUICK, out, log=lambda _: None)
    finally:
        torch.set_num_threads(previous)
    return out, results


def within(value: float, target: float, mcse: float, k: float = 4.0) -> bool:
    return abs(value - target) < k * mcse


# ------------------------------------------------------------------------------------------- outputs


def test_results_json_holds_every_sweep(quick):
    out, results = quick
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"config", "quality", "negative", "variance_ratio", "fix_gradient", "training",
                            "timing", "snr", "logdet", "derived", "wall_s"}
    assert on_disk["config"] == json.loads(json.dumps(QUICK.to_dict()))
    assert on_disk["quality"]["cos2d"]["truth"] == results["quality"]["cos2d"]["truth"]
    assert on_disk["wall_s"]["total"] < 120


def test_netcdf_files_have_the_expected_groups_and_dims(quick):
    out, _ = quick
    seeds = len(QUICK.seeds)
    for setting in ("cos2d", "coupling2d", "vits"):
        idata = _arviz_compat.load(out / "netcdf" / f"quality_{setting}.nc")
        post = _arviz_compat.group(idata, "posterior")
        assert set(post.data_vars) == set(QUALITY_ESTIMATORS) - {"gaussian_closed_form"}
        assert post["vits"].dims == ("chain", "draw") and post.sizes["chain"] == seeds
        assert json.loads(post.attrs["config"])["name"] == "quick"
    ratio = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / "variance_ratio.nc"), "posterior")
    assert ratio["gaussian__vits"].dims == ("chain", "draw", "ratio")
    assert np.allclose(ratio["ratio"].values, sorted(QUICK.ratio_grid))
    grad = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / "fix_gradient.nc"), "posterior")
    assert grad["abs__grad"].dims == ("chain", "draw", "param") and grad.sizes["param"] == 4
    for k in QUICK.particles:
        idata = _arviz_compat.load(out / "netcdf" / f"training_K{k}_vp.nc")
        assert set(_arviz_compat.group_names(idata)) == {"posterior", "sample_stats", "observed_data"}
        stats = _arviz_compat.group(idata, "sample_stats")
        assert stats["heldout_elbo_per_frame"].shape == (seeds, QUICK.train_logs)
        assert stats["step"].values[0, -1] == QUICK.train_budget // k
        z = _arviz_compat.group(idata, "posterior")["z"]
        c, _, t = QUICK.train_sizes
        assert z.dims == ("chain", "draw", "utterance", "channel", "frame") and z.shape[-2:] == (c, t)
        assert _arviz_compat.group(idata, "observed_data")["x"].shape[1:] == (c, t)
        attrs = _arviz_compat.group(idata, "posterior").attrs
        assert json.loads(attrs["particles"]) == k and len(json.loads(attrs["psis_khat"])) == seeds
    assert (out / "netcdf" / "training_K1_nvp.nc").exists() and (out / "netcdf" / "snr.nc").exists()


def test_summary_tables_have_ess_rhat_and_mcse(quick):
    out, _ = quick
    stems = ["quality_cos2d", "quality_vits", "negative", "variance_ratio", "fix_gradient", "training_K1_vp",
             "training_K1_nvp"]
    for stem in stems:
        table = pd.read_csv(out / "tables" / f"{stem}.csv", index_col=0)
        assert {"mean", "mcse_mean", "ess_bulk", "r_hat"} <= set(table.columns), stem
        assert (out / "tables" / f"{stem}.md").read_text().startswith("| ")
    table = pd.read_csv(out / "tables" / "quality_cos2d.csv", index_col=0)
    assert (table["ess_bulk"] > 0.5 * QUICK.estimator_draws * len(QUICK.seeds)).all()  # iid draws


def test_every_figure_is_a_non_empty_png(quick):
    out, _ = quick
    for name in FIGURES:
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


# ------------------------------------------------------------------------------------------- numbers


def test_unbiased_estimators_match_the_ground_truths(quick):
    """vits (hybrid) and mc within 4 MCSE of quadrature (2-D) or reference_kl (VITS-sized). k3 is unbiased
    too, but r = p/q has infinite variance once sigma_q < sigma_p / sqrt(2) somewhere (E_q r^2 = int p^2/q
    diverges), so its MCSE means nothing here and it is not tested against it."""
    _, results = quick
    for setting, r in results["quality"].items():
        for name in ("vits", "mc"):
            for k in ("1", "16"):
                est = r["estimators"][name][k]
                assert abs(est["bias"]) < 4 * est["bias_mcse"], (setting, name, k)
        assert r["truth_error"] < 1e-8 if setting != "vits" else r["truth_error"] > 0


def test_closed_form_is_wrong_and_more_particles_shrink_spread_and_negatives(quick):
    _, results = quick
    for setting, r in results["quality"].items():
        vits = r["estimators"]["vits"]
        assert abs(r["estimators"]["gaussian_closed_form"]["bias"]) > 10 * vits["1"]["bias_mcse"], setting
        assert vits["16"]["sd"] == pytest.approx(vits["1"]["sd"] / 4, rel=0.3), setting
        p_neg = [vits[str(k)]["p_negative"] for k in QUICK.particles]
        assert p_neg == sorted(p_neg, reverse=True), setting
        assert r["estimators"]["k3"]["1"]["p_negative"] == 0.0
        clamp, abs_ = r["estimators"]["clamp"]["1"], r["estimators"]["abs"]["1"]
        assert clamp["bias"] >= vits["1"]["bias"] and abs_["bias"] >= clamp["bias"]


def test_clamp_and_abs_bias_the_loss_and_bend_the_gradient(quick):
    _, results = quick
    fixes = results["fix_gradient"]
    assert within(fixes["mean"]["loss_mean"], fixes["truth"], fixes["mean"]["loss_bias_mcse"])
    for name in ("clamp", "abs"):
        assert fixes[name]["loss_bias"] > 4 * fixes[name]["loss_bias_mcse"], name
    assert fixes["mean"]["projection"] == pytest.approx(1.0)
    assert fixes["abs"]["projection"] < fixes["clamp"]["projection"] < 1.0
    assert fixes["clamp"]["zero_gradient_fraction"] == pytest.approx(fixes["p_negative_loss"])


def test_variance_ratio_follows_the_gaussian_theory(quick):
    _, results = quick
    ratio = results["variance_ratio"]
    measured, theory = np.array(ratio["gaussian"]["ratio"]), np.array(ratio["theory_ratio"])
    assert np.allclose(measured / theory, 1.0, atol=0.15)
    assert 0.6 < ratio["gaussian"]["crossing"] < 0.85
    assert ratio["theory_crossing"] == pytest.approx(1 / math.sqrt(2))


def test_negative_batch_means_and_the_skewed_normal_approximation(quick):
    """Per-utterance vits estimates are right-skewed: at N = 1 negatives are *more* frequent than the
    normal approximation says; P(batch mean < 0) falls with N."""
    _, results = quick
    neg = results["negative"]
    rows = [neg["by_batch_size"][str(n)] for n in QUICK.negative_batch_sizes]
    assert neg["skewness"] > 1.0
    assert rows[0]["p_negative"] - rows[0]["p_normal_approx"] > 4 * rows[0]["p_negative_se"]
    assert [r["p_negative"] for r in rows] == sorted(r["p_negative"] for r in rows)[::-1]
    assert within(neg["pooled_mean"], neg["truth"], neg["pooled_mean_se"])


def test_logdet_of_mean_only_couplings_is_zero(quick):
    _, results = quick
    logdet = results["logdet"]
    assert max(abs(v) for v in logdet["mean_only"]["autograd_logdet"]) < 1e-12
    assert logdet["mean_only"]["reported_logdet"] == [0.0] * logdet["inputs"]
    assert logdet["affine"]["max_abs_difference"] < 1e-10
    assert min(abs(v) for v in logdet["affine"]["autograd_logdet"]) > 1e-3


def test_training_snr_and_timing_records(quick):
    _, results = quick
    training = results["training"]
    assert set(training["runs"]) == {f"K{k}_vp" for k in QUICK.particles} | {"K1_nvp"}
    for name, run in training["runs"].items():
        assert run["steps"] * run["particles"] == QUICK.train_budget
        for key, value in run["final"].items():
            assert math.isfinite(value["mean"]) and value["se"] >= 0, (name, key)
        assert sum(run["khat_counts"].values()) == QUICK.train_utterances[1] * len(QUICK.seeds)
        assert len(run["curve"]["heldout_elbo_per_seed"]) == len(QUICK.seeds)
    assert math.isfinite(training["teacher_heldout_loglik_per_frame"])
    fixed = results["snr"]["by_elbo"]["vits"]["fixed"][f"B{QUICK.snr_batch_sizes[0]}"]
    assert fixed["16"]["guide"]["mean"] > 1.5 * fixed["1"]["guide"]["mean"]  # particle noise averages out
    for row in results["timing"]["by_particles"].values():
        assert row["vectorized"] > 0 and row["sequential"] > 0


# ------------------------------------------------------------------------------------------- pieces


def test_sweeps_are_reproducible_on_cpu():
    first, second = negative_batch_study(QUICK), negative_batch_study(QUICK)
    assert first.results == second.results


def test_prior_kl_to_itself_is_zero_and_validation():
    teacher, _, heldout = training_data(QUICK)
    kl, mcse = prior_kl_to_teacher(teacher, teacher, heldout, 4)
    assert abs(kl) < 1e-6 and mcse < 1e-6  # float32 log-densities of the same prior
    with pytest.raises(ValueError, match="num_samples"):
        prior_kl_to_teacher(teacher, teacher, heldout, 1)


def test_config_validation_names_the_argument():
    fields = QUICK.to_dict()
    with pytest.raises(ValueError, match="seeds"):
        StudyConfig(**{**fields, "seeds": (0,)})
    with pytest.raises(ValueError, match="estimator_draws"):
        StudyConfig(**{**fields, "estimator_draws": 1000})
    with pytest.raises(ValueError, match="train_budget"):
        StudyConfig(**{**fields, "train_budget": 100})
    with pytest.raises(ValueError, match="ratio_grid"):
        StudyConfig(**{**fields, "ratio_grid": (0.5, -1.0)})
    with pytest.raises(ValueError, match="seed"):
        QUICK.with_seed(-1)
    assert QUICK.with_seed(10).seeds == (10, 11)
    with pytest.raises(TypeError, match="config must be a StudyConfig"):
        run_study(fields, "unused")
    with pytest.raises(TypeError, match="config must be a StudyConfig"):
        negative_batch_study("quick")
    with pytest.raises(ValueError, match="channels must be even"):
        logdet_study(channels=3)
    with pytest.raises(ValueError, match="num_points"):
        cos_density_grid(num_points=0)


def test_render_markdown_resolves_dotted_paths():
    results = {"a": {"b": 0.123456, "n": {"16": 3}, "xs": [1.5, 2.5]}, "name": "x"}
    text = "v={{ a.b:.3f }} n={{a.n.16}} {{ name }} {{ a.xs.-1:.0f }} {not a placeholder}"
    assert render_markdown(text, results) == "v=0.123 n=3 x 2 {not a placeholder}"
    with pytest.raises(KeyError, match="a.c"):
        render_markdown("{{ a.c }}", results)
    with pytest.raises(KeyError, match="a.xs.2"):
        render_markdown("{{ a.xs.2 }}", results)
    with pytest.raises(TypeError, match="template"):
        render_markdown(3, results)


def test_publish_docs_copies_and_renders(quick, tmp_path):
    out, results = quick
    (tmp_path / "kl_estimators.template.md").write_text("truth {{ quality.cos2d.truth:.4f }}\n")
    rendered = publish_docs(out, tmp_path)
    assert rendered.read_text() == f"truth {results['quality']['cos2d']['truth']:.4f}\n"
    assert all((tmp_path / "figures" / f"{name}.png").exists() for name in FIGURES)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["name"] == "quick"
    with pytest.raises(ValueError, match="missing"):
        publish_docs(tmp_path / "nowhere", tmp_path)


def test_example_parses_arguments_and_prints_the_headline(quick):
    spec = importlib.util.spec_from_file_location("compare_kl_estimators", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(["--preset", "docs", "--seed", "3", "--out", "x"])
    parsed = (args.preset, args.seed, args.out, args.device, args.docs, args.threads)
    assert parsed == ("docs", 3, "x", "cpu", None, 1)
    text = example.headline(quick[1])
    assert "cos2d" in text and "K16_vp" in text and "teacher" in text


def test_committed_docs_are_rendered_from_the_committed_results():
    """docs/kl_estimators.md is exactly its template filled from docs/results.json (both written by
    ``make docs``), and every figure it shows is committed, small, and listed in FIGURES."""
    docs = EXAMPLE.parents[1] / "docs"
    results = json.loads((docs / "results.json").read_text())
    rendered = render_markdown((docs / "kl_estimators.template.md").read_text(), results)
    assert (docs / "kl_estimators.md").read_text() == rendered
    assert results["config"]["name"] == "docs" and "{{" not in rendered
    shown = set(re.findall(r"\(figures/([\w]+)\.png\)", rendered))
    assert shown == set(FIGURES)
    for name in FIGURES:
        size = (docs / "figures" / f"{name}.png").stat().st_size
        assert 5_000 < size < 250_000, name

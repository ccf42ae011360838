"""The study package: the ``test`` preset end to end (files, InferenceData layout, figures, the app and
publishing), and the sweeps' numbers against their theory with the ``quick`` sizes (unbiasedness within
MCSE, closed-form variances, exact tails, the element-wise abs optimum, the DReG closed forms)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_vits import _arviz_compat
from pyro_vits.apps import study as app
from pyro_vits.studies.kl import (
    FIGURES,
    PRESETS,
    QUALITY_ESTIMATORS,
    StudyConfig,
    cos_density_grid,
    dreg_linear_gaussian_study,
    fix_gradient_study,
    gradient_identity,
    load_config,
    logdet_study,
    negative_batch_study,
    prior_kl_to_teacher,
    publish_docs,
    regime_profile,
    regime_study,
    render_markdown,
    run_study,
    sigma_optimum_study,
    training_data,
    variance_ratio_study,
)
from pyro_vits.studies.kl.common import mean_ci, t_quantile

pytestmark = pytest.mark.usefixtures("single_thread")
TEST, QUICK = PRESETS["test"], PRESETS["quick"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "compare_kl_estimators.py"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """``(out_dir, results)`` of one ``test``-preset run (module scope)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study")
    try:
        results = run_study(TEST, out, log=lambda _: None)
    finally:
        torch.set_num_threads(previous)
    return out, results


def within(value: float, target: float, mcse: float, k: float = 4.0) -> bool:
    return abs(value - target) < k * mcse


# ------------------------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_results_netcdf_tables_and_figures(small):
    out, results = small
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"config", "quality", "negative", "regime", "variance_ratio", "fix_gradient",
                            "sigma_optimum", "training", "timing", "snr", "dreg", "logdet", "derived",
                            "gradient_identity", "wall_s"}
    assert on_disk["config"] == json.loads(json.dumps(TEST.to_dict()))
    seeds = len(TEST.seeds)
    for setting in ("cos2d", "cos2d_thread", "coupling2d", "vits"):
        post = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / f"quality_{setting}.nc"), "posterior")
        assert set(post.data_vars) == set(QUALITY_ESTIMATORS) - {"gaussian_closed_form"}
        assert post["vits"].dims == ("chain", "draw") and post.sizes["chain"] == seeds
    grad = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / "fix_gradient.nc"), "posterior")
    assert grad["abs_elementwise__grad"].dims == ("chain", "draw", "param")
    for name, run in results["training"]["runs"].items():
        stats = _arviz_compat.group(_arviz_compat.load(out / "netcdf" / f"training_{name}.nc"), "sample_stats")
        assert stats["heldout_elbo_per_frame"].shape == (seeds, TEST.train_logs)
        assert run["steps"] * run["particles"] == TEST.train_budget
        assert sum(run["khat_counts"].values()) == TEST.train_utterances[1] * seeds
        es = run["final"]["early_stop_heldout_elbo_per_frame"]
        assert es["mean"] >= run["final"]["heldout_elbo_per_frame"]["mean"] - 10 and es["ci95"] > es["se"]
    assert set(results["training"]["runs"]) == {"K1_vp", "K2_vp", "K1_nvp", "nvpteacher_K1_vp",
                                                "nvpteacher_K1_nvp"}
    table = pd.read_csv(out / "tables" / "quality_cos2d.csv", index_col=0)
    assert {"mean", "mcse_mean", "ess_bulk"} <= set(table.columns)
    for name in FIGURES:
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_publish_docs_copies_and_renders(small, tmp_path):
    out, results = small
    (tmp_path / "kl_estimators.template.md").write_text("truth {{ quality.cos2d.truth:.4f }}\n")
    rendered = publish_docs(out, tmp_path)
    assert rendered.read_text() == f"truth {results['quality']['cos2d']['truth']:.4f}\n"
    assert all((tmp_path / "figures" / f"{name}.png").exists() for name in FIGURES)
    assert not list(tmp_path.rglob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="missing"):
        publish_docs(tmp_path / "nowhere", tmp_path)


@pytest.mark.slow
def test_app_runs_the_test_preset_and_headline(small, tmp_path, capsys):
    assert app.headline(small[1]).count("nats/frame") >= 2
    config = tmp_path / "study.toml"
    config.write_text('[study]\npreset = "test"\nseeds = [3, 4]\n')
    assert app.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["seeds"] == [0, 1]  # --seed (default 0) renumbers the config's seeds
    assert "wrote" in capsys.readouterr().out


def test_app_raises_user_errors():
    parser = app.build_parser("pyro-vits study")
    assert parser.prog == "pyro-vits study"
    with pytest.raises(FileNotFoundError, match="config file"):
        app.main(["--config", "/nonexistent.toml"])
    with pytest.raises(FileNotFoundError, match="kl_estimators.template.md"):
        app.main(["--preset", "test", "--docs", "/nonexistent"])
    with pytest.raises(ValueError, match="threads"):
        app.main(["--threads", "0"])


def test_load_config_overrides_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('preset = "quick"\nratio_draws = 128\nseeds = [0, 1, 2]\n')
    config = load_config(path)
    assert config.name == "quick" and config.ratio_draws == 128 and config.seeds == (0, 1, 2)
    path.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_config(path)
    path.write_text('preset = "nope"\n')
    with pytest.raises(ValueError, match="preset"):
        load_config(path)


def test_example_is_a_tutorial_that_calls_the_library(capsys):
    spec = importlib.util.spec_from_file_location("compare_kl_estimators", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.tour(2000)
    text = capsys.readouterr().out
    assert "quadrature" in text and "control_variate" in text and "abs_elementwise" in text
    assert len(EXAMPLE.read_text().splitlines()) < 80


# ------------------------------------------------------------------------------------------- numbers


@pytest.mark.slow
def test_unbiased_estimators_match_the_ground_truths(small):
    """vits, mc and control_variate within 4 MCSE of quadrature (2-D) or reference_kl (VITS-sized); the
    element-wise abs is biased by exactly 2 sum max(-d, 0) (d = logs_p - logs_q - 1/2); k3's facts."""
    _, results = small
    for setting, r in results["quality"].items():
        for name in ("vits", "mc", "control_variate"):
            for k in ("1", "2"):
                est = r["estimators"][name][k]
                assert abs(est["bias"]) < 4 * est["bias_mcse"], (setting, name, k)
        assert r["estimators"]["k3"]["1"]["p_negative"] == 0.0
    assert not results["quality"]["cos2d"]["k3"]["variance_finite"]  # sigma_q1 = 0.6 < 1/sqrt(2)
    assert not results["quality"]["vits"]["k3"]["variance_finite"]  # sigma_q = sigma_p / 2
    assert results["quality"]["vits"]["k3"]["equals_mc_minus_1_fraction"] > 0.9  # r = p/q underflows
    ident = results["gradient_identity"]
    assert ident["mc_max_abs_difference"] < 1e-12 and ident["control_variate_max_abs_difference"] < 1e-12


def test_fixes_bias_the_loss_and_bend_the_gradient():
    fixes = fix_gradient_study(QUICK).results
    assert within(fixes["mean"]["loss_mean"], fixes["truth"], fixes["mean"]["loss_bias_mcse"])
    for name in ("clamp", "abs", "abs_elementwise"):
        assert fixes[name]["loss_bias"] > 4 * fixes[name]["loss_bias_mcse"], name
    assert fixes["mean"]["projection"] == pytest.approx(1.0)
    assert fixes["abs"]["projection"] < fixes["clamp"]["projection"] < 1.0
    assert fixes["clamp"]["zero_gradient_fraction"] == pytest.approx(fixes["p_negative_loss"])
    assert fixes["abs_elementwise"]["loss_bias"] == pytest.approx(2.0, abs=0.1)  # 1 nat per element, 2 elements
    se = fixes["p_negative_loss_se"]
    assert within(fixes["p_negative_loss"], fixes["p_negative_exact"], se)


def test_element_wise_abs_moves_the_sigma_optimum_to_exp_minus_half():
    optimum = sigma_optimum_study(QUICK).results["optimum"]
    assert optimum["mean"] == pytest.approx(1.0, abs=0.05)
    assert optimum["abs_elementwise"] == pytest.approx(math.exp(-0.5), abs=0.03)


def test_variance_ratios_follow_the_gaussian_theory():
    ratio = variance_ratio_study(QUICK).results
    for name in ("vits", "control_variate"):
        row = ratio["gaussian"][name]
        assert max(abs(z) for z in row["z_vs_theory"] if z is not None) < 4, name
    assert 0.6 < ratio["gaussian"]["vits"]["crossing"] < 0.85
    assert all(c <= 1 + 1e-12 for c in ratio["gaussian"]["control_variate"]["ratio"])  # never above full MC
    assert all(np.array(ratio["theory"]["control_variate"]) <= np.array(ratio["theory"]["vits"]) + 1e-12)


def test_negative_batch_means_agree_with_the_exact_tails():
    neg = negative_batch_study(QUICK).results
    vits = neg["by_estimator"]["vits"]
    assert vits["skewness"] > 1.0
    for row in vits["by_batch_size"].values():
        assert abs(row["z_vs_exact"]) < 4
    first = vits["by_batch_size"]["1"]
    assert first["p_exact"] > first["p_normal_approx"]  # right skew: more negatives than Phi at N = 1
    assert within(vits["pooled_mean"], neg["truth"], vits["pooled_mean_se"])
    assert negative_batch_study(QUICK).results == neg  # reproducible on CPU


def test_regime_calculator_and_its_simulation():
    a, b = regime_profile(0.1)
    assert a.shape == b.shape == (192,)
    kl = float(np.sum(-np.log(a) + (a * a + b * b) / 2 - 0.5))
    assert kl == pytest.approx(0.1, rel=1e-9)
    regime = regime_study(TEST).results
    for row in regime["by_kl"].values():
        for name, cells in row["by_estimator"].items():
            sim = cells["simulation"]
            assert sim["z_vs_exact"] is None or abs(sim["z_vs_exact"]) < 4, name
            p = [cells[str(f)]["log10_p"] for f in TEST.regime_frames]
            assert p == sorted(p, reverse=True), name
        ps = {name: row["by_estimator"][name][str(TEST.regime_frames[0])]["log10_p"]
              for name in ("vits", "control_variate")}
        assert ps["control_variate"] <= ps["vits"]


def test_dreg_matches_the_linear_gaussian_closed_forms():
    config = replace(QUICK, particles=(1, 16), dreg_dims=(1,), dreg_repeats=256)
    dreg = dreg_linear_gaussian_study(config).results["by_dim"]
    for d, rows in dreg.items():
        assert rows["1"]["max_abs_z_vs_exact_elbo_gradient"] < 4.5, d
        for row in rows.values():
            assert row["max_abs_at_posterior"] < 1e-12 and row["max_abs_z_vs_iwae"] < 4.5
    snr = [dreg["1"][str(k)]["dreg_snr"]["mean"] for k in config.particles]
    assert snr[-1] > 2 * snr[0]  # rises with K in one dimension (Tucker et al. 2019)


def test_logdet_of_mean_only_couplings_is_zero():
    logdet = logdet_study()
    assert max(abs(v) for v in logdet["mean_only"]["autograd_logdet"]) < 1e-12
    assert logdet["mean_only"]["reported_logdet"] == [0.0] * logdet["inputs"]
    assert logdet["affine"]["max_abs_difference"] < 1e-10
    assert min(abs(v) for v in logdet["affine"]["autograd_logdet"]) > 1e-3


def test_gradient_identity_holds_draw_by_draw():
    ident = gradient_identity(draws=16, seed=3)
    assert ident["mc_max_abs_difference"] < 1e-12 and ident["control_variate_max_abs_difference"] < 1e-12


# ------------------------------------------------------------------------------------------- pieces


def test_t_intervals():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-2)
    out = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert out["mean"] == 3.0 and out["ci95"] == pytest.approx(2.7764 * out["se"], rel=1e-3)


def test_prior_kl_to_itself_is_zero_and_validation():
    teacher, _, heldout = training_data(TEST)
    kl, mcse = prior_kl_to_teacher(teacher, teacher, heldout, 4)
    assert abs(kl) < 1e-6 and mcse < 1e-6  # float32 log-densities of the same prior
    with pytest.raises(ValueError, match="num_samples"):
        prior_kl_to_teacher(teacher, teacher, heldout, 1)
    with pytest.raises(ValueError, match="teacher"):
        training_data(TEST, teacher="gaussian")


def test_config_validation_names_the_argument():
    fields = QUICK.to_dict()
    for key, value in (("seeds", (0,)), ("estimator_draws", 1000), ("train_budget", 100),
                       ("ratio_grid", (0.5, -1.0)), ("regime_kls", ()), ("final_lr_ratio", 0.0)):
        with pytest.raises(ValueError, match=key):
            StudyConfig(**{**fields, key: value})
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
    with pytest.raises(ValueError, match="kl_per_frame"):
        regime_profile(-1.0)
    with pytest.raises(ValueError, match="draws"):
        gradient_identity(draws=0)
    with pytest.raises(ValueError, match="points"):
        sigma_optimum_study(QUICK, points=0)


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


def test_committed_docs_are_rendered_from_the_committed_results():
    """docs/kl_estimators.md is exactly its template filled from docs/results.json (both written by
    ``make docs``), and every figure it shows is committed, small, and listed in FIGURES."""
    docs = EXAMPLE.parents[1] / "docs"
    results = json.loads((docs / "results.json").read_text())
    rendered = render_markdown((docs / "kl_estimators.template.md").read_text(), results)
    assert (docs / "kl_estimators.md").read_text() == rendered
    assert results["config"]["name"] == "docs" and "{{" not in rendered
    shown = re.findall(r"\(figures/([\w]+)\.png\)", rendered)
    assert set(shown) == set(FIGURES) and len(shown) == len(set(shown))  # each figure shown once
    for name in FIGURES:
        size = (docs / "figures" / f"{name}.png").stat().st_size
        assert 5_000 < size < 250_000, name

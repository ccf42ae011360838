"""The study's figure functions on small synthetic inputs: PNGs are written, bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_vits import plots
from pyro_vits.kl import names

pytestmark = pytest.mark.usefixtures("single_thread")
PNG = b"\x89PNG\r\n\x1a\n"
RNG = np.random.default_rng(0)


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 3000


def curve(offset: float) -> dict:
    steps = [10, 20, 30, 40]
    elbo = [-20.0 + offset, -10.0 + offset, -8.0 + offset, -7.5 + offset]
    return {"step": steps, "svi_wall_s": [0.5, 1.0, 1.5, 2.0], "heldout_elbo_per_frame": elbo,
            "heldout_elbo_per_seed": [elbo, [e - 0.2 for e in elbo]],
            "heldout_kl_per_frame": [9.0, 8.0, 7.5, 7.4]}


ESTIMATORS = names(plot="histogram") + names(plot="mean line")  # what the histograms figure draws


def test_estimator_histograms(tmp_path):
    draws = {s: {e: RNG.normal(0.5, 1.0, size=(2, 200)) for e in ESTIMATORS} for s in ("cos2d", "vits")}
    plots.plot_estimator_histograms(draws, {"cos2d": 0.5, "vits": 0.4}, {"cos2d": 0.3, "vits": 20.0},
                                    tmp_path / "h.png")
    assert_png(tmp_path / "h.png")
    with pytest.raises(ValueError, match="truths lacks keys \\['vits'\\]"):
        plots.plot_estimator_histograms(draws, {"cos2d": 0.5}, {"cos2d": 0.3, "vits": 2.0}, tmp_path / "x.pn")
    with pytest.raises(ValueError, match="draws\\['cos2d'\\] lacks keys \\['abs_elementwise'\\]"):
        bad = {"cos2d": {e: draws["cos2d"][e] for e in ESTIMATORS[:-1]}}
        plots.plot_estimator_histograms(bad, {"cos2d": 0.5}, {"cos2d": 0.3}, tmp_path / "x.png")


def _negative_row(p_exact: list[float], measured: list[float]) -> dict:
    sizes = ["1", "64", "4096"]
    return {"by_batch_size": {n: {"p_negative": m, "p_negative_se": 0.01, "p_exact": e}
                              for n, m, e in zip(sizes, measured, p_exact)},
            "curve": {"batch_size": [1, 64, 4096], "p_exact": p_exact, "p_normal_approx": [0.5, 0.2, 1e-4]}}


def test_negative_vs_batch_size_marks_zero_counts_at_the_exact_tail(tmp_path):
    negative = {"by_estimator": {"vits": _negative_row([0.6, 0.2, 1e-5], [0.6, 0.21, 0.0]),
                                 "mc": _negative_row([0.4, 0.05, 1e-20], [0.41, 0.05, 0.0])}}
    plots.plot_negative_vs_batch_size(negative, tmp_path / "n.png")
    assert_png(tmp_path / "n.png")
    with pytest.raises(ValueError, match="curve"):
        plots.plot_negative_vs_batch_size({"by_estimator": {"vits": {"by_batch_size": {}}}}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="negative must be a mapping"):
        plots.plot_negative_vs_batch_size([1, 2], tmp_path / "x.png")


def test_negative_regime(tmp_path):
    def cells(shift: float) -> dict:
        out = {str(f): {"log10_p": -shift * f / 1000, "log10_p_normal": -shift * f / 900} for f in (1000, 10000)}
        return {**out, "simulation": {"p_negative": 10 ** (-shift / 10)}}

    regime = {"frames": [1000, 10000], "sim_frames": 100, "channels": 192,
              "by_kl": {kl: {"by_estimator": {e: cells(float(kl) + 0.1) for e in ("vits", "mc")}}
                        for kl in ("0.1", "1")}}
    plots.plot_negative_regime(regime, tmp_path / "r.png")
    assert_png(tmp_path / "r.png")
    with pytest.raises(ValueError, match="sim_frames"):
        plots.plot_negative_regime({"by_kl": {}, "frames": []}, tmp_path / "x.png")


def test_variance_ratio_and_sigma_optimum(tmp_path):
    r = [0.3, 0.7, 1.5]
    row = {"ratio": [0.1, 1.0, 2.3], "ratio_se": [0.01, 0.05, 0.1]}
    ratio = {"ratios": r, "theory_crossing": 0.7071,
             "theory_curve": {"ratios": r, "vits": [0.1, 1.0, 2.3], "control_variate": [0.1, 0.3, 0.5]},
             "gaussian": {"vits": row, "control_variate": row}, "cos": {"vits": row, "control_variate": row}}
    plots.plot_variance_ratio(ratio, tmp_path / "v.png")
    assert_png(tmp_path / "v.png")
    with pytest.raises(ValueError, match="cos"):
        plots.plot_variance_ratio({k: v for k, v in ratio.items() if k != "cos"}, tmp_path / "x.png")
    optimum = {"ratios": r, "theory_optimum": {"mean": 1.0, "abs_elementwise": 0.61},
               "by_fix": {"mean": {"mean": [-1.0, -0.5, 1.0], "mcse": [0.1] * 3},
                          "abs_elementwise": {"mean": [-1.0, 1.0, 2.0], "mcse": [0.1] * 3}},
               "crossing": {"mean": {"optimum": 0.9, "kind": "root"},
                            "abs_elementwise": {"optimum": 0.61, "kind": "kink"}}}
    plots.plot_sigma_optimum(optimum, tmp_path / "o.png")
    assert_png(tmp_path / "o.png")
    plots.plot_sigma_optimum(dict(optimum, crossing={"mean": None, "abs_elementwise": None}), tmp_path / "n.png")
    with pytest.raises(ValueError, match="by_fix"):
        plots.plot_sigma_optimum({"ratios": r, "theory_optimum": {}, "crossing": {}}, tmp_path / "x.png")


def test_dreg_check(tmp_path):
    rows = {str(k): {f"{n}_snr": {"mean": s * k, "se": 0.01} for n, s in (("dreg", 0.5), ("iwae", 0.2))}
            for k in (1, 2, 4)}
    plots.plot_dreg_check({"by_dim": {"1": rows, "16": rows}}, tmp_path / "d.png")
    assert_png(tmp_path / "d.png")
    with pytest.raises(ValueError, match="by_dim"):
        plots.plot_dreg_check({}, tmp_path / "x.png")


def test_snr_vs_particles(tmp_path):
    def rows(scale: float) -> dict:
        return {str(k): {g: {"mean": scale * np.sqrt(k), "se": 0.1} for g in ("prior_flow", "guide")}
                for k in (1, 2, 4)}

    snr = {"by_elbo": {e: {"fixed": {"B8": rows(2.0)}, "minibatch": {"B8": rows(0.5)}}
                       for e in ("vits", "stl")}}
    plots.plot_snr_vs_particles(snr, "B8", tmp_path / "s.png")
    assert_png(tmp_path / "s.png")
    with pytest.raises(ValueError, match="by_elbo"):
        plots.plot_snr_vs_particles({}, "B8", tmp_path / "x.png")


def test_shared_legend_narrows_until_it_fits_the_figure():
    """Long labels in 4 columns would be wider than two panels: the legend drops columns until it fits."""
    fig, axes = plots._figure(2)
    for i in range(7):
        axes[0].plot([1, 2], [i, i], label=f"estimator number {i}, fresh minibatch each repeat")
    plots._shared_legend(fig, axes[0], ncol=4)
    (legend,) = fig.legends
    assert legend._ncols < 4
    assert legend.get_window_extent(fig.canvas.get_renderer()).width <= fig.bbox.width


def test_training_figures(tmp_path):
    plots.plot_elbo_vs_wall_time({1: curve(0.0), 4: curve(-0.5)}, -6.0, tmp_path / "w.png")
    plots.plot_coupling_comparison({"VP": curve(0.0), "NVP": curve(-1.0)}, tmp_path / "c.png")
    assert_png(tmp_path / "w.png")
    assert_png(tmp_path / "c.png")
    broken = {k: v for k, v in curve(0.0).items() if k != "svi_wall_s"}
    with pytest.raises(ValueError, match="svi_wall_s"):
        plots.plot_elbo_vs_wall_time({1: broken}, -6.0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_coupling_comparison({}, tmp_path / "x.png")


def test_khat_and_cos_density(tmp_path):
    plots.plot_khat({"K1_vp": [0.1, 0.6, 0.9], "K1_nvp": [0.3, 0.4]}, (0.5, 0.7), tmp_path / "k.png")
    x = np.linspace(-3, 3, 31)
    xx, yy = np.meshgrid(x, x)
    grid = {"x": x, "log_base": -(xx**2 + yy**2) / 2, "log_prior": -(xx**2 + (yy + np.cos(xx)) ** 2) / 2}
    plots.plot_cos_density(grid, 1.0, tmp_path / "d.png")
    assert_png(tmp_path / "k.png")
    assert_png(tmp_path / "d.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_khat({}, (0.5, 0.7), tmp_path / "x.png")
    with pytest.raises(ValueError, match="log_prior"):
        plots.plot_cos_density({"x": x, "log_base": grid["log_base"]}, 1.0, tmp_path / "x.png")


def test_a_failed_save_leaves_no_file(tmp_path):
    """Figures are written to a temporary name and renamed: an unknown format leaves the folder empty."""
    with pytest.raises(ValueError, match="bogus"):
        plots.plot_khat({"K1_vp": [0.1, 0.6]}, (0.5, 0.7), tmp_path / "k.bogus")
    assert list(tmp_path.iterdir()) == []
    plots.plot_khat({"K1_vp": [0.1, 0.6]}, (0.5, 0.7), tmp_path / "k")
    assert_png(tmp_path / "k.png")  # no suffix: PNG with ".png" appended, as Figure.savefig does

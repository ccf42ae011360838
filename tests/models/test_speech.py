"""The speech model (text -> aligned flow prior -> spectrogram) on the committed tiny corpus: SVI steps, its
KL term against VITS's computation (reference written here), the exported VITS generator, and bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyro
import pytest
import soundfile
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from speech_helpers import SIZES, SPEECH, TINY, make_pair

from pyro_vits.apps import run_main
from pyro_vits.apps.fit_speech import main as fit_speech_main
from pyro_vits.data.speech_data import SpeechData, load_speech_data, read_corpus
from pyro_vits.distributions import AlignedFlowPrior
from pyro_vits.infer import HybridEntropyELBO
from pyro_vits.kl import vits_kl
from pyro_vits.models import SpeechModel
from pyro_vits.nn.alignment import even_alignment
from pyro_vits.vits import export_vits_generator, load_vits_generator, vits_generator_state


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(TINY, SPEECH)


def data_for(corpus, speakers: int) -> SpeechData:
    d = corpus.train
    return d if speakers else SpeechData(d.spec, d.lengths, d.text, d.text_lengths, None)


# --------------------------------------------------------------------------------------------------
# the data
# --------------------------------------------------------------------------------------------------


def test_tiny_corpus_reads_as_vits_does(corpus):
    assert (corpus.train.n, corpus.heldout.n, corpus.n_speakers) == (4, 2, 2)
    d = corpus.train
    assert d.channels == 129 and d.text.dtype == torch.long and bool((d.text[:, 0] == 0).all())  # add_blank
    assert bool((d.lengths >= d.text_lengths).all())
    assert bool((d.spec * (1 - d.mask) == 0).all()) and bool((d.spec[d.mask.expand_as(d.spec) > 0] > 0).all())


def test_subset_trims_padding_and_keeps_ids(corpus):
    d = corpus.train
    idx = torch.tensor([2, 0])
    sub = d.subset(idx)
    assert sub.frames == int(d.lengths[idx].max()) and sub.text.shape[1] == int(d.text_lengths[idx].max())
    assert sub.index.tolist() == [2, 0] and sub.speaker.tolist() == d.speaker[idx].tolist()
    assert torch.equal(sub.spec[1, :, : int(d.lengths[0])], d.spec[0, :, : int(d.lengths[0])])
    assert d.describe()["num_frames"] == d.num_frames


def test_speech_data_rejects_fewer_frames_than_symbols():
    with pytest.raises(ValueError, match="at least one frame per symbol"):
        SpeechData(torch.ones(1, 3, 4), torch.tensor([4]), torch.ones(1, 5, dtype=torch.long),
                   torch.tensor([5]))
    with pytest.raises(ValueError, match="non-finite"):
        SpeechData(torch.full((1, 3, 4), math.nan), torch.tensor([4]), torch.ones(1, 2, dtype=torch.long),
                   torch.tensor([2]))


# --------------------------------------------------------------------------------------------------
# SVI on the tiny corpus
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_only", [True, False], ids=["mean_only", "affine"])
@pytest.mark.parametrize("speakers", [0, 2], ids=["single", "speakers"])
def test_one_svi_step_updates_every_part(corpus, mean_only, speakers):
    model, guide = make_pair(mean_only, speakers)
    data = data_for(corpus, speakers)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *guide.named_parameters()]}
    svi = SVI(model, guide, ClippedAdam({"lr": 1e-2}), HybridEntropyELBO(num_particles=2,
                                                                          vectorize_particles=True,
                                                                          max_plate_nesting=1))
    loss = svi.step(data, subsample_size=3)
    assert math.isfinite(loss)
    moved = {n.split(".")[0] for n, p in [*model.named_parameters(), *guide.named_parameters()]
             if not torch.equal(p.detach(), before[n])}
    expected = {"enc_p", "flow", "dec", "log_sigma_x", "pre", "enc", "proj"}
    expected |= {"emb_g"} if speakers else set()
    assert expected <= moved


# --------------------------------------------------------------------------------------------------
# the KL term against VITS's training step (reference written from VITS's equations)
# --------------------------------------------------------------------------------------------------


def reference_path(score: np.ndarray, frames: int, tokens: int) -> np.ndarray:
    """Monotonic alignment maximising the summed score (every frame one token, tokens non-decreasing,
    every token used, from (0, 0) to (frames-1, tokens-1)) by plain dynamic programming."""
    best = np.full((frames, tokens), -np.inf)
    best[0, 0] = score[0, 0]
    for y in range(1, frames):
        for x in range(tokens):
            prev = max(best[y - 1, x], best[y - 1, x - 1] if x else -np.inf)
            best[y, x] = score[y, x] + prev
    path = np.zeros((frames, tokens))
    x = tokens - 1
    for y in range(frames - 1, -1, -1):
        path[y, x] = 1
        if y and x and (x == y or best[y - 1, x - 1] > best[y - 1, x]):
            x -= 1
    return path


def vits_reference_kl(z, m_q_unused, logs_q, m_p, logs_p, x_mask, y_mask, flow, g):
    """VITS's SynthesizerTrn.forward KL: z_p = flow(z); for each utterance the score of frame y vs token x is
    sum_c log N(z_p[c, y]; m_p[c, x], exp(logs_p[c, x])); the maximum monotonic path expands m_p, logs_p;
    kl_loss(z_p, logs_q, m_p, logs_p, y_mask). Returns (kl per frame, summed flow log-determinant)."""
    z_p, logdet = flow.forward_and_logdet(z, y_mask, g)
    paths = []
    for b in range(z.shape[0]):
        frames, tokens = int(y_mask[b].sum()), int(x_mask[b].sum())
        zp, mu, ls = (t.double().numpy()
                      for t in (z_p[b, :, :frames], m_p[b, :, :tokens], logs_p[b, :, :tokens]))
        score = (-0.5 * math.log(2 * math.pi) - ls[:, None, :]
                 - 0.5 * (zp[:, :, None] - mu[:, None, :]) ** 2 * np.exp(-2 * ls[:, None, :])).sum(0)
        path = np.zeros((z.shape[-1], m_p.shape[-1]))
        path[:frames, :tokens] = reference_path(score, frames, tokens)
        paths.append(path)
    path = torch.tensor(np.stack(paths), dtype=z.dtype)  # (B, T_spec, T_text)
    m_al = torch.einsum("byx,bcx->bcy", path, m_p)
    logs_al = torch.einsum("byx,bcx->bcy", path, logs_p)
    return vits_kl(z_p, logs_q, m_al, logs_al, y_mask), logdet.sum()


@pytest.mark.parametrize("mean_only", [True, False], ids=["mean_only", "affine"])
@pytest.mark.parametrize("speakers", [0, 2], ids=["single", "speakers"])
def test_kl_term_at_one_particle_is_vits_kl(corpus, mean_only, speakers):
    model, guide = make_pair(mean_only, speakers, seed=3)
    data = data_for(corpus, speakers)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(data)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data)
        q_site, p_site = guide_trace.nodes["z"], model_trace.nodes["z"]
        kl_model = (-q_site["fn"].entropy() - p_site["fn"].log_prob(p_site["value"])).sum()
        m_q, logs_q = guide.posterior(data)
        _, m_p, logs_p, x_mask = model.enc_p(data.text, data.text_lengths)
        g = model.speaker_embedding(data)
        reference, logdet = vits_reference_kl(q_site["value"], m_q, logs_q, m_p, logs_p, x_mask, data.mask,
                                              model.flow, g)
    frames = data.num_frames
    assert (logdet == 0) == mean_only
    # -H(q) - log p(z) = frames * kl_loss - log|det df/dz| (VITS drops the log-determinant: 0 when mean-only)
    torch.testing.assert_close(kl_model, reference * frames - logdet, rtol=1e-5, atol=1e-4)


def test_each_particle_gets_its_own_alignment(corpus):
    model, guide = make_pair(True, 0, seed=5)
    data = data_for(corpus, 0).subset(torch.tensor([0, 1]))
    with torch.no_grad():
        prior = model.prior(data)
        m_q, logs_q = guide.posterior(data)
        z = (m_q + 3.0 * torch.randn((4,) + m_q.shape) * torch.exp(logs_q)) * data.mask  # (K, B, C, T)
        log_p = prior.expand((4, 2)).log_prob(z)
        z_p = model.flow(z, data.mask)
        paths = prior.alignment(z_p)
        for k in range(4):
            single = prior.aligned(paths[k]).log_prob(z[k])
            torch.testing.assert_close(log_p[k], single, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(prior.log_prob(z[k]), single, rtol=1e-5, atol=1e-4)
    assert paths.sum(-1)[..., : int(data.lengths.min())].eq(1).all()
    assert not all(torch.equal(paths[0], paths[k]) for k in range(1, 4))


def test_prior_draws_use_an_even_alignment(corpus):
    model, _ = make_pair(False, 2)
    data = data_for(corpus, 2)
    with torch.no_grad():
        z = model.prior(data).rsample((3,))
    assert z.shape == (3, data.n, 6, data.frames) and bool((z * (1 - data.mask) == 0).all())
    path = even_alignment(data.mask, data.text_mask)
    valid = data.mask[:, 0] > 0
    assert bool((path.sum(-1)[valid] == 1).all())
    assert bool((path.sum(-2) >= 1).sum(-1).eq(data.text_lengths).all())
    token = path.argmax(-1)
    assert bool(((token[:, 1:] >= token[:, :-1]) | ~valid[:, 1:]).all())


def test_aligned_prior_validates_its_arguments(corpus):
    model, _ = make_pair(True, 0)
    m = torch.zeros(1, 6, 3)
    with pytest.raises(ValueError, match="m_p and logs_p"):
        AlignedFlowPrior(m, torch.zeros(1, 5, 3), torch.ones(1, 1, 3), model.flow, torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="text_mask"):
        AlignedFlowPrior(m, m, torch.ones(1, 1, 2), model.flow, torch.ones(1, 1, 4))
    with pytest.raises(TypeError):
        AlignedFlowPrior(m, m, torch.ones(1, 1, 3), "flow", torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="frequency bins"):
        model(SpeechData(torch.ones(1, 5, 4), torch.tensor([4]), torch.ones(1, 2, dtype=torch.long),
                         torch.tensor([2])))


# --------------------------------------------------------------------------------------------------
# export as a VITS generator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("speakers", [0, 2], ids=["single", "speakers"])
def test_exported_generator_reloads_and_reproduces(tmp_path, corpus, speakers):
    model, guide = make_pair(False, speakers, seed=7)
    data = data_for(corpus, speakers)
    path = export_vits_generator(model, guide, SPEECH, tmp_path, 12)
    assert path == tmp_path / "vits" / "G_12.pth"
    saved = torch.load(path, weights_only=True)
    assert saved["iteration"] == 12 and set(k.split(".")[0] for k in saved["model"]) == (
        {"enc_p", "enc_q", "flow"} | ({"emb_g"} if speakers else set()))
    assert any(k.endswith("weight_g") for k in saved["model"])  # VITS's weight-norm layout
    for config in (None, tmp_path / "vits" / "config.json"):
        gen = load_vits_generator(path, config)
        with torch.no_grad():
            want_p = model.enc_p(data.text, data.text_lengths)
            for got, want in zip(gen.enc_p(data.text, data.text_lengths), want_p):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            g = gen.speaker_embedding(data.speaker if speakers else None)
            _, m_q, logs_q, y_mask = gen.enc_q(data.spec, data.lengths, g=g)
            want_m, want_logs = guide.posterior(data)
            torch.testing.assert_close(m_q, want_m, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logs_q, want_logs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gen.flow(m_q, y_mask, g=g), model.flow(m_q, y_mask, g=g), rtol=1e-5,
                                       atol=1e-5)


def test_export_needs_the_shared_speaker_embedding():
    model, guide = make_pair(True, 2)
    guide.emb_g = torch.nn.Embedding(2, 4)
    with pytest.raises(ValueError, match="share the model's emb_g"):
        vits_generator_state(model, guide)
    with pytest.raises(TypeError):
        vits_generator_state(guide, model)


# --------------------------------------------------------------------------------------------------
# bad input through the application boundary: one line on stderr, exit code 2
# --------------------------------------------------------------------------------------------------


def copy_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(TINY, folder)
    return folder


def _edit_first_text(folder: Path, new_text: str) -> None:
    for name in ("train.txt",):
        lines = (folder / name).read_text().splitlines()
        wav, sid, _ = lines[0].split("|")
        lines[0] = f"{wav}|{sid}|{new_text}"
        (folder / name).write_text("\n".join(lines) + "\n")


def _missing_metadata(folder: Path) -> list[str]:
    (folder / "metadata.csv").unlink()
    return []


def _wrong_rate(folder: Path) -> list[str]:
    wav = folder / (folder / "train.txt").read_text().split("|")[0]
    audio, _ = soundfile.read(str(wav))
    soundfile.write(str(wav), audio[::2], 11025)
    return []


def _too_long(folder: Path) -> list[str]:
    return ["--max-frames", "20"]


def _unknown_symbol(folder: Path) -> list[str]:
    _edit_first_text(folder, "hello <world>")
    return []


@pytest.mark.parametrize("breaker, needle", [(_missing_metadata, "metadata.csv"), (_wrong_rate, "11025 Hz"),
                                             (_too_long, "longer than the maximum 20"),
                                             (_unknown_symbol, "unknown symbol '<'")],
                         ids=["no-metadata", "sampling-rate", "too-long", "unknown-symbol"])
def test_bad_corpus_is_one_line_exit_2(tmp_path, capsys, breaker, needle):
    folder = copy_corpus(tmp_path)
    extra = breaker(folder)
    argv = ["--corpus", str(folder), "--out", str(tmp_path / "run"), "--n-fft", "256", "--hop-length", "128",
            "--steps", "1", "-q", *extra]
    code = run_main(fit_speech_main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_load_speech_data_names_the_line(tmp_path):
    folder = copy_corpus(tmp_path)
    with pytest.raises(ValueError, match=r"train.txt:1: \d+ spectrogram frames"):
        load_speech_data(folder / "train.txt", SPEECH, data_root=folder, max_frames=5)


def test_model_type_checks_batch():
    model, _ = make_pair(True, 0)
    with pytest.raises(TypeError, match="SpeechData"):
        model("not a batch")
    assert isinstance(model, SpeechModel)


def test_build_pair_is_seeded_and_leaves_the_global_rng_alone():
    from pyro_vits.models import PRESETS, build_pair

    sizes = dict(PRESETS["cpu"], **SIZES, gin_channels=4)
    state = torch.get_rng_state()
    (m1, g1), (m2, g2) = (build_pair(sizes, SPEECH, 2, seed=4) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip([*m1.parameters(), *g1.parameters()], [*m2.parameters(), *g2.parameters()]):
        assert torch.equal(a, b)
    m3, _ = build_pair(sizes, SPEECH, 2, seed=5)
    assert not torch.equal(m1.enc_p.emb.weight, m3.enc_p.emb.weight)
    assert g1.emb_g is m1.emb_g

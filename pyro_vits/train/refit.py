"""Refitting VITS's posterior encoder against a trained voice's frozen prior and decoder (the work of
``pyro-vits refit-posterior``; :mod:`pyro_vits.models.refit` states the model and the loss's normalisation):
read the voice and corpus, train ``enc_q`` with :class:`~pyro_vits.infer.generator_loss.VITSGeneratorLoss`
through :func:`~pyro_vits.train.fit` (run folder, checkpoints, resume, NaN guard), export
``<out>/vits/G_<steps>.pth`` + ``config.json`` (the voice's parts and the fitted ``enc_q``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..infer.generator_loss import VITSGeneratorLoss
from ..models.guides import PosteriorEncoder
from ..models.refit import refit_guide
from ..vits.export import export_vits_parts
from ..vits.generator import load_vits_generator
from ..vits.voice import RefitVoice, export_config
from .config import FitConfig
from .loop import fit
from .parallel import DataParallel

__all__ = ["RefitSettings", "initial_enc_q", "refit_posterior"]


@dataclass(frozen=True)
class RefitSettings:
    """``pyro-vits refit-posterior``'s options (see its ``--help``): ``voice`` (a VITS/Piper file or folder, or
    ``joe``), ``corpus`` (LJSpeech-format folder), ``out`` (run folder); ``progress``: the progress bar;
    ``distributed``: data-parallel over the processes ``torchrun`` started (``batch_size`` is the combined
    minibatch; rank 0 alone writes the run folder and the export): the caller passes the process group to
    :func:`refit_posterior`."""

    voice: str
    corpus: str
    out: str
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    lrd: float = 1.0
    seed: int = 0
    kl_estimator: str = "vits"
    kl_particles: int = 1
    init_enc_q: str | None = None
    enc_q_layers: int = 16
    segment_frames: int = 32
    max_frames: int | None = 1000
    max_utterances: int | None = None
    log_every: int | None = None
    eval_samples: int = 4
    eval_size: int = 16
    checkpoint_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    nan_policy: str = "stop"
    device: str = "cpu"
    progress: bool = True
    distributed: bool = False


def initial_enc_q(path: str, guide: PosteriorEncoder) -> PosteriorEncoder:
    """The ``enc_q`` of the VITS checkpoint ``path`` (its ``config.json`` beside it), checked to have
    ``guide``'s parameter shapes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--init-enc-q: {path} not found")
    enc_q = load_vits_generator(path, decoder=False).enc_q
    if enc_q is None:
        raise ValueError(f"--init-enc-q: {path} holds no enc_q")
    shapes = {k: tuple(v.shape) for k, v in enc_q.guide.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in guide.state_dict().items()}:
        raise ValueError(f"--init-enc-q: {path}'s enc_q has other sizes than --enc-q-layers and the voice's")
    return enc_q.guide


def refit_posterior(args: RefitSettings, ctx: DataParallel | None = None) -> dict[str, Any]:
    """Run the refit (module docstring), alone or in the process group ``ctx`` (the command opens it for
    ``distributed``); returns its summary (JSON-able: steps, times, last logged metrics, the export's path;
    ``{}`` on ranks other than 0)."""
    voice = RefitVoice.load(args.voice)
    gen, path, audio = voice.gen, voice.path, voice.audio
    data = voice.read(args.corpus, max_utterances=args.max_utterances, max_frames=args.max_frames)
    model = voice.model(args.segment_frames)
    guide = refit_guide(audio["n_fft"] // 2 + 1, gen.config["inter_channels"], gen.config["hidden_channels"],
                        n_layers=args.enc_q_layers, emb_g=gen.emb_g, seed=args.seed)
    if args.init_enc_q is not None:
        guide.load_state_dict(initial_enc_q(args.init_enc_q, guide).state_dict())
    config = FitConfig(steps=args.steps, lr=args.lr, lrd=args.lrd,
                       batch_size=min(args.batch_size, data.n), seed=args.seed, out_dir=args.out,
                       log_every=args.log_every or max(1, args.steps // 5), progress=args.progress,
                       eval_samples=args.eval_samples, eval_size=args.eval_size,
                       checkpoint_every=args.checkpoint_every, nan_policy=args.nan_policy, resume=args.resume,
                       overwrite=args.overwrite)
    extra = dict(voice=str(path), corpus=str(args.corpus), init_enc_q=args.init_enc_q,
                 kl_estimator=args.kl_estimator, kl_particles=args.kl_particles, audio={k: v for k, v in audio.items()
                                                                   if k not in ("symbols", "phoneme_id_map")})
    with warnings.catch_warnings():  # the voice's frozen emb_g (shared with enc_q, as in VITS) stays out of
        # Pyro's parameter store on purpose
        warnings.filterwarnings("ignore", message="emb_g.weight was not registered in the param store")
        result = fit(model, guide, data, config, elbo=VITSGeneratorLoss(args.kl_estimator, args.kl_particles),
                     device=args.device if ctx is None else ctx.device, distributed=ctx, extra_config=extra)
    if ctx is not None and not ctx.is_main:
        return {}
    train = dict(seed=args.seed, batch_size=config.batch_size, learning_rate=args.lr, voice=str(path),
                 kl_estimator=args.kl_estimator, kl_particles=args.kl_particles, steps=args.steps)
    out = export_vits_parts(args.out, args.steps, {"enc_p": gen.enc_p, "enc_q": result.guide, "flow": gen.flow,
                                                   "emb_g": gen.emb_g, "dec": gen.dec},
                            export_config(gen, audio, args.enc_q_layers, train))
    last = result.metrics[-1] if result.metrics else {}
    summary = dict(steps=args.steps, wall_s=round(result.wall_s, 2), svi_steps_per_s=last.get("it_per_s"),
                   utterances=data.n, frames=data.num_frames, loss_nats=last.get("loss_nats"),
                   vits_generator=str(out), **{k: v for k, v in last.items() if k.endswith("_per_frame")})
    return summary

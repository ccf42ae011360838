"""The real-regime study's settings: the refit schedule, the fixes and their seeds, the evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..._validate import check_positive_ints
from ...kl.estimators import ESTIMATORS

__all__ = ["FIXES", "PRESETS", "Fix", "RealStudyConfig"]


@dataclass(frozen=True)
class Fix:
    """A fine-tuning variant: the KL ``estimator`` of the loss and its ``kl_particles``."""

    name: str
    estimator: str = "vits"
    kl_particles: int = 1


FIXES = (Fix("vits"), Fix("clamp", "clamp"), Fix("abs", "abs"), Fix("abs_elementwise", "abs_elementwise"),
         Fix("vits_k4", "vits", 4), Fix("vits_k8", "vits", 8))
"""VITS's loss (the paired baseline), the three fixes VITS users applied, and K = 4, 8 KL particles."""


@dataclass(frozen=True)
class RealStudyConfig:
    """``refit_steps``: the from-scratch refit's checkpoints (increasing; the run resumes from one to the next;
    each is evaluated for the trajectory); ``lr`` decays geometrically, by ``final_lr_ratio`` every
    ``lr_decay_steps`` steps;
    ``fix_steps`` / ``fix_lr``: each fine-tune from the last refit checkpoint; ``seeds``: one fine-tune per
    fix and seed (the refit uses ``seeds[0]``); ``eval_draws``: draws of z per held-out utterance;
    ``eval_utterances``: held-out utterances evaluated (the first of val.txt); ``audit_particles``: draws per
    utterance of the full audit; ``batch_sizes``: the audit's batch sizes; ``jobs``: runs at once (one thread
    each); ``samples``: held-out utterances decoded to WAV per model; ``device``: where the refits train (the
    evaluations run on the CPU)."""

    refit_steps: tuple[int, ...] = (100, 250, 500, 1000)
    lr: float = 1e-3
    final_lr_ratio: float = 0.1
    lr_decay_steps: int = 1500
    batch_size: int = 8
    fixes: tuple[Fix, ...] = FIXES
    fix_steps: int = 60
    fix_lr: float = 2e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_draws: int = 4
    eval_utterances: int = 32
    audit_particles: int = 8
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    max_frames: int = 1000
    enc_q_layers: int = 16
    segment_frames: int = 32
    log_every: int = 50
    jobs: int = 2
    samples: int = 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive_ints(batch_size=self.batch_size, lr_decay_steps=self.lr_decay_steps, fix_steps=self.fix_steps, eval_draws=self.eval_draws,
                            eval_utterances=self.eval_utterances, audit_particles=self.audit_particles,
                            max_frames=self.max_frames, enc_q_layers=self.enc_q_layers,
                            segment_frames=self.segment_frames, log_every=self.log_every, jobs=self.jobs,
                            samples=self.samples, refit_steps=len(self.refit_steps), seeds=len(self.seeds))
        steps = list(self.refit_steps)
        if any(not isinstance(s, int) or s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"refit_steps must be increasing positive ints, got {self.refit_steps!r}")
        for fix in self.fixes:
            if fix.estimator not in ESTIMATORS:
                raise ValueError(f"fix {fix.name!r}: estimator must be one of {tuple(ESTIMATORS)}")
        if self.fixes[0].name != "vits":
            raise ValueError("the first fix must be 'vits' (the paired baseline)")
        if self.eval_draws < 2 or self.audit_particles < 2:
            raise ValueError("eval_draws and audit_particles must be >= 2 (for the MCSE)")

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS = {
    "docs": RealStudyConfig(),
    "quick": RealStudyConfig(refit_steps=(2, 4), lr_decay_steps=4, fix_steps=2, seeds=(0, 1), eval_draws=3, eval_utterances=2,
                             audit_particles=2, batch_sizes=(1, 2), batch_size=2, log_every=2, jobs=1,
                             enc_q_layers=2, segment_frames=8,
                             fixes=(Fix("vits"), Fix("abs_elementwise", "abs_elementwise"),
                                    Fix("vits_k2", "vits", 2))),
}
"""``docs``: the page's settings (about 2 h on 2 CPU cores); ``quick``: a smoke run for the tests."""


def preset(name: str, **overrides: Any) -> RealStudyConfig:
    """A preset with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **overrides)

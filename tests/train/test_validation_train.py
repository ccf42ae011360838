"""fit and its helpers reject bad arguments with a ValueError/TypeError naming the argument and what it
expects (counts, estimator, nan policy, device), and a checkpoint that does not fit the model."""

from __future__ import annotations

import re

import pytest
import torch
from validation_helpers import NO_CUDA, C, quick_fit

from pyro_vits.distributions import MaskedNormal
from pyro_vits.kl import kl_estimate
from pyro_vits.train import geometric_lrd, make_elbo, resolve_device

pytestmark = pytest.mark.usefixtures("single_thread")


def test_negative_steps_and_other_counts(small_data):
    for kwargs, message in [(dict(steps=-1), "steps must be a positive int, got -1"),
                            (dict(steps=2.5), "steps must be a positive int, got 2.5"),
                            (dict(log_every=0), "log_every must be a positive int, got 0"),
                            (dict(checkpoint_every=-2, out_dir="x"),
                             "checkpoint_every must be a positive int or None"),
                            (dict(checkpoint_every=2), "resume and checkpoint_every need out_dir"),
                            (dict(resume=True), "resume and checkpoint_every need out_dir")]:
        with pytest.raises(ValueError, match=message):
            quick_fit(small_data, **kwargs)
    with pytest.raises(ValueError, match="steps must be a positive int, got -1"):
        geometric_lrd(0.05, -1)
    with pytest.raises(ValueError, match=r"final_lr_ratio must be in \(0, 1\], got -0.5"):
        geometric_lrd(-0.5, 10)


def test_unknown_estimator_nan_policy_and_device(small_data):
    message = "elbo must be one of ('trace', 'vits', 'stl', 'iwae_dreg'), got 'foo'"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_elbo("foo")
    with pytest.raises(ValueError, match="name must be one of"):
        kl_estimate("foo", small_data.x, small_data.m_p, small_data.logs_p,
                    MaskedNormal(small_data.m_p, torch.ones_like(small_data.m_p)))
    with pytest.raises(TypeError, match="elbo must be a pyro.infer.ELBO, got str"):
        quick_fit(small_data, elbo="trace")
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('stop', 'skip'\), got 'ignore'"):
        quick_fit(small_data, nan_policy="ignore")
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got 'tpu'"):
        quick_fit(small_data, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=re.escape(NO_CUDA)):
            quick_fit(small_data, device="cuda")
    elif torch.cuda.device_count() < 9:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device("cuda:9")


def test_resume_from_a_checkpoint_with_wrong_shapes(small_data, tmp_path):
    out = tmp_path / "run"
    quick_fit(small_data, out_dir=out)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["model"]["dec.weight"] = torch.zeros(C, C, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    message = "the checkpoint's parameters do not fit this model/guide.*dec.weight"
    with pytest.raises(ValueError, match=message):
        quick_fit(small_data, out_dir=out, resume=True, steps=3)
    del checkpoint["model"]
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"is not a resumable pyro_vits checkpoint: it lacks \['model'\]"):
        quick_fit(small_data, out_dir=out, resume=True, steps=3)

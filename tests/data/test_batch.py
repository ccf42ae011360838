"""Batch and sequence_mask reject bad inputs with a ValueError naming the field and what it expects (fit
checks its data again), and the small public helpers name their bad argument."""

from __future__ import annotations

import math
import re

import pytest
import torch
from validation_helpers import N, fields, quick_fit

from pyro_vits.distributions import MaskedNormal

pytestmark = pytest.mark.usefixtures("single_thread")


def test_mask_not_zero_one_or_wrong_shape(small_data):
    d = small_data
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        fields(d, mask=d.mask * 0.5)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask * 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., 1, T=8\), got \(6, 1, 5\)"):
        MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask[..., :5])
    with pytest.raises(ValueError, match="mask must equal the prefix mask of lengths"):
        fields(d, mask=d.mask.flip(-1))


@pytest.mark.parametrize("field, bad", [("x", math.nan), ("m_p", math.inf), ("logs_p", -math.inf)])
def test_nan_or_inf_in_data(small_data, field, bad):
    values = getattr(small_data, field).clone()
    values[1, 2, 3] = bad
    message = f"batch.{field} has 1 non-finite value(s) (NaN/Inf), the first at utterance 1, channel 2, "\
              "frame 3"
    with pytest.raises(ValueError, match=re.escape(message)):
        fields(small_data, **{field: values})
    poisoned = small_data.subset(torch.arange(N))  # derived batches skip validation; fit checks again
    setattr(poisoned, field, values)
    with pytest.raises(ValueError, match=rf"^data\.{field} has 1 non-finite"):
        quick_fit(poisoned)
    with pytest.raises(ValueError, match=rf"^heldout\.{field} has 1 non-finite"):
        quick_fit(small_data, heldout=poisoned)


def test_small_public_helpers_name_the_bad_argument():
    import pandas as pd

    from pyro_vits._masks import sequence_mask
    from pyro_vits.distributions import CosFlow
    from pyro_vits.infer import markdown_table, minibatch_indices

    with pytest.raises(ValueError, match=r"^lengths must be a 1-D Tensor \(N,\), got \(2, 1\)"):
        sequence_mask(torch.tensor([[3], [2]]), 4)
    with pytest.raises(ValueError, match=r"^lengths must be a 1-D Tensor \(N,\), got list"):
        sequence_mask([3, 2], 4)
    with pytest.raises(ValueError, match=r"^frames must be a non-negative int, got -1"):
        sequence_mask(torch.tensor([3, 2]), -1)
    assert sequence_mask(torch.tensor([3, 0]), 4).tolist() == [[[1, 1, 1, 0]], [[0, 0, 0, 0]]]
    with pytest.raises(ValueError, match=r"^n must be a positive int, got 0"):
        minibatch_indices(0, 0, 0, None)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int or None, got 0"):
        minibatch_indices(0, 0, 5, 0)
    with pytest.raises(ValueError, match=r"^digits must be a positive int, got 0"):
        markdown_table(pd.DataFrame({"a": [1.0]}), digits=0)
    with pytest.raises(ValueError, match=r"^a must be a finite real number, got nan"):
        CosFlow(math.nan)
    with pytest.raises(ValueError, match=r"^a must be a finite real number, got '1'"):
        CosFlow("1")
    shape_message = r"^mask must be None or a Tensor of shape \(\.\.\., 1, T\), got \(2, 3\)"
    with pytest.raises(ValueError, match=shape_message):
        CosFlow(0.5, torch.ones(2, 3))

"""The shared argument checks of pyro_vits._validate name the bad argument."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3", None])
def test_check_positive_ints_names_the_argument(value):
    from pyro_vits._validate import check_positive_ints

    with pytest.raises(ValueError, match=r"^steps must be a positive int, got "):
        check_positive_ints(steps=value)
    check_positive_ints(steps=1, batch_size=None, allow_none=True)


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_check_nonnegative_ints_names_the_argument(value):
    from pyro_vits._validate import check_nonnegative_ints

    with pytest.raises(ValueError, match=r"^n_speakers must be a non-negative int, got "):
        check_nonnegative_ints(n_speakers=value)
    check_nonnegative_ints(n_speakers=0, gin_channels=3)

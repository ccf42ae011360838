"""The KL study's numeric helpers name their bad argument."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_study_helpers_name_the_bad_argument():
    import numpy as np

    from pyro_vits.studies.kl.negative import one_utterance_quadrature
    from pyro_vits.studies.kl.variance import log_crossing, ratio_se

    with pytest.raises(ValueError, match=r"^nodes must be a positive int, got 0"):
        one_utterance_quadrature("vits", nodes=0)
    with pytest.raises(ValueError, match=r"^x \(3,\) and y \(4,\) must have the same shape"):
        ratio_se(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match=r"^ratios must be a 1-D numpy array, got \(2, 2\)"):
        log_crossing(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"^values must be a 1-D numpy array, got <class 'list'>"):
        log_crossing(np.ones(2), [1.0, 2.0])
    assert log_crossing(np.array([0.5, 1.0, 2.0]), np.array([0.5, 1.0, 2.0])) == pytest.approx(1.0)

"""Distributions over VITS latents ``(..., C, T)``: the masked Normal, the flow prior, the aligned flow prior
(MAS per draw) and the Pyro transforms that adapt a flow.

- :mod:`.masked_normal`: :class:`MaskedNormal` (padded frames contribute exactly 0); :mod:`.masked_laplace`:
  :class:`MaskedLaplace` (the same for a Laplace, the speech model's log-mel likelihood); both are
  :class:`~pyro_vits.distributions.masked_loc_scale.MaskedLocScale` families;
- :mod:`.transforms`: :class:`FlowTransform`, :class:`VITSFlow`, :class:`CosFlow`;
- :mod:`.flow_prior`: :class:`FlowPrior` (VITS's ``p(z | text)`` for a given alignment), :class:`CosFlowPrior`;
- :mod:`.aligned`: :class:`AlignedFlowPrior` (``max_A p(z | A)``, the alignment chosen per draw)."""

from __future__ import annotations

from .aligned import AlignedFlowPrior
from .flow_prior import CosFlowPrior, FlowPrior
from .masked_laplace import MaskedLaplace
from .masked_normal import MaskedNormal
from .transforms import CosFlow, FlowTransform, VITSFlow

__all__ = ["AlignedFlowPrior", "FlowPrior", "CosFlowPrior", "MaskedNormal", "MaskedLaplace", "FlowTransform", "VITSFlow", "CosFlow"]

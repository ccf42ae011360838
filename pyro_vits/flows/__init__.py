"""Prior flows of the VITS family as torch modules (no Pyro here), with the upstream parameter names.

- :mod:`.residual`: VITS / coqui-TTS residual couplings (``ResidualCouplingBlock``, the base of every block).
- :mod:`.transformer`: VITS2's five ``transformer_flow_type`` s and Bert-VITS2's ``TransformerCouplingBlock``.

Autocast: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the convolutions and attention products run in
bfloat16; for VITS-sized flows (C = H = 192, gin = 256, 4 couplings, T = 200, every family) the output
deviates from float32 by 0.25-0.7 % of its largest magnitude (max abs 0.010-0.19), bfloat16's 8-bit
mantissa; the flows keep float32 outputs. Evaluate log-densities without autocast when they are compared
across runs.
"""

from ..nn.wavenet import WN
from .residual import AffineCoupling, Flip, ResidualCouplingBlock, ResidualCouplingLayer, flatten_leading
from .transformer import (
    TRANSFORMER_FLOW_TYPES,
    FFTransformerCouplingLayer,
    MonoTransformerFlowLayer,
    ResidualCouplingTransformersBlock,
    ResidualCouplingTransformersLayer,
    ResidualCouplingTransformersLayer2,
    TransformerCouplingBlock,
    TransformerCouplingLayer,
)

__all__ = [
    "WN",
    "AffineCoupling",
    "ResidualCouplingLayer",
    "Flip",
    "ResidualCouplingBlock",
    "flatten_leading",
    "TRANSFORMER_FLOW_TYPES",
    "ResidualCouplingTransformersLayer",
    "ResidualCouplingTransformersLayer2",
    "FFTransformerCouplingLayer",
    "MonoTransformerFlowLayer",
    "ResidualCouplingTransformersBlock",
    "TransformerCouplingLayer",
    "TransformerCouplingBlock",
]

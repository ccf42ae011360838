"""load_vits_flow / read_vits_flow name what is missing or misshapen in a VITS state dict."""

from __future__ import annotations

import pytest
import torch
from validation_helpers import HIDDEN, C, vits_state

from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.train import read_vits_flow
from pyro_vits.vits import load_vits_flow

pytestmark = pytest.mark.usefixtures("single_thread")


def test_state_dict_without_flow_or_with_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match="no flow found: expected keys 'flow.flows.<i>.…'"):
        load_vits_flow({"model": {"enc_p.emb.weight": torch.zeros(3, 2)}})
    state = vits_state(ResidualCouplingBlock(C, HIDDEN, 3, 1, 2, n_flows=2))
    state["flow.flows.2.pre.weight"] = torch.zeros(HIDDEN, C // 2 + 1, 1)
    message = "flow.flows.2.pre.weight: shape .* but the VITS flow inferred from flow.flows.0 expects"
    with pytest.raises(ValueError, match=message):
        load_vits_flow({"model": state})
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.pth'}: flow.flows.2.pre.weight: shape"):
        read_vits_flow(tmp_path / "bad.pth")
    with pytest.raises(TypeError, match="expected a state dict"):
        load_vits_flow([1, 2])

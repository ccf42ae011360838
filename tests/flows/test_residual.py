"""ResidualCouplingBlock: the flow contract over every configuration, and VITS state-dict compatibility.

The VITS reference below is written from VITS's ``modules.WN`` / ``ResidualCouplingLayer`` /
``models.ResidualCouplingBlock`` and does not import ``pyro_vits.flows``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as new_weight_norm

from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.vits import load_vits_flow

pytestmark = pytest.mark.usefixtures("single_thread")


def _split_batch(case, b):
    """Utterance ``b`` (of the last batch dim) as unbatched ``(mask (1, T) or None, g (gin, 1) or None)``."""
    return tuple(None if t is None else t[b] for t in (case.mask, case.g))


# --------------------------------------------------------------------------- the flow contract


def test_reverse_inverts_forward_and_zeroes_padded_frames(flow_case):
    case = flow_case
    y = case.block(case.x, case.mask, case.g)
    x_back = case.block(y, case.mask, case.g, reverse=True)
    valid = case.full_mask.expand_as(case.x) > 0
    torch.testing.assert_close(x_back[valid], case.x[valid], rtol=0, atol=1e-12)
    assert not torch.allclose(y, case.x)  # the random weights make the flow non-trivial
    for out in (y, x_back):
        assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))


def test_logdet_is_log_abs_det_of_autograd_jacobian(flow_case):
    case = flow_case
    y, logdet = case.block.forward_and_logdet(case.x, case.mask, case.g)
    _, logdet_rev = case.block.forward_and_logdet(y, case.mask, case.g, reverse=True)
    assert logdet.shape == case.x.shape[:1]
    if case.cfg.mean_only:
        assert torch.equal(logdet, torch.zeros_like(logdet))
        assert torch.equal(logdet_rev, torch.zeros_like(logdet_rev))
    else:
        torch.testing.assert_close(logdet_rev, -logdet, rtol=0, atol=1e-12)
        assert bool((logdet.abs() > 1e-3).all())
    for b in range(case.x.shape[0]):
        mask_b, g_b = _split_batch(case, b)
        n_valid = case.x.shape[-1] if mask_b is None else int(mask_b.sum())
        x_b = case.x[b]

        def valid_map(v, x_b=x_b, mask_b=mask_b, g_b=g_b, n_valid=n_valid):
            full = torch.cat([v.reshape(x_b.shape[0], n_valid), x_b[:, n_valid:]], -1)
            return case.block(full, mask_b, g_b)[:, :n_valid].reshape(-1)

        jac = torch.autograd.functional.jacobian(valid_map, x_b[:, :n_valid].reshape(-1))
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(log_abs_det, logdet[b], rtol=0, atol=1e-10)


def test_padded_input_frames_do_not_change_valid_outputs(masked_flow_case):
    case = masked_flow_case
    valid = case.full_mask.expand_as(case.x) > 0
    for reverse in (False, True):
        x_noisy = case.with_pads(case.x, seed=7)
        assert not torch.equal(x_noisy, case.x)
        y, ld = case.block.forward_and_logdet(case.x, case.mask, case.g, reverse)
        y_noisy, ld_noisy = case.block.forward_and_logdet(x_noisy, case.mask, case.g, reverse)
        torch.testing.assert_close(y_noisy[valid], y[valid], rtol=0, atol=1e-13)
        torch.testing.assert_close(ld_noisy, ld, rtol=0, atol=1e-13)


def test_leading_dims_equal_a_loop_over_them(flow_case, make_case):
    case = make_case(flow_case.cfg, seed=3, batch_shape=(2, flow_case.x.shape[0]))  # x (S, B, C, T)
    for reverse in (False, True):
        y, ld = case.block.forward_and_logdet(case.x, case.mask, case.g, reverse)
        assert y.shape == case.x.shape and ld.shape == case.x.shape[:2]
        for s in range(case.x.shape[0]):
            for b in range(case.x.shape[1]):
                mask_b, g_b = _split_batch(case, b)
                y_sb, ld_sb = case.block.forward_and_logdet(case.x[s, b], mask_b, g_b, reverse)
                assert y_sb.shape == case.x.shape[-2:] and ld_sb.shape == ()
                torch.testing.assert_close(y[s, b], y_sb, rtol=0, atol=1e-12)
                torch.testing.assert_close(ld[s, b], ld_sb, rtol=0, atol=1e-12)


def test_bad_block_arguments_raise(make_block):
    with pytest.raises(ValueError, match="even"):
        make_block(channels=3)
    with pytest.raises(ValueError, match="kernel_size"):
        make_block(kernel_size=4)
    with pytest.raises(ValueError, match="n_flows"):
        make_block(n_flows=0)
    block = make_block(gin=2)
    x = torch.zeros(1, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="C=4"):
        block(torch.zeros(1, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_mask"):
        block(x, torch.ones(1, 1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="gin=2"):
        block(x, g=torch.zeros(1, 3, 1, dtype=torch.float64))


# --------------------------------------------------------------------------- VITS reference


class RefWN(nn.Module):
    def __init__(self, hidden, kernel_size, dilation_rate, n_layers, gin, wn):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers, self.res_skip_layers = nn.ModuleList(), nn.ModuleList()
        if gin > 0:
            self.cond_layer = wn(nn.Conv1d(gin, 2 * hidden * n_layers, 1))
        for i in range(n_layers):
            dil = dilation_rate**i
            pad = (kernel_size * dil - dil) // 2
            self.in_layers.append(wn(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dil, padding=pad)))
            out = 2 * hidden if i < n_layers - 1 else hidden
            self.res_skip_layers.append(wn(nn.Conv1d(hidden, out, 1)))

    def forward(self, x, x_mask, g=None):
        output = torch.zeros_like(x)
        if g is not None:
            g = self.cond_layer(g)
        for i in range(self.n_layers):
            x_in = self.in_layers[i](x)
            if g is not None:
                x_in = x_in + g[:, 2 * self.hidden * i : 2 * self.hidden * (i + 1)]
            acts = torch.tanh(x_in[:, : self.hidden]) * torch.sigmoid(x_in[:, self.hidden :])
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                x = (x + res_skip[:, : self.hidden]) * x_mask
                output = output + res_skip[:, self.hidden :]
            else:
                output = output + res_skip
        return output * x_mask


class RefCoupling(nn.Module):
    def __init__(self, channels, hidden, kernel_size, dilation_rate, n_layers, gin, mean_only, wn):
        super().__init__()
        self.half, self.mean_only = channels // 2, mean_only
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = RefWN(hidden, kernel_size, dilation_rate, n_layers, gin, wn)
        self.post = nn.Conv1d(hidden, self.half * (1 if mean_only else 2), 1)

    def forward(self, x, x_mask, g=None, reverse=False):
        x0, x1 = x[:, : self.half], x[:, self.half :]
        stats = self.post(self.enc(self.pre(x0) * x_mask, x_mask, g=g)) * x_mask
        if self.mean_only:
            m, logs = stats, torch.zeros_like(stats)
        else:
            m, logs = stats[:, : self.half], stats[:, self.half :]
        if reverse:
            return torch.cat([x0, (x1 - m) * torch.exp(-logs) * x_mask], 1), None
        return torch.cat([x0, m + x1 * torch.exp(logs) * x_mask], 1), torch.sum(logs, [1, 2])


class RefFlip(nn.Module):
    def forward(self, x, x_mask, g=None, reverse=False):
        return torch.flip(x, [1]), None


class RefBlock(nn.Module):
    """VITS ``models.ResidualCouplingBlock``; returns ``(y, summed logdet or None)``."""

    def __init__(self, channels, hidden, kernel_size, dilation_rate, n_layers, n_flows, gin, mean_only, wn):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            args = (channels, hidden, kernel_size, dilation_rate, n_layers, gin, mean_only, wn)
            self.flows.append(RefCoupling(*args))
            self.flows.append(RefFlip())

    def forward(self, x, x_mask, g=None, reverse=False):
        total = torch.zeros(x.shape[0]) if not reverse else None
        for flow in reversed(self.flows) if reverse else self.flows:
            x, logdet = flow(x, x_mask, g=g, reverse=reverse)
            if total is not None and logdet is not None:
                total = total + logdet
        return x, total


def old_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module)


def removed_weight_norm(module):
    """VITS's inference export: weight norm applied, then removed (plain ``weight`` keys)."""
    return torch.nn.utils.parametrize.remove_parametrizations(new_weight_norm(module), "weight")


LAYOUTS = {
    "weight_g": dict(wn=old_weight_norm, prefix="", wrapped=True, dilation=1),
    "weight-norm-removed": dict(wn=removed_weight_norm, prefix="", wrapped=True, dilation=1),
    "parametrizations": dict(wn=new_weight_norm, prefix="", wrapped=True, dilation=1),
    "module-prefix": dict(wn=old_weight_norm, prefix="module.", wrapped=True, dilation=1),
    "bare-dict-dilation2": dict(wn=old_weight_norm, prefix="", wrapped=False, dilation=2),
}
REF_SIZES = dict(channels=4, hidden=8, kernel_size=5, n_layers=3, n_flows=4)


def vits_checkpoint(ref, prefix, wrapped):
    """A VITS-like generator checkpoint holding ``ref`` under ``flow.`` among unrelated entries."""
    gen = torch.Generator().manual_seed(99)
    state = {
        f"{prefix}enc_p.emb.weight": torch.randn(10, 6, generator=gen),
        f"{prefix}enc_q.enc.in_layers.0.weight_g": torch.randn(16, 1, 1, generator=gen),
        f"{prefix}dec.conv_pre.weight": torch.randn(8, 4, 7, generator=gen),
    }
    state.update({f"{prefix}flow.{k}": v for k, v in ref.state_dict().items()})
    state[f"{prefix}emb_g.weight"] = torch.randn(3, 2, generator=gen)
    if not wrapped:
        return state
    return {"model": state, "iteration": 1, "optimizer": {"state": {}}, "learning_rate": 2e-4}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("gin", [0, 3], ids=lambda g: f"gin{g}")
@pytest.mark.parametrize("mean_only", [True, False], ids=["mean", "affine"])
def test_load_vits_flow_matches_reference(layout, gin, mean_only, length_mask, randomize):
    spec = LAYOUTS[layout]
    s = REF_SIZES
    ref = RefBlock(
        s["channels"], s["hidden"], s["kernel_size"], spec["dilation"], s["n_layers"], s["n_flows"],
        gin, mean_only, spec["wn"],
    )
    randomize(ref, seed=5, scale=0.4)
    keys = ref.state_dict().keys()
    wn_keys = {old_weight_norm: ("weight_g", "weight_v"), new_weight_norm: ("original0", "original1"),
               removed_weight_norm: ("in_layers.0.weight", "res_skip_layers.0.weight")}[spec["wn"]]
    assert any(k.endswith(wn_keys[0]) for k in keys) and any(k.endswith(wn_keys[1]) for k in keys)

    checkpoint = vits_checkpoint(ref, spec["prefix"], spec["wrapped"])
    block = load_vits_flow(checkpoint, dilation_rate=spec["dilation"])
    assert type(block) is ResidualCouplingBlock
    assert block.config == dict(
        channels=4, hidden_channels=8, kernel_size=5, dilation_rate=spec["dilation"], n_layers=3, n_flows=4,
        gin_channels=gin, mean_only=mean_only,
    )
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 9, generator=gen)
    mask = length_mask([9, 6], t=9, dtype=torch.float32)
    g = torch.randn(2, gin, 1, generator=gen) if gin else None
    with torch.no_grad():
        for reverse in (False, True):
            y_ref, ld_ref = ref(x, mask, g, reverse=reverse)
            y, ld = block.forward_and_logdet(x, mask, g, reverse=reverse)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            if not reverse:
                torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)


def test_load_vits_flow_without_flow_entries_raises(randomize):
    ref = randomize(RefBlock(4, 8, 5, 1, 2, 2, 0, True, old_weight_norm), seed=1)
    checkpoint = vits_checkpoint(ref, "", wrapped=True)
    without_flow = {k: v for k, v in checkpoint["model"].items() if not k.startswith("flow.")}
    for obj in ({"model": without_flow}, without_flow, {}):
        with pytest.raises(ValueError, match="no flow"):
            load_vits_flow(obj)
    with pytest.raises(TypeError):
        load_vits_flow([("flow.flows.0.pre.weight", torch.zeros(8, 2, 1))])

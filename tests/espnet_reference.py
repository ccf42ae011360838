"""An independent ESPnet2 VITS reference, written from ESPnet's source (no espnet2 import), in float64.

``espnet_state()`` builds a random generator state dict under ESPnet's own names (``text_encoder.…``,
``posterior_encoder.…``, ``flow.flows.<2k>.…``, ``global_emb.weight``; WaveNet convs weight-normed as
``weight_g``/``weight_v``); ``text_encoder``, ``posterior_encoder`` and ``flow`` evaluate ESPnet's math on it
literally: the WaveNet unfolded (per-layer ``conv1x1_glo``, ``2H`` outputs per layer, ``x + r * mask``,
skip sum times ``sqrt(1 / L)``), the Conformer with ESPnet's ``rel_shift`` pad/view trick and its 5000-long
``RelPositionalEncoding`` table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIZES = dict(vocab=20, aux=17, hidden=8, heads=2, units=16, blocks=2, ff_kernel=3, conv_kernel=5, pe_layers=3,
             pe_kernel=3, flows=2, flow_layers=3, flow_kernel=3, spks=3, gin=5)


def _wavenet(state, prefix, layers, hidden, kernel, gin, g):
    for i in range(layers):
        p = f"{prefix}conv_layers.{i}."
        g_, v = torch.randn(2 * hidden, 1, 1, generator=g).abs() + 0.5, torch.randn(2 * hidden, hidden, kernel,
                                                                                  generator=g)
        state.update({p + "conv.weight_g": g_, p + "conv.weight_v": v, p + "conv.bias": 0.3 * torch.randn(2 * hidden, generator=g)})
        if gin:
            state[p + "conv1x1_glo.weight_g"] = torch.randn(2 * hidden, 1, 1, generator=g).abs() + 0.5
            state[p + "conv1x1_glo.weight_v"] = torch.randn(2 * hidden, gin, 1, generator=g)
        state[p + "conv1x1_out.weight_g"] = torch.randn(2 * hidden, 1, 1, generator=g).abs() + 0.5
        state[p + "conv1x1_out.weight_v"] = torch.randn(2 * hidden, hidden, 1, generator=g)
        state[p + "conv1x1_out.bias"] = 0.3 * torch.randn(2 * hidden, generator=g)


def _lin(state, name, out, inp, g, bias=True, k=None):
    shape = (out, inp) if k is None else (out, inp, k)
    state[name + ".weight"] = torch.randn(shape, generator=g) / math.sqrt(inp * (k or 1))
    if bias:
        state[name + ".bias"] = 0.2 * torch.randn(out, generator=g)


def _norm(state, name, size, g):
    state[name + ".weight"] = 1 + 0.2 * torch.randn(size, generator=g)
    state[name + ".bias"] = 0.2 * torch.randn(size, generator=g)


def espnet_state(seed: int = 0, s=SIZES) -> dict[str, torch.Tensor]:
    """A random ESPnet2 VITS generator state dict (latent path only), float32, ESPnet's key names."""
    g = torch.Generator().manual_seed(seed)
    H, st = s["hidden"], {}
    st["text_encoder.emb.weight"] = torch.randn(s["vocab"], H, generator=g) * H**-0.5
    for i in range(s["blocks"]):
        p = f"text_encoder.encoder.encoders.{i}."
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            _lin(st, p + "self_attn." + name, H, H, g)
        _lin(st, p + "self_attn.linear_pos", H, H, g, bias=False)
        for name in ("pos_bias_u", "pos_bias_v"):
            st[p + "self_attn." + name] = 0.3 * torch.randn(s["heads"], H // s["heads"], generator=g)
        for ff in ("feed_forward", "feed_forward_macaron"):
            _lin(st, p + ff + ".w_1", s["units"], H, g, k=s["ff_kernel"])
            _lin(st, p + ff + ".w_2", H, s["units"], g, k=s["ff_kernel"])
        _lin(st, p + "conv_module.pointwise_conv1", 2 * H, H, g, k=1)
        _lin(st, p + "conv_module.depthwise_conv", H, 1, g, k=s["conv_kernel"])
        _norm(st, p + "conv_module.norm", H, g)
        st[p + "conv_module.norm.running_mean"] = 0.3 * torch.randn(H, generator=g)
        st[p + "conv_module.norm.running_var"] = torch.rand(H, generator=g) + 0.5
        st[p + "conv_module.norm.num_batches_tracked"] = torch.tensor(7)
        _lin(st, p + "conv_module.pointwise_conv2", H, H, g, k=1)
        for norm in ("norm_ff", "norm_mha", "norm_ff_macaron", "norm_conv", "norm_final"):
            _norm(st, p + norm, H, g)
    _norm(st, "text_encoder.encoder.after_norm", H, g)
    _lin(st, "text_encoder.proj", 2 * H, H, g, k=1)
    _lin(st, "posterior_encoder.input_conv", H, s["aux"], g, k=1)
    _wavenet(st, "posterior_encoder.encoder.", s["pe_layers"], H, s["pe_kernel"], s["gin"], g)
    _lin(st, "posterior_encoder.proj", 2 * H, H, g, k=1)
    for k in range(s["flows"]):
        p = f"flow.flows.{2 * k}."
        _lin(st, p + "input_conv", H, H // 2, g, k=1)
        _wavenet(st, p + "encoder.", s["flow_layers"], H, s["flow_kernel"], s["gin"], g)
        _lin(st, p + "proj", H // 2, H, g, k=1)
    st["global_emb.weight"] = torch.randn(s["spks"], s["gin"], generator=g)
    return st


def _w(st, base):
    """Weight-normed (``weight_g``/``weight_v``) or plain weight, as torch.nn.utils.weight_norm computes it."""
    if base + ".weight" in st:
        return st[base + ".weight"]
    v = st[base + ".weight_v"]
    return st[base + ".weight_g"] * v / v.norm(dim=(1, 2), keepdim=True)


def wavenet(st, prefix, x, mask, gvec):
    """ESPnet ``WaveNet.forward`` (stacks 1, base dilation 1, scale_skip_connect): ``x`` masked on entry."""
    layers = len({k[len(prefix):].split(".")[1] for k in st if k.startswith(prefix + "conv_layers.")})
    skips = 0.0
    for i in range(layers):
        p = f"{prefix}conv_layers.{i}."
        w = _w(st, p + "conv")
        residual, h = x, F.conv1d(x, w, st[p + "conv.bias"], padding=(w.shape[-1] - 1) // 2)
        xa, xb = h.split(h.size(1) // 2, dim=1)
        if gvec is not None:
            ga, gb = F.conv1d(gvec, _w(st, p + "conv1x1_glo")).split(h.size(1) // 2, dim=1)
            xa, xb = xa + ga, xb + gb
        h = F.conv1d(torch.tanh(xa) * torch.sigmoid(xb), _w(st, p + "conv1x1_out"), st[p + "conv1x1_out.bias"])
        h = h * mask
        x, s = h.split([residual.shape[1], h.shape[1] - residual.shape[1]], dim=1)
        x = x + residual
        skips = skips + s
    return skips * math.sqrt(1.0 / layers)


def posterior_encoder(st, y, mask, gvec):
    """ESPnet ``PosteriorEncoder.forward`` -> ``(m, logs)``."""
    x = F.conv1d(y, st["posterior_encoder.input_conv.weight"], st["posterior_encoder.input_conv.bias"]) * mask
    x = wavenet(st, "posterior_encoder.encoder.", x, mask, gvec)
    stats = F.conv1d(x, st["posterior_encoder.proj.weight"], st["posterior_encoder.proj.bias"]) * mask
    return stats.split(stats.size(1) // 2, dim=1)


def flow(st, x, mask, gvec, inverse=False):
    """ESPnet ``ResidualAffineCouplingBlock`` (``use_only_mean=True``, couplings at even indices, then flips)."""
    indices = sorted({int(k.split(".")[2]) for k in st if k.startswith("flow.flows.")})
    steps = [s for i in indices for s in (i, None)]
    for step in (reversed(steps) if inverse else steps):
        if step is None:
            x = torch.flip(x, [1])
            continue
        p = f"flow.flows.{step}."
        xa, xb = x.split(x.size(1) // 2, dim=1)
        h = F.conv1d(xa, st[p + "input_conv.weight"], st[p + "input_conv.bias"]) * mask
        h = wavenet(st, p + "encoder.", h, mask, gvec)
        m = F.conv1d(h, st[p + "proj.weight"], st[p + "proj.bias"]) * mask
        xb = (xb - m) * mask if inverse else m + xb * mask
        x = torch.cat([xa, xb], 1)
    return x


def _pe(T, d, max_len=5000):
    """ESPnet ``RelPositionalEncoding.extend_pe`` + the slice its forward takes."""
    pos = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pp, pn = torch.zeros(max_len, d), torch.zeros(max_len, d)
    pp[:, 0::2], pp[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    pn[:, 0::2], pn[:, 1::2] = torch.sin(-1 * pos * div), torch.cos(-1 * pos * div)
    pe = torch.cat([torch.flip(pp, [0]).unsqueeze(0), pn[1:].unsqueeze(0)], dim=1).double()
    return pe[:, pe.size(1) // 2 - T + 1: pe.size(1) // 2 + T]


def _attn(st, p, x, pos, mask, heads):
    B, T, D = x.shape
    dk = D // heads
    lin = lambda n, t: F.linear(t, st[p + n + ".weight"], st.get(p + n + ".bias"))  # noqa: E731
    q = lin("linear_q", x).view(B, T, heads, dk)
    k, v = (lin(n, x).view(B, T, heads, dk).transpose(1, 2) for n in ("linear_k", "linear_v"))
    pe = lin("linear_pos", pos).view(1, -1, heads, dk).transpose(1, 2)
    ac = torch.matmul((q + st[p + "pos_bias_u"]).transpose(1, 2), k.transpose(-2, -1))
    bd = torch.matmul((q + st[p + "pos_bias_v"]).transpose(1, 2), pe.transpose(-2, -1))
    padded = torch.cat([bd.new_zeros((*bd.shape[:3], 1)), bd], dim=-1).view(B, heads, bd.size(3) + 1, T)
    bd = padded[:, :, 1:].view_as(bd)[:, :, :, : bd.size(-1) // 2 + 1]  # ESPnet's rel_shift
    scores = (ac + bd) / math.sqrt(dk)
    pad = mask.unsqueeze(1).eq(0)
    attn = torch.softmax(scores.masked_fill(pad, torch.finfo(scores.dtype).min), -1).masked_fill(pad, 0.0)
    return lin("linear_out", torch.matmul(attn, v).transpose(1, 2).reshape(B, T, D))


def text_encoder(st, ids, lengths, heads=SIZES["heads"]):
    """ESPnet ``TextEncoder.forward`` (macaron, conv module, swish, normalize_before) -> ``(x, m, logs, mask)``."""
    emb = st["text_encoder.emb.weight"]
    D = emb.shape[1]
    x = F.embedding(ids, emb) * math.sqrt(D) * math.sqrt(D)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).to(x.dtype).unsqueeze(1)
    pos = _pe(ids.shape[1], D)
    ln = lambda n, t: F.layer_norm(t, (D,), st[n + ".weight"], st[n + ".bias"], 1e-12)  # noqa: E731

    def ff(n, t):
        w1, w2 = st[n + ".w_1.weight"], st[n + ".w_2.weight"]
        h = torch.relu(F.conv1d(t.transpose(1, 2), w1, st[n + ".w_1.bias"], padding=(w1.shape[-1] - 1) // 2))
        return F.conv1d(h, w2, st[n + ".w_2.bias"], padding=(w2.shape[-1] - 1) // 2).transpose(1, 2)

    def conv(n, t):
        h = F.glu(F.conv1d(t.transpose(1, 2), st[n + ".pointwise_conv1.weight"], st[n + ".pointwise_conv1.bias"]), 1)
        w = st[n + ".depthwise_conv.weight"]
        h = F.conv1d(h, w, st[n + ".depthwise_conv.bias"], padding=(w.shape[-1] - 1) // 2, groups=D)
        h = F.batch_norm(h, st[n + ".norm.running_mean"], st[n + ".norm.running_var"], st[n + ".norm.weight"],
                         st[n + ".norm.bias"], False, 0.0, 1e-5)
        h = h * torch.sigmoid(h)
        return F.conv1d(h, st[n + ".pointwise_conv2.weight"], st[n + ".pointwise_conv2.bias"]).transpose(1, 2)

    blocks = len({k.split(".")[3] for k in st if k.startswith("text_encoder.encoder.encoders.")})
    for i in range(blocks):
        p = f"text_encoder.encoder.encoders.{i}."
        x = x + 0.5 * ff(p + "feed_forward_macaron", ln(p + "norm_ff_macaron", x))
        x = x + _attn(st, p + "self_attn.", ln(p + "norm_mha", x), pos, mask, heads)
        x = x + conv(p + "conv_module", ln(p + "norm_conv", x))
        x = x + 0.5 * ff(p + "feed_forward", ln(p + "norm_ff", x))
        x = ln(p + "norm_final", x)
    x = ln("text_encoder.encoder.after_norm", x).transpose(1, 2)
    stats = F.conv1d(x, st["text_encoder.proj.weight"], st["text_encoder.proj.bias"]) * mask
    m, logs = stats.split(stats.size(1) // 2, dim=1)
    return x, m, logs, mask


# ------------------------------------------------------------------------------- the check of a loaded one

TOL = dict(rtol=1e-5, atol=1e-5)
LT, LS = torch.tensor([7, 4]), torch.tensor([11, 6])


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SIZES["vocab"], (2, 7), generator=g)  # padding ids non-zero: ESPnet does not mask them
    y = torch.randn(2, SIZES["aux"], 11, generator=g) * (torch.arange(11) < LS[:, None]).unsqueeze(1)
    return ids, y, torch.tensor([2, 0]), g


def check_against_reference(gen, state, seed=3):
    """``gen`` (loaded) against the float64 reference on ``state`` (ESPnet names, no prefix)."""
    ref = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    ids, y, sid, g = inputs(seed)
    with torch.no_grad():
        for got, want in zip(gen.enc_p(ids, LT), text_encoder(ref, ids, LT)):
            torch.testing.assert_close(got.double(), want, **TOL)
        g_ref = ref["global_emb.weight"][sid].unsqueeze(-1)
        mask = (torch.arange(11) < LS[:, None]).double().unsqueeze(1)
        m_ref, logs_ref = posterior_encoder(ref, y.double(), mask, g_ref)
        _, m_q, logs_q, _ = gen.enc_q(y, LS, g=gen.speaker_embedding(sid))
        torch.testing.assert_close(m_q.double(), m_ref, **TOL)
        torch.testing.assert_close(logs_q.double(), logs_ref, **TOL)
        z = torch.randn(m_ref.shape, generator=g, dtype=torch.float64) * mask
        for reverse in (False, True):
            want = flow(ref, z, mask, g_ref, inverse=reverse)
            got = gen.flow(z.float(), mask.float(), g=g_ref.float(), reverse=reverse)
            torch.testing.assert_close(got.double(), want, **TOL)
        assert float((flow(ref, z, mask, g_ref) - z).abs().max()) > 1e-2  # non-trivial flow

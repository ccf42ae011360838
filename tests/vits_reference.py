"""An independent functional reference of the VITS-family prior flows, for the tests only.

Written from the published equations and the upstream module layouts (VITS ``modules.WN`` /
``ResidualCouplingLayer``, ``attentions.Encoder`` / ``FFT``; VITS2's ``ResidualCouplingTransformersBlock``;
Bert-VITS2's ``TransformerCouplingBlock``). Every function reads its weights from a flat state dict by the
upstream key names (any weight-norm layout), so the tests also pin the names and shapes. It never imports
``pyro_vits``. ``checkpoint_state`` writes random weights under those names for a given family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FAMILIES = ("vits", "coqui", "pre_conv", "pre_conv2", "fft", "mono_layer_inter_residual",
            "mono_layer_post_residual", "bert")
LAYOUTS = ("weight_g", "parametrizations", "plain")

# --------------------------------------------------------------------------- weights


def conv_weight(sd, name):
    """Effective weight of convolution ``name``: plain ``weight``, or ``g * v / ||v||`` (weight norm)."""
    if f"{name}.weight" in sd:
        return sd[f"{name}.weight"]
    if f"{name}.weight_g" in sd:
        g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
    else:
        g, v = (
            sd[f"{name}.parametrizations.weight.original0"],
            sd[f"{name}.parametrizations.weight.original1"],
        )
    return g * v / v.pow(2).sum((1, 2), keepdim=True).sqrt()


def ref_conv(x, sd, name, pad=(0, 0), dilation=1):
    return F.conv1d(F.pad(x, pad), conv_weight(sd, name), sd[f"{name}.bias"], dilation=dilation)


def ref_layer_norm(x, sd, name):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{name}.gamma"][:, None] + sd[f"{name}.beta"][:, None]


# --------------------------------------------------------------------------- attention


def relative_table(emb, t, window):
    """``(heads|1, T, T, d)``: ``emb[:, j - i + w]`` where ``|j - i| <= w``, zeros elsewhere (loops)."""
    table = torch.zeros(emb.shape[0], t, t, emb.shape[-1], dtype=emb.dtype)
    for i in range(t):
        for j in range(t):
            if abs(j - i) <= window:
                table[:, i, j] = emb[:, j - i + window]
    return table


def ref_attention(x, mask, sd, name, n_heads, window=None, proximal=False, block=None):
    """Self-attention of ``x (B, C, T)``; ``mask (B|1, T, T)`` (0 = masked) or None."""
    b, channels, t = x.shape
    d = channels // n_heads
    q, k, v = (ref_conv(x, sd, f"{name}.conv_{s}").reshape(b, n_heads, d, t) for s in "qkv")
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d)
    if window is not None:
        rel_k = relative_table(sd[f"{name}.emb_rel_k"], t, window)
        scores = scores + torch.einsum("bhdi,hijd->bhij", q, rel_k.expand(n_heads, -1, -1, -1)) / math.sqrt(d)
    pos = torch.arange(t, dtype=x.dtype)
    if proximal:
        scores = scores - torch.log1p((pos[None, :] - pos[:, None]).abs())
    if mask is not None:
        keep = mask[:, None] != 0
        if block is not None:
            keep = keep & ((pos[None, :] - pos[:, None]).abs() <= block)
        scores = torch.where(keep, scores, torch.tensor(-1e4, dtype=x.dtype))
    p = torch.softmax(scores, -1)
    out = torch.einsum("bhij,bhdj->bhdi", p, v)
    if window is not None:
        rel_v = relative_table(sd[f"{name}.emb_rel_v"], t, window)
        out = out + torch.einsum("bhij,hijd->bhdi", p, rel_v.expand(n_heads, -1, -1, -1))
    return ref_conv(out.reshape(b, channels, t), sd, f"{name}.conv_o")


def ref_ffn(x, mask, sd, name, causal=False, gelu=False):
    k = sd[f"{name}.conv_1.weight"].shape[-1]
    pad = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)
    h = ref_conv(x * mask, sd, f"{name}.conv_1", pad)
    h = h * torch.sigmoid(1.702 * h) if gelu else torch.relu(h)
    return ref_conv(h * mask, sd, f"{name}.conv_2", pad) * mask


def n_sub(sd, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def ref_encoder(x, mask, sd, p, n_heads, g=None, cond_idx=2):
    """VITS ``attentions.Encoder`` (+ VITS2's speaker input at layer ``cond_idx`` via ``spk_emb_linear``)."""
    rel = sd.get(f"{p}attn_layers.0.emb_rel_k")
    window = None if rel is None else (rel.shape[1] - 1) // 2
    attn_mask = mask * mask.transpose(1, 2)
    x = x * mask
    for i in range(n_sub(sd, f"{p}attn_layers.")):
        if g is not None and i == cond_idx and f"{p}spk_emb_linear.weight" in sd:
            spk = g.transpose(1, 2) @ sd[f"{p}spk_emb_linear.weight"].T + sd[f"{p}spk_emb_linear.bias"]
            x = (x + spk.transpose(1, 2)) * mask
        x = ref_layer_norm(
            x + ref_attention(x, attn_mask, sd, f"{p}attn_layers.{i}", n_heads, window),
            sd,
            f"{p}norm_layers_1.{i}",
        )
        x = ref_layer_norm(x + ref_ffn(x, mask, sd, f"{p}ffn_layers.{i}"), sd, f"{p}norm_layers_2.{i}")
    return x * mask


def ref_fft(x, mask, sd, p, n_heads, g=None):
    """VITS2 ``attentions.FFT`` with ``isflow``: causal attention/FFN, speaker gate per layer."""
    t, hidden = x.shape[-1], x.shape[1]
    causal = torch.ones(1, t, t, dtype=x.dtype).tril()
    cond = ref_conv(g, sd, f"{p}cond_layer") if g is not None and f"{p}cond_pre.weight" in sd else None
    x = x * mask
    for i in range(n_sub(sd, f"{p}self_attn_layers.")):
        if cond is not None:
            a = ref_conv(x, sd, f"{p}cond_pre") + cond[:, 2 * hidden * i : 2 * hidden * (i + 1)]
            x = torch.tanh(a[:, :hidden]) * torch.sigmoid(a[:, hidden:])
        x = ref_layer_norm(
            x + ref_attention(x, causal, sd, f"{p}self_attn_layers.{i}", n_heads), sd, f"{p}norm_layers_0.{i}"
        )
        x = ref_layer_norm(
            x + ref_ffn(x, mask, sd, f"{p}ffn_layers.{i}", causal=True), sd, f"{p}norm_layers_1.{i}"
        )
    return x * mask


# --------------------------------------------------------------------------- flows


def ref_wn(x, mask, sd, p, dilation, g=None):
    hidden = x.shape[1]
    cond = (
        ref_conv(g, sd, f"{p}cond_layer")
        if g is not None and any(k.startswith(f"{p}cond_layer.") for k in sd)
        else None
    )
    n_layers = n_sub(sd, f"{p}in_layers.")
    output = torch.zeros_like(x)
    for i in range(n_layers):
        k = conv_weight(sd, f"{p}in_layers.{i}").shape[-1]
        d = dilation**i
        x_in = ref_conv(x, sd, f"{p}in_layers.{i}", ((k * d - d) // 2,) * 2, dilation=d)
        if cond is not None:
            x_in = x_in + cond[:, 2 * hidden * i : 2 * hidden * (i + 1)]
        acts = torch.tanh(x_in[:, :hidden]) * torch.sigmoid(x_in[:, hidden:])
        res_skip = ref_conv(acts, sd, f"{p}res_skip_layers.{i}")
        if i < n_layers - 1:
            x = (x + res_skip[:, :hidden]) * mask
            output = output + res_skip[:, hidden:]
        else:
            output = output + res_skip
    return output * mask


def coupling_stats(kind, x0, mask, sd, p, g, dilation, n_heads):
    if kind == "pre_conv":
        x0 = ref_encoder(x0 * mask, mask, sd, f"{p}pre_transformer.", n_heads) + x0
    if kind in ("vits", "pre_conv"):
        h = ref_wn(ref_conv(x0, sd, f"{p}pre") * mask, mask, sd, f"{p}enc.", dilation, g)
    elif kind == "pre_conv2":
        h = ref_conv(x0, sd, f"{p}pre") * mask
        h = h + ref_encoder(h * mask, mask, sd, f"{p}pre_transformer.", n_heads)
        h = ref_wn(h, mask, sd, f"{p}enc.", dilation, g)
    elif kind == "fft":
        h = ref_conv(x0, sd, f"{p}pre") * mask
        h = ref_fft(h, mask, sd, f"{p}enc.", n_heads, g) + h
    else:  # bert
        h = ref_encoder(ref_conv(x0, sd, f"{p}pre") * mask, mask, sd, f"{p}enc.", n_heads, g)
    return ref_conv(h, sd, f"{p}post") * mask


def ref_coupling(kind, x, mask, sd, p, g, reverse, dilation, n_heads):
    """Affine coupling; returns ``(y, sum of logs over valid frames, negated in reverse)``."""
    half = x.shape[1] // 2
    x0, x1 = x[:, :half], x[:, half:]
    stats = coupling_stats(kind, x0, mask, sd, p, g, dilation, n_heads)
    m, logs = (
        (stats, torch.zeros_like(stats)) if stats.shape[1] == half else (stats[:, :half], stats[:, half:])
    )
    if reverse:
        return torch.cat([x0, (x1 - m) * torch.exp(-logs) * mask], 1), -logs.sum((1, 2))
    return torch.cat([x0, m + x1 * torch.exp(logs) * mask], 1), logs.sum((1, 2))


def ref_mono(x, mask, sd, p, residual, reverse, n_heads):
    """VITS2 ``MonoTransformerFlowLayer`` (mean-only); logdet over valid frames."""
    half = x.shape[1] // 2
    x0, x1 = x[:, :half], x[:, half:]
    if not residual:
        m = (
            ref_conv(ref_encoder(x0 * mask, mask, sd, f"{p}pre_transformer.", n_heads) + x0, sd, f"{p}post")
            * mask
        )
        y1 = (x1 - m) * mask if reverse else m + x1 * mask
        return torch.cat([x0, y1], 1), torch.zeros(x.shape[0], dtype=x.dtype)
    if reverse:
        x0 = x0 / 2
    m = ref_conv(ref_encoder(x0, mask, sd, f"{p}pre_transformer.", n_heads), sd, f"{p}post") * mask
    logdet = math.log(2) * x.shape[1] * mask.sum((1, 2))
    if reverse:
        return torch.cat([x0, (x1 - m) / 2 * mask], 1), -logdet
    return torch.cat([2 * x0, x1 + m + x1 * mask], 1), logdet


def layer_plan(family, n_flows):
    """Upstream's module list: ``(index, kind)`` with ``kind`` in coupling kinds, ``flip`` or ``mono``."""
    if family == "coqui":
        return [(i, step) for i in range(n_flows) for step in ("vits", "flip")]
    if family.startswith("mono"):
        return [(3 * i + j, kind) for i in range(n_flows) for j, kind in enumerate(("vits", "flip", "mono"))]
    return [(2 * i + j, kind) for i in range(n_flows) for j, kind in enumerate((family, "flip"))]


def ref_flow(family, sd, x, mask, g=None, reverse=False, dilation=1, n_heads=2, n_flows=2):
    """Run the flow stored in ``sd`` under ``flow.flows.<i>.``; returns ``(y, log|det|)``."""
    plan = layer_plan(family, n_flows)
    logdet = torch.zeros(x.shape[0], dtype=x.dtype)
    for index, kind in reversed(plan) if reverse else plan:
        p = f"flow.flows.{index}."
        if kind == "flip":
            x, ld = torch.flip(x, [1]), 0.0
        elif kind == "mono":
            x, ld = ref_mono(x, mask, sd, p, family == "mono_layer_post_residual", reverse, n_heads)
        else:
            x, ld = ref_coupling(kind, x, mask, sd, p, g, reverse, dilation, n_heads)
        logdet = logdet + ld
    return x, logdet


# --------------------------------------------------------------------------- checkpoints


def _conv(name, out_ch, in_ch, k=1):
    return {f"{name}.weight": (out_ch, in_ch, k), f"{name}.bias": (out_ch,)}


def _wn_conv(name, out_ch, in_ch, k, layout):
    shapes = {
        "weight_g": (f"{name}.weight_g", f"{name}.weight_v"),
        "parametrizations": (
            f"{name}.parametrizations.weight.original0",
            f"{name}.parametrizations.weight.original1",
        ),
    }
    if layout == "plain":
        return _conv(name, out_ch, in_ch, k)
    g_key, v_key = shapes[layout]
    return {g_key: (out_ch, 1, 1), v_key: (out_ch, in_ch, k), f"{name}.bias": (out_ch,)}


def wn_shapes(p, hidden, kernel, n_layers, gin, layout):
    out = _wn_conv(f"{p}cond_layer", 2 * hidden * n_layers, gin, 1, layout) if gin else {}
    for i in range(n_layers):
        out |= _wn_conv(f"{p}in_layers.{i}", 2 * hidden, hidden, kernel, layout)
        out |= _wn_conv(
            f"{p}res_skip_layers.{i}", 2 * hidden if i < n_layers - 1 else hidden, hidden, 1, layout
        )
    return out


def encoder_shapes(
    p,
    width,
    filt,
    n_layers,
    kernel,
    window,
    n_heads,
    gin=0,
    attn="attn_layers",
    norms=(1, 2),
    causal_cond=False,
):
    out = {}
    for i in range(n_layers):
        for s in "qkvo":
            out |= _conv(f"{p}{attn}.{i}.conv_{s}", width, width)
        if window is not None:
            out |= {f"{p}{attn}.{i}.emb_rel_{s}": (1, 2 * window + 1, width // n_heads) for s in "kv"}
        out |= _conv(f"{p}ffn_layers.{i}.conv_1", filt, width, kernel) | _conv(
            f"{p}ffn_layers.{i}.conv_2", width, filt, kernel
        )
        for n in norms:
            out |= {f"{p}norm_layers_{n}.{i}.gamma": (width,), f"{p}norm_layers_{n}.{i}.beta": (width,)}
    if gin and not causal_cond:
        out |= {f"{p}spk_emb_linear.weight": (width, gin), f"{p}spk_emb_linear.bias": (width,)}
    return out


def coupling_shapes(kind, p, c, hidden, gin, layout, mean_only=True):
    half = c // 2
    out = _conv(f"{p}pre", hidden, half) | _conv(f"{p}post", half * (1 if mean_only else 2), hidden)
    if kind in ("vits", "pre_conv", "pre_conv2"):
        out |= wn_shapes(f"{p}enc.", hidden, 5, 2, gin, layout)
    if kind == "pre_conv":  # VITS2: Encoder(C/2, C/2, 2 heads, 2 layers, kernel 3, no window) + unused twin
        out |= encoder_shapes(f"{p}pre_transformer.", half, half, 2, 3, None, 2)
        out |= encoder_shapes(f"{p}post_transformer.", hidden, hidden, 2, 3, None, 2)
    elif kind == "pre_conv2":  # Encoder(H, H, 2 heads, 1 layer, the WN kernel, window 4)
        out |= encoder_shapes(f"{p}pre_transformer.", hidden, hidden, 1, 5, 4, 2)
    elif kind == "fft":  # FFT(H, 768 -> 12 here, 4 heads, 1 layer, kernel 5, causal), speaker gate
        out |= encoder_shapes(
            f"{p}enc.", hidden, 12, 1, 5, None, 4, attn="self_attn_layers", norms=(0, 1), causal_cond=True
        )
        if gin:
            out |= _conv(f"{p}enc.cond_pre", 2 * hidden, hidden) | _wn_conv(
                f"{p}enc.cond_layer", 2 * hidden, gin, 1, layout
            )
    elif kind == "bert":  # Encoder(H, filter, 2 heads, 3 layers, kernel 5, window 4, speaker at layer 2)
        out |= encoder_shapes(f"{p}enc.", hidden, 12, 3, 5, 4, 2, gin)
    return out


def checkpoint_state(
    family, c=4, hidden=8, gin=0, layout="weight_g", n_flows=2, seed=0, scale=0.4, mean_only=True, prefix=""
):
    """Random non-zero float32 weights (including ``post``) under upstream's keys ``flow.flows.<i>.…``, plus
    unrelated generator entries and ``emb_g`` when ``gin``."""
    shapes = {}
    for index, kind in layer_plan(family, n_flows):
        p = f"flow.flows.{index}."
        if kind == "mono":
            shapes |= encoder_shapes(f"{p}pre_transformer.", c // 2, c // 2, 2, 3, None, 2)
            shapes |= _conv(f"{p}post", c // 2, c // 2)
        elif kind != "flip":
            shapes |= coupling_shapes(kind, p, c, hidden, gin, layout, mean_only)
    shapes |= {"enc_p.emb.weight": (10, 6), "dec.conv_pre.weight": (8, 4, 7)}
    if gin:
        shapes["emb_g.weight"] = (3, gin)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = scale * torch.randn(shape, generator=gen)
        if key.endswith(("gamma", "weight_g", "original0")):
            value = 1 + value.abs()
        state[prefix + key] = value
    return state


def upstream_checkpoint(state, **extra):
    """The dict VITS's ``utils.save_checkpoint`` writes."""
    return {
        "model": state,
        "iteration": 1000,
        "optimizer": {"state": {}, "param_groups": []},
        "learning_rate": 2e-4,
        **extra,
    }

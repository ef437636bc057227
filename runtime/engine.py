"""The deterministic stream engine on the CPU: fixed-capacity stream slots, one token per
stream per step, the whole step in Numba.

Every stream slot owns a ring buffer of ``window`` latent-cache entries per layer (the MLA
latent plus the rotary key: 576 values per token per layer on real R1). A step appends one
token (LM mode) or one sensor frame (sensor mode) to each listed slot and returns its logits
or outputs.

It is a backend of the model's definition (``runtime.model`` for the float math,
``runtime.quant`` for the int8 rules, ``runtime.routing`` for routing), checked against it
by the tests: the Numba functions below are the twins of those rules (``_rmsnorm``,
``_rope``, ``_quantize_row``, ``_gemv_i8``, ``_swiglu``), and routing is
``runtime.routing.route_dispatch`` itself. Weights come from ``runtime.quant.pack_int8``.

Why it is batch-invariant and reproducible: linear layers run W8A8 (per-output-channel int8
weights, per-token dynamic int8 activations) with exact int32 accumulation, so their result
does not depend on summation order; every float operation left (norms, rotary, attention,
router logits, the absorbed ``kv_b_proj`` products, the sensor adapter) is computed per row
in a fixed loop order. A row's result therefore depends only on that stream's own history,
never on which other streams share the step or in which order.

Why it is fast on a CPU: the whole step is one Numba call over preallocated buffers, so a
step allocates nothing and pays no per-op dispatch. Rows run in parallel for attention and
dense parts; routed experts run once each over all the tokens routed to them (the dispatch
plan), reading each expert's weights once per step.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange, types
from numba.experimental import structref

from runtime.config import LORA_NORM_EPS
from runtime.model import Transformer
from runtime.quant import PackedMLP, QWeight, pack_int8
from runtime.routing import RouteBuffers, RoutingRule, route_dispatch, router_logits

log = logging.getLogger(__name__)

F32 = np.float32


class Dims(NamedTuple):
    """The step's sizes and scalars."""
    n_layers: int
    first_moe: int
    window: int
    heads: int
    nope: int
    rope: int
    v_dim: int
    kv_rank: int
    softmax_scale: np.float32
    eps: np.float32
    lora_eps: np.float32
    has_q_lora: bool
    interleave: bool
    rope_factor: np.float32


class AttnWeights(NamedTuple):
    """MLA weights of every layer, stacked; int8 ``*_q`` [L, N, K] rows with scales ``*_s``
    [L, N]. Without a q low rank ``q_a_*``/``q_b_*`` are empty, else ``q_*`` is."""
    q_a_q: np.ndarray
    q_a_s: np.ndarray
    q_a_norm: np.ndarray
    q_b_q: np.ndarray
    q_b_s: np.ndarray
    q_q: np.ndarray
    q_s: np.ndarray
    kv_a_q: np.ndarray
    kv_a_s: np.ndarray
    kv_a_norm: np.ndarray
    w_uk: np.ndarray
    w_uv: np.ndarray
    o_q: np.ndarray
    o_s: np.ndarray
    inv_freq: np.ndarray


class MlpWeights(NamedTuple):
    """SwiGLU blocks stacked: ``w13`` int8 [L, 2I, H] (rows gate | up), ``w2`` int8 [L, H, I]."""
    w13_q: np.ndarray
    w13_s: np.ndarray
    w2_q: np.ndarray
    w2_s: np.ndarray


class MoeWeights(NamedTuple):
    """Per MoE layer: router ``gate_t`` float32 [H, E] and ``bias`` [E]; routed experts
    ``w13_q`` int8 [E, 2I, H], ``w2_q`` [E, H, I] with scales; shared experts (when
    ``has_shared``)."""
    gate_t: np.ndarray
    bias: np.ndarray
    w13_q: np.ndarray
    w13_s: np.ndarray
    w2_q: np.ndarray
    w2_s: np.ndarray
    has_shared: bool
    shared: MlpWeights


class AdapterWeights(NamedTuple):
    """The sensor I/O adapter, float32 (one-element placeholders in LM mode)."""
    in_w: np.ndarray
    in_b: np.ndarray
    in_mean: np.ndarray
    in_std: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    out_mean: np.ndarray
    out_std: np.ndarray


class Weights(NamedTuple):
    """Everything a step reads: token embeddings [V, H], the layers' two norms [L, H],
    attention, dense MLPs, MoE, the final norm, the int8 head [V, H] and the adapter."""
    embed: np.ndarray
    input_norm: np.ndarray
    post_norm: np.ndarray
    attn: AttnWeights
    dense: MlpWeights
    moe: MoeWeights
    norm: np.ndarray
    head_q: np.ndarray
    head_s: np.ndarray
    adapter: AdapterWeights


class Buffers(NamedTuple):
    """Preallocated per-row scratch (row i serves slot ``rows[i]`` of the step), the latent
    ring buffers ``lat`` [L, S, W, C] / ``pe`` [L, S, W, R], the slots' positions ``pos``
    [S], the step's inputs (``tokens``, ``feats``) and outputs (``logits``, ``outputs``)."""
    rows: np.ndarray
    tokens: np.ndarray
    feats: np.ndarray
    logits: np.ndarray
    outputs: np.ndarray
    x: np.ndarray
    h: np.ndarray
    hq: np.ndarray
    hscale: np.ndarray
    q: np.ndarray
    kv: np.ndarray
    q_low: np.ndarray
    qabs: np.ndarray
    scores: np.ndarray
    ctx: np.ndarray
    attn_out: np.ndarray
    mid: np.ndarray
    midq: np.ndarray
    shared_out: np.ndarray
    yout: np.ndarray
    router_logits: np.ndarray
    lat: np.ndarray
    pe: np.ndarray
    pos: np.ndarray


@structref.register
class _StateType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class State(structref.StructRefProxy):
    """An engine's named structures held together: ``buffers``, ``weights``, routing ``rule``
    and ``route`` buffers, ``dims``. A Numba step receives it as one pointer; passing the
    NamedTuples themselves costs about 10 us per call to unbox."""


structref.define_proxy(State, _StateType, ["buffers", "weights", "rule", "route", "dims"])


# ----------------------------------------------------------------------------------------
# Numba twins of the model's rules. All float reductions run in a fixed sequential order.

@njit(cache=True, inline="always")
def _quantize_row(x, q):
    """Per-token symmetric int8 of x[K] into q[K]; returns the scale (absmax / 127).

    The rule of ``runtime.quant.quantize_activation``, inlined without its clamp (for finite
    input |x| / scale <= 127 already; the clamp costs a step 5-10%). A test holds the two
    bit-identical."""
    amax = F32(0.0)
    for k in range(x.shape[0]):
        a = abs(x[k])
        if a > amax:
            amax = a
    scale = amax / F32(127.0)
    if scale == F32(0.0):
        scale = F32(1.0)
    for k in range(x.shape[0]):
        q[k] = np.int8(np.rint(x[k] / scale))
    return scale


@njit(cache=True, inline="always")
def _gemv_i8(q, xs, w, ws, out):
    """out[N] = (int32 dot of q[K] with each int8 row of w[N,K]) * xs * ws[N]; exact accumulation."""
    n_out, k_in = w.shape
    for n in range(n_out):
        acc = np.int32(0)
        for k in range(k_in):
            acc += np.int32(q[k]) * np.int32(w[n, k])
        out[n] = F32(acc) * xs * ws[n]


@njit(cache=True, inline="always")
def _rmsnorm(x, weight, eps, out):
    ss = F32(0.0)
    for k in range(x.shape[0]):
        ss += x[k] * x[k]
    inv = F32(1.0) / np.sqrt(ss / F32(x.shape[0]) + eps)
    for k in range(x.shape[0]):
        out[k] = weight[k] * (x[k] * inv)


@njit(cache=True, inline="always")
def _rope(x, pos, inv_freq, factor, interleave):
    """Rotate x[R] in place for integer position ``pos``.

    Pairs are (0,1),(2,3)... when ``interleave`` else (i, i+R/2), as in the model; the
    engine keeps queries and keys in that same paired layout, so their dot products are
    those of the model.
    """
    half = x.shape[0] // 2
    for i in range(half):
        angle = np.float64(pos) * np.float64(inv_freq[i])     # float64: positions grow without bound
        c = F32(np.cos(angle) * np.float64(factor))
        s = F32(np.sin(angle) * np.float64(factor))
        ia, ib = (2 * i, 2 * i + 1) if interleave else (i, i + half)
        a, b = x[ia], x[ib]
        x[ia] = a * c - b * s
        x[ib] = b * c + a * s


@njit(cache=True, inline="always")
def _swiglu(q, qs, w13, s13, w2, s2, mid, midq, out):
    """out = down(silu(gate) * up) for the int8 row ``q`` (scale ``qs``): the int8 SwiGLU rule.
    ``w13`` [2I, H] rows gate | up, ``w2`` [H, I]; ``mid``/``midq`` are scratch rows."""
    inter = w2.shape[1]
    _gemv_i8(q, qs, w13, s13, mid[:2 * inter])
    for k in range(inter):
        g = mid[k]
        mid[k] = g / (F32(1.0) + np.exp(-g)) * mid[inter + k]
    ms = _quantize_row(mid[:inter], midq[:inter])
    _gemv_i8(midq[:inter], ms, w2, s2, out)


# ----------------------------------------------------------------------------------------
# The step's stages.

# Each stage takes the fields it uses out of the named structures before its prange loop,
# one plain assignment per field: parallel loops then capture plain arrays and scalars only.
# (A NamedTuple cannot be captured, and in Numba 0.68 a tuple-unpacking assignment such as
# ``x, s = b.x, b.s`` before a prange loop made the loop's writes to ``s`` vanish.)

@njit(cache=True, parallel=True)
def _attention_rows(layer, n, b, w, norm, d):
    """Pre-norm MLA (absorbed form) for each listed row; adds the attention output to x."""
    nh = d.heads
    nope = d.nope
    rope_dim = d.rope
    v_dim = d.v_dim
    C = d.kv_rank
    window = d.window
    eps = d.eps
    lora_eps = d.lora_eps
    scale = d.softmax_scale
    factor = d.rope_factor
    interleave = d.interleave
    has_q_lora = d.has_q_lora
    x = b.x
    hb = b.h
    hqb = b.hq
    qb = b.q
    kvb = b.kv
    q_low = b.q_low
    qabs_b = b.qabs
    scores_b = b.scores
    ctx_b = b.ctx
    attn_out = b.attn_out
    pos = b.pos
    rows = b.rows
    lat = b.lat[layer]
    pe = b.pe[layer]
    kv_a_q = w.kv_a_q[layer]
    kv_a_s = w.kv_a_s[layer]
    kv_a_norm = w.kv_a_norm[layer]
    q_a_q = w.q_a_q
    q_a_s = w.q_a_s
    q_b_q = w.q_b_q
    q_b_s = w.q_b_s
    q_q = w.q_q
    q_s = w.q_s
    q_a_norm = w.q_a_norm
    w_uk = w.w_uk[layer]
    w_uv = w.w_uv[layer]
    o_q = w.o_q[layer]
    o_s = w.o_s[layer]
    inv_freq = w.inv_freq
    qr = q_a_q.shape[1]
    for i in prange(n):
        slot = rows[i]
        h, hq, q, kv = hb[i], hqb[i], qb[i], kvb[i]
        _rmsnorm(x[i], norm, eps, h)
        xs = _quantize_row(h, hq)
        qd = nh * (nope + rope_dim)
        _gemv_i8(hq, xs, kv_a_q, kv_a_s, kv)
        if has_q_lora:
            low = q_low[i, :qr]
            _gemv_i8(hq, xs, q_a_q[layer], q_a_s[layer], low)
            _rmsnorm(low, q_a_norm[layer], lora_eps, low)
            qs = _quantize_row(low, hq[:qr])
            _gemv_i8(hq[:qr], qs, q_b_q[layer], q_b_s[layer], q[:qd])
        else:
            _gemv_i8(hq, xs, q_q[layer], q_s[layer], q[:qd])
        p = pos[slot]
        idx = p % window
        _rmsnorm(kv[:C], kv_a_norm, lora_eps, lat[slot, idx])
        for r in range(rope_dim):
            pe[slot, idx, r] = kv[C + r]
        _rope(pe[slot, idx], p, inv_freq, factor, interleave)
        n_valid = min(p + 1, window)
        qabs, scores, ctx = qabs_b[i], scores_b[i], ctx_b[i]
        for hh in range(nh):
            base = hh * (nope + rope_dim)
            _rope(q[base + nope: base + nope + rope_dim], p, inv_freq, factor, interleave)
            for c in range(C):
                acc = F32(0.0)
                for dd in range(nope):
                    acc += q[base + dd] * w_uk[hh, dd, c]
                qabs[hh, c] = acc
            m = F32(-np.inf)
            for j in range(n_valid):
                acc = F32(0.0)
                for c in range(C):
                    acc += qabs[hh, c] * lat[slot, j, c]
                acc2 = F32(0.0)
                for r in range(rope_dim):
                    acc2 += q[base + nope + r] * pe[slot, j, r]
                sc = (acc + acc2) * scale
                scores[hh, j] = sc
                if sc > m:
                    m = sc
            total = F32(0.0)
            for j in range(n_valid):
                e = np.exp(scores[hh, j] - m)
                scores[hh, j] = e
                total += e
            for c in range(C):
                ctx[hh, c] = F32(0.0)
            for j in range(n_valid):
                pj = scores[hh, j] / total
                for c in range(C):
                    ctx[hh, c] += pj * lat[slot, j, c]
            for vv in range(v_dim):
                acc = F32(0.0)
                for c in range(C):
                    acc += ctx[hh, c] * w_uv[hh, vv, c]
                attn_out[i, hh * v_dim + vv] = acc
        nv = nh * v_dim
        os_ = _quantize_row(attn_out[i], hq[:nv])
        _gemv_i8(hq[:nv], os_, o_q, o_s, h)
        for k in range(x.shape[1]):
            x[i, k] += h[k]


@njit(cache=True, parallel=True)
def _dense_mlp_rows(l, n, b, w, norm, eps):
    """Pre-norm SwiGLU MLP (dense layer ``l``) for each row; adds into x."""
    x = b.x
    h = b.h
    hq = b.hq
    mid = b.mid
    midq = b.midq
    w13_q = w.w13_q[l]
    w13_s = w.w13_s[l]
    w2_q = w.w2_q[l]
    w2_s = w.w2_s[l]
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        xs = _quantize_row(h[i], hq[i])
        _swiglu(hq[i], xs, w13_q, w13_s, w2_q, w2_s, mid[i], midq[i], h[i])
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, parallel=True)
def _moe_prepare_rows(n, b, norm, eps):
    """Pre-norm and per-token int8 of the normed rows (the router reads h, the experts hq)."""
    x = b.x
    h = b.h
    hq = b.hq
    hscale = b.hscale
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        hscale[i] = _quantize_row(h[i], hq[i])


@njit(cache=True, parallel=True)
def _moe_experts(m, n_active, rb, b, w):
    """Each active expert once, over all tokens routed to it; yout[a] is assignment a's output."""
    active = rb.active
    offsets = rb.offsets
    token_ids = rb.token_ids
    hq = b.hq
    hscale = b.hscale
    mid = b.mid
    midq = b.midq
    yout = b.yout
    w13_q = w.w13_q[m]
    w13_s = w.w13_s[m]
    w2_q = w.w2_q[m]
    w2_s = w.w2_s[m]
    for ai in prange(n_active):
        e = active[ai]
        for a in range(offsets[e], offsets[e + 1]):
            t = token_ids[a]
            _swiglu(hq[t], hscale[t], w13_q[e], w13_s[e], w2_q[e], w2_s[e], mid[a], midq[a], yout[a])


@njit(cache=True, parallel=True)
def _moe_combine_rows(m, n, top_k, rb, b, w):
    """x += the token's expert outputs times their weights, in its top-k order, then its
    shared experts (the order of ``runtime.model.MoE``)."""
    topk_pos = rb.topk_pos
    topk_weight = rb.topk_weight
    x = b.x
    hb = b.h
    hq = b.hq
    hscale = b.hscale
    mid = b.mid
    midq = b.midq
    yout = b.yout
    shared_out = b.shared_out
    has_shared = w.has_shared
    s13_q = w.shared.w13_q
    s13_s = w.shared.w13_s
    s2_q = w.shared.w2_q
    s2_s = w.shared.w2_s
    H = x.shape[1]
    for i in prange(n):
        h = hb[i]
        for k in range(H):
            h[k] = F32(0.0)
        for j in range(top_k):
            a = topk_pos[i, j]
            wt = topk_weight[i, j]
            for k in range(H):
                h[k] += wt * yout[a, k]
        if has_shared:
            so = shared_out[i]
            _swiglu(hq[i], hscale[i], s13_q[m], s13_s[m], s2_q[m], s2_s[m], mid[i], midq[i], so)
            for k in range(H):
                h[k] += so[k]
        for k in range(H):
            x[i, k] += h[k]


@njit(cache=True)
def _run_layers(n, st):
    """All decoder layers for the ``n`` listed rows."""
    b, w, d, rule, rb = st.buffers, st.weights, st.dims, st.rule, st.route
    for layer in range(d.n_layers):
        _attention_rows(layer, n, b, w.attn, w.input_norm[layer], d)
        if layer < d.first_moe:
            _dense_mlp_rows(layer, n, b, w.dense, w.post_norm[layer], d.eps)
            continue
        m = layer - d.first_moe
        _moe_prepare_rows(n, b, w.post_norm[layer], d.eps)
        logits = b.router_logits[:n]
        router_logits(b.h[:n], w.moe.gate_t[m], logits)
        n_active = route_dispatch(logits, w.moe.bias[m], rule, rb)
        _moe_experts(m, n_active, rb, b, w.moe)
        _moe_combine_rows(m, n, rule.top_k, rb, b, w.moe)
    _advance(b.pos, b.rows, n)


@njit(cache=True, parallel=True)
def _embed_rows(n, b, embed):
    x = b.x
    tokens = b.tokens
    for i in prange(n):
        x[i] = embed[tokens[i]]


@njit(cache=True, parallel=True)
def _head_rows(n, b, norm, eps, head_q, head_s):
    x = b.x
    h = b.h
    hq = b.hq
    out = b.logits
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        xs = _quantize_row(h[i], hq[i])
        _gemv_i8(hq[i], xs, head_q, head_s, out[i])


@njit(cache=True)
def _step_tokens(n, st):
    """LM mode: ``buffers.tokens[:n]`` in, ``buffers.logits[:n]`` out."""
    b, w = st.buffers, st.weights
    _embed_rows(n, b, w.embed)
    _run_layers(n, st)
    _head_rows(n, b, w.norm, st.dims.eps, w.head_q, w.head_s)


@njit(cache=True, parallel=True)
def _sensor_in_rows(n, b, a):
    feats = b.feats
    x = b.x
    mean = a.in_mean
    std = a.in_std
    w = a.in_w
    bias = a.in_b
    for i in prange(n):
        for o in range(w.shape[0]):
            acc = F32(0.0)
            for f in range(w.shape[1]):
                acc += ((feats[i, f] - mean[f]) / std[f]) * w[o, f]
            x[i, o] = acc + bias[o]


@njit(cache=True, parallel=True)
def _sensor_out_rows(n, b, norm, eps, a):
    x = b.x
    h = b.h
    out = b.outputs
    w = a.out_w
    bias = a.out_b
    mean = a.out_mean
    std = a.out_std
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        for o in range(w.shape[0]):
            acc = F32(0.0)
            for k in range(w.shape[1]):
                acc += h[i, k] * w[o, k]
            out[i, o] = (acc + bias[o]) * std[o] + mean[o]


@njit(cache=True)
def _step_sensor(n, st):
    """Sensor mode: ``buffers.feats[:n]`` in, ``buffers.outputs[:n]`` out."""
    b, w = st.buffers, st.weights
    _sensor_in_rows(n, b, w.adapter)
    _run_layers(n, st)
    _sensor_out_rows(n, b, w.norm, st.dims.eps, w.adapter)


@njit(cache=True)
def _valid_slots(slots, capacity, seen):
    """Slots in range and distinct (``seen`` is scratch [capacity]); no allocation."""
    ok = True
    for i in range(slots.shape[0]):
        s = slots[i]
        if s < 0 or s >= capacity or seen[s]:
            ok = False
            break
        seen[s] = True
    for i in range(slots.shape[0]):
        s = slots[i]
        if 0 <= s < capacity:
            seen[s] = False
    return ok


@njit(cache=True)
def _advance(pos, rows, n):
    for i in range(n):
        pos[rows[i]] += 1


# ----------------------------------------------------------------------------------------
# From packed torch weights to the engine's numpy layout.

def _np(t: torch.Tensor, dtype=F32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def _stack(ts: list, shape: tuple, dtype) -> np.ndarray:
    """Tensors copied one at a time into one preallocated [len(ts), *shape] array (no second copy)."""
    out = np.empty((len(ts), *shape), dtype)
    for i, t in enumerate(ts):
        out[i] = t.detach().cpu().numpy()
    return out


def _rows(ws: list[QWeight], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights as stacked output rows [L, n, k] and scales [L, n] (empty stacks keep the shape)."""
    pairs = [w.rows() for w in ws]
    return _stack([q for q, _ in pairs], (n, k), np.int8), _stack([s for _, s in pairs], (n,), F32)


def _norms(ts: list, n: int) -> np.ndarray:
    return np.stack([_np(t) for t in ts]) if ts else np.zeros((0, n), F32)


def _mlps(mlps: list[PackedMLP], hidden: int, inter: int) -> MlpWeights:
    w13_q, w13_s = _rows([m.w13 for m in mlps], 2 * inter, hidden)
    w2_q, w2_s = _rows([m.w2 for m in mlps], hidden, inter)
    return MlpWeights(w13_q, w13_s, w2_q, w2_s)


class Engine:
    """Fixed-capacity stream slots over a DeepSeek model, stepped one token per stream.

    ``step_tokens`` (LM mode) and ``step_sensor`` (sensor mode, needs the model's I/O adapter)
    return views into preallocated output buffers, valid until the next step: copy what you
    keep. A stream's results are bitwise identical whatever other slots share its step.
    """

    def __init__(self, model: Transformer, *, capacity: int = 1, window: int = 256):
        if capacity < 1 or window < 1:
            raise ValueError(f"capacity and window must be positive (got {capacity}, {window})")
        cfg = model.config
        if cfg.attention_bias:
            raise ValueError("the stream engine does not support attention_bias=True checkpoints")
        self.config, self.capacity, self.window = cfg, capacity, window
        packed = pack_int8(model)
        self.adapter = packed.adapter
        self.input_names = list(self.adapter.input_names) if self.adapter is not None else []
        self.output_names = list(self.adapter.output_names) if self.adapter is not None else []
        # A model without MoE layers never routes; its rule only sizes empty buffers.
        self.rule = packed.rule or RoutingRule(False, False, False, 2, 1, 1, 1, False, 1.0)
        self.weights, self.dims = self._load(packed)
        self.buffers = self._allocate()
        self.route_buffers = RouteBuffers.allocate(self.rule, capacity)
        self.state = State(self.buffers, self.weights, self.rule, self.route_buffers, self.dims)
        self.pos, self.logits, self.outputs = self.buffers.pos, self.buffers.logits, self.buffers.outputs
        self.seen = np.zeros(capacity, np.bool_)
        # Numba's OpenMP layer shares libgomp with torch: its first parallel launch resets
        # torch's intra-op thread count, which the caller may have chosen on purpose.
        torch_threads = torch.get_num_threads()
        self._warmup()
        torch.set_num_threads(torch_threads)

    # -- set-up --------------------------------------------------------------------------
    def _load(self, p) -> tuple[Weights, Dims]:
        cfg = self.config
        H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
        qr, qd = cfg.q_lora_rank or 1, nh * cfg.qk_head_dim
        attn = [layer.attn for layer in p.layers]
        lora = cfg.q_lora_rank is not None
        q_a_q, q_a_s = _rows([a.q_a for a in attn] if lora else [], qr, H)
        q_b_q, q_b_s = _rows([a.q_b for a in attn] if lora else [], qd, qr)
        q_q, q_s = _rows([] if lora else [a.q for a in attn], qd, H)
        kv_a_q, kv_a_s = _rows([a.kv_a for a in attn], C + R, H)
        o_q, o_s = _rows([a.o for a in attn], H, nh * cfg.v_head_dim)
        aw = AttnWeights(q_a_q, q_a_s, _norms([a.q_a_norm for a in attn] if lora else [], qr), q_b_q, q_b_s,
                         q_q, q_s, kv_a_q, kv_a_s, _norms([a.kv_a_norm for a in attn], C),
                         _stack([a.w_uk for a in attn], tuple(attn[0].w_uk.shape), F32),
                         _stack([a.w_uv for a in attn], tuple(attn[0].w_uv.shape), F32),
                         o_q, o_s, _np(p.inv_freq))
        dense = _mlps([layer.mlp for layer in p.layers if layer.experts is None], H, cfg.intermediate_size)
        moe = [layer for layer in p.layers if layer.experts is not None]
        E, I, Is = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        has_shared = bool(moe) and moe[0].mlp is not None
        experts = [layer.experts for layer in moe]
        # Each layer's experts are transposed straight into the stacked arrays: loading holds the
        # engine's copy plus nothing (the model's own tensors are the caller's to drop).
        mw = MoeWeights(
            gate_t=_stack([e.gate.T for e in experts], (H, E), F32),
            bias=_stack([e.bias if e.bias is not None else torch.zeros(E) for e in experts], (E,), F32),
            w13_q=_stack([e.w13.transpose(1, 2) for e in experts], (E, 2 * I, H), np.int8),
            w13_s=_stack([e.s13 for e in experts], (E, 2 * I), F32),
            w2_q=_stack([e.w2.transpose(1, 2) for e in experts], (E, H, I), np.int8),
            w2_s=_stack([e.s2 for e in experts], (E, H), F32),
            has_shared=has_shared,
            shared=_mlps([layer.mlp for layer in moe] if has_shared else [], H, max(Is, 1)))
        head_q, head_s = _rows([p.head], cfg.vocab_size, H)
        a = p.adapter
        if a is not None:
            adapter = AdapterWeights(*(_np(t) for t in (a.in_w, a.in_b, a.in_mean, a.in_std, a.out_w, a.out_b,
                                                         a.out_mean, a.out_std)))
        else:
            adapter = AdapterWeights(np.zeros((H, 1), F32), *(np.zeros(1, F32) for _ in range(3)),
                                     np.zeros((1, H), F32), *(np.zeros(1, F32) for _ in range(3)))
        weights = Weights(_np(p.embed), _norms([layer.input_norm for layer in p.layers], H),
                          _norms([layer.post_attention_norm for layer in p.layers], H), aw, dense, mw,
                          _np(p.norm), head_q[0], head_s[0], adapter)
        dims = Dims(cfg.num_hidden_layers, cfg.first_k_dense_replace, self.window, nh, cfg.qk_nope_head_dim,
                    R, cfg.v_head_dim, C, F32(cfg.softmax_scale), F32(cfg.rms_norm_eps), F32(LORA_NORM_EPS),
                    lora, bool(cfg.rope_interleave), F32(p.rope_factor))
        return weights, dims

    def _allocate(self) -> Buffers:
        cfg, S, W = self.config, self.capacity, self.window
        H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
        L, k = cfg.num_hidden_layers, self.rule.top_k
        widest = max(H, cfg.q_lora_rank or 0, nh * cfg.v_head_dim, nh * cfg.qk_head_dim)
        inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1))
        return Buffers(
            rows=np.zeros(S, np.int64), tokens=np.zeros(S, np.int64),
            feats=np.zeros((S, max(len(self.input_names), 1)), F32), logits=np.zeros((S, cfg.vocab_size), F32),
            outputs=np.zeros((S, max(len(self.output_names), 1)), F32),
            x=np.zeros((S, H), F32), h=np.zeros((S, H), F32), hq=np.zeros((S, widest), np.int8),
            hscale=np.zeros(S, F32), q=np.zeros((S, nh * cfg.qk_head_dim), F32), kv=np.zeros((S, C + R), F32),
            q_low=np.zeros((S, cfg.q_lora_rank or 1), F32), qabs=np.zeros((S, nh, C), F32),
            scores=np.zeros((S, nh, W), F32), ctx=np.zeros((S, nh, C), F32),
            attn_out=np.zeros((S, nh * cfg.v_head_dim), F32),
            mid=np.zeros((max(S * k, S), 2 * inter), F32), midq=np.zeros((max(S * k, S), inter), np.int8),
            shared_out=np.zeros((S, H), F32), yout=np.zeros((S * k, H), F32),
            router_logits=np.zeros((S, self.rule.n_experts), F32),
            lat=np.zeros((L, S, W, C), F32), pe=np.zeros((L, S, W, R), F32), pos=np.zeros(S, np.int64))

    def _warmup(self) -> None:
        """Compile every kernel now (or load it from the on-disk cache), then clear the state."""
        if self.adapter is not None:
            self.step_sensor(np.zeros(1, np.int64), np.zeros((1, len(self.input_names)), F32))
        self.step_tokens(np.zeros(1, np.int64), np.zeros(1, np.int64))
        self.reset_all()

    # -- state ---------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s history (a new stream starts at position 0)."""
        b = self.buffers
        b.pos[slot] = 0
        b.lat[:, slot] = 0
        b.pe[:, slot] = 0

    def reset_all(self) -> None:
        """Forget every slot's history."""
        b = self.buffers
        b.pos[:] = 0
        b.lat[:] = 0
        b.pe[:] = 0

    def positions(self) -> np.ndarray:
        """Tokens seen so far by each slot."""
        return self.pos.copy()

    # -- steps ---------------------------------------------------------------------------
    def _check_slots(self, slots: np.ndarray) -> int:
        n = len(slots)
        if n == 0 or n > self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} slots, got {n}")
        if not _valid_slots(slots, self.capacity, self.seen):
            raise ValueError(f"slot ids must be distinct and in 0..{self.capacity - 1}, got {list(slots)}")
        self.buffers.rows[:n] = slots
        return n

    def step_tokens(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append token ``tokens[i]`` to slot ``slots[i]``; returns logits [n, vocab] (a view)."""
        n = self._check_slots(np.asarray(slots))
        tokens = np.asarray(tokens)
        if tokens.shape != (n,) or tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"tokens must be {n} ids in 0..{self.config.vocab_size - 1}")
        self.buffers.tokens[:n] = tokens
        _step_tokens(n, self.state)
        return self.logits[:n]

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Append one frame per slot (features [n, F] in ``input_names`` order, engineering
        units); returns outputs [n, O] in ``output_names`` order (a view)."""
        if self.adapter is None:
            raise ValueError("this model has no I/O adapter: sensor steps need a sensor-mode package")
        n = self._check_slots(np.asarray(slots))
        features = np.asarray(features, dtype=F32)
        if features.shape != (n, len(self.input_names)):
            raise ValueError(f"features must be [{n}, {len(self.input_names)}], got {features.shape}")
        self.buffers.feats[:n] = features
        _step_sensor(n, self.state)
        return self.outputs[:n]

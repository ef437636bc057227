"""The CPU stream engine's step in Numba: the kernels, the buffers they work in and the entry
points (``runtime.cpu.engine.Engine`` loads the weights and drives them; ``runtime.cpu.parallel``
calls the stages one by one). A step covers fixed-capacity stream slots, one token per stream
(or a stream's whole history in one chunked pass).

Every stream slot owns a ring buffer of ``window`` latent-cache entries per layer (the MLA
latent plus the rotary key: 576 values per token per layer on real R1), kept twice: position-
major ``vals`` [L, S, W, C] for the attention-weighted sum, and channel-major ``keys``
[L, S, C + R, W] (latent and rotated rotary key) for the scores. A step appends one token (LM
mode) or one sensor frame (sensor mode) to each listed slot and returns its logits or outputs;
:meth:`Engine.prefill` appends a stream's whole history (a warm start, a prompt) in chunks.

It is a backend of the model's definition (``runtime.model.transformer`` for the float math,
``runtime.model.quant`` for the int8 rules, ``runtime.model.routing`` for routing), checked against it
by the tests: the Numba functions below are the twins of those rules (``_rmsnorm``,
``_rope_angles``/``_rope_apply``, ``quantize_row_u8``, ``gemm_rows``, ``_silu_mul``), and routing is
``runtime.model.routing.route_dispatch`` itself. Weights come from ``runtime.model.packing.pack_int8``.

Why it is batch-invariant and reproducible: linear layers run W8A8 (per-output-channel int8
weights, per-token dynamic int8 activations) with exact int32 accumulation, so their result
does not depend on summation order: one GEMM per weight matrix serves all rows of a step
(``runtime.cpu.int8``). Every float reduction left runs in a fixed order that depends on the
sizes of the model alone, and is vectorised across independent results, never across the
terms of one sum:

- RMS norms: the squares summed in eight running sums (channel k into sum k mod 8, in
  order), added pairwise, then the last n mod 8 in order; per-token int8 scales: a max.
- attention scores of one head: for each position, the latent part summed over latent
  channels in ascending order, the rotary part likewise, then added; SIMD lanes run over
  positions (the channel-major ``keys``).
- softmax: the max, then exp(score - max) by a fixed vectorised formula (``_exp_row``, within
  1 ulp of exp; SiLU uses it too), summed in 16 lanes (lane l takes ring positions l, l + 16,
  ... in ascending order), then the lane sums pairwise (``_sum_blocked``).
- attention-weighted latent: over ring positions in ascending order; lanes over channels.
- absorbed ``kv_b_proj`` products (query into the latent, latent into values): over the
  reduced index in ascending order; lanes over the output index.
- router logits: ``runtime.model.routing.router_logits`` (blocks of eight, lanes over experts).
- a token's expert outputs summed in its top-k order, then the shared experts.

A row's result therefore depends only on that stream's own history, never on which other
streams share the step or in which order, and a prefilled stream holds the very cache bits
that stepping it token by token gives.

Why it is fast on a CPU: the whole step is one Numba call over preallocated buffers, so a
step allocates nothing and pays no per-op dispatch. A step runs on the calling thread alone:
no parallel region to launch or to wait for (a pool thread preempted by another process would
stall the whole step), and one compiled entry point (Numba re-optimises everything a function
calls for each entry point, so fewer entries compile faster). Every weight matrix goes through
one int8 GEMM for all rows of the pass, and routed experts run once each over all the tokens
routed to them (the dispatch plan), reading each expert's weights once per step; the absorbed
``kv_b_proj`` products run one head at a time over all rows, reading a head's weights once per
step. A prefill pass takes up to ``runtime.cpu.engine.PREFILL_ROWS`` positions, so each expert sees many rows per
weight read. The kernels
compile with Numba's numpy error model: no zero-division check per ``/`` or ``%`` (those
branches keep loops from vectorising); no divisor can be zero (norms add eps > 0, softmax sums
hold at least exp(0), ``runtime.model.packing.pack_int8`` refuses an adapter std of zero).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.cpu.int8 import absmax, gemm_rows, quantize_row_u8, rows_dot
from runtime.cpu.state import F32
from runtime.model.routing import route_dispatch, router_logits



# ----------------------------------------------------------------------------------------
# Numba twins of the model's rules. Every float reduction runs in the fixed order above.

@njit(cache=True, error_model="numpy", inline="always")
def quantize_row(x, q):
    """Per-token symmetric int8 of x[K] into q[K]; returns the scale (absmax / 127): the rule
    of ``runtime.model.quant.quantize_activation`` as plain int8 (the engine stores it offset, by
    ``runtime.cpu.int8.quantize_row_u8``). A test holds both bit-identical to the rule."""
    amax = absmax(x)
    scale = amax / F32(127.0)
    if scale == F32(0.0):
        scale = F32(1.0)
    for k in range(x.shape[0]):
        q[k] = np.int8(np.rint(x[k] / scale))
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _rmsnorm(x, weight, eps, out):
    """out = weight * x / sqrt(mean(x^2) + eps); the squares summed in eight running sums
    (sum l takes x[l], x[l + 8], ... in order), added pairwise, then the last n % 8 in order."""
    n = x.shape[0]
    n8 = n - n % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = F32(0.0)
    for k in range(0, n8, 8):
        s0 += x[k] * x[k]
        s1 += x[k + 1] * x[k + 1]
        s2 += x[k + 2] * x[k + 2]
        s3 += x[k + 3] * x[k + 3]
        s4 += x[k + 4] * x[k + 4]
        s5 += x[k + 5] * x[k + 5]
        s6 += x[k + 6] * x[k + 6]
        s7 += x[k + 7] * x[k + 7]
    ss = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for k in range(n8, n):
        ss += x[k] * x[k]
    inv = F32(1.0) / np.sqrt(ss / F32(x.shape[0]) + eps)
    for k in range(x.shape[0]):
        out[k] = weight[k] * (x[k] * inv)


@njit(cache=True, error_model="numpy", inline="always")
def exp_row(x, sign, shift, out, n, bits, scale):
    """out[j] = exp(sign * x[j] - shift) for j < n (``out`` may be ``x``), in float32 by a fixed formula that vectorises (a
    libm call per element would not): n = round(v / ln 2), r = v - n ln 2 in two parts
    (Cody-Waite), a degree-6 polynomial for exp(r), times 2^n built from its bits in ``bits``
    (int32 scratch; ``scale`` is the same memory as float32). Within 2 ulp of exp for v in
    [-87, 88] (clamped there: exp(-87) ~ 1.6e-38); NaN stays NaN. The same input always gives
    the same bits, whatever lane or loop tail it falls in."""
    for j in range(n):
        v = sign * x[j] - shift
        v = F32(-87.0) if v < F32(-87.0) else v
        v = F32(88.0) if v > F32(88.0) else v
        k = np.floor(v * F32(1.44269504088896341) + F32(0.5))
        r = v - k * F32(0.693359375) - k * F32(-2.12194440e-4)
        z = r * r
        y = (((((F32(1.9875691500e-4) * r + F32(1.3981999507e-3)) * r + F32(8.3334519073e-3)) * r
               + F32(4.1665795894e-2)) * r + F32(1.6666665459e-1)) * r + F32(5.0000001201e-1)) * z + r + F32(1.0)
        out[j] = y
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for j in range(n):
        out[j] = out[j] * scale[j]


@njit(cache=True, error_model="numpy", inline="always")
def _max8(x, n):
    """max of x[:n] (NaNs skipped, -inf if none), eight running maxima at once (exact in any order)."""
    n8 = n - n % 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = F32(-np.inf)
    for k in range(0, n8, 8):
        m0 = x[k] if x[k] > m0 else m0
        m1 = x[k + 1] if x[k + 1] > m1 else m1
        m2 = x[k + 2] if x[k + 2] > m2 else m2
        m3 = x[k + 3] if x[k + 3] > m3 else m3
        m4 = x[k + 4] if x[k + 4] > m4 else m4
        m5 = x[k + 5] if x[k + 5] > m5 else m5
        m6 = x[k + 6] if x[k + 6] > m6 else m6
        m7 = x[k + 7] if x[k + 7] > m7 else m7
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for k in range(n8, n):
        m = x[k] if x[k] > m else m
    return m


@njit(cache=True, error_model="numpy", inline="always")
def _sum_blocked(x, blocks, lanes):
    """The sum of x[:16 * blocks] in a fixed blocked order: lane l adds x[16 b + l]
    over b ascending (16 lanes at once), then the 16 lane sums pairwise, (0+1), (2+3), ...,
    then those pairs, down to one. ``lanes`` is scratch [16]."""
    for lane in range(16):
        lanes[lane] = F32(0.0)
    for blk in range(blocks):
        for lane in range(16):
            lanes[lane] += x[16 * blk + lane]
    width = 8
    while width >= 1:
        for lane in range(width):
            lanes[lane] = lanes[2 * lane] + lanes[2 * lane + 1]
        width //= 2
    return lanes[0]


@njit(cache=True, error_model="numpy", inline="always")
def _silu_mul(mid, inter, bits, scale, e):
    """mid[:inter] = silu(gate) * up = gate / (1 + exp(-gate)) * up for a row ``mid``
    [gate inter | up inter]; ``e`` scratch [inter] (exp by :func:`exp_row`)."""
    exp_row(mid, F32(-1.0), F32(0.0), e, inter, bits, scale)
    for k in range(inter):
        mid[k] = mid[k] / (F32(1.0) + e[k]) * mid[inter + k]


@njit(cache=True, error_model="numpy")
def _swiglu_rows(lo, hi, inter, xq32, xs, idx, gather, w13_q, w13_r, w13_s, w2_q, w2_r, w2_s, b, out):
    """out[r] = down(silu(gate) * up) of activation row r (``idx[r]`` when ``gather``) for r in
    [lo, hi): the int8 SwiGLU rule, one GEMM per weight over the rows; ``b.mid``, ``b.midq``,
    ``b.ms`` and ``b.acc`` are scratch rows indexed by r."""
    mid = b.mid
    midq = b.midq
    ms = b.ms
    acc = b.acc
    gemm_rows(xq32, xs, idx, gather, lo, hi, w13_q, w13_r, w13_s, 2 * inter, mid, acc)
    for r in range(lo, hi):
        _silu_mul(mid[r], inter, b.ebits[r], b.escale[r], b.eout[r])
        ms[r] = quantize_row_u8(mid[r, :inter], midq[r])
    gemm_rows(b.midq32, ms, idx, False, lo, hi, w2_q, w2_r, w2_s, out.shape[1], out, acc)


# ----------------------------------------------------------------------------------------
# The stages of a pass, each over a block of rows [lo, hi).

@njit(cache=True, error_model="numpy", inline="always")
def _rope_angles(pos, inv_freq, factor, cos_out, sin_out):
    """The rotary cos/sin of position ``pos`` (float64 angles, as the model; once per row)."""
    for i in range(cos_out.shape[0]):
        angle = np.float64(pos) * np.float64(inv_freq[i])     # float64: positions grow without bound
        cos_out[i] = F32(np.cos(angle) * np.float64(factor))
        sin_out[i] = F32(np.sin(angle) * np.float64(factor))


@njit(cache=True, error_model="numpy", inline="always")
def _rope_apply(x, off, cos_t, sin_t, interleave):
    """Rotate x[off:off + R] in place by the angles of :func:`_rope_angles`. Pairs are
    (0,1),(2,3)... when ``interleave`` else (i, i+R/2), as in the model; the engine keeps
    queries and keys in that same paired layout, so their dot products are those of the model."""
    half = cos_t.shape[0]
    for i in range(half):
        c = cos_t[i]
        s = sin_t[i]
        ia = off + (2 * i if interleave else i)
        ib = off + (2 * i + 1 if interleave else i + half)
        a = x[ia]
        b = x[ib]
        x[ia] = a * c - b * s
        x[ib] = b * c + a * s


@njit(cache=True, error_model="numpy", inline="always")
def _attend_row(i, layer, b, a, d):
    """Row i's attention core: writes its cache entry (latent and rotated rotary key) at its
    position, then attends over its slot's window with its absorbed query ``qabs[i]``; leaves
    the attention-weighted latent of each head in ``ctx[i]``."""
    C = d.kv_rank
    R = d.rope
    nh = d.heads
    nope = d.nope
    scale = d.softmax_scale
    slot = b.rows[i]
    p = b.rpos[i]
    idx = p % d.window
    vals = b.vals[layer, slot]
    keys = b.keys[layer, slot]
    kv = b.kv[i]
    _rmsnorm(kv[:C], a.kv_a_norm[layer], d.lora_eps, vals[idx])
    _rope_apply(kv, C, b.rope_cos[i], b.rope_sin[i], d.interleave)
    for c in range(C):
        keys[c, idx] = vals[idx, c]
    for r in range(R):
        keys[C + r, idx] = kv[C + r]
    n_valid = min(p + 1, d.window)
    nb = (n_valid + 15) // 16         # 16-position blocks: lanes past n_valid are computed, never read
    Cp = vals.shape[1]
    Wp = keys.shape[1]
    s = b.scores                  # one row's scratch: rows attend one after another
    s2 = b.scores2
    ebits = b.ebits[0]
    escale = b.escale[0]
    lanes = b.lanes
    Dq = nope + R
    # Scores (latent part and rotary part), all heads together.
    rows_dot(s, 0, Wp, nb * 16, b.qabs[i], 0, Cp, C, keys, 0, 0, Wp, nh)
    rows_dot(s2, 0, Wp, nb * 16, b.q[i], nope, Dq, R, keys, C * Wp, 0, Wp, nh)
    # Softmax over whole 16-position blocks (whole vectors, no scalar tails); the lanes past
    # n_valid are left out of the max and zeroed before the sum.
    nw = nb * 16
    for hh in range(nh):
        for j in range(nw):
            s[hh, j] = (s[hh, j] + s2[hh, j]) * scale
        m = _max8(s[hh], n_valid)
        exp_row(s[hh], F32(1.0), m, s[hh], nw, ebits, escale)
        for j in range(n_valid, nw):
            s[hh, j] = F32(0.0)
        total = _sum_blocked(s[hh], nb, lanes)
        for j in range(nw):
            s[hh, j] = s[hh, j] / total
    rows_dot(b.ctx[i], 0, Cp, Cp, s, 0, Wp, n_valid, vals, 0, 0, Cp, nh)


@njit(cache=True, error_model="numpy")
def _attention_rows(layer, lo, hi, b, w, d):
    """Pre-norm MLA (absorbed form) for rows [lo, hi); rows attend in ascending order, so a
    prefill's rows of one slot see each other's cache entries as stepping would. Adds into x."""
    a = w.attn
    x = b.x
    h = b.h
    xq = b.xq
    xq32 = b.xq32
    xs = b.xs
    acc = b.acc
    rows = b.rows
    C = d.kv_rank
    nh = d.heads
    nope = d.nope
    Dq = nope + d.rope
    qd = nh * Dq
    norm = w.input_norm[layer]
    for i in range(lo, hi):
        _rmsnorm(x[i], norm, d.eps, h[i])
        xs[i] = quantize_row_u8(h[i], xq[i])
    gemm_rows(xq32, xs, rows, False, lo, hi, a.kv_a_q[layer], a.kv_a_r[layer], a.kv_a_s[layer], C + d.rope,
              b.kv, acc)
    if d.has_q_lora:
        qr = a.q_a_norm.shape[1]
        q_low = b.q_low
        gemm_rows(xq32, xs, rows, False, lo, hi, a.q_a_q[layer], a.q_a_r[layer], a.q_a_s[layer], qr, q_low, acc)
        qnorm = a.q_a_norm[layer]
        for i in range(lo, hi):
            low = q_low[i, :qr]
            _rmsnorm(low, qnorm, d.lora_eps, low)
            xs[i] = quantize_row_u8(low, xq[i])
        gemm_rows(xq32, xs, rows, False, lo, hi, a.q_b_q[layer], a.q_b_r[layer], a.q_b_s[layer], qd, b.q, acc)
    else:
        gemm_rows(xq32, xs, rows, False, lo, hi, a.q_q[layer], a.q_r[layer], a.q_s[layer], qd, b.q, acc)
    # The absorbed kv_b_proj halves, one head at a time over all rows of the pass (each row a
    # problem of rows_dot): a head's weights are read once per pass, not once per row.
    Cp = b.qabs.shape[2]
    Vp = b.vout.shape[2]
    for i in range(lo, hi):
        for hh in range(nh):
            _rope_apply(b.q[i], hh * Dq + nope, b.rope_cos[i], b.rope_sin[i], d.interleave)
    w_uk = a.w_uk[layer]
    w_uvt = a.w_uvt[layer]
    for hh in range(nh):
        rows_dot(b.qabs, (lo * nh + hh) * Cp, nh * Cp, Cp, b.q, lo * qd + hh * Dq, qd, nope, w_uk, hh * nope * Cp,
                 0, Cp, hi - lo)
    for i in range(lo, hi):
        _attend_row(i, layer, b, a, d)
    for hh in range(nh):
        rows_dot(b.vout, (lo * nh + hh) * Vp, nh * Vp, Vp, b.ctx, (lo * nh + hh) * Cp, nh * Cp, C, w_uvt,
                 hh * Cp * Vp, 0, Vp, hi - lo)
    v_dim = d.v_dim
    for i in range(lo, hi):
        out = b.attn_out[i, :nh * v_dim]
        for hh in range(nh):
            for vv in range(v_dim):
                out[hh * v_dim + vv] = b.vout[i, hh, vv]
        xs[i] = quantize_row_u8(out, xq[i])
    gemm_rows(xq32, xs, rows, False, lo, hi, a.o_q[layer], a.o_r[layer], a.o_s[layer], x.shape[1], h, acc)
    for i in range(lo, hi):
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, error_model="numpy")
def _dense_mlp_rows(layer, lo, hi, b, w, d):
    """Pre-norm SwiGLU MLP (dense layer ``layer``) for rows [lo, hi); adds into x."""
    m = w.dense
    x = b.x
    h = b.h
    norm = w.post_norm[layer]
    for i in range(lo, hi):
        _rmsnorm(x[i], norm, d.eps, h[i])
        b.xs[i] = quantize_row_u8(h[i], b.xq[i])
    _swiglu_rows(lo, hi, d.inter_dense, b.xq32, b.xs, b.rows, False, m.w13_q[layer], m.w13_r[layer],
                 m.w13_s[layer], m.w2_q[layer], m.w2_r[layer], m.w2_s[layer], b, h)
    for i in range(lo, hi):
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, error_model="numpy")
def _moe_prepare_rows(layer, lo, hi, b, w, d):
    """Pre-norm and per-token int8 of the normed rows (the router reads h, the experts xq)."""
    norm = w.post_norm[layer]
    for i in range(lo, hi):
        _rmsnorm(b.x[i], norm, d.eps, b.h[i])
        b.xs[i] = quantize_row_u8(b.h[i], b.xq[i])


@njit(cache=True, error_model="numpy")
def _moe_experts(m, n_active, rb, b, w, d):
    """The held experts (``dims.expert_lo`` .. ``expert_hi - 1``) among the ``n_active`` with
    tokens, each once over all tokens routed to it; yout[a] is assignment a's output (a in the
    dispatch order, so a held range of experts fills one contiguous range of yout)."""
    e_w = w.moe
    lo, hi = d.expert_lo, d.expert_hi
    for ai in range(n_active):
        e = rb.active[ai]
        if e < lo or e >= hi:
            continue
        k = e - lo
        _swiglu_rows(rb.offsets[e], rb.offsets[e + 1], d.inter_moe, b.xq32, b.xs, rb.token_ids, True,
                     e_w.w13_q[m, k], e_w.w13_r[m, k], e_w.w13_s[m, k], e_w.w2_q[m, k], e_w.w2_r[m, k],
                     e_w.w2_s[m, k], b, b.yout)


@njit(cache=True, error_model="numpy")
def _moe_combine_rows(layer, lo, hi, b, w, d, rb, top_k):
    """Shared experts of rows [lo, hi), then x += the token's expert outputs times their
    weights in its top-k order, then its shared experts (the order of ``runtime.model.transformer.MoE``)."""
    mw = w.moe
    m = layer - d.first_moe
    x = b.x
    hb = b.h
    if mw.has_shared:
        s = mw.shared
        _swiglu_rows(lo, hi, d.inter_shared, b.xq32, b.xs, b.rows, False, s.w13_q[m], s.w13_r[m], s.w13_s[m],
                     s.w2_q[m], s.w2_r[m], s.w2_s[m], b, b.shared_out)
    topk_pos = rb.topk_pos
    topk_weight = rb.topk_weight
    yout = b.yout
    H = x.shape[1]
    for i in range(lo, hi):
        h = hb[i]
        for k in range(H):
            h[k] = F32(0.0)
        for j in range(top_k):
            a = topk_pos[i, j]
            wt = topk_weight[i, j]
            for k in range(H):
                h[k] += wt * yout[a, k]
        if mw.has_shared:
            so = b.shared_out[i]
            for k in range(H):
                h[k] += so[k]
        for k in range(H):
            x[i, k] += h[k]


@njit(cache=True, error_model="numpy")
def _head_rows(lo, hi, b, w, d):
    """Final norm and the int8 LM head for rows [lo, hi) into logits."""
    for i in range(lo, hi):
        _rmsnorm(b.x[i], w.norm, d.eps, b.h[i])
        b.xs[i] = quantize_row_u8(b.h[i], b.xq[i])
    gemm_rows(b.xq32, b.xs, b.rows, False, lo, hi, w.head_q, w.head_r, w.head_s, b.logits.shape[1], b.logits,
              b.acc)


@njit(cache=True, error_model="numpy")
def _sensor_in_rows(lo, hi, b, w):
    a = w.adapter
    feats = b.feats
    x = b.x
    mean = a.in_mean
    std = a.in_std
    wi = a.in_w
    bias = a.in_b
    for i in range(lo, hi):
        for o in range(wi.shape[0]):
            acc = F32(0.0)
            for f in range(wi.shape[1]):
                acc += ((feats[i, f] - mean[f]) / std[f]) * wi[o, f]
            x[i, o] = acc + bias[o]


@njit(cache=True, error_model="numpy")
def _sensor_out_rows(lo, hi, b, w, d):
    a = w.adapter
    x = b.x
    h = b.h
    out = b.outputs
    wo = a.out_w
    bias = a.out_b
    mean = a.out_mean
    std = a.out_std
    for i in range(lo, hi):
        _rmsnorm(x[i], w.norm, d.eps, h[i])
        for o in range(wo.shape[0]):
            acc = F32(0.0)
            for k in range(wo.shape[1]):
                acc += h[i, k] * wo[o, k]
            out[i, o] = (acc + bias[o]) * std[o] + mean[o]


@njit(cache=True, error_model="numpy", inline="always")
def _front_rows(layer, n, b, w, d, rule, rb):
    """Layer ``layer`` for the pass's ``n`` rows up to the MoE combine: attention, then the dense
    MLP, or the MoE norm, routing and the held routed experts (their outputs left in yout)."""
    _attention_rows(layer, 0, n, b, w, d)
    if layer < d.first_moe:
        _dense_mlp_rows(layer, 0, n, b, w, d)
        return
    m = layer - d.first_moe
    _moe_prepare_rows(layer, 0, n, b, w, d)
    logits = b.router_logits[:n]
    router_logits(b.h[:n], w.moe.gate_t[m], logits)
    n_active = route_dispatch(logits, w.moe.bias[m], rule, rb)
    _moe_experts(m, n_active, rb, b, w, d)


@njit(cache=True, error_model="numpy", inline="always")
def _back_rows(layer, n, b, w, d, rule, rb):
    """The rest of layer ``layer`` once yout holds every assignment's output: the MoE combine
    (nothing for a dense layer)."""
    if layer >= d.first_moe:
        _moe_combine_rows(layer, 0, n, b, w, d, rb, rule.top_k)


# Taking a NamedTuple out of the State increfs every array in it, so a pass takes its parts
# once (in ``run_pass``) and the stages below take them once per call from Python.

@njit(cache=True, error_model="numpy")
def layer_front(st, layer, n):
    """:func:`_front_rows` on the State's parts (``runtime.cpu.parallel`` calls it per layer)."""
    _front_rows(layer, n, st.buffers, st.weights, st.dims, st.rule, st.route)


@njit(cache=True, error_model="numpy")
def layer_back(st, layer, n):
    """:func:`_back_rows` on the State's parts (``runtime.cpu.parallel`` calls it per layer)."""
    _back_rows(layer, n, st.buffers, st.weights, st.dims, st.rule, st.route)


# ----------------------------------------------------------------------------------------
# Entry points: one Numba call per step or prefill, inputs checked first (error codes). A
# pass is begin, the layers, end; ``runtime.cpu.parallel`` calls those stages one by one.

OK, BAD_COUNT, BAD_SLOTS, BAD_INPUT = 0, 1, 2, 3
STEP_TOKENS, STEP_SENSOR, PREFILL_TOKENS, PREFILL_SENSOR = 0, 1, 2, 3


@njit(cache=True, error_model="numpy", inline="always")
def _check_slots(b, slots, capacity):
    """A step's slots: 1..capacity distinct ids in range."""
    n = slots.shape[0]
    if n == 0 or n > capacity:
        return BAD_COUNT
    seen = b.seen
    ok = True
    for i in range(n):
        s = slots[i]
        if s < 0 or s >= capacity or seen[s]:
            ok = False
            break
        seen[s] = True
    for i in range(n):
        s = slots[i]
        if 0 <= s < capacity:
            seen[s] = False
    return OK if ok else BAD_SLOTS


@njit(cache=True, error_model="numpy", inline="always")
def _check_inputs(mode, slots, tokens, feats, b, w, d):
    """Every input of a step or prefill checked before anything changes; an error code."""
    sensor = mode == STEP_SENSOR or mode == PREFILL_SENSOR
    if sensor and feats.shape[1] != b.feats.shape[1]:
        return BAD_INPUT
    if mode == STEP_TOKENS or mode == STEP_SENSOR:
        err = _check_slots(b, slots, d.capacity)
        if err != OK:
            return err
        T = slots.shape[0]
        if (feats.shape[0] if sensor else tokens.shape[0]) != T:
            return BAD_INPUT
    else:
        if slots.shape[0] != 1 or slots[0] < 0 or slots[0] >= d.capacity:
            return BAD_SLOTS
        T = feats.shape[0] if sensor else tokens.shape[0]
        if T == 0:
            return BAD_INPUT
    if not sensor:
        for t in range(T):
            if tokens[t] < 0 or tokens[t] >= w.embed.shape[0]:
                return BAD_INPUT
    return OK


@njit(cache=True, error_model="numpy", inline="always")
def _begin_rows(mode, slots, tokens, feats, t0, b, w, d):
    """Load one pass's rows: a step's slots, or a prefill's positions from input ``t0`` on (at
    most ``dims.rows``) of ``slots[0]``; their embeddings (or adapted frames) into x and their
    rotary angles. Returns the pass's row count."""
    sensor = mode == STEP_SENSOR or mode == PREFILL_SENSOR
    if mode == STEP_TOKENS or mode == STEP_SENSOR:
        n = slots.shape[0]
        for i in range(n):
            b.rows[i] = slots[i]
            b.rpos[i] = b.pos[slots[i]]
    else:
        n = min(d.rows, (feats.shape[0] if sensor else tokens.shape[0]) - t0)
        for i in range(n):
            b.rows[i] = slots[0]
            b.rpos[i] = b.pos[slots[0]] + i
    if sensor:
        for i in range(n):
            for f in range(feats.shape[1]):
                b.feats[i, f] = feats[t0 + i, f]
        _sensor_in_rows(0, n, b, w)
    else:
        for i in range(n):
            b.tokens[i] = tokens[t0 + i]
            b.x[i] = w.embed[tokens[t0 + i]]
    for i in range(n):
        _rope_angles(b.rpos[i], w.attn.inv_freq, d.rope_factor, b.rope_cos[i], b.rope_sin[i])
    return n


@njit(cache=True, error_model="numpy", inline="always")
def _end_rows(mode, n, last, head, b, w, d):
    """After a pass's layers: advance the positions; with ``head``, a step's logits / outputs in
    rows 0..n-1, or a prefill's last position's (when ``last``) in row 0."""
    sensor = mode == STEP_SENSOR or mode == PREFILL_SENSOR
    if mode == STEP_TOKENS or mode == STEP_SENSOR:
        for i in range(n):
            b.pos[b.rows[i]] += 1
        if head:
            if sensor:
                _sensor_out_rows(0, n, b, w, d)
            else:
                _head_rows(0, n, b, w, d)
        return
    b.pos[b.rows[0]] += n
    if not (head and last):
        return
    if sensor:
        _sensor_out_rows(n - 1, n, b, w, d)
        for o in range(b.outputs.shape[1]):
            b.outputs[0, o] = b.outputs[n - 1, o]
    else:
        _head_rows(n - 1, n, b, w, d)
        for v in range(b.logits.shape[1]):
            b.logits[0, v] = b.logits[n - 1, v]


@njit(cache=True, error_model="numpy")
def run_pass(st, mode, slots, tokens, feats):
    """The one entry point of a single-process engine (a single one keeps Numba's compile time
    down: every entry re-optimises all it calls). Steps (``mode`` _STEP_*) append ``tokens[i]`` /
    ``feats[i]`` to ``slots[i]`` and leave logits / outputs in rows 0..n-1; a prefill (_PREFILL_*)
    appends all of ``tokens`` [T] / ``feats`` [T, F] to ``slots[0]`` in passes of up to
    ``dims.rows`` positions and leaves the last position's logits / outputs in row 0. Returns an
    error code (0: done)."""
    b, w, d, rule, rb = st.buffers, st.weights, st.dims, st.rule, st.route
    err = _check_inputs(mode, slots, tokens, feats, b, w, d)
    if err != OK:
        return err
    if mode == STEP_TOKENS or mode == STEP_SENSOR:
        T = slots.shape[0]
    else:
        T = feats.shape[0] if mode == PREFILL_SENSOR else tokens.shape[0]
    t0 = 0
    while t0 < T:
        n = _begin_rows(mode, slots, tokens, feats, t0, b, w, d)
        for layer in range(d.n_layers):
            _front_rows(layer, n, b, w, d, rule, rb)
            _back_rows(layer, n, b, w, d, rule, rb)
        t0 += n
        _end_rows(mode, n, t0 >= T, True, b, w, d)
    return OK


@njit(cache=True, error_model="numpy")
def check_pass(st, mode, slots, tokens, feats):
    """:func:`_check_inputs` on the State's parts (``runtime.cpu.parallel``'s stages)."""
    return _check_inputs(mode, slots, tokens, feats, st.buffers, st.weights, st.dims)


@njit(cache=True, error_model="numpy")
def begin_pass(st, mode, slots, tokens, feats, t0):
    """:func:`_begin_rows` on the State's parts (``runtime.cpu.parallel``'s stages)."""
    return _begin_rows(mode, slots, tokens, feats, t0, st.buffers, st.weights, st.dims)


@njit(cache=True, error_model="numpy")
def end_pass(st, mode, n, last, head):
    """:func:`_end_rows` on the State's parts (``runtime.cpu.parallel``'s stages)."""
    _end_rows(mode, n, last, head, st.buffers, st.weights, st.dims)

"""The deterministic stream engine: fixed-capacity stream slots, one token per stream per step.

Every stream slot owns a ring buffer of ``window`` latent-cache entries per layer (the MLA
latent plus the rotary key: 576 values per token per layer on real R1). A step appends one
token (LM mode) or one sensor frame (sensor mode) to each listed slot and returns its logits
or outputs.

Why it is batch-invariant and reproducible: linear layers run W8A8 (per-output-channel int8
weights, per-token dynamic int8 activations) with exact int32 accumulation, so their result
does not depend on summation order; every float operation left (norms, rotary, attention,
router logits, the absorbed ``kv_b_proj`` products, the sensor adapter) is computed per row
in a fixed loop order. A row's result therefore depends only on that stream's own history,
never on which other streams share the step or in which order.

Why it is fast on a CPU: the whole step is one Numba kernel over preallocated buffers, so a
step allocates nothing and pays no per-op dispatch. Rows run in parallel for attention and
dense parts; routed experts run once each over all the tokens routed to them (the dispatch
plan of ``runtime.routing``), reading each expert's weights once per step.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange

from runtime.model import MoE, Transformer
from runtime.quant import RoutedExperts, quantize_weight
from runtime.routing import check_routing_config, route_dispatch, router_logits

log = logging.getLogger(__name__)

F32 = np.float32


class Int8Weight(NamedTuple):
    """A linear layer's weights for the engine: int8 [..., N, K] and per-output-channel scales [..., N]."""
    q: np.ndarray
    s: np.ndarray


def _int8(w: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of a float weight [N, K] (the same rule as runtime.quant)."""
    qt, scale = quantize_weight(w.detach().float().cpu())
    return Int8Weight(np.ascontiguousarray(qt.T.numpy()), scale.numpy().astype(F32))


def _linear_int8(linear: torch.nn.Module) -> Int8Weight:
    """int8 weights of a float or already-quantized linear layer, row-major [N, K]."""
    if hasattr(linear, "qweight_t"):      # runtime.quant.Int8Linear: codes padded to multiples of 8
        n, k = linear.out_features, linear.in_features
        return Int8Weight(np.ascontiguousarray(linear.qweight_t[:k, :n].detach().cpu().T.numpy()),
                          np.ascontiguousarray(linear.scale[:n].detach().cpu().float().numpy()))
    return _int8(linear.weight)


def _stack(items: list[Int8Weight], *shape: int) -> Int8Weight:
    """Per-layer int8 weights stacked on a new leading axis; ``shape`` (one item's, [..., N, K])
    gives the empty stack its shape when there are no such layers."""
    if not items:
        return Int8Weight(np.zeros((0, *shape), np.int8), np.zeros((0, *shape[:-1]), F32))
    return Int8Weight(np.ascontiguousarray(np.stack([i.q for i in items])),
                      np.ascontiguousarray(np.stack([i.s for i in items])))


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


# ----------------------------------------------------------------------------------------
# Numba building blocks. All float reductions run in a fixed sequential order.

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
def _silu(v):
    return v / (F32(1.0) + np.exp(-v))


# ----------------------------------------------------------------------------------------
# The step kernel.

@njit(cache=True, parallel=True)
def _attention_rows(layer, rows, n, x, h, hq, scratch_q, scratch_kv, qabs, scores, ctx, attn_out, tmp_q,
                    ln1, eps, has_q_lora, wqa, sqa, qa_norm, wqb, sqb, wq, sq, wkva, skva, kva_norm,
                    wuk, wuv, wo, so, lat, pe, pos, window, inv_freq, rope_factor, interleave,
                    n_heads, nope, rope_dim, v_dim, kv_rank, softmax_scale):
    """Pre-norm MLA (absorbed form) for each listed row; adds the attention output to x."""
    for i in prange(n):
        slot = rows[i]
        _rmsnorm(x[i], ln1[layer], eps, h[i])
        xs = _quantize_row(h[i], hq[i])
        qd = n_heads * (nope + rope_dim)
        _gemv_i8(hq[i], xs, wkva[layer], skva[layer], scratch_kv[i])
        if has_q_lora:
            qr = wqa.shape[1]
            _gemv_i8(hq[i], xs, wqa[layer], sqa[layer], tmp_q[i, :qr])
            _rmsnorm(tmp_q[i, :qr], qa_norm[layer], F32(1e-6), tmp_q[i, :qr])
            qs = _quantize_row(tmp_q[i, :qr], hq[i, :qr])
            _gemv_i8(hq[i, :qr], qs, wqb[layer], sqb[layer], scratch_q[i, :qd])
        else:
            _gemv_i8(hq[i], xs, wq[layer], sq[layer], scratch_q[i, :qd])
        p = pos[slot]
        idx = p % window
        _rmsnorm(scratch_kv[i, :kv_rank], kva_norm[layer], F32(1e-6), lat[layer, slot, idx])
        for r in range(rope_dim):
            pe[layer, slot, idx, r] = scratch_kv[i, kv_rank + r]
        _rope(pe[layer, slot, idx], p, inv_freq, rope_factor, interleave)
        n_valid = min(p + 1, window)
        for hh in range(n_heads):
            base = hh * (nope + rope_dim)
            _rope(scratch_q[i, base + nope: base + nope + rope_dim], p, inv_freq, rope_factor, interleave)
            for c in range(kv_rank):
                acc = F32(0.0)
                for d in range(nope):
                    acc += scratch_q[i, base + d] * wuk[layer, hh, d, c]
                qabs[i, hh, c] = acc
            m = F32(-np.inf)
            for j in range(n_valid):
                acc = F32(0.0)
                for c in range(kv_rank):
                    acc += qabs[i, hh, c] * lat[layer, slot, j, c]
                acc2 = F32(0.0)
                for r in range(rope_dim):
                    acc2 += scratch_q[i, base + nope + r] * pe[layer, slot, j, r]
                sc = (acc + acc2) * softmax_scale
                scores[i, hh, j] = sc
                if sc > m:
                    m = sc
            total = F32(0.0)
            for j in range(n_valid):
                e = np.exp(scores[i, hh, j] - m)
                scores[i, hh, j] = e
                total += e
            for c in range(kv_rank):
                ctx[i, hh, c] = F32(0.0)
            for j in range(n_valid):
                pj = scores[i, hh, j] / total
                for c in range(kv_rank):
                    ctx[i, hh, c] += pj * lat[layer, slot, j, c]
            for vv in range(v_dim):
                acc = F32(0.0)
                for c in range(kv_rank):
                    acc += ctx[i, hh, c] * wuv[layer, hh, vv, c]
                attn_out[i, hh * v_dim + vv] = acc
        nv = n_heads * v_dim
        os_ = _quantize_row(attn_out[i], hq[i, :nv])
        _gemv_i8(hq[i, :nv], os_, wo[layer], so[layer], h[i])
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, parallel=True)
def _dense_mlp_rows(d, n, x, h, hq, mid, midq, ln2, eps, w13, s13, w2, s2):
    """Pre-norm SwiGLU MLP for each row; adds into x."""
    inter = w2.shape[2]
    for i in prange(n):
        _rmsnorm(x[i], ln2, eps, h[i])
        xs = _quantize_row(h[i], hq[i])
        _gemv_i8(hq[i], xs, w13[d], s13[d], mid[i, :2 * inter])
        for k in range(inter):
            mid[i, k] = _silu(mid[i, k]) * mid[i, inter + k]
        ms = _quantize_row(mid[i, :inter], midq[i, :inter])
        _gemv_i8(midq[i, :inter], ms, w2[d], s2[d], h[i])
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, parallel=True)
def _moe_prepare_rows(n, x, h, hq, hscale, ln2, eps):
    """Pre-norm and per-token int8 of the normed rows (the router reads h, the experts hq)."""
    for i in prange(n):
        _rmsnorm(x[i], ln2, eps, h[i])
        hscale[i] = _quantize_row(h[i], hq[i])


@njit(cache=True, parallel=True)
def _moe_experts(m, n_active, active, offsets, token_ids, hq, hscale, w13, s13, w2, s2, mid, midq, yout):
    """Each active expert once, over all tokens routed to it; yout[a] is assignment a's output."""
    inter = w2.shape[3]
    for ai in prange(n_active):
        e = active[ai]
        for a in range(offsets[e], offsets[e + 1]):
            t = token_ids[a]
            _gemv_i8(hq[t], hscale[t], w13[m, e], s13[m, e], mid[a, :2 * inter])
            for k in range(inter):
                mid[a, k] = _silu(mid[a, k]) * mid[a, inter + k]
            ms = _quantize_row(mid[a, :inter], midq[a, :inter])
            _gemv_i8(midq[a, :inter], ms, w2[m, e], s2[m, e], yout[a])


@njit(cache=True, parallel=True)
def _moe_combine_rows(m, n, x, hq, hscale, h, top_k, topk_w, slot_of, yout,
                      has_shared, sw13, ss13, sw2, ss2, smid, smidq):
    """x += sum over the token's experts (in its top-k order) of weight * output, plus shared experts."""
    for i in prange(n):
        for k in range(x.shape[1]):
            h[i, k] = F32(0.0)
        if has_shared:
            inter = sw2.shape[2]
            _gemv_i8(hq[i], hscale[i], sw13[m], ss13[m], smid[i, :2 * inter])
            for k in range(inter):
                smid[i, k] = _silu(smid[i, k]) * smid[i, inter + k]
            ms = _quantize_row(smid[i, :inter], smidq[i, :inter])
            _gemv_i8(smidq[i, :inter], ms, sw2[m], ss2[m], h[i])
        for j in range(top_k):
            a = slot_of[i, j]
            w = topk_w[i, j]
            for k in range(x.shape[1]):
                h[i, k] += w * yout[a, k]
        for k in range(x.shape[1]):
            x[i, k] += h[i, k]


@njit(cache=True, parallel=True)
def _final_rows(n, x, h, hq, norm, eps, head_w, head_s, out):
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        xs = _quantize_row(h[i], hq[i])
        _gemv_i8(hq[i], xs, head_w, head_s, out[i])


@njit(cache=True, parallel=True)
def _sensor_in_rows(n, feats, mean, std, w, b, x):
    for i in prange(n):
        for o in range(w.shape[0]):
            acc = F32(0.0)
            for f in range(w.shape[1]):
                acc += ((feats[i, f] - mean[f]) / std[f]) * w[o, f]
            x[i, o] = acc + b[o]


@njit(cache=True, parallel=True)
def _sensor_out_rows(n, x, h, norm, eps, w, b, mean, std, out):
    for i in prange(n):
        _rmsnorm(x[i], norm, eps, h[i])
        for o in range(w.shape[0]):
            acc = F32(0.0)
            for k in range(w.shape[1]):
                acc += h[i, k] * w[o, k]
            out[i, o] = (acc + b[o]) * std[o] + mean[o]


@njit(cache=True)
def _run_layers(n, rows, bufs, attn, dense, moe, route, dims):
    """All decoder layers for the ``n`` listed rows, in one call from Python.

    The arguments are tuples of the engine's preallocated arrays (see ``Engine._tuples``);
    each stage is one of the kernels above, routing is ``runtime.routing``'s.
    """
    (x, h, hq, hscale, scratch_q, scratch_kv, qabs, scores, ctx, attn_out, tmp_q,
     mid, midq, smid, smidq, yout, lat, pe, pos) = bufs
    (ln1, ln2, has_q_lora, wqa_q, wqa_s, qa_norm, wqb_q, wqb_s, wq_q, wq_s, wkva_q, wkva_s, kva_norm,
     wuk, wuv, wo_q, wo_s, inv_freq, rope_factor, interleave) = attn
    d13_q, d13_s, d2_q, d2_s = dense
    e13_q, e13_s, e2_q, e2_s, has_shared, s13_q, s13_s, s2_q, s2_s = moe
    (gate_wt, gate_b, logits, r_scores, r_choice, r_gscore, r_gkeep, r_selv, r_seli, r_cursor, topk_idx,
     topk_w, topk_pos, counts, offsets, token_ids, token_w, active, n_group, topk_group, top_k, norm_topk,
     scaling) = route
    n_layers, first_moe, window, n_heads, nope, rope_dim, v_dim, kv_rank, softmax_scale, eps = dims
    for layer in range(n_layers):
        _attention_rows(layer, rows, n, x, h, hq, scratch_q, scratch_kv, qabs, scores, ctx, attn_out, tmp_q,
                        ln1, eps, has_q_lora, wqa_q, wqa_s, qa_norm, wqb_q, wqb_s, wq_q, wq_s, wkva_q, wkva_s,
                        kva_norm, wuk, wuv, wo_q, wo_s, lat, pe, pos, window, inv_freq, rope_factor, interleave,
                        n_heads, nope, rope_dim, v_dim, kv_rank, softmax_scale)
        if layer < first_moe:
            _dense_mlp_rows(layer, n, x, h, hq, mid, midq, ln2[layer], eps, d13_q, d13_s, d2_q, d2_s)
            continue
        m = layer - first_moe
        _moe_prepare_rows(n, x, h, hq, hscale, ln2[layer], eps)
        router_logits(h[:n], gate_wt[m], logits[:n])
        n_active = route_dispatch(logits[:n], gate_b[m], n_group, topk_group, top_k, norm_topk, scaling,
                                  r_scores, r_choice, r_gscore, r_gkeep, r_selv, r_seli, r_cursor,
                                  topk_idx[:n], topk_w[:n], topk_pos[:n], counts, offsets,
                                  token_ids[:n * top_k], token_w[:n * top_k], active)
        _moe_experts(m, n_active, active, offsets, token_ids, hq, hscale, e13_q, e13_s, e2_q, e2_s, mid, midq,
                     yout)
        _moe_combine_rows(m, n, x, hq, hscale, h, top_k, topk_w, topk_pos, yout, has_shared,
                          s13_q, s13_s, s2_q, s2_s, smid, smidq)


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


class Engine:
    """Fixed-capacity stream slots over a DeepSeek-V3 model, stepped one token per stream.

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
        self.adapter = model.adapter
        self.input_names = list(model.adapter.input_names) if model.adapter is not None else []
        self.output_names = list(model.adapter.output_names) if model.adapter is not None else []
        self._allocate()
        self._load_weights(model)
        self._args = self._tuples()
        # Numba's OpenMP layer shares libgomp with torch: its first parallel launch resets
        # torch's intra-op thread count, which the caller may have chosen on purpose.
        torch_threads = torch.get_num_threads()
        self._warmup()
        torch.set_num_threads(torch_threads)

    # -- set-up --------------------------------------------------------------------------
    def _load_weights(self, model: Transformer) -> None:
        cfg = self.config
        H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
        layers = list(model.model.layers)
        attn = [layer.self_attn for layer in layers]
        self.has_q_lora = cfg.q_lora_rank is not None
        qd = nh * cfg.qk_head_dim
        if self.has_q_lora:
            self.wqa = _stack([_linear_int8(a.q_a_proj) for a in attn], cfg.q_lora_rank, H)
            self.qa_norm = np.stack([_f32(a.q_a_layernorm.weight) for a in attn])
            self.wqb = _stack([_linear_int8(a.q_b_proj) for a in attn], qd, cfg.q_lora_rank)
            self.wq = _stack([], qd, H)
        else:
            self.wqa, self.wqb = _stack([], 1, H), _stack([], qd, 1)
            self.qa_norm = np.zeros((0, 1), F32)
            self.wq = _stack([_linear_int8(a.q_proj) for a in attn], qd, H)
        self.wkva = _stack([_linear_int8(a.kv_a_proj_with_mqa) for a in attn], C + R, H)
        self.kva_norm = np.stack([_f32(a.kv_a_layernorm.weight) for a in attn])
        uk, uv = zip(*(a.absorbed_weights() for a in attn))
        self.wuk = np.ascontiguousarray(np.stack([_f32(w) for w in uk]))
        self.wuv = np.ascontiguousarray(np.stack([_f32(w) for w in uv]))
        self.wo = _stack([_linear_int8(a.o_proj) for a in attn], H, nh * cfg.v_head_dim)
        self.ln1 = np.stack([_f32(layer.input_layernorm.weight) for layer in layers])
        self.ln2 = np.stack([_f32(layer.post_attention_layernorm.weight) for layer in layers])

        dense = [layer.mlp for layer in layers if not isinstance(layer.mlp, MoE)]
        moe = [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]
        inter = cfg.intermediate_size
        self.d13 = _stack([_concat_int8(_linear_int8(m.gate_proj), _linear_int8(m.up_proj)) for m in dense],
                          2 * inter, H)
        self.d2 = _stack([_linear_int8(m.down_proj) for m in dense], H, inter)
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        if moe:
            check_routing_config(E, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
        self.gate_wt = np.ascontiguousarray(np.stack([_f32(m.gate.weight).T for m in moe])) if moe \
            else np.zeros((0, H, E), F32)
        self.gate_b = np.stack([_f32(m.gate.e_score_correction_bias) for m in moe]) if moe else np.zeros((0, E), F32)
        self.e13 = _stack([_expert_int8(m, "gate_up_proj") for m in moe], E, 2 * I, H)
        self.e2 = _stack([_expert_int8(m, "down_proj") for m in moe], E, H, I)
        self.has_shared = bool(cfg.n_shared_experts)
        si = I * cfg.n_shared_experts
        if self.has_shared:
            self.s13 = _stack([_concat_int8(_linear_int8(m.shared_experts.gate_proj),
                                            _linear_int8(m.shared_experts.up_proj)) for m in moe], 2 * si, H)
            self.s2 = _stack([_linear_int8(m.shared_experts.down_proj) for m in moe], H, si)
        else:
            self.s13, self.s2 = _stack([], 2, H), _stack([], H, 1)
        self.norm = _f32(model.model.norm.weight)
        self.embed = _f32(model.model.embed_tokens.weight)
        self.head = _linear_int8(model.lm_head)
        self.inv_freq = _f32(model.inv_freq)
        self.rope_factor = F32(model.rope_factor)
        if self.adapter is not None:
            a = self.adapter
            self.in_w, self.in_b = _f32(a.in_proj.weight), _f32(a.in_proj.bias)
            self.in_mean, self.in_std = _f32(a.in_mean), _f32(a.in_std)
            self.out_w, self.out_b = _f32(a.out_proj.weight), _f32(a.out_proj.bias)
            self.out_mean, self.out_std = _f32(a.out_mean), _f32(a.out_std)

    def _allocate(self) -> None:
        cfg, S, W = self.config, self.capacity, self.window
        H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
        L, k = cfg.num_hidden_layers, cfg.num_experts_per_tok
        self.lat = np.zeros((L, S, W, C), F32)
        self.pe = np.zeros((L, S, W, R), F32)
        self.pos = np.zeros(S, np.int64)
        widest = max(H, cfg.q_lora_rank or 0, nh * cfg.v_head_dim, nh * cfg.qk_head_dim)
        inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1),
                    cfg.moe_intermediate_size)
        self.x = np.zeros((S, H), F32)
        self.h = np.zeros((S, H), F32)
        self.hq = np.zeros((S, widest), np.int8)
        self.hscale = np.zeros(S, F32)
        self.tmp_q = np.zeros((S, max(cfg.q_lora_rank or 1, 1)), F32)
        self.scratch_q = np.zeros((S, nh * cfg.qk_head_dim), F32)
        self.scratch_kv = np.zeros((S, C + R), F32)
        self.qabs = np.zeros((S, nh, C), F32)
        self.scores = np.zeros((S, nh, W), F32)
        self.ctx = np.zeros((S, nh, C), F32)
        self.attn_out = np.zeros((S, nh * cfg.v_head_dim), F32)
        self.mid = np.zeros((max(S * k, S), 2 * inter), F32)
        self.midq = np.zeros((max(S * k, S), inter), np.int8)
        self.smid = np.zeros((S, 2 * inter), F32)
        self.smidq = np.zeros((S, inter), np.int8)
        self.yout = np.zeros((S * k, H), F32)
        self.rows = np.zeros(S, np.int64)
        self.seen = np.zeros(S, np.bool_)
        self.logits = np.zeros((S, cfg.vocab_size), F32)
        if self.adapter is not None:
            self.feats = np.zeros((S, len(self.input_names)), F32)
            self.outputs = np.zeros((S, len(self.output_names)), F32)

    def _warmup(self) -> None:
        """Compile every kernel now (or load it from the on-disk cache), then clear the state."""
        if self.adapter is not None:
            self.step_sensor(np.zeros(1, np.int64), np.zeros((1, len(self.input_names)), F32))
        self.step_tokens(np.zeros(1, np.int64), np.zeros(1, np.int64))
        self.reset_all()

    # -- state ---------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s history (a new stream starts at position 0)."""
        self.pos[slot] = 0
        self.lat[:, slot] = 0
        self.pe[:, slot] = 0

    def reset_all(self) -> None:
        """Forget every slot's history."""
        self.pos[:] = 0
        self.lat[:] = 0
        self.pe[:] = 0

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
        self.rows[:n] = slots
        return n

    def step_tokens(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append token ``tokens[i]`` to slot ``slots[i]``; returns logits [n, vocab] (a view)."""
        n = self._check_slots(np.asarray(slots))
        tokens = np.asarray(tokens)
        if tokens.shape != (n,) or tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"tokens must be {n} ids in 0..{self.config.vocab_size - 1}")
        np.take(self.embed, tokens, axis=0, out=self.x[:n])
        self._layers(n)
        _final_rows(n, self.x, self.h, self.hq, self.norm, F32(self.config.rms_norm_eps),
                    self.head.q, self.head.s, self.logits)
        _advance(self.pos, self.rows, n)
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
        self.feats[:n] = features
        _sensor_in_rows(n, self.feats, self.in_mean, self.in_std, self.in_w, self.in_b, self.x)
        self._layers(n)
        _sensor_out_rows(n, self.x, self.h, self.norm, F32(self.config.rms_norm_eps), self.out_w, self.out_b,
                         self.out_mean, self.out_std, self.outputs)
        _advance(self.pos, self.rows, n)
        return self.outputs[:n]

    def _tuples(self) -> tuple:
        """The argument tuples of ``_run_layers``, built once (they hold references, not copies)."""
        cfg, S, k, E = self.config, self.capacity, self.config.num_experts_per_tok, self.config.n_routed_experts
        route_scratch = (np.zeros((S, E), F32), np.zeros(E, F32), np.zeros(E, F32), np.zeros(cfg.n_group, F32),
                         np.zeros(cfg.n_group, np.uint8), np.zeros(k, F32), np.zeros(k, np.int32),
                         np.zeros(E, np.int32))
        plan = (np.zeros((S, k), np.int32), np.zeros((S, k), F32), np.zeros((S, k), np.int32),
                np.zeros(E, np.int32), np.zeros(E + 1, np.int32), np.zeros(S * k, np.int32),
                np.zeros(S * k, F32), np.zeros(E, np.int32))
        return (
            (self.x, self.h, self.hq, self.hscale, self.scratch_q, self.scratch_kv, self.qabs, self.scores,
             self.ctx, self.attn_out, self.tmp_q, self.mid, self.midq, self.smid, self.smidq, self.yout,
             self.lat, self.pe, self.pos),
            (self.ln1, self.ln2, self.has_q_lora, self.wqa.q, self.wqa.s, self.qa_norm, self.wqb.q, self.wqb.s,
             self.wq.q, self.wq.s, self.wkva.q, self.wkva.s, self.kva_norm, self.wuk, self.wuv, self.wo.q,
             self.wo.s, self.inv_freq, self.rope_factor, cfg.rope_interleave),
            (self.d13.q, self.d13.s, self.d2.q, self.d2.s),
            (self.e13.q, self.e13.s, self.e2.q, self.e2.s, self.has_shared, self.s13.q, self.s13.s, self.s2.q,
             self.s2.s),
            (self.gate_wt, self.gate_b) + route_scratch + plan
            + (cfg.n_group, cfg.topk_group, k, cfg.norm_topk_prob, F32(cfg.routed_scaling_factor)),
            (cfg.num_hidden_layers, cfg.first_k_dense_replace, self.window, cfg.num_attention_heads,
             cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
             F32(cfg.softmax_scale), F32(cfg.rms_norm_eps)),
        )

    def _layers(self, n: int) -> None:
        _run_layers(n, self.rows, *self._args)


def _concat_int8(a: Int8Weight, b: Int8Weight) -> Int8Weight:
    return Int8Weight(np.concatenate([a.q, b.q]), np.concatenate([a.s, b.s]))


def _expert_int8(moe: MoE, name: str) -> Int8Weight:
    """Routed experts as int8 rows: ``gate_up_proj`` [E, 2I, H] or ``down_proj`` [E, H, I]."""
    experts = moe.experts
    if isinstance(experts, RoutedExperts) and experts.mode == "w8a8":
        q, s = (experts.w13_t, experts.s13) if name == "gate_up_proj" else (experts.w2_t, experts.s2)
        return Int8Weight(np.ascontiguousarray(q.detach().cpu().transpose(1, 2).numpy()),
                          np.ascontiguousarray(s.detach().cpu().float().numpy()))
    if isinstance(experts, RoutedExperts):
        w = experts.gate_up if name == "gate_up_proj" else experts.down
    else:
        w = getattr(experts, name)
    return _stack([_int8(e) for e in w.detach()])

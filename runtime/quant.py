"""int8 quantization, int8 GEMMs, and routed-expert execution over a dispatch plan.

Scheme (W8A8): weights are symmetric int8 per output channel (scale = absmax / 127),
activations symmetric int8 per token (row), rounded half to even as ``torch.round`` does
and clamped to [-127, 127]; a row or channel that is all zero gets scale 1. GEMMs run
through ``torch._int_mm`` (int8 x int8 -> exact int32) and are dequantized elementwise,
``acc.float() * sx * sw``, so every output row depends on its own input row only: the
result is bitwise identical whatever the batch size and whatever the other rows are.

W8 (weight-only) keeps activations in float: the weight is dequantized and a float GEMM
runs. It is more accurate but, like any float GEMM, not batch invariant.

The routed experts of a MoE layer (``RoutedExperts``) run over a ``DispatchPlan`` from
``runtime.routing``: only experts with tokens run, each once over all of its tokens, and
each token sums its k expert outputs in its own top-k order. On the CPU the int8 path is
a few Numba kernels (quantize, small grouped GEMMs, SiLU, combine) with ``torch._int_mm``
for experts that hold enough rows to pay for a call; the integer GEMMs are exact either
way, so where an expert runs never changes a bit. The torch backend runs anywhere (CUDA
included) with one ``_int_mm`` per active expert and torch elementwise ops.

Note on SiLU: torch's CPU ``F.silu`` and ``torch.sigmoid`` give different bits for the
same value depending on whether it falls in a vector lane or in the scalar tail of the
kernel loop, so their result depends on the tensor's shape. ``silu_mul`` below uses only
position-independent ops and is what a batch-invariant path should use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import nn

QMAX = 127
# Below this many multiply-adds (or for a single row) a Numba kernel beats the fixed cost
# of quantize + torch._int_mm + dequantize calls on the CPU; both give the same bits.
NUMBA_LINEAR_MACS = 1 << 16


def _scale_from_absmax(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / QMAX
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_weight(w: torch.Tensor, align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w`` [N, K] -> (qweight_t int8 [K, N], scale float32 [N]).

    ``qweight_t`` is the transposed weight, contiguous, ready for ``torch._int_mm``;
    ``w ~= qweight_t.T * scale[:, None]``. scale = absmax(row) / 127, 1 for an all-zero
    row. With ``align`` > 1, K and N are zero-padded up to multiples of ``align`` (CUDA's
    ``_int_mm`` needs multiples of 8); padded channels get scale 1.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    scale = _scale_from_absmax(w.abs().amax(dim=1))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    N, K = w.shape
    Np, Kp = -(-N // align) * align, -(-K // align) * align
    if (Np, Kp) != (N, K):
        q = F.pad(q, (0, Kp - K, 0, Np - N))
        scale = F.pad(scale, (0, Np - N), value=1.0)
    return q.t().contiguous(), scale.contiguous()


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``x`` [M, K] float -> (q int8 [M, K], scale float32 [M, 1]).

    scale = absmax(row) / 127 (1 for an all-zero row); q = round(x / scale) with
    ``torch.round`` (half to even), clamped to [-127, 127]. Row-wise and exact apart
    from the single division, so a row's result never depends on other rows.
    Non-finite inputs give unspecified codes.
    """
    x = x.to(torch.float32)
    scale = _scale_from_absmax(x.abs().amax(dim=-1, keepdim=True))
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._int_mm`` with CUDA's M > 16 rule handled by zero padding (rows stay exact)."""
    M = a.shape[0]
    if a.is_cuda and M <= 16:
        acc = torch._int_mm(F.pad(a, (0, 0, 0, 17 - M)), b)[:M]
        if out is not None:
            out.copy_(acc)
            return out
        return acc
    if out is not None:
        return torch._int_mm(a, b, out=out)
    return torch._int_mm(a, b)


def int8_matmul(
    qx: torch.Tensor,
    sx: torch.Tensor,
    qweight_t: torch.Tensor,
    sw: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact int8 GEMM then elementwise dequantization: ``(qx @ qweight_t).float() * sx * sw``.

    ``qx`` int8 [M, K], ``sx`` float32 [M, 1], ``qweight_t`` int8 [K, N], ``sw`` float32
    [N] -> float32 [M, N] (into ``out`` if given). The int32 accumulation is exact and
    the dequantization is elementwise, so row i depends on row i only.
    """
    acc = _int_mm(qx, qweight_t)
    if out is None:
        return acc.float().mul_(sx).mul_(sw)
    out.copy_(acc)
    return out.mul_(sx).mul_(sw)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed as ``gate / (1 + exp(-gate)) * up``, elementwise.

    Unlike ``F.silu`` on the CPU, every op here gives the same bits for a value wherever
    it sits in the tensor, so rows stay independent of the batch shape.
    """
    return gate / (torch.exp(-gate) + 1.0) * up


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (``y = x @ W.T``).

    Buffers: ``qweight_t`` int8 [K8, N8] (the transposed weight, K and N padded to
    multiples of 8) and ``scale`` float32 [N8]; they load from a state dict under these
    names, so packages store them as plain safetensors.

    Modes:
    - ``"w8a8"``: per-token dynamic int8 activations and ``torch._int_mm``; exact integer
      accumulation, batch invariant (row i of the output depends on row i only).
    - ``"w8"``: weight-only; the weight is dequantized to the activation dtype and a float
      GEMM runs. More accurate, not batch invariant.
    """

    def __init__(self, in_features: int, out_features: int, mode: str = "w8a8"):
        super().__init__()
        if mode not in ("w8a8", "w8"):
            raise ValueError(f"Int8Linear mode must be 'w8a8' or 'w8', got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        k8, n8 = -(-in_features // 8) * 8, -(-out_features // 8) * 8
        self.register_buffer("qweight_t", torch.zeros(k8, n8, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(n8, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str = "w8a8") -> "Int8Linear":
        """Quantize a float ``weight`` [out, in] (nn.Linear convention)."""
        N, K = weight.shape
        layer = cls(K, N, mode)
        q, s = quantize_weight(weight, align=8)
        layer.qweight_t.copy_(q)
        layer.scale.copy_(s)
        return layer.to(weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] that the int8 codes stand for."""
        w = self.qweight_t.float().t() * self.scale[:, None]
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] -> [..., out]; float32 in w8a8 mode, ``x.dtype`` in w8 mode."""
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.mode == "w8":
            y = x2 @ self.dequantized_weight().to(x.dtype).T
            return y.reshape(*lead, self.out_features)
        if x2.device.type == "cpu":
            y = self._forward_cpu(x2)
            return y if x.dim() == 2 else y.reshape(*lead, self.out_features)
        qx, sx = quantize_activation(x2)
        pad = self.qweight_t.shape[0] - self.in_features
        if pad:
            qx = F.pad(qx, (0, pad))
        y = int8_matmul(qx, sx, self.qweight_t, self.scale)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def _forward_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        """The w8a8 forward on the CPU: Numba for small products, else Numba quantize/dequantize
        around ``torch._int_mm``. Identical bits to the torch-op path."""
        if x2.dtype != torch.float32 or not x2.is_contiguous() or x2.requires_grad:
            x2 = x2.detach().to(torch.float32).contiguous()
        M, K = x2.shape
        y = torch.empty(M, self.out_features, dtype=torch.float32)
        if M * K * self.out_features <= NUMBA_LINEAR_MACS or M == 1:
            _linear_rows(x2.numpy(), self.qweight_t.numpy(), self.scale.numpy(), y.numpy())
            return y
        K8 = self.qweight_t.shape[0]
        q = torch.empty(M, K8, dtype=torch.int8) if K8 == K else torch.zeros(M, K8, dtype=torch.int8)
        s = torch.empty(M, dtype=torch.float32)
        quantize_rows(x2.numpy(), q.numpy()[:, :K], s.numpy())
        acc = torch._int_mm(q, self.qweight_t)
        _dequantize(acc.numpy(), s.numpy(), self.scale.numpy(), y.numpy())
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# --- Numba kernels for the CPU expert path ------------------------------------------------
# All arithmetic mirrors the torch definitions above: float32 ops in the same order, the
# same rounding (np.rint is half to even), the same zero-scale guard.


@njit(cache=True, nogil=True)
def _quantize_row(x, q):
    """Quantize one float32 row ``x`` into int8 ``q``; returns its scale (the rule above)."""
    amax = np.float32(0.0)
    for j in range(x.shape[0]):
        a = abs(x[j])
        if a > amax:
            amax = a
    sc = amax / np.float32(QMAX)
    if sc == 0:
        sc = np.float32(1.0)
    for j in range(x.shape[0]):
        v = np.rint(x[j] / sc)
        q[j] = np.int8(min(max(v, -QMAX), QMAX))
    return sc


@njit(cache=True, nogil=True)
def quantize_rows(x, q, s):
    """Numba twin of ``quantize_activation``: ``x`` float32 [T, K] -> ``q`` int8, ``s`` float32 [T]."""
    for t in range(x.shape[0]):
        s[t] = _quantize_row(x[t], q[t])


@njit(cache=True, nogil=True)
def _dequantize(acc, sx, sw, out):
    """``out[m, n] = float32(acc[m, n]) * sx[m] * sw[n]`` for the columns of ``out``."""
    for m in range(out.shape[0]):
        a = acc[m]
        sxm = sx[m]
        o = out[m]
        for n in range(out.shape[1]):
            o[n] = np.float32(a[n]) * sxm * sw[n]


@njit(cache=True, nogil=True)
def _linear_rows(x, w_t, sw, out):
    """The whole w8a8 linear for a few rows: quantize, integer GEMM, dequantize into ``out``."""
    M, K = x.shape
    q = np.empty((M, K), np.int8)
    s = np.empty(M, np.float32)
    quantize_rows(x, q, s)
    acc = np.empty((M, w_t.shape[1]), np.int32)
    _gemm_rows(q, np.empty(0, np.int32), False, 0, M, w_t, acc)
    _dequantize(acc, s, sw, out)


@njit(cache=True, nogil=True)
def _gemm_rows(a, rows, gather, r0, r1, w_t, acc):
    """``acc[r] = a[rows[r] if gather else r] @ w_t[:K]`` for r in [r0, r1), exact int32.

    K is ``a``'s width (``w_t`` may carry zero padding rows beyond it). k-outer so each
    weight row is read once for all rows of the group; the inner loop runs over output
    channels and vectorises (integer sums are exact in any order).
    """
    K = a.shape[1]
    N = w_t.shape[1]
    for r in range(r0, r1):
        for n in range(N):
            acc[r, n] = 0
    K2 = K - K % 2
    for k in range(0, K2, 2):
        w0 = w_t[k]
        w1 = w_t[k + 1]
        for r in range(r0, r1):
            src = rows[r] if gather else r
            x0 = np.int32(a[src, k])
            x1 = np.int32(a[src, k + 1])
            o = acc[r]
            for n in range(N):
                o[n] += x0 * np.int32(w0[n]) + x1 * np.int32(w1[n])
    for k in range(K2, K):
        w0 = w_t[k]
        for r in range(r0, r1):
            src = rows[r] if gather else r
            x0 = np.int32(a[src, k])
            o = acc[r]
            for n in range(N):
                o[n] += x0 * np.int32(w0[n])


@njit(cache=True, nogil=True)
def _moe_gemm1(qx, token_ids, offsets, active, n_active, w13_t, min_mm_rows, xg, acc13):
    """Gate/up GEMM for groups under ``min_mm_rows`` rows; rows of larger groups are gathered
    into ``xg`` for ``torch._int_mm``."""
    H = qx.shape[1]
    for ai in range(n_active):
        e = active[ai]
        o0, o1 = offsets[e], offsets[e + 1]
        if o1 - o0 >= min_mm_rows:
            for p in range(o0, o1):
                t = token_ids[p]
                for j in range(H):
                    xg[p, j] = qx[t, j]
        else:
            _gemm_rows(qx, token_ids, True, o0, o1, w13_t[e], acc13)


@njit(cache=True, nogil=True)
def _moe_act(sx, token_ids, offsets, active, n_active, s13, acc13, hbuf, hq, sh, w2_t, min_mm_rows, acc2):
    """Dequantize gate/up, h = silu(g) * u, quantize h per row; down GEMM for small groups."""
    I = s13.shape[1] // 2
    hbuf = hbuf[:I]  # the buffer may be longer (sized for the shared expert too)
    one = np.float32(1.0)
    for ai in range(n_active):
        e = active[ai]
        o0, o1 = offsets[e], offsets[e + 1]
        for p in range(o0, o1):
            sxt = sx[token_ids[p]]
            for i in range(I):
                g = np.float32(acc13[p, i]) * sxt * s13[e, i]
                u = np.float32(acc13[p, I + i]) * sxt * s13[e, I + i]
                hbuf[i] = g / (np.float32(math.exp(-np.float64(g))) + one) * u
            sh[p] = _quantize_row(hbuf, hq[p])
        if o1 - o0 < min_mm_rows:
            _gemm_rows(hq, token_ids, False, o0, o1, w2_t[e], acc2)


@njit(cache=True, nogil=True)
def _moe_combine(topk_idx, topk_weight, topk_pos, acc2, sh, s2, out):
    """out[t] = sum over j in the token's top-k order of w[t,j] * (acc2[p] * sh[p] * s2[e])."""
    T, k = topk_idx.shape
    H = out.shape[1]
    for t in range(T):
        o = out[t]
        for n in range(H):
            o[n] = 0.0
        for j in range(k):
            e = topk_idx[t, j]
            p = topk_pos[t, j]
            w = topk_weight[t, j]
            shp = sh[p]
            a = acc2[p]
            s2e = s2[e]
            for n in range(H):
                o[n] += w * (np.float32(a[n]) * shp * s2e[n])


@njit(cache=True, nogil=True)
def _add_shared(acc2, sh, s2, out):
    """out[t] += float32(acc2[t]) * sh[t] * s2: the shared expert, added after the routed sum."""
    for t in range(out.shape[0]):
        o = out[t]
        a = acc2[t]
        sht = sh[t]
        for n in range(out.shape[1]):
            o[n] += np.float32(a[n]) * sht * s2[n]


@njit(cache=True, nogil=True)
def _moe_numba(x, topk_idx, topk_weight, topk_pos, token_ids, offsets, active, n_active,
               w13_t, s13, w2_t, s2, qx, sx, xg, acc13, hbuf, hq, sh, acc2, out,
               has_shared, s_ids, s_off, s_act, sw13_t, ss13, sw2_t, ss2, sacc13, shq, ssh, sacc2):  # fmt: skip
    """The whole int8 expert layer in one call, every group through the Numba GEMM.

    The shared expert (``has_shared``; weights stacked as one expert) runs over all T
    tokens from the same quantized ``qx`` and is added after the routed sum.
    """
    big = np.int64(1) << 62
    quantize_rows(x, qx, sx)
    _moe_gemm1(qx, token_ids, offsets, active, n_active, w13_t, big, xg, acc13)
    _moe_act(sx, token_ids, offsets, active, n_active, s13, acc13, hbuf, hq, sh, w2_t, big, acc2)
    _moe_combine(topk_idx, topk_weight, topk_pos, acc2, sh, s2, out)
    if has_shared:
        s_off[1] = x.shape[0]
        _moe_gemm1(qx, s_ids, s_off, s_act, 1, sw13_t, big, xg, sacc13)
        _moe_act(sx, s_ids, s_off, s_act, 1, ss13, sacc13, hbuf, shq, ssh, sw2_t, big, sacc2)
        _add_shared(sacc2, ssh, ss2[0], out)


class _Workspace:
    """Buffers of one int8 expert forward on the CPU: torch tensors and numpy views of them.

    ``s*`` entries serve the shared expert (one-element placeholders when there is none,
    so that the Numba kernel sees the same types either way).
    """

    def __init__(self, max_tokens: int, top_k: int, hidden: int, inter: int, shared_inter: int):
        T, R, Ts = max_tokens, max_tokens * top_k, max_tokens if shared_inter else 1
        self.max_tokens, self.top_k = T, top_k
        i32, i8, f32 = torch.int32, torch.int8, torch.float32
        self.t = {
            "qx": torch.zeros(T, hidden, dtype=i8),
            "sx": torch.zeros(T, dtype=f32),
            "xg": torch.zeros(R, hidden, dtype=i8),
            "acc13": torch.zeros(R, 2 * inter, dtype=i32),
            "hbuf": torch.zeros(max(inter, shared_inter), dtype=f32),
            "hq": torch.zeros(R, inter, dtype=i8),
            "sh": torch.zeros(R, dtype=f32),
            "acc2": torch.zeros(R, hidden, dtype=i32),
            "out": torch.zeros(T, hidden, dtype=f32),
            "s_ids": torch.arange(Ts, dtype=i32),
            "s_off": torch.zeros(2, dtype=i32),
            "s_act": torch.zeros(1, dtype=i32),
            "sacc13": torch.zeros(Ts, max(2 * shared_inter, 1), dtype=i32),
            "shq": torch.zeros(Ts, max(shared_inter, 1), dtype=i8),
            "ssh": torch.zeros(Ts, dtype=f32),
            "sacc2": torch.zeros(Ts, hidden if shared_inter else 1, dtype=i32),
        }
        self.n = {k: v.numpy() for k, v in self.t.items()}
        self._out: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def out_views(self, T: int) -> tuple[torch.Tensor, np.ndarray]:
        """The first T rows of the output buffer, as a tensor and a numpy view (cached)."""
        v = self._out.get(T)
        if v is None:
            v = self._out[T] = (self.t["out"][:T], self.n["out"][:T])
        return v


def _plan_numpy(plan):
    """The plan's fields as numpy arrays (tensors from ``route_torch`` are viewed on the CPU)."""
    return tuple(
        f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f for f in plan[:8]
    ) + (int(plan.n_active),)


def _plan_torch(plan, device):
    """The plan's fields as tensors on ``device`` (numpy arrays are wrapped without a copy)."""
    out = []
    for f in plan[:8]:
        f = torch.from_numpy(f) if isinstance(f, np.ndarray) else f
        out.append(f.to(device, non_blocking=True))
    return tuple(out) + (int(plan.n_active),)


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer (optionally with its shared expert), run over a
    ``DispatchPlan``.

    Expert i computes ``down_i(silu(gate_i(x)) * up_i(x))``; a token's output is the sum of
    its k expert outputs times their routing weights, added in the token's top-k order
    (ascending expert id), so it never depends on the other tokens. Only experts with
    tokens run, each once over all of its tokens. With a shared expert (intermediate size
    ``shared_intermediate_size``, n_shared_experts * I in DeepSeek) its output is added
    after the routed sum, reusing the same quantized tokens: on the CPU this saves the
    separate quantize/GEMM/dequantize calls of a stand-alone int8 MLP.

    Modes (``from_float``):
    - ``"w8a8"``: buffers ``w13_t`` int8 [E, H, 2I] (gate and up fused, transposed),
      ``s13`` float32 [E, 2I], ``w2_t`` int8 [E, I, H], ``s2`` float32 [E, H] (and
      ``shared_w13_t`` [H, 2Is], ``shared_s13``, ``shared_w2_t`` [Is, H], ``shared_s2``).
      Each token is quantized once per layer, each (token, expert) intermediate row once.
      Bitwise batch invariant.
    - ``"float"``: buffers ``gate_up`` [E, 2I, H] and ``down`` [E, H, I] (and
      ``shared_gate_up``, ``shared_down``) in their dtype; float GEMMs, not batch invariant.

    Backends (fixed at construction, never switched per call, since the two SiLU
    implementations may differ in the last bit):
    - ``"numba"`` (CPU, w8a8): Numba kernels; groups holding at least ``min_mm_rows``
      rows run their GEMMs through ``torch._int_mm`` instead, with identical results.
    - ``"torch"``: one ``_int_mm`` (or float GEMM) per active expert and torch
      elementwise ops; runs on any device.
    ``"auto"`` picks numba for w8a8 on the CPU, torch otherwise.

    ``reserve(max_tokens, top_k)`` preallocates the numba backend's buffers; after it a
    forward with T <= max_tokens allocates no tensor storage and, without ``out``, returns
    a view of an internal buffer that the next call overwrites.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        mode: str = "w8a8",
        backend: str = "auto",
        min_mm_rows: int | None = None,
        dtype: torch.dtype = torch.float32,
        shared_intermediate_size: int = 0,
    ):
        super().__init__()
        if mode not in ("w8a8", "float"):
            raise ValueError(f"RoutedExperts mode must be 'w8a8' or 'float', got {mode!r}")
        if backend not in ("auto", "numba", "torch"):
            raise ValueError(f"RoutedExperts backend must be 'auto', 'numba' or 'torch', got {backend!r}")
        if backend == "numba" and mode != "w8a8":
            raise ValueError("the numba backend runs the w8a8 mode only")
        E, H, I, Is = num_experts, hidden_size, intermediate_size, shared_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.shared_intermediate_size = Is
        self.mode, self.backend = mode, backend
        if min_mm_rows is None:
            min_mm_rows = default_min_mm_rows(H, I)
        self.min_mm_rows = int(min_mm_rows)
        if mode == "w8a8":
            self.register_buffer("w13_t", torch.zeros(E, H, 2 * I, dtype=torch.int8))
            self.register_buffer("s13", torch.ones(E, 2 * I, dtype=torch.float32))
            self.register_buffer("w2_t", torch.zeros(E, I, H, dtype=torch.int8))
            self.register_buffer("s2", torch.ones(E, H, dtype=torch.float32))
            if Is:
                self.register_buffer("shared_w13_t", torch.zeros(H, 2 * Is, dtype=torch.int8))
                self.register_buffer("shared_s13", torch.ones(2 * Is, dtype=torch.float32))
                self.register_buffer("shared_w2_t", torch.zeros(Is, H, dtype=torch.int8))
                self.register_buffer("shared_s2", torch.ones(H, dtype=torch.float32))
        else:
            self.register_buffer("gate_up", torch.zeros(E, 2 * I, H, dtype=dtype))
            self.register_buffer("down", torch.zeros(E, H, I, dtype=dtype))
            if Is:
                self.register_buffer("shared_gate_up", torch.zeros(2 * Is, H, dtype=dtype))
                self.register_buffer("shared_down", torch.zeros(H, Is, dtype=dtype))
        self._ws: _Workspace | None = None
        self._np_key = None
        self._np_views = None

    @classmethod
    def from_float(
        cls,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        mode: str = "w8a8",
        backend: str = "auto",
        min_mm_rows: int | None = None,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> "RoutedExperts":
        """Build from stacked float weights ``gate``, ``up`` [E, I, H] and ``down`` [E, H, I];
        ``shared`` is the shared expert's (gate [Is, H], up [Is, H], down [H, Is])."""
        E, I, H = gate.shape
        if up.shape != (E, I, H) or down.shape != (E, H, I):
            raise ValueError(
                f"expert weights must be gate/up [E, I, H] and down [E, H, I]; got gate "
                f"{tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}"
            )
        Is = 0
        if shared is not None:
            sg, su, sd = shared
            Is = sg.shape[0]
            if sg.shape != (Is, H) or su.shape != (Is, H) or sd.shape != (H, Is):
                raise ValueError(
                    f"shared expert weights must be gate/up [Is, {H}] and down [{H}, Is]; got "
                    f"{tuple(sg.shape)}, {tuple(su.shape)}, {tuple(sd.shape)}"
                )
        dtype = gate.dtype if mode == "float" else torch.float32
        m = cls(E, H, I, mode, backend, min_mm_rows, dtype, Is)
        with torch.no_grad():
            if mode == "float":
                m.gate_up.copy_(torch.cat([gate, up], dim=1))
                m.down.copy_(down)
                if Is:
                    m.shared_gate_up.copy_(torch.cat([sg, su]))
                    m.shared_down.copy_(sd)
            else:
                for e in range(E):
                    q13, s13 = quantize_weight(torch.cat([gate[e], up[e]], dim=0))
                    q2, s2 = quantize_weight(down[e])
                    m.w13_t[e].copy_(q13)
                    m.s13[e].copy_(s13)
                    m.w2_t[e].copy_(q2)
                    m.s2[e].copy_(s2)
                if Is:
                    q13, s13 = quantize_weight(torch.cat([sg, su]))
                    q2, s2 = quantize_weight(sd)
                    m.shared_w13_t.copy_(q13)
                    m.shared_s13.copy_(s13)
                    m.shared_w2_t.copy_(q2)
                    m.shared_s2.copy_(s2)
        return m.to(gate.device)

    def _use_numba(self, x: torch.Tensor) -> bool:
        if self.backend == "numba":
            if x.device.type != "cpu":
                raise ValueError("RoutedExperts backend 'numba' runs on the CPU only")
            return True
        return self.backend == "auto" and self.mode == "w8a8" and x.device.type == "cpu"

    def _workspace(self, max_tokens: int, top_k: int) -> _Workspace:
        return _Workspace(max_tokens, top_k, self.hidden_size, self.intermediate_size,
                          self.shared_intermediate_size)  # fmt: skip

    def reserve(self, max_tokens: int, top_k: int) -> None:
        """Preallocate the CPU int8 buffers for up to ``max_tokens`` tokens of ``top_k`` experts."""
        self._ws = self._workspace(max_tokens, top_k)

    def forward(self, x: torch.Tensor, plan, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [T, H] and its ``DispatchPlan`` -> expert output [T, H] (shared expert included)."""
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"expert input must be [T, {self.hidden_size}], got {tuple(x.shape)}")
        if plan.topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"plan covers {plan.topk_idx.shape[0]} tokens, input has {x.shape[0]}")
        if self._use_numba(x):
            return self._forward_numba(x, plan, out)
        return self._forward_torch(x, plan, out)

    def _weights_numpy(self):
        """numpy views of the int8 buffers (the shared expert's stacked as one expert, or
        one-element placeholders), rebuilt when a buffer tensor was replaced."""
        bufs = self._buffers
        names = ("w13_t", "s13", "w2_t", "s2", "shared_w13_t", "shared_s13", "shared_w2_t", "shared_s2")
        key = tuple(bufs.get(n) for n in names)
        if self._np_key is None or any(a is not b for a, b in zip(key, self._np_key)):
            views = [t.numpy() for t in key[:4]]
            if self.shared_intermediate_size:
                views += [t.numpy()[None] for t in key[4:]]
            else:
                views += [np.zeros((1, 1, 1), np.int8), np.ones((1, 1), np.float32),
                          np.zeros((1, 1, 1), np.int8), np.ones((1, 1), np.float32)]  # fmt: skip
            self._np_views, self._np_key = tuple(views), key
        return self._np_views

    def _forward_numba(self, x, plan, out):
        T, k = plan.topk_idx.shape
        ws = self._ws
        if ws is None or T > ws.max_tokens or k != ws.top_k:
            ws = self._workspace(T, k)
        b, bn = ws.t, ws.n
        if isinstance(plan.topk_idx, np.ndarray):
            idx, w, pos, counts, offsets, token_ids, _, active, n_active = plan
        else:
            idx, w, pos, counts, offsets, token_ids, _, active, n_active = _plan_numpy(plan)
        if x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
            x = x.detach().to(torch.float32).contiguous()
        xn = x.numpy()
        if out is None:
            out, on = ws.out_views(T)
        elif out.shape != (T, self.hidden_size) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [{T}, {self.hidden_size}] tensor")
        else:
            on = out.detach().numpy()
        w13n, s13n, w2n, s2n, sw13n, ss13n, sw2n, ss2n = self._weights_numpy()
        has_shared = self.shared_intermediate_size > 0
        mr = self.min_mm_rows
        # An expert holds at most T rows: no _int_mm group is possible below the threshold.
        big = np.flatnonzero(counts >= mr).tolist() if T >= mr else ()
        if not big and not (has_shared and T >= mr):
            _moe_numba(xn, idx, w, pos, token_ids, offsets, active, n_active, w13n, s13n, w2n, s2n,
                       bn["qx"], bn["sx"], bn["xg"], bn["acc13"], bn["hbuf"], bn["hq"], bn["sh"],
                       bn["acc2"], on, has_shared, bn["s_ids"], bn["s_off"], bn["s_act"],
                       sw13n, ss13n, sw2n, ss2n, bn["sacc13"], bn["shq"], bn["ssh"], bn["sacc2"])  # fmt: skip
            return out
        quantize_rows(xn, bn["qx"], bn["sx"])
        _moe_gemm1(bn["qx"], token_ids, offsets, active, n_active, w13n, mr, bn["xg"], bn["acc13"])
        for e in big:
            o0, o1 = int(offsets[e]), int(offsets[e + 1])
            torch._int_mm(b["xg"][o0:o1], self.w13_t[e], out=b["acc13"][o0:o1])
        _moe_act(bn["sx"], token_ids, offsets, active, n_active, s13n, bn["acc13"], bn["hbuf"],
                 bn["hq"], bn["sh"], w2n, mr, bn["acc2"])  # fmt: skip
        for e in big:
            o0, o1 = int(offsets[e]), int(offsets[e + 1])
            torch._int_mm(b["hq"][o0:o1], self.w2_t[e], out=b["acc2"][o0:o1])
        _moe_combine(idx, w, pos, bn["acc2"], bn["sh"], s2n, on)
        if has_shared:  # T >= mr here: both shared GEMMs through _int_mm, rows in token order
            bn["s_off"][1] = T
            torch._int_mm(b["qx"][:T], self.shared_w13_t, out=b["sacc13"][:T])
            _moe_act(bn["sx"], bn["s_ids"], bn["s_off"], bn["s_act"], 1, ss13n, bn["sacc13"],
                     bn["hbuf"], bn["shq"], bn["ssh"], sw2n, mr, bn["sacc2"])  # fmt: skip
            torch._int_mm(b["shq"][:T], self.shared_w2_t, out=b["sacc2"][:T])
            _add_shared(bn["sacc2"], bn["ssh"], ss2n[0], on)
        return out

    def _forward_torch(self, x, plan, out):
        dev = x.device
        idx, w, pos, counts, offsets, token_ids, _, active, _ = _plan_torch(plan, dev)
        T, k = idx.shape
        I, Is = self.intermediate_size, self.shared_intermediate_size
        token_ids = token_ids.long()
        offs = offsets.tolist()
        act = active.tolist()
        row_e = torch.repeat_interleave(torch.arange(self.num_experts, device=dev), counts.long())
        if self.mode == "w8a8":
            if dev.type == "cuda" and (self.hidden_size % 8 or I % 8 or Is % 8):
                raise ValueError(
                    f"int8 experts on CUDA need hidden ({self.hidden_size}), intermediate ({I}) and "
                    f"shared intermediate ({Is}) sizes that are multiples of 8 (torch._int_mm)"
                )
            qx, sx = quantize_activation(x)
            xg = qx.index_select(0, token_ids)
            acc13 = torch.empty(T * k, 2 * I, dtype=torch.int32, device=dev)
            for e in act:
                _int_mm(xg[offs[e] : offs[e + 1]], self.w13_t[e], out=acc13[offs[e] : offs[e + 1]])
            sxg = sx.index_select(0, token_ids)
            s13 = self.s13.index_select(0, row_e)
            g = acc13[:, :I].float() * sxg * s13[:, :I]
            u = acc13[:, I:].float() * sxg * s13[:, I:]
            hq, sh = quantize_activation(silu_mul(g, u))
            acc2 = torch.empty(T * k, self.hidden_size, dtype=torch.int32, device=dev)
            for e in act:
                _int_mm(hq[offs[e] : offs[e + 1]], self.w2_t[e], out=acc2[offs[e] : offs[e + 1]])
            y = acc2.float() * sh * self.s2.index_select(0, row_e)
            if Is:
                gu = _int_mm(qx, self.shared_w13_t).float() * sx * self.shared_s13
                hq_s, sh_s = quantize_activation(silu_mul(gu[:, :Is], gu[:, Is:]))
                y_shared = _int_mm(hq_s, self.shared_w2_t).float() * sh_s * self.shared_s2
        else:
            xg = x.index_select(0, token_ids)
            y = torch.empty(T * k, self.hidden_size, dtype=self.down.dtype, device=dev)
            for e in act:
                gu = F.linear(xg[offs[e] : offs[e + 1]], self.gate_up[e])
                y[offs[e] : offs[e + 1]] = F.linear(F.silu(gu[:, :I]) * gu[:, I:], self.down[e])
            if Is:
                gu = F.linear(x, self.shared_gate_up)
                y_shared = F.linear(F.silu(gu[:, :Is]) * gu[:, Is:], self.shared_down)
        yw = y.index_select(0, pos.reshape(-1).long()).view(T, k, -1) * w.to(y.dtype).unsqueeze(-1)
        if out is None:
            out = torch.zeros(T, self.hidden_size, dtype=y.dtype, device=dev)
        else:
            out.zero_()
        for j in range(k):
            out += yw[:, j]
        if Is:
            out += y_shared
        return out


def default_min_mm_rows(hidden: int, inter: int) -> int:
    """Rows from which an expert's GEMMs go through ``torch._int_mm`` rather than Numba."""
    return 2 if hidden * inter >= 1 << 16 else 1 << 30


def quantize_model(module: nn.Module, mode: str = "w8a8") -> nn.Module:
    """Quantize a runtime model (or any part of one: a block, a head) in place.

    Every ``nn.Linear`` becomes an :class:`Int8Linear` of ``mode`` ("w8a8" or weight-only
    "w8"); stacked routed experts (a module with 3-D ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I]) become :class:`RoutedExperts` (int8 in "w8a8"; kept in float
    for "w8", which quantizes the linear layers only). Norms, the router, embeddings and
    the sensor I/O adapter (any submodule named ``adapter``) stay in float.
    """
    if mode not in ("w8a8", "w8"):
        raise ValueError(f"quantize_model mode must be 'w8a8' or 'w8', got {mode!r}")
    for name, child in list(module.named_children()):
        if name == "adapter":
            continue
        if isinstance(child, nn.Linear):
            if child.bias is not None:
                raise ValueError(f"{name}: int8 linear layers have no bias; this checkpoint has one")
            setattr(module, name, Int8Linear.from_float(child.weight.detach(), mode))
        elif _is_stacked_experts(child):
            inter = child.down_proj.shape[2]
            gate_up = child.gate_up_proj.detach()
            setattr(module, name, RoutedExperts.from_float(
                gate_up[:, :inter], gate_up[:, inter:], child.down_proj.detach(),
                mode="w8a8" if mode == "w8a8" else "float"))
        else:
            quantize_model(child, mode)
    return module


def _is_stacked_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3

"""The int8 rules (W8A8), defined once in torch, and the int8 packing the engines consume.

Scheme: weights are symmetric int8 per output channel (scale = absmax / 127), activations
symmetric int8 per token (row), rounded half to even as ``torch.round`` does and clamped
to [-127, 127]; a row or channel that is all zero gets scale 1. GEMMs are ``torch._int_mm``
(int8 x int8 -> exact int32) dequantized elementwise, ``acc.float() * sx * sw``, so every
output row depends on its own input row only: bitwise the same whatever the batch size and
whatever the other rows are.

A SwiGLU block (dense MLP, shared or routed expert) in int8: quantize the input row once;
gate and up as one GEMM; ``h = silu(g) * u`` as :func:`silu_mul`; quantize ``h`` per row;
the down GEMM. A MoE token sums its experts' outputs times their routing weights in its
top-k order (ascending expert id), then adds the shared experts.

W8 (weight-only) keeps activations in float: the weight is dequantized and a float GEMM
runs. More accurate but, like any float GEMM, not batch invariant.

``runtime.model.packing.pack_int8`` turns a runtime model (float or quantized) into named
int8 structures, the one place where engines get their weights from.

Note on SiLU: torch's CPU ``F.silu`` and ``torch.sigmoid`` give different bits for the
same value depending on whether it falls in a vector lane or in the scalar tail of the
kernel loop, so their result depends on the tensor's shape. :func:`silu_mul` uses only
position-independent ops and is what a batch-invariant path uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127
CUDA_MIN_ROWS = 17     # torch._int_mm on CUDA needs M > 16 (and K, N multiples of 8)


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
    """Symmetric per-row int8: ``x`` [..., K] float -> (q int8 [..., K], scale float32 [..., 1]).

    scale = absmax(row) / 127 (1 for an all-zero row); q = round(x / scale) with
    ``torch.round`` (half to even), clamped to [-127, 127]. Row-wise and exact apart
    from the single division, so a row's result never depends on other rows.
    Non-finite inputs give unspecified codes.
    """
    x = x.to(torch.float32)
    scale = _scale_from_absmax(x.abs().amax(dim=-1, keepdim=True))
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``a`` int8 [M, K] @ ``b`` int8 [K, N] -> int32 [M, N] through ``torch._int_mm``,
    for any M (on CUDA, M <= 16 is zero-padded to 17 rows and cut back: rows stay exact)."""
    M = a.shape[0]
    if a.is_cuda and M < CUDA_MIN_ROWS:
        acc = torch._int_mm(F.pad(a, (0, 0, 0, CUDA_MIN_ROWS - M)), b)[:M]
        return acc if out is None else out.copy_(acc)
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def int8_matmul(qx: torch.Tensor, sx: torch.Tensor, qweight_t: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM then elementwise dequantization: ``(qx @ qweight_t).float() * sx * sw``.

    ``qx`` int8 [M, K], ``sx`` float32 [M, 1], ``qweight_t`` int8 [K, N], ``sw`` float32
    [N] -> float32 [M, N]. Row i depends on row i only.
    """
    return int8_mm(qx, qweight_t).float() * sx * sw


class QWeight(NamedTuple):
    """A linear layer's int8 weight in ``_int_mm`` layout: ``q`` int8 [K8, N8] (transposed,
    K and N zero-padded to multiples of 8), per-output-channel ``s`` float32 [N8] (1 on
    padding), and the true sizes ``k`` (in) and ``n`` (out)."""

    q: torch.Tensor
    s: torch.Tensor
    k: int
    n: int

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "QWeight":
        """Quantize a float weight [out, in] (nn.Linear convention)."""
        q, s = quantize_weight(w, align=8)
        return cls(q, s, w.shape[1], w.shape[0])

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpadded codes as output rows, int8 [n, k] (a view), and their scales [n]."""
        return self.q[:self.k, :self.n].t(), self.s[:self.n]

    def to(self, device) -> "QWeight":
        """The same weight on ``device``."""
        return QWeight(self.q.to(device), self.s.to(device), self.k, self.n)


def qlinear(q: torch.Tensor, s: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Dequantized ``q @ w`` for int8 activations ``q`` [M, <=K8] with row scales ``s``
    [M, 1]: float32 [M, N8] (columns past ``w.n`` are padding)."""
    if q.shape[-1] != w.q.shape[0]:
        q = F.pad(q, (0, w.q.shape[0] - q.shape[-1]))
    return int8_matmul(q, s, w.q, w.s)


def int8_linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """The W8A8 linear layer: float ``x`` [M, k] -> float32 [M, n]."""
    q, s = quantize_activation(x)
    return qlinear(q, s, w)[:, :w.n]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed as ``gate / (1 + exp(-gate)) * up``, elementwise.

    Unlike ``F.silu`` on the CPU, every op here gives the same bits for a value wherever
    it sits in the tensor, so rows stay independent of the batch shape.
    """
    return gate / (torch.exp(-gate) + 1.0) * up


def swiglu_requant(acc13: torch.Tensor, sx: torch.Tensor, s13: torch.Tensor, inter: int):
    """Gate/up int32 accumulators [..., >=2I] (columns gate | up) with row scales ``sx`` and
    channel scales ``s13`` -> ``h = silu(g) * u`` quantized per row: (int8 [..., I], scale [..., 1])."""
    g = acc13[..., :inter].float() * sx * s13[..., :inter]
    u = acc13[..., inter:2 * inter].float() * sx * s13[..., inter:2 * inter]
    return quantize_activation(silu_mul(g, u))


def swiglu_int8(q: torch.Tensor, s: torch.Tensor, w13: QWeight, w2: QWeight) -> torch.Tensor:
    """A SwiGLU block on int8 rows ``q`` [M, H] (scales ``s`` [M, 1]): w13 fuses gate and up
    (columns [gate I | up I]), w2 is down -> float32 [M, w2.n]."""
    if q.shape[-1] != w13.q.shape[0]:
        q = F.pad(q, (0, w13.q.shape[0] - q.shape[-1]))
    hq, hs = swiglu_requant(int8_mm(q, w13.q), s, w13.s, w13.n // 2)
    return qlinear(hq, hs, w2)[:, :w2.n]


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (``y = x @ W.T``).

    Buffers: ``qweight_t`` int8 [K8, N8] (the transposed weight, K and N padded to
    multiples of 8) and ``scale`` float32 [N8]; they load from a state dict under these
    names, so packages store them as plain safetensors.

    Modes: ``"w8a8"`` runs :func:`int8_linear` (batch invariant); ``"w8"`` is weight-only:
    the weight is dequantized to the activation dtype and a float GEMM runs.
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

    def qweight(self) -> QWeight:
        """The weight as a :class:`QWeight` (views of the buffers)."""
        return QWeight(self.qweight_t, self.scale, self.in_features, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] that the int8 codes stand for."""
        q, s = self.qweight().rows()
        return q.float() * s[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] -> [..., out]; float32 in w8a8 mode, ``x.dtype`` in w8 mode."""
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "w8":
            y = x2 @ self.dequantized_weight().to(x.dtype).T
        else:
            y = int8_linear(x2, self.qweight())
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer in W8A8, run on routed tokens (any device).

    Buffers (their state-dict names are the package format): ``w13_t`` int8 [E, H, 2I]
    (gate and up fused, transposed), ``s13`` float32 [E, 2I], ``w2_t`` int8 [E, I, H],
    ``s2`` float32 [E, H]. ``forward(x, ids, weights)`` runs each expert that has tokens
    once over them (the reference int8 path: it reads the routing back to the host) and
    sums each token's expert outputs in its top-k order. Bitwise batch invariant.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.register_buffer("w13_t", torch.zeros(E, H, 2 * I, dtype=torch.int8))
        self.register_buffer("s13", torch.ones(E, 2 * I, dtype=torch.float32))
        self.register_buffer("w2_t", torch.zeros(E, I, H, dtype=torch.int8))
        self.register_buffer("s2", torch.ones(E, H, dtype=torch.float32))

    @classmethod
    def from_float(cls, gate_up: torch.Tensor, down: torch.Tensor) -> "RoutedExperts":
        """Quantize stacked float weights ``gate_up`` [E, 2I, H] (rows gate | up) and ``down`` [E, H, I]."""
        E, I2, H = gate_up.shape
        if I2 % 2 or down.shape != (E, H, I2 // 2):
            raise ValueError(f"expert weights must be gate_up [E, 2I, H] and down [E, H, I]; got "
                             f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}")
        m = cls(E, H, I2 // 2)
        with torch.no_grad():
            for e in range(E):
                m.w13_t[e], m.s13[e] = quantize_weight(gate_up[e])
                m.w2_t[e], m.s2[e] = quantize_weight(down[e])
        return m.to(gate_up.device)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` [T, H], expert ``ids`` [T, k] (ascending per token) and routing ``weights``
        [T, k] -> float32 [T, H]: the weighted sum of the token's expert outputs."""
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"expert input must be [T, {self.hidden_size}], got {tuple(x.shape)}")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"routing covers {ids.shape[0]} tokens, the input has {x.shape[0]}")
        if x.is_cuda and (self.hidden_size % 8 or self.intermediate_size % 8):
            raise ValueError(f"int8 experts on CUDA need hidden ({self.hidden_size}) and intermediate "
                             f"({self.intermediate_size}) sizes that are multiples of 8 (torch._int_mm)")
        return dispatch_experts(self.expert, x, ids, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` [n, H] -> float32 [n, H] (the int8 SwiGLU rule)."""
        q, s = quantize_activation(x)
        hq, hs = swiglu_requant(int8_mm(q, self.w13_t[e]), s, self.s13[e], self.intermediate_size)
        return int8_matmul(hq, hs, self.w2_t[e], self.s2[e])


def dispatch_experts(expert, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     experts: list[int] | None = None) -> torch.Tensor:
    """The routed experts of the int8 rule: each expert (those that got tokens in ascending id,
    or every one of ``experts``) runs once over its tokens' rows, ``expert(e, rows)`` -> float32,
    then :func:`combine_experts`. ``x`` [T, H], ``ids`` [T, k] (ascending per token), ``weights``
    [T, k] -> float32 [T, H]."""
    y = torch.zeros(*ids.shape, x.shape[-1], device=x.device)
    for e in torch.unique(ids).tolist() if experts is None else experts:
        token, slot = torch.where(ids == e)
        y[token, slot] = expert(e, x[token])
    return combine_experts(y, weights)


def combine_experts(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MoE combine of the int8 rule: each token's expert outputs ``y`` [T, k, H] times its
    routing ``weights`` [T, k], summed in its top-k order (ascending expert id) -> [T, H].
    Elementwise in a fixed order, so a row never depends on the batch."""
    out = torch.zeros_like(y[:, 0])
    for j in range(weights.shape[1]):
        out = out + weights[:, j:j + 1] * y[:, j]
    return out


def quantize_model(module: nn.Module, mode: str = "w8a8") -> nn.Module:
    """Quantize a runtime model (or any part of one: a block, a head) in place.

    Every ``nn.Linear`` becomes an :class:`Int8Linear` of ``mode`` ("w8a8" or weight-only
    "w8"); in "w8a8", stacked routed experts (a module with 3-D ``gate_up_proj`` [E, 2I, H]
    and ``down_proj`` [E, H, I]) become :class:`RoutedExperts` ("w8" keeps them in float).
    Norms, the router, embeddings and the sensor I/O adapter (any submodule named
    ``adapter``) stay in float.
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
            if mode == "w8a8":
                setattr(module, name, RoutedExperts.from_float(child.gate_up_proj.detach(),
                                                               child.down_proj.detach()))
        else:
            quantize_model(child, mode)
    return module


def _is_stacked_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3

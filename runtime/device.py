"""The device stream engine: a control cycle as one CUDA graph replay, int8 experts, streaming.

``DeviceEngine`` is the GPU counterpart of ``runtime.engine.Engine`` with the same slots,
latent ring buffers and API (``step_tokens``, ``step_sensor``, ``reset_slot``...). It is
written in torch ops with static shapes: every step runs all slot rows (inactive ones are
masked), every buffer is preallocated, and nothing inside the step reads a value back to
the host, so on CUDA the whole step (embedding, MLA, routing, dispatch, expert GEMMs, head)
is captured once as a ``torch.cuda.CUDAGraph`` and each control cycle is one replay. On the
CPU the same step runs eagerly through the same code, which is how it is tested here.

Rows: the step always has ``rows = max(capacity, 17)`` rows (CUDA's ``torch._int_mm`` needs
more than 16); row i is slot i, rows past ``capacity`` are scratch and never active.

Determinism: linear layers and experts are W8A8 with exact int32 accumulation (``_int_mm``
or the Triton kernel below); the float parts (norms, rotary, router logits, absorbed
attention) run at one fixed shape per engine, and the elementwise ops give the same bits
wherever a value sits. A stream's outputs are therefore bitwise the same whether the other
slots are active or not, and whichever expert backend or cache size computed them.

Routing is torch ops (graph-capturable). ``route_static`` breaks ties to the lower index,
as the Numba ``Router`` does, by running ``topk`` on integer keys that are all distinct
(order-preserving float bits, then the index), so ``topk``'s own tie order never matters;
given the same logits it picks bitwise the same experts and weights as ``Router``.

Routed experts, two backends (the same bits):
- ``"triton"`` (CUDA): a grouped int8 GEMM. Assignments are sorted by expert on the
  device; one program per (expert, column tile) loads that expert's token rows and reads
  its weight tile once per step; experts without tokens return at once, so a step reads
  the weights of the active experts only, each once.
- ``"torch"`` (anywhere): every expert over every row with ``_int_mm`` (gate/up of all
  experts as one GEMM, one down GEMM per expert), then the chosen (token, expert) pairs
  are gathered. It reads every expert's weights once per step, whether routed or not.

Streaming (``expert_cache_slots=N``): routed experts stay in pinned host memory in a
``runtime.expert_store.ExpertStore`` with N device slots. Each MoE layer reads its routing
back to the host (so such a step is eager, not a graph), pre-gates the next MoE layer with
that layer's router on the current hidden state and prefetches its likely experts on a
side stream, then runs its own experts from the cache.
"""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from runtime.expert_store import ExpertStore
from runtime.model import MoE, Transformer, apply_rope, rope_cos_sin
from runtime.quant import RoutedExperts, quantize_activation, quantize_weight, silu_mul

log = logging.getLogger(__name__)

MIN_ROWS = 17          # torch._int_mm on CUDA needs M > 16
_KEY_BITS = 16         # room for the index in a routing key (E, n_group < 65536)

# Peak DRAM bandwidth in GB/s by device name fragment (vendor data sheets), first match wins.
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2039.0), ("H100", 3352.0),
    ("A100-PCIE-40GB", 1555.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-40GB", 1555.0), ("A100", 2039.0),
    ("L40S", 864.0), ("A10G", 600.0), ("L4", 300.0),
)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _pad_last2(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Zero-pad (or ``value``-pad) the last two dims of ``t`` up to [rows, cols]."""
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]), value=value)


class QWeight(NamedTuple):
    """An int8 linear weight for ``_int_mm``: ``q`` [K8, N8] (transposed, padded to multiples of
    8), per-output-channel ``s`` [N8] (1 on padding), true sizes ``k`` and ``n``."""
    q: torch.Tensor
    s: torch.Tensor
    k: int
    n: int


def _qweight(linear: torch.nn.Module, device: torch.device) -> QWeight:
    """int8 codes of a float ``nn.Linear`` or a ``runtime.quant.Int8Linear`` (same rule)."""
    if hasattr(linear, "qweight_t"):
        return QWeight(linear.qweight_t.detach().to(device).contiguous(),
                       linear.scale.detach().float().to(device).contiguous(), linear.in_features, linear.out_features)
    w = linear.weight.detach().float().to(device)
    q, s = quantize_weight(w, align=8)
    return QWeight(q.contiguous(), s.contiguous(), w.shape[1], w.shape[0])


def _concat(*ws: QWeight) -> tuple[QWeight, list[int]]:
    """Weights with the same input side as one GEMM; returns it and each part's column offset."""
    starts, at = [], 0
    for w in ws:
        starts.append(at)
        at += w.q.shape[1]
    return QWeight(torch.cat([w.q for w in ws], 1), torch.cat([w.s for w in ws]), ws[0].k, at), starts


def _mlp_weights(gate: QWeight, up: QWeight, down: QWeight) -> tuple[QWeight, QWeight]:
    """SwiGLU weights in the expert layout: w13 columns [gate I | up I | pad]."""
    inter = gate.n
    q = torch.cat([gate.q[:, :inter], up.q[:, :inter]], 1)
    s = torch.cat([gate.s[:inter], up.s[:inter]])
    n8 = _pad8(2 * inter)
    return QWeight(F.pad(q, (0, n8 - 2 * inter)).contiguous(), F.pad(s, (0, n8 - 2 * inter), value=1.0),
                   gate.k, 2 * inter), down


def _expert_weights(moe: MoE, device: torch.device):
    """Routed experts as int8: w13 [E, H8, N8] (columns gate|up), s13 [E, N8], w2 [E, I8, H8], s2 [E, H8]."""
    ex = moe.experts
    if isinstance(ex, RoutedExperts) and ex.mode == "w8a8":
        w13, s13 = ex.w13_t.detach().to(device), ex.s13.detach().float().to(device)
        w2, s2 = ex.w2_t.detach().to(device), ex.s2.detach().float().to(device)
    else:
        gate_up = ex.gate_up if isinstance(ex, RoutedExperts) else ex.gate_up_proj
        down = ex.down if isinstance(ex, RoutedExperts) else ex.down_proj
        parts13 = [quantize_weight(w.detach().float().to(device)) for w in gate_up]
        parts2 = [quantize_weight(w.detach().float().to(device)) for w in down]
        w13, s13 = torch.stack([p[0] for p in parts13]), torch.stack([p[1] for p in parts13])
        w2, s2 = torch.stack([p[0] for p in parts2]), torch.stack([p[1] for p in parts2])
    H, N = w13.shape[1:]
    inter = w2.shape[1]
    h8, n8, i8 = _pad8(H), _pad8(N), _pad8(inter)
    return (_pad_last2(w13, h8, n8).contiguous(), F.pad(s13, (0, n8 - N), value=1.0).contiguous(),
            _pad_last2(w2, i8, h8).contiguous(), F.pad(s2, (0, h8 - H), value=1.0).contiguous())


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM for any row count (rows padded to 17 on CUDA, results cut back)."""
    m = a.shape[0]
    if a.is_cuda and m < MIN_ROWS:
        return torch._int_mm(F.pad(a, (0, 0, 0, MIN_ROWS - m)), b)[:m]
    return torch._int_mm(a, b)


def _pad_cols(q: torch.Tensor, cols: int) -> torch.Tensor:
    return q if q.shape[-1] == cols else F.pad(q, (0, cols - q.shape[-1]))


def _qlinear(q: torch.Tensor, s: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Dequantized ``q @ w`` for int8 activations ``q`` [M, K] with row scales ``s`` [M, 1]:
    ``acc.float() * s * w.s`` (the order of ``runtime.quant.int8_matmul``), [M, N8]."""
    return _int_mm(_pad_cols(q, w.q.shape[0]), w.q).float() * s * w.s


def _linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    q, s = quantize_activation(x)
    return _qlinear(q, s, w)[:, :w.n]


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(acc13: torch.Tensor, sx: torch.Tensor, s13: torch.Tensor, inter: int):
    """Dequantize gate/up accumulators, SiLU-gate, requantize per row: (int8 [..., I], scale [..., 1])."""
    g = acc13[..., :inter].float() * sx * s13[..., :inter]
    u = acc13[..., inter:2 * inter].float() * sx * s13[..., inter:2 * inter]
    return quantize_activation(silu_mul(g, u))


# ----------------------------------------------------------------------------------------
# Routing as torch ops with a documented tie rule.

def _order_key(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like float32 ``x`` and, among equal values, higher for a lower index."""
    bits = (x + 0.0).contiguous().view(torch.int32)          # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << _KEY_BITS) | ((1 << _KEY_BITS) - 1 - index)


def route_static(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                 norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ``noaux_tc`` routing of ``logits`` float32 [T, E] -> (ids int64 [T, k]
    ascending, weights float32 [T, k]), static shapes, no host synchronisation.

    The arithmetic is that of ``runtime.routing.route_dispatch``: s = 1 / (1 + exp(-logit))
    with exp in float64 rounded to float32; s' = s + bias; group score = the two largest s'
    of a group added largest first; ties go to the lower group and the lower expert index;
    the weight sum runs over the chosen experts in ascending id. So from the same logits it
    gives the same bits as ``Router.route_logits`` (for finite logits).
    """
    T, E = logits.shape
    scores = 1.0 / (1.0 + torch.exp(-logits.double()).float())
    choice = scores + bias
    gsize = E // n_group
    top2 = choice.view(T, n_group, gsize).topk(2, dim=-1).values
    group_score = top2[..., 0] + top2[..., 1]
    gidx = torch.arange(n_group, device=logits.device)
    keep = torch.topk(_order_key(group_score, gidx), topk_group, dim=-1).indices
    group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    key = _order_key(choice, torch.arange(E, device=logits.device))
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, gsize).reshape(T, E)
    key = key.masked_fill(~expert_mask, torch.iinfo(torch.int64).min)
    ids = torch.topk(key, top_k, dim=-1).indices.sort(dim=-1).values
    w = scores.gather(1, ids)
    if norm_topk_prob:
        total = w[:, 0]
        for j in range(1, top_k):
            total = total + w[:, j]
        w = w / (total + 1e-20).unsqueeze(1)
    return ids, w * routed_scaling_factor


# ----------------------------------------------------------------------------------------
# The grouped int8 GEMM (Triton).

_TRITON_KERNEL = None


def triton_available() -> bool:
    """Whether the Triton grouped kernel can run (Triton importable; on the CPU only under
    ``TRITON_INTERPRET=1``, which the tests use to check the kernel without a GPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _grouped_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def grouped_int8_kernel(x_ptr, rows_ptr, offs_ptr, slot_ptr, w_ptr, out_ptr, K, N,
                                stride_xm, stride_ws, stride_wk, stride_om,
                                GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
            # One program: expert program_id(0), output columns tile program_id(1).
            e = tl.program_id(0)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            start = tl.load(offs_ptr + e)
            slot = tl.load(slot_ptr + e)
            count = tl.where(slot >= 0, tl.load(offs_ptr + e + 1) - start, 0)
            w_base = w_ptr + slot.to(tl.int64) * stride_ws
            for m0 in range(0, count, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M)
                m_ok = rm < count
                arow = start + rm
                if GATHER:
                    src = tl.load(rows_ptr + arow, mask=m_ok, other=0)
                else:
                    src = arow
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = rk < K
                    a = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                                mask=m_ok[:, None] & k_ok[None, :], other=0)
                    w = tl.load(w_base + rk.to(tl.int64)[:, None] * stride_wk + rn[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0)
                    acc += tl.dot(a, w, out_dtype=tl.int32)
                tl.store(out_ptr + arow.to(tl.int64)[:, None] * stride_om + rn[None, :], acc,
                         mask=m_ok[:, None] & n_ok[None, :])

        _TRITON_KERNEL = grouped_int8_kernel
    return _TRITON_KERNEL


def grouped_int8_mm(x: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor,
                    w: torch.Tensor, out: torch.Tensor, *, gather: bool, block_m: int = 16) -> torch.Tensor:
    """Grouped exact int8 GEMM: for each expert e with ``slots[e] >= 0``, rows
    a in [offsets[e], offsets[e+1]) of ``out`` get ``x[rows[a] if gather else a] @ w[slots[e]]``.

    ``x`` int8 [M, K] (unit stride on K); ``rows`` int32 [A]; ``offsets`` int32 [E+1];
    ``slots`` int32 [E]; ``w`` int8 [S, K, N] with unit stride on N (any strides on S, K);
    ``out`` int32 [A, N]. Other rows of ``out`` are left as they are. Static launch grid
    (E x N/128), so it can be captured in a CUDA graph; each active expert's weights are
    read once when it holds at most ``block_m`` rows.
    """
    K, N = x.shape[1], out.shape[1]
    if w.stride(2) != 1 or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("grouped_int8_mm needs unit stride on the last dim of x, w and out")
    block_n, block_k = 128, 128
    grid = (slots.shape[0], -(-N // block_n))
    _grouped_kernel()[grid](x, rows, offsets, slots, w, out, K, N, x.stride(0), w.stride(0), w.stride(1),
                            out.stride(0), GATHER=gather, BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_K=block_k, num_warps=4, num_stages=3)
    return out


# ----------------------------------------------------------------------------------------

class DeviceEngine:
    """Fixed-capacity stream slots over a DeepSeek-V3 model on a torch device, one token per
    stream per step; on CUDA each step is one CUDA graph replay.

    Same API and semantics as ``runtime.engine.Engine``: ``step_tokens`` / ``step_sensor``
    return views of preallocated host buffers, valid until the next step, rows in the order
    of ``slots``. Options: ``graphs`` (default: on for CUDA), ``expert_backend`` ("auto":
    Triton on CUDA when available, else "torch"), ``expert_cache_slots`` (stream routed
    experts from host memory through a device cache of that many experts; eager steps),
    ``compile_backend`` (run the step through ``torch.compile(fullgraph=True)`` with that
    backend before capture: "inductor" fuses the elementwise ops into few kernels on CUDA,
    "aot_eager" only traces, which proves the step is a single graph).
    """

    def __init__(self, model: Transformer, *, capacity: int = 1, window: int = 256,
                 device: str | torch.device = "cuda", graphs: bool | None = None,
                 expert_backend: str = "auto", expert_cache_slots: int | None = None,
                 compile_backend: str | None = None):
        if capacity < 1 or window < 1:
            raise ValueError(f"capacity and window must be positive (got {capacity}, {window})")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine")
        cfg = model.config
        if cfg.attention_bias:
            raise ValueError("the device engine does not support attention_bias=True checkpoints")
        if expert_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"expert_backend must be 'auto', 'torch' or 'triton', got {expert_backend!r}")
        if expert_backend == "auto":
            expert_backend = "triton" if device.type == "cuda" and triton_available() else "torch"
        elif expert_backend == "triton" and not triton_available():
            raise ValueError("expert_backend='triton' needs Triton (and a GPU, or TRITON_INTERPRET=1)")
        if graphs is None:
            graphs = device.type == "cuda" and expert_cache_slots is None
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if expert_cache_slots is not None and (graphs or compile_backend):
            raise ValueError("a streaming expert cache reads routing back every layer: it runs without "
                             "graphs or compilation")
        self.config, self.capacity, self.window, self.device = cfg, capacity, window, device
        self.rows = max(capacity, MIN_ROWS)
        self.expert_backend = expert_backend
        self.adapter = model.adapter
        self.input_names = list(model.adapter.input_names) if model.adapter is not None else []
        self.output_names = list(model.adapter.output_names) if model.adapter is not None else []
        with torch.no_grad():
            self._load(model, expert_cache_slots)
            self._allocate()
        if expert_backend == "triton":
            _grouped_kernel()
        self._step = self._body if compile_backend is None else torch.compile(
            self._body, backend=compile_backend, fullgraph=True, dynamic=False)
        self.compile_backend = compile_backend
        self.use_graphs = bool(graphs)
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        if self.use_graphs:
            self._capture()

    # -- set-up --------------------------------------------------------------------------
    def _load(self, model: Transformer, cache_slots: int | None) -> None:
        cfg, dev = self.config, self.device
        f32 = lambda t: t.detach().float().to(dev).contiguous()  # noqa: E731
        self.embed = f32(model.model.embed_tokens.weight)
        self.norm = f32(model.model.norm.weight)
        self.head = _qweight(model.lm_head, dev)
        self.inv_freq, self.rope_factor = f32(model.inv_freq), float(model.rope_factor)
        self.layers = []
        moe_mods = []
        for li, layer in enumerate(model.model.layers):
            a = layer.self_attn
            if cfg.q_lora_rank is not None:
                w_in, (_, kv_at) = _concat(_qweight(a.q_a_proj, dev), _qweight(a.kv_a_proj_with_mqa, dev))
                wqb, qa_norm = _qweight(a.q_b_proj, dev), f32(a.q_a_layernorm.weight)
            else:
                w_in, (_, kv_at) = _concat(_qweight(a.q_proj, dev), _qweight(a.kv_a_proj_with_mqa, dev))
                wqb, qa_norm = None, None
            uk, uv = a.absorbed_weights()
            entry = dict(ln1=f32(layer.input_layernorm.weight), ln2=f32(layer.post_attention_layernorm.weight),
                         w_in=w_in, kv_at=kv_at, wqb=wqb, qa_norm=qa_norm, kva_norm=f32(a.kv_a_layernorm.weight),
                         wuk=f32(uk), wuv=f32(uv), wo=_qweight(a.o_proj, dev))
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                entry["moe"] = len(moe_mods)
                moe_mods.append(mlp)
                entry["gate_w"], entry["gate_b"] = f32(mlp.gate.weight), f32(mlp.gate.e_score_correction_bias)
                if mlp.shared_experts is not None:
                    se = mlp.shared_experts
                    entry["shared"] = _mlp_weights(_qweight(se.gate_proj, dev), _qweight(se.up_proj, dev),
                                                   _qweight(se.down_proj, dev))
            else:
                entry["mlp"] = _mlp_weights(_qweight(mlp.gate_proj, dev), _qweight(mlp.up_proj, dev),
                                            _qweight(mlp.down_proj, dev))
            self.layers.append(entry)
        self.n_moe = len(moe_mods)
        self.store: ExpertStore | None = None
        if not moe_mods:
            return
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.E, self.I, Lm = E, I, len(moe_mods)
        # One layer at a time into the final tensors, so loading needs one layer of headroom.
        # Resident: w13 as [Lm, H8, E, N8], so gate/up of all experts of a layer is one
        # [H8, E*N8] GEMM for the torch backend and a strided [E, H8, N8] view for the grouped
        # kernel. Streaming: [Lm, E, H8, N8] in host memory, one contiguous block per expert.
        home = dev if cache_slots is None else torch.device("cpu")
        for m, mod in enumerate(moe_mods):
            w13, s13, w2, s2 = _expert_weights(mod, home)
            if m == 0:
                h8, n13, i8 = w13.shape[1], w13.shape[2], w2.shape[1]
                shape13 = (Lm, h8, E, n13) if cache_slots is None else (Lm, E, h8, n13)
                pin = cache_slots is not None and dev.type == "cuda"     # the store's copies are async
                e13 = torch.empty(shape13, dtype=torch.int8, device=home, pin_memory=pin)
                e2 = torch.empty((Lm, E, i8, h8), dtype=torch.int8, device=home, pin_memory=pin)
                self.e13s = torch.empty((Lm, E, n13), device=dev)
                self.e2s = torch.empty((Lm, E, h8), device=dev)
            e13[m] = w13.permute(1, 0, 2) if cache_slots is None else w13
            e2[m], self.e13s[m], self.e2s[m] = w2, s13, s2
            del w13, w2
        self.h8, self.n13 = h8, n13
        self.expert_bytes = int(h8 * n13 + i8 * h8 + 4 * (n13 + h8))
        if cache_slots is not None:
            self.store = ExpertStore(e13, e2, slots=cache_slots, device=dev)
            self.e13 = self.e2 = None
        else:
            self.e13, self.e2 = e13, e2

    def _allocate(self) -> None:
        cfg, R, W, dev = self.config, self.rows, self.window, self.device
        L = cfg.num_hidden_layers
        pin = dev.type == "cuda"

        def host(shape, dtype):
            t = torch.zeros(shape, dtype=dtype)
            return t.pin_memory() if pin else t

        self.lat = torch.zeros(L, R, W, cfg.kv_lora_rank, device=dev)
        self.pe = torch.zeros(L, R, W, cfg.qk_rope_head_dim, device=dev)
        self.pos = torch.zeros(R, dtype=torch.int64, device=dev)
        self.tok = torch.zeros(R, dtype=torch.int64, device=dev)
        self.act = torch.zeros(R, dtype=torch.bool, device=dev)
        self.ar = torch.arange(R, device=dev)
        self.win = torch.arange(W, device=dev)
        self.logits = torch.zeros(R, cfg.vocab_size, device=dev)
        self._tok_h, self._act_h = host(R, torch.int64), host(R, torch.bool)
        self._tok_np, self._act_np = self._tok_h.numpy(), self._act_h.numpy()
        self._logits_h = host((R, cfg.vocab_size), torch.float32)
        self._logits_np = self._logits_h.numpy()
        self._out_tok = np.zeros((R, cfg.vocab_size), np.float32)
        self._rows_np = np.zeros(0, np.int64)
        if self.adapter is not None:
            a, dev_f32 = self.adapter, (lambda t: t.detach().float().to(dev))
            self.in_w, self.in_b = dev_f32(a.in_proj.weight), dev_f32(a.in_proj.bias)
            self.in_mean, self.in_std = dev_f32(a.in_mean), dev_f32(a.in_std)
            self.out_w, self.out_b = dev_f32(a.out_proj.weight), dev_f32(a.out_proj.bias)
            self.out_mean, self.out_std = dev_f32(a.out_mean), dev_f32(a.out_std)
            F_in, O = len(self.input_names), len(self.output_names)
            self.feats = torch.zeros(R, F_in, device=dev)
            self.outputs = torch.zeros(R, O, device=dev)
            self._feats_h, self._outputs_h = host((R, F_in), torch.float32), host((R, O), torch.float32)
            self._feats_np, self._outputs_np = self._feats_h.numpy(), self._outputs_h.numpy()
            self._out_sensor = np.zeros((R, O), np.float32)
        # Experts: per-layer count of experts that received tokens (for bandwidth accounting).
        self.expert_active = torch.zeros(max(self.n_moe, 1), dtype=torch.int64, device=dev)
        self.steps_counted = 0
        if self.n_moe:
            k, A = cfg.num_experts_per_tok, R * cfg.num_experts_per_tok
            self.ones_a = torch.ones(A, dtype=torch.int32, device=dev)
            self.ar_a = torch.arange(A, device=dev)
            self.offsets = torch.zeros(self.E + 1, dtype=torch.int32, device=dev)
            self.ident_slots = torch.arange(self.E, dtype=torch.int32, device=dev)
            self.acc13 = torch.zeros(A, self.n13, dtype=torch.int32, device=dev)
            self.acc2 = torch.zeros(A, self.h8, dtype=torch.int32, device=dev)
            # Rows per grouped-GEMM tile: an expert holds about A/E rows, never more than R.
            want = max(16, 2 * A // self.E)
            self.block_m = min(64, 1 << (want - 1).bit_length())
            self.yk = torch.zeros(R, k, self.h8, device=dev)

    def _capture(self) -> None:
        """Warm up (compiles kernels) and capture one graph per step kind; state is unchanged
        because every row is inactive meanwhile."""
        kinds = ["tokens"] + (["sensor"] if self.adapter is not None else [])
        self.act.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for kind in kinds:
                for _ in range(2):
                    self._step(kind)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for kind in kinds:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.no_grad():
                self._step(kind)
            self._graphs[kind] = g
        torch.cuda.synchronize(self.device)
        self.reset_stats()

    # -- state ---------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s history (a new stream starts at position 0)."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} out of range 0..{self.capacity - 1}")
        self.pos[slot] = 0
        self.lat[:, slot] = 0
        self.pe[:, slot] = 0

    def reset_all(self) -> None:
        """Forget every slot's history."""
        self.pos.zero_()
        self.lat.zero_()
        self.pe.zero_()

    def positions(self) -> np.ndarray:
        """Tokens seen so far by each slot."""
        return self.pos[:self.capacity].cpu().numpy()

    def reset_stats(self) -> None:
        """Zero the expert-activity counters (and the store's)."""
        self.expert_active.zero_()
        self.steps_counted = 0
        if self.store is not None:
            self.store.reset_stats()

    def stats(self) -> dict:
        """Steps since ``reset_stats``, mean active experts per MoE layer per step, expert
        weight bytes read per step by the expert kernels, and the store's counters."""
        steps = max(self.steps_counted, 1)
        active = self.expert_active.cpu().numpy()[:self.n_moe] / steps
        out = {"steps": self.steps_counted, "expert_backend": self.expert_backend,
               "active_experts_per_layer": active.tolist()}
        if self.n_moe:
            read = active.sum() if self.expert_backend == "triton" or self.store else self.E * self.n_moe
            out["expert_bytes_per_expert"] = self.expert_bytes
            out["active_expert_bytes_per_step"] = float(active.sum() * self.expert_bytes)
            out["expert_bytes_read_per_step"] = float(read * self.expert_bytes)
        if self.store is not None:
            out["store"] = self.store.stats()
        return out

    # -- steps ---------------------------------------------------------------------------
    def _set_rows(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        n = len(slots)
        if n == 0 or n > self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} slots, got {n}")
        if slots.min() < 0 or slots.max() >= self.capacity or len(np.unique(slots)) != n:
            raise ValueError(f"slot ids must be distinct and in 0..{self.capacity - 1}, got {list(slots)}")
        self._act_np[:] = False
        self._act_np[slots] = True
        self._rows_np = slots
        return slots

    def step_tokens(self, slots, tokens) -> np.ndarray:
        """Append token ``tokens[i]`` to slot ``slots[i]``; returns logits [n, vocab] (a view)."""
        slots = self._set_rows(slots)
        n = len(slots)
        tokens = np.asarray(tokens)
        if tokens.shape != (n,) or tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"tokens must be {n} ids in 0..{self.config.vocab_size - 1}")
        self._tok_np[:] = 0
        self._tok_np[slots] = tokens
        self.tok.copy_(self._tok_h, non_blocking=True)
        self.act.copy_(self._act_h, non_blocking=True)
        self._run("tokens")
        self._logits_h.copy_(self.logits)
        np.take(self._logits_np, slots, axis=0, out=self._out_tok[:n])
        return self._out_tok[:n]

    def step_sensor(self, slots, features) -> np.ndarray:
        """Append one frame per slot (features [n, F] in ``input_names`` order, engineering
        units); returns outputs [n, O] in ``output_names`` order (a view)."""
        if self.adapter is None:
            raise ValueError("this model has no I/O adapter: sensor steps need a sensor-mode package")
        slots = self._set_rows(slots)
        n = len(slots)
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (n, len(self.input_names)):
            raise ValueError(f"features must be [{n}, {len(self.input_names)}], got {features.shape}")
        self._feats_np[:] = 0
        self._feats_np[slots] = features
        self.feats.copy_(self._feats_h, non_blocking=True)
        self.act.copy_(self._act_h, non_blocking=True)
        self._run("sensor")
        self._outputs_h.copy_(self.outputs)
        np.take(self._outputs_np, slots, axis=0, out=self._out_sensor[:n])
        return self._out_sensor[:n]

    def _run(self, kind: str) -> None:
        self.steps_counted += 1
        if self.use_graphs:
            self._graphs[kind].replay()
        else:
            with torch.no_grad():
                self._step(kind)

    # -- the step (static shapes; captured as a graph on CUDA) ---------------------------
    def _body(self, kind: str) -> None:
        cfg = self.config
        eps = cfg.rms_norm_eps
        if kind == "tokens":
            x = self.embed[self.tok]
        else:
            x = F.linear((self.feats - self.in_mean) / self.in_std, self.in_w, self.in_b)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_factor, self.pos)
        widx = self.pos % self.window
        n_valid = torch.clamp(self.pos + 1, max=self.window)
        mask = torch.zeros(self.rows, self.window, device=self.device).masked_fill_(
            self.win[None, :] >= n_valid[:, None], float("-inf"))
        for li, lw in enumerate(self.layers):
            x = x + self._attention(li, lw, _rmsnorm(x, lw["ln1"], eps), cos, sin, widx, mask)
            if "moe" in lw:
                x = self._moe(li, lw, x)
            else:
                w13, w2 = lw["mlp"]
                hq, hs = quantize_activation(_rmsnorm(x, lw["ln2"], eps))
                x = x + self._swiglu_mlp(hq, hs, w13, w2)
        h = _rmsnorm(x, self.norm, eps)
        if kind == "tokens":
            self.logits.copy_(_linear(h, self.head))
        else:
            self.outputs.copy_(F.linear(h, self.out_w, self.out_b) * self.out_std + self.out_mean)
        self.pos.add_(self.act.long())

    def _attention(self, li, lw, h, cos, sin, widx, mask):
        cfg = self.config
        nh, nope, rope, vd, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                 cfg.v_head_dim, cfg.kv_lora_rank)
        R = self.rows
        hq, hs = quantize_activation(h)
        y = _qlinear(hq, hs, lw["w_in"])
        kv = y[:, lw["kv_at"]:lw["kv_at"] + C + rope]
        if lw["wqb"] is not None:
            qa = _rmsnorm(y[:, :cfg.q_lora_rank], lw["qa_norm"], 1e-6)
            q = _linear(qa, lw["wqb"])
        else:
            q = y[:, :nh * (nope + rope)]
        q = q.reshape(R, nh, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        q_pe = apply_rope(q_pe, cos.unsqueeze(1), sin.unsqueeze(1), cfg.rope_interleave)
        latent = _rmsnorm(kv[:, :C], lw["kva_norm"], 1e-6)
        k_pe = apply_rope(kv[:, C:], cos, sin, cfg.rope_interleave)
        lat, pe = self.lat[li], self.pe[li]
        act = self.act[:, None]
        # Inactive rows write their old entry back: their ring buffers never change.
        lat[self.ar, widx] = torch.where(act, latent, lat[self.ar, widx])
        pe[self.ar, widx] = torch.where(act, k_pe, pe[self.ar, widx])
        q_abs = torch.einsum("rhd,hdc->rhc", q_nope, lw["wuk"])
        scores = (torch.einsum("rhc,rwc->rhw", q_abs, lat) + torch.einsum("rhp,rwp->rhw", q_pe, pe)) \
            * cfg.softmax_scale
        probs = (scores + mask[:, None, :]).softmax(dim=-1)
        ctx = torch.einsum("rhw,rwc->rhc", probs, lat)
        out = torch.einsum("rhc,hvc->rhv", ctx, lw["wuv"]).reshape(R, nh * vd)
        return _linear(out, lw["wo"])

    def _swiglu_mlp(self, hq, hs, w13: QWeight, w2: QWeight):
        acc = _int_mm(_pad_cols(hq, w13.q.shape[0]), w13.q)
        mq, ms = _swiglu(acc, hs, w13.s, w13.n // 2)
        return _qlinear(mq, ms, w2)[:, :w2.n]

    def _moe(self, li, lw, x):
        cfg = self.config
        m, k, H = lw["moe"], cfg.num_experts_per_tok, cfg.hidden_size
        h = _rmsnorm(x, lw["ln2"], cfg.rms_norm_eps)
        hq, hs = quantize_activation(h)
        hq = _pad_cols(hq, self.h8)
        ids, wts = self._route(lw, h)
        # Inactive rows are routed to the null expert E: they activate no expert.
        ids_null = torch.where(self.act[:, None], ids, self.E)
        counts = torch.zeros(self.E + 1, dtype=torch.int32, device=self.device).scatter_add_(
            0, ids_null.reshape(-1), self.ones_a)
        self.expert_active[m] += (counts[:self.E] > 0).sum()
        if self.store is not None:
            y = self._experts_streamed(li, m, x, hq, hs, ids_null, counts)
        elif self.expert_backend == "triton":
            y = self._experts_grouped(m, hq, hs, ids_null, counts, self.e13[m].permute(1, 0, 2), self.e2[m],
                                      self.ident_slots)
        else:
            y = self._experts_all(m, hq, hs, ids)
        out = self._swiglu_mlp(hq, hs, *lw["shared"]) if "shared" in lw else torch.zeros_like(x)
        for j in range(k):
            out = out + wts[:, j:j + 1] * y[:, j, :H]
        return x + out

    def _route(self, lw, h):
        cfg = self.config
        return route_static(F.linear(h, lw["gate_w"]), lw["gate_b"], cfg.n_group, cfg.topk_group,
                            cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def _experts_all(self, m, hq, hs, ids):
        """Every expert over every row (static), then the chosen pairs: [R, k, H8]."""
        R, E, I = self.rows, self.E, self.I
        acc13 = _int_mm(hq, self.e13[m].view(self.h8, E * self.n13)).view(R, E, self.n13)
        mq, ms = _swiglu(acc13, hs.unsqueeze(-1), self.e13s[m], I)              # [R, E, I], [R, E, 1]
        mq = _pad_cols(mq, self.e2.shape[2]).transpose(0, 1).contiguous()        # [E, R, I8]
        acc2 = torch.stack([_int_mm(mq[e], self.e2[m, e]) for e in range(E)])   # [E, R, H8]
        sel = ids.clamp(max=E - 1)
        rows = self.ar[:, None]
        return acc2[sel, rows].float() * ms[rows, sel] * self.e2s[m][sel]

    def _experts_grouped(self, m, hq, hs, ids_null, counts, w13, w2, slots):
        """Assignments sorted by expert, grouped int8 GEMMs over active experts only: [R, k, H8]."""
        R, E, k = self.rows, self.E, self.config.num_experts_per_tok
        flat = ids_null.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        self.offsets[1:] = torch.cumsum(counts[:E], 0, dtype=torch.int32)
        token = torch.div(order, k, rounding_mode="floor")
        grouped_int8_mm(hq, token.to(torch.int32), self.offsets, slots, w13, self.acc13, gather=True,
                        block_m=self.block_m)
        expert = flat[order].clamp(max=E - 1)
        mq, ms = _swiglu(self.acc13, hs[token], self.e13s[m][expert], self.I)
        mq = _pad_cols(mq, w2.shape[1])
        grouped_int8_mm(mq, self.ar_a, self.offsets, slots, w2, self.acc2, gather=False, block_m=self.block_m)
        y = self.acc2.float() * ms * self.e2s[m][expert]
        where = torch.empty_like(order)
        where[order] = self.ar_a
        return y[where.view(R, k)]

    def _experts_streamed(self, li, m, x, hq, hs, ids_null, counts):
        """Experts from the store's device cache (host-synchronised; see the module docstring)."""
        store, cfg, E = self.store, self.config, self.E
        nxt = m + 1 < self.n_moe
        if nxt:    # pre-gating: the next MoE layer's router on the current hidden state
            nl = self.layers[li + 1]
            guess, _ = self._route(nl, _rmsnorm(x, nl["ln2"], cfg.rms_norm_eps))
            both = torch.cat([ids_null, guess]).cpu().numpy()
            cur, guess = both[:self.rows], both[self.rows:][self._rows_np]
        else:
            cur = ids_null.cpu().numpy()
        needed = np.unique(cur[cur < E])
        needed = sorted(needed.tolist(), key=lambda e: store.slot_of(m, e) is None)   # hits first
        waves = [needed[i:i + store.slots] for i in range(0, len(needed), store.slots)]
        y = self.yk
        for wi, wave in enumerate(waves):
            slots = store.acquire(m, wave)
            if nxt and len(waves) == 1:
                store.prefetch(m + 1, np.unique(guess).tolist())
            if self.expert_backend == "triton" and len(waves) == 1:
                table = torch.full((E,), -1, dtype=torch.int32)
                table[torch.tensor(wave)] = torch.tensor(slots, dtype=torch.int32)
                y = self._experts_grouped(m, hq, hs, ids_null, counts, store.w13_cache, store.w2_cache,
                                          table.to(self.device))
            else:
                for e, slot in zip(wave, slots):
                    r, j = np.nonzero(cur == e)
                    r, j = torch.from_numpy(r).to(self.device), torch.from_numpy(j).to(self.device)
                    acc13 = _int_mm(hq[r], store.w13_cache[slot])
                    mq, ms = _swiglu(acc13, hs[r], self.e13s[m, e], self.I)
                    acc2 = _int_mm(_pad_cols(mq, store.w2_cache.shape[1]), store.w2_cache[slot])
                    y[r, j] = acc2.float() * ms * self.e2s[m, e]
            store.release(slots)
        return y


# ----------------------------------------------------------------------------------------
# Measurement helpers for ``r1edge bench --device cuda`` and benchmarks/bench_cuda.py.

def peak_bandwidth(device: str | torch.device = "cuda", copy_bytes: int = 1 << 30) -> dict:
    """The device's peak DRAM bandwidth: the data-sheet figure for its name (None if not in
    ``PEAK_BANDWIDTH_GBPS``) and a measured device-to-device copy (read + write bytes / time)."""
    device = torch.device(device)
    name = torch.cuda.get_device_properties(device).name
    table = next((gbps for frag, gbps in PEAK_BANDWIDTH_GBPS if frag in name), None)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    measured = 2 * copy_bytes * reps / (time.perf_counter() - start) / 1e9
    del src, dst
    return {"name": name, "table_gbps": table, "copy_gbps": measured}


def _percentiles(samples_s) -> dict:
    us = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean())}


def time_steps(engine: DeviceEngine, batch: int, steps: int, warmup: int, seed: int = 0) -> list[float]:
    """Wall time of ``steps`` full control cycles (host inputs in, outputs back on the host)
    of ``batch`` streams, after ``warmup`` untimed ones; resets state and stats first."""
    rng = np.random.default_rng(seed)
    slots = np.arange(batch, dtype=np.int64)
    tokens = rng.integers(0, engine.config.vocab_size, (warmup + steps, batch))
    engine.reset_all()
    samples = []
    for t in range(warmup + steps):
        if t == warmup:
            engine.reset_stats()
        start = time.perf_counter()
        engine.step_tokens(slots, tokens[t])
        if t >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def bench_device(model: Transformer, *, batches=(1, 8, 64), device: str = "cuda", steps: int = 100,
                 warmup: int = 10, window: int = 256, expert_backend: str = "auto", peak: dict | None = None,
                 compile_backend: str | None = None, progress=None) -> dict:
    """Per batch size: step latency p50/p99 through CUDA-graph replay and through the same step
    run eagerly, their ratio, and expert-weight bandwidth as a fraction of the device's peak.

    Expert bytes per step are counted on the device during the timed steps (experts that
    received tokens, per layer); the bandwidth is those bytes over the p50 step time, and
    the step time is a whole control cycle: inputs in, graph replay, outputs back on the host.
    On a device without graphs (the CPU) both rows time the eager step; ``peak`` must then
    be given (``{"name", "table_gbps", "copy_gbps"}``).
    """
    device = torch.device(device)
    peak = peak or peak_bandwidth(device)
    ref_gbps = peak["table_gbps"] or peak["copy_gbps"]
    report = {"device": peak["name"], "peak": peak, "steps": steps, "window": window,
              "compile_backend": compile_backend, "batches": {}}
    for b in batches:
        engine = DeviceEngine(model, capacity=b, window=window, device=device, graphs=device.type == "cuda",
                              expert_backend=expert_backend, compile_backend=compile_backend)
        report["expert_backend"] = engine.expert_backend
        graph = _percentiles(time_steps(engine, b, steps, warmup))
        st = engine.stats()
        engine.use_graphs = False
        eager = _percentiles(time_steps(engine, b, steps, warmup))
        entry = {"graph": graph, "eager": eager, "eager_over_graph_p50": eager["p50_us"] / graph["p50_us"],
                 "p99_over_p50": graph["p99_us"] / graph["p50_us"],
                 "tokens_per_s": b / (graph["mean_us"] * 1e-6)}
        if "expert_bytes_read_per_step" in st:
            read = st["expert_bytes_read_per_step"]
            gbps = read / (graph["p50_us"] * 1e-6) / 1e9
            entry.update(active_experts_per_layer=float(np.mean(st["active_experts_per_layer"])),
                         expert_bytes_read_per_step=read,
                         active_expert_bytes_per_step=st["active_expert_bytes_per_step"],
                         expert_gbps=gbps, fraction_of_peak=gbps / ref_gbps,
                         fraction_of_copy_peak=gbps / peak["copy_gbps"])
        report["batches"][str(b)] = entry
        del engine
        torch.cuda.empty_cache()
        if progress is not None:
            progress(b)
    return report


def render_bench_device(report: dict) -> None:
    """Print a ``bench_device`` report as a table."""
    pk = report["peak"]
    table = f"{pk['table_gbps']:.0f}" if pk["table_gbps"] else "n/a"
    print(f"{report['device']}: experts via {report.get('expert_backend')}, peak {table} GB/s (data sheet), "
          f"{pk['copy_gbps']:.0f} GB/s (measured copy); {report['steps']} steps per batch size")
    print(f"{'batch':>5} {'graph p50':>10} {'p99':>9} {'p99/p50':>7} {'eager p50':>10} {'eager/graph':>11} "
          f"{'experts/layer':>13} {'MB/step':>8} {'GB/s':>7} {'of peak':>7}")
    for b, e in report["batches"].items():
        line = (f"{b:>5} {e['graph']['p50_us']:>8.0f}us {e['graph']['p99_us']:>7.0f}us {e['p99_over_p50']:>7.2f} "
                f"{e['eager']['p50_us']:>8.0f}us {e['eager_over_graph_p50']:>10.1f}x")
        if "expert_gbps" in e:
            line += (f" {e['active_experts_per_layer']:>13.1f} {e['expert_bytes_read_per_step'] / 1e6:>8.1f} "
                     f"{e['expert_gbps']:>7.0f} {100 * e['fraction_of_peak']:>6.1f}%")
        print(line)

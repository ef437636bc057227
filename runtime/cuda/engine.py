"""The device stream engine: the model's definition at static shapes, a control cycle as one
CUDA graph replay.

``DeviceEngine`` has the CPU engine's slots, latent ring buffers and API (``step_tokens``,
``step_sensor``, ``reset_slot``...). Its step calls the model's torch definitions
(``runtime.model.transformer``: the decoder layer's composition, norms, rotary, the absorbed
attention, the router; ``runtime.model.quant``: int8 GEMMs, SwiGLU, the MoE combine), with
weights from ``runtime.model.packing.pack_int8``, at static shapes; what is its own is the
layout (fused projections, ring buffers, masked slot rows) and the routed-expert kernels.
Every step runs all slot rows (inactive ones are masked), every buffer is preallocated,
and nothing inside the step reads a value back to the host, so on CUDA the whole step is
captured once as a ``torch.cuda.CUDAGraph`` and each control cycle is one
replay. On the CPU the same step runs eagerly through the same code, which is how it is
tested here.

Rows: the step always has ``rows = max(capacity, 17)`` rows (CUDA's ``torch._int_mm`` needs
more than 16); row i is slot i, rows past ``capacity`` are scratch and never active.

Determinism: linear layers and experts are W8A8 with exact int32 accumulation; the float
parts (norms, rotary, router logits, absorbed attention) run at one fixed shape per engine,
and the elementwise ops give the same bits wherever a value sits. A stream's outputs are
therefore bitwise the same whether the other slots are active or not, and whichever expert
backend or cache size computed them.

Routed experts, three ways (the same bits):
- ``"triton"`` (CUDA): the grouped int8 GEMM of ``runtime.cuda.grouped_int8``; each active
  expert's weights are read once per step, inactive experts cost nothing.
- ``"torch"`` (anywhere): every expert over every row with ``_int_mm``, then the chosen
  (token, expert) pairs are gathered; it reads every expert's weights once per step.
- streaming (``expert_cache_slots=N``): routed experts stay in pinned host memory in a
  ``runtime.cuda.expert_store.ExpertStore`` with N device slots. Each MoE layer reads its routing
  back to the host (so such a step is eager, not a graph), pre-gates the next MoE layer with
  that layer's router on the current hidden state and prefetches its likely experts on a
  side stream, then runs its own experts from the cache.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from runtime.model.config import LORA_NORM_EPS
from runtime.cuda.expert_store import ExpertStore
from runtime.cuda.grouped_int8 import compile_kernel, grouped_int8_mm, triton_available
from runtime.model.transformer import (Transformer, absorbed_attention, apply_rope, decoder_layer, gate_route,
                                       rms_norm, rope_cos_sin)
from runtime.model.packing import PackedAttention, PackedMLP, pack_int8
from runtime.model.quant import (CUDA_MIN_ROWS, QWeight, combine_experts, int8_linear, int8_mm, qlinear,
                                 quantize_activation, swiglu_int8, swiglu_requant)

log = logging.getLogger(__name__)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _pad_last2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``t`` up to [rows, cols]."""
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


def _pad_cols(q: torch.Tensor, cols: int) -> torch.Tensor:
    return q if q.shape[-1] == cols else F.pad(q, (0, cols - q.shape[-1]))


def _on(x, device):
    """A packed structure (NamedTuples of tensors, QWeights, None) copied to ``device``.

    Always a copy, also on the same device: the engine never keeps the model's storage alive
    (on the CPU that may be a whole memory-mapped package file, resident page by page)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, copy=True).contiguous()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_on(v, device) for v in x))
    return x


class _Layer(NamedTuple):
    """One decoder layer on the device. ``w_in`` fuses the first q projection (``q_a`` or
    ``q``) with ``kv_a`` into one GEMM; ``kv_at`` is where kv_a's columns start. ``moe`` is
    the layer's index among MoE layers (None for a dense layer)."""
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: PackedAttention
    w_in: QWeight
    kv_at: int
    mlp: PackedMLP | None
    moe: int | None
    gate: torch.Tensor | None
    bias: torch.Tensor | None


def _is_bf16(t: torch.Tensor, rows: int = 4096) -> bool:
    """Whether every value of float32 ``t`` is a bf16 value (low 16 bits zero), checked in row blocks."""
    bits = t.view(torch.int32)
    return t.dtype == torch.float32 and all(not (bits[i:i + rows] & 0xFFFF).any() for i in range(0, len(t), rows))


def _concat(a: QWeight, b: QWeight) -> tuple[QWeight, int]:
    """Two weights over the same input as one GEMM, and the column where ``b`` starts."""
    at = a.q.shape[1]
    return QWeight(torch.cat([a.q, b.q], 1), torch.cat([a.s, b.s]), a.k, at + b.q.shape[1]), at


class DeviceEngine:
    """Fixed-capacity stream slots over a DeepSeek model on a torch device, one token per
    stream per step; on CUDA each step is one CUDA graph replay.

    Same API and semantics as ``runtime.cpu.engine.Engine``: ``step_tokens`` / ``step_sensor``
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
        self.rows = max(capacity, CUDA_MIN_ROWS)
        self.expert_backend = expert_backend
        packed = pack_int8(model)
        self.rule = packed.rule
        self.adapter = packed.adapter
        self.input_names = list(self.adapter.input_names) if self.adapter is not None else []
        self.output_names = list(self.adapter.output_names) if self.adapter is not None else []
        with torch.no_grad():
            self._load(packed, expert_cache_slots)
            self._allocate()
        if expert_backend == "triton":
            compile_kernel()
        self._step = self._body if compile_backend is None else torch.compile(
            self._body, backend=compile_backend, fullgraph=True, dynamic=False)
        self.compile_backend = compile_backend
        self.use_graphs = bool(graphs)
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        if self.use_graphs:
            self._capture()

    # -- set-up --------------------------------------------------------------------------
    def _load(self, p, cache_slots: int | None) -> None:
        dev = self.device
        # Embeddings that are bf16 values (a bf16 package's) are kept in bf16: the lookup
        # upcasts them exactly, so outputs are bitwise those of float32 storage.
        embed = p.embed.to(torch.bfloat16) if _is_bf16(p.embed) else p.embed
        self.embed, self.norm, self.head = _on(embed, dev), _on(p.norm, dev), _on(p.head, dev)
        self.inv_freq, self.rope_factor = _on(p.inv_freq, dev), p.rope_factor
        self.layers: list[_Layer] = []
        moe = []
        for layer in p.layers:
            # The first q projection and kv_a live on only as their fused copy w_in.
            w_in, kv_at = _concat(layer.attn.q_a if layer.attn.q_a is not None else layer.attn.q, layer.attn.kv_a)
            w_in = w_in.to(dev)
            a = _on(layer.attn._replace(q_a=None, q=None, kv_a=None), dev)
            ex = layer.experts
            self.layers.append(_Layer(
                _on(layer.input_norm, dev), _on(layer.post_attention_norm, dev), a, w_in, kv_at,
                _on(layer.mlp, dev), len(moe) if ex is not None else None,
                None if ex is None else _on(ex.gate, dev), None if ex is None else _on(ex.bias, dev)))
            if ex is not None:
                moe.append(ex)
        self.n_moe = len(moe)
        self.store: ExpertStore | None = None
        if not moe:
            return
        E, I, H, Lm = self.rule.n_experts, self.config.moe_intermediate_size, self.config.hidden_size, len(moe)
        self.E, self.I = E, I
        h8, n13, i8 = _pad8(H), _pad8(2 * I), _pad8(I)
        self.h8, self.n13 = h8, n13
        self.e13s = torch.empty((Lm, E, n13), device=dev)
        self.e2s = torch.empty((Lm, E, h8), device=dev)
        for m, ex in enumerate(moe):
            self.e13s[m] = F.pad(ex.s13.to(dev), (0, n13 - 2 * I), value=1.0)
            self.e2s[m] = F.pad(ex.s2.to(dev), (0, h8 - H), value=1.0)
        self.expert_bytes = int(h8 * n13 + i8 * h8 + 4 * (n13 + h8))
        if cache_slots is not None:
            # Streaming: the experts stay where the model holds them (a package loaded with
            # mmap=True: its memory-mapped files) and are copied into padded slots on demand.
            self.store = ExpertStore([ex.w13 for ex in moe], [ex.w2 for ex in moe], slots=cache_slots,
                                     device=dev, slot_shapes=((h8, n13), (i8, h8)))
            self.e13 = self.e2 = None
            return
        # One layer at a time into the final tensors, so loading needs one layer of headroom.
        # w13 as [Lm, H8, E, N8], so gate/up of all experts of a layer is one [H8, E*N8] GEMM
        # for the torch backend and a strided [E, H8, N8] view for the grouped kernel.
        self.e13 = torch.empty((Lm, h8, E, n13), dtype=torch.int8, device=dev)
        self.e2 = torch.empty((Lm, E, i8, h8), dtype=torch.int8, device=dev)
        for m, ex in enumerate(moe):
            self.e13[m] = _pad_last2(ex.w13.to(dev), h8, n13).permute(1, 0, 2)
            self.e2[m] = _pad_last2(ex.w2.to(dev), i8, h8)

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
        # After a step the active slots' rows are gathered on the device and only they are
        # copied to the host (n rows of the vocabulary, not all R).
        self._sel = torch.zeros(R, cfg.vocab_size, device=dev)
        self._sel_idx = torch.zeros(R, dtype=torch.int64, device=dev)
        self._tok_h, self._act_h, self._idx_h = host(R, torch.int64), host(R, torch.bool), host(R, torch.int64)
        self._tok_np, self._act_np, self._idx_np = self._tok_h.numpy(), self._act_h.numpy(), self._idx_h.numpy()
        self._logits_h = host((R, cfg.vocab_size), torch.float32)
        self._logits_np = self._logits_h.numpy()
        self._rows_np = np.zeros(0, np.int64)
        if self.adapter is not None:
            a = _on(self.adapter, dev)
            self.in_w, self.in_b, self.in_mean, self.in_std = a.in_w, a.in_b, a.in_mean, a.in_std
            self.out_w, self.out_b, self.out_mean, self.out_std = a.out_w, a.out_b, a.out_mean, a.out_std
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
            k, A = self.rule.top_k, R * self.rule.top_k
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
        self._idx_np[:n] = slots
        self.tok.copy_(self._tok_h, non_blocking=True)
        self.act.copy_(self._act_h, non_blocking=True)
        self._sel_idx.copy_(self._idx_h, non_blocking=True)
        self._run("tokens")
        torch.index_select(self.logits, 0, self._sel_idx[:n], out=self._sel[:n])
        self._logits_h[:n].copy_(self._sel[:n])
        return self._logits_np[:n]

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
        eps = self.config.rms_norm_eps
        if kind == "tokens":
            x = self.embed[self.tok].float()
        else:
            x = F.linear((self.feats - self.in_mean) / self.in_std, self.in_w, self.in_b)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_factor, self.pos)
        widx = self.pos % self.window
        n_valid = torch.clamp(self.pos + 1, max=self.window)
        mask = torch.zeros(self.rows, self.window, device=self.device).masked_fill_(
            self.win[None, :] >= n_valid[:, None], float("-inf"))
        for li, layer in enumerate(self.layers):
            x = decoder_layer(x, partial(self._attention, li, layer, cos=cos, sin=sin, widx=widx, mask=mask),
                              partial(self._feed_forward, li, layer), layer.input_norm, layer.post_norm, eps)
        h = rms_norm(x, self.norm, eps)
        if kind == "tokens":
            self.logits.copy_(int8_linear(h, self.head))
        else:
            self.outputs.copy_(F.linear(h, self.out_w, self.out_b) * self.out_std + self.out_mean)
        self.pos.add_(self.act.long())

    def _feed_forward(self, li: int, layer: _Layer, h, x):
        """The dense MLP, or the MoE, of rows ``h`` (post-norm of ``x``)."""
        if layer.moe is None:
            hq, hs = quantize_activation(h)
            return swiglu_int8(hq, hs, layer.mlp.w13, layer.mlp.w2)
        return self._moe(li, layer, x, h)

    def _attention(self, li: int, layer: _Layer, h, cos, sin, widx, mask):
        """MLA of rows ``h``: the projections (the first q projection and kv_a fused in one GEMM),
        the new cache entries written into the ring buffers, then the model's absorbed form."""
        cfg, a = self.config, layer.attn
        nh, nope, rope, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        R = self.rows
        hq, hs = quantize_activation(h)
        y = qlinear(hq, hs, layer.w_in)
        kv = y[:, layer.kv_at:layer.kv_at + C + rope]
        if a.q_b is not None:
            q = int8_linear(rms_norm(y[:, :cfg.q_lora_rank], a.q_a_norm, LORA_NORM_EPS), a.q_b)
        else:
            q = y[:, :nh * (nope + rope)]
        q = q.reshape(R, nh, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        q_pe = apply_rope(q_pe, cos.unsqueeze(1), sin.unsqueeze(1), cfg.rope_interleave)
        latent = rms_norm(kv[:, :C], a.kv_a_norm, LORA_NORM_EPS)
        k_pe = apply_rope(kv[:, C:], cos, sin, cfg.rope_interleave)
        lat, pe = self.lat[li], self.pe[li]
        act = self.act[:, None]
        # Inactive rows write their old entry back: their ring buffers never change.
        lat[self.ar, widx] = torch.where(act, latent, lat[self.ar, widx])
        pe[self.ar, widx] = torch.where(act, k_pe, pe[self.ar, widx])
        return int8_linear(absorbed_attention(q_nope, q_pe, a.w_uk, a.w_uv, lat, pe, mask, cfg.softmax_scale), a.o)

    def _moe(self, li: int, layer: _Layer, x, h):
        """The MoE output for rows ``h`` (post-norm of ``x``): routed sum, then shared experts."""
        m, H = layer.moe, self.config.hidden_size
        hq, hs = quantize_activation(h)
        hq = _pad_cols(hq, self.h8)
        ids, wts = gate_route(h, layer.gate, layer.bias, self.rule)
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
        out = combine_experts(y[:, :, :H], wts)
        if layer.mlp is not None:
            out = out + swiglu_int8(hq, hs, layer.mlp.w13, layer.mlp.w2)
        return out

    def _experts_all(self, m, hq, hs, ids):
        """Every expert over every row (static), then the chosen pairs: [R, k, H8]."""
        R, E, I = self.rows, self.E, self.I
        acc13 = int8_mm(hq, self.e13[m].view(self.h8, E * self.n13)).view(R, E, self.n13)
        mq, ms = swiglu_requant(acc13, hs.unsqueeze(-1), self.e13s[m], I)           # [R, E, I], [R, E, 1]
        mq = _pad_cols(mq, self.e2.shape[2]).transpose(0, 1).contiguous()            # [E, R, I8]
        acc2 = torch.stack([int8_mm(mq[e], self.e2[m, e]) for e in range(E)])       # [E, R, H8]
        sel = ids.clamp(max=E - 1)
        rows = self.ar[:, None]
        return acc2[sel, rows].float() * ms[rows, sel] * self.e2s[m][sel]

    def _experts_grouped(self, m, hq, hs, ids_null, counts, w13, w2, slots):
        """Assignments sorted by expert, grouped int8 GEMMs over active experts only: [R, k, H8]."""
        R, E, k = self.rows, self.E, self.rule.top_k
        flat = ids_null.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        self.offsets[1:] = torch.cumsum(counts[:E], 0, dtype=torch.int32)
        token = torch.div(order, k, rounding_mode="floor")
        grouped_int8_mm(hq, token.to(torch.int32), self.offsets, slots, w13, self.acc13, gather=True,
                        block_m=self.block_m)
        expert = flat[order].clamp(max=E - 1)
        mq, ms = swiglu_requant(self.acc13, hs[token], self.e13s[m][expert], self.I)
        mq = _pad_cols(mq, w2.shape[1])
        grouped_int8_mm(mq, self.ar_a, self.offsets, slots, w2, self.acc2, gather=False, block_m=self.block_m)
        y = self.acc2.float() * ms * self.e2s[m][expert]
        where = torch.empty_like(order)
        where[order] = self.ar_a
        return y[where.view(R, k)]

    def _experts_streamed(self, li, m, x, hq, hs, ids_null, counts):
        """Experts from the store's device cache (host-synchronised; see the module docstring)."""
        store, E = self.store, self.E
        nxt = m + 1 < self.n_moe
        if nxt:    # pre-gating: the next MoE layer's router on the current hidden state
            nl = self.layers[li + 1]
            guess, _ = gate_route(rms_norm(x, nl.post_norm, self.config.rms_norm_eps), nl.gate, nl.bias, self.rule)
            both = torch.cat([ids_null, guess]).cpu().numpy()
            cur, guess = both[:self.rows], both[self.rows:][self._rows_np]
        else:
            cur = ids_null.cpu().numpy()
        needed = np.unique(cur[cur < E])
        needed = sorted(needed.tolist(), key=lambda e: store.slot_of(m, e) is None)   # hits first
        waves = [needed[i:i + store.slots] for i in range(0, len(needed), store.slots)]
        y = self.yk
        for wave in waves:
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
                    mq, ms = swiglu_requant(int8_mm(hq[r], store.w13_cache[slot]), hs[r], self.e13s[m, e], self.I)
                    acc2 = int8_mm(_pad_cols(mq, store.w2_cache.shape[1]), store.w2_cache[slot])
                    y[r, j] = acc2.float() * ms * self.e2s[m, e]
            store.release(slots)
        return y

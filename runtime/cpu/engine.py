"""The deterministic stream engine on the CPU: :class:`Engine` holds fixed-capacity stream
slots, one token per stream per step (or a stream's whole history in one chunked pass), and
runs each step as one Numba call of ``runtime.cpu.kernels`` (where the kernels, and why they
are batch-invariant and fast, are described).

It is a backend of the model's definition (``runtime.model.transformer``), checked against it
by the tests. This module turns a model's packed weights (``runtime.model.packing.pack_int8``)
into the kernels' numpy layout and checks a step's inputs.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.cpu.int8 import pack_blocked, padded16, padded_k
from runtime.cpu.kernels import (BAD_COUNT, BAD_SLOTS, PREFILL_SENSOR, PREFILL_TOKENS, STEP_SENSOR, STEP_TOKENS,
                                 run_pass)
from runtime.cpu.state import (F32, PREFILL_ROWS, AdapterWeights, AttnWeights, Buffers, Dims, MlpWeights,
                               MoeWeights, Weights, buffer_shapes, new_state)
from runtime.model.config import LORA_NORM_EPS
from runtime.model.packing import PackedMLP, pack_int8
from runtime.model.quant import QWeight
from runtime.model.routing import RouteBuffers, RoutingRule
from runtime.model.transformer import Transformer

__all__ = ["Engine", "PREFILL_ROWS", "buffer_shapes"]


# ----------------------------------------------------------------------------------------
# From packed torch weights to the engine's numpy layout.

def _np(t: torch.Tensor, dtype=F32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def _blocked(pairs: list[tuple[torch.Tensor, torch.Tensor]], n: int, k: int, shape: tuple | None = None) -> tuple:
    """int8 weights (rows [n, k], scales [n]) blocked and stacked: ([*shape, Nb, K4 * 64], row sums
    [*shape, Nb * 16], scales [*shape, Nb * 16]), ``shape`` = (len(pairs),) unless given (the
    pairs fill it in C order). Each is packed straight into the preallocated stacks, so loading
    never holds a second stacked copy; empty stacks keep the shape."""
    shape = (len(pairs),) if shape is None else shape
    nb, k4 = -(-n // 16), padded_k(k) // 4
    out = (np.empty((*shape, nb, k4 * 64), np.int8), np.empty((*shape, nb * 16), np.int32),
           np.empty((*shape, nb * 16), F32))
    for i, (q, s) in enumerate(pairs):
        at = np.unravel_index(i, shape)
        for o, part in zip(out, pack_blocked(_np(q, np.int8), _np(s))):
            o[at] = part
    return out


def _rows(ws: list[QWeight], n: int, k: int) -> tuple[np.ndarray, ...]:
    """QWeights (each [n, k]) blocked and stacked, as :func:`_blocked`."""
    return _blocked([w.rows() for w in ws], n, k)


def _padded_stack(ts: list[torch.Tensor], dims: int = 1) -> np.ndarray:
    """float32 tensors of one shape stacked into one preallocated array, each zero-padded in its
    last ``dims`` axes to whole 16-lane vectors (filled one at a time: no second copy)."""
    first = tuple(ts[0].shape)
    out = np.zeros((len(ts), *first[:-dims], *(padded16(n) for n in first[-dims:])), F32)
    for i, t in enumerate(ts):
        out[(i, *(slice(0, n) for n in first))] = t.detach().cpu().numpy()
    return out


def _norms(ts: list, n: int) -> np.ndarray:
    return np.stack([_np(t) for t in ts]) if ts else np.zeros((0, n), F32)


def _mlps(mlps: list[PackedMLP], hidden: int, inter: int) -> MlpWeights:
    return MlpWeights(*_rows([m.w13 for m in mlps], 2 * inter, hidden), *_rows([m.w2 for m in mlps], hidden, inter))


def _experts(layers: list, key: str, n: int, k: int, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """Routed experts lo..hi-1 of every MoE layer, ``w13`` or ``w2``, blocked: ([M, hi - lo, Nb, K4 * 64], ...)."""
    weights = [(e.w13, e.s13) if key == "w13" else (e.w2, e.s2) for e in layers]
    pairs = [(q[i].T, s[i]) for q, s in weights for i in range(lo, hi)]
    return _blocked(pairs, n, k, (len(layers), hi - lo))


def _i64(a) -> np.ndarray:
    """``a`` as a contiguous int64 array (no copy when it is one): the one type a step compiles for."""
    return np.ascontiguousarray(a, dtype=np.int64)


class Engine:
    """Fixed-capacity stream slots over a DeepSeek model, stepped one token per stream.

    ``step_tokens`` (LM mode) and ``step_sensor`` (sensor mode, needs the model's I/O adapter)
    return views into preallocated output buffers, valid until the next step: copy what you
    keep. A stream's results are bitwise identical whatever other slots share its step.
    ``prefill`` appends a stream's whole history in passes of up to ``prefill_rows`` positions,
    leaving the very cache that stepping it would.

    ``experts=(lo, hi)`` keeps only routed experts lo..hi-1 of every MoE layer (one rank's share
    in ``runtime.cpu.parallel``, which drives such an engine's passes stage by stage); the default
    is all of them.
    """

    def __init__(self, model: Transformer, *, capacity: int = 1, window: int = 256,
                 prefill_rows: int = PREFILL_ROWS, experts: tuple[int, int] | None = None):
        if capacity < 1 or window < 1 or prefill_rows < 1:
            raise ValueError(f"capacity, window and prefill_rows must be positive (got {capacity}, {window}, "
                             f"{prefill_rows})")
        cfg = model.config
        n_experts = cfg.n_routed_experts if cfg.n_moe_layers else 0
        self.experts = (0, n_experts) if experts is None else (int(experts[0]), int(experts[1]))
        if not 0 <= self.experts[0] <= self.experts[1] <= n_experts:
            raise ValueError(f"experts={experts}: not a range within the {n_experts} routed experts")
        self.partial = self.experts != (0, n_experts)
        if cfg.attention_bias:
            raise ValueError("the stream engine does not support attention_bias=True checkpoints")
        self.config, self.capacity, self.window = cfg, capacity, window
        self.rows = max(capacity, prefill_rows)
        packed = pack_int8(model)
        self.adapter = packed.adapter
        self.input_names = list(self.adapter.input_names) if self.adapter is not None else []
        self.output_names = list(self.adapter.output_names) if self.adapter is not None else []
        # A model without MoE layers never routes; its rule only sizes empty buffers.
        self.rule = packed.rule or RoutingRule(False, False, False, 2, 1, 1, 1, False, 1.0)
        self.weights, self.dims = self._load(packed)
        self.buffers = self._allocate()
        self.route_buffers = RouteBuffers.allocate(self.rule, self.rows)
        self.state = new_state(self.buffers, self.weights, self.rule, self.route_buffers, self.dims)
        self.pos, self.logits, self.outputs = self.buffers.pos, self.buffers.logits, self.buffers.outputs
        self._no_tokens = np.zeros(0, np.int64)
        self._no_feats = np.zeros((0, self.buffers.feats.shape[1]), F32)
        if not self.partial:
            self._warmup()

    # -- set-up --------------------------------------------------------------------------
    def _load(self, p) -> tuple[Weights, Dims]:
        cfg = self.config
        H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
        qr, qd = cfg.q_lora_rank or 1, nh * cfg.qk_head_dim
        attn = [layer.attn for layer in p.layers]
        lora = cfg.q_lora_rank is not None
        aw = AttnWeights(*_rows([a.q_a for a in attn] if lora else [], qr, H),
                         _norms([a.q_a_norm for a in attn] if lora else [], qr),
                         *_rows([a.q_b for a in attn] if lora else [], qd, qr),
                         *_rows([] if lora else [a.q for a in attn], qd, H),
                         *_rows([a.kv_a for a in attn], C + R, H), _norms([a.kv_a_norm for a in attn], C),
                         _padded_stack([a.w_uk for a in attn]),
                         _padded_stack([a.w_uv.transpose(1, 2) for a in attn], 2),
                         *_rows([a.o for a in attn], H, nh * cfg.v_head_dim), _np(p.inv_freq))
        dense = _mlps([layer.mlp for layer in p.layers if layer.experts is None], H, cfg.intermediate_size)
        moe = [layer for layer in p.layers if layer.experts is not None]
        E, I, Is = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        has_shared = bool(moe) and moe[0].mlp is not None
        experts = [layer.experts for layer in moe]
        # Each layer's experts are transposed straight into the stacked arrays: loading holds the
        # engine's copy plus nothing (the model's own tensors are the caller's to drop).
        mw = MoeWeights(
            np.stack([_np(e.gate.T) for e in experts]) if moe else np.zeros((0, H, E), F32),
            (np.stack([_np(e.bias) if e.bias is not None else np.zeros(E, F32) for e in experts]) if moe
             else np.zeros((0, E), F32)),
            *_experts(experts, "w13", 2 * I, H, *self.experts), *_experts(experts, "w2", H, I, *self.experts),
            has_shared,
            _mlps([layer.mlp for layer in moe] if has_shared else [], H, max(Is, 1)))
        head_q, head_r, head_s = _rows([p.head], cfg.vocab_size, H)
        a = p.adapter
        if a is not None:
            adapter = AdapterWeights(*(_np(t) for t in (a.in_w, a.in_b, a.in_mean, a.in_std, a.out_w, a.out_b,
                                                         a.out_mean, a.out_std)))
        else:
            adapter = AdapterWeights(np.zeros((H, 1), F32), *(np.zeros(1, F32) for _ in range(3)),
                                     np.zeros((1, H), F32), *(np.zeros(1, F32) for _ in range(3)))
        weights = Weights(_np(p.embed), _norms([layer.input_norm for layer in p.layers], H),
                          _norms([layer.post_attention_norm for layer in p.layers], H), aw, dense, mw,
                          _np(p.norm), head_q[0], head_r[0], head_s[0], adapter)
        dims = Dims(cfg.num_hidden_layers, cfg.first_k_dense_replace, self.window, nh, cfg.qk_nope_head_dim,
                    R, cfg.v_head_dim, C, F32(cfg.softmax_scale), F32(cfg.rms_norm_eps), F32(LORA_NORM_EPS),
                    lora, bool(cfg.rope_interleave), F32(p.rope_factor), self.capacity, self.rows,
                    cfg.intermediate_size, I, max(Is, 1), *self.experts)
        return weights, dims

    def _allocate(self) -> Buffers:
        arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in buffer_shapes(
            self.config, capacity=self.capacity, window=self.window, rows=self.rows, top_k=self.rule.top_k,
            n_experts=self.rule.n_experts, n_inputs=len(self.input_names),
            n_outputs=len(self.output_names)).items()}
        # The int8 activations as int32 words (the GEMMs' view) and the exp bits as float32.
        views = {"xq32": arrays["xq"].view(np.int32), "midq32": arrays["midq"].view(np.int32),
                 "escale": arrays["ebits"].view(F32)}
        return Buffers(**arrays, **views)

    def _warmup(self) -> None:
        """Compile every kernel now (or load it from the on-disk cache), then clear the state."""
        slot = np.zeros(1, np.int64)
        if self.adapter is not None:
            self.step_sensor(slot, np.zeros((1, len(self.input_names)), F32))
            self.prefill(0, np.zeros((2, len(self.input_names)), F32))
        self.step_tokens(slot, np.zeros(1, np.int64))
        self.prefill(0, np.zeros(2, np.int64))
        self.reset_all()

    # -- state ---------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s history (a new stream starts at position 0)."""
        b = self.buffers
        b.pos[slot] = 0
        b.keys[:, slot] = 0
        b.vals[:, slot] = 0

    def reset_all(self) -> None:
        """Forget every slot's history."""
        b = self.buffers
        b.pos[:] = 0
        b.keys[:] = 0
        b.vals[:] = 0

    def positions(self) -> np.ndarray:
        """Tokens seen so far by each slot."""
        return self.pos.copy()

    # -- steps ---------------------------------------------------------------------------
    def _run(self, mode: int, slots: np.ndarray, tokens: np.ndarray, feats: np.ndarray) -> int:
        """One step or prefill (``run_pass``); an error code. A share of the experts alone cannot."""
        if self.partial:
            raise RuntimeError(f"this engine holds routed experts {self.experts[0]}..{self.experts[1] - 1} of "
                               f"{self.rule.n_experts} only: run it through runtime.cpu.parallel")
        return run_pass(self.state, mode, slots, tokens, feats)

    def _raise(self, err: int, slots, what: str) -> None:
        if err == BAD_COUNT:
            raise ValueError(f"a step takes 1..{self.capacity} slots, got {len(slots)}")
        if err == BAD_SLOTS:
            raise ValueError(f"slot ids must be distinct and in 0..{self.capacity - 1}, got {list(np.atleast_1d(slots))}")
        raise ValueError(what)

    def step_tokens(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append token ``tokens[i]`` to slot ``slots[i]``; returns logits [n, vocab] (a view)."""
        slots, tokens = _i64(slots), np.asarray(tokens)
        if slots.ndim != 1 or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"slots and tokens must be 1-D integer arrays, got {slots.shape} and {tokens.shape} "
                             f"{tokens.dtype}")
        err = self._run(STEP_TOKENS, slots, _i64(tokens), self._no_feats)
        if err:
            self._raise(err, slots, f"tokens must be {len(slots)} ids in 0..{self.config.vocab_size - 1}")
        return self.logits[:len(slots)]

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Append one frame per slot (features [n, F] in ``input_names`` order, engineering
        units); returns outputs [n, O] in ``output_names`` order (a view)."""
        if self.adapter is None:
            raise ValueError("this model has no I/O adapter: sensor steps need a sensor-mode package")
        slots, features = np.ascontiguousarray(slots, dtype=np.int64), np.ascontiguousarray(features, dtype=F32)
        if slots.ndim != 1 or features.ndim != 2:
            raise ValueError(f"features must be [{len(slots)}, {len(self.input_names)}], got {features.shape}")
        err = self._run(STEP_SENSOR, slots, self._no_tokens, features)
        if err:
            self._raise(err, slots, f"features must be [{len(slots)}, {len(self.input_names)}], got {features.shape}")
        return self.outputs[:len(slots)]

    def prefill(self, slot: int, inputs: np.ndarray) -> np.ndarray:
        """Append a stream's history to ``slot`` in one chunked pass: token ids [T] (LM mode) or
        frames [T, F] in ``input_names`` order (sensor mode). The slot's cache and position end
        bitwise as T single steps would leave them; returns the last position's logits [vocab]
        or outputs [O] (a view, valid until the next step)."""
        inputs = np.asarray(inputs)
        slot = int(slot)
        if inputs.ndim == 1 and inputs.dtype.kind in "iu":
            err = self._run(PREFILL_TOKENS, np.array([slot]), _i64(inputs), self._no_feats)
            out, what = self.logits[0], f"tokens must be at least one id in 0..{self.config.vocab_size - 1}"
        elif inputs.ndim == 2:
            if self.adapter is None:
                raise ValueError("this model has no I/O adapter: sensor frames need a sensor-mode package")
            err = self._run(PREFILL_SENSOR, np.array([slot]), self._no_tokens,
                            np.ascontiguousarray(inputs, dtype=F32))
            out, what = self.outputs[0], f"frames must be [T >= 1, {len(self.input_names)}], got {inputs.shape}"
        else:
            raise ValueError(f"prefill takes token ids [T] or sensor frames [T, F], got {inputs.dtype} {inputs.shape}")
        if err:
            self._raise(err, [slot], what)
        return out

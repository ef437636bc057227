"""What a CPU engine step works on, named: the step's sizes (:class:`Dims`), the weights in the
kernels' layout (:class:`Weights` and its parts), the preallocated :class:`Buffers`
(:func:`buffer_shapes` gives their sizes, which the planner counts) and the :class:`State`
that holds them together for the Numba entry points of ``runtime.cpu.kernels``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.experimental import structref

from runtime.cpu.int8 import padded16, padded_k

F32 = np.float32
PREFILL_ROWS = 256         # default rows of one prefill pass (an engine's rows: at least these)


class Dims(NamedTuple):
    """The step's sizes and scalars (``capacity`` stream slots, ``rows`` per pass, the
    intermediate sizes of the dense, routed and shared SwiGLU blocks, the routed experts
    ``expert_lo`` .. ``expert_hi - 1`` this engine holds)."""
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
    capacity: int
    rows: int
    inter_dense: int
    inter_moe: int
    inter_shared: int
    expert_lo: int
    expert_hi: int


class AttnWeights(NamedTuple):
    """MLA weights of every layer, stacked. Each int8 projection ``*_q`` [L, Nb, K4 * 64] is
    blocked (``runtime.cpu.int8``) with its row sums ``*_r`` and scales ``*_s`` [L, Nb * 16].
    Without a q low rank ``q_a_*``/``q_b_*`` are empty, else ``q_*`` is. ``w_uk`` [L, heads,
    nope, C16] and ``w_uvt`` [L, heads, C16, v16] are the absorbed ``kv_b_proj`` halves
    (float32; ``C16``, ``v16``: zero-padded to whole 16-lane vectors)."""
    q_a_q: np.ndarray
    q_a_r: np.ndarray
    q_a_s: np.ndarray
    q_a_norm: np.ndarray
    q_b_q: np.ndarray
    q_b_r: np.ndarray
    q_b_s: np.ndarray
    q_q: np.ndarray
    q_r: np.ndarray
    q_s: np.ndarray
    kv_a_q: np.ndarray
    kv_a_r: np.ndarray
    kv_a_s: np.ndarray
    kv_a_norm: np.ndarray
    w_uk: np.ndarray
    w_uvt: np.ndarray
    o_q: np.ndarray
    o_r: np.ndarray
    o_s: np.ndarray
    inv_freq: np.ndarray


class MlpWeights(NamedTuple):
    """SwiGLU blocks stacked and blocked: ``w13`` [L, ...] (rows gate | up), ``w2`` [L, ...]."""
    w13_q: np.ndarray
    w13_r: np.ndarray
    w13_s: np.ndarray
    w2_q: np.ndarray
    w2_r: np.ndarray
    w2_s: np.ndarray


class MoeWeights(NamedTuple):
    """Per MoE layer: router ``gate_t`` float32 [H, E] and ``bias`` [E]; the routed experts held
    (``Dims.expert_lo`` on, all E in one process) blocked ``w13_*`` [M, held, ...], ``w2_*``
    [M, held, ...]; shared experts (when ``has_shared``)."""
    gate_t: np.ndarray
    bias: np.ndarray
    w13_q: np.ndarray
    w13_r: np.ndarray
    w13_s: np.ndarray
    w2_q: np.ndarray
    w2_r: np.ndarray
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
    attention, dense MLPs, MoE, the final norm, the blocked int8 head and the adapter."""
    embed: np.ndarray
    input_norm: np.ndarray
    post_norm: np.ndarray
    attn: AttnWeights
    dense: MlpWeights
    moe: MoeWeights
    norm: np.ndarray
    head_q: np.ndarray
    head_r: np.ndarray
    head_s: np.ndarray
    adapter: AdapterWeights


class Buffers(NamedTuple):
    """Preallocated scratch. Row i of a pass serves slot ``rows[i]`` at position ``rpos[i]``
    (a step: distinct slots; a prefill: one slot at successive positions). The latent ring
    buffers ``vals`` [L, S, W, C16] and ``keys`` [L, S, C + R, W16] (``*16``: zero-padded to
    whole 16-lane vectors), the slots' positions ``pos``
    [S], the pass's inputs (``tokens``, ``feats``) and outputs (``logits``, ``outputs``).
    ``xq``/``midq`` hold int8 activations offset to uint8 (``xq32``/``midq32``: the same
    memory as int32 words, as the GEMMs read it) with scales ``xs``/``ms``. The scores'
    scratch (``scores``, ``scores2``, ``lanes``) holds one row: rows attend one after another."""
    rows: np.ndarray
    rpos: np.ndarray
    seen: np.ndarray
    tokens: np.ndarray
    feats: np.ndarray
    logits: np.ndarray
    outputs: np.ndarray
    x: np.ndarray
    h: np.ndarray
    xq: np.ndarray
    xq32: np.ndarray
    xs: np.ndarray
    q: np.ndarray
    kv: np.ndarray
    q_low: np.ndarray
    qabs: np.ndarray
    scores: np.ndarray
    scores2: np.ndarray
    ctx: np.ndarray
    vout: np.ndarray
    attn_out: np.ndarray
    rope_cos: np.ndarray
    rope_sin: np.ndarray
    ebits: np.ndarray
    escale: np.ndarray
    lanes: np.ndarray
    eout: np.ndarray
    mid: np.ndarray
    midq: np.ndarray
    midq32: np.ndarray
    ms: np.ndarray
    acc: np.ndarray
    shared_out: np.ndarray
    yout: np.ndarray
    router_logits: np.ndarray
    keys: np.ndarray
    vals: np.ndarray
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


@njit(cache=True, error_model="numpy")
def new_state(buffers, weights, rule, route, dims):
    """A :class:`State` built in compiled code: cached on disk, where ``State(...)`` from Python
    compiles its constructor afresh in every process (seconds for these types)."""
    return State(buffers, weights, rule, route, dims)


def buffer_shapes(cfg, *, capacity: int, window: int, rows: int, top_k: int, n_experts: int,
                  n_inputs: int, n_outputs: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of every array in :class:`Buffers` that owns memory (the int32/float32
    views ``xq32``, ``midq32``, ``escale`` share it), for an engine of ``capacity`` slots,
    ``window`` positions and ``rows`` rows per pass. The planner (``sdk.tools.plan``) counts these."""
    S, W, N = capacity, window, rows
    H, C, R, nh = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    Cp, Wp = padded16(C), padded16(W)
    widest = padded_k(max(H, cfg.q_lora_rank or 0, nh * cfg.v_head_dim))
    inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1))
    A = max(N * top_k, N)                 # (token, expert) assignments of a pass
    i64, u8, i32, f32 = np.int64, np.uint8, np.int32, F32
    return {
        "rows": ((N,), i64), "rpos": ((N,), i64), "seen": ((S,), np.bool_), "tokens": ((N,), i64),
        "feats": ((N, max(n_inputs, 1)), f32), "logits": ((N, cfg.vocab_size), f32),
        "outputs": ((N, max(n_outputs, 1)), f32), "x": ((N, H), f32), "h": ((N, H), f32),
        "xq": ((N, widest), u8), "xs": ((N,), f32), "q": ((N, nh * cfg.qk_head_dim), f32),
        "kv": ((N, C + R), f32), "q_low": ((N, cfg.q_lora_rank or 1), f32), "qabs": ((N, nh, Cp), f32),
        "scores": ((nh, Wp), f32), "scores2": ((nh, Wp), f32), "ctx": ((N, nh, Cp), f32),
        "vout": ((N, nh, padded16(cfg.v_head_dim)), f32), "attn_out": ((N, nh * cfg.v_head_dim), f32),
        "rope_cos": ((N, R // 2), f32), "rope_sin": ((N, R // 2), f32), "ebits": ((A, max(Wp, inter)), i32),
        "lanes": ((16,), f32), "eout": ((A, inter), f32), "mid": ((A, 2 * inter), f32),
        "midq": ((A, padded_k(inter)), u8), "ms": ((A,), f32), "acc": ((A, 32), i32),
        "shared_out": ((N, H), f32), "yout": ((N * top_k, H), f32), "router_logits": ((N, n_experts), f32),
        "keys": ((cfg.num_hidden_layers, S, C + R, Wp), f32), "vals": ((cfg.num_hidden_layers, S, W, Cp), f32),
        "pos": ((S,), i64),
    }

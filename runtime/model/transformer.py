"""DeepSeek-V3/R1 (and the V2 family) in plain PyTorch: MLA attention, the MoE with the
routing rule of ``runtime.model.routing``, YaRN RoPE, greedy generation. This is the definition of
the model's float math; the engines are backends checked against it.

Parameter names follow the Hugging Face layout (``model.layers.N.self_attn.q_a_proj.weight`` ...)
except routed experts, which are stacked per layer as ``mlp.experts.gate_up_proj`` [E, 2I, H]
and ``mlp.experts.down_proj`` [E, H, I] (the transformers-5 in-memory layout).

The blocks take their weights through one seam, :class:`Weights` (``linear(name, x, rows)``
and ``vector(name)``): a module serves its own parameters (:class:`ModuleWeights`), and the
compression pass serves weights streamed from a checkpoint, so the functions below
(:func:`decoder_layer`, :func:`mla_inputs` / :func:`mla_heads` / :func:`mla_attend`,
:func:`absorbed_attention`, :func:`gate_route`, :func:`reference_experts`, :func:`swiglu`) are
the one composition of the layer that every torch path runs.

Two attention forms: the naive one expands the latent into per-head keys and values (used
for full-sequence forward and prefill); the absorbed one folds ``kv_b_proj`` into the query
and the output, so decode reads only the cached latent (``kv_lora_rank``) and the shared
rotary key (``qk_rope_head_dim``) per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model.config import LORA_NORM_EPS, ModelConfig, yarn_mscale
from runtime.model.quant import RoutedExperts, silu_mul
from runtime.model.routing import RoutingRule, route_torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dim, computed in float32 (as the reference does)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding (YaRN-corrected when scaling is on) and
    the factor applied to cos/sin (YaRN's mscale ratio; 1.0 otherwise)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if not rs:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    orig_max = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all)
                            else yarn_mscale(factor))
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, factor: float, positions: torch.Tensor):
    """cos and sin tables [..., rope_dim/2] (float32) for integer ``positions`` of any shape.

    Angles are formed in float64: a control loop's stream position grows without bound
    (10^7 after three hours at 1 kHz), where a float32 angle would be off by up to half a
    radian; in float64 the relative rotation between cached keys and the query stays exact
    enough for as long as a plant runs.
    """
    freqs = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64)
    return (freqs.cos() * factor).float(), (freqs.sin() * factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate ``x`` [..., rope_dim]; cos/sin broadcast against x[..., :rope_dim/2].

    With ``interleave`` the pairs are (x0,x1),(x2,x3)...; the result is laid out as
    [rotated evens, rotated odds] for queries and keys alike, so dot products are unchanged.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Weights(Protocol):
    """The one seam through which the model's blocks get their weights: ``linear(name, x,
    rows)`` is ``x @ W[rows].T`` (+ bias) for the weight called ``name`` (float32 or the int8
    rule, as the weight is stored), ``vector(name)`` a norm weight. :class:`ModuleWeights`
    serves a module's own parameters; ``sdk.tools.streamed`` serves weights streamed from a
    checkpoint, so the calibration pass runs these very functions."""

    def linear(self, name: str, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def vector(self, name: str) -> torch.Tensor: ...


class ModuleWeights:
    """:class:`Weights` of an ``nn.Module``: ``linear(name, x)`` runs its submodule ``name``
    (``rows`` slices the output rows of a float ``nn.Linear``); ``vector(name)`` is the
    parameter ``name``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def linear(self, name: str, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        m = self.module.get_submodule(name)
        if rows is None:
            return m(x)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name}: only a float linear layer serves a slice of its output rows")
        bias = None if m.bias is None else m.bias[rows[0]:rows[1]]
        return F.linear(x, m.weight[rows[0]:rows[1]], bias)

    def vector(self, name: str) -> torch.Tensor:
        return self.module.get_parameter(name)


def swiglu(w: Weights, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The SwiGLU block (dense MLP, shared or routed expert): ``down(silu(gate(x)) * up(x))``,
    with ``silu_mul`` (its bits do not depend on where a row sits in the batch)."""
    return w.linear(prefix + "down_proj", silu_mul(w.linear(prefix + "gate_proj", x), w.linear(prefix + "up_proj", x)))


def decoder_layer(x: torch.Tensor, attention, feed_forward, input_norm: torch.Tensor, post_norm: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """The decoder layer, composed here once for every torch path (the model, the device engine,
    the calibration pass): pre-norm attention, then pre-norm feed-forward, each added to the
    residual stream. ``attention(h)`` gets the normed rows; ``feed_forward(h, x)`` the normed rows
    and the residual rows ``x`` they were normed from (the streamed device engine pre-gates the
    next layer with them)."""
    x = x + attention(rms_norm(x, input_norm, eps))
    return x + feed_forward(rms_norm(x, post_norm, eps), x)


def mla_inputs(w: Weights, cfg: ModelConfig, x: torch.Tensor):
    """MLA's low-rank step for rows ``x`` [..., H]: the input of the query's head projection
    (``q_a_proj`` then ``q_a_layernorm``, or ``x`` itself without a q low rank), the normed
    latent [..., kv_lora_rank] and the rotary key before rotation [..., qk_rope_head_dim]."""
    if cfg.q_lora_rank is None:
        q_in = x
    else:
        q_in = rms_norm(w.linear("q_a_proj", x), w.vector("q_a_layernorm.weight"), LORA_NORM_EPS)
    latent, k_pe = w.linear("kv_a_proj_with_mqa", x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    return q_in, rms_norm(latent, w.vector("kv_a_layernorm.weight"), LORA_NORM_EPS), k_pe


def mla_queries(w: Weights, cfg: ModelConfig, q_in: torch.Tensor, heads: tuple[int, int] | None = None):
    """Queries [..., g, qk_head_dim] of heads ``heads[0]..heads[1]-1`` (all by default)."""
    qk = cfg.qk_head_dim
    h0, h1 = heads or (0, cfg.num_attention_heads)
    rows = None if heads is None else (h0 * qk, h1 * qk)
    q = w.linear("q_proj" if cfg.q_lora_rank is None else "q_b_proj", q_in, rows)
    return q.unflatten(-1, (h1 - h0, qk))


def mla_heads(w: Weights, cfg: ModelConfig, q_in: torch.Tensor, latent: torch.Tensor,
              heads: tuple[int, int] | None = None):
    """Queries [..., g, qk_head_dim] and expanded keys/values [..., g, qk_nope + v_head_dim] of
    heads ``heads[0]..heads[1]-1`` (all by default: g = num_attention_heads)."""
    kvd = cfg.qk_nope_head_dim + cfg.v_head_dim
    h0, h1 = heads or (0, cfg.num_attention_heads)
    kv = w.linear("kv_b_proj", latent, None if heads is None else (h0 * kvd, h1 * kvd))
    return mla_queries(w, cfg, q_in, heads), kv.unflatten(-1, (h1 - h0, kvd))


def mla_attend(cfg: ModelConfig, q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MLA's naive form for a batch of sequences: queries [B,T,g,qk] (rotated here with cos/sin
    [T or B,T, rope/2]) against expanded keys/values [B,T,g,nope+v] and the rotated rotary key
    [B,T,rope]; ``mask`` additive [T,T]. Returns the heads' context [B,T,g*v]."""
    nope = cfg.qk_nope_head_dim
    q_nope, q_pe = q.split([nope, cfg.qk_rope_head_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), cfg.rope_interleave)
    k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
    scores = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope)
              + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * cfg.softmax_scale
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhst,bthd->bshd", probs, v).flatten(-2)


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                       cache_latent: torch.Tensor, cache_pe: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """MLA's absorbed form for one new token per sequence: ``q_nope`` [B,h,nope] and the rotated
    ``q_pe`` [B,h,rope] against a latent cache [B,L,C] and rotary keys [B,L,rope], ``kv_b_proj``
    folded in as ``w_uk`` [h,nope,C] and ``w_uv`` [h,v,C]; ``mask`` [B,L] additive. Returns the
    heads' context [B, h*v] (the input of ``o_proj``)."""
    q_abs = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    scores = (torch.einsum("bhc,blc->bhl", q_abs, cache_latent)
              + torch.einsum("bhr,blr->bhl", q_pe, cache_pe)) * scale
    if mask is not None:
        scores = scores + mask.unsqueeze(1)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
    ctx = torch.einsum("bhl,blc->bhc", probs, cache_latent)
    return torch.einsum("bhc,hvc->bhv", ctx, w_uv).flatten(1)


def gate_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """The router of a MoE layer on rows x [N,H]: float32 logits ``x @ W.T``, then the routing
    rule in torch ops -> (expert ids [N,k] ascending, weights [N,k] float32)."""
    return route_torch(F.linear(x.float(), weight.float()), bias, rule)


def reference_experts(expert, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                      norms: torch.Tensor | None = None, experts: list[int] | None = None) -> torch.Tensor:
    """The float routed-expert rule: each expert that got tokens (or every one of ``experts``)
    runs once over them (``expert(e, rows)``, in ascending id) and its outputs, times the
    routing weights, are added to its tokens' rows. ``norms`` [N,k], when given, receives each
    chosen expert's output norm (REAP calibration)."""
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist() if experts is None else experts:
        token, slot = torch.where(idx == e)
        y = expert(e, x[token])
        if norms is not None:
            norms[token, slot] = y.float().norm(dim=-1)
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out


class MLA(nn.Module):
    """Multi-head latent attention with a naive (prefill) and an absorbed (decode) form."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.nope, self.rope, self.v_dim = nh, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B,T,nh,nope], [B,T,nh,rope] (rotated) and the new cache entries: latent
        [B,T,C], rotary key [B,T,rope] (rotated)."""
        w = ModuleWeights(self)
        q_in, latent, k_pe = mla_inputs(w, self.cfg, x)
        q_nope, q_pe = mla_queries(w, self.cfg, q_in).split([self.nope, self.rope], dim=-1)
        interleave = self.cfg.rope_interleave
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), interleave)
        k_pe = apply_rope(k_pe, cos, sin, interleave)
        return q_nope, q_pe, latent, k_pe

    def forward_naive(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        """Full-sequence attention over the expanded keys/values; returns (output, latent, k_pe)."""
        w = ModuleWeights(self)
        q_in, latent, k_pe = mla_inputs(w, self.cfg, x)
        k_pe = apply_rope(k_pe, cos, sin, self.cfg.rope_interleave)
        q, kv = mla_heads(w, self.cfg, q_in, latent)
        return self.o_proj(mla_attend(self.cfg, q, kv, k_pe, cos, sin, mask)), latent, k_pe

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [nh, nope, C] and W_UV [nh, v, C] (float)."""
        w = dequantized_weight(self.kv_b_proj).view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def forward_absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         cache_latent: torch.Tensor, cache_pe: torch.Tensor, write_index: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """One new token per sequence (x [B,1,H]) against a latent cache [B,L,C] / [B,L,rope].

        The new entries are written at ``write_index`` [B] before attending; ``mask`` [B,L]
        is additive (0 for valid entries, -inf for empty ones).
        """
        B = x.shape[0]
        q_nope, q_pe, latent, k_pe = self.project(x, cos, sin)
        rows = torch.arange(B, device=x.device)
        cache_latent[rows, write_index] = latent[:, 0]
        cache_pe[rows, write_index] = k_pe[:, 0]
        w_uk, w_uv = self.absorbed_weights()
        ctx = absorbed_attention(q_nope[:, 0], q_pe[:, 0], w_uk, w_uv, cache_latent, cache_pe, mask, self.scale)
        return self.o_proj(ctx.view(B, 1, -1))


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight [out, in] of a linear layer, whether float or int8-quantized."""
    if isinstance(linear, nn.Linear):
        return linear.weight
    return linear.dequantized_weight()


class MLP(nn.Module):
    """SwiGLU feed-forward block (dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(ModuleWeights(self), x)


class Gate(nn.Module):
    """The router of a MoE layer: float32 logits ``x @ W.T``, then the routing rule
    (``runtime.model.routing``) in torch ops. ``e_score_correction_bias`` exists when the rule
    uses one (noaux_tc)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rule = RoutingRule.from_config(cfg)
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.rule.biased:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,H] -> (top-k expert ids [N,k] int64 ascending, weights [N,k] float32)."""
        return gate_route(x, self.weight, self.e_score_correction_bias, self.rule)


def cast_keeping_router_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)``, except that every router (:class:`Gate`) stays float32: routing
    is computed in float32, as the reference does."""
    module = module.to(dtype)
    for m in module.modules():
        if isinstance(m, Gate):
            m.float()
    return module


class Experts(nn.Module):
    """Routed experts stacked per layer: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows x [n,H] -> [n,H]."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(silu_mul(gate, up), self.down_proj[e])


@dataclass
class RoutingRecord:
    """What one MoE layer routed, for calibration: ids/weights [N,k] and each chosen expert's output norm [N,k]."""
    layer: int
    expert_ids: torch.Tensor
    weights: torch.Tensor
    output_norms: torch.Tensor


class MoE(nn.Module):
    """Shared experts plus routed experts chosen by the gate: out = routed sum + shared.

    Float experts run the reference path, a loop over the experts that received tokens;
    quantized ones (:class:`runtime.model.quant.RoutedExperts`) the int8 rule. ``observer``, when
    set, is called with a :class:`RoutingRecord` on every float forward pass (calibration
    uses it; it costs an extra norm per chosen expert).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.gate(flat)
        if isinstance(self.experts, RoutedExperts):
            out = self.experts(flat, idx, weights).to(flat.dtype)
        else:
            out = self._reference_experts(flat, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)

    def _reference_experts(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        norms = torch.zeros_like(weights) if self.observer else None
        out = reference_experts(self.experts.forward_expert, flat, idx, weights, norms)
        if self.observer:
            self.observer(RoutingRecord(self.layer, idx, weights, norms))
        return out


class Block(nn.Module):
    """One decoder layer: pre-norm MLA then pre-norm dense MLP or MoE."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg, layer) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        """Full-sequence step; returns (x, latent, k_pe) so callers can fill a cache."""
        entries = []

        def attention(h):
            out, latent, k_pe = self.self_attn.forward_naive(h, cos, sin, mask)
            entries.extend((latent, k_pe))
            return out

        return (self._layer(x, attention), *entries)

    def decode(self, x, cos, sin, cache_latent, cache_pe, write_index, mask):
        """One-token step against this layer's latent cache."""
        return self._layer(x, lambda h: self.self_attn.forward_absorbed(h, cos, sin, cache_latent, cache_pe,
                                                                         write_index, mask))

    def _layer(self, x, attention):
        return decoder_layer(x, attention, lambda h, _: self.mlp(h), self.input_layernorm.weight,
                             self.post_attention_layernorm.weight, self.input_layernorm.eps)


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` in HF names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LatentCache:
    """Fixed-capacity latent KV cache: per layer, latent [B,L,C] and rotary key [B,L,rope]."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype=torch.float32, device="cpu"):
        self.capacity = capacity
        self.latent = torch.zeros(cfg.num_hidden_layers, batch, capacity, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(cfg.num_hidden_layers, batch, capacity, cfg.qk_rope_head_dim, dtype=dtype, device=device)


class IOAdapter(nn.Module):
    """Sensor-mode I/O: a named feature frame becomes one token embedding; the last hidden
    state becomes named outputs. Features are normalised with stored mean/std; outputs are
    scaled back to engineering units."""

    def __init__(self, input_names: list[str], output_names: list[str], hidden: int):
        super().__init__()
        if not input_names or not output_names:
            raise ValueError("an I/O adapter needs at least one input and one output name")
        for kind, names in (("input", input_names), ("output", output_names)):
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {names}")
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.register_buffer("in_mean", torch.zeros(len(input_names)))
        self.register_buffer("in_std", torch.ones(len(input_names)))
        self.in_proj = nn.Linear(len(input_names), hidden)
        self.out_proj = nn.Linear(hidden, len(output_names))
        self.register_buffer("out_mean", torch.zeros(len(output_names)))
        self.register_buffer("out_std", torch.ones(len(output_names)))

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [..., F] in engineering units -> embeddings [..., H]."""
        return self.in_proj((frames - self.in_mean) / self.in_std)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states [..., H] -> outputs [..., O] in engineering units."""
        return self.out_proj(hidden) * self.out_std + self.out_mean

    def signature(self) -> dict:
        """The I/O signature as stored in a package manifest."""
        return {"inputs": self.input_names, "outputs": self.output_names}


class Transformer(nn.Module):
    """A DeepSeek-V3/R1 causal LM: ``model(input_ids) -> logits`` and greedy ``generate``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.adapter = None   # sensor-mode I/O adapter, attached by sdk when the package has one

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device if isinstance(self.lm_head, nn.Linear) else self.inv_freq.device

    def rope(self, positions: torch.Tensor):
        """cos/sin tables for ``positions``."""
        return rope_cos_sin(self.inv_freq, self.rope_factor, positions)

    def hidden_states(self, embeds: torch.Tensor, start: int = 0, cache: LatentCache | None = None,
                      window: int | None = None) -> torch.Tensor:
        """Run all layers over embeddings [B,T,H] at positions start..start+T-1; fills ``cache`` if given.

        With ``window`` each token attends to itself and the ``window - 1`` tokens before it,
        exactly what the stream engine's ring buffer of ``window`` entries gives.
        """
        B, T, _ = embeds.shape
        positions = torch.arange(start, start + T, device=embeds.device)
        cos, sin = self.rope(positions)
        mask = None
        if T > 1:
            mask = torch.full((T, T), float("-inf"), device=embeds.device).triu_(1)
            if window is not None:
                mask = mask + torch.full((T, T), float("-inf"), device=embeds.device).tril_(-window)
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x, latent, k_pe = layer(x, cos, sin, mask)
            if cache is not None:
                cache.latent[i, :, start:start + T] = latent
                cache.pe[i, :, start:start + T] = k_pe
        return self.model.norm(x)

    def forward_sensor(self, frames: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Sensor mode over whole sequences: frames [B,T,F] -> outputs [B,T,O] (differentiable)."""
        if self.adapter is None:
            raise ValueError("this model has no I/O adapter (LM mode); attach one with sdk first")
        return self.adapter.decode(self.hidden_states(self.adapter.embed(frames), window=window))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits float32 [B,T,vocab] for token ids [B,T]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        h = self.hidden_states(self.model.embed_tokens(input_ids.to(self.device)))
        return self.lm_head(h).float()

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: int, cache: LatentCache) -> torch.Tensor:
        """Logits [B,vocab] for one new token per sequence at ``position``, using the absorbed form."""
        B = token.shape[0]
        x = self.model.embed_tokens(token.view(B, 1))
        cos, sin = self.rope(torch.full((B, 1), position, device=x.device))
        write = torch.full((B,), position, dtype=torch.long, device=x.device)
        mask = torch.zeros(B, cache.capacity, device=x.device)
        mask[:, position + 1:] = float("-inf")
        for i, layer in enumerate(self.model.layers):
            x = layer.decode(x, cos, sin, cache.latent[i], cache.pe[i], write, mask)
        return self.lm_head(self.model.norm(x))[:, 0].float()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy decoding with a latent cache: LongTensor [B,T] -> [B,T+max_new_tokens]."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids
        dtype = self.model.embed_tokens.weight.dtype
        cache = LatentCache(self.config, B, T + max_new_tokens, dtype=dtype, device=self.device)
        h = self.hidden_states(self.model.embed_tokens(input_ids), 0, cache)
        token = self.lm_head(h[:, -1]).float().argmax(-1)
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :T] = input_ids
        out[:, T] = token
        for step in range(1, max_new_tokens):
            token = self.decode_step(token, T + step - 1, cache).argmax(-1)
            out[:, T + step] = token
        return out

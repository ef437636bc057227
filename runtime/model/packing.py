"""A model's weights as named int8 structures for the engines: :func:`pack_int8` turns a
``runtime.model.transformer.Transformer`` (float or quantized with ``runtime.model.quant``)
into a :class:`PackedModel`, the one place where the engines get their weights from.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model.quant import Int8Linear, QWeight, RoutedExperts
from runtime.model.routing import RoutingRule
from runtime.model.transformer import MoE



class PackedAttention(NamedTuple):
    """One layer's MLA weights: int8 projections, float norms and the absorbed ``kv_b_proj``
    halves. ``q_a``/``q_a_norm``/``q_b`` are set with a q low rank, else ``q``."""

    q_a: QWeight | None
    q_a_norm: torch.Tensor | None
    q_b: QWeight | None
    q: QWeight | None
    kv_a: QWeight
    kv_a_norm: torch.Tensor
    w_uk: torch.Tensor          # float32 [heads, qk_nope_head_dim, kv_lora_rank]
    w_uv: torch.Tensor          # float32 [heads, v_head_dim, kv_lora_rank]
    o: QWeight


class PackedMLP(NamedTuple):
    """A SwiGLU block: ``w13`` gate and up fused (columns [gate I | up I]), ``w2`` down."""

    w13: QWeight
    w2: QWeight


class PackedExperts(NamedTuple):
    """A MoE layer's router (float32 ``gate`` [E, H], ``bias`` [E] or None) and routed experts
    stacked as :class:`RoutedExperts` holds them: ``w13`` int8 [E, H, 2I], ``s13`` [E, 2I],
    ``w2`` int8 [E, I, H], ``s2`` [E, H]."""

    gate: torch.Tensor
    bias: torch.Tensor | None
    w13: torch.Tensor
    s13: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor


class PackedLayer(NamedTuple):
    """A decoder layer: its two norms, attention, the dense MLP or the shared experts (None
    when a MoE layer has none) and, in MoE layers, the routed experts."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attn: PackedAttention
    mlp: PackedMLP | None
    experts: PackedExperts | None


class PackedAdapter(NamedTuple):
    """The sensor I/O adapter, float32: ``in_w`` [H, F], ``in_b``, ``in_mean``, ``in_std`` [F];
    ``out_w`` [O, H], ``out_b``, ``out_mean``, ``out_std`` [O]."""

    input_names: list
    output_names: list
    in_w: torch.Tensor
    in_b: torch.Tensor
    in_mean: torch.Tensor
    in_std: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    out_mean: torch.Tensor
    out_std: torch.Tensor


class PackedModel(NamedTuple):
    """Everything an engine needs, named: the config and its routing rule, float32 ``embed``
    [V, H] and final ``norm``, the int8 ``head``, rotary ``inv_freq`` and ``rope_factor``,
    the layers, and the sensor adapter (None in LM mode)."""

    config: object
    rule: object
    embed: torch.Tensor
    norm: torch.Tensor
    head: QWeight
    inv_freq: torch.Tensor
    rope_factor: float
    layers: list
    adapter: PackedAdapter | None


def _qweight(linear: nn.Module) -> QWeight:
    """The int8 weight of an :class:`Int8Linear` (its own codes) or a float ``nn.Linear``
    (quantized here, with the rule every int8 path uses)."""
    if isinstance(linear, Int8Linear):
        return linear.qweight()
    if linear.bias is not None:
        raise ValueError("int8 engines run bias-free linear layers; this checkpoint has a bias")
    return QWeight.from_float(linear.weight.detach().float())


def _fuse(gate: QWeight, up: QWeight) -> QWeight:
    """Two weights over the same input as one, columns [gate | up], padded to 8."""
    n = gate.n + up.n
    q = torch.cat([gate.q[:, :gate.n], up.q[:, :up.n]], 1)
    s = torch.cat([gate.s[:gate.n], up.s[:up.n]])
    pad = -(-n // 8) * 8 - n
    return QWeight(F.pad(q, (0, pad)).contiguous(), F.pad(s, (0, pad), value=1.0), gate.k, n)


def _mlp(m: nn.Module) -> PackedMLP:
    return PackedMLP(_fuse(_qweight(m.gate_proj), _qweight(m.up_proj)), _qweight(m.down_proj))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def pack_int8(model) -> PackedModel:
    """The int8 weights of a ``runtime.model.transformer.Transformer`` (float or quantized) as named
    structures; int8 modules give views of their codes, float ones are quantized here."""
    cfg = model.config
    layers = []
    for layer in model.model.layers:
        a = layer.self_attn
        w_uk, w_uv = a.absorbed_weights()
        lora = cfg.q_lora_rank is not None
        attn = PackedAttention(
            q_a=_qweight(a.q_a_proj) if lora else None, q_a_norm=_f32(a.q_a_layernorm.weight) if lora else None,
            q_b=_qweight(a.q_b_proj) if lora else None, q=None if lora else _qweight(a.q_proj),
            kv_a=_qweight(a.kv_a_proj_with_mqa), kv_a_norm=_f32(a.kv_a_layernorm.weight),
            w_uk=_f32(w_uk).contiguous(), w_uv=_f32(w_uv).contiguous(), o=_qweight(a.o_proj))
        mlp, experts = layer.mlp, None
        if isinstance(mlp, MoE):
            ex = mlp.experts
            if not isinstance(ex, RoutedExperts):
                ex = RoutedExperts.from_float(ex.gate_up_proj.detach().float(), ex.down_proj.detach().float())
            bias = getattr(mlp.gate, "e_score_correction_bias", None)
            experts = PackedExperts(_f32(mlp.gate.weight), None if bias is None else _f32(bias),
                                    ex.w13_t, ex.s13, ex.w2_t, ex.s2)
            mlp = mlp.shared_experts
        layers.append(PackedLayer(_f32(layer.input_layernorm.weight), _f32(layer.post_attention_layernorm.weight),
                                  attn, None if mlp is None else _mlp(mlp), experts))
    adapter = None
    if model.adapter is not None:
        ad = model.adapter
        # The engines divide by in_std: a zero would turn every frame into inf/NaN.
        if not (bool(torch.all(torch.isfinite(ad.in_std) & (ad.in_std != 0)))
                and bool(torch.all(torch.isfinite(ad.out_std)))):
            raise ValueError(f"the I/O adapter's in_std must be finite and non-zero and its out_std finite, got "
                             f"in_std {ad.in_std.tolist()}, out_std {ad.out_std.tolist()}")
        adapter = PackedAdapter(list(ad.input_names), list(ad.output_names), _f32(ad.in_proj.weight),
                                _f32(ad.in_proj.bias), _f32(ad.in_mean), _f32(ad.in_std), _f32(ad.out_proj.weight),
                                _f32(ad.out_proj.bias), _f32(ad.out_mean), _f32(ad.out_std))
    rule = RoutingRule.from_config(cfg) if cfg.n_moe_layers else None
    return PackedModel(cfg, rule, _f32(model.model.embed_tokens.weight), _f32(model.model.norm.weight),
                       _qweight(model.lm_head), _f32(model.inv_freq), float(model.rope_factor), layers, adapter)

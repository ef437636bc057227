"""Model configuration: DeepSeek-V3/R1 and DeepSeek-V2-family hyper-parameters read from an
HF ``config.json``.

Both spellings of the rotary settings are accepted: the official releases write
``rope_scaling`` (with ``type``) and a top-level ``rope_theta``; transformers 5 writes
``rope_parameters`` (with ``rope_type`` and ``rope_theta``) and ``rope_interleave``.

The two families share MLA and the MoE layout and differ in routing (``runtime.model.routing``):
V3/R1 score with a sigmoid and ``noaux_tc``; V2, V2-Lite, V2.5 and Coder-V2 with a softmax
and ``greedy`` or ``group_limited_greedy``, without a correction bias. Keys a config leaves
out take its family's defaults (those of transformers' config classes).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

#: The epsilon of the q and kv low-rank norms (``q_a_layernorm``, ``kv_a_layernorm``). The
#: reference implementations build them with RMSNorm's default, not ``rms_norm_eps``.
LORA_NORM_EPS = 1e-6

#: Upper bounds of a config's sizes, far above any DeepSeek release (R1: 61 layers, hidden 7168,
#: 128 heads, 256 routed experts over 58 MoE layers, vocab 129,280). A config past them is corrupt
#: or hostile: laying out its modules would take hours before a single weight could be checked.
MAX_SIZES = {"num_hidden_layers": 256, "hidden_size": 1 << 16, "num_attention_heads": 1024,
             "n_routed_experts": 4096, "n_shared_experts": 64, "vocab_size": 1 << 22,
             "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 18, "q_lora_rank": 1 << 16,
             "kv_lora_rank": 1 << 14, "qk_rope_head_dim": 1 << 12, "qk_nope_head_dim": 1 << 12,
             "v_head_dim": 1 << 12}
#: Routed experts summed over the MoE layers (R1: 14,848).
MAX_EXPERT_MODULES = 1 << 16

#: What a ``deepseek_v2`` config means when it leaves a key out (transformers' DeepseekV2Config).
_V2_DEFAULTS = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
                "moe_intermediate_size": 1407, "num_hidden_layers": 32, "num_attention_heads": 32,
                "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
                "first_k_dense_replace": 0, "norm_topk_prob": False, "max_position_embeddings": 2048,
                "topk_method": "greedy", "n_group": 1, "topk_group": 1}



def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times: ``0.1 * m * ln(scale) + 1``
    (1 when ``scale`` <= 1). It scales the rotary cos/sin (``runtime.model.transformer.rope_inv_freq``)
    and, squared with ``m = mscale_all_dim``, the attention scores (:attr:`ModelConfig.softmax_scale`)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 or V2-architecture model (names as in HF ``config.json``)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # YaRN: factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim
    rope_interleave: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    topk_method: str = "noaux_tc"
    model_type: str = "deepseek_v3"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the no-position part plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scoring_func(self) -> str:
        """How router logits become scores: "sigmoid" (V3/R1) or "softmax" (the V2 family)."""
        return "softmax" if self.model_type == "deepseek_v2" else "sigmoid"

    @property
    def n_moe_layers(self) -> int:
        """Number of layers whose MLP is a mixture of experts."""
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) has a MoE MLP rather than a dense one."""
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """Attention score scale, including YaRN's mscale correction when scaling is on."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("type", "default") != "default":
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            if mscale_all_dim:
                m = yarn_mscale(rs.get("factor", 1.0), mscale_all_dim)
                scale = scale * m * m
        return scale

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed ``config.json``; raises ValueError naming ``source`` on bad input."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kwargs = {k: raw[k] for k in names if k in raw}
        scoring = {"deepseek_v3": "sigmoid", "deepseek_v2": "softmax"}[model_type]
        if raw.get("scoring_func", scoring) != scoring:
            raise ValueError(f"{source}: scoring_func {raw['scoring_func']!r} is not supported for "
                             f"{model_type} (only {scoring!r})")
        if model_type == "deepseek_v2":
            # transformers writes n_group/topk_group as null for greedy routing.
            kwargs = {**_V2_DEFAULTS, **{k: v for k, v in kwargs.items()
                                         if v is not None or k not in ("n_group", "topk_group")}}
            if kwargs.get("rope_interleave") is False:
                raise ValueError(f"{source}: rope_interleave=false is not a DeepSeek-V2 setting "
                                 "(V2 always rotates interleaved pairs)")
            kwargs["rope_interleave"] = True
            freq = raw.get("moe_layer_freq", 1)
            if freq != 1:
                raise ValueError(f"{source}: moe_layer_freq={freq!r} is not supported (only 1, as every "
                                 "released DeepSeek-V2 model has)")
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):                      # transformers 5 spelling
            kwargs["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", None):
                scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
                scaling["type"] = rope_type
                kwargs["rope_scaling"] = scaling
        else:                                           # official release spelling
            kwargs["rope_theta"] = float(raw.get("rope_theta", 10000.0))
            scaling = raw.get("rope_scaling")
            if isinstance(scaling, dict):
                scaling = dict(scaling)
                scaling["type"] = scaling.pop("rope_type", scaling.get("type", "default"))
                if scaling["type"] != "default":
                    kwargs["rope_scaling"] = scaling
        if kwargs.get("rope_scaling") and kwargs["rope_scaling"]["type"] != "yarn":
            raise ValueError(f"{source}: rope scaling type {kwargs['rope_scaling']['type']!r} is not "
                             "supported (only 'yarn', as DeepSeek-V3/R1 use)")
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in names}
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read and validate a ``config.json`` file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (is this a DeepSeek-V3 checkpoint?)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, str(path))

    def validate(self, source: str = "config") -> None:
        """Check internal consistency; raises ValueError naming the offending field."""
        positive = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                    "n_group", "topk_group", "num_experts_per_tok"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {name} must be a positive integer, got {value!r}")
        for name, cap in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, int) and value > cap:
                raise ValueError(f"{source}: {name} = {value} is past {cap} (far above any DeepSeek model)")
        if isinstance(self.n_routed_experts, int) and self.n_routed_experts * self.n_moe_layers > MAX_EXPERT_MODULES:
            raise ValueError(f"{source}: {self.n_routed_experts} routed experts in each of {self.n_moe_layers} MoE "
                             f"layers is past {MAX_EXPERT_MODULES} in all")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{source}: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"{source}: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        family = {"deepseek_v3": ("noaux_tc",), "deepseek_v2": ("greedy", "group_limited_greedy")}
        if self.model_type not in family:
            raise ValueError(f"{source}: unsupported model_type {self.model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        methods = family[self.model_type]
        if self.topk_method not in methods:
            raise ValueError(f"{source}: topk_method {self.topk_method!r} is not supported for "
                             f"{self.model_type} (supported: {', '.join(methods)})")
        if self.model_type == "deepseek_v2" and self.norm_topk_prob:
            raise ValueError(f"{source}: norm_topk_prob=true is not supported for deepseek_v2: DeepSeek's "
                             "own V2 code then normalises instead of scaling, transformers scales and never "
                             "normalises, and no released V2 model sets it")
        if self.n_moe_layers:
            try:
                RoutingRule.from_config(self)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` form (transformers-5 rope spelling), round-trippable."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "rope_theta", "rope_scaling"):
                out[f.name] = getattr(self, f.name)
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rope["rope_type"] = self.rope_scaling["type"]
        out["rope_parameters"] = rope
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        return out


#: The expert-choice rules (``topk_method``) :class:`RoutingRule` implements.
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


class RoutingRule(NamedTuple):
    """The parameters of a MoE layer's routing rule (the rule itself is written out in
    :mod:`runtime.model.routing`; a NamedTuple, so Numba kernels take it as is).

    ``softmax``: softmax scoring (else sigmoid); ``group_max``: a group scores its largest
    choice (else the sum of its top two); ``biased``: the rule adds e_score_correction_bias.
    ``greedy`` configs are stored as one group kept.
    """

    softmax: bool
    group_max: bool
    biased: bool
    n_experts: int
    n_group: int
    topk_group: int
    top_k: int
    norm_topk_prob: bool
    scaling: float

    @classmethod
    def from_config(cls, cfg, n_experts: int | None = None) -> "RoutingRule":
        """The rule of a ``runtime.model.config.ModelConfig`` (``n_experts`` overrides the count)."""
        method = cfg.topk_method
        if method not in TOPK_METHODS:
            raise ValueError(f"topk_method {method!r} is not supported (one of {', '.join(TOPK_METHODS)})")
        greedy = method == "greedy"
        rule = cls(softmax=cfg.scoring_func == "softmax", group_max=method == "group_limited_greedy",
                   biased=method == "noaux_tc", n_experts=int(n_experts or cfg.n_routed_experts),
                   n_group=1 if greedy else int(cfg.n_group), topk_group=1 if greedy else int(cfg.topk_group),
                   top_k=int(cfg.num_experts_per_tok), norm_topk_prob=bool(cfg.norm_topk_prob),
                   scaling=float(cfg.routed_scaling_factor))
        rule.check()
        return rule

    def check(self) -> None:
        """Raise ValueError, naming the field, if the parameters are inconsistent."""
        E, G, KG, K = self.n_experts, self.n_group, self.topk_group, self.top_k
        if G < 1 or E % G:
            raise ValueError(f"n_group={G} must divide n_routed_experts={E}")
        if G > 1 and not self.group_max and E // G < 2:
            raise ValueError(f"n_routed_experts/n_group={E // G}: need at least 2 experts per group "
                             "(a group scores the sum of its top two)")
        if not 1 <= KG <= G:
            raise ValueError(f"topk_group={KG} must be in [1, n_group={G}]")
        if not 1 <= K <= KG * (E // G):
            raise ValueError(f"num_experts_per_tok={K} must be in [1, topk_group * experts per group = "
                             f"{KG * (E // G)}]")

"""Memory planner: parameters and bytes of a (pruned, quantized) model, and whether it fits a GPU.

Parameters are counted exactly from the config, tensor by tensor, as the checkpoint stores
them (multi-token-prediction layers beyond ``num_hidden_layers`` are not part of the model
the runtime runs and are not counted). Bytes per part follow from the quantization:

- ``int8`` (the package scheme W8A8): every linear layer (attention projections, dense MLP,
  shared and routed experts, ``lm_head``) is 1 byte per weight plus one float32 scale per
  output channel. Embeddings stay in ``float_dtype`` (bf16 by default); RMSNorm weights and
  the router (gate weight and correction bias) stay float32 because routing is computed in
  float32.
- ``bf16``: every weight 2 bytes, except norms and router (float32).
- ``fp8`` (the official release layout): linear weights 1 byte plus a float32 ``scale_inv``
  per 128x128 block; embeddings, norms and router as above.

The KV cache is the MLA latent cache: per stream, per token, per layer
``kv_lora_rank + qk_rope_head_dim`` values (576 on R1) of ``kv_dtype``. A fixed runtime
reserve (CUDA context, cuBLAS workspace, activations and int8 staging buffers, allocator
slack) is added on top; it is an assumption, ``reserve_gb`` changes it.

Sizes are in decimal gigabytes (1 GB = 1e9 bytes), also for ``gpu_mem_gb``: an "80 GB" A100
has 85.9e9 bytes, so the default check keeps about 5.9 GB of extra margin.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from runtime.config import ModelConfig

QUANTS = ("int8", "bf16", "fp8")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "int8": 1}
BUILTIN_CONFIGS = ("deepseek-r1", "deepseek-v3")
DEFAULT_GPU_MEM_GB = 80.0
DEFAULT_RESERVE_GB = 4.0
DEFAULT_STREAMS = 1
DEFAULT_WINDOW = 4096
PARTS = ("embeddings", "lm_head", "attention", "dense_mlp", "shared_experts", "routed_experts",
         "router", "norms")


def resolve_config(source: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config behind ``source``: a built-in name, a ``config.json``, a checkpoint or a package.

    Returns ``(config, info)`` where ``info`` says where it came from and, for a package, its
    quantization scheme. Raises FileNotFoundError/ValueError naming the path.
    """
    text = str(source)
    if text.lower() in BUILTIN_CONFIGS:
        return ModelConfig(), {"source": text.lower(), "kind": "builtin"}
    path = Path(source)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            try:
                raw = json.loads(manifest.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{manifest}: not valid JSON ({exc})") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
                raise ValueError(f"{manifest}: no 'config' object")
            scheme = (raw.get("quantization") or {}).get("scheme")
            cfg = ModelConfig.from_dict(raw["config"], f"{manifest}:config")
            return cfg, {"source": str(path), "kind": "package", "scheme": scheme}
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path}: neither manifest.json (package) nor config.json "
                                    "(checkpoint) found")
        return ModelConfig.from_json(cfg_path), {"source": str(path), "kind": "checkpoint"}
    if path.is_file():
        return ModelConfig.from_json(path), {"source": str(path), "kind": "config"}
    raise FileNotFoundError(f"{path}: no such file or directory (or use a built-in name: "
                            f"{', '.join(BUILTIN_CONFIGS)})")


def _linear_shapes(cfg: ModelConfig, keep_experts: int) -> dict[str, list[tuple[int, int, int]]]:
    """Linear weights by part as ``(count, out_features, in_features)`` for the whole model."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    n_layers, n_moe = cfg.num_hidden_layers, cfg.n_moe_layers
    n_dense = n_layers - n_moe
    attn = []
    if cfg.q_lora_rank is None:
        attn.append((n_layers, nh * cfg.qk_head_dim, h))
    else:
        attn += [(n_layers, cfg.q_lora_rank, h), (n_layers, nh * cfg.qk_head_dim, cfg.q_lora_rank)]
    attn += [(n_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
             (n_layers, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
             (n_layers, h, nh * cfg.v_head_dim)]

    def mlp(count: int, inter: int) -> list[tuple[int, int, int]]:
        return [(count, inter, h), (count, inter, h), (count, h, inter)] if count and inter else []

    return {
        "attention": attn,
        "dense_mlp": mlp(n_dense, cfg.intermediate_size),
        "shared_experts": mlp(n_moe, cfg.moe_intermediate_size * cfg.n_shared_experts),
        "routed_experts": mlp(n_moe * keep_experts, cfg.moe_intermediate_size),
        "lm_head": [] if cfg.tie_word_embeddings else [(1, cfg.vocab_size, h)],
    }


def _float_params(cfg: ModelConfig, keep_experts: int) -> dict[str, int]:
    """Parameters kept in float (not quantized) by part: embeddings, router, norms, biases."""
    h, n_layers, n_moe = cfg.hidden_size, cfg.num_hidden_layers, cfg.n_moe_layers
    norms_per_layer = 2 * h + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    biases = 0
    if cfg.attention_bias:      # q_a_proj (or none with q_proj), kv_a_proj_with_mqa, o_proj
        biases = n_layers * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim + h)
    return {
        "embeddings": cfg.vocab_size * h,
        "router": n_moe * keep_experts * (h + (cfg.topk_method == "noaux_tc")),   # + correction bias
        "norms": n_layers * norms_per_layer + h,
        "attention_bias": biases,
    }


def _linear_bytes(count: int, out_f: int, in_f: int, quant: str, float_bytes: int) -> int:
    """Bytes of ``count`` linear weights ``[out_f, in_f]`` under ``quant`` (scales included)."""
    if quant == "int8":
        return count * (out_f * in_f + 4 * out_f)
    if quant == "fp8":
        return count * (out_f * in_f + 4 * math.ceil(out_f / 128) * math.ceil(in_f / 128))
    return count * out_f * in_f * float_bytes


def count_params(cfg: ModelConfig, keep_experts: int | None = None) -> dict[str, int]:
    """Exact parameter counts by part (plus ``total`` and ``active``) with ``keep_experts`` per layer.

    ``active`` is what one token touches: everything except the routed experts it is not
    routed to (``num_experts_per_tok`` of them per MoE layer are).
    """
    keep = cfg.n_routed_experts if keep_experts is None else keep_experts
    parts = {name: 0 for name in PARTS}
    for name, shapes in _linear_shapes(cfg, keep).items():
        parts[name] += sum(c * o * i for c, o, i in shapes)
    floats = _float_params(cfg, keep)
    parts["embeddings"] += floats["embeddings"]
    parts["router"] += floats["router"]
    parts["norms"] += floats["norms"]
    parts["attention"] += floats["attention_bias"]
    total = sum(parts.values())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    active_routed = cfg.n_moe_layers * min(cfg.num_experts_per_tok, keep) * per_expert
    parts["total"] = total
    parts["active"] = total - parts["routed_experts"] + active_routed
    return parts


def count_bytes(cfg: ModelConfig, keep_experts: int | None = None, *, quant: str = "int8",
                float_dtype: str = "bf16", kv_dtype: str = "bf16", streams: int = DEFAULT_STREAMS,
                window: int = DEFAULT_WINDOW, reserve_gb: float = DEFAULT_RESERVE_GB) -> dict[str, int]:
    """Bytes by part (weights, ``kv_cache``, ``runtime_reserve``) and their ``total``."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    for name, value in (("float_dtype", float_dtype), ("kv_dtype", kv_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    keep = cfg.n_routed_experts if keep_experts is None else keep_experts
    fb = DTYPE_BYTES[float_dtype]
    out = {name: 0 for name in PARTS}
    for name, shapes in _linear_shapes(cfg, keep).items():
        out[name] += sum(_linear_bytes(c, o, i, quant, fb) for c, o, i in shapes)
    floats = _float_params(cfg, keep)
    out["embeddings"] += floats["embeddings"] * fb
    out["router"] += floats["router"] * 4
    out["norms"] += floats["norms"] * 4
    out["attention"] += floats["attention_bias"] * 4
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    out["kv_cache"] = streams * window * per_token * DTYPE_BYTES[kv_dtype]
    out["runtime_reserve"] = int(round(reserve_gb * 1e9))
    out["total"] = sum(out.values())
    return out


def plan(source: str | Path | ModelConfig, *, keep_experts: int | None = None, quant: str | None = None,
         gpu_mem_gb: float = DEFAULT_GPU_MEM_GB, streams: int = DEFAULT_STREAMS,
         window: int = DEFAULT_WINDOW, kv_dtype: str = "bf16", float_dtype: str = "bf16",
         reserve_gb: float = DEFAULT_RESERVE_GB) -> dict[str, Any]:
    """Plan the memory of ``source`` (name, config.json, checkpoint or package) on one GPU.

    ``keep_experts`` is the routed experts kept per MoE layer (default: all of them).
    ``quant`` defaults to int8 (a package's own scheme for a package: ``none`` plans as bf16).
    Returns the report: ``params_total``, ``params_active``, ``params`` and ``bytes`` by part
    (with ``total``), ``fits``, ``max_keep_experts`` (largest per-layer count, at least
    ``num_experts_per_tok``, whose total fits ``gpu_mem_gb``; None if none does) and the
    assumptions used.
    """
    if isinstance(source, ModelConfig):
        cfg, info = source, {"source": "config", "kind": "config"}
    else:
        cfg, info = resolve_config(source)
    if quant is None:
        scheme = info.get("scheme")
        quant = "bf16" if scheme == "none" else "int8"
    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    n_routed = cfg.n_routed_experts
    if keep_experts is not None and not (cfg.num_experts_per_tok <= keep_experts <= n_routed):
        raise ValueError(f"--keep-experts must be between num_experts_per_tok="
                         f"{cfg.num_experts_per_tok} and n_routed_experts={n_routed}, got {keep_experts}")
    for name, value in (("streams", streams), ("window", window)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"--{name} must be a non-negative integer, got {value!r}")
    if gpu_mem_gb <= 0 or reserve_gb < 0:
        raise ValueError("--gpu-mem-gb must be positive and --reserve-gb non-negative")
    keep = n_routed if keep_experts is None else keep_experts
    kwargs = dict(quant=quant, float_dtype=float_dtype, kv_dtype=kv_dtype, streams=streams,
                  window=window, reserve_gb=reserve_gb)
    params = count_params(cfg, keep)
    nbytes = count_bytes(cfg, keep, **kwargs)
    budget = int(round(gpu_mem_gb * 1e9))
    max_keep = None
    if cfg.n_moe_layers:
        # Bytes grow linearly in the kept count: find the largest that fits from the slope.
        base = count_bytes(cfg, 0, **kwargs)["total"]
        per_expert = count_bytes(cfg, 1, **kwargs)["total"] - base
        if budget >= base + cfg.num_experts_per_tok * per_expert:
            max_keep = min(n_routed, (budget - base) // per_expert)
            assert count_bytes(cfg, max_keep, **kwargs)["total"] <= budget
        per_layer_expert_bytes = per_expert
    else:
        per_layer_expert_bytes = 0
    return {
        "source": info["source"],
        "kind": info["kind"],
        "quant": quant,
        "keep_experts": keep,
        "n_routed_experts": n_routed,
        "n_moe_layers": cfg.n_moe_layers,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "params_total": params["total"],
        "params_active": params["active"],
        "params": {k: v for k, v in params.items() if k not in ("total", "active")},
        "bytes": nbytes,
        "bytes_per_kept_expert": per_layer_expert_bytes,
        "gpu_mem_bytes": budget,
        "fits": nbytes["total"] <= budget,
        "headroom_bytes": budget - nbytes["total"],
        "max_keep_experts": max_keep,
        "assumptions": {
            "gpu_mem_gb": gpu_mem_gb,
            "streams": streams,
            "window": window,
            "kv_cache": f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} latent values/token/layer "
                        f"x {cfg.num_hidden_layers} layers in {kv_dtype}",
            "float_dtype": float_dtype,
            "reserve_gb": reserve_gb,
            "linears": {"int8": "1 B/weight + fp32 scale per output channel",
                        "bf16": "2 B/weight",
                        "fp8": "1 B/weight + fp32 scale per 128x128 block"}[quant],
            "float_parts": f"embeddings {float_dtype}; norms and router fp32",
            "units": "1 GB = 1e9 bytes",
        },
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:9.2f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:9.3f} B" if n >= 1e8 else f"{n / 1e6:9.3f} M"


def render_plan(report: dict[str, Any], out=None) -> None:
    """Print a plan as a table with the accounting shown."""
    import sys
    out = out or sys.stdout
    a = report["assumptions"]
    w = out.write
    w(f"Memory plan for {report['source']} ({report['kind']}), quant {report['quant']}, "
      f"{report['keep_experts']} of {report['n_routed_experts']} routed experts kept in each of "
      f"{report['n_moe_layers']} MoE layers ({report['num_hidden_layers']} layers)\n\n")
    w(f"  {'part':<16}{'params':>12}{'bytes':>13}\n")
    for part in PARTS:
        w(f"  {part:<16}{_params(report['params'][part]):>12}{_gb(report['bytes'][part]):>13}\n")
    w(f"  {'kv_cache':<16}{'':>12}{_gb(report['bytes']['kv_cache']):>13}   "
      f"{a['streams']} streams x {a['window']} tokens x {a['kv_cache']}\n")
    w(f"  {'runtime_reserve':<16}{'':>12}{_gb(report['bytes']['runtime_reserve']):>13}   "
      "CUDA context, workspace, activations (--reserve-gb)\n")
    w(f"  {'-' * 41}\n")
    w(f"  {'total':<16}{_params(report['params_total']):>12}{_gb(report['bytes']['total']):>13}\n\n")
    w(f"  parameters active per token: {_params(report['params_active']).strip()}\n")
    w(f"  linear weights: {a['linears']}; {a['float_parts']}; {a['units']}\n")
    w(f"  each kept expert per layer adds {_gb(report['bytes_per_kept_expert']).strip()} "
      f"over {report['n_moe_layers']} MoE layers\n")
    verdict = "fits" if report["fits"] else "does NOT fit"
    w(f"  GPU memory {a['gpu_mem_gb']:g} GB: {verdict} "
      f"(headroom {report['headroom_bytes'] / 1e9:.2f} GB)\n")
    mk = report["max_keep_experts"]
    if not report["n_moe_layers"]:
        w("  no MoE layers: nothing to prune\n")
    elif mk is None:
        w(f"  no kept-expert count >= num_experts_per_tok={report['num_experts_per_tok']} fits "
          f"{a['gpu_mem_gb']:g} GB\n")
    else:
        w(f"  largest --keep-experts that fits {a['gpu_mem_gb']:g} GB: {mk}\n")

"""Memory planner: parameters and bytes of a (pruned, quantized) model, and whether it fits a GPU.

Two accountings. :func:`engine_bytes` is what an engine that ships holds, part by part,
mirroring its allocations: the device engine (``runtime.device.DeviceEngine``: what sits in
GPU memory, and its host-side buffers) or the CPU stream engine (``runtime.engine.Engine``).
It is what ``plan`` reports for int8 (the scheme the engines run), and what is measured
against RSS in ``benchmarks/bench_r1_engine.py``. :func:`count_bytes` is what a checkpoint or
package stores in a given format (int8, bf16, fp8), used for the other ``--quant`` choices.

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
ENGINES = ("device", "cpu")
ENGINE_PARTS = ("embeddings", "lm_head", "attention", "attention_absorbed", "dense_mlp", "shared_experts",
                "routed_experts", "router", "norms", "kv_cache", "buffers")
CUDA_MIN_ROWS = 17          # the device engine runs at least 17 rows (runtime.quant.CUDA_MIN_ROWS)


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


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def engine_bytes(cfg: ModelConfig, keep_experts: int | None = None, *, engine: str = "device", streams: int = 1,
                 window: int = DEFAULT_WINDOW, embed_dtype: str = "bf16", expert_cache_slots: int | None = None
                 ) -> dict[str, Any]:
    """What an int8 engine holds for ``cfg`` with ``keep_experts`` routed experts per layer, by part.

    ``engine="device"``: ``DeviceEngine`` (its rows are ``max(streams, 17)``; int8 weights in
    ``_int_mm`` layout padded to multiples of 8; the first q projection and ``kv_a`` fused into
    one copy; ``kv_b_proj`` absorbed as float32 W_UK/W_UV; embeddings in ``embed_dtype``, which
    the engine uses when the package's embeddings are bf16, since that is lossless). Returns
    ``{"device": parts, "host": parts}``: with ``expert_cache_slots`` the routed experts stay in
    the package's memory-mapped files (the OS page cache, not counted) and the device holds
    that many expert slots plus their scales, the host one expert of staging.
    ``engine="cpu"``: ``Engine`` (``streams`` slots; int8 rows [N, K] unpadded, float32
    embeddings, W_UK/W_UV, router and latent cache); returns ``{"host": parts}``.
    Every part dict has a ``total``. Interpreter, libraries and transient step activations
    are not included (the device plan adds its runtime reserve on top).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    keep = cfg.n_routed_experts if keep_experts is None else keep_experts
    H, V, L, Lm = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.n_moe_layers
    Ld = L - Lm
    nh, nope, rope, vd, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)
    qr, qd, I, k = cfg.q_lora_rank, nh * (nope + rope), cfg.moe_intermediate_size, cfg.num_experts_per_tok
    Is, Id = I * cfg.n_shared_experts, cfg.intermediate_size
    biased = cfg.topk_method == "noaux_tc"
    dev = {name: 0 for name in ENGINE_PARTS}
    host = {name: 0 for name in ENGINE_PARTS}
    dev["attention_absorbed"] = L * nh * (nope + vd) * C * 4
    dev["norms"] = 4 * (2 * L * H + H + L * ((qr or 0) + C))
    if engine == "cpu":
        return {"host": _cpu_engine_bytes(cfg, keep, streams, window)}

    def q8(n: int, kk: int) -> int:                 # QWeight: int8 [K8, N8] and float32 scales [N8]
        return _pad8(kk) * _pad8(n) + 4 * _pad8(n)

    R = max(streams, CUDA_MIN_ROWS)
    h8, n13, i8 = _pad8(H), _pad8(2 * I), _pad8(I)
    dev["embeddings"] = V * H * DTYPE_BYTES[embed_dtype]
    dev["lm_head"] = q8(V, H)
    first = _pad8(qr) if qr else _pad8(qd)
    w_in = _pad8(H) * (first + _pad8(C + rope)) + 4 * (first + _pad8(C + rope))
    dev["attention"] = L * (w_in + (q8(qd, qr) if qr else 0) + q8(H, nh * vd))
    dev["dense_mlp"] = Ld * (q8(2 * Id, H) + q8(H, Id))
    dev["shared_experts"] = Lm * (q8(2 * Is, H) + q8(H, Is)) if Is else 0
    per_expert = h8 * n13 + i8 * h8
    scales = Lm * keep * 4 * (n13 + h8)
    if expert_cache_slots is None:
        dev["routed_experts"] = Lm * keep * per_expert + scales
    else:
        dev["routed_experts"] = expert_cache_slots * per_expert + scales
        host["routed_experts"] = per_expert          # the staging buffer
    dev["router"] = Lm * (H * keep + keep * biased) * 4
    dev["kv_cache"] = L * R * window * (C + rope) * 4
    A = R * k
    # logits and the active rows gathered from them; the grouped kernel's accumulators
    dev["buffers"] = 2 * R * V * 4 + ((A * n13 * 4 + A * h8 * 4 + R * k * h8 * 4) if Lm else 0)
    host["buffers"] = R * V * 4                      # pinned: the active rows' logits come back here
    dev["total"] = sum(dev.values())
    host["total"] = sum(host.values())
    return {"device": dev, "host": host}


def _cpu_engine_bytes(cfg: ModelConfig, keep: int, streams: int, window: int) -> dict[str, int]:
    """The CPU ``Engine``'s arrays by part: int8 weights blocked by 16 output channels (K padded
    to 4, with int32 row sums and float32 scales), float32 embeddings, W_UK/W_UV (padded to
    16-lane vectors), router and the latent cache in its two layouts, and every buffer of
    ``runtime.engine.buffer_shapes`` at ``max(streams, PREFILL_ROWS)`` rows."""
    import numpy as np

    from runtime.cpu_int8 import blocked_nbytes, padded16
    from runtime.engine import PREFILL_ROWS, buffer_shapes
    from runtime.routing import RouteBuffers, RoutingRule

    H, V, L, Lm = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.n_moe_layers
    nh, nope, rope, vd, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)
    qr, qd, I, Id = cfg.q_lora_rank, nh * (nope + rope), cfg.moe_intermediate_size, cfg.intermediate_size
    Is = I * cfg.n_shared_experts
    out = {name: 0 for name in ENGINE_PARTS}
    out["embeddings"] = V * H * 4
    out["lm_head"] = blocked_nbytes(V, H)
    q = blocked_nbytes(qr, H) + blocked_nbytes(qd, qr) if qr else blocked_nbytes(qd, H)
    out["attention"] = L * (q + blocked_nbytes(C + rope, H) + blocked_nbytes(H, nh * vd))
    out["attention_absorbed"] = L * nh * (nope * padded16(C) + padded16(C) * padded16(vd)) * 4
    out["norms"] = 4 * (2 * L * H + H + L * ((qr or 0) + C))
    out["dense_mlp"] = (L - Lm) * (blocked_nbytes(2 * Id, H) + blocked_nbytes(H, Id))
    out["shared_experts"] = Lm * (blocked_nbytes(2 * Is, H) + blocked_nbytes(H, Is)) if Is else 0
    out["routed_experts"] = Lm * keep * (blocked_nbytes(2 * I, H) + blocked_nbytes(H, I))
    out["router"] = Lm * (H * keep + keep) * 4           # the engine keeps a (zero) bias for every rule
    # The pruned layer's grouping is compress's choice; buffers depend on the counts only.
    rule = RoutingRule.from_config(cfg)._replace(n_experts=keep) if Lm else None
    rows = max(streams, PREFILL_ROWS)
    shapes = buffer_shapes(cfg, capacity=streams, window=window, rows=rows, top_k=rule.top_k if rule else 1,
                           n_experts=keep if Lm else 2, n_inputs=0, n_outputs=0)
    nbytes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, (shape, dtype) in shapes.items()}
    out["kv_cache"] = nbytes.pop("keys") + nbytes.pop("vals")
    out["buffers"] = sum(nbytes.values())
    if rule is not None:
        out["buffers"] += sum(a.nbytes for a in RouteBuffers.allocate(rule, rows))
    out["total"] = sum(out.values())
    return out


def plan(source: str | Path | ModelConfig, *, keep_experts: int | None = None, quant: str | None = None,
         gpu_mem_gb: float = DEFAULT_GPU_MEM_GB, streams: int = DEFAULT_STREAMS,
         window: int = DEFAULT_WINDOW, kv_dtype: str | None = None, float_dtype: str = "bf16",
         reserve_gb: float | None = None, engine: str = "device",
         expert_cache_slots: int | None = None) -> dict[str, Any]:
    """Plan the memory of ``source`` (name, config.json, checkpoint or package).

    ``keep_experts`` is the routed experts kept per MoE layer (default: all of them).
    ``quant`` defaults to int8 (a package's own scheme for a package: ``none`` plans as bf16).
    For int8 the bytes are what ``engine`` holds (:func:`engine_bytes`): ``device`` plans GPU
    memory (plus ``reserve_gb``, 4 GB by default, for the CUDA context, workspaces and the
    step's activations; ``expert_cache_slots`` plans the streaming expert store), ``cpu``
    the CPU engine's memory (no reserve by default). For bf16 and fp8 (formats the engines
    do not run) the bytes are what the weights take stored that way (:func:`count_bytes`).
    Returns the report: ``params_total``, ``params_active``, ``params`` and ``bytes`` by part
    (with ``total``), ``host_bytes`` (the device engine's host-side buffers), ``fits``,
    ``max_keep_experts`` (largest per-layer count, at least ``num_experts_per_tok``, whose
    total fits ``gpu_mem_gb``; None if none does) and the assumptions used.
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
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    n_routed = cfg.n_routed_experts
    if keep_experts is not None and not (cfg.num_experts_per_tok <= keep_experts <= n_routed):
        raise ValueError(f"--keep-experts must be between num_experts_per_tok="
                         f"{cfg.num_experts_per_tok} and n_routed_experts={n_routed}, got {keep_experts}")
    for name, value in (("streams", streams), ("window", window)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"--{name} must be a non-negative integer, got {value!r}")
    if reserve_gb is None:
        reserve_gb = DEFAULT_RESERVE_GB if engine == "device" or quant != "int8" else 0.0
    if gpu_mem_gb <= 0 or reserve_gb < 0:
        raise ValueError("--gpu-mem-gb must be positive and --reserve-gb non-negative")
    if quant == "int8" and kv_dtype not in (None, "fp32", "float32"):
        raise ValueError(f"--kv-dtype {kv_dtype}: the engines hold the latent cache in float32")
    if expert_cache_slots is not None and (engine != "device" or quant != "int8" or expert_cache_slots < 1):
        raise ValueError("--expert-cache-slots plans the device engine's streaming expert store (int8), "
                         "with at least one slot")
    keep = n_routed if keep_experts is None else keep_experts
    reserve = int(round(reserve_gb * 1e9))
    host_bytes = None

    def bytes_for(n_keep: int) -> dict[str, int]:
        nonlocal host_bytes
        if quant != "int8":
            return count_bytes(cfg, n_keep, quant=quant, float_dtype=float_dtype, kv_dtype=kv_dtype or "bf16",
                               streams=streams, window=window, reserve_gb=reserve_gb)
        held = engine_bytes(cfg, n_keep, engine=engine, streams=streams, window=window, embed_dtype=float_dtype,
                            expert_cache_slots=expert_cache_slots)
        parts = dict(held["device" if engine == "device" else "host"])
        host = held["host"] if engine == "device" else None
        parts.pop("total")
        parts["runtime_reserve"] = reserve
        parts["total"] = sum(parts.values())
        if n_keep == keep:
            host_bytes = host
        return parts

    params = count_params(cfg, keep)
    nbytes = bytes_for(keep)
    budget = int(round(gpu_mem_gb * 1e9))
    max_keep = None
    if cfg.n_moe_layers:
        # Bytes grow linearly in the kept count: find the largest that fits from the slope.
        base = bytes_for(0)["total"]
        per_expert = bytes_for(1)["total"] - base
        if budget >= base + cfg.num_experts_per_tok * per_expert:
            max_keep = min(n_routed, (budget - base) // per_expert) if per_expert else n_routed
            assert bytes_for(max_keep)["total"] <= budget
        per_layer_expert_bytes = per_expert
    else:
        per_layer_expert_bytes = 0
    if quant == "int8":
        held = {"device": "DeviceEngine: GPU memory", "cpu": "Engine: CPU memory"}[engine]
        linears = ("int8 in the engine's layout: 1 B/weight + fp32 scale per output channel"
                   + (", padded to multiples of 8" if engine == "device" else ""))
        float_parts = (f"embeddings {float_dtype if engine == 'device' else 'fp32'}; "
                       "kv_b_proj absorbed as fp32 W_UK/W_UV; norms and router fp32")
        kv = "fp32"
    else:
        held = f"stored weights ({quant})"
        linears = {"bf16": "2 B/weight", "fp8": "1 B/weight + fp32 scale per 128x128 block"}[quant]
        float_parts = f"embeddings {float_dtype}; norms and router fp32"
        kv = kv_dtype or "bf16"
    rows = max(streams, CUDA_MIN_ROWS) if quant == "int8" and engine == "device" else streams
    return {
        "source": info["source"],
        "kind": info["kind"],
        "quant": quant,
        "engine": engine if quant == "int8" else None,
        "keep_experts": keep,
        "n_routed_experts": n_routed,
        "n_moe_layers": cfg.n_moe_layers,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "params_total": params["total"],
        "params_active": params["active"],
        "params": {k: v for k, v in params.items() if k not in ("total", "active")},
        "bytes": nbytes,
        "host_bytes": host_bytes,
        "bytes_per_kept_expert": per_layer_expert_bytes,
        "gpu_mem_bytes": budget,
        "fits": nbytes["total"] <= budget,
        "headroom_bytes": budget - nbytes["total"],
        "max_keep_experts": max_keep,
        "assumptions": {
            "held": held,
            "gpu_mem_gb": gpu_mem_gb,
            "streams": streams,
            "window": window,
            "kv_cache": f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} latent values/token/layer "
                        f"x {cfg.num_hidden_layers} layers in {kv}, {rows} rows"
                        + (", kept in two layouts (keys by channel, values by position)" if engine == "cpu" else ""),
            "float_dtype": float_dtype,
            "reserve_gb": reserve_gb,
            "expert_cache_slots": expert_cache_slots,
            "linears": linears,
            "float_parts": float_parts,
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
    w(f"  held: {a['held']}\n")
    w(f"  {'part':<19}{'params':>12}{'bytes':>13}\n")
    for part in report["bytes"]:
        if part in ("kv_cache", "runtime_reserve", "total"):
            continue
        count = _params(report['params'][part]) if part in report["params"] else ""
        w(f"  {part:<19}{count:>12}{_gb(report['bytes'][part]):>13}\n")
    w(f"  {'kv_cache':<19}{'':>12}{_gb(report['bytes']['kv_cache']):>13}   "
      f"{a['streams']} streams x {a['window']} tokens x {a['kv_cache']}\n")
    w(f"  {'runtime_reserve':<19}{'':>12}{_gb(report['bytes']['runtime_reserve']):>13}   "
      "CUDA context, workspace, activations (--reserve-gb)\n")
    w(f"  {'-' * 44}\n")
    w(f"  {'total':<19}{_params(report['params_total']):>12}{_gb(report['bytes']['total']):>13}\n")
    if report.get("host_bytes"):
        w(f"  {'host memory':<19}{'':>12}{_gb(report['host_bytes']['total']):>13}   "
          "pinned logits buffers (and the expert store's staging buffer)\n")
    w("\n")
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

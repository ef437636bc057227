"""Memory planner: parameters and bytes of a (pruned, quantized) model, and whether it fits a GPU.

Two accountings. :func:`engine_bytes` is what an engine that ships holds, part by part,
mirroring its allocations: the device engine (``runtime.cuda.engine.DeviceEngine``: what sits in
GPU memory, and its host-side buffers) or the CPU stream engine (``runtime.cpu.engine.Engine``).
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

Across devices (expert parallel, ``devices`` > 1): the routed experts of every MoE layer are split
contiguously (:func:`expert_split`) and everything else, the engine's buffers, latent cache and
reserve included, is held on every device, plus the buffer the gathered expert outputs land in.
Each part's size comes from the same functions as on one device. :func:`exchange_traffic` gives
the bytes the ranks exchange per step.

Sizes are in decimal gigabytes (1 GB = 1e9 bytes), also for ``gpu_mem_gb``: an "80 GB" A100
has 85.9e9 bytes, so the default check keeps about 5.9 GB of extra margin.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from runtime.model.config import ModelConfig

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
CUDA_MIN_ROWS = 17          # the device engine runs at least 17 rows (runtime.model.quant.CUDA_MIN_ROWS)


#: What a plan cannot say: the quality a keep count costs. ``r1edge compress`` measures it.
QUALITY_HINT = ("what a keep count costs in quality: r1edge compress reports the held-out loss (or output "
                "error) at that count and at half and twice it (docs/pruning.md)")


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
    ``runtime.cpu.state.buffer_shapes`` at ``max(streams, PREFILL_ROWS)`` rows."""
    import numpy as np

    from runtime.cpu.int8 import blocked_nbytes, padded16
    from runtime.cpu.state import PREFILL_ROWS, buffer_shapes
    from runtime.model.routing import RouteBuffers, RoutingRule

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


def expert_split(n_experts: int, devices: int) -> list[tuple[int, int]]:
    """The contiguous split of ``n_experts`` routed experts (per MoE layer) over ``devices`` ranks.

    Returns ``[start, stop)`` per rank; when the count does not divide evenly the first ranks hold
    one more (``numpy.array_split``'s rule), so rank 0 holds the most.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    base, extra = divmod(n_experts, devices)
    out, start = [], 0
    for rank in range(devices):
        stop = start + base + (rank < extra)
        out.append((start, stop))
        start = stop
    return out


def exchange_traffic(cfg: ModelConfig, rows: int, split: list[tuple[int, int]]) -> dict[str, Any]:
    """What the ranks exchange per step when the routed experts are split as ``split``.

    Every rank runs attention, the dense layers, the router and the shared experts itself on the
    same ``rows`` tokens, so it knows every (token, expert) pair without being told. In each MoE
    layer a rank computes the output rows of the pairs whose expert it holds; every rank then
    needs every pair's row (float32, ``hidden_size`` values) to combine them in the
    single-process order, and each row travels with its int32 expert id (so a receiver checks
    that it routed the same way): ``4 * hidden + 4`` bytes per pair.

    Per MoE layer, with ``P = rows * top_k`` pairs and ``N`` ranks: all ranks together receive
    ``(N - 1) * P`` rows whatever the routing (each row reaches the N - 1 ranks that did not
    compute it), ``(N - 1) / N * P`` per rank on average. Rank r holding ``c_r`` of ``E``
    experts sends its rows to each peer, at most ``rows * min(top_k, c_r)`` of them, and receives
    at most ``rows * min(top_k, E - c_r)``. A fixed-shape ``all_gather`` pads every rank's block
    to the most any rank can own, ``rows * min(top_k, max c_r)``, and each rank then sends and
    receives ``N - 1`` such blocks. Step figures are the layer figures times the MoE layers.
    """
    n, k, lm = len(split), cfg.num_experts_per_tok, cfg.n_moe_layers
    n_experts = split[-1][1]
    pair = 4 * cfg.hidden_size + 4
    pairs = rows * k
    held = [stop - start for start, stop in split]
    total = (n - 1) * pairs * pair
    layer = {
        "all_ranks_bytes": total,
        "per_rank_mean_bytes": total / n,
        "allgather_per_rank_bytes": (n - 1) * rows * min(k, max(held)) * pair,
    }
    per_device = []
    for rank, (start, stop) in enumerate(split):
        send = (n - 1) * rows * min(k, stop - start) * pair
        receive = rows * min(k, n_experts - (stop - start)) * pair
        per_device.append({"rank": rank, "experts": [start, stop],
                           "send_max_bytes_per_layer": send, "receive_max_bytes_per_layer": receive,
                           "send_max_bytes_per_step": lm * send, "receive_max_bytes_per_step": lm * receive})
    return {
        "rows": rows,
        "top_k": k,
        "pairs_per_layer": pairs,
        "bytes_per_pair": pair,
        "n_moe_layers": lm,
        "per_layer": layer,
        "per_step": {name: lm * value for name, value in layer.items()},
        "per_device": per_device,
        "formula": f"per MoE layer, each (token, expert) pair's output row (hidden {cfg.hidden_size} float32) "
                   f"plus its int32 expert id ({pair} B) reaches the {n - 1} ranks that did not compute it: "
                   f"all ranks together (N-1) x rows x top_k x (4 x hidden + 4) B; per step x {lm} MoE layers",
    }


def plan(source: str | Path | ModelConfig, *, keep_experts: int | None = None, quant: str | None = None,
         gpu_mem_gb: float = DEFAULT_GPU_MEM_GB, streams: int = DEFAULT_STREAMS,
         window: int = DEFAULT_WINDOW, kv_dtype: str | None = None, float_dtype: str = "bf16",
         reserve_gb: float | None = None, engine: str = "device",
         expert_cache_slots: int | None = None, devices: int = 1) -> dict[str, Any]:
    """Plan the memory of ``source`` (name, config.json, checkpoint or package).

    ``keep_experts`` is the routed experts kept per MoE layer (default: all of them).
    ``quant`` defaults to int8 (a package's own scheme for a package: ``none`` plans as bf16).
    For int8 the bytes are what ``engine`` holds (:func:`engine_bytes`): ``device`` plans GPU
    memory (plus ``reserve_gb``, 4 GB by default, for the CUDA context, workspaces and the
    step's activations; ``expert_cache_slots`` plans the streaming expert store), ``cpu``
    the CPU engine's memory (no reserve by default). For bf16 and fp8 (formats the engines
    do not run) the bytes are what the weights take stored that way (:func:`count_bytes`).

    ``devices`` > 1 plans expert parallelism: the routed experts of every MoE layer split
    contiguously over the devices (:func:`expert_split`), everything else (embeddings, head,
    attention, dense layers, router, shared experts, the engine's buffers and latent cache, the
    reserve) held on every device, plus an ``exchange`` buffer for the gathered expert outputs
    (:func:`exchange_traffic` has the per-step traffic). ``gpu_mem_gb`` is per device.

    Returns the report: ``params_total``, ``params_active``, ``params`` and ``bytes`` by part
    (with ``total``; per device, the device holding the most experts), ``per_device``,
    ``host_bytes`` (the device engine's host-side buffers), ``fits`` (every device),
    ``max_keep_experts`` (largest per-layer count, at least ``num_experts_per_tok``, that fits
    ``devices`` x ``gpu_mem_gb``; None if none does), ``min_devices`` (fewest such devices
    holding ``keep_experts``; None if no count up to one expert per device does), ``traffic``
    (None on one device) and the assumptions used.
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
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices!r}")
    if devices > 1 and expert_cache_slots is not None:
        raise ValueError("--expert-cache-slots plans one device's streaming expert store; it is not planned "
                         "with --devices")
    if devices > 1 and not (cfg.n_moe_layers and devices <= keep):
        raise ValueError(f"--devices {devices}: expert parallelism needs at least one routed expert per "
                         f"device ({keep} per layer, {cfg.n_moe_layers} MoE layers)")
    reserve = int(round(reserve_gb * 1e9))
    budget = int(round(gpu_mem_gb * 1e9))
    rows = max(streams, CUDA_MIN_ROWS) if quant == "int8" and engine == "device" else streams
    if quant == "int8" and engine == "cpu":
        from runtime.cpu.state import PREFILL_ROWS
        step_rows = max(streams, PREFILL_ROWS)      # the engine's rows: a prefill pass runs this many
    else:
        step_rows = rows

    @functools.lru_cache(maxsize=None)
    def held_for(n_keep: int) -> tuple[dict[str, int], dict[str, int] | None]:
        """One process's parts (with the reserve and ``total``) and its host-side parts."""
        if quant != "int8":
            return count_bytes(cfg, n_keep, quant=quant, float_dtype=float_dtype, kv_dtype=kv_dtype or "bf16",
                               streams=streams, window=window, reserve_gb=reserve_gb), None
        held = engine_bytes(cfg, n_keep, engine=engine, streams=streams, window=window, embed_dtype=float_dtype,
                            expert_cache_slots=expert_cache_slots)
        parts = dict(held["device" if engine == "device" else "host"])
        parts.pop("total")
        parts["runtime_reserve"] = reserve
        parts["total"] = sum(parts.values())
        return parts, held["host"] if engine == "device" else None

    def per_device(n_keep: int, n_devices: int) -> list[dict[str, int]]:
        """Each device's parts: the routed experts it holds, the rest replicated, plus the exchange."""
        whole = held_for(n_keep)[0]
        if n_devices == 1:
            return [whole]
        split = expert_split(n_keep, n_devices)
        most = max(stop - start for start, stop in split)
        # The fixed-shape all_gather's output: every rank's block of pair rows (see exchange_traffic).
        exchange = n_devices * step_rows * min(cfg.num_experts_per_tok, most) * (4 * cfg.hidden_size + 4)
        out = []
        for start, stop in split:
            parts = {}
            for name, value in whole.items():
                if name == "runtime_reserve":
                    parts["exchange"] = exchange
                if name == "routed_experts":
                    value = held_for(stop - start)[0]["routed_experts"]
                if name != "total":
                    parts[name] = value
            parts["total"] = sum(parts.values())
            out.append(parts)
        return out

    def fits(n_keep: int, n_devices: int) -> bool:
        return max(p["total"] for p in per_device(n_keep, n_devices)) <= budget

    params = count_params(cfg, keep)
    devs = per_device(keep, devices)
    nbytes = devs[0]
    host_bytes = held_for(keep)[1]
    max_keep = min_devices = None
    if cfg.n_moe_layers:
        # Bytes grow with the kept count: the largest that fits, by bisection.
        lo, hi = max(cfg.num_experts_per_tok, devices), n_routed     # at least one expert per device
        if lo <= hi and fits(lo, devices):
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid, devices) else (lo, mid - 1)
            max_keep = lo
        # The exchange buffer grows with the device count, so look at every count in turn.
        min_devices = next((n for n in range(1, keep + 1) if fits(keep, n)), None)
        per_layer_expert_bytes = held_for(1)[0]["total"] - held_for(0)[0]["total"]
    else:
        min_devices = 1 if nbytes["total"] <= budget else None
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
    split = expert_split(keep, devices)
    report = {
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
        "fits": max(d["total"] for d in devs) <= budget,
        "headroom_bytes": budget - max(d["total"] for d in devs),
        "max_keep_experts": max_keep,
        "quality": QUALITY_HINT if cfg.n_routed_experts else None,
        "devices": devices,
        "per_device": [{"rank": rank, "experts": [start, stop], "bytes": d, "fits": d["total"] <= budget,
                        "headroom_bytes": budget - d["total"]}
                       for rank, ((start, stop), d) in enumerate(zip(split, devs))],
        "bytes_all_devices": sum(d["total"] for d in devs),
        "min_devices": min_devices,
        "traffic": exchange_traffic(cfg, streams, split) if devices > 1 else None,
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
            "exchange_rows": step_rows if devices > 1 else None,
            "linears": linears,
            "float_parts": float_parts,
            "units": "1 GB = 1e9 bytes",
        },
    }
    return report


def _gb(n: int, unit: str = "GB") -> str:
    return f"{n / _UNITS[unit]:9.2f} {unit}"


_UNITS = {"GB": 1e9, "MB": 1e6, "KB": 1e3}


def _unit(n: int) -> str:
    """The unit a table whose largest figure is ``n`` bytes is written in (GB from 1 GB up)."""
    return "GB" if n >= 1e9 else "MB" if n >= 1e6 else "KB"


def _params(n: int) -> str:
    return f"{n / 1e9:9.3f} B" if n >= 1e8 else f"{n / 1e6:9.3f} M"


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _rank_groups(report: dict[str, Any]) -> list[tuple[int, int, dict[str, Any]]]:
    """Consecutive ranks holding the same number of experts (their bytes are equal): (first, last, device)."""
    groups: list[tuple[int, int, dict[str, Any]]] = []
    for dev in report["per_device"]:
        held = dev["experts"][1] - dev["experts"][0]
        if groups and groups[-1][2]["experts"][1] - groups[-1][2]["experts"][0] == held:
            groups[-1] = (groups[-1][0], dev["rank"], groups[-1][2])
        else:
            groups.append((dev["rank"], dev["rank"], dev))
    return groups


def render_plan(report: dict[str, Any], out=None) -> None:
    """Print a plan as a table with the accounting shown (per device, and the traffic, across devices)."""
    import sys
    out = out or sys.stdout
    a = report["assumptions"]
    w = out.write
    n_dev = report["devices"]
    gpu = f"{a['gpu_mem_gb']:g} GB"
    cpu = report.get("engine") == "cpu"
    memory = "host memory" if cpu else "GPU memory"
    unit = _unit(report.get("bytes_all_devices", report["bytes"]["total"]))
    w(f"Memory plan for {report['source']} ({report['kind']}), quant {report['quant']}, "
      f"{report['keep_experts']} of {report['n_routed_experts']} routed experts kept in each of "
      f"{report['n_moe_layers']} MoE layers ({report['num_hidden_layers']} layers)"
      + (f", expert parallel over {n_dev} devices" if n_dev > 1 else "") + "\n\n")
    groups = _rank_groups(report) if n_dev > 1 else [(0, 0, {"bytes": report["bytes"]})]
    if n_dev > 1:
        w(f"  held: {a['held']}, per device; routed experts split contiguously, everything else on every device\n")
        heads = [f"rank {f}" if f == l else f"ranks {f}-{l}" for f, l, _ in groups]
        w(f"  {'':<19}{'whole model':>12}" + "".join(f"{h:>13}" for h in heads) + "\n")
        held = [f"{d['experts'][1] - d['experts'][0]} experts" for _, _, d in groups]
        w(f"  {'part':<19}{'params':>12}" + "".join(f"{h:>13}" for h in held) + "\n")
    else:
        w(f"  held: {a['held']}\n")
        w(f"  {'part':<19}{'params':>12}{'bytes':>13}\n")
    notes = {
        "kv_cache": f"{a['streams']} streams x {a['window']} tokens x {a['kv_cache']}",
        "runtime_reserve": ("the process beside the engine (--reserve-gb)" if cpu
                            else "CUDA context, workspace, activations (--reserve-gb)"),
    }
    if n_dev > 1:
        t = report["traffic"]
        most = max(d["experts"][1] - d["experts"][0] for d in report["per_device"])
        notes["routed_experts"] = "per layer: " + ", ".join(
            f"rank {d['rank']} {d['experts'][0]}-{d['experts'][1] - 1}" for d in report["per_device"][:2]) + (
            ", ..." if n_dev > 2 else "")
        notes["exchange"] = (f"gathered expert outputs: {n_dev} ranks x {a['exchange_rows']} rows x "
                             f"min(top-{t['top_k']}, {most}) pairs x {t['bytes_per_pair']:,} B")
    last = ("kv_cache", "runtime_reserve", "total")
    for part in [p for p in report["bytes"] if p not in last] + ["kv_cache", "runtime_reserve"]:
        count = _params(report['params'][part]) if part in report["params"] else ""
        cells = "".join(f"{_gb(d['bytes'][part], unit):>13}" for _, _, d in groups)
        note = f"   {notes[part]}" if part in notes else ""
        w(f"  {part:<19}{count:>12}{cells}{note}\n")
    w(f"  {'-' * (31 + 13 * len(groups))}\n")
    cells = "".join(f"{_gb(d['bytes']['total'], unit):>13}" for _, _, d in groups)
    w(f"  {'total':<19}{_params(report['params_total']):>12}{cells}\n")
    if n_dev > 1:
        w(f"  {f'all {n_dev} devices':<19}{'':>12}{_gb(report['bytes_all_devices'], unit):>13}\n")
    if report.get("host_bytes"):
        w(f"  {'host memory':<19}{'':>12}{_gb(report['host_bytes']['total'], unit):>13}   "
          "pinned logits buffers (and the expert store's staging buffer)" + (", per device" if n_dev > 1 else "")
          + "\n")
    w("\n")
    w(f"  parameters active per token: {_params(report['params_active']).strip()}\n")
    w(f"  linear weights: {a['linears']}; {a['float_parts']}; {a['units']}\n")
    w(f"  each kept expert per layer adds {_gb(report['bytes_per_kept_expert'], unit).strip()} "
      f"over {report['n_moe_layers']} MoE layers\n")
    verdict = "fits" if report["fits"] else "does NOT fit"
    where = f"{n_dev} x {gpu}" if n_dev > 1 else gpu
    w(f"  {memory} {where}: {verdict} (headroom {report['headroom_bytes'] / 1e9:.2f} GB"
      + (" on the fullest device" if n_dev > 1 else "") + ")\n")
    mk, md = report["max_keep_experts"], report["min_devices"]
    if not report["n_moe_layers"]:
        w("  no MoE layers: nothing to prune\n")
    elif mk is None:
        w(f"  no kept-expert count >= num_experts_per_tok={report['num_experts_per_tok']} fits {where}\n")
    else:
        w(f"  largest --keep-experts that fits {where}: {mk}\n")
        if report["kind"] in ("checkpoint", "package"):    # something one can compress
            w(f"  {QUALITY_HINT}\n")
    if report["n_moe_layers"] and (n_dev > 1 or not report["fits"]):
        kept = f"{report['keep_experts']} experts per layer"
        if md is None:
            w(f"  no number of {gpu} devices (up to one expert each) holds {kept}\n")
        else:
            w(f"  fewest {gpu} devices that hold {kept}: {md} (--devices {md})\n")
    if n_dev > 1:
        _render_traffic(report["traffic"], n_dev, w)


def _render_traffic(t: dict[str, Any], n_dev: int, w) -> None:
    """The per-step exchange between ranks, per layer and per step."""
    lay, step = t["per_layer"], t["per_step"]
    send = max(d["send_max_bytes_per_layer"] for d in t["per_device"])
    receive = max(d["receive_max_bytes_per_layer"] for d in t["per_device"])
    rows = [
        ("all ranks together", lay["all_ranks_bytes"], step["all_ranks_bytes"],
         f"({n_dev}-1) x {t['pairs_per_layer']} pairs x {t['bytes_per_pair']:,} B"),
        ("per rank, mean", lay["per_rank_mean_bytes"], step["per_rank_mean_bytes"], "received (and sent)"),
        ("per rank, at most", send, t["n_moe_layers"] * send, "sent"),
        ("per rank, at most", receive, t["n_moe_layers"] * receive, "received"),
        ("fixed-shape gather", lay["allgather_per_rank_bytes"], step["allgather_per_rank_bytes"],
         "per rank sent and received, every block padded to the most a rank can own"),
    ]
    w(f"\n  traffic between ranks, batch of {t['rows']} rows x top-{t['top_k']} = {t['pairs_per_layer']} "
      f"(token, expert) pairs per MoE layer\n")
    w(f"  each pair's output row ({t['bytes_per_pair'] // 4 - 1} float32) and its int32 expert id, "
      f"{t['bytes_per_pair']:,} B, reaches the {n_dev - 1} ranks that did not compute it;\n"
      f"  a step is {t['n_moe_layers']} MoE layers (JSON: traffic.formula)\n")
    w(f"  {'':<22}{'per layer':>12}{'per step':>12}\n")
    for name, per_layer, per_step, note in rows:
        w(f"  {name:<22}{_size(per_layer):>12}{_size(per_step):>12}   {note}\n")

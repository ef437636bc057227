"""``sdk.load_model``: HF checkpoints and r1edge packages into the runtime model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from runtime.model.config import ModelConfig
from runtime.model.transformer import Transformer, cast_keeping_router_fp32
from runtime.model.weights import CheckpointReader, load_checkpoint

log = logging.getLogger(__name__)

QUANT_MODES = (None, "int8", "w8")


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quant: str | None = None, mmap: bool = False,
               public_key: str | Path | Sequence[str | Path] | None = None) -> Transformer:
    """Load an HF DeepSeek-V3 checkpoint directory or an r1edge package.

    ``quant="int8"`` quantizes a float checkpoint on load (W8A8: per-output-channel int8
    weights, per-token dynamic int8 activations); ``quant="w8"`` is weight-only int8.
    Packages carry their own quantization and ignore ``quant``; ``mmap=True`` maps a
    package's weights instead of copying them (see ``sdk.tools.package.load_package``). Errors name
    the file or tensor at fault.

    On the CPU, ``generate`` of a W8A8 model (``quant="int8"`` or an int8 package) runs on the
    stream engine (:class:`EngineGenerate`): greedy, bitwise what stepping ``Engine`` by hand
    gives, and a row's tokens are the same alone or in any batch. ``model(input_ids)`` stays
    the reference forward (torch ops), as does ``generate`` of float and ``"w8"`` models.

    ``public_key`` (a PEM file or a list of them) requires a package signed by one of those
    keys whose manifest and files are unchanged since signing (``sdk.tools.signing``); an
    unsigned, untrusted or changed package, or a plain checkpoint, raises ``PackageError``
    naming the package and what failed.
    """
    path = Path(path)
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or package")
    if public_key is not None:
        from sdk.tools.package import PackageError
        from sdk.tools.signing import verify_signature

        if not (path / "manifest.json").exists():
            raise PackageError(f"{path}: a signed package is required (a public key is given) but this is a "
                               "checkpoint; only r1edge packages carry signatures")
        # The files are then checked against the signed manifest by load_package.
        verify_signature(path, [public_key] if isinstance(public_key, (str, Path)) else public_key)
    if (path / "manifest.json").exists():
        from sdk.tools.package import load_package

        return _with_engine_generate(load_package(path, device=device, dtype=dtype, mmap=mmap))
    cfg = ModelConfig.from_json(path / "config.json")
    reader = CheckpointReader(path)
    with torch.device("cpu"):
        model = cast_keeping_router_fp32(Transformer(cfg), dtype)
    load_checkpoint(model, reader)
    if quant is not None:
        from runtime.model.quant import quantize_model

        quantize_model(model, mode="w8a8" if quant == "int8" else "w8")
    return _with_engine_generate(model.eval().to(device))


class EngineGenerate:
    """``model.generate`` of a W8A8 model on the CPU: greedy decoding on the stream engine.

    Same call and result as ``Transformer.generate`` (LongTensor [B,T] -> [B,T+N]), through
    ``runtime.cpu.generate.decode``: the prompt is fed token by token, then each step feeds the
    argmax of the last logits. The engine is built on first use and kept, grown (capacity to
    the batch, window to the next power of two >= T+N) when a call needs more, so every
    token attends to its whole row, as in the reference. Building it copies the int8 weights
    into the engine's layout once. Not thread-safe: one call at a time per model.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.engine = None

    def engine_for(self, batch: int, length: int):
        """The kept engine, rebuilt larger when it has fewer than ``batch`` slots or a window
        shorter than ``length`` tokens."""
        from runtime.cpu.engine import Engine

        e = self.engine
        if e is None or e.capacity < batch or e.window < length:
            capacity = max(batch, e.capacity if e is not None else 1)
            window = max(64, 1 << (length - 1).bit_length(), e.window if e is not None else 0)
            self.engine = None          # free the old buffers before allocating the new ones
            self.engine = Engine(self.model, capacity=capacity, window=window)
        return self.engine

    def __call__(self, input_ids: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy decoding: LongTensor [B,T] -> [B,T+max_new_tokens]."""
        from runtime.cpu.generate import decode

        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a LongTensor [B, T] with T >= 1, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if max_new_tokens <= 0:
            return input_ids
        B, T = input_ids.shape
        engine = self.engine_for(B, T + max_new_tokens)
        rows = decode(engine, input_ids.cpu().numpy(), max_new_tokens)
        new = torch.tensor([r.tokens for r in rows], dtype=torch.long)
        return torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)


def _with_engine_generate(model: Transformer) -> Transformer:
    """Route ``generate`` of a W8A8 model on the CPU through the stream engine."""
    from runtime.model.quant import Int8Linear

    w8a8 = any(isinstance(m, Int8Linear) and m.mode == "w8a8" for m in model.modules())
    if w8a8 and model.device.type == "cpu":
        model.generate = EngineGenerate(model)
    return model


def _checkpoint_quant(reader: CheckpointReader) -> str:
    """The storage format of a checkpoint's linear weights, read from the file headers."""
    dtypes = {}
    for name in reader.names():
        if name.endswith("_proj.weight"):
            dtypes[name] = reader.dtype(name)
    kinds = sorted(set(dtypes.values()))
    if "F8_E4M3" in kinds:
        return "fp8-e4m3 (128x128 block scales)"
    return "/".join(k.lower() for k in kinds) or "unknown"


def describe(path: str | Path) -> dict:
    """What ``r1edge inspect`` reports: config, parameter counts, experts, quantization, size, I/O."""
    from sdk.tools.plan import count_params, resolve_config

    path = Path(path)
    cfg, info = resolve_config(path)
    if not path.is_dir():
        raise ValueError(f"{path}: inspect takes a checkpoint or package directory")
    if info["kind"] == "package":
        from sdk.tools.package import read_manifest

        manifest = read_manifest(path)
        quant = manifest.get("quantization", {}).get("scheme", "none")
        kept = manifest.get("experts", {}).get("kept", {})
        experts = [len(kept.get(str(i), range(cfg.n_routed_experts))) for i in
                   range(cfg.first_k_dense_replace, cfg.num_hidden_layers)]
        io = manifest.get("io")
        original_experts = manifest.get("experts", {}).get("original_n_routed_experts", cfg.n_routed_experts)
        from sdk.tools.signing import signer

        signed = signer(path)
    else:
        signed = None
        quant = _checkpoint_quant(CheckpointReader(path))
        experts = [cfg.n_routed_experts] * cfg.n_moe_layers
        io = None
        original_experts = cfg.n_routed_experts
    counts = count_params(cfg)
    return {
        "path": str(path),
        "kind": info["kind"],
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.first_k_dense_replace,
        "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "vocab_size": cfg.vocab_size,
        "routed_experts": original_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "groups": {"n_group": cfg.n_group, "topk_group": cfg.topk_group},
        "rope": {"theta": cfg.rope_theta, "scaling": cfg.rope_scaling, "interleave": cfg.rope_interleave},
        "params_total": counts["total"],
        "params_active": counts["active"],
        "experts_per_layer": experts,
        "quant": quant,
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "io": io,
        "signed_by": signed,
    }


def render_description(d: dict) -> None:
    """Human-readable form of :func:`describe`."""
    def human(n: float, unit: str = "") -> str:
        for suffix in ("", "K", "M", "G", "T"):
            if abs(n) < 1000:
                return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
            n /= 1000
        return f"{n:.1f}P{unit}"

    experts = d["experts_per_layer"]
    span = (f"{min(experts)}-{max(experts)}" if experts and min(experts) != max(experts)
            else str(experts[0]) if experts else "none")
    print(f"{d['path']}  ({d['kind']}, {d['model_type']})")
    print(f"  layers            {d['layers']} ({d['dense_layers']} dense, {len(experts)} MoE)")
    print(f"  hidden / heads    {d['hidden_size']} / {d['attention_heads']}  "
          f"(q_lora {d['q_lora_rank']}, kv_lora {d['kv_lora_rank']})")
    print(f"  experts           {span} routed per MoE layer (of {d['routed_experts']}), "
          f"{d['shared_experts']} shared, top-{d['experts_per_token']}, "
          f"{d['groups']['n_group']} groups keep {d['groups']['topk_group']}")
    print(f"  parameters        {human(d['params_total'])} total, {human(d['params_active'])} active per token")
    print(f"  quantization      {d['quant']}")
    print(f"  size on disk      {human(d['size_bytes'], 'B')}")
    signed = d.get("signed_by")
    if d["kind"] == "package":
        print("  signed by         " + ("nobody (unsigned)" if signed is None else
                                        f"{signed['fingerprint']}"
                                        + (f" ({signed['identity']})" if signed["identity"] else "")
                                        + ("" if signed["intact"] else ", BROKEN: changed after signing")))
    if d["io"]:
        print(f"  inputs            {', '.join(d['io']['inputs'])}")
        print(f"  outputs           {', '.join(d['io']['outputs'])}")
    else:
        print("  I/O               LM mode (token ids in, logits out)")

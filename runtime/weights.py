"""Reading HF-layout safetensors checkpoints lazily, and loading them into the runtime model.

Tensors are memory-mapped and read one at a time, so loading never holds the model twice.
FP8 checkpoints (``float8_e4m3fn`` weights with 128x128 ``*_scale_inv`` blocks, as in the
official DeepSeek-V3/R1 release) are dequantized on read. Multi-token-prediction layers
(index >= ``num_hidden_layers``) are ignored.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime.config import ModelConfig

log = logging.getLogger(__name__)

FP8_BLOCK = 128
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unreadable or misshapen; the message names it."""


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W = fp8 * scale_inv[i // 128, j // 128]; edge blocks may be partial."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


class CheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory (single file or sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise CheckpointError(f"{self.path}: only pickle weights ({', '.join(pickles)}); r1edge reads "
                                      "safetensors only (pickle can run code). Convert them to safetensors first.")
            raise CheckpointError(f"{self.path}: no *.safetensors weight files")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{file}: listed in model.safetensors.index.json but missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: unreadable safetensors file ({exc}); truncated or corrupt?") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.path / self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading it."""
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Stored dtype of tensor ``name`` as safetensors spells it (``F32``, ``BF16``, ``F8_E4M3``...)."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read tensor ``name`` (FP8 weights dequantized with their block scales) as ``dtype``."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            tensor = self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({exc})") from None
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + "_scale_inv"
            if scale_name not in self._where:
                raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
            scale = self.get(scale_name, None)
            expected = tuple(-(-d // FP8_BLOCK) for d in tensor.shape)
            if tuple(scale.shape) != expected:
                raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} has shape {tuple(scale.shape)}, "
                                      f"expected {expected} for 128x128 blocks of {tuple(tensor.shape)}")
            return dequantize_fp8(tensor, scale, dtype or torch.float32)
        return tensor if dtype is None else tensor.to(dtype)

    def layer_names(self, layer: int) -> list[str]:
        """Tensor names belonging to decoder layer ``layer``."""
        prefix = f"model.layers.{layer}."
        return [n for n in self._where if n.startswith(prefix)]


def _copy_checked(reader: CheckpointReader, name: str, target: torch.Tensor) -> None:
    shape = reader.shape(name) if name in reader else None
    if shape is None:
        raise CheckpointError(f"{reader.path}: tensor {name!r} is missing from the checkpoint")
    if tuple(shape) != tuple(target.shape):
        raise CheckpointError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(shape)}, "
                              f"expected {tuple(target.shape)} from config.json")
    with torch.no_grad():
        target.copy_(reader.get(name, target.dtype))


def load_layer(layer_module: nn.Module, reader: CheckpointReader, layer: int, cfg: ModelConfig) -> None:
    """Fill one decoder layer (a ``runtime.model.Block``) from the checkpoint."""
    prefix = f"model.layers.{layer}."
    for local, param in _named_tensors(layer_module):
        if local.startswith("mlp.experts."):
            continue
        _copy_checked(reader, prefix + local, param)
    if cfg.is_moe_layer(layer):
        experts = layer_module.mlp.experts
        inter = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts):
            base = f"{prefix}mlp.experts.{e}."
            _copy_checked(reader, base + "gate_proj.weight", experts.gate_up_proj[e, :inter])
            _copy_checked(reader, base + "up_proj.weight", experts.gate_up_proj[e, inter:])
            _copy_checked(reader, base + "down_proj.weight", experts.down_proj[e])


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if n.endswith("e_score_correction_bias"))


def load_checkpoint(model: nn.Module, reader: CheckpointReader, progress=None) -> None:
    """Fill a ``runtime.model.Transformer`` from an HF checkpoint, checking every name and shape."""
    cfg = model.config
    _copy_checked(reader, "model.embed_tokens.weight", model.model.embed_tokens.weight)
    _copy_checked(reader, "model.norm.weight", model.model.norm.weight)
    if "lm_head.weight" in reader or not cfg.tie_word_embeddings:
        _copy_checked(reader, "lm_head.weight", model.lm_head.weight)
    else:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        load_layer(layer, reader, i, cfg)
        if progress is not None:
            progress(i)
    extra = sorted({m.group(1) for n in reader.names() if (m := _LAYER.match(n))
                    and int(m.group(1)) >= cfg.num_hidden_layers})
    if extra:
        log.info("ignoring layers %s (multi-token-prediction weights)", ", ".join(extra))

"""``sdk.load_model``: HF checkpoints and r1edge packages into the runtime model."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from runtime.config import ModelConfig
from runtime.model import Transformer
from runtime.weights import CheckpointReader, load_checkpoint

log = logging.getLogger(__name__)

QUANT_MODES = (None, "int8", "w8")


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quant: str | None = None) -> Transformer:
    """Load an HF DeepSeek-V3 checkpoint directory or an r1edge package.

    ``quant="int8"`` quantizes a float checkpoint on load (W8A8: per-output-channel int8
    weights, per-token dynamic int8 activations); ``quant="w8"`` is weight-only int8.
    Packages carry their own quantization and ignore ``quant``. Errors name the file or
    tensor at fault.
    """
    path = Path(path)
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or package")
    if (path / "manifest.json").exists():
        from sdk.package import load_package

        return load_package(path, device=device, dtype=dtype)
    cfg = ModelConfig.from_json(path / "config.json")
    reader = CheckpointReader(path)
    with torch.device("cpu"):
        model = Transformer(cfg).to(dtype)
    model.model.layers.apply(_keep_router_fp32)
    load_checkpoint(model, reader)
    if quant is not None:
        from runtime.quant import quantize_model

        quantize_model(model, mode="w8a8" if quant == "int8" else "w8")
    return model.eval().to(device)


def _keep_router_fp32(module: torch.nn.Module) -> None:
    from runtime.model import Gate

    if isinstance(module, Gate):
        module.float()

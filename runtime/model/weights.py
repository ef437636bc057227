"""Reading HF-layout safetensors checkpoints lazily, and loading them into the runtime model.

Files are memory-mapped and a tensor, or a block of its rows, is read on demand, so loading
never holds the model twice and compressing never holds more than the block it works on:
each read copies (and converts) the bytes it needs and then drops those pages from the
process's mapping, so the source costs no resident memory between reads (the OS keeps them
in its page cache). FP8 checkpoints (``float8_e4m3fn`` weights with 128x128 ``*_scale_inv``
blocks, as in the official DeepSeek-V3/R1 release) are dequantized on read, block row by
block row. Multi-token-prediction layers (index >= ``num_hidden_layers``) are ignored.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
from pathlib import Path

import torch
from numba import njit, prange
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime.model.config import ModelConfig

log = logging.getLogger(__name__)

FP8_BLOCK = 128
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unreadable or misshapen; the message names it."""


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32, first_row: int = 0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W = fp8 * scale_inv[i // 128, j // 128]; edge blocks may be partial.

    ``weight`` may be rows ``first_row..`` of the full weight (``scale_inv`` is always the full
    block grid); ``out`` (float32, the weight's shape) receives the result when given. Works
    one 128-row block at a time, so it needs no memory beyond the result.
    """
    rows, cols = weight.shape
    res = torch.empty(rows, cols) if out is None else out
    _dequantize_rows(weight.contiguous().view(torch.uint8).numpy(), _FP8_VALUES,
                     scale_inv.float().contiguous().numpy(), first_row, res.numpy())
    return res if dtype == torch.float32 else res.to(dtype)


@njit(cache=True, parallel=True)
def _dequantize_rows(codes, values, scale_inv, first_row, out):
    """out[i, j] = values[codes[i, j]] * scale_inv[(first_row + i) // 128, j // 128]: the 256
    codes' float32 values by table (torch's own conversion gives the same bits, 5x slower)."""
    for i in prange(codes.shape[0]):
        srow = scale_inv[(first_row + i) // 128]
        for j in range(codes.shape[1]):
            out[i, j] = values[codes[i, j]] * srow[j // 128]


_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ELEMENT_SIZE = {k: torch.empty((), dtype=v).element_size() for k, v in _DTYPES.items()}


#: The largest safetensors header read (safetensors' own limit): a bigger length is hostile.
MAX_HEADER_BYTES = 100 << 20


def read_header(path: str | Path) -> tuple[dict, int]:
    """The validated header of safetensors file ``path``: ``({tensor name: {"dtype", "shape",
    "data_offsets"}}, data start)``, ``__metadata__`` left out.

    Checked before anything is mapped or allocated, the same for every reader (the package's
    read and mmap paths and the checkpoint reader): the 8-byte length is within the file and
    100 MiB; the header is a JSON object; each tensor has a known dtype, a list of
    non-negative integer dims and ``[begin, end]`` offsets inside the file whose length is the
    shape's bytes; no two tensors overlap. Raises ``CheckpointError`` naming the file (and the
    tensor), never anything else for bad bytes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its "
                                      "8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} runs past the file ({size} bytes) or "
                                      f"{MAX_HEADER_BYTES} bytes; truncated or corrupt?")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    data = size - 8 - n
    spans = []
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {str(dtype)[:40]!r} (one of {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {str(shape)[:80]} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise CheckpointError(f"{where}: data_offsets {str(offsets)[:80]} are not [begin, end] within the "
                                  f"file's {data} data bytes")
        nbytes = math.prod(shape) * _ELEMENT_SIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, its dtype and "
                                  f"shape need {nbytes}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensor {b!r} overlaps tensor {a!r}")
    return header, 8 + n


def check_weight_file_name(name, where: str) -> None:
    """Refuse a weight file name that is not a plain ``*.safetensors`` name in its directory
    (an index naming ``../x``, ``/dev/zero`` or a sub-directory), naming ``where``."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or name.startswith(".") or "\0" in name):
        raise CheckpointError(f"{where}: {str(name)[:200]!r} is not a plain *.safetensors file name in the "
                              "checkpoint directory")


class MappedFile:
    """A safetensors file's header (validated by :func:`read_header`) and a private read-only
    view of its data (memory-mapped)."""

    def __init__(self, path: Path):
        self.entries, self.start = read_header(path)
        try:
            with open(path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot be mapped ({exc})") from None

    def view(self, name: str, first: int, count: int) -> tuple[torch.Tensor, int, int]:
        """Rows ``first..first+count`` (along dim 0) of tensor ``name`` as a tensor over the
        mapping, and the byte range it covers (to drop after copying)."""
        e = self.entries[name]
        dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        lo = self.start + e["data_offsets"][0] + first * row
        t = torch.frombuffer(self.mm, dtype=torch.uint8, count=count * row, offset=lo) if count * row else \
            torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).view((count, *shape[1:])), lo, lo + count * row

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of the mapping: no copy; its pages are read on first use
        and stay in the OS page cache (they count as file-backed, reclaimable memory)."""
        shape = tuple(self.entries[name]["shape"])
        view = self.view(name, 0, shape[0] if shape else 1)[0]
        return view.reshape(shape)

    def drop(self, lo: int, hi: int) -> None:
        """Drop the mapped pages of bytes ``lo..hi`` from this process (they stay in the page cache)."""
        lo -= lo % mmap.PAGESIZE
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


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
            except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({str(exc)[:200]})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            for tensor, name in weight_map.items():       # before any file is opened
                check_weight_file_name(name, f"{index}: weight_map[{tensor[:200]!r}]")
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
        self._maps: dict[str, MappedFile] = {}
        self._where: dict[str, str] = {}
        self.bytes_read = 0
        for name in files:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{file}: listed in model.safetensors.index.json but missing")
            if not file.is_file():
                raise CheckpointError(f"{file}: not a regular file")
            read_header(file)
            try:
                handle = safe_open(str(file), framework="pt")      # validates the header and offsets
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

    def nbytes(self, name: str) -> int:
        """Bytes tensor ``name`` occupies in its file (FP8 block scales not included)."""
        e = self._map(name).entries[name]
        return e["data_offsets"][1] - e["data_offsets"][0]

    def _map(self, name: str) -> MappedFile:
        file = self._where[name]
        if file not in self._maps:
            self._maps[file] = MappedFile(self.path / file)
        return self._maps[file]

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read tensor ``name`` (FP8 weights dequantized with their block scales) as ``dtype``."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self.rows(name, 0, self.shape(name)[0] if self.shape(name) else None, dtype)

    def element_size(self, name: str) -> int:
        """Bytes per element of tensor ``name`` as stored."""
        return torch.empty((), dtype=_DTYPES[self.dtype(name)]).element_size()

    def rows(self, name: str, first: int, stop: int | None, dtype: torch.dtype | None = torch.float32,
             out: torch.Tensor | None = None, count: bool = True) -> torch.Tensor:
        """Rows ``first..stop`` (dim 0) of tensor ``name`` as a new tensor of ``dtype`` (None: as
        stored), FP8 dequantized; into ``out`` (float32) when given. A 0-d tensor takes
        ``stop=None``. The pages read are dropped from the process afterwards; ``bytes_read``
        counts them (``count``), block scales aside."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        mapped = self._map(name)
        scalar = stop is None
        try:
            view, lo, hi = mapped.view(name, 0 if scalar else first, 1 if scalar else stop - first)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({exc})") from None
        if scalar:
            view = view.reshape(())
        self.bytes_read += (hi - lo) if count else 0
        try:
            if view.dtype == torch.float8_e4m3fn:
                scale_name = name + "_scale_inv"
                if scale_name not in self._where:
                    raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
                expected = tuple(-(-d // FP8_BLOCK) for d in self.shape(name))
                if self.shape(scale_name) != expected:
                    raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} has shape "
                                          f"{self.shape(scale_name)}, expected {expected} for 128x128 blocks of "
                                          f"{self.shape(name)}")
                scale = self.rows(scale_name, 0, expected[0], torch.float32, count=False)
                return dequantize_fp8(view, scale, dtype or torch.float32, first, out)
            if out is not None:
                return out.copy_(view)
            return view.clone() if dtype is None or dtype == view.dtype else view.to(dtype)
        finally:
            del view
            mapped.drop(lo, hi)

    def gather(self, name: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of a 2-D float tensor (embedding lookup) without reading the others."""
        mapped = self._map(name)
        view, lo, hi = mapped.view(name, 0, self.shape(name)[0])
        try:
            return view[ids].to(dtype)
        finally:
            del view
            mapped.drop(lo, hi)

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
    """Fill one decoder layer (a ``runtime.model.transformer.Block``) from the checkpoint."""
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
    """Fill a ``runtime.model.transformer.Transformer`` from an HF checkpoint, checking every name and shape."""
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

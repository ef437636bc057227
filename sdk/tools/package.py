"""r1edge packages: a directory with ``manifest.json`` and safetensors weight files.

``manifest.json`` holds the format and its version, the (pruned) model config, the
quantization scheme, the kept-expert map from original expert ids, the I/O signature (or
null in LM mode), the calibration summary, the quality report and the sha256 and size of
every other file. Weight files are safetensors only (no pickle), side by side at the top
level (so the directory also reads as a plain safetensors checkpoint); tensor names are the
runtime model's own ``state_dict()`` names. The only other files a package may hold are the
checkpoint's text files (``TEXT_FILES``: tokenizer, its config with the chat template, the
generation config), copied as they are and hashed like the weights.

A package is written into a temporary sibling directory and renamed into place only when
complete, so a crash never leaves a half-written package behind under the target name.
Loading verifies every file before a single tensor is read: a missing, extra, truncated or
tampered file is refused with an error naming it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from runtime.model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "r1edge-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The package's signature (``sdk.tools.signing``): beside the manifest, not listed in it.
SIGNATURE = "signature.json"
SCHEMES = ("w8a8-int8", "none")
REQUIRED_KEYS = ("format", "format_version", "config", "quantization", "experts", "files")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_CHUNK = 1 << 22


class PackageError(ValueError):
    """A package is malformed, incomplete or tampered with; the message names the file or key."""


def r1edge_version() -> str:
    """The installed r1edge version (what a package's ``created_by`` names); "0.1.0" when running
    from a source tree that is not installed."""
    try:
        from importlib.metadata import version
        return version("r1edge")
    except Exception:       # not installed (running from a source tree)
        return "0.1.0"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a ``manifest.json`` (not whether it verifies)."""
    return (Path(path) / MANIFEST).is_file()


def _check_file_name(name: Any, where: str, text_ok: bool = False) -> None:
    if text_ok and name in TEXT_FILES:
        return
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise PackageError(f"{where}: weight file {name!r} is not a .safetensors file "
                           "(packages hold safetensors only)")
    if "/" in name or "\\" in name or name.startswith("."):
        raise PackageError(f"{where}: weight file name {name!r} must be a plain file name at the "
                           "package's top level")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16",
                      torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


class TensorFileWriter:
    """One safetensors file written piece by piece, never holding its tensors in memory.

    The header (every tensor's name, dtype and shape, in the order given) is written first
    and the file is sized to its final length; :meth:`assign` then writes any part of a
    tensor (rows, one expert of a stack, a block of columns) through a shared memory map
    and drops those pages from this process at once, so resident memory stays at the
    piece being written. The result reads as any safetensors file; the same pieces give
    the same bytes. :meth:`close` returns the file's sha256 and size.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._spans: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._spans[name] = (dtype, tuple(shape), offset)
            offset += size
        self.names = list(specs)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.bytes = self._data_start + offset
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(self.bytes)
        self._file = open(self.path, "r+b")
        self._mm = mmap.mmap(self._file.fileno(), self.bytes)

    def assign(self, name: str, index, value: torch.Tensor) -> None:
        """``tensor[index] = value`` for the stored tensor ``name`` (any torch indexing)."""
        dtype, shape, offset = self._spans[name]
        count = math.prod(shape)
        if count == 0:
            return
        size = count * torch.empty((), dtype=dtype).element_size()
        start = self._data_start + offset
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=size, offset=start)
        target = flat.view(dtype).view(shape)[index]
        target.copy_(value)
        lo = start + target.storage_offset() * target.element_size()
        hi = lo + (1 + sum((n - 1) * s for n, s in zip(target.shape, target.stride()))) * target.element_size()
        del flat, target
        page = mmap.PAGESIZE
        lo -= lo % page
        self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> dict[str, Any]:
        """Finish the file; returns ``{"sha256", "bytes"}`` as a manifest records them."""
        self._mm.close()
        self._file.close()
        return {"sha256": sha256_file(self.path), "bytes": self.bytes}


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` unless a package may be written to ``out_dir``: it is absent
    or empty, or (with ``overwrite``) an r1edge package. Tools that work long before they
    write call it first, so that a taken ``--out`` is refused before the work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists (choose another --out, or pass --overwrite)")
        if not is_package(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not an r1edge package; refusing to replace it")


class PackageWriter:
    """Writes a package shard by shard, hashing each file, and commits it atomically.

    Use as a context manager: ``add(file_name, tensors)`` for each shard (or :meth:`open` a
    :class:`TensorFileWriter` and :meth:`commit` it, to write a shard piece by piece), then
    ``finish(manifest)``. The files go to a temporary directory that is renamed into place by
    ``finish``; if the block raises, or ``finish`` is never called, it is removed and nothing
    appears at ``out_dir``. With ``work_dir`` the files go there instead and it is kept when
    the block raises: a later writer on the same ``work_dir`` can :meth:`adopt` the files
    already committed (resuming).
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, work_dir: str | Path | None = None):
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir, overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        if work_dir is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        else:
            self.tmp = Path(work_dir)
            self.tmp.mkdir(parents=True, exist_ok=True)
        self.keep_on_error = work_dir is not None
        self.files: dict[str, dict[str, Any]] = {}
        self.tensor_names: set[str] = set()
        self.overwrite = overwrite
        self.bytes_written = 0

    def __enter__(self) -> "PackageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists() and not (exc_type is not None and self.keep_on_error):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _check_new(self, file_name: str, names) -> None:
        _check_file_name(file_name, str(self.out_dir))
        if file_name in self.files:
            raise PackageError(f"{self.out_dir}: weight file {file_name!r} written twice")
        dup = self.tensor_names.intersection(names)
        if dup:
            raise PackageError(f"{self.out_dir}: tensor {sorted(dup)[0]!r} written to two files")

    def _record(self, file_name: str, entry: dict[str, Any], names) -> dict[str, Any]:
        self.files[file_name] = entry
        self.tensor_names.update(names)
        self.bytes_written += entry["bytes"]
        return entry

    def add(self, file_name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
        """Write ``tensors`` to ``file_name`` (a new safetensors file) and record its sha256 and size."""
        self._check_new(file_name, tensors)
        target = self.tmp / file_name
        save_file({k: _own_storage(v) for k, v in tensors.items()}, str(target),
                  metadata={"format": "pt", **(metadata or {})})
        return self._record(file_name, {"sha256": sha256_file(target), "bytes": target.stat().st_size}, tensors)

    def open(self, file_name: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> TensorFileWriter:
        """Start ``file_name`` for piecewise writing (as ``file_name.partial`` until :meth:`commit`)."""
        self._check_new(file_name, specs)
        return TensorFileWriter(self.tmp / (file_name + ".partial"), specs)

    def commit(self, file_name: str, writer: TensorFileWriter) -> dict[str, Any]:
        """Finish a file begun with :meth:`open`, give it its name and record its sha256 and size."""
        entry = writer.close()
        os.replace(writer.path, self.tmp / file_name)
        return self._record(file_name, entry, writer.names)

    def adopt(self, file_name: str, entry: dict[str, Any], names=()) -> None:
        """Take over ``file_name`` committed by an earlier writer on this ``work_dir`` (its
        recorded sha256 and size; the size is checked here, the hash when the package loads)."""
        self._check_new(file_name, names)
        path = self.tmp / file_name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise PackageError(f"{path}: missing or not {entry['bytes']} bytes; cannot resume from it")
        self._record(file_name, dict(entry), names)

    def add_text_file(self, source: str | Path) -> dict:
        """Copy one of ``TEXT_FILES`` (a tokenizer or generation config) into the package as it
        is, and record its sha256 and size."""
        source = Path(source)
        _check_file_name(source.name, str(self.out_dir), text_ok=True)
        if source.name.endswith(".safetensors"):
            raise PackageError(f"{source}: weight files go in through add()")
        if source.name in self.files:
            raise PackageError(f"{self.out_dir}: file {source.name!r} written twice")
        target = self.tmp / source.name
        shutil.copyfile(source, target)
        entry = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
        self.files[source.name] = entry
        self.bytes_written += entry["bytes"]
        return entry

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` (with the recorded ``files``) and move the package into place."""
        manifest = dict(manifest)
        manifest.setdefault("format", FORMAT)
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest["files"] = dict(sorted(self.files.items()))
        _check_manifest(manifest, str(self.out_dir / MANIFEST))
        stray = sorted(p.name for p in self.tmp.iterdir() if p.name not in self.files)
        if stray:
            raise PackageError(f"{self.tmp / stray[0]}: not a file of this package")
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        if self.out_dir.exists():
            if not self.overwrite and any(self.out_dir.iterdir()):
                raise FileExistsError(f"{self.out_dir}: appeared while the package was being written")
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        log.info("wrote package %s (%d weight files and the manifest, %.1f MB)", self.out_dir, len(self.files),
                 self.bytes_written / 1e6)
        return manifest


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_package(out_dir: str | Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                  file_name: str = "model.safetensors", overwrite: bool = False) -> dict[str, Any]:
    """Write a one-file package; returns the manifest as written (with ``files``)."""
    with PackageWriter(out_dir, overwrite=overwrite) as writer:
        writer.add(file_name, tensors)
        return writer.finish(manifest)


def _check_manifest(manifest: Any, where: str) -> ModelConfig:
    """Structural checks of a manifest; returns its config. Raises PackageError naming the key."""
    if not isinstance(manifest, dict):
        raise PackageError(f"{where}: expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise PackageError(f"{where}: missing key {key!r}")
    if manifest["format"] != FORMAT:
        raise PackageError(f"{where}: 'format' is {manifest['format']!r}, expected {FORMAT!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise PackageError(f"{where}: 'format_version' {version!r} is not supported "
                           f"(this r1edge reads 1..{FORMAT_VERSION})")
    quant = manifest["quantization"]
    if not isinstance(quant, dict) or quant.get("scheme") not in SCHEMES:
        raise PackageError(f"{where}: 'quantization.scheme' must be one of {SCHEMES}")
    try:
        cfg = ModelConfig.from_dict(manifest["config"], f"{where}: 'config'")
    except (TypeError, ValueError) as exc:
        raise PackageError(str(exc)) from None
    experts = manifest["experts"]
    if not isinstance(experts, dict) or not isinstance(experts.get("kept", {}), dict):
        raise PackageError(f"{where}: 'experts' must be an object with a 'kept' map")
    for layer, ids in experts.get("kept", {}).items():
        if (not isinstance(ids, list) or len(ids) != cfg.n_routed_experts
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                or len(set(ids)) != len(ids)):
            raise PackageError(f"{where}: 'experts.kept.{layer}' must list {cfg.n_routed_experts} "
                               "distinct original expert ids")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise PackageError(f"{where}: 'files' must be a non-empty object of weight files")
    for name, entry in files.items():
        _check_file_name(name, where, text_ok=True)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.match(entry["sha256"]) or not isinstance(entry.get("bytes"), int)):
            raise PackageError(f"{where}: 'files.{name}' needs a hex 'sha256' and an integer 'bytes'")
    if not any(name.endswith(".safetensors") for name in files):
        raise PackageError(f"{where}: 'files' lists no weight file (.safetensors)")
    return cfg


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and structurally check ``manifest.json`` of a package, without hashing files."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such package directory")
    if not mpath.is_file():
        raise PackageError(f"{mpath}: missing (not an r1edge package)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{mpath}: not valid JSON ({exc})") from None
    _check_manifest(manifest, str(mpath))
    return manifest


def verify_package(path: str | Path) -> dict[str, Any]:
    """Check every weight file's presence, size and sha256, and that no other file is there
    (but the package's ``signature.json``, checked by ``sdk.tools.signing``).

    Returns the manifest. Raises PackageError naming the first file that is missing,
    truncated, resized, tampered with or not listed in the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()}
    extra = sorted(present - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise PackageError(f"{path / extra[0]}: not listed in manifest.json (packages are sealed; "
                           "remove it or rebuild the package)")
    for name, entry in files.items():
        verify_file(path, name, entry)
    return manifest


def verify_file(path: str | Path, name: str, entry: dict[str, Any]) -> Path:
    """Check one file of a package against its manifest entry (presence, size, sha256);
    returns its path. Raises PackageError naming the file."""
    file = Path(path) / name
    if not file.is_file():
        raise PackageError(f"{file}: listed in manifest.json but missing")
    size = file.stat().st_size
    if size < entry["bytes"]:
        raise PackageError(f"{file}: truncated ({size} of {entry['bytes']} bytes)")
    if size != entry["bytes"]:
        raise PackageError(f"{file}: is {size} bytes, manifest.json says {entry['bytes']}")
    if sha256_file(file) != entry["sha256"]:
        raise PackageError(f"{file}: sha256 does not match manifest.json (tampered or corrupt)")
    return file


def weight_files(manifest: dict[str, Any]) -> list[str]:
    """The weight files a manifest lists (its ``*.safetensors``; tokenizer files are not weights)."""
    return [name for name in manifest["files"] if name.endswith(".safetensors")]


def iter_tensors(path: str | Path, manifest: dict[str, Any], device: str | torch.device = "cpu"
                 ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield ``(file_name, tensor_name, tensor)`` for every tensor of a (verified) package.
    Each file's header is validated first (``runtime.model.weights.read_header``, as the mmap
    path does); raises PackageError naming the file and tensor."""
    from runtime.model.weights import read_header

    path = Path(path)
    for name in weight_files(manifest):
        try:
            read_header(path / name)
            with safe_open(str(path / name), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    yield name, key, f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise PackageError(f"{path / name}: unreadable safetensors file ({exc})") from None


def mapped_tensors(path: str | Path, manifest: dict[str, Any]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Like :func:`iter_tensors`, but every tensor is a view of its memory-mapped file (the
    same header validation); raises PackageError naming the file and tensor."""
    from runtime.model.weights import MappedFile

    path = Path(path)
    for name in weight_files(manifest):
        try:
            mapped = MappedFile(path / name)
            for key in sorted(mapped.entries):
                yield name, key, mapped.tensor(key)
        except (OSError, ValueError) as exc:
            raise PackageError(f"{path / name}: unreadable safetensors file ({exc})") from None


def load_package(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 mmap: bool = False):
    """Verify a package and build the runtime model it describes (``sdk.load_model`` calls this).

    Every file's sha256 is checked first. The model is then laid out on the meta device
    from the manifest's config and quantization (no memory, no random init) and its
    tensors are taken from the package one by one, each name, shape and kind checked, so
    a package that does not match its config is refused naming the tensor and its file.
    Peak memory is the model itself. With ``mmap`` (CPU only) every tensor already in its
    model dtype (the int8 weights, float32 scales and router) is a view of the package's
    memory-mapped files instead of a copy: it costs page cache, read on first use, not
    process memory (the streaming expert store serves experts from there).
    """
    from runtime.model.transformer import IOAdapter, Transformer, cast_keeping_router_fp32, rope_inv_freq

    path = Path(path)
    manifest = verify_package(path)
    cfg = ModelConfig.from_dict(manifest["config"], f"{path / MANIFEST}: 'config'")
    scheme = manifest["quantization"]["scheme"]
    with torch.device("meta"):
        model = Transformer(cfg)
        io = manifest.get("io")
        if io:
            try:
                model.adapter = IOAdapter(io["inputs"], io["outputs"], cfg.hidden_size)
            except (KeyError, TypeError, ValueError) as exc:
                raise PackageError(f"{path / MANIFEST}: bad 'io' signature ({exc})") from None
        model = cast_keeping_router_fp32(model, dtype)
        if scheme == "w8a8-int8":
            from runtime.model.quant import quantize_model

            quantize_model(model, mode="w8a8")
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    if mmap and torch.device(device).type != "cpu":
        raise ValueError("mmap=True maps a package into host memory: load it on the CPU")
    for file, name, tensor in mapped_tensors(path, manifest) if mmap else iter_tensors(path, manifest):
        where = path / file
        if name in seen:
            raise PackageError(f"{where}: tensor {name!r} also in {seen[name]}")
        if name not in expected:
            raise PackageError(f"{where}: unexpected tensor {name!r} for this config and quantization")
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise PackageError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(target.shape)} from the manifest's config")
        if tensor.is_floating_point() != target.is_floating_point():
            raise PackageError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected {target.dtype}")
        state[name] = tensor.to(target.dtype)
        seen[name] = file
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise PackageError(f"{path}: tensor {missing[0]!r} is missing from the package "
                           f"({len(missing)} missing in all)")
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg)[0]      # the one non-persistent buffer
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{path}: {name!r} was not loaded (internal error)")
    return model.eval().to(device)


def package_identity(path: str | Path) -> dict:
    """``{"path", "manifest_sha256"}`` of a package (``None`` for a checkpoint without manifest)."""
    path = Path(path)
    manifest = path / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"path": str(path), "manifest_sha256": digest}

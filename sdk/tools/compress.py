"""Compression: calibrate, prune routed experts, quantize, and write a verified package.

``compress`` streams the source (an HF checkpoint or a float package) layer by layer from
its memory-mapped files: the calibration rows' hidden states go through one layer at a
time, the MoE observer records per expert how often it is chosen and its REAP saliency
(the mean, over the tokens routed to it, of gate weight x norm of its output), the kept
experts are chosen, the router rows and correction bias are sliced to them, the layer is
quantized, the held-out rows run through both the original and the compressed layer, the
layer is written and freed. Peak memory is about one layer plus the activations.

Group-limited routing after pruning (``groups``): ``balanced`` keeps the same number of
experts in every group and keeps ``n_group``/``topk_group``; ``global`` keeps the best
experts anywhere and collapses routing to a single group; ``auto`` (the default) is
balanced whenever the kept count allows it (see :func:`group_plan`).

Calibration files (validated before any work starts; errors name the line or key):

- ``.jsonl``: one ``{"input_ids": [int, ...]}`` object a line (blank lines are skipped);
- ``.npy``: an integer array [N, T] of token ids;
- ``.npz``: ``input_ids`` (or a single integer array) [N, T] for LM mode, or ``frames``, a
  float array [N, T, F] of sensor frames, for sensor mode.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CALIB_SUFFIXES = (".jsonl", ".npy", ".npz")


class CalibrationError(ValueError):
    """A calibration file is malformed; the message names the file and the line or key."""


@dataclass
class Calibration:
    """Validated calibration data: LM rows of token ids [T_i], or sensor rows of frames [T, F]."""

    source: str
    mode: str                          # "lm" or "sensor"
    rows: list[torch.Tensor] = field(repr=False)

    @property
    def tokens(self) -> int:
        """Total tokens (LM) or frames (sensor) over all rows."""
        return sum(int(r.shape[0]) for r in self.rows)

    @property
    def n_features(self) -> int | None:
        """Features per frame in sensor mode, None in LM mode."""
        return int(self.rows[0].shape[1]) if self.mode == "sensor" else None

    def split(self, held_out: float) -> tuple["Calibration", "Calibration"]:
        """(calibration rows, held-out rows): the last ``ceil(held_out * N)`` rows are held out.

        With a single row there is nothing to hold out: both parts are that row, and the
        quality report then measures on calibration data (it says so in ``held_out_rows``).
        """
        n = len(self.rows)
        if n == 1:
            return self, self
        k = min(n - 1, max(1, math.ceil(held_out * n)))
        return (Calibration(self.source, self.mode, self.rows[:n - k]),
                Calibration(self.source, self.mode, self.rows[n - k:]))


def _check_ids(ids: np.ndarray, where: str, vocab_size: int | None) -> None:
    if ids.size and ids.min() < 0:
        raise CalibrationError(f"{where}: negative token id {int(ids.min())}")
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise CalibrationError(f"{where}: token id {int(ids.max())} is out of range for "
                               f"vocab_size={vocab_size}")


def _read_jsonl(path: Path, vocab_size: int | None, max_len: int | None) -> list[torch.Tensor]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise CalibrationError(f"{where}: expected an object like {{\"input_ids\": [...]}}")
            if "input_ids" not in obj:
                raise CalibrationError(f"{where}: missing key 'input_ids'")
            ids = obj["input_ids"]
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                raise CalibrationError(f"{where}: 'input_ids' must be a non-empty list of integers")
            try:
                arr = np.asarray(ids, dtype=np.int64)
            except OverflowError:
                raise CalibrationError(f"{where}: 'input_ids' holds an integer too large for a token id") from None
            _check_ids(arr, f"{where}: 'input_ids'", vocab_size)
            if max_len is not None and len(arr) > max_len:
                raise CalibrationError(f"{where}: 'input_ids' has {len(arr)} tokens, more than "
                                       f"max_position_embeddings={max_len}")
            rows.append(torch.from_numpy(arr))
    return rows


def _ids_array(arr: np.ndarray, where: str, vocab_size: int | None, max_len: int | None) -> list[torch.Tensor]:
    if not np.issubdtype(arr.dtype, np.integer):
        raise CalibrationError(f"{where}: token ids must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CalibrationError(f"{where}: token ids must be a non-empty [N, T] array, got shape {arr.shape}")
    _check_ids(arr, where, vocab_size)
    if max_len is not None and arr.shape[1] > max_len:
        raise CalibrationError(f"{where}: rows of {arr.shape[1]} tokens exceed "
                               f"max_position_embeddings={max_len}")
    return list(torch.from_numpy(arr.astype(np.int64)))


def _frames_array(arr: np.ndarray, where: str, n_features: int | None) -> list[torch.Tensor]:
    if not np.issubdtype(arr.dtype, np.floating):
        raise CalibrationError(f"{where}: sensor frames must be a float array, got dtype {arr.dtype}")
    if arr.ndim != 3 or 0 in arr.shape:
        raise CalibrationError(f"{where}: sensor frames must be a non-empty [N, T, F] array, got shape {arr.shape}")
    if n_features is not None and arr.shape[2] != n_features:
        raise CalibrationError(f"{where}: frames have {arr.shape[2]} features, the model's input "
                               f"adapter takes {n_features}")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        n, t, f = (int(v) for v in bad[0])
        raise CalibrationError(f"{where}: non-finite value at [{n}, {t}, {f}]")
    return list(torch.from_numpy(arr.astype(np.float32)))


def load_calibration(path: str | Path, *, vocab_size: int | None = None, max_len: int | None = None,
                     n_features: int | None = None) -> Calibration:
    """Read and validate a calibration file (see the module docstring for the formats).

    ``vocab_size`` bounds token ids, ``max_len`` row length, ``n_features`` the frame width.
    Raises CalibrationError naming the file and line or key; nothing is half-read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration file not found")
    suffix = path.suffix.lower()
    if suffix not in CALIB_SUFFIXES:
        raise CalibrationError(f"{path}: unsupported calibration format {suffix!r} "
                               f"(use {', '.join(CALIB_SUFFIXES)})")
    if suffix == ".jsonl":
        rows = _read_jsonl(path, vocab_size, max_len)
        if not rows:
            raise CalibrationError(f"{path}: no rows (expected one {{\"input_ids\": [...]}} a line)")
        return Calibration(str(path), "lm", rows)
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:       # object arrays need pickle: refused
        raise CalibrationError(f"{path}: cannot read ({exc}); pickled arrays are refused") from None
    except (OSError, EOFError) as exc:
        raise CalibrationError(f"{path}: not a valid {suffix} file ({exc})") from None
    if suffix == ".npy":
        return Calibration(str(path), "lm", _ids_array(loaded, str(path), vocab_size, max_len))
    with loaded:
        keys = list(loaded.keys())
        try:
            if "frames" in keys:
                return Calibration(str(path), "sensor", _frames_array(loaded["frames"], f"{path}: key 'frames'",
                                                                      n_features))
            if "input_ids" in keys:
                key = "input_ids"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise CalibrationError(f"{path}: expected key 'input_ids' (LM) or 'frames' (sensor), "
                                       f"found {keys}")
            return Calibration(str(path), "lm", _ids_array(loaded[key], f"{path}: key {key!r}",
                                                           vocab_size, max_len))
        except ValueError as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"{path}: cannot read ({exc}); pickled arrays are refused") from None


# --------------------------------------------------------------------------------------------
# Pruning decisions
# --------------------------------------------------------------------------------------------

METHODS = ("reap", "frequency", "random")
QUANT_CHOICES = ("int8", "none")
GROUP_RULES = ("auto", "balanced", "global")


class ExpertStats:
    """Per-expert routing statistics of one MoE layer, filled by the MoE observer hook.

    ``counts[e]``: tokens routed to expert ``e``. ``saliency[e]`` (REAP): the mean, over the
    tokens routed to ``e``, of its gate weight times the L2 norm of its output.
    """

    def __init__(self, n_experts: int):
        self.counts = torch.zeros(n_experts, dtype=torch.float64)
        self.saliency_sum = torch.zeros(n_experts, dtype=torch.float64)

    def __call__(self, record) -> None:
        ids = record.expert_ids.reshape(-1)
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).double()
        contrib = (record.weights.double() * record.output_norms.double()).reshape(-1)
        self.saliency_sum.index_add_(0, ids, contrib)

    @property
    def saliency(self) -> torch.Tensor:
        """REAP saliency per expert (0 for experts never chosen)."""
        return self.saliency_sum / self.counts.clamp(min=1)


def group_plan(cfg, n_keep: int, rule: str = "auto") -> dict[str, Any]:
    """How group-limited routing survives pruning to ``n_keep`` experts per layer.

    ``balanced`` keeps ``n_keep / n_group`` experts in every group (chosen by score within
    the group), so the groups stay equal and the pruned router keeps ``n_group`` and
    ``topk_group``: it routes exactly as the original would among the kept experts. It needs
    ``n_keep`` divisible by ``n_group``, at least 2 kept per group (the group score is a
    top-2 sum) and ``topk_group * n_keep / n_group >= num_experts_per_tok``.
    ``global`` keeps the ``n_keep`` best experts of the layer wherever they are and collapses
    routing to one group (``n_group = topk_group = 1``): plain top-k over the kept experts.
    ``auto`` is ``balanced`` when it is possible, else ``global``.
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"groups must be one of {GROUP_RULES}, got {rule!r}")
    g = cfg.n_group
    per = n_keep // g
    ok = g > 1 and n_keep % g == 0 and per >= 2 and cfg.topk_group * per >= cfg.num_experts_per_tok
    if rule == "balanced" and not ok:
        raise ValueError(f"cannot keep {n_keep} experts in {g} equal groups (needs a multiple of "
                         f"n_group={g}, >= 2 per group and topk_group x per-group >= "
                         f"num_experts_per_tok={cfg.num_experts_per_tok}); use groups='global'")
    if rule == "balanced" or (rule == "auto" and ok):
        return {"rule": "balanced", "n_group": g, "topk_group": cfg.topk_group, "per_group": per}
    return {"rule": "global", "n_group": 1, "topk_group": 1, "per_group": None}


def select_experts(scores: torch.Tensor, n_keep: int, plan: dict[str, Any], n_group: int) -> list[int]:
    """Original ids of the experts to keep, in their new order.

    Highest score first, ties broken by the lower id. ``balanced`` takes the best
    ``per_group`` of each original group and lays them out group by group (so new group
    ``g`` holds experts of old group ``g``); ``global`` takes the best ``n_keep`` overall.
    Within a group (or overall) kept experts stay in their original order.
    """
    n = scores.numel()
    order = sorted(range(n), key=lambda e: (-float(scores[e]), e))
    if plan["rule"] == "balanced":
        size = n // n_group
        kept = []
        for g in range(n_group):
            members = [e for e in order if e // size == g][:plan["per_group"]]
            kept += sorted(members)
        return kept
    return sorted(order[:n_keep])


def resolve_keep(cfg, keep_experts: int | None, keep_ratio: float | None) -> int:
    """The per-layer kept-expert count from ``keep_experts`` or ``keep_ratio`` (default: all)."""
    if keep_experts is not None and keep_ratio is not None:
        raise ValueError("give either --keep-experts or --keep-ratio, not both")
    n = cfg.n_routed_experts
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
        keep_experts = max(cfg.num_experts_per_tok, round(keep_ratio * n))
    if keep_experts is None:
        return n
    if isinstance(keep_experts, bool) or not isinstance(keep_experts, int) or not (
            cfg.num_experts_per_tok <= keep_experts <= n):
        raise ValueError(f"--keep-experts must be an integer between num_experts_per_tok="
                         f"{cfg.num_experts_per_tok} and n_routed_experts={n}, got {keep_experts!r}")
    return keep_experts


# --------------------------------------------------------------------------------------------
# The streaming compressor
# --------------------------------------------------------------------------------------------

BLOCK_BYTES = 1 << 25        # weights are read, quantized and written in row blocks of ~32 MB of float32
SCORE_BYTES = 1 << 26        # attention scores of one head group over one batch of rows
STATE = "state.json"


class _Source:
    """The float model being compressed, read lazily in row blocks (memory-mapped).

    Either an HF checkpoint directory (routed experts stored one by one, any float or FP8
    dtype) or an unquantized r1edge package (experts stacked; may carry an I/O adapter and
    an earlier pruning, whose kept-expert map is composed with this one).
    """

    def __init__(self, path: Path):
        """Read the config (and a package's manifest) only; :meth:`open` reads the weights' headers."""
        from runtime.model.config import ModelConfig
        from sdk.tools.package import is_package, read_manifest

        self.path = path
        self.manifest = None
        self.io = None
        if is_package(path):
            self.manifest = read_manifest(path)
            scheme = self.manifest["quantization"]["scheme"]
            if scheme != "none":
                raise ValueError(f"{path}: package is already quantized ({scheme}); compress from the "
                                 "float checkpoint or a float package")
            self.cfg = ModelConfig.from_dict(self.manifest["config"], f"{path / 'manifest.json'}: 'config'")
            self.io = self.manifest.get("io")
        elif path.is_dir():
            self.cfg = ModelConfig.from_json(path / "config.json")
        else:
            raise FileNotFoundError(f"{path}: not a checkpoint or package directory")

    def open(self) -> None:
        """Verify a package's hashes, open the weight files and check every tensor's name and shape."""
        from runtime.model.weights import CheckpointReader
        from sdk.tools.package import verify_package

        if self.manifest is not None:
            verify_package(self.path)
        self.reader = CheckpointReader(self.path)
        self.stacked = any(n.endswith(".mlp.experts.gate_up_proj") for n in self.reader.names())
        self.files = sorted({self.reader.file_of(n) for n in self.reader.names()})
        self.size_bytes = sum(f.stat().st_size for f in self.files)
        self.check()

    def original_ids(self, layer: int) -> list[int]:
        """Original ids (as in the very first checkpoint) of this source's experts at ``layer``."""
        if self.manifest and self.manifest["experts"].get("kept", {}).get(str(layer)) is not None:
            return list(self.manifest["experts"]["kept"][str(layer)])
        return list(range(self.cfg.n_routed_experts))

    @property
    def original_n_routed(self) -> int:
        """Routed experts per layer of the very first checkpoint."""
        if self.manifest:
            return int(self.manifest["experts"].get("original_n_routed_experts", self.cfg.n_routed_experts))
        return self.cfg.n_routed_experts

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the source must hold, with its shape, in its own layout."""
        from runtime.model.transformer import IOAdapter, Transformer

        cfg = self.cfg
        with torch.device("meta"):
            model = Transformer(cfg)
            if self.io:
                model.adapter = IOAdapter(self.io["inputs"], self.io["outputs"], cfg.hidden_size)
        out = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        if cfg.tie_word_embeddings and "lm_head.weight" not in self.reader:
            out.pop("lm_head.weight")
        if not self.stacked:
            for name in [n for n in out if ".mlp.experts." in n]:
                prefix = name.split("mlp.experts.")[0] + "mlp.experts."
                if name.endswith("gate_up_proj"):
                    for e in range(cfg.n_routed_experts):
                        out[f"{prefix}{e}.gate_proj.weight"] = (cfg.moe_intermediate_size, cfg.hidden_size)
                        out[f"{prefix}{e}.up_proj.weight"] = (cfg.moe_intermediate_size, cfg.hidden_size)
                else:
                    for e in range(cfg.n_routed_experts):
                        out[f"{prefix}{e}.down_proj.weight"] = (cfg.hidden_size, cfg.moe_intermediate_size)
                del out[name]
        return out

    def check(self) -> None:
        """Every tensor present with its config shape, from the file headers only (no data read)."""
        for name, shape in self.expected().items():
            if name not in self.reader:
                raise ValueError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            if tuple(self.reader.shape(name)) != shape:
                raise ValueError(f"{self.reader.file_of(name)}: tensor {name!r} has shape "
                                 f"{tuple(self.reader.shape(name))}, expected {shape} from the config")

    def _name(self, name: str) -> str:
        if name == "lm_head.weight" and name not in self.reader:
            return "model.embed_tokens.weight"          # tied embeddings
        return name

    def get(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """One (small) tensor, dequantized if FP8, as ``dtype``."""
        return self.reader.get(self._name(name), dtype)

    def has(self, name: str) -> bool:
        """Whether the source holds ``name``."""
        return self._name(name) in self.reader

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a 2-D weight (an expert matrix by its per-expert HF name)."""
        if self.stacked and ".mlp.experts." in name:
            cfg = self.cfg
            down = name.endswith("down_proj.weight")
            return (cfg.hidden_size, cfg.moe_intermediate_size) if down else (cfg.moe_intermediate_size,
                                                                               cfg.hidden_size)
        return tuple(self.reader.shape(self._name(name)))

    def rows(self, name: str, first: int, stop: int, dtype=torch.float32) -> torch.Tensor:
        """Rows ``first..stop`` of a 2-D weight; expert matrices go by their HF names
        (``...mlp.experts.{e}.gate_proj.weight``) in either source layout."""
        if self.stacked and ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, kind = rest.split(".")[:2]
            e, inter = int(e), self.cfg.moe_intermediate_size
            if kind == "down_proj":
                return self.reader.rows(f"{prefix}.mlp.experts.down_proj", int(e), int(e) + 1, dtype)[0, first:stop]
            off = inter if kind == "up_proj" else 0
            return self.reader.rows(f"{prefix}.mlp.experts.gate_up_proj", e, e + 1, dtype)[0, off + first:off + stop]
        return self.reader.rows(self._name(name), first, stop, dtype)

    def nbytes(self, name: str) -> int:
        """Bytes of a weight in the source (an expert matrix by its HF name in either layout)."""
        if self.stacked and ".mlp.experts." in name:
            n, k = self.shape(name)
            return n * k * self.reader.element_size(name.split(".mlp.experts.")[0] + ".mlp.experts.down_proj")
        return self.reader.nbytes(self._name(name))


def _block_rows(cols: int) -> int:
    """Rows of a [*, cols] float32 weight read at a time (a multiple of 128: whole FP8 blocks)."""
    return max(128, BLOCK_BYTES // (4 * max(cols, 1)) // 128 * 128)


def _batches(lengths: list[int], max_tokens: int) -> list[tuple[list[int], int]]:
    """Rows grouped into batches of equal length of at most ``max_tokens`` tokens (one row at
    least): ``[(row indices, length)]`` in a fixed order."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    out = []
    for length, rows in sorted(by_len.items()):
        step = max(1, max_tokens // length)
        out += [(rows[i:i + step], length) for i in range(0, len(rows), step)]
    return out


class _Stream:
    """Calibration rows as one flat array of tokens: batch ``b`` holds ``spans[b] = (start, B, T)``
    (B rows of T tokens at ``start``); row-major, so a batch is ``x[start:start + B*T].view(B, T, -1)``."""

    def __init__(self, rows: list[torch.Tensor], max_tokens: int):
        self.spans: list[tuple[int, int, int]] = []
        order = []
        start = 0
        for idx, length in _batches([int(r.shape[0]) for r in rows], max_tokens):
            self.spans.append((start, len(idx), length))
            order += idx
            start += len(idx) * length
        self.rows = [rows[i] for i in order]
        self.tokens = start

    def flat(self) -> torch.Tensor:
        """The rows' inputs (token ids or frames) concatenated in stream order."""
        return torch.cat(self.rows) if self.rows else torch.zeros(0)

    def __add__(self, other: "_Stream") -> "_Stream":
        both = _Stream([], 1)
        both.rows = self.rows + other.rows
        both.spans = self.spans + [(s + self.tokens, b, t) for s, b, t in other.spans]
        both.tokens = self.tokens + other.tokens
        return both


class _Pass:
    """One model run over a stream, layer by layer, reading weights in row blocks.

    The original model (``out`` None) computes in float32 from the source weights. The
    compressed one quantizes each block as it reads it (int8, the rules of
    ``runtime.model.quant``) or rounds it to the store dtype (``quant="none"``), writes it into the
    package file being written (``out``), and computes with exactly what it wrote, so the
    quality report measures the package. Int8 linear layers give bitwise what the loaded
    package's ``Int8Linear`` gives: quantization is per output row and the int8 GEMM exact,
    so blocks of rows change nothing.
    """

    def __init__(self, src: _Source, out=None, quant: str = "none", store: torch.dtype = torch.float32):
        self.src, self.out, self.quant, self.store = src, out, quant, store

    @property
    def int8(self) -> bool:
        return self.out is not None and self.quant == "int8"

    def vector(self, name: str, key: str | None = None) -> torch.Tensor:
        """A norm weight (float32); the compressed model writes it as stored and uses that."""
        v = self.src.get(name)
        if self.out is None:
            return v
        stored = v.to(self.store)
        self.out.assign(key or name, slice(None), stored)
        return stored.float()

    def act(self, x: torch.Tensor):
        """Activations as a linear layer takes them: int8 rows with scales, or float."""
        from runtime.model.quant import quantize_activation

        return quantize_activation(x) if self.int8 else x

    def linear(self, name: str, x, rows: tuple[int, int] | None = None, key: str | None = None,
               lead: tuple = (), col: int = 0) -> torch.Tensor:
        """``x @ W[rows].T`` for the source weight ``name`` (without ``.weight``), float32 [N, rows].

        ``x`` is what :meth:`act` gives. The compressed model writes the rows to package
        tensor ``key`` (default ``name``): an ``Int8Linear`` (``.qweight_t`` columns and
        ``.scale``) or a float ``.weight``; for routed experts ``lead`` indexes the stacked
        tensor and ``col`` is where these rows start in it (``w13_t``/``gate_up_proj``).
        """
        from runtime.model.quant import int8_matmul, quantize_weight

        wname = name + ".weight"
        n_out, k_in = self.src.shape(wname)
        r0, r1 = rows or (0, n_out)
        n = (x[0] if self.int8 else x).shape[0]
        y = torch.empty(n, r1 - r0)
        step = _block_rows(k_in)
        key = key or name
        expert = bool(lead)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            w = self.src.rows(wname, a, b)
            if self.out is None:
                y[:, a - r0:b - r0] = F.linear(x, w)
            elif self.int8:
                qt, sw = quantize_weight(w)
                cols = slice(col + a, col + b)
                if expert:
                    self.out.assign(key[0], lead + (slice(None), cols), qt)
                    self.out.assign(key[1], lead + (cols,), sw)
                else:
                    self.out.assign(key + ".qweight_t", (slice(0, k_in), cols), qt)
                    self.out.assign(key + ".scale", cols, sw)
                if n:
                    y[:, a - r0:b - r0] = int8_matmul(x[0], x[1], qt, sw)
            else:
                stored = w.to(self.store)
                self.out.assign(key if expert else key + ".weight", lead + (slice(col + a, col + b),), stored)
                y[:, a - r0:b - r0] = F.linear(x, stored.float())
            del w
        if self.src.has(name + ".bias"):
            if self.int8:
                raise ValueError(f"{name}: int8 linear layers have no bias; this checkpoint has one")
            bias = self.src.get(name + ".bias")[r0:r1]
            if self.out is not None:
                stored = bias.to(self.store)
                self.out.assign(key + ".bias", slice(r0, r1), stored)
                bias = stored.float()
            y += bias
        return y

    def mlp(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        """A SwiGLU block (dense MLP or shared experts) on normed rows ``h``."""
        from runtime.model.quant import silu_mul

        x = self.act(h)
        mid = silu_mul(self.linear(prefix + "gate_proj", x), self.linear(prefix + "up_proj", x))
        return self.linear(prefix + "down_proj", self.act(mid))


def _rope_mask(cfg, T: int, window: int | None):
    """cos/sin for positions 0..T-1 and the additive causal mask (sliding ``window`` if given)."""
    from runtime.model.transformer import rope_cos_sin, rope_inv_freq

    inv_freq, factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, factor, torch.arange(T))
    mask = None
    if T > 1:
        mask = torch.full((T, T), float("-inf")).triu_(1)
        if window is not None:
            mask = mask + torch.full((T, T), float("-inf")).tril_(-window)
    return cos, sin, mask


@torch.no_grad()
def _attention(p: _Pass, i: int, x: torch.Tensor, stream: _Stream, cfg, window: int | None) -> torch.Tensor:
    """x + MLA attention of layer ``i`` (the model's naive form), head group by head group:
    only a group's queries, keys and values exist at a time, never the layer's full weights."""
    from runtime.model.config import LORA_NORM_EPS
    from runtime.model.transformer import apply_rope, rms_norm

    a = f"model.layers.{i}.self_attn."
    nh, nope, rope, vd, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)
    qk, N = nope + rope, x.shape[0]
    h = rms_norm(x, p.vector(f"model.layers.{i}.input_layernorm.weight"), cfg.rms_norm_eps)
    hx = p.act(h)
    if cfg.q_lora_rank is None:
        q_in, q_name = hx, a + "q_proj"
    else:
        low = p.linear(a + "q_a_proj", hx)
        q_in, q_name = p.act(rms_norm(low, p.vector(a + "q_a_layernorm.weight"), LORA_NORM_EPS)), a + "q_b_proj"
    kv = p.linear(a + "kv_a_proj_with_mqa", hx)
    latent = p.act(rms_norm(kv[:, :C], p.vector(a + "kv_a_layernorm.weight"), LORA_NORM_EPS))
    k_pe_raw = kv[:, C:]
    tables = {T: _rope_mask(cfg, T, window) for _, _, T in stream.spans}
    widest = max((B * T * T for _, B, T in stream.spans), default=1)
    group = max(1, min(nh, SCORE_BYTES // (4 * widest), SCORE_BYTES // (4 * max(N, 1) * (qk + nope + vd))))
    ctx = torch.empty(N, nh * vd)
    for h0 in range(0, nh, group):
        h1 = min(nh, h0 + group)
        g = h1 - h0
        q = p.linear(q_name, q_in, rows=(h0 * qk, h1 * qk)).view(N, g, qk)
        kvb = p.linear(a + "kv_b_proj", latent, rows=(h0 * (nope + vd), h1 * (nope + vd))).view(N, g, nope + vd)
        for start, B, T in stream.spans:
            cos, sin, mask = tables[T]
            sl = slice(start, start + B * T)
            q_nope, q_pe = q[sl].view(B, T, g, qk).split([nope, rope], dim=-1)
            q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), cfg.rope_interleave)
            k_pe = apply_rope(k_pe_raw[sl].view(B, T, rope), cos, sin, cfg.rope_interleave)
            k_nope, v = kvb[sl].view(B, T, g, nope + vd).split([nope, vd], dim=-1)
            scores = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope)
                      + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * cfg.softmax_scale
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1, dtype=torch.float32)
            ctx[sl, h0 * vd:h1 * vd] = torch.einsum("bhst,bthd->bshd", probs, v).reshape(B * T, g * vd)
        del q, kvb
    return x + p.linear(a + "o_proj", p.act(ctx))


def _expert(p: _Pass, i: int, e: int, x, **write) -> torch.Tensor:
    """Routed expert ``e`` (source id) of layer ``i`` on rows ``x`` (as :meth:`_Pass.act` gives)."""
    name = f"model.layers.{i}.mlp.experts.{e}."
    inter = p.src.cfg.moe_intermediate_size
    if p.int8:
        from runtime.model.quant import quantize_activation, silu_mul

        j = write["j"]
        w13, w2 = (f"model.layers.{i}.mlp.experts.{k}" for k in ("w13_t", "w2_t"))
        s13, s2 = (f"model.layers.{i}.mlp.experts.{k}" for k in ("s13", "s2"))
        g = p.linear(name + "gate_proj", x, key=(w13, s13), lead=(j,), col=0)
        u = p.linear(name + "up_proj", x, key=(w13, s13), lead=(j,), col=inter)
        return p.linear(name + "down_proj", quantize_activation(silu_mul(g, u)), key=(w2, s2), lead=(j,))
    if p.out is not None:
        j = write["j"]
        gu, down = (f"model.layers.{i}.mlp.experts.{k}" for k in ("gate_up_proj", "down_proj"))
        g = p.linear(name + "gate_proj", x, key=gu, lead=(j,), col=0)
        u = p.linear(name + "up_proj", x, key=gu, lead=(j,), col=inter)
        return p.linear(name + "down_proj", F.silu(g) * u, key=down, lead=(j,))
    return p.linear(name + "down_proj", F.silu(p.linear(name + "gate_proj", x)) * p.linear(name + "up_proj", x))


@torch.no_grad()
def _moe_reference(p: _Pass, i: int, x: torch.Tensor, cfg, n_fit: int, stats: ExpertStats, tick) -> tuple:
    """x + the original MoE of layer ``i``: routed by the router alone, then every expert that
    got tokens, one at a time (its float weights never all at once), accumulating REAP
    statistics over the first ``n_fit`` (calibration) tokens. Returns (x, router weight, bias)."""
    from runtime.model.transformer import RoutingRecord, rms_norm
    from runtime.model.routing import RoutingRule, route_torch

    pre = f"model.layers.{i}.mlp."
    h = rms_norm(x, p.vector(f"model.layers.{i}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
    rule = RoutingRule.from_config(cfg)
    gate = p.src.get(pre + "gate.weight")
    bias = p.src.get(pre + "gate.e_score_correction_bias") if rule.biased else None
    ids, weights = route_torch(F.linear(h, gate), bias, rule)
    out = torch.zeros_like(h)
    norms = torch.zeros_like(weights)
    for e in range(cfg.n_routed_experts):
        token, slot = torch.where(ids == e)
        if len(token):
            y = _expert(p, i, e, h[token])
            norms[token, slot] = y.norm(dim=-1)
            out.index_add_(0, token, y * weights[token, slot, None])
        tick(e, skipped=not len(token))
    stats(RoutingRecord(i, ids[:n_fit], weights[:n_fit], norms[:n_fit]))
    if cfg.n_shared_experts:
        out = out + p.mlp(pre + "shared_experts.", h)
    return x + out, gate, bias


@torch.no_grad()
def _moe_compressed(p: _Pass, i: int, x: torch.Tensor, cfg, pcfg, kept: list[int], gate, bias, tick) -> torch.Tensor:
    """x + the pruned MoE of layer ``i``: the router's kept rows, the kept experts quantized
    (or rounded) one at a time straight from the source and written as they are read."""
    from runtime.model.transformer import rms_norm
    from runtime.model.routing import RoutingRule, route_torch

    pre = f"model.layers.{i}.mlp."
    h = rms_norm(x, p.vector(f"model.layers.{i}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
    idx = torch.tensor(kept, dtype=torch.long)
    gate = gate.index_select(0, idx)
    p.out.assign(pre + "gate.weight", slice(None), gate)
    if bias is not None:
        bias = bias.index_select(0, idx)
        p.out.assign(pre + "gate.e_score_correction_bias", slice(None), bias)
    ids, weights = route_torch(F.linear(h, gate), bias, RoutingRule.from_config(pcfg))
    hx = p.act(h)
    if p.int8:      # the rule of runtime.model.quant.RoutedExperts
        y = torch.zeros(*ids.shape, cfg.hidden_size)
        for j, e in enumerate(kept):
            token, slot = torch.where(ids == j)
            y[token, slot] = _expert(p, i, e, (hx[0][token], hx[1][token]), j=j)
            tick(j)
        out = torch.zeros_like(h)
        for k in range(ids.shape[1]):
            out = out + weights[:, k:k + 1] * y[:, k]
    else:           # the float rule of runtime.model.transformer.MoE
        out = torch.zeros_like(h)
        for j, e in enumerate(kept):
            token, slot = torch.where(ids == j)
            yj = _expert(p, i, e, h[token], j=j)
            out.index_add_(0, token, yj * weights[token, slot, None])
            tick(j)
    if cfg.n_shared_experts:
        out = out + p.mlp(pre + "shared_experts.", h)
    return x + out


@torch.no_grad()
def _layer_mlp(p: _Pass, i: int, x: torch.Tensor, cfg) -> torch.Tensor:
    """x + the dense MLP of layer ``i``."""
    from runtime.model.transformer import rms_norm

    h = rms_norm(x, p.vector(f"model.layers.{i}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
    return x + p.mlp(f"model.layers.{i}.mlp.", h)


@torch.no_grad()
def _write_head(p: _Pass, cfg) -> None:
    """Write ``lm_head`` (compressed) without computing logits (sensor mode has no use for them)."""
    p.linear("lm_head", p.act(torch.zeros(0, cfg.hidden_size)))


@torch.no_grad()
def _head_lm(p: _Pass, ref: torch.Tensor, cmp: torch.Tensor, targets: torch.Tensor, cfg) -> dict[str, Any]:
    """Write the final norm and ``lm_head`` and measure the quality report on the way: the
    head is read once, a block of vocabulary rows at a time, and both models' logits are
    reduced block by block (running argmax, dot products, log-sum-exp, target logits), so
    no [tokens, vocab] logits are ever held."""
    from runtime.model.transformer import rms_norm

    norm = p.src.get("model.norm.weight")
    ref = rms_norm(ref, norm, cfg.rms_norm_eps)
    cmp = rms_norm(cmp, p.vector("model.norm.weight"), cfg.rms_norm_eps)
    ref_p = _Pass(p.src)
    cx = p.act(cmp)
    n = ref.shape[0]
    V = cfg.vocab_size
    best = {k: torch.full((n,), -torch.inf, dtype=torch.float64) for k in ("r", "c")}
    arg = {k: torch.zeros(n, dtype=torch.long) for k in ("r", "c")}
    lse = {k: torch.zeros(n, dtype=torch.float64) for k in ("r", "c")}
    tgt = {k: torch.zeros(n, dtype=torch.float64) for k in ("r", "c")}
    dot, nr, nc = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    step = max(_block_rows(cfg.hidden_size), 1024)
    valid = targets != -100
    for a in range(0, V, step):
        b = min(V, a + step)
        # Both models' logits from the same vocabulary rows: the head is read once per block.
        lr = ref_p.linear("lm_head", ref, rows=(a, b)).double()
        lc = p.linear("lm_head", cx, rows=(a, b)).double()
        dot += (lr * lc).sum(-1)
        nr += lr.pow(2).sum(-1)
        nc += lc.pow(2).sum(-1)
        for k, lg in (("r", lr), ("c", lc)):
            m, am = lg.max(-1)
            new = m > best[k]
            arg[k] = torch.where(new, am + a, arg[k])
            top = torch.maximum(best[k], m)
            lse[k] = lse[k] * torch.exp(best[k] - top) + torch.exp(lg - top[:, None]).sum(-1)
            best[k] = top
            inside = valid & (targets >= a) & (targets < b)
            tgt[k][inside] = lg[inside, targets[inside] - a]
    cos = dot / (nr.sqrt() * nc.sqrt()).clamp(min=1e-8)
    nll = {k: (best[k] + lse[k].log() - tgt[k])[valid].sum() for k in ("r", "c")}
    n_next = int(valid.sum())
    return {"mode": "lm", "tokens": n,
            "greedy_agreement": float((arg["r"] == arg["c"]).double().mean()) if n else 0.0,
            "logits_cosine": float(cos.mean()) if n else 0.0,
            "nll_original": float(nll["r"]) / n_next if n_next else None,
            "nll_compressed": float(nll["c"]) / n_next if n_next else None}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("r1edge")
    except Exception:       # not installed (running from a source tree)
        return "0.1.0"


@torch.no_grad()
def _quality_sensor(ref: list, cmp: list, norm_ref, norm_cmp, adapter) -> dict[str, Any]:
    """The compressed model's outputs against the uncompressed one's on the held-out rows, per
    output in the measures of ``r1edge eval`` (``sdk.tools.eval.output_errors``; range: the span of
    the uncompressed outputs), and the output MSE (raw and normalised by each output's variance)."""
    from sdk.tools.eval import output_errors

    n_out = len(adapter.output_names)
    r = torch.cat([adapter.decode(norm_ref(x)).reshape(-1, n_out) for x in ref]).double()
    c = torch.cat([adapter.decode(norm_cmp(x)).reshape(-1, n_out) for x in cmp]).double()
    err = c - r
    var = r.var(0, unbiased=False).clamp(min=1e-24)
    return {"mode": "sensor", "frames": int(r.shape[0]),
            "outputs": output_errors(c.numpy(), r.numpy(), adapter.output_names, r.amin(0).numpy(), r.amax(0).numpy()),
            "range": "span of the uncompressed model's outputs on the held-out rows",
            "output_mse": float(err.pow(2).mean()),
            "output_nmse": float((err.pow(2).mean(0) / var).mean()),
            "per_output_mse": {name: float(v) for name, v in zip(adapter.output_names, err.pow(2).mean(0))}}


def _expert_scores(stats: ExpertStats, method: str, seed: int, layer: int) -> torch.Tensor:
    if method == "reap":
        return stats.saliency
    if method == "frequency":
        return stats.counts
    gen = torch.Generator().manual_seed(seed * 100003 + layer)
    return torch.rand(stats.counts.numel(), generator=gen, dtype=torch.float64)


def _float_weights(module: torch.nn.Module):
    """The float weights a package stores in its float dtype: linear, norm and float expert weights.

    The router (``Gate``) stays float32 and int8 codes and their scales are left alone.
    """
    from runtime.model.transformer import Experts, RMSNorm

    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, RMSNorm, Experts)):
            yield from m.parameters(recurse=False)


def _specs(module: torch.nn.Module, prefix: str, store: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """Names, dtypes and shapes ``module`` (built on the meta device) is stored with under ``prefix``."""
    cast = {id(p) for p in _float_weights(module)}
    return {prefix + n: (store if id(t) in cast else t.dtype, tuple(t.shape))
            for n, t in module.state_dict(keep_vars=True).items()}


def _open_file(writer, file_name: str, parts: list[tuple[torch.nn.Module, str]], store: torch.dtype,
               extra: dict | None = None):
    """Open a package file laid out as the state dicts of ``parts`` (module built on the meta
    device, name prefix), after ``extra`` specs; int8 layers' padded scale columns are set
    to 1, as ``Int8Linear`` holds them."""
    from runtime.model.quant import Int8Linear

    specs = dict(extra or {})
    for module, prefix in parts:
        specs.update(_specs(module, prefix, store))
    out = writer.open(file_name, specs)
    for module, prefix in parts:
        for name, m in module.named_modules():
            if isinstance(m, Int8Linear) and m.scale.shape[0] > m.out_features:
                out.assign(f"{prefix}{name}{'.' if name else ''}scale", slice(m.out_features, None),
                           torch.ones(m.scale.shape[0] - m.out_features))
    return out


class _Progress:
    """Progress in source bytes read (tqdm bar with ETA, and/or JSON events for scripts)."""

    def __init__(self, total: int, reader, bar, emit):
        import time

        self.time = time.perf_counter
        self.total, self.reader, self.bar, self.emit = total, reader, bar, emit
        self.base = 0                   # planned bytes of stages finished before this run
        self.credit = 0                 # bytes of experts that got no tokens (not read)
        self.start = self.time()
        self.phase_start = (self.start, 0)
        self.phase_name = None
        self.layer = None

    def done(self) -> int:
        return self.base + self.reader.bytes_read + self.credit

    def update(self, credit: int = 0, event: bool = False) -> None:
        """Account ``credit`` bytes not read; refresh the bar (and send a progress event)."""
        self.credit += credit
        done = min(self.done(), self.total)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        if event and self.emit:
            elapsed = self.time() - self.start
            run = done - self.base
            eta = (self.total - done) * elapsed / run if run > 0 else None
            self.emit({"event": "progress", "phase": self.phase_name, "layer": self.layer, "done_bytes": done,
                       "total_bytes": self.total, "elapsed_s": round(elapsed, 3),
                       "eta_s": None if eta is None else round(eta, 1)})

    def stage_done(self, planned: int) -> None:
        """A stage (embeddings, a layer) is finished: count it as planned from here on."""
        self.base += planned
        self.credit = -self.reader.bytes_read

    def phase(self, name: str | None, layer: int | None = None) -> None:
        """End the current phase (reporting its bytes and seconds) and start ``name``."""
        now, done = self.time(), self.done()
        if self.phase_name is not None and self.emit:
            t0, d0 = self.phase_start
            self.emit({"event": "phase", "phase": self.phase_name, "layer": self.layer, "bytes": done - d0,
                       "seconds": round(now - t0, 3)})
        self.phase_name, self.layer, self.phase_start = name, layer, (now, done)
        if self.bar is not None and name is not None:
            self.bar.set_postfix_str(name if layer is None else f"layer {layer}: {name}")
        if name is not None:
            self.update(event=True)


def _planned_bytes(src: _Source, n_keep: int) -> list[int]:
    """Source bytes each stage reads: embeddings, every layer, the head (for progress and ETA)."""
    cfg = src.cfg

    def linears(prefix: str) -> int:
        return sum(src.nbytes(n) for n in src.expected() if n.startswith(prefix) and n.endswith(".weight")
                   and ".mlp.experts." not in n and ".gate." not in n)

    def expert(i: int, e: int) -> int:
        p = f"model.layers.{i}.mlp.experts.{e}."
        return sum(src.nbytes(p + k + ".weight") for k in ("gate_proj", "up_proj", "down_proj"))

    stages = [src.nbytes("model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        n = 2 * linears(f"model.layers.{i}.")
        if cfg.is_moe_layer(i):
            n += src.nbytes(f"model.layers.{i}.mlp.gate.weight")
            n += sum(expert(i, e) for e in range(cfg.n_routed_experts)) + n_keep * expert(i, 0)
        stages.append(n)
    stages.append(2 * src.nbytes("lm_head.weight"))
    return stages


def _fingerprint(src: _Source, calib: Path, args: dict) -> str:
    """What a partial compression is for: the source files, the calibration file and the arguments."""
    import hashlib

    from sdk.tools.package import sha256_file

    files = [[f.name, f.stat().st_size] for f in src.files]
    blob = json.dumps({"source": str(src.path.resolve()), "files": files, "calib": sha256_file(calib),
                       "args": args, "version": _version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume_state(work: Path, key: str) -> dict | None:
    """The state of a partial compression in ``work`` made with the same ``key``, else None
    (and ``work`` is cleared)."""
    import shutil

    path = work / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            state = None
        if state and state.get("key") == key:
            return state
        log.warning("%s: partial compression for other arguments or another source; starting over", work)
    if work.exists():
        shutil.rmtree(work)
    return None


def _save_state(work: Path, state: dict) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, work / STATE)


def _save_hidden(work: Path, stage: int, ref: torch.Tensor, cmp: torch.Tensor) -> None:
    for name, x in (("ref", ref), ("cmp", cmp)):
        tmp = work / f"hidden-{stage:04d}-{name}.tmp.npy"
        np.save(tmp, x.numpy())
        os.replace(tmp, work / f"hidden-{stage:04d}-{name}.npy")


def _load_hidden(work: Path, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.load(work / f"hidden-{stage:04d}-{n}.npy")) for n in ("ref", "cmp"))


def copy_text_files(src: Path, writer) -> list[str]:
    """Copy the source's tokenizer and generation config files (``sdk.tools.package.TEXT_FILES``,
    those present) into the package being written; returns their names."""
    from sdk.tools.package import TEXT_FILES

    names = [name for name in TEXT_FILES if (src / name).is_file()]
    for name in names:
        writer.add_text_file(src / name)
    return names


def compress(src: str | Path, out: str | Path, *, calib: str | Path, keep_experts: int | None = None,
             keep_ratio: float | None = None, quant: str = "int8", method: str = "reap",
             groups: str = "auto", held_out: float = 0.25, seed: int = 0, max_batch_tokens: int = 4096,
             window: int | None = None, progress: bool = True, overwrite: bool = False,
             on_progress=None) -> dict[str, Any]:
    """Calibrate, prune routed experts, quantize and write a verified package; returns its manifest.

    Streams from the memory-mapped source and never holds a layer's weights in float: every
    weight is read in blocks of rows (dequantized from FP8 per 128x128 block), and routed
    experts one at a time. For each layer the calibration rows' hidden states (kept in
    memory, float32) run through attention head group by head group; in a MoE layer the
    router alone routes them, then each expert that got tokens is read and run on its tokens,
    accumulating the layer's output and per expert the selection count and REAP saliency
    (the mean of gate weight x output norm over the tokens routed to it). ``keep_experts``
    (or ``keep_ratio`` of them) are kept per layer by ``method`` (``reap``, ``frequency`` or
    ``random`` with ``seed``); ``groups`` picks how group-limited routing stays valid (see
    :func:`group_plan`). The compressed layer is then computed on the held-out rows while
    its weights are read again, quantized (W8A8 int8) or rounded, and written straight into
    the package file: the kept experts one at a time. The last ``held_out`` fraction of the
    rows is not used for calibration but to compare the compressed model with the original
    (the quality report). Float weights are stored in float32 when the source is float32,
    else in bfloat16. Calibration attends causally within each row, or over the last
    ``window`` tokens (the deployment's sliding window) when given.

    Resumable: the work goes to ``.<out>.partial`` beside ``out``, and each finished stage
    (embeddings, every layer) is recorded there with the hidden states after it. A run
    interrupted in any way (even SIGKILL) and started again with the same arguments goes on
    from the last finished stage, and the package is byte-identical to an uninterrupted
    run's. ``progress`` shows a tqdm bar in source bytes with ETA; ``on_progress`` (a
    callable) receives dict events: ``progress`` (bytes done and total, ETA) and ``phase``
    (bytes read and seconds of each finished phase).
    """
    import shutil

    from runtime.model.transformer import Block, IOAdapter, RMSNorm
    from runtime.model.quant import quantize_model
    from sdk.tools.package import FORMAT, FORMAT_VERSION, PackageWriter

    src, out = Path(src), Path(out)
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"--window must be a positive integer, got {window!r}")
    source = _Source(src)
    cfg = source.cfg
    n_keep = resolve_keep(cfg, keep_experts, keep_ratio)
    gplan = group_plan(cfg, n_keep, groups)
    n_features = len(source.io["inputs"]) if source.io else None
    cal = load_calibration(calib, vocab_size=cfg.vocab_size, max_len=cfg.max_position_embeddings,
                           n_features=n_features)
    if cal.mode == "sensor" and not source.io:
        raise CalibrationError(f"{calib}: has sensor 'frames' but {src} has no I/O adapter (LM mode); "
                               "give token ids ('input_ids')")
    if cal.mode == "lm" and source.io:
        raise CalibrationError(f"{calib}: has token ids but {src} is a sensor model; give 'frames' [N, T, F]")
    pcfg = dataclasses.replace(cfg, n_routed_experts=n_keep, n_group=gplan["n_group"],
                               topk_group=gplan["topk_group"])
    pcfg.validate("pruned config")
    if "num_nextn_predict_layers" in pcfg.extra:       # multi-token-prediction layers are not packaged
        pcfg.extra = {**pcfg.extra, "num_nextn_predict_layers": 0}
    source.open()
    store = torch.float32 if source.reader.dtype("model.embed_tokens.weight") == "F32" else torch.bfloat16
    fit, held = cal.split(held_out)
    fit_s, held_s = _Stream(fit.rows, max_batch_tokens), _Stream(held.rows, max_batch_tokens)
    ref_s = fit_s + held_s
    log.info("compressing %s -> %s: keep %d of %d experts per layer by %s (%s groups), quant %s, "
             "%d calibration rows (%d tokens), %d held out", src, out, n_keep, cfg.n_routed_experts,
             method, gplan["rule"], quant, len(fit.rows), fit.tokens, len(held.rows))

    work = out.parent / f".{out.name}.partial"
    key = _fingerprint(source, Path(calib), {"keep": n_keep, "quant": quant, "method": method, "groups": groups,
                                             "held_out": held_out, "seed": seed, "window": window,
                                             "max_batch_tokens": max_batch_tokens})
    state = _resume_state(work, key) or {"key": key, "next": -1, "files": {}, "kept": {}, "layers": {}}
    planned = _planned_bytes(source, n_keep)
    from tqdm import tqdm
    bar = tqdm(total=sum(planned), desc="compress", unit="B", unit_scale=True, disable=not progress)
    track = _Progress(sum(planned), source.reader, None if not progress else bar, on_progress)
    track.base = sum(planned[:state["next"] + 1])
    L = cfg.num_hidden_layers
    with PackageWriter(out, overwrite=overwrite, work_dir=work / "package") as writer:
        for name, entry in state["files"].items():
            writer.adopt(name, entry)
        for stray in (work / "package").iterdir():
            if stray.name not in state["files"]:
                stray.unlink()
        if state["next"] >= 0:
            log.info("resuming %s from %s", out, "the head" if state["next"] == L else f"layer {state['next']}")
        adapter = None
        if source.io:
            adapter = IOAdapter(source.io["inputs"], source.io["outputs"], cfg.hidden_size)
            adapter.load_state_dict({k.removeprefix("adapter."): source.get(k) for k in source.expected()
                                     if k.startswith("adapter.")})

        # Inputs: token embeddings (LM) or the adapter's projection of frames (sensor).
        if state["next"] < 0:
            track.phase("embed")
            with torch.no_grad():
                if cal.mode == "lm":
                    x_ref = source.reader.gather(source._name("model.embed_tokens.weight"), ref_s.flat())
                    x_cmp = x_ref[fit_s.tokens:].to(store).float()
                else:
                    x_ref = adapter.embed(ref_s.flat())
                    x_cmp = x_ref[fit_s.tokens:].clone()
            V, H = cfg.vocab_size, cfg.hidden_size
            f = writer.open("model-embed.safetensors", {"model.embed_tokens.weight": (store, (V, H))})
            for a in range(0, V, _block_rows(H)):
                b = min(V, a + _block_rows(H))
                f.assign("model.embed_tokens.weight", slice(a, b), source.rows("model.embed_tokens.weight", a, b, store))
                track.update()
            writer.commit("model-embed.safetensors", f)
            _save_hidden(work, 0, x_ref, x_cmp)
            state.update(next=0, files=writer.files)
            _save_state(work, state)
            track.stage_done(planned[0])
        else:
            x_ref, x_cmp = _load_hidden(work, state["next"])

        # Layer by layer: the original on all rows (routing statistics from the calibration
        # rows), prune, then the compressed layer on the held-out rows while writing it.
        ref_pass = _Pass(source)
        for i in range(max(state["next"], 0), L):
            moe = cfg.is_moe_layer(i)
            track.phase("attention", i)
            x_ref = _attention(ref_pass, i, x_ref, ref_s, cfg, window)
            stats = None
            if moe:
                track.phase("experts", i)
                stats = ExpertStats(cfg.n_routed_experts)

                def tick(e, skipped=False, layer=i):
                    credit = 0
                    if skipped:
                        p = f"model.layers.{layer}.mlp.experts.{e}."
                        credit = sum(source.nbytes(p + k + ".weight") for k in ("gate_proj", "up_proj", "down_proj"))
                    track.update(credit, event=e % 16 == 15)

                x_ref, gate, bias = _moe_reference(ref_pass, i, x_ref, cfg, fit_s.tokens, stats, tick)
                kept = select_experts(_expert_scores(stats, method, seed, i), n_keep, gplan, cfg.n_group)
                orig = source.original_ids(i)
                state["kept"][str(i)] = [orig[e] for e in kept]
                state["layers"][str(i)] = {"experts": orig, "counts": [int(v) for v in stats.counts],
                                           "saliency": [round(float(v), 6) for v in stats.saliency]}
            else:
                track.phase("mlp", i)
                x_ref = _layer_mlp(ref_pass, i, x_ref, cfg)
            track.phase("compressed", i)
            with torch.device("meta"):
                block = Block(pcfg, i)
                if quant == "int8":
                    quantize_model(block, mode="w8a8")
            file_name = f"model-layer-{i:03d}.safetensors"
            f = _open_file(writer, file_name, [(block, f"model.layers.{i}.")], store)
            cmp_pass = _Pass(source, f, quant, store)
            x_cmp = _attention(cmp_pass, i, x_cmp, held_s, cfg, window)
            if moe:
                x_cmp = _moe_compressed(cmp_pass, i, x_cmp, cfg, pcfg, kept, gate, bias,
                                        lambda j: track.update(event=j % 16 == 15))
            else:
                x_cmp = _layer_mlp(cmp_pass, i, x_cmp, cfg)
            writer.commit(file_name, f)
            _save_hidden(work, i + 1, x_ref, x_cmp)
            state.update(next=i + 1, files=writer.files)
            _save_state(work, state)
            for old in work.glob(f"hidden-{i:04d}-*.npy"):
                old.unlink()
            track.stage_done(planned[i + 1])

        # Final norm and output head, and the quality report.
        track.phase("head")
        with torch.device("meta"):
            head = torch.nn.Module()
            head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            head.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if quant == "int8":
                quantize_model(head, mode="w8a8")
        extra = {}
        if adapter is not None:
            extra = {f"adapter.{k}": (v.dtype, tuple(v.shape)) for k, v in adapter.state_dict().items()}
        f = _open_file(writer, "model-head.safetensors", [(head.norm, "model.norm."), (head.lm_head, "lm_head.")],
                       store, extra)
        for k, v in adapter.state_dict().items() if adapter is not None else ():
            f.assign(f"adapter.{k}", slice(None), v)
        cmp_pass = _Pass(source, f, quant, store)
        x_held = x_ref[fit_s.tokens:]
        if cal.mode == "lm":
            ids = held_s.rows
            targets = torch.cat([torch.cat([r[1:], torch.tensor([-100])]) for r in ids]) if ids else \
                torch.zeros(0, dtype=torch.long)
            quality = _head_lm(cmp_pass, x_held, x_cmp, targets, cfg)
        else:
            with torch.no_grad():
                norm_ref = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                norm_ref.weight.copy_(source.get("model.norm.weight"))
                norm_cmp = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                norm_cmp.weight.copy_(cmp_pass.vector("model.norm.weight"))
            _write_head(cmp_pass, cfg)
            quality = _quality_sensor([x_held], [x_cmp], norm_ref, norm_cmp, adapter)
        quality["held_out_rows"] = len(held.rows)
        quality["on_calibration_data"] = held is cal
        writer.commit("model-head.safetensors", f)
        track.phase(None)
        bar.n = bar.total
        bar.close()

        copy_text_files(src, writer)
        package_bytes = sum(f["bytes"] for f in writer.files.values())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"r1edge {_version()}",
            "config": pcfg.to_dict(),
            "quantization": ({"scheme": "w8a8-int8", "weights": "per-output-channel symmetric int8",
                              "activations": "per-token dynamic int8",
                              "float": f"embeddings and norms {str(store).removeprefix('torch.')}, "
                                       "router float32"}
                             if quant == "int8" else
                             {"scheme": "none", "float": f"{str(store).removeprefix('torch.')}, router float32"}),
            "experts": {"kept": state["kept"], "original_n_routed_experts": source.original_n_routed,
                        "method": method, "seed": seed if method == "random" else None,
                        "groups": {"rule": gplan["rule"], "original_n_group": cfg.n_group,
                                   "original_topk_group": cfg.topk_group,
                                   "n_group": pcfg.n_group, "topk_group": pcfg.topk_group}},
            "io": source.io,
            "calibration": {"file": Path(cal.source).name, "mode": cal.mode, "rows": len(fit.rows),
                            "tokens": fit.tokens, "held_out_rows": len(held.rows),
                            "held_out_tokens": held.tokens, "window": window, "layers": state["layers"]},
            "quality": quality,
            "size": {"source_bytes": source.size_bytes, "package_bytes": package_bytes,
                     "ratio": package_bytes / source.size_bytes},
        }
        result = writer.finish(manifest)
    shutil.rmtree(work)
    return result


def render_report(manifest: dict[str, Any], out=None) -> None:
    """Print the compression report: experts kept per layer, size before/after, quality."""
    import sys
    w = (out or sys.stdout).write
    ex, size, q = manifest["experts"], manifest["size"], manifest["quality"]
    w(f"Experts kept per MoE layer ({ex['method']}, of {ex['original_n_routed_experts']}; groups "
      f"{ex['groups']['rule']}: n_group {ex['groups']['n_group']}, topk_group {ex['groups']['topk_group']}):\n")
    for layer, ids in ex["kept"].items():
        w(f"  layer {int(layer):3d}: {len(ids):4d}  {ids}\n")
    if not ex["kept"]:
        w("  (no MoE layers)\n")
    w(f"Quantization: {manifest['quantization']['scheme']}\n")
    w(f"Size: {size['source_bytes'] / 1e6:.2f} MB -> {size['package_bytes'] / 1e6:.2f} MB "
      f"({size['ratio']:.3f}x)\n")
    where = "calibration rows (only one row: none held out)" if q["on_calibration_data"] else \
        f"{q['held_out_rows']} held-out rows"
    if q["mode"] == "lm":
        w(f"Quality vs the uncompressed model on {where}, {q['tokens']} tokens:\n"
          f"  greedy-token agreement {q['greedy_agreement']:.4f}, logits cosine {q['logits_cosine']:.4f}")
        if q["nll_original"] is not None:
            w(f", next-token NLL {q['nll_original']:.4f} -> {q['nll_compressed']:.4f}")
        w("\n")
    else:
        w(f"Quality vs the uncompressed model on {where}, {q['frames']} frames (full causal attention; "
          f"r1edge eval measures with the deployment's window), range = {q['range']}:\n")
        for name, e in q["outputs"].items():
            w(f"  {name:<16} rms {e['rms']:.5g} ({100 * e['rms_frac_range']:.2f}% of range)  "
              f"max {e['max_abs']:.5g} ({100 * e['max_frac_range']:.2f}%)\n")

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

class _Source:
    """The float model being compressed, read lazily tensor by tensor (memory-mapped).

    Either an HF checkpoint directory (routed experts stored one by one, any float or FP8
    dtype) or an unquantized r1edge package (experts stacked; may carry an I/O adapter and
    an earlier pruning, whose kept-expert map is composed with this one).
    """

    def __init__(self, path: Path):
        """Read the config (and a package's manifest) only; :meth:`open` reads the weights' headers."""
        from runtime.config import ModelConfig
        from sdk.package import is_package, read_manifest

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
        from runtime.weights import CheckpointReader
        from sdk.package import verify_package

        if self.manifest is not None:
            verify_package(self.path)
        self.reader = CheckpointReader(self.path)
        self.stacked = any(n.endswith(".mlp.experts.gate_up_proj") for n in self.reader.names())
        files = {self.reader.file_of(n) for n in self.reader.names()}
        self.size_bytes = sum(f.stat().st_size for f in files)
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
        from runtime.model import IOAdapter, Transformer

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

    def get(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """One tensor, dequantized if FP8, as ``dtype``."""
        if name == "lm_head.weight" and name not in self.reader:
            name = "model.embed_tokens.weight"          # tied embeddings
        return self.reader.get(name, dtype)

    def block(self, layer: int, dtype=torch.float32):
        """Decoder layer ``layer`` as a ``runtime.model.Block`` holding the source weights."""
        from runtime.model import Block, cast_keeping_router_fp32
        from runtime.weights import load_layer

        with torch.device("meta"):
            block = Block(self.cfg, layer)
        block = cast_keeping_router_fp32(block.to_empty(device="cpu"), dtype)
        if self.stacked or not self.cfg.is_moe_layer(layer):
            with torch.no_grad():
                for local, target in block.state_dict().items():
                    target.copy_(self.get(f"model.layers.{layer}.{local}", target.dtype))
        else:
            load_layer(block, self.reader, layer, self.cfg)
        return block


def _batches(rows: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Rows stacked into batches of equal length, each at most ``max_tokens`` tokens (one row at least)."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        by_len.setdefault(int(r.shape[0]), []).append(r)
    out = []
    for length, group in sorted(by_len.items()):
        step = max(1, max_tokens // length)
        out += [torch.stack(group[i:i + step]) for i in range(0, len(group), step)]
    return out


def _rope_and_mask(cfg, T: int):
    from runtime.model import rope_cos_sin, rope_inv_freq

    inv_freq, factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, factor, torch.arange(T))
    mask = torch.full((T, T), float("-inf")).triu_(1) if T > 1 else None
    return cos, sin, mask


@torch.no_grad()
def _run_block(block, states: list[torch.Tensor], cfg) -> list[torch.Tensor]:
    out = []
    for x in states:
        cos, sin, mask = _rope_and_mask(cfg, x.shape[1])
        out.append(block(x, cos, sin, mask)[0])
    return out


def _quantize(module: torch.nn.Module) -> torch.nn.Module:
    """W8A8 in place through ``runtime.quant`` (the same code ``load_model(quant="int8")`` runs)."""
    from runtime.quant import quantize_model

    quantize_model(module, mode="w8a8")
    return module


def _prune_block(block, pcfg, layer: int, kept: list[int]):
    """A Block of the pruned config holding ``block``'s weights with only the ``kept`` experts."""
    from runtime.model import Block

    idx = torch.tensor(kept, dtype=torch.long)
    state = {}
    for name, t in block.state_dict().items():
        if name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias") or name.startswith("mlp.experts."):
            t = t.index_select(0, idx)
        state[name] = t
    with torch.device("meta"):
        pruned = Block(pcfg, layer)
    pruned.load_state_dict(state, strict=True, assign=True)
    return pruned


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("r1edge")
    except Exception:       # not installed (running from a source tree)
        return "0.1.0"


@torch.no_grad()
def _quality_lm(ref: list, cmp: list, ids: list, norm_ref, head_ref, norm_cmp, head_cmp,
                chunk: int = 512) -> dict[str, Any]:
    """Greedy-token agreement, logits cosine and next-token NLL of both models, ``chunk`` tokens at a time."""
    agree = cos = nll_ref = nll_cmp = 0.0
    n = n_next = 0
    for r, c, x in zip(ref, cmp, ids):
        B, T = x.shape
        target = torch.full((B, T), -100, dtype=torch.long)     # -100: ignored (no next token)
        target[:, :-1] = x[:, 1:]
        r, c, target = r.reshape(B * T, -1), c.reshape(B * T, -1), target.reshape(-1)
        for i in range(0, B * T, chunk):
            lr = head_ref(norm_ref(r[i:i + chunk])).float()
            lc = head_cmp(norm_cmp(c[i:i + chunk])).float()
            t = target[i:i + chunk]
            agree += float((lr.argmax(-1) == lc.argmax(-1)).sum())
            cos += float(torch.nn.functional.cosine_similarity(lr, lc, dim=-1).sum())
            nll_ref += float(torch.nn.functional.cross_entropy(lr, t, reduction="sum", ignore_index=-100))
            nll_cmp += float(torch.nn.functional.cross_entropy(lc, t, reduction="sum", ignore_index=-100))
            n_next += int((t != -100).sum())
        n += B * T
    return {"mode": "lm", "tokens": n,
            "greedy_agreement": agree / n, "logits_cosine": cos / n,
            "nll_original": nll_ref / n_next if n_next else None,
            "nll_compressed": nll_cmp / n_next if n_next else None}


@torch.no_grad()
def _quality_sensor(ref: list, cmp: list, norm_ref, norm_cmp, adapter) -> dict[str, Any]:
    """The compressed model's outputs against the uncompressed one's on the held-out rows, per
    output in the measures of ``r1edge eval`` (``sdk.eval.output_errors``; range: the span of
    the uncompressed outputs), and the output MSE (raw and normalised by each output's variance)."""
    from sdk.eval import output_errors

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
    from runtime.model import Experts, RMSNorm

    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, RMSNorm, Experts)):
            yield from m.parameters(recurse=False)


def _round_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round the stored float weights through ``dtype`` in place, so the quality report sees
    exactly the weights the package will hold."""
    if dtype != torch.float32:
        with torch.no_grad():
            for p in _float_weights(module):
                p.copy_(p.to(dtype))
    return module


def _to_store(module: torch.nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``module``'s state dict under ``prefix``, its stored float weights cast to ``dtype``."""
    cast = {id(p) for p in _float_weights(module)}
    return {prefix + name: (t.detach().to(dtype) if id(t) in cast else t.detach())
            for name, t in module.state_dict(keep_vars=True).items()}


def compress(src: str | Path, out: str | Path, *, calib: str | Path, keep_experts: int | None = None,
             keep_ratio: float | None = None, quant: str = "int8", method: str = "reap",
             groups: str = "auto", held_out: float = 0.25, seed: int = 0, max_batch_tokens: int = 4096,
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Calibrate, prune routed experts, quantize and write a verified package; returns its manifest.

    Streams layer by layer from the memory-mapped source: only one source layer (in float32),
    its pruned copy and the calibration activations are in memory at a time. The calibration
    rows run through the original model, recording per MoE layer and expert the selection
    count and the REAP saliency; ``keep_experts`` (or ``keep_ratio`` of them) are kept per
    layer by ``method`` (``reap``, ``frequency`` or ``random`` with ``seed``); ``groups``
    picks how group-limited routing is kept valid (see :func:`group_plan`). The last
    ``held_out`` fraction of the rows is not used for calibration but to compare the
    compressed model against the original (the quality report). Float weights are stored
    in float32 when the source is float32, else in bfloat16.
    """
    from runtime.model import IOAdapter, RMSNorm
    from sdk.package import FORMAT, FORMAT_VERSION, PackageWriter

    src, out = Path(src), Path(out)
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
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
    log.info("compressing %s -> %s: keep %d of %d experts per layer by %s (%s groups), quant %s, "
             "%d calibration rows (%d tokens), %d held out", src, out, n_keep, cfg.n_routed_experts,
             method, gplan["rule"], quant, len(fit.rows), fit.tokens, len(held.rows))

    from tqdm import tqdm
    bar = tqdm(total=cfg.num_hidden_layers + 2, desc="compress", unit="layer", disable=not progress)
    kept_map: dict[str, list[int]] = {}
    layer_stats: dict[str, dict[str, list[float]]] = {}
    head: dict[str, torch.Tensor] = {}
    with PackageWriter(out, overwrite=overwrite) as writer:
        # Inputs: token embeddings (LM) or the adapter's projection of frames (sensor).
        bar.set_postfix_str("embed")
        embed = torch.nn.Embedding.from_pretrained(source.get("model.embed_tokens.weight"))
        adapter = held_in = None
        if cal.mode == "lm":
            fit_in, held_in = _batches(fit.rows, max_batch_tokens), _batches(held.rows, max_batch_tokens)
            with torch.no_grad():
                cal_h, ref_h = [embed(x) for x in fit_in], [embed(x) for x in held_in]
                cmp_h = [_round_to(embed, store)(x) for x in held_in]
        else:
            adapter = IOAdapter(source.io["inputs"], source.io["outputs"], cfg.hidden_size)
            adapter.load_state_dict({k.removeprefix("adapter."): source.get(k) for k in source.expected()
                                     if k.startswith("adapter.")})
            with torch.no_grad():
                cal_h = [adapter.embed(x) for x in _batches(fit.rows, max_batch_tokens)]
                ref_h = [adapter.embed(x) for x in _batches(held.rows, max_batch_tokens)]
            cmp_h = [x.clone() for x in ref_h]
            head.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
        writer.add("model-embed.safetensors", {"model.embed_tokens.weight": embed.weight.to(store)})
        del embed
        bar.update(1)

        # Layer by layer: calibrate on the original, prune, quantize, run the held-out rows
        # through both, write, free.
        for i in range(cfg.num_hidden_layers):
            bar.set_postfix_str(f"layer {i}: calibrate")
            block = source.block(i)
            stats = ExpertStats(cfg.n_routed_experts) if cfg.is_moe_layer(i) else None
            if stats is not None:
                block.mlp.observer = stats
            cal_h = _run_block(block, cal_h, cfg)
            if stats is not None:
                block.mlp.observer = None
            ref_h = _run_block(block, ref_h, cfg)
            pblock = block
            if stats is not None:
                kept = select_experts(_expert_scores(stats, method, seed, i), n_keep, gplan, cfg.n_group)
                orig = source.original_ids(i)
                kept_map[str(i)] = [orig[e] for e in kept]
                layer_stats[str(i)] = {"experts": orig, "counts": [int(v) for v in stats.counts],
                                       "saliency": [round(float(v), 6) for v in stats.saliency]}
                unchanged = kept == list(range(cfg.n_routed_experts)) and (pcfg.n_group, pcfg.topk_group) == (
                    cfg.n_group, cfg.topk_group)
                if not unchanged:
                    pblock = _prune_block(block, pcfg, i, kept)
            del block
            bar.set_postfix_str(f"layer {i}: write")
            if quant == "int8":
                _quantize(pblock)
            cmp_h = _run_block(_round_to(pblock, store), cmp_h, pcfg)
            writer.add(f"model-layer-{i:03d}.safetensors", _to_store(pblock, f"model.layers.{i}.", store))
            del pblock
            bar.update(1)

        # Final norm and output head, then the quality report.
        bar.set_postfix_str("head and quality")
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        with torch.no_grad():
            norm.weight.copy_(source.get("model.norm.weight"))
        lm_weight = source.get("lm_head.weight")
        head_ref = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        head_ref.weight = torch.nn.Parameter(lm_weight, requires_grad=False)
        compressed = torch.nn.Module()
        compressed.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        compressed.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        compressed.lm_head.weight = torch.nn.Parameter(lm_weight.clone(), requires_grad=False)
        with torch.no_grad():
            compressed.norm.weight.copy_(norm.weight)
        if quant == "int8":
            _quantize(compressed)
        _round_to(compressed, store)
        if cal.mode == "lm":
            quality = _quality_lm(ref_h, cmp_h, held_in, norm, head_ref, compressed.norm, compressed.lm_head)
        else:
            quality = _quality_sensor(ref_h, cmp_h, norm, compressed.norm, adapter)
        quality["held_out_rows"] = len(held.rows)
        quality["on_calibration_data"] = held is cal
        head.update(_to_store(compressed.norm, "model.norm.", store))
        head.update(_to_store(compressed.lm_head, "lm_head.", store))
        writer.add("model-head.safetensors", head)
        bar.update(1)
        bar.close()

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
            "experts": {"kept": kept_map, "original_n_routed_experts": source.original_n_routed,
                        "method": method, "seed": seed if method == "random" else None,
                        "groups": {"rule": gplan["rule"], "original_n_group": cfg.n_group,
                                   "original_topk_group": cfg.topk_group,
                                   "n_group": pcfg.n_group, "topk_group": pcfg.topk_group}},
            "io": source.io,
            "calibration": {"file": Path(cal.source).name, "mode": cal.mode, "rows": len(fit.rows),
                            "tokens": fit.tokens, "held_out_rows": len(held.rows),
                            "held_out_tokens": held.tokens, "layers": layer_stats},
            "quality": quality,
            "size": {"source_bytes": source.size_bytes, "package_bytes": package_bytes,
                     "ratio": package_bytes / source.size_bytes},
        }
        return writer.finish(manifest)


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

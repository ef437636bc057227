"""Calibration data for compression: reading and validating calibration files.

Formats (validated before any work starts; errors name the line or key):

- ``.jsonl``: one ``{"input_ids": [int, ...]}`` object a line (blank lines are skipped);
- ``.npy``: an integer array [N, T] of token ids;
- ``.npz``: ``input_ids`` (or a single integer array) [N, T] for LM mode, or ``frames``, a
  float array [N, T, F] of sensor frames, for sensor mode.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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

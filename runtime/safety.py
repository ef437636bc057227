"""Safety limits that hold whatever the model does: input validation and output limits.

The model advises; these checks keep the plant safe. They run in the control loop, on
preallocated arrays of fixed shape ``[capacity, n_signals]`` (one row per stream slot), and
they never call the model.

Per stream and cycle a status is decided:

- ``OK``: the model's outputs, clamped to ``[min, max]`` and rate-limited to ``max_rate``
  units per second relative to the last output actually sent;
- ``FAILSAFE``: the configured fail-safe values, clamped but *not* rate-limited: a fail-safe
  must reach the plant in the cycle it was decided, not ramp towards it;
- ``HOLD``: the last output actually sent, repeated.

Independently of the status, a stream has a mode: ``AUTO`` (the model drives), ``MANUAL``
(the mode input says so) or ``WARMUP`` (its history is filling). While a stream is ``OK``
but not ``AUTO`` its outputs *track*: each output follows its tracking input (the actuator's
own value from the PLC, clamped to ``[min, max]``, not rate-limited: it is where the plant
already is), or holds its last value when it has none. The model's outputs then start from
the last value sent, so a switch to auto is bumpless.

Before the first cycle of a stream, "the last output sent" is its fail-safe value, so a
stream ramps up from the safe state at ``max_rate``; it also ramps back from a fail-safe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

OK, FAILSAFE, HOLD = 0, 1, 2
STATUS_NAMES = ("ok", "failsafe", "hold")

# Who drives a stream's outputs; the codes are the mode input's values (0 manual, 1 auto).
MANUAL, AUTO, WARMUP = 0, 1, 2
MODE_NAMES = ("manual", "auto", "warmup")

# Why a stream did not get the model's output this cycle. ``heartbeat``: a bridge serving the
# stream was putting out the fail-safe values itself (the PLC's heartbeat had stopped).
(REASON_NONE, REASON_INPUT, REASON_TIMEOUT, REASON_ERROR, REASON_BUSY, REASON_OUTPUT,
 REASON_HEARTBEAT) = range(7)
REASON_NAMES = ("", "invalid_input", "timeout", "error", "busy", "bad_output", "heartbeat")

# Why an input value is invalid (codes in ``InputGuard.codes``; 0 = valid).
INVALID_NAMES = ("", "nan", "inf", "range", "stale", "missing")
_NAN, _INF, _RANGE, _STALE, _MISSING = 1, 2, 3, 4, 5

#: Timestamp of an input that has never been received.
MISSING_STAMP = np.iinfo(np.int64).min
#: ``InputLimit.stale_ns`` of an input that never goes stale (a switch holding its value).
NEVER_STALE_NS = np.iinfo(np.int64).max


@dataclass(frozen=True)
class InputLimit:
    """Validity limits of one input signal: range, maximum age and what to do when invalid."""

    name: str
    min: float
    max: float
    stale_ns: int
    hold: bool = False   # on_invalid = "hold" (else "failsafe")


@dataclass(frozen=True)
class OutputLimit:
    """Limits of one output signal: range, maximum rate (units/s, inf = none), fail-safe value."""

    name: str
    min: float
    max: float
    max_rate: float
    failsafe: float


class InputGuard:
    """Checks every active stream's inputs for NaN, inf, range, staleness and absence.

    ``check`` marks streams with an invalid input ``FAILSAFE`` (or ``HOLD`` when every invalid
    input of the stream has ``on_invalid = "hold"``) and leaves the per-input reason codes in
    ``codes`` for the record. ``counts[k]`` counts invalid input values by reason
    ``INVALID_NAMES[k]`` over the guard's lifetime; ``ever_valid[j]`` says whether input ``j``
    was ever valid in an active stream.
    """

    def __init__(self, limits: Sequence[InputLimit], capacity: int):
        n = len(limits)
        self.names = [lim.name for lim in limits]
        self.lo = np.array([lim.min for lim in limits], dtype=np.float64)
        self.hi = np.array([lim.max for lim in limits], dtype=np.float64)
        self.stale_ns = np.array([lim.stale_ns for lim in limits], dtype=np.int64)
        self.failsafe_on_invalid = np.array([not lim.hold for lim in limits], dtype=bool)
        self.codes = np.zeros((capacity, n), dtype=np.int8)
        self.counts = np.zeros(len(INVALID_NAMES), dtype=np.int64)
        self._mask = np.zeros((capacity, n), dtype=bool)
        self._tmp = np.zeros((capacity, n), dtype=bool)
        self._age = np.zeros((capacity, n), dtype=np.int64)
        self._row = np.zeros(capacity, dtype=bool)
        self._row2 = np.zeros(capacity, dtype=bool)
        self.ever_valid = np.zeros(n, dtype=bool)
        self._col = np.zeros(n, dtype=bool)

    def check(self, values: np.ndarray, stamps: np.ndarray, active: np.ndarray, now_ns: int,
              status: np.ndarray, reason: np.ndarray) -> bool:
        """Validate ``values``/``stamps`` ``[capacity, F]`` of the ``active`` streams at ``now_ns``.

        Sets ``status``/``reason`` of streams with an invalid input; returns whether any input
        was invalid. Inactive rows are left alone and their codes zeroed.
        """
        codes, mask, tmp = self.codes, self._mask, self._tmp
        codes.fill(0)
        act = active[:, None]
        # Precedence (a value gets one code): missing > nan > inf > range > stale.
        np.subtract(now_ns, stamps, out=self._age)            # wraps for MISSING_STAMP; masked below
        np.greater(self._age, self.stale_ns, out=mask)
        self._mark(mask, act, _STALE)
        np.less(values, self.lo, out=mask)
        np.greater(values, self.hi, out=tmp)
        np.logical_or(mask, tmp, out=mask)
        self._mark(mask, act, _RANGE)
        np.isinf(values, out=mask)
        self._mark(mask, act, _INF)
        np.isnan(values, out=mask)
        self._mark(mask, act, _NAN)
        np.equal(stamps, MISSING_STAMP, out=mask)
        self._mark(mask, act, _MISSING)
        np.not_equal(codes, 0, out=mask)
        if not mask.any():
            if not self.ever_valid.all() and active.any():
                self.ever_valid.fill(True)
            return False
        np.logical_not(mask, out=tmp)
        np.logical_and(tmp, act, out=tmp)
        np.any(tmp, axis=0, out=self._col)
        np.logical_or(self.ever_valid, self._col, out=self.ever_valid)
        for k in range(1, len(INVALID_NAMES)):
            self.counts[k] += int(np.count_nonzero(codes == k))
        # A stream fails safe if any invalid input asks for it, else it holds.
        np.logical_and(mask, self.failsafe_on_invalid, out=tmp)
        fs, bad = self._row, self._row2
        np.any(tmp, axis=1, out=fs)
        np.any(mask, axis=1, out=bad)
        np.copyto(status, HOLD, where=bad)
        np.copyto(status, FAILSAFE, where=fs)
        np.copyto(reason, REASON_INPUT, where=bad)
        return True

    def _mark(self, mask: np.ndarray, act: np.ndarray, code: int) -> None:
        np.logical_and(mask, act, out=mask)
        np.copyto(self.codes, code, where=mask)

    def invalid_inputs(self, slot: int) -> dict[str, str]:
        """``{input name: reason}`` of the invalid inputs of ``slot`` in the last check."""
        row = self.codes[slot]
        return {self.names[i]: INVALID_NAMES[c] for i, c in enumerate(row.tolist()) if c}

    def never_valid(self) -> list[str]:
        """The inputs that have never been valid in an active stream."""
        return [name for name, ok in zip(self.names, self.ever_valid.tolist()) if not ok]

    def counts_by_reason(self) -> dict[str, int]:
        """Lifetime counts of invalid input values, by reason."""
        return {INVALID_NAMES[k]: int(self.counts[k]) for k in range(1, len(INVALID_NAMES))}


class OutputLimiter:
    """Clamps and rate-limits outputs, puts out fail-safe or held values, and tracks, per slot.

    ``last`` ``[capacity, O]`` is the last output actually sent per slot (the fail-safe values
    before a slot's first cycle). The rate limit per cycle is ``max_rate * period_s``.
    ``track[j]`` is the input column output ``j`` follows while tracking (-1: none, it holds).
    """

    def __init__(self, limits: Sequence[OutputLimit], capacity: int, period_s: float,
                 track: Sequence[int] | None = None):
        self.names = [lim.name for lim in limits]
        self.track = np.array(track if track is not None else [-1] * len(limits), dtype=np.int64)
        if self.track.shape != (len(limits),):
            raise ValueError(f"track needs one input column (or -1) per output, got {list(self.track)}")
        self._has_track = self.track >= 0
        self._no_track = ~self._has_track
        self._track_src = np.where(self._has_track, self.track, 0)
        self.lo = np.array([lim.min for lim in limits], dtype=np.float64)
        self.hi = np.array([lim.max for lim in limits], dtype=np.float64)
        rate = np.array([lim.max_rate for lim in limits], dtype=np.float64)
        self.step = rate * float(period_s)                     # inf where there is no rate limit
        self.failsafe = np.clip(np.array([lim.failsafe for lim in limits], dtype=np.float64),
                                self.lo, self.hi)
        self.last = np.empty((capacity, len(limits)), dtype=np.float64)
        self.last[:] = self.failsafe
        self._lo_r = np.empty_like(self.last)
        self._hi_r = np.empty_like(self.last)
        self._cand = np.empty_like(self.last)
        self._trk = np.empty_like(self.last)
        self._sel = np.zeros((capacity, 1), dtype=bool)
        self._eq = np.zeros(capacity, dtype=bool)

    def reset(self, slot: int) -> None:
        """Forget a slot's history: its last output becomes the fail-safe value."""
        self.last[slot] = self.failsafe

    def apply(self, raw: np.ndarray, status: np.ndarray, active: np.ndarray, out: np.ndarray,
              tracking: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        """Write the outputs of the active slots into ``out`` and remember them as sent.

        ``raw`` holds the model's outputs (read only where ``status == OK``). ``tracking``
        (bool ``[capacity]``) marks the slots whose outputs track this cycle (read only where
        ``status == OK``), following their tracking inputs in ``values`` ``[capacity, F]``.
        """
        cand, lo_r, hi_r, sel, eq = self._cand, self._lo_r, self._hi_r, self._sel, self._eq
        np.clip(raw, self.lo, self.hi, out=cand)
        np.subtract(self.last, self.step, out=lo_r)
        np.add(self.last, self.step, out=hi_r)
        np.maximum(cand, lo_r, out=cand)
        np.minimum(cand, hi_r, out=cand)
        for code, value in ((OK, cand), (HOLD, self.last), (FAILSAFE, self.failsafe)):
            np.equal(status, code, out=eq)
            np.logical_and(active, eq, out=sel[:, 0])
            np.copyto(out, value, where=sel)
        if tracking is not None and tracking.any():
            trk = self._trk
            np.take(values, self._track_src, axis=1, out=trk)
            np.copyto(trk, self.last, where=self._no_track)
            np.clip(trk, self.lo, self.hi, out=trk)
            np.equal(status, OK, out=eq)
            np.logical_and(eq, tracking, out=eq)
            np.logical_and(active, eq, out=sel[:, 0])
            np.copyto(out, trk, where=sel)
        sel[:, 0] = active
        np.copyto(self.last, out, where=sel)


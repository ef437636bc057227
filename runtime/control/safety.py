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
own value from the PLC, clamped to ``[min, max]``), or holds its last value when it has none.
Tracking starts from the last output sent and moves towards the tracked value at
``max_rate``; once it has reached it, it follows it exactly, unlimited (the plant is there
already). The model's outputs always start from the last value sent, so both switches,
auto to tracking and back, are bumpless.

"The last output sent" before a stream's first cycle is the value of the output's tracking
input in that cycle where it has one (the actuator's position: the plant keeps what it has),
else its fail-safe value, from which the stream ramps up at ``max_rate``. After a cycle that
put out the fail-safe values, every output moves back at ``max_rate``, whether the model
drives it or it tracks, unless its limit says ``jump`` (``[[outputs]] on_recover = "jump"``):
then the first cycle after the fail-safe goes straight to the model's (or tracked) value.
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
# ``bridge``: a bridge feeding the stream had a dead I/O task. New reasons go at the end, so
# recorded codes keep their meaning.
(REASON_NONE, REASON_INPUT, REASON_TIMEOUT, REASON_ERROR, REASON_BUSY, REASON_OUTPUT,
 REASON_HEARTBEAT, REASON_BRIDGE) = range(8)
REASON_NAMES = ("", "invalid_input", "timeout", "error", "busy", "bad_output", "heartbeat", "bridge")
#: Per reason: whether a frame that ran under it has model outputs worth recording (the model
#: answered; its outputs were then refused or overridden, or not at all).
REASON_KEEPS_OUTPUTS = np.array([r in (REASON_NONE, REASON_OUTPUT, REASON_HEARTBEAT, REASON_BRIDGE)
                                 for r in range(len(REASON_NAMES))])

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
    """Limits of one output signal: range, maximum rate (units/s, inf = none), fail-safe value,
    and ``jump``: the first cycle after a fail-safe is not rate-limited (else it ramps back)."""

    name: str
    min: float
    max: float
    max_rate: float
    failsafe: float
    jump: bool = False


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

    ``last`` ``[capacity, O]`` is the last output actually sent per slot (see the module
    docstring for its value before a slot's first cycle). The rate limit per cycle is
    ``max_rate * period_s`` (``step``). ``track[j]`` is the input column output ``j`` follows while
    tracking (-1: none, it holds). ``caught[s, j]``: output ``j`` of slot ``s`` tracked its
    input last cycle and had reached it (so it follows exactly, not rate-limited).
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
        self.jump = np.array([lim.jump for lim in limits], dtype=bool)
        self._jump = self.jump[None, :]
        self.last = np.empty((capacity, len(limits)), dtype=np.float64)
        self.last[:] = self.failsafe
        self.fresh = np.ones(capacity, dtype=bool)             # nothing sent since the slot's reset
        self.after_failsafe = np.zeros(capacity, dtype=bool)   # the last cycle put out the fail-safe
        self.caught = np.zeros((capacity, len(limits)), dtype=bool)
        self._lo_r = np.empty_like(self.last)
        self._hi_r = np.empty_like(self.last)
        self._cand = np.empty_like(self.last)
        self._trk = np.empty_like(self.last)
        self._target = np.empty_like(self.last)
        self._free = np.zeros_like(self.caught)
        self._sel = np.zeros((capacity, 1), dtype=bool)
        self._eq = np.zeros(capacity, dtype=bool)
        self._ok = np.zeros(capacity, dtype=bool)
        self._trk_sel = np.zeros((capacity, 1), dtype=bool)

    def reset(self, slot: int) -> None:
        """Forget a slot's history: nothing has been sent (its last output is the fail-safe value,
        or its tracked value at its next cycle)."""
        self.last[slot] = self.failsafe
        self.fresh[slot] = True
        self.after_failsafe[slot] = False
        self.caught[slot] = False

    def apply(self, raw: np.ndarray, status: np.ndarray, active: np.ndarray, out: np.ndarray,
              tracking: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        """Write the outputs of the active slots into ``out`` and remember them as sent.

        ``raw`` holds the model's outputs (read only where ``status == OK``). ``tracking``
        (bool ``[capacity]``) marks the slots whose outputs track this cycle (read only where
        ``status == OK``), following their tracking inputs in ``values`` ``[capacity, F]``
        (also read, where ``status == OK``, in a slot's first cycle: where its outputs start).
        """
        cand, lo_r, hi_r, sel, eq, ok = self._cand, self._lo_r, self._hi_r, self._sel, self._eq, self._ok
        np.equal(status, OK, out=ok)
        np.logical_and(ok, active, out=ok)
        has_values = values is not None and self._has_track.any()
        if has_values:
            trk = self._trk
            np.take(values, self._track_src, axis=1, out=trk)
            np.copyto(trk, self.last, where=self._no_track)
            np.clip(trk, self.lo, self.hi, out=trk)
            np.logical_and(ok, self.fresh, out=sel[:, 0])       # a first cycle starts where the plant is
            np.logical_and(sel, self._has_track, out=self._free)
            np.copyto(self.last, trk, where=self._free)
        np.subtract(self.last, self.step, out=lo_r)
        np.add(self.last, self.step, out=hi_r)
        if self.after_failsafe.any() and self._jump.any():
            free = self._free
            np.logical_and(self.after_failsafe[:, None], self._jump, out=free)
            np.copyto(lo_r, -np.inf, where=free)
            np.copyto(hi_r, np.inf, where=free)
        np.clip(raw, self.lo, self.hi, out=cand)
        np.maximum(cand, lo_r, out=cand)
        np.minimum(cand, hi_r, out=cand)
        for code, value in ((OK, cand), (HOLD, self.last), (FAILSAFE, self.failsafe)):
            np.equal(status, code, out=eq)
            np.logical_and(active, eq, out=sel[:, 0])
            np.copyto(out, value, where=sel)
        trk_sel = self._trk_sel
        trk_sel[:, 0] = False
        if tracking is not None and tracking.any():
            if not has_values:
                trk = self._trk
                np.copyto(trk, self.last)
            target = self._target
            np.copyto(target, trk)
            np.maximum(trk, lo_r, out=trk)                      # ramp towards the tracked value ...
            np.minimum(trk, hi_r, out=trk)
            np.copyto(trk, target, where=self.caught)          # ... or follow it once reached
            np.logical_and(ok, tracking, out=trk_sel[:, 0])
            np.copyto(out, trk, where=trk_sel)
            np.equal(trk, target, out=self._free)
            np.logical_and(self._free, trk_sel, out=self.caught)
        else:
            self.caught.fill(False)
        np.equal(status, FAILSAFE, out=eq)
        np.logical_and(active, eq, out=eq)
        np.copyto(self.after_failsafe, eq, where=active)
        np.copyto(self.fresh, False, where=active)
        sel[:, 0] = active
        np.copyto(self.last, out, where=sel)

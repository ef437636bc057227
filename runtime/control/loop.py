"""The periodic control loop: absolute deadlines, real-time setup, the inference watchdog and
one control cycle over a set of stream slots. No networking: inputs and outputs are arrays.

- ``PeriodicLoop`` wakes on absolute ticks of ``time.monotonic_ns()``: it sleeps until
  ``spin_ns`` before the tick, then spins (always sleeping part of the period, as pure
  busy-waiting under SCHED_FIFO runs into RT throttling: the spin is cut so that recent cycles
  plus the spin stay under ``BUSY_MAX``, 80%, of the period). Missed ticks are skipped, never
  burst. While it runs, the GIL's switch interval is 0.5 ms. Before its first tick it collects
  garbage once, freezes what survives
  (``gc.freeze()``) and disables the automatic collector, so no cycle ever waits for a full
  collection; young generations are collected between cycles when there is slack. Where
  permitted it applies SCHED_FIFO, CPU affinity and ``mlockall`` (``runtime.control.realtime``,
  whose names are re-exported here), and says which were applied.
- ``InferenceWorker`` runs inference in a dedicated thread, so the loop can stop waiting for it
  (the watchdog): on a timeout the cycle puts out the fail-safe values, and while the worker is
  still busy later cycles keep the fail-safe without queueing more work.
- ``ModeSources``: which source's value of the mode input is in force (precedence by change).
- ``ControlCycle`` is one cycle: validate inputs, run the policy under the watchdog, decide
  each stream's mode (auto, manual, warm-up), clamp and rate-limit or track outputs, bump the
  heartbeat. Its per-stream bookkeeping runs compiled (``runtime.control.kernels``); the NumPy
  code beside it is the reference the kernels are tested against. The policy has the engine's
  sensor interface (``input_names``, ``output_names``,
  ``reset_slot``, ``step_sensor``; ``prefill`` where it has one: ``fill_history``).
- ``LatencyHistogram``: fixed log-spaced bins, p50/p99/p99.9/max without allocation per sample.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import select
import sys
import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from runtime.control import kernels
from runtime.control.realtime import (RealtimeOptions, default_cpu, lock_memory,  # noqa: F401 (re-exported)
                                      set_compute_threads, set_thread_realtime)
from runtime.control.safety import (AUTO, FAILSAFE, HOLD, MANUAL, OK, REASON_BRIDGE, REASON_BUSY, REASON_ERROR,
                                    REASON_HEARTBEAT, REASON_INPUT, REASON_NONE, REASON_OUTPUT, REASON_TIMEOUT, WARMUP,
                                    MISSING_STAMP, InputGuard, OutputLimiter)

logger = logging.getLogger(__name__)

monotonic_ns = time.monotonic_ns


class LatencyHistogram:
    """Latencies in fixed log-spaced bins (microseconds): constant memory, O(1) per sample.

    A percentile is reported as the upper edge of the bin that holds it (capped at the exact
    maximum), so it is never an underestimate; with 40 bins a decade the edge is within 6%.
    """

    def __init__(self, lo_us: float = 0.1, hi_us: float = 1e7, per_decade: int = 40):
        self._log_lo = math.log10(lo_us)
        self._k = per_decade
        self._lo_us = lo_us
        n = int(math.ceil((math.log10(hi_us) - self._log_lo) * per_decade)) + 1
        self._edges = [10.0 ** (self._log_lo + (i + 1) / per_decade) for i in range(n)]
        self.counts = [0] * n
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0

    def add_ns(self, ns: int) -> None:
        """Add one sample given in nanoseconds (negative values count as zero)."""
        us = ns / 1000.0
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us
        if us <= self._lo_us:
            i = 0
        else:
            i = int((math.log10(us) - self._log_lo) * self._k)
            if i >= len(self.counts):
                i = len(self.counts) - 1
        self.counts[i] += 1

    def percentile(self, q: float) -> float:
        """The ``q``-quantile (0..1) in microseconds (0.0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= rank:
                return min(self._edges[i], self.max_us)
        return self.max_us

    def summary(self) -> dict:
        """``{count, mean, p50, p99, p999, max}`` in microseconds."""
        return {"count": self.count,
                "mean": self.total_us / self.count if self.count else 0.0,
                "p50": self.percentile(0.50), "p99": self.percentile(0.99),
                "p999": self.percentile(0.999), "max": self.max_us}


# ---------------------------------------------------------------------------- watchdog worker

class InferenceWorker:
    """A dedicated thread that runs one job at a time; the caller waits with a deadline.

    ``submit(job)`` refuses (returns False) while the previous job is still running, so a
    stalled inference never queues work. ``wait(deadline_ns)`` returns whether the job finished
    in time; ``error`` holds what it raised. Jobs are matched by sequence number, so a late
    completion of an abandoned job can never be taken for the current one.

    The worker says a job is done by writing a byte to a pipe the caller waits on in
    ``select``: ``os.write`` lets go of the GIL before the write wakes the caller, so the
    caller (the loop, one priority higher on the same CPU) runs on at once, where releasing a
    lock would wake it only to wait for the GIL the worker still holds (two more context
    switches: the 1 kHz loop's infer phase p50 drops by about 6 us, 106 -> 100 us measured).
    """

    def __init__(self, name: str = "r1edge-infer"):
        self.name = name
        self._go = threading.Lock()
        self._go.acquire()
        self._done_r, self._done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        self._job: Callable[[], object] | None = None
        self._submitted = 0
        self._finished = 0
        self._closing = False
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether the last submitted job is still running."""
        return self._finished != self._submitted

    def submit(self, job: Callable[[], object]) -> bool:
        """Start ``job`` in the worker thread; False (and nothing started) while busy or closed."""
        if self.busy or self._closing:
            return False
        self._job = job
        self.error = None
        self.result = None
        self._submitted += 1
        self._go.release()
        return True

    def wait(self, deadline_ns: int) -> bool:
        """Wait until the current job finishes or ``deadline_ns`` passes; True if it finished."""
        while self._finished != self._submitted:
            remaining = deadline_ns - monotonic_ns()
            if remaining <= 0:
                return False
            if select.select((self._done_r,), (), (), remaining / 1e9)[0]:
                try:                                     # every wake-up so far: an abandoned job's
                    os.read(self._done_r, 4096)          # late one only makes this loop look again
                except BlockingIOError:
                    pass
        return True

    def run_sync(self, job: Callable[[], object], timeout_s: float = 5.0) -> object:
        """Run ``job`` in the worker thread and return its result (raises what it raised)."""
        if not self.submit(job):
            raise RuntimeError("inference worker is busy")
        if not self.wait(monotonic_ns() + int(timeout_s * 1e9)):
            raise TimeoutError("inference worker did not answer")
        if self.error is not None:
            raise self.error
        return self.result

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread (waits up to ``timeout_s`` for a running job; the thread is a daemon)."""
        self._closing = True
        try:
            self._go.release()
        except RuntimeError:
            pass
        self._thread.join(timeout_s)
        if not self._thread.is_alive() and self._done_w >= 0:   # a stuck job keeps its pipe
            os.close(self._done_r)
            os.close(self._done_w)
            self._done_r = self._done_w = -1

    def _main(self) -> None:
        while True:
            self._go.acquire()
            if self._closing and self._finished == self._submitted:
                return
            try:
                self.result = self._job()
            except BaseException as exc:                # reported to the loop, never fatal here
                self.error = exc
            self._finished = self._submitted
            os.write(self._done_w, b"\x01")
            if self._closing:
                return


# ---------------------------------------------------------------------------- one control cycle

class SensorPolicy(Protocol):
    """The engine's sensor-mode interface, as the cycle uses it."""

    input_names: list[str]
    output_names: list[str]

    def reset_slot(self, slot: int) -> None: ...

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray: ...


def fill_history(policy: SensorPolicy, slot: int, frames: np.ndarray) -> None:
    """Append ``frames`` [T, F] (float32) to ``slot``'s history: ``policy.prefill`` in one pass
    where the policy has it (the CPU engine: bitwise what T steps give), else T single steps."""
    if not len(frames):
        return
    prefill = getattr(policy, "prefill", None)
    if prefill is not None:
        prefill(slot, frames)
        return
    slots = np.array([slot], dtype=np.int64)
    for i in range(len(frames)):
        policy.step_sensor(slots, frames[i:i + 1])


def fill_gaps(policy: SensorPolicy, slots: np.ndarray, feats: np.ndarray, start: np.ndarray,
              fill: np.ndarray, history: np.ndarray) -> None:
    """Before the frames ``feats`` [n, F] of ``slots`` are stepped: where ``start``, reset the
    slot and fill its history with ``len(history)`` (``window - 1``) copies of its frame; else
    append ``fill`` copies of it (a gap of missed frames). ``history`` is scratch space."""
    if not (start.any() or fill.any()):
        return
    for i in np.flatnonzero(start | (fill > 0)).tolist():
        slot = int(slots[i])
        g = len(history) if start[i] else int(fill[i])
        if start[i]:
            policy.reset_slot(slot)
        history[:g] = feats[i]
        fill_history(policy, slot, history[:g])


class ControlCycle:
    """One control cycle over ``capacity`` stream slots, on preallocated buffers.

    The caller fills ``values`` (float64 ``[capacity, F]``: the policy's inputs in its order,
    then any inputs only the cycle reads, such as tracking and mode inputs), ``stamps`` (int64
    monotonic ns of each value, ``MISSING_STAMP`` if never received), ``active`` (bool
    ``[capacity]``), ``forced`` (bool: a bridge is putting out the stream's fail-safe values
    itself) and ``down`` (bool: a bridge feeding the stream has a dead I/O task), then calls ``run``. Results: ``status``/``reason`` per slot, ``mode`` (auto,
    manual, warm-up), ``ran`` (the frame was handed to the policy), ``started`` (that frame
    began a warm-up), ``filled`` (copies of that frame put into the history before it),
    ``raw`` (model outputs, float64) and ``out`` (the outputs to send). Slot ``i`` here is
    slot ``i`` of the policy.

    Warm-up (``warmup_cycles`` > 0): when a stream starts, after an inference error, and at its
    first valid frame after at least ``window - 1`` frames with invalid inputs, its history is
    reset and filled with ``window - 1`` copies of that frame (``fill_history``) before the
    frame is stepped, so the model always sees a full window; its outputs then track for
    ``warmup_cycles`` frames (counting that one), while the window fills with real frames, and
    the model drives after that. A shorter gap of ``g`` invalid frames keeps the history (it
    still holds the stream's latest real frames) and fills the gap with ``g`` copies of the
    first valid frame after it, so the window still spans its ``window`` periods of plant time;
    the model drives at once, ramping back from the fail-safe values. Mode (``mode_col``, the
    column of the mode input): below 0.5 the stream is manual and its outputs track; the model
    still steps every frame, so a switch to auto needs no warm-up. A ``forced`` stream fails
    safe (reason ``heartbeat``) after its frame was stepped; a ``down`` one fails safe (reason
    ``bridge``, whatever else was wrong) after its frame, if valid, was stepped. The watchdog's other fail-safes
    (timeout, busy, bad output) leave the history as it is: the outputs ramp back from the
    fail-safe values.
    """

    def __init__(self, policy: SensorPolicy, guard: InputGuard, limiter: OutputLimiter, *,
                 capacity: int, worker: InferenceWorker, window: int = 1, warmup_cycles: int = 0,
                 mode_col: int | None = None, compiled: bool = True):
        n_feat, n_out = len(policy.input_names), len(policy.output_names)
        n_in = len(guard.names)
        if n_in < n_feat:
            raise ValueError(f"the guard checks {n_in} inputs, the policy takes {n_feat}")
        self.policy, self.guard, self.limiter, self.worker = policy, guard, limiter, worker
        self.capacity = capacity
        self.window, self.warmup_cycles, self.mode_col = int(window), int(warmup_cycles), mode_col
        self.values = np.full((capacity, n_in), np.nan, dtype=np.float64)
        self.stamps = np.zeros((capacity, n_in), dtype=np.int64)
        self.active = np.zeros(capacity, dtype=bool)
        self.forced = np.zeros(capacity, dtype=bool)
        self.down = np.zeros(capacity, dtype=bool)
        self.status = np.zeros(capacity, dtype=np.int8)
        self.reason = np.zeros(capacity, dtype=np.int8)
        self.mode = np.full(capacity, AUTO, dtype=np.int8)
        self.ran = np.zeros(capacity, dtype=bool)
        self.started = np.zeros(capacity, dtype=bool)
        self.filled = np.zeros(capacity, dtype=np.int64)
        self.raw = np.full((capacity, n_out), np.nan, dtype=np.float64)
        self.out = np.empty((capacity, n_out), dtype=np.float64)
        self.out[:] = limiter.failsafe
        self.cold = np.ones(capacity, dtype=bool)        # warm up at the next valid frame
        self.warmup_left = np.zeros(capacity, dtype=np.int64)
        self.missed = np.zeros(capacity, dtype=np.int64)  # frames with invalid inputs since the last one stepped
        self._tracking = np.zeros(capacity, dtype=bool)
        self._ok = np.zeros(capacity, dtype=bool)
        self._eq = np.zeros(capacity, dtype=bool)
        self._arange = np.arange(capacity, dtype=np.int64)
        self._slots = np.zeros(capacity, dtype=np.int64)
        self._start = np.zeros(capacity, dtype=bool)     # per submitted row: begins a warm-up
        self._fill = np.zeros(capacity, dtype=np.int64)  # per submitted row: gap frames to fill first
        self._long = np.zeros(capacity, dtype=bool)
        self._x64 = np.zeros((capacity, n_in), dtype=np.float64)
        self._feats = np.zeros((capacity, n_feat), dtype=np.float32)
        self._history = np.zeros((max(self.window - 1, 0), n_feat), dtype=np.float32)
        self._y = np.zeros((capacity, n_out), dtype=np.float32)
        self._finite = np.zeros((capacity, n_out), dtype=bool)
        self._n = 0
        self._resets: list[int] = []
        self._pending_resets: list[int] = []
        self.heartbeat = 0
        self.n_valid = 0                                 # active streams with every input valid, last cycle
        self.n_ran = 0                                   # frames handed to the policy, last cycle
        self.n_failsafe = 0                              # active streams in each state, last cycle
        self.n_hold = 0
        self.n_tracking = 0                              # active OK streams whose outputs tracked
        self.counters = {"timeouts": 0, "errors": 0, "busy_cycles": 0, "bad_outputs": 0, "warmups": 0,
                         "gaps_filled": 0}
        self.last_error: str | None = None
        self._error_run = False
        self.compiled = bool(compiled)
        self._tally = np.zeros(kernels.TALLY_SIZE, dtype=np.int64)
        self._ctl = np.zeros(kernels.CTL_SIZE, dtype=np.int64)
        self._gaps = False                               # the frames handed over start warm-ups or fill gaps
        if self.compiled:                                # compiled here, not in the first cycle
            guard, lim = self.guard, self.limiter
            self._pre_args = (self.values, self.stamps, self.active, self._ctl, guard.lo, guard.hi, guard.stale_ns,
                              guard.failsafe_on_invalid, guard.codes, guard.counts, guard.ever_valid, self.status,
                              self.reason, self.ran, self.started, self.filled, self.warmup_cycles, self.window,
                              self.missed, self.cold, self.warmup_left, self._slots, self._feats, self._start,
                              self._fill, self._tally)
            self._post_args = (self._ctl, self._slots, self._y, self.raw, self.status, self.reason, self.active,
                               self.forced, self.down, self.ran, self.mode, self.warmup_left, self.values,
                               -1 if mode_col is None else int(mode_col), self._tracking, lim.track, lim.lo,
                               lim.hi, lim.step, lim.failsafe, lim.jump, lim.last, lim.fresh, lim.after_failsafe,
                               lim.caught, self.out, self._tally)
            self._pre = kernels.entry(kernels.cycle_pre, self._pre_args)
            self._post = kernels.entry(kernels.cycle_post, self._post_args)

    def reset_slot(self, slot: int) -> None:
        """Start ``slot`` afresh: policy history (before its next inference), output history,
        and a warm-up at its next valid frame."""
        self._pending_resets.append(slot)
        self.limiter.reset(slot)
        self.cold[slot] = True
        self.warmup_left[slot] = 0
        self.missed[slot] = 0
        self.mode[slot] = AUTO

    def run(self, now_ns: int, infer_deadline_ns: int) -> int:
        """Run one cycle at ``now_ns``; inference must finish by ``infer_deadline_ns``.

        Returns the nanoseconds spent handing off to and waiting for inference. With
        ``compiled`` (the default) the bookkeeping runs as the kernels of
        :mod:`runtime.control.kernels` around the hand-off; without, as the NumPy reference
        they are checked against (:meth:`_run_reference`). A timeout or an error of the policy
        fails its frames' streams safe here (rare); the outputs of a finished step are
        collected by the post-inference kernel.
        """
        if not self.compiled:
            return self._run_reference(now_ns, infer_deadline_ns)
        ctl, tally, worker = self._ctl, self._tally, self.worker
        ctl[kernels.CTL_NOW] = now_ns
        ctl[kernels.CTL_BUSY] = busy = worker.busy
        n = ctl[kernels.CTL_N] = self._pre(*self._pre_args)
        self.n_valid = int(tally[kernels.T_VALID])
        self.n_ran = n
        infer_ns, collect = 0, False
        if n:
            self.counters["warmups"] += int(tally[kernels.T_WARMUPS])
            self.counters["gaps_filled"] += int(tally[kernels.T_GAPS])
            self._n, self._gaps = n, bool(tally[kernels.T_WARMUPS] or tally[kernels.T_GAPS])
            self._resets, self._pending_resets = self._pending_resets, []
            t0 = monotonic_ns()
            worker.submit(self._job)
            finished = worker.wait(infer_deadline_ns)
            infer_ns = monotonic_ns() - t0
            collect = finished and worker.error is None
            if collect:
                self._error_run = False
            else:
                np.copyto(self._eq, self.ran)
                self._fail(self._eq, REASON_TIMEOUT if not finished else REASON_ERROR)
                if not finished:
                    self.counters["timeouts"] += 1
                    self._error_run = False
                else:
                    if self.warmup_cycles:                       # the history is unknown: warm up again
                        np.logical_or(self.cold, self._eq, out=self.cold)
                    self._note_error()
        elif busy and self.n_valid:
            self.counters["busy_cycles"] += 1
        ctl[kernels.CTL_COLLECT] = collect
        self._post(*self._post_args)
        self.counters["bad_outputs"] += int(tally[kernels.T_BAD_OUTPUTS])
        self.n_failsafe = int(tally[kernels.T_FAILSAFE])
        self.n_hold = int(tally[kernels.T_HOLD])
        self.n_tracking = int(tally[kernels.T_TRACKING])
        self.heartbeat = (self.heartbeat + 1) & 0xFFFF
        return infer_ns

    def _run_reference(self, now_ns: int, infer_deadline_ns: int) -> int:
        """The cycle's bookkeeping in NumPy: the executable reference of the compiled kernels."""
        status, reason, active = self.status, self.reason, self.active
        status.fill(OK)
        reason.fill(REASON_NONE)
        self.ran.fill(False)
        self.started.fill(False)
        self.filled.fill(0)
        ok, eq = self._ok, self._eq
        if self.guard.check(self.values, self.stamps, active, now_ns, status, reason) and self.warmup_cycles:
            np.equal(reason, REASON_INPUT, out=eq)       # the model misses these frames
            np.logical_and(active, eq, out=eq)
            np.add(self.missed, 1, out=self.missed, where=eq)
        np.equal(status, OK, out=eq)
        np.logical_and(active, eq, out=ok)
        n = int(np.count_nonzero(ok))
        self.n_valid = n
        self.n_ran = 0
        infer_ns = 0
        if n:
            if self.worker.busy:
                self._fail(ok, REASON_BUSY)
                self.counters["busy_cycles"] += 1
            else:
                infer_ns = self._infer(ok, n, infer_deadline_ns)
        if self.forced.any():
            np.equal(status, FAILSAFE, out=eq)
            np.logical_not(eq, out=eq)
            np.logical_and(eq, self.forced, out=eq)
            np.logical_and(eq, active, out=eq)
            self._fail(eq, REASON_HEARTBEAT)
        if self.down.any():
            np.logical_and(self.down, active, out=eq)
            self._fail(eq, REASON_BRIDGE)
        self._decide_mode()
        self.limiter.apply(self.raw, status, active, self.out, self._tracking, self.values)
        np.equal(status, FAILSAFE, out=eq)
        np.logical_and(active, eq, out=eq)
        self.n_failsafe = int(np.count_nonzero(eq))
        np.equal(status, HOLD, out=eq)
        np.logical_and(active, eq, out=eq)
        self.n_hold = int(np.count_nonzero(eq))
        self.heartbeat = (self.heartbeat + 1) & 0xFFFF
        return infer_ns

    def _note_error(self) -> None:
        self.counters["errors"] += 1
        self.last_error = f"{type(self.worker.error).__name__}: {self.worker.error}"
        if not self._error_run:
            logger.error("inference raised (fail-safe out): %s", self.last_error, exc_info=self.worker.error)
        self._error_run = True

    def _decide_mode(self) -> None:
        """Each active stream's mode this cycle, the warm-up count of the frames that ran, and
        ``_tracking``: the OK streams whose outputs track (manual or warming up)."""
        mode, active, warm, mask, tracking = self.mode, self.active, self.warmup_left, self._eq, self._tracking
        np.copyto(mode, AUTO, where=active)
        np.greater(warm, 0, out=mask)
        np.logical_and(mask, active, out=mask)
        np.copyto(mode, WARMUP, where=mask)
        np.logical_and(mask, self.ran, out=mask)         # a frame the model got counts down
        np.subtract(warm, 1, out=warm, where=mask)
        if self.mode_col is not None:
            np.less(self.values[:, self.mode_col], 0.5, out=mask)   # NaN: invalid, the stream is not OK
            np.logical_and(mask, active, out=mask)
            np.copyto(mode, MANUAL, where=mask)
        np.not_equal(mode, AUTO, out=tracking)
        np.logical_and(tracking, active, out=tracking)
        np.equal(self.status, OK, out=mask)
        np.logical_and(tracking, mask, out=tracking)
        self.n_tracking = int(np.count_nonzero(tracking))

    def _infer(self, ok: np.ndarray, n: int, deadline_ns: int) -> int:
        idx = self._slots[:n]
        np.compress(ok, self._arange, out=idx)
        x64 = self._x64[:n]
        np.take(self.values, idx, axis=0, out=x64)
        np.copyto(self._feats[:n], x64[:, :self._feats.shape[1]], casting="same_kind")
        if self.warmup_cycles:
            long = self._long
            np.greater_equal(self.missed, self.window - 1, out=long)
            np.logical_and(long, ok, out=long)
            np.logical_or(self.cold, long, out=self.cold)
            start, fill = self._start[:n], self._fill[:n]
            np.take(self.cold, idx, out=start)
            if start.any():
                np.copyto(self.started, self.cold, where=ok)
                np.copyto(self.warmup_left, self.warmup_cycles, where=self.started)
                np.copyto(self.cold, False, where=self.started)
                self.counters["warmups"] += int(np.count_nonzero(start))
            np.take(self.missed, idx, out=fill)
            np.copyto(fill, 0, where=start)
            if fill.any():
                self.filled[idx] = fill
                self.counters["gaps_filled"] += int(np.count_nonzero(fill))
            np.copyto(self.filled, self.window - 1, where=self.started)
            np.copyto(self.missed, 0, where=ok)
        self._n, self._gaps = n, bool(self.warmup_cycles)
        self._resets, self._pending_resets = self._pending_resets, []
        t0 = monotonic_ns()
        self.worker.submit(self._job)
        finished = self.worker.wait(deadline_ns)
        t1 = monotonic_ns()
        np.copyto(self.ran, ok)
        self.n_ran = n
        if not finished:
            self._fail(ok, REASON_TIMEOUT)
            self.counters["timeouts"] += 1
        elif self.worker.error is not None:
            self._fail(ok, REASON_ERROR)
            if self.warmup_cycles:                       # the history is unknown: warm up again
                np.logical_or(self.cold, ok, out=self.cold)
            self._note_error()
            return t1 - t0
        else:
            self.raw[idx] = self._y[:n]
            finite = self._finite[:n]
            np.isfinite(self._y[:n], out=finite)
            if not finite.all():
                bad = idx[~finite.all(axis=1)]
                self.status[bad] = FAILSAFE
                self.reason[bad] = REASON_OUTPUT
                self.counters["bad_outputs"] += len(bad)
        self._error_run = False
        return t1 - t0

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots [n], features float32 [n, F]) of the frames handed to the policy in the last
        cycle (views, valid until the next cycle; empty when none ran)."""
        return self._slots[:self.n_ran], self._feats[:self.n_ran]

    def _fail(self, mask: np.ndarray, why: int) -> None:
        np.copyto(self.status, FAILSAFE, where=mask)
        np.copyto(self.reason, why, where=mask)

    def _job(self) -> None:
        for slot in self._resets:
            self.policy.reset_slot(slot)
        self._resets = []
        n = self._n
        if self._gaps:
            fill_gaps(self.policy, self._slots[:n], self._feats[:n], self._start[:n], self._fill[:n], self._history)
        y = self.policy.step_sensor(self._slots[:n], self._feats[:n])
        if getattr(y, "shape", None) != (n, self._y.shape[1]):
            raise ValueError(f"step_sensor returned shape {getattr(y, 'shape', type(y))}, "
                             f"expected {(n, self._y.shape[1])}")
        np.copyto(self._y[:n], y)


class ModeSources:
    """Mode precedence by change: the ``[mode]`` input of each slot may come from ``sources``
    numbered sources (each bridge, the caller's inputs) and from requests (``command``, from
    any thread: an operator's ``set_mode``); a source counts when its value changes, and the
    latest change is in force. A PLC rewriting the same coil value every scan therefore does
    not undo an operator's request, while a PLC that flips its coil takes over."""

    def __init__(self, sources: int, capacity: int):
        self.value = np.full(capacity, np.nan)               # the value in force
        self.stamp = np.full(capacity, MISSING_STAMP, np.int64)   # when it changed
        self.seen = np.full((sources, capacity), np.nan)     # each source's last value
        self.commands: dict[str, tuple[float, int]] = {}
        self.lock = threading.Lock()

    def reset(self, slot: int) -> None:
        """A new stream in ``slot``: nothing seen yet."""
        self.value[slot] = np.nan
        self.stamp[slot] = MISSING_STAMP
        self.seen[:, slot] = np.nan

    def command(self, stream: str, value: float, stamp: int) -> None:
        """A ``set_mode`` request: in force from the next cycle, until a source changes."""
        with self.lock:
            self.commands[stream] = (value, stamp)

    def forget(self, stream: str) -> None:
        """Drop ``stream``'s request (its slot was released)."""
        with self.lock:
            self.commands.pop(stream, None)

    def source(self, source: int, slot: int, value: float, stamp: int) -> None:
        """One source's value of a slot's mode input this cycle: it counts only when it changed."""
        if stamp == MISSING_STAMP:
            return
        seen = self.seen[source, slot]
        if value == seen or (value != value and seen != seen):
            return
        self.seen[source, slot] = value
        if stamp >= self.stamp[slot]:
            self.value[slot] = value
            self.stamp[slot] = stamp

    def resolve(self, slots: dict[str, int], values: np.ndarray, stamps: np.ndarray, active: np.ndarray) -> None:
        """The mode in force (the latest change, requests included) into the active slots'
        mode column (``values``/``stamps``: that column of the cycle's inputs)."""
        if self.commands:
            with self.lock:
                commands = tuple(self.commands.items())
            for stream, (value, stamp) in commands:
                slot = slots.get(stream)
                if slot is not None and stamp > self.stamp[slot]:
                    self.value[slot] = value
                    self.stamp[slot] = stamp
        np.copyto(values, self.value, where=active)
        np.copyto(stamps, self.stamp, where=active)


# ---------------------------------------------------------------------------- the periodic loop

class PeriodicLoop:
    """Calls ``cycle(seq, tick_ns) -> t_out_ns`` on absolute ticks every ``period_ns``.

    ``t_out_ns`` is when the cycle's outputs were written; a cycle whose outputs go out more
    than ``deadline_ns`` after its tick is a deadline miss. Ticks that passed while a cycle ran
    are skipped (counted in ``skipped_ticks``), so the loop never bursts to catch up.
    Histograms: ``lateness`` (wake-up minus tick) and ``latency`` (outputs written minus tick).
    """

    #: At most this share of each period is spent cycling and spinning (see ``_run``).
    BUSY_MAX = 0.8

    def __init__(self, period_ns: int, deadline_ns: int | None = None, *, spin_ns: int = 200_000):
        if period_ns <= 0:
            raise ValueError(f"period must be positive, got {period_ns} ns")
        self.period_ns = int(period_ns)
        self.deadline_ns = int(deadline_ns if deadline_ns is not None else period_ns)
        self.spin_ns = int(spin_ns)
        self.lateness = LatencyHistogram()
        self.latency = LatencyHistogram()
        self.cycles = 0
        self.deadline_misses = 0
        self.skipped_ticks = 0
        self.gc_collections = 0
        self.cycle_errors = 0
        self.rt_applied: dict = {}
        self._stop = threading.Event()

    def spin_before_tick(self, work_ns: int) -> int:
        """How long to spin before a tick when cycles take ``work_ns``: ``spin_ns``, cut so that
        cycling and spinning keep the thread busy at most ``BUSY_MAX`` of the period."""
        return min(self.spin_ns, max(0, int(self.period_ns * self.BUSY_MAX) - work_ns))

    def stop(self) -> None:
        """Ask the loop to return after the current cycle, or at once if it has not started its
        first cycle yet (thread- and signal-safe: a stop during start-up is not lost)."""
        self._stop.set()

    def run(self, cycle: Callable[[int, int], int], *, duration_s: float | None = None,
            realtime: RealtimeOptions | None = None, helpers: Sequence[InferenceWorker] = ()) -> None:
        """Run until ``stop()`` or for ``duration_s`` seconds, in the calling thread.

        With ``realtime``, SCHED_FIFO and affinity are applied to this thread and (one priority
        lower, so that the loop can always preempt a stalled inference) to each helper worker,
        memory is locked, and everything is restored on return. Always, before the first tick:
        one full collection, ``gc.freeze()`` and a disabled collector (a full pass costs ~100 ms
        with torch loaded: it must never fall inside the loop); young generations are collected
        only between cycles, when there is slack before the next tick. Always too, the GIL's
        switch interval is cut to ``realtime.switch_interval_s`` (0.5 ms without ``realtime``):
        at Python's default 5 ms a busy thread in the same process (an operator's script
        polling ``stats()``, a bridge under a flood) held the inference thread off the GIL long
        enough to miss a 15 ms budget (``benchmarks/cycle_hops.py`` while it still waited in a
        spinning loop: a timeout in about one run of three; none in 6 runs at 0.5 ms).
        """
        restores: list[Callable[[], None]] = []
        self.rt_applied = {}
        gc_was_enabled = gc.isenabled()
        old_switch = sys.getswitchinterval()
        try:
            if realtime is not None:
                self._apply_realtime(realtime, helpers, restores)
            switch = realtime.switch_interval_s if realtime is not None else RealtimeOptions.switch_interval_s
            if switch:
                sys.setswitchinterval(switch)
                self.rt_applied["switch_interval"] = {"applied": True, "detail": f"{switch * 1e6:.0f} us"}
            self._run(cycle, duration_s)
        finally:
            self._stop.clear()
            if self.rt_applied.get("gc_freeze", {}).get("applied"):
                gc.unfreeze()
            if gc_was_enabled:
                gc.enable()
            sys.setswitchinterval(old_switch)
            for fn in reversed(restores):
                fn()

    def _apply_realtime(self, opts: RealtimeOptions, helpers, restores) -> None:
        cpu = opts.cpu if opts.cpu is not None else default_cpu()
        cpus = [cpu] if cpu is not None else None
        report, restore = set_thread_realtime(opts.priority, cpus)
        restores.append(restore)
        self.rt_applied.update(report)
        for i, worker in enumerate(helpers):
            try:
                rep, wrestore = worker.run_sync(lambda: set_thread_realtime(max(1, opts.priority - 1), cpus))
                restores.append(lambda w=worker, f=wrestore: _restore_in(w, f))
                self.rt_applied[f"helper{i}"] = rep
            except (RuntimeError, TimeoutError) as exc:
                self.rt_applied[f"helper{i}"] = {"applied": False, "detail": str(exc)}
        if opts.lock_memory:
            rep, unlock = lock_memory()
            restores.append(unlock)
            self.rt_applied["mlockall"] = rep

    def _run(self, cycle: Callable[[int, int], int], duration_s: float | None) -> None:
        period, deadline = self.period_ns, self.deadline_ns
        lateness, latency = self.lateness, self.latency
        t0 = monotonic_ns()
        gc.collect()
        gc.freeze()
        gc.disable()
        self.rt_applied["gc_freeze"] = {"applied": True, "detail": f"before the first cycle "
                                        f"(full collection {(monotonic_ns() - t0) / 1e6:.0f} ms)"}
        gc_threshold = gc.get_threshold()[0] or 700
        gc_cost_ns = 500_000                            # until measured
        tick = monotonic_ns() + period
        end = tick + int(duration_s * 1e9) if duration_s is not None else None
        seq = 0
        # The spin before a tick is cut so that a cycle (as long as recent ones) and the spin
        # together keep the thread busy at most BUSY_MAX of the period: Linux stops SCHED_FIFO
        # threads for the rest of each second once they used 95% of it (sched_rt_runtime_us),
        # a 50 ms stall, which a 4 kHz loop spinning its default 125 us ran into once a second.
        work = 0                                         # recent cycles' length, ns (moving average)
        while not self._stop.is_set() and (end is None or tick < end):
            now = monotonic_ns()
            spin = self.spin_before_tick(work)
            while tick - now > spin:                     # sleep in chunks so stop() stays prompt
                time.sleep(min(tick - now - spin, 50_000_000) / 1e9)
                now = monotonic_ns()
                if self._stop.is_set():
                    return
            while now < tick:
                now = monotonic_ns()
            lateness.add_ns(now - tick)
            try:
                t_out = cycle(seq, tick)
            except Exception as exc:                     # last resort: the loop never stops
                self.cycle_errors += 1
                if self.cycle_errors == 1 or self.cycle_errors % 1000 == 0:
                    logger.exception("control cycle %d raised (%d so far): %s", seq, self.cycle_errors, exc)
                t_out = monotonic_ns()
            latency.add_ns(t_out - tick)
            work += (t_out - tick - work) // 16
            if t_out - tick > deadline:
                self.deadline_misses += 1
            self.cycles += 1
            seq += 1
            now = monotonic_ns()
            k = (now - tick) // period + 1               # first tick still in the future
            self.skipped_ticks += k - 1
            tick += k * period
            if (not gc.isenabled() and gc.get_count()[0] > gc_threshold
                    and tick - now - spin > 2 * gc_cost_ns):
                t0 = monotonic_ns()
                gc.collect(1)
                gc_cost_ns = max(monotonic_ns() - t0, 50_000)
                self.gc_collections += 1

    def stats(self) -> dict:
        """Counters and histograms of the loop so far."""
        return {"cycles": self.cycles, "deadline_misses": self.deadline_misses,
                "skipped_ticks": self.skipped_ticks, "gc_collections": self.gc_collections,
                "cycle_errors": self.cycle_errors,
                "lateness_us": self.lateness.summary(), "latency_us": self.latency.summary(),
                "rt_applied": dict(self.rt_applied)}


def _restore_in(worker: InferenceWorker, fn: Callable[[], None]) -> None:
    try:
        worker.run_sync(fn, timeout_s=1.0)
    except (RuntimeError, TimeoutError) as exc:
        logger.warning("could not restore the inference thread's scheduling: %s", exc)

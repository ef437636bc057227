"""``[shadow]``: a candidate package run on the live frames every cycle, never applied."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.control.loop import ControlCycle, InferenceWorker, LatencyHistogram, fill_gaps, monotonic_ns, set_compute_threads
from runtime.control.safety import REASON_NONE, OutputLimit
from sdk.tools.package import package_identity


class Shadow:
    """A candidate package run on the live frames every cycle, never applied (``[shadow]``).

    After a cycle's outputs went out, the frames the live model got in that cycle (same
    slots, same features) go to the shadow's own engine in its own thread; its answer is
    collected at the next cycle and never waited for, so the live cycle never waits on it.
    The shadow's outputs are compared with the live model's outputs of the same frames, both
    clamped to each output's ``[min, max]`` (what each would command, before rate limits and
    fail-safes): ``stats()`` gives per output the RMS and largest difference, in the output's
    units and as a fraction of its range, and the flight recording gets a ``shadow`` record per
    cycle with the shadow's outputs. A step starts only if the shadow is idle and its slowest
    recent step fits in the time left before the next tick (else the frames are ``skipped``,
    and the shadow's history of those streams restarts at their next frame, counted in
    ``resyncs``): the CPU engine holds Python's GIL while it steps, so an overlong shadow step
    would otherwise delay the next live cycle.
    """

    def __init__(self, engine, path: str | Path, limits: list[OutputLimit], capacity: int, threads: int):
        self.engine, self.path = engine, Path(path)
        self.identity = package_identity(path)
        self.names = list(engine.output_names)
        self.lo = np.array([lim.min for lim in limits], dtype=np.float64)
        self.hi = np.array([lim.max for lim in limits], dtype=np.float64)
        n_in, n_out = len(engine.input_names), len(self.names)
        self.worker = InferenceWorker("r1edge-shadow")
        self.worker.run_sync(lambda: set_compute_threads(threads))
        self._slots = np.zeros(capacity, dtype=np.int64)
        self._feats = np.zeros((capacity, n_in), dtype=np.float32)
        self._live = np.zeros((capacity, n_out), dtype=np.float64)
        self._compare = np.zeros(capacity, dtype=bool)
        self._start = np.zeros(capacity, dtype=bool)
        self._fill = np.zeros(capacity, dtype=np.int64)
        self._history = np.zeros((max(int(getattr(engine, "window", 1)) - 1, 0), n_in), dtype=np.float32)
        self._y = np.zeros((capacity, n_out), dtype=np.float64)
        self._n = 0
        self._seq = -1
        self._resets: list[int] = []
        self._pending_resets: list[int] = []
        self._reason = np.zeros(capacity, dtype=np.int8)
        self._step_ns = 0
        self.recent_step_ns = np.zeros(8, dtype=np.int64)  # the last step times, for the slack check
        self._k = 0
        self.step_hist = LatencyHistogram()
        self.sq = np.zeros(n_out, dtype=np.float64)
        self.max_abs = np.zeros(n_out, dtype=np.float64)
        self.counters = {"steps": 0, "compared": 0, "skipped": 0, "resyncs": 0, "errors": 0}
        self.last_error: str | None = None

    def reset_slot(self, slot: int) -> None:
        """A new stream in ``slot``: forget its history before the shadow's next step."""
        self._pending_resets.append(slot)

    def submit(self, seq: int, cycle: ControlCycle, slack_ns: int | None) -> None:
        """Hand the frames the live model got in this cycle to the shadow (``slack_ns``: time
        left before the next tick, None when there is no tick)."""
        slots, feats = cycle.frames()
        n = len(slots)
        if not n:
            return
        if self.worker.busy or self._n or (slack_ns is not None and int(self.recent_step_ns.max()) > slack_ns):
            self.counters["skipped"] += 1
            self.counters["resyncs"] += n
            self._pending_resets.extend(slots.tolist())
            return
        self._slots[:n] = slots
        self._feats[:n] = feats
        np.take(cycle.reason, slots, out=self._reason[:n])
        np.equal(self._reason[:n], REASON_NONE, out=self._compare[:n])
        np.take(cycle.raw, slots, axis=0, out=self._live[:n])
        np.take(cycle.started, slots, out=self._start[:n])
        np.take(cycle.filled, slots, out=self._fill[:n])
        np.copyto(self._fill[:n], 0, where=self._start[:n])
        self._n, self._seq = n, seq
        self._resets, self._pending_resets = self._pending_resets, []
        self.worker.submit(self._job)

    def _job(self) -> None:
        for slot in self._resets:
            self.engine.reset_slot(slot)
        n = self._n
        t0 = monotonic_ns()
        # the live stream's warm-ups and filled gaps, from the same frames
        fill_gaps(self.engine, self._slots[:n], self._feats[:n], self._start[:n], self._fill[:n], self._history)
        y = self.engine.step_sensor(self._slots[:n], self._feats[:n])
        self._step_ns = monotonic_ns() - t0
        np.copyto(self._y[:n], y)

    def collect(self, slot_names: list[str | None]) -> dict | None:
        """The shadow record of the last submitted cycle if its step has finished (else None;
        it is collected later), accounted into the divergence."""
        n = self._n
        if not n or self.worker.busy:
            return None
        self._n = 0
        entries = []
        if self.worker.error is not None:
            self.counters["errors"] += 1
            self.last_error = f"{type(self.worker.error).__name__}: {self.worker.error}"
            self._pending_resets.extend(self._slots[:n].tolist())
            return {"type": "shadow", "seq": self._seq, "error": self.last_error, "streams": []}
        self.counters["steps"] += 1
        self.step_hist.add_ns(self._step_ns)
        self.recent_step_ns[self._k % len(self.recent_step_ns)] = self._step_ns
        self._k += 1
        for i in range(n):
            slot = int(self._slots[i])
            y = self._y[i]
            entry = {"s": slot_names[slot], "slot": slot, "y": y.tolist(), "d": None}
            if self._compare[i]:
                d = np.clip(y, self.lo, self.hi) - np.clip(self._live[i], self.lo, self.hi)
                self.sq += d * d
                np.maximum(self.max_abs, np.abs(d), out=self.max_abs)
                self.counters["compared"] += 1
                entry["d"] = d.tolist()
            entries.append(entry)
        return {"type": "shadow", "seq": self._seq, "streams": entries}

    def finish(self, slot_names: list[str | None], timeout_s: float = 1.0) -> dict | None:
        """Wait (up to ``timeout_s``) for a pending step and collect it."""
        if self._n:
            self.worker.wait(monotonic_ns() + int(timeout_s * 1e9))
        return self.collect(slot_names)

    def stats(self) -> dict:
        """Package, counters, step time (us) and per-output divergence from the live outputs."""
        k = self.counters["compared"]
        span = self.hi - self.lo
        rms = np.sqrt(self.sq / k) if k else np.zeros_like(self.sq)
        return {"path": str(self.path), "manifest_sha256": self.identity["manifest_sha256"], **self.counters,
                "last_error": self.last_error, "step_us": self.step_hist.summary(),
                "divergence": {name: {"rms": float(rms[j]), "max_abs": float(self.max_abs[j]),
                                      "rms_frac_range": float(rms[j] / span[j])}
                               for j, name in enumerate(self.names)}}

    def close(self) -> None:
        """Stop the shadow's thread."""
        self.worker.close()

"""The compiled control cycle (runtime.control.kernels) against its executable reference, the
NumPy cycle (``ControlCycle(compiled=False)``: InputGuard.check, OutputLimiter.apply and the
cycle's own bookkeeping): over random input sequences with faults (NaN, inf, out of range,
stale and missing inputs, gaps of any length, mode changes, heartbeat loss, dead bridges,
streams starting and stopping, inference errors, timeouts and the busy cycles after them,
non-finite model outputs) both give the same outputs, statuses, reasons, modes and state,
bit for bit, after every cycle."""
from __future__ import annotations

import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.control.loop import ControlCycle, InferenceWorker
from runtime.control.safety import MISSING_STAMP, InputGuard, InputLimit, OutputLimit, OutputLimiter

PERIOD_NS = 10_000_000
STALE_NS = 25_000_000
CAP = 3


class Policy:
    """A deterministic policy whose outputs depend on each stream's history (how many frames it
    was stepped since its reset, so gap fills and warm-ups show), with faults on demand:
    ``raise_next`` (the next call raises), ``sleep_next`` (the next call sleeps that long),
    ``nan_next`` (the next call answers NaN for its first frame)."""

    input_names = ["level", "flow"]
    output_names = ["valve", "pump"]

    def __init__(self):
        self.count = np.zeros(CAP, np.float32)
        self.raise_next = False
        self.sleep_next = 0.0
        self.nan_next = False
        self.out = np.zeros((CAP, 2), np.float32)

    def reset_slot(self, slot: int) -> None:
        self.count[slot] = 0

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray:
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("policy failure")
        if self.sleep_next:
            s, self.sleep_next = self.sleep_next, 0.0
            time.sleep(s)
        n = len(slots)
        self.count[slots] += 1
        self.out[:n, 0] = features[:, 0] * np.float32(0.7) + self.count[slots] / np.float32(7)
        self.out[:n, 1] = features[:, 1] / np.float32(3) - self.count[slots] / np.float32(11)
        if self.nan_next:
            self.nan_next = False
            self.out[0, 1] = np.nan
        return self.out[:n]


INPUTS = [InputLimit("level", 0.0, 2.0, STALE_NS), InputLimit("flow", -5.0, 5.0, STALE_NS, hold=True),
          InputLimit("pos", 0.0, 1.0, STALE_NS, hold=True), InputLimit("auto", 0.0, 1.0, STALE_NS)]


def make(compiled: bool, window: int, warmup: int, jump: bool, rate: float):
    policy = Policy()
    outputs = [OutputLimit("valve", 0.0, 1.0, rate, 0.25, jump=jump),
               OutputLimit("pump", -1.0, 1.0, float("inf"), -0.0)]
    guard = InputGuard(INPUTS, CAP)
    limiter = OutputLimiter(outputs, CAP, PERIOD_NS / 1e9, track=[2, -1])
    worker = InferenceWorker()
    cycle = ControlCycle(policy, guard, limiter, capacity=CAP, worker=worker, window=window, warmup_cycles=warmup,
                         mode_col=3, compiled=compiled)
    return cycle


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def state(c: ControlCycle) -> dict:
    g, lim = c.guard, c.limiter
    slots, feats = c.frames()
    arrays = dict(status=c.status, reason=c.reason, mode=c.mode, out=c.out, raw=c.raw, ran=c.ran,
                  started=c.started, filled=c.filled, codes=g.codes, counts=g.counts, ever_valid=g.ever_valid,
                  last=lim.last, fresh=lim.fresh, after_failsafe=lim.after_failsafe, caught=lim.caught,
                  cold=c.cold, missed=c.missed, warmup_left=c.warmup_left, tracking=c._tracking,
                  slots=slots, feats=feats, count=c.policy.count)
    s = {k: bits(v) for k, v in arrays.items()}
    s.update(counters=dict(c.counters), n=(c.n_valid, c.n_ran, c.n_failsafe, c.n_hold, c.n_tracking),
             heartbeat=c.heartbeat, error=c.last_error)
    return s


VALUE = st.one_of(st.floats(-0.5, 2.5), st.sampled_from([0.0, -0.0, 1.0, 2.0, -5.0, 5.0, np.nan, np.inf, -np.inf]))
AGE = st.sampled_from([0, 0, 0, 0, STALE_NS, STALE_NS + 1, None])     # None: never received
SLOT_EVENT = st.tuples(st.booleans(), st.lists(VALUE, min_size=4, max_size=4), st.lists(AGE, min_size=4, max_size=4),
                       st.sampled_from([1.0, 1.0, 0.0, 0.4, np.nan]), st.booleans(), st.booleans(),
                       st.booleans())
FAULT = st.sampled_from(["none"] * 8 + ["raise", "nan", "timeout"])
CYCLE = st.tuples(st.lists(SLOT_EVENT, min_size=CAP, max_size=CAP), FAULT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.integers(1, 5), warmup=st.integers(0, 3), jump=st.booleans(),
       rate=st.sampled_from([0.5, 5.0, 1e-9, float("inf")]), cycles=st.lists(CYCLE, min_size=1, max_size=25))
def test_compiled_cycle_agrees_bit_for_bit_with_the_reference(window, warmup, jump, rate, cycles):
    run_pair(window, warmup, jump, rate, cycles)


def test_signed_zeros_agree_bit_for_bit():
    """A tracked value of -0.0 at a limit of 0.0 stays -0.0 (NumPy's clip keeps it): the
    compiled limiter gives the same bits while warming up, tracking and driving."""
    ev = (True, [1.0, 0.0, -0.0, 1.0], [0, 0, 0, 0], 1.0, False, False, False)
    start = ev[:-1] + (True,)
    manual = (True, [1.0, -0.0, -0.0, 0.0], [0, 0, 0, 0], 0.0, False, False, False)
    run_pair(2, 2, False, 0.5, [([start, ev, ev], "none"), ([ev] * 3, "none"), ([manual] * 3, "none"),
                                 ([manual] * 3, "none"), ([ev] * 3, "none")])


def run_pair(window, warmup, jump, rate, cycles):
    """Run a reference and a compiled cycle on ``cycles`` and compare them after each."""
    pair = [make(False, window, warmup, jump, rate), make(True, window, warmup, jump, rate)]
    try:
        now = 10 ** 12
        active = [False] * CAP
        timed_out = settle = False
        for events, fault in cycles:
            if fault == "timeout" and timed_out:
                fault = "none"                                 # one overrun per sequence (each costs 0.5 s)
            now += PERIOD_NS
            for c in pair:
                for i, (on, values, ages, mode, forced, down, flip) in enumerate(events):
                    if flip:                                   # start or stop the stream
                        if not active[i]:
                            c.reset_slot(i)
                        c.active[i] = not active[i]
                    c.values[i] = values
                    c.values[i, 3] = mode
                    c.stamps[i] = [MISSING_STAMP if a is None else now - a for a in ages]
                    if not on:                                 # a frame lost: this stream's inputs age
                        c.stamps[i] -= STALE_NS
                    c.forced[i] = forced and on
                    c.down[i] = down and on and forced
            active = [a ^ e[-1] for a, e in zip(active, events)]
            results = []
            for c in pair:
                if fault == "raise":
                    c.policy.raise_next = True
                elif fault == "nan":
                    c.policy.nan_next = True
                elif fault == "timeout":
                    c.policy.sleep_next = 0.5
                c.run(now, 0 if fault == "timeout" else 2 ** 62)   # 0: the deadline has passed
                results.append(state(c))
            for c in pair:                                     # a fault the busy worker never took
                c.policy.raise_next = c.policy.nan_next = False
                c.policy.sleep_next = 0.0
            if settle:                                         # the cycle after the overrun found it busy
                for c in pair:
                    while c.worker.busy:
                        time.sleep(0.01)
                settle = False
            if fault == "timeout":
                timed_out = settle = True
            assert results[0] == results[1], {k: (results[0][k], results[1][k]) for k in results[0]
                                              if results[0][k] != results[1][k]}
        for c in pair:                                         # a late answer lands before the check
            while c.worker.busy:
                time.sleep(0.01)
        assert state(pair[0]) == state(pair[1])
    finally:
        for c in pair:
            c.worker.close()


def test_kernels_see_the_faults_they_are_checked_on():
    """The property test's faults reach every branch: a sequence that holds, fails safe for
    each reason, warms up, fills a gap and tracks gives those results in the compiled cycle."""
    c = make(True, window=3, warmup=2, jump=False, rate=0.5)
    try:
        now = 10 ** 12
        c.active[:] = True
        c.stamps[:] = now
        c.values[:] = [1.0, 0.0, 0.5, 1.0]
        c.values[1, 1] = np.nan                               # flow holds
        c.values[2, 0] = 3.0                                  # level out of range: fail-safe
        c.run(now, 2 ** 62)
        assert c.status.tolist() == [0, 2, 1] and c.reason.tolist() == [0, 1, 1]
        assert c.mode[0] == 2 and c.started[0] and c.filled[0] == 2 and c.counters["warmups"] == 1
        c.forced[0] = True
        c.run(now + PERIOD_NS, 2 ** 62)
        assert c.status[0] == 1 and c.reason[0] == 6 and c.out[0, 0] == 0.25
        c.forced[0] = False
        c.down[0] = True
        c.run(now + 2 * PERIOD_NS, 2 ** 62)
        assert c.status[0] == 1 and c.reason[0] == 7
    finally:
        c.worker.close()

"""Safety in the loop, independent of the model: invalid inputs, output clamps and rate
limits, and the watchdog on inference errors and overruns. The policy here is a small
deterministic numpy policy with the engine's sensor interface (the real engine is exercised
in test_controller.py)."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.control.loop import monotonic_ns
from runtime.control.safety import (FAILSAFE, HOLD, MISSING_STAMP, OK, REASON_INPUT, InputGuard, InputLimit,
                            OutputLimit, OutputLimiter)
from sdk.service.controller import Controller

DEPLOY = """
[model]
path = "pkg"
streams = {streams}
[loop]
period_ms = {period_ms}
infer_budget_ms = {budget_ms}
[[inputs]]
name = "level"
min = 0.0
max = 2.0
stale_ms = 1000
[[inputs]]
name = "flow"
min = -5.0
max = 5.0
stale_ms = 1000
on_invalid = "{flow_on_invalid}"
[[outputs]]
name = "valve"
min = 0.0
max = 1.0
max_rate = {max_rate}
failsafe = 0.25
[[outputs]]
name = "pump"
min = -1.0
max = 1.0
failsafe = 0.0
"""


class Policy:
    """valve = level/2 + flow/10 (plus the stream's step count/1000), pump = flow/5.

    ``raise_on``/``sleep_on`` hold step numbers (counting every call) at which the policy
    raises or sleeps ``sleep_s`` before answering.
    """

    input_names = ["level", "flow"]
    output_names = ["valve", "pump"]

    def __init__(self, capacity: int = 4, window: int = 8):
        self.capacity, self.window = capacity, window
        self.count = np.zeros(capacity, np.float32)
        self.calls = 0
        self.raise_on: set[int] = set()
        self.sleep_on: set[int] = set()
        self.sleep_s = 0.0
        self.out = np.zeros((capacity, 2), np.float32)

    def reset_slot(self, slot: int) -> None:
        self.count[slot] = 0

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray:
        call = self.calls
        self.calls += 1
        if call in self.raise_on:
            raise RuntimeError(f"policy failure at call {call}")
        if call in self.sleep_on:
            time.sleep(self.sleep_s)
        n = len(slots)
        self.count[slots] += 1
        self.out[:n, 0] = features[:, 0] / 2 + features[:, 1] / 10 + self.count[slots] / 1000
        self.out[:n, 1] = features[:, 1] / 5
        return self.out[:n]


@pytest.fixture
def make_controller(tmp_path):
    made = []

    def make(streams=4, period_ms=1000.0, budget_ms=900.0, flow_on_invalid="failsafe", policy=None,
             max_rate=0.5):
        path = tmp_path / "deploy.toml"
        path.write_text(DEPLOY.format(streams=streams, period_ms=period_ms, budget_ms=budget_ms,
                                      flow_on_invalid=flow_on_invalid, max_rate=max_rate))
        policy = policy or Policy(capacity=streams)
        raise_on, sleep_on = policy.raise_on, policy.sleep_on
        policy.raise_on, policy.sleep_on = set(), set()
        ctrl = Controller.from_config(path, engine=policy)
        if type(policy) is Policy:                          # the warm-up steps, then every slot reset
            assert policy.calls == 6 and not policy.count.any()
        policy.calls = 0
        policy.raise_on, policy.sleep_on = raise_on, sleep_on
        made.append(ctrl)
        return ctrl
    yield make
    for ctrl in made:
        ctrl.close()


# ---------------------------------------------------------------------------- input guard

def test_guard_reason_codes_and_precedence():
    limits = [InputLimit("a", 0.0, 1.0, stale_ns=1000, hold=False),
              InputLimit("b", -1.0, 1.0, stale_ns=1000, hold=True)]
    guard = InputGuard(limits, capacity=8)
    now = 10_000
    values = np.array([[0.5, 0.0], [np.nan, 0.0], [np.inf, 0.0], [-np.inf, 0.0], [1.5, 0.0],
                       [0.5, 0.0], [0.5, 0.0], [0.5, 2.0]])
    stamps = np.full((8, 2), now, np.int64)
    stamps[5, 0] = now - 1001                       # stale
    stamps[6, 0] = MISSING_STAMP                    # never received
    active = np.ones(8, bool)
    status, reason = np.zeros(8, np.int8), np.zeros(8, np.int8)
    assert guard.check(values, stamps, active, now, status, reason)
    assert [guard.invalid_inputs(i) for i in range(8)] == [
        {}, {"a": "nan"}, {"a": "inf"}, {"a": "inf"}, {"a": "range"}, {"a": "stale"}, {"a": "missing"},
        {"b": "range"}]
    assert status.tolist() == [OK] + [FAILSAFE] * 6 + [HOLD]     # only 'b' says hold
    assert reason.tolist() == [0] + [REASON_INPUT] * 7
    assert guard.counts_by_reason() == {"nan": 1, "inf": 2, "range": 2, "stale": 1, "missing": 1}

    # A stream with both a hold input and a failsafe input invalid fails safe.
    status.fill(OK)
    values[:] = [0.5, 0.0]
    values[0] = [np.nan, np.nan]
    active[1:] = False
    values[1] = np.nan                              # inactive: ignored
    guard.check(values, stamps, active, now, status, reason)
    assert status[0] == FAILSAFE and guard.invalid_inputs(0) == {"a": "nan", "b": "nan"}
    assert status[1:].tolist() == [OK] * 7


def test_guard_at_exact_limits_is_valid():
    guard = InputGuard([InputLimit("a", 0.0, 1.0, stale_ns=100)], capacity=3)
    values = np.array([[0.0], [1.0], [np.nextafter(1.0, 2.0)]])
    stamps = np.array([[900], [1000], [1000]], np.int64)        # age exactly the limit
    status, reason = np.zeros(3, np.int8), np.zeros(3, np.int8)
    guard.check(values, stamps, np.ones(3, bool), 1000, status, reason)
    assert status.tolist() == [OK, OK, FAILSAFE]


# ---------------------------------------------------------------------------- output limiter

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_limiter_never_leaves_range_nor_exceeds_rate(data):
    lo, hi = -2.0, 3.0
    rate, period = 4.0, 0.01
    lim = OutputLimiter([OutputLimit("u", lo, hi, rate, 1.0), OutputLimit("v", lo, hi, math.inf, -2.0)],
                        capacity=3, period_s=period)
    step = rate * period
    raw_values = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
    out = np.zeros((3, 2))
    for _ in range(data.draw(st.integers(1, 40))):
        raw = np.array(data.draw(st.lists(st.lists(raw_values, min_size=2, max_size=2), min_size=3, max_size=3)))
        status = np.array(data.draw(st.lists(st.sampled_from([OK, OK, OK, FAILSAFE, HOLD]), min_size=3,
                                             max_size=3)), np.int8)
        active = np.array(data.draw(st.lists(st.booleans(), min_size=3, max_size=3)))
        last = lim.last.copy()
        before = out.copy()
        lim.apply(raw, status, active, out)
        for s in range(3):
            if not active[s]:
                assert out[s].tobytes() == before[s].tobytes() and lim.last[s].tobytes() == last[s].tobytes()
                continue
            assert np.all(out[s] >= lo) and np.all(out[s] <= hi)
            if status[s] == OK:
                assert last[s, 0] - step <= out[s, 0] <= last[s, 0] + step
                assert out[s, 0] == min(max(min(max(raw[s, 0], lo), hi), last[s, 0] - step), last[s, 0] + step)
                assert out[s, 1] == min(max(raw[s, 1], lo), hi)            # no rate limit on v
            elif status[s] == FAILSAFE:
                assert out[s].tolist() == [1.0, -2.0]                      # immediate, not ramped
            else:
                assert out[s].tobytes() == last[s].tobytes()
        assert lim.last[active].tobytes() == out[active].tobytes()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_limiter_tracks_bumplessly_and_ramps_back_from_failsafe(data):
    """``u`` tracks input column 0, ``v`` tracks nothing and may jump after a fail-safe: a
    stream starts at its tracked value; outside a fail-safe every step is at most one rate
    step, except a tracking output that had reached its input, which follows it exactly, and
    ``v`` in the first cycle after a fail-safe."""
    step = 2.0 * 0.02
    lim = OutputLimiter([OutputLimit("u", 0.0, 1.0, 2.0, 0.0), OutputLimit("v", 0.0, 1.0, 2.0, 0.5, jump=True)],
                        capacity=1, period_s=0.02, track=[0, -1])
    out, active = np.zeros((1, 2)), np.ones(1, bool)
    prev = prev_status = None
    caught = False
    for k in range(data.draw(st.integers(1, 60))):
        status = np.array([data.draw(st.sampled_from([OK, OK, OK, FAILSAFE, HOLD]))], np.int8)
        tracking = np.array([data.draw(st.booleans())])
        pos = data.draw(st.floats(-0.5, 1.5))
        raw = np.array([data.draw(st.lists(st.floats(-2.0, 3.0), min_size=2, max_size=2))])
        lim.apply(raw, status, active, out, tracking, np.array([[pos, 0.0]]))
        u, v = out[0]
        target = min(max(pos, 0.0), 1.0)
        if status[0] == FAILSAFE:
            assert (u, v) == (0.0, 0.5)
        elif status[0] == HOLD:
            assert (u, v) == (prev if prev is not None else (0.0, 0.5))
        else:
            if prev is None:                                  # the first cycle starts where the plant is
                assert (u == target) if tracking[0] else abs(u - target) <= step + 1e-12
                assert abs(v - 0.5) <= step + 1e-12
            else:
                if tracking[0] and caught:
                    assert u == target                        # following exactly
                else:
                    assert abs(u - prev[0]) <= step + 1e-12
                if prev_status == FAILSAFE and not tracking[0]:
                    assert v == min(max(raw[0, 1], 0.0), 1.0)  # on_recover = "jump"
                elif prev_status != FAILSAFE:
                    assert abs(v - prev[1]) <= step + 1e-12
        caught = bool(status[0] == OK and tracking[0] and u == target)
        prev, prev_status = (u, v), status[0]


def test_controller_outputs_respect_limits_with_a_wild_policy(make_controller):
    class Wild(Policy):
        def step_sensor(self, slots, features):
            n = len(slots)
            self.out[:n] = self.rng.normal(0, 1e3, size=(n, 2)).astype(np.float32)
            return self.out[:n]
    wild = Wild()
    wild.rng = np.random.default_rng(0)
    ctrl = make_controller(policy=wild, max_rate=0.2)
    step = 0.2 * 1.0                                      # max_rate * period
    last = 0.25
    seen_sat = set()
    for i in range(300):
        out = ctrl.step({"level": 1.0, "flow": 0.0})
        assert 0.0 <= out["valve"] <= 1.0 and -1.0 <= out["pump"] <= 1.0
        assert last - step <= out["valve"] <= last + step
        last = out["valve"]
        seen_sat.add(out["pump"])
    assert {-1.0, 1.0} <= seen_sat                        # the clamp was exercised both ways


# ---------------------------------------------------------------------------- invalid inputs

def test_invalid_inputs_give_failsafe_in_that_very_cycle(make_controller):
    policy = Policy()
    ctrl = make_controller(policy=policy)
    good = {"level": 1.0, "flow": 2.0}
    for _ in range(5):
        out = ctrl.step(good)
    assert out["valve"] > 0.5 and ctrl.status()["status"] == "ok"
    now = monotonic_ns()
    cases = [({"level": float("nan"), "flow": 2.0}, {"level": "nan"}),
             ({"level": float("inf"), "flow": 2.0}, {"level": "inf"}),
             ({"level": -float("inf"), "flow": 2.0}, {"level": "inf"}),
             ({"level": 2.5, "flow": 2.0}, {"level": "range"}),
             ({"level": -0.1, "flow": 2.0}, {"level": "range"}),
             ({"level": (1.0, now - 2_000_000_000), "flow": 2.0}, {"level": "stale"}),
             ({"flow": 2.0}, {"level": "missing"}),
             ({"level": "abc", "flow": 2.0}, {"level": "nan"})]
    for inputs, invalid in cases:
        for _ in range(3):                                # ramp away from the fail-safe again
            ctrl.step(good)
        calls = policy.calls
        out = ctrl.step(inputs)
        assert out == {"valve": 0.25, "pump": 0.0}, inputs
        assert ctrl.status() == {"status": "failsafe", "reason": "invalid_input", "invalid": invalid,
                                 "mode": "auto", "heartbeat": ctrl.heartbeat}
        assert policy.calls == calls                      # invalid frames never reach the model
    stats = ctrl.stats()
    assert stats["invalid_inputs"] == {"nan": 2, "inf": 2, "range": 2, "stale": 1, "missing": 1}
    assert stats["failsafe_cycles"] == len(cases)


def test_hold_repeats_the_last_output_sent(make_controller):
    ctrl = make_controller(flow_on_invalid="hold")
    for _ in range(4):
        before = ctrl.step({"level": 1.0, "flow": 1.0})
    for bad in (float("nan"), 99.0, (1.0, monotonic_ns() - 10**9)):
        out = ctrl.step({"level": 1.0, "flow": bad})
        assert out == before
        assert ctrl.status()["status"] == "hold"
    ctrl.step({"level": float("nan"), "flow": float("nan")})  # level says failsafe: that wins
    assert ctrl.status()["status"] == "failsafe"
    assert ctrl.stats()["held_cycles"] == 3


# ---------------------------------------------------------------------------- watchdog

def stop_after(ctrl: Controller, cycles: int, inputs=None):
    """A loop source giving constant valid inputs that stops the loop after ``cycles`` cycles."""
    def source(seq, t_ns):
        if seq == cycles - 1:
            ctrl.stop()
        return inputs or {"level": 1.0, "flow": 1.0}
    return source


def test_exception_in_inference_gives_failsafe_and_the_loop_goes_on(make_controller):
    policy = Policy()
    policy.raise_on = {3, 4, 9}
    ctrl = make_controller(policy=policy, period_ms=100.0, budget_ms=90.0)
    seen: dict[int, tuple[dict, str]] = {}

    def sink(stream, outputs, status, seq, latency_us):
        seen[seq] = (outputs, status)

    stats = ctrl.run(source=stop_after(ctrl, 12), sink=sink)
    assert stats["cycles"] == len(seen) - 1 == 12
    assert seen.pop(12) == ({"valve": 0.25, "pump": 0.0}, "failsafe")     # on stop
    seqs = sorted(seen)
    # Policy call k happens in cycle k (every cycle has valid inputs and an idle worker).
    for seq in seqs:
        outputs, status = seen[seq]
        if seq in policy.raise_on:
            assert status == "failsafe" and outputs == {"valve": 0.25, "pump": 0.0}
        else:
            assert status == "ok", seq
    assert stats["watchdog"]["errors"] == 3
    assert "policy failure at call 9" in stats["watchdog"]["last_error"]
    assert stats["failsafe_cycles"] == 3

    # Synchronous use: the same, in the step that failed.
    policy.raise_on = {policy.calls}
    assert ctrl.step({"level": 1.0, "flow": 1.0}) == {"valve": 0.25, "pump": 0.0}
    assert ctrl.status()["reason"] == "error"
    assert ctrl.step({"level": 1.0, "flow": 1.0})["valve"] > 0.25


def test_overrun_gives_failsafe_in_that_cycle_and_never_queues(make_controller):
    policy = Policy()
    policy.sleep_on = {4}
    policy.sleep_s = 0.45                                 # 4.5 periods
    ctrl = make_controller(policy=policy, period_ms=100.0, budget_ms=50.0)
    seen: dict[int, tuple[dict, str]] = {}
    stats = ctrl.run(source=stop_after(ctrl, 14), sink=lambda s, o, st, seq, lat: seen.__setitem__(seq, (o, st)))
    assert seen.pop(14)[1] == "failsafe"                  # on stop
    statuses = [seen[k][1] for k in sorted(seen)]
    assert statuses[:4] == ["ok"] * 4
    assert statuses[4] == "failsafe"                      # the cycle whose inference overran
    k = 5
    while statuses[k] == "failsafe":                      # worker still busy: fail-safe, no new work
        k += 1
    assert k > 6 and all(s == "ok" for s in statuses[k:])
    assert stats["cycles"] == 14                          # the loop kept going meanwhile
    assert stats["watchdog"]["timeouts"] == 1
    assert stats["watchdog"]["busy_cycles"] == k - 5
    assert policy.calls == stats["cycles"] - (k - 5)       # nothing was queued while busy
    for seq in range(4, k):
        assert seen[seq][0] == {"valve": 0.25, "pump": 0.0}


def test_overrun_in_step_returns_failsafe(make_controller):
    policy = Policy()
    policy.sleep_on = {1}
    policy.sleep_s = 0.5
    ctrl = make_controller(policy=policy, period_ms=1000.0, budget_ms=100.0)
    ctrl.step({"level": 1.0, "flow": 1.0})
    assert ctrl.step({"level": 1.0, "flow": 1.0}) == {"valve": 0.25, "pump": 0.0}
    assert ctrl.status()["reason"] == "timeout"           # it did not wait for the stalled policy
    assert ctrl.step({"level": 1.0, "flow": 1.0}) == {"valve": 0.25, "pump": 0.0}
    assert ctrl.status()["reason"] == "busy"
    deadline = time.monotonic() + 5
    while ctrl.worker.busy and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert ctrl.step({"level": 1.0, "flow": 1.0})["valve"] > 0.25
    assert ctrl.status()["status"] == "ok"


def test_non_finite_model_output_fails_safe(make_controller):
    class NaNPolicy(Policy):
        def step_sensor(self, slots, features):
            y = super().step_sensor(slots, features)
            y[features[:, 0] > 1.5] = np.nan
            return y
    ctrl = make_controller(policy=NaNPolicy())
    out = ctrl.step_many({"a": {"level": 1.8, "flow": 0.0}, "b": {"level": 1.0, "flow": 0.0}})
    assert out["a"] == {"valve": 0.25, "pump": 0.0}
    assert ctrl.status("a")["reason"] == "bad_output" and ctrl.status("b")["status"] == "ok"


def test_close_stops_a_running_loop(make_controller):
    ctrl = make_controller(period_ms=10.0, budget_ms=8.0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (ctrl.run(source=lambda seq, t: {"level": 1.0, "flow": 1.0}),
                                              done.set()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while ctrl.counters["cycles"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    ctrl.close()
    assert done.is_set()                                  # close() waited for run() to return
    with pytest.raises(RuntimeError, match="closed"):
        ctrl.run(source=lambda seq, t: {})

"""Fuzz target ``frames``: whatever a caller's frames hold, ``step_many`` answers.

Each input is a few cycles of frames for up to four streams, ``{stream: {input: value}}``, whose
names may be wrong, missing or extra and whose values may be anything a caller could pass: NaN,
infinities, integers too large for a float, strings, bytes, containers, arrays, ``(value, t_ns)``
pairs with hostile stamps, NumPy scalars; some frames are mappings that make up a value for a
missing name (``defaultdict``). Every cycle must return every output of every stream given,
finite and within its configured range (the model's, limited, or the fail-safe or held value),
with a status of ``ok``, ``failsafe`` or ``hold``; and a stream's inputs, statuses and outputs
must be bitwise those of the same frames given one stream at a time (the batched read and the
one-stream read agree).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, strategies as st

from runtime.control.loop import monotonic_ns
from sdk.service.controller import Controller
from tests.fuzz.budget import budget, tried
from tests.test_safety import DEPLOY, Policy

STREAMS = ["a", "b", "c", "d"]
NAMES = ["level", "flow", "levle", "", "flow\x00", "x" * 64]
RANGES = {"valve": (0.0, 1.0), "pump": (-1.0, 1.0)}

stamps = st.one_of(st.just("now"), st.sampled_from([0, 1, -1, 2**63 - 1, 2**64, -(2**70), 1.5, math.nan, "x", None]))
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, 0, 1, -1, 10**400, -(10**400), 2**63, True, False, "1.5", "abc", "", b"\x00",
                     np.float32("nan"), np.float64(0.5), np.int64(3), 1j, [], {}, (1.0,), (1.0, 2, 3),
                     np.array([1.0, 2.0]), np.array(0.5)]),
    st.tuples(st.floats(allow_nan=True, allow_infinity=True), stamps),
)


@st.composite
def frame(draw):
    """A stream's frame: both inputs as plain numbers, then zero to two changes (a hostile value,
    a name taken away, added or misspelt), so that most cycles mix plain and odd frames."""
    f = {"level": draw(st.floats(0.0, 2.0)), "flow": draw(st.floats(-5.0, 5.0))}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        change = draw(st.sampled_from(["value", "value", "drop", "add", "rename"]))
        name = draw(st.sampled_from(sorted(f) or NAMES))
        if change == "value":
            f[name] = draw(values)
        elif change == "drop":
            f.pop(name, None)
        elif change == "add":
            f[draw(st.sampled_from(NAMES))] = draw(values)
        elif name in f:
            f[draw(st.sampled_from(NAMES))] = f.pop(name)
    if draw(st.integers(0, 7)) == 0:                      # a mapping that makes up missing inputs
        return defaultdict(float, f)
    return f


cycles = st.lists(st.dictionaries(st.sampled_from(STREAMS), frame(), min_size=1, max_size=4), min_size=1,
                  max_size=3)


def materialise(frames: dict) -> dict:
    """The frames with each ``"now"`` stamp replaced by the monotonic time (fresh inputs)."""
    now = monotonic_ns()
    return {s: {k: (v[0], now) if isinstance(v, tuple) and len(v) == 2 and v[1] == "now" else v
                for k, v in f.items()} for s, f in frames.items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("frames") / "deploy.toml"
    path.write_text(DEPLOY.format(streams=4, period_ms=1000.0, budget_ms=900.0, flow_on_invalid="hold",
                                  max_rate=0.5))
    batched = Controller.from_config(path, engine=Policy(capacity=4))
    alone = Controller.from_config(path, engine=Policy(capacity=4))
    yield batched, alone
    batched.close()
    alone.close()


@budget()
@given(cycles)
def test_any_frames_get_safe_outputs_and_read_as_each_stream_alone(pair, frames_per_cycle):
    batched, alone = pair
    for frames in frames_per_cycle:
        frames = materialise(frames)
        with tried("frames"):
            got = batched.step_many(frames)
        for s, f in frames.items():
            want = alone.step_many({s: f})[s]
            assert set(got[s]) == set(RANGES)
            for name, value in got[s].items():
                lo, hi = RANGES[name]
                assert math.isfinite(value) and lo <= value <= hi, (s, name, value)
            mine, theirs = batched.status(s), alone.status(s)
            assert mine["status"] in ("ok", "failsafe", "hold")
            assert {**mine, "heartbeat": 0} == {**theirs, "heartbeat": 0}, (s, f)
            assert np.array(list(got[s].values())).tobytes() == np.array(list(want.values())).tobytes(), (s, f)
            a, b = alone.slots[s], batched.slots[s]
            assert np.array_equal(alone.cycle.values[a], batched.cycle.values[b], equal_nan=True), (s, f)

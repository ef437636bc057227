"""The control cycle's own bookkeeping, compiled against its NumPy reference, side by side.

    python benchmarks/bench_cycle.py [--cycles 20000] [--streams 1,64] [--json FILE]

For each stream count, two ``ControlCycle`` objects over the same limits (inputs validated,
outputs clamped, rate-limited and tracking, warm-up on) run alternately on the same inputs,
one with ``compiled=True`` (``runtime.control.kernels``) and one with ``compiled=False``
(the NumPy reference). The policy is a trivial NumPy function, so what is timed is the
cycle minus its inference hand-off (``run()`` returns the nanoseconds of the hand-off and
wait; they are subtracted): validation, frame planning, collection, mode, limiter. Prints
p50/p99 in microseconds of both and their ratio, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.control.loop import ControlCycle, InferenceWorker, monotonic_ns  # noqa: E402
from runtime.control.safety import InputGuard, InputLimit, OutputLimit, OutputLimiter  # noqa: E402

N_FEAT, N_OUT = 7, 2


class Policy:
    """outputs = a fixed linear map of the frame (cheap: the cycle is measured, not a model)."""

    input_names = [f"x{i}" for i in range(N_FEAT)]
    output_names = ["valve", "pump"]

    def __init__(self, capacity: int):
        self.w = np.linspace(-0.1, 0.1, N_FEAT * N_OUT, dtype=np.float32).reshape(N_FEAT, N_OUT)
        self.out = np.zeros((capacity, N_OUT), np.float32)

    def reset_slot(self, slot: int) -> None:
        """Nothing to forget."""

    def step_sensor(self, slots: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The map of each frame."""
        n = len(slots)
        np.matmul(features, self.w, out=self.out[:n])
        return self.out[:n]


def make(streams: int, compiled: bool) -> ControlCycle:
    """A cycle over ``streams`` active slots: 7 policy inputs, a tracking input and a mode input."""
    inputs = [InputLimit(f"x{i}", -10.0, 10.0, 50_000_000) for i in range(N_FEAT)]
    inputs += [InputLimit("pos", 0.0, 1.0, 50_000_000, hold=True), InputLimit("auto", 0.0, 1.0, 50_000_000)]
    outputs = [OutputLimit("valve", 0.0, 1.0, 0.5, 0.0), OutputLimit("pump", -1.0, 1.0, float("inf"), 0.0)]
    cycle = ControlCycle(Policy(streams), InputGuard(inputs, streams),
                         OutputLimiter(outputs, streams, 0.001, track=[N_FEAT, -1]), capacity=streams,
                         worker=InferenceWorker(), window=8, warmup_cycles=4, mode_col=N_FEAT + 1, compiled=compiled)
    cycle.active[:] = True
    return cycle


def bench(streams: int, cycles: int) -> dict:
    """p50/p99 (us) of the bookkeeping of both cycles, run alternately on the same inputs."""
    pair = {"reference": make(streams, False), "compiled": make(streams, True)}
    rng = np.random.default_rng(0)
    frames = rng.uniform(0.0, 1.0, (256, streams, N_FEAT + 2))
    frames[..., N_FEAT + 1] = 1.0
    times = {k: np.zeros(cycles, np.int64) for k in pair}
    now = monotonic_ns()
    for k in range(cycles + 200):
        now += 1_000_000
        for name, c in pair.items():
            c.values[:] = frames[k % 256]
            c.stamps[:] = now
            t0 = monotonic_ns()
            handoff = c.run(now, monotonic_ns() + 10 ** 9)
            t1 = monotonic_ns()
            if k >= 200:                                  # the first cycles compile and warm up
                times[name][k - 200] = t1 - t0 - handoff
    for c in pair.values():
        c.worker.close()
    out = {name: {"p50": float(np.percentile(t, 50)) / 1e3, "p99": float(np.percentile(t, 99)) / 1e3}
           for name, t in times.items()}
    out["ratio_p50"] = out["compiled"]["p50"] / out["reference"]["p50"]
    return out


def main() -> int:
    """Run and print (and with ``--json`` write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20000)
    ap.add_argument("--streams", default="1,64", help="comma-separated stream counts (default 1,64)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    result = {"load_average": list(load), "parts": {}}
    for s in [int(x) for x in args.streams.split(",")]:
        r = bench(s, args.cycles)
        result["parts"][str(s)] = r
        print(f"{s:3d} streams: bookkeeping per cycle p50/p99  reference {r['reference']['p50']:7.1f} / "
              f"{r['reference']['p99']:7.1f} us   compiled {r['compiled']['p50']:6.1f} / {r['compiled']['p99']:6.1f} us"
              f"   compiled/reference p50 {r['ratio_p50']:.2f}")
    result["load_average_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

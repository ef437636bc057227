"""Someone else's perception loop: a 50 Hz pipeline tracking the vehicle ahead.

This module stands in for a vehicle's existing perception stack, the code r1edge is
embedded into (``hook.py`` is the embedding). It simulates:

- the traffic: an ego vehicle following a lead vehicle with a human-like car-following
  model (IDM with a 0.6 s reaction delay), a lead that changes speed, brakes hard now and
  then, and vehicles cutting in;
- the perception output, once per 20 ms camera frame: the distance to the object ahead
  (m) and its closing speed (m/s, positive when the gap shrinks), with noise growing with
  distance, and the capture time (``time.monotonic_ns()``);
- what goes wrong in real pipelines: the object is lost for a few frames (NaN distance and
  speed), a frame's detections are dropped (None), and now and then one frame takes 70 ms
  to process (its values arrive old, and the frames captured meanwhile are dropped).

:class:`PerceptionPipeline` owns the loop and calls the hook once per processed frame with
a :class:`Detection`; the hook returns its advisory ``(brake, status)``. The pipeline keeps
the ground truth and scores the advisories against :func:`brake_reference`, the
time-to-collision rule the policy was trained to reproduce from noisy detections.
:func:`dataset` makes the training data from the same traffic model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

PERIOD_S = 0.02
INPUTS = ("distance", "closing_speed")
OUTPUTS = ("brake",)
TTC_FULL_S, TTC_NONE_S = 1.0, 3.0     # full brake advisory at or below, none at or above
_DELAY = 30                           # frames of driver reaction delay (0.6 s)


def brake_reference(distance, closing_speed):
    """The brake advisory (0..1) from the true gap and closing speed: a ramp in
    time-to-collision from 0 at ``TTC_NONE_S`` to 1 at ``TTC_FULL_S``; 0 when opening."""
    d = np.asarray(distance, dtype=np.float64)
    v = np.asarray(closing_speed, dtype=np.float64)
    ttc = np.where(v > 0.05, d / np.maximum(v, 0.05), np.inf)
    return np.clip((TTC_NONE_S - ttc) / (TTC_NONE_S - TTC_FULL_S), 0.0, 1.0)


class Traffic:
    """``n`` independent ego/lead pairs stepped together every ``PERIOD_S`` (seeded).

    ``step()`` returns the true (gap, closing speed) arrays, views overwritten next step.
    """

    def __init__(self, n: int, seed: int = 0):
        rng = self.rng = np.random.default_rng(seed)
        self.n = n
        self.v_ego = rng.uniform(8.0, 25.0, n)
        self.v_lead = self.v_ego + rng.normal(0.0, 1.0, n)
        self.target = self.v_lead.copy()
        self.decel = np.full(n, 1.0)                  # how hard the lead reaches its target
        self.gap = 5.0 + 1.5 * self.v_ego
        self.v0 = rng.uniform(22.0, 32.0, n)          # the ego driver's desired speed
        self.hist_gap = np.repeat(self.gap[None], _DELAY, 0)
        self.hist_dv = np.zeros((_DELAY, n))
        self.hist_v = np.repeat(self.v_ego[None], _DELAY, 0)
        self.k = 0
        self.closing = np.zeros(n)

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance one frame; returns (gap m, closing speed m/s)."""
        rng, n, dt = self.rng, self.n, PERIOD_S
        # Lead behaviour: gentle speed changes, hard braking, a vehicle cutting in.
        gentle = rng.random(n) < dt / 4.0
        self.target[gentle] = rng.uniform(5.0, 30.0, int(gentle.sum()))
        self.decel[gentle] = 1.0
        hard = rng.random(n) < dt / 6.0
        self.target[hard] = self.v_lead[hard] * rng.uniform(0.0, 0.5, int(hard.sum()))
        self.decel[hard] = rng.uniform(4.0, 7.0, int(hard.sum()))
        cut = rng.random(n) < dt / 8.0
        m = int(cut.sum())
        if m:
            self.gap[cut] = np.minimum(self.gap[cut], rng.uniform(6.0, 20.0, m))
            self.v_lead[cut] = np.maximum(self.v_ego[cut] - rng.uniform(1.0, 8.0, m), 0.0)
            self.target[cut] = self.v_lead[cut] + rng.uniform(0.0, 6.0, m)
            self.decel[cut] = 1.5
        dv = self.target - self.v_lead
        self.v_lead = np.maximum(self.v_lead + np.clip(dv, -self.decel * dt, 1.5 * dt), 0.0)

        # The ego driver: IDM on what they saw 0.6 s ago, with an emergency stop when close.
        j = self.k % _DELAY
        g, dvs, ve = self.hist_gap[j], self.hist_dv[j], self.hist_v[j]
        s_star = 2.0 + ve * 1.2 + ve * dvs / (2.0 * math.sqrt(1.5 * 2.5))
        acc = 1.5 * (1.0 - (self.v_ego / self.v0) ** 4 - (np.maximum(s_star, 0.0) / np.maximum(g, 0.5)) ** 2)
        acc = np.clip(acc, -8.0, 1.5)
        acc[self.gap < 2.0] = -9.0
        self.v_ego = np.maximum(self.v_ego + acc * dt, 0.0)
        closing = self.v_ego - self.v_lead
        self.gap = self.gap - closing * dt
        crash = self.gap < 0.5                        # rare: the follower stops behind the lead
        self.gap[crash] = 0.5
        self.v_ego[crash] = np.minimum(self.v_ego[crash], self.v_lead[crash])
        self.closing = self.v_ego - self.v_lead
        self.hist_gap[j], self.hist_dv[j], self.hist_v[j] = self.gap, self.closing, self.v_ego
        self.k += 1
        return self.gap, self.closing


def measure(gap: np.ndarray, closing: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Perception's noisy estimates of gap and closing speed."""
    d = gap + rng.normal(0.0, 1.0, gap.shape) * (0.15 + 0.01 * gap)
    v = closing + rng.normal(0.0, 0.25, closing.shape)
    return np.maximum(d, 0.0), v


def dataset(episodes: int, seconds: float, *, seed: int = 0, gap_rate: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Training rows as the controller sees them: (frames [N, T, 2], brake targets [N, T, 1]).

    Frames are noisy detections; targets are :func:`brake_reference` of the truth. About
    ``gap_rate`` per frame a span of 2-8 frames is cut out of a row, as the frames that never
    reach the policy (lost object, dropped or late frame) are cut out of a live stream.
    """
    rng = np.random.default_rng([seed, 1])
    traffic = Traffic(episodes, seed)
    n = int(round(seconds / PERIOD_S))
    frames = np.empty((episodes, n, 2), dtype=np.float32)
    truth = np.empty((episodes, n, 1), dtype=np.float32)
    for k in range(n):
        gap, closing = traffic.step()
        frames[:, k, 0], frames[:, k, 1] = measure(gap, closing, rng)
        truth[:, k, 0] = brake_reference(gap, closing)
    keep = np.ones((episodes, n), dtype=bool)
    starts = np.argwhere(rng.random((episodes, n)) < gap_rate)
    for e, k in starts:
        keep[e, k:k + rng.integers(2, 9)] = False
    t = int(keep.sum(1).min())                        # equal row lengths: trim to the shortest
    idx = np.stack([np.flatnonzero(row)[:t] for row in keep])
    rows = np.arange(episodes)[:, None]
    return frames[rows, idx], truth[rows, idx]


@dataclass
class Detection:
    """One processed frame: the object ahead (NaN when lost, None when the detections of
    the frame were dropped) and when the camera captured it (``time.monotonic_ns()``)."""

    frame: int
    distance: float | None
    closing_speed: float | None
    t_capture_ns: int


#: ``hook(detection) -> (brake advisory, status)``
Hook = Callable[[Detection], tuple[float, str]]


class PerceptionPipeline:
    """The 50 Hz perception loop; :meth:`run` calls ``hook`` once per processed frame.

    Faults are seeded: object lost (NaN) for 2-8 frames about every 5 s, a frame's
    detections dropped (None) about every 5 s, and one frame in ``slow_every`` taking
    ``slow_ms`` to process. :meth:`report` scores what the hook answered.
    """

    def __init__(self, seed: int = 0, *, lost_every_s: float = 5.0, drop_every_s: float = 5.0,
                 slow_every: int = 250, slow_ms: float = 70.0):
        self.traffic = Traffic(1, seed)
        self.rng = np.random.default_rng([seed, 2])
        self.p_lost, self.p_drop = PERIOD_S / lost_every_s, PERIOD_S / drop_every_s
        self.slow_every, self.slow_ns = slow_every, int(slow_ms * 1e6)
        self.log: list[tuple] = []     # (frame, kind, truth brake, advisory, status, hook us)
        self.skipped = 0

    def run(self, hook: Hook, duration_s: float) -> None:
        """Run the loop in real time for ``duration_s`` (frames on absolute 20 ms ticks)."""
        period = int(PERIOD_S * 1e9)
        n = int(round(duration_s / PERIOD_S))
        t0 = time.monotonic_ns() + period
        lost = 0
        k = 0
        while k < n:
            delay = t0 + k * period - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            t_capture = time.monotonic_ns()
            gap, closing = self.traffic.step()
            truth = float(brake_reference(gap[0], closing[0]))
            d, v = (float(x[0]) for x in measure(gap, closing, self.rng))
            kind = "ok"
            if lost == 0 and self.rng.random() < self.p_lost:
                lost = int(self.rng.integers(2, 9))
            if lost:
                lost -= 1
                d = v = math.nan
                kind = "lost"
            elif self.rng.random() < self.p_drop:
                d = v = None
                kind = "dropped"
            elif k % self.slow_every == self.slow_every - 1:
                time.sleep(self.slow_ns / 1e9)     # this frame's processing overruns
                kind = "slow"
            t1 = time.perf_counter_ns()
            brake, status = hook(Detection(k, d, v, t_capture))
            self.log.append((k, kind, truth, brake, status, (time.perf_counter_ns() - t1) / 1e3))
            k += 1
            # Frames whose slot has passed were never processed: the traffic moves on.
            while k < n and time.monotonic_ns() > t0 + (k + 1) * period:
                self.traffic.step()
                self.skipped += 1
                k += 1

    def report(self, threshold: float = 0.5) -> dict:
        """What the hook answered, against the truth.

        ``failsafe``: advisories not ``ok``, by frame kind (every lost, dropped and slow frame
        should be here, no ``ok`` frame should); ``mae``: mean absolute error of the advisory
        against :func:`brake_reference` on ``ok`` frames answered ``ok``; ``brake_events``:
        spans where the reference reaches ``threshold``, and how many of them the advisory
        also reached ``threshold`` in, with the lag of its first such frame; ``false_brakes``:
        ``ok`` advisories at or above ``threshold`` while the reference is below 0.2.
        """
        kinds = np.array([r[1] for r in self.log])
        truth = np.array([r[2] for r in self.log])
        adv = np.array([r[3] for r in self.log])
        ok = np.array([r[4] == "ok" for r in self.log])
        hook_us = np.array([r[5] for r in self.log])
        fs = {kind: int(((kinds == kind) & ~ok).sum()) for kind in ("ok", "lost", "dropped", "slow")}
        n_kind = {kind: int((kinds == kind).sum()) for kind in ("ok", "lost", "dropped", "slow")}
        good = ok & (kinds == "ok")
        events = detected = 0
        lags = []
        on = truth >= threshold
        k = 0
        while k < len(on):
            if on[k]:
                end = k
                while end < len(on) and on[end]:
                    end += 1
                events += 1
                hit = np.flatnonzero(good[k:end] & (adv[k:end] >= threshold))
                if len(hit):
                    detected += 1
                    lags.append(int(hit[0]) * PERIOD_S * 1e3)
                k = end
            k += 1
        return {
            "frames": len(self.log), "skipped_frames": self.skipped, "frames_by_kind": n_kind,
            "failsafe": fs,
            "mae": round(float(np.abs(adv[good] - truth[good]).mean()), 4) if good.any() else None,
            "brake_events": events, "brake_events_advised": detected,
            "advice_lag_ms": {"median": float(np.median(lags)), "max": float(max(lags))} if lags else None,
            "false_brakes": int((good & (adv >= threshold) & (truth < 0.2)).sum()),
            "hook_us": {"p50": round(float(np.percentile(hook_us, 50)), 1),
                        "p99": round(float(np.percentile(hook_us, 99)), 1),
                        "max": round(float(hook_us.max()), 1)},
        }

"""A fleet of rotating machines reporting vibration features, with injected faults.

Each machine (one stream) is a motor-driven pump seen through a vibration gateway that
reports, at a high rate, the features a condition-monitoring system computes over short
blocks of accelerometer data:

=============  =======  ===============================================================
feature        unit     what it measures
=============  =======  ===============================================================
speed          Hz       shaft speed (follows the load; changes are normal operation)
rms            mm/s     overall velocity RMS
crest          -        peak / RMS of the block
kurtosis       -        impulsiveness of the block (3 for Gaussian vibration)
band_1x        mm/s     velocity at the running speed (imbalance shows here)
band_2x        mm/s     velocity at twice the running speed (looseness, misalignment)
band_hf        g        acceleration in a 2-10 kHz band (bearing defects show here)
temperature    degC     bearing housing temperature
=============  =======  ===============================================================

Healthy vibration scales with speed (1x and 2x with speed squared, the HF band with
speed); every machine has its own baseline levels, so an absolute threshold on any one
feature either misses faults on quiet machines or alarms on rough ones and on load changes.
Block-to-block estimates are noisy (log-normal, plus a slowly wandering component) and
healthy machines see occasional single-block process knocks (kurtosis and crest spikes).

Faults start at a given time and belong to one of :data:`FAULTS`:

- ``bearing``: a spall: HF band energy jumps to 2-2.5x baseline and keeps growing,
  kurtosis and crest factor rise with it, the housing slowly warms;
- ``imbalance``: 1x rises to 2-3x within 0.1 s (a lost balance weight, a fouled impeller);
- ``looseness``: 2x rises to 2.5-4x, 1x by 20%, and impacts in about a third of the blocks
  raise kurtosis and crest factor intermittently.

Fault growth is time-compressed (seconds instead of weeks) so that a run of a few seconds
shows onset and growth. Everything is drawn from one seeded generator and stepped for all
machines at once (``Fleet.step``), so the same seed gives the same frames; the same class
makes the training data (thousands of machines) and the live streams (16).
"""
from __future__ import annotations

import numpy as np

#: The features each frame carries, in order.
FEATURES = ("speed", "rms", "crest", "kurtosis", "band_1x", "band_2x", "band_hf", "temperature")
#: Fault kinds; the policy outputs one score (0..1) per kind under these names.
FAULTS = ("bearing", "imbalance", "looseness")
HEALTHY = -1

_SPEED_REF = 25.0        # Hz at which the baseline levels are given
_KNOCK_P = 0.0025        # per frame: a healthy process knock
_LOOSE_IMPACT_P = 0.35   # per frame, once loose


class Fleet:
    """``n`` machines stepped together at ``rate_hz``; ``step()`` gives one frame per machine.

    ``kind[i]`` is the fault index of machine ``i`` into :data:`FAULTS` (or ``HEALTHY``) and
    ``onset_s[i]`` when it starts (ignored for healthy machines). Buffers are preallocated;
    ``step()`` returns views that the next step overwrites.
    """

    def __init__(self, kind: np.ndarray, onset_s: np.ndarray, *, rate_hz: float = 400.0, seed: int = 0):
        kind = np.asarray(kind, dtype=np.int64)
        onset_s = np.asarray(onset_s, dtype=np.float64)
        if kind.ndim != 1 or onset_s.shape != kind.shape:
            raise ValueError(f"kind and onset_s must be 1-D of one length, got {kind.shape} and {onset_s.shape}")
        if ((kind < HEALTHY) | (kind >= len(FAULTS))).any():
            raise ValueError(f"kind values must be -1 (healthy) or 0..{len(FAULTS) - 1}")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        n = len(kind)
        self.n, self.dt, self.kind, self.onset_s = n, 1.0 / rate_hz, kind, onset_s
        self.t = 0.0
        self.frames = 0
        rng = self.rng = np.random.default_rng(seed)
        u = rng.uniform
        # Per-machine baselines and fault magnitudes.
        self.a1, self.a2, self.ahf = u(0.8, 1.4, n), u(0.25, 0.45, n), u(0.15, 0.25, n)
        self.k0, self.c0 = u(2.8, 3.3, n), u(2.9, 3.4, n)
        self.ambient = u(25.0, 40.0, n)
        self.imb_gain = u(1.0, 2.0, n)
        self.loose_gain = u(1.5, 3.0, n)
        self.bear_g0, self.bear_rate = u(1.0, 1.5, n), u(0.2, 0.5, n)
        self.speed = u(20.0, 30.0, n)
        self.target = self.speed.copy()
        self.temp = self.ambient + 12.0 * (self.speed / _SPEED_REF) ** 2
        self.wander = np.zeros((n, 3))                       # slow log-noise on the three bands
        self._frame = np.zeros((n, len(FEATURES)))
        self._label = np.zeros((n, len(FAULTS)))
        self._rho = np.exp(-self.dt / 0.5)
        self._is = [kind == k for k in range(len(FAULTS))]

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance one frame; returns (features [n, F], labels [n, len(FAULTS)]) as views."""
        n, dt, rng = self.n, self.dt, self.rng
        t = self.t
        # Load changes: a new speed target now and then, approached with a 0.3 s lag.
        change = rng.random(n) < 0.3 * dt
        self.target[change] = rng.uniform(18.0, 32.0, int(change.sum()))
        self.speed += (self.target - self.speed) * (dt / 0.3)
        sq = (self.speed / _SPEED_REF) ** 2
        lin = self.speed / _SPEED_REF

        active = (self.kind != HEALTHY) & (t >= self.onset_s)
        since = np.where(active, t - self.onset_s, 0.0)
        bearing = active & self._is[0]
        imbalance = active & self._is[1]
        loose = active & self._is[2]
        g = np.where(bearing, np.minimum(self.bear_g0 + self.bear_rate * since, 4.0), 0.0)
        imb = np.where(imbalance, self.imb_gain * np.minimum(since / 0.1, 1.0), 0.0)

        self.wander *= self._rho
        self.wander += np.sqrt(1.0 - self._rho ** 2) * 0.06 * rng.standard_normal((n, 3))
        noise = np.exp(self.wander + 0.12 * rng.standard_normal((n, 3)))
        f = self._frame
        f[:, 0] = self.speed + 0.05 * rng.standard_normal(n)
        b1 = f[:, 4] = self.a1 * sq * (1.0 + imb) * np.where(loose, 1.2, 1.0) * noise[:, 0]
        b2 = f[:, 5] = self.a2 * sq * np.where(loose, 1.0 + self.loose_gain, 1.0) * noise[:, 1]
        hf = f[:, 6] = self.ahf * lin * (1.0 + g) * noise[:, 2]
        f[:, 1] = np.sqrt(b1 ** 2 + b2 ** 2 + (1.5 * hf) ** 2 + 0.3 ** 2) * np.exp(0.03 * rng.standard_normal(n))

        kurt = self.k0 + 0.25 * rng.standard_normal(n) + g * (1.2 + 0.4 * rng.standard_normal(n))
        crest = self.c0 + 0.2 * rng.standard_normal(n) + 0.8 * g
        knock = rng.random(n) < _KNOCK_P
        impact = loose & (rng.random(n) < _LOOSE_IMPACT_P)
        kick = knock | impact
        if kick.any():
            m = int(kick.sum())
            kurt[kick] += np.where(knock[kick], rng.uniform(2.0, 5.0, m), rng.uniform(0.8, 2.5, m))
            crest[kick] += np.where(knock[kick], rng.uniform(1.0, 2.5, m), rng.uniform(0.6, 1.8, m))
        f[:, 2], f[:, 3] = crest, kurt

        self.temp += (self.ambient + 12.0 * sq + 3.0 * g - self.temp) * (dt / 2.0)
        f[:, 7] = self.temp + 0.15 * rng.standard_normal(n)

        lab = self._label
        lab.fill(0.0)
        for k, is_k in enumerate(self._is):
            lab[is_k & active, k] = 1.0
        self.t = t + dt
        self.frames += 1
        return f, lab


def demo_schedule(n_streams: int, duration_s: float, seed: int, healthy: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Fault kinds and onsets for a live run: ``healthy`` machines stay healthy, the rest get
    the fault kinds in turn (shuffled over the streams) at onsets drawn uniformly in
    [25%, 60%] of the run. Returns (kind, onset_s)."""
    if not 0 <= healthy <= n_streams:
        raise ValueError(f"healthy must be in 0..{n_streams}, got {healthy}")
    rng = np.random.default_rng(seed + 1_000_003)
    kinds = np.array([HEALTHY] * healthy + [i % len(FAULTS) for i in range(n_streams - healthy)])
    kinds = kinds[rng.permutation(n_streams)]
    onset = rng.uniform(0.25 * duration_s, 0.6 * duration_s, n_streams)
    onset[kinds == HEALTHY] = np.inf
    return kinds, onset


def controller_view(n_cycles: int, frames_per_cycle: int, rng: np.random.Generator) -> np.ndarray:
    """Which sensor frame the controller holds at each of its cycles.

    The bridge keeps the newest frame per stream, so a controller ticking every
    ``frames_per_cycle`` frames sees every ``frames_per_cycle``-th frame, give or take one
    when publisher and loop drift against each other (a frame seen twice, or one skipped).
    Training on the same jitter keeps the policy indifferent to it.
    """
    idx = np.arange(1, n_cycles + 1) * frames_per_cycle - 1
    jitter = rng.choice([-1, 0, 1], size=n_cycles, p=[0.15, 0.7, 0.15])
    return np.clip(idx + jitter, 0, None)


def dataset(n_machines: int, duration_s: float, *, rate_hz: float = 400.0, frames_per_cycle: int = 2,
            seq_len: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training data as the controller sees it: (frames [N, seq_len, F], labels [N, seq_len, 3]).

    ``n_machines`` machines are simulated for ``duration_s`` each (a quarter healthy, the rest
    with a fault starting anywhere from 0.2 s to the end), sampled at the controller's rate
    with :func:`controller_view` and cut into sequences of ``seq_len`` cycles.
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, len(FAULTS), n_machines)
    kind[rng.random(n_machines) < 0.25] = HEALTHY
    onset = rng.uniform(0.2, duration_s, n_machines)
    fleet = Fleet(kind, onset, rate_hz=rate_hz, seed=seed + 1)
    n_frames = int(round(duration_s * rate_hz))
    n_cycles = n_frames // frames_per_cycle - 1
    view = controller_view(n_cycles, frames_per_cycle, rng)
    keep = np.zeros(n_frames, dtype=np.int64)          # frame index -> how many cycles see it
    np.add.at(keep, view, 1)
    frames = np.empty((n_machines, n_cycles, len(FEATURES)), dtype=np.float32)
    labels = np.empty((n_machines, n_cycles, len(FAULTS)), dtype=np.float32)
    c = 0
    for i in range(n_frames):
        f, lab = fleet.step()
        for _ in range(keep[i]):
            frames[:, c], labels[:, c] = f, lab
            c += 1
    per = n_cycles // seq_len
    frames = frames[:, :per * seq_len].reshape(n_machines * per, seq_len, len(FEATURES))
    labels = labels[:, :per * seq_len].reshape(n_machines * per, seq_len, len(FAULTS))
    return frames, labels

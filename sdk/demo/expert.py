"""The expert controller for the heated tank, and the data that teaches a policy to imitate it.

The expert is a PID per loop (valve -> level, heater -> temperature) on top of a model-inverse
feedforward: :func:`plant.steady_commands` at the setpoints and the measured inflow
temperature gives the steady valve and heater, the PID corrects around it. Derivative acts
on the measurement (no kick on setpoint steps), over ``deriv_frames`` frames to average
the noise down.

Integral action comes in two forms (``integral=``):

- ``"window"`` (the default, the one the policy imitates): the integral is the sum of the
  errors over the last ``window`` frames, the same frames the policy sees. The expert's
  command is then an exact function of the policy's visible window: there is no hidden state
  a sequence model would have to guess, and nothing to wind up (the sum is bounded). It is a
  bounded low-frequency boost rather than a true integrator, so a sustained leak leaves a
  level offset (about 5 cm for the largest leak) until it closes. On the tracking score,
  which setpoint transients dominate, the two forms measure the same; an MLP over the
  window imitates this form with a 15x lower training error than the ``"full"`` one.
- ``"full"``: a classical integrator with clamping anti-windup (integration stops while the
  output is saturated in the direction that would grow it). Zero steady-state error, but
  its state is a function of the whole history, which a policy with a 32-frame window can
  only infer from its own past outputs; a small bias in such a policy is integrated by the
  loop into a steady error of bias / (Ki * period).

Both clip the command to 0..1 and then apply the output rate limits of the deployment
(``max_rate``, units per second) so that the expert baseline is scored under the same
actuator limits as the controller that runs the policy. ``raw`` keeps the command before
the rate limit: that is the training target, because the controller rate-limits the
policy's output itself.

``python -m sdk.demo.expert`` prints tracking figures (expert vs no control);
``python -m sdk.demo.expert --dataset out.npz`` writes the imitation data.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping

import numpy as np

from . import plant as P

log = logging.getLogger(__name__)

#: Signals the policy sees each control cycle, in frame order (all served by the plant).
FEATURES = ("level", "temperature", "level_sp", "temp_sp", "level_err", "temp_err",
            "inflow_temp")
#: Actuator commands the policy outputs, in target order.
OUTPUTS = ("valve", "heater")

PERIOD_S = 0.02
WINDOW = 32
MAX_RATE = {"valve": 2.0, "heater": 2.0}   # units per second; must match deploy.toml

#: Gains per integral form: proportional, integral (per second), derivative (seconds).
#: Level gains are in valve per metre, temperature gains in heater per kelvin. Tuned by a
#: coordinate search on seeds 100-107 (60 s each) minimising the tracking score plus half
#: the RMS per-cycle command change (smooth commands: less valve wear, easier to imitate).
GAINS = {
    "window": {"level": (2.0, 1.0, 0.0), "temp": (0.085, 0.106, 0.025)},
    "full": {"level": (2.0, 1.0, 0.0), "temp": (0.12, 0.0031, 0.0062)},
}


class ExpertController:
    """PID + model-inverse feedforward for level and temperature (see the module docstring).

    ``ctrl(measurements) -> {"valve": v, "heater": h}``, once per ``period_s``, with the
    measurement dict the plant serves (at least ``FEATURES``). Internal buffers are
    preallocated; :meth:`reset` clears them for a new episode.
    """

    def __init__(self, period_s: float = PERIOD_S, window: int = WINDOW,
                 integral: str = "window", gains: Mapping[str, tuple] | None = None,
                 max_rate: Mapping[str, float] | None = MAX_RATE, deriv_frames: int = 8):
        if integral not in GAINS:
            raise ValueError(f"integral must be one of {sorted(GAINS)}, got {integral!r}")
        if not 1 <= deriv_frames < window:
            raise ValueError(f"deriv_frames must be in 1..{window - 1}, got {deriv_frames}")
        self.period_s, self.window, self.integral = float(period_s), int(window), integral
        self.gains = dict(gains or GAINS[integral])
        self.deriv_frames = int(deriv_frames)
        rate = max_rate or {}
        self._max_step = (rate.get("valve", math.inf) * self.period_s,
                          rate.get("heater", math.inf) * self.period_s)
        # rows: level error, temperature error, level, temperature; a ring of `window` frames
        self._hist = np.zeros((4, self.window))
        self.reset()

    def reset(self) -> None:
        """Forget the history (start of an episode)."""
        self._hist[:] = 0.0
        self._n = 0
        self._i_full = [0.0, 0.0]
        self._last: tuple[float, float] | None = None
        self.raw = (0.0, 0.0)

    def __call__(self, m: Mapping[str, float]) -> dict[str, float]:
        """One control cycle: measurements in, actuator commands out."""
        w, k = self.window, self._n % self.window
        e_l, e_t = m["level_sp"] - m["level"], m["temp_sp"] - m["temperature"]
        self._hist[:, k] = (e_l, e_t, m["level"], m["temperature"])
        self._n += 1
        seen = min(self._n, w)
        lag = min(self.deriv_frames, seen - 1)
        if lag > 0:
            j = (k - lag) % w
            d_l = (m["level"] - self._hist[2, j]) / (lag * self.period_s)
            d_t = (m["temperature"] - self._hist[3, j]) / (lag * self.period_s)
        else:
            d_l = d_t = 0.0
        ff_v, ff_h = P.steady_commands(m["level_sp"], m["temp_sp"], m["inflow_temp"])
        (kp_l, ki_l, kd_l), (kp_t, ki_t, kd_t) = self.gains["level"], self.gains["temp"]
        if self.integral == "window":
            # a fixed-order sum over the ring (unfilled slots are zero), so the value depends
            # only on the frames in the window, not on accumulated rounding
            i_l = math.fsum(self._hist[0]) * self.period_s
            i_t = math.fsum(self._hist[1]) * self.period_s
        else:
            i_l, i_t = self._i_full
        pd_v = ff_v + kp_l * e_l - kd_l * d_l
        pd_h = ff_h + kp_t * e_t - kd_t * d_t
        valve = pd_v + ki_l * i_l
        heater = pd_h + ki_t * i_t
        if self.integral == "full":
            # clamping anti-windup: integrate only if that does not push further into a limit
            for idx, (u, e) in enumerate(((valve, e_l), (heater, e_t))):
                if not ((u >= 1.0 and e > 0.0) or (u <= 0.0 and e < 0.0)):
                    self._i_full[idx] += e * self.period_s
        valve, heater = min(max(valve, 0.0), 1.0), min(max(heater, 0.0), 1.0)
        self.raw = (valve, heater)
        if self._last is not None:
            lv, lh = self._last
            valve = min(max(valve, lv - self._max_step[0]), lv + self._max_step[0])
            heater = min(max(heater, lh - self._max_step[1]), lh + self._max_step[1])
        self._last = (valve, heater)
        return {"valve": valve, "heater": heater}


def evaluate(seeds, duration_s: float = 60.0, integral: str = "window",
             start_s: float = 2.0) -> dict[str, dict[str, float]]:
    """Mean tracking figures (:func:`plant.tracking_error`) of the expert and of no control
    over the given seeds, each controller on the same disturbance sequence per seed."""
    acc: dict[str, list[dict[str, float]]] = {"expert": [], "no_control": []}
    for seed in seeds:
        acc["expert"].append(P.tracking_error(
            P.simulate(seed, ExpertController(integral=integral), duration_s), start_s))
        acc["no_control"].append(P.tracking_error(P.simulate(seed, None, duration_s), start_s))
    return {name: {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            for name, rows in acc.items()}


def generate_dataset(n_episodes: int, episode_s: float = 30.0, seed: int = 0,
                     explore: float = 0.08, integral: str = "window") -> dict[str, np.ndarray]:
    """Run the expert over ``n_episodes`` seeded episodes and collect imitation data.

    Returns ``frames`` float32 [N, T, F] (``FEATURES`` as the controller reads them each
    cycle), ``targets`` float32 [N, T, O] (the expert's command before the rate limit, in
    ``OUTPUTS`` order), and the names. Episode ``i`` uses plant seed ``seed * 100003 + i``.

    To show the policy states off the expert's own trajectory (so its mistakes do not
    compound into the unknown), a random two thirds of the episodes apply the expert's
    command plus a slow Ornstein-Uhlenbeck perturbation (time constant 1 s, stationary
    std up to ``explore``) to the plant, while the target stays the expert's command.
    ``integral`` selects the expert (see :class:`ExpertController`).
    """
    steps = int(round(episode_s / PERIOD_S))
    frames = np.zeros((n_episodes, steps, len(FEATURES)), np.float32)
    targets = np.zeros((n_episodes, steps, len(OUTPUTS)), np.float32)
    expert = ExpertController(integral=integral)
    for ep in range(n_episodes):
        plant_seed = seed * 100003 + ep
        rng = np.random.default_rng([plant_seed, 0xDA7A])
        sigma = float(rng.choice([0.0, 0.5, 1.0])) * explore
        alpha = PERIOD_S / 1.0
        kick = sigma * math.sqrt(2.0 * alpha)
        noise = np.zeros(2)
        plant = P.Plant(plant_seed, log_capacity=steps + 1)
        expert.reset()
        meas = plant.measure()
        for k in range(steps):
            frames[ep, k] = [meas[name] for name in FEATURES]
            out = expert(meas)
            targets[ep, k] = expert.raw
            noise += -alpha * noise + kick * rng.standard_normal(2)
            meas = plant.step(PERIOD_S, out["valve"] + noise[0], out["heater"] + noise[1])
    return {"frames": frames, "targets": targets, "feature_names": np.array(FEATURES),
            "output_names": np.array(OUTPUTS)}


def main(argv: list[str] | None = None) -> int:
    """``python -m sdk.demo.expert``: tracking figures, or ``--dataset`` data."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="episodes to score (seeds 0..N-1)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per episode")
    ap.add_argument("--dataset", default=None, help="write imitation data to this .npz")
    ap.add_argument("--episodes", type=int, default=256, help="episodes in the dataset")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dataset:
        t0 = time.perf_counter()
        data = generate_dataset(args.episodes, args.duration, args.seed)
        np.savez(args.dataset, **data)
        print(f"wrote {args.dataset}: frames {data['frames'].shape}, targets "
              f"{data['targets'].shape} in {time.perf_counter() - t0:.1f} s")
        return 0
    for integral in ("window", "full"):
        figs = evaluate(range(args.seeds), args.duration, integral)
        for name, f in figs.items():
            print(f"{integral:6s} {name:10s} level_rms={f['level_rms']:.4f} m "
                  f"temp_rms={f['temp_rms']:.3f} K score={f['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

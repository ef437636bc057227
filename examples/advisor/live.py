"""Plant states sampled from the closed loop, as the live advisor meets them.

``states.draw_state`` gives steady states; live, the advisor also sees the loop in motion: setpoint
steps, a leak opening or closing, the heater losing power while the controller answers, a heater
that lost some power but still holds the temperature, a level reading that sticks in the middle of
a step, and its own advice taking effect (the PLC adopts the advised setpoints, which then ramp at
the advisor's ``max_rate``). :func:`closed_loop_states` runs the heated tank (``sdk.demo.plant``)
under the deployment's own fast policy (``deploy.toml``'s ``[model]``, the controller stepped in
simulated time) with such events drawn per episode, and every second or so cuts the last
``history`` cycles into the context the controller hands the prompt template
(``sdk.service.advisor.build_context``, called on the same arrays a live request carries). An
oracle advisor is in force in most episodes: every second it sets the right answer for the state
(``states.right_answer``), as a well-trained advisor would live.

The condition of a state is the plant's truth at the request's time, with ``run.py``'s priority:
a stuck level reading, else a leak open now, else a heater fault in force, else normal.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from examples.advisor import states as S

HERE = Path(__file__).resolve().parent
SETS = ("level_sp", "temp_sp")
RAMP = {"level_sp": 0.05, "temp_sp": 0.5}     # the advised setpoints' max_rate per second (deploy.toml)


def _controller():
    """The deployment's fast policy, stepped in simulated time (no advisor, no bridges)."""
    from sdk.service.config import DeployConfig
    from sdk.service.controller import Controller

    cfg = DeployConfig.load(HERE / "deploy.toml", check_sources=False)
    cfg.advisor = None
    cfg.loop.infer_budget_ms = 600_000.0        # simulated time: no wall-clock budget
    return Controller(cfg, bridges=False), cfg.loop.period_ms / 1e3


def context_of(x: np.ndarray, y: np.ndarray, plc: tuple[float, float], period_s: float) -> dict:
    """The prompt context of a request whose history is inputs ``x`` [n, 7] (``states.INPUTS``)
    and outputs ``y`` [n, 2], through the controller's own ``build_context``."""
    from sdk.service.advisor import build_context

    n = len(x)
    request = {"n": n, "x": np.ascontiguousarray(x, dtype=np.float64).tobytes(),
               "y": np.ascontiguousarray(y, dtype=np.float64).tobytes(), "st": np.zeros(n, np.int8).tobytes(),
               "plc": list(plc), "advice": None, "diagnosis": None, "in_force": False}
    init = {"inputs": list(S.INPUTS), "outputs": list(S.OUTPUTS), "period_s": period_s, "sets": list(SETS)}
    return build_context(request, init)


def episode(seed: int, rng: np.random.Generator, duration_s: float, every_s: float = 0.5, **events
            ) -> list[tuple[dict, str]]:
    """One closed-loop run of plant ``seed`` (a fresh controller, as a live run starts) with
    events drawn from ``rng``: ``kind`` of fault (``heater``, ``level_sensor`` or ``none``),
    ``fault_at`` (s), the heater's remaining ``capacity``, and ``advise_from`` (s; inf: no
    advice), each drawn unless given in ``events``. Returns its sampled (context, condition)s."""
    from sdk.demo.plant import Plant

    unknown = set(events) - {"kind", "fault_at", "capacity", "advise_from"}
    if unknown:
        raise ValueError(f"unknown episode events {sorted(unknown)}; known: advise_from, capacity, fault_at, kind")
    drawn = {"kind": str(rng.choice(["heater", "level_sensor", "none"], p=[0.6, 0.15, 0.25])),
             "fault_at": float(rng.uniform(3.0, max(3.0, duration_s / 2))), "capacity": float(rng.uniform(0.2, 0.95)),
             "advise_from": float(rng.uniform(1.0, 4.0)) if rng.random() < 0.75 else math.inf}
    ctrl, period_s = _controller()
    try:
        return _run(ctrl, period_s, Plant(seed), rng, duration_s, every_s, **{**drawn, **events})
    finally:
        ctrl.close()


def _run(ctrl, period_s: float, plant, rng: np.random.Generator, duration_s: float, every_s: float, *,
         kind: str, fault_at: float, capacity: float, advise_from: float) -> list[tuple[dict, str]]:
    hist = S.HISTORY
    n_cycles = int(round(duration_s / period_s))
    X = np.zeros((n_cycles, len(S.INPUTS)))
    Y = np.zeros((n_cycles, len(S.OUTPUTS)))
    advice = None                   # the advised setpoints the PLC adopted (jump), and those ramping
    seen = None
    frozen = None
    next_sample = float(rng.uniform(2.0, 3.0))
    next_advice = advise_from
    out_states = []
    for k in range(n_cycles):
        t = plant.t
        m = plant.measure()
        if kind == "level_sensor" and t >= fault_at:
            frozen = m["level"] if frozen is None else frozen
            m["level"] = frozen
        plc = (m["level_sp"], m["temp_sp"]) if advice is None else advice
        if advice is not None:
            seen = tuple(s + float(np.clip(a - s, -RAMP[n] * period_s, RAMP[n] * period_s))
                         for s, a, n in zip(seen, advice, SETS))
            m["level_sp"], m["temp_sp"] = seen
        m["level_err"], m["temp_err"] = m["level_sp"] - m["level"], m["temp_sp"] - m["temperature"]
        X[k] = [m[n] for n in S.INPUTS]
        truth = ("level_sensor" if frozen is not None else "leak" if plant.scenario.at(t)[2] > 0.0
                 else "heater_fault" if kind == "heater" and t >= fault_at else "normal")
        if k >= hist and (t >= next_sample or t >= next_advice):
            context = context_of(X[k - hist:k], Y[k - hist:k], plc, period_s)
            if t >= next_sample:
                out_states.append((context, truth))
                next_sample += every_s * float(rng.uniform(0.7, 1.3))
            if t >= next_advice:                       # the oracle advisor's answer takes effect
                answer = S.right_answer(context, truth)
                if seen is None:
                    seen = plc
                advice = (answer["level_sp"], answer["temp_sp"])
                next_advice += 1.0
        out = ctrl.step({n: m[n] for n in ctrl.input_names})
        Y[k] = [out[n] for n in S.OUTPUTS]
        heater = out["heater"] * (capacity if kind == "heater" and t >= fault_at else 1.0)
        plant.step(period_s, out["valve"], heater)
    return out_states


SHARES = {"normal": 0.3, "leak": 0.3, "heater_fault": 0.3, "level_sensor": 0.1}


def closed_loop_states(n: int, seed: int, duration_s: float = 60.0, max_episodes: int = 400
                       ) -> list[tuple[dict, str]]:
    """``n`` states (context, condition) from closed-loop episodes of plant seeds ``seed``,
    ``seed + 1``, ..., with the conditions in the proportions of :data:`SHARES` (episodes run
    until each has its share, at most ``max_episodes``); deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0x11FE])
    want = {d: int(round(n * f)) for d, f in SHARES.items()}
    got: dict[str, list] = {d: [] for d in SHARES}
    for e in range(max_episodes):
        if all(len(got[d]) >= want[d] for d in SHARES):
            break
        for context, d in episode(seed + e, rng, duration_s):
            if len(got[d]) < want[d]:
                got[d].append((context, d))
    out = [row for d in SHARES for row in got[d]]
    order = np.random.default_rng([seed, 0x5A]).permutation(len(out))
    return [out[i] for i in order]

"""Plant states of the heated tank as the advisor sees them, and the right advice for each.

A state is drawn from the tank's own physics (``sdk.demo.plant``: outlet flow ``C_OUT *
sqrt(level)``, inflow ``Q_MAX * valve``, heater gain ``K_HEAT``, ambient loss ``UA``): PLC
setpoints, inflow and ambient temperatures, and one of four conditions, in the steady state the
fast loop holds (actuators saturate where the physics says so), with measurement noise and the
loop's jitter on the statistics. It is written as the controller hands it to the prompt
template (``sdk.service.advisor.build_context``: ``stats``, ``plc``, ``outputs``, ...), so training,
evaluation and the live controller render prompts through the same template.

The conditions and the advice an operator would give:

- ``normal``: level and temperature on setpoint, the valve where a sound tank needs it.
  Keep the setpoints.
- ``leak`` (an orifice whose extra outflow makes the valve stand 5-20% of its range above what a
  sound tank needs for its level; half of them in the 5-8% just above the dead band): the prompt
  shows that excess as one signed percentage, as a historian would compute it (given both
  openings, a model of this size never learned to compare two decimals). A sound tank's valve
  stays within about 1% of its need, so the excess separates the two with a dead band of 2-4%;
  a leak smaller than that is not told from noise and is not in the data. Lower the level
  setpoint by 0.10 m (not below 0.30 m): a lower level loses less through the leak and leaves the
  valve margin.
- ``heater_fault`` (the element gives 25-60% of its power): the heater is at its limit and the
  temperature stays below setpoint. Set the temperature setpoint to the whole degree below the
  temperature the tank holds (as the prompt shows it), so the loop stops pushing a saturated heater.
  The prompt also shows the heater's excess over what a sound element needs (:func:`heater_excess`);
  an element that lost power but still holds the temperature (within 0.5 K, seen live in
  ``live.py``'s closed-loop states) keeps the setpoints: the diagnosis is the news.
- ``level_sensor`` (the level reading is stuck): the level does not move at all (its spread
  over the history is 0) while the valve moves. Keep the setpoints; the diagnosis is the news.

Every answer comes with a short reasoning, written for the ``<think>`` part: it first copies the
figures the diagnosis rests on (the level's spread, the valve's excess, the heater), then names the
condition, then the advice.
"""
from __future__ import annotations

import json
import math

import numpy as np

from sdk.demo.plant import C_OUT, K_HEAT, NOISE_SIGMA, Q_MAX, T_AMBIENT_NOMINAL, UA

DIAGNOSES = ("normal", "leak", "heater_fault", "level_sensor")
HISTORY = 50                    # cycles of history the prompt summarises ([advisor] history)
INPUTS = ("level", "temperature", "level_sp", "temp_sp", "level_err", "temp_err", "inflow_temp")
OUTPUTS = ("valve", "heater")
LEVEL_STEP, TEMP_STEP = 0.01, 0.1   # [advisor] step: the answers' resolution
LEAK_EXCESS = (0.05, 0.08, 0.20)    # a leak's valve excess: half in [0.05, 0.08), half in [0.08, 0.20)
VALVE_JITTER = 0.005                # the valve's mean over the history about its steady value ...
VALVE_JITTER_MAX = 0.012            # ... at most this far off (a sound tank: within about 1%)


def sound_valve(level: float) -> float:
    """The valve opening that holds ``level`` in a tank without a leak (as the prompt shows it)."""
    return C_OUT * math.sqrt(max(level, 0.0)) / Q_MAX


def _stat(rng: np.random.Generator, mean: float, jitter: float, spread: float) -> dict:
    """Summary statistics of a signal around ``mean``: mean with ``jitter``, min/max ``spread`` apart."""
    m = mean + rng.normal(0.0, jitter)
    lo = m - spread * rng.uniform(0.3, 0.7)
    return {"mean": m, "min": lo, "max": lo + spread, "first": m + rng.normal(0.0, jitter),
            "last": m + rng.normal(0.0, jitter)}


def draw_state(rng: np.random.Generator, diagnosis: str | None = None) -> tuple[dict, str]:
    """One plant state as a prompt context, and its condition (drawn uniformly unless given)."""
    diagnosis = diagnosis or DIAGNOSES[int(rng.integers(len(DIAGNOSES)))]
    while True:
        level_sp, temp_sp = rng.uniform(0.3, 0.8), rng.uniform(30.0, 60.0)
        t_in, ambient = rng.uniform(8.0, 22.0), rng.uniform(15.0, 25.0)
        leak = 0.0
        if diagnosis == "leak":                           # the orifice that gives the drawn excess
            lo, mid, hi = LEAK_EXCESS
            excess = rng.uniform(lo, mid) if rng.random() < 0.5 else rng.uniform(mid, hi)
            leak = excess * Q_MAX / math.sqrt(level_sp)
        capacity = rng.uniform(0.25, 0.6) if diagnosis == "heater_fault" else 1.0
        q = (C_OUT + leak) * math.sqrt(level_sp)
        valve = q / Q_MAX
        heater = (q * (temp_sp - t_in) + UA * (temp_sp - ambient)) / (K_HEAT * capacity)
        temp = temp_sp
        if heater > 1.0:                                  # saturated: the temperature the tank holds
            heater = 1.0
            temp = (K_HEAT * capacity + q * t_in + UA * ambient) / (q + UA)
        if diagnosis == "heater_fault" and temp_sp - temp < 1.5:
            continue
        if diagnosis != "heater_fault" and heater > 0.95:
            continue
        if valve <= 0.98:
            break
    level_noise, temp_noise, tin_noise = NOISE_SIGMA
    level = level_sp
    level_spread = rng.uniform(3.5, 5.0) * level_noise
    valve_stat = _stat(rng, valve, 0.0, rng.uniform(0.01, 0.04))
    valve_stat["mean"] += float(np.clip(rng.normal(0.0, VALVE_JITTER), -VALVE_JITTER_MAX, VALVE_JITTER_MAX))
    if diagnosis == "level_sensor":                       # stuck reading: the loop chases a frozen value
        level = rng.uniform(0.2, 0.9)
        level_spread = 0.0
        target = float(np.clip(valve + 2.0 * (level_sp - level), 0.05, 0.95))
        valve_stat = _stat(rng, target, 0.02, rng.uniform(0.03, 0.15))
        valve_stat["mean"] = float(np.clip(valve_stat["mean"], 0.0, 1.0))
        valve_stat["min"] = max(valve_stat["min"], 0.0)
        valve_stat["max"] = min(valve_stat["max"], 1.0)
    stats = {
        "level": _stat(rng, level, 0.0015 if level_spread else 0.0, level_spread),
        "temperature": _stat(rng, temp, 0.1, rng.uniform(3.5, 5.0) * temp_noise),
        "level_sp": _stat(rng, level_sp, 0.0, 0.0), "temp_sp": _stat(rng, temp_sp, 0.0, 0.0),
        "inflow_temp": _stat(rng, t_in, 0.3, rng.uniform(3.5, 5.0) * tin_noise),
        "valve": valve_stat,
        "heater": _stat(rng, heater, 0.005 if heater < 1.0 else 0.0, rng.uniform(0.01, 0.03) if heater < 1.0 else 0.0),
    }
    stats["level_err"] = _stat(rng, level_sp - stats["level"]["mean"], 0.0, level_spread)
    stats["temp_err"] = _stat(rng, temp_sp - stats["temperature"]["mean"], 0.0, 0.0)
    last = {name: s["last"] for name, s in stats.items()}
    context = {"inputs": {n: last[n] for n in INPUTS}, "outputs": {n: last[n] for n in OUTPUTS},
               "status": "ok", "statuses": {"ok": HISTORY, "failsafe": 0, "hold": 0}, "stats": stats,
               "cycles": HISTORY, "seconds": HISTORY * 0.02, "plc": {"level_sp": level_sp, "temp_sp": temp_sp},
               "advice": None, "diagnosis": None, "in_force": False}
    return context, diagnosis


def right_answer(context: dict, diagnosis: str) -> dict:
    """The advice for a state: the decision as the schema has it (from the figures as the prompt
    shows them). A heater fault lowers the temperature setpoint only when the element can no
    longer hold it (the temperature more than 0.5 K below the setpoint); one that still holds it
    keeps the setpoints (the diagnosis is the news)."""
    level_sp = float(f'{context["plc"]["level_sp"]:.2f}')
    temp_sp = float(f'{context["plc"]["temp_sp"]:.1f}')
    temp = float(f'{context["stats"]["temperature"]["mean"]:.1f}')
    if diagnosis == "leak":
        level_sp = round(max(0.30, level_sp - 0.10), 2)
    elif diagnosis == "heater_fault" and temp_sp - temp > 0.5:
        temp_sp = float(math.floor(temp))
    return {"diagnosis": diagnosis, "level_sp": level_sp, "temp_sp": temp_sp}


def valve_excess(context: dict) -> float:
    """How far the valve stands above what a sound tank needs for its level (the prompt shows it
    in percent of the valve's range)."""
    s = context["stats"]
    return s["valve"]["mean"] - sound_valve(s["level"]["mean"])


def heater_excess(context: dict) -> float:
    """How far the heater stands above what a sound element needs for the flow and temperatures
    (the heat balance, with the nominal ambient; the prompt shows it in percent of the range)."""
    s = context["stats"]
    need = (Q_MAX * s["valve"]["mean"] * (s["temperature"]["mean"] - s["inflow_temp"]["mean"])
            + UA * (s["temperature"]["mean"] - T_AMBIENT_NOMINAL)) / K_HEAT
    return s["heater"]["mean"] - need


def reasoning(context: dict, answer: dict) -> str:
    """A short reasoning that leads to ``answer``: the figures it rests on, the condition, the advice."""
    s, plc = context["stats"], context["plc"]
    facts = (f"spread {s['level']['max'] - s['level']['min']:.3f}, error {s['level_err']['mean']:+.2f}, "
             f"valve {100 * valve_excess(context):+.0f}%, heater {100 * heater_excess(context):+.0f}%: ")
    d = answer["diagnosis"]
    if d == "leak":
        return facts + f"leak. lower level {plc['level_sp']:.2f} to {answer['level_sp']:.2f}."
    if d == "heater_fault" and f"{answer['temp_sp']:.1f}" != f"{plc['temp_sp']:.1f}":
        return facts + (f"heater fault. temperature {s['temperature']['mean']:.1f} below {plc['temp_sp']:.1f}, "
                        f"set {answer['temp_sp']:.0f}.")
    if d == "heater_fault":
        return facts + f"heater fault, holding. keep {plc['level_sp']:.2f} and {plc['temp_sp']:.1f}."
    if d == "level_sensor":
        return facts + f"level sensor stuck. keep {plc['level_sp']:.2f} and {plc['temp_sp']:.1f}."
    return facts + f"normal. keep {plc['level_sp']:.2f} and {plc['temp_sp']:.1f}."


def answer_text(answer: dict) -> str:
    """The decision as compact JSON, numbers written to the schema's resolution."""
    return (f'{{"diagnosis":{json.dumps(answer["diagnosis"])},"level_sp":{answer["level_sp"]:.2f},'
            f'"temp_sp":{answer["temp_sp"]:.1f}}}')


def is_right(decision: dict | None, answer: dict) -> dict[str, bool]:
    """Per field, whether a decision gives the right advice (numbers to the schema's resolution)."""
    if decision is None:
        return {"diagnosis": False, "level_sp": False, "temp_sp": False, "all": False}
    out = {"diagnosis": decision["diagnosis"] == answer["diagnosis"],
           "level_sp": abs(decision["level_sp"] - answer["level_sp"]) < LEVEL_STEP / 2,
           "temp_sp": abs(decision["temp_sp"] - answer["temp_sp"]) < TEMP_STEP / 2}
    out["all"] = all(out.values())
    return out

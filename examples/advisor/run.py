"""Run the advisor live beside the demo's policy on the simulated heated tank, with a fault.

``python -m examples.advisor.run --duration 30 --fault-at 10`` (from the repository root);
``--fault level_sensor`` freezes the level reading at ``--fault-at`` instead (the plant goes on).

The plant (``sdk.demo.plant.Plant``) runs in real time in this process: every 20 ms cycle the
controller's ``source`` reads the PLC's measurements and setpoints, and its ``sink`` applies the
outputs to the plant for one period. The heating element loses power at ``--fault-at`` (it gives
``--capacity`` of its power from then on); the scenario's own leaks come and go as in the demo.
The PLC turns its advisor switch on at ``--advise-after`` and, while the advice is in force
(``advice.state`` 2), adopts ``advice.<setpoint>`` as its remote setpoint, computing its errors
from it, as a PLC with a local/remote setpoint switch does. Every answer is printed beside the
plant's true condition when its request went out (read back from the flight recording, which
is then replayed).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from runtime.control.recorder import RecordingReader
from sdk.service.config import DeployConfig, RecorderSection
from sdk.service.controller import Controller
from sdk.service.replay import replay
from sdk.demo.plant import Plant

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    """Run, print the answers and the replay's verdict; exit 0 when the replay is identical."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of real time")
    ap.add_argument("--seed", type=int, default=0, help="plant scenario seed")
    ap.add_argument("--fault", choices=("heater", "level_sensor"), default="heater",
                    help="the fault at --fault-at: the heater loses power, or the level reading sticks")
    ap.add_argument("--fault-at", type=float, default=10.0, help="when the fault starts (s)")
    ap.add_argument("--capacity", type=float, default=0.3, help="the heater's power after the fault (fraction)")
    ap.add_argument("--advise-after", type=float, default=2.0, help="when the PLC turns the switch on (s)")
    ap.add_argument("--out", default="r1edge-advisor", help="directory for the flight recording")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = DeployConfig.load(HERE / "deploy.toml", check_sources=False)
    out = Path(args.out)
    cfg.recorder = RecorderSection(path=out / "recording")
    plant = Plant(args.seed)
    period = cfg.loop.period_ms / 1e3
    ctrl = Controller(cfg, bridges=False)
    adv = ctrl.advisor

    heater_fault = args.fault == "heater"
    frozen: list[float] = []

    def truth(t: float) -> str:
        if not heater_fault and t >= args.fault_at:
            return "level_sensor"
        if plant.scenario.at(t)[2] > 0.0:
            return "leak"
        return "heater_fault" if t >= args.fault_at else "normal"

    def source(seq: int, t_ns: int) -> dict:
        m = plant.measure()
        if not heater_fault and plant.t >= args.fault_at:   # the level reading sticks
            frozen[:] = frozen or [m["level"]]
            m["level"], m["level_err"] = frozen[0], m["level_sp"] - frozen[0]
        pub = adv.published()
        if pub["advice.state"] == 2.0:                    # remote setpoints: the advice in force
            m["level_sp"], m["temp_sp"] = pub["advice.level_sp"], pub["advice.temp_sp"]
            m["level_err"], m["temp_err"] = m["level_sp"] - m["level"], m["temp_sp"] - m["temperature"]
        return {**{k: m[k] for k in ctrl.input_names}, "advisor_enable": float(plant.t >= args.advise_after)}

    def sink(stream: str, outputs: dict, status: str, seq: int, latency_us: float) -> None:
        heater = outputs["heater"] * (args.capacity if heater_fault and plant.t >= args.fault_at else 1.0)
        plant.step(period, outputs["valve"], heater)

    try:
        stats = ctrl.run(duration_s=args.duration, source=source, sink=sink)
    finally:
        ctrl.close()
    answers = []
    for rec in RecordingReader(out / "recording"):
        if rec.get("type") == "advice":                   # judged at the time the request went out
            t = rec["seq"] * period - rec["seconds"]
            answers.append({"t": round(t, 2), "truth": truth(t), "status": rec["status"],
                            "decision": rec["decision"], "seconds": rec["seconds"]})
    report = replay(out / "recording")
    judged = [a for a in answers if a["decision"] is not None]
    right = sum(a["decision"]["diagnosis"] == a["truth"] for a in judged)
    by_truth: dict[str, dict] = {}
    for a in answers:                                     # an answer without a decision counts as wrong
        entry = by_truth.setdefault(a["truth"], {"answers": 0, "right": 0, "said": {}})
        said = a["decision"]["diagnosis"] if a["decision"] is not None else a["status"]
        entry["answers"] += 1
        entry["right"] += int(said == a["truth"])
        entry["said"][said] = entry["said"].get(said, 0) + 1
    summary = {"cycles": stats["cycles"], "deadline_misses": stats["deadline_misses"],
               "failsafe_cycles": stats["failsafe_cycles"], "advisor": {k: stats["advisor"][k] for k in (
                   "requests", "good", "timeouts", "invalid", "budget_exhausted", "errors", "in_force_cycles")},
               "answers": answers, "right": sum(e["right"] for e in by_truth.values()), "by_truth": by_truth,
               "diagnosis_right": right, "diagnosis_judged": len(judged),
               "replay_identical": report["identical"], "replay": report.get("advisor")}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for a in answers:
            d = a["decision"] or {}
            print(f"t {a['t']:6.2f} s  truth {a['truth']:<13} {a['status']:<9} diagnosis {d.get('diagnosis', '-'):<13} "
                  f"level_sp {d.get('level_sp', '-')!s:<5} temp_sp {d.get('temp_sp', '-')!s:<5} ({a['seconds']:.2f} s)")
        print(f"{stats['cycles']} cycles, {stats['deadline_misses']} deadline misses, {stats['failsafe_cycles']} "
              f"fail-safe; advisor {summary['advisor']}; diagnosis right in {right} of {len(judged)} answers; "
              f"replay {'identical' if report['identical'] else 'DIFFERENT'} {report.get('advisor')}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

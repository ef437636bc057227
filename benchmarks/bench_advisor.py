"""What a busy advisor costs the fast loop: the advisor's generation in its own process (as
``[advisor]`` runs it) against the same generation in a thread of the controller's process, and
against no advisor, in alternating rounds of one controller run each.

The fast loop is the demo's policy at ``--period-ms`` with a deadline of ``--deadline-ms``, inputs
from a source; the advisor is a random language model (hidden ``--hidden``) asked again as soon as it
answered, with a long prompt, so it generates all the time. Per mode: deadline misses, late wake-ups
(over 1 ms after the tick), and latency and lateness p99/max, summed over the rounds.

    .venv/bin/python benchmarks/bench_advisor.py --rounds 3 --cycles 1000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.service.advisor import PromptTemplate  # noqa: E402
from sdk.service.controller import Controller  # noqa: E402
from sdk.tools.text import TextGenerator  # noqa: E402
from tests.test_advisor import PLANT, PROMPT, demo_deploy, save_wide_lm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--deadline-ms", type=float, default=4.0)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--nice", type=int, default=10, help="the advisor process's niceness")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    prompt = PROMPT + " " + " ".join(["level valve heater setpoint"] * 30)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm = tmp / "lm"
        lm.mkdir()
        save_wide_lm(lm, args.hidden)
        path = demo_deploy(tmp, lm, every_ms=args.period_ms, deadline_ms=args.period_ms, period_ms=args.period_ms,
                           deadline_loop_ms=args.deadline_ms, recorder=False, prompt=prompt)
        path.write_text(path.read_text() + f"nice = {args.nice}\n")      # [advisor] is the file's last table
        ctrl = Controller.from_config(path, bridges=False)
        adv = ctrl.advisor
        adv.deadline_s = 10.0
        gen = TextGenerator.load(lm, window=256)
        template = PromptTemplate(prompt)
        step = gen.engine
        t = []
        for _ in range(30):
            t0 = time.perf_counter()
            step.step_tokens(np.array([0]), np.array([5]))
            t.append(time.perf_counter() - t0)
        step_ms = float(np.median(t) * 1e3)
        totals = {m: {"cycles": 0, "deadline_misses": 0, "late_wakeups": 0, "latency_p99_us": [], "latency_max_us": [],
                      "lateness_p99_us": [], "answers": 0} for m in ("none", "process", "thread")}
        stop = threading.Event()
        answers = [0]

        def in_thread():
            context = {"stats": {"level": {"mean": 0.5}, "temperature": {"mean": 40.0}}, "plc": {"level_sp": 0.5},
                       "outputs": {"valve": 0.3, "heater": 0.2}, "status": "ok", "advice": None}
            while not stop.is_set():
                gen.generate(template.render(context), chat=True, max_new_tokens=64, max_think_tokens=8,
                             schema=adv.schema)
                answers[0] += 1

        def source(seq, t_ns):
            return {**PLANT, "advisor_enable": 1.0}

        for r in range(args.rounds):
            for mode in ("none", "process", "thread"):
                adv.every_ns = 0 if mode == "process" else 10 ** 15
                before = adv.stats()["requests"]
                th = None
                if mode == "thread":
                    stop.clear()
                    answers[0] = 0
                    th = threading.Thread(target=in_thread, daemon=True)
                    th.start()
                c0, m0 = ctrl.counters["cycles"], ctrl.counters["deadline_misses"]
                ctrl.loop.latency = type(ctrl.loop.latency)()
                ctrl.loop.lateness = type(ctrl.loop.lateness)()
                ctrl.run(duration_s=args.cycles * args.period_ms / 1e3, source=source)
                if th is not None:
                    stop.set()
                    th.join()
                adv.wait(30.0)
                adv.take_pending(0)
                tot = totals[mode]
                tot["cycles"] += ctrl.counters["cycles"] - c0
                tot["deadline_misses"] += ctrl.counters["deadline_misses"] - m0
                lat, late = ctrl.loop.latency, ctrl.loop.lateness
                edges = late._edges
                tot["late_wakeups"] += sum(c for e, c in zip(edges, late.counts) if e > 1000.0)
                tot["latency_p99_us"].append(lat.percentile(0.99))
                tot["latency_max_us"].append(lat.max_us)
                tot["lateness_p99_us"].append(late.percentile(0.99))
                tot["answers"] += answers[0] if mode == "thread" else adv.stats()["requests"] - before
                print(f"round {r} {mode:8s} cycles {ctrl.counters['cycles'] - c0} misses "
                      f"{ctrl.counters['deadline_misses'] - m0} latency p99 {lat.percentile(0.99):.0f} us "
                      f"max {lat.max_us:.0f} us lateness p99 {late.percentile(0.99):.0f} us", flush=True)
        ctrl.close()
    print(f"advisor model: hidden {args.hidden}, engine step {step_ms:.2f} ms, process nice {args.nice}; loop {args.period_ms:g} ms period, "
          f"{args.deadline_ms:g} ms deadline")
    for mode, tot in totals.items():
        print(f"{mode:8s} cycles {tot['cycles']}  deadline misses {tot['deadline_misses']}  wake-ups >1 ms late "
              f"{tot['late_wakeups']}  latency p99 {np.median(tot['latency_p99_us']):.0f} us (median of rounds)  "
              f"max {max(tot['latency_max_us']):.0f} us  lateness p99 {np.median(tot['lateness_p99_us']):.0f} us  "
              f"answers {tot['answers']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"step_ms": step_ms, **vars(args), "modes": totals}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

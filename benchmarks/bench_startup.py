"""Start time of the r1edge commands that need no model (``--help``, ``plan``, ``keys``,
``opcua-user``, ``modbus-cert``), each run in a fresh process: the median of N runs, with the
load average before and after. ``--tree DIR`` runs another checkout's code (its directory goes
first on PYTHONPATH), so two trees can be compared in one run, alternating.

Usage:

    .venv/bin/python benchmarks/bench_startup.py [--runs 5] [--tree .] [--tree ../base] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "plan": ["plan", "deepseek-r1", "--json"],
    "keys": ["keys", "{tmp}/keys{n}"],
    "opcua-user": ["opcua-user", "{tmp}/users{n}.toml", "operator", "--password-stdin"],
    "modbus-cert": ["modbus-cert", "{tmp}/mpki{n}", "--server", "localhost"],
}


def main() -> int:
    """Time each command in each tree, alternating trees run by run; print a table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command and tree (default: %(default)s)")
    ap.add_argument("--tree", action="append", default=None, help="checkout to run (default: this one)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args()
    trees = [str(Path(t).resolve()) for t in (args.tree or [Path(__file__).resolve().parents[1]])]
    r1edge = [sys.executable, "-c", "import sys; from sdk.cli import main; sys.exit(main())"]
    tmp = tempfile.mkdtemp()        # also the working directory: python -c puts it first on sys.path
    times = {t: {c: [] for c in COMMANDS} for t in trees}
    load = [os.getloadavg()]
    n = 0
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            for tree in trees:
                n += 1
                argv = [a.format(tmp=tmp, n=n) for a in cmd]
                if name == "modbus-cert" and subprocess.run([*r1edge, "modbus-cert", "--help"], capture_output=True, cwd=tmp,
                                                            env={**os.environ, "PYTHONPATH": tree}).returncode:
                    continue                                # an older tree without the command
                t0 = time.perf_counter()
                subprocess.run([*r1edge, *argv], input=b"a long enough password\n", stdout=subprocess.DEVNULL,
                               check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": tree})
                times[tree][name].append(time.perf_counter() - t0)
    load.append(os.getloadavg())
    report = {"runs": args.runs, "loadavg_before": load[0], "loadavg_after": load[1],
              "median_s": {t: {c: round(statistics.median(v), 3) for c, v in cs.items() if v} for t, cs in times.items()}}
    print(f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after; median of {args.runs} runs, seconds")
    print(f"{'command':12s}" + "".join(f"  {Path(t).name[-14:]:>14s}" for t in trees))
    for c in COMMANDS:
        print(f"{c:12s}" + "".join(f"  {report['median_s'][t].get(c, float('nan')):14.3f}" for t in trees))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side by side: ``r1edge bench`` of two checkouts, alternated for several rounds, medians.

A shared, noisy machine moves absolute figures from minute to minute; alternating the two
checkouts round after round and taking medians compares them under the same conditions.
Each run is a fresh process with ``PYTHONPATH`` and the working directory set to its checkout
(its own Numba cache), after one untimed warm-up run per checkout that compiles it.

    git worktree add --detach ../base <commit>
    python benchmarks/bench_ab.py --base ../base --new . examples/sensor_stream/model --batch 1,8,64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(tree: Path, package: Path, batch: str, steps: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-c", "import sys; from sdk.cli import main; sys.exit(main())", "bench",
               str(package), "--batch", batch, "--steps", str(steps), "--no-reference", "--json", f.name]
        subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--base", required=True, help="the older checkout")
    p.add_argument("--new", default=".", help="the newer checkout (default: this one)")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", dest="json_file")
    args = p.parse_args()
    trees = {"base": Path(args.base).resolve(), "new": Path(args.new).resolve()}
    package = Path(args.package).resolve()
    for tree in trees.values():
        run(tree, package, args.batch, 10)                      # compile (or load the cache)
    runs = {k: [] for k in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run(tree, package, args.batch, args.steps))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    out = {"package": str(package), "rounds": args.rounds, "steps": args.steps, "batches": {}}
    print(f"{'batch':>5} {'base p50':>10} {'new p50':>10} {'p50 ratio':>9} {'base tok/s':>11} {'new tok/s':>10} "
          f"{'tok/s ratio':>11}   (medians of {args.rounds} alternated rounds)")
    for b in runs["base"][0]["batches"]:
        med = {k: {m: float(np.median([x["batches"][b]["engine"][m] for x in runs[k]]))
                   for m in ("p50_us", "p99_us", "tokens_per_s")} for k in trees}
        entry = {**med, "p50_speedup": med["base"]["p50_us"] / med["new"]["p50_us"],
                 "throughput_ratio": med["new"]["tokens_per_s"] / med["base"]["tokens_per_s"]}
        out["batches"][b] = entry
        print(f"{b:>5} {med['base']['p50_us']:>8.0f}us {med['new']['p50_us']:>8.0f}us {entry['p50_speedup']:>8.2f}x "
              f"{med['base']['tokens_per_s']:>11.0f} {med['new']['tokens_per_s']:>10.0f} {entry['throughput_ratio']:>10.2f}x")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({"summary": out, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

"""Controller loop benchmark: timing of the periodic loop with a real package, memory under load.

    python benchmarks/bench_loop.py [--package PKG] [--seconds 60] [--rate-hz 1000] [--json FILE]
                                    [--reference-cycle]

Three parts, each printed as it finishes:

1. ``handoff``: the watchdog's thread hand-off. One engine step for one stream called
   directly, and the same step submitted to the inference thread and waited for; the
   difference is what the watchdog costs per cycle.
2. ``one``: one stream at ``--rate-hz`` (default 1 kHz; period = deadline) for ``--seconds``: wake-up
   lateness and tick-to-outputs latency p50/p99/p99.9/max, per-phase times, deadline
   misses, skipped ticks, fail-safe cycles, and which real-time settings were applied.
3. ``streams``: 64 streams batched at 100 Hz for ``--seconds``, with the flight recorder
   on: the same figures plus resident memory sampled every second after a warm-up, and
   its growth from the first sample to the last.

Each loop part's JSON has ``rate_hz``, ``cycles``, ``deadline_misses``, ``skipped_ticks``,
``failsafe_cycles``, ``latency_us``, ``phases_us`` (read/infer/write/record, p50/p99 among
others), ``engine_step_us`` (the same package's engine step for the part's batch, called
directly in the same process right after the loop ran: the model's own cost beside the
loop's), ``engine_step_paced_us`` (the same step called once per period, as the loop calls
it, which usually finds colder caches than back to back), the load average at its start and
end, and ``steal_ms``: CPU time a hypervisor took from this guest during the run
(``/proc/stat``), on all CPUs and on the loop's, since on a virtual machine its stalls show as
deadline misses that no code here can remove.

Inputs come from a Python source (deterministic sine waves inside each input's range); no
bridges, so the figures are the controller's own. ``--reference-cycle`` runs the cycle's
bookkeeping as its NumPy reference instead of the compiled kernels (the same code otherwise),
for a side-by-side measure of what compiling it saves. Real-time settings are requested
(``--no-realtime`` to run without); what the OS granted is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.control.loop import (InferenceWorker, LatencyHistogram, default_cpu, monotonic_ns,  # noqa: E402
                          set_compute_threads, set_thread_realtime)
from sdk.service.controller import Controller  # noqa: E402
from sdk.service.engines import build_engine  # noqa: E402
from sdk.tools.package import read_manifest  # noqa: E402

DEFAULT_PACKAGE = ROOT / "examples" / "factory_loop" / "model"


def deploy_text(package: Path, io: dict, *, period_ms: float, streams: int, window: int,
                realtime: bool, recorder: Path | None) -> str:
    """A deployment config for ``package`` whose limits never bind (the loop is measured,
    not the policy): inputs in [-1e6, 1e6], outputs in [-1e6, 1e6] without rate limit."""
    lines = [f'[model]\npath = "{package}"\nwindow = {window}\nstreams = {streams}',
             f"[loop]\nperiod_ms = {period_ms}\nrealtime = {'true' if realtime else 'false'}"]
    for name in io["inputs"]:
        lines.append(f'[[inputs]]\nname = "{name}"\nmin = -1e6\nmax = 1e6\nstale_ms = 1000')
    for name in io["outputs"]:
        lines.append(f'[[outputs]]\nname = "{name}"\nmin = -1e6\nmax = 1e6\nfailsafe = 0.0')
    if recorder is not None:
        lines.append(f'[recorder]\npath = "{recorder}"\nmax_bytes = 67108864\nkeep = 4')
    return "\n".join(lines) + "\n"


def make_source(names: list[str], streams: list[str], period_s: float, cycles: int = 1000):
    """Sine waves per input and stream, precomputed for ``cycles`` cycles and repeated, so
    that reading costs what the controller does with the values, not their generation."""
    k = np.arange(len(names))
    table = []
    for seq in range(cycles):
        t = seq * period_s
        table.append({s: dict(zip(names, (np.sin(2 * np.pi * (0.5 + 0.1 * k) * t + j) * 0.5 + 0.5).tolist()))
                      for j, s in enumerate(streams)})

    def source(seq: int, t_ns: int):
        return table[seq % cycles]
    return source


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_handoff(package: Path, io: dict, n: int = 20000, realtime: bool = True) -> dict:
    """Engine step for one stream called directly vs through the inference thread, both threads
    set up as the loop sets them (SCHED_FIFO 80/79 on one CPU, where permitted)."""
    engine = build_engine(package, capacity=1, window=32)
    set_compute_threads(1)                               # as the controller runs it (config default)
    slots = np.zeros(1, np.int64)
    feats = np.full((1, len(io["inputs"])), 0.5, np.float32)
    direct, handed = LatencyHistogram(), LatencyHistogram()
    worker = InferenceWorker()
    worker.run_sync(lambda: set_compute_threads(1))
    restores, applied = [], {}
    if realtime:
        cpus = [default_cpu()]
        applied, restore = set_thread_realtime(80, cpus)
        restores.append(restore)
        _, wrestore = worker.run_sync(lambda: set_thread_realtime(79, cpus))
        restores.append(lambda: worker.run_sync(wrestore))

    def job():
        return engine.step_sensor(slots, feats)

    def empty():
        return None

    noop = LatencyHistogram()
    try:
        for _ in range(2000):
            job()
        for i in range(n):
            if i % 50 == 0:
                time.sleep(0.003)          # stay under the kernel's RT throttling (95% per second)
            t0 = monotonic_ns()
            job()
            t1 = monotonic_ns()
            worker.submit(job)
            worker.wait(t1 + 10**9)
            t2 = monotonic_ns()
            worker.submit(empty)
            worker.wait(t2 + 10**9)
            t3 = monotonic_ns()
            direct.add_ns(t1 - t0)
            handed.add_ns(t2 - t1)
            noop.add_ns(t3 - t2)
    finally:
        for fn in reversed(restores):
            fn()
        worker.close()
    d, h, e = direct.summary(), handed.summary(), noop.summary()
    return {"samples": n, "realtime": applied, "direct_step_us": d, "via_thread_us": h, "empty_job_round_trip_us": e,
            "overhead_p50_us": h["p50"] - d["p50"], "overhead_mean_us": h["mean"] - d["mean"]}


def bench_loop(package: Path, io: dict, *, period_ms: float, streams: int, seconds: float,
               realtime: bool, record: bool, workdir: Path, sample_rss: bool, reference_cycle: bool = False) -> dict:
    """Run the controller's periodic loop for ``seconds`` and return its stats (+ RSS).
    ``reference_cycle``: the cycle's bookkeeping as the NumPy reference, not compiled."""
    rec = workdir / f"rec-{streams}x{period_ms}" if record else None
    deploy = workdir / f"deploy-{streams}x{period_ms}.toml"
    deploy.write_text(deploy_text(package, io, period_ms=period_ms, streams=streams, window=32,
                                  realtime=realtime, recorder=rec))
    names = [f"s{i}" for i in range(streams)] if streams > 1 else ["main"]
    inner = make_source(io["inputs"], names, period_ms / 1e3)
    samples: list[tuple[float, int]] = []
    per_second = max(1, int(round(1000 / period_ms)))
    warmup = 5 * per_second if seconds >= 20 else per_second

    def source(seq, t_ns):
        if sample_rss and seq >= warmup and (seq - warmup) % per_second == 0:
            samples.append((seq * period_ms / 1e3, rss_bytes()))
        return inner(seq, t_ns)

    with Controller.from_config(deploy) as ctrl:
        ctrl.cycle.compiled = not reference_cycle
        stats = ctrl.run(seconds, source=source)
    out = {k: stats[k] for k in ("cycles", "deadline_misses", "skipped_ticks", "failsafe_cycles",
                                 "latency_us", "lateness_us", "phases_us", "watchdog", "rt_applied",
                                 "gc_collections", "loop_cycle_errors", "read_errors", "write_errors",
                                 "record_errors", "recorder")}
    out["config"] = {"period_ms": period_ms, "streams": streams, "seconds": seconds, "realtime": realtime,
                     "record": record, "compiled_cycle": not reference_cycle}
    if samples:
        t, r = np.array(samples, dtype=np.float64).T
        slope = float(np.polyfit(t, r, 1)[0]) if len(t) > 2 else 0.0
        out["rss"] = {"warmup_s": warmup * period_ms / 1e3, "first_bytes": int(r[0]), "last_bytes": int(r[-1]),
                      "max_bytes": int(r.max()), "growth_bytes": int(r[-1] - r[0]),
                      "slope_bytes_per_s": slope, "samples": len(r)}
    return out


def engine_step_us(package: Path, io: dict, streams: int, *, period_ns: int, realtime: bool,
                   steps: int = 3000, paced_s: float = 2.0) -> tuple[dict, dict]:
    """p50/p99 (and the rest) of one engine step for ``streams`` streams, called directly: back
    to back (``steps`` times), and paced as the loop calls it, once per ``period_ns`` after
    sleeping until shortly before the tick and spinning to it (200 us, at most a quarter of the
    period; for ``paced_s`` seconds, at least 100 steps; SCHED_FIFO and the loop's CPU with
    ``realtime``, where permitted). A step that waited for its tick usually finds colder caches
    than one called back to back."""
    engine = build_engine(package, capacity=streams, window=32)
    set_compute_threads(1)
    slots = np.arange(streams, dtype=np.int64)
    feats = np.full((streams, len(io["inputs"])), 0.5, np.float32)
    hist, paced = LatencyHistogram(), LatencyHistogram()
    for _ in range(200):
        engine.step_sensor(slots, feats)
    for _ in range(steps):
        t0 = monotonic_ns()
        engine.step_sensor(slots, feats)
        hist.add_ns(monotonic_ns() - t0)
    restore, cpu = None, default_cpu()
    if realtime:
        _, restore = set_thread_realtime(80, [cpu] if cpu is not None else None)
    spin = min(200_000, period_ns // 4)
    try:
        tick = monotonic_ns() + period_ns
        for _ in range(max(100, int(paced_s * 1e9 / period_ns))):
            if tick - monotonic_ns() > spin:
                time.sleep((tick - monotonic_ns() - spin) / 1e9)
            while monotonic_ns() < tick:
                pass
            t0 = monotonic_ns()
            engine.step_sensor(slots, feats)
            paced.add_ns(monotonic_ns() - t0)
            tick += period_ns
    finally:
        if restore is not None:
            restore()
    return hist.summary(), paced.summary()


def steal_ticks() -> dict[str, int]:
    """Each CPU's steal time so far (``/proc/stat``, in clock ticks): time a hypervisor ran
    something else while this guest had work on that CPU. Empty where there is no such file."""
    try:
        with open("/proc/stat") as f:
            return {w[0]: int(w[8]) for w in (line.split() for line in f) if w[0].startswith("cpu") and len(w) > 8}
    except OSError:
        return {}


def loop_part(package: Path, io: dict, *, rate_hz: float, streams: int, seconds: float, **common) -> dict:
    """One loop part as the JSON reports it: the loop's figures, then the engine step alone.
    ``steal_ms``: CPU time the hypervisor took during the loop run, all CPUs and the loop's."""
    load0, steal0 = os.getloadavg(), steal_ticks()
    r = bench_loop(package, io, period_ms=1000.0 / rate_hz, streams=streams, seconds=seconds, sample_rss=True,
                   **common)
    steal1, ms = steal_ticks(), 1000 / os.sysconf("SC_CLK_TCK")
    cpu = default_cpu()
    loop_cpu = f"cpu{cpu}" if cpu is not None else "-"
    r["steal_ms"] = {"all": (steal1.get("cpu", 0) - steal0.get("cpu", 0)) * ms,
                     "loop_cpu": (steal1.get(loop_cpu, 0) - steal0.get(loop_cpu, 0)) * ms}
    r["rate_hz"] = rate_hz
    r["engine_step_us"], r["engine_step_paced_us"] = engine_step_us(
        package, io, streams, period_ns=int(1e9 / rate_hz), realtime=common["realtime"])
    r["load_avg"] = {"start": load0, "end": os.getloadavg()}
    return r


def _row(h: dict) -> str:
    return f"p50 {h['p50']:8.1f}  p99 {h['p99']:8.1f}  p99.9 {h['p999']:8.1f}  max {h['max']:9.1f} us"


def print_loop(title: str, r: dict) -> None:
    """Human-readable summary of one loop run."""
    print(f"\n== {title}")
    print(f"cycles {r['cycles']}  deadline misses {r['deadline_misses']}  skipped ticks {r['skipped_ticks']}  "
          f"fail-safe cycles {r['failsafe_cycles']}  watchdog timeouts {r['watchdog']['timeouts']}")
    print("lateness   " + _row(r["lateness_us"]))
    print("latency    " + _row(r["latency_us"]))
    for k, h in r["phases_us"].items():
        print(f"{k:<10} " + _row(h))
    if "engine_step_us" in r:
        e, lat = r["engine_step_us"], r["latency_us"]
        print("engine     " + _row(e) + f"   (latency / engine step: p50 {lat['p50'] / e['p50']:.1f}x, "
              f"p99 {lat['p99'] / e['p99']:.1f}x)")
    if "engine_step_paced_us" in r:
        e, lat = r["engine_step_paced_us"], r["latency_us"]
        print("paced      " + _row(e) + f"   (the step once per period, as the loop calls it: latency / it: "
              f"p50 {lat['p50'] / e['p50']:.1f}x, p99 {lat['p99'] / e['p99']:.1f}x)")
    if "steal_ms" in r:
        st = r["steal_ms"]
        print(f"steal      {st['all']:.0f} ms over all CPUs, {st['loop_cpu']:.0f} ms on the loop's "
              "(time the hypervisor ran something else)")
    print("real-time  " + ", ".join(f"{k}={'yes' if v.get('applied') else 'no'}"
                                    for k, v in r["rt_applied"].items() if "applied" in v))
    if "rss" in r:
        m = r["rss"]
        print(f"RSS        {m['first_bytes'] / 2**20:.1f} MiB after {m['warmup_s']:.0f} s warm-up -> "
              f"{m['last_bytes'] / 2**20:.1f} MiB at the end: growth {m['growth_bytes'] / 2**10:+.0f} KiB, "
              f"slope {m['slope_bytes_per_s'] / 2**10:+.2f} KiB/s, max {m['max_bytes'] / 2**20:.1f} MiB")
    if r.get("recorder"):
        print(f"recorder   {r['recorder']['records']} records, {r['recorder']['bytes'] / 2**20:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE,
                    help="sensor-mode package (default: the factory loop's bundled model)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each loop run (default 60)")
    ap.add_argument("--parts", default="handoff,one,streams",
                    help="comma-separated parts to run: handoff, one (also spelled 1khz), streams")
    ap.add_argument("--rate-hz", type=float, default=1000.0, help="rate of the one-stream part (default 1000)")
    ap.add_argument("--no-realtime", action="store_true", help="do not request SCHED_FIFO/affinity/mlockall")
    ap.add_argument("--no-record", action="store_true", help="run without the flight recorder")
    ap.add_argument("--reference-cycle", action="store_true",
                    help="run the cycle's bookkeeping as its NumPy reference (ControlCycle compiled=False)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    args.package = args.package.resolve()
    if not (args.package / "manifest.json").is_file():
        print(f"{args.package}: no package here (build the bundled one with "
              "`python -m examples.factory_loop.train_policy`, or pass --package)", file=sys.stderr)
        return 2
    io = read_manifest(args.package).get("io")
    if not io:
        print(f"{args.package}: not a sensor-mode package (no I/O signature)", file=sys.stderr)
        return 2
    parts = {"one" if p.strip() == "1khz" else p.strip() for p in args.parts.split(",")}
    results = {"package": str(args.package), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    print(f"package {args.package}: {len(io['inputs'])} inputs -> {len(io['outputs'])} outputs; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="r1edge-bench-") as tmp:
        work = Path(tmp)
        if "handoff" in parts:
            h = bench_handoff(args.package, io, realtime=not args.no_realtime)
            results["handoff"] = h
            print("\n== thread hand-off (one stream, one engine step)")
            print("direct step   " + _row(h["direct_step_us"]))
            print("via thread    " + _row(h["via_thread_us"]))
            print("empty job     " + _row(h["empty_job_round_trip_us"]))
            print(f"overhead      p50 {h['overhead_p50_us']:.1f} us, mean {h['overhead_mean_us']:.1f} us")
        common = dict(realtime=not args.no_realtime, record=not args.no_record, workdir=work,
                      reference_cycle=args.reference_cycle)
        if "one" in parts:
            t0 = time.monotonic()
            r = loop_part(args.package, io, rate_hz=args.rate_hz, streams=1, seconds=args.seconds, **common)
            results["one"] = r
            print_loop(f"1 stream at {args.rate_hz:g} Hz for {time.monotonic() - t0:.0f} s", r)
        if "streams" in parts:
            t0 = time.monotonic()
            r = loop_part(args.package, io, rate_hz=100.0, streams=64, seconds=args.seconds, **common)
            results["streams"] = r
            print_loop(f"64 streams at 100 Hz for {time.monotonic() - t0:.0f} s", r)
    results["load_avg_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

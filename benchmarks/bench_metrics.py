"""Does scraping /metrics delay the control loop? Cycle latency at 1 kHz with and without a
Prometheus scrape every 100 ms, measured side by side in one run.

    python benchmarks/bench_metrics.py [--seconds 60] [--segment 3] [--scrape-ms 100] [--no-realtime] [--json FILE]

One controller runs the bundled factory policy at 1 kHz (period = deadline = 1 ms) from a
Python source for ``--seconds``, with ``[metrics]`` on a free loopback port. The run is cut
into segments of ``--segment`` seconds that alternate between no scraping and an HTTP client
scraping ``/metrics`` every ``--scrape-ms`` (so slow drifts of the machine hit both alike).
For each condition it prints the tick-to-outputs latency p50/p99/p99.9 (upper bin edges of
the controller's own histogram, counted over that condition's segments only), deadline
misses, skipped ticks, and for the scraping condition the scrapes made and their duration
as the client saw it. Real-time settings are requested unless ``--no-realtime``.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.service.controller import Controller  # noqa: E402
from tests.ops_helpers import GOOD, factory_deploy  # noqa: E402


SCRAPER = """
import signal, sys, time, urllib.request
from pathlib import Path
url, flag, every = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    while True:
        if flag.exists():
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as resp:
                resp.read()
            print((time.perf_counter() - t0) * 1e6, flush=True)
        time.sleep(every)
finally:
    sys.stdout.flush()
"""


def percentile(edges: list[float], counts: list[int], q: float) -> float:
    """Upper bin edge (us) holding the ``q``-quantile of binned samples."""
    n = sum(counts)
    rank, acc = max(1, math.ceil(q * n)), 0
    for edge, c in zip(edges, counts):
        acc += c
        if acc >= rank:
            return edge
    return edges[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--segment", type=float, default=3.0)
    ap.add_argument("--scrape-ms", type=float, default=100.0)
    ap.add_argument("--no-realtime", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    deploy = factory_deploy(tmp, period_ms=1.0, extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    if not args.no_realtime:
        deploy.write_text(deploy.read_text().replace("realtime = false", "realtime = true"))
    frame = dict(GOOD)
    with Controller.from_config(deploy) as ctrl:
        url = f"http://127.0.0.1:{ctrl.metrics.port}/metrics"
        flag = tmp / "scrape"
        # The scraper is another process, as Prometheus is: only the server's work is measured here.
        scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, str(flag), str(args.scrape_ms / 1e3)],
                                   stdout=subprocess.PIPE, text=True)

        hist = ctrl.hist["latency"]
        edges = list(hist._edges)
        sums = {c: {"counts": [0] * len(hist.counts), "misses": 0, "skipped": 0, "seconds": 0.0}
                for c in ("without", "with")}
        runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": args.seconds + 5.0,
                                                           "source": lambda seq, t: frame})
        runner.start()
        time.sleep(3.0)                                        # compile, warm up, gc.freeze
        segments = max(2, int(args.seconds // args.segment) // 2 * 2)
        for i in range(segments):
            cond = "with" if i % 2 else "without"
            flag.touch() if cond == "with" else flag.unlink(missing_ok=True)
            c0, m0, s0 = list(hist.counts), ctrl.counters["deadline_misses"], ctrl.loop.skipped_ticks
            time.sleep(args.segment)
            c1, m1, s1 = list(hist.counts), ctrl.counters["deadline_misses"], ctrl.loop.skipped_ticks
            acc = sums[cond]
            acc["counts"] = [a + y - x for a, x, y in zip(acc["counts"], c0, c1)]
            acc["misses"] += m1 - m0
            acc["skipped"] += s1 - s0
            acc["seconds"] += args.segment
        flag.unlink(missing_ok=True)
        scraper.terminate()
        scrape_us = sorted(float(x) for x in scraper.communicate()[0].split())
        ctrl.stop()
        runner.join()
        rt = ctrl.stats()["rt_applied"]
    report = {"period_ms": 1.0, "scrape_ms": args.scrape_ms, "segment_s": args.segment,
              "realtime": {k: v.get("applied") for k, v in rt.items() if isinstance(v, dict)}}
    for cond, acc in sums.items():
        counts = acc["counts"]
        report[cond] = {"cycles": sum(counts), "seconds": acc["seconds"],
                        "p50_us": percentile(edges, counts, 0.5), "p99_us": percentile(edges, counts, 0.99),
                        "p999_us": percentile(edges, counts, 0.999),
                        "deadline_misses": acc["misses"], "skipped_ticks": acc["skipped"]}
    report["with"]["scrapes"] = len(scrape_us)
    report["with"]["scrape_us_p50"] = scrape_us[len(scrape_us) // 2] if scrape_us else None
    report["p99_ratio"] = report["with"]["p99_us"] / report["without"]["p99_us"]
    for cond in ("without", "with"):
        r = report[cond]
        extra = f"  scrapes {r['scrapes']} (p50 {r['scrape_us_p50']:.0f} us each)" if cond == "with" else ""
        print(f"{cond + ' scraping':<18} cycles {r['cycles']:6d}  latency us p50 {r['p50_us']:7.1f}  "
              f"p99 {r['p99_us']:7.1f}  p99.9 {r['p999_us']:7.1f}  deadline misses {r['deadline_misses']}  "
              f"skipped ticks {r['skipped_ticks']}{extra}")
    print(f"p99 with / without scraping: {report['p99_ratio']:.3f}; real-time applied: {report['realtime']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

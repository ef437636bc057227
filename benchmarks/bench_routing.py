"""Routing timings on the CPU: the rule's two implementations side by side.

The Numba kernel (``Router.route_logits``, dispatch plan included) against the torch ops
(``route_torch``), and the batch-invariant router logits against ``x @ W.T``, at B = 1, 8,
64 on real R1 routing sizes (E=256, 8 groups keep 4, k=8, H=7168), DeepSeek-V2's (E=160,
softmax, group-limited, k=6, H=5120) and a tiny config.

Prints p50 microseconds per call. Usage:

    .venv/bin/python benchmarks/bench_routing.py [--iters N] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from runtime.model.routing import Router, RoutingRule, route_torch, router_logits


def timeit(fn, iters: int) -> tuple[float, float]:
    """(p50, p99) of ``fn()`` in microseconds after a warm-up."""
    for _ in range(max(3, iters // 10)):
        fn()
    ts = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        ts[i] = time.perf_counter_ns() - t0
    return float(np.percentile(ts, 50) / 1e3), float(np.percentile(ts, 99) / 1e3)


ROUTING_CONFIGS = [
    # name, rule, H
    ("R1 (E=256 g8/4 k8 H7168)", RoutingRule(False, False, True, 256, 8, 4, 8, True, 2.5), 7168),
    ("V2 (E=160 g8/3 k6 H5120)", RoutingRule(True, True, False, 160, 8, 3, 6, False, 16.0), 5120),
    ("tiny (E=16 g4/2 k4 H64)", RoutingRule(False, False, True, 16, 4, 2, 4, True, 2.5), 64),
]


def bench_routing(iters: int) -> None:
    print("routing from logits: numba Router.route_logits (dispatch plan included) vs route_torch")
    print(f"{'config':28s} {'B':>3s} {'numba p50':>10s} {'torch p50':>10s} {'ratio':>7s}"
          f" {'logits nb':>10s} {'x@W.T':>10s} {'ratio':>7s}")  # fmt: skip
    rng = np.random.default_rng(0)
    for name, rule, H in ROUTING_CONFIGS:
        E = rule.n_experts
        w = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32)
        bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
        router = Router(w, bias, rule, 64)
        wt, bt = torch.from_numpy(w), torch.from_numpy(bias)
        for B in (1, 8, 64):
            x = rng.standard_normal((B, H)).astype(np.float32)
            logits = (x @ w.T).astype(np.float32)
            lt, xt = torch.from_numpy(logits), torch.from_numpy(x)
            nb, _ = timeit(lambda: router.route_logits(logits), iters)
            tt, _ = timeit(lambda: route_torch(lt, bt, rule), iters)
            out = router.logits[:B]
            ln, _ = timeit(lambda: router_logits(x, router.weight_t, out), max(20, iters // 10))
            lt_, _ = timeit(lambda: xt @ wt.T, max(20, iters // 10))
            print(f"{name:28s} {B:3d} {nb:10.1f} {tt:10.1f} {tt / nb:6.1f}x {ln:10.1f} {lt_:10.1f} {lt_ / ln:6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_routing(args.iters)


if __name__ == "__main__":
    main()

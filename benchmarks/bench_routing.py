"""Routing and expert-dispatch timings on the CPU.

Routing: the Numba kernel (``Router.route_logits``) against the same routing in torch ops
(``route_torch``, dispatch plan included), and the batch-invariant router logits against
``x @ W.T``, at B = 1, 8, 64 on real R1 routing sizes (E=256, 8 groups keep 4, k=8,
H=7168) and a tiny config.

Experts (``--experts``): one int8 MoE expert layer over a dispatch plan, comparing the
torch backend (one ``torch._int_mm`` per active expert and GEMM, torch elementwise ops),
the Numba grouped kernel alone, and Numba with ``_int_mm`` for experts holding >= 2 rows;
then the shared expert fused into that layer against a separate int8 MLP.

Prints p50 microseconds (and p99) per call. Usage:

    .venv/bin/python benchmarks/bench_routing.py [--experts] [--iters N] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from runtime.quant import Int8Linear, RoutedExperts, silu_mul
from runtime.routing import Router, route_torch, router_logits


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
    # name, E, n_group, topk_group, k, H
    ("R1 (E=256 g8/4 k8 H7168)", 256, 8, 4, 8, 7168),
    ("tiny (E=16 g4/2 k4 H64)", 16, 4, 2, 4, 64),
]


def bench_routing(iters: int) -> None:
    print("routing from logits: numba Router.route_logits vs route_torch (torch ops, plan included)")
    print(f"{'config':28s} {'B':>3s} {'numba p50':>10s} {'torch p50':>10s} {'ratio':>7s}"
          f" {'logits nb':>10s} {'x@W.T':>10s} {'ratio':>7s}")  # fmt: skip
    rng = np.random.default_rng(0)
    for name, E, G, KG, K, H in ROUTING_CONFIGS:
        w = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32)
        bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
        router = Router(w, bias, G, KG, K, True, 2.5, 64)
        wt, bt = torch.from_numpy(w), torch.from_numpy(bias)
        for B in (1, 8, 64):
            x = rng.standard_normal((B, H)).astype(np.float32)
            logits = (x @ w.T).astype(np.float32)
            lt, xt = torch.from_numpy(logits), torch.from_numpy(x)
            nb, _ = timeit(lambda: router.route_logits(logits), iters)
            tt, _ = timeit(lambda: route_torch(lt, bt, G, KG, K, True, 2.5), iters)
            out = router.logits[:B]
            ln, _ = timeit(lambda: router_logits(x, router.weight_t, out), max(20, iters // 10))
            lt_, _ = timeit(lambda: xt @ wt.T, max(20, iters // 10))
            print(f"{name:28s} {B:3d} {nb:10.1f} {tt:10.1f} {tt / nb:6.1f}x {ln:10.1f} {lt_:10.1f} {lt_ / ln:6.2f}x")


EXPERT_CONFIGS = [
    # H, I, E, k
    (64, 32, 8, 2),
    (64, 32, 64, 8),
    (1024, 512, 64, 8),
]


def bench_experts(iters: int) -> None:
    print("\nint8 routed experts over a dispatch plan (p50 / p99 us per layer call)")
    print(f"{'H':>5s} {'I':>4s} {'E':>3s} {'k':>2s} {'T':>3s} {'torch loop':>16s} {'numba kernel':>16s}"
          f" {'numba+_int_mm':>16s}")  # fmt: skip
    rng = np.random.default_rng(1)
    for H, I, E, K in EXPERT_CONFIGS:
        gate = torch.randn(E, I, H) / H**0.5
        up = torch.randn(E, I, H) / H**0.5
        down = torch.randn(E, H, I) / I**0.5
        G = 4 if E >= 8 else 1
        router = Router(torch.randn(E, H) / H**0.5, torch.zeros(E), G, min(2, G), K, True, 2.5, 64)
        variants = {
            "torch": RoutedExperts.from_float(gate, up, down, backend="torch"),
            "numba": RoutedExperts.from_float(gate, up, down, backend="numba", min_mm_rows=1 << 30),
            "hybrid": RoutedExperts.from_float(gate, up, down, backend="numba", min_mm_rows=2),
        }
        for m in variants.values():
            m.reserve(64, K)
        n_iter = iters if H <= 256 else max(20, iters // 10)
        for T in (1, 64):
            x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
            plan = router(x.numpy())
            res = {}
            ref = None
            for name, m in variants.items():
                y = m(x, plan).clone()
                if name != "torch":
                    ref = y if ref is None else ref
                    assert torch.equal(y, ref), "numba paths must agree bitwise"
                res[name] = timeit(lambda: m(x, plan), n_iter)
            cells = " ".join(f"{p50:8.1f}/{p99:7.1f}" for p50, p99 in res.values())
            print(f"{H:5d} {I:4d} {E:3d} {K:2d} {T:3d} {cells}   (active experts: {plan.n_active})")


def bench_shared(iters: int) -> None:
    print("\nshared expert (Is = I): fused into RoutedExperts vs routed + a separate int8 MLP"
          " (Int8Linear gate, up, down; silu_mul)")  # fmt: skip
    print(f"{'H':>5s} {'I':>4s} {'E':>3s} {'k':>2s} {'T':>3s} {'fused p50':>10s} {'separate p50':>13s}")
    rng = np.random.default_rng(2)
    for H, I, E, K in EXPERT_CONFIGS:
        gate, up, down = torch.randn(E, I, H) / H**0.5, torch.randn(E, I, H) / H**0.5, torch.randn(E, H, I) / I**0.5
        sg, su, sd = torch.randn(I, H) / H**0.5, torch.randn(I, H) / H**0.5, torch.randn(H, I) / I**0.5
        router = Router(torch.randn(E, H) / H**0.5, torch.zeros(E), 4, 2, K, True, 2.5, 64)
        fused = RoutedExperts.from_float(gate, up, down, shared=(sg, su, sd))
        routed = RoutedExperts.from_float(gate, up, down)
        fused.reserve(64, K)
        routed.reserve(64, K)
        lg, lu, ld = Int8Linear.from_float(sg), Int8Linear.from_float(su), Int8Linear.from_float(sd)
        n_iter = iters if H <= 256 else max(20, iters // 10)
        for T in (1, 64):
            x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
            plan = router(x.numpy())
            f, _ = timeit(lambda: fused(x, plan), n_iter)
            sep, _ = timeit(lambda: routed(x, plan) + ld(silu_mul(lg(x), lu(x))), n_iter)
            print(f"{H:5d} {I:4d} {E:3d} {K:2d} {T:3d} {f:10.1f} {sep:13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", action="store_true", help="also time the int8 expert layer")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_routing(args.iters)
    if args.experts:
        bench_experts(max(50, args.iters // 10))
        bench_shared(max(50, args.iters // 10))


if __name__ == "__main__":
    main()

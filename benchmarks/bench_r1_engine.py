"""Load a pruned R1-shaped package into an engine, step it on the CPU, and compare what the
process holds with ``r1edge plan``; time the steps against this machine's memory bandwidth.

    python benchmarks/bench_r1_engine.py /work/r1shaped-22 --engine cpu
    python benchmarks/bench_r1_engine.py /work/r1shaped-22 --engine device

In a fresh process: the engine kernels are warmed up on the bundled demo package, the
resident memory is read (``VmRSS``), the package is loaded (``sdk.load_model``), the engine is
built, the model is dropped (the engine keeps what it uses), a few steps run at each batch
size, and the resident memory is read again. The growth is compared with the plan's total
for that engine (``sdk.tools.plan.engine_bytes``; the device engine's device and host parts
together, since on the CPU both are host memory).

Step timing: ``--steps`` steps per batch size after warm-up, p50. Weight bytes read per step
are counted from the plan's parts: everything but the routed experts once per step, plus
the routed experts the step's tokens reach (``min(batch x top-k, kept)`` per MoE layer,
uniform routing), plus the embedding rows. The rate is set against the machine's memory
read bandwidth measured here (a multi-threaded sum over a 1 GB array). The extrapolation to
the full pruned R1 (61 layers, the same kept count) scales the bytes per token and divides
by the same effective rate, and by the HBM bandwidth of an A100 80GB (2.0 TB/s) and an H200
(4.8 TB/s) for what a bandwidth-bound GPU step would take.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO = Path(__file__).resolve().parents[1] / "sdk" / "demo" / "model"
HBM = {"A100 80GB (2.0 TB/s)": 2.0e12, "H200 (4.8 TB/s)": 4.8e12}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def read_bandwidth(gb: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a multi-threaded sum over a ``gb`` GB float32 array (best of ``repeats``)."""
    import torch

    a = torch.ones(int(gb * 1e9) // 4)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t))
    return best


def step_bytes(cfg, keep: int, engine: str, batch: int, parts: dict) -> float:
    """Weight bytes one step of ``batch`` tokens reads (see the module docstring)."""
    routed = parts["routed_experts"]
    per_expert = routed / max(cfg.n_moe_layers * keep, 1)
    active = min(batch * cfg.num_experts_per_tok, keep)
    fixed = sum(v for k, v in parts.items() if k in ("lm_head", "attention", "attention_absorbed", "dense_mlp",
                                                    "shared_experts", "router", "norms"))
    embed_row = parts["embeddings"] / cfg.vocab_size
    return fixed + cfg.n_moe_layers * active * per_expert + batch * embed_row


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", type=Path)
    p.add_argument("--engine", choices=("cpu", "device"), default="cpu")
    p.add_argument("--streams", type=int, default=8, help="engine slots (default: %(default)s)")
    p.add_argument("--window", type=int, default=256, help="ring buffer per slot (default: %(default)s)")
    p.add_argument("--batch", default="1,8", help="batch sizes to time (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="compute threads (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)

    import torch

    import sdk
    from runtime.cuda.engine import DeviceEngine
    from runtime.cpu.engine import Engine
    from sdk.tools.bench import time_steps
    from sdk.tools.plan import engine_bytes

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]

    def build(model):
        if args.engine == "cpu":
            return Engine(model, capacity=args.streams, window=args.window)
        return DeviceEngine(model, capacity=args.streams, window=args.window, device="cpu")

    warm = build(sdk.load_model(DEMO))          # compile (or load) the kernels before measuring
    for b in batches:
        warm.step_tokens(np.arange(b) % args.streams, np.zeros(b, np.int64))
    del warm
    gc.collect()
    bandwidth = read_bandwidth()
    gc.collect()
    base = _rss()
    t0 = time.perf_counter()
    model = sdk.load_model(args.package)
    cfg, keep = model.config, model.config.n_routed_experts
    t_load = time.perf_counter() - t0
    engine = build(model)
    t_build = time.perf_counter() - t0 - t_load
    peak_with_model = _rss()
    del model
    gc.collect()
    timing = {b: float(np.median(time_steps(engine, b, args.steps, warmup=3))) for b in batches}
    held = _rss() - base
    planned = engine_bytes(cfg, keep, engine=args.engine, streams=args.streams, window=args.window)
    parts = planned["device" if args.engine == "device" else "host"]
    plan_total = parts["total"] + (planned["host"]["total"] if args.engine == "device" else 0)

    full = dataclasses.replace(cfg, num_hidden_layers=61, first_k_dense_replace=3)
    full_parts = engine_bytes(full, keep, engine=args.engine, streams=args.streams, window=args.window)
    full_parts = full_parts["device" if args.engine == "device" else "host"]
    report = {"engine": args.engine, "package": str(args.package), "streams": args.streams, "window": args.window,
              "threads": args.threads, "layers": cfg.num_hidden_layers, "kept_experts": keep,
              "load_s": t_load, "build_s": t_build, "rss_growth_bytes": held, "plan_bytes": plan_total,
              "rss_over_plan": held / plan_total, "rss_with_model_bytes": peak_with_model - base,
              "plan_parts": parts, "read_bandwidth_bytes_per_s": bandwidth, "batches": {}}
    print(f"{args.engine} engine, {args.streams} slots x {args.window} window, {args.threads} threads; package "
          f"{args.package} ({cfg.num_hidden_layers} layers, {keep} experts kept)")
    print(f"loaded in {t_load:.1f} s, engine built in {t_build:.1f} s; resident while the model was alive "
          f"{(peak_with_model - base) / 1e9:.2f} GB")
    print(f"resident growth after stepping {held / 1e9:.3f} GB; plan {plan_total / 1e9:.3f} GB "
          f"(measured/plan {held / plan_total:.3f})")
    for k, v in parts.items():
        if k != "total":
            print(f"    {k:<20}{v / 1e9:9.3f} GB")
    if args.engine == "device":
        print(f"    {'host buffers':<20}{planned['host']['total'] / 1e9:9.3f} GB")
    print(f"memory read bandwidth here: {bandwidth / 1e9:.1f} GB/s")
    for b, t in timing.items():
        nbytes = step_bytes(cfg, keep, args.engine, b, parts)
        rate = nbytes / t
        per_layer_us = t / b / cfg.num_hidden_layers * 1e6
        full_bytes = step_bytes(full, keep, args.engine, b, full_parts) / b
        full_cpu = full_bytes / rate if rate else None
        row = {"step_s": t, "us_per_token_per_layer": per_layer_us, "weight_bytes_per_step": nbytes,
               "weight_bytes_per_token": nbytes / b, "bytes_per_s": rate, "fraction_of_bandwidth": rate / bandwidth,
               "full_r1_bytes_per_token": full_bytes, "full_r1_cpu_s_per_token": full_cpu,
               "full_r1_gpu_s_per_token": {g: full_bytes / bw for g, bw in HBM.items()}}
        report["batches"][b] = row
        print(f"batch {b}: step p50 {t * 1e3:.1f} ms = {per_layer_us:.0f} us per token per layer; "
              f"{nbytes / 1e9:.2f} GB of weights per step ({nbytes / b / 1e9:.3f} GB per token) at "
              f"{rate / 1e9:.2f} GB/s = {rate / bandwidth:.0%} of the measured bandwidth")
        print(f"  full pruned R1 (61 layers, {keep} experts): {full_bytes / 1e9:.2f} GB of weights per token -> "
              f"{full_cpu:.2f} s per token here at the same rate; bandwidth-bound "
              + ", ".join(f"{g} {full_bytes / bw * 1e3:.1f} ms" for g, bw in HBM.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

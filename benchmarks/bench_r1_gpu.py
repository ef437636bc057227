"""The pruned R1-shaped package through ``DeviceEngine`` on a GPU: planned against measured device
memory, and the step time against the device's bandwidth. Needs a CUDA build of torch.

    python benchmarks/bench_r1_gpu.py /work/r1shaped-22 --streams 8 --window 256

For the resident engine (CUDA graphs, Triton grouped experts when available) and then the
streaming expert store (``--slots``, default half the experts): the model is loaded on the CPU,
the engine built on the GPU, the model dropped, and ``torch.cuda.max_memory_allocated()`` after
warm-up and the timed steps is set beside ``sdk.tools.plan.engine_bytes`` (device part; the plan's
runtime reserve is for what torch does not allocate: CUDA context, cuBLAS workspace). Step p50
over ``--steps`` graph replays per batch size, and the weight bytes a step reads over that time
against the device's bandwidth measured with a device-to-device copy.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", type=Path)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--slots", type=int, default=None, help="streaming store slots (default: half the experts)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import sdk
    from runtime.cuda.engine import DeviceEngine
    from sdk.tools.bench import time_steps
    from sdk.tools.plan import engine_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_r1_engine import step_bytes

    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    a = torch.empty(int(2e9) // 4, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bandwidth = 2 * 10 * a.numel() * 4 / (time.perf_counter() - t)
    del a, b
    batches = [int(x) for x in args.batch.split(",")]
    report = {"device": torch.cuda.get_device_name(dev), "copy_bandwidth_bytes_per_s": bandwidth, "runs": {}}
    print(f"{report['device']}: device copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for mode in ("resident", "streaming"):
        model = sdk.load_model(args.package, mmap=mode == "streaming")
        cfg = model.config
        slots = args.slots or max(cfg.num_experts_per_tok, cfg.n_routed_experts * cfg.n_moe_layers // 2)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        engine = DeviceEngine(model, capacity=args.streams, window=args.window, device=dev,
                              expert_cache_slots=slots if mode == "streaming" else None)
        del model
        gc.collect()
        # a step returns its outputs on the host, so each timed step includes the GPU's work
        times = {bsz: float(np.median(time_steps(engine, bsz, args.steps, warmup=3))) for bsz in batches}
        peak = torch.cuda.max_memory_allocated(dev) - start
        plan = engine_bytes(cfg, cfg.n_routed_experts, engine="device", streams=args.streams, window=args.window,
                            expert_cache_slots=slots if mode == "streaming" else None)["device"]
        run = {"peak_allocated_bytes": peak, "plan_bytes": plan["total"], "measured_over_plan": peak / plan["total"],
               "slots": slots if mode == "streaming" else None, "stats": engine.stats(), "batches": {}}
        print(f"{mode}: max_memory_allocated {peak / 1e9:.3f} GB, plan {plan['total'] / 1e9:.3f} GB "
              f"(measured/plan {peak / plan['total']:.3f})")
        for bsz, t in times.items():
            nbytes = step_bytes(cfg, cfg.n_routed_experts, "device", bsz, plan)
            run["batches"][bsz] = {"step_s": t, "weight_bytes_per_step": nbytes, "bytes_per_s": nbytes / t,
                                   "fraction_of_copy_bandwidth": nbytes / t / bandwidth}
            print(f"  batch {bsz}: step p50 {t * 1e3:.2f} ms, {nbytes / 1e9:.2f} GB of weights per step, "
                  f"{nbytes / t / 1e12:.2f} TB/s = {nbytes / t / bandwidth:.0%} of the copy bandwidth")
        report["runs"][mode] = run
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

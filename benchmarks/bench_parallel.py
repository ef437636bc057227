"""Expert-parallel decode on the CPU: step time and bytes exchanged per step at world sizes 1, 2, 4.

The model: the mid-size random DeepSeek-V3 of ``bench_midsize.py`` (hidden 1024, 4 layers, the
first dense, 32 routed experts of 512 plus one shared, top-4), drawn from a seed in every rank
(``sdk.tools.fit.init_weights``) and run W8A8. For each world size N the ranks are N gloo processes on
loopback (``runtime.cpu.parallel``); rank 0 steps ``--batch`` streams, one token each, and reports
the median step time and, per step, the bytes it received in the expert all-gathers (padded to
the largest share, as sent) and the part of them that carried expert outputs. World size 1 is
also timed on the plain single-process ``Engine``. Every rank's step runs one thread.

Run from a checkout: ``PYTHONPATH=. python benchmarks/bench_parallel.py [--worlds 1,2,4]``.
With fewer cores than ranks the ranks share cores, and the times say so.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
              num_hidden_layers=4, num_attention_heads=16, n_shared_experts=1, n_routed_experts=32,
              routed_scaling_factor=2.5, kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32,
              qk_nope_head_dim=64, v_head_dim=64, n_group=4, topk_group=2, num_experts_per_tok=4,
              first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=4096)


def _model():
    from runtime.model.config import ModelConfig
    from runtime.model.transformer import Transformer
    from sdk.tools.fit import init_weights

    return init_weights(Transformer(ModelConfig(**CONFIG)), seed=0, std=0.02)


def _time(engine, batches, steps, warmup, window) -> dict:
    """Median step time (ms) and exchanged bytes per step for each batch size."""
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        slots = np.arange(b)
        times, exchanged, payload = [], 0, 0
        for t in range(warmup + steps):
            if t == warmup:
                exchanged, payload = getattr(engine, "exchanged_bytes", 0), getattr(engine, "payload_bytes", 0)
            if engine.pos[0] >= window - 1:
                engine.reset_all()
            tok = rng.integers(0, CONFIG["vocab_size"], b)
            start = time.perf_counter()
            engine.step_tokens(slots, tok)
            if t >= warmup:
                times.append(time.perf_counter() - start)
        out[str(b)] = {"step_ms": float(np.median(times)) * 1e3,
                       "exchanged_bytes_per_step": (getattr(engine, "exchanged_bytes", 0) - exchanged) / steps,
                       "payload_bytes_per_step": (getattr(engine, "payload_bytes", 0) - payload) / steps}
    return out


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import numba
    import torch

    from runtime.cpu.parallel import ParallelEngine, init_process_group, leave_process_group

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    group = init_process_group("gloo", rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port,
                               timeout_s=300)
    cap = max(args["batches"])
    engine = ParallelEngine(_model(), capacity=cap, window=args["window"], group=group)
    if rank == 0:
        report = _time(engine, args["batches"], args["steps"], args["warmup"], args["window"])
        engine.close()
        Path(out).write_text(json.dumps({"split": engine.split, "batches": report}))
    else:
        engine.serve()
    leave_process_group()


def _single(args: dict, out: str) -> None:
    import numba
    import torch

    from runtime.cpu.engine import Engine

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    engine = Engine(_model(), capacity=max(args["batches"]), window=args["window"])
    Path(out).write_text(json.dumps({"split": None, "batches": _time(engine, args["batches"], args["steps"],
                                                                       args["warmup"], args["window"])}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--json", dest="json_file")
    a = p.parse_args()
    args = {"batches": [int(b) for b in a.batch.split(",")], "steps": a.steps, "warmup": a.warmup,
            "window": a.window}
    ctx = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("engine", 1)] + [("parallel", int(w)) for w in a.worlds.split(",")]
        for kind, world in runs:
            out = os.path.join(tmp, f"{kind}{world}.json")
            if kind == "engine":
                procs = [ctx.Process(target=_single, args=(args, out))]
            else:
                port = _free_port()
                procs = [ctx.Process(target=_rank, args=(r, world, port, args, out)) for r in range(world)]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            if any(proc.exitcode for proc in procs):
                raise SystemExit(f"{kind} world {world}: exit codes {[proc.exitcode for proc in procs]}")
            results[f"{kind}{world}"] = json.loads(Path(out).read_text())
    report = {"config": CONFIG, "cores": os.cpu_count(), "steps": a.steps, "window": a.window, "runs": results}
    print(f"{'run':<12}{'batch':>6}{'step ms':>10}{'recv KiB/step':>15}{'payload KiB/step':>18}")
    for name, r in results.items():
        for b, m in r["batches"].items():
            print(f"{name:<12}{b:>6}{m['step_ms']:>10.2f}{m['exchanged_bytes_per_step'] / 1024:>15.1f}"
                  f"{m['payload_bytes_per_step'] / 1024:>18.1f}")
    if a.json_file:
        Path(a.json_file).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

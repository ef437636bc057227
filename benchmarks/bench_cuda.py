"""CUDA benchmark of the device engine on a mid-size random DeepSeek-V3 model.

The model (built directly on the GPU, random weights, int8 routed experts):
hidden 2048, 24 layers (1 dense), 16 heads, q_lora 1536, kv_lora 512, 64 routed experts of
1408 plus 2 shared, top-6 of 8 groups keep 3, vocab 4096: 23 MoE layers x 64 experts x
8.65 MB = 12.7 GB of int8 expert weights.

Prints, per batch size (1, 8, 64): step latency p50/p99 through CUDA-graph replay and
through the same step run eagerly, experts read per layer, expert-weight bytes per step,
the achieved bandwidth on expert weights and its fraction of the device's peak (data-sheet
figure by name, and a measured device-to-device copy); then the routing cost per step as
torch ops in a graph against the Numba router on the host, the streaming expert store at
half the experts cached (hit rate, prefetch hits, stall), and the kernels launched per step.

Run (one command, about 3-5 minutes on an H100/H200; add --compile for a second pass with
the step compiled by inductor, several minutes more):

    PYTHONUNBUFFERED=1 timeout 900 .venv/bin/python benchmarks/bench_cuda.py --json bench_cuda.json

``--quick`` runs a 4-layer model in under a minute, to check the set-up.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.model.config import ModelConfig  # noqa: E402
from runtime.cuda.engine import DeviceEngine  # noqa: E402
from runtime.model.transformer import MoE, Transformer, rope_inv_freq  # noqa: E402
from runtime.model.quant import RoutedExperts  # noqa: E402
from runtime.model.routing import Router, RoutingRule, route_torch  # noqa: E402
from sdk.tools.bench import bench_device, peak_bandwidth, render_bench_device, time_steps  # noqa: E402


def mid_size_config(layers: int) -> ModelConfig:
    """The benchmark model: DeepSeek-V2-Lite proportions in the V3 architecture."""
    return ModelConfig(vocab_size=4096, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                       num_hidden_layers=layers, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
                       num_experts_per_tok=6, n_group=8, topk_group=3, first_k_dense_replace=1, kv_lora_rank=512,
                       q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                       max_position_embeddings=4096, routed_scaling_factor=2.5, norm_topk_prob=True)


@torch.no_grad()
def build_model(cfg: ModelConfig, device: str, seed: int = 0) -> Transformer:
    """Random model on ``device`` without ever materialising float routed experts."""
    with torch.device("meta"):
        model = Transformer(cfg)
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
        else:
            p.uniform_(0.8, 1.2, generator=gen)
    int8_std = 127 / math.sqrt(3)          # std of integers uniform in [-127, 127]
    for module in model.modules():
        if isinstance(module, MoE):
            module.gate.e_score_correction_bias.uniform_(-0.05, 0.05, generator=gen)
        if isinstance(module, RoutedExperts):
            for q in (module.w13_t, module.w2_t):
                q.random_(-127, 128, generator=gen)
            module.s13.fill_(1.0 / (math.sqrt(cfg.hidden_size) * int8_std))
            module.s2.fill_(1.0 / (math.sqrt(cfg.moe_intermediate_size) * int8_std))
    model.inv_freq = rope_inv_freq(cfg)[0].to(device)
    return model.eval()


def routing_figures(model: Transformer, rows: int, device: str, iters: int = 200) -> dict:
    """Routing of every MoE layer for one step: torch ops replayed in a graph, against the
    Numba router on the host (plus the device->host->device round trip it would need)."""
    cfg = model.config
    moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    logits = torch.randn(len(moes), rows, cfg.n_routed_experts, device=device)
    biases = [m.gate.e_score_correction_bias.float() for m in moes]
    rule = RoutingRule.from_config(cfg)

    def route_all():
        return [route_torch(logits[i], biases[i], rule) for i in range(len(moes))]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        route_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        route_all()
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    routers = [Router(m.gate.weight, b, rule, rows) for m, b in zip(moes, biases)]
    host_logits = logits.cpu().numpy()
    ids = torch.zeros(rows, cfg.num_experts_per_tok, dtype=torch.int32, device=device)
    th, trip = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        for r, lg in zip(routers, host_logits):
            r.route_logits(lg)
        th.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = logits[0].cpu()                  # what a host router needs per layer: logits down, ids up
        ids.copy_(torch.from_numpy(routers[0].buf.topk_idx[:rows]).to(device, non_blocking=True))
        torch.cuda.synchronize()
        trip.append(time.perf_counter() - t0)
    del back
    return {"rows": rows, "moe_layers": len(moes),
            "torch_graph_us_per_step": float(np.median(ts) * 1e6),
            "numba_host_us_per_step": float(np.median(th) * 1e6),
            "round_trip_us_per_layer": float(np.median(trip) * 1e6),
            "numba_total_us_per_step": float((np.median(th) + len(moes) * np.median(trip)) * 1e6)}


def kernels_per_step(model: Transformer, batch: int, device: str) -> int:
    """CUDA kernels one eager step launches (what the graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    engine = DeviceEngine(model, capacity=batch, window=64, device=device, graphs=False)
    slots = np.arange(batch)
    engine.step_tokens(slots, np.zeros(batch, np.int64))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step_tokens(slots, np.ones(batch, np.int64))
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def streaming_figures(model: Transformer, batch: int, fraction: float, steps: int, device: str) -> dict:
    """Eager steps with the routed experts in pinned host memory and ``fraction`` of them cached."""
    cfg = model.config
    slots = max(cfg.n_routed_experts, int(fraction * cfg.n_routed_experts * cfg.n_moe_layers))
    engine = DeviceEngine(model, capacity=batch, window=64, device=device, expert_cache_slots=slots)
    samples = time_steps(engine, batch, steps, warmup=10, seed=1)
    st = engine.stats()["store"]
    us = np.asarray(samples) * 1e6
    return {"batch": batch, "cache_slots": slots, "cache_fraction": slots / (cfg.n_routed_experts * cfg.n_moe_layers),
            "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "hit_rate": st["hit_rate"], "prefetch_hits": st["prefetch_hits"], "prefetch_issued": st["prefetch_issued"],
            "misses_per_step": st["misses"] / steps, "stall_us_per_step": st["stall_s"] / steps * 1e6,
            "gb_copied_per_step": st["bytes_copied"] / steps / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="4 layers, fewer steps: a set-up check")
    ap.add_argument("--compile", action="store_true", help="also run the step compiled by inductor")
    ap.add_argument("--stream-fraction", type=float, default=0.5, help="share of experts the streaming cache holds")
    ap.add_argument("--json", dest="json_file", help="write every figure to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.layers, args.steps, args.warmup = 4, 50, 5
    device = "cuda"
    batches = [int(b) for b in args.batches.split(",")]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"torch {torch.__version__}, triton {triton_version}, {torch.cuda.get_device_name()}")
    cfg = mid_size_config(args.layers)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    expert_gb = (cfg.n_moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size) / 1e9
    print(f"model: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts of {cfg.moe_intermediate_size}, "
          f"{expert_gb:.1f} GB int8 routed experts (built in {time.perf_counter() - t0:.0f} s)")
    peak = peak_bandwidth(device)
    out = {"config": cfg.to_dict(), "expert_gb": expert_gb, "torch": torch.__version__, "triton": triton_version}
    out["resident"] = bench_device(model, batches=batches, device=device, steps=args.steps, warmup=args.warmup,
                                   window=args.window, peak=peak, progress=lambda b: print(f"  batch {b} done"))
    render_bench_device(out["resident"])
    if args.compile:
        t0 = time.perf_counter()
        try:
            out["compiled"] = bench_device(model, batches=batches, device=device, steps=args.steps,
                                           warmup=args.warmup, window=args.window, peak=peak,
                                           compile_backend="inductor",
                                           progress=lambda b: print(f"  batch {b} compiled done"))
            print(f"compiled by inductor ({time.perf_counter() - t0:.0f} s including compilation):")
            render_bench_device(out["compiled"])
        except Exception as exc:          # report and go on with the other figures
            out["compiled"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"compiled run failed: {out['compiled']['error']}")
    out["kernels_per_step"] = {str(b): kernels_per_step(model, b, device) for b in (1, max(batches))}
    print(f"CUDA kernels per step: {out['kernels_per_step']}")
    for rows in sorted({max(b, 17) for b in batches}):
        r = routing_figures(model, rows, device)
        out.setdefault("routing", []).append(r)
        print(f"routing, {r['moe_layers']} layers x {rows} rows: torch ops in a graph {r['torch_graph_us_per_step']:.0f} us"
              f"/step; Numba on the host {r['numba_host_us_per_step']:.0f} us/step + {r['round_trip_us_per_layer']:.0f} us"
              f" round trip per layer = {r['numba_total_us_per_step']:.0f} us/step")
    s = streaming_figures(model, 8, args.stream_fraction, max(20, args.steps // 4), device)
    out["streaming"] = s
    print(f"streaming, batch {s['batch']}, {s['cache_slots']} slots ({100 * s['cache_fraction']:.0f}% of experts): "
          f"p50 {s['p50_us']:.0f} us, p99 {s['p99_us']:.0f} us, hit rate {100 * s['hit_rate']:.1f}%, prefetch hits "
          f"{s['prefetch_hits']}/{s['prefetch_issued']}, {s['misses_per_step']:.1f} misses/step, stall "
          f"{s['stall_us_per_step']:.0f} us/step, {s['gb_copied_per_step']:.2f} GB copied/step")
    for name in ("resident", "compiled"):
        rep = out.get(name)
        if rep and str(max(batches)) in rep.get("batches", {}):
            e = rep["batches"][str(max(batches))]
            print(f"targets ({name}, batch {max(batches)}): {100 * e['fraction_of_peak']:.1f}% of peak bandwidth "
                  f"(target >= 70%), p99/p50 {e['p99_over_p50']:.2f} (target <= 1.2)")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

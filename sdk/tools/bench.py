"""``r1edge bench``: decode-step latency of the stream engine, side by side with the reference.

Each batch size runs the same number of one-token steps on fresh stream slots. When
transformers is installed, its eager ``DeepseekV3ForCausalLM`` runs the same steps with its
own cache on the same weights (dequantized where the package is int8), in the same process,
so the ratio compares like with like on a shared, noisy machine.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    us = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean())}


def reference_model(model):
    """transformers' ``DeepseekV3ForCausalLM`` (or ``DeepseekV2ForCausalLM``) holding ``model``'s
    weights in float32, or None when transformers is not installed (a test/bench-only dependency)."""
    try:
        import transformers
    except ImportError:
        return None
    from runtime.model.transformer import MoE, dequantized_weight

    cfg = model.config
    family = "DeepseekV2" if cfg.model_type == "deepseek_v2" else "DeepseekV3"
    config_cls, model_cls = getattr(transformers, family + "Config"), getattr(transformers, family + "ForCausalLM")
    ref = model_cls(config_cls(**cfg.to_dict())).eval()
    state = {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight_t") or isinstance(module, torch.nn.Linear):
            if not name.startswith("adapter"):
                state[f"{name}.weight"] = dequantized_weight(module).detach().float()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and (name.endswith("norm.weight") or ".gate." in name
                                           or name == "model.embed_tokens.weight"):
            state[name] = tensor.float()
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            gate_up, down = _float_experts(layer.mlp.experts)
            state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
            state[f"model.layers.{i}.mlp.experts.down_proj"] = down
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference model does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return ref


def _float_experts(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked float ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] of float or int8 experts."""
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj.detach().float(), experts.down_proj.detach().float()
    gate_up = (experts.w13_t.float() * experts.s13[:, None, :]).transpose(1, 2).contiguous()
    down = (experts.w2_t.float() * experts.s2[:, None, :]).transpose(1, 2).contiguous()
    return gate_up, down


def time_steps(engine, batch: int, steps: int, warmup: int, seed: int = 0) -> list[float]:
    """Wall time of ``steps`` one-token steps of ``batch`` streams on either stream engine (host
    inputs in, outputs back on the host), after ``warmup`` untimed ones; resets the engine's
    state first, and its expert counters (device engine) once warm."""
    rng = np.random.default_rng(seed)
    slots = np.arange(batch, dtype=np.int64)
    tokens = rng.integers(0, engine.config.vocab_size, (warmup + steps, batch))
    engine.reset_all()
    samples = []
    for t in range(warmup + steps):
        if t == warmup and hasattr(engine, "reset_stats"):
            engine.reset_stats()
        start = time.perf_counter()
        engine.step_tokens(slots, tokens[t])
        if t >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


@torch.inference_mode()
def time_reference(ref, batch: int, steps: int, warmup: int, vocab: int) -> list[float]:
    """Seconds per one-token decode step of a transformers model ``ref`` at ``batch`` streams
    (random tokens, its own KV cache), ``steps`` timed after ``warmup``."""
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, vocab, (warmup + steps, batch, 1), generator=gen)
    cache = None
    samples = []
    for t in range(warmup + steps):
        start = time.perf_counter()
        out = ref(tokens[t], cache=cache, use_cache=True)
        cache = out.cache
        if t >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def bench(path: str | Path, *, batches=(1, 8, 64), device: str = "cpu", steps: int = 100, warmup: int = 10,
          window: int = 256, reference: bool = True, threads: int = 1, progress=None) -> dict:
    """Step latency per batch size for the engine (and the reference when available).

    ``threads``: Numba compute threads set for the run, as the controller sets them. The CPU
    engine runs each step on the calling thread alone, so it does not change the engine's step.
    """
    from runtime.cpu.engine import Engine
    from runtime.control.loop import set_compute_threads
    from sdk.tools.loading import load_model

    batches = sorted(set(int(b) for b in batches))
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {batches}")
    if device != "cpu":
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        report = bench_device(load_model(path), batches=batches, device=device, steps=steps, warmup=warmup,
                              window=window, progress=progress)
        return {"path": str(path), "engine": "device-w8a8 (CUDA graph per step)", **report}
    if warmup + steps > window:
        window = warmup + steps
    model = load_model(path)
    threads = set_compute_threads(threads)
    quantized = any(hasattr(m, "qweight_t") for m in model.modules())
    engine = Engine(model, capacity=max(batches), window=window)
    ref = reference_model(model) if reference else None
    vocab = model.config.vocab_size
    report = {"path": str(path), "device": device, "engine": "numba-w8a8", "weights": "int8" if quantized else
              "float32 (quantized to int8 by the engine)", "threads": threads,
              "reference_threads": torch.get_num_threads(),
              "steps": steps, "window": window, "batches": {}}
    for b in batches:
        entry = {"engine": _percentiles(time_steps(engine, b, steps, warmup, seed=b))}
        entry["engine"]["tokens_per_s"] = b / (entry["engine"]["mean_us"] * 1e-6)
        if ref is not None:
            entry["reference"] = _percentiles(time_reference(ref, b, steps, warmup, vocab))
            entry["reference"]["tokens_per_s"] = b / (entry["reference"]["mean_us"] * 1e-6)
            entry["speedup_p50"] = entry["reference"]["p50_us"] / entry["engine"]["p50_us"]
        report["batches"][str(b)] = entry
        if progress is not None:
            progress(b)
    if ref is None and reference:
        report["reference"] = "transformers not installed: reference skipped"
    return report


def render_bench(report: dict) -> None:
    """Print a bench report as a table."""
    if "peak" in report:      # --device cuda
        print(f"{report['path']}: {report['engine']}")
        render_bench_device(report)
        return
    print(f"{report['path']}: {report['engine']} on {report['device']}, weights {report['weights']}, "
          f"{report['steps']} steps per batch size, {report.get('threads', 1)} engine thread(s)")
    print(f"{'batch':>6} {'engine p50':>11} {'p99':>9} {'tok/s':>10}   {'reference p50':>13} {'p99':>9} {'speedup':>8}")
    for b, e in report["batches"].items():
        line = f"{b:>6} {e['engine']['p50_us']:>9.0f}us {e['engine']['p99_us']:>7.0f}us {e['engine']['tokens_per_s']:>10.0f}"
        if "reference" in e:
            line += (f"   {e['reference']['p50_us']:>11.0f}us {e['reference']['p99_us']:>7.0f}us "
                     f"{e['speedup_p50']:>7.1f}x")
        print(line)
    if isinstance(report.get("reference"), str):
        print(report["reference"])


# ---------------------------------------------------------------------------------------
# The device engine (``--device cuda`` and benchmarks/bench_cuda.py)

# Peak DRAM bandwidth in GB/s by device name fragment (vendor data sheets), first match wins.
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2039.0), ("H100", 3352.0),
    ("A100-PCIE-40GB", 1555.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-40GB", 1555.0), ("A100", 2039.0),
    ("L40S", 864.0), ("A10G", 600.0), ("L4", 300.0),
)


def peak_bandwidth(device: str | torch.device = "cuda", copy_bytes: int = 1 << 30) -> dict:
    """The device's peak DRAM bandwidth: the data-sheet figure for its name (None if not in
    ``PEAK_BANDWIDTH_GBPS``) and a measured device-to-device copy (read + write bytes / time)."""
    device = torch.device(device)
    name = torch.cuda.get_device_properties(device).name
    table = next((gbps for frag, gbps in PEAK_BANDWIDTH_GBPS if frag in name), None)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    measured = 2 * copy_bytes * reps / (time.perf_counter() - start) / 1e9
    del src, dst
    return {"name": name, "table_gbps": table, "copy_gbps": measured}


def bench_device(model, *, batches=(1, 8, 64), device: str = "cuda", steps: int = 100,
                 warmup: int = 10, window: int = 256, expert_backend: str = "auto", peak: dict | None = None,
                 compile_backend: str | None = None, progress=None) -> dict:
    """Per batch size: step latency p50/p99 through CUDA-graph replay and through the same step
    run eagerly, their ratio, and expert-weight bandwidth as a fraction of the device's peak.

    Expert bytes per step are counted on the device during the timed steps (experts that
    received tokens, per layer); the bandwidth is those bytes over the p50 step time, and
    the step time is a whole control cycle: inputs in, graph replay, outputs back on the host.
    On a device without graphs (the CPU) both rows time the eager step; ``peak`` must then
    be given (``{"name", "table_gbps", "copy_gbps"}``).
    """
    from runtime.cuda.engine import DeviceEngine

    device = torch.device(device)
    peak = peak or peak_bandwidth(device)
    ref_gbps = peak["table_gbps"] or peak["copy_gbps"]
    report = {"device": peak["name"], "peak": peak, "steps": steps, "window": window,
              "compile_backend": compile_backend, "batches": {}}
    for b in batches:
        engine = DeviceEngine(model, capacity=b, window=window, device=device, graphs=device.type == "cuda",
                              expert_backend=expert_backend, compile_backend=compile_backend)
        report["expert_backend"] = engine.expert_backend
        graph = _percentiles(time_steps(engine, b, steps, warmup))
        st = engine.stats()
        engine.use_graphs = False
        eager = _percentiles(time_steps(engine, b, steps, warmup))
        entry = {"graph": graph, "eager": eager, "eager_over_graph_p50": eager["p50_us"] / graph["p50_us"],
                 "p99_over_p50": graph["p99_us"] / graph["p50_us"],
                 "tokens_per_s": b / (graph["mean_us"] * 1e-6)}
        if "expert_bytes_read_per_step" in st:
            read = st["expert_bytes_read_per_step"]
            gbps = read / (graph["p50_us"] * 1e-6) / 1e9
            entry.update(active_experts_per_layer=float(np.mean(st["active_experts_per_layer"])),
                         expert_bytes_read_per_step=read,
                         active_expert_bytes_per_step=st["active_expert_bytes_per_step"],
                         expert_gbps=gbps, fraction_of_peak=gbps / ref_gbps,
                         fraction_of_copy_peak=gbps / peak["copy_gbps"])
        report["batches"][str(b)] = entry
        del engine
        torch.cuda.empty_cache()
        if progress is not None:
            progress(b)
    return report


def render_bench_device(report: dict) -> None:
    """Print a ``bench_device`` report as a table."""
    pk = report["peak"]
    table = f"{pk['table_gbps']:.0f}" if pk["table_gbps"] else "n/a"
    print(f"{report['device']}: experts via {report.get('expert_backend')}, peak {table} GB/s (data sheet), "
          f"{pk['copy_gbps']:.0f} GB/s (measured copy); {report['steps']} steps per batch size")
    print(f"{'batch':>5} {'graph p50':>10} {'p99':>9} {'p99/p50':>7} {'eager p50':>10} {'eager/graph':>11} "
          f"{'experts/layer':>13} {'MB/step':>8} {'GB/s':>7} {'of peak':>7}")
    for b, e in report["batches"].items():
        line = (f"{b:>5} {e['graph']['p50_us']:>8.0f}us {e['graph']['p99_us']:>7.0f}us {e['p99_over_p50']:>7.2f} "
                f"{e['eager']['p50_us']:>8.0f}us {e['eager_over_graph_p50']:>10.1f}x")
        if "expert_gbps" in e:
            line += (f" {e['active_experts_per_layer']:>13.1f} {e['expert_bytes_read_per_step'] / 1e6:>8.1f} "
                     f"{e['expert_gbps']:>7.0f} {100 * e['fraction_of_peak']:>6.1f}%")
        print(line)

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
    """transformers' DeepseekV3ForCausalLM holding ``model``'s weights in float32, or None
    when transformers is not installed (it is a test/bench-only dependency)."""
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        return None
    from runtime.model import MoE, dequantized_weight

    cfg = model.config
    ref = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_dict())).eval()
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
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj.detach().float(), experts.down_proj.detach().float()
    if experts.mode == "float":
        return experts.gate_up.float(), experts.down.float()
    gate_up = (experts.w13_t.float() * experts.s13[:, None, :]).transpose(1, 2).contiguous()
    down = (experts.w2_t.float() * experts.s2[:, None, :]).transpose(1, 2).contiguous()
    return gate_up, down


def _time_engine(engine, batch: int, steps: int, warmup: int, vocab: int) -> list[float]:
    rng = np.random.default_rng(batch)
    slots = np.arange(batch, dtype=np.int64)
    tokens = rng.integers(0, vocab, (warmup + steps, batch))
    engine.reset_all()
    samples = []
    for t in range(warmup + steps):
        start = time.perf_counter()
        engine.step_tokens(slots, tokens[t])
        if t >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


@torch.inference_mode()
def _time_reference(ref, batch: int, steps: int, warmup: int, vocab: int) -> list[float]:
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

    ``threads``: compute threads of a CPU engine step (1, the controller's default, keeps a
    step on one core; more helps large batches on an otherwise idle machine).
    """
    from runtime.engine import Engine
    from runtime.loop import set_compute_threads
    from sdk.loading import load_model

    batches = sorted(set(int(b) for b in batches))
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {batches}")
    if device != "cpu":
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        from runtime.device import bench_device

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
        entry = {"engine": _percentiles(_time_engine(engine, b, steps, warmup, vocab))}
        entry["engine"]["tokens_per_s"] = b / (entry["engine"]["mean_us"] * 1e-6)
        if ref is not None:
            entry["reference"] = _percentiles(_time_reference(ref, b, steps, warmup, vocab))
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
        from runtime.device import render_bench_device

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

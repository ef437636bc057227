"""Decode and prefill on a random mid-size DeepSeek-V3, beside llama.cpp and transformers.

The config: hidden 1024, 4 layers (the first dense), 16 heads (nope 64, rope 32, v 64),
32 routed experts of 512 plus one shared, top-4 in 4 groups keeping 2, q_lora 384, kv_lora
256, vocab 4096. Weights are drawn at random (transformers' init) and saved once under
``--dir``; the engine runs them W8A8.

Printed, one engine thread, context ``--context`` tokens per stream:

- decode: ms per step and per token at each batch, every stream at position ``--context``;
- bandwidth: the weight bytes a batch-1 step reads (attention, the dense MLP, the shared
  expert, the four routed experts per MoE layer, the head) over its time, beside what a
  plain copy and a plain sum of 256 MiB read per second in the same run (numpy);
- prefill: filling ``--streams`` streams with ``--context`` tokens by ``Engine.prefill``
  (once per ``--prefill-rows`` value, each an engine with that many rows per pass) against
  stepping them (all streams batched, one token per step), and against stepping one
  stream alone one token at a time (timed on ``--solo`` streams, scaled to all);
- llama.cpp (``llama_cpp``, a benchmark-only dependency, when importable: a GGUF Q8_0 of the
  same weights must be given with ``--gguf``; ``benchmarks/make_gguf.py`` converts the checkpoint):
  its batch-1 decode, and its prefill of the same streams (one ``eval`` of each stream's tokens)
  and transformers eager (``--reference``) and compiled with a static cache (``--compiled``).

Run it from a checkout (``PYTHONPATH=. python benchmarks/bench_midsize.py``); the same script
runs against an older checkout's engine (without ``prefill`` it reports stepping only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
              num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
              n_routed_experts=32, routed_scaling_factor=2.5, kv_lora_rank=256, q_lora_rank=384,
              qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=4, topk_group=2,
              num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=4096,
              rope_theta=10000.0, tie_word_embeddings=False, scoring_func="sigmoid", topk_method="noaux_tc")


def build(path: Path) -> Path:
    """Save the random checkpoint once (transformers, a benchmark/test dependency)."""
    if (path / "config.json").is_file():
        return path
    import transformers

    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONFIG)).eval()
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")     # what llama.cpp's converter reads
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def memory_gbps(mib: int = 256) -> tuple[float, float]:
    """(bytes read per second by a plain copy, by a plain sum) of a 256 MiB buffer, best of 5."""
    a = np.ones(mib << 20, np.uint8)
    b = np.empty_like(a)
    words = a.view(np.uint64)
    copy, read = [], []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        words.sum()
        read.append(time.perf_counter() - t)
    return a.nbytes / min(copy) / 1e9, a.nbytes / min(read) / 1e9


@torch.inference_mode()
def time_compiled(model, context: int, steps: int, rng) -> dict:
    """transformers' model under ``torch.compile`` (static shapes) decoding with a static cache
    after ``context`` tokens (filled by one eager forward): the first compiled step (compiling)
    and the median of the rest, batch 1."""
    from transformers import StaticCache

    from sdk.tools.bench import reference_model
    ref = reference_model(model)
    vocab = model.config.vocab_size
    cache = StaticCache(config=ref.config, max_cache_len=context + steps + 1)
    ref(input_ids=torch.tensor(rng.integers(0, vocab, (1, context))), cache=cache,
        position_ids=torch.arange(context)[None], use_cache=True)
    compiled = torch.compile(ref, dynamic=False)
    times = []
    for t in range(steps):
        token = torch.tensor([[int(rng.integers(0, vocab))]])
        start = time.perf_counter()
        compiled(input_ids=token, cache=cache, position_ids=torch.tensor([[context + t]]), use_cache=True)
        times.append(time.perf_counter() - start)
    return {"first_step_s": times[0], "ms": float(np.median(times[1:])) * 1e3}


def step_bytes_batch1(cfg) -> int:
    """Weight bytes a batch-1 decode step reads: int8 projections, float32 absorbed kv_b
    halves, SwiGLU blocks (dense, shared, top-k routed), the head; norms and router ignored."""
    H, nh, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = (H * cfg.q_lora_rank + cfg.q_lora_rank * nh * (cfg.qk_nope_head_dim + R) + H * (C + R)
            + nh * cfg.v_head_dim * H + 4 * nh * C * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    dense = 3 * H * cfg.intermediate_size
    moe = 3 * H * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    first = cfg.first_k_dense_replace
    L = cfg.num_hidden_layers
    return L * attn + first * dense + (L - first) * moe + cfg.vocab_size * H


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/r1edge-midsize", help="where the random checkpoint is saved")
    p.add_argument("--package", help="time this checkpoint or package instead of the mid-size config")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    p.add_argument("--streams", type=int, default=64, help="streams to prefill")
    p.add_argument("--solo", type=int, default=2, help="streams stepped alone for the one-at-a-time figure")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--prefill-rows", default="256",
                   help="comma-separated rows per prefill pass (default 256, the engine's default)")
    p.add_argument("--reference", action="store_true", help="also time transformers eager (batch 1)")
    p.add_argument("--compiled", action="store_true",
                   help="also time transformers compiled (torch.compile, static cache; batch 1)")
    p.add_argument("--gguf", help="a Q8_0 GGUF of the same checkpoint for llama.cpp")
    p.add_argument("--json", dest="json_file")
    args = p.parse_args()

    import numba

    import sdk
    from runtime.cpu.engine import Engine

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    path = Path(args.package) if args.package else build(Path(args.dir))
    model = sdk.load_model(path)
    cfg = model.config
    batches = [int(b) for b in args.batch.split(",")]
    window = args.context + args.steps + 1
    engine = Engine(model, capacity=max(batches + [args.streams]), window=window)
    rng = np.random.default_rng(0)
    copy_gbps, read_gbps = memory_gbps()
    report = {"config": CONFIG if not args.package else str(path), "context": args.context,
              "copy_read_gbps": copy_gbps, "sum_read_gbps": read_gbps,
              "bytes_per_token_b1": step_bytes_batch1(cfg), "decode": {}}
    engine.reset_all()          # decode cost does not depend on the cache's contents: start at --context
    for b in batches:
        slots = np.arange(b)
        times = []
        for t in range(args.steps):
            tok = rng.integers(0, cfg.vocab_size, b)
            engine.pos[:b] = args.context
            start = time.perf_counter()
            engine.step_tokens(slots, tok)
            times.append(time.perf_counter() - start)
        ms = float(np.median(times)) * 1e3
        report["decode"][str(b)] = {"step_ms": ms, "ms_per_token": ms / b, "tokens_per_s": b / ms * 1e3}
    b1 = report["decode"].get("1")
    if b1:
        gbps = report["bytes_per_token_b1"] / (b1["step_ms"] * 1e-3) / 1e9
        report["b1_gbps"] = gbps
        report["b1_fraction_of_copy"] = gbps / copy_gbps
        report["b1_fraction_of_sum_read"] = gbps / read_gbps
    if not args.no_prefill:
        tokens = rng.integers(0, cfg.vocab_size, (args.streams, args.context))
        pf = {}
        if hasattr(engine, "prefill"):
            for rows in (int(r) for r in args.prefill_rows.split(",")):
                filler = Engine(model, capacity=args.streams, window=window, prefill_rows=rows)
                start = time.perf_counter()
                for s in range(args.streams):
                    filler.prefill(s, tokens[s])
                pf[f"prefill_s_{rows}_rows"] = time.perf_counter() - start
                del filler
        engine.reset_all()
        slots = np.arange(args.streams)
        start = time.perf_counter()
        for t in range(args.context):
            engine.step_tokens(slots, tokens[:, t])
        pf["batched_steps_s"] = time.perf_counter() - start
        engine.reset_all()
        start = time.perf_counter()
        for s in range(args.solo):
            for t in range(args.context):
                engine.step_tokens(np.array([s]), tokens[s, t:t + 1])
        pf["solo_steps_s_scaled"] = (time.perf_counter() - start) * args.streams / args.solo
        report["prefill"] = pf
    if args.reference:
        from sdk.tools.bench import time_reference, reference_model
        ref = reference_model(model)
        report["transformers_eager_b1_ms"] = float(np.median(time_reference(ref, 1, args.steps, 5,
                                                                              cfg.vocab_size))) * 1e3
    if args.compiled:
        report["transformers_compiled_b1"] = time_compiled(model, args.context, args.steps, rng)
    try:
        import llama_cpp
    except ImportError:
        report["llama_cpp"] = "llama_cpp not installed: skipped"
    else:
        if args.gguf:
            llm = llama_cpp.Llama(args.gguf, n_ctx=window, n_threads=1, n_batch=512, verbose=False)
            llm.eval(rng.integers(0, cfg.vocab_size, args.context).tolist())
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                llm.eval([int(rng.integers(0, cfg.vocab_size))])
                times.append(time.perf_counter() - start)
            report["llama_cpp"] = {"b1_ms": float(np.median(times)) * 1e3}
            if not args.no_prefill:
                start = time.perf_counter()
                for s in range(args.streams):
                    llm.reset()
                    llm.eval(tokens[s].tolist())
                report["llama_cpp"]["prefill_s"] = time.perf_counter() - start
        else:
            report["llama_cpp"] = "no --gguf given: skipped"
    print(json.dumps(report, indent=2))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

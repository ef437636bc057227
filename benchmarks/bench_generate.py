"""``model.generate`` of an int8 model (the stream engine) against transformers' eager
``DeepseekV3ForCausalLM.generate`` with its KV cache, on the same weights, side by side.

Writes a random DeepSeek-V3 checkpoint (transformers' own init), loads it with
``sdk.load_model(path, quant="int8")`` and builds the reference from the int8 model's
dequantized weights (``sdk.tools.bench.reference_model``), so both decode the same numbers. Each
round times one greedy call of each at batch 1 (a ``--prompt``-token prompt, then
``--new-tokens`` tokens), alternating, after one untimed warm-up call each; both run on
``--threads`` cores (torch's intra-op threads for the reference). Prints the time per
generated token (whole call, prompt included, over the new tokens) and the ratio. Usage:

    .venv/bin/python benchmarks/bench_generate.py [--size tiny|mid] [--rounds 10] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from runtime.control.loop import set_compute_threads  # noqa: E402
from sdk.tools.bench import reference_model  # noqa: E402

SIZES = {
    # the tests' tiny config (DESIGN: ~2 ms per eager decode step)
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    # a mid-size model: hidden 1024, 32 experts of 512, 4 layers, vocab 32k
    "mid": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64),
}


def write_checkpoint(path: Path, size: str, seed: int = 0) -> None:
    """A random DeepseekV3ForCausalLM of ``size``, saved by transformers."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**SIZES[size], max_position_embeddings=4096)
    transformers.DeepseekV3ForCausalLM(cfg).eval().save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--path", help="an existing DeepSeek-V3 checkpoint instead of a random one")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--new-tokens", type=int, default=48, help="generated tokens (default 48)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads of the engine and of torch for the reference (default 1)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.path) if args.path else Path(tmp) / "ckpt"
        if not args.path:
            write_checkpoint(path, args.size)
        model = sdk.load_model(path, quant="int8")
        ref = reference_model(model)
    threads = set_compute_threads(args.threads)
    torch.set_num_threads(args.threads)     # the reference on as many cores as the engine
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.prompt)))
    n = args.new_tokens

    def ours():
        return model.generate(ids, max_new_tokens=n)

    @torch.inference_mode()
    def theirs():
        return ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=0)

    ours(), theirs()                       # build the engine, warm both
    times = {"r1edge": [], "transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("r1edge", ours), ("transformers", theirs)):
            start = time.perf_counter()
            out = fn()
            times[name].append((time.perf_counter() - start) / n)
            assert out.shape == (1, args.prompt + n)
    report = {"size": args.path or args.size, "prompt_tokens": args.prompt, "new_tokens": n, "rounds": args.rounds,
              "engine_threads": threads, "torch_threads": torch.get_num_threads(),
              "ms_per_token": {k: {"p50": float(np.median(v)) * 1e3, "min": float(np.min(v)) * 1e3}
                               for k, v in times.items()}}
    report["speedup_p50"] = report["ms_per_token"]["transformers"]["p50"] / report["ms_per_token"]["r1edge"]["p50"]
    mt = report["ms_per_token"]
    print(f"{report['size']}: batch 1, {args.prompt}-token prompt, {n} new tokens, {args.rounds} rounds; "
          f"engine {threads} thread(s), torch {report['torch_threads']}")
    print(f"  r1edge model.generate (int8, stream engine)   {mt['r1edge']['p50']:8.3f} ms/token p50 "
          f"(min {mt['r1edge']['min']:.3f})")
    print(f"  transformers eager generate (KV cache)         {mt['transformers']['p50']:8.3f} ms/token p50 "
          f"(min {mt['transformers']['min']:.3f})")
    print(f"  speed-up {report['speedup_p50']:.1f}x (p50 per token)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

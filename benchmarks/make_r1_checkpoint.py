"""Write an R1-shaped FP8 checkpoint: the official DeepSeek-R1 release layout at real dimensions.

Everything is as the official release spells and stores it: ``config.json`` (``rope_scaling`` with
``type: yarn``, a top-level ``rope_theta``, ``quantization_config`` fp8 e4m3 with 128x128 blocks),
``float8_e4m3fn`` linear weights with float32 ``weight_scale_inv`` blocks, bf16 embeddings,
``lm_head``, norms and router rows, a float32 ``e_score_correction_bias``, routed experts one by
one (``mlp.experts.{e}.gate_proj.weight``...), sharded files ``model-00001-of-0000NN.safetensors``
with ``model.safetensors.index.json``. Dimensions are R1's (hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, nope 128, rope 64, v 128, dense intermediate 18432, expert 2048, 256 routed + 1 shared,
8 groups keep 4, top-8, vocab 129280); the number of layers and of routed experts (and, for fast
tests, heads, vocabulary and dense intermediate) can be changed.

The weights are random but not featureless: FP8 codes are drawn uniformly over the finite codes of
magnitude below 2 and scaled per 128x128 block to about ``1/sqrt(fan_in)``; every routed expert gets
its own output strength (a factor 0.5-2 on its ``down_proj`` scales), and the router rows have
norms spread over a factor of 4 plus a random correction bias, so some experts are chosen far more
often than others and REAP's saliencies are well apart: pruning choices are not ties. The same
seed gives the same bytes.

    python benchmarks/make_r1_checkpoint.py --out /work/r1shaped --layers 3 --dense-layers 1

(1 dense + 2 MoE layers of 256 experts: about 26 GB; 2.4 GB per 100 routed experts per layer.)
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

from sdk.tools.package import TensorFileWriter  # noqa: E402

BLOCK = 128
FP8_MASK = np.uint8(0xBF)     # clear the top exponent bit: finite codes of magnitude < 2, never NaN


def official_config(layers: int, dense_layers: int, experts: int, heads: int, vocab: int,
                    intermediate: int) -> dict:
    """DeepSeek-R1's config.json as released, with the given sizes."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": dense_layers,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8 if experts >= 16 else 1,      # R1: 8 groups; fewer than 2 experts a group is invalid
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": 8,
        "num_hidden_layers": layers,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [BLOCK, BLOCK]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 4 if experts >= 16 else 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": vocab,
    }


def _fp8_rms() -> float:
    codes = (np.arange(256, dtype=np.uint8) & FP8_MASK)
    return float(torch.from_numpy(codes).view(torch.float8_e4m3fn).float().pow(2).mean().sqrt())


def tensor_plan(cfg: dict) -> list[tuple[str, str, tuple[int, ...], dict]]:
    """Every tensor as ``(name, kind, shape, options)`` in file order; kind: fp8, bf16, norm, f32."""
    H, nh, E = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", "bf16", (cfg["vocab_size"], H), {"std": 1.0})]

    def linear(name, n, k, **opt):
        out.append((name + ".weight", "fp8", (n, k), opt))

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", "norm", (H,), {}))
        linear(p + "self_attn.q_a_proj", cfg["q_lora_rank"], H)
        out.append((p + "self_attn.q_a_layernorm.weight", "norm", (cfg["q_lora_rank"],), {}))
        linear(p + "self_attn.q_b_proj", nh * qk, cfg["q_lora_rank"])
        linear(p + "self_attn.kv_a_proj_with_mqa", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H)
        out.append((p + "self_attn.kv_a_layernorm.weight", "norm", (cfg["kv_lora_rank"],), {}))
        linear(p + "self_attn.kv_b_proj", nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
        linear(p + "self_attn.o_proj", H, nh * cfg["v_head_dim"])
        out.append((p + "post_attention_layernorm.weight", "norm", (H,), {}))
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            linear(p + "mlp.gate_proj", inter, H)
            linear(p + "mlp.up_proj", inter, H)
            linear(p + "mlp.down_proj", H, inter)
            continue
        inter = cfg["moe_intermediate_size"]
        out.append((p + "mlp.gate.weight", "router", (E, H), {}))
        out.append((p + "mlp.gate.e_score_correction_bias", "f32", (E,), {}))
        for e in range(E):
            linear(p + f"mlp.experts.{e}.gate_proj", inter, H)
            linear(p + f"mlp.experts.{e}.up_proj", inter, H)
            linear(p + f"mlp.experts.{e}.down_proj", H, inter, expert=e)
        s = inter * cfg["n_shared_experts"]
        linear(p + "mlp.shared_experts.gate_proj", s, H)
        linear(p + "mlp.shared_experts.up_proj", s, H)
        linear(p + "mlp.shared_experts.down_proj", H, s)
    out.append(("model.norm.weight", "norm", (H,), {}))
    out.append(("lm_head.weight", "bf16", (cfg["vocab_size"], H), {"std": 1.0 / math.sqrt(H)}))
    return out


def _stored(kind: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The stored tensors of one planned tensor (an FP8 weight brings its block scales)."""
    if kind == "fp8":
        return [("", torch.float8_e4m3fn, shape),
                ("_scale_inv", torch.float32, tuple(math.ceil(d / BLOCK) for d in shape))]
    if kind == "f32":
        return [("", torch.float32, shape)]
    return [("", torch.bfloat16, shape)]


def write_tensor(w: TensorFileWriter, index: int, name: str, kind: str, shape, opt: dict, seed: int,
                 expert_strength: np.ndarray, router_norm: np.ndarray, fp8_rms: float) -> None:
    """Draw one planned tensor (seeded by its index) and write it, in row chunks for big ones."""
    gen = np.random.Generator(np.random.SFC64([seed, index]))
    tgen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if kind == "fp8":
        n, k = shape
        codes = (gen.bit_generator.random_raw(-(-n * k // 8)).view(np.uint8)[:n * k] & FP8_MASK).reshape(n, k)
        w.assign(name, slice(None), torch.from_numpy(codes).view(torch.float8_e4m3fn))
        std = 1.0 / math.sqrt(k)
        if "expert" in opt:
            std *= float(expert_strength[opt["expert"]])
        blocks = tuple(math.ceil(d / BLOCK) for d in shape)
        scale = (std / fp8_rms) * (1.0 + 0.2 * (gen.random(blocks) - 0.5))
        w.assign(name + "_scale_inv", slice(None), torch.from_numpy(scale.astype(np.float32)))
    elif kind == "norm":
        w.assign(name, slice(None), (1.0 + 0.05 * torch.randn(shape, generator=tgen)).to(torch.bfloat16))
    elif kind == "f32":
        w.assign(name, slice(None), torch.from_numpy((0.2 * (gen.random(shape) - 0.5)).astype(np.float32)))
    elif kind == "router":
        rows = torch.randn(shape, generator=tgen)
        rows *= torch.from_numpy(router_norm).float()[:, None] / rows.norm(dim=1, keepdim=True)
        w.assign(name, slice(None), rows.to(torch.bfloat16))
    else:
        step = 8192
        for r in range(0, shape[0], step):
            chunk = torch.randn((min(step, shape[0] - r), shape[1]), generator=tgen) * opt["std"]
            w.assign(name, slice(r, r + chunk.shape[0]), chunk.to(torch.bfloat16))


def make_checkpoint(out: Path, *, layers: int = 3, dense_layers: int = 1, experts: int = 256, heads: int = 128,
                    vocab: int = 129280, intermediate: int = 18432, shard_gb: float = 4.0, seed: int = 0,
                    progress: bool = True) -> dict:
    """Write the checkpoint to ``out`` (a new directory); returns a summary with its size."""
    from tqdm import tqdm

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already exists and is not empty")
    if not 0 <= dense_layers <= layers or experts < 8 or experts % 8:
        raise ValueError("need 0 <= dense_layers <= layers and a multiple of 8 routed experts "
                         "(8 groups from 16 experts on; 8 experts form one group)")
    out.mkdir(parents=True, exist_ok=True)
    cfg = official_config(layers, dense_layers, experts, heads, vocab, intermediate)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = np.random.Generator(np.random.SFC64([seed, 1 << 30]))
    expert_strength = 2.0 ** meta.uniform(-1, 1, experts)
    router_norm = 4.0 * 2.0 ** meta.uniform(-1, 1, experts)
    plan = tensor_plan(cfg)
    # Shards of at most shard_gb, filled in file order.
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, kind, shape, _) in enumerate(plan):
        n = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in _stored(kind, shape))
        if shards[-1] and size + n > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    names = [f"model-{j + 1:05d}-of-{len(shards):06d}.safetensors" for j in range(len(shards))]
    total = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                for _, kind, shape, _ in plan for _, d, s in _stored(kind, shape))
    weight_map = {}
    fp8_rms = _fp8_rms()
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        for file, members in zip(names, shards):
            specs = {plan[i][0] + suffix: (d, s) for i in members for suffix, d, s in _stored(plan[i][1], plan[i][2])}
            w = TensorFileWriter(out / file, specs)
            for i in members:
                name, kind, shape, opt = plan[i]
                write_tensor(w, i, name, kind, shape, opt, seed, expert_strength, router_norm, fp8_rms)
                bar.update(sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                               for _, d, s in _stored(kind, shape)))
            w.close()
            weight_map.update({n: file for n in specs})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"path": str(out), "files": len(names), "bytes": total, "seconds": time.perf_counter() - start,
            "layers": layers, "dense_layers": dense_layers, "routed_experts": experts}


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="new checkpoint directory")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (default: %(default)s)")
    p.add_argument("--dense-layers", type=int, default=1, help="dense layers first (default: %(default)s)")
    p.add_argument("--experts", type=int, default=256, help="routed experts per MoE layer (default: %(default)s)")
    p.add_argument("--heads", type=int, default=128, help="attention heads (default: R1's %(default)s)")
    p.add_argument("--vocab", type=int, default=129280, help="vocabulary (default: R1's %(default)s)")
    p.add_argument("--intermediate", type=int, default=18432,
                   help="dense MLP intermediate size (default: R1's %(default)s)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="largest shard in GB (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bar")
    args = p.parse_args(argv)
    summary = make_checkpoint(args.out, layers=args.layers, dense_layers=args.dense_layers, experts=args.experts,
                              heads=args.heads, vocab=args.vocab, intermediate=args.intermediate,
                              shard_gb=args.shard_gb, seed=args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['path']}: {summary['files']} shards, {summary['bytes'] / 1e9:.2f} GB in "
              f"{summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The memory planner: exact parameter counts, bytes by part, fit and the largest kept-expert count."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.model.config import ModelConfig
from sdk import cli
from sdk.tools.plan import count_bytes, count_params, plan

# config.json of the official DeepSeek-R1 release (weights in fp8, layer 61 is the MTP module).
R1_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


@pytest.fixture
def r1_config_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(R1_CONFIG))
    return path


def test_real_r1_totals_and_largest_kept_count_for_80gb(r1_config_path, capsys):
    """671B total / 37B active; the largest int8 kept-expert count next to a 64x256 latent cache."""
    assert cli.main(["plan", str(r1_config_path), "--quant", "int8", "--gpu-mem-gb", "80",
                     "--streams", "64", "--window", "256", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["params_total"] == 671_026_419_200                  # "671B"
    assert 36.5e9 < rep["params_active"] < 38.5e9                 # "about 37B active"
    assert rep["params_active"] == 37_552_297_472
    outside = rep["params_total"] - rep["params"]["routed_experts"]
    assert abs(outside - 17.1e9) < 0.05e9                         # "17.1B outside the routed experts"
    assert rep["params"]["routed_experts"] == 58 * 256 * 3 * 7168 * 2048
    # Each kept expert per layer: 44M params over 58 layers, int8 + fp32 per-channel scales,
    # plus its router row (7168 fp32 weights + 1 bias).
    per_expert = 58 * (3 * 7168 * 2048 + 4 * (2 * 2048 + 7168) + 4 * (7168 + 1))
    assert rep["bytes_per_kept_expert"] == per_expert
    assert abs(per_expert / 1e9 - 2.55) < 0.02
    # Latent cache as the device engine holds it: 64 rows x 256 tokens x 61 layers x 576 float32.
    assert rep["bytes"]["kv_cache"] == 64 * 256 * 61 * 576 * 4
    assert rep["bytes"]["total"] == sum(v for k, v in rep["bytes"].items() if k != "total")
    assert rep["fits"] is False
    # kv_b_proj absorbed in float32 (4.1 GB), the fp32 cache and the fused q/kv copy leave room
    # for 20, not the 22 a storage-only count gives.
    assert rep["max_keep_experts"] == 20

    kwargs = dict(quant="int8", gpu_mem_gb=80, streams=64, window=256)
    at_max = plan(r1_config_path, keep_experts=20, **kwargs)
    above = plan(r1_config_path, keep_experts=21, **kwargs)
    assert at_max["fits"] and not above["fits"]
    assert at_max["bytes"]["total"] <= 80e9 < above["bytes"]["total"]
    # 32 of 256 is "roughly 100 GB" of weights.
    weights32 = sum(v for k, v in plan(r1_config_path, keep_experts=32, **kwargs)["bytes"].items()
                    if k not in ("total", "kv_cache", "runtime_reserve"))
    assert 95e9 < weights32 < 105e9


def test_builtin_name_and_human_table(capsys):
    """``deepseek-r1`` is the built-in real config; the table shows every part and the verdict."""
    assert cli.main(["plan", "deepseek-r1", "--keep-experts", "16", "--streams", "64",
                     "--window", "256"]) == 0
    text = capsys.readouterr().out
    for word in ("embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts",
                 "router", "kv_cache", "runtime_reserve", "total", "fits",
                 "largest --keep-experts that fits 80 GB: 20", "16 of 256"):
        assert word in text, word
    assert "does NOT fit" not in text


def _hf_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(hf_cfg).state_dict()


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=12)


@pytest.mark.parametrize("variant", [
    {}, {"q_lora_rank": None}, {"attention_bias": True}, {"tie_word_embeddings": True},
    {"n_shared_experts": 2, "first_k_dense_replace": 0},
])
def test_counts_match_transformers_state_dict(variant):
    """Parameter and byte counts agree with an independently built transformers model."""
    cfg = ModelConfig(**{**TINY, **variant})
    sd = _hf_state_dict(cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    assert count_params(cfg)["total"] == sum(t.numel() for t in sd.values())

    def is_float_kept(name: str, t: torch.Tensor) -> bool:
        return t.dim() == 1 or ".mlp.gate." in name or name.endswith("embed_tokens.weight")

    def fp32(name: str) -> bool:
        return not name.endswith("embed_tokens.weight")

    int8 = bf16 = 0
    for name, t in sd.items():
        if is_float_kept(name, t):
            size = t.numel() * (4 if fp32(name) else 2)
            int8 += size
            bf16 += size
        else:   # a linear weight, [out, in] or stacked experts [E, out, in]
            rows = t.numel() // t.shape[-1]
            int8 += t.numel() + 4 * rows
            bf16 += 2 * t.numel()
    kw = dict(streams=0, window=0, reserve_gb=0)
    assert count_bytes(cfg, quant="int8", **kw)["total"] == int8
    assert count_bytes(cfg, quant="bf16", **kw)["total"] == bf16


def test_pruned_counts_and_active(tmp_path):
    """Pruning to N experts removes exactly (E - N) experts and router rows per MoE layer."""
    cfg = ModelConfig(**TINY)
    full, pruned = count_params(cfg), count_params(cfg, 4)
    per_expert = 3 * 32 * 24 + 32 + 1
    assert full["total"] - pruned["total"] == 2 * 4 * per_expert
    # One token touches top-2 experts either way; only the dropped router rows leave "active".
    assert full["active"] - pruned["active"] == 2 * 4 * (32 + 1)
    # A pruned checkpoint's config planned as is equals the original planned with --keep-experts.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "n_routed_experts": 4}))
    assert plan(path)["params_total"] == plan(cfg, keep_experts=4)["params_total"]


def test_no_fit_and_invalid_requests(tmp_path, capsys):
    """Too small a GPU gives no kept count; bad requests are refused naming the option."""
    rep = plan("deepseek-r1", gpu_mem_gb=20)
    assert rep["max_keep_experts"] is None and rep["fits"] is False
    with pytest.raises(ValueError, match="keep-experts"):
        plan("deepseek-r1", keep_experts=4)        # fewer than num_experts_per_tok=8
    with pytest.raises(ValueError, match="keep-experts"):
        plan("deepseek-r1", keep_experts=300)
    assert cli.main(["plan", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # fp8 is the release layout: 1 byte a weight and one fp32 per 128x128 block.
    fp8 = plan("deepseek-r1", quant="fp8", streams=0, window=0, reserve_gb=0)["bytes"]
    assert fp8["routed_experts"] == 58 * 256 * (3 * 7168 * 2048 + 4 * 3 * 16 * 56)


def _held_bytes(obj, seen=None) -> int:
    """Bytes of every distinct array or tensor reachable from an engine's attributes."""
    import numpy as np

    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        key = ("np", id(base) if not isinstance(base, np.ndarray) else base.__array_interface__["data"][0])
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes if obj.base is None else getattr(base, "nbytes", obj.nbytes)
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen) for v in obj)
    return 0


@pytest.mark.parametrize("engine", ["cpu", "device"])
def test_engine_plan_is_what_the_engine_holds(engine):
    """engine_bytes against the arrays the engine built from a random model actually holds (within 1%)."""
    from runtime.cuda.engine import DeviceEngine
    from runtime.cpu.engine import Engine
    from runtime.model.transformer import Transformer
    from sdk.tools.plan import engine_bytes

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                      num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
                      n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=64,
                      q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    if engine == "cpu":
        e = Engine(model, capacity=4, window=32)
        held = _held_bytes(list(e.weights) + list(e.buffers) + list(e.route_buffers))
        plan_total = engine_bytes(cfg, engine="cpu", streams=4, window=32)["host"]["total"]
    else:
        e = DeviceEngine(model, capacity=4, window=32, device="cpu")
        del model
        held = _held_bytes([v for v in vars(e).values()])
        planned = engine_bytes(cfg, engine="device", streams=4, window=32, embed_dtype="fp32")
        plan_total = planned["device"]["total"] + planned["host"]["total"]
    assert abs(held - plan_total) <= 0.01 * plan_total, (held, plan_total)


# -- expert parallel: per-device bytes and the exchange between ranks --------------------------------------

def _expert_bytes_device_engine(h: int, inter: int) -> int:
    """One routed expert in DeviceEngine's layout (w13 [H, 2I] and w2 [I, H] int8, fp32 scales), H and I % 8 == 0."""
    return h * 2 * inter + inter * h + 4 * (2 * inter + h)


def test_whole_r1_on_eight_141gb_devices_fits(capsys):
    """256 experts split 32 a device over 8 x 141 GB, everything else on every device: fits."""
    args = ["plan", "deepseek-r1", "--devices", "8", "--gpu-mem-gb", "141", "--quant", "int8"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for word in ("expert parallel over 8 devices", "ranks 0-7", "32 experts", "routed_experts", "exchange",
                 "kv_cache", "runtime_reserve", "GPU memory 8 x 141 GB: fits", "traffic between ranks"):
        assert word in text, word
    assert "does NOT fit" not in text
    assert cli.main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    one = plan("deepseek-r1", quant="int8", gpu_mem_gb=141)
    assert rep["devices"] == 8 and rep["fits"] is True and len(rep["per_device"]) == 8
    routed = 58 * 32 * _expert_bytes_device_engine(7168, 2048)
    exchange = 8 * 17 * 8 * (4 * 7168 + 4)           # 8 ranks' blocks of 17 rows x top-8 pairs
    for rank, dev in enumerate(rep["per_device"]):
        assert dev["experts"] == [32 * rank, 32 * rank + 32]
        parts = dev["bytes"]
        assert parts["routed_experts"] == routed == one["bytes"]["routed_experts"] // 8
        assert parts["exchange"] == exchange
        for name, value in one["bytes"].items():     # everything else as one device holds it
            if name not in ("routed_experts", "total"):
                assert parts[name] == value, name
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total") <= 141e9
        assert dev["fits"] and dev["headroom_bytes"] == rep["gpu_mem_bytes"] - parts["total"]
    assert rep["bytes"] == rep["per_device"][0]["bytes"]
    assert rep["bytes"]["total"] == one["bytes"]["total"] - 7 * routed + exchange
    assert rep["max_keep_experts"] == 256 and rep["min_devices"] == 7


def test_whole_r1_on_eight_80gb_devices_does_not_fit_and_what_would(capsys):
    """8 x 80 GB is short; 16 such devices hold all 256 experts, or 8 hold 136 of them."""
    assert cli.main(["plan", "deepseek-r1", "--devices", "8", "--gpu-mem-gb", "80", "--quant", "int8"]) == 0
    text = capsys.readouterr().out
    for word in ("GPU memory 8 x 80 GB: does NOT fit", "fewest 80 GB devices that hold 256 experts per layer: 16",
                 "largest --keep-experts that fits 8 x 80 GB: 136"):
        assert word in text, word
    rep = plan("deepseek-r1", quant="int8", gpu_mem_gb=80, devices=8)
    assert rep["fits"] is False and rep["min_devices"] == 16 and rep["max_keep_experts"] == 136
    sixteen = plan("deepseek-r1", quant="int8", gpu_mem_gb=80, devices=16)
    assert sixteen["fits"] and sixteen["max_keep_experts"] == 256
    assert not plan("deepseek-r1", quant="int8", gpu_mem_gb=80, devices=15)["fits"]   # 18 experts on rank 0
    assert plan("deepseek-r1", quant="int8", gpu_mem_gb=80, devices=8, keep_experts=136)["fits"]
    above = plan("deepseek-r1", quant="int8", gpu_mem_gb=80, devices=8, keep_experts=137)
    assert not above["fits"]
    # 137 = 8 x 17 + 1: rank 0 holds 18 and decides; the others hold 17 and fit.
    assert [d["experts"][1] - d["experts"][0] for d in above["per_device"]] == [18] + [17] * 7
    assert [d["fits"] for d in above["per_device"]] == [False] + [True] * 7


@pytest.mark.parametrize("args", [
    dict(quant="int8", gpu_mem_gb=141),
    dict(quant="int8", gpu_mem_gb=80, streams=64, window=256),
    dict(quant="int8", gpu_mem_gb=80, engine="cpu", streams=8, window=256),
    dict(quant="fp8", gpu_mem_gb=700),
])
def test_one_device_plan_is_unchanged(args, capsys):
    """``--devices 1`` is the single-device plan: the totals and largest kept counts it gave before."""
    before = {141: (689_840_564_480, 41), 700: (676_726_867_232, 256)}
    # cpu: the engine's buffers at its default 256-row prefill passes (they were 64-row passes)
    before_80 = {"device": (682_433_208_576, 20), "cpu": (680_159_614_708, 21)}
    total, max_keep = before[args["gpu_mem_gb"]] if args["gpu_mem_gb"] != 80 else before_80[args.get("engine", "device")]
    rep = plan("deepseek-r1", devices=1, **args)
    assert rep["bytes"]["total"] == total and rep["max_keep_experts"] == max_keep
    assert rep == plan("deepseek-r1", **args)
    assert rep["per_device"] == [{"rank": 0, "experts": [0, 256], "bytes": rep["bytes"], "fits": rep["fits"],
                                  "headroom_bytes": rep["headroom_bytes"]}]
    assert rep["traffic"] is None and "exchange" not in rep["bytes"]


def test_uneven_split_adds_up_for_every_engine_and_format():
    """Ranks hold contiguous runs of experts (the first ones one more); their routed bytes add up to the whole."""
    from sdk.tools.plan import expert_split

    assert expert_split(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for kwargs in (dict(quant="int8"), dict(quant="int8", engine="cpu", window=64), dict(quant="bf16"),
                   dict(quant="fp8")):
        one = plan("deepseek-r1", keep_experts=100, **kwargs)
        rep = plan("deepseek-r1", keep_experts=100, devices=8, **kwargs)
        assert [d["experts"] for d in rep["per_device"]][:5] == [[0, 13], [13, 26], [26, 39], [39, 52], [52, 64]]
        assert sum(d["bytes"]["routed_experts"] for d in rep["per_device"]) == one["bytes"]["routed_experts"]
        assert rep["bytes"]["total"] == max(d["bytes"]["total"] for d in rep["per_device"])


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_traffic_against_routed_batches(devices):
    """The exchange figures against the pairs the routing rule actually makes on random batches."""
    from runtime.model.routing import RoutingRule, route_torch
    from sdk.tools.plan import expert_split, exchange_traffic

    cfg = ModelConfig(**TINY)
    rule = RoutingRule.from_config(cfg)
    rows, k, pair = 5, cfg.num_experts_per_tok, 4 * cfg.hidden_size + 4
    split = expert_split(cfg.n_routed_experts, devices)
    t = exchange_traffic(cfg, rows, split)
    assert t["pairs_per_layer"] == rows * k and t["bytes_per_pair"] == pair
    assert t["per_step"]["all_ranks_bytes"] == cfg.n_moe_layers * t["per_layer"]["all_ranks_bytes"]
    most_sent = [0] * devices
    most_received = [0] * devices
    gen = torch.Generator().manual_seed(devices)
    for trial in range(200):
        logits = torch.randn(rows, cfg.n_routed_experts, generator=gen)
        bias = torch.randn(cfg.n_routed_experts, generator=gen) * (trial % 3)   # skewed routing too
        ids, _ = route_torch(logits, bias, rule)
        owned = [int(((ids >= a) & (ids < b)).sum()) for a, b in split]
        assert sum(owned) == rows * k
        received = [rows * k - p for p in owned]     # every pair row this rank did not compute
        assert sum(received) * pair == t["per_layer"]["all_ranks_bytes"]
        for r in range(devices):
            most_sent[r] = max(most_sent[r], (devices - 1) * owned[r] * pair)
            most_received[r] = max(most_received[r], received[r] * pair)
    for r, dev in enumerate(t["per_device"]):
        assert most_sent[r] <= dev["send_max_bytes_per_layer"] <= t["per_layer"]["allgather_per_rank_bytes"]
        assert most_received[r] <= dev["receive_max_bytes_per_layer"]
    # The bounds are reached: some batch puts every pair of some rank's rows on one rank, or none there.
    assert max(most_sent) == max(d["send_max_bytes_per_layer"] for d in t["per_device"])
    assert t["per_layer"]["per_rank_mean_bytes"] * devices == t["per_layer"]["all_ranks_bytes"]


def test_devices_refused_when_they_cannot_apply(capsys):
    """More devices than experts, zero devices, or the streaming store across devices: refused, naming --devices."""
    for args in (["--devices", "0"], ["--devices", "257"], ["--devices", "2", "--expert-cache-slots", "8"],
                 ["--devices", "9", "--keep-experts", "8"]):
        assert cli.main(["plan", "deepseek-r1", *args]) == 2
        assert "--devices" in capsys.readouterr().err, args
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    assert "--devices N" in capsys.readouterr().out


def test_readme_shows_what_the_planner_prints(capsys):
    """The docs' expert-parallel plan (docs/r1-real-size.md) is the command's output as it stands."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "r1-real-size.md").read_text()
    for gb in ("141", "80"):
        command = f"$ r1edge plan deepseek-r1 --devices 8 --gpu-mem-gb {gb} --quant int8\n"
        assert command in readme
        shown = readme.split(command, 1)[1].split("```", 1)[0].splitlines()
        assert cli.main(command.split()[2:]) == 0
        printed = capsys.readouterr().out.splitlines()
        if "..." in shown:                            # an excerpt: its lines in order
            shown = [line for line in shown if line != "..."]
            start = printed.index(shown[0])
            assert printed[start:start + len(shown)] == shown
        else:
            assert printed == shown


def test_a_cpu_plan_of_a_small_package_speaks_of_host_memory_in_megabytes(capsys):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "sdk" / "demo" / "model"
    assert cli.main(["plan", str(demo), "--engine", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "host memory 80 GB: fits" in out and "GPU memory" not in out and "CUDA context" not in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.endswith(" MB") and float(total.split()[-2]) > 1.0, total

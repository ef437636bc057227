"""The DeepSeek-V2 family (V2, V2-Lite, V2.5, Coder-V2) against transformers' DeepseekV2ForCausalLM:
softmax routing (greedy and group-limited), no correction bias, with and without a q low
rank, YaRN; through the reference model, the CPU engine and the device engine (on the CPU),
with the engines' bitwise batch invariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from runtime.cuda.engine import DeviceEngine
from runtime.cpu.engine import Engine
from tests.conftest import save_reference

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "group_limited": {},
    "greedy_lite": {"topk_method": "greedy", "n_group": None, "topk_group": None, "q_lora_rank": None},
    "greedy_q_lora": {"topk_method": "greedy", "n_group": 1, "topk_group": 1},
    "group_limited_no_q_lora_yarn": {"q_lora_rank": None, "rope_parameters": YARN},
    "greedy_yarn_all_moe": {"topk_method": "greedy", "n_group": None, "topk_group": None,
                            "first_k_dense_replace": 0, "n_routed_experts": 16, "num_experts_per_tok": 6,
                            "rope_parameters": {**YARN, "mscale_all_dim": 1.0}},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def v2(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_reference(path, seed=11, family="v2", **CONFIGS[request.param])
    return request.param, path, ref


def test_logits_match_the_reference(v2):
    name, path, ref = v2
    model = sdk.load_model(path)
    assert model.config.model_type == "deepseek_v2" and model.config.scoring_func == "softmax"
    torch.manual_seed(2)
    for batch, seq in [(1, 1), (3, 13), (2, 37)]:
        ids = torch.randint(0, ref.config.vocab_size, (batch, seq))
        with torch.no_grad():
            expected = ref(ids).logits
        diff = (model(ids) - expected).abs().max().item()
        assert diff <= 1e-4, f"{name} B={batch} T={seq}: max abs diff {diff}"


def test_generate_matches_the_reference(v2):
    name, path, ref = v2
    model = sdk.load_model(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=16), theirs)


def _run(engine, tokens, schedule):
    return [engine.step_tokens(slots, tokens[slots, t]).copy() for t, slots in enumerate(schedule)]


@pytest.mark.parametrize("kind", ["cpu", "device"])
def test_engines_track_the_reference_and_are_batch_invariant(v2, kind):
    name, path, ref = v2
    model = sdk.load_model(path)
    make = (lambda cap: Engine(model, capacity=cap, window=32)) if kind == "cpu" else \
        (lambda cap: DeviceEngine(model, capacity=cap, window=32, device="cpu"))
    ids = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()
    got = np.concatenate(_run(make(1), ids.numpy(), [np.array([0])] * 24))
    # W8A8 against float: int8 noise, and now and then a near-tie expert flips.
    cos = (want * got).sum(-1) / (np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1))
    assert np.median(cos) > 0.999 and (cos > 0.99).mean() >= 0.9, (name, cos)
    # Bitwise: stream 3 alone, and among others in shuffled slot orders.
    cap, steps = 8, 6
    tokens = np.random.default_rng(6).integers(0, ref.config.vocab_size, (cap, steps))
    alone = _run(make(cap), tokens, [np.array([3])] * steps)
    rng = np.random.default_rng(7)
    schedule = [rng.permutation(np.r_[3, rng.choice([0, 1, 2, 4, 5, 6, 7], b, replace=False)])
                for b in (7, 1, 4, 2, 7, 3)]
    crowd = _run(make(cap), tokens, schedule)
    assert all(np.array_equal(a[0], c[list(s).index(3)]) for a, c, s in zip(alone, crowd, schedule)), name


def test_refuses_what_no_reference_agrees_on(tmp_path):
    from runtime.model.config import ModelConfig

    with pytest.raises(ValueError, match="norm_topk_prob"):
        ModelConfig.from_dict({"model_type": "deepseek_v2", "norm_topk_prob": True, "num_experts_per_tok": 6})
    with pytest.raises(ValueError, match="topk_method 'noaux_tc'"):
        ModelConfig.from_dict({"model_type": "deepseek_v2", "topk_method": "noaux_tc", "num_experts_per_tok": 6})
    with pytest.raises(ValueError, match="scoring_func"):
        ModelConfig.from_dict({"model_type": "deepseek_v2", "scoring_func": "sigmoid", "num_experts_per_tok": 6})
    with pytest.raises(ValueError, match="moe_layer_freq"):
        ModelConfig.from_dict({"model_type": "deepseek_v2", "moe_layer_freq": 2, "num_experts_per_tok": 6})


def test_v2_lite_config_as_released():
    """The shape of DeepSeek-V2-Lite's own config.json (official spelling)."""
    from runtime.model.config import ModelConfig
    from runtime.model.routing import RoutingRule
    from sdk.tools.plan import count_params

    raw = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
           "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
           "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
           "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
           "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "max_position_embeddings": 163840,
           "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": {
               "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
               "original_max_position_embeddings": 4096, "type": "yarn"}, "tie_word_embeddings": False}
    cfg = ModelConfig.from_dict(raw)
    assert RoutingRule.from_config(cfg) == RoutingRule(True, False, False, 64, 1, 1, 6, False, 1.0)
    counts = count_params(cfg)
    # DeepSeek quotes 15.7B total and 2.4B activated; its activated count leaves out the
    # input embedding table, which a token only indexes.
    assert abs(counts["total"] / 1e9 - 15.7) < 0.05, counts
    assert abs((counts["active"] - counts["embeddings"]) / 1e9 - 2.4) < 0.1, counts
    assert ModelConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_compress_prunes_and_quantizes_a_v2_checkpoint(tmp_path):
    """compress runs the V2 rule through calibration, pruning and int8, and the package steps.
    (Pruning a softmax router renormalises its scores over the kept experts: the quality
    report is what says how much that costs.)"""
    from sdk.tools.compress import compress

    src = tmp_path / "src"
    save_reference(src, seed=12, family="v2", **CONFIGS["greedy_lite"])
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(8).integers(0, 97, (16, 24)))
    manifest = compress(src, tmp_path / "pkg", calib=calib, keep_experts=4, progress=False)
    assert manifest["config"]["model_type"] == "deepseek_v2" and manifest["config"]["n_routed_experts"] == 4
    model = sdk.load_model(tmp_path / "pkg")
    engine = Engine(model, capacity=2, window=8)
    assert np.isfinite(engine.step_tokens(np.array([0, 1]), np.array([3, 4]))).all()
    assert 0.5 < manifest["quality"]["greedy_agreement"] <= 1.0, manifest["quality"]


def test_whole_model_fit_of_a_v2_checkpoint(tmp_path):
    """A whole-model fit trains a V2 router (no correction bias to balance) and the package steps."""
    from sdk.tools.fit import fit

    src = tmp_path / "src"
    save_reference(src, seed=13, family="v2", **CONFIGS["greedy_lite"])
    rng = np.random.default_rng(3)
    frames = rng.normal(0.0, 1.0, (8, 24, 2)).astype(np.float32)
    targets = (frames[..., :1] * 2.0 - frames[..., 1:]).astype(np.float32)
    before = sdk.load_model(src).model.layers[-1].mlp.gate.weight.clone()
    report = fit(src, frames, targets, inputs=["a", "b"], outputs=["y"], out=tmp_path / "pkg", train="all",
                 window=4, steps=20, lr=1e-2, batch=4, seed=0, progress=False)
    assert report["balance_rate"] == 0.0 and report["held_out"]["mse"] < report["held_out"]["baseline_mse"]
    model = sdk.load_model(tmp_path / "pkg")
    assert not torch.equal(model.model.layers[-1].mlp.gate.weight, before)
    engine = Engine(model, capacity=1, window=4)
    assert np.isfinite(engine.step_sensor(np.array([0]), frames[:1, 0])).all()

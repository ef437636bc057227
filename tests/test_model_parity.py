"""The runtime model against transformers' DeepseekV3ForCausalLM on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

import sdk
from tests.conftest import save_reference

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CONFIGS = {
    "default": {},
    "no_q_lora": {"q_lora_rank": None},
    "one_group_no_norm": {"n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    "all_moe_4groups": {"first_k_dense_replace": 0, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                        "num_experts_per_tok": 4},
    "two_dense_two_shared": {"first_k_dense_replace": 2, "num_hidden_layers": 4, "n_shared_experts": 2},
    "yarn": {"rope_parameters": YARN},
    "yarn_mscale_differs": {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}},
    "not_interleaved": {"rope_interleave": False},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_reference(tmp_path, name):
    ref = save_reference(tmp_path, seed=1, **CONFIGS[name])
    model = sdk.load_model(tmp_path)
    torch.manual_seed(2)
    for batch, seq in [(1, 1), (3, 13), (2, 37)]:
        ids = torch.randint(0, ref.config.vocab_size, (batch, seq))
        with torch.no_grad():
            expected = ref(ids).logits
        got = model(ids)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{name} B={batch} T={seq}: max abs diff {diff}"


@pytest.mark.parametrize("name", ["default", "no_q_lora", "yarn"])
def test_generate_matches_reference_and_full_rerun(tmp_path, name):
    ref = save_reference(tmp_path, seed=3, **CONFIGS[name])
    model = sdk.load_model(tmp_path)
    torch.manual_seed(4)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7))
    ours = model.generate(ids, max_new_tokens=32)
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # Same as re-running the whole sequence for every new token (no cache).
    seq = ids
    for _ in range(32):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, seq)

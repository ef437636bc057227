"""Shared fixtures: tiny DeepSeek-V3 and V2 checkpoints written by transformers (the reference)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256, routed_scaling_factor=2.5, norm_topk_prob=True)


# The V2 family: softmax routing, no correction bias, weights scaled and not normalised.
TINY_V2 = {**TINY, "n_shared_experts": 2, "routed_scaling_factor": 1.5, "norm_topk_prob": False,
           "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}


def make_reference(seed: int = 0, router_std: float = 0.08, weight_std: float = 0.08, family: str = "v3",
                   **overrides):
    """A random transformers ``DeepseekV3ForCausalLM`` (or ``DeepseekV2ForCausalLM`` with
    ``family="v2"``), eval mode, float32.

    Weights are drawn wider than the default init and the routing bias is random, so that
    routing is diverse and logits are not all near-ties. ``weight_std`` and ``router_std``
    set the spread of the weights (transformers' own init uses 0.02).
    """
    import transformers

    name, base = ("DeepseekV2", TINY_V2) if family == "v2" else ("DeepseekV3", TINY)
    cfg = getattr(transformers, name + "Config")(**{**base, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, name + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            elif p.dim() >= 2:
                p.normal_(0.0, weight_std)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model


def save_reference(path: Path, seed: int = 0, router_std: float = 0.08, weight_std: float = 0.08,
                   family: str = "v3", **overrides):
    """Write a tiny reference checkpoint to ``path``; returns the reference model."""
    model = make_reference(seed, router_std, weight_std, family, **overrides)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(path, reference model) of the default tiny config, written once per session."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    return path, save_reference(path)


def wait_for(cond, timeout: float = 5.0) -> bool:
    """Poll ``cond`` every 5 ms until it is true or ``timeout`` seconds pass; its last value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def assert_refuses_bad_steps(engine) -> None:
    """The stream-engine contract for bad steps (``engine`` has capacity 4 and no adapter)."""
    import numpy as np

    with pytest.raises(ValueError, match="distinct"):
        engine.step_tokens(np.array([1, 1]), np.array([0, 0]))
    with pytest.raises(ValueError, match="distinct and in 0..3"):
        engine.step_tokens(np.array([4]), np.array([0]))
    with pytest.raises(ValueError, match="tokens"):
        engine.step_tokens(np.array([0]), np.array([10_000]))
    with pytest.raises(ValueError, match="I/O adapter"):
        engine.step_sensor(np.array([0]), np.zeros((1, 3), np.float32))

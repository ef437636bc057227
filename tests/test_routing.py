"""The routing rule: both implementations (Numba ``Router``/``route_dispatch`` and torch
``route_torch``) against transformers' DeepseekV3TopkRouter and DeepseekV2TopkRouter, against
each other, ties, the dispatch plan, batch invariance."""

import gc
import logging
import tracemalloc

import numpy as np
import pytest
import torch

from runtime.model.routing import Router, RoutingRule, route_torch, router_logits

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402


def v3_rule(E, G, KG, K, norm, scale):
    """The noaux_tc rule (DeepSeek-V3/R1)."""
    return RoutingRule(False, False, True, E, G, KG, K, norm, scale)


def v3_router(E, G, KG, K, norm, scale, bias, T):
    """The Numba router with an identity gate (its input is the logits)."""
    return Router(np.eye(E, dtype=np.float32), bias, v3_rule(E, G, KG, K, norm, scale), T)


def random_config(rng):
    """A random routing config: E, n_group, topk_group, top_k, norm, scaling."""
    E = int(rng.choice([8, 16, 32, 64, 256]))
    G = int(rng.choice([g for g in (1, 2, 4, 8) if E // g >= 2]))
    KG = int(rng.integers(1, G + 1))
    K = int(rng.integers(1, min(8, KG * E // G) + 1))
    norm = bool(rng.integers(2))
    scale = float(rng.choice([1.0, 2.5, rng.uniform(0.5, 3.0)]))
    return E, G, KG, K, norm, scale


def reference_router(E, G, KG, K, norm, scale, bias):
    """transformers' router with an identity gate, so that its input is the logits."""
    logging.disable(logging.WARNING)  # config construction warns about unrelated defaults
    try:
        cfg = DeepseekV3Config(
            n_routed_experts=E, n_group=G, topk_group=KG, num_experts_per_tok=K, hidden_size=E,
            norm_topk_prob=norm, routed_scaling_factor=scale,
        )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)
    ref = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.copy_(torch.eye(E))
        ref.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return ref


def run_reference(ref, logits):
    """(biased scores, sorted top-k ids, their weights) from the transformers router."""
    lt = torch.from_numpy(logits)
    with torch.no_grad():
        rl, w, idx = ref(lt)
    assert torch.equal(rl, lt), "identity gate must reproduce the logits exactly"
    idx_sorted, order = idx.sort(dim=-1)
    choice = lt.sigmoid() + ref.e_score_correction_bias
    return choice.numpy(), idx_sorted.numpy(), w.gather(1, order).numpy()


def valid_choice(choice, G, KG, K, ours):
    """True if ``ours`` is a top-k the reference rule could return under some tie order.

    The kept groups (those holding our experts, completed by the best others) must carry
    the KG largest group scores, and our experts must be the K largest scores inside them.
    """
    E = choice.shape[0]
    gs = E // G
    gscore = np.sort(choice.reshape(G, gs), axis=1)[:, -2:].sum(axis=1, dtype=np.float32)
    our_groups = sorted(set((np.asarray(ours) // gs).tolist()))
    rest = sorted((g for g in range(G) if g not in our_groups), key=lambda g: -gscore[g])
    kept = our_groups + rest[: KG - len(our_groups)]
    if len(kept) != KG or sorted(gscore[kept])[::-1] != sorted(gscore)[::-1][:KG]:
        return False
    masked = np.full(E, -np.inf, np.float32)
    for g in kept:
        masked[g * gs : (g + 1) * gs] = choice[g * gs : (g + 1) * gs]
    return sorted(masked[ours])[::-1] == sorted(masked)[::-1][:K]


def oracle_rule(logits, bias, G, KG, K, norm, scale):
    """Plain numpy statement of the documented rule: stable sorts break ties to the lower index."""
    T, E = logits.shape
    gs = E // G
    e = np.exp(-logits.astype(np.float64)).astype(np.float32)
    s = np.float32(1) / (np.float32(1) + e)
    choice = s + bias
    top2 = np.sort(choice.reshape(T, G, gs), axis=2)[:, :, -2:]
    gscore = top2[:, :, 1] + top2[:, :, 0]
    groups = np.argsort(-gscore, axis=1, kind="stable")[:, :KG]
    keep = np.zeros((T, G), bool)
    np.put_along_axis(keep, groups, True, axis=1)
    masked = np.where(np.repeat(keep, gs, axis=1), choice, -np.inf)
    idx = np.sort(np.argsort(-masked, axis=1, kind="stable")[:, :K], axis=1)
    w = np.take_along_axis(s, idx, axis=1)
    if norm:
        w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
    return idx, w * np.float32(scale)


def test_matches_transformers_router_on_100k_random_tokens():
    rng = np.random.default_rng(20240917)
    n_tokens = n_ties = 0
    for _ in range(320):
        E, G, KG, K, norm, scale = random_config(rng)
        bias = (rng.standard_normal(E) * rng.choice([1e-3, 0.1, 1.0])).astype(np.float32)
        T = 320
        logits = (rng.standard_normal((T, E)) * rng.choice([0.5, 2.0, 3.0])).astype(np.float32)
        choice, ref_idx, ref_w = run_reference(reference_router(E, G, KG, K, norm, scale, bias), logits)
        plan = v3_router(E, G, KG, K, norm, scale, bias, T).route_logits(logits)
        same = (plan.topk_idx == ref_idx).all(axis=1)
        for t in np.flatnonzero(~same):
            # Only an exact tie in the reference scores may split the two; then torch.topk's
            # (undocumented) order picked the other member and both choices are valid.
            assert valid_choice(choice[t], G, KG, K, plan.topk_idx[t]), (E, G, KG, K, t)
            assert valid_choice(choice[t], G, KG, K, ref_idx[t])
            n_ties += 1
        np.testing.assert_allclose(plan.topk_weight[same], ref_w[same], rtol=0, atol=1e-6)
        n_tokens += T
    assert n_tokens >= 100_000
    assert n_ties <= 2, f"{n_ties} tie-resolved tokens; random data should almost never tie"


def test_planted_ties_resolve_to_lower_index():
    rng = np.random.default_rng(7)
    boundary_ties = 0
    n_tokens = 0
    for _ in range(150):
        E, G, KG, K, norm, scale = random_config(rng)
        gs = E // G
        # Few distinct values: many equal logits and equal biases within and across groups.
        bias = rng.choice(np.array([0.0, 0.0, 0.25, -0.5], np.float32), size=E)
        T = 200
        logits = rng.choice(np.array([-2.0, -0.5, 0.0, 0.5, 1.5], np.float32), size=(T, E))
        if G > 1:  # also copy whole groups, so that group scores tie exactly
            src, dst = rng.choice(G, size=2, replace=False)
            bias[dst * gs : (dst + 1) * gs] = bias[src * gs : (src + 1) * gs]
            logits[: T // 2, dst * gs : (dst + 1) * gs] = logits[: T // 2, src * gs : (src + 1) * gs]
        plan = v3_router(E, G, KG, K, norm, scale, bias, T).route_logits(logits)
        idx, w = oracle_rule(logits, bias, G, KG, K, norm, scale)
        np.testing.assert_array_equal(plan.topk_idx, idx)
        np.testing.assert_allclose(plan.topk_weight, w, rtol=0, atol=1e-6)
        choice, _, _ = run_reference(reference_router(E, G, KG, K, norm, scale, bias), logits)
        for t in range(T):
            assert valid_choice(choice[t], G, KG, K, plan.topk_idx[t])
            srt = np.sort(choice[t])[::-1]
            boundary_ties += K < E and srt[K - 1] == srt[K]
        n_tokens += T
    assert boundary_ties > n_tokens // 4, "the planted data must actually tie at the top-k boundary"


def test_lower_index_wins_exact_ties():
    # All scores equal: groups 0..KG-1 and their first experts must be chosen.
    r = v3_router(16, 4, 2, 3, False, 1.0, np.zeros(16, np.float32), 4)
    plan = r.route_logits(np.zeros((2, 16), np.float32))
    np.testing.assert_array_equal(plan.topk_idx, [[0, 1, 2], [0, 1, 2]])
    # Group 1 ties group 3 on the top-2 sum; group 1 (lower) is kept.
    logits = np.full((1, 16), -4.0, np.float32)
    logits[0, [4, 5, 12, 13]] = 3.0
    plan = v3_router(16, 4, 1, 2, True, 1.0, np.zeros(16, np.float32), 1).route_logits(logits)
    np.testing.assert_array_equal(plan.topk_idx, [[4, 5]])


def check_plan(plan, E, T, K):
    idx, w, pos = plan.topk_idx, plan.topk_weight, plan.topk_pos
    np.testing.assert_array_equal(plan.counts, np.bincount(idx.ravel(), minlength=E))
    np.testing.assert_array_equal(plan.offsets, np.concatenate([[0], np.cumsum(plan.counts)]))
    assert (np.diff(idx, axis=1) > 0).all(), "top-k ids ascend within a token"
    for e in range(E):
        toks = plan.token_ids[plan.offsets[e] : plan.offsets[e + 1]]
        np.testing.assert_array_equal(toks, np.flatnonzero((idx == e).any(axis=1)))  # stable
    for t in range(T):
        for j in range(K):
            p = pos[t, j]
            assert plan.token_ids[p] == t and plan.token_weights[p] == w[t, j]
            assert plan.offsets[idx[t, j]] <= p < plan.offsets[idx[t, j] + 1]
    np.testing.assert_array_equal(plan.active, np.flatnonzero(plan.counts))
    assert plan.n_active == len(plan.active)


def test_dispatch_plan_consistency():
    rng = np.random.default_rng(3)
    for E, G, KG, K, T in [(8, 1, 1, 2, 1), (16, 4, 2, 4, 37), (256, 8, 4, 8, 64), (64, 8, 3, 6, 5)]:
        bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
        logits = rng.standard_normal((T, E)).astype(np.float32)
        check_plan(v3_router(E, G, KG, K, True, 2.5, bias, 64).route_logits(logits), E, T, K)


@pytest.mark.parametrize("E,n_group,topk_group,k", [(32, 4, 2, 4), (16, 1, 1, 3), (64, 8, 3, 6)])
def test_route_torch_matches_the_numba_router_bitwise(E, n_group, topk_group, k):
    """With sigmoid scoring the two implementations give the same experts and weight bits,
    ties included."""
    rng = np.random.default_rng(E)
    T = 200
    # Logits on a coarse grid (many exact ties between experts and between groups) plus a
    # few rows of all-equal logits.
    logits = (rng.integers(-4, 5, (T, E)) / 4).astype(np.float32)
    logits[:5] = 0.5
    bias = (rng.integers(-2, 3, E) / 16).astype(np.float32)
    bias[:3] = 0.0
    rule = v3_rule(E, n_group, topk_group, k, True, 2.5)
    plan = Router(np.zeros((E, 8), np.float32), bias, rule, T).route_logits(logits)
    ids, w = route_torch(torch.from_numpy(logits), torch.from_numpy(bias), rule)
    assert np.array_equal(ids.numpy(), plan.topk_idx.astype(np.int64))
    assert np.array_equal(w.numpy(), plan.topk_weight)


def v2_reference(E, G, KG, K, method, scale):
    """transformers' DeepseekV2TopkRouter with an identity gate."""
    logging.disable(logging.WARNING)
    try:
        cfg = DeepseekV2Config(n_routed_experts=E, n_group=G, topk_group=KG, num_experts_per_tok=K,
                               hidden_size=E, num_attention_heads=1, num_key_value_heads=1,
                               topk_method=method, routed_scaling_factor=scale)
    finally:
        logging.disable(logging.NOTSET)
    ref = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.copy_(torch.eye(E))
    return ref


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_rules_match_transformers_router(method):
    """Softmax scoring, greedy and group-limited (a group scores its best expert), no bias,
    weights scaled and not normalised: both implementations against DeepseekV2TopkRouter."""
    rng = np.random.default_rng(2 if method == "greedy" else 3)
    n_tokens = 0
    for _ in range(60):
        E = int(rng.choice([8, 16, 64, 160]))
        G = 1 if method == "greedy" else int(rng.choice([g for g in (2, 4, 8) if E % g == 0]))
        KG = int(rng.integers(1, G + 1))
        K = int(rng.integers(1, min(8, KG * E // G) + 1))
        scale = float(rng.choice([1.0, 16.0, rng.uniform(0.5, 3.0)]))
        T = 200
        logits = (rng.standard_normal((T, E)) * rng.choice([0.5, 2.0, 4.0])).astype(np.float32)
        with torch.no_grad():
            _, ref_w, ref_idx = v2_reference(E, G, KG, K, method, scale)(torch.from_numpy(logits))
        ref_idx, order = ref_idx.sort(dim=-1)
        ref_w = ref_w.gather(1, order).numpy()
        rule = RoutingRule(True, method == "group_limited_greedy", False, E, G if method != "greedy" else 1,
                           KG if method != "greedy" else 1, K, False, scale)
        plan = Router(np.eye(E, dtype=np.float32), None, rule, T).route_logits(logits)
        ids, w = route_torch(torch.from_numpy(logits), None, rule)
        np.testing.assert_array_equal(plan.topk_idx, ref_idx.numpy())
        np.testing.assert_array_equal(ids.numpy(), ref_idx.numpy())
        np.testing.assert_allclose(plan.topk_weight, ref_w, rtol=5e-6, atol=0)   # a few ulps: sum order, exp
        np.testing.assert_allclose(w.numpy(), ref_w, rtol=5e-6, atol=0)
        n_tokens += T
    assert n_tokens == 12_000


def test_rule_from_config_for_each_family():
    from runtime.model.config import ModelConfig

    v3 = RoutingRule.from_config(ModelConfig.from_dict({"model_type": "deepseek_v3"}))
    assert v3 == RoutingRule(False, False, True, 256, 8, 4, 8, True, 2.5)
    lite = ModelConfig.from_dict({"model_type": "deepseek_v2", "n_routed_experts": 64, "num_experts_per_tok": 6,
                                  "topk_method": "greedy", "n_group": 1, "topk_group": 1, "q_lora_rank": None})
    assert RoutingRule.from_config(lite) == RoutingRule(True, False, False, 64, 1, 1, 6, False, 1.0)
    v2 = ModelConfig.from_dict({"model_type": "deepseek_v2", "n_routed_experts": 160, "num_experts_per_tok": 6,
                                "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
                                "routed_scaling_factor": 16.0})
    assert RoutingRule.from_config(v2) == RoutingRule(True, True, False, 160, 8, 3, 6, False, 16.0)


@pytest.mark.parametrize("H,E", [(64, 8), (61, 16), (1024, 64), (7168, 256), (13, 256)])
def test_router_logits_batch_invariant_and_accurate(H, E):
    rng = np.random.default_rng(H * 1000 + E)
    w = rng.standard_normal((E, H)).astype(np.float32) / np.sqrt(H)
    wt = np.ascontiguousarray(w.T)
    batch = rng.standard_normal((64, H)).astype(np.float32)
    out = np.empty((64, E), np.float32)
    router_logits(batch, wt, out)
    ref = batch.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.sqrt(H))
    for t in (0, 17, 63):
        alone = np.empty((1, E), np.float32)
        router_logits(batch[t : t + 1], wt, alone)
        assert np.array_equal(alone[0], out[t])
        other = rng.standard_normal((64, H)).astype(np.float32)
        other[40] = batch[t]
        o2 = np.empty((64, E), np.float32)
        router_logits(other, wt, o2)
        assert np.array_equal(o2[40], out[t])


def test_router_batch_invariant_and_allocation_free():
    rng = np.random.default_rng(11)
    E, H = 64, 256
    w = torch.from_numpy(rng.standard_normal((E, H)).astype(np.float32) / 16)
    r = Router(w, torch.from_numpy((rng.standard_normal(E) * 0.1).astype(np.float32)), v3_rule(E, 8, 4, 6, True, 2.5), 64)
    x = rng.standard_normal((64, H)).astype(np.float32)
    batch = r(x)
    bi, bw = batch.topk_idx.copy(), batch.topk_weight.copy()
    check_plan(batch, E, 64, 6)
    for t in (0, 31, 63):
        alone = r(torch.from_numpy(x[t : t + 1]))
        assert np.array_equal(alone.topk_idx[0], bi[t]) and np.array_equal(alone.topk_weight[0], bw[t])
    r(x)
    # A call unboxes its NamedTuple arguments, and Numba keeps some of what that creates in
    # a bounded cache; nothing grows with the number of calls and no buffer is allocated
    # (a new plan per call would keep about 2 KB a call here).
    # Only allocations made under this test's frames count: a thread an earlier test left
    # behind (a bridge's I/O loop) may allocate meanwhile, and tracemalloc sees every thread.
    gc.collect()
    tracemalloc.start(64)
    try:
        mine = [tracemalloc.Filter(True, __file__, all_frames=True)]
        base = tracemalloc.take_snapshot().filter_traces(mine)
        for _ in range(3000):
            plan = r(x)
        gc.collect()
        diff = tracemalloc.take_snapshot().filter_traces(mine).compare_to(base, "filename")
        kept = sum(stat.size_diff for stat in diff)
    finally:
        tracemalloc.stop()
    assert kept < 65536, f"steady-state routing kept {kept} bytes after 3000 calls"
    assert plan.topk_idx.base is r.buf.topk_idx


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_group"):
        v3_rule(10, 4, 1, 1, True, 1.0).check()
    with pytest.raises(ValueError, match="at least 2 experts per group"):
        v3_rule(8, 8, 1, 1, True, 1.0).check()
    RoutingRule(True, True, False, 8, 8, 2, 1, False, 1.0).check()   # a group's max needs one expert only
    with pytest.raises(ValueError, match="topk_group"):
        v3_rule(16, 4, 5, 1, True, 1.0).check()
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        v3_rule(16, 4, 1, 5, True, 1.0).check()
    r = Router(np.zeros((8, 4), np.float32), np.zeros(8, np.float32), v3_rule(8, 2, 1, 2, True, 1.0), 4)
    with pytest.raises(ValueError, match=r"float32 \[T, 4\]"):
        r(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="T=5"):
        r(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        Router(np.zeros((8, 4), np.float32), np.zeros(7, np.float32), v3_rule(8, 2, 1, 2, True, 1.0), 4)

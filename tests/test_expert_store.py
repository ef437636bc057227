"""The streaming expert store: LRU cache of expert slots, prefetch, stall/hit accounting, and
engine outputs that are bitwise the same at every cache size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from runtime.cuda.engine import DeviceEngine
from runtime.cuda.expert_store import ExpertStore

CUDA = torch.cuda.is_available()


def _store(layers=2, experts=4, slots=3, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w13 = torch.randint(-127, 128, (layers, experts, 16, 24), dtype=torch.int8, generator=g)
    w2 = torch.randint(-127, 128, (layers, experts, 8, 16), dtype=torch.int8, generator=g)
    return ExpertStore(w13, w2, slots=slots, device=device)


def _holds_right_weights(store: ExpertStore) -> bool:
    return all(torch.equal(store.w13_cache[s].cpu(), store.host_w13[layer][e]) and
               torch.equal(store.w2_cache[s].cpu(), store.host_w2[layer][e])
               for s, (layer, e) in store.contents().items())


def test_lru_eviction_and_contents():
    store = _store(slots=3)
    assert store.acquire(0, [0, 1, 2]) == [0, 1, 2]
    store.release([0, 1, 2])
    store.acquire(0, [0])                   # 0 becomes most recent: LRU order is now 1, 2, 0
    store.release([0])
    (slot,) = store.acquire(1, [3])         # evicts (0, 1), the least recently used
    store.release([slot])
    assert slot == 1 and store.slot_of(0, 1) is None and store.slot_of(1, 3) == 1
    (slot,) = store.acquire(0, [1])         # and now (0, 2)
    store.release([slot])
    assert slot == 2 and store.slot_of(0, 2) is None
    assert store.contents() == {0: (0, 0), 1: (1, 3), 2: (0, 1)}
    assert _holds_right_weights(store)
    s = store.stats()
    assert (s["requests"], s["hits"], s["misses"], s["evictions"]) == (6, 1, 5, 2)
    assert s["bytes_copied"] == s["copies"] * store.expert_bytes == 5 * (16 * 24 + 8 * 16)


def test_pinned_slots_are_never_evicted():
    store = _store(slots=3)
    pinned = store.acquire(0, [0, 1])
    assert store.prefetch(1, [0, 1, 2]) == 1          # one unpinned slot: one copy, the rest dropped
    assert store.slot_of(0, 0) is not None and store.slot_of(0, 1) is not None
    with pytest.raises(ValueError, match="1 of 3 slots unpinned"):
        store.acquire(1, [2, 3])
    store.release(pinned)
    with pytest.raises(ValueError, match="not pinned"):
        store.release(pinned[:1])
    with pytest.raises(ValueError, match=r"expert \(2, 0\) out of range"):
        store.acquire(2, [0])
    with pytest.raises(ValueError, match="duplicate"):
        store.acquire(0, [1, 1])
    with pytest.raises(ValueError, match="slots=9 must be in 1..8"):
        _store(slots=9)


def test_prefetch_hits_and_waste_are_counted():
    store = _store(slots=3)
    assert store.prefetch(0, [1, 2]) == 2
    assert store.prefetch(0, [1]) == 0                # already resident: nothing to copy
    slots = store.acquire(0, [1, 3])
    store.release(slots)
    s = store.stats()
    assert (s["prefetch_issued"], s["prefetch_hits"], s["hits"], s["misses"]) == (2, 1, 1, 1)
    # (0, 2) was prefetched and never used: evicting it counts as waste.
    store.release(store.acquire(1, [0]))
    s = store.stats()
    assert s["evictions"] == 1 and s["prefetch_wasted"] == 1 and store.slot_of(0, 2) is None
    assert s["hits"] + s["misses"] == s["requests"] and _holds_right_weights(store)
    store.reset_stats()
    assert store.stats()["requests"] == 0 and store.stats()["resident"] == 3


# -- the engine through the store ----------------------------------------------------------

@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return sdk.load_model(tiny_checkpoint[0])


def _run(engine, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        slots = np.array([0, 2, 3, 5]) if t % 2 else np.arange(6)
        out.append(engine.step_tokens(slots, rng.integers(0, 97, len(slots))).copy())
    return out


def _check_identical_at_every_cache_size(lm, device, sizes):
    ref = _run(DeviceEngine(lm, capacity=6, window=4, device=device))
    cfg = lm.config
    for n in sizes:
        engine = DeviceEngine(lm, capacity=6, window=4, device=device, expert_cache_slots=n)
        got = _run(engine)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got)), f"outputs differ with {n} cache slots"
        s = engine.stats()["store"]
        assert s["hits"] + s["misses"] == s["requests"] == sum(
            round(a * engine.steps_counted) for a in engine.stats()["active_experts_per_layer"])
        assert s["bytes_copied"] == s["copies"] * engine.store.expert_bytes
        assert s["copies"] == s["misses"] + s["prefetch_issued"]
        assert s["prefetch_hits"] <= s["prefetch_issued"] and s["resident"] <= n
        if n == cfg.n_routed_experts * cfg.n_moe_layers:
            assert s["evictions"] == 0 and s["copies"] <= n


def test_outputs_identical_at_every_cache_size(lm):
    cfg = lm.config
    total = cfg.n_routed_experts * cfg.n_moe_layers
    _check_identical_at_every_cache_size(lm, "cpu", [cfg.num_experts_per_tok, 5, cfg.n_routed_experts, total])


def test_a_cache_holding_everything_hits_after_the_first_pass(lm):
    cfg = lm.config
    engine = DeviceEngine(lm, capacity=6, window=4, device="cpu",
                          expert_cache_slots=cfg.n_routed_experts * cfg.n_moe_layers)
    for e in range(cfg.n_routed_experts):               # warm every expert of every layer
        for m in range(cfg.n_moe_layers):
            engine.store.release(engine.store.acquire(m, [e]))
    engine.reset_stats()
    _run(engine)
    s = engine.stats()["store"]
    assert s["misses"] == 0 and s["copies"] == 0 and s["hit_rate"] == 1.0 and s["stall_s"] == 0.0


def test_streaming_refuses_graphs(lm):
    with pytest.raises(ValueError, match="without graphs|need a CUDA device"):
        DeviceEngine(lm, capacity=2, window=4, device="cpu", graphs=True, expert_cache_slots=4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_store_copies_on_a_side_stream_cuda():
    store = _store(slots=3, device="cuda")
    assert store.copy_stream is not None and all(buf.is_pinned() for s13, s2, _ in store.staging for buf in (s13, s2))
    slots = store.acquire(0, [0, 1])
    # Queue work on the compute stream that reads slot 0, then prefetch into the free slot
    # and over an unpinned one: the copy must wait for the reader (release event).
    reader = store.w13_cache[slots[0]].float().sum()
    store.release(slots)
    store.prefetch(1, [0, 1, 2])
    torch.cuda.synchronize()
    assert reader.item() == store.host_w13[0, 0].float().sum().item()
    assert _holds_right_weights(store)
    s = store.stats()
    assert s["copies"] == 5 and s["prefetch_issued"] == 3 and s["evictions"] == 2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_outputs_identical_at_every_cache_size_cuda(lm):
    cfg = lm.config
    _check_identical_at_every_cache_size(lm, "cuda", [cfg.num_experts_per_tok, cfg.n_routed_experts,
                                                      cfg.n_routed_experts * cfg.n_moe_layers])

"""The stream engine: agreement with the model, batch invariance, ring buffers, no allocation."""
from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import sdk
from runtime.cpu.engine import Engine
from runtime.model.transformer import IOAdapter
from tests.conftest import assert_refuses_bad_steps

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    path, _ = tiny_checkpoint
    return sdk.load_model(path)


def _run_tokens(engine, ids, slot=0):
    """Feed ids [T] one by one into ``slot``; returns logits [T, V]."""
    out = []
    for t in ids:
        out.append(engine.step_tokens(np.array([slot]), np.array([t])).copy())
    return np.concatenate(out)


def test_engine_tracks_the_float_model(lm):
    engine = Engine(lm, capacity=2, window=64)
    ids = torch.randint(0, lm.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = lm(ids)[0].numpy()
    got = _run_tokens(engine, ids[0].tolist())
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    # int8 noise can flip a near-tie expert choice at a few positions of a random tiny
    # model (those positions then differ a lot); everywhere else the agreement is tight.
    assert np.median(cos) >= 0.999 and (cos >= 0.99).mean() >= 0.9, cos
    top2 = np.sort(ref, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.1
    assert clear.sum() >= 10 and (ref.argmax(-1) == got.argmax(-1))[clear].mean() >= 0.9


def test_ring_buffer_matches_sliding_window_attention(lm):
    window = 8
    engine = Engine(lm, capacity=1, window=window)
    ids = torch.randint(0, lm.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lm.lm_head(lm.hidden_states(lm.model.embed_tokens(ids), window=window))[0].numpy()
        full = lm(ids)[0].numpy()
    got = _run_tokens(engine, ids[0].tolist())
    err_window = np.abs(got - ref).max()
    err_full = np.abs(got[window:] - full[window:]).max()
    assert err_window < 0.1 * err_full, (err_window, err_full)


@pytest.mark.parametrize("batch", [1, 2, 7, 33, 64])
def test_batch_invariance_bitwise(lm, batch):
    capacity, steps = 64, 6
    engine = Engine(lm, capacity=capacity, window=4)
    streams = RNG.integers(0, lm.config.vocab_size, (capacity, steps))
    # Reference: stream 5 alone, in slot 0.
    alone = Engine(lm, capacity=capacity, window=4)
    expected = _run_tokens(alone, streams[5].tolist(), slot=0)
    # Stream 5 among batch-1 others, in a shuffled slot order that changes every step.
    others = [s for s in range(capacity) if s != 5][: batch - 1]
    got = []
    for t in range(steps):
        members = np.array([5] + others)
        RNG.shuffle(members)
        logits = engine.step_tokens(members, streams[members, t])
        got.append(logits[list(members).index(5)].copy())
    assert np.array_equal(np.stack(got), expected)


def test_sensor_mode_matches_model_and_is_batch_invariant(lm):
    torch.manual_seed(3)
    lm.adapter = IOAdapter(["level", "temp", "flow"], ["valve", "heater"], lm.config.hidden_size)
    try:
        with torch.no_grad():
            lm.adapter.in_mean.copy_(torch.tensor([1.0, 50.0, 0.3]))
            lm.adapter.in_std.copy_(torch.tensor([0.5, 10.0, 0.1]))
            lm.adapter.out_mean.copy_(torch.tensor([0.5, 0.2]))
        engine = Engine(lm, capacity=8, window=6)
        frames = torch.tensor(RNG.normal([1.0, 50.0, 0.3], [0.5, 10.0, 0.1], (8, 20, 3)), dtype=torch.float32)
        with torch.no_grad():
            ref = lm.forward_sensor(frames, window=6).numpy()
        outs = np.stack([engine.step_sensor(np.arange(8), frames[:, t].numpy()).copy() for t in range(20)], 1)
        err = np.abs(outs - ref) / np.abs(ref).max()
        assert np.quantile(err, 0.9) < 0.01 and err.max() < 0.15, (np.quantile(err, 0.9), err.max())
        alone = Engine(lm, capacity=8, window=6)
        solo = np.stack([alone.step_sensor(np.array([3]), frames[3:4, t].numpy())[0].copy() for t in range(20)])
        assert np.array_equal(solo, outs[3])
    finally:
        lm.adapter = None


@pytest.mark.parametrize("name, value", [("in_std", 0.0), ("in_std", float("nan")), ("out_std", float("inf"))])
def test_an_adapter_that_would_divide_by_zero_is_refused(lm, name, value):
    lm.adapter = IOAdapter(["level", "temp"], ["valve"], lm.config.hidden_size)
    try:
        with torch.no_grad():
            getattr(lm.adapter, name)[0] = value
        with pytest.raises(ValueError, match=name):
            Engine(lm, capacity=1, window=4)
    finally:
        lm.adapter = None


def test_steady_state_step_allocates_nothing(lm):
    """No numpy buffer is created by a step, and the only Numba runtime allocations are the
    fixed per-call wrappers of argument arrays: their count does not grow with the rows,
    the steps or the window, and every one is freed."""
    from numba.core.runtime import _nrt_python, rtsys

    _nrt_python.memsys_enable_stats()
    engine = Engine(lm, capacity=16, window=8)
    tokens = RNG.integers(0, lm.config.vocab_size, 16)

    def nrt_allocs_per_step(n):
        slots = np.arange(n)
        engine.step_tokens(slots, tokens[:n])
        before = rtsys.get_allocation_stats()
        for _ in range(10):
            engine.step_tokens(slots, tokens[:n])
        after = rtsys.get_allocation_stats()
        assert after.alloc - before.alloc == after.free - before.free
        return (after.alloc - before.alloc) / 10

    assert nrt_allocs_per_step(1) == nrt_allocs_per_step(16) == nrt_allocs_per_step(16)
    slots = np.arange(16)
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(20):       # the window (8) wraps around: ring writes allocate nothing either
        engine.step_tokens(slots, tokens)
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    numpy_domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    grown = sum(s.size_diff for s in snap1.filter_traces([numpy_domain]).compare_to(
        snap0.filter_traces([numpy_domain]), "filename") if s.size_diff > 0)
    assert grown == 0, f"numpy buffers allocated in the steady state: {grown} bytes"


def test_bad_steps_are_refused(lm):
    assert_refuses_bad_steps(Engine(lm, capacity=4, window=4))


_HASH_SCRIPT = """
import sys, hashlib, numpy as np, sdk
from runtime.cpu.engine import Engine
engine = Engine(sdk.load_model(sys.argv[1]), capacity=4, window=8)
h = hashlib.sha256()
rng = np.random.default_rng(7)
for _ in range(12):
    h.update(engine.step_tokens(np.arange(4), rng.integers(0, 97, 4)).tobytes())
print(h.hexdigest())
"""


def test_two_processes_give_the_same_hash(tiny_checkpoint):
    path, _ = tiny_checkpoint
    runs = [subprocess.run([sys.executable, "-c", _HASH_SCRIPT, str(path)], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 64


_THREADS_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
import sdk
from runtime.cpu.engine import Engine
Engine(sdk.load_model(sys.argv[1]), capacity=2, window=4).step_tokens(np.arange(2), np.array([1, 2]))
print(torch.get_num_threads())
"""


def test_building_an_engine_keeps_torch_thread_count(tiny_checkpoint):
    """Numba's first parallel launch in a process must not change torch's thread count."""
    path, _ = tiny_checkpoint
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "1"


def test_rotary_stays_exact_at_positions_a_long_run_reaches(lm):
    """A billion steps in (eleven and a half days at 1 kHz) a stream must attend as at the start:
    only relative positions matter, so the outputs may differ by rounding alone. The late
    engine's window starts full of empty entries; with 3 layers of window 16, outputs from
    token 45 on no longer see them, so those are compared."""
    window, layers = 16, lm.config.num_hidden_layers
    tokens = RNG.integers(0, lm.config.vocab_size, 60).tolist()
    clean = layers * (window - 1)
    fresh = _run_tokens(Engine(lm, capacity=1, window=window), tokens)[clean:]
    late_engine = Engine(lm, capacity=1, window=window)
    late_engine.pos[0] = 1_000_000_000
    late = _run_tokens(late_engine, tokens)[clean:]
    # int8 activations turn rounding-level differences into a few LSB flips: compare as the
    # int8-vs-float tests do (a float32 angle at this position is off by up to 0.5 rad).
    cos = (late * fresh).sum(-1) / (np.linalg.norm(late, axis=-1) * np.linalg.norm(fresh, axis=-1))
    assert cos.min() > 0.999, cos.min()
    ids = torch.tensor([tokens[:12]])
    with torch.no_grad():
        embeds = lm.model.embed_tokens(ids)
        start, shifted = lm.hidden_states(embeds), lm.hidden_states(embeds, start=1_000_000_000)
    assert (shifted - start).abs().max() < 1e-3 * start.abs().max()


def test_engine_activation_quantization_is_the_runtime_quant_rule():
    """The engine's inlined per-token int8 (plain, and offset by 128 as its GEMMs read it) gives
    the same bits as runtime.model.quant's."""
    from runtime.cpu.int8 import quantize_row_u8
    from runtime.cpu.kernels import quantize_row
    from runtime.model.quant import quantize_activation

    x = np.random.default_rng(3).standard_normal((64, 200)).astype(np.float32)
    x[:, 0] *= 50          # outliers
    x[1] = 0.0             # an all-zero row
    x[2, :100] = 0.5       # exact .5 multiples of the step exercise round-half-even
    q, s = quantize_activation(torch.from_numpy(x))
    mine_q, mine_s = np.zeros_like(x, dtype=np.int8), np.zeros(64, np.float32)
    offset_q, offset_s = np.zeros_like(x, dtype=np.uint8), np.zeros(64, np.float32)
    for i in range(64):
        mine_s[i] = quantize_row(x[i], mine_q[i])
        offset_s[i] = quantize_row_u8(x[i], offset_q[i])
    assert np.array_equal(mine_q, q.numpy()) and np.array_equal(mine_s, s.numpy()[:, 0])
    assert np.array_equal(offset_q.astype(np.int16) - 128, q.numpy()) and np.array_equal(offset_s, mine_s)


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_gemm_is_exact_for_any_rows_and_shapes(vnni):
    """The blocked int8 GEMM against exact integer products: gathered rows, shapes that are not
    multiples of the blocking, activations offset by 128; the portable and the VNNI kernel."""
    from numba import njit

    from runtime.cpu import int8 as cpu_int8

    if vnni and not cpu_int8.VNNI:
        pytest.skip("this CPU has no AVX-512 VNNI")
    dot1, dot4 = cpu_int8._make_dot(1, vnni, 2), cpu_int8._make_dot(4, vnni)

    @njit
    def gemm(x, xs, idx, n_rows, w, wsum, ws, n_out, out, acc):
        # the loop of cpu_int8.gemm_rows with the chosen kernels: four rows of one block, or one
        # row of two blocks (the last, odd block with its zero-padded neighbour's room in acc)
        k4, xw = w.shape[1] // 64, x.shape[1]
        for b in range(w.shape[0]):
            r = 0
            while r < n_rows:
                m = min(4, n_rows - r)
                if m == 4:
                    dot4(w, b * k4 * 64, x, idx[r] * xw, idx[r + 1] * xw, idx[r + 2] * xw, idx[r + 3] * xw, k4,
                         acc, r * 32, 32)
                elif b + 2 <= w.shape[0]:
                    for rr in range(r, r + m):
                        dot1(w, b * k4 * 64, x, idx[rr] * xw, 0, 0, 0, k4, acc, rr * 32, 32)
                else:
                    for rr in range(r, r + m):
                        dot4(w, b * k4 * 64, x, idx[rr] * xw, idx[rr] * xw, idx[rr] * xw, idx[rr] * xw, k4,
                             acc, rr * 32, 0)
                for rr in range(r, r + m):
                    for lane in range(min(16, n_out - b * 16)):
                        n = b * 16 + lane
                        out[rr, n] = np.float32(acc[rr, lane] - 128 * wsum[n]) * xs[idx[rr]] * ws[n]
                r += m

    rng = np.random.default_rng(5)
    for rows, n_out, k in [(1, 70, 61), (7, 64, 64), (13, 33, 1030), (4, 16, 4)]:
        w = rng.integers(-127, 128, (n_out, k)).astype(np.int8)
        w[0] = 127                                   # extremes of the int8 range
        ws = rng.random(n_out).astype(np.float32)
        blocked, wsum, wscale = cpu_int8.pack_blocked(w, ws)
        x = rng.standard_normal((rows + 3, k)).astype(np.float32)
        xq = np.full((rows + 3, cpu_int8.padded_k(k) + 8), 77, np.uint8)   # padding never counts
        xs = np.array([cpu_int8.quantize_row_u8(x[i], xq[i]) for i in range(rows + 3)], np.float32)
        idx = rng.permutation(rows + 3)[:rows].astype(np.int64)
        out, acc = np.zeros((rows, n_out), np.float32), np.zeros((rows, 32), np.int32)
        gemm(xq.view(np.int32), xs, idx, rows, blocked, wsum, wscale, n_out, out, acc)
        q = xq[idx, :k].astype(np.int64) - 128
        want = ((q @ w.T.astype(np.int64)).astype(np.float32) * xs[idx, None]) * ws
        assert np.array_equal(out, want), (rows, n_out, k)
        if vnni == cpu_int8.VNNI:                    # the engine's own entry point, same bits
            out2 = np.zeros_like(out)
            cpu_int8.gemm_rows(xq.view(np.int32), xs, idx, True, 0, rows, blocked, wsum, wscale, n_out, out2, acc)
            assert np.array_equal(out2, want)


@pytest.mark.parametrize("heads, width, n", [(1, 16, 7), (4, 64, 33), (5, 80, 16), (9, 144, 1), (3, 48, 0)])
def test_rows_dot_gives_the_bits_of_the_scalar_loop(heads, width, n):
    """rows_dot (four problems x four 16-lane blocks per kernel pass, then the leftovers) against
    the scalar loop ``d = 0; d += p[k] * s[k]`` in float32, rounding after each multiply and add."""
    from runtime.cpu.int8 import rows_dot

    rng = np.random.default_rng(heads * 1000 + width + n)
    stride, src_hs, p_hs, dst_hs = width + 16, (n + 1) * (width + 16), n + 3, width + 32
    src = rng.normal(size=heads * src_hs + 16).astype(np.float32)
    p = rng.normal(size=heads * p_hs + 2).astype(np.float32)
    dst = np.full(heads * dst_hs + 8, np.nan, np.float32)
    rows_dot(dst, 8, dst_hs, width, p, 2, p_hs, n, src, 16, src_hs, stride, heads)
    for h in range(heads):
        want = np.zeros(width, np.float32)
        for k in range(n):
            row = src[16 + h * src_hs + k * stride:][:width]
            want = want + p[2 + h * p_hs + k] * row          # float32 multiply, then float32 add
        got = dst[8 + h * dst_hs:][:width]
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), h
        assert np.isnan(dst[8 + h * dst_hs + width:][:dst_hs - width]).all()     # nothing past width


def test_prefill_leaves_the_cache_that_stepping_leaves(lm):
    """A stream's history in chunked passes (window wrapping, several passes, other slots
    busy) gives bitwise the cache, position and logits of stepping it token by token."""
    window, T = 8, 29
    tokens = RNG.integers(0, lm.config.vocab_size, T + 1)
    stepped = Engine(lm, capacity=3, window=window)
    for t in tokens[:T]:
        want = stepped.step_tokens(np.array([1]), np.array([t])).copy()
    filled = Engine(lm, capacity=3, window=window, prefill_rows=5)
    filled.step_tokens(np.array([2, 0]), np.array([3, 4]))
    filled.prefill(1, tokens[:11])
    got = filled.prefill(1, tokens[11:T]).copy()
    assert np.array_equal(got, want[0])
    assert filled.positions()[1] == stepped.positions()[1] == T
    b1, b2 = stepped.buffers, filled.buffers
    assert np.array_equal(b1.keys[:, 1], b2.keys[:, 1]) and np.array_equal(b1.vals[:, 1], b2.vals[:, 1])
    nxt = np.array([1]), np.array([tokens[T]])
    assert np.array_equal(stepped.step_tokens(*nxt), filled.step_tokens(*nxt))
    with pytest.raises(ValueError, match="tokens"):
        filled.prefill(1, np.array([lm.config.vocab_size]))
    with pytest.raises(ValueError, match="distinct and in 0..2"):
        filled.prefill(3, tokens[:2])
    with pytest.raises(ValueError, match="I/O adapter"):
        filled.prefill(0, np.zeros((2, 3), np.float32))


def test_sensor_prefill_matches_stepping():
    model = sdk.load_model(ROOT / "examples" / "sensor_stream" / "model")
    F = len(model.adapter.input_names)
    frames = RNG.normal(0, 1, (40, F)).astype(np.float32)
    stepped = Engine(model, capacity=2, window=16)
    for f in frames:
        want = stepped.step_sensor(np.array([0]), f[None]).copy()
    filled = Engine(model, capacity=2, window=16, prefill_rows=16)
    assert np.array_equal(filled.prefill(0, frames), want[0])
    assert np.array_equal(stepped.buffers.keys, filled.buffers.keys)
    assert np.array_equal(stepped.buffers.vals, filled.buffers.vals)
    with pytest.raises(ValueError, match="frames"):
        filled.prefill(0, frames[:, :2])


def test_engine_exp_is_within_two_ulp_and_keeps_nan():
    """The engine's vectorised exp (softmax and SiLU) against float64 exp rounded to float32."""
    from numba import njit

    from runtime.cpu.kernels import exp_row

    @njit
    def run(x, out, bits):
        exp_row(x, np.float32(1.0), np.float32(0.5), out, x.shape[0], bits, bits.view(np.float32))

    x = np.concatenate([np.linspace(-86, 87, 400_001), RNG.normal(0, 3, 10_000)]).astype(np.float32)
    x = np.concatenate([x, [np.nan]]).astype(np.float32)
    out, bits = np.zeros_like(x), np.zeros(x.shape[0], np.int32)
    run(x, out, bits)
    want = np.exp((x - np.float32(0.5)).astype(np.float64)).astype(np.float32)   # the shift in float32
    ulp = np.abs(out[:-1].view(np.int32).astype(np.int64) - want[:-1].view(np.int32).astype(np.int64))
    assert ulp.max() <= 2, ulp.max()
    assert np.isnan(out[-1])

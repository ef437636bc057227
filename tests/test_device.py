"""The device engine: agreement with the CPU engine, batch invariance, graph-capturable
static shapes, the Triton grouped kernel (under Triton's interpreter when Triton is
installed), and CUDA graph replay on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sdk
from runtime.cuda.engine import DeviceEngine
from runtime.cpu.engine import Engine
from runtime.model.transformer import IOAdapter
from tests.conftest import assert_refuses_bad_steps

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return sdk.load_model(tiny_checkpoint[0])


def _streams(engine, tokens, schedule):
    """Step ``engine`` through ``schedule`` (a list of slot arrays); returns the outputs per step."""
    out = []
    for t, slots in enumerate(schedule):
        out.append(engine.step_tokens(slots, tokens[slots, t]).copy())
    return out


def test_tracks_the_cpu_engine_through_the_ring_buffer(lm):
    window, steps = 8, 20        # the window wraps around more than twice
    dev = DeviceEngine(lm, capacity=3, window=window, device="cpu")
    ref = Engine(lm, capacity=3, window=window)
    tokens = np.random.default_rng(1).integers(0, lm.config.vocab_size, (3, steps))
    schedule = [np.array([0, 1, 2]) if t % 3 else np.array([2, 0]) for t in range(steps)]
    got, want = _streams(dev, tokens, schedule), _streams(ref, tokens, schedule)
    # Same int8 codes and the same arithmetic; only float summation orders differ (router
    # logits, attention), which may flip a near-tie expert choice at some step.
    rel = np.array([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got, want)])
    assert np.median(rel) < 1e-5 and (rel < 1e-3).mean() >= 0.9, rel
    assert np.array_equal(dev.positions(), ref.positions())
    dev.reset_slot(1)
    assert dev.positions()[1] == 0 and not dev.lat[:, 1].any()


def test_sensor_mode_matches_the_cpu_engine(lm):
    torch.manual_seed(3)
    lm.adapter = IOAdapter(["level", "temp", "flow"], ["valve", "heater"], lm.config.hidden_size)
    try:
        with torch.no_grad():
            lm.adapter.in_mean.copy_(torch.tensor([1.0, 50.0, 0.3]))
            lm.adapter.in_std.copy_(torch.tensor([0.5, 10.0, 0.1]))
        dev = DeviceEngine(lm, capacity=4, window=6, device="cpu")
        ref = Engine(lm, capacity=4, window=6)
        assert dev.input_names == ref.input_names and dev.output_names == ref.output_names
        frames = np.random.default_rng(3).normal([1.0, 50.0, 0.3], [0.5, 10.0, 0.1], (12, 4, 3)).astype(np.float32)
        slots = np.array([3, 0, 1, 2])
        got = np.stack([dev.step_sensor(slots, f).copy() for f in frames])
        want = np.stack([ref.step_sensor(slots, f).copy() for f in frames])
        # As for logits: float summation orders differ, so an int8 code may round the other
        # way now and then; almost everything agrees to float32 precision.
        err = np.abs(got - want) / np.abs(want).max()
        assert np.quantile(err, 0.9) < 1e-5 and err.max() < 0.05, (np.quantile(err, 0.9), err.max())
    finally:
        lm.adapter = None


def _check_batch_invariance(lm, device):
    cap, steps = 8, 6
    tokens = np.random.default_rng(2).integers(0, lm.config.vocab_size, (cap, steps))
    alone = _streams(DeviceEngine(lm, capacity=cap, window=4, device=device), tokens, [np.array([5])] * steps)
    rng = np.random.default_rng(3)
    crowd = DeviceEngine(lm, capacity=cap, window=4, device=device)
    schedule = [rng.permutation(np.r_[5, rng.choice([0, 1, 2, 3, 4, 6, 7], b, replace=False)])
                for b in (7, 1, 3, 7, 2, 5)]
    got = [out[list(s).index(5)] for out, s in zip(_streams(crowd, tokens, schedule), schedule)]
    assert all(np.array_equal(a[0], b) for a, b in zip(alone, got))
    # The same stream in another slot gives the same bits too.
    moved = DeviceEngine(lm, capacity=cap, window=4, device=device)
    shifted = np.roll(tokens, -5, axis=0)      # stream 5's tokens now belong to slot 0
    elsewhere = _streams(moved, shifted, [np.array([0])] * steps)
    assert all(np.array_equal(a, b) for a, b in zip(alone, elsewhere))


def test_batch_invariance_bitwise(lm):
    _check_batch_invariance(lm, "cpu")


_FORBIDDEN = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "masked_select",
              "bincount", "item"}


def test_step_has_static_shapes_and_never_reads_back(lm):
    """The step body runs on the meta device (values unknown: any read-back or data-dependent
    shape fails there), and on the CPU it issues the same ops with the same shapes whatever
    the inputs and the active slots, none of them a host read or a dynamic-shape op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    meta = DeviceEngine(lm, capacity=4, window=8, device="meta")
    meta._body("tokens")
    assert meta.logits.is_meta

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = tuple(tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(o, torch.Tensor))
            self.ops.append((func.__name__, shapes))
            return out

    dev = DeviceEngine(lm, capacity=4, window=8, device="cpu")
    traces = []
    for slots, toks in ((np.array([0]), [5]), (np.array([3, 1, 2]), [7, 8, 9]), (np.arange(4), [1, 2, 3, 4])):
        dev._set_rows(slots)
        dev._tok_np[:] = 0
        dev._tok_np[slots] = toks
        dev.tok.copy_(dev._tok_h)
        dev.act.copy_(dev._act_h)
        with Trace() as tr, torch.no_grad():
            dev._body("tokens")
        traces.append(tr.ops)
    names = {op.split(".")[0] for op, _ in traces[0]}
    assert not names & _FORBIDDEN, names & _FORBIDDEN
    assert traces[0] == traces[1] == traces[2]


def test_step_traces_as_one_graph_under_torch_compile(lm):
    """fullgraph=True fails on any graph break (host read, data-dependent control flow)."""
    plain = DeviceEngine(lm, capacity=2, window=4, device="cpu")
    traced = DeviceEngine(lm, capacity=2, window=4, device="cpu", compile_backend="aot_eager")
    tokens = np.random.default_rng(6).integers(0, lm.config.vocab_size, (2, 3))
    schedule = [np.array([0, 1]), np.array([1]), np.array([1, 0])]
    assert all(np.array_equal(a, b) for a, b in zip(_streams(plain, tokens, schedule),
                                                     _streams(traced, tokens, schedule)))


def test_bad_input_is_refused(lm):
    assert_refuses_bad_steps(DeviceEngine(lm, capacity=4, window=4, device="cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DeviceEngine(lm, capacity=1, window=4, device="cpu", graphs=True)
    with pytest.raises(ValueError, match="expert_backend"):
        DeviceEngine(lm, capacity=1, window=4, device="cpu", expert_backend="cutlass")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            DeviceEngine(lm, capacity=1, window=4, device="cuda")


def test_bench_device_report(lm):
    """The report's arithmetic, on the CPU (no graphs there: both rows time the eager step)."""
    from sdk.tools.bench import bench_device

    peak = {"name": "cpu", "table_gbps": None, "copy_gbps": 10.0}
    report = bench_device(lm, batches=[1, 4], device="cpu", steps=3, warmup=1, window=4, peak=peak)
    cfg = lm.config
    pad8 = lambda n: -(-n // 8) * 8  # noqa: E731
    h8, n8, i8 = pad8(cfg.hidden_size), pad8(2 * cfg.moe_intermediate_size), pad8(cfg.moe_intermediate_size)
    per_expert = h8 * n8 + i8 * h8 + 4 * (n8 + h8)          # int8 gate/up and down, float32 scales
    for b in ("1", "4"):
        e = report["batches"][b]
        assert 1 <= e["active_experts_per_layer"] <= min(cfg.n_routed_experts, int(b) * cfg.num_experts_per_tok)
        # The torch backend reads every expert of every MoE layer each step.
        assert e["expert_bytes_read_per_step"] == cfg.n_routed_experts * cfg.n_moe_layers * per_expert
        assert e["active_expert_bytes_per_step"] == pytest.approx(
            e["active_experts_per_layer"] * cfg.n_moe_layers * per_expert)
        gbps = e["expert_bytes_read_per_step"] / (e["graph"]["p50_us"] * 1e-6) / 1e9
        assert e["expert_gbps"] == pytest.approx(gbps) and e["fraction_of_peak"] == pytest.approx(gbps / 10.0)
    assert report["batches"]["1"]["active_experts_per_layer"] == cfg.num_experts_per_tok


def test_bench_device_cuda_needs_a_gpu(tiny_checkpoint):
    from sdk.tools.bench import bench

    if CUDA:
        pytest.skip("a GPU is present: covered by test_bench_device_cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench(tiny_checkpoint[0], batches=[1], device="cuda", steps=2, warmup=1)


_TRITON_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    import sdk
    from runtime.cuda.engine import DeviceEngine
    from runtime.cuda.grouped_int8 import grouped_int8_mm
    g = torch.Generator().manual_seed(0)
    E, K, N, M = 5, 40, 136, 12                   # K, N not multiples of the tiles
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (E + 2, K, N), dtype=torch.int8, generator=g)
    rows = torch.randint(0, M, (30,), dtype=torch.int32, generator=g)
    counts = torch.tensor([4, 0, 19, 3, 4])          # expert 2 spans two 16-row tiles
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    slots = torch.tensor([6, 0, 2, -1, 1], dtype=torch.int32)   # expert 3 is skipped
    out = torch.full((30, N), -7, dtype=torch.int32)
    grouped_int8_mm(x, rows, offsets, slots, w, out, gather=True, block_m=16)
    want = torch.full((30, N), -7, dtype=torch.int32)
    for e in range(E):
        a, b = int(offsets[e]), int(offsets[e + 1])
        if slots[e] >= 0:
            want[a:b] = x[rows[a:b].long()].int() @ w[slots[e]].int()
    assert torch.equal(out, want), "grouped kernel"
    lm = sdk.load_model(sys.argv[1])
    ref = DeviceEngine(lm, capacity=4, window=4, device="cpu", expert_backend="torch")
    tri = DeviceEngine(lm, capacity=4, window=4, device="cpu", expert_backend="triton")
    rng = np.random.default_rng(0)
    for t in range(3):
        slots = np.array([0, 2, 3]) if t % 2 else np.arange(4)
        toks = rng.integers(0, 97, len(slots))
        assert np.array_equal(ref.step_tokens(slots, toks), tri.step_tokens(slots, toks)), t
    assert ref.stats()["active_experts_per_layer"] == tri.stats()["active_experts_per_layer"]
    print("ok")
""")


def test_triton_grouped_kernel_under_the_interpreter(tiny_checkpoint):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(tiny_checkpoint[0])], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# -- CUDA ----------------------------------------------------------------------------------

@needs_cuda
def test_graph_replay_equals_eager_and_backends_agree_cuda(lm):
    tokens = np.random.default_rng(4).integers(0, lm.config.vocab_size, (8, 12))
    rng = np.random.default_rng(5)
    schedule = [np.sort(rng.choice(8, rng.integers(1, 9), replace=False)) for _ in range(12)]
    graph = DeviceEngine(lm, capacity=8, window=8, device="cuda", graphs=True)
    eager = DeviceEngine(lm, capacity=8, window=8, device="cuda", graphs=False, expert_backend=graph.expert_backend)
    dense = DeviceEngine(lm, capacity=8, window=8, device="cuda", graphs=True, expert_backend="torch")
    torch.cuda.set_sync_debug_mode("error")        # any host synchronisation inside the step raises
    try:
        with torch.no_grad():
            eager._body("tokens")
            dense._body("tokens")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager.reset_all()
    dense.reset_all()
    a, b, c = (_streams(e, tokens, schedule) for e in (graph, eager, dense))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "graph replay differs from the eager step"
    assert all(np.array_equal(x, y) for x, y in zip(a, c)), "expert backends differ"
    ref = _streams(Engine(lm, capacity=8, window=8), tokens, schedule)
    rel = np.array([np.abs(x - y).max() / np.abs(y).max() for x, y in zip(a, ref)])
    assert np.median(rel) < 1e-3 and (rel < 1e-2).mean() >= 0.9, rel


@needs_cuda
def test_batch_invariance_bitwise_cuda(lm):
    _check_batch_invariance(lm, "cuda")


@needs_cuda
def test_bench_device_cuda(tiny_checkpoint):
    from sdk.tools.bench import bench

    report = bench(tiny_checkpoint[0], batches=[1, 8], device="cuda", steps=5, warmup=2)
    for b in ("1", "8"):
        e = report["batches"][b]
        assert e["graph"]["p50_us"] > 0 and e["eager"]["p50_us"] > 0 and 0 < e["fraction_of_peak"]
        assert e["expert_bytes_read_per_step"] >= e["active_expert_bytes_per_step"] > 0

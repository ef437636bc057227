"""A run that tells the truth: inputs nobody provides are refused at load, ``r1edge run`` exits
non-zero when the run failed, outputs go to their fail-safe values on stop (read back from a
real Modbus peer), and no one-off work opens a gap between live cycles."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

import sdk
from sdk.cli import main as cli
from sdk.service.config import ConfigError, DeployConfig
from sdk.service.controller import Controller
from tests.conftest import wait_for
from tests.test_controller import DEPLOY, attach_adapter, write_sensor_package

F32 = ModbusTcpClient.DATATYPE.FLOAT32
to_regs = ModbusTcpClient.convert_to_registers
from_regs = ModbusTcpClient.convert_from_registers

# The PLC's registers (holding, big-endian float32): inputs at 0..5, outputs and the
# controller's heartbeat counter at 10..14 (one contiguous block: one write per publish).
CLIENT_MAP = """
[modbus]
mode = "client"
host = "127.0.0.1"
port = {port}
poll_ms = 5
reconnect_max_ms = 200
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
type = "uint16"
address = 14
"""
FAILSAFE = {"valve": 0.0, "heater": 0.5}


class RecordingPLC:
    """A PLC: pymodbus' own TCP server and datastore, in its own thread, noting the time of
    every write to the controller's heartbeat register (address 14)."""

    def __init__(self):
        self.port = 0
        self.heartbeat_writes: list[tuple[int, int]] = []       # (time.monotonic_ns(), value)
        self._loop = self._server = self._thread = None

    async def _action(self, function_code, start_address, address, count, current_registers, set_values):
        if set_values is not None and address <= 14 < address + count:
            self.heartbeat_writes.append((time.monotonic_ns(), int(set_values[14 - address])))
        return None

    def start(self) -> "RecordingPLC":
        started = threading.Event()

        async def serve():
            device = SimDevice(1, simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=64, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]), action=self._action)
            self._server = ModbusTcpServer(device, address=("127.0.0.1", 0))
            await self._server.serve_forever(background=True)
            self.port = self._server.transport.sockets[0].getsockname()[1]
            started.set()
            await self._server.serving

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(5)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(5)
        self._thread.join(5)

    def set_inputs(self, level: float, temp: float, flow: float) -> None:
        regs = sum((to_regs(v, F32) for v in (level, temp, flow)), [])
        asyncio.run_coroutine_threadsafe(self._server.async_setValues(1, 3, 0, regs), self._loop).result(5)


def read_outputs(port: int) -> dict[str, float]:
    """The PLC's output registers, read by an independent client (pymodbus)."""
    client = ModbusTcpClient("127.0.0.1", port=port)
    try:
        assert client.connect()
        rr = client.read_holding_registers(10, count=4, device_id=1)
        assert not rr.isError()
        return {"valve": from_regs(rr.registers[0:2], F32), "heater": from_regs(rr.registers[2:4], F32)}
    finally:
        client.close()


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_checkpoint):
    return write_sensor_package(tmp_path_factory.mktemp("run") / "pkg",
                                attach_adapter(sdk.load_model(tiny_checkpoint[0])))


def write_deploy(tmp_path, package, port: int, *, period_ms=20.0, extra: str = "", drop: str | None = None):
    text = DEPLOY.format(streams=1, period_ms=period_ms, budget_ms=0.75 * period_ms)
    text = text.replace('path = "pkg"', f'path = "{package}"') + extra + CLIENT_MAP.format(port=port)
    if drop is not None:                                   # leave one input out of the register map
        start = text.index(f'signal = "{drop}"') - len("[[modbus.map]]\n")
        text = text[:start] + text[text.index("[[modbus.map]]", start + 20):]
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_input_no_source_provides_is_refused_at_load(tmp_path, package, capsys):
    deploy = write_deploy(tmp_path, package, 5020, drop="temp")
    with pytest.raises(ConfigError, match=r"inputs\[1\] 'temp': no configured source provides it"):
        DeployConfig.load(deploy)
    assert DeployConfig.load(deploy, check_sources=False).unsourced_inputs() == ["temp"]
    assert cli(["run", str(deploy), "--duration", "0.1"]) == 2
    assert "'temp': no configured source" in capsys.readouterr().err
    # ZeroMQ sensor frames may carry any input: with [zmq] the same map is fine.
    deploy.write_text(deploy.read_text() + '[zmq]\nsensors = "tcp://127.0.0.1:*"\n')
    assert DeployConfig.load(deploy).unsourced_inputs() == []


def test_a_run_where_every_cycle_failed_safe_exits_1(tmp_path, package, capsys):
    deploy = write_deploy(tmp_path, package, free_port())      # no PLC listening there
    assert cli(["run", str(deploy), "--duration", "0.5", "--json"]) == 1
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert stats["cycles"] > 5 and stats["failsafe_cycles"] == stats["cycles"]
    assert stats["valid_input_cycles"] == 0 and stats["never_valid_inputs"] == ["level", "temp", "flow"]
    assert stats["verdict"]["ok"] is False
    assert "no valid input ever arrived" in captured.err and "modbus bridge not connected" in captured.err


def test_the_fail_safe_fraction_decides_the_verdict(tmp_path, package):
    deploy = write_deploy(tmp_path, package, 5020)
    base = deploy.read_text()
    for limit, healthy in ((0.5, False), (0.9, True)):
        deploy.write_text(base.replace("[loop]\n", f"[loop]\nmax_failsafe_fraction = {limit}\n", 1))
        with Controller.from_config(deploy, bridges=False) as ctrl:
            for i in range(20):                    # 3 of every 4 frames out of range: 75% fail-safe
                ctrl.step({"level": 1.0 if i % 4 == 0 else 99.0, "temp": 50.0, "flow": 0.3})
            verdict = ctrl.verdict()
            assert ctrl.stats()["failsafe_cycles_by_reason"]["invalid_input"] == 15
        assert verdict["ok"] is healthy, verdict
        if not healthy:
            assert "fail-safe in 15 of 20 cycles (75.0%), above [loop] max_failsafe_fraction = 0.5" in verdict["why"]


def test_a_stream_failing_safe_and_recovering_is_logged_once_each_way(tmp_path, package, caplog):
    deploy = write_deploy(tmp_path, package, 5020)
    with Controller.from_config(deploy, bridges=False) as ctrl, caplog.at_level("INFO", "sdk.service.controller"):
        for level in (1.0, 1.0, 99.0, 99.0, 99.0, 1.0, 1.0):       # out of range for three cycles
            ctrl.step({"level": level, "temp": 50.0, "flow": 0.3})
        assert ctrl.stats()["status_changes"] == 2
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "stream 'main'" in r.getMessage()
            and "->" not in r.getMessage()]
    assert said == [("WARNING", "stream 'main': failsafe (invalid_input: level range)"),
                    ("INFO", "stream 'main': ok again after 3 cycles failsafe")], said


def run_until(ctrl, plc, cond, what):
    """Run the controller in a thread until ``cond()``; returns (thread, result)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(ctrl.run()), daemon=True)
    thread.start()
    assert wait_for(cond, timeout=20), f"timed out waiting for {what}"
    return thread, result


@pytest.mark.parametrize("on_stop_heater", ["failsafe", "hold"])
def test_outputs_go_fail_safe_at_a_real_modbus_peer_on_stop(tmp_path, package, on_stop_heater):
    plc = RecordingPLC().start()
    try:
        plc.set_inputs(1.0, 50.0, 0.3)
        deploy = write_deploy(tmp_path, package, plc.port)
        deploy.write_text(deploy.read_text().replace("failsafe = 0.5\n", f'failsafe = 0.5\non_stop = "{on_stop_heater}"\n'))
        with Controller.from_config(deploy) as ctrl:
            running = lambda: len(plc.heartbeat_writes) > 10 and read_outputs(plc.port) != FAILSAFE
            thread, result = run_until(ctrl, plc, running, "the model's outputs at the PLC")
            ctrl.stop()
            thread.join(10)
            last = ctrl.cycle.limiter.last[0].tolist()
            # the bridge may write once on connecting, before the first cycle: writes <= cycles + 1
            assert result["cycles"] >= 10 and result["failsafe_cycles"] < result["cycles"]
        after = read_outputs(plc.port)                   # the bridge has closed: what the PLC kept
        assert after["valve"] == FAILSAFE["valve"]
        if on_stop_heater == "hold":
            assert after["heater"] == pytest.approx(last[1], abs=1e-6) and after["heater"] != FAILSAFE["heater"]
        else:
            assert after["heater"] == FAILSAFE["heater"]
    finally:
        plc.stop()


def test_outputs_go_fail_safe_in_server_mode_before_the_plc_loses_the_connection(tmp_path, package):
    deploy = write_deploy(tmp_path, package, 0)
    text = deploy.read_text()
    text = text[:text.index("[modbus]")] + (text[text.index("[modbus]"):]
                                            .replace('mode = "client"', 'mode = "server"')
                                            .replace("poll_ms = 5\nreconnect_max_ms = 200\n", ""))
    deploy.write_text(text.replace("port = 0", "port = 0\nstop_linger_ms = 2000"))
    with Controller.from_config(deploy) as ctrl:
        thread, result = run_until(ctrl, None, lambda: ctrl.bridge("modbus").port, "the Modbus server")
        port = ctrl.bridge("modbus").port
        plc = ModbusTcpClient("127.0.0.1", port=port)
        assert plc.connect()
        seen = []
        regs = sum((to_regs(v, F32) for v in (1.0, 50.0, 0.3)), [])

        def poll():                                      # the PLC: write inputs, read outputs, every 5 ms
            while True:
                if plc.write_registers(0, regs, device_id=1).isError():
                    return
                rr = plc.read_holding_registers(10, count=4, device_id=1)
                if rr.isError():
                    return
                seen.append((from_regs(rr.registers[0:2], F32), from_regs(rr.registers[2:4], F32)))
                time.sleep(0.005)
        poller = threading.Thread(target=lambda: _quiet(poll), daemon=True)
        poller.start()
        assert wait_for(lambda: ctrl.counters["valid_input_cycles"] > 10 and seen and seen[-1] != (0.0, 0.5),
                        timeout=20), "timed out waiting for the model's outputs"
        ctrl.stop()
        thread.join(10)
        poller.join(10)
        plc.close()
    assert seen[-1] == (0.0, 0.5)                        # the last values the PLC read were the fail-safe


def _quiet(fn):
    try:
        fn()
    except Exception:                                    # the connection closed under the poller
        pass


def test_no_gap_longer_than_two_periods_between_live_outputs(tmp_path, package):
    """The outputs reach the PLC every cycle from the first one: nothing one-off (Numba, the
    full garbage collection and gc.freeze(), the first engine steps) happens between cycles."""
    period_ms = 20.0
    plc = RecordingPLC().start()
    try:
        plc.set_inputs(1.0, 50.0, 0.3)
        deploy = write_deploy(tmp_path, package, plc.port, period_ms=period_ms)
        with Controller.from_config(deploy) as ctrl:
            thread, result = run_until(ctrl, plc, lambda: len({v for _, v in plc.heartbeat_writes}) > 210,
                                       "210 cycles at the PLC")
            ctrl.stop()
            thread.join(10)
    finally:
        plc.stop()
    times, values = [], []
    for t, v in plc.heartbeat_writes:                    # the first write of each heartbeat value
        if not values or v != values[-1]:
            times.append(t)
            values.append(v)
    gaps_ms = np.diff(np.array(times[:200])) / 1e6
    assert len(gaps_ms) == 199
    assert gaps_ms.max() <= 2 * period_ms, (
        f"a {gaps_ms.max():.1f} ms gap between live outputs after cycle {int(gaps_ms.argmax())}")

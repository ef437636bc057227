"""Modbus client mode: the bridge polls a PLC simulated with pymodbus' own server and datastore."""
import asyncio
import threading
import time

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc_bridge.modbus import ModbusBridge
from tests.conftest import wait_for

F32 = ModbusTcpClient.DATATYPE.FLOAT32
to_regs = ModbusTcpClient.convert_to_registers
from_regs = ModbusTcpClient.convert_from_registers


class SimPLC:
    """A PLC: pymodbus' TCP server over a SimDevice (separate coil, discrete, holding and
    input tables), in its own thread and event loop."""

    def __init__(self, port: int = 0, input_registers: int = 16):
        self.port = port
        self.input_registers = input_registers
        self._loop = None
        self._server = None
        self._thread = None

    def start(self) -> "SimPLC":
        started = threading.Event()

        async def serve():
            device = SimDevice(1, simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=128, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=self.input_registers, values=0, datatype=DataType.REGISTERS)]))
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
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
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(5)
        self._thread.join(5)
        self._thread = None

    def set(self, fc: int, address: int, values) -> None:
        asyncio.run_coroutine_threadsafe(self._server.async_setValues(1, fc, address, values), self._loop).result(5)

    def get(self, fc: int, address: int, count: int):
        return asyncio.run_coroutine_threadsafe(
            self._server.async_getValues(1, fc, address, count), self._loop).result(5)


INPUTS = ["level", "temp", "press", "door"]
OUTPUTS = {"valve": 0.25, "pump": 0.0}
MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32", "word_order": "big"},
    {"signal": "temp", "table": "input", "address": 0, "type": "float32", "word_order": "little"},
    {"signal": "press", "table": "holding", "address": 4, "type": "int16", "scale": 0.01},
    {"signal": "door", "table": "discrete", "address": 3},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32", "word_order": "big"},
    {"signal": "pump", "table": "coil", "address": 2},
]


def make_bridge(port, **extra):
    cfg = {"mode": "client", "host": "127.0.0.1", "port": port, "device_id": 1, "map": MAP, "poll_ms": 10,
           "request_timeout_ms": 2000, "reconnect_min_ms": 10, "reconnect_max_ms": 40, **extra}
    return ModbusBridge.from_config(cfg, INPUTS, OUTPUTS)


@pytest.fixture
def plc():
    p = SimPLC().start()
    yield p
    p.stop()


def plc_inputs(plc, level, temp, press_raw, door):
    plc.set(3, 0, to_regs(level, F32, word_order="big"))
    plc.set(4, 0, to_regs(temp, F32, word_order="little"))
    plc.set(3, 4, [press_raw & 0xFFFF])
    plc.set(2, 3, [door])


def snap_values(bridge):
    return {k: v for k, (v, _) in bridge.snapshot().items()}


def test_client_polls_inputs_and_writes_outputs(plc):
    plc_inputs(plc, 1.25, -7.5, -1234, True)
    plc.set(3, 10, to_regs(0.125, F32, word_order="big"))      # the PLC's own valve command
    with make_bridge(plc.port) as b:
        assert wait_for(lambda: len(b.snapshot()) == 4)
        v = snap_values(b)
        assert v["level"] == 1.25 and v["temp"] == -7.5 and v["door"] == 1.0
        assert v["press"] == pytest.approx(-12.34)
        # Nothing is written before the first publish: the PLC keeps its own outputs until the
        # controller has decided (a bumpless start), then they follow publish().
        polls = b.health()["io_us"]["n"]
        assert wait_for(lambda: b.health()["io_us"]["n"] >= polls + 5)
        assert from_regs(plc.get(3, 10, 2), F32) == 0.125 and plc.get(1, 2, 1) == [False]
        b.publish({"valve": 0.75, "pump": 1.0}, "ok", 1, 10.0)
        assert wait_for(lambda: from_regs(plc.get(3, 10, 2), F32) == 0.75 and plc.get(1, 2, 1) == [True])
        plc_inputs(plc, 2.5, 20.0, 500, False)
        assert wait_for(lambda: snap_values(b) == {"level": 2.5, "temp": 20.0, "press": 5.0, "door": 0.0})
        h = b.health()
        assert h["connected"] and h["reconnects"] == 0 and h["io_us"]["n"] > 0


def test_client_survives_plc_restart(plc):
    plc_inputs(plc, 1.0, 1.0, 100, False)
    with make_bridge(plc.port) as b:
        assert wait_for(lambda: snap_values(b).get("level") == 1.0)
        b.publish({"valve": 0.6}, "ok", 1, 0.0)
        assert wait_for(lambda: from_regs(plc.get(3, 10, 2), F32) == pytest.approx(0.6))
        port = plc.port
        reconnects = b.health()["reconnects"]
        plc.stop()
        assert wait_for(lambda: not b.health()["connected"])
        # While the PLC is away the bridge retries with a capped backoff.
        assert wait_for(lambda: b.health()["reconnect_delay_ms"] == 40.0)
        restarted = SimPLC(port).start()
        try:
            plc_inputs(restarted, 3.0, 4.0, 200, True)
            assert wait_for(lambda: snap_values(b).get("level") == 3.0)
            assert b.health()["reconnects"] >= reconnects + 1 and b.health()["connected"]
            # The restarted PLC lost its registers; the bridge writes the current outputs again.
            assert wait_for(lambda: from_regs(restarted.get(3, 10, 2), F32) == pytest.approx(0.6))
            b.publish({"valve": 0.7}, "ok", 2, 0.0)
            assert wait_for(lambda: from_regs(restarted.get(3, 10, 2), F32) == pytest.approx(0.7))
        finally:
            restarted.stop()
        assert b.health()["errors"].get("io_errors", 0) + b.health()["errors"].get("connect_failures", 0) > 0


def test_client_backoff_is_capped_without_plc():
    probe = SimPLC().start()
    port = probe.port
    probe.stop()                                   # a port nothing listens on
    with make_bridge(port) as b:
        seen = []
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seen.append(b.health()["reconnect_delay_ms"])
            time.sleep(0.003)
        assert max(seen) == 40.0 and 10.0 in seen   # doubled from 10 ms and capped at 40 ms
        assert not b.health()["connected"]
        plc = SimPLC(port).start()
        try:
            assert wait_for(lambda: b.health()["connected"])
            assert b.health()["reconnect_delay_ms"] == 0.0
        finally:
            plc.stop()


def test_client_heartbeat_stop_writes_failsafe_to_plc(plc):
    with make_bridge(plc.port, heartbeat={"address": 100, "timeout_ms": 150}) as b:
        beat = [1]
        plc.set(3, 100, beat)
        time.sleep(0.05)
        beat[0] += 1
        plc.set(3, 100, beat)
        assert wait_for(lambda: b.health()["heartbeat_ok"])
        b.publish({"valve": 0.9}, "ok", 1, 0.0)
        assert wait_for(lambda: from_regs(plc.get(3, 10, 2), F32) == pytest.approx(0.9))
        # The PLC stops its heartbeat: the bridge writes the fail-safe value to the PLC.
        assert wait_for(lambda: not b.health()["heartbeat_ok"])
        assert wait_for(lambda: from_regs(plc.get(3, 10, 2), F32) == 0.25)
        assert b.health()["failsafe"]
        b.publish({"valve": 0.8}, "ok", 2, 0.0)
        time.sleep(0.05)
        assert from_regs(plc.get(3, 10, 2), F32) == 0.25
        plc.set(3, 100, [beat[0] + 1])
        assert wait_for(lambda: b.health()["heartbeat_ok"])
        b.publish({"valve": 0.8}, "ok", 3, 0.0)
        assert wait_for(lambda: from_regs(plc.get(3, 10, 2), F32) == pytest.approx(0.8))


def test_client_stops_promptly_right_after_publish(plc):
    """stop() straight after publish() (the end of every controller run) must not hang."""
    for _ in range(5):
        b = make_bridge(plc.port).start()
        assert wait_for(lambda: b.health()["connected"])
        b.publish({"valve": 0.5, "pump": 0.0}, "ok", 1, 10.0)
        start = time.monotonic()
        b.stop()
        assert time.monotonic() - start < 2.0

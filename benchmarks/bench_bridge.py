"""Latency the PLC bridge adds over raw pymodbus and pyzmq round trips on loopback.

Modbus, server mode: an external pymodbus client reads 10 holding registers (and writes 2)
from a plain pymodbus server over a SimDevice, then from ``ModbusBridge`` in server mode
with the same registers mapped as five float32 outputs (and one float32 input).

Modbus, client mode: the time ``ModbusBridge`` takes for one poll (reads of every mapped
block, decoding, storing) against the same plain pymodbus server, next to a raw read of the
same block paced like the poll (every 1 ms).

ZeroMQ: a sensor frame goes out and the decision comes back. Raw: PUB -> SUB, an echo
thread unpacks the frame, packs a decision and sends it on a PUB -> SUB. Bridge: a
``SensorPublisher`` -> ``ZmqBridge`` SUB -> ``on_input`` callback -> ``publish()`` -> XPUB ->
SUB. Same payload (8 float values) both ways. Also the caller-side cost of ``publish()``
and ``snapshot()``, which the controller pays inside its cycle, and the hand-off of a
decision published from the controller's thread to the I/O thread that owns the socket.

Raw and bridge round trips run in alternating blocks of 100, so that both see the same
load from whatever else shares the machine; the first two blocks of each are warm-up.

Usage: ``.venv/bin/python benchmarks/bench_bridge.py [--n 3000] [--json FILE]``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time

import msgpack
import zmq
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc_bridge.messages import decode_decision
from plc_bridge.modbus import ModbusBridge
from plc_bridge.zmq_bridge import SensorPublisher, ZmqBridge


def pct(samples_ns: list[int]) -> dict:
    """p50/p99/max in microseconds."""
    s = sorted(samples_ns)
    n = len(s)
    return {"n": n, "p50": s[(n - 1) // 2] / 1e3, "p99": s[min(n - 1, (99 * n) // 100)] / 1e3, "max": s[-1] / 1e3}


class LoopThread:
    """An asyncio loop in a thread, for servers the benchmark talks to from another thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _plain_server():
    device = SimDevice(1, simdata=[SimData(0, count=64, values=0, datatype=DataType.REGISTERS)])
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    return server, server.transport.sockets[0].getsockname()[1]


BLOCK = 100  # round trips per block; raw and bridge blocks alternate so both see the same load


async def _modbus_rtts(ports: dict[str, int], n: int) -> dict:
    """Read 10 registers and write 2, alternating blocks between the servers in ``ports``."""
    clients = {}
    for name, port in ports.items():
        clients[name] = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await clients[name].connect()
    samples = {f"{name}_{op}": [] for name in ports for op in ("read", "write")}
    for block in range((n + 2 * BLOCK - 1) // BLOCK + 2):
        for name, client in clients.items():
            for i in range(BLOCK):
                t0 = time.perf_counter_ns()
                rr = await client.read_holding_registers(10, count=10, device_id=1)
                t1 = time.perf_counter_ns()
                wr = await client.write_registers(0, [0x3FC0, i], device_id=1)
                t2 = time.perf_counter_ns()
                assert not rr.isError() and not wr.isError(), (rr, wr)
                if block >= 2:  # warm-up
                    samples[f"{name}_read"].append(t1 - t0)
                    samples[f"{name}_write"].append(t2 - t1)
    for client in clients.values():
        client.close()
    return {k: pct(v) for k, v in samples.items()}


def bench_modbus_server(n: int) -> dict:
    lt = LoopThread()
    server, port = lt.run(_plain_server())
    # Back-to-back round trips go faster than the default per-connection budget
    # ([modbus] max_request_rate = 1000/s, see benchmarks/bench_flood.py): lifted here to
    # measure the latency itself.
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "max_request_rate": 1e6,
           "map": [{"signal": "in0", "table": "holding", "address": 0, "type": "float32"}]
           + [{"signal": f"out{i}", "table": "holding", "address": 10 + 2 * i, "type": "float32"} for i in range(5)]}
    with ModbusBridge.from_config(cfg, ["in0"], {f"out{i}": 0.0 for i in range(5)}) as bridge:
        bridge.publish({f"out{i}": float(i) for i in range(5)}, "ok", 1, 0.0)
        result = asyncio.run(_modbus_rtts({"raw": port, "bridge": bridge.port}, n))
        result["bridge_handler"] = bridge.health()["io_us"]
    lt.run(server.shutdown())
    lt.close()
    return result


async def _raw_block_reads(port: int, n: int, period_s: float) -> dict:
    """Raw reads paced like the bridge's poll (a thread that wakes every period, not a hot loop)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    samples = []
    for i in range(n + 200):
        t0 = time.perf_counter_ns()
        rr = await client.read_holding_registers(0, count=10, device_id=1)
        if i >= 200:
            samples.append(time.perf_counter_ns() - t0)
        assert not rr.isError()
        await asyncio.sleep(period_s)
    client.close()
    return pct(samples)


def bench_modbus_client(n: int, seconds: float) -> dict:
    lt = LoopThread()
    server, port = lt.run(_plain_server())
    raw = asyncio.run(_raw_block_reads(port, n, 0.001))
    cfg = {"mode": "client", "host": "127.0.0.1", "port": port, "poll_ms": 1,
           "map": [{"signal": f"in{i}", "table": "holding", "address": 2 * i, "type": "float32"} for i in range(5)]
           + [{"signal": "out", "table": "holding", "address": 20, "type": "float32"}]}
    with ModbusBridge.from_config(cfg, [f"in{i}" for i in range(5)], {"out": 0.0}) as bridge:
        time.sleep(seconds)
        poll = bridge.health()["io_us"]
    lt.run(server.shutdown())
    lt.close()
    return {"raw_block_read": raw, "bridge_poll": poll}


VALUES = {f"s{i}": float(i) for i in range(8)}


def _echo_rtt(pub_send, recv, seq: int) -> int:
    t0 = time.perf_counter_ns()
    pub_send(seq)
    while True:
        m = recv()
        if m["seq"] == seq and m["stream"] == "main":
            return time.perf_counter_ns() - t0


def bench_zmq(n: int) -> dict:
    ctx = zmq.Context()
    # Raw: PUB -> echo thread (SUB -> unpack -> pack -> PUB) -> SUB
    a_pub, a_sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    b_pub, b_sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pa = a_sub.bind_to_random_port("tcp://127.0.0.1")
    pb = b_pub.bind_to_random_port("tcp://127.0.0.1")
    a_sub.setsockopt(zmq.SUBSCRIBE, b"")
    b_sub.setsockopt(zmq.SUBSCRIBE, b"")
    a_pub.connect(f"tcp://127.0.0.1:{pa}")
    b_sub.connect(f"tcp://127.0.0.1:{pb}")
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if a_sub.poll(100):
                f = msgpack.unpackb(a_sub.recv(), raw=False)
                b_pub.send(msgpack.packb({"v": 1, "stream": f["stream"], "seq": f["seq"], "t_ns": time.time_ns(),
                                          "outputs": f["values"], "status": "ok", "latency_us": 0.0}))

    t = threading.Thread(target=echo, daemon=True)
    t.start()

    def raw_send(seq):
        a_pub.send(msgpack.packb({"v": 1, "stream": "main", "seq": seq, "t_ns": time.time_ns(), "values": VALUES}))

    def raw_recv():
        return msgpack.unpackb(b_sub.recv(), raw=False)

    # Bridge: SensorPublisher -> bridge -> on_input -> publish -> XPUB -> SUB
    holder = {}

    def on_input(stream, frame):
        holder["bridge"].publish(frame["values"], "ok", frame["seq"], 0.0, stream=stream)

    bridge = ZmqBridge(sensors="tcp://127.0.0.1:*", decisions="tcp://127.0.0.1:*", on_input=on_input)
    holder["bridge"] = bridge
    bridge.start()
    pub = SensorPublisher(bridge.endpoints["sensors"], context=ctx)
    assert pub.wait_ready(5)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bridge.endpoints["decisions"])

    def bridge_send(seq):
        pub.send("main", seq, VALUES)

    def bridge_recv():
        return decode_decision(sub.recv())

    for send, recv_sock in ((raw_send, b_sub), (bridge_send, sub)):  # past the slow-joiner window
        while True:
            send(-1 % (1 << 64))
            if recv_sock.poll(50):
                recv_sock.recv()
                break
    samples = {"raw": [], "bridge": []}
    seq = 0
    for block in range((n + BLOCK - 1) // BLOCK + 2):
        for name, send, recv in (("raw", raw_send, raw_recv), ("bridge", bridge_send, bridge_recv)):
            for _ in range(BLOCK):
                dt = _echo_rtt(send, recv, seq)
                seq += 1
                if block >= 2:
                    samples[name].append(dt)
    stop.set()
    t.join()
    health = bridge.health()
    # Caller-side cost of publish() and snapshot() from the controller's thread.
    pub_calls, snap_calls = [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        bridge.publish(VALUES, "ok", i, 0.0, stream="cost")
        t1 = time.perf_counter_ns()
        bridge.snapshot("main")
        t2 = time.perf_counter_ns()
        pub_calls.append(t1 - t0)
        snap_calls.append(t2 - t1)
        time.sleep(0.0005)  # paced like a fast control cycle
    handoff = bridge.health()["publish_us"]
    for sock in (a_pub, a_sub, b_pub, b_sub, sub):
        sock.close(linger=0)
    pub.close()
    bridge.stop()
    ctx.term()
    return {"raw_echo": pct(samples["raw"]), "bridge_echo": pct(samples["bridge"]),
            "bridge_sensor_io": health["io_us"], "publish_call": pct(pub_calls),
            "publish_handoff_from_controller_thread": handoff, "snapshot_call": pct(snap_calls)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="round trips per measurement (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {"modbus_server": bench_modbus_server(args.n), "modbus_client": bench_modbus_client(args.n, 2.0),
               "zmq": bench_zmq(args.n)}

    def row(name, d):
        print(f"  {name:<44} p50 {d['p50']:8.1f} us   p99 {d['p99']:8.1f} us   (n={d['n']})")

    ms, mc, zq = results["modbus_server"], results["modbus_client"], results["zmq"]
    print("Modbus TCP, server mode (pymodbus client, 10-register read / 2-register write):")
    row("raw pymodbus server, read", ms["raw_read"])
    row("ModbusBridge server, read", ms["bridge_read"])
    row("raw pymodbus server, write", ms["raw_write"])
    row("ModbusBridge server, write", ms["bridge_write"])
    row("ModbusBridge handler time per request", ms["bridge_handler"])
    print(f"  added: read p50 {ms['bridge_read']['p50'] - ms['raw_read']['p50']:+.1f} us, "
          f"p99 {ms['bridge_read']['p99'] - ms['raw_read']['p99']:+.1f} us; "
          f"write p50 {ms['bridge_write']['p50'] - ms['raw_write']['p50']:+.1f} us, "
          f"p99 {ms['bridge_write']['p99'] - ms['raw_write']['p99']:+.1f} us")
    print("Modbus TCP, client mode (one 10-register block, every 1 ms):")
    row("raw pymodbus client read", mc["raw_block_read"])
    row("ModbusBridge poll (read + decode + store)", mc["bridge_poll"])
    print(f"  added: p50 {mc['bridge_poll']['p50'] - mc['raw_block_read']['p50']:+.1f} us, "
          f"p99 {mc['bridge_poll']['p99'] - mc['raw_block_read']['p99']:+.1f} us")
    print("ZeroMQ, sensor frame in -> decision out (8 values, msgpack):")
    row("raw pyzmq echo", zq["raw_echo"])
    row("ZmqBridge echo (on_input -> publish)", zq["bridge_echo"])
    print(f"  added: p50 {zq['bridge_echo']['p50'] - zq['raw_echo']['p50']:+.1f} us, "
          f"p99 {zq['bridge_echo']['p99'] - zq['raw_echo']['p99']:+.1f} us")
    row("sensor frame: receive -> stored (I/O thread)", zq["bridge_sensor_io"])
    row("publish() call, controller thread", zq["publish_call"])
    row("publish() -> on the socket, controller thread", zq["publish_handoff_from_controller_thread"])
    row("snapshot() call, controller thread", zq["snapshot_call"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The systemd notify protocol over a real Unix datagram socket: ``r1edge run`` says READY=1,
pings the watchdog, reports STATUS= and says STOPPING=1 on SIGTERM; a stalled loop or a hung
model stops the pings."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from sdk.service.controller import Controller
from sdk.service.notify import Notifier, ServiceMonitor, watchdog_interval
from tests.conftest import wait_for
from tests.ops_helpers import GOOD, ROOT, factory_deploy


class NotifySocket:
    """The service manager's end: a bound datagram socket collecting (arrival time, fields)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key):
        return [(t, f) for t, f in self.messages if key in f]

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_r1edge_run_speaks_the_notify_protocol(tmp_path, notify_socket):
    deploy = factory_deploy(tmp_path, period_ms=20.0, extra=f'[recorder]\npath = "{tmp_path / "rec"}"\n')
    with Controller.from_config(deploy) as ctrl:                 # a recording of good inputs to replay
        for _ in range(50):
            ctrl.step(GOOD)
    run_deploy = factory_deploy(tmp_path, period_ms=20.0)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000",
           "PYTHONPATH": str(ROOT)}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "run", str(run_deploy), "--inputs",
                             str(tmp_path / "rec"), "--repeat", "--json"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # five pings and a STATUS line of its own (sent about once a second) before stopping
        status_only = lambda: [f for _, f in notify_socket.messages if set(f) == {"STATUS"}]  # noqa: E731
        assert wait_for(lambda: len(notify_socket.with_key("WATCHDOG")) >= 5 and status_only(), timeout=120), \
            (notify_socket.messages, proc.poll())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert wait_for(lambda: notify_socket.with_key("STOPPING"), timeout=5)
    msgs = notify_socket.messages
    kinds = [next(k for k in ("READY", "WATCHDOG", "STOPPING", "STATUS") if k in f) for _, f in msgs]
    assert kinds[0] == "READY" and msgs[0][1]["READY"] == "1"
    assert "streams: main ok" in msgs[0][1]["STATUS"]
    first_ping = kinds.index("WATCHDOG")
    stopping = kinds.index("STOPPING")
    assert first_ping < stopping and "WATCHDOG" not in kinds[stopping:]
    assert all(f["WATCHDOG"] == "1" for _, f in notify_socket.with_key("WATCHDOG"))
    assert msgs[stopping][1] == {"STOPPING": "1", "STATUS": "stopping"}
    assert any(k == "STATUS" for k in kinds[1:stopping])
    assert '"cycles"' in out                                      # the final stats went out


def run_monitored(tmp_path, notify_socket, source, *, engine=None, seconds=6.0):
    deploy = factory_deploy(tmp_path, period_ms=10.0)
    with Controller.from_config(deploy, engine=engine) as ctrl:
        monitor = ServiceMonitor(ctrl, Notifier(notify_socket.path), watchdog_s=0.2).start()
        try:
            ctrl.run(seconds, source=source)
        finally:
            monitor.close()
    return ctrl


def test_a_stalled_loop_stops_the_pings(tmp_path, notify_socket):
    window = {}

    def source(seq, t_ns):
        if seq == 250:                                       # once the pings run: hang in this cycle
            window["start"] = time.monotonic()
            time.sleep(2.0)
            window["end"] = time.monotonic()
        return dict(GOOD)

    run_monitored(tmp_path, notify_socket, source)
    pings = [t for t, _ in notify_socket.with_key("WATCHDOG")]
    before = [t for t in pings if t < window["start"]]
    during = [t for t in pings if window["start"] < t < window["end"]]
    after = [t for t in pings if t > window["end"]]
    assert notify_socket.with_key("READY")
    # 2 s is 20 ping periods; at most one ping answered just before the hang may land in it.
    assert len(before) >= 3 and len(during) <= 1 and len(after) >= 3, (len(before), len(during), len(after))
    assert any("not answering" in f["STATUS"] for t, f in notify_socket.with_key("STATUS")
               if window["start"] < t < window["end"] + 0.5)


def test_a_hung_model_stops_the_pings(tmp_path, notify_socket):
    """The loop keeps cycling (fail-safe, reason busy) while inference hangs: no pings."""
    from runtime.cpu.engine import Engine
    from sdk.tools.loading import load_model
    from tests.ops_helpers import DEMO

    engine = Engine(load_model(DEMO / "model"), capacity=1, window=32)
    hang = {"at": None, "until": None}

    class Hanging:
        """The real engine, except that one step takes 2 s (a stuck accelerator, say)."""
        input_names, output_names, window = engine.input_names, engine.output_names, engine.window
        capacity = 1

        def reset_slot(self, slot):
            engine.reset_slot(slot)

        def step_sensor(self, slots, feats):
            if hang["at"] is None and hang["armed"]:
                hang["at"] = time.monotonic()
                time.sleep(2.0)
                hang["until"] = time.monotonic()
            return engine.step_sensor(slots, feats)

    hang["armed"] = False

    def source(seq, t_ns):
        if seq == 250:
            hang["armed"] = True
        return dict(GOOD)

    ctrl = run_monitored(tmp_path, notify_socket, source, engine=Hanging())
    assert ctrl.stats()["watchdog"]["busy_cycles"] > 100
    pings = [t for t, _ in notify_socket.with_key("WATCHDOG")]
    during = [t for t in pings if hang["at"] + 0.05 < t < hang["until"]]
    assert len([t for t in pings if t < hang["at"]]) >= 3 and len(during) <= 1
    assert len([t for t in pings if t > hang["until"] + 0.3]) >= 3          # and they resume


def test_environment():
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert Notifier.from_env({}) is None
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier("relative/path")


def test_abstract_socket_address():
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"r1edge-test-{os.getpid()}"
    server.bind("\0" + name)
    try:
        n = Notifier("@" + name)
        assert n.send("READY=1")
        assert server.recv(100) == b"READY=1"
        n.close()
    finally:
        server.close()

"""ZeroMQ admission, authenticated control, supervision and mode precedence, on real sockets.

- Admission: with ``[model] streams`` as a list, an intruder's frames sent before main's first
  are counted and dropped and main runs; with a count, a stream bound to Modbus keeps its slot
  reserved against an intruder, and a silent ZeroMQ stream gives its slot back after
  ``[zmq] stream_idle_s``.
- Authenticated control: "mode" over a plain control socket is refused (the reply names
  ``[zmq] insecure_control``, counted) while "status" works; over CURVE from a key in
  ``curve.allowed`` it is carried out; a key not in ``allowed`` fails the handshake.
- Supervision: the ZeroMQ I/O loop killed by an exception (a real frame through the socket)
  shows as ``running`` false in health, ``r1edge_bridge_errors_total{bridge="zmq",kind="io_loop"}``
  in the metrics and fail-safe reason ``bridge`` on the stream it feeds, then restarts.
- Mode precedence by change: a PLC (a real Modbus client) rewriting the same auto coil every
  scan does not undo an operator's "mode" command; flipping the coil does take over.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.request

import pytest
import zmq.auth
from pymodbus.client import ModbusTcpClient

from plc_bridge.zmq_bridge import ControlClient, CurveServer, SensorPublisher, ZmqBridge, load_client_curve, make_keys
from sdk.service.config import DeployConfig
from sdk.service.controller import Controller
from tests.conftest import wait_for
from tests.ops_helpers import GOOD, factory_deploy

ZMQ = '[zmq]\nsensors = "tcp://127.0.0.1:*"\ndecisions = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n'


class Running:
    """A controller's ``run()`` in a thread, stopped and closed on exit."""

    def __init__(self, ctrl: Controller, duration_s: float = 60.0):
        self.ctrl = ctrl
        self.thread = threading.Thread(target=ctrl.run, kwargs={"duration_s": duration_s}, daemon=True)

    def __enter__(self) -> Controller:
        self.thread.start()
        assert wait_for(lambda: self.ctrl.running and len(self.ctrl.bridge("zmq").endpoints) == 3, 30)
        return self.ctrl

    def __exit__(self, *exc) -> None:
        self.ctrl.stop()
        self.thread.join(30)
        self.ctrl.close()
        assert not self.thread.is_alive()


class Feeder:
    """Sends ``GOOD`` frames for ``stream`` every 10 ms in a thread (``values`` may be changed)."""

    def __init__(self, endpoint: str, stream: str = "main", values: dict | None = None):
        self.pub = SensorPublisher(endpoint)
        assert self.pub.wait_ready()
        self.stream, self.values, self.seq = stream, dict(values or GOOD), 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.pub.send(self.stream, self.seq, self.values)
            self.seq += 1

    def __enter__(self) -> "Feeder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)
        self.pub.close()


def intrude(endpoint: str, n: int = 20, stream: str = "intruder") -> None:
    """``n`` valid frames for ``stream`` (an intruder's), sent before anything else."""
    with SensorPublisher(endpoint) as pub:
        assert pub.wait_ready()
        for seq in range(n):
            pub.send(stream, seq, GOOD)
        time.sleep(0.3)                                   # let them arrive before main's first


def test_a_list_of_streams_admits_only_those_and_the_intruder_is_counted(tmp_path):
    deploy = factory_deploy(tmp_path, extra=ZMQ)
    deploy.write_text(deploy.read_text().replace("[model]\n", '[model]\nstreams = ["main"]\n', 1))
    with Running(Controller.from_config(deploy)) as ctrl:
        eps = ctrl.bridge("zmq").endpoints
        intrude(eps["sensors"])
        with Feeder(eps["sensors"]):
            assert wait_for(lambda: "main" in ctrl.slots and ctrl.status("main")["status"] == "ok", 20)
        health = ctrl.bridge("zmq").health()
        assert health["bad"]["unknown_stream"] == 20
        assert list(ctrl.slots) == ["main"] and ctrl.counters["dropped_streams"] == 0   # dropped at the edge


def test_a_count_reserves_bound_streams_and_idle_zmq_streams_give_their_slot_back(tmp_path):
    # [modbus] is bound to "main": with one slot, an intruder over ZeroMQ cannot take it.
    modbus = ('[modbus]\nmode = "server"\nhost = "127.0.0.1"\nport = 0\n'
              '[[modbus.map]]\nsignal = "auto"\ntable = "coil"\naddress = 0\n')
    deploy = factory_deploy(tmp_path, extra=ZMQ + "stream_idle_s = 0.5\n" + modbus)
    with Running(Controller.from_config(deploy)) as ctrl:
        eps = ctrl.bridge("zmq").endpoints
        intrude(eps["sensors"])
        assert wait_for(lambda: ctrl.counters["dropped_streams"] > 0, 10)
        assert "intruder" not in ctrl.slots
        with Feeder(eps["sensors"]):
            assert wait_for(lambda: "main" in ctrl.slots, 10)
            assert wait_for(lambda: ctrl.bridge("zmq").health()["released_streams"] >= 1, 10)  # the intruder went quiet
    # Without a bound stream the first comer takes the slot, but only until it goes quiet.
    deploy = factory_deploy(tmp_path, extra=ZMQ + "stream_idle_s = 0.5\n")
    with Running(Controller.from_config(deploy)) as ctrl:
        eps = ctrl.bridge("zmq").endpoints
        intrude(eps["sensors"])
        assert wait_for(lambda: "intruder" in ctrl.slots, 10)
        with Feeder(eps["sensors"]):
            assert wait_for(lambda: list(ctrl.slots) == ["main"] and ctrl.status("main")["status"] == "ok", 20)
        assert ctrl.counters["dropped_streams"] > 0


def test_mode_needs_curve_from_an_allowed_key_and_status_stays_open(tmp_path, caplog):
    keys = tmp_path / "keys"
    server_pub, server_sec = make_keys(keys, "server")
    allowed = tmp_path / "allowed"
    client_pub, client_sec = make_keys(allowed, "operator")
    make_keys(tmp_path / "others", "stranger")
    calls = []

    def handler(stream, mode):
        calls.append((stream, mode))
        return {"stream": stream, "mode": mode}

    # A plain control socket: "mode" refused with the key to set, counted; "status" answered.
    plain = ZmqBridge(control="tcp://127.0.0.1:*")
    plain.set_mode_handler(handler)
    plain.set_status_provider(lambda: {"running": True})
    with plain:
        with ControlClient(plain.endpoints["control"]) as client:
            refused = client.request("mode", stream="main", mode="manual")
            assert refused["ok"] is False and "insecure_control" in refused["error"]
            assert client.request("status")["ok"] is True
        assert calls == [] and plain.health()["bad"]["control_unauthenticated"] == 1
    # CURVE with curve.allowed: the operator's key may switch, a stranger's never gets through.
    public, secret = zmq.auth.load_certificate(server_sec)
    secure = ZmqBridge(control="tcp://127.0.0.1:*", curve=CurveServer(public, secret, allowed))
    secure.set_mode_handler(handler)
    with secure:
        with ControlClient(secure.endpoints["control"], curve=load_client_curve(server_pub, client_sec)) as client:
            answer = client.request("mode", stream="main", mode="manual")
        assert answer["ok"] is True and calls == [("main", "manual")]
        stranger = load_client_curve(server_pub, tmp_path / "others" / "stranger.key_secret")
        with ControlClient(secure.endpoints["control"], curve=stranger) as client:
            with pytest.raises(TimeoutError):
                client.request("mode", stream="main", mode="auto", timeout_ms=1000)
        assert calls == [("main", "manual")]
        assert wait_for(lambda: secure.health()["bad"].get("auth_denied", 0) >= 1, 5)
    # insecure_control = true lets a plain client switch (and r1edge run warns about it at start).
    open_ = ZmqBridge.from_config({"control": "tcp://127.0.0.1:*", "insecure_control": True}, tmp_path)
    open_.set_mode_handler(handler)
    with caplog.at_level(logging.WARNING, logger="plc_bridge.zmq_bridge"), open_:
        assert any("insecure_control = true" in r.getMessage() for r in caplog.records)
        with ControlClient(open_.endpoints["control"]) as client:
            assert client.request("mode", stream="main", mode="auto")["ok"] is True
    assert calls[-1] == ("main", "auto")


class FaultyZmq(ZmqBridge):
    """A ZeroMQ bridge whose I/O loop dies on a frame for stream "boom" (an injected fault on the
    real receive path), restarting 3 s later."""

    RESTART_MIN_S = 3.0

    def _on_sensor(self, frames):
        if b"boom" in frames[0]:
            raise RuntimeError("injected fault in the zmq I/O loop")
        super()._on_sensor(frames)


def test_a_dead_zmq_loop_fails_its_streams_safe_as_bridge_and_shows_in_health_and_metrics(tmp_path):
    deploy = factory_deploy(tmp_path, extra=ZMQ + '[metrics]\nlisten = "127.0.0.1:0"\n')
    cfg = DeployConfig.load(deploy)
    bridge = FaultyZmq.from_config(cfg.zmq, cfg.base_dir, [s.name for s in cfg.wiring().inputs])
    with Running(Controller(cfg, bridges=[bridge])) as ctrl:
        eps = bridge.endpoints
        with Feeder(eps["sensors"]), SensorPublisher(eps["sensors"]) as faulty:
            assert faulty.wait_ready()
            assert wait_for(lambda: "main" in ctrl.slots and ctrl.status()["status"] == "ok", 20)
            faulty.send("boom", 0, GOOD)
            assert wait_for(lambda: ctrl.status()["reason"] == "bridge", 5)
            assert bridge.health()["running"] is False
            port = ctrl.metrics.port
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'r1edge_bridge_errors_total{bridge="zmq",kind="io_loop"} 1.0' in text
            assert wait_for(lambda: ctrl.status()["status"] == "ok", 15)      # restarted
        health = bridge.health()
        assert health["running"] is True and health["restarts"] == 1 and health["errors"]["io_loop"] == 1, \
            {k: health[k] for k in ("running", "down", "restarts", "errors", "frames")}
        assert ctrl.stats()["failsafe_cycles_by_reason"]["bridge"] > 0


def test_a_plc_rewriting_its_auto_coil_every_scan_does_not_undo_an_operator_command(tmp_path):
    modbus = ('[modbus]\nmode = "server"\nhost = "127.0.0.1"\nport = 0\n'
              '[[modbus.map]]\nsignal = "auto"\ntable = "coil"\naddress = 0\n'
              '[[modbus.map]]\nsignal = "valve"\ntable = "holding"\naddress = 10\ntype = "float32"\n')
    deploy = factory_deploy(tmp_path, extra=ZMQ + "insecure_control = true\n" + modbus)
    no_switch = {k: v for k, v in GOOD.items() if k != "auto"}
    coil = {"value": True}
    stop = threading.Event()
    with Running(Controller.from_config(deploy)) as ctrl:
        plc = ModbusTcpClient("127.0.0.1", port=ctrl.bridge("modbus").port)
        assert plc.connect()

        def scan():                                       # the PLC writes its coil every 10 ms scan
            while not stop.wait(0.01):
                plc.write_coil(0, coil["value"], device_id=1)
        scanner = threading.Thread(target=scan, daemon=True)
        try:
            with Feeder(ctrl.bridge("zmq").endpoints["sensors"], values=no_switch):
                scanner.start()
                assert wait_for(lambda: "main" in ctrl.slots and ctrl.status()["mode"] == "auto", 20)
                with ControlClient(ctrl.bridge("zmq").endpoints["control"]) as op:
                    assert op.request("mode", stream="main", mode="manual")["ok"]
                assert wait_for(lambda: ctrl.status()["mode"] == "manual", 5)
                seen = set()
                end = time.monotonic() + 1.0                 # ~100 PLC scans rewriting auto = 1
                while time.monotonic() < end:
                    seen.add(ctrl.status()["mode"])
                    time.sleep(0.005)
                assert seen == {"manual"}
                coil["value"] = False                     # the PLC flips its coil: a change, it takes over
                assert wait_for(lambda: ctrl.status()["mode"] == "manual", 5)
                time.sleep(0.1)
                coil["value"] = True
                assert wait_for(lambda: ctrl.status()["mode"] in ("auto", "warmup"), 5)
                # the decision reaches the PLC's register through the same cycle
                assert plc.read_holding_registers(10, count=2, device_id=1).registers != [0, 0]
        finally:
            stop.set()
            scanner.join(5)
            plc.close()

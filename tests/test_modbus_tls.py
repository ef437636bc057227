"""Modbus/TCP Security: mutual TLS and roles, tested with clients that are not pymodbus
(Python's ssl module carrying MBAP frames packed by hand, and ``openssl s_client``); the
certificates of the refusal cases are made with the ``openssl`` command."""
import select
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from plc_bridge.modbus import ModbusBridge
from plc_bridge.modbus_tls import ROLE_OID, role_of
from sdk.cli import main as cli
from tests.conftest import wait_for
from tests.raw_plc import RawPLC

MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32"},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32"},
]
READ_VALVE = struct.pack(">BHH", 3, 10, 2)
WRITE_LEVEL = struct.pack(">BHHB", 16, 0, 2, 4) + struct.pack(">f", 1.5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed; scripts/bootstrap.sh installs it")
    d = tmp_path_factory.mktemp("pki")
    assert cli(["modbus-cert", str(d), "--server", "127.0.0.1,localhost",
                "--client", "scada=operator", "--client", "hmi=viewer"]) == 0
    # A certificate from a CA the bridge does not know, made with openssl itself.
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem",
        "-days", "2", "-subj", "/CN=rogue CA")
    (d / "role.cnf").write_text(f"[ext]\n{ROLE_OID} = ASN1:UTF8String:operator\n")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.csr", "-subj", "/CN=rogue")
    run("x509", "-req", "-in", "rogue.csr", "-CA", "rogue-ca.pem", "-CAkey", "rogue-ca.key", "-CAcreateserial",
        "-out", "rogue.pem", "-days", "2", "-extfile", "role.cnf", "-extensions", "ext")
    return d


@pytest.fixture
def bridge(pki):
    tls = {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"), "ca": str(pki / "ca.pem"),
           "write_roles": ["operator"]}
    b = ModbusBridge.from_config({"mode": "server", "host": "127.0.0.1", "port": 0, "map": MAP, "tls": tls},
                                 ["level"], {"valve": 0.25}).start()
    yield b
    b.stop()


def client_context(pki, name=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    if name:
        ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    return ctx


def request(sock, tid, pdu):
    sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu)
    data = b""
    while len(data) < 7 or len(data) < 6 + struct.unpack(">H", data[4:6])[0]:
        chunk = sock.recv(300)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    assert struct.unpack(">H", data[:2])[0] == tid
    return data[7:]


def test_certificates_carry_the_role(pki):
    assert role_of((pki / "scada.pem").read_bytes() and ssl.PEM_cert_to_DER_cert((pki / "scada.pem").read_text())) == "operator"
    assert role_of(ssl.PEM_cert_to_DER_cert((pki / "rogue.pem").read_text())) == "operator"   # openssl's encoding
    assert role_of(ssl.PEM_cert_to_DER_cert((pki / "server.pem").read_text())) is None
    text = subprocess.run(["openssl", "x509", "-in", str(pki / "hmi.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert ROLE_OID in text and "viewer" in text


def test_operator_reads_and_writes_viewer_only_reads(bridge, pki):
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as raw, \
            client_context(pki, "scada").wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        assert request(s, 1, WRITE_LEVEL) == struct.pack(">BHH", 16, 0, 2)
        assert request(s, 2, READ_VALVE) == b"\x03\x04\x3e\x80\x00\x00"
    assert bridge.snapshot()["level"][0] == 1.5
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as raw, \
            client_context(pki, "hmi").wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert request(s, 1, READ_VALVE) == b"\x03\x04\x3e\x80\x00\x00"
        assert request(s, 2, WRITE_LEVEL.replace(struct.pack(">f", 1.5), struct.pack(">f", 9.0))) == b"\x90\x01"
        assert request(s, 3, struct.pack(">BHH", 6, 1, 7)) == b"\x86\x01"
    assert bridge.snapshot()["level"][0] == 1.5
    h = bridge.health()
    assert h["bad"]["write_refused"] == 2 and h["tls"] and "tls_handshake_failed" not in h["bad"]


def s_client(port, pki, *args, data=b""):
    """openssl s_client sending ``data``; returns (exit code, stdout bytes)."""
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki / "ca.pem"),
                             "-quiet", "-verify_return_error", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(data)
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(out) < 13:
        ready = select.select([proc.stdout], [], [], 0.2)[0]
        if ready:
            chunk = proc.stdout.read1(64)
            if not chunk:
                break
            out += chunk
    proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, out


def test_openssl_s_client_reads_with_an_operator_certificate(bridge, pki):
    frame = struct.pack(">HHHB", 7, 0, 6, 1) + READ_VALVE
    _, out = s_client(bridge.port, pki, "-cert", str(pki / "scada.pem"), "-key", str(pki / "scada.key"), data=frame)
    assert out == struct.pack(">HHHB", 7, 0, 7, 1) + b"\x03\x04\x3e\x80\x00\x00"


@pytest.mark.parametrize("case", ["no_certificate", "other_ca", "plain_tcp"])
def test_handshake_refusals_are_counted(bridge, pki, case):
    frame = struct.pack(">HHHB", 7, 0, 6, 1) + READ_VALVE
    if case == "plain_tcp":
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as s:
            s.sendall(frame)
            assert s.recv(64) == b""
    else:
        args = [] if case == "no_certificate" else ["-cert", str(pki / "rogue.pem"), "-key", str(pki / "rogue.key")]
        _, out = s_client(bridge.port, pki, *args, data=frame)
        assert out == b""                                   # no Modbus answer
    assert wait_for(lambda: bridge.health()["bad"].get("tls_handshake_failed") == 1)
    assert bridge.health()["running"]


def test_client_mode_polls_a_tls_plc(pki):
    plc_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plc_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    plc_ctx.load_verify_locations(pki / "ca.pem")
    plc_ctx.verify_mode = ssl.CERT_REQUIRED
    with RawPLC(ssl_context=plc_ctx) as plc:
        plc.regs["holding"].update({0: 0x3FC0, 1: 0})
        tls = {"cert": str(pki / "scada.pem"), "key": str(pki / "scada.key"), "ca": str(pki / "ca.pem")}
        cfg = {"mode": "client", "host": "127.0.0.1", "port": plc.port, "map": MAP, "tls": tls, "poll_ms": 10}
        with ModbusBridge.from_config(cfg, ["level"], {"valve": 0.25}) as b:
            assert wait_for(lambda: b.snapshot().get("level", (None,))[0] == 1.5)
            b.publish({"valve": 0.75})
            assert wait_for(lambda: (plc.regs["holding"].get(10), plc.regs["holding"].get(11)) == (0x3F40, 0))


def test_tls_config(pki):
    tls = {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"), "ca": str(pki / "ca.pem")}
    assert ModbusBridge.from_config({"mode": "server", "map": MAP, "tls": {**tls, "write_roles": []}},
                                    ["level"], {"valve": 0.25}).port == 802
    with pytest.raises(ValueError, match=r"modbus\.tls\.write_roles: missing"):
        ModbusBridge.from_config({"mode": "server", "map": MAP, "tls": tls}, ["level"], {"valve": 0.25})
    with pytest.raises(ValueError, match=r"modbus\.tls\.key: .*nope\.key: no such file"):
        ModbusBridge.from_config({"mode": "client", "map": MAP, "tls": {**tls, "key": str(pki / "nope.key")}},
                                 ["level"], {"valve": 0.25})
    with pytest.raises(ValueError, match=r"modbus\.tls: cannot load"):
        ModbusBridge.from_config({"mode": "client", "map": MAP, "tls": {**tls, "key": str(pki / "hmi.key")}},
                                 ["level"], {"valve": 0.25})


DEPLOY = """
[model]
path = "model"
[[inputs]]
name = "level"
min = 0.0
max = 2.0
[[outputs]]
name = "valve"
min = 0.0
max = 1.0
failsafe = 0.0
[modbus]
mode = "server"
{extra}
[modbus.tls]
cert = "pki/server.pem"
key = "pki/server.key"
ca = "pki/ca.pem"
write_roles = ["operator"]
[[modbus.map]]
signal = "level"
table = "holding"
address = 0
type = "float32"
[[modbus.map]]
signal = "valve"
table = "holding"
address = 2
type = "float32"
"""


def test_deploy_file_tls_paths_are_relative_to_it_and_keys_are_bounded(pki, tmp_path):
    from sdk.service.config import ConfigError, DeployConfig

    (tmp_path / "pki").symlink_to(pki)
    path = tmp_path / "deploy.toml"
    path.write_text(DEPLOY.format(extra="idle_timeout_s = 30"))
    cfg = DeployConfig.load(path)
    assert cfg.modbus["tls"]["cert"] == str((pki / "server.pem").resolve())
    assert ModbusBridge.from_config(cfg.modbus, ["level"], {"valve": 0.0}).port == 802
    path.write_text(DEPLOY.format(extra="idle_timeout_s = 1e308"))
    with pytest.raises(ConfigError, match=r"deploy\.toml: modbus\.idle_timeout_s: 1e\+308 is not a number of seconds"):
        DeployConfig.load(path)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_below_1_2_is_refused_by_the_server(bridge, pki, caplog):
    ctx = client_context(pki, "scada")
    ctx.minimum_version, ctx.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")          # so that the client offers TLS 1.1 at all
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    assert wait_for(lambda: bridge.health()["bad"].get("tls_handshake_failed") == 1)
    assert "unsupported protocol" in caplog.text.lower()

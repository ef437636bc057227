"""Who may talk to the OPC UA bridge, against independent clients (node-opcua through
tests/opcua_client.js; asyncua's own client where node-opcua cannot express the case): sessions
refused with the right status code and counted, roles from the users file (viewer, operator,
client certificates mapped to a role), the users file and trust list re-read without a restart,
and the server restarted after a failure."""
from __future__ import annotations

import asyncio
import logging
import shutil

import pytest

from plc_bridge.metrics import Counters
from plc_bridge.opcua import OpcUaBridge, Signal
from plc_bridge.opcua_security import (Admission, make_certificate, read_users, set_certificate, set_user,
                                       thumbprint)
from sdk.cli import main as cli
from sdk.service.config import ConfigError, DeployConfig
from tests.conftest import wait_for
from tests.ops_helpers import factory_deploy
from tests.test_opcua import CLIENT_URI, OPCUA, free_port, needs_node, node_client, write_pki

LEVEL = "main.inputs.level"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A bridge offering None and Basic256Sha256_SignAndEncrypt (not Sign), with a users file:
    ``operator`` (operator), ``watcher`` (viewer), the trusted client certificate ``plc`` mapped
    to viewer; ``client`` is trusted but not mapped, ``intruder`` is not trusted."""
    work = tmp_path_factory.mktemp("opcua-security")
    write_pki(work)
    users = work / "pki" / "users.toml"
    set_user(users, "watcher", "look", role="viewer")
    cert, _ = make_certificate(work / "clients", "plc", uri=CLIENT_URI, client=True)
    shutil.copy(cert, work / "pki" / "trusted" / "plc.der")
    set_certificate(users, "plc", cert, "viewer")
    port = free_port()
    bridge = OpcUaBridge.from_config(
        {"endpoint": f"opc.tcp://127.0.0.1:{port}/r1edge", "security": ["None", "Basic256Sha256_SignAndEncrypt"],
         "certificate": "pki/server.der", "private_key": "pki/server.pem", "trusted_clients": "pki/trusted",
         "users": "pki/users.toml"},
        work, [Signal("level", 0.0, 2.0), Signal("auto", 0.0, 1.0)], [Signal("valve", 0.0, 1.0)])
    modes = []
    bridge.set_mode_handler(lambda stream, mode: modes.append((stream, mode)) or {"stream": stream, "mode": mode})
    with bridge:
        yield {"bridge": bridge, "work": work, "endpoint": f"opc.tcp://127.0.0.1:{port}/r1edge", "modes": modes}


def delta(bridge, before: dict, *reasons) -> dict:
    bad = bridge.health()["bad"]
    return {r: bad.get(r, 0) - before.get(r, 0) for r in reasons}


@needs_node
def test_a_user_name_over_a_channel_without_security_is_rejected(server):
    bridge = server["bridge"]
    before = bridge.health()["bad"]
    res = node_client(server["work"], server["endpoint"], [{"op": "read", "nodes": [LEVEL]}],
                      mode="None", policy="None")
    assert not res["ok"] and res["stage"] == "session" and "BadIdentityTokenRejected" in res["error"], res
    assert delta(bridge, before, "identity_rejected") == {"identity_rejected": 1}


def test_a_policy_the_endpoint_does_not_offer_is_rejected_at_once(server, caplog):
    """Basic256Sha256 Sign against an endpoint offering it only with SignAndEncrypt: the client
    gets BadSecurityPolicyRejected (node-opcua checks the endpoint list and never sends it),
    each time, counted; twenty of them write a handful of log lines, not twenty."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    bridge, clients = server["bridge"], server["work"] / "clients"
    before = bridge.health()["bad"]

    async def connect():
        client = Client(server["endpoint"], timeout=20)
        client.application_uri = CLIENT_URI
        await client.set_security(SecurityPolicyBasic256Sha256, str(clients / "client.der"), str(clients / "client.pem"),
                                  server_certificate=str(server["work"] / "pki" / "server.der"),
                                  mode=ua.MessageSecurityMode.Sign)   # given the server's certificate, it asks no endpoint list
        try:
            await asyncio.wait_for(client.connect(), 20)   # the library alone answers nothing for 30 s
        finally:
            await client.disconnect()

    caplog.set_level(logging.INFO)
    for _ in range(20):
        with pytest.raises(ua.UaStatusCodeError) as err:
            asyncio.run(connect())
        assert err.value.code == ua.StatusCodes.BadSecurityPolicyRejected
    assert delta(bridge, before, "security_policy_rejected") == {"security_policy_rejected": 20}
    server_lines = [r.getMessage() for r in caplog.records            # (the client here logs too)
                    if r.name == "plc_bridge.opcua" or r.getMessage().startswith("asyncua.server")]
    assert 1 <= len(server_lines) <= 3, server_lines


def test_an_x509_user_token_is_rejected_and_counted(server):
    """X.509 user identity tokens are not offered; a client sending one anyway (asyncua's
    client with a user certificate) gets BadIdentityTokenRejected, counted."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    bridge, clients = server["bridge"], server["work"] / "clients"
    before = bridge.health()["bad"]

    async def connect():
        client = Client(server["endpoint"], timeout=20)
        client.application_uri = CLIENT_URI
        await client.set_security(SecurityPolicyBasic256Sha256, str(clients / "client.der"), str(clients / "client.pem"),
                                  server_certificate=str(server["work"] / "pki" / "server.der"))
        await client.load_client_certificate(str(clients / "plc.der"))
        await client.load_private_key(str(clients / "plc.pem"))
        try:
            await asyncio.wait_for(client.connect(), 20)
        finally:
            await client.disconnect()

    with pytest.raises(ua.UaStatusCodeError) as err:
        asyncio.run(connect())
    assert err.value.code == ua.StatusCodes.BadIdentityTokenRejected
    assert delta(bridge, before, "identity_rejected") == {"identity_rejected": 1}


@needs_node
def test_a_viewer_reads_an_operator_writes(server):
    bridge = server["bridge"]
    before = bridge.health()["bad"]
    steps = [{"op": "read", "nodes": [LEVEL]},
             {"op": "write", "nodes": [{"id": LEVEL, "value": 1.25, "type": "Double"},
                                       {"id": "main.inputs.auto", "value": 0.0, "type": "Double"},
                                       {"id": "main.mode", "value": "manual", "type": "String"}]}]
    viewer = node_client(server["work"], server["endpoint"], steps, user=("watcher", "look"))
    assert viewer["ok"], viewer
    assert viewer["results"][0][0]["status"] == "Good"
    assert viewer["results"][1] == ["BadUserAccessDenied"] * 3
    assert "level" not in bridge.snapshot("main") and server["modes"] == []
    assert delta(bridge, before, "access_denied") == {"access_denied": 3}

    operator = node_client(server["work"], server["endpoint"], steps + [
        {"op": "write", "nodes": [{"id": "main.mode", "value": "sideways", "type": "String"},
                                  {"id": "main.mode", "value": 1.0, "type": "Double"}]}])
    assert operator["ok"] and operator["results"][1] == ["Good", "Good", "Good"], operator
    assert operator["results"][2] == ["BadOutOfRange", "BadTypeMismatch"]
    assert bridge.snapshot("main")["level"][0] == 1.25 and server["modes"] == [("main", "manual")]


@needs_node
def test_a_client_certificate_gets_the_role_it_is_mapped_to(server):
    bridge = server["bridge"]
    before = bridge.health()["bad"]
    steps = [{"op": "read", "nodes": [LEVEL]}, {"op": "write", "nodes": [{"id": LEVEL, "value": 0.5, "type": "Double"}]}]
    mapped = node_client(server["work"], server["endpoint"], steps, user=None, cert="plc")
    assert mapped["ok"] and mapped["results"][0][0]["status"] == "Good", mapped
    assert mapped["results"][1] == ["BadUserAccessDenied"]
    unmapped = node_client(server["work"], server["endpoint"], steps, user=None, cert="client")
    assert not unmapped["ok"] and "BadIdentityTokenRejected" in unmapped["error"], unmapped
    assert delta(bridge, before, "access_denied", "identity_rejected") == {"access_denied": 1, "identity_rejected": 1}


@needs_node
def test_trust_list_and_users_file_changes_apply_without_a_restart(server):
    bridge, work = server["bridge"], server["work"]
    read = [{"op": "read", "nodes": [LEVEL]}]
    refused = node_client(work, server["endpoint"], read, cert="intruder")
    assert not refused["ok"] and "BadCertificateUntrusted" in refused["error"], refused

    reloads = bridge.health()["reloads"].get("trusted_clients", 0)
    shutil.copy(work / "clients" / "intruder.der", work / "pki" / "trusted" / "intruder.der")
    assert wait_for(lambda: bridge.health()["reloads"].get("trusted_clients", 0) > reloads, timeout=30)
    assert node_client(work, server["endpoint"], read, cert="intruder")["ok"]

    (work / "pki" / "trusted" / "intruder.der").unlink()
    assert wait_for(lambda: bridge.health()["reloads"].get("trusted_clients", 0) > reloads + 1, timeout=30)
    again = node_client(work, server["endpoint"], read, cert="intruder")
    assert not again["ok"] and "BadCertificateUntrusted" in again["error"], again

    # A role changed in the users file applies to the next session.
    write = [{"op": "write", "nodes": [{"id": LEVEL, "value": 0.75, "type": "Double"}]}]
    users = bridge.health()["reloads"].get("users", 0)
    set_user(work / "pki" / "users.toml", "watcher", "look", role="operator")
    assert wait_for(lambda: bridge.health()["reloads"].get("users", 0) > users, timeout=30)
    assert node_client(work, server["endpoint"], write, user=("watcher", "look"))["results"] == [["Good"]]
    set_user(work / "pki" / "users.toml", "watcher", "look", role="viewer")
    assert wait_for(lambda: bridge.health()["reloads"].get("users", 0) > users + 1, timeout=30)

    # A key dropped into the trust list by mistake: the previous list stays in force, counted.
    errors = bridge.health()["errors"].get("trust_reload", 0)
    shutil.copy(work / "clients" / "client.pem", work / "pki" / "trusted" / "oops.pem")
    try:
        assert wait_for(lambda: bridge.health()["errors"].get("trust_reload", 0) > errors, timeout=30)
        assert node_client(work, server["endpoint"], read)["ok"]
    finally:
        (work / "pki" / "trusted" / "oops.pem").unlink()


def test_a_failed_task_is_restarted(tmp_path, caplog):
    """An unexpected exception in one of the bridge's tasks (here the writer of the outputs, the
    failure injected once): logged once with its traceback, counted, ``running`` false while it
    is down, then the task runs again and the newest decision reaches the clients."""
    from asyncua import Client

    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/r1edge"
    bridge = OpcUaBridge.from_config({"endpoint": endpoint, "security": ["None"]}, tmp_path,
                                     [Signal("level", 0.0, 2.0)], [Signal("valve", 0.0, 1.0)])
    bridge.RESTART_MIN_S = bridge.RESTART_MAX_S = 3.0      # down long enough to be seen
    real_write = bridge._write

    async def fail_once(*args):
        bridge._write = real_write
        raise RuntimeError("injected fault")

    async def read_valve():
        async with Client(endpoint, timeout=10) as client:
            ns = await client.get_namespace_index("urn:r1edge")
            return await client.get_node(f"ns={ns};s=main.outputs.valve").read_value()

    caplog.set_level(logging.WARNING, logger="plc_bridge.opcua")
    with bridge:
        assert bridge.health()["running"]
        bridge._write = fail_once
        bridge.publish({"valve": 0.25}, "ok", 1, 1.0, "main")
        down = lambda: (h := bridge.health())["errors"] == {"writer_failed": 1} and not h["running"]  # noqa: E731
        assert wait_for(down, timeout=30)
        assert bridge.health()["down"] == ["writer"]
        assert wait_for(lambda: bridge.health()["running"], timeout=30)
        assert wait_for(lambda: asyncio.run(read_valve()) == 0.25, timeout=30)
        health = bridge.health()
    assert health["errors"] == {"writer_failed": 1} and health["down"] == []
    failed = [r for r in caplog.records if "task writer failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info and "injected fault" in str(failed[0].exc_info[1])


# ---------------------------------------------------------------------------- without a server

def test_roles_and_certificates_in_the_users_file(tmp_path):
    users = tmp_path / "users.toml"
    cert, _ = make_certificate(tmp_path, "plc", client=True)
    set_user(users, "ann", "pw", role="viewer")
    set_user(users, "bob", "pw")                          # a new user without a role: operator
    set_user(users, "ann", "pw2")                         # a new password keeps the role
    set_certificate(users, "plc", cert, "viewer")
    got = read_users(users)
    assert got.roles == {"ann": "viewer", "bob": "operator"} and got.unroled == []
    assert got.certificates == {thumbprint(cert): ("plc", "viewer")}
    assert got.certificate_role(cert.read_bytes()) == ("plc", "viewer")
    set_certificate(users, "plc", None)
    assert read_users(users).certificates == {}
    with pytest.raises(ValueError, match="a role is required"):
        set_certificate(users, "plc", cert)


@pytest.mark.parametrize("text, message", [
    ('[users.bob]\npassword = "{h}"\nrole = "admin"\n', r"users.bob.role: 'admin' is not a role \(one of viewer, operator\)"),
    ('[certificates.plc]\nsha256 = "{d}"\n', "certificates.plc.role: required"),
    ('[certificates.plc]\nsha256 = "abc"\nrole = "viewer"\n', "certificates.plc.sha256: 'abc' is not a SHA-256"),
    ('[users.bob]\npassword = "{h}"\ncolour = "red"\n', "users.bob: must hold password and a role"),
    ('[groups.x]\n', "unknown key"),
])
def test_a_bad_users_file_names_the_entry(tmp_path, text, message):
    from plc_bridge.opcua_security import hash_password

    path = tmp_path / "users.toml"
    path.write_text(text.format(h=hash_password("pw"), d="ab" * 32))
    with pytest.raises(ValueError, match=message):
        read_users(path)
    write_pki(tmp_path)
    shutil.copy(path, tmp_path / "pki" / "users.toml")
    with pytest.raises(ConfigError, match=f"deploy.toml: opcua.users: .*{message}"):
        DeployConfig.load(factory_deploy(tmp_path, extra=OPCUA.format(port=4840)))


def test_users_without_a_role_are_operators_with_a_warning(tmp_path, caplog):
    """Users files written before roles existed keep working: their users may write, and the
    bridge says so at start."""
    from plc_bridge.opcua_security import hash_password

    path = tmp_path / "users.toml"
    path.write_text(f'[users.old]\npassword = "{hash_password("pw")}"\n')
    users = read_users(path)
    assert users.roles == {"old": "operator"} and users.unroled == ["old"]
    caplog.set_level(logging.WARNING, logger="plc_bridge.opcua")
    Admission(path, None, Counters(), Counters()).warn_unroled()
    assert "no role for old, so they may write inputs (operator)" in caplog.text
    assert "r1edge opcua-user --role" in caplog.text


def test_user_names_need_a_secured_policy(tmp_path):
    write_pki(tmp_path)
    text = OPCUA.replace('["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"]', '["None"]')
    with pytest.raises(ConfigError, match="opcua.users: user names and passwords travel only over secured channels"):
        DeployConfig.load(factory_deploy(tmp_path, extra=text.format(port=4840)))


def test_opcua_user_command_sets_roles_and_certificates(tmp_path, monkeypatch, capsys):
    import io

    users = tmp_path / "users.toml"
    cert, _ = make_certificate(tmp_path, "hmi", client=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert cli(["opcua-user", str(users), "eve", "--password-stdin", "--role", "viewer"]) == 0
    assert cli(["opcua-user", str(users), "hmi", "--certificate", str(cert), "--role", "operator"]) == 0
    got = read_users(users)
    assert got.roles == {"eve": "viewer"} and got.certificates == {thumbprint(cert): ("hmi", "operator")}
    assert cli(["opcua-user", str(users), "hmi", "--certificate", str(cert)]) == 2
    assert "a role is required" in capsys.readouterr().err
    assert cli(["opcua-user", str(users), "hmi", "--delete", "--certificate-entry"]) == 0
    assert read_users(users).certificates == {}

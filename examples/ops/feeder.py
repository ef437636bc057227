"""A small PLC for the edge deployment of this folder: the heated tank of ``sdk.demo.plant``,
simulated in real time, talking to the controller over OPC UA as a SCADA or PLC would.

Every 20 ms it reads the controller's outputs (``main.outputs.valve``, ``main.outputs.heater``),
applies them to the tank (the tank keeps its own steady commands until the controller's status
is ``ok``, as a PLC holds its outputs until the controller has decided), and writes the seven
measurements to ``main.inputs.*``. It connects as the OPC UA client whose certificate is
``clients/feeder.der`` (trusted by the server), with user ``operator``, over the endpoint and
security policy of ``deploy.toml``; it waits for the server to come up and stops after
``--seconds`` or when the controller goes away. Then it prints what it saw; exit status 0 when
the controller drove the tank (status ``ok``) for at least one cycle.

    python feeder.py --seconds 20 [--config deploy.toml] [--user operator] [--password-file FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:             # Python < 3.11
    import tomli as tomllib

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from sdk.demo import plant as tank

HERE = Path(__file__).resolve().parent
PERIOD_S = 0.02
INPUTS = ("level", "temperature", "level_sp", "temp_sp", "level_err", "temp_err", "inflow_temp")
OUTPUTS = ("valve", "heater")


async def connect(url: str, args: argparse.Namespace, password: str, wait_s: float) -> Client:
    """A signed and encrypted session as the trusted client ``feeder``, retried until the
    server listens (the controller builds its engine first) or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        client = Client(url, timeout=4)
        client.application_uri = "urn:r1edge:feeder"           # the URI in clients/feeder.der
        await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(args.base / "clients" / "feeder.der"),
                                  private_key=str(args.base / "clients" / "feeder.pem"),
                                  server_certificate=str(args.base / "pki" / "server.der"),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        client.set_user(args.user)
        client.set_password(password)
        try:
            await client.connect()
            return client
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> int:
    cfg = tomllib.loads(args.config.read_text())["opcua"]
    url = cfg["endpoint"].replace("0.0.0.0", "127.0.0.1")
    password = args.password_file.read_text().splitlines()[0] if args.password_file else args.password
    client = await connect(url, args, password, args.wait)
    plant = tank.Plant(seed=args.seed)
    seen = {"cycles": 0, "ok_cycles": 0, "statuses": {}}
    try:
        ns = await client.get_namespace_index(cfg.get("namespace", "urn:r1edge"))
        inputs = [client.get_node(ua.NodeId(f"main.inputs.{n}", ns)) for n in INPUTS]
        outputs = [client.get_node(ua.NodeId(f"main.outputs.{n}", ns)) for n in OUTPUTS]
        status = client.get_node(ua.NodeId("main.status", ns))
        print(f"feeder: connected to {url} as {args.user!r} (Basic256Sha256, SignAndEncrypt)", flush=True)
        commands = plant.initial_commands
        measured = plant.measure()
        end = time.monotonic() + args.seconds
        next_tick = time.monotonic()
        failures = 0
        while time.monotonic() < end:
            try:                                   # one Write and one Read request per cycle
                await client.write_values(inputs, [ua.Variant(float(measured[n]), ua.VariantType.Double)
                                                   for n in INPUTS])
                state, valve, heater = await client.read_values([status, *outputs])
                failures = 0
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError):
                failures += 1                      # a slow answer on a busy machine: try again
                if failures >= 3:
                    print("feeder: the controller went away", flush=True)
                    break
                continue
            seen["cycles"] += 1
            seen["statuses"][state] = seen["statuses"].get(state, 0) + 1
            if state == "ok":
                seen["ok_cycles"] += 1
                commands = (valve, heater)
            measured = plant.step(PERIOD_S, *commands)
            next_tick += PERIOD_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        try:
            await client.disconnect()
        except Exception:                  # the server may already be gone
            pass
    err = tank.tracking_error(plant.log.arrays(), 0.0) if seen["cycles"] > 1 else None
    print(f"feeder: {seen['cycles']} cycles of {PERIOD_S * 1e3:g} ms, statuses {seen['statuses']}; "
          + (f"tracking RMS level {err['level_rms']:.4f} m, temperature {err['temp_rms']:.3f} K" if err else
             "no tracking figures"), flush=True)
    return 0 if seen["ok_cycles"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the arguments and feed the controller until done."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to feed (default: %(default)s)")
    ap.add_argument("--config", type=Path, default=HERE / "deploy.toml", help="the deployment (its [opcua])")
    ap.add_argument("--user", default="operator", help="OPC UA user (default: %(default)s)")
    ap.add_argument("--password", default="operator-password", help="that user's password (default: the README's)")
    ap.add_argument("--password-file", type=Path, default=None, help="read the password from this file instead")
    ap.add_argument("--wait", type=float, default=600.0,
                    help="seconds to wait for the server; a first run compiles the engine first (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the tank's scenario seed (default: %(default)s)")
    args = ap.parse_args(argv)
    args.base = args.config.resolve().parent
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

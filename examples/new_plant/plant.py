"""A new plant, as a user would bring one: a cart-pole balanced by an LQR expert.

The physics are gymnasium's CartPole (cart 1 kg, pole 0.1 kg, half-length 0.5 m, Euler steps)
with a continuous force, integrated in 5 ms sub-steps; the controller acts every 20 ms. The
expert is a discrete LQR around the upright pole that also moves the cart to a position
setpoint ``x_sp``. Inputs: ``x``, ``x_dot``, ``theta``, ``theta_dot``, ``x_sp``; output:
``force`` (N, clipped to +-10).

    python -m examples.new_plant.plant record --out expert.npz     # the expert's data, for r1edge fit
    python -m examples.new_plant.plant plc --port 5020 [--seconds S] # the plant behind Modbus TCP

The PLC is a Modbus TCP server (pymodbus): measurements and the setpoint are float32 input
registers 0..9 (big-endian word order), the force is float32 holding registers 10..11 (the
controller writes it), holding register 20 is the PLC's heartbeat (it moves every 5 ms tick)
and holding register 22 the controller's. The pole is held upright until the controller's
heartbeat first moves, then the plant runs for ``--seconds``. On exit it prints the largest
pole angle and the RMS cart position error after the first 2 s, and the force it was last
given. ``deploy.toml`` beside this file is the matching controller configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time

import numpy as np

GRAVITY, M_CART, M_POLE, HALF_LENGTH, FORCE_MAX = 9.8, 1.0, 0.1, 0.5, 10.0
PERIOD_S, SUBSTEPS = 0.02, 4
INPUTS = ["x", "x_dot", "theta", "theta_dot", "x_sp"]
OUTPUTS = ["force"]


def derivatives(s: np.ndarray, force: float) -> np.ndarray:
    """d/dt of [x, x_dot, theta, theta_dot] (gymnasium's CartPole equations)."""
    x, x_dot, theta, theta_dot = s
    total, pm_l = M_CART + M_POLE, M_POLE * HALF_LENGTH
    cos, sin = math.cos(theta), math.sin(theta)
    temp = (force + pm_l * theta_dot ** 2 * sin) / total
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - M_POLE * cos ** 2 / total))
    return np.array([x_dot, temp - pm_l * theta_acc * cos / total, theta_dot, theta_acc])


def advance(s: np.ndarray, force: float, dt: float = PERIOD_S / SUBSTEPS) -> np.ndarray:
    """One Euler sub-step with the force held."""
    return s + dt * derivatives(s, force)


def lqr_gain() -> np.ndarray:
    """Discrete LQR gain K (force = -K (s - s_sp)) for one control period, linearised upright."""
    eps, dt = 1e-6, PERIOD_S
    a = np.zeros((4, 4))
    for j in range(4):
        d = np.zeros(4)
        d[j] = eps
        a[:, j] = (derivatives(d, 0.0) - derivatives(-d, 0.0)) / (2 * eps)
    b = (derivatives(np.zeros(4), eps) - derivatives(np.zeros(4), -eps)) / (2 * eps)
    ad, bd = np.eye(4) + a * dt, (b * dt)[:, None]
    q, r = np.diag([1.0, 0.5, 20.0, 1.0]), np.array([[0.05]])
    p = q.copy()
    for _ in range(5000):                              # Riccati iteration to its fixed point
        k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
        p = q + ad.T @ p @ (ad - bd @ k)
    return k[0]


K = lqr_gain()


def expert(s: np.ndarray, x_sp: float) -> float:
    """The LQR expert's force for state ``s`` and cart setpoint ``x_sp``."""
    return float(np.clip(-K @ (s - np.array([x_sp, 0.0, 0.0, 0.0])), -FORCE_MAX, FORCE_MAX))


def setpoint(t: float, seed: int) -> float:
    """The cart setpoint: a new value in [-0.5, 0.5] m every 4 s, seeded."""
    return float(np.random.default_rng([seed, int(t // 4.0)]).uniform(-0.5, 0.5))


def record(runs: int = 64, seconds: float = 12.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Expert data for ``r1edge fit``: ``runs`` rows of ``seconds`` at the 20 ms period from
    random starts. In half the rows a slow random push is added to the applied force, so the
    data also show states off the expert's own path; the target is always the expert's force."""
    rng = np.random.default_rng(seed)
    t_len = int(round(seconds / PERIOD_S))
    frames = np.zeros((runs, t_len, len(INPUTS)), np.float32)
    targets = np.zeros((runs, t_len, 1), np.float32)
    for i in range(runs):
        s = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.1), rng.uniform(-0.3, 0.3)])
        push, scale = 0.0, (2.0 if i % 2 else 0.0)
        for k in range(t_len):
            x_sp = setpoint(k * PERIOD_S, seed * 1000 + i)
            force = expert(s, x_sp)
            frames[i, k] = [*s, x_sp]
            targets[i, k, 0] = force
            push = 0.95 * push + scale * rng.normal() * 0.3
            for _ in range(SUBSTEPS):
                s = advance(s, float(np.clip(force + push, -FORCE_MAX, FORCE_MAX)))
    return {"frames": frames, "targets": targets, "feature_names": np.array(INPUTS), "output_names": np.array(OUTPUTS)}


async def serve_plc(port: int, seconds: float | None, seed: int) -> dict[str, float]:
    """The plant in real time behind a Modbus TCP server (see the module docstring)."""
    from pymodbus.client import ModbusTcpClient
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    f32 = ModbusTcpClient.DATATYPE.FLOAT32
    device = SimDevice(1, simdata=(
        [SimData(0, count=8, values=False, datatype=DataType.BITS)],
        [SimData(0, count=8, values=False, datatype=DataType.BITS)],
        [SimData(0, count=32, values=0, datatype=DataType.REGISTERS)],
        [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]))
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print(f"plant PLC on 127.0.0.1:{port}", flush=True)
    s, dt = np.array([0.0, 0.0, 0.02, 0.0]), PERIOD_S / SUBSTEPS
    t0 = time.monotonic()
    tick, steps, worst, sq, n, force, controller_hb, last_hb = 0, 0, 0.0, 0.0, 0, 0.0, None, 0.0
    try:
        while seconds is None or steps * dt < seconds:
            t = steps * dt
            regs = await server.async_getValues(1, 3, 10, 13)
            force = float(ModbusTcpClient.convert_from_registers(list(regs[:2]), f32))
            if not math.isfinite(force):
                force = 0.0
            if controller_hb is None:
                controller_hb = regs[12]
            if steps or regs[12] != controller_hb:      # the controller runs: so does the plant
                s = advance(s, float(np.clip(force, -FORCE_MAX, FORCE_MAX)), dt)
                steps += 1
            x_sp = setpoint(t, seed)
            values = sum((ModbusTcpClient.convert_to_registers(float(v), f32) for v in (*s, x_sp)), [])
            await server.async_setValues(1, 4, 0, values)
            await server.async_setValues(1, 3, 20, [tick & 0xFFFF])
            if regs[12] != controller_hb:
                controller_hb, last_hb = regs[12], time.monotonic()
            if t >= 2.0 and time.monotonic() - last_hb < 0.1:   # scored: after start-up, while it runs
                worst, sq, n = max(worst, abs(s[2])), sq + (s[0] - x_sp) ** 2, n + 1
            tick += 1
            await asyncio.sleep(max(0.0, t0 + tick * dt - time.monotonic()))
    finally:
        await server.shutdown()
    return {"seconds": steps * dt, "scored_s": n * dt, "max_abs_theta_deg": math.degrees(worst),
            "x_rms_error_m": math.sqrt(sq / n) if n else float("nan"), "last_force": force}


def simulate(seconds: float, seed: int) -> dict[str, float]:
    """The expert in closed loop on the PLC's plant and setpoints (same start, same scoring)."""
    s, dt = np.array([0.0, 0.0, 0.02, 0.0]), PERIOD_S / SUBSTEPS
    worst, sq, n, force = 0.0, 0.0, 0, 0.0
    for k in range(int(round(seconds / dt))):
        t = k * dt
        x_sp = setpoint(t, seed)
        if k % SUBSTEPS == 0:
            force = expert(s, x_sp)
        s = advance(s, force, dt)
        if t >= 2.0:
            worst, sq, n = max(worst, abs(s[2])), sq + (s[0] - x_sp) ** 2, n + 1
    return {"seconds": seconds, "scored_s": n * dt, "max_abs_theta_deg": math.degrees(worst),
            "x_rms_error_m": math.sqrt(sq / n), "last_force": force}


def main(argv: list[str] | None = None) -> int:
    """``record`` the expert's data or run the ``plc``."""
    ap = argparse.ArgumentParser(prog="python -m examples.new_plant.plant", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record", help="write the expert's data for r1edge fit")
    p.add_argument("--out", default="expert.npz")
    p.add_argument("--runs", type=int, default=64)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("expert", help="simulate the expert on the PLC's plant and setpoints, for comparison")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=7, help="setpoint sequence")
    p = sub.add_parser("plc", help="run the plant behind a Modbus TCP server")
    p.add_argument("--port", type=int, default=5020)
    p.add_argument("--seconds", type=float, default=None,
                   help="stop this long after the controller started (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, default=7, help="setpoint sequence")
    args = ap.parse_args(argv)
    if args.command == "record":
        np.savez(args.out, **record(args.runs, args.seconds, args.seed))
        print(f"{args.out}: {args.runs} rows of {args.seconds:g} s at {PERIOD_S * 1e3:g} ms, inputs {INPUTS}, "
              f"outputs {OUTPUTS}")
        return 0
    if args.command == "expert":
        summary = simulate(args.seconds, args.seed)
        print(" ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        return 0
    try:
        summary = asyncio.run(serve_plc(args.port, args.seconds, args.seed))
    except KeyboardInterrupt:
        return 0
    print(" ".join(f"{k} {v:.4g}" for k, v in summary.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

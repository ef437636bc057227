"""A heated-tank process that behaves like a PLC: physics, disturbances, Modbus registers.

The process: a tank fed through an inflow valve, drained through an outlet whose flow goes as
sqrt(level), heated by an element with its own thermal lag, losing heat to the ambient air and
to the cooler inflow. Level and temperature are the controlled signals; valve and heater
(both 0..1) are the actuators. Time constants are a few seconds so that a 20 s demo shows
several setpoint steps, a leak and the controller's answer to each.

Everything that is not the controller's doing comes from a seeded :class:`Scenario`:
setpoint steps, a leak that opens and closes, inflow temperature drift, ambient temperature
and measurement noise. Each disturbance stream has its own generator and events are only ever
appended in time order, so the schedule is a pure function of (seed, time) whatever the order
in which it is queried. Integration is fixed-step RK4 at ``physics_dt`` with actuators and
disturbances held over each step, so the same seed and actuator sequence give a bitwise
identical trajectory, whether simulated fast (:func:`simulate`) or served in real time
(:class:`PlantServer`).

Register map served by :class:`PlantServer` (0-based addresses, float32 in two registers,
big-endian word order "ABCD"):

- input registers (function code 4, read-only): ``INPUT_REGISTERS``: level, temperature,
  level_sp, temp_sp, level_err, temp_err, inflow_temp, valve_pos, heater_pos.
- holding registers: ``COMMAND_REGISTERS`` valve at 0, heater at 2 (float32, the controller
  writes them); ``HEARTBEAT_ADDRESS`` 100 (uint16, +1 every physics tick, wraps);
  ``HELD_ADDRESS`` 101 (uint16, 1 while the PLC is holding a command that was not refreshed
  within ``hold_after_s``).
- coil ``AUTO_COIL`` 0: the loop's manual/auto switch for the controller (1 = auto at start;
  an operator writes 0 for manual). The PLC only serves it.

Run it as a process: ``python -m sdk.demo.plant --port 5020 --seed 0
--duration 30 --log plant.npz``.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import logging
import math
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)

# --- process constants (SI units; the tank is time-scaled for a short demo) -------------------
AREA = 0.25            # tank cross-section, m^2
H_MAX = 1.0            # overflow weir height, m
H_THERMAL_MIN = 0.05   # below this the element still heats a sump of this depth
Q_MAX = 0.25           # inflow at valve = 1, m^3/s
C_OUT = 0.2            # outlet coefficient: q_out = C_OUT * sqrt(level), m^2.5/s
C_OVERFLOW = 1.0       # overflow weir: q = C_OVERFLOW * (level - H_MAX), m^2/s
K_HEAT = 12.0          # heater at 1 raises 1 m^3/s of inflow by 12 K: P_max / (rho c)
UA = 0.01              # ambient loss / (rho c), m^3/s
TAU_VALVE = 0.2        # valve stroke lag, s
TAU_HEATER = 0.8       # heating element thermal lag, s
T_AMBIENT_NOMINAL = 20.0  # degC, what a commissioning engineer would assume

# Spans used to normalise tracking errors (the range the setpoints move over).
LEVEL_SPAN = 0.5       # m
TEMP_SPAN = 25.0       # K

NOISE_SIGMA = (0.002, 0.05, 0.05)  # level m, temperature degC, inflow temperature degC

INPUT_REGISTERS: dict[str, int] = {
    "level": 0, "temperature": 2, "level_sp": 4, "temp_sp": 6, "level_err": 8,
    "temp_err": 10, "inflow_temp": 12, "valve_pos": 14, "heater_pos": 16,
}
COMMAND_REGISTERS: dict[str, int] = {"valve": 0, "heater": 2}
HEARTBEAT_ADDRESS = 100
HELD_ADDRESS = 101
AUTO_COIL = 0
MEASUREMENTS = tuple(INPUT_REGISTERS)

LOG_COLUMNS = (
    "t", "level_sp", "temp_sp", "level", "temperature", "level_meas", "temp_meas",
    "inflow_temp", "leak", "valve_cmd", "heater_cmd", "valve_pos", "heater_pos", "held",
)

_FC_READ_HOLDING, _FC_READ_INPUT = 3, 4
_FC_WRITES = (6, 16)
_INPUT_STRUCT = struct.Struct(">" + "f" * len(INPUT_REGISTERS))
_INPUT_WORDS = struct.Struct(">" + "H" * (2 * len(INPUT_REGISTERS)))
_CMD_WORDS = struct.Struct(">4H")
_CMD_FLOATS = struct.Struct(">2f")
_F32 = struct.Struct("<2f")


class _EventStream:
    """Piecewise-constant random signal whose change times and values come from one generator.

    ``draw(rng, previous_value) -> (interval_s, value)`` produces the next segment. Segments
    are generated lazily, in order, so querying far ahead or in any order gives the same
    schedule.
    """

    def __init__(self, rng: np.random.Generator, first: tuple[float, float],
                 draw: Callable[[np.random.Generator, float], tuple[float, float]]):
        self._rng, self._draw = rng, draw
        self.times, self.values = [0.0], [first[1]]
        self._next = first[0]

    def at(self, t: float) -> float:
        """The value in force at time ``t`` (seconds, >= 0)."""
        while self._next <= t:
            interval, value = self._draw(self._rng, self.values[-1])
            self.times.append(self._next)
            self.values.append(value)
            self._next += interval
        return self.values[bisect.bisect_right(self.times, t) - 1]


class Scenario:
    """The seeded disturbance and setpoint schedule: everything the controller does not choose.

    - level setpoint: steps of 0.05-0.2 m every 4-8 s, within 0.3..0.8 m;
    - temperature setpoint: steps of 2-8 K every 5-10 s, within 30..55 degC;
    - a leak (an orifice, flow ~ sqrt(level)) that opens after 4-10 s for 3-7 s, then again
      every 5-12 s, each time with a new size;
    - inflow temperature: a base of 10-20 degC plus two slow sinusoids (1-3 K, 15-60 s);
    - ambient temperature 15-25 degC, constant per seed;
    - measurement noise, a counter-based stream indexed by physics tick.
    """

    NOISE_CHUNK = 4096

    def __init__(self, seed: int):
        self.seed = int(seed)
        root = np.random.SeedSequence([self.seed, 0x7A6B])
        sp_seq, tsp_seq, leak_seq, misc_seq = root.spawn(4)
        misc = np.random.default_rng(misc_seq)
        self.ambient = float(misc.uniform(15.0, 25.0))
        self._tin_base = float(misc.uniform(10.0, 20.0))
        self._tin_amp = misc.uniform(1.0, 3.0, 2)
        self._tin_omega = 2.0 * np.pi / misc.uniform(15.0, 60.0, 2)
        self._tin_phase = misc.uniform(0.0, 2.0 * np.pi, 2)

        def step_from(lo: float, hi: float, steps: tuple[float, float],
                      intervals: tuple[float, float]):
            def draw(rng: np.random.Generator, prev: float) -> tuple[float, float]:
                delta = float(rng.uniform(*steps)) * (1.0 if rng.random() < 0.5 else -1.0)
                if not lo <= prev + delta <= hi:
                    delta = -delta
                return float(rng.uniform(*intervals)), min(max(prev + delta, lo), hi)
            return draw

        sp_rng = np.random.default_rng(sp_seq)
        self._level_sp = _EventStream(
            sp_rng, (float(sp_rng.uniform(4.0, 8.0)), float(sp_rng.uniform(0.4, 0.7))),
            step_from(0.3, 0.8, (0.05, 0.2), (4.0, 8.0)))
        tsp_rng = np.random.default_rng(tsp_seq)
        self._temp_sp = _EventStream(
            tsp_rng, (float(tsp_rng.uniform(3.0, 7.0)), float(tsp_rng.uniform(35.0, 50.0))),
            step_from(30.0, 55.0, (2.0, 8.0), (5.0, 10.0)))

        def leak_draw(rng: np.random.Generator, prev: float) -> tuple[float, float]:
            if prev > 0.0:  # the leak closes, and stays closed for 5-12 s
                return float(rng.uniform(5.0, 12.0)), 0.0
            return float(rng.uniform(3.0, 7.0)), float(rng.uniform(0.02, 0.05))

        leak_rng = np.random.default_rng(leak_seq)
        self._leak = _EventStream(leak_rng, (float(leak_rng.uniform(4.0, 10.0)), 0.0),
                                  leak_draw)
        #: When the first setpoint step (level or temperature) comes, s.
        self.first_setpoint_step_s = min(self._level_sp._next, self._temp_sp._next)
        self._noise_chunk = -1
        self._noise = np.zeros((self.NOISE_CHUNK, 3))

    def inflow_temp(self, t: float) -> float:
        """Inflow temperature at time ``t``, degC."""
        a, w, p = self._tin_amp, self._tin_omega, self._tin_phase
        return self._tin_base + float(a[0] * math.sin(w[0] * t + p[0])
                                      + a[1] * math.sin(w[1] * t + p[1]))

    def at(self, t: float) -> tuple[float, float, float, float]:
        """``(level_sp, temp_sp, leak_coefficient, inflow_temp)`` in force at time ``t``."""
        return (self._level_sp.at(t), self._temp_sp.at(t), self._leak.at(t),
                self.inflow_temp(t))

    def noise(self, tick: int) -> tuple[float, float, float]:
        """Measurement noise (level, temperature, inflow temperature) of physics tick ``tick``."""
        chunk, row = divmod(tick, self.NOISE_CHUNK)
        if chunk != self._noise_chunk:
            rng = np.random.default_rng([self.seed, 0x6E6F, chunk])
            self._noise = rng.standard_normal((self.NOISE_CHUNK, 3)) * np.asarray(NOISE_SIGMA)
            self._noise_chunk = chunk
        n = self._noise[row]
        return float(n[0]), float(n[1]), float(n[2])


def steady_commands(level_sp: float, temp_sp: float, inflow_temp: float,
                    ambient: float = T_AMBIENT_NOMINAL, leak: float = 0.0) -> tuple[float, float]:
    """Valve and heater that hold ``level_sp`` and ``temp_sp`` in steady state (model inverse)."""
    q = (C_OUT + leak) * math.sqrt(max(level_sp, 0.0))
    valve = q / Q_MAX
    heater = (q * (temp_sp - inflow_temp) + UA * (temp_sp - ambient)) / K_HEAT
    return valve, heater


def _derivatives(h: float, temp: float, v: float, p: float, valve: float, heater: float,
                 leak: float, t_in: float, t_amb: float) -> tuple[float, float, float, float]:
    root = math.sqrt(h) if h > 0.0 else 0.0
    q_in = Q_MAX * v
    q_over = C_OVERFLOW * (h - H_MAX) if h > H_MAX else 0.0
    dh = (q_in - (C_OUT + leak) * root - q_over) / AREA
    volume = AREA * (h if h > H_THERMAL_MIN else H_THERMAL_MIN)
    dtemp = (q_in * (t_in - temp) + K_HEAT * p - UA * (temp - t_amb)) / volume
    return dh, dtemp, (valve - v) / TAU_VALVE, (heater - p) / TAU_HEATER


class PlantLog:
    """Time series of one run, one row per :meth:`Plant.step`, columns ``LOG_COLUMNS``.

    Rows go into a preallocated float64 buffer that doubles when full.
    """

    def __init__(self, capacity: int = 4096):
        self._buf = np.zeros((max(int(capacity), 16), len(LOG_COLUMNS)))
        self.n = 0

    def append(self, row: tuple[float, ...]) -> None:
        """Append one row (values in ``LOG_COLUMNS`` order)."""
        if self.n == self._buf.shape[0]:
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[self.n] = row
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        """A copy of the log as ``{column: float64 array}``."""
        data = self._buf[:self.n]
        return {name: data[:, i].copy() for i, name in enumerate(LOG_COLUMNS)}


class Plant:
    """The heated tank, integrated with fixed-step RK4.

    Starts in steady state at the scenario's first setpoints, with the valve and heater
    commands that hold them (those are also what "no control" keeps applying).
    ``step(dt, valve, heater)`` advances ``dt / physics_dt`` ticks and returns the
    measurements at the new time, as the PLC would serve them (``MEASUREMENTS``).
    """

    def __init__(self, seed: int = 0, physics_dt: float = 0.01, log_capacity: int = 4096):
        if not physics_dt > 0.0:
            raise ValueError(f"physics_dt must be > 0, got {physics_dt!r}")
        self.scenario = Scenario(seed)
        self.physics_dt = float(physics_dt)
        self.tick = 0
        level_sp, temp_sp, _, t_in = self.scenario.at(0.0)
        valve, heater = steady_commands(level_sp, temp_sp, t_in, self.scenario.ambient)
        self.initial_commands = (valve, heater)
        self.state = [level_sp, temp_sp, valve, heater]   # level, temperature, valve, heater pos
        self.commands = (valve, heater)
        self.log = PlantLog(log_capacity)

    @property
    def t(self) -> float:
        """Simulated time, s (tick count times ``physics_dt``, so it never drifts)."""
        return self.tick * self.physics_dt

    def measure(self) -> dict[str, float]:
        """Measurements at the current tick (noisy level and temperatures, exact setpoints),
        rounded to float32 as the PLC serves them, so a simulated controller sees exactly
        what a Modbus client would read."""
        h, temp, v, p = self.state
        level_sp, temp_sp, _, t_in = self.scenario.at(self.t)
        n_h, n_t, n_in = self.scenario.noise(self.tick)
        level, temperature = _F32.unpack(_F32.pack(h + n_h, temp + n_t))
        level_sp, temp_sp = _F32.unpack(_F32.pack(level_sp, temp_sp))
        values = _INPUT_STRUCT.unpack(_INPUT_STRUCT.pack(
            level, temperature, level_sp, temp_sp, level_sp - level, temp_sp - temperature,
            t_in + n_in, v, p))
        return dict(zip(MEASUREMENTS, values))

    def step(self, dt: float, valve: float, heater: float, *, held: bool = False
             ) -> dict[str, float]:
        """Apply ``valve`` and ``heater`` (clipped to 0..1) for ``dt`` seconds, a whole number
        of physics ticks; return the measurements at the new time. ``held`` is only recorded
        (the server sets it while it holds a stale command)."""
        n = round(dt / self.physics_dt)
        if n < 1 or abs(n * self.physics_dt - dt) > 1e-9 * max(1.0, dt):
            raise ValueError(f"dt={dt!r} is not a whole number of physics ticks "
                             f"(physics_dt={self.physics_dt})")
        if not (math.isfinite(valve) and math.isfinite(heater)):
            raise ValueError(f"non-finite actuator command: valve={valve!r}, heater={heater!r}")
        valve = min(max(float(valve), 0.0), 1.0)
        heater = min(max(float(heater), 0.0), 1.0)
        self.commands = (valve, heater)
        h_dt, t_amb = self.physics_dt, self.scenario.ambient
        h, temp, v, p = self.state
        leak = 0.0
        for _ in range(n):
            _, _, leak, t_in = self.scenario.at(self.t)
            a = _derivatives(h, temp, v, p, valve, heater, leak, t_in, t_amb)
            b = _derivatives(h + 0.5 * h_dt * a[0], temp + 0.5 * h_dt * a[1],
                             v + 0.5 * h_dt * a[2], p + 0.5 * h_dt * a[3],
                             valve, heater, leak, t_in, t_amb)
            c = _derivatives(h + 0.5 * h_dt * b[0], temp + 0.5 * h_dt * b[1],
                             v + 0.5 * h_dt * b[2], p + 0.5 * h_dt * b[3],
                             valve, heater, leak, t_in, t_amb)
            d = _derivatives(h + h_dt * c[0], temp + h_dt * c[1], v + h_dt * c[2],
                             p + h_dt * c[3], valve, heater, leak, t_in, t_amb)
            k = h_dt / 6.0
            h += k * (a[0] + 2.0 * b[0] + 2.0 * c[0] + d[0])
            temp += k * (a[1] + 2.0 * b[1] + 2.0 * c[1] + d[1])
            v += k * (a[2] + 2.0 * b[2] + 2.0 * c[2] + d[2])
            p += k * (a[3] + 2.0 * b[3] + 2.0 * c[3] + d[3])
            if h < 0.0:  # an RK4 step can overshoot the empty tank by a hair
                h = 0.0
            self.tick += 1
        self.state = [h, temp, v, p]
        m = self.measure()
        self.log.append((self.t, m["level_sp"], m["temp_sp"], h, temp, m["level"],
                         m["temperature"], m["inflow_temp"], leak, valve, heater, v, p,
                         float(held)))
        return m


Controller = Callable[[Mapping[str, float]], Mapping[str, float]]


def simulate(seed: int, controller: Controller | None, duration_s: float,
             period_s: float = 0.02, physics_dt: float = 0.01) -> dict[str, np.ndarray]:
    """Run the plant in simulated time under ``controller`` and return its log.

    ``controller(measurements) -> {"valve": .., "heater": ..}`` is called once per
    ``period_s`` with the measurements of that instant (the interface of
    ``sdk.Controller.step``); ``None`` means no control: the plant keeps its initial
    commands throughout, as a PLC holding its last output would.
    """
    plant = Plant(seed, physics_dt, log_capacity=int(duration_s / period_s) + 1)
    meas = plant.measure()
    valve, heater = plant.initial_commands
    for _ in range(int(round(duration_s / period_s))):
        if controller is not None:
            out = controller(meas)
            valve, heater = out["valve"], out["heater"]
        meas = plant.step(period_s, valve, heater)
    return plant.log.arrays()


def tracking_error(log_arrays: Mapping[str, np.ndarray], start_s: float = 2.0,
                   stop_s: float | None = None) -> dict[str, float]:
    """RMS setpoint error of the true level and temperature over ``start_s <= t < stop_s``.

    Returns ``level_rms`` (m), ``temp_rms`` (K), each normalised by its setpoint span
    (``level_nrms``, ``temp_nrms``), and ``score``, the mean of the two normalised figures.
    """
    t = np.asarray(log_arrays["t"])
    mask = t >= start_s
    if stop_s is not None:
        mask &= t < stop_s
    if not mask.any():
        raise ValueError(f"no samples in [{start_s}, {stop_s}) (log covers "
                         f"{t[0] if t.size else None}..{t[-1] if t.size else None} s)")
    e_level = log_arrays["level_sp"][mask] - log_arrays["level"][mask]
    e_temp = log_arrays["temp_sp"][mask] - log_arrays["temperature"][mask]
    level_rms = float(np.sqrt(np.mean(e_level ** 2)))
    temp_rms = float(np.sqrt(np.mean(e_temp ** 2)))
    out = {"level_rms": level_rms, "temp_rms": temp_rms, "level_nrms": level_rms / LEVEL_SPAN,
           "temp_nrms": temp_rms / TEMP_SPAN}
    out["score"] = 0.5 * (out["level_nrms"] + out["temp_nrms"])
    return out


# --- the PLC: real-time physics behind Modbus registers ---------------------------------------

def _float_words(*values: float) -> list[int]:
    return list(struct.unpack(f">{2 * len(values)}H", struct.pack(f">{len(values)}f", *values)))


class PlantServer:
    """The plant run in real time behind a Modbus TCP server, as a PLC would serve it.

    A background thread owns an asyncio loop with the pymodbus server and the physics task:
    every ``physics_dt`` of wall time it reads the command registers, steps the plant one
    tick, publishes the measurements in the input registers and increments the heartbeat.
    A command register that is not finite is counted, dropped and overwritten with the last
    good value (a finite value written with it is kept). When no
    client has written a command for ``hold_after_s`` the PLC keeps its last command and
    raises the ``HELD_ADDRESS`` flag. If the thread falls more than five ticks behind it
    resynchronises to wall time (counted in ``overruns``); plant time never jumps.

    ``port=0`` binds an ephemeral port; :attr:`port` holds the bound one after :meth:`start`.
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, seed: int = 0, *, host: str = "127.0.0.1", port: int = 5020,
                 device_id: int = 1, physics_dt: float = 0.01,
                 duration_s: float | None = None, hold_after_s: float = 0.5):
        self.plant = Plant(seed, physics_dt,
                           log_capacity=int((duration_s or 60.0) / physics_dt) + 1)
        self.host, self.port, self.device_id = host, int(port), int(device_id)
        self.duration_s, self.hold_after_s = duration_s, float(hold_after_s)
        self.heartbeat = 0
        self.overruns = 0
        self.bad_commands = 0
        self.command_writes = 0
        self._last_write = -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # public control ------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> PlantServer:
        """Start serving; returns once the port is bound. Raises if it cannot bind."""
        if self._thread is not None:
            raise RuntimeError("PlantServer already started")
        self._thread = threading.Thread(target=self._thread_main, name="plant-server",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"plant server did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError(f"plant server on {self.host}:{self.port} failed: {self._error}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the physics and the server, and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run ends (``duration_s`` reached or stopped); True if it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the physics thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def log(self) -> dict[str, np.ndarray]:
        """A snapshot of the plant log so far (one row per physics tick)."""
        with self._lock:
            return self.plant.log.arrays()

    def __enter__(self) -> PlantServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # the server thread ---------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() or logged; never silent
            self._error = exc
            log.error("plant server stopped on error: %s", exc)
        finally:
            self._ready.set()

    def _device(self):
        from pymodbus.simulator import DataType, SimData, SimDevice

        valve, heater = self.plant.initial_commands
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        coils = [SimData(0, values=[True] + [False] * 15, datatype=DataType.BITS)]   # AUTO_COIL on
        holding = [SimData(0, values=[valve, heater], datatype=DataType.FLOAT32),
                   SimData(HEARTBEAT_ADDRESS, count=2, values=0, datatype=DataType.UINT16)]
        inputs = [SimData(0, count=len(INPUT_REGISTERS), values=0.0, datatype=DataType.FLOAT32)]
        return SimDevice(self.device_id, simdata=(coils, bits, holding, inputs),
                         action=self._on_access)

    async def _on_access(self, function_code: int, _start: int, address: int, count: int,
                         _registers: list[int], set_values) -> None:
        if function_code in _FC_WRITES and set_values is not None and address < 4 \
                and address + count > 0:
            self._last_write = time.monotonic()
            self.command_writes += 1
        return None

    async def _main(self) -> None:
        from pymodbus.server import ModbusTcpServer

        server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        await server.serve_forever(background=True)
        try:
            self.port = server.transport.sockets[0].getsockname()[1]
            await self._publish(server, self.plant.measure(), held=True)
            log.info("plant seed %d serving on %s:%d", self.plant.scenario.seed,
                     self.host, self.port)
            self._ready.set()
            await self._physics(server)
        finally:
            await server.shutdown()
            log.info("plant on port %d stopped at t=%.2f s (%d overruns, %d bad commands)",
                     self.port, self.plant.t, self.overruns, self.bad_commands)

    async def _physics(self, server) -> None:
        loop = asyncio.get_running_loop()
        dt = self.plant.physics_dt
        deadline = loop.time()
        while not self._stop.is_set():
            if self.duration_s is not None and self.plant.t >= self.duration_s - 1e-9:
                break
            deadline += dt
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                if delay < -5 * dt:
                    self.overruns += 1
                    deadline = loop.time()
                await asyncio.sleep(0)  # let the server answer requests
            await self._tick(server)

    async def _tick(self, server) -> None:
        words = await server.async_getValues(self.device_id, _FC_READ_HOLDING, 0, 4)
        command = _CMD_FLOATS.unpack(_CMD_WORDS.pack(*words))
        if not (math.isfinite(command[0]) and math.isfinite(command[1])):
            # count and drop it once: put the last good command back in the registers
            self.bad_commands += 1
            log.warning("dropped non-finite command valve=%r heater=%r", *command)
            command = tuple(new if math.isfinite(new) else old
                            for new, old in zip(command, self.plant.commands))
            await server.async_setValues(self.device_id, _FC_READ_HOLDING, 0,
                                         _float_words(*command))
        held = time.monotonic() - self._last_write > self.hold_after_s
        with self._lock:
            meas = self.plant.step(self.plant.physics_dt, *command, held=held)
        await self._publish(server, meas, held)

    async def _publish(self, server, meas: Mapping[str, float], held: bool) -> None:
        values = [meas[name] for name in INPUT_REGISTERS]
        await server.async_setValues(self.device_id, _FC_READ_INPUT, 0,
                                     list(_INPUT_WORDS.unpack(_INPUT_STRUCT.pack(*values))))
        self.heartbeat = (self.heartbeat + 1) & 0xFFFF
        await server.async_setValues(self.device_id, _FC_READ_HOLDING, HEARTBEAT_ADDRESS,
                                     [self.heartbeat, int(held)])


def main(argv: list[str] | None = None) -> int:
    """``python -m sdk.demo.plant``: serve the plant until the duration or a signal."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5020)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None, help="seconds of plant time")
    ap.add_argument("--device-id", type=int, default=1)
    ap.add_argument("--hold-after", type=float, default=0.5,
                    help="seconds without a command write before the PLC flags 'held'")
    ap.add_argument("--log", default=None, help="write the plant log here (.npz) on exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = PlantServer(args.seed, host=args.host, port=args.port, device_id=args.device_id,
                         duration_s=args.duration, hold_after_s=args.hold_after)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop(0))
    try:
        server.start()
    except RuntimeError as exc:
        print(f"plant: error: {exc}", file=sys.stderr)
        return 2
    print(f"plant: listening on {server.host}:{server.port}", flush=True)
    while not server.wait(0.2):
        pass
    if args.log:
        np.savez(args.log, **server.log())
        print(f"plant: log written to {args.log}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

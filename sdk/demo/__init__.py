"""``r1edge demo``: the factory loop, closed over Modbus TCP by the bundled MoE policy.

What it does, with nothing to configure and no network beyond loopback:

1. builds the controller of ``deploy.toml`` (the bundled package ``model/``: a pruned, int8
   DeepSeek-V3/R1-architecture policy), pointed at a free loopback port and with a flight
   recorder under ``--out``;
2. starts the heated-tank PLC simulator (``plant.py``) as a separate process on that port,
   waits until its heartbeat and every input arrive, then runs the control loop in Modbus
   client mode for ``--duration`` seconds of real time, with a live status line. The start is
   bumpless: the controller writes nothing before its first cycle, its outputs track the
   actuators' positions for ``[loop] warmup_cycles`` while the policy's history fills, and the
   policy then takes over from there at the rate limit;
3. stops the plant (it writes its log), and scores the run from t = 0 (the plant's start, so
   start-up counts): tracking error of the MoE policy beside the expert controller
   (``expert.py``) and no control simulated on the same seeded disturbances, the step the
   start made at the plant's actuators and the largest step of the policy's outputs against
   their rate limits, latency percentiles, deadline misses and fail-safe cycles;
4. draws the plot (setpoints, measurements and actuators of the live run and the expert),
   and replays the flight recording through a fresh engine, checking every output bit for bit.

It passes when the policy's tracking error is within ``MAX_RATIO`` of the expert's and at most
half of no control's, the start moved no actuator command by more than one rate-limited step
and no output the policy drove moved faster than its ``max_rate``, every fail-safe cycle has
its cause reported (and is listed with what held it up), fail-safe cycles and deadline misses
stay within ``MAX_FAILSAFE_FRACTION`` of the cycles, and the replay is bitwise identical. A
demo on a busy machine may see the odd stall of its process or VM: the safety layer putting that one cycle into fail-safe is the behaviour
being shown, not a failure; what would fail is a cycle that went unprotected or unexplained,
or stalls so frequent that the plant is no longer controlled (which the tracking check and
the rate bound catch).

The control loop asks for real-time scheduling (SCHED_FIFO, pinned, memory locked) as
``r1edge run`` does; where the platform refuses, it runs without, and the summary says which.

The files named above live in this package (``deploy.toml`` and ``model/`` as package data),
so an installed wheel runs the demo with no source tree. In a clone,
``examples/factory_loop/deploy.toml`` and ``examples/factory_loop/model`` link here, and
``examples/factory_loop/train_policy.py`` rebuilds ``model/``.
"""
from __future__ import annotations

import logging
import math
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

EXAMPLE = Path(__file__).resolve().parent     # plant.py, expert.py, deploy.toml, model/
PLANT = EXAMPLE / "plant.py"
TRACK_FROM_S = 0.0          # scored from the plant's start: the start-up counts
SETTLE_S = 2.0              # a run must go on this long after the first setpoint step to be scored
MAX_RATIO = 1.2             # policy / expert tracking error, scored from t = 0
MAX_VS_NO_CONTROL = 0.5     # policy / no-control tracking error
# At most 1% of cycles may fail safe or miss their deadline. A fail-safe cycle closes the
# valve and cuts the heater for one 20 ms period, after which the outputs ramp back at
# 2 /s: the tank's level and temperature move over seconds, so isolated cycles cost the
# tracking little (the tracking check judges that), while a higher rate means the loop is
# not really running at 50 Hz on this machine.
MAX_FAILSAFE_FRACTION = 0.01


class DemoError(RuntimeError):
    """The demo could not run (missing files, the plant did not start, ...)."""


def find_example(example: Path = EXAMPLE) -> Path:
    """The directory of the factory-loop files, checked for the ones the demo needs."""
    for rel in ("deploy.toml", "plant.py", "expert.py", "model/manifest.json"):
        if not (example / rel).is_file():
            raise DemoError(f"{example / rel}: missing. 'r1edge demo' runs the factory loop shipped in "
                            "the sdk.demo package; reinstall r1edge, or in a clone rebuild the bundled "
                            "model with 'python -m examples.factory_loop.train_policy'")
    return example


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(port: int, recording: Path, example: Path | None = None, *, realtime: bool = True):
    """The example's deployment config, pointed at ``port`` and recording to ``recording``;
    ``realtime``: ask for real-time scheduling (applied where the platform permits)."""
    try:
        import tomllib
    except ModuleNotFoundError:                               # Python 3.10
        import tomli as tomllib

    from sdk.service.config import DeployConfig

    example = example or find_example()
    path = example / "deploy.toml"
    raw = tomllib.loads(path.read_text())
    raw["modbus"]["port"] = int(port)
    raw["recorder"] = {"path": str(recording)}
    raw["loop"]["realtime"] = bool(realtime)
    return DeployConfig.from_dict(raw, base_dir=example, source=path)


class PlantProcess:
    """The PLC simulator as a child process (``python .../sdk/demo/plant.py``).

    The plant runs as a script, not as ``-m sdk.demo.plant``: it needs only numpy and
    pymodbus, and importing the ``sdk`` package would load torch into the PLC process.
    ``start()`` returns once it listens; ``stop()`` sends SIGTERM (it then writes its log to
    ``log_path``) and waits; ``kill()`` sends SIGKILL. Its own log goes to ``stderr_path``.
    """

    def __init__(self, port: int, seed: int, *, log_path: Path | None = None, stderr_path: Path | None = None):
        self.port, self.seed, self.log_path = port, seed, log_path
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    def start(self, timeout_s: float = 20.0) -> "PlantProcess":
        """Start the process and wait for its 'listening' line."""
        cmd = [sys.executable, str(PLANT), "--host", "127.0.0.1", "--port", str(self.port),
               "--seed", str(self.seed)]
        if self.log_path is not None:
            cmd += ["--log", str(self.log_path)]
        self._stderr = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        line = ""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if sel.select(timeout_s):
                line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.kill()
            where = f" (its log: {self.stderr_path})" if self.stderr_path else ""
            raise DemoError(f"the plant simulator did not start on 127.0.0.1:{self.port} within "
                            f"{timeout_s:.0f} s{where}")
        return self

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (the plant writes its log); SIGKILL if it does not exit in time."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("plant did not exit on SIGTERM within %.0f s; killing it", timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL (a crash) and reap the process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self._stderr not in (None, subprocess.DEVNULL):
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "PlantProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_plc(ctrl, timeout_s: float = 10.0) -> float:
    """Start the controller's Modbus bridge and wait until the PLC's heartbeat moves and every
    input has been read; returns the seconds waited."""
    bridge = ctrl.bridge("modbus")
    bridge.start()
    t0 = time.monotonic()
    needed = set(ctrl.input_names)
    while time.monotonic() - t0 < timeout_s:
        if bridge.health()["heartbeat_ok"] and needed <= set(bridge.snapshot()):
            return time.monotonic() - t0
        time.sleep(0.01)
    raise DemoError(f"no heartbeat and inputs from the PLC at {bridge.host}:{bridge.port} within {timeout_s:.0f} s")


class StatusLine:
    """A status line from the controller's live buffers: refreshed in place (``\\r``) every
    0.2 s on a terminal, else a new line every 2 s (``inplace=False``, for logs)."""

    def __init__(self, ctrl, stream: TextIO, inplace: bool = True):
        self.ctrl, self.stream, self.inplace = ctrl, stream, inplace
        self.period_s = 0.2 if inplace else 2.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="demo-status", daemon=True)
        names = ctrl.input_names
        self._idx = {k: names.index(k) for k in ("level", "temperature", "level_sp", "temp_sp")}
        self._out = {k: ctrl.output_names.index(k) for k in ("valve", "heater")}

    def start(self) -> "StatusLine":
        """Start refreshing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, leaving the last line in place."""
        self._stop.set()
        self._thread.join(2.0)
        self.stream.write(("\r" + self.line() + "\n") if self.inplace else self.line() + "\n")
        self.stream.flush()

    def _main(self) -> None:
        while not self._stop.wait(self.period_s):
            self.stream.write("\r" + self.line() if self.inplace else self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The current status (values read without locking: display only)."""
        c = self.ctrl
        x, y = c.cycle.values[0].copy(), c.cycle.out[0].copy()
        i, o = self._idx, self._out
        st = c.status("main") if "main" in c.slots else {"status": "waiting", "mode": ""}
        return (f"cycle {c.counters['cycles']:5d}  level {x[i['level']]:.3f} m (sp {x[i['level_sp']]:.2f})  "
                f"temp {x[i['temperature']]:5.2f} C (sp {x[i['temp_sp']]:4.1f})  valve {y[o['valve']]:.3f}  "
                f"heater {y[o['heater']]:.3f}  {st['status']:8s} {st['mode']:7s} "
                f"deadline misses {c.counters['deadline_misses']}  ")


def plot(path: Path, live: dict, expert: dict, no_control: dict, title: str,
         start: tuple[float, float] | None = None) -> Path:
    """Setpoints, measurements and actuators of the live run beside the simulated expert;
    ``start`` = (first controller output, end of its warm-up) in plant time, shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    ax = axes[0]
    ax.plot(live["t"], live["level_sp"], "k--", lw=1.2, label="setpoint")
    ax.plot(no_control["t"], no_control["level"], color="0.7", lw=1.0, label="no control")
    ax.plot(expert["t"], expert["level"], color="tab:orange", lw=1.2, label="expert PID (simulated)")
    ax.plot(live["t"], live["level"], color="tab:blue", lw=1.4, label="MoE policy (live, Modbus)")
    ax.set_ylabel("level (m)")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax = axes[1]
    ax.plot(live["t"], live["temp_sp"], "k--", lw=1.2, label="setpoint")
    ax.plot(no_control["t"], no_control["temperature"], color="0.7", lw=1.0, label="no control")
    ax.plot(expert["t"], expert["temperature"], color="tab:orange", lw=1.2, label="expert PID")
    ax.plot(live["t"], live["temperature"], color="tab:blue", lw=1.4, label="MoE policy")
    ax.set_ylabel("temperature (C)")
    ax = axes[2]
    ax.plot(expert["t"], expert["valve_cmd"], color="tab:orange", lw=1.0, label="valve, expert")
    ax.plot(live["t"], live["valve_cmd"], color="tab:blue", lw=1.2, label="valve, MoE")
    ax.plot(expert["t"], expert["heater_cmd"], color="tab:red", lw=1.0, ls=":", label="heater, expert")
    ax.plot(live["t"], live["heater_cmd"], color="tab:green", lw=1.2, label="heater, MoE")
    ax.set_ylabel("actuator (0..1)")
    ax.set_xlabel("plant time (s)")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    for ax in axes:
        if start is not None:
            ax.axvspan(0, start[0], color="0.88", zorder=0)
            ax.axvspan(start[0], start[1], color="0.95", zorder=0)
        ax.grid(alpha=0.3)
    if start is not None:
        axes[2].text(start[1] + 0.1, 0.93, "before the first cycle the PLC holds its commands; then the\n"
                     "outputs track the actuators while the policy's history fills (warm-up)",
                     ha="left", va="top", fontsize=7, color="0.35", transform=axes[2].get_xaxis_transform())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def failsafe_events(recording: Path, config) -> list[dict]:
    """Each cycle of a flight recording in which a stream failed safe: its cycle number, time
    (s from the first cycle), cause, and what held the cycle up (how late the loop woke, how
    long inference took against its budget), so that a stall is named."""
    from runtime.control.recorder import RecordingReader

    budget_ms = config.loop.infer_budget_ms
    events, t0 = [], None
    for rec in RecordingReader(recording):
        if rec.get("type") != "cycle":
            continue
        t0 = rec["t_ns"] if t0 is None else t0
        for st in rec["streams"]:
            if st["st"] != "failsafe":
                continue
            read, infer, write, late = (v / 1e6 for v in rec["timing"])
            cause = st["why"] or "unknown"
            if cause == "timeout":
                detail = f"inference over its {budget_ms:.0f} ms budget"
            elif cause == "busy":
                detail = "inference still busy with the previous cycle"
            elif cause == "invalid_input":
                detail = "invalid inputs " + ", ".join(f"{k} ({v})" for k, v in (st.get("bad") or {}).items())
            elif cause == "heartbeat":
                detail = "the Modbus bridge held the fail-safe values (PLC heartbeat not moving)"
            else:
                detail = st.get("error") or cause
            events.append({"cycle": rec["seq"], "t_s": round((rec["t_ns"] - t0) / 1e9, 3), "stream": st["s"],
                           "cause": cause, "detail": detail, "woke_late_ms": round(late, 2),
                           "infer_ms": round(infer, 2), "read_ms": round(read, 2)})
    return events


def output_steps(recording: Path) -> dict:
    """The largest cycle-to-cycle step of each output into every cycle the controller drove
    (status ok or hold, mode auto or warm-up: not a fail-safe, which is immediate, nor manual,
    where the outputs follow the operator), from a flight recording, beside its rate limit per
    cycle. The first cycle after start-up, a fail-safe or manual is included: it must start
    from what was sent."""
    from runtime.control.recorder import RecordingReader

    largest, limit, prev, n = {}, {}, {}, 0
    for rec in RecordingReader(recording):
        if rec.get("type") == "header":
            period_s = rec["period_ns"] / 1e9
            names = rec["outputs"]
            limit = {lim[0]: lim[3] * period_s for lim in rec["output_limits"]}
            largest = dict.fromkeys(names, 0.0)
            continue
        if rec.get("type") != "cycle":
            continue
        for st in rec["streams"]:
            before = prev.get(st["s"])
            if before is not None and st["st"] != "failsafe" and st.get("mode", "auto") != "manual":
                n += 1
                for name, a, b in zip(names, before, st["out"]):
                    largest[name] = max(largest[name], abs(a - b))
            prev[st["s"]] = st["out"]
    return {"largest": largest, "limit": limit, "policy_cycles": n,
            "ok": all(largest[k] <= limit[k] * (1 + 1e-9) for k in largest)}


def simulate_policy(seed: int, duration_s: float, deploy: Path | None = None, engine=None
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """The plant of ``seed`` in simulated time from t = 0 under the deployment's controller
    (``deploy``: the demo's ``deploy.toml`` by default; ``engine``: an engine to use instead of
    building the package's), stepped once per period with what the PLC would serve, the
    manual/auto coil on auto; returns the plant's log and the controller's ``stats()``.
    Deterministic: simulated time has no wall clock, so the watchdog's inference budget is
    lifted (a step on a busy machine would otherwise time out and fail safe)."""
    from sdk.service.config import DeployConfig
    from sdk.service.controller import Controller
    from sdk.demo import plant as P

    config = DeployConfig.load(deploy or find_example() / "deploy.toml", check_sources=False)
    config.loop.infer_budget_ms = 600_000.0
    with Controller(config, engine=engine, bridges=False) as ctrl:
        log = P.simulate(seed, lambda m: ctrl.step({**m, "auto": 1.0}), duration_s)
        return log, ctrl.stats()


def start_steps(live: dict, first_s: float | None) -> dict:
    """How far the controller's first write moved each actuator command at the plant (plant log:
    the tick it arrived at against the tick before)."""
    t = np.asarray(live["t"])
    if first_s is None:
        return {"valve": None, "heater": None}
    k = max(int(np.searchsorted(t, first_s)), 1)
    return {name: float(abs(live[f"{name}_cmd"][k] - live[f"{name}_cmd"][k - 1])) for name in ("valve", "heater")}


def run_demo(duration_s: float = 20.0, out: str | Path = "r1edge-demo", seed: int = 0, *,
             status: TextIO | None = None, inplace: bool = True) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary, with ``ok`` and ``checks``.

    ``status``: a stream for the live status line (None: none), refreshed in place if ``inplace``.
    """
    from sdk.service.controller import Controller
    from sdk.service.replay import replay
    from sdk.demo import expert as E
    from sdk.demo import plant as P

    if not duration_s >= 2.0:
        raise ValueError(f"duration must be at least 2 s (the start-up alone takes about 1 s), got {duration_s}")
    first_step = P.Scenario(seed).first_setpoint_step_s
    if duration_s < first_step + SETTLE_S:
        raise ValueError(f"duration {duration_s:g} s is too short to score plant seed {seed}: its first setpoint "
                         f"step comes at {first_step:.1f} s, and the score compares how the controllers follow "
                         f"it (at least {math.ceil(first_step + SETTLE_S)} s)")
    example = find_example()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recording = out / "recording"
    if recording.is_dir():                  # keep only this run's recording
        for f in recording.glob("*.r1rec"):
            f.unlink()
    plant_log = out / "plant.npz"
    plant_log.unlink(missing_ok=True)
    port = free_port()
    config = demo_config(port, recording, example)
    t_build = time.perf_counter()
    ctrl = Controller(config)
    build_s = time.perf_counter() - t_build
    log.info("controller ready in %.1f s (package %s)", build_s, config.model.path)
    plant = PlantProcess(port, seed, log_path=plant_log, stderr_path=out / "plant.log")
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)
    try:
        plant.start()
        waited = wait_for_plc(ctrl)
        line = StatusLine(ctrl, status, inplace).start() if status is not None else None

        def on_sigint(*_):
            """Ctrl-C: finish the current cycle, then score what ran (the demo then fails)."""
            nonlocal interrupted
            interrupted = True
            ctrl.stop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_sigint)
        try:
            stats = ctrl.run(duration_s)
        finally:
            if line is not None:
                line.stop()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)
        plant.stop()
    finally:
        plant.kill()
        ctrl.close()
    if not plant_log.is_file():
        raise DemoError(f"the plant wrote no log to {plant_log} (see {out / 'plant.log'})")
    with np.load(plant_log, allow_pickle=False) as f:
        live = {k: f[k] for k in f.files}

    stop_s = min(duration_s, float(live["t"][-1]))
    expert_log = P.simulate(seed, E.ExpertController(), stop_s)
    none_log = P.simulate(seed, None, stop_s)
    tracking = {name: P.tracking_error(lg, TRACK_FROM_S, stop_s) for name, lg in
                (("moe", live), ("expert", expert_log), ("no_control", none_log))}
    ratio = tracking["moe"]["score"] / tracking["expert"]["score"]
    vs_none = tracking["moe"]["score"] / tracking["no_control"]["score"]
    rep = replay(recording)
    steps = output_steps(recording)
    held = np.asarray(live["held"])
    # The PLC flags "held" until the first command arrives: that tick is the controller's first write.
    written = np.flatnonzero(held == 0)
    first_s = float(live["t"][written[0]]) if written.size else None
    start = start_steps(live, first_s)
    period_s = config.loop.period_ms / 1e3
    shown = np.asarray(live["t"]) <= stop_s
    png = plot(out / "demo.png", {k: np.asarray(v)[shown] for k, v in live.items()}, expert_log, none_log,
               f"r1edge demo: heated tank, plant seed {seed}, {stop_s:.0f} s scored from t = 0; MoE policy "
               f"(pruned, int8) over Modbus TCP vs expert PID; tracking error {ratio:.2f}x the expert's",
               None if first_s is None else (first_s, first_s + config.loop.warmup_cycles * period_s))
    events = failsafe_events(recording, config)
    bound = MAX_FAILSAFE_FRACTION * max(stats["cycles"], 1)
    limits = {o.name: (o.max_rate or float("inf")) * period_s for o in config.outputs}
    checks = {
        "tracking_within_max_ratio": ratio <= MAX_RATIO,
        "far_below_no_control": vs_none <= MAX_VS_NO_CONTROL,
        "bumpless_start": first_s is not None and all(start[k] <= limits[k] for k in start),
        "outputs_within_rate_limit": steps["ok"] and steps["policy_cycles"] > 0,
        "every_failsafe_cycle_explained": (len({e["cycle"] for e in events}) == stats["failsafe_cycles"]
                                           and all(e["cause"] != "unknown" for e in events)),
        "failsafe_and_misses_within_1pct": (stats["failsafe_cycles"] <= bound
                                            and stats["deadline_misses"] <= bound),
        "replay_bit_exact": bool(rep["identical"]) and rep["cycles"] == stats["cycles"],
        "completed": not interrupted,
    }
    return {
        "ok": all(checks.values()), "checks": checks,
        "seed": seed, "duration_s": duration_s, "scored_s": [TRACK_FROM_S, stop_s], "port": port,
        "package": str(config.model.path), "controller_build_s": round(build_s, 2),
        "waited_for_plc_s": round(waited, 3),
        "tracking": tracking, "ratio_vs_expert": ratio, "ratio_vs_no_control": vs_none,
        "cycles": stats["cycles"], "latency_us": stats["latency_us"],
        "deadline_misses": stats["deadline_misses"], "skipped_ticks": stats["skipped_ticks"],
        "failsafe_cycles": stats["failsafe_cycles"], "held_cycles": stats["held_cycles"],
        "tracking_cycles": stats["tracking_cycles"], "first_write_s": first_s, "start_step": start,
        "step_limit": limits, "output_steps": steps,
        "failsafe_events": events, "max_failsafe_fraction": MAX_FAILSAFE_FRACTION,
        "realtime": {k: v for k, v in stats["rt_applied"].items() if isinstance(v, dict)},
        "plant_held_ticks": int(held.sum()),
        "modbus": {k: stats["bridges"]["modbus"][k] for k in ("io_us", "errors", "bad", "reconnects")},
        "replay": {k: rep[k] for k in ("identical", "cycles", "stream_steps", "model_outputs_compared",
                                       "final_outputs_compared", "mismatches", "first_mismatch")},
        "plot": str(png), "recording": str(recording), "plant_log": str(plant_log),
    }


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def render_demo(s: dict[str, Any]) -> None:
    """Print the demo summary."""
    tr = s["tracking"]
    lat = s["latency_us"]
    print(f"r1edge demo: plant seed {s['seed']}, {s['cycles']} control cycles over {s['duration_s']:.0f} s "
          f"(Modbus TCP on 127.0.0.1:{s['port']}), scored on {s['scored_s'][0]:.0f}-{s['scored_s'][1]:.1f} s")
    print("  tracking error (RMS; score = mean of level and temperature normalised by their setpoint span)")
    for name, label in (("moe", "MoE policy, live"), ("expert", "expert PID, simulated"),
                        ("no_control", "no control, simulated")):
        t = tr[name]
        print(f"    {label:24s} level {t['level_rms']:.4f} m   temperature {t['temp_rms']:.3f} K   "
              f"score {t['score']:.4f}")
    print(f"  MoE / expert            {s['ratio_vs_expert']:.3f}  (must be <= {MAX_RATIO})")
    print(f"  MoE / no control        {s['ratio_vs_no_control']:.3f}  (must be <= {MAX_VS_NO_CONTROL})")
    lim, st, big = s["step_limit"], s["start_step"], s["output_steps"]["largest"]
    first = "no command reached the plant" if s["first_write_s"] is None else \
        f"first command at plant t = {s['first_write_s']:.2f} s, then {s['tracking_cycles']} tracking cycles"
    print(f"  bumpless start          {first}")
    print("    step at the actuators  " + "   ".join(f"{k} {v:.4f}" for k, v in st.items() if v is not None)
          + f"  (must be <= {' / '.join(f'{v:g}' for v in lim.values())}, one rate-limited step)")
    print("  largest policy step     " + "   ".join(f"{k} {v:.4f}" for k, v in big.items())
          + f"  (limit {' / '.join(f'{v:g}' for v in lim.values())} per cycle, over "
          f"{s['output_steps']['policy_cycles']} cycles)")
    print(f"  cycle latency           p50 {lat['p50']:.0f} us   p99 {lat['p99']:.0f} us   max {lat['max']:.0f} us "
          f"(tick to outputs handed to the bridge)")
    print(f"  deadline misses         {s['deadline_misses']}   skipped ticks {s['skipped_ticks']}")
    print(f"  fail-safe cycles        {s['failsafe_cycles']}   held cycles {s['held_cycles']}   "
          f"(each must have its cause reported; at most {100 * s['max_failsafe_fraction']:.0f}% of cycles)")
    for e in s["failsafe_events"][:10]:
        print(f"    cycle {e['cycle']} at {e['t_s']:.2f} s, stream {e['stream']}: {e['cause']} ({e['detail']}); "
              f"loop woke {e['woke_late_ms']:.1f} ms late, inference {e['infer_ms']:.1f} ms")
    if len(s["failsafe_events"]) > 10:
        print(f"    ... {len(s['failsafe_events']) - 10} more in the summary (--json)")
    fifo = s["realtime"].get("sched_fifo")
    print("  real-time scheduling    " + ("SCHED_FIFO applied to the control loop" if fifo and fifo["applied"] else
                                         "not applied (" + (fifo["detail"] if fifo else "not requested") + ")"))
    r = s["replay"]
    print(f"  replay                  {'bit-exact' if r['identical'] else 'MISMATCH'}: {r['cycles']} cycles, "
          f"{r['model_outputs_compared']} model and {r['final_outputs_compared']} final outputs compared"
          + ("" if r["identical"] else f"; first mismatch {r['first_mismatch']}"))
    print(f"  plot                    {_shown(s['plot'])}")
    print(f"  flight recording        {_shown(s['recording'])}")
    failed = [k for k, v in s["checks"].items() if not v]
    print("PASS" if s["ok"] else f"FAIL: {', '.join(failed)}")

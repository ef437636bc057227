"""``sdk.Controller``: the one place that wires engine, loop, safety, recorder and bridges.

A controller is built from a deployment TOML (``sdk.service.config``). It serves named streams from
a fixed set of engine slots (``[model] streams``); a stream gets a slot the first time it is
seen and keeps it. Each cycle batches every stream with valid inputs into one engine step
(the engine's outputs are batch-invariant, so batching never changes a stream's decision),
under the watchdog, then clamps and rate-limits the outputs (``runtime.control.safety``).

- ``step(inputs, stream="main")``: one synchronous cycle, for use inside someone else's loop.
- ``run(duration_s=None)``: the periodic loop (``runtime.control.loop``), inputs from the configured
  bridges or a ``source`` callable, outputs to the bridges and/or a ``sink`` callable.
  Bridges (``plc_bridge.bridge.Bridge``) are alike to the controller: each gives the inputs
  of the streams it has and gets the decisions of the streams it serves.
- ``stats()``: counters and latency histograms; ``close()`` or a ``with`` block to finish.

With ``[recorder]`` every cycle is appended to a flight recording (``runtime.control.recorder``);
``sdk.service.replay.replay()`` re-runs one and checks every output bit for bit.

One-off work happens before the first live cycle: building the engine (Numba compiles its
kernels on a first run, later runs load them from the on-disk cache), the first engine steps
in the inference thread (then forgotten), and, in the periodic loop, a full garbage
collection with ``gc.freeze()``. Each stage is logged as it starts, so a long first start
is never silent. When ``run()`` stops (duration, ``stop()``, SIGINT/SIGTERM in ``r1edge
run``), every stream's outputs go to their fail-safe values (or stay at the last value sent
where an output says ``on_stop = "hold"``) and reach the bridges before they close.
``verdict()`` says whether a run was healthy (``r1edge run``'s exit status).

With ``[shadow]`` a candidate package runs on the frames the live model got, in its own
thread, after the live outputs went out (``sdk.service.shadow``); it is never applied.

With ``[model] parallel = { world_size = N }`` the routed experts are split across N processes
(``runtime.cpu.parallel``, bitwise the one-process outputs; ``sdk.service.engines.ParallelRanks``). Rank 0 runs the
controller: loop, bridges, recorder; the other ranks only serve their experts. Under torchrun
every rank runs ``r1edge run`` and takes its rank from the environment; otherwise rank 0 starts
the others itself as local processes. The watchdog covers the whole step, exchange included:
a slow rank gives the fail-safe in that cycle, and a dead one (a failed collective) also stops
the run, which then reports failure (``r1edge run`` exits 1) for its supervisor to restart
it. The recording's header names the split; it replays bit for bit on one process.

With ``[advisor]`` a language model in its own process reads the advised stream's state as text
and proposes setpoints and/or a diagnosis (``sdk.service.advisor``); advice reaches the model only
through the PLC's switch, the inputs' ranges and the advisor's rate limits, and the model's
outputs through the outputs' limits as always.

Bumpless start and transfer (``runtime.control.loop.ControlCycle``): with ``[loop] warmup_cycles`` a
stream's history is filled from its first valid frame and its outputs track their ``track``
inputs for that many cycles, at start and after a window-long gap of invalid inputs (a
shorter gap is filled with copies of the frame after it); with ``[mode]
input`` a stream is manual (outputs track) while that input is 0. ``set_mode()`` (also the
ZeroMQ control command "mode") writes the mode input as one more source of it. A bridge that
puts out fail-safe values itself (``plc_bridge.bridge.FailsafeSource``: the Modbus bridge
after a PLC heartbeat loss) fails its streams safe in the controller too (reason
``heartbeat``), so the outputs ramp back from what the plant actually got.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from plc_bridge.bridge import Bridge, FailsafeSource, ModeSwitch, Reporter
from runtime.control.loop import (ControlCycle, InferenceWorker, LatencyHistogram, PeriodicLoop, RealtimeOptions,
                                  fill_history, monotonic_ns, set_compute_threads)
from runtime.control.recorder import FlightRecorder
from runtime.control.safety import (FAILSAFE, INVALID_NAMES, MISSING_STAMP, MODE_NAMES, OK, REASON_ERROR,
                                    REASON_HEARTBEAT, REASON_INPUT, REASON_NAMES, REASON_NONE, REASON_OUTPUT,
                                    STATUS_NAMES, InputGuard, OutputLimiter)
from sdk.service.config import HEARTBEAT, MODE, ConfigError, DeployConfig, opcua_signals
from sdk.service.engines import ParallelRanks, build_engine_logged
from sdk.service.metrics import MetricsServer, SnapshotExchange, take_snapshot
from sdk.service.shadow import Shadow
from sdk.tools.package import package_identity

logger = logging.getLogger(__name__)

#: ``source(seq, t_ns) -> {stream: {input: value}}`` (or ``{input: value}`` for stream "main").
Source = Callable[[int, int], Mapping[str, Any]]
#: ``sink(stream, outputs, status, seq, latency_us)``, called per stream after each cycle.
Sink = Callable[[str, dict, str, int, float], None]

class Controller:
    """Runs a policy over named streams with input validation, output limits, a watchdog,
    a flight recorder and the configured bridges. See the module docstring.

    ``engine`` (optional) is anything with the engine's sensor interface; by default the
    engine is built from ``[model]``. ``bridges=False`` leaves ``[modbus]``/``[zmq]`` unused.
    The configured bridges are in ``bridges``; ``bridge(name)`` finds one by its name.
    """

    def __init__(self, config: DeployConfig, *, engine=None, bridges: bool = True):
        self.config = cfg = config
        capacity = cfg.model.streams
        t_start = time.perf_counter()
        self.ranks: ParallelRanks | None = None
        if engine is None and cfg.model.parallel is not None and cfg.model.parallel.world_size > 1:
            self.ranks = ParallelRanks.join(cfg)
            if self.ranks.rank != 0:
                self.ranks.close(None)
                raise ConfigError(f"{cfg.source}: rank {self.ranks.rank} of model.parallel serves experts; the "
                                  "controller runs on rank 0 (`r1edge run` does this by itself)")
            try:
                engine = build_engine_logged(cfg.model.path, cfg, capacity, "", group=self.ranks.group)
            except BaseException:
                self.ranks.close(None)
                raise
        elif engine is None:
            engine = build_engine_logged(cfg.model.path, cfg, capacity, "")
        self.engine = engine
        self._rank_failure_seen = False
        if getattr(engine, "capacity", capacity) < capacity:
            raise ConfigError(f"{cfg.source}: model.streams ({capacity}) exceeds the engine's "
                              f"capacity ({engine.capacity})")
        self.model_inputs, self.output_names = list(engine.input_names), list(engine.output_names)
        # Inputs only the controller reads (tracking and mode inputs) follow the model's.
        own = {o.track for o in cfg.outputs if o.track} | ({cfg.mode.input} if cfg.mode else set())
        self.aux_inputs = [i.name for i in cfg.inputs if i.name in own and i.name not in self.model_inputs]
        _match(cfg.source, "inputs", [i.name for i in cfg.inputs if i.name not in self.aux_inputs],
               self.model_inputs)
        _match(cfg.source, "outputs", [o.name for o in cfg.outputs], self.output_names)
        #: Every input: the model's, in its order, then ``aux_inputs`` (the columns of ``cycle.values``).
        self.input_names = self.model_inputs + self.aux_inputs
        ins = {i.name: i for i in cfg.inputs}
        outs = {o.name: o for o in cfg.outputs}
        self._in_index = {n: j for j, n in enumerate(self.input_names)}
        self.period_s = cfg.loop.period_ms / 1e3
        self._budget_ns = int(cfg.loop.infer_budget_ms * 1e6)
        self._deadline_ns = int(cfg.loop.deadline_ms * 1e6)
        guard = InputGuard([ins[n].limit() for n in self.input_names], capacity)
        self.output_limits = [outs[n].limit() for n in self.output_names]
        self.track = [outs[n].track for n in self.output_names]
        limiter = OutputLimiter(self.output_limits, capacity, self.period_s,
                                [self._in_index[t] if t else -1 for t in self.track])
        self._hold_on_stop = np.array([outs[n].on_stop == "hold" for n in self.output_names])
        self.worker = InferenceWorker()
        self.compute_threads = self.worker.run_sync(lambda: set_compute_threads(cfg.loop.threads))
        self.window = int(getattr(engine, "window", cfg.model.window))
        self.cycle = ControlCycle(engine, guard, limiter, capacity=capacity, worker=self.worker, window=self.window,
                                  warmup_cycles=cfg.loop.warmup_cycles,
                                  mode_col=self._in_index[cfg.mode.input] if cfg.mode else None)
        self._mode_commands: dict[str, tuple[float, int]] = {}
        self._mode_lock = threading.Lock()
        self._failsafe_seen: dict[tuple[int, str], int] = {}
        self.shadow: Shadow | None = None
        self.advisor = None
        self.loop = PeriodicLoop(cfg.loop.period_ns, self._deadline_ns, spin_ns=int(cfg.loop.spin_us * 1e3))
        self._in_keys = self._in_index.keys()
        self.slots: dict[str, int] = {}
        self._slot_names: list[str | None] = [None] * capacity
        self._active: list[int] = []                      # slots active this cycle, in input order
        self.hist = {k: LatencyHistogram() for k in ("read", "infer", "write", "record", "latency")}
        self.counters = {"cycles": 0, "deadline_misses": 0, "failsafe_cycles": 0, "held_cycles": 0,
                         "failsafe_stream_cycles": 0, "held_stream_cycles": 0, "tracking_cycles": 0,
                         "tracking_stream_cycles": 0, "valid_input_cycles": 0,
                         "unknown_inputs": 0, "dropped_streams": 0, "read_errors": 0, "write_errors": 0,
                         "sink_errors": 0, "record_errors": 0, "mode_changes": 0}
        self._logged_mode = np.full(capacity, -1, np.int16)      # each slot's mode as last logged
        self._mode_diff = np.zeros(capacity, bool)
        self.failsafe_by_reason = dict.fromkeys(REASON_NAMES[1:], 0)
        self.held_by_reason = dict.fromkeys(REASON_NAMES[1:], 0)
        self.invalid_by_signal = np.zeros((len(self.input_names), len(INVALID_NAMES)), dtype=np.int64)
        self.snapshots = SnapshotExchange(lambda: take_snapshot(self))
        self.metrics: MetricsServer | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._source: Source | None = None
        self._sink: Sink | None = None
        self.bridges: list[Bridge] = []
        self.recorder: FlightRecorder | None = None
        try:
            self._warm_up(engine, self.worker, "")
            if cfg.shadow is not None:
                shadow_engine = build_engine_logged(cfg.shadow.path, cfg, capacity, "shadow ")
                theirs = (list(shadow_engine.input_names), list(shadow_engine.output_names))
                if theirs != (self.model_inputs, self.output_names):
                    raise ConfigError(f"{cfg.source}: shadow.path: {cfg.shadow.path} maps {theirs[0]} -> {theirs[1]}, "
                                      f"the live package {self.model_inputs} -> {self.output_names}; a shadow "
                                      "needs the same signals in the same order")
                self.shadow = Shadow(shadow_engine, cfg.shadow.path, self.output_limits, capacity, cfg.loop.threads)
                self._warm_up(shadow_engine, self.shadow.worker, "shadow ")
            if cfg.advisor is not None:
                from sdk.service.advisor import Advisor

                self.advisor = Advisor(cfg.advisor, cfg.inputs, self.input_names, self.output_names, self.period_s)
            logger.info("controller ready in %.1f s", time.perf_counter() - t_start)
            if bridges:
                self._make_bridges()
            if cfg.recorder is not None and cfg.recorder.enabled:
                self.recorder = FlightRecorder(cfg.recorder.path, self._header(),
                                               max_bytes=cfg.recorder.max_bytes, keep=cfg.recorder.keep)
            if cfg.metrics is not None:
                self.metrics = MetricsServer(self, cfg.metrics.host, cfg.metrics.port).start()
        except BaseException:
            if self.recorder is not None:
                self.recorder.close()
            self.worker.close()
            if self.shadow is not None:
                self.shadow.close()
            if self.ranks is not None:
                self.ranks.close(None if self.worker.busy else engine)
            if self.advisor is not None:
                self.advisor.close()
            raise

    @classmethod
    def from_config(cls, path: str | Path, *, engine=None, bridges: bool = True) -> "Controller":
        """Build a controller from a deployment TOML file (with ``bridges``, every input must
        have a configured source: see ``sdk.service.config``)."""
        return cls(DeployConfig.load(path, check_sources=bridges), engine=engine, bridges=bridges)

    def _warm_up(self, engine, worker: InferenceWorker, what: str, steps: int = 3) -> None:
        """The first engine steps, in the thread that will run them (its thread pool starts,
        caches and pages warm up), at full batch and at one stream, and a history fill where
        streams warm up; then every slot is reset, so no stream ever sees them."""
        cap = self.cycle.capacity
        slots = np.arange(cap, dtype=np.int64)
        feats = np.zeros((cap, len(self.model_inputs)), dtype=np.float32)
        history = np.zeros((self.window - 1 if self.config.loop.warmup_cycles else 0, feats.shape[1]), np.float32)

        def job() -> int:
            fill_history(engine, 0, history)
            t0 = monotonic_ns()
            for n in (cap, 1):
                for _ in range(steps):
                    engine.step_sensor(slots[:n], feats[:n])
            t1 = monotonic_ns()
            for slot in range(cap):
                engine.reset_slot(slot)
            return (t1 - t0) // (2 * steps)
        logger.info("%swarm-up: %d engine steps in the %s thread", what, 2 * steps, worker.name)
        step_ns = worker.run_sync(job, timeout_s=600.0)
        if self.shadow is not None and worker is self.shadow.worker:
            self.shadow.recent_step_ns.fill(step_ns)

    # ------------------------------------------------------------------ synchronous use
    def step(self, inputs: Mapping[str, float], stream: str = "main") -> dict[str, float]:
        """One cycle for one stream: ``{input: value}`` in, ``{output: value}`` out.

        A value may be ``(value, t_monotonic_ns)`` to say when it was measured (staleness is
        judged from that; a plain value counts as measured now). Missing inputs are invalid
        (``missing``); unknown names are counted and ignored.
        The outputs are what the plant should get: the model's, limited, or the fail-safe
        or held values (see ``status()``).
        """
        return self.step_many({stream: inputs})[stream]

    def step_many(self, frames: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """One cycle for several streams batched together: ``{stream: {input: value}}`` in,
        ``{stream: {output: value}}`` out. Raises ``ValueError`` if a new stream finds no free slot."""
        with self._lock:
            if self._running:
                raise RuntimeError("the controller is running its periodic loop; step() is not available")
            t0 = monotonic_ns()
            self._clear_active()
            for stream, values in frames.items():
                slot = self._slot(stream)
                if slot is None:
                    raise ValueError(f"stream {stream!r}: all {len(self._slot_names)} stream slots are in use "
                                     "(raise [model] streams)")
                self._fill(slot, values, t0)
            self._merge_mode_commands()
            t1 = monotonic_ns()
            self._advise_before(self.counters["cycles"], t1)
            infer_ns = self.cycle.run(t1, t0 + self._budget_ns)
            t2 = monotonic_ns()
            self._account(t1 - t0, infer_ns, 0, t2 - t0)
            seq = self.counters["cycles"] - 1
            if self.advisor is not None:
                self.advisor.after_cycle(self.cycle.values, self.cycle.out, self.cycle.status, self.cycle.active, t2)
            self._run_shadow(seq, None)
            self._record(seq, t0, (t1 - t0, infer_ns, 0, 0))
            out = self.cycle.out
            names = self.output_names
            return {s: dict(zip(names, out[self.slots[s]].tolist())) for s in frames}

    def advise(self, timeout_s: float = 60.0) -> dict | None:
        """Ask the advisor at once, from the advised stream's history so far, wait for the
        answer and take it (synchronous use beside ``step``, which also asks every ``every_ms``
        by itself, as ``run()`` does). A request already pending is answered and taken first.
        Returns the ``advice`` record (as recorded), or None if no answer came within
        ``timeout_s`` (it is then taken at a later cycle)."""
        adv = self.advisor
        if adv is None:
            raise RuntimeError(f"{self.config.source}: no [advisor] configured")
        if self._running:
            raise RuntimeError("the controller is running its periodic loop; it asks the advisor by itself")
        record = None
        for _ in range(2):
            with self._lock:
                fresh = not adv.pending
                if fresh and not adv.request():
                    raise RuntimeError("the advisor cannot be asked: no cycle of the advised stream ran yet, or "
                                       f"its process is gone ({adv.stats()['dead']})")
            if not adv.wait(timeout_s):
                return None
            with self._lock:
                record = adv.take_pending(self.counters["cycles"])
                if record is not None:
                    self._append(record)
            if fresh:
                break
        return record

    def status(self, stream: str = "main") -> dict:
        """The last cycle's ``status`` (ok/failsafe/hold), ``reason``, invalid inputs and
        ``mode`` (auto, manual, warmup) of a stream."""
        slot = self.slots.get(stream)
        if slot is None:
            raise KeyError(f"unknown stream {stream!r}")
        reason = int(self.cycle.reason[slot])
        return {"status": STATUS_NAMES[int(self.cycle.status[slot])], "reason": REASON_NAMES[reason],
                "invalid": self.cycle.guard.invalid_inputs(slot) if reason == REASON_INPUT else {},
                "mode": MODE_NAMES[int(self.cycle.mode[slot])], "heartbeat": self.cycle.heartbeat}

    def set_mode(self, stream: str, mode: str) -> dict:
        """Switch ``stream`` to ``"manual"`` (its outputs track) or ``"auto"`` (the model drives),
        as if its ``[mode]`` input had just been written with 0 or 1: from any thread, applied
        at the next cycle, both ways bumpless. Where a bridge also gives the mode input, the
        newer value wins (a Modbus client's poll counts as new every time). Raises
        ``ValueError`` without ``[mode]`` or for another mode, ``KeyError`` for a stream that
        has not been seen."""
        if self.config.mode is None:
            raise ValueError(f"{self.config.source}: no [mode] input configured; add [mode] input = \"...\"")
        if mode not in ("manual", "auto"):
            raise ValueError(f"mode must be 'manual' or 'auto', got {mode!r}")
        if stream not in self.slots:
            raise KeyError(f"unknown stream {stream!r} (streams: {', '.join(self.slots) or 'none yet'})")
        with self._mode_lock:
            self._mode_commands[stream] = (1.0 if mode == "auto" else 0.0, monotonic_ns())
        logger.info("stream %r: %s requested", stream, mode)
        return {"stream": stream, "mode": mode}

    def _merge_mode_commands(self) -> None:
        """``set_mode`` requests into this cycle's inputs, where newer than the mode input's value."""
        if not self._mode_commands:
            return
        col, cycle = self.cycle.mode_col, self.cycle
        with self._mode_lock:
            commands = tuple(self._mode_commands.items())
        for stream, (value, stamp) in commands:
            slot = self.slots.get(stream)
            if slot is not None and cycle.active[slot] and stamp > cycle.stamps[slot, col]:
                cycle.values[slot, col] = value
                cycle.stamps[slot, col] = stamp

    @property
    def heartbeat(self) -> int:
        """The output heartbeat: bumped every cycle, modulo 65536 (one Modbus register)."""
        return self.cycle.heartbeat

    # ------------------------------------------------------------------ the periodic loop
    def run(self, duration_s: float | None = None, *, source: Source | None = None,
            sink: Sink | None = None) -> dict:
        """Run the periodic loop until ``stop()`` (or for ``duration_s``); returns ``stats()``.

        Inputs come from ``source`` if given, else from the configured bridges; outputs go to
        the bridges and to ``sink``. Bridges are started here and stopped on return.
        """
        if source is None and not self.bridges:
            raise ValueError(f"{self.config.source}: no input source: configure [modbus] or [zmq], "
                             "or pass source=")
        with self._lock:
            if self._running:
                raise RuntimeError("the controller is already running")
            if self._closed:
                raise RuntimeError("the controller is closed")
            self._running = True
            self._idle.clear()
        self._source, self._sink = source, sink
        started = []
        try:
            for bridge in self.bridges:
                bridge.start()
                started.append(bridge)
            rt = None
            if self.config.loop.realtime:
                rt = RealtimeOptions(priority=self.config.loop.priority, cpu=self.config.loop.cpu)
            logger.info("control loop starting: %s ms period (the first cycle follows a full garbage collection)",
                        f"{self.config.loop.period_ms:g}")
            self.loop.run(self._loop_cycle, duration_s=duration_s, realtime=rt, helpers=[self.worker])
        finally:
            try:
                self._publish_stop()
            except Exception as exc:                      # the bridges must still close
                logger.exception("could not publish the on-stop outputs: %s", exc)
            for bridge in reversed(started):
                bridge.stop()
            self._source = self._sink = None
            self._running = False
            self._idle.set()
        return self.stats()

    def stop(self) -> None:
        """Make ``run()`` return after the current cycle (safe from threads and signal handlers)."""
        self.loop.stop()

    def _loop_cycle(self, seq: int, tick_ns: int) -> int:
        t0 = monotonic_ns()
        try:
            self._read(t0)
        except Exception as exc:                          # inputs keep ageing: staleness fails safe
            self._error("read_errors", exc)
        t1 = monotonic_ns()
        self._advise_before(seq, t1)
        infer_ns = self.cycle.run(t1, tick_ns + self._budget_ns)
        if self.ranks is not None and self.engine.failure is not None and not self._rank_failure_seen:
            self._rank_failure_seen = True               # this cycle's fail-safe still goes out, then the run stops
            logger.error("the expert-parallel engine failed, stopping: %s", self.engine.failure)
            self.loop.stop()
        t2 = monotonic_ns()
        self._write(seq, tick_ns, (t2 - tick_ns) / 1e3)
        t3 = monotonic_ns()
        self._account(t1 - t0, infer_ns, t3 - t2, t3 - tick_ns)
        if self.advisor is not None:
            self.advisor.after_cycle(self.cycle.values, self.cycle.out, self.cycle.status, self.cycle.active, t3)
        if self.shadow is not None:
            self._run_shadow(seq, tick_ns + self.loop.period_ns - self.loop.spin_ns - monotonic_ns())
        self._record(seq, tick_ns, (t1 - t0, infer_ns, t3 - t2, t0 - tick_ns))
        self.snapshots.serve()
        return t3

    def _advise_before(self, seq: int, now_ns: int) -> None:
        """The advisor's turn before a cycle runs: record an answer that came in, put the
        advice in force where the PLC's switch allows."""
        if self.advisor is not None:
            record = self.advisor.before_cycle(seq, self.cycle.values, self.cycle.active, now_ns)
            if record is not None:
                self._append(record)

    def _run_shadow(self, seq: int, slack_ns: int | None) -> None:
        """Record the shadow's answer to the previous cycle if it is there, then hand it this
        cycle's frames (never waiting for it)."""
        shadow = self.shadow
        if shadow is None:
            return
        record = shadow.collect(self._slot_names)
        if record is not None:
            self._append(record)
        shadow.submit(seq, self.cycle, slack_ns)

    def _publish_stop(self) -> None:
        """On stop: every stream's outputs to their fail-safe values (``on_stop = "hold"``: the
        last value sent), to the bridges that serve it and the sink, and into the recording."""
        if self.shadow is not None:
            record = self.shadow.finish(self._slot_names)
            if record is not None:
                self._append(record)
        limiter, names, hold = self.cycle.limiter, self.output_names, self._hold_on_stop
        streams = list(self.slots)
        for bridge in self.bridges:
            streams += [s for s in bridge.input_streams() if s not in streams]
        status = "hold" if hold.all() else "failsafe"
        seq, hb, entries = self.loop.cycles, float(self.cycle.heartbeat), []
        for stream in streams:
            slot = self.slots.get(stream)
            values = np.where(hold, limiter.last[slot] if slot is not None else limiter.failsafe, limiter.failsafe)
            outputs = dict(zip(names, values.tolist()))
            entries.append({"s": stream, "out": values.tolist(), "st": status})
            if self._sink is not None:
                try:
                    self._sink(stream, outputs, status, seq, 0.0)
                except Exception as exc:
                    self._error("sink_errors", exc)
            for bridge in self.bridges:
                if bridge.serves(stream):
                    try:
                        bridge.publish({**outputs, HEARTBEAT: hb}, status, seq, 0.0, stream)
                    except Exception as exc:
                        self._error("write_errors", exc)
        if streams:
            logger.info("stopped: outputs of %s set to %s", ", ".join(map(repr, streams)),
                        "their last values (on_stop = hold)" if hold.all() else
                        "fail-safe" + (" (held where on_stop = hold)" if hold.any() else ""))
        self._append({"type": "stop", "seq": seq, "t_ns": monotonic_ns(), "streams": entries})

    def _read(self, now: int) -> None:
        self._clear_active()
        if self._source is not None:
            frames = self._source(self.loop.cycles, now)
            if frames and not isinstance(next(iter(frames.values())), Mapping):
                frames = {"main": frames}
            for stream, values in (frames or {}).items():
                slot = self._slot(stream)
                if slot is not None:
                    self._fill(slot, values, now)
        else:
            for bridge in self.bridges:
                for stream in bridge.input_streams():
                    slot = self._slot(stream)
                    if slot is not None:
                        self._fill_stamped(slot, bridge.snapshot(stream))
        self._merge_mode_commands()
        for i, bridge in enumerate(self.bridges):
            if isinstance(bridge, FailsafeSource):
                self._check_failsafe(i, bridge)

    def _check_failsafe(self, i: int, bridge: FailsafeSource) -> None:
        """Fail a stream safe while a bridge serving it puts out its fail-safe values itself, and
        for one cycle after it did so since the last check (the plant got them meanwhile)."""
        forced, seen = self.cycle.forced, self._failsafe_seen
        for slot in self._active:
            stream = self._slot_names[slot]
            if not bridge.serves(stream):
                continue
            overriding, entries = bridge.failsafe_state(stream)
            if overriding or entries != seen.get((i, stream), 0):
                forced[slot] = True
            seen[i, stream] = entries

    def _write(self, seq: int, tick_ns: int, latency_us: float) -> None:
        cycle, names, hb = self.cycle, self.output_names, float(self.cycle.heartbeat)
        for slot in self._active:
            stream = self._slot_names[slot]
            outputs = dict(zip(names, cycle.out[slot].tolist()))
            status = STATUS_NAMES[int(cycle.status[slot])]
            if self._sink is not None:
                try:
                    self._sink(stream, outputs, status, seq, latency_us)
                except Exception as exc:
                    self._error("sink_errors", exc)
            if not self.bridges:
                continue
            outputs = {**outputs, HEARTBEAT: hb, MODE: float(cycle.mode[slot])}
            if self.advisor is not None and slot == self.advisor.slot:
                outputs.update(self.advisor.published())
            for bridge in self.bridges:
                if bridge.serves(stream):
                    try:
                        bridge.publish(outputs, status, seq, latency_us, stream)
                    except Exception as exc:
                        self._error("write_errors", exc)

    def _mode_changed(self, slot: int, mode: int) -> None:
        """Log a stream's change of mode (auto, manual, warm-up): the first 1,000 of a run; the
        rest are counted in ``mode_changes`` only (a flapping mode input must not flood the log)."""
        before = int(self._logged_mode[slot])
        self._logged_mode[slot] = mode
        stream = self._slot_names[slot]
        if before < 0:
            return
        self.counters["mode_changes"] += 1
        n = self.counters["mode_changes"]
        if n <= 1000:
            logger.info("stream %r: %s -> %s", stream, MODE_NAMES[before], MODE_NAMES[mode])
        if n == 1000:
            logger.warning("1,000 mode changes logged: further ones are counted in mode_changes only")

    # ------------------------------------------------------------------ streams and inputs
    def _slot(self, stream: str) -> int | None:
        slot = self.slots.get(stream)
        if slot is not None:
            return slot
        try:
            slot = self._slot_names.index(None)
        except ValueError:
            self.counters["dropped_streams"] += 1
            if f"stream:{stream}" not in self._warned and len(self._warned) < 1000:
                self._warned.add(f"stream:{stream}")
                logger.warning("stream %r dropped: all %d slots in use", stream, len(self._slot_names))
            return None
        self.slots[stream] = slot
        self._slot_names[slot] = stream
        self._logged_mode[slot] = -1
        self.cycle.reset_slot(slot)
        if self.shadow is not None:
            self.shadow.reset_slot(slot)
        if self.advisor is not None and stream == self.advisor.section.stream:
            self.advisor.slot = slot
        logger.info("stream %r -> slot %d", stream, slot)
        return slot

    def _fill(self, slot: int, values: Mapping[str, Any], now: int) -> None:
        """One stream's inputs: a value, or ``(value, t_monotonic_ns)`` to say when it was
        measured (else it counts as measured ``now``); absent or None ones are missing."""
        row, stamps = self.cycle.values[slot], self.cycle.stamps[slot]
        if values.keys() == self._in_keys:                # the usual case: every input, plain values
            given = [values[n] for n in self.input_names]
            if None not in given:
                try:
                    row[:] = given
                except (TypeError, ValueError):           # a (value, t_ns) pair or a non-number
                    pass
                else:
                    stamps.fill(now)
                    self._activate(slot)
                    return
        row.fill(np.nan)
        stamps.fill(MISSING_STAMP)
        index = self._in_index
        for name, value in values.items():
            j = index.get(name)
            stamp = now
            if isinstance(value, tuple) and len(value) == 2:
                value, stamp = value
            if j is None:
                if self.advisor is None or not self.advisor.capture(slot, name, value, stamp):
                    self._unknown(name)
                continue
            if value is None:
                continue
            try:
                row[j] = value
                stamps[j] = stamp
            except (TypeError, ValueError, OverflowError):
                row[j] = np.nan                           # not a number: invalid ("nan")
                stamps[j] = now
        self._activate(slot)

    def _fill_stamped(self, slot: int, snapshot: Mapping[str, tuple[float, int]]) -> None:
        """Inputs from a bridge, each with its receive time. The first bridge to give a stream
        inputs in a cycle starts from an empty row; the others merge into it signal by signal,
        the newer receive time winning, so two bridges feeding one stream never wipe each other."""
        row, stamps = self.cycle.values[slot], self.cycle.stamps[slot]
        if not self.cycle.active[slot]:
            row.fill(np.nan)
            stamps.fill(MISSING_STAMP)
            self._activate(slot)
        for name, (value, rx_ns) in snapshot.items():
            j = self._in_index.get(name)
            if j is None:
                if self.advisor is None or not self.advisor.capture(slot, name, value, rx_ns):
                    self._unknown(name)
                continue
            if rx_ns > stamps[j]:
                row[j] = value
                stamps[j] = rx_ns

    def _clear_active(self) -> None:
        self.cycle.active.fill(False)
        self.cycle.forced.fill(False)
        self._active.clear()
        if self.advisor is not None:
            self.advisor.clear_enable()

    def _activate(self, slot: int) -> None:
        if not self.cycle.active[slot]:
            self.cycle.active[slot] = True
            self._active.append(slot)

    def _unknown(self, name: str) -> None:
        self.counters["unknown_inputs"] += 1
        if name not in self._warned and len(self._warned) < 1000:
            self._warned.add(name)
            logger.warning("unknown input %r ignored (configured: %s)", name, ", ".join(self.input_names))

    def _error(self, counter: str, exc: Exception) -> None:
        self.counters[counter] += 1
        n = self.counters[counter]
        if n == 1 or n % 1000 == 0:
            logger.error("%s (%d so far): %s", counter, n, exc, exc_info=exc)

    # ------------------------------------------------------------------ accounting and recording
    def _account(self, read_ns: int, infer_ns: int, write_ns: int, latency_ns: int) -> None:
        c, cycle = self.counters, self.cycle
        c["cycles"] += 1
        if latency_ns > self._deadline_ns:
            c["deadline_misses"] += 1
        h = self.hist
        h["read"].add_ns(read_ns)
        h["infer"].add_ns(infer_ns)
        h["write"].add_ns(write_ns)
        h["latency"].add_ns(latency_ns)
        n_fs, n_hold = cycle.n_failsafe, cycle.n_hold
        if cycle.n_valid:
            c["valid_input_cycles"] += 1
        if n_fs:
            c["failsafe_cycles"] += 1
            c["failsafe_stream_cycles"] += n_fs
        if n_hold:
            c["held_cycles"] += 1
            c["held_stream_cycles"] += n_hold
        if cycle.n_tracking:
            c["tracking_cycles"] += 1
            c["tracking_stream_cycles"] += cycle.n_tracking
        if n_fs or n_hold:
            self._count_failures()
        diff = self._mode_diff
        np.not_equal(cycle.mode, self._logged_mode, out=diff)
        np.logical_and(diff, cycle.active, out=diff)
        if diff.any():
            for slot in np.flatnonzero(diff):
                self._mode_changed(int(slot), int(cycle.mode[slot]))

    def _count_failures(self) -> None:
        """Fail-safe and held cycles by reason (once per reason per cycle) and invalid input
        values by signal and reason; runs only in cycles where some stream did not get the
        model's outputs."""
        c = self.cycle
        failsafe, held = set(), set()
        for slot in self._active:
            status = int(c.status[slot])
            if status == OK:
                continue
            reason = int(c.reason[slot])
            (failsafe if status == FAILSAFE else held).add(REASON_NAMES[reason])
            if reason == REASON_INPUT:
                row = c.guard.codes[slot]
                for j in np.flatnonzero(row).tolist():
                    self.invalid_by_signal[j, row[j]] += 1
        for reason in failsafe:
            self.failsafe_by_reason[reason] += 1
        for reason in held:
            self.held_by_reason[reason] += 1

    def _header(self) -> dict:
        cfg = self.config
        return {"package": package_identity(cfg.model.path), "config": cfg.to_dict(),
                "inputs": self.model_inputs, "outputs": self.output_names,
                "capacity": len(self._slot_names), "window": self.window,
                "period_ns": cfg.loop.period_ns,
                "output_limits": [[o.name, o.min, o.max, o.max_rate, o.failsafe, o.jump] for o in self.output_limits],
                "aux_inputs": self.aux_inputs, "track": self.track, "warmup_cycles": cfg.loop.warmup_cycles,
                "shadow": None if cfg.shadow is None else package_identity(cfg.shadow.path),
                "parallel": None if self.ranks is None else {
                    "world_size": self.engine.world_size, "backend": cfg.model.parallel.backend,
                    "split": [list(s) for s in self.engine.split]},
                "advisor": None if self.advisor is None else self.advisor.header()}

    def _record(self, seq: int, t_ns: int, timing: tuple[int, int, int, int]) -> None:
        """One cycle record: per active stream the inputs as given, model outputs (when the
        model answered), final outputs, status; timings [read, infer, write, lateness] ns."""
        if self.recorder is None:
            return
        t0 = monotonic_ns()
        c = self.cycle
        streams = []
        for slot in self._active:
            reason = int(c.reason[slot])
            ran = bool(c.ran[slot])
            entry = {"s": self._slot_names[slot], "slot": slot, "x": c.values[slot].tolist(),
                     "st": STATUS_NAMES[int(c.status[slot])], "why": REASON_NAMES[reason], "ran": ran,
                     "y": c.raw[slot].tolist() if ran and reason in (REASON_NONE, REASON_OUTPUT, REASON_HEARTBEAT)
                     else None,
                     "out": c.out[slot].tolist(), "mode": MODE_NAMES[int(c.mode[slot])]}
            if c.started[slot]:
                entry["pre"] = True                       # history reset and filled from this frame
            elif c.filled[slot]:
                entry["fill"] = int(c.filled[slot])       # copies of this frame filled a gap first
            if reason == REASON_INPUT:
                entry["bad"] = c.guard.invalid_inputs(slot)
            elif reason == REASON_ERROR:
                entry["error"] = c.last_error
            if self.advisor is not None and slot == self.advisor.slot:
                entry["adv"] = self.advisor.entry()
            streams.append(entry)
        self._append({"type": "cycle", "seq": seq, "t_ns": t_ns, "hb": c.heartbeat,
                      "streams": streams, "timing": list(timing)})
        self.hist["record"].add_ns(monotonic_ns() - t0)

    def _append(self, record: dict) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.append(record)
        except (OSError, ValueError) as exc:
            self._error("record_errors", exc)

    # ------------------------------------------------------------------ stats and lifecycle
    def stats(self) -> dict:
        """Counters, latency histograms (us) and what real-time settings were applied.

        ``latency_us``: tick (or call) to outputs ready; ``phases_us``: read/infer/write, and
        record (the flight record, appended after the outputs went out);
        ``lateness_us``: wake-up minus tick in the periodic loop.
        """
        loop = self.loop.stats()
        c = self.cycle
        out = dict(self.counters)
        out.update({
            "never_valid_inputs": c.guard.never_valid(),
            "latency_us": self.hist["latency"].summary(),
            "phases_us": {k: self.hist[k].summary() for k in ("read", "infer", "write", "record")},
            "lateness_us": loop["lateness_us"],
            "skipped_ticks": loop["skipped_ticks"],
            "loop_cycle_errors": loop["cycle_errors"],
            "gc_collections": loop["gc_collections"],
            "rt_applied": loop["rt_applied"],
            "invalid_inputs": c.guard.counts_by_reason(),
            "failsafe_cycles_by_reason": dict(self.failsafe_by_reason),
            "held_cycles_by_reason": dict(self.held_by_reason),
            "invalid_inputs_by_signal": {
                name: {INVALID_NAMES[k]: int(row[k]) for k in range(1, len(INVALID_NAMES))}
                for name, row in zip(self.input_names, self.invalid_by_signal)},
            "watchdog": {**c.counters, "last_error": c.last_error},
            "heartbeat": c.heartbeat,
            "streams": {"capacity": len(self._slot_names), "names": list(self.slots)},
            "compute_threads": self.compute_threads,
            "recorder": None if self.recorder is None else {
                "path": str(self.recorder.path), "records": self.recorder.records,
                "bytes": self.recorder.bytes_written},
            "bridges": {b.name: b.health() for b in self.bridges},
            "shadow": None if self.shadow is None else self.shadow.stats(),
            "advisor": None if self.advisor is None else self.advisor.stats(),
        })
        return out

    def verdict(self) -> dict:
        """Whether the run so far was healthy, as ``r1edge run``'s exit status says:
        ``{"ok": bool, "why": str}``. Not healthy: no cycle ran, no valid input ever arrived
        (no cycle had a stream whose inputs were all valid), or more than ``[loop]
        max_failsafe_fraction`` of the cycles failed safe."""
        c = self.counters
        cycles, fs = c["cycles"], c["failsafe_cycles"]
        limit = self.config.loop.max_failsafe_fraction
        if self.ranks is not None and self.engine.failure is not None:
            return {"ok": False, "why": f"the expert-parallel engine failed: {self.engine.failure}"}
        if not cycles:
            return {"ok": False, "why": "no control cycle ran"}
        links = "; ".join(f"{b.name} bridge {'connected' if b.health().get('connected') else 'not connected'}"
                          for b in self.bridges)
        invalid = {k: v for k, v in self.cycle.guard.counts_by_reason().items() if v}
        if not c["valid_input_cycles"]:
            never = self.cycle.guard.never_valid()
            return {"ok": False, "why": f"no valid input ever arrived in {cycles} cycles (never valid: "
                                        f"{', '.join(never)}; invalid values by reason {invalid})"
                                        + (f"; {links}" if links else "")}
        frac = fs / cycles
        reasons = {k: v for k, v in self.failsafe_by_reason.items() if v}
        if frac > limit:
            return {"ok": False, "why": f"fail-safe in {fs} of {cycles} cycles ({frac:.1%}), above [loop] "
                                        f"max_failsafe_fraction = {limit:g} (stream-cycles by reason {reasons}; "
                                        f"invalid values by reason {invalid})" + (f"; {links}" if links else "")}
        return {"ok": True, "why": f"{cycles} cycles, fail-safe in {fs} ({frac:.1%}, limit {limit:g})"}

    def close(self) -> None:
        """Stop the loop (waiting up to 10 s for ``run()`` to return), the bridges, the
        recording and the inference thread."""
        if self._closed:
            return
        self._closed = True
        self.loop.stop()
        if not self._idle.wait(10.0):
            logger.error("the control loop did not stop within 10 s; closing anyway")
        for bridge in self.bridges:
            bridge.stop()
        if self.shadow is not None:
            record = self.shadow.finish(self._slot_names)
            if record is not None:
                self._append(record)
            self.shadow.close()
        if self.advisor is not None:
            self.advisor.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.recorder is not None:
            self.recorder.close()
        self.worker.close()
        if self.ranks is not None:
            self.ranks.close(None if self.worker.busy else self.engine)

    @property
    def running(self) -> bool:
        """Whether ``run()`` is in progress."""
        return self._running

    def __enter__(self) -> "Controller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def bridge(self, name: str) -> Bridge:
        """The configured bridge called ``name`` ("modbus", "zmq", "opcua"); KeyError if there is none."""
        for bridge in self.bridges:
            if bridge.name == name:
                return bridge
        raise KeyError(f"no {name!r} bridge configured (configured: {[b.name for b in self.bridges]})")

    def _make_bridges(self) -> None:
        cfg = self.config
        extra_inputs = cfg.extra_inputs()
        _, outputs = cfg.bridge_signals()
        if cfg.modbus is not None:
            from plc_bridge.modbus import ModbusBridge
            self.bridges.append(ModbusBridge.from_config(cfg.modbus, self.input_names + extra_inputs, outputs))
        if cfg.zmq is not None:
            from plc_bridge.zmq_bridge import ZmqBridge
            self.bridges.append(ZmqBridge.from_config(cfg.zmq, cfg.base_dir, self.input_names + extra_inputs))
        if cfg.opcua is not None:
            from plc_bridge.opcua import OpcUaBridge
            self.bridges.append(OpcUaBridge.from_config(cfg.opcua, cfg.base_dir,
                                                        *opcua_signals(cfg.inputs, cfg.outputs, cfg.advisor)))
        for bridge in self.bridges:
            if isinstance(bridge, Reporter):
                bridge.set_stats_provider(self.stats)
                bridge.set_status_provider(self._status_all)
            if isinstance(bridge, ModeSwitch):
                bridge.set_mode_handler(self.set_mode)

    def _status_all(self) -> dict:
        return {"running": self._running, "cycles": self.counters["cycles"], "heartbeat": self.cycle.heartbeat,
                "streams": {s: self.status(s) for s in list(self.slots)}}


def _match(source, what: str, configured: list[str], model: list[str]) -> None:
    missing = [n for n in model if n not in configured]
    extra = [n for n in configured if n not in model]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model's {', '.join(map(repr, missing))} not configured")
        if extra:
            parts.append(f"{', '.join(map(repr, extra))} not in the model (model {what}: {', '.join(model)})")
        raise ConfigError(f"{source}: {what}: " + "; ".join(parts))


def render_stats(stats: dict) -> None:
    """Print a controller's stats for people."""
    lat = stats["latency_us"]
    print(f"cycles {stats['cycles']}  deadline misses {stats['deadline_misses']}  "
          f"skipped ticks {stats['skipped_ticks']}  fail-safe cycles {stats['failsafe_cycles']}  "
          f"held cycles {stats['held_cycles']}")
    print("latency us      " + _row(lat))
    print("lateness us     " + _row(stats["lateness_us"]))
    for phase, h in stats["phases_us"].items():
        print(f"{phase + ' us':<16}" + _row(h))
    bad = {k: v for k, v in stats["invalid_inputs"].items() if v}
    print(f"invalid inputs  {bad or 'none'}" + (f"  never valid: {', '.join(stats['never_valid_inputs'])}"
                                                if stats["never_valid_inputs"] else ""))
    reasons = {k: v for k, v in stats["failsafe_cycles_by_reason"].items() if v}
    if reasons:
        print(f"fail-safe by    {reasons} (stream-cycles)")
    wd = stats["watchdog"]
    print(f"watchdog        timeouts {wd['timeouts']}  errors {wd['errors']}  busy cycles {wd['busy_cycles']}  "
          f"bad outputs {wd['bad_outputs']}" + (f"  last error: {wd['last_error']}" if wd["last_error"] else ""))
    print(f"bumpless        tracking cycles {stats['tracking_cycles']}  mode changes {stats['mode_changes']}  "
          f"warm-ups {wd['warmups']}  gaps filled {wd['gaps_filled']}")
    rt = ", ".join(f"{k} {'yes' if v.get('applied') else 'no'}" for k, v in stats["rt_applied"].items()
                   if "applied" in v)
    print(f"real-time       {rt or 'not requested'}")
    if stats["recorder"]:
        r = stats["recorder"]
        print(f"recording       {r['path']} ({r['records']} records, {r['bytes']} bytes)")
    sh = stats.get("shadow")
    if sh:
        print(f"shadow          {sh['path']}: {sh['compared']} frames compared, {sh['skipped']} skipped, "
              f"{sh['errors']} errors; step us p50 {sh['step_us']['p50']:.1f} max {sh['step_us']['max']:.1f}")
        for name, d in sh["divergence"].items():
            print(f"  {name:<14}rms {d['rms']:.6g}  max {d['max_abs']:.6g}  ({d['rms_frac_range']:.3%} of range)")
    adv = stats.get("advisor")
    if adv:
        print(f"advisor         {adv['requests']} requests, {adv['good']} good answers, {adv['timeouts']} timeouts, "
              f"{adv['invalid']} invalid, {adv['budget_exhausted']} out of tokens, {adv['errors']} errors; "
              f"in force {adv['in_force_cycles']} cycles; advice {adv['advice']} diagnosis {adv['diagnosis']}")
    if "verdict" in stats:
        v = stats["verdict"]
        print(f"{'healthy' if v['ok'] else 'FAILED':<16}{v['why']}")


def _row(h: dict) -> str:
    return f"p50 {h['p50']:9.1f}  p99 {h['p99']:9.1f}  p99.9 {h['p999']:9.1f}  max {h['max']:9.1f}"

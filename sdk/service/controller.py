"""``sdk.Controller``: the one place that wires engine, loop, safety, recorder and bridges.

A controller is built from a deployment TOML (``sdk.service.config``). It serves named streams
from a fixed set of engine slots (``[model] streams``; admission in ``sdk.service.streams``).
Each cycle batches every stream with valid inputs into one engine step (batch-invariant, so
batching never changes a stream's decision), under the watchdog, then clamps and rate-limits
the outputs (``runtime.control.safety``).

The cycle (``_loop_cycle``; ``step_many`` is the same without bridges) is, in order: one
``read()`` of each bridge (``plc_bridge.bridge``: an image of every stream's inputs, filled by
the bridge's I/O thread) merged into the cycle's arrays, the mode in force (precedence by
change), ``ControlCycle.run`` (``runtime.control.loop``: validity, inference under the
watchdog, mode, limits), one ``write()`` of the decision image to each bridge (drained by its
I/O thread), the counters, the shadow and the flight record (the reading and writing:
``sdk.service.cycle_io``). Bridges are built by the registry in ``plc_bridge.bridge`` from their
sections; the controller has no case per protocol.

- ``step(inputs, stream="main")``: one synchronous cycle, for use inside someone else's loop.
- ``run(duration_s=None)``: the periodic loop, inputs from the bridges or a ``source``
  callable, outputs to the bridges and/or a ``sink`` callable.
- ``stats()``: counters and latency histograms; ``verdict()``: whether a run was healthy
  (``r1edge run``'s exit status); ``close()`` or a ``with`` block to finish.

One-off work happens before the first live cycle and is logged stage by stage: building the
engine (Numba compiles on a first run), warm-up steps in the inference thread (then
forgotten), and a full garbage collection with ``gc.freeze()``. When ``run()`` stops, every
stream's outputs go to their fail-safe values (or the last value sent, ``on_stop = "hold"``)
and reach the bridges before they close.

Fail-safe reasons set here: ``heartbeat`` while a bridge puts out a stream's fail-safe values
itself (the Modbus bridge after a PLC heartbeat loss; the outputs then ramp back from what the
plant actually got), and ``bridge`` while a bridge feeding the stream has a dead I/O task.

With ``[recorder]`` every cycle is appended to a flight recording
(``runtime.control.recorder``: packed by ``CyclePacker``; ``sdk.service.replay`` gives the
header and the msgpack records, and replays a recording bit for bit). ``[shadow]``: a
candidate package on the same frames, never applied (``sdk.service.shadow``). ``[model] parallel``: the routed experts split across
processes (``sdk.service.engines.ParallelRanks``; a dead rank stops the run). ``[advisor]``: a
language model proposing setpoints through the PLC's switch (``sdk.service.advisor``).
``[loop] warmup_cycles`` and ``[mode] input``: bumpless start and transfer
(``runtime.control.loop.ControlCycle``); ``set_mode()`` (also the ZeroMQ command "mode") is one
more source of the mode input.
"""
from __future__ import annotations

import logging
import threading
import time
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from plc_bridge.bridge import Bridge, DecisionImage, ModeSwitch, Reporter, build_bridge
from runtime.control.loop import (ControlCycle, InferenceWorker, LatencyHistogram, ModeSources, PeriodicLoop,
                                  RealtimeOptions, monotonic_ns, set_compute_threads)
from runtime.control.recorder import CyclePacker, FlightRecorder
from runtime.control.safety import (INVALID_NAMES, MODE_NAMES, REASON_INPUT, REASON_NAMES,
                                    STATUS_NAMES, InputGuard, OutputLimiter)
from sdk.service.config import HEARTBEAT, ConfigError, DeployConfig
from sdk.service.cycle_io import CycleIO
from sdk.service.engines import ParallelRanks, build_engine_logged, match_signals, warm_up
from sdk.service.metrics import (MetricsServer, SnapshotExchange, account_cycle, controller_stats, take_snapshot,
                                 verdict)
from sdk.service.replay import cycle_record, recording_header
from sdk.service.shadow import Shadow
from sdk.service.streams import StreamTable

logger = logging.getLogger(__name__)

#: ``source(seq, t_ns) -> {stream: {input: value}}`` (or ``{input: value}`` for stream "main").
Source = Callable[[int, int], Mapping[str, Any]]
#: ``sink(stream, outputs, status, seq, latency_us)``, called per stream after each cycle.
Sink = Callable[[str, dict, str, int, float], None]

class Controller(CycleIO):
    """Runs a policy over named streams with input validation, output limits, a watchdog,
    a flight recorder and the configured bridges. See the module docstring.

    ``engine`` (optional) is anything with the engine's sensor interface; by default the
    engine is built from ``[model]``. ``bridges=False`` leaves ``[modbus]``/``[zmq]`` unused;
    a list of bridges (``plc_bridge.bridge.Bridge``) is used instead of the configured ones.
    The bridges are in ``bridges``; ``bridge(name)`` finds one by its name.
    """

    def __init__(self, config: DeployConfig, *, engine=None, bridges: bool | list = True):
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
        match_signals(cfg.source, "inputs", [i.name for i in cfg.inputs if i.name not in self.aux_inputs],
               self.model_inputs)
        match_signals(cfg.source, "outputs", [o.name for o in cfg.outputs], self.output_names)
        #: Every input: the model's, in its order, then ``aux_inputs`` (the columns of ``cycle.values``).
        self.input_names = self.model_inputs + self.aux_inputs
        ins = {i.name: i for i in cfg.inputs}
        outs = {o.name: o for o in cfg.outputs}
        self._in_index = {n: j for j, n in enumerate(self.input_names)}
        self.period_s = cfg.loop.period_ms / 1e3
        self._budget_ns = int(cfg.loop.infer_budget_ms * 1e6)
        self.deadline_ns = int(cfg.loop.deadline_ms * 1e6)
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
        self.streams = StreamTable(capacity, cfg.model.names, {cfg.advisor.stream} if cfg.advisor else None)
        self.modes = ModeSources(1, capacity)             # sources: each bridge, then step/source inputs
        self._failsafe_seen = np.zeros((0, capacity), np.int64)
        self._given = np.zeros(capacity, bool)            # slots a bridge gave inputs for this cycle
        self.decisions: DecisionImage | None = None
        self._extra_cols: list[tuple[int, str]] = []
        self.shadow: Shadow | None = None
        self.advisor = None
        self.loop = PeriodicLoop(cfg.loop.period_ns, self.deadline_ns, spin_ns=int(cfg.loop.spin_us * 1e3))
        self._in_keys = self._in_index.keys()
        self.slots, self._slot_names = self.streams.slots, self.streams.names
        self.active: list[int] = []                      # slots active this cycle, in input order
        self._plain: list[int] = []                      # slots whose frame gave every input as a number
        self._block = np.zeros((capacity, len(self.input_names)))
        self._row_of = itemgetter(*self.input_names) if len(self.input_names) > 1 else (
            lambda values, name=self.input_names[0]: (values[name],))
        self.hist = {k: LatencyHistogram() for k in ("read", "infer", "write", "record", "latency")}
        self.counters = {"cycles": 0, "deadline_misses": 0, "failsafe_cycles": 0, "held_cycles": 0,
                         "failsafe_stream_cycles": 0, "held_stream_cycles": 0, "tracking_cycles": 0,
                         "tracking_stream_cycles": 0, "valid_input_cycles": 0,
                         "unknown_inputs": 0, "dropped_streams": 0, "read_errors": 0, "write_errors": 0,
                         "sink_errors": 0, "record_errors": 0, "mode_changes": 0, "status_changes": 0}
        self.logged_mode = np.full(capacity, -1, np.int16)       # each slot's mode as last logged
        self.logged_status = np.full(capacity, -1, np.int32)     # status * 256 + reason, as last logged
        self.status_key = np.zeros(capacity, np.int32)
        self.status_since = np.zeros(capacity, np.int64)         # the cycle the logged status began
        self.not_ok_logged = 0                                   # streams last logged not ok
        self.status_lines = 0                                    # lines logged about them
        # status, reason and mode of the last finished cycle (status() never sees one half done)
        self.shown = np.stack([self.cycle.status, self.cycle.reason, self.cycle.mode]).astype(np.int16)
        self.mode_diff = np.zeros(capacity, bool)
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
        self._packer: CyclePacker | None = None
        self._slots_recorded = -1                        # StreamTable.changes when the slots were last recorded
        try:
            warm_up(engine, self.worker, capacity, self.window if cfg.loop.warmup_cycles else 1)
            if cfg.shadow is not None:
                shadow_engine = build_engine_logged(cfg.shadow.path, cfg, capacity, "shadow ")
                theirs = (list(shadow_engine.input_names), list(shadow_engine.output_names))
                if theirs != (self.model_inputs, self.output_names):
                    raise ConfigError(f"{cfg.source}: shadow.path: {cfg.shadow.path} maps {theirs[0]} -> {theirs[1]}, "
                                      f"the live package {self.model_inputs} -> {self.output_names}; a shadow "
                                      "needs the same signals in the same order")
                self.shadow = Shadow(shadow_engine, cfg.shadow.path, self.output_limits, capacity, cfg.loop.threads)
                self.shadow.recent_step_ns.fill(warm_up(shadow_engine, self.shadow.worker, capacity,
                                                        self.window if cfg.loop.warmup_cycles else 1, "shadow "))
            if cfg.advisor is not None:
                from sdk.service.advisor import Advisor

                self.advisor = Advisor(cfg.advisor, cfg.inputs, self.input_names, self.output_names, self.period_s)
            logger.info("controller ready in %.1f s", time.perf_counter() - t_start)
            if bridges:
                self._make_bridges(bridges if isinstance(bridges, list) else None)
            if cfg.recorder is not None and cfg.recorder.enabled:
                header = recording_header(self)
                if self.advisor is None:                 # the advisor's entries need the msgpack record
                    self._packer = CyclePacker(self.cycle, self.cycle.guard.names, self.output_names)
                    header["packed_cycles"] = self._packer.layout()
                self.recorder = FlightRecorder(cfg.recorder.path, header, max_bytes=cfg.recorder.max_bytes,
                                               keep=cfg.recorder.keep)
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
        ``{stream: {output: value}}`` out. Raises ``ValueError`` if a new stream finds no free
        slot (or is not one of ``[model] streams``)."""
        with self._lock:
            if self._running:
                raise RuntimeError("the controller is running its periodic loop; step() is not available")
            t0 = monotonic_ns()
            self._read(t0, frames, strict=True)
            t1 = monotonic_ns()
            self._advise_before(self.counters["cycles"], t1)
            infer_ns = self.cycle.run(t1, t0 + self._budget_ns)
            t2 = monotonic_ns()
            account_cycle(self, t1 - t0, infer_ns, 0, t2 - t0)
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
        status, reason, mode = self.shown[:, slot].tolist()
        return {"status": STATUS_NAMES[status], "reason": REASON_NAMES[reason],
                "invalid": self.cycle.guard.invalid_inputs(slot) if reason == REASON_INPUT else {},
                "mode": MODE_NAMES[mode], "heartbeat": self.cycle.heartbeat}

    def set_mode(self, stream: str, mode: str) -> dict:
        """Switch ``stream`` to ``"manual"`` (its outputs track) or ``"auto"`` (the model drives),
        as if its ``[mode]`` input had just been changed to 0 or 1: from any thread, applied
        at the next cycle, both ways bumpless. Precedence is by change: each source of the mode
        (this call, each bridge, ``step``/``source`` inputs) counts when its value changes, and
        the latest change is in force; a PLC rewriting the same coil value every scan does not
        undo a request. Raises ``ValueError`` without ``[mode]`` or for another mode,
        ``KeyError`` for a stream that has not been seen."""
        if self.config.mode is None:
            raise ValueError(f"{self.config.source}: no [mode] input configured; add [mode] input = \"...\"")
        if mode not in ("manual", "auto"):
            raise ValueError(f"mode must be 'manual' or 'auto', got {mode!r}")
        if stream not in self.slots:
            raise KeyError(f"unknown stream {stream!r} (streams: {', '.join(self.slots) or 'none yet'})")
        self.modes.command(stream, 1.0 if mode == "auto" else 0.0, monotonic_ns())
        logger.info("stream %r: %s requested", stream, mode)
        return {"stream": stream, "mode": mode}

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
        if self.advisor is not None:
            self._advise_before(seq, t1)
        infer_ns = self.cycle.run(t1, tick_ns + self._budget_ns)
        if self.ranks is not None and self.engine.failure is not None and not self._rank_failure_seen:
            self._rank_failure_seen = True               # this cycle's fail-safe still goes out, then the run stops
            logger.error("the expert-parallel engine failed, stopping: %s", self.engine.failure)
            self.loop.stop()
        t2 = monotonic_ns()
        self._write(seq, (t2 - tick_ns) / 1e3)
        t3 = monotonic_ns()
        account_cycle(self, t1 - t0, infer_ns, t3 - t2, t3 - tick_ns)
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
            streams += [s for s in bridge.bound_streams() if s not in streams]
        status = "hold" if hold.all() else "failsafe"
        seq, hb, entries = self.loop.cycles, float(self.cycle.heartbeat), []
        d = self.decisions
        if d is not None:
            d.values.fill(np.nan)                          # _mode and advice: not given on stop
            d.n, d.seq, d.latency_us = 0, seq, 0.0
        for stream in streams[:len(self._slot_names)]:
            slot = self.slots.get(stream)
            values = np.where(hold, limiter.last[slot] if slot is not None else limiter.failsafe, limiter.failsafe)
            entries.append({"s": stream, "out": values.tolist(), "st": status})
            if self._sink is not None:
                try:
                    self._sink(stream, dict(zip(names, values.tolist())), status, seq, 0.0)
                except Exception as exc:
                    self._error("sink_errors", exc)
            if d is not None:
                d.names[d.n], d.status[d.n] = stream, status
                d.values[d.n, :len(names)] = values
                d.values[d.n, d.index[HEARTBEAT]] = hb
                d.n += 1
        if d is not None:
            for bridge in self.bridges:
                try:
                    bridge.write(d)
                except Exception as exc:
                    self._error("write_errors", exc)
        if streams:
            logger.info("stopped: outputs of %s set to %s", ", ".join(map(repr, streams)),
                        "their last values (on_stop = hold)" if hold.all() else
                        "fail-safe" + (" (held where on_stop = hold)" if hold.any() else ""))
        self._append({"type": "stop", "seq": seq, "t_ns": monotonic_ns(), "streams": entries})

    def _error(self, counter: str, exc: Exception) -> None:
        self.counters[counter] += 1
        n = self.counters[counter]
        if n == 1 or n % 1000 == 0:
            logger.error("%s (%d so far): %s", counter, n, exc, exc_info=exc)

    # ------------------------------------------------------------------ accounting and recording
    def _record(self, seq: int, t_ns: int, timing: tuple[int, int, int, int]) -> None:
        """The cycle's flight record: packed (one compiled call and one write), or as a msgpack
        map where the packed layout cannot say it all (an advisor, an inference error)."""
        recorder = self.recorder
        if recorder is None:
            return
        t0 = monotonic_ns()
        try:
            if self.streams.changes != self._slots_recorded:
                recorder.set_slots(self.streams.names)
                self._slots_recorded = self.streams.changes
            frame = None if self._packer is None else self._packer.frame(seq, t_ns, timing)
            if frame is not None:
                recorder.append_framed(frame)
            else:
                recorder.append(cycle_record(self, seq, t_ns, timing))
        except (OSError, ValueError) as exc:
            self._error("record_errors", exc)
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
        """Counters, latency histograms (us) and what real-time settings were applied
        (``sdk.service.metrics.controller_stats`` lists them)."""
        return controller_stats(self)

    def verdict(self) -> dict:
        """Whether the run so far was healthy, as ``r1edge run``'s exit status says:
        ``{"ok": bool, "why": str}`` (``sdk.service.metrics.verdict``)."""
        return verdict(self)

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

    def _make_bridges(self, given: list | None) -> None:
        """The bridges, built by the registry from their sections (or ``given``), their images'
        columns checked against the cycle's, the decision image, and the providers registered."""
        cfg = self.config
        wiring = cfg.wiring(self.input_names, self.output_names)
        if given is None:
            given = [build_bridge(section, table, wiring) for section, table in cfg.bridge_tables().items()]
        self.bridges = list(given)
        columns = [sig.name for sig in wiring.inputs]
        for bridge in self.bridges:
            image = getattr(bridge, "image", None)
            if image is None or image.columns != columns:
                raise ConfigError(f"{cfg.source}: the {bridge.name} bridge's inputs "
                                  f"{None if image is None else image.columns} are not the controller's {columns}")
            try:
                self.streams.reserve(bridge.bound_streams())
            except ValueError as exc:
                raise ConfigError(f"{cfg.source}: {exc}") from None
            if isinstance(bridge, Reporter):
                bridge.set_stats_provider(self.stats)
                bridge.set_status_provider(self._status_all)
            if isinstance(bridge, ModeSwitch):
                bridge.set_mode_handler(self.set_mode)
        n = len(self.input_names)
        self._extra_cols = [(j, name) for j, name in enumerate(columns) if j >= n]
        capacity = len(self._slot_names)
        self.modes = ModeSources(len(self.bridges) + 1, capacity)
        self._failsafe_seen = np.zeros((len(self.bridges), capacity), np.int64)
        self.decisions = DecisionImage([sig.name for sig in wiring.outputs], capacity) if self.bridges else None

    def _status_all(self) -> dict:
        return {"running": self._running, "cycles": self.counters["cycles"], "heartbeat": self.cycle.heartbeat,
                "streams": {s: self.status(s) for s in list(self.slots)}}


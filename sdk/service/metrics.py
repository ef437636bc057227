"""Prometheus metrics and a health endpoint for a running controller (``[metrics]``).

Scraping never calls into a control cycle, and its costly part runs in another process. A
scrape or a ``/healthz`` request reaches the exporter process (``sdk/service/metrics_exporter.py``:
HTTP, rendering with prometheus_client), which asks this process for a snapshot over a Unix
socket. A relay thread here asks the controller's :class:`SnapshotExchange`; the control loop
takes the snapshot at its next cycle boundary, after that cycle's outputs went out (a plain
copy of counters and histogram bins, about 10 us), and the relay sends it back with the
bridges' health. So the figures of one scrape all come from the same instant between two
cycles, and a loop that stops cycling stops answering: ``/healthz`` then says 503. The
service watchdog (``sdk.service.notify``) uses the same exchange.

``/metrics`` (Prometheus text format; times in seconds):

- ``r1edge_cycles_total``, ``r1edge_deadline_misses_total``, ``r1edge_skipped_ticks_total``;
- ``r1edge_failsafe_cycles_total{reason}`` and ``r1edge_held_cycles_total{reason}``: cycles in
  which at least one stream failed safe (held) for that reason (``invalid_input``,
  ``timeout``, ``error``, ``busy``, ``bad_output``, ``heartbeat``, ``bridge``); a cycle with two reasons counts under
  both;
- ``r1edge_invalid_inputs_total{signal,reason}``: invalid input values (``nan``, ``inf``,
  ``range``, ``stale``, ``missing``);
- ``r1edge_cycle_latency_seconds{phase}``: histograms of ``total`` (tick to outputs ready),
  ``read``, ``infer``, ``write`` and ``record``; buckets 1 us to 10 s, four a decade, exact
  bin edges of the controller's own histograms;
- ``r1edge_output{stream,name}``, ``r1edge_stream_status{stream,status}`` (1 for the
  stream's status in the last cycle), ``r1edge_heartbeat``;
- ``r1edge_bridge_bad_messages_total{bridge,reason}``, ``r1edge_bridge_errors_total{bridge,kind}``
  (``health()["errors"]``: the bridge's own trouble by kind, a task that died included),
  ``r1edge_bridge_io_total{bridge}`` (the bridge's own I/O count: Modbus requests served or
  poll rounds, ZeroMQ sensor frames, OPC UA input writes), ``r1edge_bridge_connected{bridge}``,
  ``r1edge_bridge_heartbeat_ok{bridge}``; bridge figures come from each bridge's ``health()``
  (thread-safe, called by the relay thread);
- ``r1edge_up``: 1 while the loop answers.

``/healthz``: 200 while the loop runs, answers within ``max(0.25 s, 5 periods)`` and every
stream active in the last cycle had fresh inputs (none stale or missing), with at least one
stream active; 503 otherwise. The body is JSON with the reasons.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

from runtime.control.safety import FAILSAFE, INVALID_NAMES, MODE_NAMES, OK, REASON_INPUT, REASON_NAMES, STATUS_NAMES

logger = logging.getLogger(__name__)
#: A stream's changes of mode are the controller's own events, logged under its name.
controller_log = logging.getLogger("sdk.service.controller")


class SnapshotExchange:
    """Hands a snapshot taken in the control loop's thread to any other thread.

    ``request(timeout_s)`` (any thread) asks for one and waits; ``serve()`` (the loop, once
    per cycle, after the outputs went out) costs one attribute test unless somebody asked,
    then takes one snapshot for every waiting requester. ``request`` returns None when the
    loop did not serve within the timeout.
    """

    def __init__(self, take: Callable[[], dict]):
        self._take = take
        self._cond = threading.Condition()
        self._wanted = False
        self._generation = 0
        self._snapshot: dict | None = None

    def request(self, timeout_s: float) -> dict | None:
        """A snapshot taken by the loop after this call, or None after ``timeout_s``."""
        with self._cond:
            generation = self._generation
            self._wanted = True
            if not self._cond.wait_for(lambda: self._generation != generation, timeout_s):
                return None
            return self._snapshot

    def take_now(self) -> dict:
        """A snapshot taken in the calling thread (when no loop is running)."""
        return self._take()

    def serve(self) -> None:
        """Called by the loop at each cycle boundary."""
        if not self._wanted:
            return
        snapshot = self._take()
        with self._cond:
            self._snapshot = snapshot
            self._generation += 1
            self._wanted = False
            self._cond.notify_all()


def take_snapshot(ctrl) -> dict:
    """Copy what the metrics and the health checks need from a controller (``sdk.Controller``),
    in the loop's thread between two cycles: plain copies, no percentiles, no bridge calls."""
    cycle = ctrl.cycle
    streams = {}
    for name, slot in ctrl.slots.items():
        streams[name] = {"active": bool(cycle.active[slot]), "status": STATUS_NAMES[int(cycle.status[slot])],
                         "reason": REASON_NAMES[int(cycle.reason[slot])], "outputs": cycle.out[slot].tolist(),
                         "codes": cycle.guard.codes[slot].tolist()}
    return {
        "t_ns": time.monotonic_ns(),
        "counters": dict(ctrl.counters),
        "skipped_ticks": ctrl.loop.skipped_ticks,
        "watchdog": dict(cycle.counters),
        "failsafe_by_reason": dict(ctrl.failsafe_by_reason),
        "held_by_reason": dict(ctrl.held_by_reason),
        "invalid_by_signal": ctrl.invalid_by_signal.tolist(),
        "hist": {k: (list(h.counts), h.count, h.total_us) for k, h in ctrl.hist.items()},
        "heartbeat": cycle.heartbeat,
        "streams": streams,
    }


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for ``ctrl`` on ``host:port`` (``port = 0`` takes a
    free port; see :attr:`port` after ``start()``).

    HTTP and rendering run in the exporter process (``sdk/service/metrics_exporter.py``); here one
    relay thread answers its requests with a snapshot from the loop and the bridges' health.
    """

    def __init__(self, ctrl, host: str = "127.0.0.1", port: int = 9108):
        self.ctrl = ctrl
        self.host, self.port = host, port
        self.timeout_s = max(0.25, 5 * ctrl.period_s)
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def snapshot(self) -> tuple[dict | None, str]:
        """``(snapshot, state)``: taken by the loop while it runs (state ``"running"``); None
        when the running loop did not answer within :attr:`timeout_s` (``"starting"`` before
        its first cycle, ``"stalled"`` after); taken in this thread when no loop runs
        (``"stopped"``)."""
        ctrl = self.ctrl
        if ctrl.running:
            snap = ctrl.snapshots.request(self.timeout_s)
            if snap is not None:
                return snap, "running"
            if ctrl.running:
                return None, "starting" if ctrl.counters["cycles"] == 0 else "stalled"
        return ctrl.snapshots.take_now(), "stopped"

    def start(self) -> "MetricsServer":
        """Start the exporter process and wait until it listens; raises ``OSError`` if it
        cannot bind, ``RuntimeError`` if it does not come up."""
        from sdk.service import metrics_exporter as exporter

        ours, theirs = socket.socketpair()
        self._sock = ours
        self._proc = subprocess.Popen([sys.executable, "-I", exporter.__file__, str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            ctrl = self.ctrl
            exporter.send(ours, {"host": self.host, "port": self.port, "inputs": ctrl.input_names,
                                 "outputs": ctrl.output_names, "invalid_names": list(INVALID_NAMES),
                                 "status_names": list(STATUS_NAMES), "edges_us": list(ctrl.hist["latency"]._edges)})
            ours.settimeout(60.0)
            hello = exporter.recv(ours)
            ours.settimeout(None)
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"metrics exporter did not start: {exc}") from exc
        if hello is None or "error" in hello:
            self.stop()
            if hello is None:
                raise RuntimeError("metrics exporter exited at start")
            raise OSError(f"[metrics] listen: {hello['error']}")
        self.port = hello["port"]
        self._thread = threading.Thread(target=self._relay, name="r1edge-metrics", daemon=True)
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop the exporter process. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _relay(self) -> None:
        from sdk.service.metrics_exporter import send

        sock = self._sock
        try:
            while True:
                what = sock.recv(1)
                if not what:
                    return
                try:
                    snap, state = self.snapshot()
                except Exception as exc:                  # e.g. a stream added by step() meanwhile
                    logger.warning("metrics: taking a snapshot failed: %s", exc)
                    snap, state = None, "error"
                send(sock, {"state": state, "snapshot": snap,
                            "bridges": _bridge_health(self.ctrl.bridges) if what == b"m" else None})
        except OSError as exc:                            # stop() closed the socket, or the exporter died
            if self._sock is not None:
                logger.error("metrics: the exporter connection failed: %s", exc)


def _bridge_health(bridges) -> dict:
    """What the exporter shows of each bridge's ``health()``."""
    out = {}
    for bridge in bridges:
        try:
            h = bridge.health()
        except Exception as exc:                          # a broken bridge must not break the scrape
            logger.warning("metrics: %s.health() raised: %s", bridge.name, exc)
            continue
        out[bridge.name] = {"bad": h.get("bad", {}), "errors": h.get("errors", {}),
                            "io": h.get("io_us", {}).get("n", 0), "connected": bool(h.get("connected")),
                            "heartbeat_ok": bool(h.get("heartbeat_ok", True))}
    return out


def account_cycle(ctrl, read_ns: int, infer_ns: int, write_ns: int, latency_ns: int) -> None:
    """A controller's bookkeeping after a cycle: the statuses ``status()`` shows, counters,
    phase histograms, failures by reason (:func:`count_failures`) and changes of mode."""
    c, cycle, shown = ctrl.counters, ctrl.cycle, ctrl.shown
    shown[0], shown[1], shown[2] = cycle.status, cycle.reason, cycle.mode
    c["cycles"] += 1
    if latency_ns > ctrl.deadline_ns:
        c["deadline_misses"] += 1
    h = ctrl.hist
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
        count_failures(ctrl)
    if n_fs or n_hold or ctrl.not_ok_logged:
        log_status_changes(ctrl)
    diff = ctrl.mode_diff
    np.not_equal(cycle.mode, ctrl.logged_mode, out=diff)
    np.logical_and(diff, cycle.active, out=diff)
    if diff.any():
        for slot in np.flatnonzero(diff).tolist():
            log_mode_change(ctrl, slot, int(cycle.mode[slot]))


def log_mode_change(ctrl, slot: int, mode: int) -> None:
    """Log a stream's change of mode (auto, manual, warm-up): the first 1,000 of a run; the
    rest are counted in ``mode_changes`` only (a flapping mode input must not flood the log)."""
    before = int(ctrl.logged_mode[slot])
    ctrl.logged_mode[slot] = mode
    if before < 0:
        return
    ctrl.counters["mode_changes"] += 1
    n = ctrl.counters["mode_changes"]
    if n <= 1000:
        controller_log.info("stream %r: %s -> %s", ctrl.streams.names[slot], MODE_NAMES[before], MODE_NAMES[mode])
    if n == 1000:
        controller_log.warning("1,000 mode changes logged: further ones are counted in mode_changes only")


def log_status_changes(ctrl) -> None:
    """Log each stream's change of status or fail-safe reason: entering fail-safe or hold as a
    WARNING (with the invalid inputs, for an input fault), back to ok as INFO (with the cycles
    it lasted); streams that changed alike in one cycle share a line (a timeout fails every
    stream of the batch). The first 1,000 lines of a run; every change is counted in
    ``status_changes``. Runs only in cycles where some stream did not get the model's outputs,
    or a stream was last logged not ok (``not_ok_logged``)."""
    c = ctrl.cycle
    key, changed = ctrl.status_key, ctrl.mode_diff
    np.copyto(key, c.status)
    np.multiply(key, 256, out=key)
    np.add(key, c.reason, out=key)
    np.not_equal(key, ctrl.logged_status, out=changed)
    np.logical_and(changed, c.active, out=changed)
    seq = ctrl.counters["cycles"]
    lines: dict[tuple[int, str], list[str]] = {}
    for slot in np.flatnonzero(changed).tolist():
        before, now = int(ctrl.logged_status[slot]), int(key[slot])
        ctrl.logged_status[slot] = now
        if before < 0 and now < 256:                      # a new stream that starts ok: no news
            continue
        status, reason = divmod(now, 256)
        since = ctrl.status_since[slot]
        ctrl.status_since[slot] = seq
        ctrl.counters["status_changes"] += 1
        if status == OK:
            line = (logging.INFO, f"ok again after {seq - since} cycles {STATUS_NAMES[before // 256]}")
        else:
            why = REASON_NAMES[reason]
            if reason == REASON_INPUT:
                why += ": " + ", ".join(f"{k} {v}" for k, v in c.guard.invalid_inputs(slot).items())
            line = (logging.WARNING, f"{STATUS_NAMES[status]} ({why})")
        lines.setdefault(line, []).append(ctrl.streams.names[slot])
    for (level, text), names in lines.items():
        ctrl.status_lines += 1
        if ctrl.status_lines <= 1000:
            who = f"stream {names[0]!r}" if len(names) == 1 else f"streams {', '.join(map(repr, names))}"
            controller_log.log(level, "%s: %s", who, text)
        if ctrl.status_lines == 1000:
            controller_log.warning("1,000 lines of status changes logged: further changes are counted in "
                                   "status_changes only")
    ctrl.not_ok_logged = int(np.count_nonzero(ctrl.logged_status >= 256))


def count_failures(ctrl) -> None:
    """A controller's fail-safe and held cycles by reason (once per reason per cycle) and invalid input
    values by signal and reason; runs only in cycles where some stream did not get the
    model's outputs."""
    c = ctrl.cycle
    failsafe, held = set(), set()
    for slot in ctrl.active:
        status = int(c.status[slot])
        if status == OK:
            continue
        reason = int(c.reason[slot])
        (failsafe if status == FAILSAFE else held).add(REASON_NAMES[reason])
        if reason == REASON_INPUT:
            row = c.guard.codes[slot]
            for j in np.flatnonzero(row).tolist():
                ctrl.invalid_by_signal[j, row[j]] += 1
    for reason in failsafe:
        ctrl.failsafe_by_reason[reason] += 1
    for reason in held:
        ctrl.held_by_reason[reason] += 1


def controller_stats(ctrl) -> dict:
    """A controller's (``sdk.Controller``) ``stats()``: counters, latency histograms (us) and what real-time settings were applied.

    ``latency_us``: tick (or call) to outputs ready; ``phases_us``: read/infer/write, and
    record (the flight record, appended after the outputs went out);
    ``lateness_us``: wake-up minus tick in the periodic loop.
    """
    loop = ctrl.loop.stats()
    c = ctrl.cycle
    out = dict(ctrl.counters)
    out.update({
        "never_valid_inputs": c.guard.never_valid(),
        "latency_us": ctrl.hist["latency"].summary(),
        "phases_us": {k: ctrl.hist[k].summary() for k in ("read", "infer", "write", "record")},
        "lateness_us": loop["lateness_us"],
        "skipped_ticks": loop["skipped_ticks"],
        "loop_cycle_errors": loop["cycle_errors"],
        "gc_collections": loop["gc_collections"],
        "rt_applied": loop["rt_applied"],
        "invalid_inputs": c.guard.counts_by_reason(),
        "failsafe_cycles_by_reason": dict(ctrl.failsafe_by_reason),
        "held_cycles_by_reason": dict(ctrl.held_by_reason),
        "invalid_inputs_by_signal": {
            name: {INVALID_NAMES[k]: int(row[k]) for k in range(1, len(INVALID_NAMES))}
            for name, row in zip(ctrl.input_names, ctrl.invalid_by_signal)},
        "watchdog": {**c.counters, "last_error": c.last_error},
        "heartbeat": c.heartbeat,
        "streams": {"capacity": ctrl.cycle.capacity, "names": list(ctrl.slots)},
        "compute_threads": ctrl.compute_threads,
        "recorder": None if ctrl.recorder is None else {
            "path": str(ctrl.recorder.path), "records": ctrl.recorder.records,
            "bytes": ctrl.recorder.bytes_written},
        "bridges": {b.name: b.health() for b in ctrl.bridges},
        "shadow": None if ctrl.shadow is None else ctrl.shadow.stats(),
        "advisor": None if ctrl.advisor is None else ctrl.advisor.stats(),
    })
    return out

def verdict(ctrl) -> dict:
    """Whether a controller's run so far was healthy, as ``r1edge run``'s exit status says:
    ``{"ok": bool, "why": str}``. Not healthy: no cycle ran, no valid input ever arrived
    (no cycle had a stream whose inputs were all valid), or more than ``[loop]
    max_failsafe_fraction`` of the cycles failed safe."""
    c = ctrl.counters
    cycles, fs = c["cycles"], c["failsafe_cycles"]
    limit = ctrl.config.loop.max_failsafe_fraction
    if ctrl.ranks is not None and ctrl.engine.failure is not None:
        return {"ok": False, "why": f"the expert-parallel engine failed: {ctrl.engine.failure}"}
    if not cycles:
        return {"ok": False, "why": "no control cycle ran"}
    links = "; ".join(f"{b.name} bridge {'connected' if b.health().get('connected') else 'not connected'} at the end"
                      for b in ctrl.bridges)
    invalid = {k: v for k, v in ctrl.cycle.guard.counts_by_reason().items() if v}
    if not c["valid_input_cycles"]:
        never = ctrl.cycle.guard.never_valid()
        return {"ok": False, "why": f"no valid input ever arrived in {cycles} cycles (never valid: "
                                    f"{', '.join(never)}; invalid values by reason: {counts_text(invalid)})"
                                    + (f"; {links}" if links else "")}
    frac = fs / cycles
    reasons = {k: v for k, v in ctrl.failsafe_by_reason.items() if v}
    if frac > limit:
        return {"ok": False, "why": f"fail-safe in {fs} of {cycles} cycles ({frac:.1%}), above [loop] "
                                    f"max_failsafe_fraction = {limit:g} ({limit:.1%}; cycles by reason: "
                                    f"{counts_text(reasons)}; invalid values by reason: {counts_text(invalid)})"
                                    + (f"; {links}" if links else "")}
    lost = c["record_errors"]
    return {"ok": True, "why": f"{cycles} cycles, fail-safe in {fs} ({frac:.1%}; the limit, [loop] "
                               f"max_failsafe_fraction = {limit:g}, is {limit:.1%})"
                               + (f"; {lost} records could not be written to the flight recording (a full "
                                  "disk? see the log)" if lost else "")}


def counts_text(counts: dict) -> str:
    """``{"timeout": 2, "busy": 1}`` as ``timeout 2, busy 1`` ("none" when empty)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


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
    print(f"invalid inputs  {counts_text(bad)}" + (" (input values, by reason)" if bad else "")
          + (f"  never valid: {', '.join(stats['never_valid_inputs'])}" if stats["never_valid_inputs"] else ""))
    reasons = {k: v for k, v in stats["failsafe_cycles_by_reason"].items() if v}
    if reasons:
        print(f"fail-safe by    {counts_text(reasons)} (cycles in which a stream failed safe for it)")
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

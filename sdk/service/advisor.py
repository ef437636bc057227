"""The advisor: a language model beside the fast loop that reads the plant's state as text and
proposes setpoints and/or a diagnosis (``[advisor]`` in the deployment TOML).

Every ``every_ms`` the controller hands the advised stream's recent history to the advisor;
the advisor renders the Jinja2 prompt template from it (current inputs, outputs and status,
the PLC's own setpoints, the advice in force, and per signal the mean, min, max, first and last
of the last ``history`` cycles), reasons inside ``<think>`` for at most ``max_think_tokens``, and
answers a JSON decision constrained by a grammar derived from the config (``decision_schema``):
one number per setpoint in ``sets``, within the input's ``[min, max]`` and a multiple of its
``step``, and a ``diagnosis`` out of ``diagnoses``. A timeout (``deadline_ms``), a spent token
budget or an invalid answer is counted and keeps the last good advice (``on_failure = "keep"``)
or withdraws it (``"failsafe"``: the PLC's own setpoints apply).

**Where it runs.** Generation runs in a child process (``python -m sdk.service.advisor``), not in a
thread of the controller: the CPU engine's steps hold Python's GIL for their whole duration
(milliseconds on a large model), and a thread holding it delays the fast loop's thread whenever
it wakes (measured in ``benchmarks/bench_advisor.py``). The child has its own interpreter, its
own engine and its own copy of the language model, runs at a lower priority (``nice``), and a
crash there never takes the controller down. The controller's side costs the loop one copy of
the stream's row per cycle and, once per request, one write of a few kilobytes to a pipe;
answers are read by a thread that blocks on the pipe and are taken at the start of the next
cycle.

**What "setpoints" means.** A setpoint the advisor may set is an input of the fast model that
the PLC provides (e.g. ``level_sp``). The PLC keeps the last word: advice is in force only while
the PLC's switch ``enable`` (a signal the bridges read, like an input) is valid, fresh and
>= 0.5; otherwise the model sees the PLC's own setpoints, at once. While in force, an advised
setpoint replaces the PLC's value the model sees, clamped to the input's range and moved at most
``max_rate`` units per second, starting from the PLC's value when the advice takes over (no
bump). The PLC's own value must itself be valid (finite, in range; its age is still judged by
the input guard), so advice never hides a broken or stale PLC signal. The PLC sees everything
the advisor does through published signals (``AdvisorSection.published``): ``advice.<setpoint>``
is the value the model sees while advice is in force (a PLC that computes other inputs from its
setpoint, such as an error, adopts it as its remote setpoint), else the advice held.

**Recording and replay.** The flight recorder gets an ``advice`` record per answer (the
context the prompt was rendered from, the prompt, its token count, the generated tokens, the
status and the decision) and, in every cycle of the advised stream, the PLC's setpoints, the
switch and whether advice was in force. ``AdviceReplay`` re-renders each prompt, regenerates the
tokens on the recorded language model (an answer cut by its deadline reproduces its recorded
prefix) and recomputes the setpoints the model saw, all compared bit for bit.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from runtime.control.loop import LatencyHistogram, monotonic_ns
from runtime.control.safety import OK, STATUS_NAMES, OutputLimit, OutputLimiter
from sdk.service.config import AdvisorSection, ConfigError, InputSpec
from sdk.tools.text import DecisionSchema

logger = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
#: Advice states published as ``advice.state``.
STATE_NONE, STATE_HELD, STATE_IN_FORCE = 0, 1, 2
ERROR = "error"                 # the prompt did not render, or the advisor process failed


# ---------------------------------------------------------------------------- schema and prompt

def decision_schema(section: AdvisorSection, inputs: list[InputSpec]) -> DecisionSchema:
    """The decision's JSON schema, derived from the config: ``diagnosis`` (an enum of
    ``diagnoses``) first, then one number per setpoint within its input's ``[min, max]``, a
    multiple of its ``step`` (which also bounds the digits an answer may write)."""
    spec = {i.name: i for i in inputs}
    props: dict[str, Any] = {}
    if section.diagnoses:
        props["diagnosis"] = {"enum": list(section.diagnoses)}
    for name in section.sets:
        props[name] = {"type": "number", "minimum": spec[name].min, "maximum": spec[name].max,
                       "multipleOf": section.step[name]}
    return DecisionSchema({"type": "object", "properties": props}, "advisor")


class PromptTemplate:
    """A Jinja2 prompt template (sandboxed; an undefined name is an error, not empty text)."""

    def __init__(self, text: str, where: str = "advisor prompt"):
        import jinja2

        from sdk.tools.templates import compile_template, environment

        self.text, self.where = text, where
        env = environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=False)
        self._template = compile_template(env, text, where)

    def render(self, context: dict) -> str:
        """The prompt text for ``context`` (see ``build_context``), under the template budget."""
        from sdk.tools.templates import render

        return render(self._template, context, self.where)


def build_context(request: dict, init: dict) -> dict:
    """What the prompt template sees, from a request's history arrays (chronological rows of the
    advised stream, as the fast model saw them):

    ``inputs`` / ``outputs`` (last values by name), ``status`` (last cycle's), ``statuses``
    (cycles by status over the history), ``stats`` ({signal: {mean, min, max, first, last}}
    over inputs and outputs), ``cycles`` and ``seconds`` of history, ``plc`` (the PLC's own
    setpoints, last cycle), ``advice`` ({setpoint: value} of the advice held, or None),
    ``diagnosis`` (held, or None) and ``in_force`` (whether advice was in force).
    """
    n = int(request["n"])
    ins, outs = init["inputs"], init["outputs"]
    x = np.frombuffer(request["x"], dtype=np.float64).reshape(n, len(ins))
    y = np.frombuffer(request["y"], dtype=np.float64).reshape(n, len(outs))
    st = np.frombuffer(request["st"], dtype=np.int8)
    stats = {}
    for names, arr in ((ins, x), (outs, y)):
        for j, name in enumerate(names):
            col = arr[:, j]
            stats[name] = {"mean": float(col.mean()), "min": float(col.min()), "max": float(col.max()),
                           "first": float(col[0]), "last": float(col[-1])}
    advice = request["advice"]
    return {"inputs": dict(zip(ins, x[-1].tolist())), "outputs": dict(zip(outs, y[-1].tolist())),
            "status": STATUS_NAMES[int(st[-1])],
            "statuses": {name: int(np.count_nonzero(st == k)) for k, name in enumerate(STATUS_NAMES)},
            "stats": stats, "cycles": n, "seconds": n * init["period_s"],
            "plc": dict(zip(init["sets"], request["plc"])),
            "advice": None if advice is None else dict(zip(init["sets"], advice)),
            "diagnosis": request["diagnosis"], "in_force": bool(request["in_force"])}


# ---------------------------------------------------------------------------- setpoints in force

class SetpointOverride:
    """The advised setpoints as the fast model sees them, through the output limiter's own
    clamp and rate limit (``runtime.control.safety.OutputLimiter``): ``apply(row, target, enabled)``
    replaces the setpoint columns of an input row while the advice is in force and returns
    whether it is. Live and in replay alike."""

    def __init__(self, cols: list[int], names: list[str], lo: list[float], hi: list[float],
                 max_rate: list[float], period_s: float):
        self.cols = np.array(cols, dtype=np.int64)
        self.lo, self.hi = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
        self.limiter = OutputLimiter([OutputLimit(n, a, b, r, a) for n, a, b, r in zip(names, lo, hi, max_rate)],
                                     1, period_s)
        k = len(cols)
        self._raw = np.zeros((1, k), dtype=np.float64)
        self._out = np.zeros((1, k), dtype=np.float64)
        self._status = np.full(1, OK, dtype=np.int8)
        self._active = np.ones(1, dtype=bool)
        self.plc = np.zeros(k, dtype=np.float64)
        self.engaged = False

    def apply(self, row: np.ndarray, target: np.ndarray | None, enabled: bool) -> bool:
        """Put the advised setpoints into ``row`` (in place) if ``enabled``, there is a
        ``target`` and the PLC's own values are finite and in range; ``plc`` keeps the PLC's."""
        np.take(row, self.cols, out=self.plc)
        plc = self.plc
        if (target is None or not enabled or not np.isfinite(plc).all()
                or (plc < self.lo).any() or (plc > self.hi).any()):
            self.engaged = False
            return False
        if not self.engaged:                              # take over from the PLC's value: no bump
            self.limiter.last[0] = plc
            self.engaged = True
        self._raw[0] = target
        self.limiter.apply(self._raw, self._status, self._active, self._out)
        row[self.cols] = self._out[0]
        return True


def _override(section: AdvisorSection, inputs: list[InputSpec], input_names: list[str],
              period_s: float) -> SetpointOverride:
    spec = {i.name: i for i in inputs}
    return SetpointOverride([input_names.index(n) for n in section.sets], list(section.sets),
                            [spec[n].min for n in section.sets], [spec[n].max for n in section.sets],
                            [section.max_rate.get(n, math.inf) for n in section.sets], period_s)


# ---------------------------------------------------------------------------- the child process

def write_frame(file: BinaryIO, message: dict) -> None:
    """One message on a pipe: uint32 length (little-endian) and msgpack."""
    payload = msgpack.packb(message, use_bin_type=True)
    file.write(_U32.pack(len(payload)) + payload)
    file.flush()


def read_frame(file: BinaryIO) -> dict | None:
    """The next message from a pipe, or None at its end."""
    head = file.read(4)
    if len(head) < 4:
        return None
    (n,) = _U32.unpack(head)
    payload = file.read(n)
    if len(payload) < n:
        return None
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def generation_record(gen, template: PromptTemplate, schema: DecisionSchema, init: dict, request: dict) -> dict:
    """Render the prompt of one request and generate its decision (in the advisor process)."""
    context = build_context(request, init)
    out = {"type": "result", "id": request["id"], "context": context, "prompt": None, "prompt_tokens": 0,
           "tokens": [], "status": ERROR, "decision": None, "think_tokens": 0, "seconds": 0.0, "errors": []}
    t0 = time.monotonic()
    try:
        out["prompt"] = prompt = template.render(context)
        g = gen.generate(prompt, chat=True, max_new_tokens=init["max_tokens"],
                         max_think_tokens=init["max_think_tokens"], schema=schema, deadline=request["deadline"])
    except Exception as exc:                              # reported and counted by the controller
        out["errors"] = [f"{type(exc).__name__}: {exc}"]
    else:
        out.update(prompt_tokens=g.prompt_tokens, tokens=g.tokens, status=g.status, decision=g.decision,
                   think_tokens=g.think_tokens, errors=g.errors)
    out["seconds"] = time.monotonic() - t0
    return out


def child_main() -> int:
    """``python -m sdk.service.advisor``: the advisor process. Reads an init message, then requests,
    from stdin; writes ``ready`` and one result per request to stdout; ends at end of input."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                         # stray prints must not corrupt the frames
    logging.basicConfig(level=logging.WARNING, format="advisor process: %(levelname)s %(name)s: %(message)s")
    init = read_frame(inp)
    if init is None:
        return 0
    try:
        if init["nice"]:
            os.nice(init["nice"])
        from sdk.tools.text import TextGenerator

        t0 = time.monotonic()
        gen = TextGenerator.load(init["path"], window=init["window"])
        template = PromptTemplate(init["template"], init["template_path"])
        schema = DecisionSchema(init["schema"], "advisor")
        gen.generate("warm-up", chat=True, max_new_tokens=min(8, init["max_tokens"]),
                     max_think_tokens=min(2, init["max_think_tokens"]), schema=schema)
        write_frame(out, {"type": "ready", "seconds": time.monotonic() - t0})
    except Exception as exc:
        write_frame(out, {"type": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        while (request := read_frame(inp)) is not None:
            write_frame(out, generation_record(gen, template, schema, init, request))
    except BrokenPipeError:                               # the controller went away
        pass
    return 0


# ---------------------------------------------------------------------------- the controller's side

class Advisor:
    """The controller's side of ``[advisor]`` (see the module docstring).

    The controller calls, in its loop thread: ``capture`` while reading inputs (the PLC's
    switch), ``before_cycle`` before the cycle runs (takes an answer that came in and puts the
    advice in force), ``after_cycle`` once the outputs went out (history; a request when one is
    due). ``entry()`` gives the advised stream's fields of the cycle record, ``published()``
    the signals for the bridges. ``request()``/``wait()`` ask for advice at once (synchronous use).
    ``every_ns`` (between requests) and ``deadline_s`` (per answer) start from the config and may
    be changed between cycles.
    """

    def __init__(self, section: AdvisorSection, inputs: list[InputSpec], input_names: list[str],
                 output_names: list[str], period_s: float, *, start_timeout_s: float = 600.0):
        self.section = s = section
        self.schema = decision_schema(section, inputs)
        self.template_text = section.prompt.read_text(encoding="utf-8")
        PromptTemplate(self.template_text, str(section.prompt))          # a syntax error fails here
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.override = _override(section, inputs, self.input_names, period_s)
        self.period_s = period_s
        self.slot: int | None = None
        self.enable_value, self.enable_stamp = math.nan, None
        self._stale_ns = int(s.enable_stale_ms * 1e6)
        n = s.history
        self._x = np.zeros((n, len(input_names)), dtype=np.float64)
        self._y = np.zeros((n, len(output_names)), dtype=np.float64)
        self._st = np.zeros(n, dtype=np.int8)
        self._k = 0
        self.target: np.ndarray | None = None
        self.diagnosis: str | None = None
        self.enabled = self.in_force = False
        self._pub = dict(section.published(inputs))
        self._pub_sets = [f"advice.{name}" for name in section.sets]
        self._held: dict[str, float] = {}                 # advice.<setpoint> of the advice held
        self.every_ns, self.deadline_s = int(s.every_ms * 1e6), s.deadline_ms / 1e3
        self._sent_ns: int | None = None              # when the last request went out
        self._id = 0
        self._busy = False
        self._result: dict | None = None
        self._dead: str | None = None
        self._dead_taken = False
        self.counts: Counter = Counter()
        self.counters = {"requests": 0, "good": 0, "in_force_cycles": 0}
        self.last: dict | None = None
        self.seconds = LatencyHistogram()
        self.loop_hist = LatencyHistogram()
        self._init = {"path": str(s.path), "window": s.window, "template": self.template_text,
                      "template_path": str(s.prompt), "schema": self.schema.schema, "max_tokens": s.max_tokens,
                      "max_think_tokens": s.max_think_tokens, "inputs": self.input_names,
                      "outputs": self.output_names, "sets": list(s.sets), "period_s": period_s, "nice": s.nice}
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._start(start_timeout_s)

    # ------------------------------------------------------------------ process
    def _start(self, timeout_s: float) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        logger.info("advisor: starting its process with %s (loading the language model; a first run compiles "
                    "the engine's kernels) ...", self.section.path)
        t0 = time.perf_counter()
        self._proc = subprocess.Popen([sys.executable, "-m", "sdk.service.advisor"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        write_frame(self._proc.stdin, self._init)
        box: list = []
        waiter = threading.Thread(target=lambda: box.append(read_frame(self._proc.stdout)), daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        ready = box[0] if box else None
        if ready is None or ready.get("type") != "ready":
            why = (ready or {}).get("error") or ("no answer within %.0f s" % timeout_s if not box else "it exited")
            self.close()
            raise ConfigError(f"advisor: {self.section.path}: the advisor process did not start: {why}")
        logger.info("advisor ready in %.1f s (model loaded in %.1f s)", time.perf_counter() - t0, ready["seconds"])
        self._reader = threading.Thread(target=self._read_results, name="r1edge-advisor-reader", daemon=True)
        self._reader.start()

    def _read_results(self) -> None:
        proc = self._proc
        try:
            while (msg := read_frame(proc.stdout)) is not None:
                self._result = msg
        except (OSError, ValueError) as exc:
            self._dead = f"reading its answers failed: {exc}"
        if self._dead is None:
            code = proc.wait()
            self._dead = f"the advisor process exited (status {code})"

    @property
    def pid(self) -> int | None:
        """The advisor process's id (None once closed)."""
        return None if self._proc is None else self._proc.pid

    @property
    def pending(self) -> bool:
        """Whether a request is out and its answer not taken yet."""
        return self._busy

    @property
    def alive(self) -> bool:
        """Whether the advisor process is running."""
        return self._dead is None and self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """End the advisor process (its input closes; killed if it does not exit within 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._dead is None:
            self._dead = "closed"

    # ------------------------------------------------------------------ loop hooks
    def clear_enable(self) -> None:
        """A new cycle's read begins: the switch is missing until a source gives it."""
        self.enable_value, self.enable_stamp = math.nan, None

    def capture(self, slot: int, name: str, value: Any, stamp: int) -> bool:
        """Take the PLC's switch from an input that is not the model's; False if ``name`` is not it."""
        if name != self.section.enable:
            return False
        if slot == self.slot:
            try:
                self.enable_value = float(value)
            except (TypeError, ValueError):
                self.enable_value = math.nan
            self.enable_stamp = stamp
        return True

    def before_cycle(self, seq: int, values: np.ndarray, active: np.ndarray, now_ns: int) -> dict | None:
        """Take an answer that came in (returns its ``advice`` record), then put the advice in
        force in the advised stream's input row if the PLC's switch allows it."""
        t0 = monotonic_ns()
        record = self.take_pending(seq)
        slot = self.slot
        if slot is not None and active[slot]:
            v, stamp = self.enable_value, self.enable_stamp
            self.enabled = bool(stamp is not None and now_ns - stamp <= self._stale_ns and v >= 0.5)
            self.in_force = self.override.apply(values[slot], self.target, self.enabled)
            self.counters["in_force_cycles"] += self.in_force
            if self.in_force:                             # what the model sees, for a PLC to adopt
                for name, j in zip(self._pub_sets, self.override.cols):
                    self._pub[name] = float(values[slot, j])
            else:
                self._pub.update(self._held)
        self.loop_hist.add_ns(monotonic_ns() - t0)
        return record

    def after_cycle(self, values: np.ndarray, out: np.ndarray, status: np.ndarray, active: np.ndarray,
                    now_ns: int) -> None:
        """Keep the advised stream's row in the history; send a request when one is due."""
        t0 = monotonic_ns()
        slot = self.slot
        if slot is not None and active[slot]:
            i = self._k % len(self._st)
            self._x[i] = values[slot]
            self._y[i] = out[slot]
            self._st[i] = status[slot]
            self._k += 1
            if not self._busy and (self._sent_ns is None or now_ns - self._sent_ns >= self.every_ns):
                self.request(now_ns)
        self.loop_hist.add_ns(monotonic_ns() - t0)

    def request(self, now_ns: int | None = None) -> bool:
        """Send a request now from the history so far; False while one is pending, before any
        history, or when the process is gone."""
        if self._busy or not self._k or not self.alive:
            return False
        now_ns = monotonic_ns() if now_ns is None else now_ns
        n, k = min(self._k, len(self._st)), self._k % len(self._st)
        order = np.r_[k:len(self._st), 0:k] if self._k > len(self._st) else np.arange(n)
        self._id += 1
        msg = {"type": "advise", "id": self._id, "deadline": time.monotonic() + self.deadline_s, "n": n,
               "x": self._x[order].tobytes(), "y": self._y[order].tobytes(), "st": self._st[order].tobytes(),
               "plc": self.override.plc.tolist(),
               "advice": None if self.target is None else self.target.tolist(),
               "diagnosis": self.diagnosis, "in_force": self.in_force}
        try:
            write_frame(self._proc.stdin, msg)
        except (OSError, ValueError) as exc:
            self._dead = f"writing a request failed: {exc}"
            return False
        self._busy = True
        self._sent_ns = now_ns
        self.counters["requests"] += 1
        return True

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Wait until the pending request's answer came in (or the process died); True if it did."""
        end = time.monotonic() + timeout_s
        while self._busy and self._result is None and self._dead is None:
            if time.monotonic() > end:
                return False
            time.sleep(0.002)
        return self._result is not None or self._dead is not None or not self._busy

    def take_pending(self, seq: int) -> dict | None:
        """Take the answer that came in, if any, before cycle ``seq``: returns its ``advice``
        record. A dead process counts once as an answer with status ``error``."""
        result = self._result
        if result is not None:
            self._result = None
            return self._take(seq, result)
        if self._busy and self._dead is not None and not self._dead_taken:
            self._dead_taken = True
            logger.error("advisor: %s; no more advice (on_failure = %s)", self._dead, self.section.on_failure)
            return self._take(seq, {"id": self._id, "status": ERROR, "errors": [self._dead], "context": None,
                                    "prompt": None, "prompt_tokens": 0, "tokens": [], "decision": None,
                                    "think_tokens": 0, "seconds": 0.0})
        return None

    def _take(self, seq: int, result: dict) -> dict:
        self._busy = False
        status = result["status"]
        self.counts[status] += 1
        decision = result.get("decision")
        if status == "finished" and decision is not None:
            self.target = np.array([float(decision[n]) for n in self.section.sets], dtype=np.float64)
            self.diagnosis = decision.get("diagnosis")
            self.counters["good"] += 1
        elif self.section.on_failure == "failsafe":
            self.target, self.diagnosis = None, None
        self._publish_advice()
        self.seconds.add_ns(int(result.get("seconds", 0.0) * 1e9))
        self.last = {k: result.get(k) for k in ("status", "decision", "seconds", "think_tokens", "errors")}
        self.last["tokens"] = len(result.get("tokens") or [])
        if status != "finished":
            logger.info("advisor: answer %d ended %s%s", result.get("id", 0), status,
                        f" ({'; '.join(result['errors'])})" if result.get("errors") else "")
        rec = {k: v for k, v in result.items() if k != "type"}
        return {"type": "advice", "seq": seq, **rec}

    # ------------------------------------------------------------------ what others see
    def entry(self) -> dict:
        """The advised stream's advisor fields of a cycle record: the PLC's own setpoints, the
        switch and whether advice was in force."""
        return {"plc": self.override.plc.tolist(), "en": self.enabled, "in": self.in_force}

    def published(self) -> dict[str, float]:
        """The advisor's signals for the bridges (see ``AdvisorSection.published``); the
        advice's values change when an answer is taken, the state every cycle."""
        pub = self._pub
        held = self.target is not None or self.diagnosis is not None
        pub["advice.state"] = float(STATE_IN_FORCE if self.in_force else STATE_HELD if held else STATE_NONE)
        return pub

    def _publish_advice(self) -> None:
        pub = self._pub
        if self.target is not None:
            clipped = np.clip(self.target, self.override.lo, self.override.hi)
            self._held = dict(zip(self._pub_sets, clipped.tolist()))
        if not self.in_force:
            pub.update(self._held)
        if self.section.diagnoses:
            pub["advice.diagnosis"] = float(self.section.diagnoses.index(self.diagnosis) + 1
                                            if self.diagnosis is not None else 0)
        pub["advice.count"] = float(self.counters["good"] & 0xFFFF)

    def header(self) -> dict:
        """What a recording needs to replay the advice: package, template text, schema, settings."""
        from sdk.tools.package import package_identity

        s = self.section
        return {"package": package_identity(s.path), "template": self.template_text, "schema": self.schema.schema,
                "sets": list(s.sets), "diagnoses": list(s.diagnoses), "max_tokens": s.max_tokens,
                "max_think_tokens": s.max_think_tokens, "window": s.window, "on_failure": s.on_failure,
                "stream": s.stream, "max_rate": [s.max_rate.get(n, math.inf) for n in s.sets],
                "period_s": self.period_s}

    def stats(self) -> dict:
        """Requests, answers by status (``timeouts``, ``invalid``, ``budget_exhausted``,
        ``errors``), good answers, cycles with advice in force, the last answer, generation
        seconds and the loop's cost of the advisor hooks (us)."""
        c = self.counts
        return {"path": str(self.section.path), "alive": self.alive, "dead": self._dead if self._dead != "closed" else None,
                **self.counters, "answers": dict(c), "timeouts": c["deadline"], "invalid": c["invalid"],
                "budget_exhausted": c["max_new_tokens"], "errors": c[ERROR],
                "advice": None if self.target is None else dict(zip(self.section.sets, self.target.tolist())),
                "diagnosis": self.diagnosis, "in_force": self.in_force, "last": self.last,
                "answer_us": self.seconds.summary(), "loop_us": self.loop_hist.summary()}


# ---------------------------------------------------------------------------- replay

class AdviceReplay:
    """Replays a recording's advice: re-renders each prompt from its recorded context, regenerates
    the tokens on the language model and recomputes the setpoints the fast model saw.

    ``advice(record)`` and ``entry(cycle_entry)`` return a list of ``(what, recorded, replayed)``
    mismatches; ``counts`` says how much was compared.
    """

    def __init__(self, header: dict, input_names: list[str], *, package: str | Path | None = None):
        from sdk.tools.text import TextGenerator

        h = header["advisor"]
        self.h = h
        pkg = package if package is not None else (h["package"] or {}).get("path")
        if pkg is None:
            raise ValueError("the recording names no advisor package; pass advisor_package=")
        self.gen = TextGenerator.load(pkg, window=h["window"])
        self.template = PromptTemplate(h["template"], "recorded advisor prompt")
        self.schema = DecisionSchema(h["schema"], "recorded advisor schema")
        props = h["schema"]["properties"]
        self.sets = h["sets"]
        self.override = SetpointOverride([input_names.index(n) for n in self.sets], self.sets,
                                         [props[n]["minimum"] for n in self.sets],
                                         [props[n]["maximum"] for n in self.sets], h["max_rate"], h["period_s"])
        self.target: np.ndarray | None = None
        self.counts = {"advice_records": 0, "prompts_compared": 0, "advice_tokens_compared": 0,
                       "decisions_compared": 0, "setpoint_cycles_compared": 0}

    def advice(self, rec: dict) -> list[tuple[str, Any, Any]]:
        """Check one ``advice`` record and take its decision as the live controller did."""
        bad = []
        self.counts["advice_records"] += 1
        status, tokens = rec["status"], rec["tokens"]
        if rec.get("context") is not None and rec.get("prompt") is not None:
            prompt = self.template.render(rec["context"])
            self.counts["prompts_compared"] += 1
            if prompt != rec["prompt"]:
                bad.append(("advisor prompt", rec["prompt"], prompt))
            elif status != ERROR and tokens:
                n = len(self.gen.prompt_ids(prompt, chat=True))
                limit = len(tokens) if status == "deadline" else self.h["max_tokens"]
                g = self.gen.generate(prompt, chat=True, max_new_tokens=limit,
                                      max_think_tokens=self.h["max_think_tokens"], schema=self.schema)
                self.counts["advice_tokens_compared"] += len(tokens)
                if n != rec["prompt_tokens"] or g.tokens != tokens:
                    bad.append(("advisor tokens", tokens, g.tokens))
                elif status != "deadline":
                    self.counts["decisions_compared"] += 1
                    if (g.status, g.decision) != (status, rec["decision"]):
                        bad.append(("advisor decision", [status, rec["decision"]], [g.status, g.decision]))
        decision = rec["decision"]
        if status == "finished" and decision is not None:
            self.target = np.array([float(decision[n]) for n in self.sets], dtype=np.float64)
        elif self.h["on_failure"] == "failsafe":
            self.target = None
        return bad

    def entry(self, e: dict) -> list[tuple[str, Any, Any]]:
        """Recompute the setpoints the model saw in one cycle entry of the advised stream."""
        adv = e.get("adv")
        if adv is None or not self.sets:
            return []
        self.counts["setpoint_cycles_compared"] += 1
        row = np.array(e["x"], dtype=np.float64)
        row[self.override.cols] = adv["plc"]
        in_force = self.override.apply(row, self.target, adv["en"])
        cols = self.override.cols
        seen = np.array(e["x"], dtype=np.float64)[cols]
        if in_force != adv["in"] or row[cols].tobytes() != seen.tobytes():
            return [("advised setpoints", [adv["in"], seen.tolist()], [in_force, row[cols].tolist()])]
        return []


if __name__ == "__main__":
    sys.exit(child_main())

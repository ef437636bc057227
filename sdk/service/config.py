"""Deployment config: the TOML file a Controller is built from, parsed and validated.

Every field is checked; an error names the file and the field, e.g.
``deploy.toml: outputs[1] 'valve': min (2.0) must be below max (1.0)``. Unknown keys are
rejected by name. Paths are resolved relative to the TOML file. Defaults:

- ``[model]`` ``device = "cpu"``, ``window = 32``, ``streams = 1`` (stream slots, the most
  streams batched through the engine at once; or a list of stream names: one slot each, and
  only those streams are admitted), ``parallel`` (optional, expert parallelism over
  torch.distributed: ``{ world_size = N, backend = "gloo" }``, plus ``master_addr =
  "127.0.0.1"``, ``master_port = 0`` (a free port; torchrun's environment wins when set) and
  ``timeout_s = 10`` (how long a collective waits for a stalled rank); see ``sdk.service.controller``),
  ``public_key`` (optional: a PEM public key file, or a list of them, relative to this file; the
  package must then be signed by one of them and unchanged since: ``sdk.tools.signing``);
- ``[loop]`` ``period_ms = 10``, ``deadline_ms`` = the period, ``realtime = false``,
  ``infer_budget_ms`` = 80% of the deadline (inference that has not answered by then gets
  the fail-safe out), ``spin_us = 200``, ``priority = 80``, ``cpu`` = the last allowed CPU,
  ``threads = 1`` (compute threads of an engine step: 1 keeps it in the watchdog's thread),
  ``max_failsafe_fraction = 0.5`` (a run whose cycles failed safe more often than this is
  reported as failed: ``r1edge run`` exits 1), ``warmup_cycles = 0`` (cycles a stream's outputs
  track, or hold, while its history fills, at start and after ``window - 1`` or more frames
  with invalid inputs; shorter gaps are filled; 0: the model drives from the first valid frame
  and gaps are not filled, see ``runtime.control.loop.ControlCycle``);
- ``[[inputs]]`` ``stale_ms`` = max(200, 3 periods) (the ``[mode]`` input: never stale, it is a
  switch that holds its last value), ``on_invalid = "failsafe"``;
- ``[[outputs]]`` no rate limit unless ``max_rate`` is given; ``on_stop = "failsafe"`` (what
  the bridges get when the controller stops: the fail-safe value, or ``"hold"`` the last one);
  no ``track`` (an input the output follows while it tracks: warm-up and manual; without one
  a tracking output holds its last value); ``on_recover = "ramp"`` (after a fail-safe the
  output moves back at ``max_rate``; ``"jump"``: straight to the model's or tracked value);
- ``[mode]`` (optional) ``input``: the input that switches every stream between manual (0:
  outputs track) and auto (1: the model drives); without ``[mode]`` streams are always auto.
  A track or mode input need not be one of the model's inputs.
- ``[recorder]`` (optional) ``path`` (a directory), ``max_bytes = 64 MiB`` per segment,
  ``keep = 16`` segments, ``enabled = true``;
- ``[shadow]`` (optional) ``path``: a candidate package run on the same inputs every cycle,
  never applied (see ``sdk.service.controller``).
- ``[advisor]`` (optional) a language model that reads the plant's state as text every
  ``every_ms`` and proposes setpoints and/or a diagnosis (``sdk.service.advisor``, where the keys and
  their defaults are listed).
- ``[metrics]`` (optional) ``listen = "127.0.0.1:9108"`` (``HOST:PORT``, ``[V6]:PORT`` for
  IPv6, port 0 for a free one): Prometheus ``/metrics`` and ``/healthz`` (``sdk.service.metrics``).

``[[inputs]]`` and ``[[outputs]]`` may name their engineering ``unit`` (free text such as
``"m"`` or ``"degC"``), shown by the OPC UA bridge.

``[modbus]``, ``[zmq]`` and ``[opcua]`` (the sections in ``plc_bridge.bridge.SECTIONS``) are
validated here by the bridges' own parsers, found through the bridge registry (their optional
keys are documented in ``plc_bridge``), and handed to the bridges as plain dicts; a register
map may also publish ``_heartbeat``, the counter the controller bumps every cycle, and
``_mode``, the stream's mode (0 manual, 1 auto, 2 warm-up). When a
bridge is configured, every declared input must have a source: a ``[[modbus.map]]`` entry of
that signal, or ``[zmq]`` (whose frames may carry any signal); otherwise the load fails
naming the inputs (``check_sources=False`` skips this when the inputs come from elsewhere,
e.g. a recording or ``Controller.step``).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plc_bridge.bridge import SECTIONS, Signal, Wiring, validate_table
from runtime.control.safety import NEVER_STALE_NS, InputLimit, OutputLimit

try:
    import tomllib
except ModuleNotFoundError:                               # Python 3.10
    import tomli as tomllib

_REQUIRED = object()
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
#: The output counter bumped every cycle, published to the bridges next to the outputs.
HEARTBEAT = "_heartbeat"
#: The stream's mode, published next to the outputs: 0 manual, 1 auto, 2 warm-up
#: (``runtime.control.safety.MODE_NAMES``); 0 in a bridge's own fail-safe.
MODE = "_mode"
#: The longest duration any key may give (one day, in ms): periods, staleness, timeouts. Past
#: it a value is a typo, and its nanoseconds would overflow the loop's int64 clocks sooner or later.
DAY_MS = 86_400_000.0
#: The shortest loop period the loop can honour (it sleeps, then spins, every period).
MIN_PERIOD_MS = 0.1
#: The shortest deadline or inference budget (the resolution of the loop's clock reads).
MIN_TIME_MS = 0.01


class ConfigError(ValueError):
    """A deployment config is invalid; the message names the file and the field."""


class _Table:
    """Typed, checked access to one TOML table; ``done()`` rejects keys nobody asked for."""

    def __init__(self, data: Any, where: str, file: str):
        self.file, self.where = file, where
        self.label = ""                                  # e.g. "'valve'" once the name is known
        if not isinstance(data, dict):
            self.fail(f"must be a table, got {type(data).__name__}")
        self.data, self.seen = data, set()

    def fail(self, msg: str, key: str | None = None):
        if self.label:
            loc = f"{self.where} {self.label}:" + (f" {key}" if key else "")
        elif key:
            loc = self.where + ("." if self.where else "") + key
        else:
            loc = self.where + ":" if self.where else ""
        raise ConfigError(f"{self.file}: {loc} {msg}" if loc else f"{self.file}: {msg}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.fail("is required", key)
            return default
        return self.data[key]

    def num(self, key: str, default: Any = _REQUIRED, *, positive=False, finite=True,
            lo: float | None = None, hi: float | None = None, why: str = "") -> float | None:
        """A number; ``lo``/``hi`` bound it (inclusive), ``why`` says where a bound comes from."""
        v = self.get(key, default)
        if v is None or (v is default and default is not _REQUIRED):
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"must be a number, got {v!r}", key)
        try:
            v = float(v)
        except OverflowError:
            self.fail(f"must be finite, got {v}", key)
        if finite and not math.isfinite(v):
            self.fail(f"must be finite, got {v}", key)
        if positive and not v > 0:
            self.fail(f"must be positive, got {v}", key)
        if lo is not None and not v >= lo:
            self.fail(f"must be at least {lo:.15g}{why}, got {v:.15g}", key)
        if hi is not None and not v <= hi:
            self.fail(f"must be at most {hi:.15g}{why}, got {v:.15g}", key)
        return v

    def int(self, key: str, default: Any = _REQUIRED, *, lo: int | None = None, hi: int | None = None):
        v = self.get(key, default)
        if v is None or (v is default and default is not _REQUIRED):
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"must be an integer, got {v!r}", key)
        if lo is not None and v < lo:
            self.fail(f"must be at least {lo}, got {v}", key)
        if hi is not None and v > hi:
            self.fail(f"must be at most {hi}, got {v}", key)
        return v

    def str(self, key: str, default: Any = _REQUIRED, choices: tuple | None = None) -> str | None:
        v = self.get(key, default)
        if v is None or (v is default and default is not _REQUIRED):
            return v
        if not isinstance(v, str) or not v:
            self.fail(f"must be a non-empty string, got {v!r}", key)
        if "\0" in v:
            self.fail(f"must not contain a NUL character, got {v!r}", key)
        if choices and v not in choices:
            self.fail(f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}", key)
        return v

    def bool(self, key: str, default: Any = _REQUIRED) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            self.fail(f"must be true or false, got {v!r}", key)
        return v

    def sub(self, key: str, required=False) -> "_Table | None":
        v = self.get(key, _REQUIRED if required else None)
        if v is None:
            return None
        return _Table(v, f"{self.where}.{key}" if self.where else key, self.file)

    def array(self, key: str) -> list["_Table"]:
        v = self.get(key, [])
        if not isinstance(v, list):
            self.fail(f"must be an array of tables ([[{key}]]), got {type(v).__name__}", key)
        prefix = f"{self.where}.{key}" if self.where else key
        return [_Table(item, f"{prefix}[{i}]", self.file) for i, item in enumerate(v)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}")


@dataclass
class ParallelSection:
    """``[model] parallel``: expert parallelism over torch.distributed (``runtime.cpu.parallel``)."""

    world_size: int = 1
    backend: str = "gloo"
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = 10.0


@dataclass
class ModelSection:
    """``[model]``: the package, its device, the history window, the stream slots, the
    expert-parallel ranks (``parallel``, None for one process), the stream names admitted
    (``names``: None for any, when ``streams`` was a count) and the public keys one of which
    must have signed the package (``public_key``, empty: signatures not required)."""

    path: Path
    device: str = "cpu"
    window: int = 32
    streams: int = 1
    parallel: ParallelSection | None = None
    names: list[str] | None = None
    public_key: list[Path] = field(default_factory=list)


@dataclass
class LoopSection:
    """``[loop]``: period, deadline, inference budget and real-time options."""

    period_ms: float = 10.0
    deadline_ms: float = 10.0
    infer_budget_ms: float = 8.0
    realtime: bool = False
    spin_us: float = 200.0
    priority: int = 80
    cpu: int | None = None
    threads: int = 1
    max_failsafe_fraction: float = 0.5
    warmup_cycles: int = 0

    @property
    def period_ns(self) -> int:
        """The period in nanoseconds."""
        return int(round(self.period_ms * 1e6))


@dataclass
class InputSpec:
    """One ``[[inputs]]`` entry."""

    name: str
    min: float
    max: float
    stale_ms: float
    on_invalid: str = "failsafe"
    unit: str | None = None

    def limit(self) -> InputLimit:
        """The runtime's form of this spec (``stale_ms`` inf: never stale)."""
        stale_ns = NEVER_STALE_NS if math.isinf(self.stale_ms) else int(round(self.stale_ms * 1e6))
        return InputLimit(self.name, self.min, self.max, stale_ns, hold=self.on_invalid == "hold")


@dataclass
class OutputSpec:
    """One ``[[outputs]]`` entry (``max_rate`` None: no rate limit)."""

    name: str
    min: float
    max: float
    failsafe: float
    max_rate: float | None = None
    on_stop: str = "failsafe"
    unit: str | None = None
    track: str | None = None
    on_recover: str = "ramp"

    def limit(self) -> OutputLimit:
        """The runtime's form of this spec."""
        return OutputLimit(self.name, self.min, self.max,
                           math.inf if self.max_rate is None else self.max_rate, self.failsafe,
                           jump=self.on_recover == "jump")


@dataclass
class RecorderSection:
    """``[recorder]``: where flight recordings go and how they rotate."""

    path: Path
    max_bytes: int = 64 << 20
    keep: int = 16
    enabled: bool = True


@dataclass
class ShadowSection:
    """``[shadow]``: a candidate package run beside the live one, never applied."""

    path: Path


@dataclass
class AdvisorSection:
    """``[advisor]``: a language model advising setpoints and/or a diagnosis (``sdk.service.advisor``).

    ``sets`` are setpoints: inputs of the fast model, whose ranges come from ``[[inputs]]``;
    ``step`` is each one's ``multipleOf`` (default 1/1000 of its range), ``max_rate`` how fast
    an advised setpoint may move (units/s, default no limit). ``enable`` names the PLC's
    switch: advice is in force only while that signal is valid, fresh and >= 0.5.
    """

    path: Path
    prompt: Path
    every_ms: float = 1000.0
    deadline_ms: float = 800.0
    max_tokens: int = 256
    max_think_tokens: int = 64
    sets: list[str] = field(default_factory=list)
    diagnoses: list[str] = field(default_factory=list)
    step: dict[str, float] = field(default_factory=dict)
    max_rate: dict[str, float] = field(default_factory=dict)
    enable: str | None = None
    enable_stale_ms: float = 200.0
    stream: str = "main"
    history: int = 50
    on_failure: str = "keep"
    window: int = 1024
    nice: int = 10

    def published(self, inputs: list[InputSpec]) -> dict[str, float]:
        """The signals the controller publishes to the bridges for the PLC, with their values
        before any advice: ``advice.<setpoint>`` (while advice is in force the value the model
        sees, ramped; otherwise the advice held; the input's min before any), ``advice.diagnosis`` (1-based index into ``diagnoses``, 0 = none),
        ``advice.state`` (0 none, 1 advice held but not in force, 2 in force) and
        ``advice.count`` (good answers, modulo 65536)."""
        lo = {i.name: i.min for i in inputs}
        out = {f"advice.{name}": lo[name] for name in self.sets}
        if self.diagnoses:
            out["advice.diagnosis"] = 0.0
        return {**out, "advice.state": 0.0, "advice.count": 0.0}


@dataclass
class ModeSection:
    """``[mode]``: the input that switches streams between manual (0) and auto (1)."""

    input: str


@dataclass
class MetricsSection:
    """``[metrics]``: where the Prometheus endpoint listens."""

    host: str = "127.0.0.1"
    port: int = 9108


@dataclass
class DeployConfig:
    """A validated deployment config (see the module docstring for fields and defaults)."""

    source: Path
    model: ModelSection
    loop: LoopSection
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    recorder: RecorderSection | None = None
    shadow: ShadowSection | None = None
    advisor: AdvisorSection | None = None
    modbus: dict | None = None
    zmq: dict | None = None
    opcua: dict | None = None
    metrics: MetricsSection | None = None
    mode: ModeSection | None = None
    base_dir: Path = Path(".")
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, *, check_sources: bool = True) -> "DeployConfig":
        """Read and validate a TOML file; raises ``ConfigError`` naming file and field."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such deployment config") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(raw, base_dir=path.resolve().parent, source=path, check_sources=check_sources)

    @classmethod
    def from_dict(cls, raw: dict, *, base_dir: str | Path, source: str | Path = "deploy.toml",
                  check_sources: bool = True) -> "DeployConfig":
        """Validate an already parsed config; relative paths resolve against ``base_dir``.
        With ``check_sources``, every input must have a configured source when a bridge is
        configured (see the module docstring)."""
        file, base = str(source), Path(base_dir)
        top = _Table(raw, "", file)

        t = top.sub("model", required=True)
        streams = t.get("streams", 1)
        names = None
        if isinstance(streams, list):
            names = streams
            if not 1 <= len(names) <= 4096 or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in names):
                t.fail(f"a list must name 1..4096 streams, each a string of 1..64 characters, got {streams!r}",
                       "streams")
            if len(set(names)) != len(names):
                t.fail(f"names a stream twice: {streams!r}", "streams")
            streams = len(names)
        else:
            streams = t.int("streams", 1, lo=1, hi=4096)
        model = ModelSection(path=_resolve(base, t.str("path")), device=t.str("device", "cpu"),
                             window=t.int("window", 32, lo=1), streams=streams, names=names)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", model.device):
            t.fail(f"must be 'cpu', 'cuda' or 'cuda:N', got {model.device!r}", "device")
        keys = t.get("public_key", None)
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else keys
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k and "\0" not in k
                                                                 for k in keys):
                t.fail(f"must be a path or a non-empty list of paths to PEM public keys, got {keys!r}", "public_key")
            model.public_key = [_resolve(base, k) for k in keys]
            for key in model.public_key:
                if not key.is_file():
                    t.fail(f"{key}: no such public key file", "public_key")
        p = t.sub("parallel")
        if p is not None:
            model.parallel = ParallelSection(
                world_size=p.int("world_size", lo=1, hi=1024), backend=p.str("backend", "gloo", ("gloo", "nccl")),
                master_addr=p.str("master_addr", "127.0.0.1"), master_port=p.int("master_port", 0, lo=0, hi=65535),
                timeout_s=p.num("timeout_s", 10.0, positive=True, hi=DAY_MS / 1e3, why=" (a day)"))
            if model.parallel.backend == "nccl" or model.device != "cpu":
                p.fail("the expert-parallel engine runs on the CPU over gloo (device = 'cpu', backend = 'gloo'); "
                       "an nccl path over GPUs is not built", "backend")
            p.done()
        t.done()

        t = top.sub("loop") or _Table({}, "loop", file)
        period = t.num("period_ms", 10.0, positive=True, hi=DAY_MS, why=" (a day)")
        if period < MIN_PERIOD_MS:
            t.fail(f"must be at least {MIN_PERIOD_MS:g} (the shortest period the loop can honour), got {period:g}",
                   "period_ms")
        deadline = t.num("deadline_ms", period, positive=True, lo=MIN_TIME_MS, why=" (the loop's clock resolution)")
        if deadline > period:
            t.fail(f"must not exceed period_ms ({period}), got {deadline}", "deadline_ms")
        budget = t.num("infer_budget_ms", 0.8 * deadline, positive=True, lo=MIN_TIME_MS,
                       why=" (the loop's clock resolution)")
        if budget > deadline:
            t.fail(f"must not exceed deadline_ms ({deadline}), got {budget}", "infer_budget_ms")
        spin = t.num("spin_us", min(200.0, 500.0 * period), lo=0.0)
        if spin >= 1000.0 * period:
            t.fail(f"must be below the period ({1000.0 * period:g} us): the loop sleeps part of every period, "
                   f"got {spin:g}", "spin_us")
        loop = LoopSection(period_ms=period, deadline_ms=deadline, infer_budget_ms=budget,
                           realtime=t.bool("realtime", False),
                           spin_us=spin, priority=t.int("priority", 80, lo=1, hi=99),
                           cpu=t.int("cpu", None, lo=0), threads=t.int("threads", 1, lo=1, hi=1024),
                           max_failsafe_fraction=t.num("max_failsafe_fraction", 0.5),
                           warmup_cycles=t.int("warmup_cycles", 0, lo=0, hi=1_000_000))
        if not 0.0 <= loop.max_failsafe_fraction <= 1.0:
            t.fail(f"must lie in [0, 1], got {loop.max_failsafe_fraction}", "max_failsafe_fraction")
        t.done()

        t = top.sub("mode")
        mode = None
        if t is not None:
            mode = ModeSection(input=t.str("input"))
            t.done()

        names: dict[str, str] = {}
        inputs = []
        for t in top.array("inputs"):
            name = _name(t, names)
            lo, hi = t.num("min"), t.num("max")
            if not lo < hi:
                t.fail(f"min ({lo}) must be below max ({hi})")
            never = mode is not None and name == mode.input
            stale = t.num("stale_ms", math.inf if never else max(200.0, 3 * period), positive=True,
                          hi=DAY_MS, why=" (a day)")
            if stale < period:
                t.fail(f"must be at least the loop period ({period:g} ms): an input is read once a period, so "
                       f"a shorter limit makes it stale every cycle, got {stale:g}", "stale_ms")
            inputs.append(InputSpec(name, lo, hi, stale, t.str("on_invalid", "failsafe", ("failsafe", "hold")),
                                    t.str("unit", None)))
            t.done()
        if not inputs:
            top.fail("at least one [[inputs]] entry is required")
        in_names = [i.name for i in inputs]
        if mode is not None and mode.input not in in_names:
            raise ConfigError(f"{file}: mode.input {mode.input!r} is not a declared input "
                              f"(inputs: {', '.join(in_names)})")
        outputs = []
        for t in top.array("outputs"):
            name = _name(t, names)
            lo, hi = t.num("min"), t.num("max")
            if not lo < hi:
                t.fail(f"min ({lo}) must be below max ({hi})")
            fs = t.num("failsafe")
            if not lo <= fs <= hi:
                t.fail(f"failsafe ({fs}) must lie within [min, max] = [{lo}, {hi}]")
            track = t.str("track", None)
            if track is not None and track not in in_names:
                t.fail(f"{track!r} is not a declared input (inputs: {', '.join(in_names)})", "track")
            if track is not None and mode is not None and track == mode.input:
                t.fail(f"{track!r} is the [mode] input; track an actuator's value", "track")
            outputs.append(OutputSpec(name, lo, hi, fs, t.num("max_rate", None, positive=True),
                                      t.str("on_stop", "failsafe", ("failsafe", "hold")), t.str("unit", None),
                                      track, t.str("on_recover", "ramp", ("ramp", "jump"))))
            t.done()
        if not outputs:
            top.fail("at least one [[outputs]] entry is required")

        recorder = None
        t = top.sub("recorder")
        if t is not None:
            recorder = RecorderSection(path=_resolve(base, t.str("path")),
                                       max_bytes=t.int("max_bytes", 64 << 20, lo=4096),
                                       keep=t.int("keep", 16, lo=1), enabled=t.bool("enabled", True))
            t.done()

        shadow = None
        t = top.sub("shadow")
        if t is not None:
            shadow = ShadowSection(path=_resolve(base, t.str("path")))
            t.done()

        advisor = None
        t = top.sub("advisor")
        if t is not None:
            advisor = _advisor(t, base, loop, inputs, outputs, names)
            t.done()

        metrics = None
        t = top.sub("metrics")
        if t is not None:
            metrics = _listen(t, t.str("listen", "127.0.0.1:9108"))
            t.done()

        config = cls(source=Path(source), model=model, loop=loop, inputs=inputs, outputs=outputs,
                     recorder=recorder, shadow=shadow, advisor=advisor, metrics=metrics, mode=mode, base_dir=base,
                     raw=raw)
        wiring = config.wiring()
        for section in SECTIONS:                          # each bridge's own parser, from the registry
            table = top.get(section, None)
            if table is None:
                continue
            t = _Table(table, section, file)              # must be a table
            try:
                setattr(config, section, validate_table(section, table, wiring))
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"{t.file}: {exc}") from None
        top.done()
        if check_sources and config.has_bridges:
            missing = config.unsourced_inputs()
            if missing:
                where = ", ".join(f"inputs[{i}] {n!r}" for i, n in enumerate(i.name for i in inputs) if n in missing)
                raise ConfigError(f"{file}: {where}: no configured source provides it: add a [[modbus.map]] "
                                  "entry with that signal, or configure [zmq] (its sensor frames may carry any "
                                  "input) or [opcua] (its input nodes are every input)")
        return config

    @property
    def has_bridges(self) -> bool:
        """Whether any bridge ([modbus], [zmq], [opcua]) is configured: an input source for ``r1edge run``."""
        return bool(self.bridge_tables())

    def bridge_tables(self) -> dict[str, dict]:
        """``{section: table}`` of the configured bridges, in the registry's order."""
        return {s: getattr(self, s) for s in SECTIONS if getattr(self, s) is not None}

    def wiring(self, inputs: list[str] | None = None, outputs: list[str] | None = None) -> Wiring:
        """What the bridges are built for (``plc_bridge.bridge.Wiring``): the input columns
        (``inputs``' order, default the config's, then the advisor's switch) and the output
        columns (``outputs``' order, then ``_heartbeat``, ``_mode`` and what the advisor
        publishes), with ranges, units and the values before the first decision."""
        ins = {i.name: i for i in self.inputs}
        outs = {o.name: o for o in self.outputs}
        cols_in = [ins[n] for n in (inputs or list(ins)) if n in ins]
        sig_in = [Signal(i.name, i.min, i.max, i.unit) for i in cols_in]
        sig_out = [Signal(o.name, o.min, o.max, o.unit, o.failsafe) for o in
                   (outs[n] for n in (outputs or list(outs)))]
        sig_out += [Signal(HEARTBEAT, 0.0, 65535.0, None, 0.0), Signal(MODE, 0.0, 2.0, None, 0.0)]
        adv = self.advisor
        if adv is not None:
            if adv.enable:
                sig_in.append(Signal(adv.enable, 0.0, 1.0, None))
            ranges = {f"advice.{n}": (ins[n].min, ins[n].max, ins[n].unit) for n in adv.sets}
            ranges.update({"advice.diagnosis": (0.0, float(len(adv.diagnoses)), None),
                           "advice.state": (0.0, 2.0, None), "advice.count": (0.0, 65535.0, None)})
            sig_out += [Signal(n, *ranges[n], v) for n, v in adv.published(self.inputs).items()]
        return Wiring(self.base_dir, tuple(sig_in), tuple(sig_out),
                      tuple(self.model.names) if self.model.names is not None else None, self.model.streams)

    def unsourced_inputs(self) -> list[str]:
        """The declared inputs that no configured bridge provides: not in ``[[modbus.map]]``
        and neither ``[zmq]`` (a ZeroMQ sensor frame may carry any input) nor ``[opcua]``
        (it has a writable node for every input). Without any bridge every input is unsourced
        here: it must come from ``Controller.step``, a ``source`` or a recording. The
        advisor's ``enable`` switch counts as an input."""
        if self.zmq is not None or self.opcua is not None:
            return []
        mapped = {e.get("signal") for e in (self.modbus or {}).get("map", []) if isinstance(e, dict)}
        return [n for n in [i.name for i in self.inputs] + self.extra_inputs() if n not in mapped]

    def extra_inputs(self) -> list[str]:
        """Signals the bridges read besides the model's inputs (the advisor's ``enable``)."""
        return [self.advisor.enable] if self.advisor is not None and self.advisor.enable else []

    def bridge_signals(self) -> tuple[list[str], dict[str, float]]:
        """(input names, ``{output name: value before the first cycle}``) as the bridges see
        them: the model's, the heartbeat and the advisor's (see ``AdvisorSection.published``)."""
        outs = bridge_outputs(self.outputs)
        if self.advisor is not None:
            outs.update(self.advisor.published(self.inputs))
        return [i.name for i in self.inputs] + self.extra_inputs(), outs

    def to_dict(self) -> dict:
        """A msgpack/JSON-able form (paths as strings), as written into recording headers."""
        def conv(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, list):
                return [conv(x) for x in v]
            return v
        d = asdict(self)
        d.pop("raw")
        if d["model"]["names"] is None:                   # recording headers as before lists of names
            del d["model"]["names"]
        return conv(d)


def _resolve(base: Path, p: str) -> Path:
    if "\0" in p:                                       # not a path; left for its parser to refuse by name
        return Path(p)
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _name(t: _Table, seen: dict[str, str]) -> str:
    name = t.str("name")
    if not _NAME_RE.match(name):
        t.fail(f"{name!r} must start with a letter and use letters, digits, '_', '.', '-'", "name")
    if name in seen:
        t.fail(f"{name!r} is already used by {seen[name]}", "name")
    seen[name] = t.where
    t.label = repr(name)
    return name


def _listen(t: _Table, listen: str) -> MetricsSection:
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})", listen)
    if m is None or not 0 <= int(m.group(3)) <= 65535:
        t.fail(f"must be HOST:PORT (or [IPV6]:PORT; port 0 takes a free one), got {listen!r}", "listen")
    return MetricsSection(host=m.group(1) or m.group(2), port=int(m.group(3)))


def _advisor(t: _Table, base: Path, loop: LoopSection, inputs: list[InputSpec], outputs: list[OutputSpec],
             names: dict[str, str]) -> AdvisorSection:
    every = t.num("every_ms", 1000.0, positive=True, hi=DAY_MS, why=" (a day)")
    if every < loop.period_ms:
        t.fail(f"must be at least the loop period ({loop.period_ms:g} ms), got {every:g}", "every_ms")
    deadline = t.num("deadline_ms", 0.8 * every, positive=True)
    if deadline > every:
        t.fail(f"must not exceed every_ms ({every:g}), got {deadline:g}", "deadline_ms")
    ins = {i.name: i for i in inputs}
    outs = {o.name for o in outputs}
    sets = t.get("sets", [])
    if not isinstance(sets, list) or not all(isinstance(n, str) for n in sets):
        t.fail(f"must be a list of setpoint (input) names, got {sets!r}", "sets")
    for n in sets:
        if n in outs:
            t.fail(f"{n!r} is an output: the advisor sets setpoints, inputs the fast model reads (its "
                   "outputs stay the fast model's, under their limits)", "sets")
        if n not in ins:
            t.fail(f"{n!r} is not a configured input (inputs: {', '.join(ins)})", "sets")
    if len(set(sets)) != len(sets):
        t.fail(f"names a setpoint twice: {sets!r}", "sets")
    diagnoses = t.get("diagnoses", [])
    if (not isinstance(diagnoses, list) or not all(isinstance(d, str) and d for d in diagnoses)
            or len(set(diagnoses)) != len(diagnoses)):
        t.fail(f"must be a list of distinct non-empty names, got {diagnoses!r}", "diagnoses")
    if not sets and not diagnoses:
        t.fail("the advisor must set something: give 'sets' (setpoints) and/or 'diagnoses'")

    def per_set(key: str) -> dict[str, float]:
        table = t.get(key, {})
        if not isinstance(table, dict):
            t.fail(f"must be a table {{setpoint = number}}, got {table!r}", key)
        out = {}
        for n, v in table.items():
            if n not in sets:
                t.fail(f"{n!r} is not in sets", key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                t.fail(f"{n}: must be a positive number, got {v!r}", key)
            out[n] = float(v)
        return out

    step = {n: (ins[n].max - ins[n].min) / 1000.0 for n in sets}
    step.update(per_set("step"))
    for n in sets:
        if step[n] > ins[n].max - ins[n].min:
            t.fail(f"{n}: {step[n]:g} is larger than the input's range", "step")
    enable = t.str("enable", None)
    if sets and enable is None:
        t.fail("is required with sets: the name of the PLC's switch (a signal the bridges read; advice is in "
               "force only while it is >= 0.5), so that the PLC can always take its setpoints back", "enable")
    for name in ["advice.state", "advice.count", "advice.diagnosis"] + [f"advice.{n}" for n in sets]:
        if name in names:
            t.fail(f"{names[name]} is named {name!r}, a signal the advisor publishes; rename it")
    if enable is not None:
        if not _NAME_RE.match(enable):
            t.fail(f"{enable!r} must start with a letter and use letters, digits, '_', '.', '-'", "enable")
        if enable in names:
            t.fail(f"{enable!r} is already used by {names[enable]}", "enable")
    sec = AdvisorSection(
        path=_resolve(base, t.str("path")), prompt=_resolve(base, t.str("prompt")), every_ms=every,
        deadline_ms=deadline, max_tokens=t.int("max_tokens", 256, lo=1),
        max_think_tokens=t.int("max_think_tokens", 64, lo=0), sets=list(sets), diagnoses=list(diagnoses),
        step=step, max_rate=per_set("max_rate"), enable=enable,
        enable_stale_ms=t.num("enable_stale_ms", max(200.0, 3 * loop.period_ms), lo=loop.period_ms, hi=DAY_MS,
                              why=" (from the loop period to a day)"),
        stream=t.str("stream", "main"), history=t.int("history", 50, lo=1, hi=100_000),
        on_failure=t.str("on_failure", "keep", ("keep", "failsafe")), window=t.int("window", 1024, lo=2),
        nice=t.int("nice", 10, lo=0, hi=19))
    if sec.max_tokens >= sec.window:
        t.fail(f"max_tokens ({sec.max_tokens}) must leave room for the prompt in window ({sec.window})", "max_tokens")
    if sec.max_think_tokens >= sec.max_tokens:
        t.fail(f"must be below max_tokens ({sec.max_tokens}), got {sec.max_think_tokens}", "max_think_tokens")
    if not sec.prompt.is_file():
        t.fail(f"{sec.prompt}: no such prompt template", "prompt")
    if not sec.path.is_dir():
        t.fail(f"{sec.path}: no such language model (a package or checkpoint directory with its tokenizer)", "path")
    return sec


def bridge_outputs(outputs: list[OutputSpec]) -> dict[str, float]:
    """``{output name: fail-safe value}`` as the bridges take it, with the heartbeat counter
    ``_heartbeat`` and the mode ``_mode`` (both fail-safe 0) that a register map may publish
    like any output."""
    return {**{o.name: o.failsafe for o in outputs}, HEARTBEAT: 0.0, MODE: 0.0}

"""The one interface every bridge offers the controller, whatever its protocol, and the
registry that builds bridges from their deployment tables.

A bridge carries the inputs of the streams it serves from the plant to the controller and
their decisions back. The controller holds a list of bridges and treats them alike: each
cycle it makes one :meth:`Bridge.read` of every bridge (an :class:`InputImage`: per stream a
row of values and receive times over the deployment's inputs, copied out of the image the
bridge's I/O thread fills) and one :meth:`Bridge.write` (a :class:`DecisionImage`: per stream
a row of outputs, which the bridge's I/O thread drains to the plant). Both images are
preallocated arrays; neither call waits on the network.

Bridges are built by one registry: each bridge module calls :func:`register` with its
deployment section name (``[modbus]``, ``[zmq]``, ``[opcua]``) and a factory
``(table, Wiring) -> Bridge``; :func:`build_bridge` and :func:`validate_table` find it there,
so neither the config nor the controller has a branch per protocol.

A bridge whose peers may ask for the controller's status and statistics (the ZeroMQ control
socket) is also a :class:`Reporter`; the controller registers its providers with it. One whose
peers may switch a stream between manual and auto is a :class:`ModeSwitch`.

A bridge whose I/O task is dead says so in its image (``InputImage.running`` False); the
controller then fails the streams it feeds safe (reason ``bridge``). One that puts out a
stream's fail-safe values on its own (the Modbus bridge, when the PLC's heartbeat stops)
marks that stream's row ``failsafe`` and counts the switches in ``failsafe_entries``, so that
the controller knows what the plant actually got.

Bridges built on asyncio run their event loop in a thread of their own (:class:`LoopThread`),
and every I/O task in that loop runs supervised (:meth:`LoopThread._supervise`): an unexpected
exception is logged with its traceback, counted in ``health()["errors"]`` as
``<task>_failed``, and the task restarts after a capped back-off. While a task is dead its
name is in :meth:`Supervised.down_tasks` (and ``health()["down"]``) and ``health()["running"]``
is false: the controller fails the bridge's streams safe (reason ``bridge``) meanwhile.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from .metrics import CollapsingLog, Counters

log = logging.getLogger(__name__)

#: ``{input name: (value, receive time time.monotonic_ns())}`` of one stream.
Inputs = dict[str, tuple[float, int]]
#: A callable answering a peer's request with a msgpack-able map.
Provider = Callable[[], dict]
#: ``handler(stream, "manual" | "auto") -> map``: switches a stream (raises ``KeyError`` for an
#: unknown stream, ``ValueError`` when the controller has no mode input).
ModeHandler = Callable[[str, str], dict]
#: Receive time of a value never received (the same as ``runtime.control.safety.MISSING_STAMP``).
MISSING = np.iinfo(np.int64).min



def refuse_unknown_keys(table: dict, allowed, where: str) -> None:
    """``ValueError`` naming the keys of a config ``table`` that are not in ``allowed``, and
    what is allowed (every bridge's section and sub-table is checked this one way)."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def new_file_paths(out_dir: Path, name: str, suffixes: Sequence[str], what: str,
                   reserved: Sequence[str] = ()) -> list[Path]:
    """``out_dir / (name + suffix)`` for files about to be written (keys, certificates):
    ``ValueError`` naming ``what`` when ``name`` is not a plain file name (or is ``reserved``),
    ``FileExistsError`` when one of them exists: a key or certificate is never overwritten."""
    if not name or "/" in name or name.startswith(".") or name in reserved:
        other = f" other than {', '.join(map(repr, reserved))}" if reserved else ""
        raise ValueError(f"{what} name {name!r} must be a plain file name{other}")
    paths = [Path(out_dir) / f"{name}{suffix}" for suffix in suffixes]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting")
    return paths


def number_key(table: dict, key: str, default, lo, hi, where: str, *, integer: bool = False,
               unit: str = "") -> int | float:
    """``table[key]`` (``default`` when absent) if it is an integer (``integer``) or a number of
    ``unit`` in ``lo..hi``; else ``ValueError`` naming ``where.key``, the value and the range."""
    value = table.get(key, default)
    kind = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind or not lo <= value <= hi:
        bound = [str(int(b)) if float(b).is_integer() else f"{b:g}" for b in (lo, hi)]
        what = f"an integer in {lo}..{hi}" if integer else f"a number of {unit} in {bound[0]}..{bound[1]}"
        raise ValueError(f"{where}.{key}: {value!r} is not {what}")
    return value if integer else float(value)


class Signal(NamedTuple):
    """One signal as the bridges see it: name, range, engineering unit, and (outputs) the
    value the bridges put out before the first decision and on their own fail-safe."""

    name: str
    min: float = -math.inf
    max: float = math.inf
    unit: str | None = None
    failsafe: float = 0.0


class Wiring(NamedTuple):
    """What a bridge is built for besides its own table: the directory relative paths resolve
    against, the input and output columns of the images (in the controller's order), and the
    stream names the deployment admits (None: any, up to ``capacity`` slots)."""

    base_dir: Path
    inputs: tuple[Signal, ...]
    outputs: tuple[Signal, ...]
    streams: tuple[str, ...] | None = None
    capacity: int = 1


class InputImage:
    """What a bridge received, as preallocated arrays: rows are streams, columns the wiring's inputs.

    The I/O thread writes into the back buffer (:meth:`put`, under ``lock``); the loop's one
    read a cycle (:meth:`take`) copies the rows in use into the front buffer ``values``
    (float64) / ``stamps`` (int64 ``time.monotonic_ns()``, :data:`MISSING` where nothing was
    received) and returns those rows, so the loop never sees a half-written row. ``failsafe``
    and ``failsafe_entries`` (per row) and ``running`` are set by the bridge at each read. (The
    Modbus bridge, with its one stream, keeps its own receive arrays and copies them into the
    front buffer in its ``read()``; its ``taken`` row is fixed.)
    """

    def __init__(self, columns: Sequence[str], rows: int, lock: threading.Lock | None = None):
        self.columns = list(columns)
        self.index = {n: j for j, n in enumerate(self.columns)}
        self.lock = lock or threading.Lock()
        shape = (rows, len(self.columns))
        self._values, self._stamps = np.full(shape, np.nan), np.full(shape, MISSING, np.int64)
        self.values, self.stamps = np.full(shape, np.nan), np.full(shape, MISSING, np.int64)
        self.names: list[str | None] = [None] * rows
        self.rows: dict[str, int] = {}
        self.taken: list[tuple[str, int]] = []
        self.failsafe = np.zeros(rows, bool)
        self.failsafe_entries = np.zeros(rows, np.int64)
        self.running = True

    def row(self, stream: str) -> int | None:
        """Lock held: the row of ``stream``, given one if a row is free (None when all are taken)."""
        r = self.rows.get(stream)
        if r is None:
            try:
                r = self.names.index(None)
            except ValueError:
                return None
            self.names[r] = stream
            self.rows[stream] = r
        return r

    def release(self, stream: str) -> None:
        """Lock held: forget ``stream`` (its row is free again, with nothing received)."""
        r = self.rows.pop(stream, None)
        if r is not None:
            self.names[r] = None
            self._values[r] = np.nan
            self._stamps[r] = MISSING

    def received(self, row: int) -> Inputs:
        """Lock held: ``{input: (value, stamp)}`` of what ``row`` received so far (I/O side)."""
        return {name: (float(v), int(t)) for name, v, t in zip(self.columns, self._values[row].tolist(),
                                                                self._stamps[row].tolist()) if t != MISSING}

    def put(self, row: int, column: int, value: float, stamp: int) -> None:
        """Lock held: one received value."""
        self._values[row, column] = value
        self._stamps[row, column] = stamp

    def take(self) -> list[tuple[str, int]]:
        """The loop's read: copy the rows in use to the front buffer; returns ``[(stream, row)]``."""
        with self.lock:
            taken = self.taken
            taken.clear()
            for stream, r in self.rows.items():
                self.values[r] = self._values[r]
                self.stamps[r] = self._stamps[r]
                taken.append((stream, r))
        return taken


class DecisionImage:
    """One cycle's decisions, as preallocated arrays: row ``i < n`` is stream ``names[i]``,
    ``values[i]`` its outputs over ``columns`` (NaN: not given for that stream, the bridges
    leave it out), ``status[i]`` "ok" | "failsafe" | "hold"; ``seq`` and ``latency_us`` of the
    cycle. Bridges read it in :meth:`Bridge.write` and copy what they keep."""

    def __init__(self, columns: Sequence[str], rows: int):
        self.columns = list(columns)
        self.index = {n: j for j, n in enumerate(self.columns)}
        self.values = np.full((rows, len(self.columns)), np.nan)
        self.names: list[str] = [""] * rows
        self.status: list[str] = ["failsafe"] * rows
        self.n = 0
        self.seq = 0
        self.latency_us = 0.0


# ---------------------------------------------------------------------------- the registry

#: Bridge modules imported on demand (each registers its section when imported), in the
#: order the controller builds and reads them.
BRIDGE_MODULES = ("plc_bridge.modbus", "plc_bridge.zmq_bridge", "plc_bridge.opcua")
#: Sections in the configuration that are bridges.
SECTIONS = ("modbus", "zmq", "opcua")
_FACTORIES: dict[str, tuple[Callable, Callable | None]] = {}


def register(section: str, factory: Callable[[dict, Wiring], "Bridge"],
             normalise: Callable[[dict, Path], dict] | None = None) -> None:
    """Register a bridge: ``factory(table, wiring)`` builds it from its deployment section
    (raising ``ValueError``/``FileNotFoundError`` naming the key), ``normalise(table,
    base_dir)`` returns the table as kept in the config (relative paths resolved)."""
    _FACTORIES[section] = (factory, normalise)


def resolve_paths(table: dict, base_dir: Path, sub: str, keys: Sequence[str]) -> dict:
    """``table`` with the paths ``keys`` of its sub-table ``sub`` resolved against ``base_dir``
    (the TOML file's directory), for a bridge's ``normalise``."""
    inner = table.get(sub)
    if not isinstance(inner, dict):
        return table
    return {**table, sub: {k: str((Path(base_dir) / Path(v).expanduser()).resolve())
                           if k in keys and isinstance(v, str) else v for k, v in inner.items()}}


def _factory(section: str) -> tuple[Callable, Callable | None]:
    if section not in _FACTORIES:
        module = BRIDGE_MODULES[SECTIONS.index(section)]
        importlib.import_module(module)
    return _FACTORIES[section]


def build_bridge(section: str, table: dict, wiring: Wiring) -> "Bridge":
    """Build the bridge of ``[section]`` (nothing is bound or started)."""
    return _factory(section)[0](table, wiring)


def validate_table(section: str, table: dict, wiring: Wiring) -> dict:
    """Check ``[section]`` by building its bridge (nothing is bound or started); returns the
    table as the config keeps it."""
    factory, normalise = _factory(section)
    if normalise is not None:
        table = normalise(table, wiring.base_dir)
    factory(table, wiring)
    return table


@runtime_checkable
class Bridge(Protocol):
    """I/O between the plant and the controller for the streams a bridge serves.

    ``name`` keys the bridge in the controller's stats ("modbus", "zmq").
    """

    name: str

    def start(self) -> "Bridge":
        """Start the I/O (in a background thread); returns the bridge."""
        ...

    def stop(self) -> None:
        """Stop the I/O and close every connection. Idempotent."""
        ...

    def serves(self, stream: str) -> bool:
        """Whether this bridge carries ``stream``'s decisions to the plant."""
        ...

    def bound_streams(self) -> list[str]:
        """The streams this bridge is bound to by its configuration (their slots are reserved);
        ``[]`` for a bridge whose peers name any stream."""
        ...

    def read(self) -> InputImage:
        """The cycle's one read: the image with the rows of every stream this bridge has
        inputs of (``InputImage.taken``), copied from what its I/O thread received."""
        ...

    def write(self, decisions: DecisionImage) -> None:
        """The cycle's one write: the decisions of the streams this bridge serves, handed to
        its I/O thread without blocking."""
        ...

    def health(self) -> dict:
        """Connection state, counters of bad traffic and errors, I/O timing."""
        ...


@runtime_checkable
class Reporter(Protocol):
    """A bridge whose peers may ask for the controller's status and statistics."""

    def set_status_provider(self, fn: Provider | None) -> None:
        """Register the callable answering "status" requests."""
        ...

    def set_stats_provider(self, fn: Provider | None) -> None:
        """Register the callable answering "stats" requests."""
        ...


@runtime_checkable
class ModeSwitch(Protocol):
    """A bridge whose peers may switch a stream between manual and auto."""

    def set_mode_handler(self, fn: ModeHandler | None) -> None:
        """Register the callable that carries out "mode" requests."""
        ...


@runtime_checkable
class Supervised(Protocol):
    """A bridge whose I/O tasks run supervised: the controller asks each cycle which are down."""

    def down_tasks(self) -> tuple[str, ...]:
        """Names of the bridge's I/O tasks that are dead now (failed and waiting to restart, or
        the bridge's thread itself when it died); ``()`` while all run or before ``start()``.
        Never blocks: a plain attribute read."""
        ...


class LoopThread:
    """An asyncio event loop in a daemon thread of its own, running the subclass's ``_main()``,
    with supervised I/O tasks.

    ``_main`` creates the loop's ``_stop`` and ``_wake`` events, calls ``_ready.set()`` once it
    serves and returns after ``_stop`` is set. ``start`` returns then, or raises
    ``RuntimeError`` with what ``_main`` failed with before it was ready (or after
    ``START_TIMEOUT_S``); ``stop`` sets ``_stop`` and ``_wake`` and joins (idempotent);
    ``_wakeup`` sets ``_wake`` from any thread. ``_label()`` names the bridge in messages.

    ``_spawn(name, factory)`` (in the loop) runs ``await factory()`` supervised: see
    :meth:`_supervise`. The subclass keeps its own error counters in ``self.errors``
    (a :class:`~plc_bridge.metrics.Counters`), where task failures are counted too.
    """

    START_TIMEOUT_S = 10.0
    JOIN_TIMEOUT_S = 5.0          # after a failed start
    RESTART_MIN_S = 0.1           # back-off before a failed task's first restart, doubling ...
    RESTART_MAX_S = 5.0           # ... up to this; reset once a task ran this long without failing

    def _init_thread(self, logger: logging.Logger | None = None) -> None:
        """Set up the thread's state; ``logger``: where ``self._say`` (a
        :class:`~plc_bridge.metrics.CollapsingLog` for the subclass's repeated warnings) and
        task failures write (default: this module's)."""
        self._log = logger or log
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._down: tuple[str, ...] = ()
        self._alive = False          # the thread runs its loop (set and cleared by the thread itself)
        self._tasks: list[asyncio.Task] = []
        self._tracebacks_logged: set[tuple[str, str]] = set()
        if not hasattr(self, "errors"):
            self.errors = Counters()
        self._say = CollapsingLog(self._log)

    def down_tasks(self) -> tuple[str, ...]:
        """Names of the I/O tasks that are dead now (see :class:`Supervised`); ``"thread"`` when
        the bridge's thread died after it had started."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return self._down + ("thread",)
        return self._down

    def _running(self) -> bool:
        """For ``health()["running"]``: the thread runs and no supervised task is down."""
        return self._alive and not self._down

    def _spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Start ``factory()`` as a supervised task called ``name`` (call from the loop)."""
        task = asyncio.get_running_loop().create_task(self._supervise(name, factory), name=name)
        self._tasks.append(task)
        return task

    async def _cancel_tasks(self) -> None:
        """Cancel every supervised task and wait for them (from ``_main``'s clean-up)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run ``await factory()`` until ``_stop``; restart it after an unexpected exception.

        The first failure of each exception type is logged with its traceback; later ones are
        collapsed warnings (see :class:`~plc_bridge.metrics.CollapsingLog`). Each failure is
        counted as ``errors["<name>_failed"]``; the task is in :meth:`down_tasks` from its failure
        until it runs again after the back-off (``RESTART_MIN_S`` doubling to ``RESTART_MAX_S``,
        back to the minimum after a run of ``RESTART_MAX_S`` without failure). A factory that
        returns while the bridge is not stopping is restarted the same way, without a count.
        """
        delay = self.RESTART_MIN_S
        while not self._stop.is_set():
            began = time.monotonic()
            failure: Exception | None = None
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = exc
            if self._stop.is_set():
                return
            if time.monotonic() - began >= self.RESTART_MAX_S:
                delay = self.RESTART_MIN_S
            self._down = tuple(sorted(set(self._down) | {name}))
            if failure is not None:
                count = self.errors.inc(f"{name}_failed")
                kind = type(failure).__name__
                if (name, kind) not in self._tracebacks_logged:
                    self._tracebacks_logged.add((name, kind))
                    self._log.error("%s: task %s failed (%d so far); restarting in %.2g s", self._label(), name,
                                    count, delay, exc_info=failure)
                else:
                    self._say.warning(f"{name}:{kind}", "%s: task %s failed again: %s: %s (%d so far)",
                                      self._label(), name, kind, failure, count)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass
            finally:
                self._down = tuple(task for task in self._down if task != name)
            delay = min(delay * 2.0, self.RESTART_MAX_S)

    def _label(self) -> str:
        raise NotImplementedError

    async def _main(self) -> None:
        raise NotImplementedError

    def _start_thread(self, name: str):
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=self.START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"{self._label()}: did not start within {self.START_TIMEOUT_S:g} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join(timeout=self.JOIN_TIMEOUT_S)
            self._thread = None
            raise RuntimeError(f"{self._label()}: {error}") from error
        return self

    def stop(self) -> None:
        """Stop the loop's work, join its thread. Idempotent."""
        thread, loop, stop, wake = self._thread, self._loop, self._stop, self._wake
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
                if wake is not None:
                    loop.call_soon_threadsafe(wake.set)
            except RuntimeError:                          # loop already closed
                pass
        thread.join(timeout=10.0)
        if thread.is_alive():
            log.error("%s: thread did not stop within 10 s", self._label())
        self._thread = None

    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:                          # loop closed while stopping
                pass

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._alive = True
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:                      # reported by start(), or logged later
            if self._ready.is_set():
                log.exception("%s: thread failed", self._label())
            self._error = exc
        finally:
            self._alive = False
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

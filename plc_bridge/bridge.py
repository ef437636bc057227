"""The one interface every bridge offers the controller, whatever its protocol.

A bridge carries the inputs of the streams it serves from the plant to the controller and
their decisions back. The controller holds a list of bridges and treats them alike: each
cycle it reads :meth:`Bridge.snapshot` of every stream in :meth:`Bridge.input_streams`, and
hands each stream's decision to every bridge that :meth:`Bridge.serves` that stream. None
of these calls waits on the network.

A bridge whose peers may ask for the controller's status and statistics (the ZeroMQ control
socket) is also a :class:`Reporter`; the controller registers its providers with it. One whose
peers may switch a stream between manual and auto is a :class:`ModeSwitch`. One that may put
out a stream's fail-safe values on its own (the Modbus bridge, when the PLC's heartbeat stops)
is a :class:`FailsafeSource`, so that the controller knows what the plant actually got.

Bridges built on asyncio run their event loop in a thread of their own (:class:`LoopThread`),
and every I/O task in that loop runs supervised (:meth:`LoopThread._supervise`): an unexpected
exception is logged with its traceback, counted in ``health()["errors"]`` as
``<task>_failed``, and the task restarts after a capped back-off. While a task is dead its
name is in :meth:`Supervised.down_tasks` (and ``health()["down"]``) and ``health()["running"]``
is false: the controller fails the bridge's streams safe (reason ``bridge``) meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Awaitable, Callable, Protocol, runtime_checkable

from .metrics import CollapsingLog, Counters

log = logging.getLogger(__name__)

#: ``{input name: (value, receive time time.monotonic_ns())}`` of one stream.
Inputs = dict[str, tuple[float, int]]
#: A callable answering a peer's request with a msgpack-able map.
Provider = Callable[[], dict]
#: ``handler(stream, "manual" | "auto") -> map``: switches a stream (raises ``KeyError`` for an
#: unknown stream, ``ValueError`` when the controller has no mode input).
ModeHandler = Callable[[str, str], dict]


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

    def input_streams(self) -> list[str]:
        """The streams this bridge has inputs for, to read with :meth:`snapshot` this cycle."""
        ...

    def snapshot(self, stream: str) -> Inputs:
        """The newest value of each input of ``stream`` received so far, with its receive
        time (``{}`` for a stream this bridge has no inputs of)."""
        ...

    def publish(self, outputs: dict[str, float], status: str, seq: int, latency_us: float,
                stream: str) -> None:
        """Hand one stream's decision over (a stream this bridge serves), without blocking."""
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
class FailsafeSource(Protocol):
    """A bridge that may put out a stream's fail-safe values itself, ignoring ``publish``."""

    def failsafe_state(self, stream: str) -> tuple[bool, int]:
        """``(overriding, entries)``: whether the next ``publish`` of ``stream`` would be
        ignored (the bridge holds the fail-safe values), and how many times the bridge has
        switched to its fail-safe values so far (a change between two calls means the plant
        got them in between). Never blocks on the network."""
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
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._down

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
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:                      # reported by start(), or logged later
            if self._ready.is_set():
                log.exception("%s: thread failed", self._label())
            self._error = exc
        finally:
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

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
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

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

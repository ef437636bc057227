"""The one interface every bridge offers the controller, whatever its protocol.

A bridge carries the inputs of the streams it serves from the plant to the controller and
their decisions back. The controller holds a list of bridges and treats them alike: each
cycle it reads :meth:`Bridge.snapshot` of every stream in :meth:`Bridge.input_streams`, and
hands each stream's decision to every bridge that :meth:`Bridge.serves` that stream. None
of these calls waits on the network.

A bridge whose peers may ask for the controller's status and statistics (the ZeroMQ control
socket) is also a :class:`Reporter`; the controller registers its providers with it.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

#: ``{input name: (value, receive time time.monotonic_ns())}`` of one stream.
Inputs = dict[str, tuple[float, int]]
#: A callable answering a peer's request with a msgpack-able map.
Provider = Callable[[], dict]


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

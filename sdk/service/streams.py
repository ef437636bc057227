"""Which stream runs in which engine slot.

:class:`StreamTable`: admission. ``[model] streams`` as a list admits only those names (one
slot each); as a count, any name gets a free slot, except that the slots of the streams a
bridge is bound to by its configuration (``[modbus] stream``, OPC UA streams, the advised
stream) are reserved for them, so frames under other names (an intruder's) can never keep a
configured stream from running. A slot is released when no bridge has its stream any more (a
ZeroMQ stream silent for ``[zmq] stream_idle_s``); reserved streams keep theirs. The mode in
force per slot is ``runtime.control.loop.ModeSources`` (precedence by change).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class StreamTable:
    """Stream names to slots (``slots``, and ``names`` per slot, None where free), with the
    admission rules in the module docstring. ``refused`` counts refused lookups; ``changes``
    counts slots taken and released (the flight recorder notes the names when it moves)."""

    def __init__(self, capacity: int, admit: list[str] | None = None, reserved: set[str] | None = None):
        self.slots: dict[str, int] = {}
        self.names: list[str | None] = [None] * capacity
        self.admit = set(admit) if admit is not None else None
        self.reserved: set[str] = set(self.admit or ()) | set(reserved or ())
        self.refused = 0
        self.changes = 0
        self._warned: set[str] = set()

    def reserve(self, streams) -> None:
        """Reserve slots for ``streams`` (the ones a bridge is bound to)."""
        self.reserved.update(streams)
        if len(self.reserved) > len(self.names):
            raise ValueError(f"model.streams ({len(self.names)}) is fewer than the streams the bridges are bound "
                             f"to ({', '.join(sorted(self.reserved))})")

    def why_not(self, stream: str) -> str | None:
        """Why ``stream`` (not holding a slot) cannot get one now, or None if it can."""
        if self.admit is not None and stream not in self.admit:
            return "not one of [model] streams"
        if stream not in self.reserved and self.names.count(None) <= len(self.reserved.difference(self.slots)):
            reserved = f" or reserved for {', '.join(sorted(self.reserved))}" if self.reserved else ""
            return f"all {len(self.names)} stream slots are in use{reserved}"
        return None

    def take(self, stream: str) -> int | None:
        """A new slot for ``stream``, or None (counted, warned once per name) if it is refused."""
        why = self.why_not(stream)
        if why is not None:
            self.refused += 1
            if stream not in self._warned and len(self._warned) < 1000:
                self._warned.add(stream)
                logger.warning("stream %r dropped: %s", stream, why)
            return None
        slot = self.names.index(None)
        self.slots[stream] = slot
        self.names[slot] = stream
        self.changes += 1
        return slot

    def release(self, slot: int) -> str:
        """Free ``slot``; returns the stream that held it."""
        stream = self.names[slot]
        del self.slots[stream]
        self.names[slot] = None
        self.changes += 1
        self._warned.discard(stream)
        logger.info("stream %r released slot %d", stream, slot)
        return stream

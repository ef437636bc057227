"""Which stream runs in which engine slot, and which source's mode is in force.

- :class:`StreamTable`: admission. ``[model] streams`` as a list admits only those names (one
  slot each); as a count, any name gets a free slot, except that the slots of the streams a
  bridge is bound to by its configuration (``[modbus] stream``, OPC UA streams, the advised
  stream) are reserved for them, so frames under other names (an intruder's) can never keep
  a configured stream from running. A slot is released when no bridge has its stream any
  more (a ZeroMQ stream silent for ``[zmq] stream_idle_s``); reserved streams keep theirs.
- :class:`ModeSources`: mode precedence by change. The ``[mode]`` input may come from several
  sources (each bridge, ``step``/``source`` inputs, ``Controller.set_mode``); a source counts
  when its value changes, and the latest change is in force. A PLC rewriting the same coil
  value every scan therefore does not undo an operator's command from another source, while
  a PLC that flips its coil does take over.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from runtime.control.safety import MISSING_STAMP

logger = logging.getLogger(__name__)


class StreamTable:
    """Stream names to slots (``slots``, and ``names`` per slot, None where free), with the
    admission rules in the module docstring. ``refused`` counts refused lookups."""

    def __init__(self, capacity: int, admit: list[str] | None = None, reserved: set[str] | None = None):
        self.slots: dict[str, int] = {}
        self.names: list[str | None] = [None] * capacity
        self.admit = set(admit) if admit is not None else None
        self.reserved: set[str] = set(self.admit or ()) | set(reserved or ())
        self.refused = 0
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
            return f"all {len(self.names)} slots in use or reserved for {', '.join(sorted(self.reserved))}"
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
        return slot

    def release(self, slot: int) -> str:
        """Free ``slot``; returns the stream that held it."""
        stream = self.names[slot]
        del self.slots[stream]
        self.names[slot] = None
        self._warned.discard(stream)
        logger.info("stream %r released slot %d", stream, slot)
        return stream


class ModeSources:
    """The mode input of each slot by change of its sources (see the module docstring):
    ``sources`` numbered sources plus ``set_mode`` requests (``command``, from any thread)."""

    def __init__(self, sources: int, capacity: int):
        self.value = np.full(capacity, np.nan)               # the value in force
        self.stamp = np.full(capacity, MISSING_STAMP, np.int64)   # when it changed
        self.seen = np.full((sources, capacity), np.nan)     # each source's last value
        self.commands: dict[str, tuple[float, int]] = {}
        self.lock = threading.Lock()

    def reset(self, slot: int) -> None:
        """A new stream in ``slot``: nothing seen yet."""
        self.value[slot] = np.nan
        self.stamp[slot] = MISSING_STAMP
        self.seen[:, slot] = np.nan

    def command(self, stream: str, value: float, stamp: int) -> None:
        """A ``set_mode`` request: in force from the next cycle, until a source changes."""
        with self.lock:
            self.commands[stream] = (value, stamp)

    def forget(self, stream: str) -> None:
        """Drop ``stream``'s request (its slot was released)."""
        with self.lock:
            self.commands.pop(stream, None)

    def source(self, source: int, slot: int, value: float, stamp: int) -> None:
        """One source's value of a slot's mode input this cycle: it counts only when it changed."""
        if stamp == MISSING_STAMP:
            return
        seen = self.seen[source, slot]
        if value == seen or (value != value and seen != seen):
            return
        self.seen[source, slot] = value
        if stamp >= self.stamp[slot]:
            self.value[slot] = value
            self.stamp[slot] = stamp

    def resolve(self, slots: dict[str, int], values: np.ndarray, stamps: np.ndarray, active: np.ndarray) -> None:
        """The mode in force (the latest change, requests included) into the active slots'
        mode column (``values``/``stamps``: that column of the cycle's inputs)."""
        if self.commands:
            with self.lock:
                commands = tuple(self.commands.items())
            for stream, (value, stamp) in commands:
                slot = slots.get(stream)
                if slot is not None and stamp > self.stamp[slot]:
                    self.value[slot] = value
                    self.stamp[slot] = stamp
        np.copyto(values, self.value, where=active)
        np.copyto(stamps, self.stamp, where=active)

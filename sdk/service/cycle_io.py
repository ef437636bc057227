"""A control cycle's inputs and outputs as the controller moves them: the bridges' images or the
frames of ``step``/``source`` into the cycle's arrays (streams taken into slots as they come),
and the cycle's outputs to the ``sink`` and, as one decision image, to each bridge.

:class:`CycleIO` is a part of :class:`sdk.service.controller.Controller`, split off to keep each
file readable; it has no state of its own and works on the controller's ``cycle``
(``runtime.control.loop.ControlCycle``), ``streams`` and ``slots``, ``modes``, ``bridges``,
``decisions``, ``advisor``, ``shadow`` and counters.
"""
from __future__ import annotations

import logging
from itertools import chain
from typing import Any, Mapping

import numpy as np

from runtime.control.safety import MISSING_STAMP, STATUS_NAMES

logger = logging.getLogger("sdk.service.controller")    # the controller's messages, as before the split


class CycleIO:
    """The reading and writing half of a controller's cycle (see the module docstring)."""

    def _read(self, now: int, frames: Mapping[str, Mapping[str, float]] | None = None, *,
              strict: bool = False) -> None:
        """The cycle's inputs: ``frames`` (``{stream: {input: value}}``: ``step_many``'s; with
        ``strict`` a stream that finds no slot raises), else the ``source``'s, else one read of
        each bridge; then the mode in force."""
        cycle = self.cycle
        cycle.active.fill(False)
        cycle.forced.fill(False)
        cycle.down.fill(False)
        self.active.clear()
        if self.advisor is not None:
            self.advisor.clear_enable()
        if frames is None and self._source is not None:
            frames = self._source(self.loop.cycles, now) or {}
            if frames and not isinstance(next(iter(frames.values())), Mapping):
                frames = {"main": frames}
        if frames is None:
            self._read_bridges()
        elif frames:
            self._fill_frames(frames, now, strict)
        col = cycle.mode_col
        if col is not None:
            self.modes.resolve(self.slots, cycle.values[:, col], cycle.stamps[:, col], cycle.active)

    def _read_bridges(self) -> None:
        """Each bridge's image into the cycle's inputs: the first bridge to give a stream a row
        this cycle sets it, the others merge signal by signal, the newer receive time winning.
        A stream a bridge puts out fail-safe values for (or did since the last read) is
        ``forced``; one a bridge with a dead task feeds is ``down``. A slot no bridge gave
        anything for is released, unless its stream is reserved (``streams.reserved``)."""
        cycle, n, col = self.cycle, len(self.input_names), self.cycle.mode_col
        values, stamps, given = cycle.values, cycle.stamps, self._given
        given.fill(False)
        for b, bridge in enumerate(self.bridges):
            try:
                img = bridge.read()
            except Exception as exc:                      # inputs keep ageing: staleness fails safe
                self._error("read_errors", exc)
                continue
            seen = self._failsafe_seen[b]
            for stream, r in img.taken:
                slot = self.slots.get(stream)
                if slot is None and (slot := self._slot(stream)) is None:
                    continue
                v, t = img.values[r], img.stamps[r]
                if cycle.active[slot]:
                    newer = t[:n] > stamps[slot]
                    np.copyto(values[slot], v[:n], where=newer)
                    np.copyto(stamps[slot], t[:n], where=newer)
                else:
                    values[slot] = v[:n]
                    stamps[slot] = t[:n]
                    cycle.active[slot] = True
                    self.active.append(slot)
                given[slot] = True
                if col is not None:
                    self.modes.source(b, slot, v[col], t[col])
                for j, name in self._extra_cols:
                    if t[j] != MISSING_STAMP:
                        self.advisor.capture(slot, name, v[j], t[j])
                entries = img.failsafe_entries[r]
                if img.failsafe[r] or entries != seen[slot]:
                    cycle.forced[slot] = True
                seen[slot] = entries
                if not img.running:
                    cycle.down[slot] = True
        for slot, stream in enumerate(self._slot_names):
            if stream is not None and not given[slot] and stream not in self.streams.reserved:
                self.modes.forget(self.streams.release(slot))
                self.logged_status[slot] = -1

    def _write(self, seq: int, latency_us: float) -> None:
        """The cycle's outputs: to the ``sink`` per stream, and one write of the decision image
        (outputs, ``_heartbeat``, ``_mode``, the advisor's signals) to each bridge."""
        cycle, names = self.cycle, self.output_names
        if self._sink is not None:
            for slot in self.active:
                try:
                    self._sink(self._slot_names[slot], dict(zip(names, cycle.out[slot].tolist())),
                               STATUS_NAMES[int(cycle.status[slot])], seq, latency_us)
                except Exception as exc:
                    self._error("sink_errors", exc)
        d = self.decisions
        if d is None:
            return
        n_out, hb, adv = len(names), float(cycle.heartbeat), self.advisor
        for i, slot in enumerate(self.active):
            d.names[i] = self._slot_names[slot]
            d.status[i] = STATUS_NAMES[int(cycle.status[slot])]
            row = d.values[i]
            row[:n_out] = cycle.out[slot]
            row[n_out] = hb
            row[n_out + 1] = cycle.mode[slot]
            if adv is not None:
                row[n_out + 2:] = np.nan
                if slot == adv.slot:
                    for name, value in adv.published().items():
                        row[d.index[name]] = value
        d.n, d.seq, d.latency_us = len(self.active), seq, latency_us
        for bridge in self.bridges:
            try:
                bridge.write(d)
            except Exception as exc:
                self._error("write_errors", exc)

    def _slot(self, stream: str) -> int | None:
        slot = self.slots.get(stream)
        if slot is not None:
            return slot
        slot = self.streams.take(stream)
        if slot is None:
            self.counters["dropped_streams"] += 1
            return None
        self.logged_mode[slot] = -1
        self.logged_status[slot] = -1
        self.modes.reset(slot)
        self._failsafe_seen[:, slot] = 0
        self.cycle.reset_slot(slot)
        if self.shadow is not None:
            self.shadow.reset_slot(slot)
        if self.advisor is not None and stream == self.advisor.section.stream:
            self.advisor.slot = slot
        logger.info("stream %r -> slot %d", stream, slot)
        return slot

    def _fill_frames(self, frames: Mapping[str, Mapping[str, Any]], now: int, strict: bool) -> None:
        """Each stream's inputs (see :meth:`_fill`); the streams that give every input as a plain
        number (the usual case) go into the cycle's arrays in one block when there are several."""
        cycle, n_in, plain, given = self.cycle, len(self.input_names), self._plain, []
        plain.clear()
        for stream, values in frames.items():
            slot = self.slots.get(stream)
            if slot is None and (slot := self._slot(stream)) is None:
                if strict:
                    raise ValueError(f"stream {stream!r}: {self.streams.why_not(stream)} (raise [model] streams)")
                continue
            if type(values) is dict and len(values) == n_in:   # every input, unless a name is wrong
                given.append(values)
                plain.append(slot)
            else:
                self._fill(slot, values, now)
        block, plain_numbers = self._block[:len(plain)], False
        if len(plain) > 1:                                # one row: _fill's own fast path is quicker
            try:
                block.reshape(-1)[:] = np.fromiter(chain.from_iterable(map(self._row_of, given)), np.float64,
                                                   count=block.size)
                plain_numbers = not np.isnan(block).any()     # NumPy reads None as NaN: it is missing
            except (KeyError, TypeError, ValueError, OverflowError):   # a wrong name, a (value, t_ns) pair...
                pass
        if not plain_numbers:
            for slot, values in zip(plain, given):
                self._fill(slot, values, now)
            return
        cycle.values[plain] = block
        cycle.stamps[plain] = now
        cycle.active[plain] = True
        self.active.extend(plain)
        if cycle.mode_col is not None:
            for slot in plain:
                self._mode_source(slot)

    def _fill(self, slot: int, values: Mapping[str, Any], now: int) -> None:
        """One stream's inputs: a value, or ``(value, t_monotonic_ns)`` to say when it was
        measured (else it counts as measured ``now``); absent or None ones are missing."""
        row, stamps = self.cycle.values[slot], self.cycle.stamps[slot]
        if values.keys() == self._in_keys:                # the usual case: every input, plain values
            given = [values[n] for n in self.input_names]
            if not any(v is None for v in given):
                try:
                    row[:] = given
                except (TypeError, ValueError, OverflowError):   # a (value, t_ns) pair or a non-number
                    pass
                else:
                    stamps.fill(now)
                    self._activate(slot)
                    self._mode_source(slot)
                    return
        row.fill(np.nan)
        stamps.fill(MISSING_STAMP)
        index = self._in_index
        for name, value in values.items():
            j = index.get(name)
            stamp = now
            if isinstance(value, tuple) and len(value) == 2:
                value, stamp = value
            if j is None:
                if self.advisor is None or not self.advisor.capture(slot, name, value, stamp):
                    self._unknown(name)
                continue
            if value is None:
                continue
            try:
                row[j] = value
                stamps[j] = stamp
            except (TypeError, ValueError, OverflowError):
                row[j] = np.nan                           # not a number: invalid ("nan")
                stamps[j] = now
        self._activate(slot)
        self._mode_source(slot)

    def _mode_source(self, slot: int) -> None:
        """The mode input as ``step``/``source`` gave it: one more source of the mode."""
        col = self.cycle.mode_col
        if col is not None:
            self.modes.source(len(self.bridges), slot, self.cycle.values[slot, col], self.cycle.stamps[slot, col])

    def _activate(self, slot: int) -> None:
        if not self.cycle.active[slot]:
            self.cycle.active[slot] = True
            self.active.append(slot)

    def _unknown(self, name: str) -> None:
        self.counters["unknown_inputs"] += 1
        if name not in self._warned and len(self._warned) < 1000:
            self._warned.add(name)
            logger.warning("unknown input %r ignored (configured: %s)", name, ", ".join(self.input_names))

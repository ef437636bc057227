"""Flight recorder: every control cycle appended to a file, readable after a crash.

A recording is a run of numbered segment files ``<run>-0000.r1rec``, ``<run>-0001.r1rec``, ...
in one directory; ``<run>`` is ``rec-<UTC time>-<pid>``, so runs sort by start time. Each file is a sequence of records (little-endian)::

    uint32 N | N bytes of payload | uint32 CRC-32 of those N bytes

A payload is a msgpack map, or (format 2) a packed cycle: its first byte is 0xC1, the one byte
msgpack never uses. The first record of every segment is a header map (``"type": "header"``,
``"format"``, ``"segment"``, and whatever the writer adds: package identity, deploy config,
signal names). The others are whatever the controller appends: maps (``"type": "cycle"``,
``"advice"``, ``"stop"``, ...) and packed cycles.

A packed cycle (:func:`packed_cycle_dtypes`; written by one compiled call over the control
cycle's arrays, :class:`CyclePacker`) is, little-endian, with every 8-byte field 8-aligned::

    head (56 bytes)  u1 tag = 0xC1 | u1 layout = 1 | u2 n (streams) | u4 heartbeat |
                     i8 seq | i8 t_ns (the tick, monotonic) | i8 timing[4] (read, infer,
                     write, lateness; ns)
    n rows, in slot order, each
                     i8 filled | f8 x[n_in] | f8 y[n_out] | f8 out[n_out] | u2 slot |
                     i1 status | i1 reason | i1 mode | u1 flags | i1 codes[n_in] |
                     zero padding to a multiple of 8 bytes

``x`` are the inputs as given (the header's ``packed_cycles["inputs"]``: the model's, then
the tracking and mode inputs), ``y`` the model's outputs (NaN where it gave none), ``out`` the
outputs sent; ``flags`` adds 1 if the frame ran, 2 if ``y`` is given, 4 if the frame began a
warm-up (``pre``; else ``filled`` is the gap frames filled first); ``status``, ``reason``,
``mode`` and ``codes`` (per input, 0 for valid) index ``STATUS_NAMES``, ``REASON_NAMES``,
``MODE_NAMES`` and ``INVALID_NAMES`` of :mod:`runtime.control.safety`, so the order of those
names is part of the format (a change to it needs a new ``PACKED_LAYOUT``). A ``"slots"`` map
(``"names"``: each slot's stream or None), written whenever the slots change and after each
segment's header, names the streams. The reader gives a packed cycle back as the map a
``"cycle"`` record holds (``s``, ``slot``, ``x``, ``st``, ``why``, ``ran``, ``y``, ``out``,
``mode``, ``pre`` or ``fill``, ``bad``), its streams in slot order. A controller with an
advisor writes msgpack cycles only, and so does any cycle in which inference raised (the map
carries the message). Floats are float64 either way, so values read back are bitwise those
written.

Format 1 (msgpack only) is read as before; a format this module does not know is refused,
naming the formats it reads.

Each record goes out in one ``write(2)`` (the file is unbuffered; no fsync per record; fsync on
rotation and close), so a killed process leaves every complete record readable; the reader
stops at the first incomplete or corrupt record and says where and why. A record the kernel
refuses part-way (a full disk) is cut back out of the segment and its ``append`` raises
``OSError``, so the records written once there is room again still read; a new segment whose
header cannot be written is removed and tried again with the next record. Rotation starts a new
segment when the current one would exceed ``max_bytes``; the oldest segments in the directory
beyond ``keep`` are deleted.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import msgpack
import numpy as np

from runtime.control.safety import INVALID_NAMES, MODE_NAMES, REASON_INPUT, REASON_NAMES, STATUS_NAMES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: Recording formats this module reads.
READS_FORMATS = (1, 2)
#: First payload byte of a packed cycle (never the first byte of a msgpack value).
PACKED_TAG = 0xC1
PACKED_LAYOUT = 1
SUFFIX = ".r1rec"
MAX_RECORD_BYTES = 1 << 28
_SEGMENT_RE = re.compile(r"^(?P<run>.+)-(?P<seg>\d{4,})" + re.escape(SUFFIX) + "$")
_U32 = struct.Struct("<I")


@functools.lru_cache(maxsize=16)                        # the reader asks for every packed cycle
def packed_cycle_dtypes(n_in: int, n_out: int) -> tuple[np.dtype, np.dtype]:
    """The packed cycle's head and per-stream row (little-endian, every 8-byte field 8-aligned)."""
    head = np.dtype([("tag", "u1"), ("layout", "u1"), ("n", "<u2"), ("hb", "<u4"), ("seq", "<i8"),
                     ("t_ns", "<i8"), ("timing", "<i8", (4,))])
    fields = [("filled", "<i8"), ("x", "<f8", (n_in,)), ("y", "<f8", (n_out,)), ("out", "<f8", (n_out,)),
              ("slot", "<u2"), ("status", "i1"), ("reason", "i1"), ("mode", "i1"), ("flags", "u1"),
              ("codes", "i1", (n_in,))]
    pad = -np.dtype(fields).itemsize % 8
    return head, np.dtype(fields + ([("pad", "u1", (pad,))] if pad else []))


_RAN, _Y_GIVEN, _STARTED = 1, 2, 4


class CyclePacker:
    """A control cycle's record in the packed layout, framed in a preallocated buffer by one
    compiled call (:func:`runtime.control.kernels.pack_cycle`) over the cycle's own arrays.

    ``cycle`` is a :class:`runtime.control.loop.ControlCycle`; ``inputs`` and ``outputs`` name
    its value and output columns. :meth:`frame` returns a view of the framed record (valid until
    the next call), or None for a cycle in which a stream failed with an inference error (the
    caller writes that one as a msgpack map, with the message)."""

    def __init__(self, cycle, inputs: Sequence[str], outputs: Sequence[str]):
        from runtime.control import kernels

        self.inputs, self.outputs = list(inputs), list(outputs)
        head, row = packed_cycle_dtypes(len(self.inputs), len(self.outputs))
        size = 8 + head.itemsize + cycle.capacity * row.itemsize + 8
        self._buf = np.zeros(size // 8, np.int64).view(np.uint8)          # 8-byte aligned
        self._meta = np.zeros(9, np.int64)
        self._meta[7], self._meta[8] = PACKED_TAG, PACKED_LAYOUT
        offsets = [head.fields[k][1] for k in ("tag", "layout", "n", "hb", "seq", "t_ns", "timing")]
        if offsets != [0, 1, 2, 4, 8, 16, 24]:                # where pack_cycle writes them
            raise RuntimeError(f"packed head offsets {offsets} are not the ones pack_cycle writes")
        names = ("filled", "x", "y", "out", "slot", "status", "reason", "mode", "flags", "codes")
        layout = np.array([head.itemsize, row.itemsize] + [row.fields[n][1] for n in names], np.int64)
        table = np.array([_crc_entry(b) for b in range(256)], np.uint32)
        buf = self._buf
        self._args = (buf, buf.view(np.uint16), buf.view(np.uint32), buf.view(np.int64), buf.view(np.float64),
                      self._meta, layout, cycle.active, cycle.status, cycle.reason, cycle.mode, cycle.ran,
                      cycle.started, cycle.filled, cycle.values, cycle.raw, cycle.out, cycle.guard.codes, table)
        self._pack = kernels.entry(kernels.pack_cycle, self._args)
        self._cycle = cycle
        self._view = memoryview(buf)

    def layout(self) -> dict:
        """What the header's ``"packed_cycles"`` holds."""
        return {"layout": PACKED_LAYOUT, "inputs": self.inputs, "outputs": self.outputs}

    def frame(self, seq: int, t_ns: int, timing: Sequence[int]) -> memoryview | None:
        """The framed record of the cycle that just ran (see the class docstring)."""
        meta = self._meta
        meta[0], meta[1], meta[2] = seq, t_ns, self._cycle.heartbeat
        meta[3], meta[4], meta[5], meta[6] = timing
        n = self._pack(*self._args)
        return None if n < 0 else self._view[4:4 + n]


def _crc_entry(byte: int) -> int:
    c = byte
    for _ in range(8):
        c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
    return c


def unpack_cycle(payload: bytes, layout: dict, slots: Sequence[str | None]) -> dict:
    """A packed cycle as the ``"cycle"`` map it stands for (``layout``: the header's
    ``"packed_cycles"``; ``slots``: the latest ``"slots"`` record's names)."""
    inputs, outputs = layout["inputs"], layout["outputs"]
    head_t, row_t = packed_cycle_dtypes(len(inputs), len(outputs))
    if len(payload) < head_t.itemsize:
        raise ValueError(f"{len(payload)} bytes, shorter than the {head_t.itemsize}-byte head")
    head = np.frombuffer(payload, head_t, count=1)[0]
    if head["layout"] != PACKED_LAYOUT:
        raise ValueError(f"layout {head['layout']} (this r1edge reads layout {PACKED_LAYOUT})")
    size = head_t.itemsize + int(head["n"]) * row_t.itemsize
    if len(payload) != size:
        raise ValueError(f"{len(payload)} bytes; the head and {head['n']} rows of this layout "
                         f"({len(inputs)} inputs, {len(outputs)} outputs) take {size}")
    rows = np.frombuffer(payload, row_t, count=int(head["n"]), offset=head_t.itemsize)
    streams = []
    for r in rows:
        slot, reason, flags = int(r["slot"]), int(r["reason"]), int(r["flags"])
        if slot >= len(slots) or slots[slot] is None:
            raise ValueError(f"slot {slot} names no stream (no slots record before it names one)")
        if not (reason < len(REASON_NAMES) and r["status"] < len(STATUS_NAMES) and r["mode"] < len(MODE_NAMES)):
            raise ValueError(f"slot {slot}: status, reason or mode out of range")
        entry = {"s": slots[slot], "slot": slot, "x": r["x"].tolist(),
                 "st": STATUS_NAMES[r["status"]], "why": REASON_NAMES[reason], "ran": bool(flags & _RAN),
                 "y": r["y"].tolist() if flags & _Y_GIVEN else None, "out": r["out"].tolist(),
                 "mode": MODE_NAMES[r["mode"]]}
        if flags & _STARTED:
            entry["pre"] = True
        elif r["filled"]:
            entry["fill"] = int(r["filled"])
        if reason == REASON_INPUT:
            entry["bad"] = {name: INVALID_NAMES[c] for name, c in zip(inputs, r["codes"].tolist()) if c}
        streams.append(entry)
    return {"type": "cycle", "seq": int(head["seq"]), "t_ns": int(head["t_ns"]), "hb": int(head["hb"]),
            "streams": streams, "timing": head["timing"].tolist()}


def encode_record(record: dict) -> bytes:
    """One framed record: length, msgpack payload, CRC-32."""
    payload = msgpack.packb(record, use_bin_type=True)
    return b"".join((_U32.pack(len(payload)), payload, _U32.pack(zlib.crc32(payload))))


class FlightRecorder:
    """Appends records to a recording in ``directory``, rotating segments by size.

    ``header`` (a msgpack-able dict) is written at the start of every segment, with ``type``,
    ``format``, ``run`` and ``segment`` added, followed by the latest :meth:`set_slots` record.
    """

    def __init__(self, directory: str | Path, header: dict, *, max_bytes: int = 64 << 20,
                 keep: int = 16, run_name: str | None = None):
        if max_bytes < 4096:
            raise ValueError(f"recorder max_bytes must be at least 4096, got {max_bytes}")
        if keep < 1:
            raise ValueError(f"recorder keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or self._new_run_name()
        self.max_bytes, self.keep = int(max_bytes), int(keep)
        self._header = dict(header)
        self._slots: dict | None = None
        self.segment = -1
        self.records = 0
        self.bytes_written = 0
        self._fd = -1                                     # the segment being written (-1: none)
        self._size = 0
        self._in_segment = 0
        self._torn = False
        self._closed = False
        self._open_segment(0)

    def _new_run_name(self) -> str:
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"
        name, n = f"rec-{stamp}-{os.getpid()}", 1
        while any(self.directory.glob(f"{glob_escape(name)}-*{SUFFIX}")):
            n += 1
            name = f"rec-{stamp}-{os.getpid()}-{n}"
        return name

    @property
    def path(self) -> Path:
        """The segment being written."""
        return self.segment_path(self.segment)

    def segment_path(self, index: int) -> Path:
        """Path of segment ``index`` of this run."""
        return self.directory / f"{self.run_name}-{index:04d}{SUFFIX}"

    def append(self, record: dict) -> int:
        """Append one record (flushed to the OS before returning); returns its size in bytes."""
        return self.append_framed(encode_record(record))

    def append_framed(self, data: bytes | memoryview) -> int:
        """Append one record already framed (a :meth:`CyclePacker.frame`); returns its size.
        A record that could not be written whole raises ``OSError`` and is not in the segment."""
        if self._closed:
            raise ValueError(f"flight recording {self.run_name} is closed")
        if self._torn or (self._in_segment and self._size + len(data) > self.max_bytes):
            self._open_segment(self.segment + 1)
        self._write(data)
        self._in_segment += 1
        self.records += 1
        return len(data)

    def set_slots(self, names: Sequence[str | None]) -> None:
        """Record which stream holds each slot (packed cycles name streams by slot): now, and
        after the header of every later segment."""
        self._slots = {"type": "slots", "names": list(names)}
        self.append(self._slots)

    def close(self) -> None:
        """Flush, fsync and close the current segment; later appends raise ``ValueError``."""
        self._closed = True
        self._close_segment()

    def _close_segment(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> "FlightRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, data: bytes | memoryview) -> None:
        n = len(data)
        try:                                              # os.write on the descriptor: through a file
            done = os.write(self._fd, data)               # object a record cost ~0.5 us more at 1 kHz
            if done != n:                                 # a regular file takes it whole but for errors
                view = memoryview(data)[done:]
                while view:
                    view = view[os.write(self._fd, view):]
        except OSError:
            self._cut_back()
            raise
        self._size += n
        self.bytes_written += n

    def _cut_back(self) -> None:
        """After a failed write (a full disk, a file size limit): the segment back to its last
        complete record, since a torn record would stop every reader there and hide the
        records after it. If that fails too, the next record starts a new segment."""
        try:
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
        except (OSError, ValueError) as exc:
            logger.error("flight recorder: could not cut %s back to its last complete record (%s); "
                         "the next record starts a new segment", self.path, exc)
            self._torn = True

    def _open_segment(self, index: int) -> None:
        self._torn = True                                 # until the new segment has its header
        self._close_segment()
        self._fd = os.open(self.segment_path(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.segment = index                              # (not before: a failed open leaves no gap)
        self._size = 0
        self._in_segment = 0
        header = {**self._header, "type": "header", "format": FORMAT_VERSION,
                  "run": self.run_name, "segment": index}
        try:
            self._write(encode_record(header))
            if self._slots is not None:
                self._write(encode_record(self._slots))
        except OSError:                                   # no segment without its header: the next
            os.close(self._fd)                            # record tries this index again
            self._fd = -1
            self.segment_path(index).unlink(missing_ok=True)
            self.segment = index - 1
            raise
        self._torn = False
        if index:
            self._prune()

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*" + SUFFIX), key=_segment_sort_key)
        for old in files[:max(0, len(files) - self.keep)]:
            if old != self.path:
                try:
                    old.unlink()
                    logger.info("flight recorder: deleted %s (keep=%d)", old, self.keep)
                except OSError as exc:
                    logger.warning("flight recorder: could not delete %s: %s", old, exc)


def _segment_sort_key(path: Path):
    m = _SEGMENT_RE.match(path.name)
    return (m.group("run"), int(m.group("seg"))) if m else (path.name, -1)


@dataclass
class ReadStop:
    """Where and why reading stopped: ``reason`` is ``"end"`` for a clean end of the last
    segment, else ``"truncated"``, ``"crc mismatch"``, ``"bad length"``, ``"bad msgpack"``,
    ``"bad packed cycle: ..."`` (with what is wrong) or ``"no header"``."""

    file: str
    offset: int
    reason: str

    @property
    def clean(self) -> bool:
        """Whether every byte of the recording was read as complete records."""
        return self.reason == "end"


def iter_segment(path: str | Path, unpack: Callable[[bytes], dict] | None = None
                 ) -> tuple[Iterator[dict | bytes], list]:
    """Records of one segment file, and a one-element list that receives its ``ReadStop``.

    Msgpack maps come out as dicts; packed cycles as ``unpack(payload)`` (a ``ValueError``
    from it stops the reading there: "bad packed cycle: ..."), or as their payload bytes
    without ``unpack`` (see :func:`unpack_cycle`)."""
    stop: list[ReadStop] = []

    def gen():
        data = Path(path).read_bytes()
        pos, n = 0, len(data)
        while True:
            if pos == n:
                stop.append(ReadStop(str(path), pos, "end"))
                return
            if pos + 4 > n:
                stop.append(ReadStop(str(path), pos, "truncated"))
                return
            (length,) = _U32.unpack_from(data, pos)
            if length > MAX_RECORD_BYTES:
                stop.append(ReadStop(str(path), pos, "bad length"))
                return
            end = pos + 4 + length + 4
            if end > n:
                stop.append(ReadStop(str(path), pos, "truncated"))
                return
            payload = data[pos + 4:pos + 4 + length]
            (crc,) = _U32.unpack_from(data, pos + 4 + length)
            if zlib.crc32(payload) != crc:
                stop.append(ReadStop(str(path), pos, "crc mismatch"))
                return
            if payload[0] == PACKED_TAG:
                if unpack is None:
                    yield payload
                else:
                    try:
                        record = unpack(payload)
                    except ValueError as exc:
                        stop.append(ReadStop(str(path), pos, f"bad packed cycle: {exc}"))
                        return
                    yield record
                pos = end
                continue
            try:
                record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as exc:
                logger.debug("bad msgpack at %s:%d: %s", path, pos, exc)
                stop.append(ReadStop(str(path), pos, "bad msgpack"))
                return
            yield record
            pos = end

    return gen(), stop


def recording_segments(path: str | Path) -> list[Path]:
    """The segment files of a recording, in order.

    ``path`` is a segment file (that segment and the run's following ones) or a directory
    (the most recent run in it, all its segments).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*" + SUFFIX), key=_segment_sort_key)
        runs = [_SEGMENT_RE.match(f.name).group("run") for f in files if _SEGMENT_RE.match(f.name)]
        if not runs:
            raise FileNotFoundError(f"{path}: no {SUFFIX} recording in this directory")
        run, first = runs[-1], None
    elif path.is_file():
        m = _SEGMENT_RE.match(path.name)
        if not m:
            return [path]
        run, first = m.group("run"), int(m.group("seg"))
        path = path.parent
    else:
        raise FileNotFoundError(f"{path}: no such recording")
    segs = sorted((f for f in path.glob(f"{glob_escape(run)}-*{SUFFIX}")
                   if (m := _SEGMENT_RE.match(f.name)) and m.group("run") == run),
                  key=_segment_sort_key)
    if first is None:
        first = _segment_sort_key(segs[0])[1]
    out, expect = [], first
    for f in segs:
        index = _segment_sort_key(f)[1]
        if index < first:
            continue
        if index != expect:
            logger.warning("recording %s: segment %d missing; stopping before %s", run, expect, f)
            break
        out.append(f)
        expect += 1
    return out


def glob_escape(text: str) -> str:
    """Escape glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", text)


class RecordingReader:
    """Iterates every record of a recording, segment after segment (headers included).

    Reading stops at the first incomplete or corrupt record; ``stop`` then says where and why
    (``stop.clean`` when everything was read). ``header`` is the first segment's header. Packed
    cycles come out as the ``"cycle"`` maps they stand for. A recording in a format this module
    does not read raises ``ValueError`` naming the formats it reads.
    """

    def __init__(self, path: str | Path):
        self.segments = recording_segments(path)
        self.stop: ReadStop | None = None
        self.header: dict | None = None
        self.records = 0

    def __iter__(self) -> Iterator[dict]:
        slots: list = []

        def unpack(payload: bytes) -> dict:
            header = self.header or {}
            if header.get("format", 1) < 2 or not header.get("packed_cycles"):
                raise ValueError("the header has no packed_cycles layout (a format-1 recording has no packed cycles)")
            return unpack_cycle(payload, header["packed_cycles"], slots)

        for i, seg in enumerate(self.segments):
            records, stop = iter_segment(seg, unpack)
            for record in records:
                if self.header is None:
                    if record.get("type") != "header":
                        self.stop = ReadStop(str(seg), 0, "no header")
                        return
                    if record.get("format") not in READS_FORMATS:
                        raise ValueError(f"{seg}: flight recording format {record.get('format')!r}; this r1edge "
                                         f"reads formats {', '.join(map(str, READS_FORMATS))} (a newer r1edge "
                                         "wrote it: read it with that one)")
                    self.header = record
                if record.get("type") == "slots":
                    slots = record["names"]
                self.records += 1
                yield record
            self.stop = stop[0]
            if not self.stop.clean:
                if i + 1 < len(self.segments):
                    logger.warning("recording: %s at %s:%d, before the last segment",
                                   self.stop.reason, seg, self.stop.offset)
                return

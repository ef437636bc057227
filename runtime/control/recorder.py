"""Flight recorder: every control cycle appended to a file, readable after a crash.

A recording is a run of numbered segment files ``<run>-0000.r1rec``, ``<run>-0001.r1rec``, ...
in one directory; ``<run>`` is ``rec-<UTC time>-<pid>``, so runs sort by start time. Each file is a sequence of records (little-endian)::

    uint32 N | N bytes of msgpack | uint32 CRC-32 of those N bytes

The first record of every segment is a header map (``"type": "header"``, ``"format"``,
``"segment"``, and whatever the writer adds: package identity, deploy config, signal names).
The others are whatever the controller appends (``"type": "cycle"``). Floats are msgpack
float64, so values read back are bitwise those written.

Each record goes out in one ``write`` followed by ``flush`` (no fsync per record; fsync on
rotation and close), so a killed process leaves every complete record readable; the reader
stops at the first incomplete or corrupt record and says where and why. Rotation starts a new
segment when the current one would exceed ``max_bytes``; the oldest segments in the directory
beyond ``keep`` are deleted.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".r1rec"
MAX_RECORD_BYTES = 1 << 28
_SEGMENT_RE = re.compile(r"^(?P<run>.+)-(?P<seg>\d{4,})" + re.escape(SUFFIX) + "$")
_U32 = struct.Struct("<I")


def encode_record(record: dict) -> bytes:
    """One framed record: length, msgpack payload, CRC-32."""
    payload = msgpack.packb(record, use_bin_type=True)
    return b"".join((_U32.pack(len(payload)), payload, _U32.pack(zlib.crc32(payload))))


class FlightRecorder:
    """Appends records to a recording in ``directory``, rotating segments by size.

    ``header`` (a msgpack-able dict) is written at the start of every segment, with ``type``,
    ``format``, ``run`` and ``segment`` added.
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
        self.segment = -1
        self.records = 0
        self.bytes_written = 0
        self._file = None
        self._size = 0
        self._in_segment = 0
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
        data = encode_record(record)
        if self._in_segment and self._size + len(data) > self.max_bytes:
            self._open_segment(self.segment + 1)
        self._write(data)
        self._in_segment += 1
        self.records += 1
        return len(data)

    def close(self) -> None:
        """Flush, fsync and close the current segment."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> "FlightRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        self.bytes_written += len(data)

    def _open_segment(self, index: int) -> None:
        self.close()
        self.segment = index
        self._file = open(self.segment_path(index), "xb")
        self._size = 0
        self._in_segment = 0
        header = {**self._header, "type": "header", "format": FORMAT_VERSION,
                  "run": self.run_name, "segment": index}
        self._write(encode_record(header))
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
    segment, else ``"truncated"``, ``"crc mismatch"``, ``"bad length"`` or ``"bad msgpack"``."""

    file: str
    offset: int
    reason: str

    @property
    def clean(self) -> bool:
        """Whether every byte of the recording was read as complete records."""
        return self.reason == "end"


def iter_segment(path: str | Path) -> tuple[Iterator[dict], list]:
    """Records of one segment file, and a one-element list that receives its ``ReadStop``."""
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
    (``stop.clean`` when everything was read). ``header`` is the first segment's header.
    """

    def __init__(self, path: str | Path):
        self.segments = recording_segments(path)
        self.stop: ReadStop | None = None
        self.header: dict | None = None
        self.records = 0

    def __iter__(self) -> Iterator[dict]:
        for i, seg in enumerate(self.segments):
            records, stop = iter_segment(seg)
            for record in records:
                if self.header is None:
                    if record.get("type") != "header":
                        self.stop = ReadStop(str(seg), 0, "no header")
                        return
                    self.header = record
                self.records += 1
                yield record
            self.stop = stop[0]
            if not self.stop.clean:
                if i + 1 < len(self.segments):
                    logger.warning("recording: %s at %s:%d, before the last segment",
                                   self.stop.reason, seg, self.stop.offset)
                return

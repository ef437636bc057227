"""Flight recorder: framing, bit-exact floats, rotation, and reading after a crash."""
from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from runtime.control.recorder import (FlightRecorder, RecordingReader, encode_record, iter_segment,
                              recording_segments)

ROOT = Path(__file__).resolve().parents[1]


def records_of(path):
    reader = RecordingReader(path)
    return list(reader), reader


def test_framing_is_length_msgpack_crc(tmp_path):
    rec = {"type": "cycle", "seq": 7, "x": [1.5, -0.0]}
    data = encode_record(rec)
    (n,) = struct.unpack_from("<I", data)
    payload = data[4:4 + n]
    assert len(data) == n + 8
    assert struct.unpack_from("<I", data, 4 + n)[0] == zlib.crc32(payload)
    assert msgpack.unpackb(payload) == rec


def test_floats_round_trip_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308,
                float("inf"), -float("inf"), 0.1, 1 / 3, float(np.float32(0.1))]
    values = specials + rng.normal(0, 1e3, 500).tolist()
    nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_1234))[0]   # a NaN with a payload
    with FlightRecorder(tmp_path, {"who": "test"}) as fr:
        fr.append({"type": "cycle", "v": values, "nan": nan})
    records, reader = records_of(tmp_path)
    assert reader.stop.clean and records[0]["who"] == "test" and records[0]["segment"] == 0
    got = records[1]["v"]
    assert np.array(got).tobytes() == np.array(values).tobytes()
    assert struct.pack("<d", records[1]["nan"]) == struct.pack("<d", nan)


def test_rotation_by_size_keeps_every_record_in_order(tmp_path):
    with FlightRecorder(tmp_path, {"h": 1}, max_bytes=4096, keep=100) as fr:
        for i in range(500):
            fr.append({"type": "cycle", "seq": i, "x": [float(i)] * 8})
        assert fr.segment > 5
    segs = recording_segments(tmp_path)
    assert len(segs) == fr.segment + 1
    assert all(s.stat().st_size <= 4096 for s in segs)
    records, reader = records_of(tmp_path)
    assert reader.stop.clean
    assert [r["segment"] for r in records if r["type"] == "header"] == list(range(len(segs)))
    assert [r["seq"] for r in records if r["type"] == "cycle"] == list(range(500))
    # Starting from a later segment reads from there on.
    later, _ = records_of(segs[3])
    assert later[0]["type"] == "header" and later[0]["segment"] == 3


def test_keep_prunes_the_oldest_segments(tmp_path):
    with FlightRecorder(tmp_path, {}, max_bytes=4096, keep=3) as fr:
        for i in range(400):
            fr.append({"type": "cycle", "seq": i, "x": [0.5] * 16})
    files = sorted(tmp_path.glob("*.r1rec"))
    assert len(files) == 3 and fr.path in files
    assert [int(f.name[-10:-6]) for f in files] == [fr.segment - 2, fr.segment - 1, fr.segment]


def test_reader_stops_at_every_possible_cut_of_the_last_record(tmp_path):
    with FlightRecorder(tmp_path, {}, run_name="cut") as fr:
        for i in range(3):
            fr.append({"type": "cycle", "seq": i, "x": [1.0, 2.0]})
        path = fr.path
    data = path.read_bytes()
    last_start = len(data) - len(encode_record({"type": "cycle", "seq": 2, "x": [1.0, 2.0]}))
    cut = tmp_path / "cut" / "cut-0000.r1rec"
    cut.parent.mkdir()
    for end in range(last_start, len(data)):
        cut.write_bytes(data[:end])
        records, reader = records_of(cut)
        assert [r["seq"] for r in records[1:]] == [0, 1]
        expected = "end" if end == last_start else "truncated"
        assert reader.stop.reason == expected and reader.stop.offset == last_start


def test_reader_stops_at_a_corrupt_record(tmp_path):
    with FlightRecorder(tmp_path, {}, run_name="bad") as fr:
        for i in range(5):
            fr.append({"type": "cycle", "seq": i})
        path = fr.path
    data = bytearray(path.read_bytes())
    sizes = []
    records, stop = iter_segment(path)
    pos = 0
    for _ in records:
        sizes.append(pos)
        pos += struct.unpack_from("<I", data, pos)[0] + 8
    data[sizes[3] + 6] ^= 0x01                            # flip a bit in record 3's payload
    path.write_bytes(bytes(data))
    records, reader = records_of(path)
    assert [r["seq"] for r in records[1:]] == [0, 1]
    assert reader.stop.reason == "crc mismatch" and reader.stop.offset == sizes[3]
    struct.pack_into("<I", data, sizes[3], 0xFFFFFFFF)   # an absurd length
    path.write_bytes(bytes(data))
    assert records_of(path)[1].stop.reason == "bad length"


def test_missing_recording_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .r1rec recording"):
        RecordingReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such recording"):
        RecordingReader(tmp_path / "nope.r1rec")


WRITER = r"""
import sys, numpy as np
from runtime.control.recorder import FlightRecorder
fr = FlightRecorder(sys.argv[1], {"writer": "killed"}, run_name="kill", max_bytes=1 << 30)
rng = np.random.default_rng(0)
big = rng.normal(size=200_000).tolist()      # 1.8 MB records: a kill can land inside a write
i = 0
while True:
    fr.append({"type": "cycle", "seq": i, "x": big if i % 2 else [float(i)]})
    if i == 3:
        print("ready", flush=True)
    i += 1
"""


def test_sigkill_leaves_every_complete_record_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records, reader = records_of(tmp_path)
    seqs = [r["seq"] for r in records[1:]]
    assert len(seqs) >= 4 and seqs == list(range(len(seqs)))
    size = (tmp_path / "kill-0000.r1rec").stat().st_size
    assert reader.stop.reason in ("end", "truncated")
    assert (reader.stop.reason == "end") == (reader.stop.offset == size)


FULL = r"""
import json, resource, signal, sys
from runtime.control.recorder import FlightRecorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
fr = FlightRecorder(sys.argv[1], {"writer": "full"}, run_name="full", max_bytes=1 << 20)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))     # the disk fills at 4000 bytes
failed = []
for i in range(70):
    if i == 50:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))   # room again
    try:
        fr.append({"type": "cycle", "seq": i, "x": [float(i)] * 12})
    except OSError as exc:
        failed.append([i, exc.errno])
fr.close()
print(json.dumps(failed))
"""


def test_a_full_disk_loses_the_records_it_refused_and_no_others(tmp_path):
    """The kernel refuses a write part-way (here a file size limit; a full disk does the same):
    the record is cut back out of the segment, so the records after the disk has room again
    still read (a torn record would stop every reader there)."""
    out = subprocess.run([sys.executable, "-c", FULL, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout)
    first = failed[0][0]
    assert 10 < first < 50 and failed == [[i, errno.EFBIG] for i in range(first, 50)]
    records, reader = records_of(tmp_path)
    assert [r["seq"] for r in records[1:]] == list(range(first)) + list(range(50, 70))
    assert reader.stop.reason == "end"


def test_a_full_disk_at_rotation_leaves_no_gap_and_no_headerless_segment(tmp_path, monkeypatch):
    """While the disk is full every record that needs a new segment is refused: first the new
    segment cannot even be created, later its header cannot be written. Either way no segment
    number is skipped (a reader stops at a missing one) and no headerless segment stays, so the
    records written once there is room again all read."""
    import runtime.control.recorder as recorder_module

    fault = [None]                                        # "open", "header" or None: the disk's state
    full: set[int] = set()                                # files opened while the disk is full

    class FullDiskOs:                                     # the os module, with a disk full by fault[0]
        def open(self, *args, **kwargs):
            if fault[0] == "open":
                raise OSError(errno.ENOSPC, "No space left on device")
            fd = os.open(*args, **kwargs)
            if fault[0] == "header":
                full.add(fd)
            return fd

        def write(self, fd, data):
            if fd in full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(recorder_module, "os", FullDiskOs())
    refused = {"open": [], "header": []}
    with FlightRecorder(tmp_path, {}, run_name="rot", max_bytes=4096) as fr:
        for i in range(460):                              # about 70 records a segment
            fault[0] = "open" if 60 <= i < 200 else "header" if 260 <= i < 400 else None
            try:
                fr.append({"type": "cycle", "seq": i, "x": [0.5] * 4})
            except OSError:
                refused[fault[0]].append(i)
            finally:
                fault[0] = None
                full.clear()
    assert refused["open"] and refused["header"]          # both windows held a rotation
    assert refused["open"][-1] == 199 and refused["header"][-1] == 399
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"rot-{k:04d}.r1rec" for k in range(len(names))]
    reader = RecordingReader(tmp_path)
    seqs = [r["seq"] for r in reader if r.get("type") == "cycle"]
    assert reader.stop.reason == "end"
    assert seqs == [i for i in range(460) if i not in refused["open"] + refused["header"]]


def test_a_recording_in_a_newer_format_is_refused_naming_the_formats_read(tmp_path):
    path = tmp_path / "rec-x-0000.r1rec"
    path.write_bytes(encode_record({"type": "header", "format": 3, "segment": 0}))
    with pytest.raises(ValueError, match=r"rec-x-0000.r1rec: flight recording format 3; this r1edge reads "
                                         r"formats 1, 2 \(a newer r1edge wrote it"):
        list(RecordingReader(path))


def _packed(n_in: int, n_out: int, slots: list[int], layout: int = 1, extra: bytes = b"") -> bytes:
    """A packed cycle payload of ``slots`` (everything else zero), as the writer lays it out."""
    from runtime.control.recorder import packed_cycle_dtypes

    head_t, row_t = packed_cycle_dtypes(n_in, n_out)
    head, rows = np.zeros(1, head_t), np.zeros(len(slots), row_t)
    head["tag"], head["layout"], head["n"] = 0xC1, layout, len(slots)
    rows["slot"] = slots
    return head.tobytes() + rows.tobytes() + extra


def _frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))


@pytest.mark.parametrize("records, reason", [
    (["slots", "short"], "bad packed cycle: 8 bytes, shorter than the 56-byte head"),
    (["slots", "long"], "bad packed cycle: 105 bytes; the head and 1 rows of this layout "
                        "(2 inputs, 1 outputs) take 104"),
    (["packed"], "bad packed cycle: slot 0 names no stream (no slots record before it names one)"),
    (["slots", "layout9"], "bad packed cycle: layout 9 (this r1edge reads layout 1)"),
    (["format1", "slots", "packed"], "bad packed cycle: the header has no packed_cycles layout"),
], ids=["short", "long", "before-slots", "layout", "format-1"])
def test_a_bad_packed_cycle_stops_the_reading_there_and_says_why(tmp_path, records, reason):
    """A packed cycle that passed its CRC but does not fit the header's layout, names a slot no
    slots record named, or sits in a format-1 recording stops the reading at its offset."""
    header = {"type": "header", "format": 2, "segment": 0,
              "packed_cycles": {"layout": 1, "inputs": ["a", "b"], "outputs": ["y"]}}
    good = _packed(2, 1, [0])
    parts = {"slots": encode_record({"type": "slots", "names": ["main"]}), "packed": _frame(good),
             "short": _frame(good[:8]), "long": _frame(good + b"\0"), "layout9": _frame(_packed(2, 1, [0], 9))}
    if records[0] == "format1":
        header = {"type": "header", "format": 1, "segment": 0}
        records = records[1:]
    data = encode_record(header) + b"".join(parts[r] for r in records)
    path = tmp_path / "rec-x-0000.r1rec"
    path.write_bytes(data + _frame(good))                   # a good cycle after the bad one is not read
    got, reader = records_of(path)
    assert reader.stop.reason.startswith(reason) and reader.stop.offset == len(data) - len(parts[records[-1]])
    assert [r["type"] for r in got] == ["header"] + ["slots"] * records.count("slots")


def test_an_append_after_close_is_refused_and_starts_no_segment(tmp_path):
    fr = FlightRecorder(tmp_path, {}, run_name="closed")
    fr.append({"type": "cycle", "seq": 0})
    fr.close()
    with pytest.raises(ValueError, match="flight recording closed is closed"):
        fr.append({"type": "cycle", "seq": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["closed-0000.r1rec"]
    assert [r["seq"] for r in RecordingReader(tmp_path) if r.get("type") == "cycle"] == [0]

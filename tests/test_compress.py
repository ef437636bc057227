"""Compression: calibration files, pruning by REAP/frequency/random, int8 packages, streaming memory."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sdk.compress import CalibrationError, load_calibration


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, expect", [
    (['{"input_ids": [1, 2]}', '{"input_ids": [1, 2'], r":2: not valid JSON"),
    (['{"input_ids": [1, 2]}', '', '{"tokens": [3]}'], r":3: missing key 'input_ids'"),
    (['[1, 2, 3]'], r":1: expected an object"),
    (['{"input_ids": [1, 2]}', '{"input_ids": []}'], r":2: 'input_ids' must be a non-empty list"),
    (['{"input_ids": [1, "2"]}'], r":1: 'input_ids' must be a non-empty list of integers"),
    (['{"input_ids": [1, true]}'], r":1: 'input_ids' must be a non-empty list of integers"),
    (['{"input_ids": [1, 2]}', '{"input_ids": [5, 97]}'], r":2: 'input_ids': token id 97 is out of range"),
    (['{"input_ids": [-1]}'], r":1: 'input_ids': negative token id"),
    (['{"input_ids": [99999999999999999999999]}'], r":1: 'input_ids' holds an integer too large"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, expect):
    path = _write_jsonl(tmp_path / "calib.jsonl", lines)
    with pytest.raises(CalibrationError, match=expect) as err:
        load_calibration(path, vocab_size=97)
    assert str(path) in str(err.value)


def test_malformed_arrays_name_the_key(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(CalibrationError, match="integer array"):
        load_calibration(tmp_path / "f.npy")
    np.save(tmp_path / "v.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"\[N, T\]"):
        load_calibration(tmp_path / "v.npy")
    np.save(tmp_path / "obj.npy", np.array([[1], [2, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="pickled arrays are refused"):
        load_calibration(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2), dtype=np.int64), b=np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"expected key 'input_ids'.*\['a', 'b'\]"):
        load_calibration(tmp_path / "two.npz")
    np.savez(tmp_path / "ids.npz", input_ids=np.full((2, 4), 200, dtype=np.int32))
    with pytest.raises(CalibrationError, match="key 'input_ids': token id 200"):
        load_calibration(tmp_path / "ids.npz", vocab_size=97)
    frames = np.zeros((2, 5, 3), dtype=np.float32)
    frames[1, 4, 2] = np.nan
    np.savez(tmp_path / "nan.npz", frames=frames)
    with pytest.raises(CalibrationError, match=r"key 'frames': non-finite value at \[1, 4, 2\]"):
        load_calibration(tmp_path / "nan.npz")
    np.savez(tmp_path / "wide.npz", frames=np.zeros((2, 5, 4), dtype=np.float32))
    with pytest.raises(CalibrationError, match="key 'frames': frames have 4 features.*takes 3"):
        load_calibration(tmp_path / "wide.npz", n_features=3)
    np.savez(tmp_path / "int_frames.npz", frames=np.zeros((2, 5, 3), dtype=np.int64))
    with pytest.raises(CalibrationError, match="key 'frames'.*float array"):
        load_calibration(tmp_path / "int_frames.npz")
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(CalibrationError, match="unsupported calibration format '.csv'"):
        load_calibration(tmp_path / "c.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="bad.npz"):
        load_calibration(tmp_path / "bad.npz")


def test_valid_files_in_every_format(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [json.dumps({"input_ids": [1, 2, 3]}), "",
                                                json.dumps({"input_ids": [4, 5]})])
    cal = load_calibration(path, vocab_size=97)
    assert cal.mode == "lm" and [r.tolist() for r in cal.rows] == [[1, 2, 3], [4, 5]] and cal.tokens == 5
    np.save(tmp_path / "c.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    cal = load_calibration(tmp_path / "c.npy", vocab_size=97)
    assert len(cal.rows) == 3 and cal.rows[2].tolist() == [8, 9, 10, 11]
    fit, held = cal.split(0.25)
    assert len(fit.rows) == 2 and len(held.rows) == 1
    np.savez(tmp_path / "s.npz", frames=np.ones((4, 6, 3), dtype=np.float64))
    cal = load_calibration(tmp_path / "s.npz", n_features=3)
    assert cal.mode == "sensor" and cal.n_features == 3 and cal.tokens == 24

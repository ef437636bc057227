"""The sensor-stream and perception-hook examples, run end to end in shortened form.

The end-to-end tests start each example as its users would (``python -m ...``) in a
subprocess with a timeout, so every process, thread and socket they open is gone when the
test ends; sockets are on free 127.0.0.1 ports. They assert on what the examples report
(faults found, fail-safe on bad frames), never on absolute timings. The simulators and the
scoring are checked on their own against hand-computed expectations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.perception_hook import perception as P
from examples.sensor_stream import gateway as G
from examples.sensor_stream import machines as M

ROOT = Path(__file__).resolve().parent.parent


def _run_module(module: str, *args: str, timeout: float = 180.0) -> dict:
    """Run ``python -m module args --json`` from the repository root; its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ sensor stream

def _twins(kind: int, onset_s: float = 0.5, frames: int = 600):
    """A healthy machine and the same machine (same seed: same baselines, same noise) with
    fault ``kind`` from ``onset_s``; returns (healthy frames, faulty frames, faulty labels,
    the faulty fleet). Their noise stays identical until a looseness impact draws extra numbers."""
    healthy = M.Fleet([M.HEALTHY], [np.inf], seed=3)
    faulty = M.Fleet([kind], [onset_s], seed=3)
    h, f, lab = [], [], []
    for _ in range(frames):
        h.append(healthy.step()[0].copy())
        x, y = faulty.step()
        f.append(x.copy())
        lab.append(y.copy())
    return np.concatenate(h), np.concatenate(f), np.concatenate(lab), faulty


def test_fault_signatures_against_the_healthy_twin():
    col = {name: i for i, name in enumerate(M.FEATURES)}
    onset = int(0.5 * 400)
    # Imbalance: 1x rises by 1 + gain (gain 1..2) once ramped in 0.1 s; nothing before the onset.
    h, f, lab, _ = _twins(M.FAULTS.index("imbalance"))
    ratio = f[:, col["band_1x"]] / h[:, col["band_1x"]]
    np.testing.assert_allclose(ratio[:onset], 1.0)
    assert np.all((ratio[onset + 40:] >= 2.0) & (ratio[onset + 40:] <= 3.0))
    assert np.ptp(ratio[onset + 40:]) < 1e-9                          # a constant gain
    np.testing.assert_array_equal(f[:, col["band_2x"]], h[:, col["band_2x"]])
    assert lab[:onset].sum() == 0 and np.all(lab[onset:, M.FAULTS.index("imbalance")] == 1)
    assert np.all(lab.sum(axis=1) <= 1)
    # Bearing: the HF band jumps to 2-2.5x and keeps growing; kurtosis and crest rise with it.
    h, f, lab, _ = _twins(M.FAULTS.index("bearing"))
    ratio = f[:, col["band_hf"]] / h[:, col["band_hf"]]
    np.testing.assert_allclose(ratio[:onset], 1.0)
    assert 2.0 <= ratio[onset] <= 2.5 and ratio[-1] > ratio[onset]
    assert np.mean(f[onset:, col["kurtosis"]] - h[onset:, col["kurtosis"]]) > 1.0
    assert np.all(f[onset:, col["crest"]] > h[onset:, col["crest"]])
    # Looseness: 2x rises by 1 + gain (gain 1.5..3), impacts in about a third of the frames
    # raise kurtosis by 0.8..2.5 (about +0.6 on average).
    h, f, lab, fleet = _twins(M.FAULTS.index("looseness"))
    np.testing.assert_array_equal(f[:onset], h[:onset])
    first = f[onset, col["band_2x"]] / h[onset, col["band_2x"]]
    assert first == pytest.approx(1.0 + fleet.loose_gain[0]) and 2.5 <= first <= 4.0
    assert 2.0 <= np.median(f[onset:, col["band_2x"]] / h[onset:, col["band_2x"]]) <= 4.5
    assert 0.3 <= np.mean(f[onset:, col["kurtosis"]]) - np.mean(h[onset:, col["kurtosis"]]) <= 1.0


def test_fleet_is_seeded_and_checks_its_arguments():
    kind, onset = M.demo_schedule(16, 10.0, seed=5)
    assert (kind == M.HEALTHY).sum() == 4
    assert sorted(np.bincount(kind[kind != M.HEALTHY])) == [4, 4, 4]
    assert np.all((onset[kind != M.HEALTHY] >= 2.5) & (onset[kind != M.HEALTHY] <= 6.0))
    a, b = M.Fleet(kind, onset, seed=1), M.Fleet(kind, onset, seed=1)
    for _ in range(50):
        np.testing.assert_array_equal(a.step()[0], b.step()[0])
    with pytest.raises(ValueError, match="kind values"):
        M.Fleet([3], [1.0])
    with pytest.raises(ValueError, match="one length"):
        M.Fleet([0, 1], [1.0])


def test_training_data_is_the_controllers_view():
    view = M.controller_view(1000, 2, np.random.default_rng(0))
    assert np.all(np.diff(view) >= 0) and np.all(np.abs(view - (np.arange(1, 1001) * 2 - 1)) <= 1)
    frames, labels = M.dataset(8, 1.0, seq_len=32, seed=0)
    assert frames.shape == (8 * 6, 32, len(M.FEATURES)) and labels.shape == (8 * 6, 32, len(M.FAULTS))
    assert frames.dtype == np.float32 and np.isfinite(frames).all()
    assert set(np.unique(labels)) <= {0.0, 1.0}
    # Once a machine's fault starts it stays: labels never drop within a machine's rows.
    per_machine = labels.reshape(8, 6 * 32, len(M.FAULTS)).max(axis=2)
    assert np.all(np.diff(per_machine, axis=1) >= 0)


def test_gateway_scoring_by_hand():
    ms = 1_000_000
    names = ["a", "b", "c"]
    kind = np.array([M.FAULTS.index("imbalance"), M.HEALTHY, M.FAULTS.index("bearing")])
    onset = np.array([1000 * ms, -1, 1000 * ms])

    def dec(t_ms, scores, status="ok"):
        return (t_ms * ms, status, scores)

    quiet, imb, bear = [0.1, 0.0, 0.0], [0.1, 0.9, 0.0], [0.8, 0.0, 0.1]
    decisions = [
        # a: healthy decisions, a fail-safe one inside the fault (not an alarm), alarm 30 ms after onset
        [dec(900, quiet), dec(990, quiet), dec(1010, quiet, "failsafe"), dec(1030, imb), dec(1100, quiet),
         dec(1300, imb), dec(1400, imb)],
        # b: healthy machine, one alarm lasting two decisions (counts once) and on across a
        # fail-safe decision (no judgement: still the same alarm), chattering (on again 40 ms
        # after the last alarming decision: the same alarm), then a second one (200 ms after)
        [dec(900, quiet), dec(950, bear), dec(955, quiet, "failsafe"), dec(960, bear), dec(970, quiet),
         dec(1000, imb), dec(1010, quiet), dec(1200, imb)],
        # c: never alarms: missed
        [dec(900, quiet), dec(1500, quiet)],
    ]
    r = G.score(names, kind, onset, decisions, threshold=0.5, grace_ms=200)
    a, b, c = r["streams"]
    assert a["delay_ms"] == 30.0 and a["diagnosed"] == "imbalance" and a["false_alarms"] == 0
    assert a["failsafe"] == 1
    # scored: 900, 990 (healthy, no alarm: right), 1300, 1400 (faulty, alarm: right); 1030/1100 in grace
    assert a["accuracy"] == 1.0
    assert b["false_alarms"] == 2 and b["failsafe"] == 1 and b["delay_ms"] is None and b["accuracy"] == 0.4286
    assert c["delay_ms"] is None and c["diagnosed"] is None and c["accuracy"] == 0.5
    s = r["summary"]
    assert (s["faulted"], s["detected"], s["diagnosed_right"], s["false_alarms"]) == (2, 1, 1, 2)
    assert s["delay_ms"] == {"median": 30.0, "max": 30.0}


def test_sensor_stream_scores_the_same_frames_without_timing():
    """The live run's scores depend on which frames each 5 ms cycle happens to hold (a
    loaded machine shifts them), so its false alarms vary from run to run. Here the same
    fleet goes through the same deployment cycle by cycle, every second frame, with no
    network and no clock: detection, diagnosis and false alarms are the model's alone."""
    from examples.sensor_stream.run import load_config
    from sdk.service.controller import Controller

    streams, rate_hz, duration_s, seed = 16, 400.0, 5.0, 1
    names = G.stream_names(streams)
    kind, onset_s = M.demo_schedule(streams, duration_s, seed)
    fleet = M.Fleet(kind, onset_s, rate_hz=rate_hz, seed=seed)
    frame_ns = int(round(1e9 / rate_hz))
    onset_frame = np.where(kind == M.HEALTHY, -1, np.ceil(onset_s * rate_hz - 1e-9)).astype(np.int64)
    got: list[list[tuple]] = [[] for _ in names]
    # A 40 ms budget: no inference times out on a loaded machine (a timed-out or busy
    # cycle leaves its frame out of the policy's history, as a late cycle would).
    with Controller(load_config(loop={"period_ms": 50, "deadline_ms": 50}), bridges=False) as ctrl:
        for f in range(int(duration_s * rate_hz)):
            values, _ = fleet.step()
            if f % 2 == 1:                                   # the cycle holds the newest of two frames
                out = ctrl.step_many({n: dict(zip(M.FEATURES, values[i].tolist())) for i, n in enumerate(names)})
                for i, n in enumerate(names):
                    got[i].append((f * frame_ns, ctrl.status(n)["status"], [out[n][k] for k in M.FAULTS]))
    r = G.score(names, kind, np.where(onset_frame < 0, -1, onset_frame * frame_ns), got)
    s = r["summary"]
    assert (s["faulted"], s["detected"]) == (12, 12), r["streams"]
    assert s["diagnosed_right"] == 12 and s["false_alarms"] == 0, r["streams"]
    assert s["accuracy_min"] >= 0.99, r["streams"]
    assert max(x["delay_ms"] for x in r["streams"] if x["fault"]) <= 500, r["streams"]


def test_sensor_stream_detects_injected_faults():
    r = _run_module("examples.sensor_stream.run", "--duration", "5", "--seed", "1")
    s, c = r["summary"], r["controller"]
    faulted = [x for x in r["streams"] if x["fault"]]
    assert s["faulted"] == 12 and len(r["streams"]) == 16
    assert s["detected"] == 12, r["streams"]
    assert all(x["delay_ms"] <= 500 for x in faulted), faulted
    assert s["diagnosed_right"] >= 11, faulted
    # False alarms are judged on the same frames without timing (the test above): live,
    # which frames a cycle holds moves with the machine's load (0-4 per run seen here).
    assert s["accuracy_mean"] >= 0.95 and s["accuracy_min"] >= 0.8, r["streams"]
    # The frames reached the controller (the loop stops as the last frame goes out, so the
    # last tick's frames may still be on the way), and decisions came back for all 16.
    assert 0 <= r["frames_sent"] - c["frames_received"] <= 2 * 16 and not c["bad_frames"]
    assert all(x["decisions"] > 100 for x in r["streams"])


# ------------------------------------------------------------------------------ perception hook

def test_brake_reference_by_hand():
    ref = P.brake_reference([30.0, 30.0, 30.0, 10.0, 10.0], [5.0, 15.0, 30.0, -3.0, 0.0])
    # TTC 6 s: none; 2 s: halfway on the 3 s .. 1 s ramp; 1 s: full; opening or steady: none.
    np.testing.assert_allclose(ref, [0.0, 0.5, 1.0, 0.0, 0.0])


def test_perception_training_rows_skip_frames_like_the_live_stream():
    frames, targets = P.dataset(6, 10.0, seed=0, gap_rate=0.02)
    assert frames.shape[0] == 6 and frames.shape[2] == 2 and targets.shape == frames.shape[:2] + (1,)
    assert frames.shape[1] < 500                     # spans were cut out
    assert np.isfinite(frames).all() and targets.min() >= 0 and targets.max() <= 1


def test_perception_hook_runs_as_documented():
    hook = ROOT / "examples" / "perception_hook" / "hook.py"
    assert len(hook.read_text().splitlines()) < 50      # the whole user program, docstring included
    r = _run_module("examples.perception_hook.hook", "--duration", "6", "--seed", "0")
    kinds, fs = r["frames_by_kind"], r["failsafe"]
    assert r["frames"] + r["skipped_frames"] == 300
    for kind in ("lost", "dropped", "slow"):     # seed 0 has each of them in its first 6 s
        assert kinds[kind] >= 1 and fs[kind] == kinds[kind], (kind, r)
    assert r["invalid_inputs"].get("nan") == 2 * kinds["lost"]
    assert r["invalid_inputs"].get("missing") == 2 * kinds["dropped"]
    assert r["invalid_inputs"].get("stale", 0) >= 2 * kinds["slow"]
    # A frame with good detections fails safe only when inference overran its budget or the
    # frame reached the hook late (a loaded machine); both inputs of a late frame are stale.
    late_ok = r["invalid_inputs"].get("stale", 0) // 2 - kinds["slow"]
    assert fs["ok"] <= r["overruns"] + late_ok, r
    assert r["mae"] is not None and r["mae"] < 0.1


# ------------------------------------------------------------------------------ packages

def _deploy_names(example: str) -> tuple[list[str], list[str]]:
    try:
        import tomllib
    except ModuleNotFoundError:                               # Python 3.10
        import tomli as tomllib
    raw = tomllib.loads((ROOT / "examples" / example / "deploy.toml").read_text())
    return [i["name"] for i in raw["inputs"]], [o["name"] for o in raw["outputs"]]


@pytest.mark.parametrize("example, module, size_arg", [
    ("sensor_stream", "examples.sensor_stream.train", "--machines"),
    ("perception_hook", "examples.perception_hook.train", "--episodes"),
])
def test_train_scripts_write_packages_the_deployments_accept(tmp_path, example, module, size_arg):
    from sdk.tools.package import verify_package

    # The bundled package: intact, int8, with the signals its deploy.toml configures.
    inputs, outputs = _deploy_names(example)
    bundled = verify_package(ROOT / "examples" / example / "model")
    assert bundled["quantization"]["scheme"] == "w8a8-int8"
    assert sorted(bundled["io"]["inputs"]) == sorted(inputs) and bundled["io"]["outputs"] == outputs
    # The training script, shrunk to two steps on a few simulated runs, writes the same kind.
    r = _run_module(module, "--out", str(tmp_path / "pkg"), size_arg, "8", "--steps", "2")
    manifest = verify_package(tmp_path / "pkg")
    assert r["fit"]["steps"] == 2 and r["fit"]["train"] == "all"
    assert manifest["quantization"]["scheme"] == "w8a8-int8" and manifest["io"] == bundled["io"]
    assert manifest["config"] == bundled["config"]

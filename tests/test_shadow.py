"""Shadow mode: a candidate package on the live frames, never applied, its divergence reported."""
from __future__ import annotations

import numpy as np
import pytest

import sdk
from runtime.control.loop import monotonic_ns
from runtime.control.recorder import RecordingReader
from sdk.service.config import ConfigError
from sdk.service.controller import Controller
from sdk.service.replay import replay
from tests.test_controller import INPUTS, attach_adapter, frames_for, write_deploy, write_sensor_package


@pytest.fixture(scope="module")
def packages(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("shadow")
    live = write_sensor_package(root / "live", attach_adapter(sdk.load_model(tiny_checkpoint[0]), seed=3))
    candidate = write_sensor_package(root / "candidate", attach_adapter(sdk.load_model(tiny_checkpoint[0]), seed=9))
    return live, candidate


def session(ctrl, cycles=40):
    """Streams joining, invalid inputs; returns every output as float64 bytes, cycle by cycle."""
    rng = np.random.default_rng(5)
    out = []
    for t in range(cycles):
        names = ["a", "b"] + (["c"] if t >= 10 else [])
        result = ctrl.step_many(frames_for(rng, names, bad_fraction=0.1))
        if ctrl.shadow is not None:       # back-to-back steps: let the shadow finish (else it skips)
            ctrl.shadow.worker.wait(monotonic_ns() + 5_000_000_000)
        out.append({s: np.array(list(v.values()), np.float64).tobytes() for s, v in result.items()})
    return out


def deploy_with(tmp_path, live, shadow, name):
    deploy = write_deploy(tmp_path, recorder=tmp_path / f"rec-{name}", package=live)
    if shadow is not None:
        deploy.write_text(deploy.read_text() + f'[shadow]\npath = "{shadow}"\n')
    final = tmp_path / f"{name}.toml"
    deploy.rename(final)
    return final


def test_live_outputs_are_bitwise_the_same_with_a_shadow_and_its_divergence_is_reported(tmp_path, packages):
    live, candidate = packages
    with Controller.from_config(deploy_with(tmp_path, live, None, "plain"), bridges=False) as ctrl:
        plain = session(ctrl)
        assert ctrl.stats()["shadow"] is None
    with Controller.from_config(deploy_with(tmp_path, live, candidate, "cand"), bridges=False) as ctrl:
        shadowed = session(ctrl)
    stats = ctrl.stats()
    assert shadowed == plain                               # the shadow never touches the live outputs

    sh = stats["shadow"]
    assert sh["path"] == str(candidate) and sh["errors"] == 0 and sh["skipped"] == 0
    assert sh["steps"] == 40 and sh["compared"] > 60       # every frame the live model answered
    # The recording: one shadow record per cycle, with the shadow's outputs and the differences.
    reader = RecordingReader(tmp_path / "rec-cand")
    records = list(reader)
    assert reader.header["shadow"]["path"] == str(candidate)
    shadow_records = [r for r in records if r["type"] == "shadow"]
    assert [r["seq"] for r in shadow_records] == list(range(40))
    d = np.array([e["d"] for r in shadow_records for e in r["streams"] if e["d"] is not None])
    assert len(d) == sh["compared"]
    for j, name in enumerate(["valve", "heater"]):
        div = sh["divergence"][name]
        assert div["rms"] == pytest.approx(float(np.sqrt(np.mean(d[:, j] ** 2))), rel=1e-12)
        assert div["max_abs"] == float(np.abs(d[:, j]).max()) and div["rms"] > 0
    assert sh["divergence"]["valve"]["rms_frac_range"] == pytest.approx(sh["divergence"]["valve"]["rms"] / 2.0)
    # A recording with a shadow replays bit for bit like any other.
    assert replay(tmp_path / "rec-cand")["identical"]


def test_a_shadow_of_the_live_package_never_diverges(tmp_path, packages):
    live, _ = packages
    with Controller.from_config(deploy_with(tmp_path, live, live, "same"), bridges=False) as ctrl:
        session(ctrl, cycles=20)
    sh = ctrl.stats()["shadow"]
    assert sh["compared"] > 30
    assert all(d["rms"] == 0.0 and d["max_abs"] == 0.0 for d in sh["divergence"].values())


def test_a_shadow_in_the_periodic_loop(tmp_path, packages):
    live, candidate = packages
    deploy = deploy_with(tmp_path, live, candidate, "loop")
    deploy.write_text(deploy.read_text().replace("period_ms = 1000.0", "period_ms = 10.0")
                      .replace("infer_budget_ms = 900.0", "infer_budget_ms = 8.0"))
    with Controller.from_config(deploy, bridges=False) as ctrl:
        def source(seq, t_ns):
            if seq == 59:
                ctrl.stop()
            return {"level": 1.0, "temp": 50.0, "flow": 0.3}
        stats = ctrl.run(source=source)
    sh = stats["shadow"]
    assert stats["cycles"] == 60 and sh["errors"] == 0
    assert sh["steps"] + sh["skipped"] >= 59 and sh["steps"] > 30 and sh["divergence"]["valve"]["rms"] > 0


def test_a_shadow_with_other_signals_is_refused(tmp_path, packages, tiny_checkpoint):
    live, _ = packages
    model = attach_adapter(sdk.load_model(tiny_checkpoint[0]))
    model.adapter.input_names = list(reversed(INPUTS))
    other = write_sensor_package(tmp_path / "other", model)
    with pytest.raises(ConfigError, match="shadow.path: .* a shadow needs the same signals in the same order"):
        Controller.from_config(deploy_with(tmp_path, live, other, "bad"), bridges=False)

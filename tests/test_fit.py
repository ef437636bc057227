"""sdk.tools.fit: sensor adapters fitted on recorded frames, written as packages the engine runs.

Proves: fitting learns a mapping that needs the frame history (held-out error far below
predicting the mean), with the adapter alone and with the whole model; the package
round-trips through load_model with the I/O signature, and the int8 stream engine over it
matches the float forward_sensor with the same window; fitting is bitwise reproducible;
bad data is refused naming the key; the CLI writes a package from an .npz.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdk
from runtime.cpu.engine import Engine
from sdk import cli
from sdk.tools.fit import DataError, attach_adapter, check_data, fit, load_data
from sdk.tools.loading import describe
from sdk.tools.package import verify_package

INPUTS, OUTPUTS = ["u", "v", "w"], ["y", "z"]
WINDOW = 8


def make_data(n: int = 24, t: int = 40, seed: int = 0):
    """Frames in engineering units and targets that need the current frame and the window's
    history: y = 2u - v + 10, z = the mean of w over the last 4 frames (a filter)."""
    rng = np.random.default_rng(seed)
    frames = np.stack([rng.normal(5.0, 2.0, (n, t)), rng.normal(-1.0, 0.5, (n, t)),
                       rng.normal(0.0, 1.0, (n, t))], axis=-1).astype(np.float32)
    y = 2 * frames[..., 0] - frames[..., 1] + 10.0
    w = frames[..., 2]
    z = np.stack([w[:, max(0, k - 3):k + 1].mean(1) for k in range(t)], axis=1)
    return frames, np.stack([y, z], axis=-1).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one torch thread; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def repin_torch_thread(one_torch_thread):
    """Numba's OpenMP start-up (the engine) changes the thread count torch shares with it."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fitted(tiny_checkpoint, tmp_path_factory):
    """(package path, report) of an adapter-only fit of the tiny checkpoint."""
    frames, targets = make_data()
    out = tmp_path_factory.mktemp("fit") / "pkg"
    report = fit(tiny_checkpoint[0], frames, targets, inputs=INPUTS, outputs=OUTPUTS, out=out,
                 train="adapter", window=WINDOW, steps=100, lr=3e-2, batch=8, seed=0, held_out=0.25,
                 eval_every=100, progress=False)           # measured at the end only: the last state is kept
    return out, report


def test_adapter_fit_learns_a_mapping_well_below_the_mean_baseline(fitted):
    _, report = fitted
    held = report["held_out"]
    assert report["rows"] == {"train": 18, "held_out": 6}
    assert held["baseline_mse"] > 0.5                       # predicting the mean (normalised units)
    # the frozen random backbone limits an adapter-only fit; it still beats the mean 3x
    assert held["mse"] < 0.33 * held["baseline_mse"], held
    assert report["loss"]["last"] < 0.4 * report["loss"]["first"]


def test_whole_model_fit_learns_too_and_keeps_routers_balanced(tiny_checkpoint, tmp_path):
    frames, targets = make_data()
    report = fit(tiny_checkpoint[0], frames, targets, inputs=INPUTS, outputs=OUTPUTS, out=tmp_path / "all",
                 train="all", window=WINDOW, steps=60, lr=1e-2, batch=8, seed=1, progress=False)
    assert report["train"] == "all" and report["balance_rate"] > 0
    assert report["held_out"]["mse"] < 0.12 * report["held_out"]["baseline_mse"], report["held_out"]
    model = sdk.load_model(tmp_path / "all")
    ref = sdk.load_model(tiny_checkpoint[0])
    # the backbone moved (whole-model fit) and the routing bias was updated by balancing
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, ref.model.layers[0].self_attn.o_proj.weight)
    assert not torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias,
                           ref.model.layers[1].mlp.gate.e_score_correction_bias)


def test_attach_adapter_takes_normalisation_from_the_data(tiny_checkpoint):
    frames, targets = make_data(n=5, t=20)
    frames[..., 1] = 3.0                                   # a constant column: std 1, not 0
    model = sdk.load_model(tiny_checkpoint[0])
    a = attach_adapter(model, INPUTS, OUTPUTS, frames=frames, targets=targets, seed=2)
    assert model.adapter is a and a.signature() == {"inputs": INPUTS, "outputs": OUTPUTS}
    flat = frames.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(a.in_mean.numpy(), flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(a.in_std.numpy(), [flat[:, 0].std(), 1.0, flat[:, 2].std()], rtol=1e-6)
    np.testing.assert_allclose(a.out_std.numpy(), targets.reshape(-1, 2).astype(np.float64).std(0), rtol=1e-6)
    b = attach_adapter(model, INPUTS, OUTPUTS, frames=frames, targets=targets, seed=2)
    assert model.adapter is b and torch.equal(a.in_proj.weight, b.in_proj.weight)   # seeded, replaced
    with pytest.raises(DataError, match="3 columns for 2 inputs"):
        attach_adapter(model, INPUTS[:2], OUTPUTS, frames=frames)


def test_package_round_trips_and_engine_matches_forward_sensor(fitted, tiny_checkpoint):
    path, report = fitted
    manifest = verify_package(path)
    assert manifest["io"] == {"inputs": INPUTS, "outputs": OUTPUTS}
    assert manifest["quantization"]["scheme"] == "none" and manifest["fit"]["steps"] == report["steps"]
    assert describe(path)["io"] == {"inputs": INPUTS, "outputs": OUTPUTS}
    model = sdk.load_model(path)
    ref = sdk.load_model(tiny_checkpoint[0])
    # adapter-only: the backbone is the checkpoint's, bit for bit
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    frames, targets = make_data(n=2, t=30, seed=9)
    with torch.no_grad():
        ref_out = model.forward_sensor(torch.from_numpy(frames), window=WINDOW).numpy()
    engine = Engine(model, capacity=2, window=WINDOW)
    got = np.stack([engine.step_sensor(np.array([0, 1]), frames[:, k]).copy() for k in range(frames.shape[1])], 1)
    span = targets.reshape(-1, 2).std(0)
    err = np.abs(got - ref_out).max(axis=(0, 1))
    assert (err < 0.05 * span).all(), (err, span)          # int8 W8A8 rounding only
    # and the fitted outputs are close to the targets in engineering units
    assert np.sqrt(((got - targets) ** 2).mean(axis=(0, 1))).max() < 0.35 * span.max()


def test_fitting_is_bitwise_reproducible(tiny_checkpoint, tmp_path):
    frames, targets = make_data(n=6, t=24)
    kw = dict(inputs=INPUTS, outputs=OUTPUTS, train="all", window=WINDOW, steps=4, batch=4, seed=5,
              progress=False)
    fit(tiny_checkpoint[0], frames, targets, out=tmp_path / "a", **kw)
    fit(tiny_checkpoint[0], frames, targets, out=tmp_path / "b", **kw)
    files_a, files_b = verify_package(tmp_path / "a")["files"], verify_package(tmp_path / "b")["files"]
    assert files_a == files_b
    fit(tiny_checkpoint[0], frames, targets, out=tmp_path / "c", **{**kw, "seed": 6})
    assert verify_package(tmp_path / "c")["files"] != files_a


def test_bad_data_is_refused_naming_the_key(tiny_checkpoint, tmp_path):
    frames, targets = make_data(n=4, t=10)
    with pytest.raises(DataError, match="'targets'.*does not match 'frames'"):
        check_data(frames, targets[:, :9])
    bad = frames.copy()
    bad[2, 5, 1] = np.nan
    with pytest.raises(DataError, match=r"'frames' has a non-finite value at \[2, 5, 1\]"):
        check_data(bad, targets)
    bad_t = targets.copy()
    bad_t[0, 0, 0] = np.inf
    with pytest.raises(DataError, match="'targets' has a non-finite"):
        check_data(frames, bad_t)
    with pytest.raises(DataError, match="'frames' has 3 columns, expected 4"):
        check_data(frames, targets, n_inputs=4)
    with pytest.raises(DataError, match="'frames' must be a non-empty"):
        check_data(frames[0], targets)
    with pytest.raises(DataError, match="'frames'.*at least 2"):
        fit(tiny_checkpoint[0], frames[:1], targets[:1], inputs=INPUTS, outputs=OUTPUTS, out=tmp_path / "x",
            steps=1, progress=False)
    np.savez(tmp_path / "no_targets.npz", frames=frames)
    with pytest.raises(DataError, match="no_targets.npz: missing key 'targets'"):
        load_data(tmp_path / "no_targets.npz")
    np.savez(tmp_path / "objects.npz", frames=np.array([{"a": 1}], dtype=object), targets=targets)
    with pytest.raises(DataError, match="objects.npz.*pickle"):
        load_data(tmp_path / "objects.npz")
    assert not (tmp_path / "x").exists()


def test_fit_refuses_a_quantized_package(tiny_checkpoint, fitted, tmp_path):
    from sdk.tools.package import write_package

    model = sdk.load_model(fitted[0])
    manifest = {**verify_package(fitted[0]), "quantization": {"scheme": "w8a8-int8"}}
    manifest.pop("files")
    write_package(tmp_path / "q", manifest, model.state_dict())
    frames, targets = make_data(n=4, t=10)
    with pytest.raises(ValueError, match="quantized"):
        fit(tmp_path / "q", frames, targets, inputs=INPUTS, outputs=OUTPUTS, out=tmp_path / "y", steps=1,
            progress=False)


def test_fit_refuses_a_taken_out_before_it_trains(tiny_checkpoint, fitted, monkeypatch):
    import sdk.tools.fit as fit_module

    def no_training(*args, **kwargs):
        raise AssertionError("fit trained before refusing a taken --out")
    monkeypatch.setattr(fit_module, "fit_model", no_training)
    frames, targets = make_data(n=4, t=10)
    with pytest.raises(FileExistsError, match="already exists .choose another --out, or pass --overwrite"):
        fit(tiny_checkpoint[0], frames, targets, inputs=INPUTS, outputs=OUTPUTS, out=fitted[0], steps=1,
            progress=False)


def test_cli_fit_writes_a_package_from_an_npz(tiny_checkpoint, tmp_path, capsys):
    frames, targets = make_data(n=6, t=24)
    data = tmp_path / "data.npz"
    np.savez(data, frames=frames, targets=targets, feature_names=np.array(INPUTS), output_names=np.array(OUTPUTS))
    rc = cli.main(["fit", str(tiny_checkpoint[0]), "--data", str(data), "--out", str(tmp_path / "pkg"),
                   "--steps", "3", "--window", "8", "--batch", "4", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["package"] == str(tmp_path / "pkg") and report["steps"] == 3
    assert verify_package(tmp_path / "pkg")["io"] == {"inputs": INPUTS, "outputs": OUTPUTS}
    np.savez(tmp_path / "unnamed.npz", frames=frames, targets=targets)
    rc = cli.main(["fit", str(tiny_checkpoint[0]), "--data", str(tmp_path / "unnamed.npz"),
                   "--out", str(tmp_path / "pkg2"), "--steps", "1"])
    assert rc == 2
    assert "pass --inputs" in capsys.readouterr().err


def test_presets_are_what_the_help_says(capsys):
    from sdk.tools.fit import DATA_FORMAT, PRESETS, new_model

    for name, preset in PRESETS.items():
        model, window = new_model(name)
        attach_adapter(model, [f"in{i}" for i in range(6)], ["a", "b"])
        c = model.config
        total = sum(p.numel() for p in model.parameters())
        expert = 3 * c.hidden_size * c.moe_intermediate_size
        active = total - (c.n_routed_experts - c.num_experts_per_tok) * expert * c.n_moe_layers
        assert (total, active, window) == (preset["params"], preset["active"], preset["window"]), name
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and DATA_FORMAT.splitlines()[1] in out
    with pytest.raises(ValueError, match="not a preset"):
        new_model("huge")


def test_init_from_a_config_json(tmp_path):
    from sdk.tools.fit import new_model

    small, _ = new_model("small", seed=4)
    (tmp_path / "config.json").write_text(json.dumps(small.config.to_dict()))
    model, window = new_model(tmp_path / "config.json", seed=4)
    assert window is None and model.config.to_dict() == small.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), small.state_dict().values()))


def test_a_stopped_fit_resumes_to_the_same_bits(tmp_path):
    """SIGINT stops a fit at the end of a step with a checkpoint; resuming it ends bitwise
    where the uninterrupted fit ends, best state and held-out history included."""
    import signal

    from sdk.tools.fit import fit_model, new_model

    frames, targets = make_data(n=10, t=24)

    def run(ckpt, steps=12, callback=None, resume=False):
        model, _ = new_model("small", seed=1)
        attach_adapter(model, INPUTS, OUTPUTS, frames=frames[:8], targets=targets[:8], seed=1)
        report = fit_model(model, frames, targets, train="all", window=WINDOW, steps=steps, batch=4, seed=1,
                           eval_every=4, keep_best=True, checkpoint=ckpt, resume=resume, callback=callback,
                           progress=False)
        return model.state_dict(), report

    ref, ref_report = run(tmp_path / "a")
    assert not (tmp_path / "a").exists()                  # a finished fit leaves no checkpoint
    assert ref_report["best"]["step"] in (4, 8, 12) and [h["step"] for h in ref_report["history"]] == [4, 8, 12]

    def ctrl_c_at_4(step, model):
        if step == 4:
            signal.raise_signal(signal.SIGINT)
        return False
    _, stopped = run(tmp_path / "b", callback=ctrl_c_at_4)
    assert stopped["stopped_at"] == 4 and (tmp_path / "b" / "state.json").is_file()
    with pytest.raises(ValueError, match="resume it"):
        run(tmp_path / "b")
    with pytest.raises(ValueError, match="different fit .*steps"):
        run(tmp_path / "b", steps=13, resume=True)
    state, report = run(tmp_path / "b", resume=True)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert report["best"] == ref_report["best"] and report["history"] == ref_report["history"]
    assert report["loss"] == ref_report["loss"] and not (tmp_path / "b").exists()

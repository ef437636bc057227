"""Judge a sensor-mode package in the plant's terms: open loop over recorded rows.

Each row of a fitting ``.npz`` (``sdk.tools.fit.DATA_FORMAT``) is run from its first frame, as a
controller starts with an empty history. An int8 package runs through the stream engine, one
frame per step with the deployment's sliding window: bit for bit what the controller
computes. An unquantized package runs through the float model with the same window (what
``r1edge fit`` measured), unless ``engine="stream"`` asks for what deploying it would give
(the engine quantizes it to W8A8 when it is built).

Per output (:func:`output_errors`): ``rms`` and ``max_abs`` of the error in the output's own
units, and both as a fraction of the output's range (``rms_frac_range``, ``max_frac_range``).
The range is the deployment's ``[min, max]`` when a deployment TOML is given, else the span of
the recorded targets. Against the targets, ``baseline_rms`` is the error of always answering
the fit data's mean (the adapter's ``out_mean``): a policy is worth something only well below
it. With ``against``, the same measures compare the package's outputs with another package's
on the same frames, e.g. an int8 package with the float one it was compressed from.
``r1edge compress`` reports its sensor-mode quality with the same measures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdk.tools.quality import output_errors

ENGINES = ("auto", "stream", "float")


def run_package(path: str | Path, frames: np.ndarray, window: int, engine: str = "auto",
                model=None) -> tuple[np.ndarray, str]:
    """Outputs float64 [N, T, O] of a sensor-mode package over ``frames`` [N, T, F], every row
    from its first frame; returns (outputs, what ran them). ``model``: the package, loaded."""
    import torch

    from runtime.cpu.engine import Engine
    from sdk.tools.loading import load_model
    from sdk.tools.package import is_package, read_manifest

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    model = model if model is not None else load_model(path)
    if getattr(model, "adapter", None) is None:
        raise ValueError(f"{path}: the model has no I/O adapter; eval needs a sensor-mode package")
    scheme = read_manifest(path)["quantization"]["scheme"] if is_package(path) else "none"
    if engine == "float" and scheme != "none":
        raise ValueError(f"{path}: package is quantized ({scheme}); it runs on the stream engine only")
    n, t, f = frames.shape
    if f != len(model.adapter.input_names):
        raise ValueError(f"{path}: the package takes {len(model.adapter.input_names)} inputs "
                         f"({', '.join(model.adapter.input_names)}), the data has {f} columns")
    if engine == "float" or (engine == "auto" and scheme == "none"):
        out = np.empty((n, t, len(model.adapter.output_names)), np.float64)
        with torch.no_grad():
            for i in range(0, n, 16):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + 16], np.float32))
                out[i:i + 16] = model.forward_sensor(x, window=window).double().numpy()
        return out, "float reference model (sliding window)"
    eng = Engine(model, capacity=n, window=window)
    slots = np.arange(n, dtype=np.int64)
    out = np.empty((n, t, len(eng.output_names)), np.float64)
    feats = np.ascontiguousarray(frames, np.float32)
    for k in range(t):
        out[:, k] = eng.step_sensor(slots, feats[:, k])
    return out, "stream engine (W8A8 int8)" if scheme != "none" else "stream engine (quantized to W8A8 on load)"


def package_window(path: str | Path) -> int | None:
    """The window a package was fitted with (its manifest's ``fit`` report), if it says."""
    from sdk.tools.package import is_package, read_manifest

    if not is_package(path):
        return None
    fit = read_manifest(path).get("fit") or {}
    return fit.get("window")


def evaluate(package: str | Path, data: str | Path, *, against: str | Path | None = None,
             window: int | None = None, config: str | Path | None = None, engine: str = "auto",
             held_out: float = 0.0) -> dict[str, Any]:
    """Open-loop report of ``package`` over the rows of ``data`` (see the module docstring).

    ``window``: default the deployment's (``config``), else the one the package was fitted
    with, else 32. ``config``: a deployment TOML whose ``[[outputs]]`` ranges are used.
    ``held_out``: only the last fraction of the rows (as ``fit`` splits them); 0 = all rows.
    """
    from sdk.service.config import DeployConfig
    from sdk.tools.fit import load_data, split_rows
    from sdk.tools.loading import load_model

    d = load_data(data)
    frames, targets = d["frames"], d["targets"]
    if held_out:
        _, rows = split_rows(len(frames), held_out)
        frames, targets = frames[rows], targets[rows]
    model = load_model(package)
    adapter = getattr(model, "adapter", None)
    if adapter is None:
        raise ValueError(f"{package}: the model has no I/O adapter; eval needs a sensor-mode package")
    names = list(adapter.output_names)
    for label, given, expected in (("feature_names", d["inputs"], adapter.input_names),
                                   ("output_names", d["outputs"], names)):
        if given is not None and list(given) != list(expected):
            raise ValueError(f"{data}: {label} {list(given)} do not match the package's {list(expected)}")
    if targets.shape[2] != len(names):
        raise ValueError(f"{data}: key 'targets' has {targets.shape[2]} columns, the package {len(names)} outputs")
    window_source = "given"
    deploy = DeployConfig.load(config, check_sources=False) if config is not None else None
    if window is None and deploy is not None:
        window, window_source = deploy.model.window, f"{config} [model] window"
    if window is None:
        window, window_source = package_window(package), "the package's fit"
    if window is None:
        window, window_source = 32, "default"
    if deploy is not None:
        limits = {o.name: (o.min, o.max) for o in deploy.outputs}
        missing = [n for n in names if n not in limits]
        if missing:
            raise ValueError(f"{config}: outputs {missing} not configured")
        lo = np.array([limits[n][0] for n in names])
        hi = np.array([limits[n][1] for n in names])
        range_source = f"{config} [[outputs]] min/max"
    else:
        flat = targets.reshape(-1, len(names)).astype(np.float64)
        lo, hi = flat.min(0), flat.max(0)
        range_source = "span of the recorded targets"
    pred, how = run_package(package, frames, window, engine, model=model)
    vs_targets = output_errors(pred, targets, names, lo, hi)
    mean = adapter.out_mean.detach().double().numpy()
    base = np.sqrt(np.mean((targets.reshape(-1, len(names)) - mean) ** 2, axis=0))
    for j, name in enumerate(names):
        vs_targets[name].update(range=[float(lo[j]), float(hi[j])], baseline_rms=float(base[j]))
    report: dict[str, Any] = {
        "package": str(package), "engine": how, "data": str(data), "rows": int(frames.shape[0]),
        "frames": int(frames.shape[0] * frames.shape[1]), "window": int(window), "window_source": window_source,
        "range_source": range_source, "outputs": vs_targets, "against": None}
    if against is not None:
        other, other_how = run_package(against, frames, window, engine="auto")
        report["against"] = {"package": str(against), "engine": other_how,
                             "outputs": output_errors(pred, other, names, lo, hi)}
    return report


def render_eval(report: dict[str, Any]) -> None:
    """Print an eval report for people."""
    print(f"{report['package']}: {report['engine']}, window {report['window']} ({report['window_source']}), "
          f"{report['rows']} rows / {report['frames']} frames of {report['data']}, each run from its first frame")
    print(f"range: {report['range_source']}")
    print(f"  {'vs targets':<16}{'rms':>12}{'% range':>10}{'max':>12}{'% range':>10}{'mean-only rms':>15}")
    for name, e in report["outputs"].items():
        print(f"  {name:<16}{e['rms']:12.5g}{100 * e['rms_frac_range']:9.2f}%{e['max_abs']:12.5g}"
              f"{100 * e['max_frac_range']:9.2f}%{e['baseline_rms']:15.5g}")
    if report["against"]:
        a = report["against"]
        print(f"  vs {a['package']} ({a['engine']}):")
        for name, e in a["outputs"].items():
            print(f"  {name:<16}{e['rms']:12.5g}{100 * e['rms_frac_range']:9.2f}%{e['max_abs']:12.5g}"
                  f"{100 * e['max_frac_range']:9.2f}%")

"""How close a model's outputs are to a reference's: the per-output error measures that
``r1edge eval`` reports and that compression's quality report uses."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def output_errors(pred: np.ndarray, ref: np.ndarray, names: Sequence[str], lo: np.ndarray,
                  hi: np.ndarray) -> dict[str, dict[str, float]]:
    """Per output: RMS and largest absolute difference of ``pred`` from ``ref`` (any shape
    ending in [O]), in the output's units and as a fraction of its range ``hi - lo``."""
    err = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)).reshape(-1, len(names))
    span = np.maximum(np.asarray(hi, np.float64) - np.asarray(lo, np.float64), 1e-12)
    rms = np.sqrt(np.mean(err ** 2, axis=0))
    worst = np.max(np.abs(err), axis=0)
    return {name: {"rms": float(rms[j]), "rms_frac_range": float(rms[j] / span[j]),
                   "max_abs": float(worst[j]), "max_frac_range": float(worst[j] / span[j])}
            for j, name in enumerate(names)}


def sensor_quality(ref: list, cmp: list, norm_ref, norm_cmp, adapter) -> dict[str, Any]:
    """The compressed model's outputs against the uncompressed one's on the held-out rows, per
    output in the measures of ``r1edge eval`` (:func:`output_errors`; range: the span of
    the uncompressed outputs), and the output MSE (raw and normalised by each output's variance)."""
    import torch

    n_out = len(adapter.output_names)
    with torch.no_grad():
        r = torch.cat([adapter.decode(norm_ref(x)).reshape(-1, n_out) for x in ref]).double()
        c = torch.cat([adapter.decode(norm_cmp(x)).reshape(-1, n_out) for x in cmp]).double()
    err = c - r
    var = r.var(0, unbiased=False).clamp(min=1e-24)
    return {"mode": "sensor", "frames": int(r.shape[0]),
            "outputs": output_errors(c.numpy(), r.numpy(), adapter.output_names, r.amin(0).numpy(), r.amax(0).numpy()),
            "range": "span of the uncompressed model's outputs on the held-out rows",
            "output_mse": float(err.pow(2).mean()),
            "output_nmse": float((err.pow(2).mean(0) / var).mean()),
            "per_output_mse": {name: float(v) for name, v in zip(adapter.output_names, err.pow(2).mean(0))}}



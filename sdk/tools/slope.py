"""What the neighbouring keep ratios cost: the slope ``r1edge compress`` reports beside a package.

After writing a package, ``r1edge compress`` calls :func:`keep_slope`: the source is compressed
again with half and with twice the kept experts (same calibration file, method, quantization
and held-out rows), and for all three the quality report's figures are given: on the held-out
rows of the calibration data, the loss (LM) of the package and of the unpruned float model and
their greedy agreement, or (sensor) the output error in fractions of each output's range. A user
sees how steep the cost is around the keep count they chose before deploying it.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def neighbour_keeps(n_routed: int, top_k: int, n_keep: int) -> list[int]:
    """The kept-expert counts beside ``n_keep``: half and twice it, within top-k..all (those
    that differ from ``n_keep``), ascending."""
    out = {max(top_k, n_keep // 2), min(n_routed, n_keep * 2)} - {n_keep}
    return sorted(out)


def quality_point(manifest: dict[str, Any]) -> dict[str, Any]:
    """One point of the slope from a compressed package's manifest: kept experts, ratio, and
    the quality report's figures (LM: the unpruned float model's loss and the package's, and
    greedy agreement; sensor: the mean over outputs of the RMS error in fractions of range)."""
    cfg, ex, q = manifest["config"], manifest["experts"], manifest["quality"]
    n = cfg["n_routed_experts"]
    point = {"keep_experts": n, "keep_ratio": n / ex["original_n_routed_experts"],
             "quant": "int8" if manifest["quantization"]["scheme"] != "none" else "none"}
    if q["mode"] == "lm":
        point.update(loss_unpruned_float=q["nll_original"], loss=q["nll_compressed"],
                     agreement=q["greedy_agreement"])
    else:
        outs = q["outputs"].values()
        point.update(rms_frac_range=float(np.mean([o["rms_frac_range"] for o in outs])),
                     max_frac_range=float(max(o["max_frac_range"] for o in outs)))
    return point


def keep_slope(src: str | Path, calib: str | Path, manifest: dict[str, Any], **compress_args) -> list[dict[str, Any]]:
    """The quality of ``src`` compressed like ``manifest``'s package (same calibration, method,
    quantization and held-out rows: ``compress_args`` as given to ``compress``) at the
    neighbouring keep counts (:func:`neighbour_keeps`), and at the chosen one from ``manifest``;
    ascending in kept experts. Each neighbour is a full compression into a temporary directory."""
    from sdk.tools.compress import compress

    n_keep = manifest["config"]["n_routed_experts"]
    n_routed = manifest["experts"]["original_n_routed_experts"]
    top_k = manifest["config"]["num_experts_per_tok"]
    points = [dict(quality_point(manifest), chosen=True)]
    args = {k: v for k, v in compress_args.items() if k not in ("keep_experts", "keep_ratio", "overwrite")}
    args.setdefault("progress", False)
    for k in neighbour_keeps(n_routed, top_k, n_keep):
        with tempfile.TemporaryDirectory() as tmp:
            log.info("keep slope: compressing %s with %d experts per layer", src, k)
            m = compress(src, Path(tmp) / "pkg", calib=calib, keep_experts=k, **args)
        points.append(dict(quality_point(m), chosen=False))
    return sorted(points, key=lambda p: p["keep_experts"])


def render_slope(points: Sequence[dict[str, Any]], out=None) -> None:
    """Print the slope: one line per keep count, the chosen one marked."""
    import sys
    w = (out or sys.stdout).write
    if not points:
        return
    lm = "loss" in points[0]
    w("What the neighbouring keep ratios cost (same calibration, held-out rows; against the unpruned "
      "float model):\n")
    for p in points:
        mark = "  <- this package" if p.get("chosen") else ""
        if lm and p["loss"] is None:
            w(f"  keep {p['keep_experts']:4d}: no next-token targets in the held-out rows{mark}\n")
        elif lm:
            base = p["loss_unpruned_float"]
            delta = p["loss"] - base
            w(f"  keep {p['keep_experts']:4d} ({100 * p['keep_ratio']:5.1f}%) {p['quant']}: loss "
              f"{p['loss']:.4f} nats/token ({delta:+.4f} vs {base:.4f} unpruned float), greedy agreement "
              f"{p['agreement']:.3f}{mark}\n")
        else:
            w(f"  keep {p['keep_experts']:4d} ({100 * p['keep_ratio']:5.1f}%) {p['quant']}: output RMS error "
              f"{100 * p['rms_frac_range']:.2f}% of range (max {100 * p['max_frac_range']:.2f}%){mark}\n")

"""Train the perception hook's brake-advisory policy and write its int8 package.

A tiny DeepSeek-V3-architecture MoE (hidden 64, 3 layers, 8 routed experts, top-2) is
initialised from a seed, given an I/O adapter from (distance, closing speed) to ``brake``,
and fitted (``sdk.tools.fit``, the whole model) to reproduce the time-to-collision rule
(``perception.brake_reference`` of the true gap and closing speed) from noisy 50 Hz
detections with frames missing here and there, as the controller sees them
(``perception.dataset``). The float package is then compressed (``sdk.compress``) to W8A8
int8, all experts kept, calibrated on held-out rows.

``python -m examples.perception_hook.train`` rewrites ``examples/perception_hook/model``
(a few minutes on two cores); ``--steps`` / ``--episodes`` make a quick smaller one.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

WINDOW = 16             # frames of history (320 ms at 50 Hz)


def build(out: Path, *, episodes: int = 512, seconds: float = 60.0, steps: int = 3000, batch: int = 16,
          lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Simulate, fit, compress; writes the int8 package to ``out`` and returns the reports."""
    from sdk.tools.fit import SMALL_POLICY_CONFIG, split_rows, train_policy_package

    from .perception import INPUTS, OUTPUTS, dataset

    frames, targets = dataset(episodes, seconds, seed=seed)
    logging.getLogger(__name__).info("training data: %d rows of %d frames", *frames.shape[:2])
    _, held = split_rows(len(frames), 0.2)
    n = frames.shape[1] // WINDOW * WINDOW
    crops = frames[held, :n].reshape(-1, WINDOW, frames.shape[2])
    calib = crops[np.random.default_rng(seed).permutation(len(crops))[:512]]
    return train_policy_package(SMALL_POLICY_CONFIG, frames, targets, inputs=INPUTS, outputs=OUTPUTS, out=out,
                                calib_frames=calib, window=WINDOW, steps=steps, batch=batch, lr=lr, seed=seed,
                                progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Command line: train and write the package; prints the fit and compression figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "model")
    p.add_argument("--episodes", type=int, default=512, help="simulated drives (60 s each)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = p.parse_args(argv)
    from sdk.tools.fit import render_policy_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build(args.out, episodes=args.episodes, steps=args.steps, seed=args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        render_policy_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

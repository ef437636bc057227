"""Train the sensor-stream fault detector and write its int8 package.

A tiny DeepSeek-V3-architecture MoE (hidden 64, 3 layers, 8 routed experts, top-2) is
initialised from a seed, given an I/O adapter from the vibration features to one score per
fault kind, and fitted (``sdk.tools.fit``, the whole model) on simulated machines as the
controller sees them: one frame per 5 ms cycle with the bridge's keep-the-newest jitter
(``machines.dataset``). Targets are 1 for the machine's fault kind from its onset on and 0
otherwise. The float package is then compressed (``sdk.compress``) to W8A8 int8, all
experts kept, calibrated on held-out sequences.

``python -m examples.sensor_stream.train`` rewrites ``examples/sensor_stream/model``
(about five minutes on two cores); ``--steps`` / ``--machines`` make a quick smaller one.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent

WINDOW = 32             # controller cycles of history (160 ms at 5 ms)
SENSOR_RATE_HZ = 400.0
FRAMES_PER_CYCLE = 2    # 400 Hz frames, 200 Hz controller


def build(out: Path, *, machines: int = 1024, duration_s: float = 4.0, steps: int = 3000, batch: int = 16,
          lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Simulate, fit, compress; writes the int8 package to ``out`` and returns both reports."""
    from sdk.tools.fit import SMALL_POLICY_CONFIG, split_rows, train_policy_package

    from .machines import FAULTS, FEATURES, dataset

    frames, labels = dataset(machines, duration_s, rate_hz=SENSOR_RATE_HZ, frames_per_cycle=FRAMES_PER_CYCLE,
                             seq_len=3 * WINDOW, seed=seed)
    logging.getLogger(__name__).info("training data: %d sequences of %d cycles", *frames.shape[:2])
    _, held = split_rows(len(frames), 0.2)
    return train_policy_package(SMALL_POLICY_CONFIG, frames, labels, inputs=FEATURES, outputs=FAULTS, out=out,
                                calib_frames=frames[held[:256], :WINDOW], window=WINDOW, steps=steps,
                                batch=batch, lr=lr, seed=seed, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Command line: train and write the package; prints the fit and compression figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "model")
    p.add_argument("--machines", type=int, default=1024, help="simulated machines (4 s each)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = p.parse_args(argv)
    from sdk.tools.fit import render_policy_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build(args.out, machines=args.machines, steps=args.steps, seed=args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        render_policy_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

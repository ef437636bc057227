"""r1edge's brake advisory inside someone else's 50 Hz perception loop.

``python -m examples.perception_hook.hook [--duration 30] [--seed 0] [--json]``. The
pipeline (``perception.py``, not ours) calls ``on_frame`` for every processed frame; we step
the controller with the detections and their capture time and hand back the advisory and
its status. A lost object (NaN), dropped detections (None), a frame that arrives too late
(stale) or inference that overruns its budget give the fail-safe advisory, status "failsafe".
"""
import argparse
import json
from pathlib import Path

from sdk import Controller

from .perception import PerceptionPipeline


def main(argv=None) -> dict:
    """Run the pipeline with the hook for ``--duration`` seconds; print and return what happened."""
    p = argparse.ArgumentParser(description="r1edge brake advisory in a 50 Hz perception loop")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with Controller.from_config(Path(__file__).with_name("deploy.toml")) as ctrl:
        def on_frame(det):
            t = det.t_capture_ns
            brake = ctrl.step({"distance": (det.distance, t), "closing_speed": (det.closing_speed, t)})["brake"]
            return brake, ctrl.status()["status"]
        pipeline = PerceptionPipeline(seed=args.seed)
        pipeline.run(on_frame, args.duration)
        stats = ctrl.stats()
    r = {**pipeline.report(), "deadline_misses": stats["deadline_misses"], "step_us": stats["latency_us"],
         "invalid_inputs": {k: v for k, v in stats["invalid_inputs"].items() if v},
         "overruns": stats["watchdog"]["timeouts"] + stats["watchdog"]["busy_cycles"]}
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{r['frames']} frames {r['frames_by_kind']}, fail-safe advisories by frame kind {r['failsafe']}")
    print(f"invalid inputs {r['invalid_inputs']}; step latency us p50 {r['step_us']['p50']:.0f} "
          f"p99 {r['step_us']['p99']:.0f} max {r['step_us']['max']:.0f}; deadline misses {r['deadline_misses']}, "
          f"inference overruns {r['overruns']}")
    print(f"brake events {r['brake_events']}, advised {r['brake_events_advised']} (lag {r['advice_lag_ms']}), "
          f"false brakes {r['false_brakes']}, advisory MAE vs the TTC rule {r['mae']}")
    return r


if __name__ == "__main__":
    main()

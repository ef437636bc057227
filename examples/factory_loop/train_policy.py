"""Rebuild the demo's bundled policy: train, compress, and score it in closed loop.

``python -m examples.factory_loop.train_policy`` (from the repository root) writes
``sdk/demo/model/`` (``examples/factory_loop/model`` links to it), the package ``r1edge demo``
runs. Seeded end to end; the figures it prints are the ones quoted in the README.

1. Imitation data: :func:`sdk.demo.expert.generate_dataset` (the windowed-PID expert, with slow
   random perturbations of the applied commands so the policy also sees states off the
   expert's own path), from plant seeds that neither the evaluation nor the demo uses.
2. A small DeepSeek-V3-architecture model (MLA attention, one dense layer, then MoE layers
   of 8 routed experts with top-2 group-limited ``noaux_tc`` routing and a shared expert),
   randomly initialised and trained whole with ``sdk.tools.fit`` on 32-frame sliding windows (the
   deployment's ``window``), routers kept balanced by the bias update of DeepSeek-V3.
3. Every ``--eval-every`` steps the policy is scored in closed loop: the plant simulated
   with the controller of the demo's ``deploy.toml`` in the loop (input checks, output clamps,
   rate limits) running the int8 stream engine, on held-out plant seeds, against the expert on
   the same disturbances. Training stops once the policy is within ``--target`` of the
   expert (or after ``--steps``).
4. ``sdk.compress``: half the routed experts pruned by REAP saliency, int8 (W8A8), calibrated
   on held-out frames; the package is scored in closed loop again.

It needs only the project's own dependencies. Single-threaded torch, so the result does not
depend on the machine's core count.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdk.demo import EXAMPLE, simulate_policy
from sdk.demo import expert as E
from sdk.demo import plant as P

log = logging.getLogger(__name__)

DEPLOY = EXAMPLE / "deploy.toml"

#: The policy's architecture: DeepSeek-V3 in miniature.
CONFIG = dict(
    vocab_size=16, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
    rope_interleave=True,
)
DATA_SEED = 1          # imitation data: plant seeds 100003 + i
EVAL_SEEDS = (200, 201, 202, 203)   # closed-loop scoring during and after training


def closed_loop(engine, seeds, duration_s: float, deploy: Path = DEPLOY) -> dict:
    """Mean tracking figures of the policy (through the deployment's controller) and of the
    expert and no control, on the same seeded disturbances. ``engine`` is a stream engine."""
    rows = {"policy": [], "expert": [], "no_control": []}
    failsafe = 0
    for seed in seeds:
        log, stats = simulate_policy(seed, duration_s, deploy, engine)
        rows["policy"].append(P.tracking_error(log))
        failsafe += stats["failsafe_cycles"]
        rows["expert"].append(P.tracking_error(P.simulate(seed, E.ExpertController(), duration_s)))
        rows["no_control"].append(P.tracking_error(P.simulate(seed, None, duration_s)))
    out = {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in rows.items()}
    out["ratio"] = out["policy"]["score"] / out["expert"]["score"]
    out["policy_failsafe_cycles"] = failsafe
    return out


def _line(name: str, fig: dict) -> str:
    return (f"{name:24s} level_rms={fig['level_rms']:.4f} m  temp_rms={fig['temp_rms']:.3f} K  "
            f"score={fig['score']:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Train, compress and score the bundled policy; returns 0 if it meets ``--target``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(EXAMPLE / "model"), help="package to write (default: the bundled one)")
    ap.add_argument("--episodes", type=int, default=96, help="imitation episodes (default: %(default)s)")
    ap.add_argument("--episode-s", type=float, default=30.0, help="seconds per episode (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3000, help="most training steps (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=500, help="closed-loop check interval (default: %(default)s)")
    ap.add_argument("--eval-s", type=float, default=40.0, help="seconds per closed-loop episode")
    ap.add_argument("--target", type=float, default=1.2,
                    help="stop once policy/expert tracking score is at most this (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch seed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    from runtime.model.config import ModelConfig
    from runtime.cpu.engine import Engine
    from runtime.model.transformer import Transformer
    from sdk.tools.compress import compress
    from sdk.tools.fit import attach_adapter, fit_model, init_weights, save_package, split_rows
    from sdk.tools.loading import load_model

    t_start = time.perf_counter()
    data = E.generate_dataset(args.episodes, args.episode_s, seed=DATA_SEED)
    frames, targets = data["frames"], data["targets"]
    log.info("imitation data: frames %s, targets %s in %.1f s", frames.shape, targets.shape,
             time.perf_counter() - t_start)
    held_out = 0.125
    train_rows, held_rows = split_rows(len(frames), held_out)

    cfg = ModelConfig.from_dict({"model_type": "deepseek_v3", **CONFIG}, "train_policy.CONFIG")
    model = init_weights(Transformer(cfg), seed=args.seed)
    attach_adapter(model, E.FEATURES, E.OUTPUTS, frames=frames[train_rows], targets=targets[train_rows],
                   seed=args.seed)
    checks = []

    def check(step: int, m) -> bool:
        """Closed-loop score of the policy so far; True (stop training) once within --target."""
        res = closed_loop(Engine(m, capacity=1, window=E.WINDOW), EVAL_SEEDS, args.eval_s)
        torch.set_num_threads(1)    # Numba's OpenMP start-up resets the thread count torch shares
        checks.append({"step": step, "ratio": res["ratio"]})
        log.info("step %d: closed-loop policy/expert = %.3f (policy %.4f, expert %.4f, no control %.4f)",
                 step, res["ratio"], res["policy"]["score"], res["expert"]["score"], res["no_control"]["score"])
        return res["ratio"] <= args.target

    report = fit_model(model, frames, targets, train="all", window=E.WINDOW, steps=args.steps, lr=3e-3,
                       batch=16, seed=args.seed, held_out=held_out, callback=check, eval_every=args.eval_every,
                       progress=sys.stderr.isatty())
    float_int8 = closed_loop(Engine(model, capacity=1, window=E.WINDOW), EVAL_SEEDS, args.eval_s)

    with tempfile.TemporaryDirectory(prefix="r1edge-policy-") as tmp:
        tmp = Path(tmp)
        save_package(model, tmp / "float", report={**report, "closed_loop_checks": checks})
        # Calibration rows of one window each: compress attends causally over a whole row, which
        # for rows no longer than the window is exactly the deployment's sliding window.
        held = frames[held_rows]
        n_win = held.shape[1] // E.WINDOW
        calib = held[:, :n_win * E.WINDOW].reshape(-1, E.WINDOW, held.shape[2])
        np.savez(tmp / "calib.npz", frames=calib)
        manifest = compress(tmp / "float", args.out, calib=tmp / "calib.npz", keep_ratio=0.5, quant="int8",
                            method="reap", overwrite=True)
    pruned = load_model(args.out)
    final = closed_loop(Engine(pruned, capacity=1, window=E.WINDOW), EVAL_SEEDS, args.eval_s)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    elapsed = time.perf_counter() - t_start

    h = report["held_out"]
    print(f"\npolicy written to {args.out} ({size / 1e6:.2f} MB) in {elapsed / 60:.1f} min "
          f"({report['steps']} training steps, {report['seconds']:.0f} s of training, 1 thread)")
    print(f"imitation held-out MSE {h['mse']:.4g} (normalised; predicting the mean: {h['baseline_mse']:.4g})")
    print(f"experts kept per MoE layer: {[len(v) for v in manifest['experts']['kept'].values()]} of "
          f"{cfg.n_routed_experts}; compress quality: {json.dumps({k: round(v, 5) for k, v in manifest['quality'].items() if isinstance(v, float)})}")
    print(f"closed loop, plant seeds {list(EVAL_SEEDS)}, {args.eval_s:.0f} s each (tracking score: mean "
          "normalised RMS error, lower is better):")
    print(_line("expert (windowed PID)", final["expert"]))
    print(_line("no control", final["no_control"]))
    print(_line("policy, 8 experts int8", float_int8["policy"]) + f"  ratio {float_int8['ratio']:.3f}")
    print(_line("policy, 4 experts int8", final["policy"]) + f"  ratio {final['ratio']:.3f}  "
          f"fail-safe cycles {final['policy_failsafe_cycles']}")
    ok = final["ratio"] <= 1.5 and final["policy_failsafe_cycles"] == 0 and not math.isnan(final["ratio"])
    if not ok:
        print("the compressed policy is not within 1.5x of the expert: not good enough for the demo",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

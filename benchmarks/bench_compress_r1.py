"""Compress an R1-shaped FP8 checkpoint and report memory, throughput per phase, and the
extrapolation to the full 61-layer DeepSeek-R1.

Make the checkpoint once (``benchmarks/make_r1_checkpoint.py``; 1 dense + 2 MoE layers of 256
experts is about 27 GB), then:

    python benchmarks/bench_compress_r1.py --src /work/r1shaped --out /work/r1shaped-22 --keep-experts 22

It runs ``sdk.compress`` in this process with random calibration token ids (``--rows`` rows of
``--tokens``), samples the process's resident memory every 20 ms (anonymous and file-backed, and
the kernel's peak ``VmHWM``), and collects compress's phase events (source bytes read and
seconds per phase and layer). The extrapolation scales the measured per-layer times to R1's
3 dense + 58 MoE layers of 256 experts, plus the embeddings and the head as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

R1_DENSE, R1_MOE = 3, 58


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="R1-shaped checkpoint (make_r1_checkpoint.py)")
    p.add_argument("--out", required=True, type=Path, help="package to write (replaced if it exists)")
    p.add_argument("--keep-experts", type=int, default=22)
    p.add_argument("--rows", type=int, default=16, help="calibration rows (a quarter held out)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per calibration row")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)

    import torch

    from sdk.tools.compress import compress

    cfg = json.loads((args.src / "config.json").read_text())
    rng = np.random.default_rng(0)
    calib = Path(tempfile.mkdtemp()) / "calib.npy"
    np.save(calib, rng.integers(0, cfg["vocab_size"], (args.rows, args.tokens)))
    events: list[dict] = []
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    manifest = compress(args.src, args.out, calib=calib, keep_experts=args.keep_experts, progress=False,
                        overwrite=True, on_progress=events.append)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    final = _status()

    phases: dict[str, list[float]] = {}
    per_layer: dict[int, float] = {}
    for e in events:
        if e["event"] != "phase":
            continue
        key = e["phase"]
        b, s = phases.get(key, [0, 0.0])
        phases[key] = [b + e["bytes"], s + e["seconds"]]
        if e["layer"] is not None:
            per_layer[e["layer"]] = per_layer.get(e["layer"], 0.0) + e["seconds"]
    dense = [per_layer[i] for i in range(cfg["first_k_dense_replace"])]
    moe = [per_layer[i] for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])]
    fixed = phases.get("embed", [0, 0.0])[1] + phases.get("head", [0, 0.0])[1]
    t_dense, t_moe = (sum(dense) / len(dense) if dense else 0.0), sum(moe) / len(moe)
    scale = 256 / cfg["n_routed_experts"]        # routed-expert work scales with the experts
    t_r1 = fixed + R1_DENSE * t_dense + R1_MOE * t_moe * scale
    src_bytes = manifest["size"]["source_bytes"]
    report = {
        "source_gb": src_bytes / 1e9, "package_gb": manifest["size"]["package_bytes"] / 1e9,
        "keep_experts": args.keep_experts, "calibration_tokens": args.rows * args.tokens,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "wall_s": wall, "source_gb_per_s": src_bytes / 1e9 / wall,
        "peak_rss_gb": peak["VmHWM"] / 1e9, "peak_rss_anon_gb": peak["RssAnon"] / 1e9,
        "peak_rss_file_gb": peak["RssFile"] / 1e9, "base_rss_gb": base["VmRSS"] / 1e9,
        "final_rss_gb": final["VmRSS"] / 1e9,
        "phases": {k: {"gb": b / 1e9, "s": s, "gb_per_s": b / 1e9 / s if s else None} for k, (b, s) in phases.items()},
        "seconds_per_dense_layer": t_dense, "seconds_per_moe_layer": t_moe,
        "r1_hours_here": t_r1 / 3600,
        "quality": manifest["quality"],
    }
    print(f"source {report['source_gb']:.2f} GB -> package {report['package_gb']:.2f} GB "
          f"({args.keep_experts} experts kept), {report['calibration_tokens']} calibration tokens, "
          f"{report['torch_threads']} torch threads on {report['cpus']} CPUs")
    print(f"wall {wall:.0f} s ({report['source_gb_per_s']:.3f} GB/s of source overall)")
    print(f"peak RSS {report['peak_rss_gb']:.2f} GB (VmHWM; anonymous peak {report['peak_rss_anon_gb']:.2f} GB, "
          f"file-backed peak {report['peak_rss_file_gb']:.2f} GB; at start {report['base_rss_gb']:.2f} GB)")
    for k, v in report["phases"].items():
        rate = f"{v['gb_per_s']:.3f} GB/s" if v["gb_per_s"] else "-"
        print(f"  phase {k:<11} {v['gb']:8.2f} GB read in {v['s']:8.1f} s  {rate}")
    print(f"per layer: dense {t_dense:.0f} s, MoE ({cfg['n_routed_experts']} experts) {t_moe:.0f} s")
    print(f"full R1 (3 dense + 58 MoE layers of 256 experts) on this machine: {report['r1_hours_here']:.1f} h")
    print(f"quality (held-out tokens): {json.dumps(manifest['quality'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

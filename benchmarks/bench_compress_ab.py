"""Side by side: ``compress`` time of two checkouts on the same small checkpoint, alternated
round after round, medians (a shared machine moves absolute figures; alternating compares
under the same conditions). Each run is a fresh process with ``PYTHONPATH`` and the working
directory set to its checkout; the time is compress() alone (imports excluded). Also says
whether the two checkouts wrote byte-identical packages.

    git worktree add --detach ../base <commit>
    python benchmarks/bench_compress_ab.py --base ../base --new . --rounds 5
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUN = """
import json, sys, time
from sdk.tools.compress import compress
src, out, calib, keep, quant = sys.argv[1:6]
t = time.perf_counter()
compress(src, out, calib=calib, keep_experts=int(keep), quant=quant, progress=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def make_checkpoint(path: Path, hidden: int, experts: int, layers: int) -> None:
    """A random DeepSeek-V3 checkpoint written by transformers (the test suite's recipe)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import save_reference

    save_reference(path, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=experts,
                   num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=64, q_lora_rank=96,
                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, vocab_size=2048)


def digest(pkg: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the older checkout")
    p.add_argument("--new", default=".", help="the newer checkout (default: this one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--quant", default="int8", choices=("int8", "none"))
    p.add_argument("--json", dest="json_file")
    args = p.parse_args()
    trees = {"base": Path(args.base).resolve(), "new": Path(args.new).resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "src", args.hidden, args.experts, args.layers)
        calib = tmp / "calib.npy"
        np.save(calib, np.random.default_rng(0).integers(0, 2048, size=(32, 64)))
        times = {k: [] for k in trees}
        digests = {}
        for r in range(args.rounds):
            for name, tree in trees.items():
                out = tmp / f"pkg-{name}"
                cmd = [sys.executable, "-c", RUN, str(tmp / "src"), str(out), str(calib), str(args.keep), args.quant]
                res = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                                     capture_output=True, text=True)
                times[name].append(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])
                digests[name] = digest(out)
            print(f"round {r + 1}/{args.rounds}: base {times['base'][-1]:.2f} s, new {times['new'][-1]:.2f} s",
                  file=sys.stderr)
    med = {k: float(np.median(v)) for k, v in times.items()}
    report = {"rounds": args.rounds, "seconds": times, "median_s": med, "new_over_base": med["new"] / med["base"],
              "identical_packages": digests["base"] == digests["new"], "loadavg": os.getloadavg()}
    print(f"compress median of {args.rounds} alternated rounds: base {med['base']:.2f} s, new {med['new']:.2f} s "
          f"(new/base {report['new_over_base']:.3f}); packages identical: {report['identical_packages']}; "
          f"load average {report['loadavg'][0]:.2f}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

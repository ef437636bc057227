"""What pruning costs, per domain: the keep-ratio curve of the trained multi-domain MoE.

    python benchmarks/bench_pruning.py --json pruning.json --plot docs/pruning-curve.png

For the package ``examples/pruning/model`` (a DeepSeek-V3 LM trained on Python source, English
prose and plant logs, ``examples/pruning/train.py``) and its held-out rows per domain
(``examples/pruning/data/held_out.npz``), it compresses the package with ``sdk.compress`` at keep
ratios 100%, 50%, 25%, 12.5% and the smallest the model allows (top-k of the routed experts),
choosing experts by REAP, by frequency and at random, calibrated on the mix of domains and on each
single domain (``calib_<name>.npz``: rows never trained on; random choice does not look at the
calibration, so it runs once, on the mix), float and int8, and scores every package on every
domain's held-out rows with ``sdk.tools.quality.evaluate_lm``: int8 on the stream engine, token by
token, as ``generate`` runs it; float through the reference forward. ``loss`` is nats per token,
``agreement`` the share of positions where the greedy token equals the unpruned float model's.
Rows at keep 1.0 are the same package for every method and calibration (quantization does not
look at the calibration) and are repeated under each so every line of the curve starts there.

It also measures how the routed experts specialise: per domain and MoE layer, the share of the
top-k routing slots each expert takes on the held-out rows (unpruned float model), the entropy of
that usage, and how much the most used quarter of the experts of one domain overlaps another's.

Output: a table on stdout; ``--json OUT`` the curve ``{"domains": [...], "rows": [{"domain",
"method", "calib", "keep", "quant", "loss", "agreement"}, ...]}``; ``--plot PNG`` loss against
keep ratio, one panel per domain, one line per method and calibration (int8); ``--spec-json OUT``
the specialisation measures.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("reap", "frequency", "random")


def specialisation(model, rows: dict[str, np.ndarray], top_share: float = 0.25) -> dict:
    """Per-domain expert usage of ``model``'s MoE layers on ``rows``: usage shares, entropy (bits;
    uniform use of n experts is log2 n), and the overlap of the top ``top_share`` of experts
    between domains (|A and B| / |A|; two random picks would overlap by ``top_share``)."""
    from runtime.model.transformer import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    n = moes[0].gate.weight.shape[0]
    usage = {}
    for d, r in rows.items():
        counts = [torch.zeros(n) for _ in moes]
        for m, c in zip(moes, counts):
            m.observer = lambda rec, c=c: c.add_(torch.bincount(rec.expert_ids.reshape(-1), minlength=n).float())
        try:
            for a in range(0, len(r), 16):
                model(torch.from_numpy(np.asarray(r[a:a + 16, :-1], dtype=np.int64)))
        finally:
            for m in moes:
                m.observer = None
        usage[d] = [(c / c.sum()).numpy() for c in counts]
    k = max(1, round(top_share * n))
    layers = []
    for i, m in enumerate(moes):
        entry = {"layer": m.layer, "entropy_bits": {}, "top": {}, "overlap": {}}
        for d in rows:
            p = usage[d][i]
            entry["entropy_bits"][d] = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
            entry["top"][d] = sorted(int(e) for e in np.argsort(-p, kind="stable")[:k])
        names = list(rows)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                sa, sb = set(entry["top"][names[a]]), set(entry["top"][names[b]])
                entry["overlap"][f"{names[a]}/{names[b]}"] = len(sa & sb) / k
        entry["usage"] = {d: [round(float(x), 5) for x in usage[d][i]] for d in rows}
        layers.append(entry)
    return {"experts": n, "top": k, "max_entropy_bits": math.log2(n), "chance_overlap": k / n, "layers": layers}


def render_specialisation(spec: dict) -> None:
    """Print the specialisation measures, a line per MoE layer."""
    print(f"\nExpert specialisation (unpruned float model, held-out rows): usage entropy in bits (uniform over "
          f"{spec['experts']} experts = {spec['max_entropy_bits']:.2f}); overlap of the top {spec['top']} "
          f"experts between domains (chance {spec['chance_overlap']:.2f})")
    for e in spec["layers"]:
        ent = ", ".join(f"{d} {v:.2f}" for d, v in e["entropy_bits"].items())
        ov = ", ".join(f"{p} {v:.2f}" for p, v in e["overlap"].items())
        print(f"  layer {e['layer']}: entropy {ent}; top overlap {ov}")


def main(argv: list[str] | None = None) -> int:
    """Compress, evaluate, print; write the JSON and the plot when asked."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(ROOT / "examples/pruning/model"), help="float package to prune")
    ap.add_argument("--data", default=str(ROOT / "examples/pruning/data"),
                    help="held_out.npz and calib_<mix|domain>.npz")
    ap.add_argument("--rows", type=int, default=32, help="held-out rows per domain to score (default %(default)s)")
    ap.add_argument("--keeps", default="1,0.5,0.25,0.125,min", help="keep ratios ('min': top-k of the experts)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibs", default="mix,domains", help="'mix', domain names, or 'domains' for each")
    ap.add_argument("--quants", default="int8,float", help="in the order to run them (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="OUT", help="write the curve as JSON")
    ap.add_argument("--plot", metavar="PNG", help="write loss against keep ratio (int8) as a PNG")
    ap.add_argument("--spec-json", metavar="OUT", help="write the specialisation measures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import sdk
    from sdk.tools.compress import compress
    from sdk.tools.quality import agreement, evaluate_lm

    t_start = time.perf_counter()
    data = Path(args.data)
    with np.load(data / "held_out.npz") as f:
        held = {d: f[d][:args.rows] for d in f.files}
    domains = list(held)
    src = Path(args.package)
    ref_model = sdk.load_model(src)
    cfg = ref_model.config
    n, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
    keeps = []
    for k in args.keeps.split(","):
        keeps.append(top_k if k == "min" else max(top_k, round(float(k) * n)))
    keeps = sorted(set(keeps), reverse=True)
    calibs = []
    for c in args.calibs.split(","):
        calibs.extend(domains if c == "domains" else [c])
    quants = args.quants.split(",")
    methods = args.methods.split(",")
    ref = {d: evaluate_lm(ref_model, held[d]) for d in domains}
    spec = specialisation(ref_model, held)
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-pruning-"))

    def score(model, keep: int, quant: str, pairs: list[tuple[str, str]]) -> None:
        for d in domains:
            r = evaluate_lm(model, held[d])
            point = {"keep": keep / n, "quant": quant, "loss": r["loss"],
                     "agreement": agreement(r["argmax"], ref[d]["argmax"])}
            for method, calib in pairs:
                rows.append({"domain": d, "method": method, "calib": calib, **point})
                print(f"{d:8s} {method:9s} {calib:8s} keep {keep:3d}/{n} ({keep / n:6.1%}) {quant:5s} "
                      f"loss {point['loss']:.4f} agreement {point['agreement']:.4f}", flush=True)

    lines = [(m, c) for m in methods for c in (["mix"] if m == "random" else calibs)]

    def save() -> None:                         # after every package: a long run keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"domains": domains, "rows": rows}, indent=1) + "\n")

    try:
        for quant in quants:                    # in the order given: the first quantization's curve comes first
            for keep in keeps:
                if keep == n:                   # the unpruned model: the same for every line
                    if quant == "float":
                        score(ref_model, keep, quant, lines)
                    else:
                        out = work / "full-int8"
                        compress(src, out, calib=data / "calib_mix.npz", quant="int8", progress=False,
                                 overwrite=True)
                        score(sdk.load_model(out), keep, quant, lines)
                    save()
                    continue
                for method, calib in lines:
                    out = work / f"{method}-{calib}-{keep}-{quant}"
                    compress(src, out, calib=data / f"calib_{calib}.npz", keep_experts=keep,
                             quant="int8" if quant == "int8" else "none", method=method, progress=False,
                             overwrite=True)
                    score(sdk.load_model(out), keep, quant, [(method, calib)])
                    save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    render_specialisation(spec)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_start:.0f} s; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    if args.spec_json:
        Path(args.spec_json).write_text(json.dumps(spec, indent=1) + "\n")
    if args.plot:
        plot(rows, domains, Path(args.plot))
    return 0


def plot(rows: list[dict], domains: list[str], path: Path) -> None:
    """Loss (int8) against keep ratio, one panel per domain, one line per method and calibration;
    the unpruned float loss as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4.2), sharey=False)
    colours = {"reap": "tab:blue", "frequency": "tab:orange", "random": "tab:grey"}
    for ax, d in zip(np.atleast_1d(axes), domains):
        mine = [r for r in rows if r["domain"] == d]
        base = [r["loss"] for r in mine if r["quant"] == "float" and r["keep"] == 1.0]
        for method in METHODS:
            for calib in sorted({r["calib"] for r in mine if r["method"] == method}):
                pts = sorted((r["keep"], r["loss"]) for r in mine
                             if r["method"] == method and r["calib"] == calib and r["quant"] == "int8")
                if not pts:
                    continue
                style = "-" if calib == "mix" else ("--" if calib == d else ":")
                width = 2.2 if calib in ("mix", d) else 1.0
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colours[method], lw=width,
                        marker="o", ms=3, label=f"{method}, calib {calib}")
        if base:
            ax.axhline(base[0], color="black", lw=0.8, ls=":", label="unpruned float")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("routed experts kept (fraction, log scale)")
        ax.set_ylabel("held-out loss, nats/token (int8)")
        ax.set_title(f"domain: {d}")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

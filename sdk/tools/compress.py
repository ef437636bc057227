"""Compression: calibrate, prune routed experts, quantize, and write a verified package.

``compress`` streams the source (an HF checkpoint or a float package) layer by layer from
its memory-mapped files: the calibration rows' hidden states go through one layer at a
time, the MoE observer records per expert how often it is chosen and its REAP saliency
(the mean, over the tokens routed to it, of gate weight x norm of its output), the kept
experts are chosen, the router rows and correction bias are sliced to them, the layer is
quantized, the held-out rows run through both the original and the compressed layer, the
layer is written and freed. Peak memory is about one layer plus the activations.

Group-limited routing after pruning (``groups``): ``balanced`` keeps the same number of
experts in every group and keeps ``n_group``/``topk_group``; ``global`` keeps the best
experts anywhere and collapses routing to a single group; ``auto`` (the default) is
balanced whenever the kept count allows it (see :func:`group_plan`).

The calibration pass itself (the model's own blocks over streamed weights) is
``sdk.tools.streamed``; calibration files are read by ``sdk.tools.calibration``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdk.tools import streamed
from sdk.tools.calibration import CALIB_SUFFIXES, Calibration, CalibrationError, load_calibration
from sdk.tools.streamed import RowStream, Source, StreamedWeights, block_rows

log = logging.getLogger(__name__)

__all__ = ["CALIB_SUFFIXES", "Calibration", "CalibrationError", "compress", "group_plan", "load_calibration",
           "render_report", "resolve_keep", "select_experts"]

# --------------------------------------------------------------------------------------------
# Pruning decisions
# --------------------------------------------------------------------------------------------

METHODS = ("reap", "frequency", "random")
QUANT_CHOICES = ("int8", "none")
GROUP_RULES = ("auto", "balanced", "global")


class ExpertStats:
    """Per-expert routing statistics of one MoE layer, filled by the MoE observer hook.

    ``counts[e]``: tokens routed to expert ``e``. ``saliency[e]`` (REAP): the mean, over the
    tokens routed to ``e``, of its gate weight times the L2 norm of its output.
    """

    def __init__(self, n_experts: int):
        self.counts = torch.zeros(n_experts, dtype=torch.float64)
        self.saliency_sum = torch.zeros(n_experts, dtype=torch.float64)

    def __call__(self, record) -> None:
        ids = record.expert_ids.reshape(-1)
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).double()
        contrib = (record.weights.double() * record.output_norms.double()).reshape(-1)
        self.saliency_sum.index_add_(0, ids, contrib)

    @property
    def saliency(self) -> torch.Tensor:
        """REAP saliency per expert (0 for experts never chosen)."""
        return self.saliency_sum / self.counts.clamp(min=1)


def group_plan(cfg, n_keep: int, rule: str = "auto") -> dict[str, Any]:
    """How group-limited routing survives pruning to ``n_keep`` experts per layer.

    ``balanced`` keeps ``n_keep / n_group`` experts in every group (chosen by score within
    the group), so the groups stay equal and the pruned router keeps ``n_group`` and
    ``topk_group``: it routes exactly as the original would among the kept experts. It needs
    a grouped router (``n_group`` > 1) and ``n_keep`` experts that the routing rule accepts
    with those groups (``runtime.model.routing.RoutingRule.check``, the one validity check:
    ``n_keep`` divisible by ``n_group``, at least 2 per group where a group scores its top-2
    sum, ``topk_group * n_keep / n_group >= num_experts_per_tok``).
    ``global`` keeps the ``n_keep`` best experts of the layer wherever they are and collapses
    routing to one group (``n_group = topk_group = 1``): plain top-k over the kept experts.
    ``auto`` is ``balanced`` when it is possible, else ``global``.
    """
    from runtime.model.routing import RoutingRule

    if rule not in GROUP_RULES:
        raise ValueError(f"groups must be one of {GROUP_RULES}, got {rule!r}")
    g = RoutingRule.from_config(cfg).n_group          # greedy routing is one group
    why = None if g > 1 else f"the router has a single group (n_group={g})"
    if why is None:
        try:
            RoutingRule.from_config(cfg, n_experts=n_keep)
        except ValueError as exc:
            why = str(exc)
    if rule == "balanced" and why:
        raise ValueError(f"cannot keep {n_keep} experts in {g} equal groups: {why}; use groups='global'")
    if rule == "balanced" or (rule == "auto" and not why):
        return {"rule": "balanced", "n_group": g, "topk_group": cfg.topk_group, "per_group": n_keep // g}
    return {"rule": "global", "n_group": 1, "topk_group": 1, "per_group": None}


def select_experts(scores: torch.Tensor, n_keep: int, plan: dict[str, Any], n_group: int) -> list[int]:
    """Original ids of the experts to keep, in their new order.

    Highest score first, ties broken by the lower id. ``balanced`` takes the best
    ``per_group`` of each original group and lays them out group by group (so new group
    ``g`` holds experts of old group ``g``); ``global`` takes the best ``n_keep`` overall.
    Within a group (or overall) kept experts stay in their original order.
    """
    n = scores.numel()
    order = sorted(range(n), key=lambda e: (-float(scores[e]), e))
    if plan["rule"] == "balanced":
        size = n // n_group
        kept = []
        for g in range(n_group):
            members = [e for e in order if e // size == g][:plan["per_group"]]
            kept += sorted(members)
        return kept
    return sorted(order[:n_keep])


def resolve_keep(cfg, keep_experts: int | None, keep_ratio: float | None) -> int:
    """The per-layer kept-expert count from ``keep_experts`` or ``keep_ratio`` (default: all)."""
    if keep_experts is not None and keep_ratio is not None:
        raise ValueError("give either --keep-experts or --keep-ratio, not both")
    n = cfg.n_routed_experts
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
        keep_experts = max(cfg.num_experts_per_tok, round(keep_ratio * n))
    if keep_experts is None:
        return n
    if isinstance(keep_experts, bool) or not isinstance(keep_experts, int) or not (
            cfg.num_experts_per_tok <= keep_experts <= n):
        raise ValueError(f"--keep-experts must be an integer between num_experts_per_tok="
                         f"{cfg.num_experts_per_tok} and n_routed_experts={n}, got {keep_experts!r}")
    return keep_experts


# --------------------------------------------------------------------------------------------
# The streaming compressor
# --------------------------------------------------------------------------------------------

STATE = "state.json"


def _expert_scores(stats: ExpertStats, method: str, seed: int, layer: int) -> torch.Tensor:
    if method == "reap":
        return stats.saliency
    if method == "frequency":
        return stats.counts
    gen = torch.Generator().manual_seed(seed * 100003 + layer)
    return torch.rand(stats.counts.numel(), generator=gen, dtype=torch.float64)


def _float_weights(module: torch.nn.Module):
    """The float weights a package stores in its float dtype: linear, norm and float expert weights.

    The router (``Gate``) stays float32 and int8 codes and their scales are left alone.
    """
    from runtime.model.transformer import Experts, RMSNorm

    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, RMSNorm, Experts)):
            yield from m.parameters(recurse=False)


def _specs(module: torch.nn.Module, prefix: str, store: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """Names, dtypes and shapes ``module`` (built on the meta device) is stored with under ``prefix``."""
    cast = {id(p) for p in _float_weights(module)}
    return {prefix + n: (store if id(t) in cast else t.dtype, tuple(t.shape))
            for n, t in module.state_dict(keep_vars=True).items()}


def _open_file(writer, file_name: str, parts: list[tuple[torch.nn.Module, str]], store: torch.dtype,
               extra: dict | None = None):
    """Open a package file laid out as the state dicts of ``parts`` (module built on the meta
    device, name prefix), after ``extra`` specs; int8 layers' padded scale columns are set
    to 1, as ``Int8Linear`` holds them."""
    from runtime.model.quant import Int8Linear

    specs = dict(extra or {})
    for module, prefix in parts:
        specs.update(_specs(module, prefix, store))
    out = writer.open(file_name, specs)
    for module, prefix in parts:
        for name, m in module.named_modules():
            if isinstance(m, Int8Linear) and m.scale.shape[0] > m.out_features:
                out.assign(f"{prefix}{name}{'.' if name else ''}scale", slice(m.out_features, None),
                           torch.ones(m.scale.shape[0] - m.out_features))
    return out


class _Progress:
    """Progress in source bytes read (tqdm bar with ETA, and/or JSON events for scripts)."""

    def __init__(self, total: int, reader, bar, emit):
        import time

        self.time = time.perf_counter
        self.total, self.reader, self.bar, self.emit = total, reader, bar, emit
        self.base = 0                   # planned bytes of stages finished before this run
        self.credit = 0                 # bytes of experts that got no tokens (not read)
        self.start = self.time()
        self.phase_start = (self.start, 0)
        self.phase_name = None
        self.layer = None

    def done(self) -> int:
        return self.base + self.reader.bytes_read + self.credit

    def update(self, credit: int = 0, event: bool = False) -> None:
        """Account ``credit`` bytes not read; refresh the bar (and send a progress event)."""
        self.credit += credit
        done = min(self.done(), self.total)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        if event and self.emit:
            elapsed = self.time() - self.start
            run = done - self.base
            eta = (self.total - done) * elapsed / run if run > 0 else None
            self.emit({"event": "progress", "phase": self.phase_name, "layer": self.layer, "done_bytes": done,
                       "total_bytes": self.total, "elapsed_s": round(elapsed, 3),
                       "eta_s": None if eta is None else round(eta, 1)})

    def stage_done(self, planned: int) -> None:
        """A stage (embeddings, a layer) is finished: count it as planned from here on."""
        self.base += planned
        self.credit = -self.reader.bytes_read

    def phase(self, name: str | None, layer: int | None = None) -> None:
        """End the current phase (reporting its bytes and seconds) and start ``name``."""
        now, done = self.time(), self.done()
        if self.phase_name is not None and self.emit:
            t0, d0 = self.phase_start
            self.emit({"event": "phase", "phase": self.phase_name, "layer": self.layer, "bytes": done - d0,
                       "seconds": round(now - t0, 3)})
        self.phase_name, self.layer, self.phase_start = name, layer, (now, done)
        if self.bar is not None and name is not None:
            self.bar.set_postfix_str(name if layer is None else f"layer {layer}: {name}")
        if name is not None:
            self.update(event=True)


def _planned_bytes(src: Source, n_keep: int) -> list[int]:
    """Source bytes each stage reads: embeddings, every layer, the head (for progress and ETA)."""
    cfg = src.cfg

    def linears(prefix: str) -> int:
        return sum(src.nbytes(n) for n in src.expected() if n.startswith(prefix) and n.endswith(".weight")
                   and ".mlp.experts." not in n and ".gate." not in n)

    def expert(i: int, e: int) -> int:
        p = f"model.layers.{i}.mlp.experts.{e}."
        return sum(src.nbytes(p + k + ".weight") for k in ("gate_proj", "up_proj", "down_proj"))

    stages = [src.nbytes("model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        n = 2 * linears(f"model.layers.{i}.")
        if cfg.is_moe_layer(i):
            n += src.nbytes(f"model.layers.{i}.mlp.gate.weight")
            n += sum(expert(i, e) for e in range(cfg.n_routed_experts)) + n_keep * expert(i, 0)
        stages.append(n)
    stages.append(2 * src.nbytes("lm_head.weight"))
    return stages


def _fingerprint(src: Source, calib: Path, args: dict) -> str:
    """What a partial compression is for: the source files, the calibration file and the arguments."""
    import hashlib

    from sdk.tools.package import r1edge_version, sha256_file

    files = [[f.name, f.stat().st_size] for f in src.files]
    blob = json.dumps({"source": str(src.path.resolve()), "files": files, "calib": sha256_file(calib),
                       "args": args, "version": r1edge_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume_state(work: Path, key: str) -> dict | None:
    """The state of a partial compression in ``work`` made with the same ``key``, else None
    (and ``work`` is cleared)."""
    import shutil

    path = work / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            state = None
        if state and state.get("key") == key:
            return state
        log.warning("%s: partial compression for other arguments or another source; starting over", work)
    if work.exists():
        shutil.rmtree(work)
    return None


def _save_state(work: Path, state: dict) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, work / STATE)


def _save_hidden(work: Path, stage: int, ref: torch.Tensor, cmp: torch.Tensor) -> None:
    for name, x in (("ref", ref), ("cmp", cmp)):
        tmp = work / f"hidden-{stage:04d}-{name}.tmp.npy"
        np.save(tmp, x.numpy())
        os.replace(tmp, work / f"hidden-{stage:04d}-{name}.npy")


def _load_hidden(work: Path, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.load(work / f"hidden-{stage:04d}-{n}.npy")) for n in ("ref", "cmp"))


def copy_text_files(src: Path, writer) -> list[str]:
    """Copy the source's tokenizer and generation config files (``sdk.tools.package.TEXT_FILES``,
    those present) into the package being written; returns their names."""
    from sdk.tools.package import TEXT_FILES

    names = [name for name in TEXT_FILES if (src / name).is_file()]
    for name in names:
        writer.add_text_file(src / name)
    return names


def compress(src: str | Path, out: str | Path, *, calib: str | Path, keep_experts: int | None = None,
             keep_ratio: float | None = None, quant: str = "int8", method: str = "reap",
             groups: str = "auto", held_out: float = 0.25, seed: int = 0, max_batch_tokens: int = 4096,
             window: int | None = None, progress: bool = True, overwrite: bool = False,
             on_progress=None) -> dict[str, Any]:
    """Calibrate, prune routed experts, quantize and write a verified package; returns its manifest.

    Streams from the memory-mapped source and never holds a layer's weights in float: every
    weight is read in blocks of rows (dequantized from FP8 per 128x128 block), and routed
    experts one at a time. For each layer the calibration rows' hidden states (kept in
    memory, float32) run through attention head group by head group; in a MoE layer the
    router alone routes them, then each expert that got tokens is read and run on its tokens,
    accumulating the layer's output and per expert the selection count and REAP saliency
    (the mean of gate weight x output norm over the tokens routed to it). ``keep_experts``
    (or ``keep_ratio`` of them) are kept per layer by ``method`` (``reap``, ``frequency`` or
    ``random`` with ``seed``); ``groups`` picks how group-limited routing stays valid (see
    :func:`group_plan`). The compressed layer is then computed on the held-out rows while
    its weights are read again, quantized (W8A8 int8) or rounded, and written straight into
    the package file: the kept experts one at a time. The last ``held_out`` fraction of the
    rows is not used for calibration but to compare the compressed model with the original
    (the quality report). Float weights are stored in float32 when the source is float32,
    else in bfloat16. Calibration attends causally within each row, or over the last
    ``window`` tokens (the deployment's sliding window) when given.

    Resumable: the work goes to ``.<out>.partial`` beside ``out``, and each finished stage
    (embeddings, every layer) is recorded there with the hidden states after it. A run
    interrupted in any way (even SIGKILL) and started again with the same arguments goes on
    from the last finished stage, and the package is byte-identical to an uninterrupted
    run's. ``progress`` shows a tqdm bar in source bytes with ETA; ``on_progress`` (a
    callable) receives dict events: ``progress`` (bytes done and total, ETA) and ``phase``
    (bytes read and seconds of each finished phase).
    """
    import shutil

    from runtime.model.quant import quantize_model
    from runtime.model.transformer import Block, IOAdapter, RMSNorm
    from sdk.tools.quality import sensor_quality
    from sdk.tools.package import FORMAT, FORMAT_VERSION, PackageWriter, r1edge_version

    src, out = Path(src), Path(out)
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"--window must be a positive integer, got {window!r}")
    source = Source(src)
    cfg = source.cfg
    n_keep = resolve_keep(cfg, keep_experts, keep_ratio)
    gplan = group_plan(cfg, n_keep, groups)
    n_features = len(source.io["inputs"]) if source.io else None
    cal = load_calibration(calib, vocab_size=cfg.vocab_size, max_len=cfg.max_position_embeddings,
                           n_features=n_features)
    if cal.mode == "sensor" and not source.io:
        raise CalibrationError(f"{calib}: has sensor 'frames' but {src} has no I/O adapter (LM mode); "
                               "give token ids ('input_ids')")
    if cal.mode == "lm" and source.io:
        raise CalibrationError(f"{calib}: has token ids but {src} is a sensor model; give 'frames' [N, T, F]")
    pcfg = dataclasses.replace(cfg, n_routed_experts=n_keep, n_group=gplan["n_group"],
                               topk_group=gplan["topk_group"])
    pcfg.validate("pruned config")
    if "num_nextn_predict_layers" in pcfg.extra:       # multi-token-prediction layers are not packaged
        pcfg.extra = {**pcfg.extra, "num_nextn_predict_layers": 0}
    source.open()
    store = torch.float32 if source.reader.dtype("model.embed_tokens.weight") == "F32" else torch.bfloat16
    fit, held = cal.split(held_out)
    fit_s, held_s = RowStream(fit.rows, max_batch_tokens), RowStream(held.rows, max_batch_tokens)
    ref_s = fit_s + held_s
    log.info("compressing %s -> %s: keep %d of %d experts per layer by %s (%s groups), quant %s, "
             "%d calibration rows (%d tokens), %d held out", src, out, n_keep, cfg.n_routed_experts,
             method, gplan["rule"], quant, len(fit.rows), fit.tokens, len(held.rows))

    work = out.parent / f".{out.name}.partial"
    key = _fingerprint(source, Path(calib), {"keep": n_keep, "quant": quant, "method": method, "groups": groups,
                                             "held_out": held_out, "seed": seed, "window": window,
                                             "max_batch_tokens": max_batch_tokens})
    state = _resume_state(work, key) or {"key": key, "next": -1, "files": {}, "kept": {}, "layers": {}}
    planned = _planned_bytes(source, n_keep)
    from tqdm import tqdm
    bar = tqdm(total=sum(planned), desc="compress", unit="B", unit_scale=True, disable=not progress)
    track = _Progress(sum(planned), source.reader, None if not progress else bar, on_progress)
    track.base = sum(planned[:state["next"] + 1])
    L = cfg.num_hidden_layers
    with PackageWriter(out, overwrite=overwrite, work_dir=work / "package") as writer:
        for name, entry in state["files"].items():
            writer.adopt(name, entry)
        for stray in (work / "package").iterdir():
            if stray.name not in state["files"]:
                stray.unlink()
        if state["next"] >= 0:
            log.info("resuming %s from %s", out, "the head" if state["next"] == L else f"layer {state['next']}")
        adapter = None
        if source.io:
            adapter = IOAdapter(source.io["inputs"], source.io["outputs"], cfg.hidden_size)
            adapter.load_state_dict({k.removeprefix("adapter."): source.get(k) for k in source.expected()
                                     if k.startswith("adapter.")})

        # Inputs: token embeddings (LM) or the adapter's projection of frames (sensor).
        if state["next"] < 0:
            track.phase("embed")
            with torch.no_grad():
                if cal.mode == "lm":
                    x_ref = source.reader.gather(source._name("model.embed_tokens.weight"), ref_s.flat())
                    x_cmp = x_ref[fit_s.tokens:].to(store).float()
                else:
                    x_ref = adapter.embed(ref_s.flat())
                    x_cmp = x_ref[fit_s.tokens:].clone()
            V, H = cfg.vocab_size, cfg.hidden_size
            f = writer.open("model-embed.safetensors", {"model.embed_tokens.weight": (store, (V, H))})
            for a in range(0, V, block_rows(H)):
                b = min(V, a + block_rows(H))
                f.assign("model.embed_tokens.weight", slice(a, b), source.rows("model.embed_tokens.weight", a, b, store))
                track.update()
            writer.commit("model-embed.safetensors", f)
            _save_hidden(work, 0, x_ref, x_cmp)
            state.update(next=0, files=writer.files)
            _save_state(work, state)
            track.stage_done(planned[0])
        else:
            x_ref, x_cmp = _load_hidden(work, state["next"])

        # Layer by layer: the original on all rows (routing statistics from the calibration
        # rows), prune, then the compressed layer on the held-out rows while writing it.
        ref_pass = StreamedWeights(source)
        for i in range(max(state["next"], 0), L):
            # The feed-forward halves below run inside streamed.layer, within this iteration.
            moe = cfg.is_moe_layer(i)
            stats = ExpertStats(cfg.n_routed_experts) if moe else None
            router = {}

            def tick(e, skipped=False):
                credit = 0
                if skipped:
                    p = f"model.layers.{i}.mlp.experts.{e}."
                    credit = sum(source.nbytes(p + k + ".weight") for k in ("gate_proj", "up_proj", "down_proj"))
                track.update(credit, event=e % 16 == 15)

            def reference_ff(h):
                if not moe:
                    track.phase("mlp", i)
                    return streamed.mlp(ref_pass, i, h)
                track.phase("experts", i)
                out, router["gate"], router["bias"] = streamed.moe_reference(ref_pass, i, h, cfg, fit_s.tokens,
                                                                             stats, tick)
                return out

            track.phase("attention", i)
            x_ref = streamed.layer(ref_pass, i, x_ref, ref_s, cfg, window, reference_ff)
            if moe:
                kept = select_experts(_expert_scores(stats, method, seed, i), n_keep, gplan, cfg.n_group)
                orig = source.original_ids(i)
                state["kept"][str(i)] = [orig[e] for e in kept]
                state["layers"][str(i)] = {"experts": orig, "counts": [int(v) for v in stats.counts],
                                           "saliency": [round(float(v), 6) for v in stats.saliency]}
            track.phase("compressed", i)
            with torch.device("meta"):
                block = Block(pcfg, i)
                if quant == "int8":
                    quantize_model(block, mode="w8a8")
            file_name = f"model-layer-{i:03d}.safetensors"
            f = _open_file(writer, file_name, [(block, f"model.layers.{i}.")], store)
            cmp_pass = StreamedWeights(source, f, quant, store)

            def compressed_ff(h):
                if not moe:
                    return streamed.mlp(cmp_pass, i, h)
                return streamed.moe_compressed(cmp_pass, i, h, cfg, pcfg, kept, router["gate"], router["bias"],
                                               lambda j: track.update(event=j % 16 == 15))

            x_cmp = streamed.layer(cmp_pass, i, x_cmp, held_s, cfg, window, compressed_ff)
            writer.commit(file_name, f)
            _save_hidden(work, i + 1, x_ref, x_cmp)
            state.update(next=i + 1, files=writer.files)
            _save_state(work, state)
            for old in work.glob(f"hidden-{i:04d}-*.npy"):
                old.unlink()
            track.stage_done(planned[i + 1])

        # Final norm and output head, and the quality report.
        track.phase("head")
        with torch.device("meta"):
            head = torch.nn.Module()
            head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            head.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if quant == "int8":
                quantize_model(head, mode="w8a8")
        extra = {}
        if adapter is not None:
            extra = {f"adapter.{k}": (v.dtype, tuple(v.shape)) for k, v in adapter.state_dict().items()}
        f = _open_file(writer, "model-head.safetensors", [(head.norm, "model.norm."), (head.lm_head, "lm_head.")],
                       store, extra)
        for k, v in adapter.state_dict().items() if adapter is not None else ():
            f.assign(f"adapter.{k}", slice(None), v)
        cmp_pass = StreamedWeights(source, f, quant, store)
        x_held = x_ref[fit_s.tokens:]
        if cal.mode == "lm":
            ids = held_s.rows
            targets = torch.cat([torch.cat([r[1:], torch.tensor([-100])]) for r in ids]) if ids else \
                torch.zeros(0, dtype=torch.long)
            quality = streamed.head_lm(cmp_pass, x_held, x_cmp, targets, cfg)
        else:
            with torch.no_grad():
                norm_ref = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                norm_ref.weight.copy_(source.get("model.norm.weight"))
                norm_cmp = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                norm_cmp.weight.copy_(cmp_pass.vector("model.norm.weight"))
            streamed.write_head(cmp_pass, cfg)
            quality = sensor_quality([x_held], [x_cmp], norm_ref, norm_cmp, adapter)
        quality["held_out_rows"] = len(held.rows)
        quality["on_calibration_data"] = held is cal
        writer.commit("model-head.safetensors", f)
        track.phase(None)
        bar.n = bar.total
        bar.close()

        copy_text_files(src, writer)
        package_bytes = sum(f["bytes"] for f in writer.files.values())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"r1edge {r1edge_version()}",
            "config": pcfg.to_dict(),
            "quantization": ({"scheme": "w8a8-int8", "weights": "per-output-channel symmetric int8",
                              "activations": "per-token dynamic int8",
                              "float": f"embeddings and norms {str(store).removeprefix('torch.')}, "
                                       "router float32"}
                             if quant == "int8" else
                             {"scheme": "none", "float": f"{str(store).removeprefix('torch.')}, router float32"}),
            "experts": {"kept": state["kept"], "original_n_routed_experts": source.original_n_routed,
                        "method": method, "seed": seed if method == "random" else None,
                        "groups": {"rule": gplan["rule"], "original_n_group": cfg.n_group,
                                   "original_topk_group": cfg.topk_group,
                                   "n_group": pcfg.n_group, "topk_group": pcfg.topk_group}},
            "io": source.io,
            "calibration": {"file": Path(cal.source).name, "mode": cal.mode, "rows": len(fit.rows),
                            "tokens": fit.tokens, "held_out_rows": len(held.rows),
                            "held_out_tokens": held.tokens, "window": window, "layers": state["layers"]},
            "quality": quality,
            "size": {"source_bytes": source.size_bytes, "package_bytes": package_bytes,
                     "ratio": package_bytes / source.size_bytes},
        }
        result = writer.finish(manifest)
    shutil.rmtree(work)
    return result


def render_report(manifest: dict[str, Any], out=None) -> None:
    """Print the compression report: experts kept per layer, size before/after, quality."""
    import sys
    w = (out or sys.stdout).write
    ex, size, q = manifest["experts"], manifest["size"], manifest["quality"]
    w(f"Experts kept per MoE layer ({ex['method']}, of {ex['original_n_routed_experts']}; groups "
      f"{ex['groups']['rule']}: n_group {ex['groups']['n_group']}, topk_group {ex['groups']['topk_group']}):\n")
    for layer, ids in ex["kept"].items():
        w(f"  layer {int(layer):3d}: {len(ids):4d}  {ids}\n")
    if not ex["kept"]:
        w("  (no MoE layers)\n")
    w(f"Quantization: {manifest['quantization']['scheme']}\n")
    w(f"Size: {size['source_bytes'] / 1e6:.2f} MB -> {size['package_bytes'] / 1e6:.2f} MB "
      f"({size['ratio']:.3f}x)\n")
    where = "calibration rows (only one row: none held out)" if q["on_calibration_data"] else \
        f"{q['held_out_rows']} held-out rows"
    if q["mode"] == "lm":
        w(f"Quality vs the uncompressed model on {where}, {q['tokens']} tokens:\n"
          f"  greedy-token agreement {q['greedy_agreement']:.4f}, logits cosine {q['logits_cosine']:.4f}")
        if q["nll_original"] is not None:
            w(f", next-token NLL {q['nll_original']:.4f} -> {q['nll_compressed']:.4f}")
        w("\n")
    else:
        w(f"Quality vs the uncompressed model on {where}, {q['frames']} frames (full causal attention; "
          f"r1edge eval measures with the deployment's window), range = {q['range']}:\n")
        for name, e in q["outputs"].items():
            w(f"  {name:<16} rms {e['rms']:.5g} ({100 * e['rms_frac_range']:.2f}% of range)  "
              f"max {e['max_abs']:.5g} ({100 * e['max_frac_range']:.2f}%)\n")

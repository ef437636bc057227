"""Flight recordings: what the controller writes (``recording_header``, ``cycle_record``), their
inputs read back as a source for ``Controller.run``, and ``replay``, which re-runs one and
checks every output bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from runtime.control.loop import fill_gaps
from runtime.control.recorder import RecordingReader
from runtime.control.safety import (MODE_NAMES, REASON_ERROR, REASON_INPUT, REASON_KEEPS_OUTPUTS, REASON_NAMES,
                                    STATUS_NAMES, OutputLimit, OutputLimiter)
from sdk.service.engines import build_engine
from sdk.tools.package import package_identity

def recording_header(ctrl) -> dict:
    """The header record of a controller's (``sdk.Controller``) flight recording."""
    cfg = ctrl.config
    return {"package": package_identity(cfg.model.path), "config": cfg.to_dict(),
            "inputs": ctrl.model_inputs, "outputs": ctrl.output_names,
            "capacity": ctrl.cycle.capacity, "window": ctrl.window,
            "period_ns": cfg.loop.period_ns,
            "output_limits": [[o.name, o.min, o.max, o.max_rate, o.failsafe, o.jump] for o in ctrl.output_limits],
            "aux_inputs": ctrl.aux_inputs, "track": ctrl.track, "warmup_cycles": cfg.loop.warmup_cycles,
            "shadow": None if cfg.shadow is None else package_identity(cfg.shadow.path),
            "parallel": None if ctrl.ranks is None else {
                "world_size": ctrl.engine.world_size, "backend": cfg.model.parallel.backend,
                "split": [list(s) for s in ctrl.engine.split]},
            "advisor": None if ctrl.advisor is None else ctrl.advisor.header()}


def cycle_record(ctrl, seq: int, t_ns: int, timing: tuple[int, int, int, int]) -> dict:
    """One cycle's record: per active stream the inputs as given, model outputs (when the
    model answered), final outputs, status; timings [read, infer, write, lateness] ns."""
    c, names, advisor = ctrl.cycle, ctrl.streams.names, ctrl.advisor
    streams = []
    for slot in ctrl.active:
        reason = int(c.reason[slot])
        ran = bool(c.ran[slot])
        entry = {"s": names[slot], "slot": slot, "x": c.values[slot].tolist(),
                 "st": STATUS_NAMES[int(c.status[slot])], "why": REASON_NAMES[reason], "ran": ran,
                 "y": c.raw[slot].tolist() if ran and REASON_KEEPS_OUTPUTS[reason] else None,
                 "out": c.out[slot].tolist(), "mode": MODE_NAMES[int(c.mode[slot])]}
        if c.started[slot]:
            entry["pre"] = True                       # history reset and filled from this frame
        elif c.filled[slot]:
            entry["fill"] = int(c.filled[slot])       # copies of this frame filled a gap first
        if reason == REASON_INPUT:
            entry["bad"] = c.guard.invalid_inputs(slot)
        elif reason == REASON_ERROR:
            entry["error"] = c.last_error
        if advisor is not None and slot == advisor.slot:
            entry["adv"] = advisor.entry()
        streams.append(entry)
    return {"type": "cycle", "seq": seq, "t_ns": t_ns, "hb": c.heartbeat, "streams": streams, "timing": list(timing)}


def render_replay(report: dict) -> None:
    """Print a replay report for people."""
    print(f"recording  {report['recording']} ({len(report['segments'])} segment(s))")
    print(f"package    {report['package']}" + ("" if report["package_match"] is None else
                                               "  (matches the recording)" if report["package_match"]
                                               else "  (DIFFERS from the recorded package)"))
    print(f"cycles {report['cycles']}  model steps {report['stream_steps']}  model outputs compared "
          f"{report['model_outputs_compared']}  final outputs compared {report['final_outputs_compared']}")
    adv = report.get("advisor")
    if adv:
        print(f"advisor    {adv['advice_records']} answers: {adv['prompts_compared']} prompts, "
              f"{adv['advice_tokens_compared']} tokens, {adv['decisions_compared']} decisions and "
              f"{adv['setpoint_cycles_compared']} cycles of setpoints compared")
    stop = report["stop"]
    if stop and stop["reason"] != "end":
        print(f"stopped at {stop['file']}:{stop['offset']} ({stop['reason']}): "
              + ("the last record is incomplete" if stop["reason"] == "truncated" else
                 "the records from there on were not read"))
    if report["identical"]:
        print("IDENTICAL: every output is bitwise identical")
    else:
        m = report["first_mismatch"]
        print(f"DIFFERENT: {report['mismatches']} mismatches; first at seq {m['seq']} stream {m['stream']!r} "
              f"({m['what']}): recorded {m['recorded']} replayed {m['replayed']}")


# ---------------------------------------------------------------------------- recordings

def recorded_inputs(path: str | Path) -> Iterator[dict[str, dict[str, float]]]:
    """The inputs of a flight recording, cycle by cycle: ``{stream: {input: value}}``.

    Inputs that were missing when recorded are left out, so they are missing again.
    """
    reader = RecordingReader(path)
    names: list[str] = []
    for rec in reader:
        if rec.get("type") == "header":
            names = rec["inputs"] + rec.get("aux_inputs", [])
            continue
        if rec.get("type") != "cycle":
            continue
        frames = {}
        for e in rec["streams"]:
            missing = {k for k, why in (e.get("bad") or {}).items() if why == "missing"}
            frames[e["s"]] = {n: v for n, v in zip(names, e["x"]) if n not in missing}
        yield frames


def recording_source(path: str | Path, *, loop: bool = False) -> Callable[[int, int], Mapping[str, Any]]:
    """A ``run(source=...)`` callable feeding a recording's inputs, one recorded cycle per tick
    (restarting at the end with ``loop``; else the inputs stop and go stale)."""
    it = iter(recorded_inputs(path))

    def source(seq: int, t_ns: int):
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            if not loop:
                return {}
            it = iter(recorded_inputs(path))
            return next(it, {})
    return source


def replay(recording: str | Path, *, package: str | Path | None = None, engine=None,
           advisor_package: str | Path | None = None) -> dict:
    """Re-run a flight recording and compare every output bit for bit.

    The engine is rebuilt from the package named in the header (or ``package``; or the given
    ``engine``). Each recorded cycle's inputs go in, in the recorded stream order (slot order for a
packed cycle) and slots;
    the model's outputs are compared with the recorded ones wherever the model answered, and
    the final outputs are recomputed through the recorded output limits and statuses and
    compared too. With an advisor, each answer's prompt is re-rendered and its tokens and
    decision regenerated on the advisor's language model (the recorded one, or
    ``advisor_package``), and the setpoints the model saw are recomputed
    (``sdk.service.advisor.AdviceReplay``). Warm-ups and filled gaps are replayed where recorded (the
    slot's history reset and filled from that frame, or the gap filled with copies of it), and
    tracking outputs follow their recorded tracking inputs. Reading stops at the first
    incomplete record (a killed process). Returns a report with ``identical``, counts and
    ``first_mismatch``.
    """
    reader = RecordingReader(recording)
    records = iter(reader)
    header = next(records, None)
    if header is None or header.get("type") != "header":
        raise ValueError(f"{recording}: not a flight recording (no header record)")
    if header.get("segment", 0) != 0:
        raise ValueError(f"{reader.segments[0]}: recording starts at segment {header['segment']}; "
                         "replay needs segment 0 to rebuild the model state")
    recorded_pkg = header.get("package") or {}
    pkg = package if package is not None else recorded_pkg.get("path")
    pkg_path = Path(pkg) if pkg else None
    package_match = None
    if engine is None:
        if pkg_path is None:
            raise ValueError(f"{recording}: the header names no package; pass package=")
        engine = build_engine(pkg_path, device=header["config"]["model"]["device"],
                              capacity=header["capacity"], window=header["window"])
    if pkg_path is not None and (pkg_path / "manifest.json").is_file():
        package_match = package_identity(pkg_path)["manifest_sha256"] == recorded_pkg.get("manifest_sha256")
    if list(engine.input_names) != header["inputs"] or list(engine.output_names) != header["outputs"]:
        raise ValueError(f"{recording}: recorded signals {header['inputs']} -> {header['outputs']} do not "
                         f"match the model's {engine.input_names} -> {engine.output_names}")
    capacity = header["capacity"]
    n_feat = len(header["inputs"])
    all_inputs = header["inputs"] + header.get("aux_inputs", [])
    track = header.get("track") or [None] * len(header["outputs"])
    limiter = OutputLimiter([OutputLimit(*lim) for lim in header["output_limits"]], capacity,
                            header["period_ns"] / 1e9, [all_inputs.index(t) if t else -1 for t in track])
    history = np.zeros((max(header["window"] - 1, 0), n_feat), np.float32)
    raw = np.full((capacity, len(header["outputs"])), np.nan)
    out = np.empty_like(raw)
    values = np.zeros((capacity, len(all_inputs)))
    status = np.zeros(capacity, np.int8)
    active = np.zeros(capacity, bool)
    tracking = np.zeros(capacity, bool)
    seen: set[int] = set()
    codes = {name: i for i, name in enumerate(STATUS_NAMES)}
    report = {"recording": str(recording), "segments": [str(p) for p in reader.segments],
              "package": None if pkg_path is None else str(pkg_path), "package_match": package_match,
              "cycles": 0, "stream_steps": 0, "model_outputs_compared": 0, "final_outputs_compared": 0,
              "mismatches": 0, "first_mismatch": None}

    advice = None
    if header.get("advisor"):
        from sdk.service.advisor import AdviceReplay

        advice = AdviceReplay(header, header["inputs"], package=advisor_package)

    def mismatch(rec, e, what, recorded, replayed):
        report["mismatches"] += 1
        if report["first_mismatch"] is None:
            report["first_mismatch"] = {"seq": rec["seq"], "stream": e["s"], "what": what,
                                        "recorded": recorded, "replayed": replayed}

    for rec in records:
        if rec.get("type") == "advice" and advice is not None:
            for what, recorded, replayed in advice.advice(rec):
                mismatch(rec, {"s": advice.h["stream"]}, what, recorded, replayed)
            continue
        if rec.get("type") != "cycle":
            continue
        report["cycles"] += 1
        entries = rec["streams"]
        if advice is not None:
            for e in entries:
                for what, recorded, replayed in advice.entry(e):
                    mismatch(rec, e, what, recorded, replayed)
        for e in entries:
            if e["slot"] not in seen:
                seen.add(e["slot"])
                engine.reset_slot(e["slot"])
                limiter.reset(e["slot"])
        # A step that raised is taken not to have advanced the engine (its checks come first).
        ran = [e for e in entries if e["ran"] and e["why"] != "error"]
        y = None
        if ran:
            report["stream_steps"] += len(ran)
            slots = np.array([e["slot"] for e in ran], dtype=np.int64)
            feats = np.array([e["x"][:n_feat] for e in ran], dtype=np.float64).astype(np.float32)
            try:
                fill_gaps(engine, slots, feats, np.array([bool(e.get("pre")) for e in ran]),
                          np.array([e.get("fill", 0) for e in ran], dtype=np.int64), history)
                y = np.array(engine.step_sensor(slots, feats), dtype=np.float64)
            except Exception as exc:                          # compared below like any output
                y = exc
        active.fill(False)
        for i, e in enumerate(ran):
            if e["y"] is None:
                continue
            report["model_outputs_compared"] += 1
            if isinstance(y, Exception):
                mismatch(rec, e, "model raised", e["y"], f"{type(y).__name__}: {y}")
                continue
            raw[e["slot"]] = y[i]
            if np.array(e["y"], dtype=np.float64).tobytes() != y[i].tobytes():
                mismatch(rec, e, "model outputs", e["y"], y[i].tolist())
        tracking.fill(False)
        for e in entries:
            active[e["slot"]] = True
            status[e["slot"]] = codes[e["st"]]
            tracking[e["slot"]] = e.get("mode", "auto") != "auto"
            values[e["slot"]] = e["x"]
        limiter.apply(raw, status, active, out, tracking, values)
        for e in entries:
            report["final_outputs_compared"] += 1
            if np.array(e["out"], dtype=np.float64).tobytes() != out[e["slot"]].tobytes():
                mismatch(rec, e, "final outputs", e["out"], out[e["slot"]].tolist())
    if advice is not None:
        report["advisor"] = dict(advice.counts)
    stop = reader.stop
    report["stop"] = None if stop is None else {"file": stop.file, "offset": stop.offset, "reason": stop.reason}
    report["identical"] = report["mismatches"] == 0
    return report

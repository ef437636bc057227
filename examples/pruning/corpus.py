"""The three text domains the pruning model is trained and measured on, from what this machine has.

- ``python``: Python source of the packages installed beside r1edge (the interpreter's
  ``site-packages``), files in sorted path order.
- ``prose``: English prose from installed documentation: the licence texts under
  ``/usr/share/common-licenses`` and the ``.txt``/``.md``/``.rst`` files under ``/usr/share/doc``.
- ``plant``: logs of the heated tank (``sdk.demo.plant``) under its PID controller
  (``sdk.demo.expert``), one line of readings every half second, rendered as text.

Nobody working on r1edge wrote the first two; the third is what the project's own simulator
emits. Each domain is split by source (file or simulator seed): the last files (or seeds) are
held out, so no held-out text was ever trained on, not even a neighbouring chunk of the same
file. ``build`` caps each domain at ``max_bytes`` of text per split and is deterministic.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

DOMAINS = ("python", "prose", "plant")
HELD_OUT_EVERY = 10          # one source in ten is held out


def _files(roots: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out.extend(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes and not p.is_symlink())
    return sorted(set(out))


def _held(path_key: str) -> bool:
    """A source is held out by a hash of its name: stable, independent of what else is installed."""
    return int(hashlib.sha256(path_key.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


def _read_text(path: Path, limit: int = 200_000) -> str | None:
    try:
        data = path.read_bytes()[:limit]
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text:
        return None
    return text


def _collect(files: list[Path], max_bytes: int, min_chars: int = 200) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "held_out": []}
    size = {"train": 0, "held_out": 0}
    for f in files:
        split = "held_out" if _held(f.name + str(f.parent.name)) else "train"
        if size[split] >= max_bytes:
            continue
        text = _read_text(f)
        if text is None or len(text) < min_chars:
            continue
        out[split].append(text)
        size[split] += len(text)
    return out


def python_sources(max_bytes: int) -> dict[str, list[str]]:
    """Python source files of the installed packages (not r1edge's own)."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = [f for f in _files([site], (".py",)) if "r1edge" not in str(f) and "__editable__" not in f.name]
    # interleave packages so the cap takes a little of many rather than all of a few
    by_pkg: dict[str, list[Path]] = {}
    for f in files:
        by_pkg.setdefault(f.relative_to(site).parts[0], []).append(f)
    mixed, i = [], 0
    while any(i < len(v) for v in by_pkg.values()):
        mixed.extend(v[i] for v in by_pkg.values() if i < len(v))
        i += 1
    return _collect(mixed, max_bytes)


def prose_texts(max_bytes: int) -> dict[str, list[str]]:
    """Licence texts and installed documentation in plain text or Markdown."""
    files = _files([Path("/usr/share/common-licenses"), Path("/usr/share/doc")], (".txt", ".md", ".rst", ""))
    files = [f for f in files if f.suffix or f.parent == Path("/usr/share/common-licenses")]
    return _collect(files, max_bytes)


def plant_logs(max_bytes: int, held_bytes: int | None = None, *, seconds: float = 240.0,
               every_s: float = 0.5) -> dict[str, list[str]]:
    """Closed-loop runs of the heated tank, one run per seed, rendered a line per ``every_s``;
    every tenth seed is held out (up to ``held_bytes``, default ``max_bytes``)."""
    from sdk.demo import plant as P
    from sdk.demo.expert import ExpertController

    out: dict[str, list[str]] = {"train": [], "held_out": []}
    size = {"train": 0, "held_out": 0}
    cap = {"train": max_bytes, "held_out": held_bytes or max_bytes}
    seed = 0
    while any(size[k] < cap[k] for k in cap):
        split = "held_out" if seed % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
        seed += 1
        if size[split] >= cap[split]:
            continue
        log = P.simulate(seed - 1, ExpertController(), seconds)
        step = max(1, round(every_s / float(log["t"][1] - log["t"][0])))
        lines = [f"# plant run seed={seed - 1}"]
        for i in range(0, len(log["t"]), step):
            lines.append(
                f"t={log['t'][i]:7.2f} level={log['level_meas'][i]:.3f} sp={log['level_sp'][i]:.3f} "
                f"temp={log['temp_meas'][i]:.2f} tsp={log['temp_sp'][i]:.1f} tin={log['inflow_temp'][i]:.2f} "
                f"valve={log['valve_cmd'][i]:.3f} heater={log['heater_cmd'][i]:.3f} leak={log['leak'][i]:.3f}")
        text = "\n".join(lines) + "\n"
        out[split].append(text)
        size[split] += len(text)
    return out


def build(max_bytes: int = 1_500_000, held_bytes: int | None = None) -> dict[str, dict[str, list[str]]]:
    """``{domain: {"train": [texts], "held_out": [texts]}}``; held-out splits capped at
    ``held_bytes`` (default a tenth of ``max_bytes``)."""
    held_bytes = held_bytes or max_bytes // 10
    out = {}
    for name, fn in (("python", python_sources), ("prose", prose_texts), ("plant", plant_logs)):
        d = fn(max_bytes, held_bytes) if fn is plant_logs else fn(max_bytes)
        total = 0
        keep = []
        for t in d["held_out"]:
            if total >= held_bytes:
                break
            keep.append(t)
            total += len(t)
        out[name] = {"train": d["train"], "held_out": keep}
    return out

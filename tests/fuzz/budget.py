"""Budgets, rates and the kept corpus shared by every fuzz target under tests/fuzz.

In the suite each target tries ``R1EDGE_FUZZ_EXAMPLES`` inputs (default 200: seconds per
target). The long mode is the same tests with a larger budget, for example::

    R1EDGE_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/fuzz -p no:randomly -s

Inputs that once made a target fail are kept as files under ``tests/fuzz/corpus/<target>/``
and replayed on every run (:func:`corpus`). Each target counts the inputs it tried
(:func:`tried`); the suite's summary prints inputs per second per target.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("R1EDGE_FUZZ_EXAMPLES", "200"))
CORPUS = Path(__file__).resolve().parent / "corpus"
RATES: dict[str, list[float]] = {}      # target -> [inputs tried, seconds spent in the target]


def budget(examples: int | None = None) -> settings:
    """Hypothesis settings for a fuzz target: the run's budget, no deadline (the machine is
    shared), no example database (the kept corpus is the memory), no health-check vetoes."""
    return settings(max_examples=examples or EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class tried:
    """Context manager counting one input of ``target`` and the time spent on it."""

    def __init__(self, target: str):
        self.target = target

    def __enter__(self) -> "tried":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        rate = RATES.setdefault(self.target, [0, 0.0])
        rate[0] += 1
        rate[1] += time.perf_counter() - self.t0


def corpus(target: str) -> list[Path]:
    """The kept inputs of ``target`` (files under ``tests/fuzz/corpus/<target>/``), sorted."""
    folder = CORPUS / target
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def tree_paths(tree: dict | list, prefix: tuple = ()) -> list[tuple]:
    """Every path (the keys and indices from the root) to a value in a parsed TOML or JSON tree,
    the places a fuzz target may mutate."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        out.append(prefix + (k,))
        if isinstance(v, (dict, list)):
            out += tree_paths(v, prefix + (k,))
    return out

"""Kept for imports written before the CPU engine moved to :mod:`runtime.cpu.engine`."""
from runtime.cpu.engine import Engine

__all__ = ["Engine"]

"""Real-time settings for the loop's threads: SCHED_FIFO and CPU affinity, ``mlockall``, and
the compute threads of the Numba kernels. Each setter reports what the OS granted (or why not)
and returns a function that undoes it. Re-exported by :mod:`runtime.control.loop`."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_thread_realtime(priority: int | None, cpus: Sequence[int] | None) -> tuple[dict, Callable[[], None]]:
    """Give the calling thread SCHED_FIFO ``priority`` and pin it to ``cpus`` where permitted.

    Returns ``({"sched_fifo": {...}, "affinity": {...}}, restore)``; each entry says whether it
    was ``applied`` and a ``detail`` (or the reason it was not). ``restore()`` undoes what was
    applied, and must be called from the same thread.
    """
    report, undo = {}, []
    if priority is not None:
        try:
            old_policy, old_param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            undo.append(lambda: os.sched_setscheduler(0, old_policy, old_param))
            report["sched_fifo"] = {"applied": True, "detail": f"priority {priority}"}
        except (OSError, AttributeError) as exc:
            report["sched_fifo"] = {"applied": False, "detail": f"{type(exc).__name__}: {exc}"}
    if cpus is not None:
        try:
            old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, set(cpus))
            undo.append(lambda: os.sched_setaffinity(0, old))
            report["affinity"] = {"applied": True, "detail": f"cpus {sorted(cpus)}"}
        except (OSError, AttributeError, ValueError) as exc:
            report["affinity"] = {"applied": False, "detail": f"{type(exc).__name__}: {exc}"}

    def restore() -> None:
        for fn in reversed(undo):
            try:
                fn()
            except OSError as exc:
                logger.warning("could not restore thread scheduling: %s", exc)
    return report, restore


def lock_memory() -> tuple[dict, Callable[[], None]]:
    """``mlockall`` (current and future pages, locked as they fault in where the kernel allows).

    Returns ``({"applied": bool, "detail": str}, restore)``.
    """
    try:
        libc = _libc()
    except OSError as exc:
        return {"applied": False, "detail": f"no libc: {exc}"}, lambda: None
    for flags, detail in ((MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, "MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT"),
                          (MCL_CURRENT | MCL_FUTURE, "MCL_CURRENT|MCL_FUTURE")):
        if libc.mlockall(flags) == 0:
            return {"applied": True, "detail": detail}, lambda: libc.munlockall()
        err = ctypes.get_errno()
        if err != 22:                                   # EINVAL: MCL_ONFAULT unknown; retry without
            break
    return {"applied": False, "detail": os.strerror(err)}, lambda: None


def default_cpu() -> int | None:
    """The CPU the loop is pinned to by default: the last one this process may run on."""
    try:
        return max(os.sched_getaffinity(0))
    except (OSError, AttributeError, ValueError):
        return None


def set_compute_threads(n: int) -> int:
    """Threads for the parallel (Numba) kernels launched from the calling thread; returns the
    count set. Numba's setting is per launching thread, so this is called in the inference
    thread. One thread keeps a whole engine step inside that thread, the only one given
    real-time priority: a parallel region waits for its slowest pool thread, and an ordinary
    pool thread preempted by another process stalls the step (measured: p99 of a one-stream
    step 8 ms with one thread, 155 ms with two, on two loaded cores)."""
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


@dataclass
class RealtimeOptions:
    """What ``PeriodicLoop.run`` attempts: SCHED_FIFO at ``priority`` (helpers one below), pinning
    to ``cpu`` (None: the last allowed CPU) and ``mlockall``. ``switch_interval_s`` is the GIL
    switch interval while the loop runs, so that the loop and inference threads get the
    interpreter back quickly from a busy thread; the loop uses this default without realtime
    settings too."""

    priority: int = 80
    cpu: int | None = None
    lock_memory: bool = True
    switch_interval_s: float = 0.0005

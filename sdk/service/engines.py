"""Building the controller's engine: the CPU engine, the CUDA engine, or this rank's share of the
expert-parallel engine, and the ranks of ``[model] parallel`` (``ParallelRanks``)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sdk.service.config import ConfigError, DeployConfig

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0      # a silent start-up stage says it is still at work this often


@contextmanager
def progress(stage: str, *, every_s: float = PROGRESS_EVERY_S, log: logging.Logger = logger,
             clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Log ``"<stage> ... N s"`` every ``every_s`` seconds while the body runs (from a daemon
    thread: the body may be Numba compiling for a minute on a first run), so a long start-up
    stage is never silent. ``clock`` is injectable for tests."""
    t0, stop, start = clock(), threading.Event(), time.monotonic()

    def beat() -> None:
        k = 1
        while not stop.wait(max(0.0, start + k * every_s - time.monotonic())):   # on a fixed grid: no drift
            log.info("%s ... %.0f s", stage, clock() - t0)
            k += 1
    thread = threading.Thread(target=beat, name="r1edge-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def build_engine(path: str | Path, *, device: str = "cpu", capacity: int = 1, window: int = 32, group=None,
                 public_key: list[Path] | None = None):
    """The stream engine over a sensor-mode package (refuses an LM-only package): the Numba
    engine on the CPU, the graph-captured device engine on CUDA; with a process ``group``, this
    rank's share of the expert-parallel engine (``runtime.cpu.parallel``). With ``public_key``
    (``[model] public_key``) the package must be signed by one of those keys and unchanged."""
    from sdk.tools.loading import load_model

    model = load_model(path, public_key=public_key or None)
    if getattr(model, "adapter", None) is None:
        raise ValueError(f"{path}: the model has no I/O adapter; a controller needs a sensor-mode package")
    if group is not None:
        from runtime.cpu.parallel import ParallelEngine

        return ParallelEngine(model, capacity=capacity, window=window, group=group)
    if str(device).startswith("cuda"):
        from runtime.cuda.engine import DeviceEngine

        return DeviceEngine(model, capacity=capacity, window=window, device=device)
    from runtime.cpu.engine import Engine

    return Engine(model, capacity=capacity, window=window)


def warm_up(engine, worker, capacity: int, window: int, what: str = "", steps: int = 3) -> int:
    """The first engine steps, in the thread that will run them (``worker``, an
    ``InferenceWorker``: its thread pool starts, caches and pages warm up), at full batch and at
    one stream, and a history fill of ``window - 1`` frames; then every slot is reset, so no
    stream ever sees them. Returns the mean step time in ns."""
    from runtime.control.loop import fill_history

    slots = np.arange(capacity, dtype=np.int64)
    feats = np.zeros((capacity, len(engine.input_names)), dtype=np.float32)
    history = np.zeros((window - 1, feats.shape[1]), np.float32)

    def job() -> int:
        fill_history(engine, 0, history)
        t0 = time.monotonic_ns()
        for n in (capacity, 1):
            for _ in range(steps):
                engine.step_sensor(slots[:n], feats[:n])
        t1 = time.monotonic_ns()
        for slot in range(capacity):
            engine.reset_slot(slot)
        return (t1 - t0) // (2 * steps)
    logger.info("%swarm-up: %d engine steps in the %s thread", what, 2 * steps, worker.name)
    with progress(f"{what}warm-up"):
        return worker.run_sync(job, timeout_s=600.0)


def match_signals(source, what: str, configured: list[str], model: list[str]) -> None:
    """Refuse (``ConfigError``) a config whose ``what`` ("inputs"/"outputs") are not the model's."""
    missing = [n for n in model if n not in configured]
    extra = [n for n in configured if n not in model]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model's {', '.join(map(repr, missing))} not configured")
        if extra:
            parts.append(f"{', '.join(map(repr, extra))} not in the model (model {what}: {', '.join(model)})")
        raise ConfigError(f"{source}: {what}: " + "; ".join(parts))


def build_engine_logged(path: str | Path, cfg: DeployConfig, capacity: int, what: str, group=None, *,
                        every_s: float = PROGRESS_EVERY_S):
    """``build_engine`` for a controller, saying what it does first (a first run compiles) and,
    every ``every_s`` seconds until it is built, how long it has been at it."""
    logger.info("%sengine: loading %s and building the engine (its Numba kernels compile on a first run, "
                "about 50 s on 2 cores; later runs load them from the on-disk cache) ...", what, path)
    t0 = time.perf_counter()
    with progress(f"{what}engine: building", every_s=every_s):
        engine = build_engine(path, device=cfg.model.device, capacity=capacity, window=cfg.model.window,
                              group=group, public_key=cfg.model.public_key)
    logger.info("%sengine ready in %.1f s", what, time.perf_counter() - t0)
    return engine


class ParallelRanks:
    """This process's place among the ranks of ``[model] parallel``: its ``rank``, the process
    ``group`` the engine exchanges over, and the ranks it started (``procs``, local ones).

    :meth:`join` takes the rank from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when set, else makes this process rank 0 and starts
    ranks 1..N-1 here (each re-reads the deployment file, ``cfg.source``, and loads the package
    itself). A rank other than 0 calls :meth:`serve` (the controller runs on rank 0).
    """

    def __init__(self, rank: int, group, procs: list):
        self.rank, self.group, self.procs = rank, group, procs

    @classmethod
    def join(cls, cfg: DeployConfig) -> "ParallelRanks":
        """Join (or, without torchrun, start and join) the ranks of ``cfg.model.parallel``."""
        from runtime.cpu.parallel import init_process_group

        par = cfg.model.parallel
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if int(os.environ["WORLD_SIZE"]) != par.world_size:
                raise ConfigError(f"{cfg.source}: model.parallel.world_size ({par.world_size}) differs from "
                                  f"torchrun's WORLD_SIZE ({os.environ['WORLD_SIZE']})")
            rank = int(os.environ["RANK"])
            logger.info("expert parallel: rank %d of %d (torchrun)", rank, par.world_size)
            return cls(rank, init_process_group(par.backend, timeout_s=par.timeout_s), [])
        port = par.master_port or _free_port(par.master_addr)
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_serve_rank, args=(cfg.source, rank, port), name=f"r1edge-rank{rank}",
                             daemon=True) for rank in range(1, par.world_size)]
        for p in procs:
            p.start()
        logger.info("expert parallel: rank 0 of %d, ranks 1..%d started here (pids %s), %s:%d", par.world_size,
                    par.world_size - 1, [p.pid for p in procs], par.master_addr, port)
        try:
            group = init_process_group(par.backend, rank=0, world_size=par.world_size,
                                       master_addr=par.master_addr, master_port=port, timeout_s=par.timeout_s)
        except BaseException:
            cls(0, None, procs).close(None)
            raise
        return cls(0, group, procs)

    def serve(self, cfg: DeployConfig) -> int:
        """A rank other than 0: build its share of the engine and serve rank 0 until it stops;
        the exit status (0 when rank 0 stopped it, 1 when a rank or the leader failed)."""
        from runtime.cpu.parallel import RankFailure, leave_process_group

        engine = build_engine(cfg.model.path, device=cfg.model.device, capacity=cfg.model.streams,
                              window=cfg.model.window, group=self.group, public_key=cfg.model.public_key)
        logger.info("expert parallel: rank %d serves routed experts %d..%d", self.rank, engine.experts[0],
                    engine.experts[1] - 1)
        try:
            engine.serve()
        except RankFailure as e:
            logger.error("%s", e)
            return 1
        finally:
            leave_process_group()
        return 0

    def close(self, engine) -> None:
        """Rank 0 at the end: stop the other ranks (when the engine still works), wait for the
        local ones (killing any still there after 10 s), leave the group."""
        from runtime.cpu.parallel import leave_process_group

        if engine is not None and engine.failure is None:
            try:
                engine.close()
            except Exception as e:                       # a rank died between the last step and now
                logger.error("stopping the other ranks: %s", e)
        for p in self.procs:
            p.join(timeout=10.0)
            if p.is_alive():
                p.kill()
                p.join()
        leave_process_group()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_rank(config_path: str, rank: int, port: int) -> None:
    """Entry of a rank started by :meth:`ParallelRanks.join` (a spawned process)."""
    import sys

    from runtime.cpu.parallel import init_process_group

    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    cfg = DeployConfig.load(config_path, check_sources=False)
    par = cfg.model.parallel
    group = init_process_group(par.backend, rank=rank, world_size=par.world_size, master_addr=par.master_addr,
                               master_port=port, timeout_s=par.timeout_s)
    sys.exit(ParallelRanks(rank, group, []).serve(cfg))

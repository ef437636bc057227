"""Expert parallelism over torch.distributed: the stream engine split across N ranks, bitwise
equal to one process.

Every rank holds the whole model except the routed experts, which are split contiguously:
rank r holds experts ``split[r] = (lo, hi)`` of every MoE layer (:func:`expert_split`).
Attention, dense layers, shared experts, the router and the latent caches are replicated: each
rank runs them on every row of every pass, in the same code on the same inputs, so they agree
bit for bit. Per MoE layer each rank runs its experts over the tokens routed to them; the
dispatch plan is expert-major (``runtime.model.routing``), so a rank's (token, expert) outputs fill
one contiguous range of the assignment rows, and one all-gather of those rows (padded to the
largest share, in preallocated buffers) gives every rank every row. The combine then sums a
token's expert outputs in its top-k order, exactly as one process does: nothing is ever summed
across ranks, so no reduction order can depend on the world size.

Rank 0 (the leader) owns the inputs: every step, prefill or reset is first broadcast to the
other ranks (followers, in :meth:`ParallelEngine.serve`) as a fixed-size command, then every
rank runs the same pass stage by stage (``runtime.cpu.kernels``: ``begin_pass``, per layer
``layer_front`` / exchange / ``layer_back``, ``end_pass``); only the leader computes the head.

Failure: a collective with a dead peer raises at once (gloo sees the closed connection); a
stalled one raises after the process group's timeout. Either way the engine is broken from
then on (the ranks' states may differ) and every later call raises :class:`RankFailure`.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from runtime.cpu.engine import PREFILL_ROWS, Engine
from runtime.cpu.kernels import (OK, PREFILL_SENSOR, STEP_SENSOR, STEP_TOKENS, begin_pass, check_pass,
                                 end_pass, layer_back, layer_front)
from runtime.cpu.state import F32
from runtime.model.transformer import Transformer

_RESET_SLOT, _RESET_ALL, _STOP = 10, 11, 12
_HEADER = 4                    # command words before the payload: op, n, slot, last


class RankFailure(RuntimeError):
    """A collective failed (a rank died, stalled past the timeout, or the engine broke before)."""


def expert_split(n_experts: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous near-equal shares of ``n_experts`` routed experts: rank r holds
    [r * E // N, (r + 1) * E // N)."""
    if world_size < 1 or world_size > max(n_experts, 1):
        raise ValueError(f"world_size {world_size}: must be 1..{n_experts} (the routed experts per layer)")
    return [(r * n_experts // world_size, (r + 1) * n_experts // world_size) for r in range(world_size)]


def init_process_group(backend: str = "gloo", *, rank: int | None = None, world_size: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None,
                       timeout_s: float = 30.0, join_timeout_s: float = 300.0):
    """Join the default process group (waiting up to ``join_timeout_s`` for every rank to
    start) and return a group of all ranks whose collectives wait at most ``timeout_s`` for a
    stalled peer. Unset arguments come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``)."""
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ["MASTER_PORT"])
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}: expected 'gloo' or 'nccl'")
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=join_timeout_s))
    return dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def leave_process_group() -> None:
    """Leave the process group (if joined). Do it before exiting, above all after a failure:
    a gloo group left broken aborts the process at interpreter exit (SIGABRT)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class ParallelEngine(Engine):
    """An :class:`Engine` whose routed experts are split across the ranks of ``group`` (the
    default process group if None; one process when none is initialised). On rank 0 it steps
    like an Engine (same methods, same results bit for bit); the other ranks call :meth:`serve`
    until rank 0 calls :meth:`close`. ``split`` is every rank's (lo, hi) share, ``exchanged_bytes`` the bytes this
    rank has received in all-gathers so far (``payload_bytes``: the part that carried outputs,
    the rest is padding to the largest share).

    The gloo backend exchanges CPU tensors; ``nccl`` would need the rows on the GPU and is not
    wired here (the engine runs on the CPU).
    """

    def __init__(self, model: Transformer, *, capacity: int = 1, window: int = 256,
                 prefill_rows: int = PREFILL_ROWS, group=None):
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self._root = dist.get_global_rank(group, 0) if group is not None else 0      # the leader's global rank
        self.split = expert_split(model.config.n_routed_experts, self.world_size)
        super().__init__(model, capacity=capacity, window=window, prefill_rows=prefill_rows,
                         experts=self.split[self.rank])
        if self.world_size > 1 and dist.get_backend(group) != "gloo":
            raise ValueError(f"backend {dist.get_backend(group)!r}: the CPU engine exchanges over gloo only")
        self._bounds = np.array([lo for lo, _ in self.split] + [self.split[-1][1]], np.int64)
        self._starts = np.zeros(self.world_size + 1, np.int32)
        b = self.buffers
        H = b.yout.shape[1]
        # A rank's share of one pass: each row's pairs with the experts it holds, at most one per expert.
        A = self.rows * min(self.rule.top_k, max(hi - lo for lo, hi in self.split))
        n_feats = b.feats.shape[1]
        self._cmd = np.zeros(_HEADER + 2 * self.rows, np.int64)
        self._cmd_feats = np.zeros((self.rows, n_feats), F32)
        self._send = np.zeros(A * H, F32)
        self._recv = np.zeros(self.world_size * A * H, F32)
        self._t_cmd, self._t_cmd_feats = torch.from_numpy(self._cmd), torch.from_numpy(self._cmd_feats)
        self._t_send, self._t_recv = torch.from_numpy(self._send), torch.from_numpy(self._recv)
        self.exchanged_bytes = 0
        self.payload_bytes = 0
        self.failure: str | None = None
        self._moe = [layer >= self.dims.first_moe for layer in range(self.dims.n_layers)]
        self._warmup_staged()

    # -- set-up --------------------------------------------------------------------------
    def _warmup(self) -> None:
        """Nothing yet: the staged kernels are compiled once the exchange is set up."""

    def _warmup_staged(self) -> None:
        """Compile (or load) the staged pass's kernels without touching any state or peer: one
        pass per input kind over slot 0, its expert rows left partly unset, then every state cleared."""
        self._pass_local(STEP_TOKENS, np.zeros(1, np.int64), np.zeros(1, np.int64), self._no_feats, 0,
                         True, exchange=False, head=self.rank == 0)
        check_pass(self.state, STEP_TOKENS, np.zeros(1, np.int64), np.zeros(1, np.int64), self._no_feats)
        if self.adapter is not None:
            self._pass_local(STEP_SENSOR, np.zeros(1, np.int64), self._no_tokens,
                             np.zeros((1, len(self.input_names)), F32), 0, True, exchange=False, head=self.rank == 0)
        Engine.reset_all(self)
        self.exchanged_bytes = self.payload_bytes = 0

    # -- the pass ------------------------------------------------------------------------
    def _pass_local(self, mode, slots, tokens, feats, t0, last, *, exchange=True, head=True) -> int:
        """One pass of this rank: the stages, with the expert exchange after each MoE layer's front."""
        st = self.state
        n = begin_pass(st, mode, slots, tokens, feats, t0)
        for layer, moe in enumerate(self._moe):
            layer_front(st, layer, n)
            if moe:
                if exchange and self.world_size > 1:
                    self._exchange()
                layer_back(st, layer, n)
        end_pass(st, mode, n, last, head)
        return n

    def _exchange(self) -> None:
        """Every rank's (token, expert) output rows into every rank's yout: one all-gather of
        each rank's contiguous range, padded to the largest."""
        yout, H = self.buffers.yout, self.buffers.yout.shape[1]
        starts = self._starts
        np.take(self.route_buffers.offsets, self._bounds, out=starts)
        widest = int(np.max(starts[1:] - starts[:-1]))
        lo, hi = int(starts[self.rank]), int(starts[self.rank + 1])
        self._send[:(hi - lo) * H] = yout[lo:hi].reshape(-1)
        dist.all_gather_single(self._t_recv[:self.world_size * widest * H], self._t_send[:widest * H],
                              group=self.group)
        recv = self._recv[:self.world_size * widest * H].reshape(self.world_size, widest, H)
        for q in range(self.world_size):
            if q != self.rank:
                a, z = int(starts[q]), int(starts[q + 1])
                yout[a:z] = recv[q, :z - a]
        self.exchanged_bytes += (self.world_size - 1) * widest * H * 4
        self.payload_bytes += (int(starts[-1]) - (hi - lo)) * H * 4

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, self._root, group=self.group)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise RankFailure(f"rank {self.rank}: the parallel engine failed before: {self.failure}")

    def _broken(self, e: Exception) -> RankFailure:
        """Mark the engine broken for good by ``e``; the error to raise."""
        self.failure = f"{type(e).__name__}: {e}"
        return RankFailure(f"rank {self.rank}: a collective failed: {self.failure}")

    def _collective(self, fn, *args) -> None:
        """Run a collective; any failure breaks the engine for good."""
        self._check_alive()
        try:
            fn(*args)
        except Exception as e:                      # gloo raises RuntimeError (and subclasses) for dead peers
            raise self._broken(e) from e

    def _command(self, op: int, n: int = 0, slot: int = 0, last: bool = True, ints=(), feats=None) -> None:
        """The leader's broadcast of one command (then its feature rows when ``feats`` is given)."""
        cmd = self._cmd
        cmd[:_HEADER] = (op, n, slot, int(last))
        at = _HEADER
        for part in ints:
            cmd[at:at + len(part)] = part
            at += len(part)
        self._collective(self._broadcast, self._t_cmd)
        if feats is not None:
            self._cmd_feats[:len(feats)] = feats
            self._collective(self._broadcast, self._t_cmd_feats)

    def _run(self, mode: int, slots: np.ndarray, tokens: np.ndarray, feats: np.ndarray) -> int:
        """The leader's step or prefill: checked, then each pass broadcast and run on every rank."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} serves experts: only rank 0 steps")
        err = check_pass(self.state, mode, slots, tokens, feats)
        if err != OK:
            return err
        self._check_alive()
        try:
            return self._staged(mode, slots, tokens, feats)
        except RankFailure:
            raise
        except Exception as e:
            raise self._broken(e) from e

    def _staged(self, mode, slots, tokens, feats) -> int:
        sensor = mode in (STEP_SENSOR, PREFILL_SENSOR)
        if mode in (STEP_TOKENS, STEP_SENSOR):
            n = len(slots)
            if self.world_size > 1:
                self._command(mode, n, ints=(slots, tokens) if not sensor else (slots,),
                              feats=feats if sensor else None)
            self._pass_local(mode, slots, tokens, feats, 0, True)
            return OK
        T = len(feats) if sensor else len(tokens)
        t0 = 0
        while t0 < T:
            n = min(self.rows, T - t0)
            last = t0 + n >= T
            if self.world_size > 1:
                self._command(mode, n, int(slots[0]), last, ints=() if sensor else (tokens[t0:t0 + n],),
                              feats=feats[t0:t0 + n] if sensor else None)
            self._pass_local(mode, slots, tokens, feats, t0, last)
            t0 += n
        return OK

    # -- state ---------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s history on every rank."""
        if self.world_size > 1:
            self._command(_RESET_SLOT, 0, int(slot))
        super().reset_slot(slot)

    def reset_all(self) -> None:
        """Forget every slot's history on every rank."""
        if self.world_size > 1:
            self._command(_RESET_ALL)
        super().reset_all()

    # -- followers -------------------------------------------------------------------------
    def serve(self) -> None:
        """A follower's loop: run every command the leader broadcasts until it sends stop.
        Raises :class:`RankFailure` when the leader or a peer is gone."""
        if self.rank == 0:
            raise RuntimeError("rank 0 leads: serve() is for the other ranks")
        cmd = self._cmd
        while True:
            self._collective(self._broadcast, self._t_cmd)
            op, n, slot, last = (int(v) for v in cmd[:_HEADER])
            if op == _STOP:
                return
            if op == _RESET_SLOT:
                super().reset_slot(slot)
                continue
            if op == _RESET_ALL:
                super().reset_all()
                continue
            sensor = op in (STEP_SENSOR, PREFILL_SENSOR)
            if sensor:
                self._collective(self._broadcast, self._t_cmd_feats)
            feats = self._cmd_feats[:n] if sensor else self._no_feats
            if op in (STEP_TOKENS, STEP_SENSOR):
                slots = cmd[_HEADER:_HEADER + n]
                tokens = self._no_tokens if sensor else cmd[_HEADER + n:_HEADER + 2 * n]
            else:
                slots, tokens = cmd[2:3], (self._no_tokens if sensor else cmd[_HEADER:_HEADER + n])
            try:
                self._pass_local(op, slots, tokens, feats, 0, bool(last), head=False)
            except RankFailure:
                raise
            except Exception as e:
                raise self._broken(e) from e

    def close(self) -> None:
        """The leader tells the followers to stop (no-op in one process or after a failure)."""
        if self.rank == 0 and self.world_size > 1 and self.failure is None:
            self._command(_STOP)


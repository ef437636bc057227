"""Streaming expert store: routed-expert int8 weights on the host, a device cache of N slots.

For packages whose routed experts do not fit in device memory. Every MoE layer's experts
stay where the host has them, typically the package's memory-mapped files (the OS page
cache: ``sdk.load_model(pkg, mmap=True)``), and the device holds ``slots`` expert-sized
buffers. On CUDA an expert goes through one of two pinned staging buffers (host copy into
pinned memory, then an asynchronous copy to the device), so the store's own memory is its
slots plus two experts of staging, whatever the number of experts. A
step asks for the experts its tokens were routed to (:meth:`ExpertStore.acquire`): resident
ones are hits, the others are copied in (misses, the wait is stall time). Before that, the
engine guesses the next MoE layer's experts by running that layer's router on the current
hidden state (pre-gating) and calls :meth:`ExpertStore.prefetch`, which copies them on a side
stream while the current layer computes.

Eviction is least-recently-used among unpinned slots. A slot is pinned from ``acquire`` to
``release``; ``release`` records an event on the compute stream, and a copy into that slot
first waits for it, so a copy never overwrites weights that queued kernels still read.

On the CPU the same code runs with plain synchronous copies and no events, so cache
behaviour (hits, evictions, outputs) can be tested anywhere. The weights themselves are
never transformed on the way, so outputs do not depend on the cache size.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    key: tuple[int, int] | None = None     # (moe layer, expert) held, None when empty
    pinned: int = 0
    prefetched: bool = False               # brought by prefetch and not used since
    ready: torch.cuda.Event | None = None  # copy into the slot done (CUDA)
    free: torch.cuda.Event | None = None   # last compute use of the slot done (CUDA)


class ExpertStore:
    """Host expert weights with a device cache of ``slots`` experts.

    ``w13`` and ``w2`` hold every MoE layer's routed experts, one int8 tensor [E, K, N] per
    layer (a 4-D tensor or a list, e.g. a package's ``w13_t`` [E, H, 2I] and ``w2_t`` [E, I, H]
    memory-mapped); they are read, never copied whole. The cache holds ``slots`` experts:
    :attr:`w13_cache` [slots, *slot_shapes[0]] and :attr:`w2_cache` [slots, *slot_shapes[1]]
    on ``device`` (by default the experts' own shapes; larger shapes are zero-padded).
    """

    def __init__(self, w13, w2, *, slots: int, device: str | torch.device = "cpu",
                 slot_shapes: tuple[tuple[int, int], tuple[int, int]] | None = None):
        if len(w13) != len(w2) or not len(w13):
            raise ValueError(f"w13 and w2 must hold the same (non-zero) number of MoE layers, got {len(w13)} "
                             f"and {len(w2)}")
        for name, ws in (("w13", w13), ("w2", w2)):
            for m, w in enumerate(ws):
                if w.dtype != torch.int8 or w.ndim != 3 or w.shape != ws[0].shape:
                    raise ValueError(f"expert weights must be int8 [E, K, N] per layer, alike; {name} layer {m} "
                                     f"is {w.dtype} {tuple(w.shape)}")
        if w13[0].shape[0] != w2[0].shape[0]:
            raise ValueError(f"w13 {tuple(w13[0].shape)} and w2 {tuple(w2[0].shape)} disagree on the experts")
        self.layers, self.experts = len(w13), int(w13[0].shape[0])
        if not 1 <= slots <= self.layers * self.experts:
            raise ValueError(f"expert cache slots={slots} must be in 1..{self.layers * self.experts} "
                             f"({self.layers} MoE layers x {self.experts} experts)")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host_w13, self.host_w2 = w13, w2
        shape13, shape2 = slot_shapes or (tuple(w13[0].shape[1:]), tuple(w2[0].shape[1:]))
        if any(a < b for a, b in zip(shape13 + shape2, tuple(w13[0].shape[1:]) + tuple(w2[0].shape[1:]))):
            raise ValueError(f"slot shapes {shape13}, {shape2} smaller than the experts")
        self.slots = int(slots)
        # Slots may be padded beyond the stored expert (the engine's multiples of 8); padding stays zero.
        self.w13_cache = torch.zeros((slots, *shape13), dtype=torch.int8, device=self.device)
        self.w2_cache = torch.zeros((slots, *shape2), dtype=torch.int8, device=self.device)
        self.expert_bytes = int(w13[0][0].numel() + w2[0][0].numel())
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # Two pinned staging buffers (CUDA): one fills while the other's copy is in flight.
        self.staging = [(torch.zeros(shape13, dtype=torch.int8).pin_memory(),
                         torch.zeros(shape2, dtype=torch.int8).pin_memory(), [None]) for _ in range(2)] \
            if self.cuda else []
        self._turn = 0
        self._slots = [_Slot() for _ in range(slots)]
        self._where: dict[tuple[int, int], int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(slots))  # oldest first
        self.reset_stats()

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero every counter."""
        self._stats = dict(requests=0, hits=0, misses=0, prefetch_issued=0, prefetch_hits=0,
                           prefetch_wasted=0, evictions=0, copies=0, bytes_copied=0, stall_s=0.0)

    def stats(self) -> dict:
        """Counters since the last reset: ``hits`` + ``misses`` == ``requests``; ``prefetch_hits``
        are hits on experts a prefetch brought; ``prefetch_wasted`` prefetched experts evicted
        unused; ``stall_s`` host time spent waiting for expert copies; ``bytes_copied``."""
        s = dict(self._stats)
        s["hit_rate"] = s["hits"] / s["requests"] if s["requests"] else 0.0
        s["slots"] = self.slots
        s["resident"] = len(self._where)
        return s

    # -- cache state -----------------------------------------------------------------------
    def slot_of(self, layer: int, expert: int) -> int | None:
        """The cache slot holding (layer, expert), or None."""
        return self._where.get((layer, expert))

    def contents(self) -> dict[int, tuple[int, int]]:
        """slot -> (layer, expert) for every filled slot."""
        return {s: sl.key for s, sl in enumerate(self._slots) if sl.key is not None}

    def _check(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.layers and 0 <= expert < self.experts):
            raise ValueError(f"expert ({layer}, {expert}) out of range: {self.layers} MoE layers x "
                             f"{self.experts} experts")

    def _victim(self, keep=()) -> int | None:
        for s in self._lru:             # least recently used first
            if self._slots[s].pinned == 0 and s not in keep:
                return s
        return None

    def _load(self, slot: int, key: tuple[int, int], prefetch: bool) -> None:
        """Copy expert ``key`` into ``slot`` (async on the side stream on CUDA)."""
        sl = self._slots[slot]
        if sl.key is not None:
            del self._where[sl.key]
            self._stats["evictions"] += 1
            if sl.prefetched:
                self._stats["prefetch_wasted"] += 1
        layer, e = key
        w13, w2 = self.host_w13[layer][e], self.host_w2[layer][e]
        k13, n13 = w13.shape
        k2, n2 = w2.shape
        if self.cuda:
            s13, s2, done = self.staging[self._turn]
            self._turn = 1 - self._turn
            if done[0] is not None:
                done[0].synchronize()            # this staging buffer's previous copy has left it
            s13[:k13, :n13].copy_(w13)           # reads the (memory-mapped) host weights
            s2[:k2, :n2].copy_(w2)
            with torch.cuda.stream(self.copy_stream):
                if sl.free is not None:
                    self.copy_stream.wait_event(sl.free)
                self.w13_cache[slot].copy_(s13, non_blocking=True)
                self.w2_cache[slot].copy_(s2, non_blocking=True)
                sl.ready = torch.cuda.Event()
                sl.ready.record(self.copy_stream)
            done[0] = sl.ready
        else:
            self.w13_cache[slot, :k13, :n13].copy_(w13)
            self.w2_cache[slot, :k2, :n2].copy_(w2)
        sl.key, sl.prefetched = key, prefetch
        self._where[key] = slot
        self._lru.move_to_end(slot)
        self._stats["copies"] += 1
        self._stats["bytes_copied"] += self.expert_bytes

    # -- the API the engine uses -----------------------------------------------------------
    def prefetch(self, layer: int, experts) -> int:
        """Start copying ``experts`` of ``layer`` into the cache (side stream on CUDA), evicting
        least-recently-used unpinned slots; never evicts a pinned slot nor one this call filled
        (so a guess longer than the free room is cut, not churned). Returns the copies issued."""
        filled: set[int] = set()
        for e in experts:
            e = int(e)
            self._check(layer, e)
            if (layer, e) in self._where:
                continue
            slot = self._victim(filled)
            if slot is None:
                break
            self._load(slot, (layer, e), prefetch=True)
            filled.add(slot)
        issued = len(filled)
        self._stats["prefetch_issued"] += issued
        return issued

    def acquire(self, layer: int, experts) -> list[int]:
        """Pin ``experts`` of ``layer`` in the cache and return their slots, in order.

        Resident experts are hits; the others are copied in (all copies are issued before
        waiting, so they overlap each other). Returns once every copy is complete; the
        wait is counted as stall time. Raises if more experts are asked than can be pinned.
        """
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts):
            raise ValueError(f"acquire: duplicate experts {experts}")
        free = sum(1 for sl in self._slots if sl.pinned == 0)
        if len(experts) > free:
            raise ValueError(f"acquire: {len(experts)} experts asked, {free} of {self.slots} slots unpinned")
        out: list[int | None] = []
        for e in experts:                # pin the hits first so misses cannot evict them
            self._check(layer, e)
            slot = self._where.get((layer, e))
            self._stats["requests"] += 1
            if slot is not None:
                sl = self._slots[slot]
                self._stats["hits"] += 1
                if sl.prefetched:
                    self._stats["prefetch_hits"] += 1
                    sl.prefetched = False
                sl.pinned += 1
                self._lru.move_to_end(slot)
            out.append(slot)
        start = time.perf_counter()
        copied = False
        for i, e in enumerate(experts):
            if out[i] is None:
                slot = self._victim()
                self._load(slot, (layer, e), prefetch=False)
                self._stats["misses"] += 1
                self._slots[slot].pinned += 1
                out[i] = slot
                copied = True
        if self.cuda:                    # wait for copies still in flight (misses and late prefetches)
            for slot in out:
                ev = self._slots[slot].ready
                if ev is not None and not ev.query():
                    ev.synchronize()
                    copied = True
        if copied:                       # on the CPU the copies above were synchronous
            self._stats["stall_s"] += time.perf_counter() - start
        return out  # type: ignore[return-value]

    def release(self, slots) -> None:
        """Unpin ``slots`` once the kernels reading them are queued (records the compute stream)."""
        for slot in slots:
            sl = self._slots[slot]
            if sl.pinned <= 0:
                raise ValueError(f"release: slot {slot} is not pinned")
            sl.pinned -= 1
            if self.cuda:
                sl.free = torch.cuda.Event()
                sl.free.record(torch.cuda.current_stream(self.device))

"""The control cycle's per-stream bookkeeping as compiled code over preallocated arrays.

:class:`runtime.control.loop.ControlCycle` runs each cycle as two Numba kernels around the
inference hand-off: :func:`cycle_pre` (input validation and staleness, the fail-safe or hold
decision, the frames handed to the policy, warm-up and gap-fill planning) and
:func:`cycle_post` (the policy's outputs collected and checked, the heartbeat fail-safe, a dead
bridge's fail-safe, the mode, tracking, and the output limiter: clamps, rate limits, fail-safe
and held values). They allocate nothing and never call Python. :func:`pack_cycle` writes the
cycle's flight record in the recorder's packed layout.

The executable reference is the NumPy code they replace, kept as it was:
:meth:`runtime.control.safety.InputGuard.check`, :meth:`runtime.control.safety.OutputLimiter.apply`
and ``ControlCycle(compiled=False)``; ``tests/test_cycle_kernels.py`` checks that both give the
same outputs, statuses, reasons, modes and state, bit for bit, over random input sequences
with faults. Comparisons follow NumPy's own rules so that the bits agree even for NaN and
signed zeros: ``np.maximum(a, b)`` is ``a if (a > b or a is NaN) else b`` (so ``b`` when
they are equal: ``np.maximum(-0.0, 0.0)`` is ``0.0``), ``np.minimum`` likewise, and ``np.clip``
with array bounds, as the reference calls it, is ``np.minimum(np.maximum(x, lo), hi)`` (with a
scalar bound NumPy keeps ``x`` when it equals the bound: not the same bits for signed zeros).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from runtime.control.safety import (AUTO, FAILSAFE, HOLD, MANUAL, MISSING_STAMP, OK, REASON_BRIDGE, REASON_BUSY,
                                    REASON_ERROR, REASON_HEARTBEAT, REASON_INPUT, REASON_KEEPS_OUTPUTS, REASON_NONE,
                                    REASON_OUTPUT, WARMUP)

# Invalid-input codes (runtime.control.safety.INVALID_NAMES).
_NAN, _INF, _RANGE, _STALE, _MISSING = 1, 2, 3, 4, 5

# Slots of the ``tally`` array the kernels fill (int64).
T_VALID, T_WARMUPS, T_GAPS, T_BAD_OUTPUTS, T_FAILSAFE, T_HOLD, T_TRACKING, T_INVALID = range(8)
TALLY_SIZE = 8
# Slots of the ``ctl`` array (int64) through which the cycle passes what changes every cycle, so
# that the kernels' argument tuples are built once: the time, whether the worker is still busy,
# whether the policy answered in time (its outputs are collected) and how many frames it got.
CTL_NOW, CTL_BUSY, CTL_COLLECT, CTL_N = range(4)
CTL_SIZE = 4


def entry(kernel, args: tuple):
    """The compiled code of ``kernel`` for the types of ``args`` (compiled, or loaded from the
    cache, now), callable without the dispatcher's per-call type resolution: that resolution is
    about half the cost of a call with ~30 arguments, and the cycle's argument types never change."""
    return kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))


@njit(cache=True, nogil=True, inline="always")
def _maximum(a, b):
    return a if (a > b or a != a) else b


@njit(cache=True, nogil=True, inline="always")
def _minimum(a, b):
    return a if (a < b or a != a) else b


@njit(cache=True, nogil=True, inline="always")
def _clip(x, lo, hi):
    return _minimum(_maximum(x, lo), hi)


@njit(cache=True, nogil=True)
def cycle_pre(values, stamps, active, ctl, lo, hi, stale_ns, fs_on_invalid, codes, counts, ever_valid,
              status, reason, ran, started, filled, warmup_cycles, window, missed, cold, warmup_left,
              slots, feats, start, fill, tally):
    """Validate the active streams' inputs, decide who fails safe or holds, and plan the
    policy's frames; returns how many frames go to the policy (0 when busy or none valid).

    What :meth:`InputGuard.check` and the part of ``ControlCycle.run`` before the inference
    hand-off do, on the same arrays, at ``ctl[CTL_NOW]``; resets ``tally`` first. ``ctl[CTL_BUSY]``:
    the worker still runs an earlier frame, so the valid streams fail safe (reason ``busy``) and
    nothing is planned."""
    now_ns = ctl[CTL_NOW]
    busy = ctl[CTL_BUSY] != 0
    for t in range(TALLY_SIZE):
        tally[t] = 0
    cap, n_in = values.shape
    n_feat = feats.shape[1]
    any_invalid = False
    any_active = False
    n = 0
    for i in range(cap):
        status[i] = OK
        reason[i] = REASON_NONE
        ran[i] = False
        started[i] = False
        filled[i] = 0
        bad = False
        fs = False
        if active[i]:
            any_active = True
            for j in range(n_in):
                v = values[i, j]
                st = stamps[i, j]
                c = 0
                if st == MISSING_STAMP:
                    c = _MISSING
                elif v != v:
                    c = _NAN
                elif v == np.inf or v == -np.inf:
                    c = _INF
                elif v < lo[j] or v > hi[j]:
                    c = _RANGE
                elif now_ns - st > stale_ns[j]:
                    c = _STALE
                codes[i, j] = c
                if c:
                    bad = True
                    counts[c] += 1
                    if fs_on_invalid[j]:
                        fs = True
            if bad:
                any_invalid = True
                status[i] = FAILSAFE if fs else HOLD
                reason[i] = REASON_INPUT
                if warmup_cycles:
                    missed[i] += 1
            else:
                n += 1
        else:
            for j in range(n_in):
                codes[i, j] = 0
    if any_active:
        for j in range(n_in):
            if not ever_valid[j]:
                for i in range(cap):
                    if active[i] and codes[i, j] == 0:
                        ever_valid[j] = True
                        break
    tally[T_VALID] = n
    tally[T_INVALID] = 1 if any_invalid else 0
    if n == 0:
        return 0
    if busy:
        for i in range(cap):
            if active[i] and status[i] == OK:
                status[i] = FAILSAFE
                reason[i] = REASON_BUSY
        return 0
    k = 0
    for i in range(cap):
        if not (active[i] and status[i] == OK):
            continue
        slots[k] = i
        for f in range(n_feat):
            feats[k, f] = np.float32(values[i, f])
        ran[i] = True
        if warmup_cycles:
            if missed[i] >= window - 1:
                cold[i] = True
            s = cold[i]
            start[k] = s
            if s:
                started[i] = True
                warmup_left[i] = warmup_cycles
                cold[i] = False
                tally[T_WARMUPS] += 1
                fill[k] = 0
                filled[i] = window - 1
            else:
                g = missed[i]
                fill[k] = g
                if g:
                    filled[i] = g
                    tally[T_GAPS] += 1
            missed[i] = 0
        k += 1
    return n


@njit(cache=True, nogil=True)
def cycle_post(ctl, slots, y, raw, status, reason, active, forced, down, ran, mode, warmup_left, values,
               mode_col, tracking, track, lo, hi, step, failsafe, jump, last, fresh, after_failsafe, caught,
               out, tally):
    """Collect the policy's ``ctl[CTL_N]`` outputs (where ``ctl[CTL_COLLECT]``: it answered in
    time), then the heartbeat and bridge fail-safes, each stream's mode, tracking, and the
    output limiter.

    What the rest of ``ControlCycle.run`` and :meth:`OutputLimiter.apply` do, on the same
    arrays. ``mode_col`` < 0: no mode input; ``track[j]`` < 0: output ``j`` has no tracking input."""
    cap, n_out = out.shape
    n = ctl[CTL_N]
    if ctl[CTL_COLLECT]:
        for k in range(n):
            i = slots[k]
            finite = True
            for o in range(n_out):
                v = np.float64(y[k, o])
                raw[i, o] = v
                if v != v or v == np.inf or v == -np.inf:
                    finite = False
            if not finite:
                status[i] = FAILSAFE
                reason[i] = REASON_OUTPUT
                tally[T_BAD_OUTPUTS] += 1
    has_track = False
    any_jump = False
    for o in range(n_out):
        if track[o] >= 0:
            has_track = True
        if jump[o]:
            any_jump = True
    n_fs = 0
    n_hold = 0
    n_trk = 0
    for i in range(cap):
        tracking[i] = False
        if not active[i]:
            for o in range(n_out):
                caught[i, o] = False
            continue
        st = status[i]
        if forced[i] and st != FAILSAFE:
            st = FAILSAFE
            reason[i] = REASON_HEARTBEAT
        if down[i]:
            st = FAILSAFE
            reason[i] = REASON_BRIDGE
        status[i] = st
        m = AUTO
        if warmup_left[i] > 0:
            m = WARMUP
            if ran[i]:
                warmup_left[i] -= 1
        if mode_col >= 0 and values[i, mode_col] < 0.5:
            m = MANUAL
        mode[i] = m
        ok = st == OK
        trk_sel = ok and m != AUTO
        tracking[i] = trk_sel
        if trk_sel:
            n_trk += 1
        free_jump = any_jump and after_failsafe[i]
        for o in range(n_out):
            lst = last[i, o]
            if has_track:
                src = values[i, track[o]] if track[o] >= 0 else lst
                trk = _clip(src, lo[o], hi[o])
                if ok and fresh[i] and track[o] >= 0:
                    lst = trk
                    last[i, o] = trk
            else:
                trk = lst
            if free_jump and jump[o]:
                lo_r = -np.inf
                hi_r = np.inf
            else:
                lo_r = lst - step[o]
                hi_r = lst + step[o]
            if st == OK:
                v = _minimum(_maximum(_clip(raw[i, o], lo[o], hi[o]), lo_r), hi_r)
            elif st == HOLD:
                v = lst
            elif st == FAILSAFE:
                v = failsafe[o]
            else:
                v = out[i, o]
            c = False
            if trk_sel:
                target = trk
                if not caught[i, o]:
                    trk = _minimum(_maximum(trk, lo_r), hi_r)
                v = trk
                c = trk == target
            caught[i, o] = c
            out[i, o] = v
            last[i, o] = v
        after_failsafe[i] = st == FAILSAFE
        fresh[i] = False
        if st == FAILSAFE:
            n_fs += 1
        elif st == HOLD:
            n_hold += 1
    tally[T_FAILSAFE] = n_fs
    tally[T_HOLD] = n_hold
    tally[T_TRACKING] = n_trk


@njit(cache=True, nogil=True)
def pack_cycle(b8, b16, b32, i64, f64, meta, layout, active, status, reason, mode, ran, started, filled, values,
               raw, out, codes, crc_table):
    """One cycle's record in the flight recorder's packed layout
    (:func:`runtime.control.recorder.packed_cycle_dtypes`), framed: the payload at byte 8 of the
    buffer (viewed as ``b8``/``b16``/``b32``/``i64``/``f64``), its length at byte 4 and its
    CRC-32 after it; returns the frame's length (from byte 4), or -1 when an active stream
    failed with an inference error (its message needs the msgpack record).

    ``meta``: seq, t_ns, heartbeat, the four timings, the tag and the layout version (the head's
    fields at the offsets ``CyclePacker`` checks); ``layout``: the head's size, the row's
    size and the byte offsets in a row of filled, x, y, out, slot, status, reason, mode, flags
    and codes. Streams go in slot order."""
    head, row = layout[0], layout[1]
    n_in, n_out = values.shape[1], out.shape[1]
    k = 0
    for i in range(active.shape[0]):
        if not active[i]:
            continue
        if reason[i] == REASON_ERROR:
            return -1
        at = 8 + head + k * row
        i64[(at + layout[2]) // 8] = filled[i]
        for j in range(n_in):
            f64[(at + layout[3]) // 8 + j] = values[i, j]
        given = ran[i] and REASON_KEEPS_OUTPUTS[reason[i]]
        for o in range(n_out):
            f64[(at + layout[4]) // 8 + o] = raw[i, o] if given else np.nan
            f64[(at + layout[5]) // 8 + o] = out[i, o]
        b16[(at + layout[6]) // 2] = i
        b8[at + layout[7]] = status[i]
        b8[at + layout[8]] = reason[i]
        b8[at + layout[9]] = mode[i]
        b8[at + layout[10]] = (1 if ran[i] else 0) | (2 if given else 0) | (4 if started[i] else 0)
        for j in range(n_in):
            b8[at + layout[11] + j] = codes[i, j]
        k += 1
    size = head + k * row
    b8[8] = meta[7]
    b8[9] = meta[8]
    b16[5] = k
    b32[3] = meta[2]
    i64[2] = meta[0]
    i64[3] = meta[1]
    for t in range(4):
        i64[4 + t] = meta[3 + t]
    b32[1] = size
    crc = np.uint32(0xFFFFFFFF)
    for p in range(8, 8 + size):
        crc = crc_table[(crc ^ b8[p]) & 0xFF] ^ (crc >> np.uint32(8))
    b32[(8 + size) // 4] = crc ^ np.uint32(0xFFFFFFFF)
    return size + 8

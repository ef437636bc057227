"""The CPU stream engine's vector kernels: exact int8 GEMMs (W8A8 rows times blocked int8
weights) and the fixed-order float row sums its attention is made of (:func:`rows_dot`).

Layout. A weight [N, K] int8 (one row per output channel) is stored in blocks of 16 output
channels: ``blocked[b, k4 * 64 + l * 4 + j] = w[16 * b + l, 4 * k4 + j]``, N padded with zero
rows to a multiple of 16 and K with zero columns to a multiple of 4 (:func:`pack_blocked`).
Activations are stored offset by 128 as uint8 (``q + 128``; :func:`quantize_row_u8`), four to
an int32, so that one instruction multiplies four unsigned activation bytes with four signed
weight bytes for each of 16 output channels and adds them to 16 int32 sums (``vpdpbusd``,
AVX-512 VNNI). The offset comes back out exactly: ``sum (q + 128) w = sum q w + 128 sum w``,
with ``sum w`` per row precomputed. Integer sums are exact in any order, so the result is the
int32 dot product of the W8A8 rule whatever the blocking, the batch or the kernel; it is
dequantized as ``float32(acc) * x_scale * w_scale``, the rule of ``runtime.model.quant``.

Kernels. :data:`VNNI` says whether the host has AVX-512 VNNI (and Numba compiles for the
host); without it the same loop is written in portable LLVM vector code (sign- and
zero-extended 32-bit products), slower, with the same results. Both live in
``_dot16``: an LLVM intrinsic that keeps the 16-lane sums of one to four activation rows in
registers over the whole K loop, reading each 64-byte weight line once for all rows.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

F32 = np.float32
LANES = 16          # output channels per block (one 512-bit vector of int32 sums)
QUAD = 4            # activation bytes per int32


def _host_has_vnni() -> bool:
    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False        # Numba compiles for a chosen target, not necessarily this host
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx512vnni", False))


VNNI = _host_has_vnni()


def _make_dot(rows: int, vnni: bool, blocks: int = 1):
    """The intrinsic ``dot(w, w_off, x, x_off0, x_off1, x_off2, x_off3, k4, acc, acc_off, acc_rs)``:
    for each of the first ``rows`` activation rows r (int32 words at ``x[x_off_r:]``; the other
    offsets are ignored), each of ``blocks`` consecutive weight blocks b (``k4 * 64`` bytes each,
    the first at ``w[w_off:]``) and each lane l < 16, ``acc[acc_off + r acc_rs + 16 b + l] =`` the
    sum over the k4 quads of the 4 byte products. All sums stay in registers over the K loop;
    each weight line is read once for all rows, each activation word once for all blocks.
    ``w`` int8, ``x`` and ``acc`` int32, all C-contiguous; offsets count elements."""

    @intrinsic
    def dot(typingctx, w, w_off, x, x_off0, x_off1, x_off2, x_off3, k4, acc, acc_off, acc_rs):
        i = types.intp
        sig = types.void(w, i, x, i, i, i, i, i, acc, i, i)

        def codegen(context, builder, signature, args):
            w_, w_off_, x_ = args[:3]
            x_offs_ = args[3:7]
            k4_, acc_, acc_off_, acc_rs_ = args[7:]
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            v16 = ir.VectorType(i32, LANES)
            wdata = context.make_array(signature.args[0])(context, builder, w_).data
            xdata = context.make_array(signature.args[2])(context, builder, x_).data
            adata = context.make_array(signature.args[8])(context, builder, acc_).data
            wbase = builder.gep(wdata, [w_off_])
            block_bytes = builder.mul(k4_, ir.Constant(i64, 64))
            acc_ptrs, slots, x_ptrs = {}, {}, []
            for r in range(rows):
                row_off = builder.add(acc_off_, builder.mul(acc_rs_, ir.Constant(i64, r)))
                for b in range(blocks):
                    p = builder.bitcast(builder.gep(adata, [builder.add(row_off, ir.Constant(i64, LANES * b))]),
                                        v16.as_pointer())
                    slot = cgutils.alloca_once(builder, v16)      # promoted to a register
                    builder.store(ir.Constant(v16, [0] * LANES), slot)
                    acc_ptrs[r, b] = p
                    slots[r, b] = slot
                x_ptrs.append(builder.gep(xdata, [x_offs_[r]]))
            if vnni:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                                    "llvm.x86.avx512.vpdpbusd.512")
            zeros = ir.Constant(v16, [0] * LANES)
            with cgutils.for_range(builder, k4_) as loop:
                i = loop.index
                line_off = builder.mul(i, ir.Constant(i64, 64))
                wlines = [builder.load(builder.bitcast(
                    builder.gep(wbase, [builder.add(line_off, builder.mul(block_bytes, ir.Constant(i64, b)))]),
                    v16.as_pointer()), align=1) for b in range(blocks)]
                for r in range(rows):
                    quad = builder.load(builder.gep(x_ptrs[r], [i]), align=4)
                    xb = builder.shuffle_vector(builder.insert_element(ir.Constant(v16, ir.Undefined), quad,
                                                                       ir.Constant(i32, 0)),
                                                ir.Constant(v16, ir.Undefined), zeros)
                    for b in range(blocks):
                        a = builder.load(slots[r, b])
                        if vnni:
                            a = builder.call(fn, [a, xb, wlines[b]])
                        else:
                            v64 = ir.VectorType(i32, 64)
                            b64 = ir.VectorType(i8, 64)
                            prod = builder.mul(builder.zext(builder.bitcast(xb, b64), v64),
                                               builder.sext(builder.bitcast(wlines[b], b64), v64))
                            for j in range(QUAD):
                                a = builder.add(a, builder.shuffle_vector(
                                    prod, ir.Constant(v64, ir.Undefined),
                                    ir.Constant(v16, [QUAD * lane + j for lane in range(LANES)])))
                        builder.store(a, slots[r, b])
            for key, p in acc_ptrs.items():
                builder.store(builder.load(slots[key]), p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dot


_dot1x1 = _make_dot(1, VNNI)
_dot4x1 = _make_dot(4, VNNI)
_dot1x2 = _make_dot(1, VNNI, 2)
_dot4x2 = _make_dot(4, VNNI, 2)


@njit(cache=True, error_model="numpy", inline="always")
def absmax(x):
    """max |x[k]| (NaNs skipped), eight running maxima at once (a max is exact in any order)."""
    n = x.shape[0]
    n8 = n - n % 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = F32(0.0)
    for k in range(0, n8, 8):
        a = abs(x[k])
        m0 = a if a > m0 else m0
        a = abs(x[k + 1])
        m1 = a if a > m1 else m1
        a = abs(x[k + 2])
        m2 = a if a > m2 else m2
        a = abs(x[k + 3])
        m3 = a if a > m3 else m3
        a = abs(x[k + 4])
        m4 = a if a > m4 else m4
        a = abs(x[k + 5])
        m5 = a if a > m5 else m5
        a = abs(x[k + 6])
        m6 = a if a > m6 else m6
        a = abs(x[k + 7])
        m7 = a if a > m7 else m7
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for k in range(n8, n):
        a = abs(x[k])
        m = a if a > m else m
    return m


@njit(cache=True, error_model="numpy", inline="always")
def quantize_row_u8(x, q):
    """Per-token symmetric int8 of x[K] (the rule of ``runtime.model.quant.quantize_activation``),
    stored offset by 128 as uint8 into q[:K]; returns the scale (absmax / 127, 1 for a zero
    row). Written without the rule's clamp: for finite input |x| / scale <= 127 already."""
    amax = absmax(x)
    scale = amax / F32(127.0)
    if scale == F32(0.0):
        scale = F32(1.0)
    for k in range(x.shape[0]):
        q[k] = np.uint8(np.int32(np.rint(x[k] / scale)) + 128)
    return scale


@njit(cache=True, error_model="numpy")
def gemm_rows(x, xs, idx, gather, lo, hi, w, wsum, ws, n_out, out, acc):
    """``out[r, :n_out] = float32(x_row . w_n) * xs[src] * ws[n]`` for rows r in [lo, hi).

    ``x`` int32 [*, K4max]: uint8 activations (offset 128) four to a word; row r reads
    ``src = idx[r]`` when ``gather`` else ``r``, with scale ``xs[src]``. ``w`` int8
    [Nb, K4 * 64] blocked, ``wsum`` int32 and ``ws`` float32 [Nb * 16]; ``out`` float32 rows
    indexed by r; ``acc`` int32 [*, 32] scratch rows indexed by r. The kernel takes four rows
    and two blocks (32 output channels) at a time: a weight line is read from memory once per
    four rows (once per step when it stays in cache), an activation word once per two blocks.
    """
    nb = w.shape[0]
    k4 = w.shape[1] // 64
    xw = x.shape[1]
    ars = acc.shape[1]
    b = 0
    while b < nb:
        pair = b + 2 <= nb
        woff = b * k4 * 64
        r = lo
        while r < hi:
            m = min(4, hi - r)
            if m == 4:
                s0 = idx[r] if gather else r
                s1 = idx[r + 1] if gather else r + 1
                s2 = idx[r + 2] if gather else r + 2
                s3 = idx[r + 3] if gather else r + 3
                if pair:
                    _dot4x2(w, woff, x, s0 * xw, s1 * xw, s2 * xw, s3 * xw, k4, acc, r * ars, ars)
                else:
                    _dot4x1(w, woff, x, s0 * xw, s1 * xw, s2 * xw, s3 * xw, k4, acc, r * ars, ars)
            else:
                for rr in range(r, r + m):
                    src = idx[rr] if gather else rr
                    if pair:
                        _dot1x2(w, woff, x, src * xw, 0, 0, 0, k4, acc, rr * ars, ars)
                    else:
                        _dot1x1(w, woff, x, src * xw, 0, 0, 0, k4, acc, rr * ars, ars)
            n0 = b * LANES
            width = min((2 if pair else 1) * LANES, n_out - n0)
            for rr in range(r, r + m):
                src = idx[rr] if gather else rr
                sx = xs[src]
                for lane in range(width):
                    n = n0 + lane
                    out[rr, n] = F32(acc[rr, lane] - 128 * wsum[n]) * sx * ws[n]
            r += m
        b += 2 if pair else 1


def pack_blocked(q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 rows ``q`` [N, K] with scales ``s`` [N] -> (blocked int8 [Nb, K4 * 64], row sums
    int32 [Nb * 16], scales float32 [Nb * 16]); padded rows get sum 0 and scale 1."""
    n, k = q.shape
    nb, k4 = -(-n // LANES), -(-k // QUAD)
    padded = np.zeros((nb * LANES, k4 * QUAD), np.int8)
    padded[:n, :k] = q
    blocked = np.ascontiguousarray(padded.reshape(nb, LANES, k4, QUAD).transpose(0, 2, 1, 3).reshape(nb, k4 * 64))
    wsum = np.zeros(nb * LANES, np.int32)
    wsum[:n] = q.astype(np.int32).sum(1)
    scale = np.ones(nb * LANES, F32)
    scale[:n] = s
    return blocked, wsum, scale


def blocked_nbytes(n: int, k: int) -> int:
    """Bytes :func:`pack_blocked` gives an [n, k] weight: blocked int8, int32 row sums, float32 scales."""
    nb, k4 = -(-n // LANES), -(-k // QUAD)
    return nb * k4 * 64 + nb * LANES * 8


def padded_k(k: int) -> int:
    """K rounded up to whole int32 words of activations."""
    return -(-k // QUAD) * QUAD


def _make_rows_dot(heads: int, blocks: int):
    """The intrinsic ``rows_dot(dst, dst_off, dst_hs, p, p_off, p_hs, n, src, src_off, src_hs,
    stride)``: for each of ``heads`` problems h, each of ``blocks`` consecutive 16-lane blocks b
    and each lane l, ``dst[dst_off + h dst_hs + 16 b + l] = 0 + sum over k = 0, 1, ..., n - 1 in
    that order of p[p_off + h p_hs + k] * src[src_off + h src_hs + k stride + 16 b + l]``, the sums
    held in registers (heads x blocks independent sums keep the vector units busy while each sum
    waits on its previous add). Each lane multiplies then adds (no fused multiply-add), giving
    the bits of the scalar loop ``d = 0; d += p[k] * s[k]``. float32, C-contiguous, no bounds
    check: the caller keeps every range inside its array."""

    @intrinsic
    def rows_dot(typingctx, dst, dst_off, dst_hs, p, p_off, p_hs, n, src, src_off, src_hs, stride):
        i = types.intp
        sig = types.void(dst, i, i, p, i, i, i, src, i, i, i)

        def codegen(context, builder, signature, args):
            dst_, dst_off_, dst_hs_, p_, p_off_, p_hs_, n_, src_, src_off_, src_hs_, stride_ = args
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            v16 = ir.VectorType(f32, LANES)
            ddata = context.make_array(signature.args[0])(context, builder, dst_).data
            pdata = context.make_array(signature.args[3])(context, builder, p_).data
            sdata = context.make_array(signature.args[7])(context, builder, src_).data
            dptrs, slots, poffs, soffs = {}, {}, [], []
            for h in range(heads):
                hc = ir.Constant(i64, h)
                for b in range(blocks):
                    off = builder.add(builder.add(dst_off_, builder.mul(hc, dst_hs_)), ir.Constant(i64, LANES * b))
                    slot = cgutils.alloca_once(builder, v16)          # promoted to a register
                    builder.store(ir.Constant(v16, [0.0] * LANES), slot)
                    dptrs[h, b] = builder.bitcast(builder.gep(ddata, [off]), v16.as_pointer())
                    slots[h, b] = slot
                poffs.append(builder.add(p_off_, builder.mul(hc, p_hs_)))
                soffs.append(builder.add(src_off_, builder.mul(hc, src_hs_)))
            zeros = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
            with cgutils.for_range(builder, n_) as loop:
                k = loop.index
                row = builder.mul(k, stride_)
                for h in range(heads):
                    pk = builder.load(builder.gep(pdata, [builder.add(poffs[h], k)]))
                    pv = builder.shuffle_vector(builder.insert_element(ir.Constant(v16, ir.Undefined), pk,
                                                                       ir.Constant(i32, 0)),
                                                ir.Constant(v16, ir.Undefined), zeros)
                    base = builder.add(soffs[h], row)
                    for b in range(blocks):
                        sp = builder.bitcast(builder.gep(sdata, [builder.add(base, ir.Constant(i64, LANES * b))]),
                                             v16.as_pointer())
                        acc = builder.fadd(builder.load(slots[h, b]), builder.fmul(pv, builder.load(sp, align=4)))
                        builder.store(acc, slots[h, b])
            for key, dp in dptrs.items():
                builder.store(builder.load(slots[key]), dp, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


_rows_dot1x1 = _make_rows_dot(1, 1)
_rows_dot1x4 = _make_rows_dot(1, 4)
_rows_dot4x1 = _make_rows_dot(4, 1)
_rows_dot4x4 = _make_rows_dot(4, 4)


@njit(cache=True, inline="always", error_model="numpy")
def rows_dot(dst, dst_off, dst_hs, width, p, p_off, p_hs, n, src, src_off, src_hs, stride, heads):
    """For each of ``heads`` problems h (offsets advancing by ``dst_hs``, ``p_hs``, ``src_hs``)
    and lane l < ``width`` (a multiple of 16): ``dst[dst_off + h dst_hs + l] = the sum over k < n,
    ascending, of p[p_off + h p_hs + k] * src[src_off + h src_hs + k stride + l]``. The fixed-
    order weighted sum of rows that the engine's attention is made of, 16 lanes at a time, up to
    four problems and four 16-lane blocks per pass over the rows."""
    b = 0
    while b < width:
        four = b + 4 * LANES <= width
        h = 0
        while h < heads:
            d0 = dst_off + h * dst_hs + b
            p0 = p_off + h * p_hs
            s0 = src_off + h * src_hs + b
            if h + 4 <= heads:
                if four:
                    _rows_dot4x4(dst, d0, dst_hs, p, p0, p_hs, n, src, s0, src_hs, stride)
                else:
                    _rows_dot4x1(dst, d0, dst_hs, p, p0, p_hs, n, src, s0, src_hs, stride)
                h += 4
            else:
                if four:
                    _rows_dot1x4(dst, d0, dst_hs, p, p0, p_hs, n, src, s0, src_hs, stride)
                else:
                    _rows_dot1x1(dst, d0, dst_hs, p, p0, p_hs, n, src, s0, src_hs, stride)
                h += 1
        b += 4 * LANES if four else LANES


def padded16(n: int) -> int:
    """n rounded up to whole 16-lane vectors."""
    return -(-n // LANES) * LANES

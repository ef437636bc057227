"""The grouped int8 GEMM in Triton: one program per (expert, column tile) over the rows routed
to that expert, exact int32 accumulation. ``runtime.cuda.engine.DeviceEngine`` runs routed experts
through it on CUDA; the tests check it under ``TRITON_INTERPRET=1`` on the CPU.
"""
from __future__ import annotations

import os

import torch

_TRITON_KERNEL = None


def triton_available() -> bool:
    """Whether the Triton grouped kernel can run (Triton importable; on the CPU only under
    ``TRITON_INTERPRET=1``, which the tests use to check the kernel without a GPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def compile_kernel():
    """The Triton kernel, compiled on first use (Triton is imported only then)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def grouped_int8_kernel(x_ptr, rows_ptr, offs_ptr, slot_ptr, w_ptr, out_ptr, K, N,
                                stride_xm, stride_ws, stride_wk, stride_om,
                                GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
            # One program: expert program_id(0), output columns tile program_id(1).
            e = tl.program_id(0)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            start = tl.load(offs_ptr + e)
            slot = tl.load(slot_ptr + e)
            count = tl.where(slot >= 0, tl.load(offs_ptr + e + 1) - start, 0)
            w_base = w_ptr + slot.to(tl.int64) * stride_ws
            for m0 in range(0, count, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M)
                m_ok = rm < count
                arow = start + rm
                if GATHER:
                    src = tl.load(rows_ptr + arow, mask=m_ok, other=0)
                else:
                    src = arow
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = rk < K
                    a = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                                mask=m_ok[:, None] & k_ok[None, :], other=0)
                    w = tl.load(w_base + rk.to(tl.int64)[:, None] * stride_wk + rn[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0)
                    acc += tl.dot(a, w, out_dtype=tl.int32)
                tl.store(out_ptr + arow.to(tl.int64)[:, None] * stride_om + rn[None, :], acc,
                         mask=m_ok[:, None] & n_ok[None, :])

        _TRITON_KERNEL = grouped_int8_kernel
    return _TRITON_KERNEL


def grouped_int8_mm(x: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor,
                    w: torch.Tensor, out: torch.Tensor, *, gather: bool, block_m: int = 16) -> torch.Tensor:
    """Grouped exact int8 GEMM: for each expert e with ``slots[e] >= 0``, rows
    a in [offsets[e], offsets[e+1]) of ``out`` get ``x[rows[a] if gather else a] @ w[slots[e]]``.

    ``x`` int8 [M, K] (unit stride on K); ``rows`` int32 [A]; ``offsets`` int32 [E+1];
    ``slots`` int32 [E]; ``w`` int8 [S, K, N] with unit stride on N (any strides on S, K);
    ``out`` int32 [A, N]. Other rows of ``out`` are left as they are. Static launch grid
    (E x N/128), so it can be captured in a CUDA graph; each active expert's weights are
    read once when it holds at most ``block_m`` rows.
    """
    K, N = x.shape[1], out.shape[1]
    if w.stride(2) != 1 or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("grouped_int8_mm needs unit stride on the last dim of x, w and out")
    block_n, block_k = 128, 128
    grid = (slots.shape[0], -(-N // block_n))
    compile_kernel()[grid](x, rows, offsets, slots, w, out, K, N, x.stride(0), w.stride(0), w.stride(1),
                            out.stride(0), GATHER=gather, BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_K=block_k, num_warps=4, num_stages=3)
    return out

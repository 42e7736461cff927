"""Triton kernels behind kernels.fuse_features and kernels.cosine_distill_loss.

Same arguments and numerical conventions as torch_impl; launchers take optional output buffers (tests).

Every shape number but the batch size (widths, column offsets, strides, the loss width) is a compile-time
constant of the kernel. A run sees a handful of such combinations, so this costs a few compilations, and
it buys three things: the compiler knows each stride exactly, hence vectorises 16-byte accesses without
alignment hints (hints on 2-D offsets broke Triton's compiler on one-row tiles, Triton 3.6 to 3.8);
a launch passes only the pointers and the row count; and the launch plan (grid, tile shape, constants)
is computed once per combination and reused (plan_fuse / plan_loss are cached).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Triton builds its own library (tl.sum, ...) for either its interpreter or its compiler, once, as it is
# imported, after TRITON_INTERPRET at that moment. Kernels of the other kind cannot call it, so ours
# follow that choice rather than the variable's value when this module is imported or a kernel runs.
INTERPRETER_BUILT = isinstance(tl.sum, InterpretedFunction)
VERSION = triton.__version__
MAX_TILE = 4096  # elements per program and loop step: 16 KiB of float32 accumulator per operand


def interpreting() -> bool:
    """True when CPU tensors can run the kernels: TRITON_INTERPRET=1, and set before triton was imported."""
    return INTERPRETER_BUILT and bool(triton.knobs.runtime.interpret)


def _kernel(fn):
    """@triton.jit, but in the mode triton.language was built in."""
    return InterpretedFunction(fn) if INTERPRETER_BUILT else JITFunction(fn)


def _launch(kernel, grid, device, *args, **meta):
    # Triton launches on the current device's stream; switching costs microseconds, so only when needed.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _rows_per_tile(n_rows: int, cols: int, programs_per_row_block: int, on_gpu: bool) -> int:
    rows = max(1, MAX_TILE // cols)
    if on_gpu:
        # Small batches would otherwise leave most SMs idle; the interpreter runs programs one after
        # another, so there fewer, bigger tiles are faster.
        while rows > 1 and -(-n_rows // rows) * programs_per_row_block < 512:
            rows //= 2
    return rows


def _on_gpu(device_type: str) -> bool:
    return device_type == "cuda" and not INTERPRETER_BUILT


class Plan(NamedTuple):
    grid: tuple
    meta: dict


# ----------------------------------------------------------------------------------------------------
# Multi-teacher concatenation + standardisation + cast.

@_kernel
def _fuse_kernel(srcs, mean, std, out, n_rows,
                 WIDTHS: tl.constexpr, OUT_COLS: tl.constexpr, FIRST_BLOCKS: tl.constexpr,
                 SRC_RSTRIDES: tl.constexpr, SRC_CSTRIDES: tl.constexpr, MEAN_STRIDE: tl.constexpr,
                 STD_STRIDE: tl.constexpr, OUT_RSTRIDE: tl.constexpr, OUT_CSTRIDE: tl.constexpr,
                 N_SRC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Column blocks are numbered teacher after teacher (FIRST_BLOCKS[k] is teacher k's first), so every
    # program reads exactly one teacher and a single launch covers them all. The unrolled if-chain
    # gives each teacher its own pointer type, hence mixed input dtypes without a conversion pass.
    pid_n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]  # staging buffers can exceed 2**31 elements
    for k in tl.static_range(N_SRC):
        if (pid_n >= FIRST_BLOCKS[k]) & (pid_n < FIRST_BLOCKS[k + 1]):
            cols = ((pid_n - FIRST_BLOCKS[k]) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            col_ok = cols < WIDTHS[k]
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(srcs[k] + rows64 * SRC_RSTRIDES[k] + cols[None, :] * SRC_CSTRIDES[k], mask=mask)
            ocols = OUT_COLS[k] + cols
            mu = tl.load(mean + ocols * MEAN_STRIDE, mask=col_ok, other=0.0).to(tl.float32)
            sd = tl.load(std + ocols * STD_STRIDE, mask=col_ok, other=1.0).to(tl.float32)
            y = (x.to(tl.float32) - mu[None, :]) / sd[None, :]
            tl.store(out + rows64 * OUT_RSTRIDE + ocols[None, :] * OUT_CSTRIDE,
                     y.to(out.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def plan_fuse(n_rows: int, widths: tuple, src_strides: tuple, mean_stride: int, std_stride: int,
              out_strides: tuple, device_type: str, block_n: int | None = None) -> Plan:
    """Grid and constants of one fuse launch; widths and src_strides list only the non-empty teachers."""
    block_n = block_n or min(128, _pow2_ceil(max(widths)))
    starts, first_blocks = [], [0]
    for w in widths:
        starts.append(sum(widths[:len(starts)]))
        first_blocks.append(first_blocks[-1] + -(-w // block_n))
    block_m = _rows_per_tile(n_rows, block_n, first_blocks[-1], _on_gpu(device_type))
    meta = dict(WIDTHS=widths, OUT_COLS=tuple(starts), FIRST_BLOCKS=tuple(first_blocks),
                SRC_RSTRIDES=tuple(s[0] for s in src_strides), SRC_CSTRIDES=tuple(s[1] for s in src_strides),
                MEAN_STRIDE=mean_stride, STD_STRIDE=std_stride, OUT_RSTRIDE=out_strides[0],
                OUT_CSTRIDE=out_strides[1], N_SRC=len(widths), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return Plan((-(-n_rows // block_m), first_blocks[-1]), meta)


def fuse_features(features, mean, std, out, block_n=None):
    live = [x for x in features if x.shape[1] > 0]
    n_rows = out.shape[0]
    if n_rows == 0 or not live:
        return out
    # Empty teachers take no columns, so dropping them keeps every other teacher's offset.
    plan = plan_fuse(n_rows, tuple(x.shape[1] for x in live), tuple(x.stride() for x in live), mean.stride(0),
                     std.stride(0), out.stride(), out.device.type, block_n)
    _launch(_fuse_kernel, plan.grid, out.device, tuple(live), mean, std, out, n_rows, **plan.meta)
    return out


# ----------------------------------------------------------------------------------------------------
# Cosine distillation loss, forward and backward.

@_kernel
def _cos_fwd_kernel(s, t, loss, stats, n_rows, eps, DIM: tl.constexpr,
                    S_RSTRIDE: tl.constexpr, S_CSTRIDE: tl.constexpr, T_RSTRIDE: tl.constexpr,
                    T_CSTRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    ss = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tt = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    st = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)[None, :]
        mask = row_ok[:, None] & (cols < DIM)
        a = tl.load(s + rows64 * S_RSTRIDE + cols * S_CSTRIDE, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t + rows64 * T_RSTRIDE + cols * T_CSTRIDE, mask=mask, other=0.0).to(tl.float32)
        ss += a * a
        tt += b * b
        st += a * b
    ns = tl.sqrt(tl.sum(ss, axis=1))
    nt = tl.sqrt(tl.sum(tt, axis=1))
    dot = tl.sum(st, axis=1)
    # + 0 * (ns + nt): NaN where a norm overflowed float32 (|s| > ~1.8e19, a diverged student), which would
    # otherwise read as cos 0, a loss of 1 and a zero gradient that no NaN check sees
    cos = dot / (tl.maximum(ns, eps) * tl.maximum(nt, eps)) + 0.0 * (ns + nt)
    r = rows.to(tl.int64)  # 2 * n_rows overflows int32 from 2^30 rows
    tl.store(loss + r, 1.0 - cos, mask=row_ok)
    tl.store(stats + r, ns, mask=row_ok)
    tl.store(stats + (r + n_rows), nt, mask=row_ok)
    tl.store(stats + (r + n_rows + n_rows), dot, mask=row_ok)


@_kernel
def _cos_bwd_kernel(s, t, stats, g, g_stride, g_scale, grad, n_rows, eps, DIM: tl.constexpr,
                    S_RSTRIDE: tl.constexpr, S_CSTRIDE: tl.constexpr, T_RSTRIDE: tl.constexpr,
                    T_CSTRIDE: tl.constexpr, G_RSTRIDE: tl.constexpr, G_CSTRIDE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    r = rows.to(tl.int64)
    ns = tl.load(stats + r, mask=row_ok, other=1.0)
    nt = tl.load(stats + (r + n_rows), mask=row_ok, other=1.0)
    dot = tl.load(stats + (r + n_rows + n_rows), mask=row_ok, other=0.0)
    gr = tl.load(g + r * g_stride, mask=row_ok, other=0.0).to(tl.float32) * g_scale
    ns_c = tl.maximum(ns, eps)
    nt_c = tl.maximum(nt, eps)
    cos = dot / (ns_c * nt_c) + 0.0 * (ns + nt)
    live = ns > eps
    coef_s = tl.where(live, gr * cos / (ns_c * ns_c), 0.0)[:, None]
    coef_t = tl.where(live, -gr / (ns_c * nt_c), 0.0)[:, None]
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)[None, :]
        mask = row_ok[:, None] & (cols < DIM)
        a = tl.load(s + rows64 * S_RSTRIDE + cols * S_CSTRIDE, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t + rows64 * T_RSTRIDE + cols * T_CSTRIDE, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad + rows64 * G_RSTRIDE + cols * G_CSTRIDE,
                 (coef_s * a + coef_t * b).to(grad.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def plan_loss(n_rows: int, dim: int, strides: tuple, device_type: str, block_d: int | None = None) -> Plan:
    """Grid and constants of one loss launch; strides: the (row, col) strides of s, t (and grad).

    Strides are compile-time constants: row-major inputs (what the scripts pass) compile once per tile
    height, while a column-major (transposed) input, whose column stride is its batch size, compiles anew
    for each batch size."""
    block_d = block_d or min(2048, _pow2_ceil(dim))
    block_m = _rows_per_tile(n_rows, block_d, 1, _on_gpu(device_type))
    names = ("S", "T", "G")
    meta = dict(DIM=dim, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    for name, (rs, cs) in zip(names, strides):
        meta[f"{name}_RSTRIDE"], meta[f"{name}_CSTRIDE"] = rs, cs
    return Plan((-(-n_rows // block_m),), meta)


def cosine_forward(student, target, eps, loss=None, stats=None, block_d=None):
    """Per-row loss (B,) and stats (3, B) = (|s|, |t|, s.t), both float32; loss/stats may be given."""
    n_rows, dim = student.shape
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if stats is None:
        stats = torch.empty(3, n_rows, dtype=torch.float32, device=student.device)
    if n_rows:
        plan = plan_loss(n_rows, dim, (student.stride(), target.stride()), student.device.type, block_d)
        _launch(_cos_fwd_kernel, plan.grid, student.device, student, target, loss, stats, n_rows, eps, **plan.meta)
    return loss, stats


def cosine_backward(student, target, stats, grad_loss, scale, eps, grad=None, block_d=None):
    """d loss / d student in the student's dtype; grad_loss is 0-d or (B,), multiplied by scale."""
    n_rows, dim = student.shape
    if grad is None:
        grad = torch.empty(n_rows, dim, dtype=student.dtype, device=student.device)
    if n_rows:
        g_stride = grad_loss.stride(0) if grad_loss.dim() else 0
        plan = plan_loss(n_rows, dim, (student.stride(), target.stride(), grad.stride()), student.device.type,
                         block_d)
        _launch(_cos_bwd_kernel, plan.grid, student.device, student, target, stats, grad_loss, g_stride,
                float(scale), grad, n_rows, eps, **plan.meta)
    return grad

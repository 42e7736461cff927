"""Triton kernels behind kernels.fuse_features and kernels.cosine_distill_loss.

Same arguments and numerical conventions as torch_impl; launchers take optional output buffers (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Triton builds its own library (tl.sum, ...) for either its interpreter or its compiler, once, as it is
# imported, after TRITON_INTERPRET at that moment. Kernels of the other kind cannot call it, so ours
# follow that choice rather than the variable's value when this module is imported or a kernel runs.
INTERPRETER_BUILT = isinstance(tl.sum, InterpretedFunction)


def interpreting() -> bool:
    """True when CPU tensors can run the kernels: TRITON_INTERPRET=1, and set before triton was imported."""
    return INTERPRETER_BUILT and bool(triton.knobs.runtime.interpret)


def _kernel(fn):
    """@triton.jit, but in the mode triton.language was built in."""
    return InterpretedFunction(fn) if INTERPRETER_BUILT else JITFunction(fn)


def _launch(kernel, grid, device, *args, **meta):
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device's stream
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _rows_per_tile(n_rows: int, cols: int, programs_per_row_block: int, device: torch.device,
                   max_tile: int = 4096) -> int:
    rows = max(1, max_tile // cols)
    if device.type == "cuda" and not INTERPRETER_BUILT:
        # Small batches would otherwise leave most SMs idle; the interpreter runs programs one after
        # another, so there fewer, bigger tiles are faster.
        while rows > 1 and triton.cdiv(n_rows, rows) * programs_per_row_block < 512:
            rows //= 2
    return rows


# ----------------------------------------------------------------------------------------------------
# Multi-teacher concatenation + standardisation + cast.

@_kernel
def _fuse_kernel(srcs, src_rstride, src_cstride, widths, out_cols, first_blocks,
                 mean, mean_stride, std, std_stride, out, out_rstride, out_cstride, n_rows,
                 N_SRC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Column blocks are numbered teacher after teacher (first_blocks[k] is teacher k's first), so every
    # program reads exactly one teacher and a single launch covers them all. The unrolled if-chain
    # gives each teacher its own pointer type, hence mixed input dtypes without a conversion pass.
    pid_n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]  # staging buffers can exceed 2**31 elements
    for k in tl.static_range(N_SRC):
        if (pid_n >= first_blocks[k]) & (pid_n < first_blocks[k + 1]):
            cols = ((pid_n - first_blocks[k]) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            col_ok = cols < widths[k]
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(srcs[k] + rows64 * src_rstride[k] + cols[None, :] * src_cstride[k], mask=mask)
            ocols = out_cols[k] + cols
            mu = tl.load(mean + ocols * mean_stride, mask=col_ok, other=0.0).to(tl.float32)
            sd = tl.load(std + ocols * std_stride, mask=col_ok, other=1.0).to(tl.float32)
            y = (x.to(tl.float32) - mu[None, :]) / sd[None, :]
            tl.store(out + rows64 * out_rstride + ocols[None, :] * out_cstride,
                     y.to(out.dtype.element_ty), mask=mask)


def fuse_features(features, mean, std, out, block_n=None):
    widths = [x.shape[1] for x in features]
    starts = [sum(widths[:k]) for k in range(len(widths))]
    live = [k for k, w in enumerate(widths) if w > 0]
    n_rows = out.shape[0]
    if n_rows == 0 or not live:
        return out
    block_n = block_n or min(128, triton.next_power_of_2(max(widths)))
    first_blocks = [0]
    for k in live:
        first_blocks.append(first_blocks[-1] + triton.cdiv(widths[k], block_n))
    block_m = _rows_per_tile(n_rows, block_n, first_blocks[-1], out.device)
    grid = (triton.cdiv(n_rows, block_m), first_blocks[-1])
    _launch(_fuse_kernel, grid, out.device,
            tuple(features[k] for k in live), tuple(features[k].stride(0) for k in live),
            tuple(features[k].stride(1) for k in live), tuple(widths[k] for k in live),
            tuple(starts[k] for k in live), tuple(first_blocks),
            mean, mean.stride(0), std, std.stride(0), out, out.stride(0), out.stride(1), n_rows,
            N_SRC=len(live), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------
# Cosine distillation loss, forward and backward.

@_kernel
def _cos_fwd_kernel(s, s_rstride, s_cstride, t, t_rstride, t_cstride, loss, stats, n_rows, dim, eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    # Triton proves divisibility by 16 only; ALIGN (which divides dim and the row strides) lets it
    # vectorise rows like D=536 that would otherwise load 2 bytes at a time.
    s_rows = tl.multiple_of(rows64 * s_rstride, [ALIGN, 1])
    t_rows = tl.multiple_of(rows64 * t_rstride, [ALIGN, 1])
    ss = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tt = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    st = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & tl.max_constancy(cols < dim, [ALIGN])[None, :]
        cols = cols[None, :].to(tl.int64)
        a = tl.load(s + s_rows + cols * s_cstride, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t + t_rows + cols * t_cstride, mask=mask, other=0.0).to(tl.float32)
        ss += a * a
        tt += b * b
        st += a * b
    ns = tl.sqrt(tl.sum(ss, axis=1))
    nt = tl.sqrt(tl.sum(tt, axis=1))
    dot = tl.sum(st, axis=1)
    cos = dot / (tl.maximum(ns, eps) * tl.maximum(nt, eps))
    tl.store(loss + rows, 1.0 - cos, mask=row_ok)
    tl.store(stats + rows, ns, mask=row_ok)
    tl.store(stats + n_rows + rows, nt, mask=row_ok)
    tl.store(stats + 2 * n_rows + rows, dot, mask=row_ok)


@_kernel
def _cos_bwd_kernel(s, s_rstride, s_cstride, t, t_rstride, t_cstride, stats, g, g_stride, g_scale,
                    grad, grad_rstride, grad_cstride, n_rows, dim, eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    s_rows = tl.multiple_of(rows64 * s_rstride, [ALIGN, 1])
    t_rows = tl.multiple_of(rows64 * t_rstride, [ALIGN, 1])
    g_rows = tl.multiple_of(rows64 * grad_rstride, [ALIGN, 1])
    ns = tl.load(stats + rows, mask=row_ok, other=1.0)
    nt = tl.load(stats + n_rows + rows, mask=row_ok, other=1.0)
    dot = tl.load(stats + 2 * n_rows + rows, mask=row_ok, other=0.0)
    gr = tl.load(g + rows * g_stride, mask=row_ok, other=0.0).to(tl.float32) * g_scale
    ns_c = tl.maximum(ns, eps)
    nt_c = tl.maximum(nt, eps)
    cos = dot / (ns_c * nt_c)
    live = ns > eps
    coef_s = tl.where(live, gr * cos / (ns_c * ns_c), 0.0)[:, None]
    coef_t = tl.where(live, -gr / (ns_c * nt_c), 0.0)[:, None]
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & tl.max_constancy(cols < dim, [ALIGN])[None, :]
        cols = cols[None, :].to(tl.int64)
        a = tl.load(s + s_rows + cols * s_cstride, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t + t_rows + cols * t_cstride, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad + g_rows + cols * grad_cstride, (coef_s * a + coef_t * b).to(grad.dtype.element_ty),
                 mask=mask)


def _loss_tiles(n_rows, dim, device, block_d, *tensors):
    block_d = block_d or min(2048, triton.next_power_of_2(max(dim, 1)))
    block_m = _rows_per_tile(n_rows, block_d, 1, device)
    align = min(16, block_d)
    while any(v % align for v in [dim] + [x.stride(0) for x in tensors]):
        align //= 2
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align, num_warps=4), (triton.cdiv(n_rows, block_m),)


def cosine_forward(student, target, eps, loss=None, stats=None, block_d=None):
    """Per-row loss (B,) and stats (3, B) = (|s|, |t|, s.t), both float32; loss/stats may be given."""
    n_rows, dim = student.shape
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if stats is None:
        stats = torch.empty(3, n_rows, dtype=torch.float32, device=student.device)
    if n_rows:
        meta, grid = _loss_tiles(n_rows, dim, student.device, block_d, student, target)
        _launch(_cos_fwd_kernel, grid, student.device, student, *student.stride(), target, *target.stride(),
                loss, stats, n_rows, dim, eps, **meta)
    return loss, stats


def cosine_backward(student, target, stats, grad_loss, scale, eps, grad=None, block_d=None):
    """d loss / d student in the student's dtype; grad_loss is 0-d or (B,), multiplied by scale."""
    n_rows, dim = student.shape
    if grad is None:
        grad = torch.empty(n_rows, dim, dtype=student.dtype, device=student.device)
    if n_rows:
        g_stride = grad_loss.stride(0) if grad_loss.dim() else 0
        meta, grid = _loss_tiles(n_rows, dim, student.device, block_d, student, target, grad)
        _launch(_cos_bwd_kernel, grid, student.device, student, *student.stride(), target, *target.stride(),
                stats, grad_loss, g_stride, float(scale), grad, *grad.stride(), n_rows, dim, eps, **meta)
    return grad

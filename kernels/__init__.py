"""Fused kernels for the distillation pipeline: teacher-feature concatenation and the cosine loss.

Each op has a Triton kernel and a pure PyTorch fallback with the same conventions. backend="auto"
(the default) takes Triton when triton imports and the tensors are on one CUDA device, or on the CPU
when TRITON_INTERPRET=1 (set before triton is first imported) selects Triton's interpreter, as the
tests do; otherwise the fallback. FACEKD_KERNELS=torch|triton in the environment replaces "auto"; an
explicit backend="torch"|"triton" argument wins over both. Forcing "triton" where it cannot run
raises RuntimeError rather than falling back.

"auto" never takes a run down: GPUs older than sm_70 (which Triton does not target) get the fallback
without a try, and a kernel that fails to compile or launch logs one warning naming the op and the
Triton version, after which that op uses the fallback for the rest of the process. A triton that
cannot be imported is said once when a CUDA tensor meets it. Out of memory and CUDA errors (an illegal
access, a device-side assert) go through as they are: the fallback would meet them too.
"""
from __future__ import annotations

import os
import re
import warnings

import torch
from torch.autograd.function import once_differentiable

from . import torch_impl

__all__ = ["fuse_features", "cosine_distill_loss", "triton_available", "resolve_backend"]

_BACKENDS = ("auto", "triton", "torch")
_TRITON_LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_triton_impl = None
_triton_error = None
MIN_CAPABILITY = (7, 0)  # Triton's oldest NVIDIA target
_failed_ops: dict[str, str] = {}  # op -> why its kernel failed in this process (auto then falls back)
_said: set[str] = set()  # reasons already warned of


def _load_triton():
    """The triton_impl module, or None (reason kept in _triton_error) when triton cannot be imported."""
    global _triton_impl, _triton_error
    if _triton_impl is None and _triton_error is None:
        try:
            from . import triton_impl
            _triton_impl = triton_impl
        except Exception as exc:  # a broken install can fail with more than ImportError
            _triton_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return _triton_impl


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports, and a CUDA GPU is present or
    TRITON_INTERPRET=1 selects Triton's CPU interpreter."""
    impl = _load_triton()
    return impl is not None and (torch.cuda.is_available() or impl.interpreting())


def _interpret_requested() -> bool:
    # Read here, as triton reads it, so that CPU calls do not import triton only to learn the answer.
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _gpu_reason(device: torch.device):
    """Why the Triton kernels cannot run on this CUDA device, or None."""
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        return f"Triton does not target sm_{cap[0]}{cap[1]} (it needs sm_70 or newer)"
    return None


def _why_not_triton(tensors, dtypes=None):
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"the tensors are on several devices {sorted(map(str, devices))}"
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    if device.type == "cpu" and not _interpret_requested():
        return "the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    impl = _load_triton()
    if impl is None:
        return _triton_error
    if device.type == "cpu" and not impl.interpreting():
        return "TRITON_INTERPRET=1 was set after triton had been imported (set it before)"
    if device.type == "cuda" and not impl.INTERPRETER_BUILT:
        reason = _gpu_reason(device)
        if reason:
            return reason
    if dtypes is not None:
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in dtypes})
        if bad:
            return f"the Triton kernel does not take {', '.join(bad)}"
    return None


def _requested(backend: str) -> str:
    """The backend asked for: the argument, or FACEKD_KERNELS where the argument is "auto"."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
    if backend != "auto":
        return backend
    env = os.environ.get("FACEKD_KERNELS", "").strip().lower()
    if env not in ("", "auto", "torch", "triton"):
        raise ValueError(f"FACEKD_KERNELS={env!r}: expected 'torch' or 'triton'")
    return env or "auto"


def resolve_backend(backend: str, tensors, dtypes=None, op: str | None = None) -> str:
    """'triton' or 'torch' for an op on `tensors`, following the rules in the module docstring."""
    backend = _requested(backend)
    if backend == "torch" or (backend == "auto" and op in _failed_ops):
        return "torch"
    reason = _why_not_triton(tensors, dtypes)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"the Triton backend was requested but {reason}")
    if reason == _triton_error and reason not in _said and any(t.device.type == "cuda" for t in tensors):
        _said.add(reason)  # a GPU run without its kernels is slower: say why, once
        warnings.warn(f"{reason}: the kernels use the PyTorch fallback", RuntimeWarning, stacklevel=3)
    return "torch"


def _device_fault(exc: BaseException) -> bool:
    """A CUDA error (an illegal access, a device-side assert) leaves the device unusable and may come of
    an earlier op, as CUDA reports them late: not the kernel's fault, and the fallback would fail too."""
    text = str(exc).lstrip()
    # Triton's own "Triton Error [CUDA]" also says a kernel image the driver cannot load: that one falls back
    return (isinstance(exc, torch.AcceleratorError) or text.startswith("CUDA error")
            or (text.startswith("Triton Error [CUDA]") and not re.search(r"kernel image|PTX|toolchain", text)))


def _guarded(op, backend, fn, *args):
    """fn(*args); when it raises under "auto", None, and op takes the fallback from then on (said once)."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        raise  # the fallback needs memory too: not a kernel fault, so not a reason to leave the kernel for good
    except Exception as exc:
        if _requested(backend) == "triton" or _device_fault(exc):
            raise
        lines = str(exc).strip().splitlines()
        msg = (f"the Triton kernel of {op} failed under triton {_triton_impl.VERSION} "
               f"({type(exc).__name__}: {lines[-1] if lines else ''}); {op} uses the PyTorch fallback "
               f"for the rest of this process")
        _failed_ops[op] = msg
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return None


def fuse_features(features, mean, std, out=None, out_dtype=torch.float16, backend="auto"):
    """Write the teachers' embeddings side by side, standardised and cast, in one pass.

    features: sequence of (B, d_i) floating tensors (any strides, any float dtype each); mean, std:
    1-D float tensors of length sum(d_i). Computes (x - mean) / std in float32 and stores it in `out`
    (a (B, sum d_i) tensor or view, e.g. rows of a staging buffer; its dtype wins) or, when out is None,
    in a new tensor of out_dtype on the features' device. Returns out, outside any autograd graph.
    """
    features = list(features)
    if not features:
        raise ValueError("fuse_features needs at least one feature tensor")
    n_rows = features[0].shape[0]
    for k, x in enumerate(features):
        if x.dim() != 2 or x.shape[0] != n_rows or not x.is_floating_point():
            raise ValueError(f"features[{k}] must be a floating (B={n_rows}, d) tensor, got "
                             f"{x.dtype} {tuple(x.shape)}")
    total = sum(x.shape[1] for x in features)
    for name, v in (("mean", mean), ("std", std)):
        if v.dim() != 1 or v.shape[0] != total or not v.is_floating_point():
            raise ValueError(f"{name} must be a floating 1-D tensor of length {total}, got "
                             f"{v.dtype} {tuple(v.shape)}")
    if out is None:
        out = torch.empty(n_rows, total, dtype=out_dtype, device=features[0].device)
    elif tuple(out.shape) != (n_rows, total) or not out.is_floating_point():
        raise ValueError(f"out must be a floating ({n_rows}, {total}) tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if resolve_backend(backend, features + [mean, std, out], op="fuse_features") == "triton":
        done = _guarded("fuse_features", backend, _triton_impl.fuse_features, features, mean, std, out)
        if done is not None:
            return done
    return torch_impl.fuse_features(features, mean, std, out)


_LOSS = "cosine_distill_loss"


class _CosineDistill(torch.autograd.Function):
    # Saves the inputs (by reference) and three floats per row; no (B, D) intermediate survives. Both
    # implementations keep the same float32 row statistics, so a backward can fall back on its own.

    @staticmethod
    def forward(ctx, student, target, reduction, eps, impl, backend):
        done = None
        if impl is _triton_impl:
            done = _guarded(_LOSS, backend, impl.cosine_forward, student, target, eps)
            impl = impl if done is not None else torch_impl
        loss, stats = done or torch_impl.cosine_forward(student, target, eps)
        ctx.save_for_backward(student, target, stats)
        ctx.reduction, ctx.eps, ctx.impl, ctx.backend = reduction, eps, impl, backend
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad = None
        if ctx.needs_input_grad[0]:
            student, target, stats = ctx.saved_tensors
            scale = 1.0 / max(student.shape[0], 1) if ctx.reduction == "mean" else 1.0
            args = (student, target, stats, grad_loss, scale, ctx.eps)
            # an explicit "triton" never falls back, even where an earlier "auto" call gave up on the kernel
            if ctx.impl is _triton_impl and (_LOSS not in _failed_ops or _requested(ctx.backend) == "triton"):
                grad = _guarded(_LOSS, ctx.backend, _triton_impl.cosine_backward, *args)
            if grad is None:
                grad = torch_impl.cosine_backward(*args)
        return grad, None, None, None, None, None


def cosine_distill_loss(student, target, reduction="mean", eps=1e-8, backend="auto"):
    """Cosine distillation loss 1 - cos(student_i, target_i) over rows of two (B, D) tensors.

    cos = s.t / (max(|s|, eps) max(|t|, eps)), the eps clamp of torch.nn.functional.cosine_similarity.
    reduction: "mean" | "sum" | "none" (per-row (B,) loss). Accumulates in float32 (float64 for
    float64 inputs) and returns the loss in that dtype; the gradient comes in the student's dtype.
    Gradient convention: exact derivative of the formula above, except that a student row with
    |s| <= eps (e.g. all zeros) gets a zero gradient, so the gradient is finite in float32 arithmetic (a
    float16 student row of tiny but nonzero norm, |s| ~ 1e-6, can still overflow its float16 gradient to
    inf, which GradScaler sees and skips). A row whose norm overflows the accumulation dtype (a diverged
    student, |s| > ~1.8e19 in float32) gives a NaN loss and gradient, which the scripts' checks stop on, not
    a loss of 1 with a zero gradient.
    The target is a fixed teacher output: no gradient flows to it, and a target that requires grad
    raises ValueError while grad mode is on (pass target.detach()). First derivatives only (no double
    backward). Inside autocast both implementations still compute in float32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    if student.dim() != 2 or student.shape != target.shape:
        raise ValueError(f"student and target must be (B, D) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(target.shape)}")
    if not (student.is_floating_point() and target.is_floating_point()):
        raise ValueError("student and target must be floating tensors")
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("cosine_distill_loss computes no gradient for the target; pass target.detach()")
    try:  # the kernel takes a Python float: a tensor or numpy eps would fail it (and, under "auto", for good)
        eps = float(eps)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if resolve_backend(backend, [student, target], _TRITON_LOSS_DTYPES, op=_LOSS) == "triton":
        impl = _triton_impl
    else:
        impl = torch_impl
    return _CosineDistill.apply(student, target, reduction, eps, impl, backend)

"""Compile the Triton kernels for a GPU without one (nothing is launched); print their memory accesses.

    python -m kernels.compile_check [--arch 90]

Triton's CPU interpreter, which runs the tests here, never calls its compiler; this does, through a stub
driver. It compiles every launch plan that CUDA would really use for a sweep of batch sizes from 1 to
65536 (so every tile height, one-row tiles included), for the default teacher set and for loss widths
536 and 1024 in several dtypes (and a transposed student at a few widths), and prints each variant's
global loads and stores (v4 = 16-byte accesses). Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import triton_impl as ti

BATCHES = (1, 2, 3, 17, 64, 256, 512, 4096, 65536)
TEACHER_WIDTHS = (128, 256, 16, 1280, 256, 1280)  # the default teacher set
LOSS_CASES = ((536, torch.bfloat16, torch.float16), (1024, torch.float16, torch.float16),
              (1024, torch.float32, torch.float32))
TRANSPOSED_LOSS_CASES = ((16, torch.bfloat16), (67, torch.float16), (536, torch.float16))


class _StubDriver:
    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def _variants():
    """(name, kernel, args, plan) for every distinct plan CUDA launches over BATCHES. CPU tensors stand
    in for device pointers: only their dtypes and alignment matter to the compiler."""
    out = []
    dtypes = [torch.float32, torch.float16, torch.bfloat16] * 2
    feats = [torch.empty(8, w, dtype=d) for w, d in zip(TEACHER_WIDTHS, dtypes)]
    feats[2] = torch.empty(TEACHER_WIDTHS[2], 8, dtype=torch.bfloat16).t()  # a transposed teacher
    total = sum(TEACHER_WIDTHS)
    mean, std, fused = torch.zeros(total), torch.ones(total), torch.empty(8, total, dtype=torch.float16)
    for b in BATCHES:
        plan = ti.plan_fuse(b, TEACHER_WIDTHS, tuple((x.stride(0), x.stride(1)) for x in feats), 1, 1,
                            (total, 1), "cuda")
        out.append((f"_fuse_kernel[B={b}]", ti._fuse_kernel, (tuple(feats), mean, std, fused, b), plan))
    for dim, s_dtype, t_dtype in LOSS_CASES:
        s, t = torch.empty(8, dim, dtype=s_dtype), torch.empty(8, dim, dtype=t_dtype)
        stats, loss, g = torch.empty(3, 8), torch.empty(8), torch.empty(8)
        for b in BATCHES:
            tag = f"D={dim} {str(s_dtype)[6:]}/{str(t_dtype)[6:]} B={b}"
            fwd = ti.plan_loss(b, dim, ((dim, 1), (dim, 1)), "cuda")
            out.append((f"_cos_fwd_kernel[{tag}]", ti._cos_fwd_kernel, (s, t, loss, stats, b, 1e-8), fwd))
            bwd = ti.plan_loss(b, dim, ((dim, 1), (dim, 1), (dim, 1)), "cuda")
            out.append((f"_cos_bwd_kernel[{tag}]", ti._cos_bwd_kernel,
                        (s, t, stats, g, 1, 1.0 / b, torch.empty_like(s), b, 1e-8), bwd))
    for dim, dtype in TRANSPOSED_LOSS_CASES:  # a column-major student: column stride = batch, no wide loads
        for b in (1, 3, 256):
            s, t = torch.empty(dim, b, dtype=dtype).t(), torch.empty(b, dim, dtype=dtype)
            tag = f"transposed D={dim} {str(dtype)[6:]} B={b}"
            fwd = ti.plan_loss(b, dim, (s.stride(), t.stride()), "cuda")
            out.append((f"_cos_fwd_kernel[{tag}]", ti._cos_fwd_kernel,
                        (s, t, torch.empty(b), torch.empty(3, b), b, 1e-8), fwd))
            bwd = ti.plan_loss(b, dim, (s.stride(), t.stride(), (dim, 1)), "cuda")
            out.append((f"_cos_bwd_kernel[{tag}]", ti._cos_bwd_kernel,
                        (s, t, torch.empty(3, b), torch.empty(b), 1, 1.0 / b, torch.empty(b, dim, dtype=dtype), b,
                         1e-8), bwd))
    return out


def compile_ptx(arch: int = 90) -> dict[str, str]:
    """PTX of each distinct launch variant, keyed by 'kernel[case]' (one entry per distinct plan)."""
    if ti.INTERPRETER_BUILT:
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1; run this with it unset")
    ptx, seen = {}, set()
    saved_driver = getattr(driver, "_active", None)
    driver.set_active(_StubDriver(arch))
    try:
        for name, kernel, args, plan in _variants():
            key = (kernel.fn.__name__, tuple(a.dtype if torch.is_tensor(a) else type(a) for a in args[:4]),
                   tuple(sorted((k, str(v)) for k, v in plan.meta.items())))
            if key in seen:
                continue
            seen.add(key)
            # A fresh JITFunction keeps the stub target's binaries out of the real kernels' caches.
            meta = dict(plan.meta, BLOCK_M=plan.meta["BLOCK_M"])
            ptx[f"{name} BLOCK_M={meta['BLOCK_M']}"] = JITFunction(kernel.fn).warmup(
                *args, grid=plan.grid, **meta).asm["ptx"]
    finally:
        driver.set_active(saved_driver)
    return ptx


def accesses(ptx: str) -> list[str]:
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args(argv)
    for name, code in compile_ptx(args.arch).items():
        print(f"{name}: {' '.join(accesses(code))}")


if __name__ == "__main__":
    main()

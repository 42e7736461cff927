"""Compile the Triton kernels for a GPU without one (nothing is launched); print their memory accesses.

    python -m kernels.compile_check [--arch 90]

Triton's CPU interpreter, which runs the tests here, never calls its compiler; this does, through a stub
driver, with the launchers' own arguments for the default teacher set and D=536 rows, and prints each
kernel's global loads and stores (v4 = 16-byte accesses). Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import triton_impl as ti


class _StubDriver:
    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def compile_ptx(arch: int = 90) -> dict[str, str]:
    """PTX of each kernel, keyed by kernel name."""
    if ti.INTERPRETER_BUILT:
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1; run this with it unset")
    ptx = {}

    def compile_only(kernel, grid, device, *args, **meta):
        # A fresh JITFunction keeps the stub target's binaries out of the real kernels' caches.
        ptx[kernel.fn.__name__] = JITFunction(kernel.fn).warmup(*args, grid=grid, **meta).asm["ptx"]

    saved_launch, saved_driver = ti._launch, getattr(driver, "_active", None)
    ti._launch = compile_only
    driver.set_active(_StubDriver(arch))
    try:
        b = 64  # CPU tensors stand in for device pointers: only dtypes, strides and alignment matter
        widths = [128, 256, 16, 1280, 256, 1280]
        dtypes = [torch.float32, torch.float16, torch.bfloat16] * 2
        feats = [torch.empty(b, w, dtype=d) for w, d in zip(widths, dtypes)]
        feats[2] = torch.empty(16, b, dtype=torch.bfloat16).t()  # a transposed teacher
        total = sum(widths)
        out = torch.empty(b, total, dtype=torch.float16)
        ti.fuse_features(feats, torch.zeros(total), torch.ones(total), out)
        s = torch.empty(b, 536, dtype=torch.bfloat16)
        t = torch.empty(b, 536, dtype=torch.float16)
        _, stats = ti.cosine_forward(s, t, 1e-8)
        ti.cosine_backward(s, t, stats, torch.ones(()), 1.0 / b, 1e-8)
    finally:
        ti._launch = saved_launch
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

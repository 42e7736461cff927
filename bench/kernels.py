"""Benchmark kernels.fuse_features and kernels.cosine_distill_loss against eager PyTorch and torch.compile.

On a GPU: median times from triton.testing.do_bench, achieved GB/s against a device copy measured in the
same run, and peak memory. Without a GPU it times eager PyTorch against the PyTorch fallback on the CPU;
Triton figures need a GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from common.runs import HelpFormatter  # noqa: E402

# sface identity, age, gender, facex expression, MTCNN ONet landmarks, MobileNetV2 ImageNet.
TEACHER_WIDTHS = [128, 256, 16, 1280, 256, 1280]
LOSS_DIMS = (536, 1024)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def eager_fuse(feats, mean, std, out_dtype):
    return ((torch.cat(feats, 1).float() - mean) / std).to(out_dtype)


def eager_loss(student, target):
    # float32 upcast, as autocast does for cosine_similarity and as the kernel accumulates.
    return (1 - F.cosine_similarity(student.float(), target.float(), dim=1, eps=1e-8)).mean()


def loss_step(loss_fn, student, target):
    (grad,) = torch.autograd.grad(loss_fn(student, target), student)
    return grad


class Timer:
    """Median milliseconds and peak extra memory of a callable, on the GPU or the CPU."""

    def __init__(self, device, reps):
        self.device, self.reps = device, reps

    def ms(self, fns):
        """Median milliseconds of each callable."""
        if self.device.type == "cuda":
            import triton.testing
            return [triton.testing.do_bench(fn, return_mode="median") for fn in fns]
        # Round-robin so that a change in the CPU's load (shared machines) hits every callable alike.
        times = [[] for _ in fns]
        for rep in range(self.reps + 1):
            for fn, t in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                if rep:  # the first round is a warm-up
                    t.append(time.perf_counter() - t0)
        return [1e3 * statistics.median(t) for t in times]

    def peak_mib(self, fn):
        if self.device.type != "cuda":
            return None  # the CPU allocator keeps no peak statistics
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()  # held until the peak is read: the output is part of the footprint
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak / 2**20

    def copy_gbps(self):
        n = (256 if self.device.type == "cuda" else 64) * 2**20 // 4
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / self.ms([lambda: dst.copy_(src)])[0] / 1e6


def _rows(timer, copy_gbps, label, impls, nbytes):
    """One row per implementation; speed-ups are against eager (first) and torch.compile (second, GPU)."""
    rows = []
    times = timer.ms([fn for _, fn in impls])
    compiled_ms = dict(zip([n for n, _ in impls], times)).get("torch.compile")
    for (name, fn), ms in zip(impls, times):
        gbps = nbytes / ms / 1e6
        peak = timer.peak_mib(fn)
        rows.append([label, name, f"{ms:.4f}", f"{gbps:.1f}", f"{100 * gbps / copy_gbps:.0f}%",
                     "n/a" if peak is None else f"{peak:.2f}", f"{times[0] / ms:.2f}x",
                     "n/a" if compiled_ms is None else f"{compiled_ms / ms:.2f}x"])
    return rows


def bench_fuse(timer, copy_gbps, batches, in_dtype, out_dtype, gpu):
    dev = timer.device
    total = sum(TEACHER_WIDTHS)
    mean = torch.randn(total, device=dev)
    std = torch.rand(total, device=dev) + 0.5
    rows = []
    for b in batches:
        feats = [torch.randn(b, w, device=dev).to(in_dtype) for w in TEACHER_WIDTHS]
        nbytes = b * total * (in_dtype.itemsize + out_dtype.itemsize)
        impls = [("eager", lambda: eager_fuse(feats, mean, std, out_dtype))]
        if gpu:
            compiled = torch.compile(eager_fuse)
            impls.append(("torch.compile", lambda: compiled(feats, mean, std, out_dtype)))
            impls.append(("triton", lambda: kernels.fuse_features(feats, mean, std, out_dtype=out_dtype,
                                                                  backend="triton")))
        else:
            impls.append(("fallback", lambda: kernels.fuse_features(feats, mean, std, out_dtype=out_dtype,
                                                                    backend="torch")))
        ref = eager_fuse(feats, mean, std, out_dtype).float()
        for name, fn in impls[1:]:
            err = (fn().float() - ref).abs().max().item()
            assert err < 1e-2, f"fuse {name} differs from eager by {err}"
        rows += _rows(timer, copy_gbps, f"B={b} D={total}", impls, nbytes)
    return rows


def bench_loss(timer, copy_gbps, batches, dtype, gpu):
    dev = timer.device
    rows = []
    for dim in LOSS_DIMS:
        for b in batches:
            student = torch.randn(b, dim, device=dev).to(dtype).requires_grad_(True)
            target = torch.randn(b, dim, device=dev).to(dtype)
            # Forward reads student and target; backward reads both again and writes the gradient.
            nbytes = 5 * b * dim * dtype.itemsize
            impls = [("eager", lambda: loss_step(eager_loss, student, target))]
            if gpu:
                compiled = torch.compile(eager_loss)
                impls.append(("torch.compile", lambda: loss_step(compiled, student, target)))
                fused = lambda s, t: kernels.cosine_distill_loss(s, t, backend="triton")  # noqa: E731
                impls.append(("triton", lambda: loss_step(fused, student, target)))
            else:
                fused = lambda s, t: kernels.cosine_distill_loss(s, t, backend="torch")  # noqa: E731
                impls.append(("fallback", lambda: loss_step(fused, student, target)))
            ref = impls[0][1]().float()
            for name, fn in impls[1:]:
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, f"loss {name} gradient differs from eager by {err}"
            label = f"B={b} D={dim} (grad {b * dim * dtype.itemsize / 2**20:.2f} MiB)"
            rows += _rows(timer, copy_gbps, label, impls, nbytes)
    return rows


def describe(device):
    if device.type == "cuda":
        import triton
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return (f"{torch.cuda.get_device_name(device)} (sm {cap}), torch {torch.__version__}, "
                f"triton {triton.__version__}, CUDA {torch.version.cuda}")
    return (f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two batch sizes and fewer repetitions")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the kernels run (auto: cuda if present; on the CPU the PyTorch fallback is timed "
                             "against eager PyTorch: Triton needs a GPU)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="batch sizes (default 64 256 1024 4096, and 65536 on a GPU)")
    parser.add_argument("--feat-dtype", choices=DTYPES, default="fp32", help="teacher embedding dtype")
    parser.add_argument("--out-dtype", choices=DTYPES, default="fp16", help="fused buffer dtype")
    parser.add_argument("--loss-dtype", choices=DTYPES, default="bf16", help="student/target dtype")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this machine has no CUDA GPU that torch can use (try --device cpu)")
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("warning: TRITON_INTERPRET is set, the Triton timings are the interpreter's")
    batches = args.batches or ([64, 4096] if args.quick else [64, 256, 1024, 4096] + ([65536] if gpu else []))
    timer = Timer(device, reps=5 if args.quick else 20)
    torch.manual_seed(0)

    copy_gbps = timer.copy_gbps()
    print(f"device: {describe(device)}")
    print(f"copy bandwidth (large {device.type} tensor copy, read + write): {copy_gbps:.1f} GB/s")
    if not gpu:
        print("no GPU: timing eager PyTorch against the PyTorch fallback; Triton figures need a GPU")
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes skew CPU timings)")
    headers = ["shape", "impl", "median ms", "GB/s", "% copy BW", "peak MiB", "vs eager", "vs compile"]

    feat_dtype, out_dtype = DTYPES[args.feat_dtype], DTYPES[args.out_dtype]
    print(f"\nfuse_features: {len(TEACHER_WIDTHS)} teachers {TEACHER_WIDTHS}, {args.feat_dtype} in, "
          f"{args.out_dtype} out (GB/s counts one read of the inputs and one write of the output)")
    print(tabulate(bench_fuse(timer, copy_gbps, batches, feat_dtype, out_dtype, gpu), headers=headers))

    print(f"\ncosine_distill_loss forward + backward, {args.loss_dtype} student and target "
          f"(GB/s counts 5 x B x D elements: 2 read forward, 2 read + 1 written backward)")
    print(tabulate(bench_loss(timer, copy_gbps, batches, DTYPES[args.loss_dtype], gpu), headers=headers))


if __name__ == "__main__":
    main()

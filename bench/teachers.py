"""Teacher throughput: images/s of each teacher and of the whole zoo, on real aligned faces.

    python bench/teachers.py                       # the default six, batch 32, on CUDA if there is one
    python bench/teachers.py --device cpu --batch 8 --n 64 --teachers sface,facex
    python bench/teachers.py --no-reference        # the PyTorch teachers only

The faces are the test photos of tests/test_teachers.py (real faces shipped in installed packages), repeated to
fill the batches, so the numbers include each teacher's own crop, resize and normalisation. Each teacher ported
to PyTorch from another runtime (sface, age, gender, facex) runs as its PyTorch module on --device (NAME@torch)
and, in the same process, by its reference runtime (NAME@reference, always on the CPU): the table gives the
port's speed-up over it and how close its embeddings are (lowest cosine, largest absolute difference, real faces).
Where a reference runtime is not installed (LiteRT on a GPU machine, say), the port run on the CPU stands in for it,
in a row named NAME@torch (CPU): the comparison then checks the device against the CPU.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common.teachers import DEFAULT_TEACHERS, REGISTRY, build_teachers  # noqa: E402
from common.runs import HelpFormatter, pick_device, run_main  # noqa: E402
from common.weights import MissingWeights  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batches, device) -> float:
    """Seconds for fn over all batches, after one untimed warm-up batch (allocation, lazy init, autotuning)."""
    fn(batches[0])
    sync(device)
    start = time.perf_counter()
    for b in batches:
        fn(b)
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS),
                   help="comma-separated teachers: registry names, custom specs (onnx:PATH:LAYER:SIZE, ...) or a "
                        "JSON config (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="faces per call of a teacher (default: %(default)s)")
    p.add_argument("--n", type=int, default=128,
                   help="faces timed per teacher, rounded up to whole batches (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the PyTorch teachers and of the input crops; ONNX and LiteRT teachers always run "
                        "on the CPU (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference runtimes of the ported teachers (default: time and compare them too)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, onnxruntime and LiteRT; 0 keeps torch's default (default: %(default)s)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.n < 1:
        p.error("--batch and --n must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate
    from test_teachers import aligned_faces, to_batch

    device = pick_device(args.device)
    faces = list(aligned_faces().values())
    n_batches = -(-args.n // args.batch)
    batches = [to_batch([faces[(i * args.batch + j) % len(faces)] for j in range(args.batch)]).to(device)
               for i in range(n_batches)]
    n = n_batches * args.batch

    t0 = time.perf_counter()
    names = [s for s in args.teachers.split(",") if s]
    ported = [n for n in names if n in REGISTRY and REGISTRY[n].reference]
    # the ports themselves, whatever the device (a plain name gives the reference runtime on the CPU)
    teachers = build_teachers([f"{n}@torch" if n in ported else n for n in names], device=device)
    load_s = time.perf_counter() - t0
    refs, ref_kind = {}, {}
    for name in [] if args.no_reference else ported:
        try:
            refs[name], ref_kind[name] = build_teachers([f"{name}@reference"])[0], "reference"
        except MissingWeights as e:
            # a GPU machine without the reference runtime (LiteRT) still checks the device against the CPU port,
            # which the test suite holds to the reference
            print(f"{name}@reference unavailable ({e}); comparing {name} on {device} with its port on the CPU")
            refs[name], ref_kind[name] = build_teachers([f"{name}@torch"], device="cpu")[0], "port on the CPU"

    def row(name, t, sec, base=None, parity=("", "")):
        return [name, t.spec.runtime, str(t.device), t.spec.input_size, t.dim, f"{n / sec:.1f}",
                f"{1000 * sec / n_batches:.1f}", f"{base / sec:.2f}x" if base else "", *parity]

    rows, ref_s = [], {}
    for t in teachers:
        if t.name in refs:
            r = refs[t.name]
            ref_s[t.name] = timed(r, batches, device)
            rows.append(row(f"{t.name}@{'reference' if ref_kind[t.name] == 'reference' else 'torch (CPU)'}", r,
                            ref_s[t.name]))
        sec = timed(t, batches, device)
        parity = ("", "")
        if t.name in refs:
            faces_b = batches[0][:len(faces)]
            y, want = t(faces_b).cpu(), refs[t.name](faces_b)
            cos = torch.nn.functional.cosine_similarity(y, want).min().item()
            parity = (f"{cos:.7f}", f"{(y - want).abs().max().item():.2g}")
        # a port is NAME@torch: a plain name on the CPU is its reference runtime in fuse.py
        rows.append(row(f"{t.name}@torch" if t.name in ported else t.name, t, sec, ref_s.get(t.name), parity))
    zoo = timed(lambda b: [t(b) for t in teachers], batches, device)
    if refs:
        old = [refs.get(t.name, t) for t in teachers]
        old_zoo = timed(lambda b: [t(b) for t in old], batches, device)
        rows.append(["zoo, reference runtimes", "", "", "", sum(t.dim for t in old), f"{n / old_zoo:.1f}",
                     f"{1000 * old_zoo / n_batches:.1f}", "", "", ""])
    rows.append(["zoo (all above)" if not refs else "zoo, PyTorch", "", str(device), "", sum(t.dim for t in teachers),
                 f"{n / zoo:.1f}", f"{1000 * zoo / n_batches:.1f}", f"{old_zoo / zoo:.2f}x" if refs else "", "", ""])
    print(f"device: {device_name(device)} | CPU: {cpu_name()} ({torch.get_num_threads()} threads) | "
          f"torch {torch.__version__} | batch {args.batch}, {n} faces per row | teachers loaded in {load_s:.1f} s")
    print(tabulate(rows, headers=["teacher", "runtime", "runs on", "input", "dim", "images/s", "ms/batch",
                                  "vs reference", "min cosine to ref", "max abs diff"], tablefmt="github",
                   disable_numparse=True))


if __name__ == "__main__":
    run_main(main)

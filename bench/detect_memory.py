"""Peak memory of detection on a batch of large photos: the shrink before MTCNN in chunks of at most
common.align.RESIZE_BYTES of float pixels, against the whole group in one float copy (the baseline, the
budget set past any batch). Each row runs in a process of its own, so each peak is its own (ru_maxrss).

The photos are random pixels of the given size (no face: detection then searches the whole pyramid and
finds nothing, which is the memory the shrink adds to, not what it finds).

  python bench/detect_memory.py --n 16 --size 4000x3000
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.runs import HelpFormatter  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
import common.align
from common.align import BatchDetector
n, w, h, budget = {n}, {w}, {h}, {budget}
if budget:
    common.align.RESIZE_BYTES = budget
g = torch.Generator().manual_seed(0)
imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
BatchDetector("cpu")(imgs)
s = time.perf_counter() - t
print(json.dumps({{"rise_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "s": s}}))
"""


def measure(n: int, w: int, h: int, budget: int) -> dict:
    code = CHILD.format(root=str(ROOT), n=n, w=w, h=h, budget=budget)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT in pixels, such as 4000x3000") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be at least 1 pixel")
    return w, h


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=16, help="photos in the batch, all of one size (one shrink group)")
    p.add_argument("--size", default="4000x3000", type=size, help="WxH of each photo (12 MP)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n {a.n}: at least one photo")
    w, h = a.size
    import torch

    from common.align import RESIZE_BYTES

    rows = []
    for label, budget in (("one float copy of the group (before)", 2**62), (f"chunks of {RESIZE_BYTES >> 20} MB", 0)):
        r = measure(a.n, w, h, budget)
        rows.append([label, f"{r['rise_kb'] / 2**20:.2f}", f"{r['s']:.1f}"])
    base = float(rows[0][1])
    for r in rows:
        r.append(f"{float(r[1]) / base:.2f}x")
    print(f"{platform.processor() or platform.machine()} | torch {torch.__version__} | {a.n} photos of {w}x{h} "
          f"({a.n * 3 * w * h / 2**30:.2f} GiB of uint8 pixels, allocated before the measure)")
    print(tabulate(rows, headers=["shrink", "peak memory rise (GiB)", "detection s", "vs before"], tablefmt="github"))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

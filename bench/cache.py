"""Feature-cache read throughput against a plain np.load of the same bytes.

Writes a cache of random fp16 rows in the real layout (FeatureCache.write_shard), then times:
  - full scan:   every shard read through the cache's memory maps  vs  np.load of each shard file
  - random rows: batches of random rows gathered by ShardedArray.take  vs  np.load(mmap) + fancy index
Reads are from the page cache (the files were just written): the figures measure the code path, not the disk.

  python bench/cache.py --rows 65536 --dim 3216
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cache import FeatureCache  # noqa: E402


@dataclass
class FakeTeacher:
    name: str
    dim: int
    version: str = "bench"


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536, help="faces in the benchmark cache")
    p.add_argument("--dim", type=int, default=3216, help="row width (3216 = the default six teachers)")
    p.add_argument("--shard-size", type=int, default=4096, help="faces per shard")
    p.add_argument("--batch", type=int, default=256, help="rows per random batch")
    p.add_argument("--batches", type=int, default=200, help="random batches per timing")
    p.add_argument("--repeat", type=int, default=5, help="timings per measurement (median reported)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        images = [f"{i}.jpg" for i in range(args.rows)]
        for name in images[:1]:
            (root / name).write_bytes(b"x")
        # list_hash stats every file: give the rest one shared size by pointing at the same bytes.
        for name in images[1:]:
            (root / name).symlink_to(root / images[0])
        cache = FeatureCache.create_or_resume(Path(tmp) / "c", root, images, [FakeTeacher("t", args.dim)],
                                              shard_size=args.shard_size, crop_size=0)  # features only
        rng = np.random.default_rng(0)
        for k in range(cache.n_shards):
            n = int(cache.bounds[k + 1] - cache.bounds[k])
            cache.write_shard(k, rng.standard_normal((n, args.dim), dtype=np.float32), np.ones(n, bool),
                              np.zeros((n, 2, 3)), np.ones(n), ["0" * 40] * n, [""] * n)
        cache.finalize()
        cache = FeatureCache(Path(tmp) / "c")
        files = [cache.shard_file(k) for k in range(cache.n_shards)]
        nbytes = args.rows * args.dim * 2

        def scan_cache():
            feats = cache.features
            return sum(float(np.array(feats.shard(k))[-1, -1]) for k in range(cache.n_shards))  # a copy: every byte read

        def scan_npload():
            return sum(float(np.load(f)[-1, -1]) for f in files)

        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.batches)]

        def random_cache():
            feats = cache.features
            for b in batches:
                feats.take(b)

        maps = [np.load(f, mmap_mode="r") for f in files]

        def random_npload():
            # The best plain-numpy equivalent: pre-opened maps, rows looked up shard by shard.
            for b in batches:
                k = b // args.shard_size
                out = np.empty((len(b), args.dim), np.float16)
                for s in np.unique(k):
                    out[k == s] = maps[s][b[k == s] - s * args.shard_size]

        rows = []
        t_c, t_n = median_time(scan_cache, args.repeat), median_time(scan_npload, args.repeat)
        rows.append(["full scan", f"{nbytes / t_c / 1e9:.2f} GB/s", f"{nbytes / t_n / 1e9:.2f} GB/s", f"{t_n / t_c:.2f}x"])
        t_c, t_n = median_time(random_cache, args.repeat), median_time(random_npload, args.repeat)
        n_rows = args.batch * args.batches
        rows.append([f"random rows (batch {args.batch})", f"{n_rows / t_c:,.0f} rows/s", f"{n_rows / t_n:,.0f} rows/s",
                     f"{t_n / t_c:.2f}x"])
    print(f"{args.rows} rows x {args.dim} fp16 ({nbytes / 1e9:.2f} GB), shards of {args.shard_size}; "
          f"{platform.processor() or platform.machine()}, warm page cache")
    print(tabulate(rows, headers=["read", "FeatureCache", "plain np.load", "cache speed vs np.load"], tablefmt="github"))


if __name__ == "__main__":
    main()

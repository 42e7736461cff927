"""Feature-cache read throughput against a plain np.load of the same bytes.

Writes a cache of random fp16 rows in the real layout (FeatureCache.write_shard), then times:
  - full scan:   every shard read through the cache's memory maps  vs  np.load of each shard file
  - random rows: batches of random rows gathered by ShardedArray.take  vs  np.load(mmap) + fancy index
Reads are from the page cache (the files were just written): the figures measure the code path, not the disk.

Then the crop store (--crops N; 0 skips it): random batches of 128x128x3 crops read by --workers processes,
as distill.py's loader workers read them, through memory maps against positioned reads (ShardedArray's
direct mode, which FeatureCache.crops uses), each from a cold page cache (every shard's pages dropped with
posix_fadvise before the timing: at the paper's 4.12 M faces the store is 203 GB, more than the memory of
the machines it trains on) and from a warm one.

  python bench/cache.py --rows 65536 --dim 3216 --crops 65536 --workers 1,4,8
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cache import FeatureCache, ShardedArray  # noqa: E402
from common.runs import COUNT, POSITIVE_INT, HelpFormatter, leave_stops_to_the_parent, run_main  # noqa: E402


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--rows", type=POSITIVE_INT, default=65536, help="faces in the benchmark cache")
    p.add_argument("--dim", type=POSITIVE_INT, default=3216, help="row width (3216 = the default six teachers)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=4096, help="faces per shard")
    p.add_argument("--batch", type=POSITIVE_INT, default=256, help="rows per random batch")
    p.add_argument("--batches", type=POSITIVE_INT, default=200, help="random batches per timing")
    p.add_argument("--repeat", type=POSITIVE_INT, default=5, help="timings per measurement (median reported)")
    p.add_argument("--crops", type=COUNT, default=65536, help="crops in the crop-store benchmark (48 kB each; 0: skip)")
    p.add_argument("--crop-batches", type=POSITIVE_INT, default=4,
                   help="random batches each reader process takes per timing; few against the store, so that a cold "
                        "read lands where nothing was read before, as in an epoch over a store larger than memory")
    p.add_argument("--workers", default="1,4", help="reader processes for the crop store, a comma list")
    p.add_argument("--dir", default=None, help="where the crop store is written (default: the temp folder; on "
                                               "a tmpfs nothing is ever cold, so pick the disk a cache lives on)")
    args = p.parse_args(argv)
    try:  # checked before the first benchmark, not after it
        workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        workers = [0]
    if min(workers) < 1:
        p.error(f"--workers {args.workers}: a comma list of reader process counts, each 1 or more")
    args.workers = workers
    if args.crops and args.dir is not None and not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir}: no such folder (the crop store is written into it)")
    features(args)
    if args.crops:
        crop_store(args)


def _read_crops(job):
    arr, batches = job
    for b in batches:
        arr.take(b)


def _evict(files) -> bool:
    """Drop the files' pages from the page cache (Linux); False where that cannot be done."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def crop_store(args, size: int = 128):
    workers = args.workers
    table = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rng = np.random.default_rng(0)
        files, bounds = [], [0]
        for k, start in enumerate(range(0, args.crops, args.shard_size)):
            n = min(args.shard_size, args.crops - start)
            files.append(Path(tmp) / f"{k:05d}.npy")
            store = np.lib.format.open_memmap(files[-1], "w+", np.uint8, (n, size, size, 3))
            store[:] = rng.integers(0, 256, (n, size, size, 3), np.uint8)
            store.flush()
            del store
            bounds.append(start + n)
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        for n in workers:
            jobs = [[rng.integers(0, args.crops, args.batch) for _ in range(args.crop_batches)]
                    for _ in range(n)]
            crops = n * len(jobs[0]) * args.batch
            row = [n]
            for state in ("cold", "warm"):
                for direct in (False, True):
                    arr = ShardedArray(files, np.array(bounds), direct=direct)
                    if state == "cold" and not _evict(files):
                        row.append("not measured")
                        continue
                    if state == "warm":
                        for f in files:  # every page in memory
                            np.load(f)
                    with ctx.Pool(n, initializer=leave_stops_to_the_parent) as pool:  # (closed by SIGTERM)
                        t0 = time.perf_counter()
                        pool.map(_read_crops, [(arr, j) for j in jobs])
                        row.append(crops / (time.perf_counter() - t0))
            ratio = [f"{b / a:.2f}x" if not isinstance(a, str) else "-" for a, b in ((row[1], row[2]), (row[3], row[4]))]
            table.append(row + ratio)
    print(f"\ncrop store: {args.crops} crops of {size}x{size}x3 ({args.crops * size * size * 3 / 1e9:.2f} GB), shards "
          f"of {args.shard_size}, random batches of {args.batch}, crops/s over all reader processes")
    print(tabulate(table, headers=["workers", "cold, maps", "cold, direct", "warm, maps", "warm, direct",
                                   "direct/maps cold", "direct/maps warm"], tablefmt="github", floatfmt=",.0f"))


def features(args):

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
    run_main(main)

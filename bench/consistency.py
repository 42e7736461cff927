"""Do feature caches agree with themselves and with each other? A race detector for extraction on a GPU.

bench/pipeline.py's folders repeat the same few hundred images, so a correct cache gives every copy of an
image the same row (up to float rounding from the batch it fell in). A stream race (a kernel reading a
buffer before it is written, a freed block overwritten under queued work) shows as copies that disagree.
Given several caches of the same media (e.g. fuse.py with --streams 1 and 3, or under
CUDA_LAUNCH_BLOCKING=1, which serialises every kernel), it also compares each with the first, image by
image (rows matched by the sha1 of the image bytes, so the folders may differ in length).

Prints, per cache and per pair: the share of found flags that agree, the lowest and median cosine of each
teacher's h_i over rows with a face, the largest difference of the alignment matrices and of the stored
crops; then PASS or FAIL (exit status 1) against --min-cos.

  python bench/consistency.py feats-blocking feats-s1 feats-s3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cache import CacheMismatch, FeatureCache  # noqa: E402
from common.runs import HelpFormatter  # noqa: E402


def sha1s(cache: FeatureCache) -> np.ndarray:
    out = []
    for k in range(cache.n_shards):
        with np.load(cache.shard_file(k).with_suffix(".meta.npz")) as m:
            out.extend(m["sha1"].tolist())
    return np.array(out)


def compare(cache, a, b, other=None):
    """Agreement of rows a of `cache` with rows b of `other` (default: the same cache)."""
    other = other or cache
    fa, fb = cache.found[a], other.found[b]
    both = fa & fb
    row = {"found agree": f"{(fa == fb).mean():.2%}", "rows": len(a)}
    xa, xb = cache.features.take(a[both]).astype(np.float64), other.features.take(b[both]).astype(np.float64)
    worst = 1.0
    for name, sl in cache.slices().items():
        x, y = xa[:, sl], xb[:, sl]
        cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
        if len(cos):
            row[f"cos {name}"] = f"{cos.min():.5f} / {np.median(cos):.5f}"
            worst = min(worst, float(cos.min()))
    if both.any():
        row["matrix max diff"] = f"{np.abs(cache.matrices[a[both]] - other.matrices[b[both]]).max():.2e}"
        if cache.crop_size and other.crop_size:
            ca = cache.crops.take(a[both]).astype(np.int16)
            cb = other.crops.take(b[both]).astype(np.int16)
            row["crops max diff"] = int(np.abs(ca - cb).max())
    return row, worst, float((fa == fb).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("caches", nargs="+", type=Path, help="feature caches (fuse.py --cache) of the same folder")
    p.add_argument("--min-cos", type=float, default=0.999, help="lowest cosine of any teacher's h_i that passes")
    p.add_argument("--min-found", type=float, default=0.99, help="lowest share of found flags that agree")
    args = p.parse_args(argv)
    try:
        caches = [FeatureCache(c).require_complete() for c in args.caches]
    except (FileNotFoundError, RuntimeError, CacheMismatch) as e:  # no cache there, or an unfinished one
        raise SystemExit(f"error: {e}")
    names = [",".join(t["name"] for t in c.teachers) for c in caches]
    if len(set(names)) > 1:  # each teacher's h_i is compared with its own in the other caches
        raise SystemExit("error: the caches hold different teachers: " + "; ".join(
            f"{p} has {n}" for p, n in zip(args.caches, names)))
    rows, ok = [], True
    firsts = []
    for path, cache in zip(args.caches, caches):
        # every row against the first row holding the same image bytes
        keys, first, inverse = np.unique(sha1s(cache), return_index=True, return_inverse=True)
        firsts.append((keys, first))
        row, worst, found = compare(cache, np.arange(len(inverse)), first[inverse])
        rows.append({"what": f"{path.name}: copies of {len(keys)} images", **row})
        ok &= worst >= args.min_cos and found >= args.min_found
    keys, first = firsts[0]
    for path, cache in zip(args.caches[1:], caches[1:]):
        # by image content, so that folders of other lengths made from the same media compare too
        mine = sha1s(cache)
        at = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
        shared = np.flatnonzero(keys[at] == mine)
        if not len(shared):
            raise SystemExit(f"error: {path} holds none of the images of {args.caches[0]}")
        row, worst, found = compare(caches[0], first[at[shared]], shared, cache)
        rows.append({"what": f"{args.caches[0].name} vs {path.name}", **row})
        ok &= worst >= args.min_cos and found >= args.min_found
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print("PASS" if ok else f"FAIL: a cosine under {args.min_cos} or found flags agreeing under {args.min_found:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

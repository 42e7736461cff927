"""The sharded feature cache: layout, statistics, atomic writes, resume bookkeeping, mismatch errors."""
from dataclasses import dataclass

import numpy as np
import pytest

from common.cache import CacheMismatch, FeatureCache, ShardedArray, atomic_write


@dataclass
class Meta:  # only what the cache records of a teacher
    name: str
    dim: int
    version: str


TEACHERS = [Meta("a", 3, "a:1"), Meta("b", 5, "b:1")]


def fill(cache, rng):
    """Write every shard with random rows; every 4th face is 'not found'."""
    all_rows = []
    for k in range(cache.n_shards):
        lo, hi = cache.bounds[k], cache.bounds[k + 1]
        x = rng.normal(size=(hi - lo, cache.dim)).astype(np.float32) * 3 + 1
        found = (np.arange(lo, hi) % 4) != 0
        x[~found] = 0
        cache.write_shard(k, x, found, np.zeros((hi - lo, 2, 3)), np.ones(hi - lo), ["0" * 40] * (hi - lo),
                          ["" if f else "no face detected" for f in found])
        all_rows.append(x)
    return np.concatenate(all_rows)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    names = [f"img{i:03d}.jpg" for i in range(23)]
    for i, n in enumerate(names):
        (root / n).write_bytes(b"x" * (i + 1))
    return root, names


def test_write_read_stats(tmp_path, images):
    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, dtype="float32")
    assert cache.n_shards == 5 and cache.dim == 8
    x = fill(cache, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="incomplete"):
        FeatureCache(tmp_path / "c").require_complete()
    cache.finalize()
    c = FeatureCache(tmp_path / "c").require_complete()
    assert c.images == names
    rows = np.array([22, 0, 7, 7, 13])
    assert np.array_equal(c.features.take(rows), x[rows])
    found = (np.arange(23) % 4) != 0
    assert np.array_equal(c.found, found)
    mean, std = c.stats()
    assert np.allclose(mean, x[found].mean(0)) and np.allclose(std, x[found].std(0))
    assert c.slices() == {"a": slice(0, 3), "b": slice(3, 8)}
    assert list(c.missed()) == [(i, "no face detected") for i in np.flatnonzero(~found)]


def test_fp16_storage(tmp_path, images):
    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)
    x = fill(cache, np.random.default_rng(1))
    assert cache.features.take([1]).dtype == np.float16
    assert np.allclose(cache.features.take(np.arange(23)), x, rtol=1e-3, atol=1e-3)


def test_mismatched_teachers_or_images_fail_clearly(tmp_path, images):
    root, names = images
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)  # same plan: fine
    with pytest.raises(CacheMismatch, match="teachers"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS[:1], shard_size=5)
    with pytest.raises(CacheMismatch, match="teachers"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, [TEACHERS[0], Meta("b", 5, "b:2")], shard_size=5)
    (root / names[3]).write_bytes(b"changed content, other size")
    with pytest.raises(CacheMismatch, match="image list"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)


def test_missing_cache_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python fuse.py"):
        FeatureCache(tmp_path / "none")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_sharded_take_across_shards(tmp_path):
    parts = [np.arange(i * 10, i * 10 + 10 * 2).reshape(-1, 2)[: n] for i, n in enumerate([3, 4, 2])]
    files = []
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p)
        files.append(tmp_path / f"{i}.npy")
    arr = ShardedArray(files, np.array([0, 3, 7, 9]))
    full = np.concatenate(parts)
    idx = np.array([8, 0, 3, 6, 2, 8])
    assert np.array_equal(arr.take(idx), full[idx]) and arr.shape == (9, 2)

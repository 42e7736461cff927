"""The sharded feature cache: layout, statistics, atomic writes, resume bookkeeping, mismatch errors."""
import errno
import json
from dataclasses import dataclass

import numpy as np
import pytest

from common.cache import CacheDamaged, CacheMismatch, FeatureCache, ShardedArray, lock_file
from common.files import atomic_write
from tests.fixtures import held_elsewhere


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
        s = cache.crop_size
        crops = rng.integers(0, 256, (hi - lo, s, s, 3), dtype=np.uint8) if s else None
        cache.write_shard(k, x, found, np.zeros((hi - lo, 2, 3)), np.ones(hi - lo), ["0" * 40] * (hi - lo),
                          ["" if f else "no face detected" for f in found], crops=crops)
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
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, dtype="float32",
                                          crop_size=0)
    assert cache.n_shards == 5 and cache.dim == 8
    x = fill(cache, np.random.default_rng(0))
    with pytest.raises(CacheMismatch, match="incomplete"):  # the scripts' one-line errors, not a traceback
        FeatureCache(tmp_path / "c").require_complete()
    with held_elsewhere(tmp_path / "c", lock_file(tmp_path / "c")):  # not "run fuse.py again": it is running
        with pytest.raises(CacheMismatch, match=r"being written by a fuse.py still running \(5/5 shards done\)"):
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


def test_crop_store_round_trip_and_hashes(tmp_path, images):
    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, crop_size=6)
    with pytest.raises(ValueError, match="crops"):  # a shard without its crops is refused, nothing written
        cache.write_shard(0, np.zeros((5, 8), np.float32), [True] * 5, np.zeros((5, 2, 3)), np.ones(5),
                          ["0" * 40] * 5, [""] * 5)
    assert not cache.shard_done(0)
    fill(cache, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    want = []
    for k in range(cache.n_shards):  # the draws fill made, in its order
        n = int(cache.bounds[k + 1] - cache.bounds[k])
        rng.normal(size=(n, cache.dim))
        want.append(rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8))
    want = np.concatenate(want)
    cache.finalize()
    c = FeatureCache(tmp_path / "c")
    assert c.crop_size == 6 and len(c.manifest["crops_sha256"]) == c.n_shards
    assert np.array_equal(c.crops.take([22, 0, 7]), want[[22, 0, 7]]) and c.crops.shape == (23, 6, 6, 3)
    assert c.verify_crops() == []
    arr = np.load(c.crop_file(2))
    arr[0, 0, 0, 0] ^= 1
    np.save(c.crop_file(2), arr)
    assert c.verify_crops() == [2]
    # Shard 2 redone (as --retry-unreadable does) with other crops, the cache not yet finalized again: the
    # manifest's copy of the hashes is stale, the shard's own record is not, and nothing is flagged.
    c._redo({2: "redo"})
    n = int(c.bounds[3] - c.bounds[2])
    c.write_shard(2, np.zeros((n, c.dim), np.float32), [True] * n, np.zeros((n, 2, 3)), np.ones(n), ["0" * 40] * n,
                  [""] * n, crops=np.full((n, 6, 6, 3), 7, np.uint8))
    assert not c.manifest["complete"] and c.verify_crops() == []
    with pytest.raises(CacheMismatch, match="crop_size"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, crop_size=8)
    bare = FeatureCache.create_or_resume(tmp_path / "bare", root, names, TEACHERS, shard_size=5, crop_size=0)
    with pytest.raises(CacheMismatch, match="no crop store"):
        bare.crops


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
    with pytest.raises(CacheMismatch, match="b: version b:1 then, b:2 now"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, [TEACHERS[0], Meta("b", 5, "b:2")], shard_size=5)
    # the same teachers, one changed: said in words, not as two lists of hashes
    mine = [Meta("a", 3, "user:0123456789abcdef:11111111"), Meta("b", 5, "pkg==1:fedcba9876543210:22222222")]
    FeatureCache.create_or_resume(tmp_path / "m", root, names, mine, shard_size=5)
    for changed, said in [(Meta("a", 3, "user:aaaaaaaaaaaaaaaa:11111111"), "a: its weight file changed \\(sha256 "
                           "0123456789abcdef... then, aaaaaaaaaaaaaaaa... now; a weight file of your own\\)"),
                          (Meta("a", 3, "user:0123456789abcdef:99999999"), "a: its preprocessing changed")]:
        with pytest.raises(CacheMismatch, match=said):
            FeatureCache.create_or_resume(tmp_path / "m", root, names, [changed, mine[1]], shard_size=5)
    with pytest.raises(CacheMismatch, match="b: its weight file changed .* package pkg==1 then, pkg==2 now"):
        FeatureCache.create_or_resume(tmp_path / "m", root, names, [mine[0], Meta("b", 5, "pkg==2:0:22222222")],
                                      shard_size=5)
    (root / names[3]).write_bytes(b"changed content, other size")
    with pytest.raises(CacheMismatch, match="image list") as err:
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    # the refusal names what changed, not only the list's hash
    assert f"1 changed size or modification time ({names[3]})" in str(err.value), str(err.value)
    (root / "new.jpg").write_bytes((root / names[0]).read_bytes())
    with pytest.raises(CacheMismatch) as err:
        FeatureCache.create_or_resume(tmp_path / "c", root, [*names[1:], "new.jpg"], TEACHERS, shard_size=5)
    assert f"1 added (new.jpg); 1 removed ({names[0]}); 1 changed size" in str(err.value), str(err.value)
    (tmp_path / "c" / "stamps.npy").unlink()  # a cache made before the stamps were kept
    with pytest.raises(CacheMismatch, match="the same names, so a file was edited or replaced"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    FeatureCache.create_or_resume(tmp_path / "d", root, names, TEACHERS, shard_size=5)
    (tmp_path / "d" / "stamps.npy").unlink()  # an old cache resumed with its files as they were gets its stamps
    FeatureCache.create_or_resume(tmp_path / "d", root, names, TEACHERS, shard_size=5)
    (root / names[1]).write_bytes(b"edited")
    with pytest.raises(CacheMismatch, match=f"1 changed size or modification time \\({names[1]}\\)"):
        FeatureCache.create_or_resume(tmp_path / "d", root, names, TEACHERS, shard_size=5)


def test_an_unfinished_cache_of_a_moved_folder_is_refused_a_finished_one_is_not(tmp_path, images):
    """A folder moved with its file times kept has the same list: resuming read its rows from where it was, listed
    them unreadable and marked the cache complete. Once complete, the crop store needs the images no more."""
    import os
    import shutil

    root, names = images
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copy2: the same sizes and times, so the same list hash
    for n in names:
        st = os.stat(root / n)
        os.utime(moved / n, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CacheMismatch, match=f"unfinished, and made from the images in {root}"):
        FeatureCache.create_or_resume(tmp_path / "c", moved, names, TEACHERS, shard_size=5)
    cache = FeatureCache(tmp_path / "c")
    fill(cache, np.random.default_rng(0))
    cache.finalize()
    assert FeatureCache.create_or_resume(tmp_path / "c", moved, names, TEACHERS, shard_size=5).manifest["complete"]


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


@pytest.mark.parametrize("direct", [False, True])
def test_sharded_take_across_shards(tmp_path, direct):
    parts = [np.arange(i * 10, i * 10 + 10 * 2).reshape(-1, 2)[: n] for i, n in enumerate([3, 4, 2])]
    files = []
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p)
        files.append(tmp_path / f"{i}.npy")
    arr = ShardedArray(files, np.array([0, 3, 7, 9]), direct=direct)
    full = np.concatenate(parts)
    idx = np.array([8, 0, 3, 6, 2, 8])
    assert np.array_equal(arr.take(idx), full[idx]) and arr.shape == (9, 2)


def test_direct_reads_match_the_maps(tmp_path):
    """The crop store's positioned reads (one call per run of consecutive rows, a repeated row read once)
    give the rows the maps give, in any order, across shards, under eviction and after pickling; a
    truncated shard is an error that names it, not a half-filled row."""
    import copy

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8) for n in (6, 1, 9, 4)]
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"{i}.npy")
        np.save(files[-1], p)
    bounds = np.cumsum([0] + [len(p) for p in parts])
    full = np.concatenate(parts)
    arr = ShardedArray(files, bounds, max_open=2, direct=True)
    for _ in range(100):
        idx = rng.integers(0, len(full), rng.integers(0, 30))
        assert np.array_equal(arr.take(idx), full[idx])
    every = np.arange(len(full))
    assert np.array_equal(arr.take(every), full) and np.array_equal(copy.deepcopy(arr).take(every[::-1]), full[::-1])
    opened = ShardedArray(files, bounds, max_open=8, direct=True)
    assert np.array_equal(opened.take([7]), full[[7]])  # shard 2 open before it is cut short
    with open(files[2], "r+b") as f:
        f.truncate(files[2].stat().st_size - 10)
    with pytest.raises(CacheDamaged, match=r"2\.npy: short read .* truncated"):
        opened.take([7, bounds[3] - 1])
    fresh = ShardedArray(files, bounds, direct=True)
    assert np.array_equal(fresh.take([0, 6, 16]), full[[0, 6, 16]])  # other shards still read
    with pytest.raises(CacheDamaged, match=r"2\.npy: truncated: \d+ bytes of \d+"):  # found at open
        fresh.take([7])


def test_same_size_edit_and_detector_threshold_change_the_plan(tmp_path, images):
    import os

    root, names = images
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    with pytest.raises(CacheMismatch, match="min_face_prob 0.9 != 0.5"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, min_face_prob=0.5)
    with pytest.raises(CacheMismatch, match="detect_size 640 != 320"):  # a smaller copy finds other faces
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, detect_size=320)
    with pytest.raises(CacheMismatch, match="smallest_face 20 != 40"):  # faces under 40 px are no longer found
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, smallest_face=40)
    # a cache written before smallest_face existed searched every level: it resumes with the default
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del m["smallest_face"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)
    # Threshold unused without detection: not part of the plan.
    FeatureCache.create_or_resume(tmp_path / "n", root, names, TEACHERS, shard_size=5, align="none")
    FeatureCache.create_or_resume(tmp_path / "n", root, names, TEACHERS, shard_size=5, align="none", min_face_prob=0.5)
    path = root / names[3]
    st = path.stat()
    path.write_bytes(b"Y" * st.st_size)  # edited in place, same size (a BMP re-saved)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CacheMismatch, match="image list"):
        FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5)


def test_dataset_face_boxes_are_part_of_the_plan(tmp_path, images):
    from common.extract import KnownFaces

    root, names = images
    boxes = [None] * len(names)
    boxes[2] = (10.0, 20.0, 60.0, 80.0)
    c = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, boxes=boxes)
    got = c.boxes
    assert np.isnan(np.delete(got, 2, 0)).all() and list(got[2]) == [10, 20, 60, 80]
    assert FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, boxes=boxes).boxes is not None
    moved = list(boxes)
    moved[2] = (11.0, 20.0, 60.0, 80.0)  # another box may hold another face
    for other in (moved, None):
        with pytest.raises(CacheMismatch, match="boxes"):
            FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, boxes=other)
    plain = FeatureCache.create_or_resume(tmp_path / "p", root, names, TEACHERS, shard_size=5, boxes=[None] * len(names))
    assert plain.boxes is None and plain.manifest["boxes"] is None  # no box at all: the plan of a plain folder
    assert "boxes" in " ".join(KnownFaces.differences(plain.manifest, {**c.manifest, "complete": True}))
    no_align = FeatureCache.create_or_resume(tmp_path / "n", root, names, TEACHERS, shard_size=5, align="none",
                                             boxes=boxes)
    assert no_align.boxes is None  # crops taken as they are: nothing to search
    np.save(tmp_path / "c" / "face_boxes.npy", np.zeros((len(names), 4)))
    with pytest.raises(CacheDamaged, match="face_boxes.npy does not hold the boxes"):
        FeatureCache(tmp_path / "c").boxes


def test_faces_stored_in_a_csv_follow_the_csv_file(tmp_path):
    """FER2013's faces are rows of one CSV ('fer2013.csv#row12'): the rows have no file of their own, so the
    list's hash follows the CSV's size and time (a corrected CSV used to leave the hash as it was)."""
    import os

    from common.cache import list_hash

    csv = tmp_path / "fer2013.csv"
    csv.write_text("emotion,pixels,Usage\n0," + " ".join(["1"] * 2304) + ",Training\n")
    rows = ["fer2013.csv#row0"]
    before = list_hash(tmp_path, rows)
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert list_hash(tmp_path, rows) != before
    assert list_hash(tmp_path, ["gone.csv#row0"]) != list_hash(tmp_path, rows)  # a missing CSV is told apart


def test_content_hash_follows_the_image_bytes(tmp_path, images):
    root, names = images
    hashes = []
    for sha in ("a" * 40, "b" * 40):
        cache = FeatureCache.create_or_resume(tmp_path / sha[0], root, names, TEACHERS, shard_size=10,
                                              crop_size=0)  # features only
        for k in range(cache.n_shards):
            n = int(cache.bounds[k + 1] - cache.bounds[k])
            cache.write_shard(k, np.ones((n, cache.dim)), [True] * n, np.zeros((n, 2, 3)), np.ones(n), [sha] * n,
                              [""] * n)
        cache.finalize()
        hashes.append(FeatureCache(tmp_path / sha[0]).manifest["content_hash"])
    assert hashes[0] != hashes[1] and len(hashes[0]) == 64


def test_embedding_rerun_switches_atomically(tmp_path, images):
    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)
    fill(cache, np.random.default_rng(0))
    cache.finalize()

    def write(value, fail_at=None):
        with cache.new_embedding("ae") as folder:
            for k in range(cache.n_shards):
                if k == fail_at:
                    raise KeyboardInterrupt  # killed midway
                n = int(cache.bounds[k + 1] - cache.bounds[k])
                cache.write_embedding_shard("ae", k, np.full((n, 4), value), folder)
            cache.write_embedding_meta("ae", {"op": "ae", "dim": 4, "value": value}, folder)

    write(1.0)
    reader, meta = cache.embedding("ae")  # a distill.py that opened version 1
    assert meta["value"] == 1.0 and (reader.take(np.arange(23)) == 1).all()
    with pytest.raises(KeyboardInterrupt):
        write(2.0, fail_at=2)
    h, meta = cache.embedding("ae")
    assert meta["value"] == 1.0 and (h.take(np.arange(23)) == 1).all()  # the old version, whole
    write(3.0)
    h, meta = cache.embedding("ae")
    assert meta["value"] == 3.0 and (h.take(np.arange(23)) == 3).all()
    assert (reader.take(np.arange(23)) == 1).all()  # the reader still on version 1 reads version 1
    assert cache.embedding_names() == ["ae"]
    write(4.0)  # version 1 is now two behind: removed, with the killed attempt's folder
    assert len([p for p in (cache.path / "emb").iterdir() if p.is_dir() and not p.is_symlink()]) == 2
    # A reader over hours (transfer.py, task after task) pins the version it started with: G, units, split
    pinned = FeatureCache(cache.path)
    folder = pinned.pin_embedding("ae")
    write(5.0)
    assert pinned.embedding_dir("ae") == folder and pinned.embedding("ae")[1]["value"] == 4.0
    assert FeatureCache(cache.path).embedding("ae")[1]["value"] == 5.0  # a new reader takes the new version


def test_paths_round_trip_any_bytes(tmp_path, images):
    import os

    root, names = images
    odd = names + [os.fsdecode(b"caf\xe9.jpg"), "a b/c\u2028d.jpg", "x\x1cy.jpg"]
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, odd, TEACHERS, shard_size=10)
    c = FeatureCache(cache.path)
    assert list(c.images) == odd and c.images[-3] == odd[-3] and c.images[-1] == odd[-1] and len(c.images) == 26
    assert c.images[20:23] == odd[20:23] and c.images.index(odd[-2]) == 24


def test_open_files_bounded(tmp_path):
    import os

    files = []
    for i in range(40):
        np.save(tmp_path / f"{i}.npy", np.full((2, 3), i, np.float32))
        files.append(tmp_path / f"{i}.npy")
    arr = ShardedArray(files, np.arange(0, 82, 2), max_open=8)
    before = len(os.listdir("/proc/self/fd"))
    rows = np.random.default_rng(0).permutation(80)
    assert np.array_equal(arr.take(rows)[:, 0], rows // 2)
    assert len(arr._maps) == 8 and len(os.listdir("/proc/self/fd")) - before <= 8


def test_arrays_share_one_open_file_budget(tmp_path, monkeypatch):
    """A loader worker reads crops (positioned reads) and targets (maps) at once: the process's budget
    bounds both together, where a budget per array let them add up past the open-file limit."""
    import os

    import common.cache

    monkeypatch.setattr(common.cache, "OPEN_FILES", common.cache.OpenFiles(10))
    arrays = []
    for name, direct in (("a", False), ("b", True)):
        files = []
        for i in range(30):
            files.append(tmp_path / f"{name}{i}.npy")
            np.save(files[-1], np.full((2, 3), i, np.float32))
        arrays.append(ShardedArray(files, np.arange(0, 62, 2), direct=direct))
    before = len(os.listdir("/proc/self/fd"))
    rows = np.random.default_rng(0).permutation(60)
    for _ in range(3):
        for arr in arrays:
            assert np.array_equal(arr.take(rows)[:, 0], rows // 2)
    assert len(common.cache.OPEN_FILES) == 10 and len(os.listdir("/proc/self/fd")) - before <= 10


def test_rows_read_from_threads_and_after_pickling(tmp_path):
    """fusion reads the next batches in a thread while the main one reads validation rows: the map cache is
    shared, and evicting under another reader must not give wrong rows. A pickled copy (a spawned loader
    worker) carries the paths, not the maps; deepcopy goes through the same __getstate__ / __setstate__."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for i in range(30):
        np.save(tmp_path / f"{i}.npy", np.full((2, 3), i, np.float32))
        files.append(tmp_path / f"{i}.npy")
    arr = ShardedArray(files, np.arange(0, 62, 2), max_open=3)
    rng = np.random.default_rng(1)
    asks = [rng.permutation(60)[:25] for _ in range(200)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(arr.take, asks))
    assert all(np.array_equal(g[:, 0], a // 2) for g, a in zip(got, asks))
    again = copy.deepcopy(arr)
    assert not again._maps and np.array_equal(again.take(asks[0]), got[0])


@pytest.mark.slow
def test_a_million_rows(tmp_path, monkeypatch):
    """1 M faces in 977 shards: opening the cache, its paths, flags and matrices, and reading rows from
    every shard stay within the measured bounds below."""
    import os
    import tracemalloc

    import common.cache

    n, shard = 1_000_000, 1024
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 2,000 small files: durability is not under test
    # 1 M stats of absent files: no need
    monkeypatch.setattr(common.cache, "file_stamps", lambda root, images: np.full((len(images), 2), -1, np.int64))
    # By default up to half the open-file limit stay open (all 977 here); a bound of 64 shows it holds.
    monkeypatch.setattr(common.cache, "OPEN_FILES", common.cache.OpenFiles(64))
    names = [f"d{i // 1000:04d}/img{i:07d}.jpg" for i in range(n)]
    cache = FeatureCache.create_or_resume(tmp_path / "c", tmp_path, names, [Meta("a", 4, "a:1")], shard_size=shard,
                                          crop_size=0)  # features only
    del names
    for k in range(cache.n_shards):
        m = int(cache.bounds[k + 1] - cache.bounds[k])
        cache.write_shard(k, np.full((m, 4), k % 1000, np.float32), np.ones(m, bool), np.zeros((m, 2, 3)),
                          np.ones(m), [b"0" * 40] * m, [""] * m)
    cache.finalize()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    c = FeatureCache(tmp_path / "c").require_complete()
    assert len(c.images) == n and c.images[123456] == "d0123/img0123456.jpg"
    assert c.found.all() and c.matrices.shape == (n, 2, 3)
    rows = np.random.default_rng(0).choice(n, 20000, replace=False)
    features = c.features
    assert np.array_equal(features.take(rows)[:, 0], (rows // shard) % 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    open_now = len(os.listdir("/proc/self/fd")) - fds
    # Measured here: peak 57.8 MB (paths: 21 MB of bytes + 8 MB of offsets; matrices 24 MB; flags 1 MB)
    # and 64 files open while reading from all 977 shards. The same paths as a Python list took 98 MB.
    assert peak < 70e6, peak / 1e6
    assert open_now <= 64, open_now


def test_written_files_get_the_umask_mode(tmp_path):
    """A cache or a student shared with other users: atomic writes get the mode open() would give (the
    process's umask), not mkstemp's 0600."""
    import common.cache
    from common.files import atomic_write

    atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert common.files._UMASK & 0o077 == 0o077 or (tmp_path / "f.bin").stat().st_mode & 0o777 != 0o600


def test_default_embedding_is_the_one_written_last(tmp_path, images):
    """distill.py and transfer.py take the h_G the last fuse.py run wrote or kept, not the name that sorts
    first; the mark is a file of its own, so a copy that resets file times keeps it."""
    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)
    fill(cache, np.random.default_rng(0))
    cache.finalize()

    def write(name):
        with cache.new_embedding(name) as folder:
            for k in range(cache.n_shards):
                n = int(cache.bounds[k + 1] - cache.bounds[k])
                cache.write_embedding_shard(name, k, np.zeros((n, 4)), folder)
            cache.write_embedding_meta(name, {"op": name, "dim": 4}, folder)
        cache.mark_default_embedding(name)

    write("pca")
    write("ae")
    assert cache.embedding_names() == ["ae", "pca"]
    write("pca")
    assert cache.embedding_names() == ["pca", "ae"]
    cache.mark_default_embedding("ae")  # a rerun that kept h_G (ae) as it was
    assert cache.embedding_names() == ["ae", "pca"]


def test_list_changes_names_what_was_added_removed_and_changed(tmp_path):
    """What a refused resume says differs between a cache's files and the folder now: added, removed, changed
    size or time (compared as one array: a million paths took ~4.5 s one by one)."""
    from common.cache import list_changes
    from common.images import encode_paths

    old = [f"d/{i:03d}.jpg" for i in range(10)]
    (tmp_path / "images.txt").write_bytes(encode_paths(old))
    stamps = np.array([[100 + i, 5000 + i] for i in range(10)], np.int64)
    np.save(tmp_path / "stamps.npy", stamps)
    assert list_changes(tmp_path, old[::-1], stamps[::-1]) == "the same files in another order"
    edited = stamps.copy()
    edited[3, 1] += 1
    assert list_changes(tmp_path, old, edited) == "files 1 changed size or modification time (d/003.jpg)"
    now = old[:2] + old[3:] + ["d/new.jpg"]  # 002 removed, one added, 004 changed, the rest moved up a row
    now_stamps = np.vstack([stamps[:2], stamps[3:], [[1, 1]]])
    now_stamps[2 + 1, 0] += 7
    assert list_changes(tmp_path, now, now_stamps) == ("files 1 added (d/new.jpg); 1 removed (d/002.jpg); "
                                                       "1 changed size or modification time (d/004.jpg)")
    (tmp_path / "stamps.npy").unlink()  # a cache from before stamps were kept: names only
    assert list_changes(tmp_path, now, now_stamps) == "files 1 added (d/new.jpg); 1 removed (d/002.jpg)"


def test_path_array_slices_and_split_draws_read_as_a_list():
    """A slice of the cache's paths is decoded at once (it decoded path by path: ~2 s a million faces in G's
    split); the split's numbers drawn over it in chunks are those of a plain list."""
    from common import fusion
    from common.cache import PathArray
    from common.images import encode_paths

    names = [f"p{i % 7}/{i:05d}.jpg" for i in range(70_000)] + ["caf\udce9.jpg"]  # and a name that is not UTF-8
    pa = PathArray(encode_paths(names))
    for s in (slice(None), slice(5, 9), slice(69_990, None), slice(9, 5), slice(0, 20, 3), slice(-3, None)):
        assert pa[s] == names[s]
    rows = np.array([0, 3, 65_535, 65_536, 69_999, 70_000])
    for group in (None, fusion.split_group("folder")):
        for a, b in zip(fusion.draws(pa, rows, 4, group), fusion.draws(names, rows, 4, group)):
            assert (a is None and b is None) or np.array_equal(a, b)
    assert fusion.first_seen_ids(np.array(["b", "a", "b", "c", "a"], dtype=object)).tolist() == [0, 1, 0, 2, 1]


def test_a_lock_that_cannot_be_had_leaves_the_work_unlocked_and_a_brief_one_is_waited_for(tmp_path):
    """A cache on a read-only or another user's folder: its readers' lock cannot be made there, which stopped
    distill.py and transfer.py with an OSError; another process holding a lock for an instant (fuse.py's check
    for readers) is waited for, not taken for a run."""
    from common import locks
    from tests.fixtures import held_elsewhere

    (tmp_path / "file").write_text("")
    assert locks.acquire(tmp_path / "file" / ".locks" / "c.lock", "busy", shared=True) is None
    with held_elsewhere(tmp_path, tmp_path / "l.lock", seconds=0.5):
        f = locks.acquire(tmp_path / "l.lock", "busy", patience=20)  # let go after 0.5 s: had
    assert f is not None
    f.close()
    with held_elsewhere(tmp_path, tmp_path / "l.lock"), pytest.raises(SystemExit, match="busy"):
        locks.acquire(tmp_path / "l.lock", "busy", patience=0.3)


def test_a_killed_writers_temporary_files_are_removed_on_resume(tmp_path, images):
    """kill -9 raises nothing, so atomic_file's temporary file (a crop shard's ~200 MB) stayed for good after a
    resume in the cache, its shards and crops, and in run folders: the writer holding the lock removes them."""
    from argparse import Namespace

    from common import runs

    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)
    left = [tmp_path / "c" / ".stats.npzab12.tmp", tmp_path / "c" / "shards" / ".00001.meta.npzcd34.tmp",
            tmp_path / "c" / "crops" / ".00000.npyef56.tmp"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    keep = tmp_path / "c" / "shards" / "notes.tmp"  # not a temporary file of ours
    keep.write_bytes(b"x")
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)  # unlocked: kept
    assert all(p.exists() for p in left)  # (no lock could be had: they may be a live writer's)
    FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10, locked=True)
    assert not any(p.exists() for p in left) and keep.exists() and cache.path.exists()
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / ".report.jsonx1.tmp").write_text("{")
    (run / "ckpt" / ".step_00000002.safetensorsy2.tmp").write_text("")
    other = run / "another-run" / "ckpt" / ".step_00000100.safetensorsz3.tmp"  # --run-dir above another run:
    other.parent.mkdir(parents=True)  # its writer's file is not ours
    other.write_text("")
    runs.make_run_dir(run, "transfer", Namespace())
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == [".lock", other.name, "args.json"]
    runs.locks.held.pop(str((run / ".lock").resolve())).close()


def test_json_reports_are_strict_json_with_null_for_nan(tmp_path):
    """Table 5's n/a (NaN) and a diverged decoder's inf were written as bare NaN / Infinity, which jq and
    JavaScript refuse."""
    import json

    from common.files import write_json

    write_json(tmp_path / "r.json", {"nrmse": {"a": float("nan"), "b": 0.25}, "w": [float("inf"), np.float64(1.5)]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nrmse": {"a": None, "b": 0.25}, "w": [None, 1.5]}


def test_crop_rows_without_a_face_take_no_disk(tmp_path, images):
    """A crop shard is np.save's bytes, hashed as written, but its all-zero rows (images without a face: 30 %
    of a scraped corpus, every row of a folder of junk files) are holes: 48 kB a row of disk before."""
    import hashlib
    import io

    root, names = images
    n = len(names)
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=n, crop_size=128)
    crops = np.zeros((n, 128, 128, 3), np.uint8)
    found = np.zeros(n, bool)
    found[[0, 5, n - 2]] = True  # runs of empty rows before, between and after
    crops[found] = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    features = np.zeros((n, cache.dim), np.float16)
    features[found] = 1.5
    features[1] = -0.0  # a row of negative zeros is no hole: its bytes are not zero
    cache.write_shard(0, features, found, np.zeros((n, 2, 3)), np.ones(n), ["0" * 40] * n,
                      ["" if f else "no face detected" for f in found], crops=crops)
    for file, rows in [(cache.shard_file(0), features), (cache.crop_file(0), crops)]:
        want = io.BytesIO()
        np.save(want, rows)
        assert file.read_bytes() == want.getvalue() and np.array_equal(np.load(file, mmap_mode="r"), rows)
    cache.finalize()
    assert cache.manifest["crops_sha256"] == [hashlib.sha256(want.getvalue()).hexdigest()]
    assert cache.verify_crops() == []
    probe = tmp_path / "probe"  # a file system without holes (some network ones) stores the zeros: nothing to check
    with open(probe, "wb") as f:
        f.seek(1 << 22)
        f.write(b"x")
    if probe.stat().st_blocks * 512 < 1 << 21:
        assert file.stat().st_blocks * 512 < 0.5 * file.stat().st_size  # 3 of 23 rows hold a face


def test_a_file_system_that_takes_no_links_says_so_when_h_G_is_switched(tmp_path, images, monkeypatch):
    """Windows makes a symbolic link only with Developer Mode or an administrator's rights: fuse.py trained G,
    then stopped on 'A required privilege is not held by the client' without a word of why or what to do."""
    import os

    root, names = images
    cache = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=10)

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "A required privilege is not held by the client")

    monkeypatch.setattr(os, "symlink", no_links)
    with pytest.raises(PermissionError, match=r"h_G is switched to its new version by a symbolic link; on Windows "
                                              r"turn on Developer Mode.* is not used\)"):
        with cache.new_embedding("pca") as folder:
            (folder / "meta.json").write_text("{}")
    assert (folder / "meta.json").exists()  # the work is kept, to be switched by a rerun where links work

    def unsupported(*a, **k):  # a CIFS mount without mfsymlinks
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "symlink", unsupported)
    with pytest.raises(PermissionError, match="Operation not supported.*by a symbolic link"):
        with cache.new_embedding("pca") as folder:
            pass

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):  # a full, over-quota or read-only disk
        def full(*a, code=code, **k):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "symlink", full)  # not a matter of links: run_main's line for a full disk says it
        with pytest.raises(OSError) as e:
            with cache.new_embedding("pca") as folder:
                pass
        assert e.value.errno == code and not isinstance(e.value, PermissionError)


def test_a_complete_cache_nobody_can_write_is_read_without_a_lock_warning(tmp_path, monkeypatch, caplog):
    """README: a cache in a read-only folder is read without a lock; transfer.py's writer lock on such a task
    cache warned that 'a second run on it would not be refused', though nothing could write it."""
    import logging

    from common import cache as cache_module
    from common import locks
    from common.cache import writer_lock

    (tmp_path / "ro").write_text("a file where .locks/ would go: the lock cannot be made")
    guarded = tmp_path / "ro" / "cache"  # (its lock file lives in tmp_path/ro/.locks/)
    monkeypatch.setattr(locks, "said", set())
    with caplog.at_level(logging.WARNING, logger="common.locks"):
        monkeypatch.setattr(cache_module.os, "access", lambda p, mode: False)
        monkeypatch.setattr(type(guarded), "exists", lambda p: True)
        with writer_lock(guarded) as locked:
            assert not locked
        assert not caplog.records  # nothing can write it: nothing to say
        monkeypatch.setattr(cache_module.os, "access", lambda p, mode: True)
        with writer_lock(guarded) as locked:
            assert not locked
    assert len(caplog.records) == 1 and "a second run on it would not be refused" in caplog.records[0].getMessage()

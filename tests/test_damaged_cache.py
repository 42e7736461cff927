"""A feature cache damaged after it was written (a copy cut short, an edit, a lost file): a one-line error that
names the file and what to do, found at start from headers and sizes; fuse.py redoes the damaged shards."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.cache import CacheDamaged, CacheMismatch, FeatureCache
from common.runs import run_main
from tests.test_cache import TEACHERS, fill

N = 23  # shards of 5, 5, 5, 5, 3


@pytest.fixture
def cache(tmp_path):
    """A complete cache with a crop store, and its features as written."""
    root = tmp_path / "data"
    root.mkdir()
    names = [f"img{i:03d}.jpg" for i in range(N)]
    for i, n in enumerate(names):
        (root / n).write_bytes(b"x" * (i + 1))
    c = FeatureCache.create_or_resume(tmp_path / "c", root, names, TEACHERS, shard_size=5, dtype="float32",
                                      crop_size=4)
    x = fill(c, np.random.default_rng(0))
    c.finalize()
    return FeatureCache(c.path), x


def cut(path, keep):
    """Truncate path to `keep` bytes (a negative keep: that many fewer)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(keep if keep >= 0 else size + keep)


def one_line_error(fn) -> str:
    """What run_main (every script's entry) prints for fn's error: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        run_main(fn)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


@pytest.mark.parametrize("damage, match", [
    (lambda m: m.write_bytes(m.read_bytes()[: m.stat().st_size // 2]), "manifest.json is not valid JSON"),
    (lambda m: m.write_bytes(b"\xff\xfe garbage"), "manifest.json is not valid JSON"),
    (lambda m: m.write_text("[1, 2]"), "manifest.json holds a JSON list"),
    (lambda m: m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "shard_bounds"})),
     "manifest.json lacks shard_bounds"),
    # far past any manifest written (a shared cache's 30 MB of JSON took 600 MB to parse): not parsed
    (lambda m: m.write_bytes(m.read_bytes()[:-1] + b', "x": "' + b" " * (64 * 2**20) + b'"}'),
     r"manifest.json is 64 MB, no manifest this code writes"),
])
def test_damaged_manifest(cache, damage, match):
    c, _ = cache
    damage(c.path / "manifest.json")
    for open_it in (lambda: FeatureCache(c.path),  # distill.py, transfer.py
                    lambda: FeatureCache.create_or_resume(c.path, c.data_root, list(c.images), TEACHERS,
                                                          shard_size=5, dtype="float32", crop_size=4)):  # fuse.py
        with pytest.raises(CacheDamaged, match=match) as e:
            open_it()
        assert isinstance(e.value, CacheMismatch) and "--overwrite" in str(e.value) and "from a copy" in str(e.value)
    msg = one_line_error(lambda: FeatureCache(c.path))
    assert msg.startswith(f"error: {c.path / 'manifest.json'}") and "rebuilt" in msg


def test_images_list_that_disagrees_with_the_manifest(cache):
    c, _ = cache
    listing = c.path / "images.txt"
    whole = listing.read_bytes()
    cut(listing, len(whole) - 6)  # a copy cut short in the last line
    with pytest.raises(CacheDamaged, match=r"images.txt lists 22 paths, manifest.json 23 images.*--overwrite"):
        FeatureCache(c.path)
    # An older version wrote a name holding a line break as it was: every later row shifts by one.
    listing.write_bytes(whole.replace(b"img004.jpg\n", b"img\n004.jpg\n"))
    assert "lists 24 paths" in one_line_error(lambda: FeatureCache(c.path))
    listing.unlink()
    with pytest.raises(CacheDamaged, match="images.txt is missing"):
        FeatureCache(c.path)
    listing.write_bytes(whole)
    assert FeatureCache(c.path).images == list(c.images)


def damage_each_kind(c):
    """Shard 1's features and shard 3's crops cut short, shard 2's metadata lost, shard 4's metadata cut short:
    {shard: the file damaged}."""
    cut(c.shard_file(1), -7)
    c.meta_file(2).unlink()
    cut(c.crop_file(3), 100)
    cut(c.meta_file(4), -30)
    return {1: c.shard_file(1), 2: c.meta_file(2), 3: c.crop_file(3), 4: c.meta_file(4)}


def test_cheap_check_names_each_damaged_file(cache):
    c, _ = cache
    assert c.damaged_shards() == {} and c.require_complete() is c
    damaged = damage_each_kind(c)
    found = c.damaged_shards()
    assert sorted(found) == [1, 2, 3, 4]
    assert found[1] == f"{damaged[1]}: truncated: {damaged[1].stat().st_size} bytes of {damaged[1].stat().st_size + 7}"
    assert found[2] == f"{damaged[2]}: missing"
    assert found[3].startswith(f"{damaged[3]}: not a .npy file (EOF")  # cut inside its header
    assert found[4].startswith(f"{damaged[4]}: not a readable .npz")
    with pytest.raises(CacheDamaged, match=r"4 damaged shards .*00001\.npy: truncated.*\(and 1 more\): run the command "
                                           r"that wrote it again with the same arguments \(`python fuse.py --data .* --cache .*`"):
        c.require_complete()
    # A shard marked not done (no features file) is not damage for a resume, only for a complete cache.
    c.shard_file(1).unlink()
    assert sorted(c.damaged_shards()) == [2, 3, 4]
    assert "00001.npy: missing" in one_line_error(c.require_complete)
    # Other contents are damage too: an array of other rows, a file with bytes appended.
    np.save(c.shard_file(1), np.zeros((4, c.dim), np.float32))
    assert "holds float32 (4, 8), expected float32 (5, 8)" in c.damaged_shards()[1]
    with open(c.shard_file(0), "ab") as f:
        f.write(b"\0" * 3)
    assert c.damaged_shards()[0].endswith("3 bytes past the end of its array")


def test_readers_raise_cache_damaged_naming_the_file(cache):
    c, x = cache
    damaged = damage_each_kind(c)
    features, crops = c.features, c.crops
    assert np.array_equal(features.take([0, 14, 22]), x[[0, 14, 22]])  # the whole shards still read
    with pytest.raises(CacheDamaged, match=rf"{damaged[1]}: truncated or corrupt \(mmap length"):
        features.take([5])
    with pytest.raises(CacheDamaged, match=rf"{damaged[3]}: not a \.npy file"):  # positioned reads
        crops.take([15])
    for read in (lambda: c.found, c.sums, lambda: list(c.missed()), c.content_hash):
        with pytest.raises(CacheDamaged, match=rf"{damaged[2]} is missing: run the command that wrote it again .*`python fuse.py"):
            read()
    c.meta_file(2).write_bytes(b"")  # emptied
    with pytest.raises(CacheDamaged, match=rf"{damaged[2]} is damaged \(EOFError"):
        c.sums()
    shutil.copyfile(c.meta_file(0), c.meta_file(2))  # shard 0's metadata has 5 rows like shard 2's: readable
    with pytest.raises(CacheDamaged, match=rf"{damaged[4]} is damaged \(BadZipFile"):
        c.sums()
    for bad in (b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x01\x00\xff\x00{'descr'"):  # a header cut short
        damaged[1].write_bytes(bad)
        with pytest.raises(CacheDamaged, match=rf"{damaged[1]}: truncated or corrupt"):
            c.features.take([5])


def test_corrupt_member_of_metadata_is_named_when_read(cache):
    """Bytes changed inside a member keep the zip directory whole, so the cheap check passes; the CRC does not."""
    c, _ = cache
    path = c.meta_file(0)
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("found.npy")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2  # inside found's (compressed) data
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert c.damaged_shards() == {}
    with pytest.raises(CacheDamaged, match=rf"{path} is damaged \((BadZipFile: Bad CRC-32|error: Error -3)"):
        FeatureCache(c.path).found


def test_stats_and_embeddings(cache):
    c, _ = cache
    c.path.joinpath("stats.npz").write_bytes(b"PK\x03\x04 half")
    assert "stats.npz is damaged" in one_line_error(c.stats)
    with c.new_embedding("ae") as folder:
        for k in range(c.n_shards):
            c.write_embedding_shard("ae", k, np.ones((int(c.bounds[k + 1] - c.bounds[k]), 3)), folder)
        c.write_embedding_meta("ae", {"op": "ae", "dim": 3}, folder)
    h, _ = c.embedding("ae")
    cut(c.embedding_file("ae", 4), -1)
    with pytest.raises(CacheDamaged, match=r"emb/\.ae\..*/00004\.npy: truncated.*it writes h_G anew"):
        c.embedding("ae")
    with pytest.raises(CacheDamaged, match=r"00004\.npy: truncated or corrupt"):  # a reader opened before
        h.take([22])
    (c.embedding_dir("ae") / "meta.json").write_text('{"op": "ae", "di')
    with pytest.raises(CacheDamaged, match=r"meta.json is damaged \(JSONDecodeError"):
        c.embedding("ae")
    # h_G written for an earlier content of the cache (a shard extracted again found new faces since)
    (c.embedding_dir("ae") / "meta.json").write_text(json.dumps({"op": "ae", "dim": 3, "content_hash": "old"}))
    c.manifest["content_hash"] = "new"
    with pytest.raises(CacheDamaged, match=r"written for other images than the cache holds now.*it writes h_G anew"):
        c.embedding("ae")
    c.manifest["content_hash"] = "old"  # the same content: on to the shards (the one cut above)
    with pytest.raises(CacheDamaged, match=r"00004\.npy: truncated"):
        c.embedding("ae")
    c.write_embedding_shard("ae", 4, np.ones((int(c.bounds[5] - c.bounds[4]), 3)), c.embedding_dir("ae"))
    c.embedding("ae")  # whole again: on to h_G's column sums, cut short
    (c.embedding_dir("ae") / "target_sums.npz").write_bytes(b"PK\x03\x04 half")
    with pytest.raises(CacheDamaged, match=r"target_sums\.npz: not a readable \.npz.*it writes h_G anew"):
        c.embedding("ae")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts the bytes read in /proc/self/io")
def test_start_up_check_is_headers_only(tmp_path, monkeypatch):
    """The check of every shard reads headers and zip directories, never the arrays: what it reads does not
    grow with the size of a shard."""
    import common.cache

    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 600 small files: durability is not under test
    monkeypatch.setattr(common.cache, "file_stamps", lambda root, images: np.full((len(images), 2), -1, np.int64))
    rows, s = 64, 32
    c = FeatureCache.create_or_resume(tmp_path / "c", tmp_path, [f"{i}.jpg" for i in range(200 * rows)], TEACHERS,
                                      shard_size=rows, crop_size=s)
    for k in range(c.n_shards):
        c.write_shard(k, np.ones((rows, c.dim)), np.ones(rows, bool), np.zeros((rows, 2, 3)), np.ones(rows),
                      [b"0" * 40] * rows, [""] * rows, crops=np.zeros((rows, s, s, 3), np.uint8))

    def bytes_read():
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])

    before = bytes_read()
    assert c.damaged_shards() == {}
    read = bytes_read() - before
    on_disk = sum(f.stat().st_size for f in c.path.rglob("*.np[yz]"))
    # Measured: 913 bytes a shard (two .npy headers, a zip directory of 9 members) of 205 kB on disk.
    assert read < 3000 * c.n_shards and read < on_disk / 50, (read / c.n_shards, on_disk / c.n_shards)


def test_fuse_resume_redoes_damaged_shards(face_dir, tmp_path, capsys):
    """fuse.py on a complete cache whose shards were damaged: it names each one, removes its files, extracts it
    again, and ends with the cache it had before (same bytes: the same computation on the same machine);
    h_G cut short is written anew even though its fit is loaded unchanged."""
    import fuse

    args = ["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--run-dir", str(tmp_path / "run"),
            "--teachers", "gender", "--shard-size", "3", "--ops", "pca", "--dim", "4"]
    fuse.main(args)
    c = FeatureCache(tmp_path / "c").require_complete()
    files = lambda k: [c.shard_file(k), c.meta_file(k), c.crop_file(k)]  # noqa: E731
    before = {f: f.read_bytes() for k in range(c.n_shards) for f in files(k)}
    rows = np.arange(len(c.images))
    h_before = c.embedding("pca")[0].take(rows)
    untouched = {f: f.stat().st_mtime_ns for f in files(0) + files(c.n_shards - 1)}
    damaged = damage_each_kind(c)
    cut(c.embedding_file("pca", 2), -5)
    capsys.readouterr()

    fuse.main(args)
    out = capsys.readouterr().out
    for k, f in damaged.items():
        assert f"warning: shard {k} is damaged ({f}: " in out, out
    assert f"resuming: {c.n_shards - 4} of the {c.n_shards} shards already" in out
    assert "warning: h_G (pca) is damaged" in out and "00002.npy: truncated" in out
    c = FeatureCache(tmp_path / "c").require_complete()
    assert {f: f.stat().st_mtime_ns for f in untouched} == untouched  # nothing else was deleted or rewritten
    for f, data in before.items():
        assert f.read_bytes() == data, f
    assert c.verify_crops() == []
    np.testing.assert_allclose(c.embedding("pca")[0].take(rows), h_before, rtol=1e-3, atol=1e-3)


def test_verify_crops_finds_a_changed_byte_and_extracts_that_shard_again(face_dir, tmp_path, capsys):
    """A byte of the crop store changed in place keeps every size and header whole: the start-up checks pass
    it, as they must to stay cheap. fuse.py --verify-crops reads the store against the sha256 recorded at
    writing and extracts that shard again, and no other."""
    import fuse

    args = ["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--run-dir", str(tmp_path / "run"),
            "--teachers", "gender", "--shard-size", "3", "--extract-only"]
    fuse.main(args)
    c = FeatureCache(tmp_path / "c")
    good, other = c.crop_file(1).read_bytes(), c.crop_file(2).stat().st_mtime_ns
    flipped = bytearray(good)
    flipped[-100] ^= 0x10
    c.crop_file(1).write_bytes(bytes(flipped))
    fuse.main(args)  # the cheap checks: nothing to see
    assert c.crop_file(1).read_bytes() == bytes(flipped)
    capsys.readouterr()
    fuse.main([*args, "--verify-crops"])
    out = capsys.readouterr().out
    assert "warning: shard 1: its crops differ from their recorded sha256" in out and "shard 2:" not in out
    assert c.crop_file(1).read_bytes() == good and c.crop_file(2).stat().st_mtime_ns == other
    assert FeatureCache(tmp_path / "c").require_complete().verify_crops() == []
    fuse.main([*args, "--verify-crops"])
    assert "crop store verified" in capsys.readouterr().out


def test_damaged_G_or_split_beside_h_G_is_found_at_once_and_written_anew(face_dir, tmp_path, capsys):
    """G and its split, beside h_G, are read by distill.py only after its training (and by transfer.py's fused
    method): a damaged or missing one stops them at their start, naming the file, and fuse.py, which keeps
    an h_G only when it reads whole, writes it anew (it used to keep it and say so)."""
    import re

    import fuse

    args = ["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--run-dir", str(tmp_path / "run"),
            "--teachers", "gender", "--shard-size", "3", "--ops", "pca", "--dim", "4"]
    fuse.main(args)
    c = FeatureCache(tmp_path / "c")
    folder = c.embedding_dir("pca")
    for name, junk in (("G.safetensors", b"garbage"), ("split.npz", b"PK\x03\x04 half"), ("val_rows.npy", b"\x93NUM")):
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(junk)
        with pytest.raises(CacheDamaged, match=rf"{re.escape(name)}: .*it writes h_G anew"):
            c.embedding("pca")
        (folder / name).write_bytes(good)
    c.embedding("pca")
    (folder / "G.safetensors").unlink()
    with pytest.raises(CacheDamaged, match=r"G\.safetensors: missing"):
        c.embedding("pca")
    capsys.readouterr()
    fuse.main(args)
    assert "warning: h_G (pca) is damaged" in capsys.readouterr().out
    _, meta = FeatureCache(tmp_path / "c").embedding("pca")
    assert (Path(meta["folder"]) / "G.safetensors").is_file()


def test_transfer_redoes_a_damaged_task_cache(tmp_path, capsys):
    """transfer.py's task cache is written by the same engine: a damaged shard is named, redone, and the
    result is the one of the undamaged cache."""
    import transfer
    from tests.fixtures import make_fixture, write_tiny_student

    student = write_tiny_student(tmp_path / "student.safetensors", 48)
    data = make_fixture("Gender-UTK", tmp_path / "data")
    args = ["--task", "Gender-UTK", "--data", str(data), "--student", str(student), "--cache-dir",
            str(tmp_path / "cache"), "--method", "frozen", "--head-epochs", "3", "--max-splits", "1"]
    transfer.main([*args, "--run-dir", str(tmp_path / "r1")])
    (folder,) = [m.parent for m in (tmp_path / "cache").glob("*/manifest.json")]
    c = FeatureCache(folder)
    crops = c.crops.take(np.arange(len(c.images)))
    cut(c.crop_file(0), -11)
    capsys.readouterr()
    transfer.main([*args, "--run-dir", str(tmp_path / "r2")])
    assert f"warning: shard 0 is damaged ({c.crop_file(0)}: truncated" in capsys.readouterr().out
    np.testing.assert_array_equal(FeatureCache(folder).require_complete().crops.take(np.arange(len(c.images))), crops)
    r1, r2 = (json.loads((tmp_path / r / "report.json").read_text())[0]["results"]["frozen"] for r in ("r1", "r2"))
    assert r1["value"] == pytest.approx(r2["value"], abs=1e-6)


def test_a_redo_killed_midway_is_still_redone(cache):
    """remove_damaged marks the cache incomplete before it deletes anything, and a features file lost from a
    complete cache counts: a kill during the redo, or a copy that lost a file, never leaves a cache that
    says complete while a shard is missing."""
    c, _ = cache
    cut(c.shard_file(1), -3)
    c.shard_file(3).unlink()
    assert c.remove_damaged() == 2
    again = FeatureCache(c.path)
    assert not again.manifest["complete"] and not again.shard_done(1) and not again.shard_done(3)
    assert again.remove_damaged() == 0  # (killed here: the next run sees an incomplete cache and extracts)

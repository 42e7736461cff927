"""The extraction engine across shard boundaries: one loader for every shard, writes in a background thread."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import common.extract
from common.cache import FeatureCache
from common.extract import Options, extract
from common.teachers import build_teachers
from tests.conftest import REAL_FACES

# 7 rows in shards of 3, 3, 1 and batches of 2: batches end inside shards and at their edges; one photo
# has no face and one file is not an image, so every kind of row crosses the loader.
NAMES = REAL_FACES + ["zz_noface.jpg", "odd/corrupt.jpg"]


def _cache(path, face_dir, teachers):
    return FeatureCache.create_or_resume(path, face_dir, NAMES, teachers, shard_size=3, dtype="float32", crop_size=32)


def _meta(cache, k):
    with np.load(cache.shard_file(k).with_suffix(".meta.npz")) as m:
        return {key: m[key] for key in m.files}


def test_workers_give_the_same_cache_as_in_process(face_dir, tmp_path, monkeypatch):
    teachers = build_teachers(["gender"])  # one cheap real teacher: the features must go through the loader too
    caches = {}
    for workers in (0, 2):
        cache = _cache(tmp_path / f"w{workers}", face_dir, teachers)
        extract(cache, teachers, "cpu", Options(batch=2, workers=workers))
        cache.finalize()
        caches[workers] = cache
    a, b = caches[0], caches[2]
    assert a.found.sum() >= len(REAL_FACES) - 1 and not a.found[-2:].any()
    np.testing.assert_allclose(a.features.take(np.arange(len(NAMES))), b.features.take(np.arange(len(NAMES))),
                               rtol=1e-4, atol=1e-5)
    for k in range(a.n_shards):
        ma, mb = _meta(a, k), _meta(b, k)
        for key in ("found", "matrix", "sha1", "crops_sha256"):
            np.testing.assert_array_equal(ma[key], mb[key], err_msg=f"shard {k} {key}")
        assert list(ma["reason"]) == list(mb["reason"])
        assert a.crop_file(k).read_bytes() == b.crop_file(k).read_bytes()
    # Every shard done: nothing to read, so no loader (and no worker process) is even built.
    monkeypatch.setattr(common.extract, "loader", lambda *a, **kw: pytest.fail("loader built with nothing to do"))
    extract(b, teachers, "cpu", Options(batch=2, workers=2))


def test_writer_failure_is_raised_and_loses_nothing(face_dir, tmp_path, monkeypatch):
    cache = _cache(tmp_path / "c", face_dir, [])
    write, calls = FeatureCache.write_shard, []

    def full_disk_on_second(self, k, *args, **kwargs):
        calls.append(k)
        if len(calls) == 2:
            raise OSError("no space left on device")
        return write(self, k, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "write_shard", full_disk_on_second)
    with pytest.raises(OSError, match="no space left"):
        extract(cache, [], "cpu", Options(batch=2, workers=2))
    assert calls == [0, 1], "shards are written in order, and none after a failed one"
    assert cache.shard_done(0) and not cache.shard_done(1) and not cache.shard_done(2)
    m = _meta(cache, 0)
    assert len(m["found"]) == 3 and m["found"].all()
    assert hashlib.sha256(cache.crop_file(0).read_bytes()).hexdigest() == str(m["crops_sha256"])
    assert np.load(cache.crop_file(0)).any(axis=(1, 2, 3)).all()  # every face's crop is there, not zeros
    # A rerun redoes what failed, and only that.
    monkeypatch.setattr(FeatureCache, "write_shard", write)
    first = cache.shard_file(0).stat().st_mtime_ns
    extract(cache, [], "cpu", Options(batch=2, workers=0))
    cache.finalize()
    assert cache.shard_file(0).stat().st_mtime_ns == first
    assert not cache.verify_crops() and not cache.found[-2:].any()


def test_failure_while_reading_keeps_the_shard_being_written(face_dir, tmp_path, monkeypatch):
    cache = _cache(tmp_path / "c", face_dir, [])
    run_batch, seen = common.extract.Engine.run_batch, []

    def fail_in_last_shard(self, items, *args):
        seen.append(len(items))
        if sum(seen) > 6:  # the one row of shard 2, read while shard 1 may still be being written
            raise RuntimeError("detector crashed")
        return run_batch(self, items, *args)

    monkeypatch.setattr(common.extract.Engine, "run_batch", fail_in_last_shard)
    with pytest.raises(RuntimeError, match="detector crashed"):
        extract(cache, [], "cpu", Options(batch=2, workers=0))
    assert cache.shard_done(0) and cache.shard_done(1) and not cache.shard_done(2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_lanes_give_the_same_cache_in_order_whichever_batch_ends_first(face_dir, tmp_path, monkeypatch, device):
    """streams=3: three batches in flight on three threads (and CUDA streams); the first batch of each
    shard is made the slowest, so later batches end first, and every row must still land in its own place.
    age@reference runs in onnxruntime on the CPU whatever the device: on CUDA its crops come off the GPU."""
    teachers = build_teachers(["gender", "age@reference"], device)
    fill = common.extract.Engine.fill

    def slow_first_of_shard(self, items, *args):
        import time
        time.sleep(0.3 if items[0]["sha1"] and len(items) == 2 else 0.0)
        return fill(self, items, *args)

    caches = {}
    for streams in (1, 3):
        if streams > 1:
            monkeypatch.setattr(common.extract.Engine, "fill", slow_first_of_shard)
        cache = _cache(tmp_path / f"s{streams}", face_dir, teachers)
        extract(cache, teachers, device, Options(batch=2, streams=streams))
        cache.finalize()
        caches[streams] = cache
    a, b = caches[1], caches[3]
    assert a.found.sum() >= len(REAL_FACES) - 1 and (a.found == b.found).all()
    np.testing.assert_allclose(a.features.take(np.arange(len(NAMES))), b.features.take(np.arange(len(NAMES))),
                               rtol=1e-3, atol=1e-4)
    for k in range(a.n_shards):
        ma, mb = _meta(a, k), _meta(b, k)
        np.testing.assert_array_equal(ma["sha1"], mb["sha1"], err_msg=f"shard {k}: rows out of order")
        np.testing.assert_allclose(ma["matrix"], mb["matrix"], rtol=1e-4, atol=1e-3)
        assert list(ma["reason"]) == list(mb["reason"])
        ca, cb = np.load(a.crop_file(k)).astype(int), np.load(b.crop_file(k)).astype(int)
        assert np.abs(ca - cb).max() <= 2 and (ca == cb).mean() > 0.99, f"shard {k} crops"


def test_failure_in_a_lane_keeps_finished_shards_and_resumes(face_dir, tmp_path, monkeypatch):
    cache = _cache(tmp_path / "c", face_dir, [])
    fill, calls = common.extract.Engine.fill, []

    def crash_on_fourth(self, items, *args):
        calls.append(len(items))
        if len(calls) == 4:  # shard 1's second batch (3 rows a shard, 2 a batch): shard 0 is done
            raise RuntimeError("detector crashed")
        return fill(self, items, *args)

    monkeypatch.setattr(common.extract.Engine, "fill", crash_on_fourth)
    with pytest.raises(RuntimeError, match="detector crashed"):
        extract(cache, [], "cpu", Options(batch=2, streams=2))
    assert cache.shard_done(0) and not cache.shard_done(1) and not cache.shard_done(2)
    monkeypatch.setattr(common.extract.Engine, "fill", fill)
    first = cache.shard_file(0).stat().st_mtime_ns
    extract(cache, [], "cpu", Options(batch=2, streams=2))
    cache.finalize()
    assert cache.shard_file(0).stat().st_mtime_ns == first
    assert not cache.verify_crops() and cache.found.sum() >= len(REAL_FACES) - 1


def test_stage_timing_needs_one_lane(face_dir, tmp_path):
    cache = _cache(tmp_path / "c", face_dir, [])
    with pytest.raises(ValueError, match="streams=1"):
        extract(cache, [], "cpu", Options(batch=2, streams=2), timer=common.extract.Stages("cpu"))


def test_lanes_leave_the_global_tf32_flag_as_it_was(face_dir, tmp_path, monkeypatch):
    """Teachers turn TF32 off around their calls; lanes run them beside detection, so the engine
    holds it off for the whole extraction: every call sees it off, and the user's setting comes back."""
    seen, fill = [], common.extract.Engine.fill

    def spy(self, *args):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return fill(self, *args)

    monkeypatch.setattr(common.extract.Engine, "fill", spy)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision  # (monkeypatch cannot put these properties back)
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        teachers = build_teachers(["gender"])
        extract(_cache(tmp_path / "c", face_dir, teachers), teachers, "cpu", Options(batch=2, streams=2))
        assert seen and all(s == ("ieee", "ieee") for s in seen)
        assert conv.fp32_precision == matmul.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def test_consistency_check_passes_copies_and_fails_a_corrupted_row(face_dir, tmp_path):
    """bench/consistency.py, the GPU check's race detector: copies of one image must agree."""
    import shutil

    from tests.conftest import bench_module

    consistency = bench_module("consistency")
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(4):  # two images, each twice
        shutil.copyfile(face_dir / REAL_FACES[i % 2], folder / f"{i}.jpg")
    teachers = build_teachers(["gender"])
    cache = FeatureCache.create_or_resume(tmp_path / "c", folder, sorted(p.name for p in folder.iterdir()), teachers,
                                          shard_size=3, dtype="float32", crop_size=32)
    extract(cache, teachers, "cpu", Options(batch=2, streams=2))
    cache.finalize()
    assert consistency.main([str(tmp_path / "c")]) == 0
    rows = np.load(cache.shard_file(1), mmap_mode="r+")  # row 3, a copy of row 1
    rows[0] = -rows[0]
    rows.flush()
    del rows
    assert consistency.main([str(tmp_path / "c")]) == 1


def test_faces_taken_from_another_cache_are_the_faces_it_would_find(face_dir, tmp_path, monkeypatch):
    """A teacher set added later (transfer.py's kd teacher beside a task's faces) reuses the detections of a
    finished cache of the same files: the same rows, matrices, crops and features as detecting again, with
    no detection, except for a row whose bytes are not those the old cache saw."""
    import json
    import os
    import shutil

    from common.align import BatchDetector
    from common.extract import KnownFaces

    teachers = build_teachers(["gender"])
    faces = _cache(tmp_path / "faces", face_dir, [])
    extract(faces, [], "cpu", Options(batch=2))
    faces.finalize()
    faces = FeatureCache(faces.path)
    detected = []
    real = BatchDetector.__call__
    monkeypatch.setattr(BatchDetector, "__call__",
                        lambda self, images, boxes=None: (detected.extend(images), real(self, images, boxes))[1])

    def make(name, root, donor, shard_size=3):
        c = FeatureCache.create_or_resume(tmp_path / name, root, NAMES, teachers, shard_size=shard_size,
                                          dtype="float32", crop_size=32)
        extract(c, teachers, "cpu", Options(batch=2), faces_from=donor)
        c.finalize()
        return c

    def per_row(c, key):
        return np.concatenate([_meta(c, k)[key] for k in range(c.n_shards)])

    fresh = make("fresh", face_dir, None)
    n_images = len(detected)
    detected.clear()
    reused = make("reused", face_dir, faces)
    assert n_images >= len(REAL_FACES) and detected == []
    rows = np.arange(len(NAMES))
    for key in ("found", "matrix", "sha1", "reason", "score", "crops_sha256"):
        for k in range(fresh.n_shards):
            np.testing.assert_array_equal(_meta(fresh, k)[key], _meta(reused, k)[key], err_msg=f"{key} {k}")
    for k in range(fresh.n_shards):
        assert fresh.crop_file(k).read_bytes() == reused.crop_file(k).read_bytes(), k
    np.testing.assert_allclose(fresh.features.take(rows), reused.features.take(rows), rtol=1e-5, atol=1e-6)
    # Other shard bounds than the donor's: each row still gets the donor's own answer.
    moved = make("moved", face_dir, faces, shard_size=4)
    assert detected == []
    for key in ("found", "matrix", "sha1", "reason", "score"):
        np.testing.assert_array_equal(per_row(moved, key), per_row(faces, key), err_msg=key)
    # The same names, sizes and times, yet other bytes in one file: that row alone is detected again.
    copy = shutil.copytree(face_dir, tmp_path / "copy")
    victim = copy / NAMES[1]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-3] ^= 1  # inside the JPEG's last scan: still decodes
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the donor, as if made from the copy (a dataset moved with its caches)
    donor = Path(shutil.copytree(faces.path, tmp_path / "faces2"))
    m = json.loads((donor / "manifest.json").read_text())
    (donor / "manifest.json").write_text(json.dumps({**m, "data_root": str(copy.resolve())}))
    detected.clear()
    make("partly", copy, FeatureCache(donor))
    assert len(detected) == 1
    # A cache of other files or detector settings is refused, not half used.
    other = FeatureCache.create_or_resume(tmp_path / "p5", face_dir, NAMES, teachers, shard_size=4, dtype="float32",
                                          crop_size=32, min_face_prob=0.5)
    assert not KnownFaces.matches(other.manifest, faces.manifest)
    with pytest.raises(ValueError, match="cannot be reused"):
        extract(other, teachers, "cpu", Options(batch=2, min_face_prob=0.5), faces_from=faces)


def test_each_row_is_searched_around_its_own_dataset_box(face_dir, tmp_path):
    """The same photo of several faces in three rows, each with a box around another face (AffectNet's rows):
    each row's matrix puts its own face on the template, across batch and shard edges."""
    from common.align import TEMPLATE, FaceDetector
    from common.images import read_image

    img = read_image(face_dir / "multi_face.jpg")
    boxes, probs, _ = FaceDetector().mtcnn.detect(img, landmarks=True)
    boxes = np.asarray(boxes, np.float64)[np.asarray(probs, np.float64) >= 0.9][:3]
    names = ["multi_face.jpg", "zz_noface.jpg", "multi_face.jpg", "multi_face.jpg"]
    rows = [boxes[0], None, boxes[1], boxes[2]]
    cache = FeatureCache.create_or_resume(tmp_path / "c", face_dir, names, [], shard_size=3, dtype="float32",
                                          crop_size=32, boxes=rows)
    extract(cache, [], "cpu", Options(batch=2, streams=2))
    cache.finalize()
    cache = FeatureCache(tmp_path / "c")
    assert list(cache.found) == [True, False, True, True]
    for r, box in ((0, boxes[0]), (2, boxes[1]), (3, boxes[2])):
        inv = np.linalg.inv(np.vstack([cache.matrices[r].astype(np.float64), [0, 0, 1]]))
        pts = TEMPLATE @ inv[:2, :2].T + inv[:2, 2]
        assert ((pts >= box[:2]) & (pts <= box[2:])).all(), r


def test_the_cpu_crop_buffer_is_made_channels_last_and_zeroed():
    """A shard's crop buffer is channels-last on the CPU (cv2 warps into (size, size, 3) rows, the store is
    (n, size, size, 3)); made so at once, not zeroed and then copied (0.33 s a 4,096-face shard)."""
    import torch

    from common.extract import _crop_buffer

    x = _crop_buffer(5, 16, "cpu")
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.uint8 and not x.any()
    assert x.is_contiguous(memory_format=torch.channels_last) and x.permute(0, 2, 3, 1).is_contiguous()


def test_loader_workers_default_to_none_on_the_cpu_and_to_the_spare_cores_on_a_gpu(monkeypatch):
    """fuse.py's --workers default: a GPU run decodes in worker processes, not in the dispatching thread."""
    import fuse

    assert fuse.parse_args(["--data", "x"]).workers is None
    opts = Options()
    assert opts.loader_workers("cpu") == 0
    monkeypatch.setattr(common.extract.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert opts.loader_workers("cuda") == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 processes on the machine share its 16 cores
    assert opts.loader_workers("cuda") == 2
    monkeypatch.setattr(common.extract.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert opts.loader_workers(torch.device("cuda", 1)) == 0
    assert Options(workers=3).loader_workers("cuda") == 3


def test_a_face_a_teacher_gave_inf_for_is_a_missed_face_naming_it(face_dir, tmp_path):
    """An activation past float16's range is inf once stored, and one such row made every statistic of the
    cache, and so G and every h_G, NaN: that face is listed as missed, with the teacher and the remedy."""
    teachers = build_teachers(["gender"])
    gender = teachers[0]
    real_call = type(gender).__call__

    class Loud(type(gender)):  # the real teacher, its first face's output scaled past float16's range
        def __call__(self, crops):
            out = real_call(self, crops).clone()
            out[0] = out[0] * 1e6 + 1e5
            return out

    gender.__class__ = Loud
    cache = FeatureCache.create_or_resume(tmp_path / "c", face_dir, REAL_FACES, teachers, shard_size=8,
                                          dtype="float16", crop_size=32)
    extract(cache, teachers, "cpu", Options(batch=8))
    cache.finalize()
    assert np.isfinite(cache.features.take(np.arange(len(REAL_FACES))).astype(np.float32)).all()
    reasons = list(_meta(cache, 0)["reason"])
    assert not cache.found[0] and "teacher gender gave inf or NaN" in reasons[0] and "float32" in reasons[0]
    from common.cache import write_missed

    counted = write_missed(cache, tmp_path / "missed.tsv")  # not an unreadable file, nor a photo without a face
    assert counted.teachers == 1 and counted.unusable == 0
    assert cache.found[1:].sum() >= len(REAL_FACES) - 2  # the other faces are kept
    with np.load(cache.path / "stats.npz") as st:
        assert np.isfinite(st["mean"]).all() and np.isfinite(st["std"]).all()
    # its detector found that face: a cache taking this one's faces (--faces-from) has it, its teachers working
    gender.__class__ = Loud.__mro__[1]
    again = FeatureCache.create_or_resume(tmp_path / "again", face_dir, REAL_FACES, teachers, shard_size=8,
                                          dtype="float32", crop_size=32)
    extract(again, teachers, "cpu", Options(batch=8), faces_from=FeatureCache(cache.path))
    assert again.found[0] and list(again.found[1:]) == list(cache.found[1:])


def test_g_refuses_a_cache_that_stored_non_finite_features_naming_the_teacher(tmp_path):
    from types import SimpleNamespace

    from common import fusion

    x = np.random.default_rng(0).normal(size=(12, 5))
    x[4, 3] = np.inf
    cache = SimpleNamespace(path=tmp_path, found=np.ones(12, bool), features=x,
                            sums=lambda: (12, x.sum(0), (x ** 2).sum(0)),
                            slices=lambda: {"age": slice(0, 3), "gender": slice(3, 5)})
    with pytest.raises(FloatingPointError, match="teacher gender stored inf or NaN"):
        fusion.block_units(cache, np.arange(10))

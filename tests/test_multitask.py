"""Several tasks at once (2MD-MTL), data distillation, landmark tasks and kd (Wang 2017)."""
import json
import math
import shutil
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import transfer
from common import landmarks as lm
from common import metrics, multitask, tasks
from common.align import CANON, TEMPLATE, center_matrix
from common.images import list_images
from common.student import build_student
from tests.fixtures import make_fixture, shape_68, write_pts, write_tiny_student


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny networks run faster on one thread, and far faster on a busy machine (no thread barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A small student (weights from init: these tests check mechanics, not accuracy)."""
    return write_tiny_student(tmp_path_factory.mktemp("student") / "student.safetensors", 32)


# ------------------------------------------------------------------------------------------ landmarks
def test_landmark_layouts(tmp_path):
    celeba = tasks.load("Align-CelebA", make_fixture("Align-CelebA", tmp_path / "c"))
    assert len(celeba.samples) == 12 and celeba.samples[0].label.shape == (5, 2)
    assert (len(celeba.splits[0].train), len(celeba.splits[0].val), len(celeba.splits[0].test)) == (8, 2, 2)
    w = tasks.load("Align-300W", make_fixture("Align-300W", tmp_path / "w"))
    assert len(w.samples) == 14 and w.samples[0].label.shape == (68, 2)
    test = sorted(str(w.samples[i].path).split("300W/")[1].rsplit("/", 1)[0] for i in w.splits[0].test)
    assert test == ["helen/testset", "helen/testset", "ibug", "lfpw/testset"]
    assert len(w.splits[0].train) + len(w.splits[0].val) == 10
    # .pts are 1-based: the reader gives 0-based pixels back
    pts = shape_68()
    write_pts(tmp_path / "x.pts", pts)
    assert np.allclose(tasks.read_pts(tmp_path / "x.pts"), pts, atol=1e-3)
    (tmp_path / "bad.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    with pytest.raises(ValueError, match="n_points says 68"):
        tasks.read_pts(tmp_path / "bad.pts")


def test_points_through_alignment_and_back():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 200, (3, 68, 2))
    mats = np.stack([lm.compose(lm.about_centre(1.3, a, (5, -7)), center_matrix(200, 240)) for a in (-20, 0, 35)])
    assert np.allclose(lm.from_crop(lm.to_crop(pts, mats), mats), pts)
    # A mirrored left-right symmetric face equals itself only once each point is swapped with its twin.
    face = shape_68(CANON)
    face[:, 0] += (CANON - 1) / 2 - (face[39, 0] + face[42, 0]) / 2
    assert np.allclose(lm.view_points(face, lm.mirror(), True), face)
    assert not np.allclose(lm.view_points(face, lm.mirror(), False), face, atol=1)
    c = (CANON - 1) / 2
    five = np.array([[c - 30, 100], [c + 30, 100], [c, 140], [c - 22, 170], [c + 22, 170]])
    assert np.allclose(lm.view_points(five, lm.mirror(), True), five)
    # Reducing 68 points to O-Net's five commutes with mirroring: the two FLIP tables agree.
    odd = face + np.random.default_rng(1).normal(0, 3, face.shape)
    five_of = lambda p: lm.five_points(68) @ p  # noqa: E731
    assert np.allclose(five_of(lm.view_points(odd, lm.mirror(), True)), lm.view_points(five_of(odd), lm.mirror(), True))


def test_nme():
    target = np.tile(np.array([[10.0, 10], [30, 10], [20, 20], [12, 30], [28, 30]]), (4, 1, 1))
    assert metrics.nme(target, target) == 0
    assert metrics.nme(target + [2.0, 0], target) == pytest.approx(0.1)  # 2 px / 20 px between the eyes
    with pytest.raises(ValueError, match="missed-face rule"):
        metrics.nme(np.full_like(target, np.nan), target)


def test_onet_points_on_aligned_faces():
    from common.align import FaceDetector, warp
    from common.images import read_image
    from tests.conftest import REAL_FACES, feat_data

    detect, onet = FaceDetector(), lm.ONetPoints()
    for name in REAL_FACES[:2]:
        img = read_image(feat_data() / name)
        matrix, _ = detect(img)
        crop = torch.from_numpy(warp(img, matrix, CANON)).permute(2, 0, 1)
        p = onet(crop[None])[0].numpy() * CANON
        # The crop was aligned on MTCNN's own points, so O-Net finds them near the template again.
        assert metrics.nme(p[None], TEMPLATE[None]) < 0.2, name


# ------------------------------------------------------------------------------------ joint training
def _rows(tmp_path, n=8):
    from tests.fixtures import write_face

    paths = [write_face(tmp_path / f"{k}.jpg", k) for k in range(n)]
    data = SimpleNamespace(samples=[tasks.Sample(str(p), None) for p in paths])
    rows = multitask.Rows()
    matrices = np.stack([center_matrix(64, 64)] * n)
    rows.add(_store_cache(paths, matrices), data)
    return rows


def _store_cache(paths, matrices, size=128):
    """What Rows reads of a task cache: found flags, matrices and a crop store (the canonical crops shrunk)."""
    import cv2

    from common.align import warp
    from common.images import read_image

    crops = np.stack([cv2.resize(warp(read_image(p), m, CANON), (size, size), interpolation=cv2.INTER_AREA)
                      for p, m in zip(paths, matrices)])
    return SimpleNamespace(found=np.ones(len(paths), bool), matrices=matrices, crop_size=size,
                           crops=SimpleNamespace(take=lambda rows: crops[rows]))


def _targets(n):
    cls = multitask.Target("cls", "classification", 3, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.zeros(n, dtype=torch.bool))
    reg = multitask.Target("reg", "regression", 1, torch.linspace(0, 1, n), torch.zeros(n, dtype=torch.bool))
    pts = torch.as_tensor(np.tile(TEMPLATE / CANON, (n, 1, 1)), dtype=torch.float32)
    marks = multitask.Target("marks", "landmarks", 10, pts, torch.zeros(n, dtype=torch.bool))
    cls.mask[:4] = True
    reg.mask[4:6] = True
    marks.mask[[0, 5]] = True
    for t in (cls, reg, marks):
        t.fit_scale(np.flatnonzero(t.mask.numpy()))
    return [cls, reg, marks]


def test_joint_loss_with_missing_labels(tmp_path):
    targets = _targets(8)
    torch.manual_seed(0)
    model = multitask.JointModel(build_student("resnet18w", 0.125, 16), 16, targets, 8)
    ident = torch.as_tensor(lm.about_centre(), dtype=torch.float64)

    def loss_of(rows):
        rows = torch.as_tensor(rows)
        views, flipped = ident.expand(len(rows), 2, 3), torch.zeros(len(rows), dtype=torch.bool)
        return multitask.joint_loss(targets, model(torch.randint(0, 255, (len(rows), 3, 32, 32), dtype=torch.uint8)),
                                    rows, views, flipped)

    # rows 1-3: only the classification label; the regression and landmark tasks have none in this batch
    loss, parts = loss_of([1, 2, 3])
    assert set(parts) == {"cls"} and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    loss, parts = loss_of([0, 4, 5])
    assert set(parts) == {"cls", "reg", "marks"} and torch.isfinite(loss)
    assert loss_of([6, 7]) == (None, {})  # no label at all: no loss, no NaN, no division by zero
    # Each loss is in units of its constant predictor: the head starts at the median, so a regression
    # task begins near 1 whatever its range.
    assert targets[1].scale == pytest.approx(float((targets[1].y[4:6] - targets[1].y[4:6].median()).abs().mean()))


def test_training_views_do_not_depend_on_the_workers(tmp_path):
    """The joint model's batches (order and augmented pixels) are the same with 0 or 2 worker processes, epoch
    after epoch."""
    rows = _rows(tmp_path)
    seen = {}
    for workers in (0, 2):
        ds, dl = multitask.loader(rows, np.arange(8), 32, True, Namespace(batch=3, workers=workers), seed=5)
        seen[workers] = []
        for epoch in range(2):
            ds.epoch = epoch
            dl.batch_sampler.set_epoch(epoch)
            seen[workers] += [(px.float(), r) for px, r, _, _ in dl]
    assert len(seen[0]) == len(seen[2]) == 6
    for (p0, r0), (p2, r2) in zip(seen[0], seen[2]):
        assert torch.equal(r0, r2) and torch.allclose(p0, p2, atol=1e-4)
    assert not torch.equal(torch.cat([r for _, r in seen[0][:3]]), torch.cat([r for _, r in seen[0][3:]]))


def test_pseudo_label_round_adds_rows(tmp_path):
    rows = _rows(tmp_path)
    same = SimpleNamespace(samples=[tasks.Sample(p, 1) for p in rows.paths[2:5]])
    assert list(rows.add(_store_cache(rows.paths[2:5], np.stack(rows.matrices[2:5])), same)) == [2, 3, 4]
    assert len(rows) == 8  # one file named by two tasks (UTKFace's age and gender) is one row
    targets = _targets(8)
    model = multitask.JointModel(build_student("resnet18w", 0.125, 16), 16, targets, 8)
    args = Namespace(batch=4, workers=0)
    before = {t.name: t.mask.clone() for t in targets}
    y_before = targets[0].y.clone()
    state = model.state_dict()
    states = {t.name: state for t in targets}
    added = multitask.pseudo_label(model, states, targets, rows, np.arange(8), 32, args, "cpu",
                                   threshold=1.01, agreement=-1.0)
    assert added == {"cls": 0, "reg": 0, "marks": 0}
    added = multitask.pseudo_label(model, states, targets, rows, np.arange(8), 32, args, "cpu",
                                   threshold=0.0, agreement=1.0)
    for t in targets:
        assert added[t.name] == int((~before[t.name]).sum()) > 0
        assert t.mask.all() and (t.pseudo == ~before[t.name]).all()
    assert torch.equal(targets[0].y[:4], y_before[:4])  # real labels are never replaced



def test_a_pseudo_labelled_value_is_clipped_to_the_label_range(tmp_path):
    """A regression head answering past the labels' range (an age of 250) trained the next round on it."""
    rows = _rows(tmp_path)
    targets = _targets(8)
    model = multitask.JointModel(build_student("resnet18w", 0.125, 16), 16, targets, 8)
    last = model.heads[model.names.index("reg")][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(5.0)  # 5 label ranges above the top label, on every view alike: no spread
    state = model.state_dict()
    added = multitask.pseudo_label(model, {t.name: state for t in targets}, targets, rows, np.arange(8), 32,
                                   Namespace(batch=4, workers=0), "cpu", threshold=0.0, agreement=1.0)
    reg = targets[1]
    assert added["reg"] > 0 and reg.y[reg.pseudo].max() <= 1 and reg.y[reg.pseudo].min() >= 0


# ---------------------------------------------------------------------------------------- end to end
def _main(tmp_path, student, *argv):
    transfer.main([*argv, "--student", str(student), "--align", "none", "--epochs", "1", "--batch", "8",
                   "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")])
    return {r["task"]: r for r in json.loads((tmp_path / "run" / "report.json").read_text())}


@pytest.mark.slow
def test_multitask_with_pseudo_labels_end_to_end(tmp_path, tiny_student):
    data = tmp_path / "data"
    utk, raf = make_fixture("AgeR-UTK", data).parent, make_fixture("Expr-RAF", data)
    unlabelled = make_fixture("Align-300W", tmp_path / "u") / "helen"
    shutil.copy(next(unlabelled.rglob("*.jpg")), unlabelled / "line\nbreak.jpg")  # left out by the listing
    r = _main(tmp_path, tiny_student, "--tasks", f"AgeR-UTK={utk},Expr-RAF={raf}",
              "--method", "multitask", "--pseudo-label", str(unlabelled), "--pseudo-threshold", "0",
              "--pseudo-agreement", "1")
    assert "1 image(s) under" in (tmp_path / "run" / "log.txt").read_text()  # said on stderr, and on record
    for name in ("AgeR-UTK", "Expr-RAF"):
        res = r[name]["results"]
        assert set(res) == {"multitask", "multitask+pseudo"}
        assert all(np.isfinite(res[m]["value"]) for m in res)
        # threshold 0: every training image of the other dataset and every unlabelled face gets a label
        assert res["multitask+pseudo"]["pseudo_labels"] > 0
        # each task's epoch is chosen on validation over both rounds (--epochs 1, then --pseudo-epochs): a
        # pseudo column whose choice fell in round 1 scores a model that never saw a pseudo-label, and says so
        pseudo = res["multitask+pseudo"]
        assert all(res[m]["chosen"] == f"epoch {res[m]['epoch']}" for m in res)
        assert ("never saw a pseudo-label" in pseudo["note"]) == (pseudo["epoch"] == 1)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "multitask+pseudo" in md and "pseudo-labels added" in md


@pytest.mark.slow
def test_data_distillation_of_a_single_task(tmp_path, tiny_student):
    """One task: the two columns are the single-task baseline with and without data distillation (the
    paper compares both on the baseline and on the multitask model)."""
    raf = make_fixture("Expr-RAF", tmp_path / "data")
    unlabelled = make_fixture("Align-300W", tmp_path / "u") / "helen"
    r = _main(tmp_path, tiny_student, "--task", "Expr-RAF", "--data", str(raf), "--method", "multitask",
              "--pseudo-label", str(unlabelled), "--pseudo-threshold", "0", "--pseudo-agreement", "1")
    res = r["Expr-RAF"]["results"]
    assert set(res) == {"multitask", "multitask+pseudo"} and all(np.isfinite(res[m]["value"]) for m in res)
    assert res["multitask+pseudo"]["pseudo_labels"] >= len(list_images(unlabelled))


@pytest.mark.slow
def test_with_no_pseudo_label_kept_both_columns_train_the_same_model(tmp_path, tiny_student, monkeypatch):
    """README: the two columns differ by the pseudo-labels only. Both second rounds start from round 1's
    weights, but the head's dropout drew from wherever the random state stood: with no pseudo-label kept,
    they trained two different models."""
    raf = make_fixture("Expr-RAF", tmp_path / "data")
    unlabelled = make_fixture("Align-300W", tmp_path / "u") / "helen"
    monkeypatch.setattr(multitask, "pseudo_label", lambda *a, **k: {})  # none kept
    trained, evaluate = [], multitask.evaluate

    def weights_then_evaluate(model, *a, **k):
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return evaluate(model, *a, **k)

    monkeypatch.setattr(multitask, "evaluate", weights_then_evaluate)
    _main(tmp_path, tiny_student, "--task", "Expr-RAF", "--data", str(raf), "--method", "multitask",
          "--pseudo-label", str(unlabelled))
    assert len(trained) == 2 and torch.allclose(trained[0], trained[1], atol=1e-6)


@pytest.mark.slow
def test_kd_on_landmarks_and_verification(tmp_path, tiny_student):
    w = make_fixture("Align-300W", tmp_path / "data")
    r = _main(tmp_path / "a", tiny_student, "--task", "Align-300W", "--data", str(w), "--method", "finetune,kd")
    res = r["Align-300W"]["results"]
    assert all(res[m]["metric"] == "nme" and 0 < res[m]["value"] < 10 for m in ("finetune", "kd"))
    # --method all: the methods a landmark task cannot take are n/a and need nothing (no fuse cache here; it
    # was demanded, and with one, its six teachers were run over the task for nothing), nor write ETL files
    r = _main(tmp_path / "all", tiny_student, "--task", "Align-300W", "--data", str(w), "--method", "all",
              "--teacher-cache", str(tmp_path / "no-fuse-cache"))
    res = r["Align-300W"]["results"]
    assert res["fused"]["value"] == "n/a" and res["etl"]["value"] == "n/a" and 0 < res["scratch"]["value"] < 10
    assert not (tmp_path / "all" / "run" / "etl.md").exists()
    lfw = make_fixture("Identity-LFW", tmp_path / "data")
    r = _main(tmp_path / "b", tiny_student, "--task", "Identity-LFW", "--data", str(lfw), "--method", "kd",
              "--max-splits", "1", "--kd-weight", "2")
    res = r["Identity-LFW"]["results"]["kd"]
    assert 0 <= res["value"] <= 1 and 0 <= res["teacher"] <= 1 and len(res["per_split"]) == 1
    assert res["std"] is None and res["se"] is None  # one fold has no spread to give (numpy's ddof=0 said 0.0)
    # the report says these LFW figures are not the paper's protocol (identity pre-training on VGGFace2)
    assert "not the paper's 100,000 VGGFace2 faces" in res["note"]
    assert "not the paper's 100,000 VGGFace2" in (tmp_path / "b" / "run" / "report.md").read_text()
    with pytest.raises(SystemExit, match="its 8 classes are more than the 7 that the kd teacher knows"):
        _main(tmp_path / "c", tiny_student, "--task", "Expr-AffectNet", "--data",
              str(make_fixture("Expr-AffectNet", tmp_path / "r")), "--method", "kd")
    with pytest.raises(SystemExit, match="Attrib-CelebA: --method kd needs a teacher that knows the task"):
        _main(tmp_path / "d", tiny_student, "--task", "Attrib-CelebA", "--data",
              str(make_fixture("Attrib-CelebA", tmp_path / "a")), "--method", "kd")


@pytest.mark.slow
def test_kd_on_gender_age_and_expression(tmp_path, tiny_student):
    """kd = finetune + the gender / age / expression teacher's own answer; its own score is reported beside.
    RAF's fixture trains on 9 images in batches of 8: the batch of one left over must not reach batch norm."""
    utk = make_fixture("Gender-UTK", tmp_path / "data")
    raf = make_fixture("Expr-RAF", tmp_path / "raf")
    for task, data, metric, teacher in (("Gender-UTK", utk, "accuracy", "gender"), ("AgeC-UTK", utk, "accuracy", "age"),
                                        ("AgeR-UTK", utk, "mae", "age"), ("Expr-RAF", raf, "accuracy", "facex-expression")):
        r = _main(tmp_path / task, tiny_student, "--task", task, "--data", str(data), "--method", "finetune,kd")
        res = r[task]["results"]
        assert res["kd"]["metric"] == metric and np.isfinite(res["kd"]["value"]), task
        assert res["kd"]["n_test"] == res["finetune"]["n_test"] and "kd weight 1.0" in res["kd"]["note"]
        assert np.isfinite(res["kd"]["teacher"]) and f"teacher {teacher}'s own" in res["kd"]["note"]
        assert res["kd"]["teacher_name"] == teacher
        # a teacher's classes that the task lacks are left out of its own score: the note says so
        assert ("answer among the task's classes" in res["kd"]["note"]) == (metric == "accuracy"), task
    with pytest.raises(SystemExit, match="--kd-teacher age: Gender-UTK distils a teacher's own gender prediction"):
        _main(tmp_path / "x", tiny_student, "--task", "Gender-UTK", "--data", str(utk), "--method", "kd",
              "--kd-teacher", "age")
    assert not (tmp_path / "x" / "run").exists()  # refused before any work
    # One run, a teacher for each task: AgeR-UTK keeps its default (age), Expr-RAF takes the one named.
    r = _main(tmp_path / "both", tiny_student, "--tasks", f"Expr-RAF={raf},AgeR-UTK={utk}", "--method", "kd",
              "--kd-teacher", "Expr-RAF=facex-expression")
    assert [r[t]["results"]["kd"]["teacher_name"] for t in ("Expr-RAF", "AgeR-UTK")] == ["facex-expression", "age"]


@pytest.mark.slow
def test_kd_refuses_what_it_cannot_do_before_any_work(tmp_path, tiny_student, monkeypatch):
    from common.teachers import weights_problem

    def refused(match, *argv):
        with pytest.raises(SystemExit, match=match):
            _main(tmp_path / "x", tiny_student, *argv)
        assert not (tmp_path / "x" / "run").exists()

    lfw = make_fixture("Identity-LFW", tmp_path / "lfw")
    refused("verification distils an identity embedding, and gender is a gender teacher",
            "--task", "Identity-LFW", "--data", str(lfw), "--method", "kd", "--kd-teacher", "gender")
    refused("unknown teacher 'nosuch'", "--task", "Identity-LFW", "--data", str(lfw), "--method", "kd",
            "--kd-teacher", "nosuch")
    utk = make_fixture("Gender-UTK", tmp_path / "utk")
    refused("--kd-temperature must be a number above 0", "--task", "Gender-UTK", "--data", str(utk), "--method",
            "kd", "--kd-temperature", "inf")
    refused("teacher dlib: ", "--task", "Identity-LFW", "--data", str(lfw), "--method", "kd", "--kd-teacher", "dlib") \
        if weights_problem("dlib") else None  # not installed here: said before any work, not after finetune
    refused("--kd-teacher gender is for --method kd", "--task", "Gender-UTK", "--data", str(utk), "--method",
            "finetune", "--kd-teacher", "gender")
    # multitask's own refusals, before the other methods run (they came after finetune had run on every task)
    fg = make_fixture("AgeR-FG", tmp_path / "fg")
    refused("multitask: AgeR-FG's protocol has .* splits", "--tasks", f"AgeR-UTK={utk},AgeR-FG={fg}", "--method",
            "finetune,multitask")
    refused("backbone 'foo': use student, scratch or a PyTorch teacher", "--task", "AgeR-UTK", "--data", str(utk),
            "--method", "finetune,multitask", "--backbone", "foo")
    refused("--pseudo-label .*nope: no such folder", "--task", "AgeR-UTK", "--data", str(utk), "--method",
            "multitask", "--pseudo-label", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    refused("--pseudo-label .*empty holds no image", "--task", "AgeR-UTK", "--data", str(utk), "--method",
            "multitask", "--pseudo-label", str(tmp_path / "empty"))
    refused("--max-splits -1: give 0", "--task", "AgeR-UTK", "--data", str(utk), "--max-splits", "-1")
    refused("--kd-teacher age: Gender-UTK distils a teacher's own gender prediction", "--tasks",
            f"AgeR-UTK={utk},Gender-UTK={utk}", "--method", "kd", "--kd-teacher", "AgeR-UTK=age,Gender-UTK=age")
    refused(r"--kd-teacher names Gender-IMDb, not a task of this run \(AgeR-UTK\)", "--task", "AgeR-UTK", "--data",
            str(utk), "--method", "kd", "--kd-teacher", "Gender-IMDb=gender")
    with pytest.raises(SystemExit, match="--epochs and --head-epochs must be 1 or more"):
        transfer.main(["--task", "Gender-UTK", "--data", str(utk), "--epochs", "0", "--run-dir", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()
    refused("Ethnic-UTK: --method kd needs a teacher that knows the task; there are such teachers for landmarks, "
            "verification and", "--task", "Ethnic-UTK", "--data", str(utk), "--method", "all,kd")  # all's own: n/a
    with pytest.raises(SystemExit, match="--batch 1: the networks trained on images .batch norm. need 2 or more"):
        transfer.main(["--task", "Gender-UTK", "--data", str(utk), "--batch", "1", "--run-dir", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()
    # a user's folder task whose class names the teacher does not know: refused before finetune runs, not after;
    # Kaggle's names (disgusted, fearful) are the teacher's
    sfew = make_fixture("Expr-SFEW", tmp_path / "sfew") / "Train"
    for old, new in (("Disgust", "Disgusted"), ("Fear", "Fearful"), ("Surprise", "Bored")):
        (sfew / old).rename(sfew / new)
    monkeypatch.setitem(tasks.TASKS, "MyExpr", tasks.folder_task("MyExpr", knowledge="Emotion Classification"))
    refused(r"the kd teacher has no class for \['Bored'\]",
            "--task", "MyExpr", "--data", str(sfew), "--method", "finetune,kd")


def test_a_split_without_a_training_face_says_so(tmp_path, tiny_student):
    from PIL import Image

    utk = make_fixture("Gender-UTK", tmp_path / "utk")
    for f in utk.iterdir():
        Image.new("RGB", (64, 64)).save(f, format="JPEG")
    with pytest.raises(SystemExit, match="0 face.s. found among the 16 training images of split"):
        transfer.main(["--task", "Gender-UTK", "--data", str(utk), "--student", str(tiny_student), "--epochs", "1",
                       "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")])


def test_batches_fold_a_last_single_image_into_the_one_before():
    for n, batch in ((9, 8), (17, 8), (16, 8), (2, 8), (5, 8), (3, 2)):
        b = transfer.Batches(n, batch, True, 0)
        epochs = [list(b), list(b)]
        assert epochs[0] == epochs[1]  # asked twice in one epoch (a DataLoader with workers does): one order
        b.set_epoch(1)
        epochs[1] = list(b)
        for chunks in epochs:
            assert sorted(i for c in chunks for i in c) == list(range(n)) and len(chunks) == len(b)
            assert min(map(len, chunks)) >= 2
        assert n < 5 or epochs[0] != epochs[1]  # a new order each epoch
    assert list(transfer.Batches(5, 2, False, 0)) == [[0, 1], [2, 3, 4]]


def test_soft_targets_group_the_teachers_classes_in_log_space(monkeypatch):
    from common import kd

    log_q = torch.log_softmax(torch.tensor([[0.0, -40.0, -41.0], [-3.0, -2.0, 0.0]], dtype=torch.float64), 1)

    class Fake:  # a teacher of three ages: 0.25 and 1 fall in the 0-2 group, 12 in 10-19
        def __init__(self, name):
            self.kind, self.classes = "age", (0.25, 1, 12)

        def __call__(self, h):
            return log_q

    monkeypatch.setattr(kd, "TeacherAnswer", Fake)
    cache = SimpleNamespace(features=SimpleNamespace(take=lambda rows: np.zeros((2, 1))), found=np.array([True, False]))
    task = tasks.get_task("AgeC-UTK")
    soft = kd.soft_targets(task, SimpleNamespace(samples=[0, 1], label_names=None), cache, None, 4.0, "age")
    log_p = torch.full((2, len(tasks.AGE_BINS)), -math.inf, dtype=torch.float64)
    log_p[:, 0], log_p[:, 2] = torch.logsumexp(log_q[:, :2], 1), log_q[:, 2]
    torch.testing.assert_close(soft.values, torch.softmax(log_p / 4, 1).float())
    assert soft.ok.tolist() == [True, False] and soft.preds.tolist() == [0, 2]
    # a class 41 below the top keeps its place through the temperature (exp(-41 / 4)), not a 1e-12 floor
    assert float(soft.values[0, 2] / soft.values[0, 0]) == pytest.approx(math.exp(float(log_p[0, 2] - log_p[0, 0]) / 4),
                                                                         rel=1e-4)
    years = kd.soft_targets(tasks.get_task("AgeR-UTK"), SimpleNamespace(samples=[0, 1]), cache, (0, 116), 4.0, "age")
    want = (log_q.exp() @ torch.tensor([0.25, 1, 12], dtype=torch.float64)).numpy()
    assert np.allclose(years.preds, want) and np.allclose(years.values.numpy(), want / 116, atol=1e-6)


def _soft(kind, values, n_out, T=4.0):
    from common import kd
    return kd.SoftTargets(torch.as_tensor(values, dtype=torch.float32), torch.ones(len(values), dtype=torch.bool),
                          np.zeros(len(values)), kind, T)


def test_teacher_classes_map_onto_the_task_classes():
    from common import kd
    gender = SimpleNamespace(kind="gender", classes=("female", "male"))
    utk = tasks.get_task("Gender-UTK")
    m = kd.class_map(utk, SimpleNamespace(label_names=["male", "female"], samples=[]), gender)
    assert m.tolist() == [[0, 1], [1, 0]]  # UTKFace codes male 0, female 1: the columns swap
    imdb = SimpleNamespace(label_names=["female", "male"], samples=[])
    assert kd.class_map(tasks.get_task("Gender-IMDb"), imdb, gender).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(SystemExit, match=r"the kd teacher has no class for \['a', 'b'\] \(its classes: female, male"):
        kd.class_map(utk, SimpleNamespace(label_names=["a", "b"], samples=[]), gender)
    expr = SimpleNamespace(kind="expression", classes=("anger", "disgust", "fear", "happy", "neutral", "sadness",
                                                        "surprised"))
    raf = kd.class_map(tasks.get_task("Expr-RAF"), SimpleNamespace(label_names=tasks.RAF_NAMES, samples=[]), expr)
    assert [tasks.RAF_NAMES[j] for j in raf.argmax(1)] == ["Anger", "Disgust", "Fear", "Happiness", "Neutral",
                                                          "Sadness", "Surprise"]
    six = [n for n in tasks.FER_NAMES if n != "Neutral"]  # a set without neutral: the teacher's neutral maps nowhere
    m = kd.class_map(tasks.folder_task("Six", knowledge="Emotion Classification"),
                     SimpleNamespace(label_names=six, samples=[]), expr)
    assert m.sum() == 6 and m[expr.classes.index("neutral")].sum() == 0
    fer = kd.class_map(tasks.get_task("FER2013"), SimpleNamespace(label_names=tasks.FER_NAMES, samples=[]), expr)
    assert [tasks.FER_NAMES[j] for j in fer.argmax(1)] == ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad",
                                                          "Surprise"]
    age = SimpleNamespace(kind="age", classes=(0.25, *range(1, 81)))
    agec = tasks.get_task("AgeC-UTK")
    m = kd.class_map(agec, SimpleNamespace(label_names=None, samples=[]), age)
    assert (m.sum(1) == 1).all() and m.shape == (81, len(tasks.AGE_BINS))
    assert m[:3, 0].all() and m[3, 1] and m[9, 1] and m[10, 2] and m[69, -2] and m[70:, -1].all()


def test_kd_loss_is_the_task_loss_when_the_student_says_what_the_teacher_says():
    from common import kd
    task = tasks.get_task("Gender-UTK")
    y = torch.tensor([0, 1, 1, 0, 1, 1])
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9], [0.5, 0.5]])
    T = 4.0
    soft = _soft("gender", torch.softmax(p.log() / T, 1), 2, T)
    loss = kd.KDLoss(task, lambda out, t: F.cross_entropy(out, t), y, 2, soft, np.arange(6), 1.0)
    prior = torch.tensor([2 / 6, 4 / 6])
    assert loss.task_scale == pytest.approx(float(-(prior * prior.log()).sum()), rel=1e-5)
    ok = torch.ones(6)
    same = p.log()  # the teacher's logits: at the same temperature the student's softmax is the teacher's
    task_only = float(F.cross_entropy(same, y)) / loss.task_scale
    assert float(loss(same, (y, soft.values, ok))) == pytest.approx(task_only, rel=1e-5)
    other = same.flip(1)
    extra = float(loss(other, (y, soft.values, ok))) - float(F.cross_entropy(other, y)) / loss.task_scale
    assert extra > 0.5  # far from the teacher costs about as much as knowing nothing, or more
    # rows the teacher did not see add nothing, and the weight scales the term
    loss2 = kd.KDLoss(task, lambda out, t: F.cross_entropy(out, t), y, 2, soft, np.arange(6), 2.0)
    extra2 = float(loss2(other, (y, soft.values, ok))) - float(F.cross_entropy(other, y)) / loss.task_scale
    assert extra2 == pytest.approx(2 * extra, rel=1e-5)
    unseen = torch.tensor([1.0, 1, 1, 1, 1, 0])
    mixed = torch.cat([other[:5], same[5:]])
    a = float(loss(mixed, (y, soft.values, unseen))) - float(F.cross_entropy(mixed, y)) / loss.task_scale
    assert a == pytest.approx(extra * 6 / 5 - float(loss.distance(other[5:], soft.values[5:], T)) / loss.kd_scale / 5,
                              rel=1e-4)


def test_kd_loss_on_ages_is_l1_to_the_teachers_expected_age():
    from common import kd
    task = tasks.get_task("AgeR-UTK")
    y = torch.tensor([0.1, 0.3, 0.5, 0.2])
    soft = _soft("age", [0.2, 0.3, 0.4, 0.3], 1)
    loss = kd.KDLoss(task, lambda out, t: F.l1_loss(out.squeeze(1), t), y, 1, soft, np.arange(4), 1.0)
    assert loss.kd_scale == pytest.approx(0.05, rel=1e-5)  # mean |value - median 0.3|
    out = torch.tensor([[0.2], [0.3], [0.4], [0.3]])
    task_term = float(F.l1_loss(out.squeeze(1), y)) / loss.task_scale
    assert float(loss(out, (y, soft.values, torch.ones(4)))) == pytest.approx(task_term, rel=1e-5)
    assert float(loss(out + 0.1, (y, soft.values, torch.ones(4)))) > task_term + 1.9


def test_views_from_the_crop_store_match_views_of_the_image(tmp_path):
    # Rows warp each training view out of the stored (shrunk) crop; it must be the view the source image
    # gives, up to the store's loss of resolution, and not shifted (the half-pixel of the shrink).
    from common.align import FaceDetector, warp
    from common.images import read_image
    from tests.conftest import REAL_FACES, feat_data

    img = read_image(feat_data() / REAL_FACES[0])
    matrix, _ = FaceDetector()(img)
    rows = multitask.Rows()
    rows.add(_store_cache([feat_data() / REAL_FACES[0]], matrix[None]),
             SimpleNamespace(samples=[tasks.Sample(str(feat_data() / REAL_FACES[0]), None)]))
    view = lm.about_centre(1.1, 12.0, (0.03, -0.02))
    direct = warp(img, lm.compose(view, matrix), CANON).astype(np.float32)
    stored = rows.canonical_view(0, view).astype(np.float32)
    assert np.abs(stored - direct).mean() < 4.0
    shifted = rows.canonical_view(0, lm.compose(np.array([[1.0, 0, 2.0], [0, 1.0, 0]]), view)).astype(np.float32)
    assert np.abs(shifted - direct).mean() > np.abs(stored - direct).mean() * 1.5  # the check can tell 2 px


def test_rows_are_one_per_file_however_named(tmp_path, monkeypatch):
    """A pseudo-label folder given by another path (relative, through a link, with "..") than a task's own
    names the same files: they must be the task's rows, which the held-out rules keep out of training."""
    from types import SimpleNamespace

    from common import tasks
    from common.multitask import Rows

    (tmp_path / "faces").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "faces" / name).write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "faces")
    monkeypatch.chdir(tmp_path)
    cache = SimpleNamespace(found=np.ones(2, bool), matrices=np.zeros((2, 2, 3)))
    rows = Rows()
    own = rows.add(cache, tasks.TaskData([tasks.Sample(str(tmp_path / "faces" / n), None) for n in ("a.jpg", "b.jpg")], []))
    other = rows.add(cache, tasks.TaskData([tasks.Sample(p, None) for p in ("link/b.jpg", "faces/../faces/a.jpg")], []))
    assert len(rows) == 2 and list(other) == [own[1], own[0]]


def test_multitask_regression_range_and_loss_unit_come_from_training_labels(tmp_path):
    """A user's CSV regression task in the joint model: its label range (which scales targets, clips predictions
    and gives missed test faces its midpoint) is never set by a test label, as in transfer.py's other methods."""
    from common import tasks
    from tests.fixtures import make_csv_table

    root = make_csv_table(tmp_path, values=(21.0, 33.5, 150.0, 18.0, 60.0, 27.0), split=True)  # 150, 27: test
    task = tasks.csv_task("Score-Mine", kind="regression")
    data = task.loader(root)
    rows = multitask.Rows()
    paths = [s.path for s in data.samples]
    ids = rows.add(_store_cache(paths, np.stack([center_matrix(64, 64)] * len(paths))), data)
    t = multitask.task_target(task, data, ids, rows, len(rows), data.splits[0])
    assert t.lo_hi == (18.0, 60.0)


def test_held_out_images_leave_the_loss_unit_and_the_heads_start():
    """A training label on an image another task tests on is dropped, and with it its weight in the task's
    loss unit and its head's starting value (the median), which were fitted before the drop."""
    targets = _targets(8)
    reg = targets[1]
    reg.y[5] = 100.0  # an extreme label on row 5, which another task tests on
    reg.fit_scale(multitask.label_rows(reg))
    before = reg.scale
    multitask.hold_out(targets, np.array([5]))
    assert multitask.label_rows(reg).tolist() == [4]
    assert reg.scale == 1.0 and float(reg.init) == pytest.approx(float(reg.y[4]))  # one label left: nothing to learn
    assert before > 10
    cls = targets[0]
    multitask.hold_out(targets, np.array([0]))
    assert cls.scale == pytest.approx(float(-(3 * (1 / 3) * np.log(1 / 3))))  # labels 1, 2, 0 of rows 1-3 left


def test_scratch_weights_follow_the_seed_not_what_ran_before(tiny_student):
    """kd's (and multitask's) scratch network is drawn after --seed is set: its start does not depend on the
    methods run before it in the process, nor on which ones a --resume skipped."""
    from common import kd

    args = SimpleNamespace(student=tiny_student, seed=3, hidden=8, lr=1e-3)
    target = [multitask.Target("y", "classification", 2, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))]
    first = kd._model(target, "scratch", args, "cpu")[0].state_dict()
    torch.rand(1000)  # another method's draws
    again = kd._model(target, "scratch", args, "cpu")[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_training_rows_are_the_splits_found_faces_and_each_target_weighs_as_told():
    """(From a mutation audit: nothing failed when missed faces were trained on or the weights ignored.)"""
    from common.tasks import Sample, Split

    data = SimpleNamespace(samples=[Sample(f"{i}.jpg", i % 2) for i in range(4)])
    rows = SimpleNamespace(found=np.array([True, False, True, True]))
    t = multitask.task_target(tasks.get_task("Gender-UTK"), data, np.arange(4), rows, 4,
                              Split("s", np.array([0, 1, 2]), np.array([3])))
    assert t.mask.tolist() == [True, False, True, False]  # row 1: no face found; row 3: a test image

    y = torch.tensor([0.2, 0.8, 0.5, 0.1])
    a = multitask.Target("a", "regression", 1, y.clone(), torch.ones(4, dtype=torch.bool), weight=2.0)
    b = multitask.Target("b", "regression", 1, y.clone(), torch.ones(4, dtype=torch.bool), weight=0.0)
    out = {"a": torch.zeros(4, 1), "b": torch.ones(4, 1), "_embedding": torch.zeros(4, 3)}
    total, parts = multitask.joint_loss([a, b], out, torch.arange(4), torch.zeros(4, 2, 3),
                                        torch.zeros(4, dtype=torch.bool))
    assert float(total) == pytest.approx(2.0 * float(parts["a"]))


def test_each_task_keeps_its_own_best_validation_epoch():
    """(From a mutation audit: keeping the worst epoch passed every test.)"""
    acc = SimpleNamespace(name="g", task=SimpleNamespace(metric="accuracy"))
    err = SimpleNamespace(name="a", task=SimpleNamespace(metric="mae"))
    model, best = torch.nn.Linear(2, 1), {}
    for epoch, scores in enumerate([{"g": 0.5, "a": 5.0}, {"g": 0.9, "a": 4.0}, {"g": 0.7, "a": 3.0}], 1):
        with torch.no_grad():
            model.bias.fill_(epoch)
        multitask.keep_best(best, scores, [acc, err], model, epoch)
    assert (best["g"][0], best["g"][2], float(best["g"][1]["bias"])) == (0.9, 2, 2.0)
    assert (best["a"][0], best["a"][2], float(best["a"][1]["bias"])) == (3.0, 3, 3.0)


def test_a_loss_that_diverges_stops_the_joint_training_with_its_epoch(tmp_path):
    """The loss is checked once an epoch on a device flag (not read back each step): a diverged one still
    stops the run, naming the epoch and the flag to change."""
    from common.student import build_student

    rows, targets = _rows(tmp_path), _targets(8)
    torch.manual_seed(0)
    model = multitask.JointModel(build_student("resnet18w", 0.125, 16), 16, targets, 8)
    args = Namespace(batch=4, workers=0, seed=0)
    with pytest.raises(FloatingPointError, match=r"inf or NaN in epoch [12]; lower --lr"):
        multitask.train(model, targets, rows, 32, 2, [{"params": model.parameters(), "lr": 1e30}], args, "cpu")


def test_a_regression_head_no_better_than_a_constant_labels_nothing(tmp_path, tiny_student, monkeypatch):
    """The spread rule alone kept the answers of an age head still near its constant (they agree over the views
    because they are alike for every face): on the demo, 134 of 192 ages, a quarter of the real labels' spread.
    A regression task whose model does not beat the training median on validation labels nothing."""
    utk = make_fixture("AgeR-UTK", tmp_path / "data")
    unlabelled = make_fixture("Align-300W", tmp_path / "u") / "helen"
    seen = []

    def no_better(t, *a):
        seen.append(t.name)
        return 2.0, 1.0
    monkeypatch.setattr(multitask, "beats_a_constant", no_better)
    r = _main(tmp_path, tiny_student, "--task", "AgeR-UTK", "--data", str(utk.parent), "--method", "multitask",
              "--pseudo-label", str(unlabelled), "--pseudo-threshold", "0", "--pseudo-agreement", "1")
    assert seen == ["AgeR-UTK"] and r["AgeR-UTK"]["results"]["multitask+pseudo"]["pseudo_labels"] == 0
    assert "pseudo-labels AgeR-UTK: none kept: on validation its answers (error 2.0000) do not beat the training " \
           "labels' constant (1.0000)" in (tmp_path / "run" / "log.txt").read_text()
    # the two errors, each in the task's own metric: the model's, and the training labels' median age's
    monkeypatch.undo()
    t = SimpleNamespace(task=tasks.get_task("AgeR-UTK"), kind="regression", split=tasks.Split("s", np.arange(3),
                        np.array([3]), np.array([4, 5])), extra={"labels": [20.0, 30.0, 90.0, 0.0, 28.0, 40.0]})
    monkeypatch.setattr(multitask, "score_rows", lambda *a: (7.5, None))
    assert multitask.beats_a_constant(t, None, None, 32, None, "cpu") == (7.5, pytest.approx((2 + 10) / 2))


def test_kd_and_multitask_scratch_need_no_student(tmp_path):
    """README: scratch needs no student; on a landmark or verification task (kd's scratch) the run said it would
    train the default architecture, built the task cache, then stopped on 'no student checkpoint'."""
    from common.student import DEFAULT

    net, width, size = multitask.build_backbone("scratch", tmp_path / "no-student", "cpu")
    assert (width, size) == (DEFAULT["out_dim"], DEFAULT["size"]) and net.config["width"] == DEFAULT["width"]
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):  # the student itself is needed as ever
        multitask.build_backbone("student", tmp_path / "no-student", "cpu")

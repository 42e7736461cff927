"""ETL pruning (common/prune.py, transfer.py --method etl): exactness, residual consistency, size, ONNX, reloading."""
import copy
import json

import numpy as np
import pytest
import torch

import transfer
from common import prune
from common.student import build_student, head, load_student
from tests.fixtures import face_pool, make_fixture, write_tiny_student

RATIOS = (0.5, 0.75, 0.9, 0.97)


def _faces(n=24, size=32):
    """Real face crops with made-up labels, as (pixels, label) batches."""
    pool = face_pool()
    x = torch.stack([torch.from_numpy(np.array(pool[k % len(pool)])).permute(2, 0, 1) for k in range(n)]).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x, torch.arange(n) % 3


def _student():
    torch.manual_seed(0)
    s = build_student("resnet18w", 0.125, 16).eval()
    # non-trivial batch-norm statistics, so that a silenced filter is not silent by accident
    g = torch.Generator().manual_seed(1)
    for m in s.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
    return s


def test_mutual_information_known_cases():
    y = np.repeat([0, 1], 400)
    rng = np.random.default_rng(0)
    x = np.stack([y + 0.01 * rng.standard_normal(800),  # the label itself: 1 bit
                  np.zeros(800),                          # a dead filter: 0
                  rng.standard_normal(800)], 1)           # noise: close to 0
    mi = prune.mutual_information(x, y)
    assert mi[0] == pytest.approx(1.0, abs=1e-9)
    assert mi[1] == 0.0
    assert 0 <= mi[2] < 0.05
    # a regression target and a multi-label one become discrete labels
    assert len(np.unique(prune.label_columns(np.linspace(0, 1, 80), "regression")[0])) == prune.BINS
    assert len(prune.label_columns(np.zeros((5, 3)), "multilabel")) == 3


def test_pruned_student_computes_what_the_zeroed_one_does():
    """Physical pruning == the unpruned network with the removed filters silenced (before fine-tuning), at
    every ratio; the skip connections stay consistent; the parameter count falls as the ratio rises."""
    base = _student()
    x, y = _faces()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]
    counts = [prune.count_params(base)]
    for ratio in RATIOS:
        s = copy.deepcopy(base)
        dg, groups, scores = prune.score_groups(s, x[:1], batches, "classification")
        removed = prune.prune(s, dg, groups, scores, ratio)
        s.eval()
        zeroed = prune.zero_removed(copy.deepcopy(base), removed).eval()
        with torch.no_grad():
            a, b = s(x), zeroed(x)
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()), rtol=0), (ratio, (a - b).abs().max())
        # every filter writing into one skip-connection channel went together: each block's output and
        # input widths agree, so the additions line up (a mismatch could not even run above)
        bb = s.backbone
        for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4):
            for block in layer:
                width_in = block.conv1.in_channels
                assert block.conv2.out_channels == (block.downsample[0].out_channels if block.downsample else width_in)
        assert bb.conv1.out_channels == bb.layer1[0].conv1.in_channels
        # the cut is per layer: every conv keeps max(1, round((1 - ratio) * n)) filters
        assert bb.layer4[0].conv1.out_channels == prune.keep_count(base.backbone.layer4[0].conv1.out_channels, ratio)
        counts.append(prune.count_params(s))
        # the shapes in the metadata rebuild the same network from the unpruned architecture
        rebuilt = prune.apply_shapes(build_student("resnet18w", 0.125, 16), prune.shapes(s))
        rebuilt.load_state_dict(s.state_dict())
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x[:2]), s(x[:2]))
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)


def _red_tells_class_1():
    """A student whose stem filter 5 reads only red, on faces where class 1 has no red: that filter tells
    the class. The residual branches write into the stem's channels too, and their responses (no ReLU
    before the add) read red as well: silenced, so that the stem's filter is the one that tells it."""
    s = _student()
    x, y = _faces(48)
    x[y == 1, 0] = 0
    with torch.no_grad():
        s.backbone.conv1.weight[5] = 0
        s.backbone.conv1.weight[5, 0] = 0.05
        for block in s.backbone.layer1:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return s, x, y


def _stem(s, groups) -> int:
    return next(i for i, g in enumerate(groups) if any(it.dep.target.module is s.backbone.conv1 for it in g))


def test_filters_that_carry_the_label_are_kept():
    """A filter made to respond to the label survives a 0.9 cut; MI is computed on the training batches given."""
    s, x, y = _red_tells_class_1()
    dg, groups, scores = prune.score_groups(s, x[:1], [(x, y)], "classification")
    assert np.argmax(scores[_stem(s, groups)]) == 5
    removed = prune.prune(s, dg, groups, scores, 0.9)
    assert 5 not in removed["backbone.conv1"]


def test_every_attribute_of_a_multilabel_task_scores_the_filters():
    """(From a mutation audit: scoring against the first attribute alone passed.) A filter that tells the
    second attribute, the first one the same for every face, scores highest."""
    s, x, y = _red_tells_class_1()
    attrs = np.stack([np.zeros(len(y)), (y == 1).numpy()], 1).astype(np.float32)  # the first tells nothing
    assert [c.tolist() for c in prune.label_columns(attrs, "multilabel")] == [list(attrs[:, 0] > 0.5), list(attrs[:, 1] > 0.5)]
    _, groups, scores = prune.score_groups(s, x[:1], [(x, torch.from_numpy(attrs))], "multilabel")
    assert np.argmax(scores[_stem(s, groups)]) == 5


def test_negative_responses_count_where_no_relu_follows():
    """A batch norm feeding a skip connection (or a linear bottleneck) passes its negative values on: a
    filter that is minus the label there carries it all, and must score as much as the label itself."""
    import torchvision

    s = _student()
    x, y = _faces(48)
    dg, _ = prune.dependency_graph(s, x[:1])
    assert prune.rectified(dg, s.backbone.bn1) and prune.rectified(dg, s.backbone.layer1[0].bn1)
    assert not prune.rectified(dg, s.backbone.layer1[0].bn2)  # its ReLU comes after the add
    m = torchvision.models.mobilenet_v2(num_classes=4).eval()
    dg, _ = prune.dependency_graph(m, x[:1])
    assert prune.rectified(dg, m.features[2].conv[0][1])  # ReLU6
    assert not prune.rectified(dg, m.features[2].conv[3])  # linear bottleneck
    label = (y == 1).float()
    sign = torch.tensor([1.0, -1.0])

    class Probe(torch.nn.Module):  # two filters: the label and minus the label
        def forward(self, z):
            return label[: len(z), None, None, None] * sign[None, :, None, None] * torch.ones(1, 2, 2, 2)
    probe = Probe()
    raw, _ = prune.filter_responses(probe, [probe], [(x, y)], 48)
    cut, _ = prune.filter_responses(probe, [probe], [(x, y)], 48, [probe])
    mi = lambda r: prune.mutual_information(r[probe], label.numpy())  # noqa: E731
    assert mi(raw)[1] == pytest.approx(mi(raw)[0]) and mi(raw)[0] > 0.9
    assert mi(cut)[1] == pytest.approx(0)


def test_pruned_teacher_is_exact(tmp_path):
    """Any PyTorch teacher: MTCNN's ONet (its last conv is flattened in (W, H, C) order, so it stays whole);
    saved, reloaded and exported like a pruned student."""
    from common.align import CANON
    from common.teachers import build_teachers

    m = transfer.TeacherBackbone(build_teachers(["onet"])[0]).eval()
    x = torch.randint(0, 256, (6, 3, CANON, CANON), dtype=torch.uint8)
    ref = copy.deepcopy(m).eval()
    before = prune.count_params(m)
    removed = prune.etl_prune(m, x[:1], [(x, torch.tensor([0, 1, 2, 0, 1, 2]))], "classification", 0.5)
    m.eval()
    assert "net.conv4" not in removed and "net.conv1" in removed
    assert prune.count_params(m) < before
    with torch.no_grad():
        a, b = m(x), prune.zero_removed(ref, removed).eval()(x)
    assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)
    import onnxruntime as ort

    model = torch.nn.Sequential(m, torch.nn.Linear(a.shape[1], 3)).eval()
    stats = prune.finish(model, tmp_path, lambda b, dev: x[:b].to(dev), "cpu", {"etl": {"ratio": 0.5}})
    teacher, cfg = prune.load_pruned_teacher(tmp_path / "model.safetensors")
    assert cfg["teacher"] == "onet" and stats["params"] == prune.count_params(model)
    with torch.no_grad():
        assert torch.allclose(teacher.embed(x), a, atol=1e-5)
        want = model(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixels": teacher.preprocess(x).numpy()})[0], want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def etl_run(tmp_path_factory):
    """transfer.py --method etl on the UTKFace fixture, every ratio, from a small student."""
    tmp = tmp_path_factory.mktemp("etl")
    ckpt = write_tiny_student(tmp / "student.safetensors", 32)
    data = make_fixture("Gender-UTK", tmp / "data")
    # what a run killed before its report left in this folder: not this run's model (it used to be kept)
    stale = tmp / "run" / "etl" / "Gender-UTK" / f"r{RATIOS[-1]:g}"
    stale.mkdir(parents=True)
    (stale / "stats.json").write_text(json.dumps({"ratio": RATIOS[-1], "params": 10**9}))
    transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(ckpt), "--method", "etl,finetune",
                   "--prune", ",".join(map(str, RATIOS)), "--cache-dir", str(tmp / "cache"),
                   "--run-dir", str(tmp / "run"), "--epochs", "1", "--device", "cpu",
                   "--align", "none"])  # the fixture's files are face crops already: no detector time
    return tmp, data, json.loads((tmp / "run" / "report.json").read_text())[0]


def test_etl_every_ratio_end_to_end(etl_run):
    tmp, _, r = etl_run
    run = tmp / "run"
    res = r["results"]["etl"]
    assert set(res["search"]) == {"0", *map(str, RATIOS)} and res["chosen"] in res["search"]
    # ratio 0 is plain finetune, same protocol and seed
    assert res["search"]["0"]["value"] == pytest.approx(r["results"]["finetune"]["value"])
    rows = json.loads((run / "etl.json").read_text())["Gender-UTK"]
    rows = sorted(rows, key=lambda r: r["ratio"])
    params = [row["params"] for row in rows]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params)
    assert all(row["mflops"] > 0 and row["cpu_ms_b1"] > 0 and row["cpu_ms_b64"] > 0 for row in rows)
    assert [row["mflops"] for row in rows] == sorted((row["mflops"] for row in rows), reverse=True)
    md = (run / "etl.md").read_text()
    assert "finetune (0)" in md and "0.97" in md and "not measured" in md  # no GPU here
    rule = ("the unpruned validation score is 0, of which no share can be kept: ratio 0 is kept"
            if res["search"]["0"]["val"] == 0 else "the most pruned ratio keeping 99.5% of the unpruned validation score")
    assert f"* chosen: {rule}: {res['chosen']}" in md
    assert (run / "etl.png").stat().st_size > 1000


@pytest.mark.parametrize("ratio", RATIOS)
def test_etl_model_onnx_matches_and_reloads(etl_run, ratio):
    """Each saved pruned model: ONNX == PyTorch within 1e-4; load_student (what `distill.py embed` uses) rebuilds it."""
    import onnxruntime as ort

    tmp, _, _ = etl_run
    folder = tmp / "run" / "etl" / "Gender-UTK" / f"r{ratio:g}"
    student, cfg = load_student(folder / "model.safetensors")
    assert cfg["etl"]["ratio"] == ratio and cfg["pruned"]
    from safetensors.torch import load_file

    hd = head(student.proj.out_features, cfg["etl"]["n_out"], cfg["etl"]["hidden"])
    hd.load_state_dict({k[5:]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("head.")})
    model = torch.nn.Sequential(student, hd).eval()
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["params"] == prune.count_params(model)
    x = torch.randint(0, 256, (3, 3, 32, 32)).float()
    with torch.no_grad():
        want = model(x).numpy()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixels": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_etl_model_serves_distill_embed_and_a_fresh_transfer(etl_run, tmp_path):
    import distill

    tmp, data, _ = etl_run
    ckpt = tmp / "run" / "etl" / "Gender-UTK" / "r0.9" / "model.safetensors"
    out = tmp_path / "emb.npy"
    distill.main(["embed", "--checkpoint", str(ckpt), "--images", str(data), "--out", str(out), "--device", "cpu"])
    emb = np.load(out)
    assert emb.shape[1] == 16 and np.isfinite(emb).all(1).sum() > 0
    transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(ckpt), "--method", "frozen",
                   "--cache-dir", str(tmp / "cache"), "--run-dir", str(tmp_path / "run"), "--head-epochs", "3",
                   "--device", "cpu", "--align", "none"])
    r = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    assert 0 <= r["results"]["frozen"]["value"] <= 1


def test_bad_ratios_and_non_torch_base_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--prune"):
        transfer.main(["--method", "etl", "--prune", "0.5,1.2", "--run-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="--etl-base"):
        transfer.main(["--method", "etl", "--etl-base", "fer", "--run-dir", str(tmp_path / "r")])


def test_a_prune_that_removes_nothing_is_refused():
    """A ratio > 0 that cuts no parameter (no convolution the graph can cut, or layers too narrow for the ratio)
    is an error, not a 'pruned' model that is the unpruned one (facex's port, whose convolutions are bare
    tensors, reported 100 % of its parameters kept at ratio 0.5)."""
    x, y = _faces(8, 8)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    narrow = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # 4 filters keep 4 at 0.1
    for net, ratio in ((linear, 0.5), (narrow, 0.1)):
        before = prune.count_params(net)
        with pytest.raises(RuntimeError, match=f"at ratio {ratio:g} removed no parameter"):
            prune.etl_prune(net, x[:1], [(x, y)], "classification", ratio)
        assert prune.count_params(net) == before


def test_ported_teacher_fails_with_the_message_not_an_index_error():
    """age's ONNX port misleads the dependency graph while scoring: the same clear error as sface's and gender's."""
    from common.align import CANON
    from common.teachers import build_teachers

    m = transfer.TeacherBackbone(build_teachers(["age@torch"])[0]).eval()
    x = torch.randint(0, 256, (4, 3, CANON, CANON), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="ETL cannot prune this TeacherBackbone"):
        prune.etl_prune(m, x[:1], [(x, torch.tensor([0, 1, 0, 1]))], "classification", 0.5)


@pytest.mark.parametrize("base", ["sface", "age", "gender", "facex", "bogus"])
def test_etl_base_is_checked_before_any_work(tmp_path, monkeypatch, base):
    """Teachers ported from ONNX / TFLite (and unknown names) are refused with one line before the task is read,
    where they used to fail (or prune nothing) after the whole extraction."""
    def work(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(transfer, "demo_task", work)
    monkeypatch.setattr(transfer, "task_cache", work)
    why = ("unknown teacher 'bogus'" if base == "bogus"
           else f"{base} is ported to PyTorch from .* per-channel constants outside PyTorch.s standard layers")
    with pytest.raises(SystemExit, match=f"^error: --etl-base: {why}.*student or a PyTorch teacher .*onet, mobilenet_v2"
                       ) as e:
        transfer.main(["--method", "etl", "--etl-base", base, "--run-dir", str(tmp_path / "r")])
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
    assert transfer.etl_base_problem("mobilenet_v2") is None and transfer.etl_base_problem("student") is None


def test_the_pruned_output_layer_is_checked_on_its_kept_channels(monkeypatch):
    """mobilenet_v2's embedding is its last 1x1 convolution, which is pruned too: the check compares the kept
    output channels and still catches a kept filter that computes something else."""
    from common.teachers import build_teachers

    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    batches = [(x, torch.tensor([0, 1, 0, 1]))]
    make = lambda: transfer.TeacherBackbone(build_teachers(["mobilenet_v2"])[0]).eval()  # noqa: E731
    m = make()
    removed = prune.etl_prune(m, x[:2], batches, "classification", 0.5)
    assert m(x[:1]).shape[1] == 640 and len(removed["net.m.features.18.0"]) == 640
    real = prune.prune

    def wrong(model, *a):  # a cut the tracer got wrong: one kept convolution's filters scaled
        out = real(model, *a)
        conv = dict(model.named_modules())["net.m.features.1.conv.0.0"]
        conv.weight.data *= -3
        return out

    monkeypatch.setattr(prune, "prune", wrong)
    with pytest.raises(prune.CannotPrune, match="changed what its kept filters compute"):
        prune.etl_prune(make(), x[:2], batches, "classification", 0.5)


def test_etl_flags_and_a_pruned_students_scratch_twin(etl_run, tmp_path):
    for extra, why in ((["--etl-images", "0"], "--etl-images 0: at least 1 training face"),
                       (["--etl-keep", "99.5"], "--etl-keep 99.5: .*0.995 keeps 99.5%"), (["--etl-keep", "0"], "--etl-keep 0:")):
        with pytest.raises(SystemExit, match=why):
            transfer.main(["--method", "etl", "--run-dir", str(tmp_path / "r"), *extra])
    assert not (tmp_path / "r").exists()
    # scratch on a pruned --student trains that architecture, its smaller layers included
    from common.student import student_like

    tmp, _, _ = etl_run
    pruned, cfg = load_student(tmp / "run" / "etl" / "Gender-UTK" / "r0.9" / "model.safetensors")
    assert prune.count_params(student_like(cfg)) == prune.count_params(pruned)
    # ratio 0 is the base fine-tuned whole: the student's finetune, or a teacher's P-CNN
    rows = [{"ratio": 0.0, "params": 10, "value": 0.8, **dict.fromkeys(("mflops", "file_mb", "cpu_ms_b1", "cpu_ms_b64",
                                                                        "gpu_ms_b1", "gpu_ms_b64"))}]
    headers, table = prune.report_table(rows, "accuracy", True)
    assert table[0][0] == "finetune (0)"
    # the choice reads validation, the value is a test score: both columns, the unmeasured one said so
    assert headers[-3:] == ["accuracy (val)", "accuracy (test)", "test kept"]
    assert table[0][-3:] == ["not measured", "0.8000", "100.0%"]
    assert headers[3] == "backbone params" and table[0][3] == "not measured"  # the head's apart, where measured
    assert prune.report_table([{**rows[0], "backbone_params": 1234}], "accuracy", True)[1][0][3] == "1,234"
    assert prune.report_table([{**rows[0], "val": 0.75}], "accuracy", True)[1][0][-3] == "0.7500"
    assert prune.report_table(rows, "accuracy", True, "mobilenet_v2")[1][0][0] == "pcnn mobilenet_v2 (0)"


def test_the_etl_choice_is_made_on_validation_and_said_for_every_split():
    """The most pruned ratio that keeps --etl-keep of ratio 0's validation score (an error may grow by 1/keep);
    with leave-one-out splits etl.md named the first split's pick only."""
    from common.prune import choose, rule_line

    entries = {0.0: {"val": 0.80}, 0.5: {"val": 0.797}, 0.75: {"val": 0.70}, 0.9: {"val": 0.799}}
    assert choose(entries, True, 0.995)[0] == 0.9
    assert choose(entries, True, 0.9999)[0] == 0.0
    assert choose({0.0: {"val": 2.0}, 0.5: {"val": 2.009}, 0.9: {"val": 2.02}}, False, 0.995)[0] == 0.5
    ratio, rule = choose({0.0: {"val": None}, 0.5: {"val": 0.7}}, True, 0.995)
    assert ratio == 0.5 and "nothing is chosen on test" in rule
    # an unpruned score of 0 is "kept" by every ratio: the most pruned one won, labelled as keeping 99.5 %
    ratio, rule = choose({0.0: {"val": 0.0}, 0.5: {"val": 0.0}, 0.97: {"val": 0.0}}, True, 0.995)
    assert ratio == 0.0 and "no share can be kept" in rule
    keep = choose(entries, True, 0.995)[1]
    assert rule_line([("0.9", keep)]) == f"{keep}: 0.9"
    line = rule_line([("0.9", keep), ("0.5", keep), ("0", keep)])
    assert line.count(keep) == 1 and line.endswith("each split's own validation faces: 0.9, 0.5, 0")
    none = choose({0.0: {"val": None}, 0.5: {"val": 0.7}}, True, 0.995)[1]  # a split without validation faces
    assert rule_line([("0.9", keep), ("0.5", none)]) == f"split 0: {keep}: 0.9; split 1: {none}: 0.5"


def test_a_pruned_ratio_trains_from_ratio_0s_head(tmp_path, monkeypatch):
    """Each ratio above 0 drew a new head after pruning, though the student's width is unchanged: pruned and
    unpruned runs differed in the head's init and the dropout draws after it, not in the pruning alone. With
    pruning made a no-op, a ratio now scores what ratio 0 does."""
    ckpt = write_tiny_student(tmp_path / "student.safetensors", 32)
    data = make_fixture("Gender-UTK", tmp_path / "data")
    monkeypatch.setattr(prune, "etl_prune", lambda *a, **k: None)
    transfer.main(["--task", "Gender-UTK", "--data", str(data), "--student", str(ckpt), "--method", "etl",
                   "--prune", "0.5", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
                   "--epochs", "2", "--device", "cpu", "--align", "none"])
    search = json.loads((tmp_path / "run" / "report.json").read_text())[0]["results"]["etl"]["search"]
    assert search["0.5"]["value"] == pytest.approx(search["0"]["value"], abs=1e-6)
    assert search["0.5"]["val"] == pytest.approx(search["0"]["val"], abs=1e-6)

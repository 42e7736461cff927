"""Task registry: readers on real-layout fixtures, protocols, metrics and the missed-face rule."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common import metrics, tasks
from common.images import BadImage, read_image
from common.tasks import Sample, get_task, load, missed_face_rule
from tests import fixtures as fx

# The 15 knowledge of paper Table 1, plus FER2013.
TABLE1_AND_FER = ["Expr-AffectNet", "Expr-RAF", "Expr-SFEW", "Identity-MS", "Identity-LFW", "Gender-IMDb", "Gender-UTK",
                  "Attrib-CelebA", "AgeR-IMDb", "AgeR-FG", "AgeR-UTK", "AgeC-UTK", "Ethnic-UTK", "Pain-UNBC",
                  "Object-ImageNet", "FER2013"]

# task -> (samples, splits, (train, val, test) sizes of the first split; val None when the protocol has none)
EXPECTED = {
    "Expr-AffectNet": (11, 1, (8, None, 3)),
    "Expr-RAF": (14, 1, (10, None, 4)),
    "Expr-SFEW": (21, 1, (14, None, 7)),
    "Identity-MS": (40, 1, (32, 4, 4)),
    "Identity-LFW": (40, 10, (36, None, 4)),
    "Gender-IMDb": (10, 1, (8, 1, 1)),
    "AgeR-IMDb": (10, 1, (8, 1, 1)),
    "Gender-UTK": (20, 1, (16, 2, 2)),
    "AgeR-UTK": (20, 1, (16, 2, 2)),
    "AgeC-UTK": (20, 1, (16, 2, 2)),
    "Ethnic-UTK": (20, 1, (16, 2, 2)),
    "Attrib-CelebA": (12, 1, (8, 2, 2)),
    "AgeR-FG": (9, 4, (6, None, 3)),
    "Pain-UNBC": (8, 3, (5, None, 3)),
    "Object-TinyImageNet": (13, 1, (9, None, 4)),
    "FER2013": (12, 1, (8, 2, 2)),
    "Align-CelebA": (12, 1, (8, 2, 2)),
    "Align-300W": (14, 1, (9, 1, 4)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every fixture built once; each test reads the folder for its task."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fx.make_fixture(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return get


def _check_splits(data, n):
    for s in data.splits:
        parts = [s.train, s.test] + ([s.val] if s.val is not None else [])
        for p in parts:
            assert p.dtype.kind == "i" and (len(p) == 0 or (p.min() >= 0 and p.max() < n))
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined), f"{s.name}: a sample is in two parts"


# ----------------------------------------------------------------------------- registry

def test_table_lists_every_knowledge():
    table = tasks.list_tasks_table()
    for name in TABLE1_AND_FER:
        assert name in table
    assert set(EXPECTED) == set(tasks.TASKS)
    assert get_task("Object-ImageNet") is get_task("Object-TinyImageNet")
    with pytest.raises(KeyError, match="known"):
        get_task("Nope")


def test_readme_says_where_each_dataset_goes():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for t in tasks.TASKS.values():
        assert f"**{t.name}**" in readme and f"`{t.layout}`" in readme, t.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_on_fixture(name, built):
    task = get_task(name)
    data = task.loader(built(name), task.params)
    n, n_splits, (n_train, n_val, n_test) = EXPECTED[name]
    assert len(data.samples) == n and len(data.splits) == n_splits
    s = data.splits[0]
    assert (len(s.train), len(s.test)) == (n_train, n_test)
    assert (None if s.val is None else len(s.val)) == n_val
    _check_splits(data, n)
    if task.kind == "classification":
        k = tasks.output_size(task, data)
        assert all(isinstance(x.label, int) and 0 <= x.label < k for x in data.samples)
    if task.kind == "regression":
        lo, hi = task.label_range
        assert all(lo <= x.label <= hi for x in data.samples)
    # Every sample points at a readable image (real crop or in-CSV pixels).
    im = read_image(data.samples[-1].path)
    assert im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 48


def test_a_fixture_built_again_in_the_same_folder_is_the_same(tmp_path):
    """`python -m tests.fixtures TASK DIR` run twice (the README's way to try a command) used to stop with
    FileExistsError on the layouts that write one folder of files."""
    for name in ("FER2013", "Object-TinyImageNet", "AgeR-UTK"):
        first = [(s.path, s.label) for s in load(name, fx.make_fixture(name, tmp_path)).samples]
        again = [(s.path, s.label) for s in load(name, fx.make_fixture(name, tmp_path)).samples]
        assert again == first and first


# ----------------------------------------------------------------------------- readers, one by one

def test_utk_real_names_with_a_space_or_no_dot_are_read(tmp_path):
    # Two files of the real release whose labels are whole but whose extension is odd.
    root = fx.make_fixture("AgeR-UTK", tmp_path)
    odd = {"24_0_1_20170116220224657 .jpg.chip.jpg": (24, 0, 1), "55_0_0_20170116232725357jpg.chip.jpg": (55, 0, 0)}
    for k, name in enumerate(odd):
        fx.write_face(root / name, 80 + k)  # root is the UTKFace folder
    for task, field in (("AgeR-UTK", 0), ("Gender-UTK", 1), ("Ethnic-UTK", 2)):
        data = load(task, root)
        labels = {Path(s.path).name: s.label for s in data.samples}
        assert sorted(data.skipped) == sorted(fx.UTK_MALFORMED)
        assert all(labels[name] == want[field] for name, want in odd.items())


def test_utk_labels_and_malformed_names_counted(built):
    root = built("AgeR-UTK")
    ages = load("AgeR-UTK", root)
    assert sorted(ages.skipped) == sorted(fx.UTK_MALFORMED)
    assert sorted(s.label for s in ages.samples) == sorted(float(a) for a, _, _ in fx.UTK_VALID)
    by_path = {s.path: s.label for s in ages.samples}
    for name in ("Gender-UTK", "Ethnic-UTK", "AgeC-UTK"):
        data = load(name, root)
        assert len(data.skipped) == 3
        # One split shared by the four UTK tasks, so their test sets hold the same faces.
        assert [data.samples[i].path for i in data.splits[0].test] == [ages.samples[i].path for i in ages.splits[0].test]
    groups = load("AgeC-UTK", root)
    assert groups.label_names == ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    want = {1: 0, 2: 0, 3: 1, 9: 1, 10: 2, 19: 2, 20: 3, 49: 5, 50: 6, 69: 7, 70: 8, 116: 8}
    for s in groups.samples:
        if int(by_path[s.path]) in want:
            assert s.label == want[int(by_path[s.path])]
    # The split is seeded: another read gives the same indices, another seed does not.
    again = load("AgeR-UTK", root)
    assert np.array_equal(again.splits[0].test, ages.splits[0].test)
    other = load("AgeR-UTK", root, seed=1)
    assert not np.array_equal(other.splits[0].train, ages.splits[0].train)


def test_celeba_official_partition_and_attributes(built):
    data = load("Attrib-CelebA", built("Attrib-CelebA"))
    assert data.label_names == fx.CELEBA_NAMES
    want = (fx.celeba_attributes() > 0).astype(np.float32)
    assert np.array_equal(np.stack([s.label for s in data.samples]), want)
    s = data.splits[0]
    assert list(s.train) == list(range(8)) and list(s.val) == [8, 9] and list(s.test) == [10, 11]


def test_lfw_pairs_and_folds(built):
    data = load("Identity-LFW", built("Identity-LFW"))
    assert len(data.pairs) == 40
    assert [sum(p.fold == f for p in data.pairs) for f in range(10)] == [4] * 10
    assert sum(p.same for p in data.pairs) == 20
    first = data.pairs[:4]
    assert [p.same for p in first] == [True, True, False, False]
    assert data.samples[first[2].a].path.endswith("lfw/Person_00/Person_00_0001.jpg")
    assert data.samples[first[2].b].path.endswith("lfw/Person_01/Person_01_0002.jpg")
    for p in data.pairs:
        assert (data.samples[p.a].group == data.samples[p.b].group) == p.same
    fold3 = data.splits[3]
    assert {data.samples[i].group for i in fold3.test} == {"Person_06", "Person_07"}
    assert len(data.label_names) == 20


def test_lfw_identity_training_never_holds_a_tested_person(built, tmp_path):
    """A pairs file whose folds share a person (View 2's do not): each fold's identity training leaves that
    person's images out, and the reader's counts say how many."""
    assert load("Identity-LFW", built("Identity-LFW")).counts == {}
    root = fx.make_fixture("Identity-LFW", tmp_path)
    pairs = root / "pairs.txt"
    pairs.write_text(pairs.read_text().replace("Person_02\t1\t2\n", "Person_00\t3\t4\n", 1))  # fold 2 <- fold 1's
    data = load("Identity-LFW", root)
    for s in data.splits:
        assert not {data.samples[i].group for i in s.train} & {data.samples[i].group for i in s.test}
    # Person_00's 4 images: 3 and 4 left out of fold 1's training, 1 and 2 of fold 2's
    assert data.counts == {"training_images_of_a_tested_person_left_out": 4}


def test_raf_aligned_names_and_labels(built):
    data = load("Expr-RAF", built("Expr-RAF"))
    assert data.samples[0].path.endswith("basic/Image/aligned/train_00001_aligned.jpg")
    assert [s.label for s in data.samples] == [y - 1 for _, y in fx.RAF_LABELS]
    assert data.label_names[3] == "Happiness"
    original = load("Expr-RAF", built("Expr-RAF"), aligned=False)
    assert original.samples[0].path.endswith("basic/Image/original/train_00001.jpg")


def test_sfew_train_val_folders(built):
    data = load("Expr-SFEW", built("Expr-SFEW"))
    assert data.label_names == fx.SFEW_CLASSES
    test_labels = sorted(data.samples[i].label for i in data.splits[0].test)
    assert test_labels == list(range(7))
    assert all("/Val/" in data.samples[i].path for i in data.splits[0].test)


def test_affectnet_drops_8_to_10_and_keeps_boxes(built):
    data = load("Expr-AffectNet", built("Expr-AffectNet"))
    assert data.counts["dropped_expression_8_10"] == 3
    assert all(s.label <= 7 for s in data.samples)
    first = data.samples[0]
    assert first.path.endswith("Manually_Annotated_Images/689/a1.jpg") and first.box == (0.0, 0.0, 50.0, 50.0)
    # Row 4 of training.csv (k=4) follows a dropped row: its box is x=4, y=8, 54x54.
    assert data.samples[3].box == (4.0, 8.0, 58.0, 62.0)
    assert [data.samples[i].label for i in data.splits[0].test] == [1, 6, 0]


def test_affectnet_validation_csv_without_header_as_distributed(tmp_path):
    root = fx.make_affectnet(tmp_path)
    want = [(s.path, s.label, s.box) for s in load("Expr-AffectNet", root).samples]
    val = root / "validation.csv"
    val.write_text("".join(val.read_text().splitlines(keepends=True)[1:]))  # the real file's first line is a row
    data = load("Expr-AffectNet", root)
    assert [(s.path, s.label, s.box) for s in data.samples] == want
    assert [data.samples[i].label for i in data.splits[0].test] == [1, 6, 0]


def test_fer2013_rows_are_images(built):
    data = load("FER2013", built("FER2013"))
    assert [s.label for s in data.samples] == [y for y, _ in fx.FER_ROWS]
    assert list(data.splits[0].test) == [10, 11] and list(data.splits[0].val) == [8, 9]
    im = read_image(data.samples[11].path)
    assert im.shape == (48, 48, 3)
    assert all(np.array_equal(im[..., c], fx.fer_pixels(11)) for c in range(3))


def test_fgnet_leave_one_person_out(built):
    data = load("AgeR-FG", built("AgeR-FG"))
    assert data.skipped == ["001A02 copy.JPG"]
    assert [s.label for s in data.samples] == [2.0, 10.0, 20.0, 5.0, 7.0, 7.0, 30.0, 40.0, 44.0]
    assert [s.name for s in data.splits] == ["leave out 001", "leave out 002", "leave out 003", "leave out 004"]
    for s in data.splits:
        held = {data.samples[i].group for i in s.test}
        assert len(held) == 1 and held.isdisjoint(data.samples[i].group for i in s.train)
        assert len(s.train) + len(s.test) == 9


def test_fgnet_lopo_mae_by_hand(built):
    """A 'model' that predicts the mean training age of each fold, scored as the protocol says."""
    data = load("AgeR-FG", built("AgeR-FG"))
    y = np.array([s.label for s in data.samples])
    preds = [np.full(len(s.test), y[s.train].mean()) for s in data.splits]
    got = metrics.pooled(metrics.mae, [s.test for s in data.splits], preds, y)
    # Ages 001: 2 10 20 | 002: 5 7 7 | 003: 30 | 004: 40 44 (total 165 over 9 photos).
    m1, m2, m3, m4 = 133 / 6, 146 / 6, 135 / 8, 81 / 7
    want = (abs(2 - m1) + abs(10 - m1) + abs(20 - m1) + abs(5 - m2) + 2 * abs(7 - m2) + abs(30 - m3)
            + abs(40 - m4) + abs(44 - m4)) / 9
    assert got == pytest.approx(want)


def test_pooled_mae_differs_from_mean_of_people():
    targets = np.array([10, 20, 30, 40, 50, 60])
    folds = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    preds = [np.array([12, 18]), np.array([35]), np.array([40, 41, 70])]
    assert metrics.pooled(metrics.mae, folds, preds, targets) == pytest.approx(28 / 6)
    with pytest.raises(ValueError):
        metrics.pooled(metrics.mae, [np.array([0]), np.array([0])], [np.array([1]), np.array([1])], targets)


def test_unbc_leave_one_subject_out(built):
    data = load("Pain-UNBC", built("Pain-UNBC"))
    assert [s.label for s in data.samples] == [0.0, 2.0, 4.0, 0.0, 1.0, 3.0, 0.0, 6.0]
    assert data.skipped == ["047-jl047/jl047t1aiaff/jl047t1aiaff002.png"]
    assert [s.name for s in data.splits] == ["leave out 042-ll042", "leave out 043-jh043", "leave out 047-jl047"]
    assert [len(s.test) for s in data.splits] == [3, 4, 1]


def test_imdb_filter_and_ages(built):
    root = built("AgeR-IMDb")
    data = load("AgeR-IMDb", root)
    assert data.counts == {"rows": 15, "filtered_out": 5}
    assert sorted(s.label for s in data.samples) == sorted([30, 10, 44, 45, 0, 100, 36, 27, 20, 55])
    assert data.samples[0].path.endswith("imdb_crop/00/nm0000000_rm0_1980-5-10_2010.jpg")
    genders = load("Gender-IMDb", root)
    assert [s.label for s in genders.samples] == [int(r[2]) for r in fx.IMDB_ROWS if r[5]]
    strict = load("AgeR-IMDb", root, min_face_score=1.0)  # drops the 0.5-score face
    assert len(strict.samples) == 9


def test_imdb_file_listed_twice_is_one_sample(tmp_path):
    """A file named by two rows would be one face in two parts of the random split: the first row is kept."""
    data = load("AgeR-IMDb", fx.make_imdb(tmp_path, duplicate=True))
    assert data.counts == {"rows": 15, "filtered_out": 5, "duplicate_paths": 1}
    assert len(data.samples) == len({s.path for s in data.samples}) == 9 and data.samples[0].label == 30


def test_wiki_mat_is_read_too(tmp_path):
    root = fx.make_imdb(tmp_path, struct="wiki")
    assert len(load("AgeR-IMDb", root).samples) == 10


def test_tiny_imagenet_val_annotations(built):
    data = load("Object-ImageNet", built("Object-TinyImageNet"))
    assert data.label_names == fx.TINY_WNIDS
    assert [data.samples[i].label for i in data.splits[0].test] == [c for _, c in fx.TINY_VAL]


def test_ms_split_inside_each_identity(built):
    data = load("Identity-MS", built("Identity-MS"))
    s = data.splits[0]
    for part in (s.train, s.val, s.test):
        assert sorted(data.samples[i].label for i in part) == sorted(
            [c for c in range(4) for _ in range(len(part) // 4)])
    assert tasks.output_size(get_task("Identity-MS"), data) == 4


# ----------------------------------------------------------------------------- user-added tasks and errors

def test_user_folder_tree_task(tmp_path):
    root = fx.make_folder_tree(tmp_path)
    task = tasks.register_task(tasks.folder_task("Mask-Mine", knowledge="Mask Classification"))
    try:
        data = load("Mask-Mine", root)
        assert data.label_names == ["mask", "no_mask", "scarf"] and len(data.samples) == 15
        assert sorted(s.label for s in data.samples) == [0] * 5 + [1] * 5 + [2] * 5
        _check_splits(data, 15)
        assert tasks.output_size(task, data) == 3 and "Mask-Mine" in tasks.list_tasks_table()
        # A folder named like an image is a sample (the reader then lists it with its reason), not a silent gap.
        (root / "scarf" / "odd.jpg").mkdir()
        (root / "scarf" / ".hidden.jpg").write_bytes(b"")
        data = load("Mask-Mine", root)
        odd = [s for s in data.samples if s.path.endswith("odd.jpg")]
        assert len(data.samples) == 16 and len(odd) == 1 and odd[0].label == 2
        with pytest.raises(BadImage, match="folder|directory"):
            read_image(odd[0].path)
    finally:
        del tasks.TASKS["Mask-Mine"]


def test_user_csv_tasks(tmp_path):
    root = fx.make_csv_table(tmp_path / "a")
    reg = tasks.csv_task("Score-Mine", kind="regression", label_range=(0, 100))
    data = reg.loader(root)
    assert [s.label for s in data.samples] == [21.0, 33.5, 45.0, 18.0, 60.0, 27.0, 39.0, 52.0, 30.0, 24.0]
    assert data.samples[2].path.endswith("my_csv/imgs/2.jpg") and reg.metric == "mae"
    _check_splits(data, 10)

    root = fx.make_csv_table(tmp_path / "b", values=("7", "1", "3", "1", "7", "3"), split=True)
    cls = tasks.csv_task("Digit-Mine")
    data = cls.loader(root / "labels.csv")  # the CSV itself may be given
    assert data.label_names == ["1", "3", "7"] and [s.label for s in data.samples] == [2, 0, 1, 0, 2, 1]
    s = data.splits[0]
    assert list(s.train) == [0, 3] and list(s.val) == [1, 4] and list(s.test) == [2, 5]
    with pytest.raises(ValueError):
        tasks.csv_task("Bad", kind="multilabel")
    # Any header whose first column names no image file is a header, not a sample with a class of its own.
    fx.replace_line(root / "labels.csv", 1, "filepath,emotion,subset")
    again = cls.loader(root / "labels.csv")
    assert again.label_names == ["1", "3", "7"] and [s.path for s in again.samples] == [s.path for s in data.samples]
    fx.replace_line(root / "labels.csv", 1, None)  # no header at all: the first row is a sample
    assert len(cls.loader(root / "labels.csv").samples) == 6


def test_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load("AgeR-UTK", tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and get_task("AgeR-UTK").layout in str(e.value)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="afile is not a folder. Expected layout"):
        load("AgeR-UTK", tmp_path / "afile")
    (tmp_path / "celeba").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        get_task("Attrib-CelebA").loader(tmp_path)
    msg = str(e.value)
    assert "img_align_celeba" in msg and "Expected layout" in msg
    (tmp_path / "lfw").mkdir()
    with pytest.raises(FileNotFoundError, match="pairs.txt"):
        load("Identity-LFW", tmp_path)


def test_fer2013_bad_rows_cost_only_themselves(tmp_path):
    """A short, a non-numeric and a cut-off pixel row, and a non-numeric emotion: each costs its own row,
    named with its line; the CSV is parsed once for all rows."""
    from common import images

    csv_path = fx.make_fer2013(tmp_path) / "fer2013" / "fer2013.csv"
    row = lambda k, pixels, usage="Training": f"{fx.FER_ROWS[k][0]},{pixels},{usage}"  # noqa: E731
    fx.replace_line(csv_path, 4, row(2, " ".join(["5"] * 100)))  # row 2: 100 values, not 2304
    fx.replace_line(csv_path, 7, row(5, "12 x 7"))  # row 5
    fx.replace_line(csv_path, 8, "sad," + " ".join(map(str, fx.fer_pixels(6).ravel())) + ",Training")  # row 6
    fx.replace_line(csv_path, 13, row(11, "1 2 3", usage="PrivateTest"))  # row 11: its pixels cut short
    fx.replace_line(csv_path, 14, "3,9 9 9")  # row 12, cut off while written: no Usage, no final newline
    data = load("FER2013", tmp_path)
    assert [s.path.rsplit("#", 1)[1] for s in data.samples] == [f"row{k}" for k in range(12) if k != 6]
    assert len(data.skipped) == 2 and "line 8: emotion 'sad'" in data.skipped[0] and "line 14" in data.skipped[1]
    images._csv_pixels.cache_clear()
    for s in data.samples:
        k = int(s.path.rsplit("row", 1)[1])
        if k in (2, 5, 11):
            with pytest.raises(BadImage, match=f"#row{k}: line {k + 2}: "):
                read_image(s.path)
        else:
            assert np.array_equal(read_image(s.path)[..., 0], fx.fer_pixels(k))
    assert images._csv_pixels.cache_info().misses == 1
    # A file that cannot be read at all is not re-read for each of its rows either.
    (tmp_path / "no_pixels.csv").write_text("emotion,Usage\n0,Training\n")
    for _ in range(3):
        with pytest.raises(BadImage, match="no_pixels.csv"):
            read_image(f"{tmp_path}/no_pixels.csv#row0")
    assert images._csv_pixels.cache_info().misses == 2
    # ...until it changes: a CSV rewritten in the same process (a notebook's) gives its new pixels
    import os

    fx.replace_line(csv_path, 2, row(0, " ".join(["200"] * 2304)))
    os.utime(csv_path, ns=(0, os.stat(csv_path).st_mtime_ns + 10**9))  # (a coarse clock: a second later)
    assert (read_image(f"{csv_path}#row0") == 200).all()


def test_user_csv_split_column_all_or_nothing(tmp_path):
    def table(name, line, text):
        root = fx.make_csv_table(tmp_path / name, values=("7", "1", "3", "1", "7", "3"), split=True)
        fx.replace_line(root / "labels.csv", line, text)
        return root

    cls = tasks.csv_task("Digit-Mine")
    with pytest.raises(tasks.BadLabels, match=r"split column .* train, val, test on line 4\b"):
        cls.loader(table("no_split", 4, "imgs/2.jpg,3"))
    with pytest.raises(tasks.BadLabels, match=r"train, val, test on line 6\b"):
        cls.loader(table("bad_split", 6, "imgs/4.jpg,7,tst"))
    with pytest.raises(tasks.BadLabels, match=r"imgs/0.jpg is listed on lines 2, 5\b"):
        cls.loader(table("twice", 5, "./imgs//0.jpg,1,test"))
    with pytest.raises(tasks.BadLabels, match=r"no label on line 3\b"):
        cls.loader(table("no_label", 3, "imgs/1.jpg"))
    with pytest.raises(tasks.BadLabels, match=r"classes \['1', '3'\] on lines 2, 6\b"):  # the two 7s
        tasks.csv_task("Two-Mine", classes=["1", "3"]).loader(table("unknown_class", 7, "imgs/5.jpg,3,test"))
    reg = tasks.csv_task("Score-Mine", kind="regression", label_range=(0, 10))
    for k, value in enumerate(("nan", "inf", "11", "ten")):
        with pytest.raises(tasks.BadLabels, match=r"line 3: label .* from 0 to 10"):
            reg.loader(table(f"reg{k}", 3, f"imgs/1.jpg,{value},val"))


@pytest.mark.parametrize("name, make", [("AgeR-UTK", None), ("AgeR-UTK", fx.make_raf), ("AgeR-FG", None),
                                        ("Pain-UNBC", None)])
def test_no_images_found_names_folder_and_layout(tmp_path, name, make):
    """An empty folder, or another dataset's, stops at reading with its folder and layout, not much later
    at an empty concatenation."""
    if make:
        make(tmp_path)
    if name == "Pain-UNBC":
        (tmp_path / "Images").mkdir()
        (tmp_path / "Frame_Labels" / "PSPI").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no images found in {tmp_path}") as e:
        load(name, tmp_path)
    assert get_task(name).layout in str(e.value)


def test_bad_label_files_name_file_and_line(tmp_path):
    def fails(name, make, rel, line, text, match):
        root = make(tmp_path / f"{name}{line}{hash(text)}")
        fx.replace_line(root / rel, line, text)
        with pytest.raises(tasks.BadLabels, match=match):
            load(name, root)

    raf = "basic/EmoLabel/list_patition_label.txt"
    for text in ("train_00003.jpg 3 extra", "train_00003.jpg", "train_00003.jpg three", "train_00003.jpg 0",
                 "train_00003.jpg 8", "train_00003.jpg -1"):
        fails("Expr-RAF", fx.make_raf, raf, 3, text, r"list_patition_label.txt line 3: .*(1-7|1 to 7)")
    fails("Attrib-CelebA", fx.make_celeba, "list_eval_partition.txt", 12, None,
          r"list_eval_partition.txt: no line for 1 of the images .*000012.jpg")
    fails("Attrib-CelebA", fx.make_celeba, "list_eval_partition.txt", 2, "000002.jpg x", r"partition.txt line 2:")
    fails("Attrib-CelebA", fx.make_celeba, "list_attr_celeba.txt", 5, "000003.jpg 1 -1", r"celeba.txt line 5: 2 values")
    fails("Align-CelebA", fx.make_celeba, "list_landmarks_align_celeba.txt", 4, "000002.jpg 1 2 3",
          r"list_landmarks_align_celeba.txt line 4: expected")
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,Expression,valence,arousal"
    fails("Expr-AffectNet", fx.make_affectnet, "training.csv", 1, header, r"training.csv: no column expression")
    fails("Expr-AffectNet", fx.make_affectnet, "validation.csv", 3, "700/v2.jpg,1,2,50,50,,happy,0,0",
          r"validation.csv line 3: expression 'happy' is not a whole number from 0 to 10")
    fails("Expr-AffectNet", fx.make_affectnet, "training.csv", 2, "689/a1.jpg,0,0,wide,50,,1,0,0",
          r"training.csv line 2: the face box")
    fails("FER2013", fx.make_fer2013, "fer2013/fer2013.csv", 1, "label,pixels,Usage", r"fer2013.csv line 1: expected")
    pspi = "Frame_Labels/PSPI/043-jh043/jh043t1aaaff/jh043t1aaaff002_facs.txt"
    for text in ("", "   nan", "  -1.0", "   1.7000000e+01", "two"):
        fails("Pain-UNBC", fx.make_unbc, pspi, 1, text,
              r"jh043t1aaaff002_facs.txt line 1: expected a PSPI score from 0 to 16")
    fails("Expr-RAF", fx.make_raf, raf, 3, "val_00003.jpg 3", r"label.txt line 3: .*'val_00003.jpg' .* train_ or test_")
    fails("Align-CelebA", fx.make_celeba, "list_landmarks_align_celeba.txt", 2, "x1 y1",
          r"list_landmarks_align_celeba.txt line 2: expected the columns")
    # both eyes at one place: NME divides by their distance (the image's line is found by its name)
    fails("Align-CelebA", fx.make_celeba, "list_landmarks_align_celeba.txt", 4, "000002.jpg 30 40 30 40 50 60 40 70 60 70",
          r"Align-CelebA: .*000002.jpg: its points 1 and 2 \(the eyes.*\[30.0, 40.0\]")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 1, "10\tx", r"pairs.txt line 1: expected the header")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 3, "Person_01\t1\ttwo", r"pairs.txt line 3: expected `name i j`")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 4, "Person_00\t1\tPerson_01", r"pairs.txt line 4: expected `name1")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 5, None, r"pairs.txt: header says 10 folds x 2 x 2 pairs, found 39")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 1, "40", r"pairs.txt line 1: .*single count is View 1")
    fails("Identity-LFW", fx.make_lfw, "pairs.txt", 1, "1\t20", r"pairs.txt: the header gives 1 fold\(s\); .* at least 2")


def _bad_labels(name, root) -> str:
    """The message of the BadLabels that loading `name` from root raises; it always ends with the layout."""
    with pytest.raises(tasks.BadLabels) as e:
        load(name, root)
    assert get_task(name).layout in str(e.value)
    return str(e.value)


def test_tiny_imagenet_unknown_class_ids_name_file_and_lines(tmp_path):
    def tiny(case, rel, line, text):
        return fx.replace_line(fx.make_tinyimagenet(tmp_path / case) / rel, line, text).parents[1 if "val" in rel else 0]

    ann = "val/val_annotations.txt"
    msg = _bad_labels("Object-TinyImageNet", tiny("one", ann, 3, "val_2.JPEG\tn99999999\t0\t0\t63\t63"))
    assert "val_annotations.txt: class id not in wnids.txt on line 3: 'n99999999'" in msg and "unknown ids" not in msg
    root = tiny("two", ann, 2, "val_1.JPEG\tn2")
    fx.replace_line(root / ann, 4, "val_3.JPEG\tn1")
    fx.replace_line(root / ann, 5, "val_4.JPEG\tn1")  # past the end: appended, a 5th line
    msg = _bad_labels("Object-TinyImageNet", root)
    assert "on lines 2, 4, 5: 'n1', 'n2' (2 unknown ids)" in msg and str(root / ann) in msg
    msg = _bad_labels("Object-TinyImageNet", tiny("short", ann, 1, "val_0.JPEG"))
    assert "val_annotations.txt line 1: expected `<image> <class id> [box]`" in msg
    msg = _bad_labels("Object-TinyImageNet", tiny("twice", "wnids.txt", 3, fx.TINY_WNIDS[0]))
    assert f"wnids.txt line 3: class id '{fx.TINY_WNIDS[0]}' is listed a second time" in msg


def _celeba_attrs(root, recode):
    """The fixture's list_attr_celeba.txt with each image row (line 3 on) passed through recode(line_no, row)."""
    path = root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("".join((recode(n, line) if n > 2 else line) + "\n" for n, line in enumerate(lines, 1)))
    return root


def test_celeba_attributes_coded_0_1_read_as_absent_present(tmp_path):
    root = _celeba_attrs(fx.make_celeba(tmp_path), lambda n, line: line.replace("-1", " 0"))
    assert " 0 " in (root / "list_attr_celeba.txt").read_text() and "-1" not in (root / "list_attr_celeba.txt").read_text()
    data = load("Attrib-CelebA", root)
    want = (fx.celeba_attributes() > 0).astype(np.float32)
    assert np.array_equal(np.stack([s.label for s in data.samples]), want)


@pytest.mark.parametrize("case, recode, match", [
    # one row re-coded 0/1 in an otherwise -1/1 file: ambiguous, so refused, naming both lines
    ("mixed", lambda n, line: line.replace("-1", " 0") if n == 5 else line,
     r"list_attr_celeba.txt line 5: mixes -1 \(first on line 3\) and 0 \(first on line 5\); expected -1/1"),
    ("two", lambda n, line: line[:-2] + " 2" if n == 4 else line,
     r"list_attr_celeba.txt line 4: attribute value '2' is not -1 or 1"),
    ("yes", lambda n, line: line[:-2] + "yes" if n == 6 else line, r"line 6: attribute value 'yes' is not -1 or 1"),
    ("short", lambda n, line: " ".join(line.split()[:-2]) if n == 7 else line, r"line 7: 38 values for 40 attributes"),
])
def test_celeba_bad_attribute_values_name_file_and_line(tmp_path, case, recode, match):
    import re

    msg = _bad_labels("Attrib-CelebA", _celeba_attrs(fx.make_celeba(tmp_path), recode))
    assert re.search(match, msg) and str(tmp_path / "celeba" / "list_attr_celeba.txt") in msg


def test_celeba_attribute_header_checked(tmp_path):
    root = fx.make_celeba(tmp_path)
    fx.replace_line(root / "list_attr_celeba.txt", 2, " ".join(fx.CELEBA_NAMES[:-1]))
    assert "list_attr_celeba.txt line 2: 39 attribute names, expected the 40" in _bad_labels("Attrib-CelebA", root)
    (root / "list_attr_celeba.txt").write_text("12\n")
    assert "list_attr_celeba.txt: expected a count line, then the column names" in _bad_labels("Attrib-CelebA", root)


def test_pts_and_300w_errors_name_file_and_line(tmp_path):
    pts = tmp_path / "a.pts"
    for line, text, match in ((5, "1.0 abc", r"a.pts line 5: expected `x y`"), (6, "nan 2", r"a.pts line 6: expected"),
                              (2, "n_points: sixty", r"a.pts line 2: n_points 'sixty'"),
                              (70, None, r"a.pts line 2: n_points says 68, found 67 points")):
        fx.write_pts(pts, fx.shape_68())
        fx.replace_line(pts, line, text)
        with pytest.raises(tasks.BadLabels, match=match):
            tasks.read_pts(pts)
    pts.write_text("68 points\n")
    with pytest.raises(tasks.BadLabels, match="a.pts: not an iBUG .pts file"):
        tasks.read_pts(pts)
    root = fx.make_300w(tmp_path / "w")
    fx.write_pts(root / "ibug" / "image_0013.pts", fx.shape_68()[:67])
    assert "image_0013.pts: 67 points, but" in _bad_labels("Align-300W", root)


def test_imdb_mat_of_another_shape_names_file(tmp_path):
    from scipy.io import savemat

    root = fx.make_imdb(tmp_path)
    mat = root / "imdb.mat"
    savemat(mat, {"wiki": {"full_path": np.array(["a.jpg"], dtype=object)}})
    msg = _bad_labels("AgeR-IMDb", root)
    assert f"{mat}: expected a struct 'imdb'" in msg and "the variables ['wiki']" in msg
    savemat(mat, {"imdb": {"full_path": np.array(["a.jpg"], dtype=object)}})
    assert "found the fields ['full_path']" in _bad_labels("AgeR-IMDb", root)
    mat.write_text("not a mat file at all")
    assert f"{mat}: not a MATLAB .mat file" in _bad_labels("AgeR-IMDb", root)


def test_folder_class_not_listed_is_bad_labels(tmp_path):
    root = fx.make_folder_tree(tmp_path)
    with pytest.raises(tasks.BadLabels, match=r"scarf: class 'scarf' is not one of \['mask', 'no_mask'\]"):
        tasks.folder_task("Two-Mine", classes=["mask", "no_mask"]).loader(root)


def _rewrite(path: Path, transform) -> None:
    path.write_bytes(transform(path.read_bytes()))


BOM = b"\xef\xbb\xbf"


def test_label_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors and Excel's "CSV UTF-8" put a BOM first: read as part of the first name or column, it
    broke every reader with a riddle (CelebA: "no line for 000001.jpg", RAF: "does not start with train_")."""
    cases = {"Attrib-CelebA": ["list_attr_celeba.txt", "list_eval_partition.txt"],
             "Align-CelebA": ["list_landmarks_align_celeba.txt"],
             "Expr-RAF": ["basic/EmoLabel/list_patition_label.txt"], "Identity-LFW": ["pairs.txt"],
             "Expr-AffectNet": ["training.csv", "validation.csv"], "FER2013": ["fer2013/fer2013.csv"],
             "Object-TinyImageNet": ["wnids.txt", "val/val_annotations.txt"], "Align-300W": ["afw/0_0.pts"]}
    for name, files in cases.items():
        root = fx.make_fixture(name, tmp_path / name)
        want = load(name, root)
        for f in files:
            _rewrite(root / f, lambda b: BOM + b)
        got = load(name, root)
        assert [(s.path, np.asarray(s.label).tolist()) for s in got.samples] == \
            [(s.path, np.asarray(s.label).tolist()) for s in want.samples], name
    mine = fx.make_csv_table(tmp_path / "mine")  # a user's CSV without a header: its first file
    _rewrite(mine / "labels.csv", lambda b: BOM + b.split(b"\n", 1)[1])
    first = load(tasks.csv_task("Mine", kind="regression"), mine).samples[0].path
    assert first == str(mine / "imgs" / "0.jpg")
    # another encoding: the file named and what to do, not a UnicodeDecodeError
    _rewrite(mine / "labels.csv", lambda b: b.replace(b"imgs/0.jpg", "imgs/caf\u00e9.jpg".encode("cp1252")))
    with pytest.raises(tasks.BadLabels, match=r"labels.csv: not UTF-8 text \(byte 0xe9\): save it as UTF-8"):
        load(tasks.csv_task("Mine", kind="regression"), mine)
    _rewrite(mine / "labels.csv", lambda b: b"file,label\n" + b"x" * 200_000 + b",3\n")  # past csv's field limit
    with pytest.raises(tasks.BadLabels, match=r"labels.csv line 2: not read as CSV \(field larger than field limit"):
        load(tasks.csv_task("Mine", kind="regression"), mine)
    raf = fx.make_fixture("Expr-RAF", tmp_path / "raf2")
    _rewrite(raf / "basic/EmoLabel/list_patition_label.txt", lambda b: b + "test_\u00e9.jpg 1\n".encode("latin-1"))
    with pytest.raises(tasks.BadLabels, match=r"list_patition_label.txt \(at byte \d+\): not UTF-8 text"):
        load("Expr-RAF", raf)


def test_an_image_listed_twice_is_refused_naming_its_lines(tmp_path):
    """Read twice, a face weighs double or sits on both sides of a split with two labels (CelebA's partition
    took the last line: a training face moved to the test set)."""
    raf = fx.make_fixture("Expr-RAF", tmp_path / "raf")
    fx.replace_line(raf / "basic/EmoLabel/list_patition_label.txt", 99, "train_00001.jpg 3")
    with pytest.raises(tasks.BadLabels, match=r"list_patition_label.txt: train_00001.jpg is listed on lines 1, 15"):
        load("Expr-RAF", raf)
    fx.replace_line(raf / "basic/EmoLabel/list_patition_label.txt", 99, "train_00001.jpg 4")
    with pytest.raises(tasks.BadLabels, match=r"train_00001.jpg is listed on lines 1, 15, 16\b"):
        load("Expr-RAF", raf)
    celeba = fx.make_fixture("Attrib-CelebA", tmp_path / "celeba")
    fx.replace_line(celeba / "list_eval_partition.txt", 99, "000001.jpg 2")
    with pytest.raises(tasks.BadLabels, match=r"list_eval_partition.txt: 000001.jpg is listed on lines 1, 13"):
        load("Attrib-CelebA", celeba)
    celeba = fx.make_fixture("Attrib-CelebA", tmp_path / "celeba2")
    attrs = celeba / "list_attr_celeba.txt"
    fx.replace_line(attrs, 99, attrs.read_text().splitlines()[2])
    with pytest.raises(tasks.BadLabels, match=r"list_attr_celeba.txt: 000001.jpg is listed on lines 3, 15"):
        load("Attrib-CelebA", celeba)
    tiny = fx.make_fixture("Object-TinyImageNet", tmp_path / "tiny")
    fx.replace_line(tiny / "val/val_annotations.txt", 99, f"val_0.JPEG\t{fx.TINY_WNIDS[0]}\t0\t0\t63\t63")
    with pytest.raises(tasks.BadLabels, match=r"val_annotations.txt: val_0.JPEG is listed on lines 1, 5"):
        load("Object-TinyImageNet", tiny)
    affect = fx.make_fixture("Expr-AffectNet", tmp_path / "affect")
    row = (affect / "training.csv").read_text().splitlines()[1]
    fx.replace_line(affect / "validation.csv", 99, row)
    with pytest.raises(tasks.BadLabels, match=r"689/a1.jpg is listed on lines training.csv 2, validation.csv 6"):
        load("Expr-AffectNet", affect)


def test_a_split_without_test_or_training_images_is_refused_when_read(tmp_path):
    """Identity-MS keeps 10 % of each identity for test: 5 images each round it to none, and the run ended
    after all its work in "accuracy of an empty set"."""
    ms = fx.make_fixture("Identity-MS", tmp_path / "ms")
    for f in ms.glob("*/[5-9].jpg"):
        f.unlink()
    with pytest.raises(tasks.BadLabels, match=r"Identity-MS: split 'per-class 80/10/10 seed 0' of .* has 20 training "
                                              r"and 0 test images; its protocol needs both \(identity classification"):
        load("Identity-MS", ms)
    raf = fx.make_fixture("Expr-RAF", tmp_path / "raf")
    labels = raf / "basic/EmoLabel/list_patition_label.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if line.startswith("train_")))
    with pytest.raises(tasks.BadLabels, match=r"has 10 training and 0 test images"):
        load("Expr-RAF", raf)
    raf = fx.make_fixture("Expr-RAF", tmp_path / "raf_test_only")
    labels = raf / "basic/EmoLabel/list_patition_label.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if line.startswith("test_")))
    with pytest.raises(tasks.BadLabels, match=r"has 0 training and \d+ test images"):
        load("Expr-RAF", raf)


def test_copies_that_nest_the_image_folder_in_its_own_name_are_read(tmp_path):
    """Kaggle's CelebA and LFW unpack to img_align_celeba/img_align_celeba/ and lfw-deepfunneled/lfw-deepfunneled/:
    every listed image was missing, and the run stopped after the extraction blaming the detector."""
    import shutil

    celeba = fx.make_fixture("Attrib-CelebA", tmp_path / "celeba")
    shutil.move(celeba / "img_align_celeba", tmp_path / "inner")
    shutil.move(tmp_path / "inner", celeba / "img_align_celeba" / "img_align_celeba")
    assert all(Path(s.path).exists() for s in load("Attrib-CelebA", celeba).samples)
    assert all(Path(s.path).exists() for s in load("Align-CelebA", celeba).samples)
    lfw = fx.make_fixture("Identity-LFW", tmp_path / "lfw")
    shutil.move(lfw / "lfw", tmp_path / "inner")
    shutil.move(tmp_path / "inner", lfw / "lfw-deepfunneled" / "lfw-deepfunneled")
    assert all(Path(s.path).exists() for s in load("Identity-LFW", lfw).samples)
    # images that are elsewhere altogether: said when read, naming one and the layout
    shutil.move(lfw / "lfw-deepfunneled", tmp_path / "away")
    (lfw / "lfw").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Identity-LFW: the images its lists name are not there \(40 looked "
                                                r"for, none found, e.g. .*lfw/Person_00/Person_00_0001.jpg\)"):
        load("Identity-LFW", lfw)


def test_the_usual_places_of_the_label_files_and_odd_names_are_read(tmp_path):
    """AffectNet's lists in Manually_Annotated_file_lists/, IMDB-WIKI given as the folder holding imdb_crop/,
    300-W's upper-case extensions; UTK ages past the release's 116 and hidden or macOS folders are no data."""
    import shutil

    affect = fx.make_fixture("Expr-AffectNet", tmp_path / "affect")
    n = len(load("Expr-AffectNet", affect).samples)
    (affect / "Manually_Annotated_file_lists").mkdir()
    for f in ("training.csv", "validation.csv"):
        shutil.move(affect / f, affect / "Manually_Annotated_file_lists" / f)
    assert len(load("Expr-AffectNet", affect).samples) == n
    imdb = fx.make_fixture("AgeR-IMDb", tmp_path / "imdb")
    assert len(load("AgeR-IMDb", imdb.parent).samples) == len(load("AgeR-IMDb", imdb).samples) == 10
    w = fx.make_fixture("Align-300W", tmp_path / "300w")
    n = len(load("Align-300W", w).samples)
    png = sorted(w.rglob("*.png"))[0]
    png.rename(png.with_suffix(".PNG"))
    assert len(load("Align-300W", w).samples) == n
    utk = fx.make_fixture("AgeR-UTK", tmp_path / "utk")
    fx.write_face(utk / "117_0_0_20170116191000002.jpg.chip.jpg", 3)
    fx.write_face(utk / "999_0_0_20170116191000009.jpg.chip.jpg", 4)
    got = load("AgeR-UTK", utk)
    assert max(s.label for s in got.samples) <= 116 and "999_0_0_20170116191000009.jpg.chip.jpg" in got.skipped
    junk = w / "__MACOSX" / "afw"  # a macOS zip's metadata beside 300-W's files: no annotation
    junk.mkdir(parents=True)
    (junk / "._0_0.pts").write_bytes(b"\x00\x05\x16\x07 not text")
    fx.write_face(junk / "._0_0.jpg", 1)
    assert len(load("Align-300W", w).samples) == n
    ms = fx.make_fixture("Identity-MS", tmp_path / "ms")
    fx.write_face(ms / ".ipynb_checkpoints" / "0.jpg", 1)
    fx.write_face(ms / "__MACOSX" / "m.0aaa1" / "0.jpg", 1)
    assert load("Identity-MS", ms).label_names == fx.MS_IDS


# ----------------------------------------------------------------------------- metrics and the missed-face rule

def test_basic_metrics():
    assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert metrics.accuracy(np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 0]) == 0.5
    assert metrics.mae([1.0, 5.0], [2.0, 2.0]) == 2.0
    # Attribute 1 wrong on 1 of 2 faces, attribute 2 on 2 of 2: (0.5 + 1.0) / 2.
    assert metrics.mean_error_rate([[0.9, 0.2], [0.1, 0.7]], [[1, 1], [1, 0]]) == 0.75
    assert metrics.mean_error_rate([[2.0, -1.0]], [[1, 0]], threshold=0.0) == 0.0


def test_verification_10fold_by_hand():
    """Folds of 4 pairs: same pairs score 0.9 and different ones 0.1, except a different pair at
    0.95 in fold 0 and a same pair at 0.3 in fold 1.
    Fold 0 held out: the others are separable at t=0.2 -> the 0.95 pair is wrong: 3/4.
    Fold 1 held out: the 0.95 pair makes t=0.5 best (1 error) -> the 0.3 pair is wrong: 3/4.
    Folds 2-9: t=0.2 (1 training error, against 2 at t=0.6) -> 4/4.
    Mean (0.75 + 0.75 + 8) / 10 = 0.95; std sqrt((2 * 0.2^2 + 8 * 0.05^2) / 10) = 0.1."""
    scores, same, folds = [], [], []
    for f in range(10):
        s = [0.9, 0.9, 0.1, 0.1]
        if f == 0:
            s[3] = 0.95
        if f == 1:
            s[1] = 0.3
        scores += s
        same += [True, True, False, False]
        folds += [f] * 4
    accs = metrics.verification_per_fold(scores, same, folds)[0]
    assert accs.mean() == pytest.approx(0.95) and accs.std() == pytest.approx(0.1)
    # LFW's S_E: sqrt((2 * 0.2^2 + 8 * 0.05^2) / 9) / sqrt(10) = 1/30
    assert metrics.standard_error(accs) == pytest.approx(1 / 30) and metrics.standard_error(accs[:1]) is None
    # and the std report.json gives beside it is that same sigma (it was numpy's ddof=0 one: 0.1, not 0.105)
    assert metrics.fold_std(accs) == pytest.approx(np.sqrt(10) / 30) and metrics.fold_std(accs[:1]) is None
    # On all 40 pairs: t=0.2 errs once (the 0.95 pair), t=0.6 twice.
    assert metrics.best_threshold(scores, same) == pytest.approx(0.2)


def test_verification_missed_pairs_count_wrong():
    scores = np.tile([0.9, 0.1], 10)
    same = np.tile([True, False], 10)
    folds = np.repeat(np.arange(10), 2)
    missed = np.zeros(20, bool)
    missed[0] = True
    scores = missed_face_rule(get_task("Identity-LFW"), scores, missed)
    assert metrics.verification_per_fold(scores, same, folds)[0].mean() == pytest.approx(0.95)


def test_missed_face_rule():
    missed = np.array([False, True, False])
    cls = missed_face_rule(get_task("Gender-UTK"), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), missed)
    assert list(cls) == [0, -1, 1]
    assert metrics.accuracy(cls, [0, 0, 1]) == pytest.approx(2 / 3)  # right guess, but the face was missed
    reg = missed_face_rule(get_task("AgeR-UTK"), [10.0, 10.0, 10.0], missed)
    assert list(reg) == [10.0, 58.0, 10.0]
    assert list(missed_face_rule(get_task("Pain-UNBC"), [1.0, 1.0, 1.0], missed)) == [1.0, 8.0, 1.0]
    attrs = missed_face_rule(get_task("Attrib-CelebA"), np.zeros((3, 2)), missed)
    assert metrics.mean_error_rate(attrs, np.zeros((3, 2))) == pytest.approx(1 / 3)
    own = tasks.csv_task("Free-Range", kind="regression")
    with pytest.raises(ValueError, match="label_range"):
        missed_face_rule(own, [1.0, 2.0, 3.0], missed)
    assert list(missed_face_rule(own, [1.0, 2.0, 3.0], missed, label_range=(0, 10))) == [1.0, 5.0, 3.0]


def test_leave_one_group_out_splits():
    out = tasks.leave_one_group_out_splits([Sample(f"{k}.jpg", 0, g) for k, g in enumerate("babc")])
    assert [s.name for s in out] == ["leave out a", "leave out b", "leave out c"]
    assert [list(s.test) for s in out] == [[1], [0, 2], [3]]
    assert [list(s.train) for s in out] == [[0, 2, 3], [1, 3], [0, 1, 2]]


def test_read_image_real_path(built):
    data = load("Expr-SFEW", built("Expr-SFEW"))
    im = read_image(data.samples[0].path)
    assert im.shape == (fx.SIZE, fx.SIZE, 3)
    assert not math.isnan(float(im.mean()))


def test_sample_defaults():
    s = Sample("x.jpg", 3)
    assert s.group is None and s.box is None


# ----------------------------------------------------------------------------- scale and honest selection

def _per_class_split_reference(labels, seed, fractions):
    """The former one-pass-per-class implementation, kept to check the O(n log n) one against."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = int(round(fractions[1] * len(idx))), int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


@pytest.mark.parametrize("labels", [np.random.default_rng(1).integers(0, 50, 3000),
                                    np.array(["b", "a", "c", "a", "b", "b", "a", "c", "c", "a"] * 7)])
def test_per_class_split_same_as_before(labels):
    s = tasks.per_class_split(labels, seed=3, fractions=(0.7, 0.15, 0.15))
    ref = _per_class_split_reference(labels, 3, (0.7, 0.15, 0.15))
    assert np.array_equal(s.train, ref["train"]) and np.array_equal(s.val, ref["val"])
    assert np.array_equal(s.test, ref["test"])


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 8, n) / 4.0  # many ties
        scores[rng.random(n) < 0.1] = np.nan
        same = rng.random(n) < 0.5
        ok = ~np.isnan(scores)
        u = np.unique(scores[ok])
        if not len(u):
            continue
        cands = np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]])
        acc = [np.mean((scores[ok] > t) == same[ok]) for t in cands]
        assert metrics.best_threshold(scores, same) == cands[int(np.argmax(acc))]


def test_candidates_are_chosen_on_the_threshold_folds():
    # Fold 0 alone separates perfectly at 0.5; the others need 0.3. The fit score must not see fold 0's test.
    scores = np.array([0.9, 0.1, 0.4, 0.2, 0.35, 0.25])
    same = np.array([True, False, True, False, True, False])
    folds = np.array([0, 0, 1, 1, 2, 2])
    accs, fits = metrics.verification_per_fold(scores, same, folds)
    assert accs.mean() == pytest.approx(1.0) and fits.mean() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    scores, same, folds = rng.random(200), rng.random(200) < 0.5, np.repeat(np.arange(10), 20)
    fits = []
    for f in range(10):
        t = metrics.best_threshold(scores[folds != f], same[folds != f])
        fits.append(np.mean((scores[folds != f] > t) == same[folds != f]))
    accs, fit = metrics.verification_per_fold(scores, same, folds)
    assert fit.mean() == pytest.approx(np.mean(fits)) and fit.mean() > accs.mean()  # thresholds fit noise: the fit score is optimistic
    with pytest.raises(ValueError, match="at least 2 folds"):  # one fold: no pair left to choose its threshold on
        metrics.verification_per_fold(scores, same, np.zeros(200))


def test_validation_carved_from_training_only():
    split = tasks.Split("fold", np.arange(0, 80), np.arange(80, 100))
    a, how = tasks.with_validation(split, 0, seed=0, frac=0.1)
    assert "carved from training" in how and len(a.val) == 8
    assert set(a.val).isdisjoint(a.train) and set(a.val) | set(a.train) == set(range(80))
    assert np.array_equal(a.test, split.test)
    b, _ = tasks.with_validation(split, 1, seed=0, frac=0.1)
    assert not np.array_equal(a.val, b.val)  # each fold its own
    assert np.array_equal(tasks.with_validation(split, 0, seed=0, frac=0.1)[0].val, a.val)  # seeded
    # Leave-one-person-out: whole persons are held out.
    groups = np.repeat([f"p{i}" for i in range(10)], 10)
    loso = tasks.Split("leave out p9", np.arange(90), np.arange(90, 100))
    c, how = tasks.with_validation(loso, 9, groups, seed=0, frac=0.2)
    assert "2 of 9 training persons" in how
    assert set(groups[c.val]).isdisjoint(groups[c.train]) and len(set(groups[c.val])) == 2
    # A protocol's own validation split is kept.
    own = tasks.Split("official", np.arange(5), np.arange(5, 8), np.arange(8, 10))
    assert tasks.with_validation(own, 0)[0] is own


def test_layout_variants_found_on_disk(tmp_path):
    """What no command-line flag sets is read from the folder: CelebA's in-the-wild images and points, and
    LFW's common re-releases (deep-funnelled) in place of lfw/."""
    from pathlib import Path

    celeba = fx.make_fixture("Align-CelebA", tmp_path / "a")
    want = load("Align-CelebA", celeba)
    (celeba / "img_align_celeba").rename(celeba / "img_celeba")
    (celeba / "list_landmarks_align_celeba.txt").rename(celeba / "list_landmarks_celeba.txt")
    got = load("Align-CelebA", celeba)
    assert [Path(s.path).name for s in got.samples] == [Path(s.path).name for s in want.samples]
    assert all("img_celeba" in s.path for s in got.samples)
    lfw = fx.make_fixture("Identity-LFW", tmp_path / "l")
    n = len(load("Identity-LFW", lfw).samples)
    (lfw / "lfw").rename(lfw / "lfw-deepfunneled")
    got = load("Identity-LFW", lfw)
    assert len(got.samples) == n and all("lfw-deepfunneled" in s.path for s in got.samples)


def test_a_nan_score_never_beats_a_number_and_any_number_beats_it():
    nan = float("nan")
    for metric in ("accuracy", "mae"):
        assert metrics.better(metric, 0.5, nan) and not metrics.better(metric, nan, 0.5)
        assert not metrics.better(metric, nan, nan)
    assert metrics.better("mae", 1.0, 2.0) and metrics.better("accuracy", 2.0, 1.0)


def test_every_metric_refuses_an_empty_set_instead_of_a_quiet_nan():
    for name in ("accuracy", "mae", "error_rate", "nme"):
        empty = np.zeros((0, 5, 2)) if name == "nme" else np.zeros((0, 3)) if name == "error_rate" else np.zeros(0)
        with pytest.raises(ValueError, match="empty set"):
            metrics.METRICS[name](empty, empty)


def test_metric_directions_68_point_nme_and_pooled_folds():
    """(From a mutation audit: the NME direction, the 68-point normalisation and the fold order were untested.)"""
    for name, lower in [("accuracy", False), ("mae", True), ("error_rate", True), ("nme", True)]:
        assert metrics.better(name, 0.1, 0.2) is lower
    t = np.random.default_rng(0).uniform(0, 100, (1, 68, 2))
    t[0, 36], t[0, 45], t[0, 39], t[0, 42] = (0, 0), (40, 0), (12, 0), (28, 0)  # outer corners 40 apart
    assert metrics.nme(t + [2.0, 0], t) == pytest.approx(0.05)
    assert metrics.pooled(metrics.mae, [np.array([2]), np.array([0, 1])],
                          [np.array([30.0]), np.array([10.0, 20])], np.array([10.0, 20, 30])) == 0


def test_a_mistyped_task_name_is_answered_with_the_close_one():
    for typo in ("ager-utk", "AgeR-UTKK"):
        with pytest.raises(KeyError, match=r"unknown task .* \(did you mean AgeR-UTK\?\); known: "):
            get_task(typo)


def test_the_300w_challenge_test_faces_are_never_trained_on(tmp_path):
    """Unpacked beside afw/ and the trainsets, 300W/01_Indoor and 02_Outdoor (the challenge's own 600 test faces)
    went to training: a model scored on that benchmark afterwards had seen it."""
    import shutil

    root = fx.make_fixture("Align-300W", tmp_path / "w")
    for sub, name in (("01_Indoor", "indoor_001"), ("02_Outdoor", "outdoor_001")):
        (root / "300W" / sub).mkdir(parents=True)
        for ext in (".jpg", ".pts"):
            shutil.copy(root / "afw" / f"0_0{ext}", root / "300W" / sub / f"{name}{ext}")
    data = load("Align-300W", root)
    assert not any("_Indoor" in s.path or "_Outdoor" in s.path for s in data.samples)
    assert len(data.samples) == 14 and sum(data.counts.values()) == 2
    # a tree of the challenge's faces alone is split at random, as any tree without the official folders
    alone = tmp_path / "alone" / "01_Indoor"
    alone.mkdir(parents=True)
    for k in range(10):
        for ext in (".jpg", ".pts"):
            shutil.copy(root / "afw" / f"0_0{ext}", alone / f"indoor_{k:03d}{ext}")
    data = load("Align-300W", alone.parent)
    assert len(data.samples) == 10 and not data.counts and len(data.splits[0].test)


def test_a_network_answering_nan_is_counted_wrong_not_as_class_0():
    """argmax of a NaN row is 0: a diverged classifier got every class-0 face right (accuracy 0.75 on
    [0, 0, 0, 1]), and (NaN > 0) is False, so NaN attribute logits read as 'absent'."""
    from types import SimpleNamespace

    import torch

    import transfer
    from common import multitask

    nan = np.full((4, 3), np.nan)
    assert metrics.accuracy(nan, [0, 0, 0, 1]) == 0.0
    assert list(transfer.decode(SimpleNamespace(kind="classification"), nan, None)) == [-1] * 4
    attrs = transfer.decode(SimpleNamespace(kind="multilabel"), np.array([[np.nan, 2.0, -1.0]]), None)
    assert np.isnan(attrs[0, 0]) and list(attrs[0, 1:]) == [1.0, 0.0]
    # the joint model's own decoding (its outputs are probabilities)
    assert list(multitask.decode(SimpleNamespace(kind="classification"), torch.tensor(nan), None, None)) == [-1] * 4
    attrs = multitask.decode(SimpleNamespace(kind="multilabel"), torch.tensor([[np.nan, 0.9, 0.2]]), None, None)
    assert np.isnan(attrs[0, 0]) and list(attrs[0, 1:]) == [1.0, 0.0]
    assert metrics.accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), [1, 0]) == 1.0  # finite rows as ever

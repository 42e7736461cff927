"""Task registry: every target/source knowledge of the paper (Table 1) plus FER2013.

Each Task names its on-disk reader, its evaluation protocol and its metric. Readers parse the datasets
as they are distributed (each task's layout: `transfer.py --list`, and the README) and only list files
and labels: the extraction engine opens the images later (common.images.read_image). torchvision's
CelebA, LFWPairs/LFWPeople and FER2013 readers are not used because, even with download=False, they
refuse any copy whose files do not match their md5 sums (and LFW wants torchvision's own `lfw-py/`
archive layout), so they reject re-packed copies, fixtures and corrected label files alike.

Adding a dataset takes one entry: register_task(folder_task(...)) for `root/<class>/*.jpg`, or
register_task(csv_task(...)) for a `file,label[,split]` CSV.
"""
from __future__ import annotations

import csv
import difflib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import metrics
from .images import IMAGE_EXTENSIONS, csv_row_path


@dataclass
class Sample:
    path: str
    label: object
    group: str | None = None  # subject / person id, for leave-one-out protocols
    box: tuple | None = None  # face box given by the dataset, (x0, y0, x1, y1) in pixels


@dataclass
class Pair:
    a: int  # indices into TaskData.samples
    b: int
    same: bool
    fold: int


def pair_arrays(data) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, same, fold) of a verification task's pairs, as arrays."""
    pairs = data.pairs
    return (np.array([p.a for p in pairs]), np.array([p.b for p in pairs]), np.array([p.same for p in pairs]),
            np.array([p.fold for p in pairs]))


@dataclass
class Split:
    name: str
    train: np.ndarray  # indices into TaskData.samples
    test: np.ndarray
    val: np.ndarray | None = None


@dataclass
class TaskData:
    samples: list[Sample]
    splits: list[Split]
    pairs: list[Pair] | None = None
    label_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # files that could not be parsed, reported to the user
    counts: dict = field(default_factory=dict)  # protocol filters applied, e.g. {"dropped_expression_8_10": 3}


@dataclass(frozen=True)
class Task:
    name: str
    knowledge: str
    kind: str  # "classification" | "regression" | "multilabel" | "verification" | "landmarks"
    num_outputs: int  # 0: not fixed by the task (classes found in the data, or an embedding for verification)
    label_range: tuple | None  # (min, max) of a regression target, for the missed-face rule
    metric: str  # "accuracy" | "mae" | "error_rate" | "nme" | "verification_accuracy"
    protocol: str
    layout: str
    loader: Callable[[Path, dict], TaskData] = field(hash=False)
    params: dict = field(default_factory=dict, hash=False)  # a dict cannot be hashed; tasks still can
    # How its images become crops unless --align says otherwise: "mtcnn" (detect and align a face) or "none"
    # (the whole image: objects, or crops too small for the detector)
    align: str = "mtcnn"

    def __post_init__(self):
        # Whoever calls task.loader directly still gets the expected layout in a missing-file error.
        object.__setattr__(self, "loader", _with_layout_errors(self, getattr(self.loader, "raw", self.loader)))


class BadLabels(ValueError):
    """A label, list or annotation file that is not what its layout says; the message names the file, the
    line and what was expected. A ValueError, so that callers which catch those still do."""


def _eyes_apart(task: Task, data) -> None:
    """NME divides by the distance between two points of each label: a label with them at one place (an
    annotation error, or points not annotated written as 0 0) would weigh a billion times the others."""
    for s in data.samples:
        pts = np.asarray(s.label, np.float64).reshape(-1, 2)
        if len(pts) in metrics.OCULAR:
            a, b = metrics.OCULAR[len(pts)]
            if not np.linalg.norm(pts[a] - pts[b]) > 0:
                raise BadLabels(f"{task.name}: {s.path}: its points {a + 1} and {b + 1} (the eyes, which normalise "
                                f"the error) are at one place, {pts[a].tolist()}: fix or remove this label")


def _with_layout_errors(task: Task, raw):
    def loader(root=None, params=None) -> TaskData:
        params = {**task.params, **(params or {})}
        root = root if root is not None else params.get("root")
        if root is None:
            raise ValueError(f"{task.name}: no data folder given. Expected layout: {task.layout}")
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{task.name}: data folder {root} does not exist. Expected layout: {task.layout}")
        try:
            data = raw(root, params)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{task.name}: {e}. Expected layout: {task.layout}") from e
        except NotADirectoryError as e:  # a file given where the layout has a folder
            raise NotADirectoryError(f"{task.name}: {e.filename or root} is not a folder. Expected layout: "
                                     f"{task.layout}") from e
        except BadLabels as e:
            raise BadLabels(f"{task.name}: {e}. Expected layout: {task.layout}") from e
        if not data.samples:
            # An empty folder, or another dataset's: stop here, not at the first empty concatenation far later.
            skipped = f" ({len(data.skipped)} files skipped, e.g. {data.skipped[:3]})" if data.skipped else ""
            raise FileNotFoundError(f"{task.name}: no images found in {root}{skipped}. Expected layout: {task.layout}")
        # Images a list names but which are all elsewhere (one folder deeper, another copy): each would be
        # listed as a missed face after the whole extraction, and the run would stop blaming the detector.
        # Some evenly spaced ones are looked for: a stat each, not 4 M.
        probe = [data.samples[i].path for i in np.linspace(0, len(data.samples) - 1, 64).astype(int)]
        if not any(os.path.lexists(f) or csv_row_path(f) for f in probe):
            raise FileNotFoundError(f"{task.name}: the images its lists name are not there ({len(set(probe))} looked "
                                    f"for, none found, e.g. {probe[0]}). Expected layout: {task.layout}")
        for sp in data.splits:  # an empty side stopped the run after all the work, in the metric
            if not len(sp.test) or (task.kind != "verification" and not len(sp.train)):
                raise BadLabels(f"{task.name}: split {sp.name!r} of {root} has {len(sp.train)} training and "
                                f"{len(sp.test)} test images; its protocol needs both ({task.protocol})")
        if task.metric == "nme":
            _eyes_apart(task, data)
        return data

    loader.raw = raw
    return loader


# ----------------------------------------------------------------------------- shared helpers

def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"missing {path}")
    return path


def _not_utf8(path: Path, e: UnicodeDecodeError, where: str = "") -> BadLabels:
    return BadLabels(f"{path}{where}: not UTF-8 text (byte {e.object[e.start]:#04x}): save it as UTF-8")


def _text(path: Path) -> str:
    """A label file's text: UTF-8, with or without the byte-order mark that Windows editors and Excel's "CSV
    UTF-8" put first (read as part of the first name or column, it broke every reader with a riddle)."""
    try:
        return _need(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e, f" (at byte {e.start})") from None


def _csv_rows(path: Path):
    """(line number, row) of a CSV file read as _text reads, streamed (FER2013's is 290 MB)."""
    with open(_need(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e, f" after line {reader.line_num}" if reader.line_num else "") from None
        except csv.Error as e:  # a field past the csv module's limit, a NUL byte: not a CSV of this layout
            raise BadLabels(f"{path} line {reader.line_num}: not read as CSV ({e})") from None


def _note(lines_of: dict, name: str, line: int) -> None:
    """lines_of[name]: the line that first lists name, a list of lines once another does. An int per name, not
    a list each: AffectNet's 420,000 rows paid 300 bytes a row in lists, 1.9x the reader's peak memory."""
    first = lines_of.get(name)
    if first is None:
        lines_of[name] = line
    elif isinstance(first, list):
        first.append(line)
    else:
        lines_of[name] = [first, line]


def _listed_once(path: Path, lines_of: dict, line_name=str) -> None:
    """lines_of: _note's, of the lines of path. A name listed twice would weigh double, or sit on both sides of
    a split with two labels: refused, naming the lines (line_name writes one)."""
    if twice := {f: ns for f, ns in lines_of.items() if isinstance(ns, list)}:
        raise BadLabels(f"{path}: " + "; ".join(f"{f} is listed on {_lines([line_name(n) for n in ns])}"
                                                 for f, ns in list(twice.items())[:5])
                        + f" ({len(twice)} listed more than once; each once)")


def _sub(root: Path, name: str) -> Path:
    """Users may point at a dataset's folder or at the folder that holds it."""
    return root / name if (root / name).is_dir() else root


def _doubled(images: Path) -> Path:
    """An image folder that holds one of its own name (Kaggle's copies of CelebA and LFW unpack so): the inner
    one, else every listed image was missing and the run stopped late, blaming the detector."""
    return _sub(images, images.name)


# Named like an image is enough (no stat per file on 6.5M-image trees): a folder or a dangling link named
# x.jpg becomes a sample whose read fails, so it is listed with its reason instead of vanishing.
def _image_files(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it
                      if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _not_data(name: str) -> bool:
    """Hidden folders (.ipynb_checkpoints, .git) and a zip's macOS metadata (__MACOSX, ._x.jpg) are no class,
    person, subject or annotation."""
    return name.startswith(".") or name == "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and not _not_data(e.name))


def _label(text: str, lo: int, hi: int, where: str, what: str = "label") -> int:
    """text as a whole-number label in lo..hi; else BadLabels naming `where` (file and line)."""
    try:
        y = int(text)
    except ValueError:
        y = None
    if y is None or not lo <= y <= hi:
        raise BadLabels(f"{where}: {what} {text.strip()!r} is not a whole number from {lo} to {hi}")
    return y


def _partition(path: Path) -> dict:
    """CelebA's list_eval_partition.txt: `<image> <0 train | 1 val | 2 test>` per line."""
    part, lines_of = {}, {}
    for n, line in enumerate(_text(path).splitlines(), 1):
        fields = line.split()
        if fields:
            if len(fields) != 2:
                raise BadLabels(f"{path} line {n}: expected `<image> <0|1|2>`, got {line!r}")
            part[fields[0]] = _label(fields[1], 0, 2, f"{path} line {n}", "partition")
            _note(lines_of, fields[0], n)
    _listed_once(path, lines_of)
    return part


def _in_partition(part: dict, files, path: Path, listed_in: str) -> np.ndarray:
    missing = [f for f in files if f not in part]
    if missing:
        raise BadLabels(f"{path}: no line for {len(missing)} of the images in {listed_in} (e.g. {missing[:3]})")
    return np.array([part[f] for f in files])


def _idx(mask) -> np.ndarray:
    return np.flatnonzero(np.asarray(mask))


FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test of a task without an official split


def random_split(n: int, seed: int = 0, fractions=FRACTIONS) -> Split:
    """Seeded random train/val/test split of n samples; fractions are (train, val, test)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    val = np.sort(perm[n_train:n_train + n_val]) if fractions[1] > 0 else None
    name = f"random {'/'.join(str(round(100 * f)) for f in fractions)} seed {seed}"
    return Split(name, np.sort(perm[:n_train]), np.sort(perm[n_train + n_val:]), val)


def per_class_split(labels, seed: int = 0, fractions=FRACTIONS) -> Split:
    """Seeded split inside each class, so every identity is seen in training (closed-set identification)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    # One stable sort groups each class's indices in ascending order (what labels == c gave, class by
    # class): O(n log n) instead of one pass over all labels per class (5 M x 100 k for MS-Celeb).
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]]) if len(labels) else []
    for a, b in zip(starts, [*starts[1:], len(labels)]):
        idx = rng.permutation(order[a:b])
        n_val, n_test = int(round(fractions[1] * len(idx))), int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    cat = {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    return Split(f"per-class {'/'.join(str(round(100 * f)) for f in fractions)} seed {seed}",
                 cat["train"], cat["test"], cat["val"])


def with_validation(split: Split, index: int, groups=None, seed: int = 0, frac: float = 0.1) -> tuple[Split, str]:
    """The split, with a validation part for every choice a method makes (epochs, teacher, subset).

    A protocol's own validation split is used as it is. Where the protocol has none, one is carved
    from the split's training part, never from its test part: seeded by (seed, index), so each fold
    of a cross-validation gets its own; with `groups` (leave-one-person-out protocols) whole persons
    are held out, so that validation faces are of people the model did not train on, as the test's are.
    Returns the split and a sentence saying how its validation part was made.
    """
    if split.val is not None and len(split.val):
        return split, "the protocol's validation split"
    rng = np.random.default_rng([seed, index])
    train = np.asarray(split.train)
    if groups is not None:
        g = np.asarray(groups, dtype=object)[train].astype(str)
        people = np.unique(g)
        if len(people) >= 2:
            held = rng.choice(people, max(1, int(round(frac * len(people)))), replace=False)
            mask = np.isin(g, held)
            return (Split(split.name, train[~mask], split.test, train[mask]),
                    f"carved from training: {len(held)} of {len(people)} training persons held out "
                    f"({round(100 * frac)}% of them, at least one; seed {seed}, per split)")
    n = max(1, int(round(frac * len(train))))
    perm = rng.permutation(len(train))
    return (Split(split.name, np.sort(train[perm[n:]]), split.test, np.sort(train[perm[:n]])),
            f"carved from training: {round(100 * frac)}% of its images held out (at least one; seed {seed}, per "
            f"split)")


def label_range_seen(task, data, y) -> tuple[float, float]:
    """A regression task without a fixed range (a user's CSV) takes it from the labels of the faces no split tests:
    the range scales the targets, clips the predictions and gives missed faces its midpoint, so test labels may
    not set it."""
    seen = np.ones(len(y), bool)
    for sp in data.splits:
        seen[sp.test] = False
    if not seen.any():
        raise SystemExit(f"error: {task.name}: every face is tested by some split, so no label is left to set the "
                         f"range of the regression: give the task a label_range")
    return float(y[seen].min()), float(y[seen].max())


def leave_one_group_out_splits(samples: list[Sample]) -> list[Split]:
    """One split per distinct group (person, subject), in sorted group order, testing that group alone."""
    groups = np.asarray([s.group for s in samples])
    idx = np.arange(len(groups))
    return [Split(f"leave out {g}", idx[groups != g], idx[groups == g]) for g in np.unique(groups)]


def _seeded(n: int, p: dict) -> list[Split]:
    return [random_split(n, p.get("seed", 0), tuple(p.get("fractions", FRACTIONS)))]


# ----------------------------------------------------------------------------- readers

UTK_RACES = ["White", "Black", "Asian", "Indian", "Others"]
# UTKFace/[age]_[gender]_[race]_[date&time].jpg[.chip.jpg]; a few real files lack a field.
_UTK_NAME = re.compile(r"(\d{1,3})_([01])_([0-4])_\d")
UTK_MAX_AGE = 116  # the release's oldest; AgeR-UTK's range


def _age_group_names(bins) -> list[str]:
    return [f"{lo}-{hi - 1}" for lo, hi in zip(bins[:-1], bins[1:])] + [f"{bins[-1]}+"]


def _utk(root: Path, p: dict) -> TaskData:
    folder = _need(_sub(root, "UTKFace"))
    rows, skipped = [], []
    for f in _image_files(folder):
        # from the name's start, not up to its first dot: real names such as `24_0_1_2017… .jpg…`, `…357jpg…`
        m = _UTK_NAME.match(f.name)
        if m and int(m[1]) <= UTK_MAX_AGE:  # (999_0_0_... is a typo, not a face of 999 years)
            rows.append((str(f), int(m[1]), int(m[2]), int(m[3])))
        else:
            skipped.append(f.name)
    target = p["target"]
    if target == "age":
        samples, names = [Sample(f, float(a)) for f, a, _, _ in rows], None
    elif target == "age_group":
        bins = p["age_bins"]
        samples = [Sample(f, int(np.searchsorted(bins, a, side="right") - 1)) for f, a, _, _ in rows]
        names = _age_group_names(bins)
    elif target == "gender":
        samples, names = [Sample(f, g) for f, _, g, _ in rows], ["male", "female"]
    else:
        samples, names = [Sample(f, r) for f, _, _, r in rows], UTK_RACES
    return TaskData(samples, _seeded(len(samples), p), label_names=names, skipped=skipped)


CELEBA_ATTRS = 40


def _celeba_lines(path: Path) -> tuple[list[str], list[str]]:
    """The lines of a CelebA list file (a count line, the column names, one row per image) and its columns."""
    lines = _text(path).splitlines()
    if len(lines) < 2:
        raise BadLabels(f"{path}: expected a count line, then the column names, then one line per image; "
                        f"found {len(lines)} line(s)")
    return lines, lines[1].split()


def _celeba(root: Path, p: dict) -> TaskData:
    """40 attributes per face from list_attr_celeba.txt, coded -1 (absent) / 1 (present) as distributed.

    A file whose values are all 0/1 (a common re-export) is read as 0 absent, 1 present; a file that mixes
    -1 and 0, or holds any other value, is BadLabels naming its file and line.
    """
    root = _sub(root, "celeba")
    images = _doubled(_need(root / "img_align_celeba"))
    path = root / "list_attr_celeba.txt"
    lines, names = _celeba_lines(path)
    if len(names) != CELEBA_ATTRS:  # the head is CELEBA_ATTRS wide: other widths would fail far later, in the loss
        raise BadLabels(f"{path} line 2: {len(names)} attribute names, expected the {CELEBA_ATTRS} of CelebA")
    files, labels, first, lines_of = [], [], {}, {}  # first: line where -1 and where 0 are first seen
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        _note(lines_of, parts[0], n)
        if len(parts) != len(names) + 1:
            raise BadLabels(f"{path} line {n}: {len(parts) - 1} values for {len(names)} "
                            f"attributes in {line!r}")
        values = set(parts[1:])
        if bad := values - {"-1", "0", "1"}:
            raise BadLabels(f"{path} line {n}: attribute value {sorted(bad)[0]!r} is not -1 or 1 "
                            "(or 0 or 1, in a file coded 0/1 throughout)")
        for v in values & {"-1", "0"}:
            first.setdefault(v, n)
        files.append(parts[0])
        labels.append(np.array([v == "1" for v in parts[1:]], np.float32))
    # 0/1 is safe to accept: 1 means present in both codings and 0 has no meaning in -1/1; only a mix is ambiguous.
    if len(first) == 2:
        raise BadLabels(f"{path} line {max(first.values())}: mixes -1 (first on line {first['-1']}) and 0 (first on "
                        f"line {first['0']}); expected -1/1 (the official coding) or 0/1 throughout")
    _listed_once(path, lines_of)
    partition = root / "list_eval_partition.txt"
    which = _in_partition(_partition(partition), files, partition, "list_attr_celeba.txt")
    samples = [Sample(str(images / f), y) for f, y in zip(files, labels)]
    split = Split("official partition", _idx(which == 0), _idx(which == 2), _idx(which == 1))
    return TaskData(samples, [split], label_names=names)


LFW_IMAGES = ("lfw", "lfw-deepfunneled", "lfw_funneled", "lfw-funneled")


def _lfw(root: Path, p: dict) -> TaskData:
    # lfw/ (the original), else one of the common re-releases of the same tree (nothing else sets it on the
    # command line)
    images = _need(root / (p.get("images") or next((d for d in LFW_IMAGES if (root / d).is_dir()), "lfw")))
    images = _doubled(images)
    path = root / "pairs.txt"
    rows = [(n, line.split()) for n, line in enumerate(_text(path).splitlines(), 1) if line.strip()]
    head = rows[0][1] if rows else []
    if not (len(head) == 2 and all(h.isdigit() for h in head)) or not int(head[-1]):
        raise BadLabels(f"{path} line {rows[0][0] if rows else 1}: expected the header `<folds> <pairs per fold>` "
                        f"(View 2's pairs.txt: `10 300`), got {' '.join(head)!r}" +
                        (" (a single count is View 1's pairsDevTrain.txt / pairsDevTest.txt, which this 10-fold "
                         "protocol does not read)" if len(head) == 1 else ""))
    rows = rows[1:]
    n_folds, n = int(head[0]), int(head[1])
    if n_folds < 2:  # each fold's threshold is chosen on the other folds: one fold leaves nothing to choose it on
        raise BadLabels(f"{path}: the header gives {n_folds} fold(s); the protocol needs at "
                        f"least 2 (a fold's threshold is chosen on the others)")
    if len(rows) != 2 * n_folds * n:
        raise BadLabels(f"{path}: header says {n_folds} folds x 2 x {n} pairs, found {len(rows)} pair lines")
    samples, index, names = [], {}, {}

    def sample(name, no):
        key = (name, int(no))
        if key not in index:
            index[key] = len(samples)
            samples.append(Sample(str(images / name / f"{name}_{int(no):04d}.jpg"), names.setdefault(name, len(names)), group=name))
        return index[key]

    pairs = []
    for k, (line, r) in enumerate(rows):
        fold, same = k // (2 * n), k % (2 * n) < n
        if len(r) != (3 if same else 4) or not all(r[i].isdigit() for i in ((1, 2) if same else (1, 3))):
            raise BadLabels(f"{path} line {line}: expected {'`name i j`' if same else '`name1 i name2 j`'} "
                            f"(pair {k % (2 * n) + 1} of fold {fold + 1}), got {' '.join(r)!r}")
        a, b = (sample(r[0], r[1]), sample(r[0], r[2])) if same else (sample(r[0], r[1]), sample(r[2], r[3]))
        pairs.append(Pair(a, b, same, fold))
    # Relabel identities in sorted-name order so labels do not depend on pair order.
    order = sorted(names)
    rank = {name: i for i, name in enumerate(order)}
    for s in samples:
        s.label = rank[s.group]
    splits, shared = [], 0
    for f in range(n_folds):
        test = np.unique([i for q in pairs if q.fold == f for i in (q.a, q.b)])
        other = np.setdiff1d([i for q in pairs if q.fold != f for i in (q.a, q.b)], test)
        # View 2's folds hold disjoint people; a pairs file that does not would have the identity training
        # (finetune, scratch, kd) learn a person its tested fold compares: that person's images are left out
        tested = {samples[i].group for i in test}
        train = np.array([i for i in other if samples[i].group not in tested], np.int64)
        shared += len(other) - len(train)
        splits.append(Split(f"fold {f + 1}", train, test.astype(np.int64)))
    counts = {"training_images_of_a_tested_person_left_out": shared} if shared else {}
    return TaskData(samples, splits, pairs=pairs, label_names=order, counts=counts)


RAF_NAMES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]


def _raf(root: Path, p: dict) -> TaskData:
    basic = _sub(root, "basic")
    aligned = p.get("aligned", True)
    images = _need(basic / "Image" / ("aligned" if aligned else "original"))
    samples, part, lines_of = [], [], {}
    labels = basic / "EmoLabel" / "list_patition_label.txt"
    for n, line in enumerate(_text(labels).splitlines(), 1):
        if not line.strip():
            continue
        if len(line.split()) != 2:
            raise BadLabels(f"{labels} line {n}: expected `<image> <label 1-7>`, got {line!r}")
        name, y = line.split()
        _note(lines_of, name, n)
        # The label file names the original image; aligned crops carry an "_aligned" suffix.
        file = f"{name.rsplit('.', 1)[0]}_aligned.jpg" if aligned else name
        samples.append(Sample(str(images / file), _label(y, 1, len(RAF_NAMES), f"{labels} line {n}") - 1))
        part.append(name.split("_")[0])
        if part[-1] not in ("train", "test"):  # the prefix is the split: any other would sit in none, unseen
            raise BadLabels(f"{labels} line {n}: image name {name!r} does not start with train_ or test_")
    _listed_once(labels, lines_of)
    part = np.array(part)
    return TaskData(samples, [Split("official train/test", _idx(part == "train"), _idx(part == "test"))], label_names=RAF_NAMES)


AFFECTNET_NAMES = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]
AFFECTNET_COLUMNS = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"]
# the distributed order; the real validation.csv comes without a header line, training.csv with this one
AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                    "expression", "valence", "arousal"]


def _affectnet(root: Path, p: dict) -> TaskData:
    # The official archive unpacks to Manually_Annotated/Manually_Annotated_Images/; some copies drop a level.
    images = next((d for d in (root / "Manually_Annotated_Images", root / "Manually_Annotated" / "Manually_Annotated_Images")
                   if d.is_dir()), root)
    lists = _sub(root, "Manually_Annotated_file_lists")  # where the official archive keeps the two CSVs
    samples, which, dropped, lines_of = [], [], 0, {}
    for part, name in (("train", "training.csv"), ("test", "validation.csv")):
        rows = _csv_rows(lists / name)
        n, first = next(rows, (1, []))
        # a first line that names no column of the header but has its width is already a row
        headerless = len(first) == len(AFFECTNET_HEADER) and not set(first) & set(AFFECTNET_HEADER)
        fields = AFFECTNET_HEADER if headerless else first
        if missing := [c for c in AFFECTNET_COLUMNS if c not in fields]:
            raise BadLabels(f"{lists / name}: no column {', '.join(missing)} (its header: {fields})")
        for n, cells in itertools.chain([(n, first)] if headerless else [], rows):
            if not cells:
                continue
            row, where = dict(zip(fields, cells)), f"{lists / name} line {n}"
            if len(cells) < len(fields):
                raise BadLabels(f"{where}: {len(cells)} columns of the {len(fields)} of its header (a cut-off line?)")
            _note(lines_of, row["subDirectory_filePath"], n if part == "train" else -n)  # (validation's: < 0)
            y = _label(row["expression"], 0, 10, where, "expression")
            if y >= len(AFFECTNET_NAMES):  # 8 none, 9 uncertain, 10 no face
                dropped += 1
                continue
            try:
                x0, y0, w, h = (float(row[c]) for c in AFFECTNET_COLUMNS[1:5])
            except ValueError:
                w = None
            if w is None or not np.isfinite([x0, y0, w, h]).all():
                raise BadLabels(f"{where}: the face box (face_x, face_y, face_width, face_height) is not 4 numbers")
            samples.append(Sample(str(images / row["subDirectory_filePath"]), y, box=(x0, y0, x0 + w, y0 + h)))
            which.append(part)
    _listed_once(lists, lines_of, lambda n: f"training.csv {n}" if n > 0 else f"validation.csv {-n}")
    which = np.array(which)
    split = Split("training.csv / validation.csv", _idx(which == "train"), _idx(which == "test"))
    return TaskData(samples, [split], label_names=AFFECTNET_NAMES, counts={"dropped_expression_8_10": dropped})


FER_NAMES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
FER_USAGE = ["Training", "PublicTest", "PrivateTest"]


def _fer2013(root: Path, p: dict) -> TaskData:
    path = root if root.is_file() else _need(_sub(root, "fer2013") / "fer2013.csv")
    samples, usage, skipped = [], [], []
    rows = _csv_rows(path)
    header = [h.strip() for h in next(rows, (1, []))[1]]  # icml_face_data.csv writes " Usage", " pixels"
    if "emotion" not in header or "Usage" not in header:
        raise BadLabels(f"{path} line 1: expected the header emotion,pixels,Usage, got {header}")
    ey, us = header.index("emotion"), header.index("Usage")
    # Row i is still `#row{i}` of images.read_image, which counts the same csv rows; a bad row is left
    # out and listed, so that one cut-off line does not cost the other 35,886.
    for i, (n, row) in enumerate(rows):
        where = f"{path.name} line {n}"
        if not row:
            continue
        if len(row) <= max(ey, us) or row[us].strip() not in FER_USAGE:
            skipped.append(f"{where}: expected emotion,pixels,Usage with Usage one of {FER_USAGE} (a cut-off line?)")
            continue
        try:
            samples.append(Sample(f"{path}#row{i}", _label(row[ey], 0, len(FER_NAMES) - 1, where, "emotion")))
        except BadLabels as e:
            skipped.append(str(e))
            continue
        usage.append(row[us].strip())
    usage = np.array(usage)
    split = Split("Training / PublicTest / PrivateTest", _idx(usage == "Training"), _idx(usage == "PrivateTest"),
                  _idx(usage == "PublicTest"))
    return TaskData(samples, [split], label_names=FER_NAMES, skipped=skipped)


CELEBA_POINTS = ["lefteye", "righteye", "nose", "leftmouth", "rightmouth"]


def _celeba_landmarks(root: Path, p: dict) -> TaskData:
    """5 points per face from list_landmarks_align_celeba.txt (aligned crops) or list_landmarks_celeba.txt
    (in-the-wild images): a count line, the 10 column names, then `file x1 y1 ... x5 y5`."""
    root = _sub(root, "celeba")
    aligned = p.get("aligned")
    if aligned is None:  # from the command line nothing sets it: the layout on disk says which it is
        aligned = (root / "img_align_celeba").exists() or not (root / "img_celeba").exists()
    images, name = ("img_align_celeba", "list_landmarks_align_celeba.txt") if aligned else \
        ("img_celeba", "list_landmarks_celeba.txt")
    images = _doubled(_need(root / images))
    lines, columns = _celeba_lines(root / name)
    if columns != [f"{n}_{c}" for n in CELEBA_POINTS for c in "xy"]:
        raise BadLabels(f"{root / name} line 2: expected the columns lefteye_x ... rightmouth_y, got {columns}")
    samples, lines_of = [], {}
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if parts:
            _note(lines_of, parts[0], n)
            try:
                points = np.array(parts[1:], np.float64).reshape(5, 2)
            except ValueError:
                points = None
            if points is None or not np.isfinite(points).all():
                raise BadLabels(f"{root / name} line {n}: expected `<image> x1 y1 ... x5 y5` (10 numbers), got {line!r}")
            samples.append(Sample(str(images / parts[0]), points))
    _listed_once(root / name, lines_of)
    partition = root / "list_eval_partition.txt"
    which = _in_partition(_partition(partition), [Path(s.path).name for s in samples], partition, name)
    split = Split("official partition", _idx(which == 0), _idx(which == 2), _idx(which == 1))
    return TaskData(samples, [split], label_names=CELEBA_POINTS)


def read_pts(path: Path) -> np.ndarray:
    """An iBUG .pts file (`version: 1`, `n_points: 68`, `{`, one `x y` per line, `}`) as (K, 2) 0-based pixels.

    iBUG counts pixels from 1 (MATLAB); 1 is taken off so that points sit on the pixel grid of the image.
    """
    head_text, brace, body = _text(path).partition("{")
    head = {}  # key -> (line, value)
    for n, line in enumerate(head_text.splitlines(), 1):
        if ":" in line:
            key, value = line.split(":", 1)
            head[key.strip()] = (n, value.strip())
    if not brace or "n_points" not in head:
        raise BadLabels(f"{path}: not an iBUG .pts file (no n_points header or no {{ ... }} block)")
    n_line, count = head["n_points"]
    if not count.isdigit():
        raise BadLabels(f"{path} line {n_line}: n_points {count!r} is not a whole number")
    values = []
    for n, line in enumerate(body.split("}")[0].splitlines(), head_text.count("\n") + 1):  # from the { line on
        try:
            xy = [float(v) for v in line.split()]
        except ValueError:
            xy = [np.nan]
        if not np.isfinite(xy).all():
            raise BadLabels(f"{path} line {n}: expected `x y` (two numbers), got {line.strip()!r}")
        values += xy
    n = int(count)
    if len(values) != 2 * n:
        raise BadLabels(f"{path} line {n_line}: n_points says {n}, found {len(values) / 2:g} points")
    return np.array(values, np.float64).reshape(n, 2) - 1


# The usual "full" 300-W test set: the common subset (LFPW and HELEN test images) plus the challenging iBUG.
_300W_TEST = re.compile(r"(^|/)(testset|ibug)(/|$)", re.IGNORECASE)
# The 300-W challenge's own 600 test faces (300W/01_Indoor, 02_Outdoor), a benchmark of their own: beside the
# folders above they went to training, and a model then scored on them had seen them.
_300W_PRIVATE = re.compile(r"(^|/)(01_Indoor|02_Outdoor)(/|$)", re.IGNORECASE)


def _300w(root: Path, p: dict) -> TaskData:
    """Every image under root with a .pts file of the same name beside it."""
    samples, test, private, skipped = [], [], [], []
    for pts in sorted(root.rglob("*.pts")):
        if any(_not_data(part) for part in pts.relative_to(root).parts):  # __MACOSX/afw/._1_1.pts
            continue
        image = next((pts.with_suffix(e) for e in (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
                      if pts.with_suffix(e).exists()), None)
        if image is None:
            skipped.append(str(pts.relative_to(root)))
            continue
        samples.append(Sample(str(image), read_pts(pts)))
        folder = str(pts.parent.relative_to(root)).replace(os.sep, "/")
        test.append(bool(_300W_TEST.search(folder)))
        private.append(bool(_300W_PRIVATE.search(folder)))
    if not samples:
        raise FileNotFoundError(f"missing annotations: no {root}/**/*.pts beside its image")
    if odd := next((s for s in samples if len(s.label) != len(samples[0].label)), None):
        raise BadLabels(f"{Path(odd.path).with_suffix('.pts')}: {len(odd.label)} points, but "
                        f"{Path(samples[0].path).with_suffix('.pts')} has {len(samples[0].label)}; each file the same")
    test, private, counts = np.array(test), np.array(private), {}
    seed, fractions = p.get("seed", 0), tuple(p.get("fractions", FRACTIONS))
    if test.any() and private.any():  # beside the official test folders: in none of the splits
        counts["300-W challenge test faces (01_Indoor, 02_Outdoor), left out"] = int(private.sum())
        samples, test = [s for s, out in zip(samples, private) if not out], test[~private]
    if test.any() and not test.all():
        # Training folders (afw, helen/trainset, lfpw/trainset): a seeded 10% of them chooses the epoch.
        train = np.random.default_rng(seed).permutation(_idx(~test))
        n_val = int(round(0.1 * len(train)))
        split = Split("trainsets + afw / testsets + ibug (300-W full set)", np.sort(train[n_val:]), _idx(test),
                      np.sort(train[:n_val]))
    else:
        split = random_split(len(samples), seed, fractions)
    return TaskData(samples, [split], skipped=skipped, counts=counts)


# FGNET/images/001A02.JPG: subject 001, age 02; a trailing letter tells apart photos at the same age.
_FGNET_NAME = re.compile(r"(\d{3})A(\d{2})[a-z]?\.jpg", re.IGNORECASE)


def _fgnet(root: Path, p: dict) -> TaskData:
    folder = _need(_sub(_sub(root, "FGNET"), "images"))
    samples, skipped = [], []
    for f in _image_files(folder):
        m = _FGNET_NAME.fullmatch(f.name)
        if m:
            samples.append(Sample(str(f), float(m[2]), group=m[1]))
        else:
            skipped.append(f.name)
    return TaskData(samples, leave_one_group_out_splits(samples), skipped=skipped)


PSPI_RANGE = (0, 16)


def _pspi(path: Path) -> float:
    """The PSPI score of one frame: the first number of its _facs.txt (written like `   2.0000000e+00`)."""
    text = _text(path).split()
    try:
        y = float(text[0])
    except (IndexError, ValueError):
        y = None
    if y is None or not PSPI_RANGE[0] <= y <= PSPI_RANGE[1]:  # (NaN fails both comparisons)
        raise BadLabels(f"{path} line 1: expected a PSPI score from {PSPI_RANGE[0]} to {PSPI_RANGE[1]}, "
                        f"got {' '.join(text[:1]) or 'an empty file'}")
    return y


def _unbc(root: Path, p: dict) -> TaskData:
    images, labels = _need(root / "Images"), _need(root / "Frame_Labels" / "PSPI")
    samples, skipped = [], []
    for subject in _subdirs(images):
        for seq in _subdirs(subject):
            for f in _image_files(seq):
                label = labels / subject.name / seq.name / f"{f.stem}_facs.txt"
                if label.exists():
                    samples.append(Sample(str(f), _pspi(label), group=subject.name))
                else:
                    skipped.append(str(f.relative_to(images)))
    return TaskData(samples, leave_one_group_out_splits(samples), skipped=skipped)


def _matlab_years(datenum: np.ndarray) -> np.ndarray:
    """Calendar year of MATLAB serial dates (day 1 = 1 Jan of year 0); NaN where the date is unusable."""
    ok = np.isfinite(datenum)
    days = np.where(ok, datenum, 719529).astype(np.int64) - 719529  # 719529 = datenum(1970, 1, 1)
    years = (np.datetime64("1970-01-01") + days.astype("timedelta64[D]")).astype("datetime64[Y]").astype(np.int64) + 1970
    return np.where(ok, years, np.nan)


def _imdb_wiki(root: Path, p: dict) -> TaskData:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    names = [p["mat"]] if p.get("mat") else ["imdb.mat", "wiki.mat"]
    root = next((root / d for d in ("imdb_crop", "wiki_crop") if any((root / d / n).exists() for n in names)), root)
    found = [root / n for n in names if (root / n).exists()]
    if not found:
        raise FileNotFoundError(f"missing {root / names[0]}" + (f" (or {root / names[1]})" if len(names) > 1 else ""))
    mat = found[0]
    try:
        contents = loadmat(str(mat))
    except (MatReadError, ValueError, IndexError) as e:  # what scipy raises for a damaged file; it names none
        raise BadLabels(f"{mat}: not a MATLAB .mat file ({e})") from e
    fields = ("full_path", "dob", "photo_taken", "gender", "face_score", "second_face_score")
    m = contents[mat.stem][0, 0] if mat.stem in contents else None
    if m is None or not set(fields) <= set(m.dtype.names or ()):
        variables = [k for k in contents if not k.startswith("__")]
        raise BadLabels(f"{mat}: expected a struct {mat.stem!r} with fields {', '.join(fields)}; found "
                        + (f"the fields {list(m.dtype.names or ())}" if m is not None else f"the variables {variables}"))
    col = lambda k: np.asarray(m[k], np.float64).ravel()  # noqa: E731
    paths = [str(np.squeeze(x)) for x in m["full_path"].ravel()]
    age = col("photo_taken") - _matlab_years(col("dob"))
    gender, face, second = col("gender"), col("face_score"), col("second_face_score")
    with np.errstate(invalid="ignore"):
        keep = ((age >= 0) & (age <= 100) & ~np.isnan(gender) & np.isfinite(face)
                & (face > p.get("min_face_score", 0.0)) & np.isnan(second))
    kept = _idx(keep)
    # A file listed twice would be one face on both sides of the random split: its first row kept is the one
    _, first = np.unique(np.asarray(paths, dtype=str)[kept], return_index=True)
    counts = {"rows": len(paths), "filtered_out": len(paths) - len(kept)}
    if len(first) < len(kept):
        counts["duplicate_paths"] = len(kept) - len(first)
    kept = kept[np.sort(first)]
    if p["target"] == "age":
        samples, names = [Sample(str(root / paths[i]), float(age[i])) for i in kept], None
    else:
        samples, names = [Sample(str(root / paths[i]), int(gender[i])) for i in kept], ["female", "male"]
    return TaskData(samples, _seeded(len(samples), p), label_names=names, counts=counts)


def _tiny_imagenet(root: Path, p: dict) -> TaskData:
    root = _sub(root, "tiny-imagenet-200")
    listed = root / "wnids.txt"
    cls = {}
    for n, line in enumerate(_text(listed).splitlines(), 1):
        for w in line.split():
            if w in cls:  # twice would read its training images twice, under the second index only
                raise BadLabels(f"{listed} line {n}: class id {w!r} is listed a second time")
            cls[w] = len(cls)
    wnids = list(cls)
    samples = [Sample(str(f), cls[w]) for w in wnids for f in _image_files(_need(root / "train" / w / "images"))]
    n_train = len(samples)
    val_images = _need(root / "val" / "images")
    annotations, unknown, lines_of = root / "val" / "val_annotations.txt", [], {}
    for n, line in enumerate(_text(annotations).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise BadLabels(f"{annotations} line {n}: expected `<image> <class id> [box]`, got {line!r}")
        _note(lines_of, parts[0], n)
        if parts[1] in cls:
            samples.append(Sample(str(val_images / parts[0]), cls[parts[1]]))
        else:
            unknown.append((n, parts[1]))
    if unknown:  # all of them at once, so that a wrong wnids.txt shows as one message, not one rerun per line
        ids = sorted({w for _, w in unknown})
        many = f" ({len(ids)} unknown ids)" if len(ids) > 1 else ""
        raise BadLabels(f"{annotations}: class id not in {listed.name} on {_lines([n for n, _ in unknown])}: "
                        + ", ".join(map(repr, ids[:5])) + many)
    _listed_once(annotations, lines_of)
    split = Split("train / val", np.arange(n_train), np.arange(n_train, len(samples)))
    return TaskData(samples, [split], label_names=wnids)


def _folder(root: Path, p: dict) -> TaskData:
    """root/<class>/*.jpg, or root/<split dir>/<class>/*.jpg when params['splits'] names the split dirs."""
    split_dirs = p.get("splits")  # e.g. {"train": "Train", "test": "Val"}
    tops = {k: _need(root / v) for k, v in split_dirs.items()} if split_dirs else {"all": root}
    classes = p.get("classes") or sorted({d.name for top in tops.values() for d in _subdirs(top)})
    cls = {c: i for i, c in enumerate(classes)}
    samples, which = [], []
    for part, top in tops.items():
        for d in _subdirs(top):
            if d.name not in cls:
                raise BadLabels(f"{d}: class {d.name!r} is not one of {classes}")
            for f in _image_files(d):
                samples.append(Sample(str(f), cls[d.name], group=d.name if p.get("per_class_split") else None))
                which.append(part)
    if not samples:
        raise FileNotFoundError(f"missing images: no {root}/<class>/*.jpg found")
    which = np.array(which)
    labels = [s.label for s in samples]
    if split_dirs:
        val = _idx(which == "val") if "val" in split_dirs else None
        splits = [Split(" / ".join(split_dirs.values()), _idx(which == "train"), _idx(which == "test"), val)]
    elif p.get("per_class_split"):
        splits = [per_class_split(labels, p.get("seed", 0), tuple(p.get("fractions", FRACTIONS)))]
    else:
        splits = _seeded(len(samples), p)
    return TaskData(samples, splits, label_names=list(classes))


_CSV_HEADER = {"file", "filename", "path", "image", "img", "name"}


def _is_header(cell: str, folder: Path) -> bool:
    """A first CSV cell that is a usual column name, or that names no file and has no image extension (such
    as `filepath`): read as a data row, it would be a missing image and, in classification, a class of its own."""
    return (cell.lower() in _CSV_HEADER or
            (os.path.splitext(cell)[1].lower() not in IMAGE_EXTENSIONS and not (folder / cell).exists()))


def _lines(numbers) -> str:
    more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
    return ("lines " if len(numbers) > 1 else "line ") + ", ".join(map(str, numbers[:10])) + more


def _csv_table(root: Path, p: dict) -> TaskData:
    """A `file,label[,split]` CSV; paths are relative to the CSV's folder; split is train/val/test."""
    path = root if root.is_file() else _need(root / p.get("csv", "labels.csv"))
    rows = [(n, r) for n, r in _csv_rows(path) if r and r[0].strip()]
    header = rows[0][1] if rows and _is_header(rows[0][1][0].strip(), path.parent) else None
    rows = rows[1:] if header else rows
    if no_label := [n for n, r in rows if len(r) < 2 or not r[1].strip()]:
        raise BadLabels(f"{path}: no label on {_lines(no_label)} (expected rows file,label[,split])")
    # The same image twice could sit in train and test, or weigh double: one row per file.
    lines_of = {}
    for n, r in rows:
        _note(lines_of, os.path.normpath(path.parent / r[0].strip()), n)
    _listed_once(path, lines_of)
    files = [str(path.parent / r[0].strip()) for _, r in rows]
    raw = [r[1].strip() for _, r in rows]
    if p.get("kind", "classification") == "regression":
        lo, hi = p.get("label_range") or (-np.inf, np.inf)
        labels = []
        for (n, _), y in zip(rows, raw):
            try:
                labels.append(float(y))
            except ValueError:
                labels.append(np.nan)
            if not (np.isfinite(labels[-1]) and lo <= labels[-1] <= hi):
                raise BadLabels(f"{path} line {n}: label {y!r} is not a finite number" +
                                (f" from {lo} to {hi}" if p.get("label_range") else ""))
        samples, names = [Sample(f, y) for f, y in zip(files, labels)], None
    else:
        names = p.get("classes") or sorted(set(raw), key=lambda y: (0, int(y), "") if y.lstrip("-").isdigit() else (1, 0, y))
        cls = {c: i for i, c in enumerate(names)}
        if unknown := [n for (n, _), y in zip(rows, raw) if y not in cls]:
            raise BadLabels(f"{path}: label not one of the classes {names} on {_lines(unknown)}")
        samples = [Sample(f, cls[y]) for f, y in zip(files, raw)]
    # A split column is all or nothing: a row without a value would sit in no split, and a random split
    # would drop the user's own.
    if (header and len(header) > 2) or any(len(r) > 2 and r[2].strip() for _, r in rows):
        which = np.array([r[2].strip().lower() if len(r) > 2 else "" for _, r in rows])
        if bad := [n for (n, _), w in zip(rows, which) if w not in ("train", "val", "test")]:
            raise BadLabels(f"{path}: the split column is empty or not one of train, val, test on {_lines(bad)}")
        val = _idx(which == "val") if (which == "val").any() else None
        splits = [Split("split column", _idx(which == "train"), _idx(which == "test"), val)]
    else:
        splits = _seeded(len(samples), p)
    return TaskData(samples, splits, label_names=names)


# ----------------------------------------------------------------------------- helpers for users

def folder_task(name: str, root=None, knowledge: str = "Classification", classes=None, splits=None,
                per_class_split: bool = False, seed: int = 0, fractions=FRACTIONS, **task_fields) -> Task:
    """A classification task on a folder-per-class tree; register it with register_task."""
    params = {"root": root, "classes": classes, "splits": splits, "per_class_split": per_class_split,
              "seed": seed, "fractions": fractions}
    protocol = (f"train on {splits.get('train')}, report {splits.get('test')}" if splits else
                f"per-class random {_pct(fractions)} split drawn with seed {seed}" if per_class_split else
                f"random {_pct(fractions)} train/val/test split drawn with seed {seed}")
    layout = ("root/" + "{" + ",".join(splits.values()) + "}/<class>/*.jpg") if splits else "root/<class>/*.jpg"
    fields = dict(knowledge=knowledge, kind="classification", num_outputs=len(classes) if classes else 0,
                  label_range=None, metric="accuracy", protocol=protocol, layout=layout)
    return Task(name, loader=_folder, params=params, **{**fields, **task_fields})


def csv_task(name: str, csv: str = "labels.csv", kind: str = "classification", root=None, knowledge: str | None = None,
             label_range: tuple | None = None, classes=None, seed: int = 0, fractions=FRACTIONS, **task_fields) -> Task:
    """A task read from `root/<csv>` rows `file,label[,split]`; kind is "classification" or "regression"."""
    if kind not in ("classification", "regression"):
        raise ValueError(f"csv_task kind must be classification or regression, not {kind!r}")
    params = {"root": root, "csv": csv, "kind": kind, "classes": classes, "seed": seed, "fractions": fractions,
              "label_range": label_range}
    fields = dict(knowledge=knowledge or kind.capitalize(), kind=kind,
                  num_outputs=1 if kind == "regression" else len(classes) if classes else 0,
                  label_range=label_range, metric="mae" if kind == "regression" else "accuracy",
                  protocol=f"split column if present, else random {_pct(fractions)} split drawn with seed {seed}",
                  layout=f"root/{csv} with rows file,label[,train|val|test]; files relative to root")
    return Task(name, loader=_csv_table, params=params, **{**fields, **task_fields})


def _pct(fractions) -> str:
    return "/".join(str(round(100 * f)) for f in fractions)


# ----------------------------------------------------------------------------- the registry

AGE_BINS = [0, 3, 10, 20, 30, 40, 50, 60, 70]  # groups 0-2, 3-9, 10-19, ..., 60-69, 70+
SPLIT = {"seed": 0, "fractions": FRACTIONS}
UTK_PROTOCOL = "random 80/10/10 train/val/test split of the well-named files, drawn with seed 0 (same split for all UTK tasks)"
UTK_LAYOUT = ("UTKFace/[age]_[gender]_[race]_[date&time].jpg (or .jpg.chip.jpg); malformed names and ages above 116 "
              "skipped and counted; the in-the-wild part1/ part2/ part3/: give one, or their files in one folder")
IMDB_PROTOCOL = ("age = photo_taken - year(dob); keep 0 <= age <= 100, gender not NaN, face_score finite and > "
                 "min_face_score (0), second_face_score NaN (one face); random 80/10/10 split drawn with seed 0")
IMDB_LAYOUT = "imdb_crop/imdb.mat (or wiki_crop/wiki.mat) + the images at its full_path entries"
TINY_LAYOUT = "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"

_REGISTRY = [
    Task("Expr-AffectNet", "Emotion Classification", "classification", 8, None, "accuracy",
         "train on training.csv, report validation.csv accuracy; expressions 8-10 (none/uncertain/no face) dropped",
         "root/[Manually_Annotated_file_lists/]{training.csv, validation.csv}, images at "
         "root/[Manually_Annotated/]Manually_Annotated_Images/"
         "<subDirectory_filePath>; "
         "face box from face_x/y/width/height (the face is searched around it)", _affectnet),
    Task("Expr-RAF", "Emotion Classification", "classification", 7, None, "accuracy",
         "official train/test partition (train_/test_ file prefix), test accuracy",
         "basic/EmoLabel/list_patition_label.txt + basic/Image/aligned/<name>_aligned.jpg", _raf, {"aligned": True}),
    folder_task("Expr-SFEW", knowledge="Emotion Classification",
                classes=["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"],
                splits={"train": "Train", "test": "Val"},
                protocol="train on Train, report Val accuracy (SFEW 2.0 test labels are not public)",
                layout="root/{Train,Val}/<Angry|Disgust|Fear|Happy|Neutral|Sad|Surprise>/*.png"),
    folder_task("Identity-MS", knowledge="Identity Matching", per_class_split=True,
                protocol="identity classification; per-identity random 80/10/10 split drawn with seed 0, test accuracy",
                layout="root/<identity>/*.jpg (one folder per identity, e.g. MS-Celeb-1M clean)"),
    Task("Identity-LFW", "Identity Matching", "verification", 0, None, "verification_accuracy",
         "10-fold LFW pairs (View 2): threshold picked on 9 folds, accuracy on the 10th; mean and std",
         "root/pairs.txt + root/lfw/<Name>/<Name>_<iiii>.jpg (or lfw-deepfunneled/, lfw_funneled/ in its place)",
         _lfw, {}),
    Task("Gender-IMDb", "Gender Prediction", "classification", 2, None, "accuracy", IMDB_PROTOCOL, IMDB_LAYOUT,
         _imdb_wiki, {"target": "gender", "min_face_score": 0.0, **SPLIT}),
    Task("Gender-UTK", "Gender Prediction", "classification", 2, None, "accuracy", UTK_PROTOCOL, UTK_LAYOUT,
         _utk, {"target": "gender", **SPLIT}),
    Task("Attrib-CelebA", "Attribute Detection", "multilabel", CELEBA_ATTRS, None, "error_rate",
         "official partition (list_eval_partition.txt: 0 train, 1 val, 2 test); mean error rate over 40 attributes",
         "celeba/{img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt}", _celeba),
    Task("AgeR-IMDb", "Age Regression", "regression", 1, (0, 100), "mae", IMDB_PROTOCOL, IMDB_LAYOUT,
         _imdb_wiki, {"target": "age", "min_face_score": 0.0, **SPLIT}),
    Task("AgeR-FG", "Age Regression", "regression", 1, (0, 69), "mae",
         "leave-one-person-out (one split per subject), MAE pooled over all images",
         "FGNET/images/<subject:3>A<age:2>[letter].JPG", _fgnet),
    Task("AgeR-UTK", "Age Regression", "regression", 1, (0, UTK_MAX_AGE), "mae", UTK_PROTOCOL, UTK_LAYOUT,
         _utk, {"target": "age", **SPLIT}),
    Task("AgeC-UTK", "Age Classification", "classification", len(AGE_BINS), None, "accuracy",
         UTK_PROTOCOL + "; age groups " + ", ".join(_age_group_names(AGE_BINS)), UTK_LAYOUT,
         _utk, {"target": "age_group", "age_bins": AGE_BINS, **SPLIT}),
    Task("Ethnic-UTK", "Ethnicity Classification", "classification", 5, None, "accuracy", UTK_PROTOCOL, UTK_LAYOUT,
         _utk, {"target": "race", **SPLIT}),
    Task("Pain-UNBC", "Pain Estimation", "regression", 1, PSPI_RANGE, "mae",
         "leave-one-subject-out (one split per subject), frame-level PSPI MAE pooled over all frames",
         "Images/<subject>/<sequence>/<frame>.png + Frame_Labels/PSPI/<subject>/<sequence>/<frame>_facs.txt", _unbc),
    Task("Object-TinyImageNet", "Object Classification", "classification", 200, None, "accuracy",
         "train on train/, report val/ accuracy (the paper's stand-in for Object-ImageNet); whole images, no face "
         "detection", TINY_LAYOUT, _tiny_imagenet, align="none"),
    Task("Align-CelebA", "Face Alignment", "landmarks", 10, None, "nme",
         "official partition (list_eval_partition.txt); NME over the 5 points, normalised by the distance between "
         "the eye centres; a missed face predicts the mean training shape",
         "celeba/{img_align_celeba/*.jpg, list_landmarks_align_celeba.txt, list_eval_partition.txt} "
         "(or, when img_align_celeba/ is absent: img_celeba/ + list_landmarks_celeba.txt)", _celeba_landmarks, {}),
    Task("Align-300W", "Face Alignment", "landmarks", 136, None, "nme",
         "train on afw + */trainset, test on */testset + ibug (the full 300-W set; a seeded 10% of the training "
         "images chooses the epoch; the challenge's test faces, 300W/01_Indoor and 02_Outdoor, are in no split), "
         "or a random 80/10/10 split drawn with seed 0 for a tree without them; NME over the 68 "
         "points normalised by the outer eye corners (inter-ocular); a missed face predicts the mean training shape",
         "root/**/<name>.{png,jpg} with <name>.pts beside it (iBUG format, e.g. afw/, helen/trainset/, "
         "lfpw/testset/, ibug/, or 300W/01_Indoor/)", _300w, dict(SPLIT)),
    Task("FER2013", "Emotion Classification", "classification", 7, None, "accuracy",
         "train on Training, validate on PublicTest, report PrivateTest accuracy",
         "fer2013/fer2013.csv (emotion,pixels,Usage; 48x48 grey pixels in the CSV)", _fer2013),
]

TASKS: dict[str, Task] = {}
# The paper reports ImageNet knowledge on TinyImageNet (section 4.2), so the Table 1 name points there.
ALIASES = {"Object-ImageNet": "Object-TinyImageNet"}
DEMO_TASK = "Face-LFWsubset"  # transfer.py's embedded task (built there from installed media)


def register_task(task: Task) -> Task:
    if task.kind not in ("classification", "regression", "multilabel", "verification", "landmarks"):
        raise ValueError(f"{task.name}: unknown kind {task.kind!r}")
    if task.metric not in {*metrics.METRICS, "verification_accuracy"}:
        raise ValueError(f"{task.name}: unknown metric {task.metric!r}")
    TASKS[task.name] = task
    return task


for _t in _REGISTRY:
    register_task(_t)


# Your own labelled data without a registry entry: --task KIND:NAME (NAME names the task in the reports).
USER_KINDS = {"folder": "a folder per class, random 80/10/10 split",
              "csv": "classes from DIR/labels.csv rows file,label[,train|val|test]",
              "csv-regression": "values, scored by MAE, from the same labels.csv"}


def user_kinds_text() -> str:
    return ", ".join(f"{k}:NAME ({v})" for k, v in USER_KINDS.items())


def get_task(name: str) -> Task:
    name = ALIASES.get(name, name)
    kind, _, own = name.partition(":")
    if own and kind in USER_KINDS and name not in TASKS:
        if own in TASKS or own in ALIASES or own == DEMO_TASK:  # its report would read as that task's
            raise KeyError(f"--task {name}: name your task with letters, digits, '_', '.' or '-', and not as a "
                           f"registered task ({own} is one)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", own):
            raise KeyError(f"--task {name}: name your task with letters, digits, '_', '.' or '-' (it names files)")
        # registered under KIND:NAME, named NAME in reports and file names
        TASKS[name] = folder_task(own) if kind == "folder" else csv_task(
            own, kind="regression" if kind == "csv-regression" else "classification")
    if name not in TASKS:
        known = [*TASKS, *ALIASES]
        same_but_case = [k for k in known if k.lower() == name.lower()]
        close = same_but_case or difflib.get_close_matches(name, known, n=1)
        raise KeyError(f"unknown task {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                       + f"; known: {', '.join(known)}, or your own data as {user_kinds_text()}")
    return TASKS[name]


def load(task, root=None, **params) -> TaskData:
    """Read a task's data: task is a Task or a registered name; root defaults to params['root']."""
    task = get_task(task) if isinstance(task, str) else task
    return task.loader(root, params)


def output_size(task: Task, data: TaskData) -> int:
    """Width of the head to put on the student: fixed by the task, else the number of classes found."""
    if task.kind == "verification":
        return 0
    return task.num_outputs or len(data.label_names or [])


def missed_face_rule(task: Task, preds, missed_mask, label_range: tuple | None = None) -> np.ndarray:
    """Paper section 4.1 for faces the detector missed: a classification counts as wrong, a regression
    predicts the middle of the label range.

    Classification preds (indices or (N, C) scores) come back as indices with -1 for missed faces;
    multilabel decisions and verification pair scores come back as floats with NaN for them; the
    metrics count both as wrong.
    """
    missed = np.asarray(missed_mask, bool)
    if task.kind == "regression":
        lo_hi = label_range or task.label_range
        if lo_hi is None:
            raise ValueError(f"{task.name}: the missed-face rule needs a label_range")
        out = np.asarray(preds, np.float64).copy()
        out[missed] = (lo_hi[0] + lo_hi[1]) / 2
    elif task.kind == "classification":
        out = np.asarray(metrics.class_indices(preds), np.int64).copy()
        out[missed] = -1
    else:
        out = np.asarray(preds, np.float64).copy()
        out[missed] = np.nan
    return out


def list_tasks_table(tablefmt: str = "simple") -> str:
    from tabulate import tabulate

    alias_of = {v: k for k, v in ALIASES.items()}
    rows = []
    for t in TASKS.values():
        outputs = "embedding" if t.kind == "verification" else t.num_outputs or "from data"
        name = f"{t.name} (= {alias_of[t.name]})" if t.name in alias_of else t.name
        rows.append([name, t.knowledge, t.kind, outputs, t.metric, t.protocol, t.layout])
    return tabulate(rows, headers=["task", "knowledge", "kind", "outputs", "metric", "protocol", "layout"],
                    tablefmt=tablefmt, maxcolwidths=[None, 14, None, None, None, 48, 48])

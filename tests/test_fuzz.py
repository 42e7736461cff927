"""Fuzzed input: every awkward file a user's disk holds, through fuse.py, transfer.py and distill.py embed.

Each bad file must come out as a counted row with its reason, the real faces beside it exactly as they
come out alone, and nothing may crash. The files are built here, around real faces from installed packages.
"""
import csv
import importlib.util
import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cache import FeatureCache
from common.images import MAX_PIXELS, BadImage, list_images, read_image
from tests.conftest import feat_data

ROOT = Path(__file__).resolve().parents[1]
AS_ROOT = os.geteuid() == 0  # root reads a file whatever its permissions
UNICODE_ERR = os.fsdecode(b"caf\xe9 face.jpg")  # latin-1 bytes: not UTF-8


# Small pictures keep the detector quick: these tests are about the files, not about detection.
def astronaut() -> Image.Image:
    path = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / "astronaut.png"
    return Image.open(path).convert("RGB").resize((192, 192), Image.BILINEAR)


def real_face() -> Image.Image:
    return Image.open(feat_data() / "single_face.jpg").convert("RGB").resize((160, 157), Image.BILINEAR)


def bomb_png() -> bytes:
    """A 30000 x 30000 PNG header (900 M pixels) in 57 bytes: decoding it would need 900 MB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def exif_rotated(face: Image.Image) -> bytes:
    """The face stored turned 90 degrees, with the EXIF orientation (6) that turns it upright again."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    face.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


# name -> fragment of the reason it must be listed with ("" = a face that must be found)
REAL = {"real/single_face.jpg": "", "a b/c d/face e.png": "", "UPPER.JPG": "", UNICODE_ERR: ""}
BAD = {
    "tiny_1x1.png": "only 1x1 pixels", "tiny_5x5.png": "only 5x5 pixels", "tiny_8x8.jpg": "smaller than the 20-pixel",
    "strip_1x4000.png": "only 1x4000 pixels", "strip_4000x1.png": "only 4000x1 pixels",
    "bomb.png": "refused", "zero.jpg": "empty file", "text.jpg": "not a readable image",
    "truncated.jpg": "not a readable image", "folder.jpg": "a folder, not an image file",
    "loop.jpg": "Too many levels of symbolic links",
    # opening a FIFO waits for a writer and /dev/zero never ends: both must be refused before a read
    "fifo.jpg": "not a regular file", "dev_zero.jpg": "not a regular file",
    # names that would shift or split a row of missed_faces.tsv unless quoted
    "tab\tname.jpg": "empty file", "cr\rname.jpg": "empty file", 'quote"name.jpg': "empty file",
}
# A real face under a name with a line break: left out of the listing (with a warning), because the
# one-name-a-line path lists would shift every later row.
NEWLINE = "line\nbreak.jpg"
FORMATS = {"exif_rotated.jpg": "", "animated.gif": "", "pages.tif": "", "cmyk.jpg": "", "grey.png": "",
           "alpha.png": "", "grey16.png": "", "palette.png": ""}
# Unreadable only for users other than root; root reads it, and it holds a real face.
PERMS = {"unreadable.jpg": "" if AS_ROOT else "Permission denied"}


def write_real_faces(d: Path) -> None:
    for rel in REAL:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        real_face().save(d / rel, format="PNG" if rel.endswith(".png") else "JPEG", quality=95)


def build_fuzz(d: Path) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    write_real_faces(d)
    face = real_face()
    Image.new("RGB", (1, 1), (200, 150, 120)).save(d / "tiny_1x1.png")
    Image.new("RGB", (5, 5), (200, 150, 120)).save(d / "tiny_5x5.png")
    face.resize((8, 8)).save(d / "tiny_8x8.jpg")
    Image.new("L", (1, 4000), 128).save(d / "strip_1x4000.png")
    Image.new("L", (4000, 1), 128).save(d / "strip_4000x1.png")
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "zero.jpg").write_bytes(b"")
    for name in ("tab\tname.jpg", "cr\rname.jpg", 'quote"name.jpg'):
        (d / name).write_bytes(b"")
    (d / "text.jpg").write_text("this is a text file named like a photo\n")
    data = (d / "UPPER.JPG").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "folder.jpg").mkdir()
    os.symlink("loop2.jpg", d / "loop.jpg")
    os.symlink("loop.jpg", d / "loop2.jpg")  # listed too: same reason
    os.symlink("..", d / "a b" / "up")  # a link to a parent folder: the walk must not loop
    os.mkfifo(d / "fifo.jpg")
    os.symlink("/dev/zero", d / "dev_zero.jpg")
    face.save(d / NEWLINE, quality=95)
    (d / "exif_rotated.jpg").write_bytes(exif_rotated(face))
    frames = [face.quantize(256), Image.new("RGB", face.size, (0, 0, 0)).quantize(2)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    face.save(d / "pages.tif", save_all=True, append_images=[Image.new("RGB", face.size, (0, 0, 0))])
    astro = astronaut()
    astro.convert("CMYK").save(d / "cmyk.jpg")
    astro.convert("L").save(d / "grey.png")
    rgba = astro.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    Image.fromarray(np.asarray(astro.convert("L"), np.uint16) * 257).save(d / "grey16.png")
    astro.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    face.save(d / "unreadable.jpg", quality=95)
    os.chmod(d / "unreadable.jpg", 0)
    return d


EXPECTED = {**REAL, **BAD, "loop2.jpg": BAD["loop.jpg"], **FORMATS, **PERMS}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_fuzz(tmp_path_factory.mktemp("fuzz") / "in")


@pytest.fixture(scope="module")
def fuzz(root):
    return EXPECTED


# ------------------------------------------------------------------------------------- the reader alone
def test_every_file_is_listed_once(root, caplog):
    assert sorted(list_images(root)) == sorted(EXPECTED)
    assert "left out because their names hold a line break" in caplog.text and repr(NEWLINE) in caplog.text


def test_unreadable_subfolder_is_named(tmp_path, monkeypatch, caplog):
    for sub in ("ok", "locked"):
        (tmp_path / sub).mkdir()
        real_face().save(tmp_path / sub / "face.jpg")
    real = os.scandir

    def scandir(path, locked="locked"):  # root reads any folder, so the refusal is made here
        if Path(path).name == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    assert list_images(tmp_path) == ["ok/face.jpg"]
    assert "1 folder(s)" in caplog.text and "locked (Permission denied)" in caplog.text
    assert "--overwrite" in caplog.text  # a resume cannot add its images later: the warning says so now
    monkeypatch.setattr(os, "scandir", lambda path: scandir(path, tmp_path.name))
    with pytest.raises(PermissionError, match="cannot read the image folder"):
        list_images(tmp_path)


def test_a_line_break_in_a_folder_name_is_left_out_too(tmp_path, caplog):
    (tmp_path / "a\nb").mkdir()
    real_face().save(tmp_path / "a\nb" / "face.jpg")
    real_face().save(tmp_path / "ok.jpg")
    assert list_images(tmp_path) == ["ok.jpg"] and "line break" in caplog.text


def test_a_line_break_never_shifts_rows():
    from common.images import decode_paths, encode_paths

    names = ["a.jpg", "b\x1cc.jpg", "d\u2028e.jpg"]
    assert decode_paths(encode_paths(names)) == names
    with pytest.raises(ValueError, match="line break"):
        encode_paths(["a.jpg", NEWLINE])


@pytest.mark.parametrize("name", sorted(set(BAD) | {"loop2.jpg"}))
def test_bad_files_raise_their_reason(root, fuzz, name):
    if name == "tiny_8x8.jpg":  # decodable: the detector refuses it (see test_tiny_image_refused_by_detector)
        assert read_image(root / name).shape == (8, 8, 3)
        return
    with pytest.raises(BadImage, match=fuzz[name]) as e:
        read_image(root / name)
    assert name in str(e.value)


def test_bomb_refused_before_decoding(root):
    assert 30000 * 30000 > MAX_PIXELS
    with pytest.raises(BadImage, match="refused"):
        read_image(root / "bomb.png")


def test_unreadable_file(root, monkeypatch):
    if not AS_ROOT:
        with pytest.raises(BadImage, match="Permission denied"):
            read_image(root / "unreadable.jpg")
    # As root the permission bits do not bite; the error path is the same OSError, so raise it directly.
    def denied(path, *flags):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(BadImage, match="unreadable.jpg: cannot read \\(Permission denied\\)"):
        read_image(root / "unreadable.jpg")


def test_missing_file(root):
    with pytest.raises(BadImage, match="no_such.jpg: cannot read \\(No such file"):
        read_image(root / "no_such.jpg")


def test_exif_rotation_applied(root):
    face = np.asarray(real_face()).astype(int)
    img = read_image(root / "exif_rotated.jpg").astype(int)
    assert img.shape == face.shape  # stored turned (w x h swapped), read upright
    assert np.abs(img - face).mean() < 4  # JPEG noise only; unturned it would differ everywhere
    stored = np.asarray(Image.open(root / "exif_rotated.jpg").convert("RGB")).astype(int)
    assert stored.shape != face.shape


def test_first_frame_of_animations_and_pages(root):
    face = np.asarray(real_face()).astype(int)
    assert np.array_equal(read_image(root / "pages.tif"), face)  # TIFF is lossless: page 1 exactly
    gif = read_image(root / "animated.gif").astype(int)
    assert np.abs(gif - face).mean() < 8  # 256-colour palette of the face, not the black frame 2


def test_float_images_with_a_signed_range_or_nan_keep_their_face(tmp_path):
    """A float grey in [-1, 1] is rescaled, not clipped to black below 0; NaN pixels become black silently."""
    grey = np.asarray(real_face().convert("L"), np.float32) / 255
    Image.fromarray(grey).save(tmp_path / "unit.tif")
    Image.fromarray(grey * 2 - 1).save(tmp_path / "signed.tif")
    nan = grey.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    unit = read_image(tmp_path / "unit.tif").astype(int)
    signed = read_image(tmp_path / "signed.tif")  # stretched over its own range: the same picture, linearly
    assert np.corrcoef(signed[..., 0].ravel(), unit[..., 0].ravel())[0, 1] > 0.999 and signed.max() == 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_nan = read_image(tmp_path / "nan.tif")
    assert with_nan[0, 0].tolist() == [0, 0, 0] and np.abs(with_nan.astype(int) - unit)[1:].max() <= 1


def test_jfif_and_jpe_files_are_listed(tmp_path):
    for name in ("a.jfif", "b.JPE", "c.jpg", ".hidden.jpg"):
        real_face().save(tmp_path / name, format="JPEG")
    assert sorted(list_images(tmp_path)) == ["a.jfif", "b.JPE", "c.jpg"]


def test_palette_and_16bit_and_grey_agree(root):
    grey = read_image(root / "grey.png").astype(int)
    assert np.abs(read_image(root / "grey16.png").astype(int) - grey).max() <= 1
    rgb = np.asarray(astronaut().convert("RGB")).astype(int)
    assert np.abs(read_image(root / "palette.png").astype(int) - rgb).mean() < 8


def test_tiny_image_refused_by_detector(root):
    from common.align import FaceDetector

    with pytest.raises(BadImage, match="8x8 pixels: smaller than the 20-pixel faces"):
        FaceDetector()(read_image(root / "tiny_8x8.jpg"))


# ----------------------------------------------------------------------------------- the three scripts
def missed_rows(tsv: Path) -> dict[str, str]:
    text = tsv.read_bytes().decode("utf-8", "surrogateescape")
    return dict(list(csv.reader(io.StringIO(text, newline=""), dialect="excel-tab"))[1:])


def rows_by_name(cache):
    return {p: i for i, p in enumerate(cache.images)}


def fp16_close(a, b):
    """Equal within one fp16 step: the teachers' float32 outputs differ in the last bits with the batch
    around a face, and the cache rounds them to fp16, so a rounding boundary may fall between them."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    return np.all(np.abs(a - b) <= step + 1e-7)


@pytest.mark.slow
def test_fuse_lists_every_bad_file(root, fuzz, tmp_path):
    import fuse

    alone = tmp_path / "alone"
    write_real_faces(alone)
    common = ["--teachers", "age,gender", "--extract-only", "--shard-size", "8", "--batch", "4"]
    fuse.main(["--data", str(root), "--cache", str(tmp_path / "c"), "--run-dir", str(tmp_path / "r"), *common])
    fuse.main(["--data", str(alone), "--cache", str(tmp_path / "c1"), "--run-dir", str(tmp_path / "r1"), *common])
    cache = FeatureCache(tmp_path / "c").require_complete()
    assert sorted(cache.images) == sorted(fuzz)
    missed = missed_rows(tmp_path / "r" / "missed_faces.tsv")
    bad = {k: v for k, v in fuzz.items() if v}
    assert set(missed) == set(bad), (set(missed) ^ set(bad))
    for name, why in bad.items():
        assert why in missed[name], (name, missed[name])
    n_bad = len(bad)
    log = (tmp_path / "r" / "log.txt").read_text()
    assert f"{len(fuzz) - n_bad} aligned; 0 with no face, {n_bad} unreadable or missing" in log
    # the file the listing left out (a line break in its name) is named in the run's log, not only on stderr
    assert "left out because their names hold a line break" in log and repr(NEWLINE) in log
    # The real faces come out as they do alone.
    one = FeatureCache(tmp_path / "c1")
    a, b = rows_by_name(cache), rows_by_name(one)
    for name in REAL:
        assert one.found[b[name]] and cache.found[a[name]]
        assert np.allclose(cache.matrices[a[name]], one.matrices[b[name]])
        assert fp16_close(cache.features.take([a[name]]), one.features.take([b[name]])), name


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from tests.fixtures import write_tiny_student

    return write_tiny_student(tmp_path_factory.mktemp("student") / "student.safetensors", 48)


@pytest.mark.slow
def test_distill_embed_lists_every_bad_file(root, fuzz, student, tmp_path):
    import distill

    alone = tmp_path / "alone"
    write_real_faces(alone)
    distill.main(["embed", "--checkpoint", str(student), "--images", str(root), "--out", str(tmp_path / "e.npy")])
    distill.main(["embed", "--checkpoint", str(student), "--images", str(alone), "--out", str(tmp_path / "a.npy")])
    paths = (tmp_path / "e.paths.txt").read_bytes().decode("utf-8", "surrogateescape").split("\n")[:-1]
    assert sorted(paths) == sorted(fuzz)
    missed = missed_rows(tmp_path / "e.missed.tsv")
    bad = {k: v for k, v in fuzz.items() if v}
    assert set(missed) == set(bad)
    for name, why in bad.items():
        assert why in missed[name], (name, missed[name])
    emb, one = np.load(tmp_path / "e.npy"), np.load(tmp_path / "a.npy")
    one_paths = (tmp_path / "a.paths.txt").read_bytes().decode("utf-8", "surrogateescape").split("\n")[:-1]
    for i, p in enumerate(paths):
        assert np.isnan(emb[i]).all() == (p in bad), p
        if p in REAL:
            np.testing.assert_allclose(emb[i], one[one_paths.index(p)], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_transfer_scores_bad_and_missing_files_by_the_rule(root, fuzz, student, tmp_path):
    """RAF-DB's label list names each awkward file (and one that does not exist) as a test image."""
    import shutil

    import transfer
    from tests.fixtures import make_fixture

    data = make_fixture("Expr-RAF", tmp_path / "data")
    aligned = data / "basic" / "Image" / "aligned"
    labels = data / "basic" / "EmoLabel" / "list_patition_label.txt"
    extra = {}
    for k, name in enumerate(sorted(n for n in fuzz if "/" not in n and n != UNICODE_ERR)):
        target = aligned / f"test_{100 + k:04d}_aligned.jpg"
        src = root / name
        if src.is_symlink():  # the same device, or a link to itself: the same loop
            os.symlink(os.readlink(src) if os.path.isabs(os.readlink(src)) else target.name, target)
        elif src.is_fifo():
            os.mkfifo(target)
        elif src.is_dir():
            target.mkdir()
        else:
            shutil.copyfile(src, target)
            shutil.copymode(src, target)
        extra[f"test_{100 + k:04d}.jpg"] = fuzz[name]
    extra["test_0999.jpg"] = "No such file"  # listed, never on disk: the missed-face rule scores it
    with open(labels, "a") as f:
        f.writelines(f"{n} 1\n" for n in extra)
    transfer.main(["--task", "Expr-RAF", "--data", str(data), "--student", str(student), "--method", "frozen",
                   "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"), "--head-epochs", "2"])
    r = json.loads((tmp_path / "run" / "report.json").read_text())[0]
    missed = missed_rows(tmp_path / "run" / "missed_faces-Expr-RAF.tsv")
    bad = {n.replace(".jpg", "_aligned.jpg"): why for n, why in extra.items() if why}
    for name, why in bad.items():
        hit = [reason for path, reason in missed.items() if path.endswith(name)]
        assert hit and why in hit[0], (name, hit)
    assert r["missed_faces"] == len(missed) >= len(bad)
    # Every awkward file is a test image that the rule scores as wrong.
    res = r["results"]["frozen"]
    assert res["missed_test"] >= len(bad)
    assert res["value"] <= (res["n_test"] - res["missed_test"]) / res["n_test"] + 1e-9

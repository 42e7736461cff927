"""Reading face images from users' disks: the one reader of all three scripts.

Every odd format becomes 8-bit RGB (grey, 16-bit, CMYK, palette, alpha); the EXIF orientation is
applied; an animated GIF or a multi-page TIFF gives its first frame; pixels stored in a CSV
(`faces.csv#row12`, FER2013's layout) are read too. Every file that cannot be used (missing, a folder,
unreadable, empty, truncated, not an image, too small, a decompression bomb) raises BadImage with the
path and the reason, which the scripts list as a row without a face instead of stopping.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
MIN_SIDE = 8
# PIL's own refusal threshold (2 x MAX_IMAGE_PIXELS, 179 M pixels: larger than any camera photo). It is
# checked on the header, before a single pixel is decoded: a 30000 x 30000 bomb fits in a few kB.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Paths are text in images.txt and the .tsv lists; file names that are not UTF-8 round-trip through
# the bytes they have on disk (Python's own convention for such names).
PATH_ERRORS = "surrogateescape"
# In the reason of a file the system would not give (missing, permission denied, I/O error): the one kind of
# failure that may pass (a network mount back, a permission fixed), so --retry-unreadable looks for it.
CANNOT_READ = ": cannot read ("  # (with its punctuation, so that a file named "cannot read.jpg" is no match)
# Files are read whole before decoding; a 179 M-pixel 16-bit TIFF is about 1 GB, so anything past this is
# no photo (a disk image or a sparse file named .jpg) and would only fill the memory of every worker.
MAX_FILE_BYTES = 2 << 30
log = logging.getLogger(__name__)
# Filtered once here, because a catch_warnings block around each call is not thread-safe and extraction
# lanes decode in threads: torchvision's deprecation notice of the decoders decode_jpegs_on uses; PIL's
# decompression-bomb warning (decode_image checks the size itself and says so); PIL's notes on odd files
# (corrupt EXIF, palette transparency), which the decoders here handle or report as a BadImage.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class BadImage(Exception):
    """An image that cannot be used; the message names the file and the reason."""


def list_images(root: str | Path) -> list[str]:
    """Relative paths of every image under root, sorted so that the order (and the cache) is reproducible.

    Symbolic links are followed (datasets are often trees of links), each real folder once, so a link
    to a parent folder cannot loop. A folder named like an image (x.jpg/) is listed too, so that it
    becomes a row with its reason rather than vanishing, and is searched like any folder. Two things
    cannot become rows and are logged as warnings with their names instead: a subfolder that cannot be
    read (its images are unknown), and a file whose name holds a line break (the lists of paths have one
    name a line, so it would shift every later row; rename it to include it).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    found, seen, unreadable, broken = [], set(), [], []

    def cannot_read(e: OSError) -> None:
        if Path(e.filename) == root:
            raise PermissionError(f"cannot read the image folder {root} ({e.strerror})") from e
        unreadable.append(f"{os.path.relpath(e.filename, root)} ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=cannot_read):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # the folder's relative prefix once, not a relpath per file (at 4 M files that was most of the walk)
        prefix = os.path.relpath(dirpath, root)
        prefix = "" if prefix == "." else prefix + os.sep
        for name in dirnames + filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = prefix + name
                (broken if "\n" in rel else found).append(rel)  # a folder's name may hold it too
    if unreadable:
        # unlike an unreadable image (a row, which --retry-unreadable reads again), a folder's images never
        # enter the image list, so a resume cannot add them
        log.warning(f"{len(unreadable)} folder(s) under {root} cannot be read, their images are left out (of a "
                    f"cache made now for good: make them readable first, or rebuild it later with --overwrite): "
                    + "; ".join(unreadable[:10]) + (" ..." if len(unreadable) > 10 else ""))
    if broken:
        log.warning(f"{len(broken)} image(s) under {root} left out because their names hold a line break, "
                    "which the one-name-a-line path lists cannot store (rename them to include them): "
                    + ", ".join(repr(b) for b in broken[:10]) + (" ..." if len(broken) > 10 else ""))
    return sorted(found)


def to_rgb8(img: Image.Image) -> np.ndarray:
    """PIL image of any mode (grey, 16-bit, CMYK, palette, alpha) -> HxWx3 uint8 RGB, EXIF orientation applied."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the pixels are still good, keep them as stored
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit and 32-bit integer greys: rescale to 8 bits rather than clip, so they are not all white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.min() < 0:  # a signed range such as [-1, 1]: clipping would blacken its lower half
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are composited on mid-grey: black or white would look like a hard face edge.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ------------------------------------------------------------------------------------- pixels in a CSV
_ROW = re.compile(r"(.+)#row(\d+)")


@functools.lru_cache(maxsize=2)
def _csv_pixels(csv_path: str, stamp) -> tuple[np.ndarray, dict] | Exception:
    """All 48x48 faces of a FER2013-style CSV as one uint8 array, and {row: reason} for its unusable rows
    (their pixels stay 0), parsed once per version of the file (stamp: its size and time, so that a CSV
    rewritten in the same process, a notebook's, is read again, not its old pixels beside its new labels).
    One bad row costs that row only; a file that cannot be read at all is cached too, as its exception, so
    that each of 35,887 rows does not re-read it."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader)]
            col = header.index("pixels")
            faces, bad = [], {}
            for i, row in enumerate(reader):
                faces.append(np.zeros((48, 48), np.uint8))
                try:
                    values = np.fromstring(row[col], dtype=np.int64, sep=" ")
                except IndexError:
                    bad[i] = f"line {reader.line_num}: no pixels column (a cut-off line?)"
                except ValueError:
                    bad[i] = f"line {reader.line_num}: the pixels are not whole numbers separated by spaces"
                else:
                    if values.size == 48 * 48 and 0 <= values.min() and values.max() <= 255:
                        faces[-1] = values.astype(np.uint8).reshape(48, 48)
                    else:
                        bad[i] = (f"line {reader.line_num}: expected 2304 pixel values 0-255, got {values.size}"
                                  + (f" from {values.min()} to {values.max()}" if values.size else ""))
        return (np.stack(faces) if faces else np.zeros((0, 48, 48), np.uint8)), bad
    except (OSError, ValueError, StopIteration, csv.Error) as e:
        return e


def _csv_row(path: str, m) -> np.ndarray:
    try:
        st = os.stat(m[1])
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        stamp = None  # (the error itself is _csv_pixels's to give; once the file is there, it is read)
    parsed = _csv_pixels(m[1], stamp)
    if isinstance(parsed, Exception):
        raise BadImage(f"{path}: cannot read the pixels of {m[1]} ({type(parsed).__name__}: {parsed})")
    pixels, bad = parsed
    row = int(m[2])
    if row >= len(pixels):
        raise BadImage(f"{path}: {m[1]} has only {len(pixels)} rows")
    if row in bad:
        raise BadImage(f"{path}: {bad[row]}")
    return np.repeat(pixels[row][..., None], 3, axis=2)


# ---------------------------------------------------------------------------------------- the reader
def read_bytes(path: str | Path) -> bytes:
    """The bytes of one image file; a missing, unreadable, empty or oversized file, or one that is not a
    regular file (a FIFO or a device named .jpg would block or never end), raises BadImage."""
    path = Path(path)
    try:
        # opened first so that the checks are of this very file; non-blocking because opening a FIFO
        # waits for a writer that never comes (regular files ignore the flag)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise BadImage(f"{path}: a folder, not an image file")
            if not stat.S_ISREG(st.st_mode):
                raise BadImage(f"{path}: not a regular file (a pipe, socket or device), not read")
            if st.st_size > MAX_FILE_BYTES:
                raise BadImage(f"{path}: {st.st_size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES >> 30} GiB "
                               "limit for one image file")
            data = f.read()
    except IsADirectoryError as e:
        raise BadImage(f"{path}: a folder, not an image file") from e
    except OSError as e:  # missing, permission denied, symbolic link loop, I/O error
        raise BadImage(f"{path}{CANNOT_READ}{e.strerror or e})") from e
    if not data:
        raise BadImage(f"{path}: empty file (0 bytes)")
    return data


def decode_image(data: bytes, path: str | Path = "image") -> np.ndarray:
    """Decode one file's bytes fully (truncated files fail here, not later) to HxWx3 uint8 RGB."""
    try:
        img = Image.open(io.BytesIO(data))  # (a decompression bomb's size is checked below)
    except Image.DecompressionBombError as e:
        raise BadImage(f"{path}: refused, {e}") from e
    except Exception as e:  # PIL raises many types for data it does not recognise
        # its message names the in-memory buffer by address; drop that so a rerun lists the same reason
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {reason})") from e
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadImage(f"{path}: refused, {w}x{h} = {w * h / 1e6:.0f} M pixels is over the "
                           f"{MAX_PIXELS / 1e6:.0f} M-pixel limit (a decompression bomb?)")
        try:
            img.load()  # the first frame of an animated GIF or a multi-page TIFF
            arr = to_rgb8(img)
        except Exception as e:
            raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if arr.shape[0] < MIN_SIDE or arr.shape[1] < MIN_SIDE:
        raise BadImage(f"{path}: image is only {arr.shape[1]}x{arr.shape[0]} pixels")
    return arr


def csv_row_path(path) -> bool:
    """True for a face stored as pixels in a CSV (`faces.csv#row12`), which has no bytes of its own."""
    return _ROW.fullmatch(str(path)) is not None and not os.path.lexists(path)


def read_image(path: str | Path, with_hash: bool = False):
    """Decode one image fully to HxWx3 uint8 RGB. With with_hash, also returns the sha1 of the file's
    bytes, read once for both (of the pixels for a CSV row)."""
    if csv_row_path(path):
        arr = _csv_row(str(path), _ROW.fullmatch(str(path)))
        return (arr, hashlib.sha1(arr.tobytes()).hexdigest()) if with_hash else arr
    data = read_bytes(path)
    arr = decode_image(data, path)
    return (arr, hashlib.sha1(data).hexdigest()) if with_hash else arr


def _common_sampling(img) -> bool:
    """4:4:4, 4:2:2 or 4:2:0, the chroma subsamplings photos are saved with; rarer ones (4:1:1, 4:4:0,
    odd factors) stay on PIL rather than trust nvjpeg with layouts nobody checked."""
    layers = getattr(img, "layer", None) or []
    return (len(layers) == 3 and tuple(layers[0][1:3]) in {(1, 1), (2, 1), (2, 2)}
            and all(tuple(c[1:3]) == (1, 1) for c in layers[1:]))


def _ycbcr(img) -> bool:
    """Colour stored as YCbCr, as nearly every JPEG is. One stored as RGB (an Adobe marker with transform 0,
    or components named R, G, B) decodes right in libjpeg; whether nvjpeg honours that is unchecked, so
    those take PIL's path rather than risk wrong colours without an error."""
    return img.info.get("adobe_transform") != 0 and [c[0] for c in img.layer] != [82, 71, 66]


def nvjpeg_safe(data: bytes) -> bool:
    """True when the GPU JPEG decoder gives the pixels PIL would: a complete baseline three-component
    (RGB) JPEG in a common subsampling, its colour stored as YCbCr, with no EXIF rotation, at least MIN_SIDE
    and at most MAX_PIXELS.
    Everything else (grey, CMYK, progressive, rotated, truncated, not a JPEG, a bomb) takes the PIL
    path, which keeps every bad-input rule. Grey is in that list because nvjpeg (torchvision 0.26, H100)
    decoded a grey JPEG with 2x2 sampling into wrong pixels (mean error 63 levels) without any error.
    Reads the header only."""
    if not (data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(0x0112, 1)
            w, h = img.size
            return (img.format == "JPEG" and img.mode == "RGB" and _common_sampling(img) and _ycbcr(img)
                    and not img.info.get("progressive")
                    and not img.info.get("progression") and orientation == 1 and min(w, h) >= MIN_SIDE
                    and w * h <= MAX_PIXELS)
    except Exception:
        return False


def decode_jpegs_on(datas: list[bytes], device) -> list:
    """Decode nvjpeg_safe JPEG bytes on a CUDA device in one batched call: a list of (3, H, W) uint8 tensors."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if torch.device(device).type == "cuda":
        # torchvision allocates the outputs on the current stream but writes them from its own decoder
        # stream, which does not wait for the current one: a block just freed there, under kernels still
        # queued, could be overwritten before they ran. So the current stream is drained first.
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def encode_paths(paths) -> bytes:
    """Paths one a line, as bytes; names that are not UTF-8 keep their bytes on disk."""
    paths = list(paths)
    for p in paths:
        if "\n" in p:  # list_images leaves these out; a silent shift of every later row is worse than a stop
            raise ValueError(f"a path holds a line break and cannot be stored one a line: {p!r}")
    return "".join(p + "\n" for p in paths).encode("utf-8", PATH_ERRORS)


def decode_paths(data: bytes) -> list[str]:
    text = data.decode("utf-8", PATH_ERRORS)
    return text.split("\n")[:-1] if text else []  # not splitlines(): a name may hold \x1c or \u2028

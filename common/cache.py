"""The feature cache: every teacher's h_i for every face, computed once, stored in memory-mapped shards.

Layout of a cache folder (all writes atomic: temp file + os.replace, so a killed run leaves only
whole files behind):
    manifest.json          plan (teachers with widths and versions, image list hash, shard table), then
                           normalisation statistics and complete=true once every shard is written
    images.txt             the image paths, relative to the data root, one per line, in row order
    stamps.npy             (n, 2) int64: each image's size and modification time when the cache was planned,
                           to name the files that changed when a resume is refused (list_changes)
    face_boxes.npy         (n, 4) float64: each image's face box (x0, y0, x1, y1; NaN for none), for datasets
                           that give them (AffectNet); detection searches around it
    shards/NNNNN.npy       (rows, sum of teacher widths) features in the cache dtype, teachers side by side
    crops/NNNNN.npy        the crop store: (rows, S, S, 3) uint8, each face's canonical crop (common.align)
                           at S = crop_size pixels (black for rows without a face), so that distill.py and
                           transfer.py never decode a source image again; its sha256 per shard goes into
                           the shard's meta and, at the end, into the manifest (crops_sha256)
    shards/NNNNN.meta.npz  per row: face found, 2x3 alignment matrix, detector score, file sha1, failure
                           reason; per shard: sum and sum of squares for the statistics
    stats.npz              per-dimension mean and std over the faces found (descriptive; G keeps the
                           statistics of its own training faces beside h_G)
    emb/NAME               fused embeddings (h_G of an operator) in the same shard layout, + meta.json,
                           G.safetensors, split.npz and stats.npz (the mean and std G's input h_i were
                           standardised with, from G's training faces), val_rows.npy (the faces G held
                           out, which distill.py holds out too) and target_sums.npz (h_G's column sums over
                           the others, distill.py's training faces, for its target statistics); emb/NAME is a
                           link to emb/.NAME.<stamp>/. A rerun writes a new such folder and swaps the
                           link in one rename, so a reader sees the old version or the new one, never a
                           mix; the version just replaced is kept for readers still on it.
    emb/.default           the name of the h_G that readers take when none is named (the last one written)
    fits/                  the state of each fit of G (fuse.py; common.fusion.fit_file names them), so that a
                           killed run resumes its fits
A shard is done when its .npy exists (written last), which is all that resuming needs to know, as long
as no file was damaged after it was written (a copy cut short, an edit): damaged_shards() finds those
from headers and sizes alone, fuse.py redoes them, and readers raise CacheDamaged naming the file.
Sized for millions of faces: nothing here holds more than one shard in memory, the number of shard
files open at once is bounded (MAX_OPEN), and the paths are one byte buffer, not millions of strings.
"""
from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from common import locks
from common.align import CROP_SIZE, DETECT_SIZE, DETECTOR, MIN_FACE_PROB, SMALLEST_FACE
from common.files import atomic_write, default_mode, remove_temporary, write_json
from common.images import CANNOT_READ, PATH_ERRORS, csv_row_path, decode_paths, encode_paths

FORMAT = 2  # 2: the crop store


def _open_budget() -> int:
    """Shard files a ShardedArray keeps mapped (each map holds a file descriptor): half the process's
    open-file limit, after raising its soft limit to the hard one as data loaders commonly do. Where
    the hard limit is the usual 1,024 that is 512; past it, the least recently used map is closed, and
    reopening one costs ~0.1-1 ms, so the budget is kept as large as the limit allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(64, min(soft // 2, 1 << 16))


MAX_OPEN = _open_budget()


def open_files_warning(n_files: int) -> str | None:
    """A warning when a run reads more shard files than it may keep open (MAX_OPEN): random batches then reopen
    files all the time (+29 ms a batch measured at 1,006 shards and a budget of 512; far more on network
    storage). None when they fit."""
    if n_files <= MAX_OPEN:
        return None
    return (f"warning: this run reads {n_files} shard files and keeps at most {MAX_OPEN} open (half the open-file "
            f"limit, `ulimit -Hn`): random batches will reopen files, slower on network storage; raise the hard "
            f"limit, or extract the cache with a larger --shard-size")
# What write_shard puts in a shard's meta.npz (and crops_sha256 with a crop store).
META_KEYS = ("found", "matrix", "score", "sha1", "reason", "count", "sum", "sumsq")
IOV_MAX = 1024  # buffers one os.preadv may take (POSIX's minimum, Linux's value)


class CacheMismatch(Exception):
    """The cache on disk was written for other teachers or other images (problems: what differs)."""

    def __init__(self, message: str, problems=()):
        super().__init__(message)
        self.problems = list(problems)


class CacheDamaged(CacheMismatch):
    """A file of the cache is cut short, corrupt or missing (a copy interrupted, an edit, a disk that failed).
    A CacheMismatch, so that the scripts end on its one-line message: the file and what is wrong with it
    (also in .problems, for a caller that repairs it itself or knows a better remedy), then what to do."""

    def __init__(self, what: str, remedy: str = ""):
        super().__init__(what + (f": {remedy}" if remedy else ""), [what])


def _redo_hint(cache, data_root) -> str:
    return (f"run the command that wrote it again with the same arguments (`python fuse.py --data {data_root} "
            f"--cache {cache}`, or transfer.py for a task cache): it redoes damaged shards")


def _rebuild_hint(cache, data_root="DIR") -> str:
    return (f"the cache must be rebuilt (`python fuse.py --data {data_root} --cache {cache} --overwrite`) "
            f"or restored from a copy")


# What FeatureCache reads from a manifest of this FORMAT; without one of them it fails on a KeyError later.
MANIFEST_KEYS = ("format", "teachers", "dtype", "data_root", "n_images", "shard_bounds", "crop_size")


MAX_MANIFEST = 64 * 2**20  # bytes; the manifest of 4.12 M faces is under 1 MB (the file lists sit beside it)


def read_manifest(cache: Path) -> dict:
    """The manifest of the cache folder `cache`; CacheDamaged if it is not JSON or lacks a key this code reads."""
    path = Path(cache) / "manifest.json"
    if path.is_file() and path.stat().st_size > MAX_MANIFEST:  # parsed, JSON takes ~20x its size in memory
        raise CacheDamaged(f"{path} is {path.stat().st_size / 2**20:.0f} MB, no manifest this code writes (a few kB "
                           f"to a few MB at millions of faces): not read", _rebuild_hint(cache))
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CacheDamaged(f"{path} is not valid JSON ({e})", _rebuild_hint(cache)) from None
    if not isinstance(manifest, dict):
        raise CacheDamaged(f"{path} holds a JSON {type(manifest).__name__}, not a manifest", _rebuild_hint(cache))
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if manifest.get("format") == FORMAT and missing:  # another format has other keys: the caller says so
        raise CacheDamaged(f"{path} lacks {', '.join(missing)}", _rebuild_hint(cache, manifest.get("data_root", "DIR")))
    return manifest


def lock_file(path: Path) -> Path:
    """The lock of the cache at path: in a hidden folder beside it, so that deleting the cache keeps it."""
    path = Path(path)
    return path.parent / ".locks" / f"{path.name}.lock"


def readers_lock_file(path: Path) -> Path:
    """The lock that runs reading the cache at path share (distill.py, transfer.py, a --faces-from fuse.py), and
    that fuse.py takes alone before it deletes or rewrites files of it (--overwrite, --retry-unreadable ...)."""
    return lock_file(path).with_suffix(".readers.lock")


def hold_for_reading(path: Path) -> None:
    """Keep the cache at path from being deleted or rewritten by fuse.py while this script's main runs."""
    locks.hold(readers_lock_file(path), f"error: a fuse.py run is deleting or rewriting the cache {path} "
                                        f"(--overwrite, --retry-unreadable ...): wait for it to end", shared=True)


@contextmanager
def writer_lock(path: Path, log=None):
    """One process at a time writes the cache at path: two transfer.py runs on one dataset (two methods started
    side by side) extracted the same task cache twice over, into the same files. Another process waits, saying
    so, and then finds the cache finished. Yields whether the lock is held (False where none can be had)."""
    f = locks.acquire(lock_file(path), log=log, what=path, quiet=path.exists() and not os.access(path, os.W_OK))
    try:
        yield f is not None
    finally:
        if f is not None:
            f.close()


def save_rows(path: Path, rows: np.ndarray) -> str:
    """np.save's bytes of a shard (its rows: crops, features, h_G) in C order, whole or not at all; returns
    their sha256, hashed as they are written (a 200 MB crop shard is not read back). The rows of images without
    a face are all zero, and are skipped over instead of written: the file holds the same bytes, but those rows
    take no disk on file systems with holes (a corpus where 30 % of the images hold no face, or a folder of junk
    files, paid 48 kB of crop and 6 kB of features per such row at the default sizes)."""
    digest, row = hashlib.sha256(), rows[0].nbytes if len(rows) else 0
    rows = np.ascontiguousarray(rows)
    flat = rows.view(np.uint8).reshape(len(rows), row)  # bytes: a -0.0 is not a hole
    used = (flat.view(np.uint64) if row % 8 == 0 else flat).any(1)
    edges = np.flatnonzero(np.diff(np.r_[0, used.view(np.int8), 0])).reshape(-1, 2)  # [start, stop) of used rows

    def write(f):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(rows))
        header = header.getvalue()
        f.write(header)
        digest.update(header)
        zeros, done = memoryview(bytes(row * min(len(rows), 64))), 0
        for lo, hi in [*edges.tolist(), (len(rows), len(rows))]:
            for z in range(done, lo, 64):  # the hash sees the zero rows, the file only their length
                digest.update(zeros[:row * (min(lo, z + 64) - z)])
            f.seek(row * (lo - done), os.SEEK_CUR)
            f.write(flat[lo:hi].data)
            digest.update(flat[lo:hi].data)
            done = hi
        f.truncate()  # the length a trailing run of zero rows leaves unwritten

    atomic_write(path, write)
    return digest.hexdigest()


def version_change(name: str, then: str, now: str) -> str:
    """What differs between two versions of teacher `name` (PACKAGE:WEIGHTS_SHA256:PREPROCESSING_SHA1, as
    common.teachers.Teacher makes them and a manifest records them), in words: an edited weight file of one's
    own read as two opaque hashes."""
    a, b = then.split(":"), now.split(":")
    if len(a) != 3 or len(b) != 3:
        return f"{name}: version {then} then, {now} now"
    if a[1] != b[1]:
        source = f"package {a[0]} then, {b[0]} now" if a[0] != b[0] else (
            "a weight file of your own" if a[0] == "user" else f"package {a[0]}")
        return f"{name}: its weight file changed (sha256 {a[1]}... then, {b[1]}... now; {source})"
    return f"{name}: its preprocessing changed (layer, input size, box, colour, mean/std, layout or pooling)"


def file_stamps(root: Path, images) -> np.ndarray:
    """(n, 2) int64: each image's size and modification time in ns, one stat per file and no read; -1 for
    a missing file. An image stored inside a CSV ("fer2013.csv#row12") has the CSV's stamp, so that a CSV
    edited in place changes it too."""
    out = np.full((len(images), 2), -1, np.int64)
    base = os.fspath(root)

    def stat_chunk(lo: int) -> int:
        for i in range(lo, min(lo + STAT_CHUNK, len(images))):
            rel = images[i]
            try:
                st = os.stat(os.path.join(base, rel) if "#row" not in rel else source_file(root, rel))
                out[i] = st.st_size, st.st_mtime_ns
            except OSError:  # missing
                pass
        return min(STAT_CHUNK, len(images) - lo)

    # stat waits on the disk (on a network file system, ~1 ms a file) without the GIL: threads overlap the waits
    with ThreadPoolExecutor(STAT_THREADS) as pool, \
            tqdm(total=len(images), unit="file", desc="stat", disable=None if len(images) > STAT_CHUNK else True,
                 leave=False) as bar:
        for n in pool.map(stat_chunk, range(0, len(images), STAT_CHUNK)):
            bar.update(n)
    return out


STAT_CHUNK, STAT_THREADS = 8192, 8


def source_file(root: Path, rel: str) -> Path:
    """The file an image row reads: itself, or the CSV that holds it ("fer2013.csv#row12")."""
    csv_row = "#row" in rel and csv_row_path(Path(root) / rel)
    return Path(root) / (rel.rsplit("#row", 1)[0] if csv_row else rel)


def list_hash(root: Path, images, stamps: np.ndarray | None = None) -> str:
    """Hash of the image list with each file's size and modification time (file_stamps): it changes when a
    file is added, removed, replaced or edited in place (even at the same size, as a BMP is). The bytes
    themselves are hashed as they are decoded: see FeatureCache.content_hash."""
    stamps = file_stamps(root, images) if stamps is None else stamps
    if len(stamps) != len(images):
        raise ValueError(f"{len(stamps)} stamps for {len(images)} images")
    h = hashlib.sha256()
    step = 65536  # the stamps as Python ints a slice at a time: 4 M rows at once were 0.5 GB of them
    for start in range(0, len(images), step):
        names = images[start:start + step]
        for rel, (size, mtime) in zip(names, stamps[start:start + step].tolist()):
            stamp = "-1" if size < 0 else f"{size}\t{mtime}"
            h.update(f"{rel}\t{stamp}\n".encode("utf-8", PATH_ERRORS))
    return h.hexdigest()


def list_changes(cache_path: Path, images, stamps: np.ndarray) -> str:
    """What differs between the files a cache was made from (its images.txt and stamps.npy) and `images`
    with `stamps` now, naming a few of each: added, removed, changed size or time. A cache made before
    stamps were kept tells the names apart only."""
    cache_path = Path(cache_path)
    try:
        old = decode_paths((cache_path / "images.txt").read_bytes())
    except OSError:
        return "its list of images cannot be read"
    try:
        old_stamps = np.load(cache_path / "stamps.npy")
    except (OSError, ValueError):
        old_stamps = None
    known = old_stamps is not None and len(old_stamps) == len(old)
    if old == list(images):  # the usual case, files edited in place: no maps of millions of names
        added, removed = [], []
        changed = [old[i] for i in np.flatnonzero((old_stamps != stamps).any(1))] if known else None
    else:
        images = list(images)
        old_at = {p: i for i, p in enumerate(old)}
        at = np.fromiter((old_at.get(p, -1) for p in images), np.int64, len(images))  # each image's old row
        both = np.flatnonzero(at >= 0)
        added = [images[i] for i in np.flatnonzero(at < 0)]
        kept = np.zeros(len(old), bool)
        kept[at[both]] = True
        removed = [old[i] for i in np.flatnonzero(~kept)]
        # one array comparison: a small one per file took ~2.5 s a million files
        changed = ([images[i] for i in both[(old_stamps[at[both]] != np.asarray(stamps)[both]).any(1)]]
                   if known else None)
    few = lambda ps: ", ".join(ps[:5]) + (f" and {len(ps) - 5} more" if len(ps) > 5 else "")  # noqa: E731
    parts = [f"{len(ps)} {what} ({few(ps)})" for ps, what in ((added, "added"), (removed, "removed"),
                                                             (changed or [], "changed size or modification time"))
             if ps]
    if parts:
        return "files " + "; ".join(parts)
    if changed is None:
        return "the same names, so a file was edited or replaced (the cache predates the record of which)"
    return "the same files in another order"


def only_appeared(cache_path: Path, images, plan: dict) -> bool:
    """True when `images` are the names the cache was planned with and every file whose stamp changed was
    missing then (a dangling link, an unmounted folder): the rows listed "cannot read" that now read."""
    try:
        old_stamps = np.load(Path(cache_path) / "stamps.npy")
        same_names = decode_paths((Path(cache_path) / "images.txt").read_bytes()) == list(images)
    except (OSError, ValueError):
        return False
    if not same_names or old_stamps.shape != plan["stamps"].shape:
        return False
    changed = (old_stamps != plan["stamps"]).any(1)
    return bool(changed.any()) and bool((old_stamps[changed, 0] < 0).all())


def face_boxes(boxes) -> np.ndarray | None:
    """A dataset's face boxes, one (x0, y0, x1, y1) row per image in pixels, NaN where it gives none; None
    when it gives none at all."""
    if boxes is None:
        return None
    rows = [(np.nan,) * 4 if b is None else tuple(b) for b in boxes]
    out = np.array(rows, np.float64).reshape(len(rows), 4)
    return None if np.isnan(out).all() else out


def boxes_hash(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, np.float64).tobytes()).hexdigest()


def make_plan(data_root, images, teachers, shard_size=4096, dtype="float16", align="mtcnn", min_face_prob=MIN_FACE_PROB,
              crop_size=CROP_SIZE, detect_size=DETECT_SIZE, smallest_face=SMALLEST_FACE, boxes=None,
              stamps=None) -> dict:
    """What a cache of these images, teachers and settings holds: its manifest before any shard (see
    FeatureCache.create_or_resume). boxes: face_boxes' array (each image's face is searched around its box;
    they change which face a row gets, so their hash is part of the plan), or None. stamps: file_stamps of
    the images, when known without a stat of each (a complete cache's own stamps.npy)."""
    boxes = face_boxes(boxes) if align == "mtcnn" else None  # crops taken as they are have no face to pick
    stamps = file_stamps(data_root, images) if stamps is None else stamps
    return {
        "format": FORMAT,
        "teachers": [{"name": t.name, "dim": int(t.dim), "version": t.version}
                     | ({"spec": t.record} if hasattr(t, "record") else {}) for t in teachers],
        "dtype": dtype,
        "align": align,
        "min_face_prob": float(min_face_prob) if align == "mtcnn" else None,
        "detect_size": int(detect_size) if align == "mtcnn" else None,
        "smallest_face": int(smallest_face) if align == "mtcnn" else None,
        "detector": DETECTOR if align == "mtcnn" else None,
        "data_root": str(Path(data_root).resolve()),
        "n_images": len(images),
        "list_hash": list_hash(data_root, images, stamps),
        "shard_size": shard_size,
        "shard_bounds": list(range(0, len(images), shard_size)) + [len(images)],
        "crop_size": int(crop_size),
        "boxes": boxes_hash(boxes) if boxes is not None else None,
        # not in the manifest (PLAN_ARRAYS): stamps.npy, to say which files changed (list_changes); face_boxes.npy
        "stamps": stamps,
        "box_array": boxes,
    }


PLAN_ARRAYS = ("stamps", "box_array")  # a plan's arrays, kept in files of their own beside the manifest


def as_planned(manifest: dict) -> dict:
    """A manifest with the keys its cache predates filled as that cache was made: caches written before
    smallest_face existed searched every pyramid level, as 20 does."""
    return {"smallest_face": 20 if manifest.get("align") == "mtcnn" else None, "boxes": None, **manifest}


# The reason of a row whose face was found but on which a teacher gave inf or NaN (common.extract)
NON_FINITE = "gave inf or NaN features"


class Missed(NamedTuple):
    no_face: int  # no face detected
    unusable: int  # the file: unreadable, not an image, too small ...
    unread: int  # of those, a file the system would not give (CANNOT_READ)
    teachers: int  # a face, on which a teacher gave inf or NaN (NON_FINITE)

    def kinds(self) -> str:
        failed = f", {self.teachers} on which a teacher gave inf or NaN" if self.teachers else ""
        return f"{self.no_face} with no face, {self.unusable} unreadable or missing{failed}"


def write_missed(cache: "FeatureCache", path: Path) -> Missed:
    """List every image without a usable face, and why, in a .tsv, and count them by kind. Streamed shard
    by shard, in one pass: at millions of images the list is never held whole."""
    counts = [0, 0, 0, 0]

    def rows():
        for i, r in cache.missed():
            counts[3 if NON_FINITE in r else 0 if r == "no face detected" else 1] += 1
            counts[2] += CANNOT_READ in r
            yield cache.images[i], r

    write_reasons(path, rows())
    return Missed(*counts)


def write_reasons(path: Path, rows) -> None:
    """(path, reason) rows as a tab-separated file with a header, atomically, as they come. The csv module's
    excel-tab dialect quotes a name holding a tab, a quote or a line-break character (\r included, which its
    \r\n line ends make it quote), so every reader of such files (csv, pandas, a spreadsheet) gets the name
    back instead of a shifted or split row."""
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", errors=PATH_ERRORS, newline="")
        writer = csv.writer(text, dialect="excel-tab")
        writer.writerow(("path", "reason"))
        writer.writerows(rows)
        text.flush()
        text.detach()  # the file is atomic_write's to close

    atomic_write(path, write)


class PathArray:
    """Row-ordered paths held as one byte buffer plus offsets: 4 M paths cost their bytes and 8 bytes
    each, and DataLoader workers share the pages instead of copying 4 M Python strings whose reference
    counts they touch. Indexing gives str (a slice, a list of str)."""

    def __init__(self, data: bytes):
        self._buf = np.frombuffer(data, np.uint8)
        self._offsets = np.concatenate([[0], np.flatnonzero(self._buf == ord("\n")) + 1]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= start:
                return []
            return decode_paths(self._buf[self._offsets[start]:self._offsets[stop]].tobytes())  # one decode
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"path {i} of {len(self)}")
        return self._buf[self._offsets[i]:self._offsets[i + 1] - 1].tobytes().decode("utf-8", PATH_ERRORS)

    def __iter__(self):
        return iter(decode_paths(self._buf.tobytes()))

    def __eq__(self, other):
        return list(self) == list(other)

    __hash__ = None

    def index(self, path: str) -> int:
        return list(self).index(path)


def _read_header(f):
    """(shape, dtype, offset of the data) of an open .npy file; ValueError naming what is wrong with it."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except ValueError as e:
        raise ValueError(f"not a .npy file ({e})") from None
    if fortran:
        raise ValueError("not stored in C order")
    return tuple(shape), dtype, f.tell()


def npy_problem(path, shape=None, dtype=None) -> str | None:
    """What is wrong with the .npy file at path, from its header and size alone (None: it looks whole);
    shape and dtype, when given, are what it must hold. Two small reads, never the data: a check of every
    shard costs O(shards), not a pass over 200 GB."""
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: a header, not the 4-8 kB a buffer would fetch
            got, got_dtype, offset = _read_header(f)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "missing"
    except ValueError as e:
        return str(e)
    shape = got if shape is None else tuple(shape)
    dtype = got_dtype if dtype is None else np.dtype(dtype)
    if got != shape or got_dtype != dtype:
        return f"holds {got_dtype} {got}, expected {dtype} {shape}"
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < want:
        return f"truncated: {size} bytes of {want}"
    if size > want:
        return f"{size - want} bytes past the end of its array"
    return None


def safetensors_problem(path) -> str | None:
    """What is wrong with the .safetensors file at path, from its header alone (None: it opens)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return "missing"
    try:
        with safe_open(str(path), "np") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        return f"not a readable .safetensors file ({type(e).__name__}: {e})"
    return None


def npz_problem(path, keys) -> str | None:
    """What is wrong with the .npz file at path, from its zip directory alone (None: it opens and holds keys).
    The directory sits at the end of the file, so a copy cut short anywhere loses it."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except FileNotFoundError:
        return "missing"
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"not a readable .npz ({e})"
    lacking = [k for k in keys if f"{k}.npy" not in names]
    return f"lacks {', '.join(lacking)}" if lacking else None


@contextmanager
def open_npz(path, remedy: str):
    """np.load of an .npz, a file cut short, corrupt or missing ending as CacheDamaged naming it. The block
    runs inside: npz members are read when indexed, so that is where a corrupt member shows."""
    try:
        with np.load(path) as z:
            yield z
    except FileNotFoundError:
        raise CacheDamaged(f"{path} is missing", remedy) from None
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, zlib.error) as e:
        raise CacheDamaged(f"{path} is damaged ({type(e).__name__}: {e})", remedy) from None


def _open_rows(path, rows: int):
    """(unbuffered file, offset of row 0, bytes a row) of a .npy of `rows` rows; ValueError if it is not one
    or is shorter than its header says (found at open, not at the first read past the end)."""
    f = open(path, "rb", buffering=0)
    try:
        shape, dtype, offset = _read_header(f)
        stride = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        if shape[0] != rows:
            raise ValueError(f"holds {shape[0]} rows, expected {rows}")
        size = os.fstat(f.fileno()).st_size
        if size < offset + rows * stride:
            raise ValueError(f"truncated: {size} bytes of {offset + rows * stride}")
    except BaseException:
        f.close()
        raise
    return f, offset, stride


class OpenFiles:
    """Shard files held open (memory maps, files for positioned reads), at most `budget` of them, the least
    recently used closed first (a map or file still in use closes when its user lets go of it)."""

    def __init__(self, budget: int):
        self.budget, self._open, self._lock = budget, OrderedDict(), threading.Lock()

    def get(self, key, opener):
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        handle = opener()  # outside the lock: opening may take a disk read
        with self._lock:
            while len(self._open) >= self.budget:
                self._open.popitem(last=False)
            self._open[key] = handle
            return handle

    def forget(self, path) -> None:
        """Drop what is held open of path: a shard removed or written anew is another file under that name,
        and a map or descriptor kept would go on reading the old one."""
        with self._lock:
            for key in [k for k in self._open if k[1] == str(path)]:
                del self._open[key]

    def clear(self) -> None:
        """Drop everything held open: files may be deleted and written anew between two runs of one process
        (a notebook's fuse.py --overwrite), and a map kept would read the old ones."""
        with self._lock:
            self._open.clear()

    def __len__(self):
        return len(self._open)


# One budget for the process: a loader worker reads crops and targets, evaluation crops and features,
# each array of up to ~1,000 shards at 4.12 M faces, and a budget per array let them add up past the limit.
OPEN_FILES = OpenFiles(MAX_OPEN)


@dataclass
class ShardedArray:
    """Rows spread over several .npy shards, read through memory maps opened when first needed. The shard
    files open at once are bounded for the whole process (OPEN_FILES, the least recently used closed first;
    max_open gives an array a budget of its own), so no number of shards or arrays can exhaust the
    process's file descriptors.

    direct=True: take() reads its rows with positioned reads (os.preadv straight into the result, one
    call per run of consecutive rows) instead of through the maps. For rows of many pages read at
    random from more data than memory holds, i.e. the crop store at the paper's scale (203 GB for
    4.12 M faces): through a map, each page of a row not in memory is a synchronous fault, and the
    kernel's read-around pulls in up to read_ahead_kb around each. Random 48 kB crops of a cold store,
    bench/cache.py on the 2-core VM: see BENCHMARKS.md.

    A shard file missing, cut short or holding other rows than bounds say is a CacheDamaged naming it,
    when it is opened (or read, if it was cut short since), followed by `remedy`."""
    files: list[Path]
    bounds: np.ndarray  # shard k holds rows bounds[k]:bounds[k+1]
    max_open: int | None = None
    direct: bool = False
    remedy: str = ""  # what to do about a damaged shard, said in the error

    def __post_init__(self):
        # thread-safe: fusion's read-ahead thread and the main one read the same arrays
        self._maps = OPEN_FILES if self.max_open is None else OpenFiles(self.max_open)

    def __getstate__(self):  # to another process (a spawned loader worker): the paths, not the open files
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def _damaged(self, k: int, what: str) -> CacheDamaged:
        return CacheDamaged(f"{self.files[k]}: {what}", self.remedy)

    def _map(self, k: int) -> np.ndarray:
        rows = int(self.bounds[k + 1] - self.bounds[k])
        try:
            m = np.load(self.files[k], mmap_mode="r")
        except FileNotFoundError:
            raise self._damaged(k, "missing") from None
        except (ValueError, EOFError) as e:  # "mmap length is greater than file size", a header cut short
            raise self._damaged(k, f"truncated or corrupt ({e})") from None
        if len(m) != rows:
            raise self._damaged(k, f"holds {len(m)} rows, expected {rows}")
        return m

    def shard(self, k: int) -> np.ndarray:
        return self._maps.get(("map", str(self.files[k])), lambda: self._map(k))

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self):
        return (len(self), *self.shard(0).shape[1:])

    def _file(self, k: int):
        """Shard k opened for positioned reads: (unbuffered file, offset of row 0, bytes a row). The file
        object, not a bare descriptor, so that one evicted under another thread's read closes only when
        that read lets go of it."""
        def opener():
            try:
                return _open_rows(self.files[k], int(self.bounds[k + 1] - self.bounds[k]))
            except FileNotFoundError:
                raise self._damaged(k, "missing") from None
            except ValueError as e:
                raise self._damaged(k, str(e)) from None

        return self._maps.get(("file", str(self.files[k])), opener)

    def _read_direct(self, k: int, local: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """out[dest] = rows `local` (ascending) of shard k, each distinct row read once, consecutive ones in
        one call."""
        f, offset, stride = self._file(k)
        first = np.r_[True, local[1:] != local[:-1]]
        rows, into = local[first], dest[first]
        runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1)
        for run in runs:
            for s in range(0, len(run), IOV_MAX):
                part = run[s:s + IOV_MAX]
                bufs = [memoryview(out[j]).cast("B") for j in into[part]]
                got = os.preadv(f.fileno(), bufs, offset + int(rows[part[0]]) * stride)
                if got != len(part) * stride:  # cut short since it was opened
                    raise self._damaged(k, f"short read ({got} of {len(part) * stride} bytes at row "
                                           f"{rows[part[0]]}); the file is truncated")
        if not first.all():  # a row asked for twice: copied from its first place
            out[dest[~first]] = out[into[np.cumsum(first)[~first] - 1]]

    def take(self, rows) -> np.ndarray:
        """Rows in the order asked, gathered shard by shard so each shard is touched once (the rows sorted
        once and cut at the shard bounds: a random batch at 4.12 M faces touches hundreds of shards)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.shard(0).dtype)
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        if len(rows) and (ranked[0] < 0 or ranked[-1] >= len(self)):
            raise IndexError(f"rows {ranked[0]}..{ranked[-1]} asked of an array of {len(self)}")
        cuts = np.searchsorted(ranked, self.bounds)
        for k in np.flatnonzero(cuts[1:] > cuts[:-1]):
            dest = order[cuts[k]:cuts[k + 1]]
            local = ranked[cuts[k]:cuts[k + 1]] - self.bounds[k]
            if self.direct and hasattr(os, "preadv"):
                self._read_direct(int(k), local, out, dest)
            else:
                out[dest] = self.shard(k)[local]
        return out


class FeatureCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pinned = {}  # h_G name -> the version folder this object reads (pin_embedding)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"no feature cache at {self.path} (no manifest.json): "
                                    f"run `python fuse.py --data DIR --cache {self.path}` first")
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != FORMAT:
            raise CacheMismatch(f"{manifest}: cache format {self.manifest.get('format')}, this code reads {FORMAT}")
        listing = self.path / "images.txt"
        try:
            self.images = PathArray(listing.read_bytes())
        except FileNotFoundError:
            raise CacheDamaged(f"{listing} is missing", _rebuild_hint(self.path, self.data_root)) from None
        if len(self.images) != self.manifest["n_images"]:  # else every row past the fault has another's name
            raise CacheDamaged(f"{listing} lists {len(self.images)} paths, manifest.json {self.manifest['n_images']} "
                               f"images (a copy cut short, or a name with a line break written by an older "
                               f"version)", _rebuild_hint(self.path, self.data_root))
        self.bounds = np.array(self.manifest["shard_bounds"], dtype=np.int64)
        self._meta = None

    # -- creation and resume ---------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path, data_root, images, teachers, shard_size=4096, dtype="float16",
                         align="mtcnn", min_face_prob=MIN_FACE_PROB, crop_size=CROP_SIZE,
                         detect_size=DETECT_SIZE, smallest_face=SMALLEST_FACE, plan=None, boxes=None,
                         appeared_ok=False, locked=False) -> "FeatureCache":
        """Write the plan of a new cache, or check that an existing one was planned identically.

        The plan holds everything that changes what the cache contains: teachers (weights and
        preprocessing), images (names, sizes, times), storage type, alignment, the detector's
        threshold, the size of the copy it sees and the smallest face it looks for (all change which faces
        are found), and the size of
        the crop store. The detector's settings matter with --align mtcnn only; with none they are not
        recorded. plan: make_plan's answer for these same arguments, when the caller has made it already
        (it stats every image). boxes: the dataset's face boxes (make_plan), kept in face_boxes.npy.
        appeared_ok: files that were missing when the cache was planned and are there now do not refuse the
        resume; the cache takes their stamps (fuse.py --retry-unreadable then extracts their shards again).
        locked: the caller holds the cache's writer lock, so the temporary files there are a killed writer's
        (removed); unlocked (no lock could be had), they may be a live writer's and stay."""
        path = Path(path)
        plan = plan or make_plan(data_root, images, teachers, shard_size, dtype, align, min_face_prob, crop_size,
                                 detect_size, smallest_face, boxes)
        manifest = path / "manifest.json"
        if manifest.exists():
            old = read_manifest(path)
            appeared = appeared_ok and old.get("list_hash") != plan["list_hash"] and only_appeared(path, images, plan)
            if appeared:
                old = {**old, "list_hash": plan["list_hash"]}
            problems = cls._plan_differences(old, plan, lambda: list_changes(path, images, plan["stamps"]))
            if not old.get("complete") and old.get("data_root") != plan["data_root"]:
                # its rows left to extract would be read from where the images were (a folder moved or copied
                # with its times kept has the same list): refused, rather than those rows listed unreadable.
                # A complete cache needs no image again (the crop store), wherever the folder went.
                problems.append(f"unfinished, and made from the images in {old.get('data_root')}, not "
                                f"{plan['data_root']}: finish it with --data {old.get('data_root')}")
            if problems:
                raise CacheMismatch(f"the cache at {path} was written differently: " + "; ".join(problems)
                                    + ". Use another --cache folder, or --overwrite to delete it and extract anew.",
                                    problems)
            if appeared:  # the manifest first: killed between the two, the stamps only name changes wrongly
                write_json(manifest, old)
            if appeared or not (path / "stamps.npy").exists():  # (or a cache from before they were kept)
                atomic_write(path / "stamps.npy", lambda f: np.save(f, plan["stamps"]))
            for folder in (path, path / "shards", path / "crops") if locked else ():
                remove_temporary(folder)
        else:
            atomic_write(path / "images.txt", lambda f: f.write(encode_paths(images)))
            if plan["boxes"]:
                atomic_write(path / "face_boxes.npy", lambda f: np.save(f, plan["box_array"]))
            atomic_write(path / "stamps.npy", lambda f: np.save(f, plan["stamps"]))
            write_json(manifest, {**{k: v for k, v in plan.items() if k not in PLAN_ARRAYS}, "complete": False})
        return cls(path)

    @staticmethod
    def _plan_differences(old, new, changes) -> list[str]:
        """What differs between manifest `old` and plan `new`; changes(): which files, asked only when the
        image lists differ."""
        problems = []
        if old.get("format") != new["format"]:
            problems.append(f"format {old.get('format')} != {new['format']}")
        old_t = [(t["name"], t["dim"], t["version"]) for t in old.get("teachers", [])]
        new_t = [(t["name"], t["dim"], t["version"]) for t in new["teachers"]]
        if [t[:2] for t in old_t] == [t[:2] for t in new_t] and old_t != new_t:  # the same teachers, changed
            problems += [version_change(o[0], o[2], n[2]) for o, n in zip(old_t, new_t) if o != n]
        elif old_t != new_t:
            problems.append(f"teachers {[t[0] for t in old_t]} (versions {[t[2] for t in old_t]}) "
                            f"!= asked {[t[0] for t in new_t]} (versions {[t[2] for t in new_t]})")
        if old.get("list_hash") != new["list_hash"]:
            problems.append(f"image list of {old.get('n_images')} files under {old.get('data_root')} "
                            f"!= {new['n_images']} files under {new['data_root']}: {changes()}")
        old = as_planned(old)
        for key in ("dtype", "align", "min_face_prob", "detect_size", "smallest_face", "shard_size", "crop_size",
                    "boxes"):
            if old.get(key) != new[key]:
                problems.append(f"{key} {old.get(key)} != {new[key]}")
        return problems

    def shard_file(self, k: int) -> Path:
        return self.path / "shards" / f"{k:05d}.npy"

    def shard_done(self, k: int) -> bool:
        return self.shard_file(k).exists()

    def meta_file(self, k: int) -> Path:
        return self.shard_file(k).with_suffix(".meta.npz")

    @property
    def redo_hint(self) -> str:
        return _redo_hint(self.path, self.data_root)

    @property
    def boxes(self) -> np.ndarray | None:
        """The dataset's face boxes the detector searches around (one row per image, NaN for none), or None."""
        if not self.manifest.get("boxes"):
            return None
        path = self.path / "face_boxes.npy"
        try:
            boxes = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheDamaged(f"{path} is missing or damaged ({e})",
                               _rebuild_hint(self.path, self.data_root)) from None
        if boxes_hash(boxes) != self.manifest["boxes"]:
            raise CacheDamaged(f"{path} does not hold the boxes its manifest was planned with",
                               _rebuild_hint(self.path, self.data_root))
        return boxes

    def shard_problem(self, k: int) -> str | None:
        """What is wrong with shard k's files ("FILE: why"), from headers, sizes and zip directories alone."""
        rows = int(self.bounds[k + 1] - self.bounds[k])
        keys = META_KEYS + (("crops_sha256",) if self.crop_size else ())
        checks = [(self.shard_file(k), lambda p: npy_problem(p, (rows, self.dim), self.dtype)),
                  (self.meta_file(k), lambda p: npz_problem(p, keys))]
        if self.crop_size:
            s = self.crop_size
            checks.append((self.crop_file(k), lambda p: npy_problem(p, (rows, s, s, 3), np.uint8)))
        for path, check in checks:
            why = check(path)
            if why:
                return f"{path}: {why}"
        return None

    def damaged_shards(self, every: bool = False) -> dict[int, str]:
        """{shard: what is wrong} of the shards whose files are damaged: of the shards marked done (features
        file present), or with every, of all of them (a shard of a complete cache that is not done is missing).
        Three small reads a shard: 1,000 shards (4.12 M faces) cost a fraction of a second."""
        return {k: why for k in range(self.n_shards)
                if (every or self.shard_done(k)) and (why := self.shard_problem(k))}

    def remove_damaged(self, log=None) -> int:
        """Remove the files of every damaged shard, so that the next extraction redoes it (a shard counts as
        done once its features file exists, yet a copy cut short or an edit can damage it afterwards).
        Returns how many; each is logged with what is wrong."""
        damaged = self.damaged_shards(every=self.manifest.get("complete"))  # complete: a shard not done is lost too
        return self._redo(damaged, log and (lambda k, why: log.warning(
            f"warning: shard {k} is damaged ({why}): its files are removed and it is extracted again")))

    def remove_unread(self, log=None) -> int:
        """Remove the files of every shard holding a row whose file the system would not give when it was
        extracted (CANNOT_READ: missing, permission denied, I/O error) and that opens now, so that the next
        extraction redoes that shard: a network mount that failed for a moment costs a few shards again, not
        the rows for good. Reads every shard's reasons; returns how many shards."""
        todo = {}
        for k in range(self.n_shards):
            if not self.shard_done(k):
                continue
            with open_npz(self.meta_file(k), self.redo_hint) as m:
                reasons = m["reason"]
            for j in np.flatnonzero(np.char.find(reasons.astype(str), CANNOT_READ) >= 0):
                file = source_file(self.data_root, self.images[int(self.bounds[k] + j)])
                if file.is_file() and os.access(file, os.R_OK):
                    todo.setdefault(k, []).append(str(file))
        return self._redo(todo, log and (lambda k, files: log.info(
            f"shard {k}: {len(files)} file(s) that could not be read now open ({', '.join(files[:3])}"
            f"{' ...' if len(files) > 3 else ''}): it is extracted again")))

    def _redo(self, shards: dict, say=None) -> int:
        """Remove the files of these shards ({shard: why}) so that the next extraction redoes them, the cache
        marked unfinished first (a kill during the redo must still find them to do); say(shard, why) for each.
        Returns how many."""
        if shards and self.manifest.get("complete"):
            self.manifest["complete"] = False
            write_json(self.path / "manifest.json", self.manifest)
        for k, why in shards.items():
            if say:
                say(k, why)
            self.remove_shard(k)
        return len(shards)

    def remove_shard(self, k: int) -> None:
        """Delete shard k's files so that the next extraction redoes it; the features first, so that a kill
        midway leaves a shard not done rather than one done without its metadata."""
        for f in (self.shard_file(k), self.meta_file(k), self.crop_file(k)):
            f.unlink(missing_ok=True)
            OPEN_FILES.forget(f)

    @property
    def n_shards(self) -> int:
        return len(self.bounds) - 1

    def crop_file(self, k: int) -> Path:
        return self.path / "crops" / f"{k:05d}.npy"

    def write_shard(self, k: int, features: np.ndarray, found, matrix, score, sha1, reason, crops=None) -> None:
        """Store one shard: crops, metadata and statistics first, the features last (their presence marks it
        done). crops: (rows, S, S, 3) uint8, required when the cache has a crop store."""
        rows = int(self.bounds[k + 1] - self.bounds[k])
        assert features.shape == (rows, self.dim), (features.shape, rows, self.dim)
        found = np.asarray(found, bool)
        total, squares = np.zeros(self.dim), np.zeros(self.dim)
        good = np.flatnonzero(found)
        for lo in range(0, len(good), 512):  # float64 copies of 512 rows at a time, not of the whole shard
            part = features[good[lo:lo + 512]].astype(np.float64)
            total += part.sum(0)
            squares += np.square(part).sum(0)
        meta = dict(found=found, matrix=np.asarray(matrix, np.float32), score=np.asarray(score, np.float32),
                    sha1=np.asarray(sha1, dtype="S40"), reason=np.asarray(reason, dtype=str),
                    count=np.int64(found.sum()), sum=total, sumsq=squares)
        if self.crop_size:
            s = self.crop_size
            if crops is None or crops.shape != (rows, s, s, 3) or crops.dtype != np.uint8:
                raise ValueError(f"shard {k} needs its ({rows}, {s}, {s}, 3) uint8 crops, got "
                                 f"{None if crops is None else (crops.shape, crops.dtype)}")
            meta["crops_sha256"] = np.asarray(save_rows(self.crop_file(k), crops))
        # compressed: the reasons are fixed-width text as wide as the longest one, mostly empty rows (2.1 of
        # 2.4 MB a shard with one long reason, uncompressed)
        atomic_write(self.meta_file(k), lambda f: np.savez_compressed(f, **meta))
        save_rows(self.shard_file(k), features.astype(self.dtype, copy=False))

    def sums(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares (float64, per dimension) of the faces found, from the shards' metadata
        (computed from the stored values as each shard was written): no pass over the features."""
        count, s, ss = 0, np.zeros(self.dim), np.zeros(self.dim)
        for k in range(self.n_shards):
            with open_npz(self.meta_file(k), self.redo_hint) as m:
                count, s, ss = count + int(m["count"]), s + m["sum"], ss + m["sumsq"]
        return count, s, ss

    def finalize(self) -> None:
        """Merge the shards' statistics and mark the cache complete."""
        missing = [k for k in range(self.n_shards) if not self.shard_done(k)]
        if missing:
            raise RuntimeError(f"{self.path}: shards {missing[:10]} not written yet")
        count, s, ss = self.sums()
        mean = s / max(count, 1)
        std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 0.0))
        atomic_write(self.path / "stats.npz", lambda f: np.savez(f, mean=mean, std=std, count=count))
        if self.crop_size:
            hashes = []
            for k in range(self.n_shards):
                with open_npz(self.meta_file(k), self.redo_hint) as m:
                    hashes.append(str(m["crops_sha256"]))
            self.manifest["crops_sha256"] = hashes
        self.manifest.update(complete=True, n_faces=count, content_hash=self.content_hash())
        write_json(self.path / "manifest.json", self.manifest)

    # -- reading -----------------------------------------------------------------------------------
    @property
    def teachers(self) -> list[dict]:
        return self.manifest["teachers"]

    @property
    def dim(self) -> int:
        return sum(t["dim"] for t in self.teachers)

    @property
    def dtype(self):
        return np.dtype(self.manifest["dtype"])

    @property
    def data_root(self) -> Path:
        return Path(self.manifest["data_root"])

    def slices(self) -> dict[str, slice]:
        """Columns of each teacher in the concatenated feature rows."""
        out, start = {}, 0
        for t in self.teachers:
            out[t["name"]] = slice(start, start + t["dim"])
            start += t["dim"]
        return out

    def require_complete(self) -> "FeatureCache":
        """The cache, if complete and every shard's files look whole: a damaged one fails here, at the start
        of distill.py or transfer.py, not hours in when a batch first reaches the damaged shard."""
        if not self.manifest.get("complete"):
            done = sum(self.shard_done(k) for k in range(self.n_shards))
            if locks.others_hold(lock_file(self.path)):  # (running fuse.py again would be refused by that lock)
                raise CacheMismatch(f"the cache at {self.path} is being written by a fuse.py still running "
                                    f"({done}/{self.n_shards} shards done): wait for it to end")
            raise CacheMismatch(f"the cache at {self.path} is incomplete ({done}/{self.n_shards} shards): "
                                f"run fuse.py again with the same arguments to finish it")
        damaged = list(self.damaged_shards(every=True).values())
        if damaged:
            more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
            raise CacheDamaged(f"{len(damaged)} damaged shard{'s' * (len(damaged) > 1)} in {self.path}: "
                               + "; ".join(damaged[:3]) + more, self.redo_hint)
        return self

    @property
    def features(self) -> ShardedArray:
        return ShardedArray([self.shard_file(k) for k in range(self.n_shards)], self.bounds, remedy=self.redo_hint)

    def _load_meta(self):
        """Per-row found flags and alignment matrices of every shard (28 bytes a face: 115 MB for 4 M)."""
        if self._meta is None:
            # Filled in place, shard by shard: the peak is the result, not the result plus its parts.
            n = int(self.bounds[-1])
            meta = {"found": np.zeros(n, bool), "matrix": np.zeros((n, 2, 3), np.float32)}
            for k in range(self.n_shards):
                with open_npz(self.meta_file(k), self.redo_hint) as m:
                    for key, out in meta.items():
                        out[self.bounds[k]:self.bounds[k + 1]] = m[key]
            self._meta = meta
        return self._meta

    @property
    def crop_size(self) -> int:
        return int(self.manifest.get("crop_size", 0))

    @property
    def crops(self) -> ShardedArray:
        """The crop store: (rows, S, S, 3) uint8 canonical crops, read with positioned reads (direct)."""
        if not self.crop_size:
            raise CacheMismatch(f"the cache at {self.path} has no crop store (written with crop size 0): "
                                f"rebuild it with fuse.py to train or transfer from it")
        return ShardedArray([self.crop_file(k) for k in range(self.n_shards)], self.bounds, direct=True,
                            remedy=self.redo_hint)

    def verify_crops(self, progress=False) -> list[int]:
        """Shards done whose crop file no longer matches the sha256 recorded in the shard's metadata as it was
        written (the manifest's crops_sha256 is a copy made at finalize, stale for a shard redone since): a
        change of the bytes that keeps the size, which the header checks cannot see. Reads the whole crop store
        (203 GB at 4.12 M faces), 8 MB at a time."""
        bad = []
        for k in tqdm(range(self.n_shards), unit="shard", desc="verify crops", disable=None if progress else True):
            if not (self.crop_size and self.shard_done(k)):
                continue
            with open_npz(self.meta_file(k), self.redo_hint) as m:
                if "crops_sha256" not in m.files:
                    continue
                recorded = str(m["crops_sha256"])
            h = hashlib.sha256()
            try:
                with open(self.crop_file(k), "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
            except FileNotFoundError:
                pass
            if h.hexdigest() != recorded:
                bad.append(k)
        return bad

    def remove_altered_crops(self, log=None) -> int:
        """verify_crops, then remove every shard whose crops changed, so that the next extraction redoes it."""
        return self._redo({k: "its crops differ from their recorded sha256" for k in self.verify_crops(True)},
                          log and (lambda k, why: log.warning(f"warning: shard {k}: {why}: it is extracted again")))

    @property
    def found(self) -> np.ndarray:
        return self._load_meta()["found"]

    @property
    def matrices(self) -> np.ndarray:
        return self._load_meta()["matrix"]

    def missed(self):
        """(row, reason) of every image without a usable face, read shard by shard (reasons stay on disk)."""
        for k in range(self.n_shards):
            with open_npz(self.meta_file(k), self.redo_hint) as m:
                missed = np.flatnonzero(~m["found"])
                reasons = m["reason"] if len(missed) else None  # m[...] reads the array anew at each access
                for i in missed:
                    yield int(self.bounds[k] + i), str(reasons[i])

    def content_hash(self) -> str:
        """sha256 over every row's sha1 of the image bytes it was computed from (in row order): two caches
        with the same content_hash saw byte-identical images. Recorded in the manifest at finalize."""
        h = hashlib.sha256()
        for k in range(self.n_shards):
            with open_npz(self.meta_file(k), self.redo_hint) as m:
                h.update(b"\n".join(m["sha1"].tolist()) + b"\n")
        return h.hexdigest()

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std (std floored so that dead units standardise to 0, not inf)."""
        with open_npz(self.path / "stats.npz", f"{self.redo_hint} (and writes it anew)") as s:
            return s["mean"], np.maximum(s["std"], 1e-6)

    # -- fused embeddings (h_G) --------------------------------------------------------------------
    def embedding_dir(self, name: str) -> Path:
        """The folder of the current version of h_G `name` (the pinned one, once pin_embedding was called),
        resolved once: whoever reads through the returned path keeps reading that version even if fuse.py
        switches to a new one meanwhile."""
        return self._pinned[name] if name in self._pinned else (self.path / "emb" / name).resolve()

    def pin_embedding(self, name: str) -> Path:
        """From now on this object reads h_G `name`'s current version (its G, units, split) whatever fuse.py
        writes meanwhile: a run reading it over hours (several tasks) reads one version throughout."""
        self._pinned[name] = self.embedding_dir(name)
        return self._pinned[name]

    def embedding_file(self, name: str, k: int, folder: Path | None = None) -> Path:
        return (folder or self.embedding_dir(name)) / f"{k:05d}.npy"

    @contextmanager
    def new_embedding(self, name: str):
        """Yield a fresh folder for a new version of h_G `name`; on success, switch emb/NAME to it atomically.

        Nothing reads the folder before the switch, so a run killed while writing leaves the previous
        version in place (the unfinished folder is removed at the next switch). Older versions are removed
        too, but not while a run reads the cache (readers_lock_file): it may be reading one of them."""
        root = self.path / "emb"
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.{time.strftime('%Y%m%d-%H%M%S')}."))
        folder.chmod(default_mode(folder=True))  # mkdtemp's 0700, as mkdir would make it
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        link = root / name
        previous = link.resolve() if link.exists() else None
        if link.is_dir() and not link.is_symlink():  # written before versions existed: move it aside once
            previous = root / f".{name}.unversioned"
            os.rename(link, previous)
        tmp = root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(folder.name, tmp)  # relative, so the cache folder can be moved
        except OSError as e:  # Windows without Developer Mode or administrator rights; a file system without links
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                raise  # not a matter of links: run_main's line for a full disk or a read-only one says it
            raise PermissionError(f"cannot make the link {tmp} ({e.strerror or e}): h_G is switched to its new version "
                                  f"by a symbolic link; on Windows turn on Developer Mode, or give --cache a folder "
                                  f"on a file system that takes links (the h_G written, in {folder}, is not used)") from e
        os.replace(tmp, link)  # the switch: one rename
        if locks.others_hold(readers_lock_file(self.path)):
            return
        for old in root.glob(f".{name}.*"):
            if old.is_dir() and old.resolve() not in (folder.resolve(), previous):
                shutil.rmtree(old, ignore_errors=True)

    def write_embedding_shard(self, name: str, k: int, values: np.ndarray, folder: Path | None = None) -> None:
        path = self.embedding_file(name, k, folder or self.path / "emb" / name)
        save_rows(path, values.astype(self.dtype, copy=False))  # (the rows of images without a face: holes)

    def write_embedding_meta(self, name: str, meta: dict, folder: Path | None = None) -> None:
        write_json((folder or self.path / "emb" / name) / "meta.json", meta)

    def input_stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) that put h_i in the units of G `name` (fuse.py saves those of its training faces beside
        h_G), which whatever feeds h_i to that G must use. A G written before it kept its units was trained
        with the whole cache's std per dimension."""
        f = self.embedding_dir(name) / "stats.npz"
        if not f.exists():
            return self.stats()
        with open_npz(f, self._hG_hint(name)) as s:
            return s["mean"], s["std"]

    def target_sums(self, name: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(sum, sum of squares, count) of h_G `name`'s columns over the faces G did not hold out (distill.py's
        training faces), as fuse.py wrote them beside h_G; None for an h_G written before it kept them."""
        f = self.embedding_dir(name) / "target_sums.npz"
        if not f.exists():
            return None
        with open_npz(f, self._hG_hint(name)) as z:
            return z["sum"], z["sumsq"], int(z["count"])

    def _hG_hint(self, name: str) -> str:
        return (f"rerun `python fuse.py --data {self.data_root} --cache {self.path}` with the same arguments "
                f"(--write {name}): it writes h_G anew")  # G's units (stats.npz) live in h_G's folder

    def embedding_names(self) -> list[str]:
        """The h_G in the cache, the default first: the one the last fuse.py run wrote or kept (its --write,
        recorded in emb/.default, which a copy keeps where it would not keep file times), the others by name."""
        root = self.path / "emb"
        names = sorted(p.name for p in root.iterdir()
                       if not p.name.startswith(".") and (p / "meta.json").exists()) if root.exists() else []
        default = root / ".default"
        first = default.read_text().strip() if default.is_file() else None
        return sorted(names, key=lambda n: n != first)

    def mark_default_embedding(self, name: str) -> None:
        """Make h_G `name` the one distill.py and transfer.py take when not told which."""
        atomic_write(self.path / "emb" / ".default", lambda f: f.write(name.encode() + b"\n"))

    def embedding(self, name: str) -> tuple[ShardedArray, dict]:
        folder = self.embedding_dir(name)
        if not (folder / "meta.json").exists():
            from common.fusion import OPERATORS  # (fusion imports this module)

            names = self.embedding_names()
            if name in OPERATORS:
                how = f"run fuse.py --cache {self.path} --write {name}"
            else:  # a typo: no such operator to write
                close = difflib.get_close_matches(name, [*names, *OPERATORS], n=1)
                how = ((f"did you mean '{close[0]}'? " if close else "") + f"h_G are named after fuse.py's "
                       f"operators ({', '.join(OPERATORS)})")
            raise FileNotFoundError(f"{self.path} holds no fused embedding '{name}' (has: {names or 'none'}): {how}")
        remedy = self._hG_hint(name)
        try:
            meta = json.loads((folder / "meta.json").read_bytes())
            dim = int(meta["dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise CacheDamaged(f"{folder / 'meta.json'} is damaged ({type(e).__name__}: {e})", remedy) from None
        meta["folder"] = str(folder)
        written_for, now = meta.get("content_hash"), self.manifest.get("content_hash")
        if written_for and now and written_for != now:  # rows found since have no h_G: a zero target each
            raise CacheDamaged(f"h_G '{name}' in {folder} was written for other images than the cache holds now "
                               f"(shards were extracted again since, say by --retry-unreadable)", remedy)
        files = [self.embedding_file(name, k, folder) for k in range(self.n_shards)]
        # Headers and sizes only, as require_complete does for the features: distill.py fails at its start,
        # and fuse.py, which reads h_G through here before it keeps one, writes a damaged one anew.
        for k, f in enumerate(files):
            why = npy_problem(f, (int(self.bounds[k + 1] - self.bounds[k]), dim), self.dtype)
            if why:
                raise CacheDamaged(f"{f}: {why}", remedy)
        # G's units, h_G's sums (an older h_G has neither); G and its split, read by distill.py only after
        # training and by transfer.py's fused method: checked here so that both fail at their start, and fuse.py,
        # which keeps an h_G only through here, rewrites them
        must = "split" in meta  # fuse.py records the split's sizes with its files (an older h_G may lack them)
        checks = [(folder / "stats.npz", False, lambda f: npz_problem(f, ("mean", "std"))),
                  (folder / "target_sums.npz", False, lambda f: npz_problem(f, ("sum", "sumsq", "count"))),
                  (folder / "split.npz", must, lambda f: npz_problem(f, ("train", "val", "test"))),
                  (folder / "val_rows.npy", must, npy_problem)]
        if meta.get("model"):
            checks.append((folder / meta["model"], True, safetensors_problem))
        for f, required, check in checks:
            if (required or f.exists()) and (problem := check(f)):
                raise CacheDamaged(f"{f}: {problem}", remedy)
        return ShardedArray(files, self.bounds, remedy=remedy), meta

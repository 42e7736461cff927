"""The feature cache: every teacher's h_i for every face, computed once, stored in memory-mapped shards.

Layout of a cache folder (all writes atomic: temp file + os.replace, so a killed run leaves only
whole files behind):
    manifest.json          plan (teachers with widths and versions, image list hash, shard table), then
                           normalisation statistics and complete=true once every shard is written
    images.txt             the image paths, relative to the data root, one per line, in row order
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
                           standardised with, from G's training faces); emb/NAME is a
                           link to emb/.NAME.<stamp>/. A rerun writes a new such folder and swaps the
                           link in one rename, so a reader sees the old version or the new one, never a
                           mix; the version just replaced is kept for readers still on it.
    fits/                  the state of each fit of G (fuse.py; common.fusion.fit_file names them), so that a
                           killed run resumes its fits
A shard is done when its .npy exists (written last), which is all that resuming needs to know.
Sized for millions of faces: nothing here holds more than one shard in memory, the number of shard
files open at once is bounded (MAX_OPEN), and the paths are one byte buffer, not millions of strings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.align import CROP_SIZE, DETECT_SIZE
from common.images import PATH_ERRORS, decode_paths, encode_paths

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
IOV_MAX = 1024  # buffers one os.preadv may take (POSIX's minimum, Linux's value)


class CacheMismatch(Exception):
    """The cache on disk was written for other teachers or other images (problems: what differs)."""

    def __init__(self, message: str, problems=()):
        super().__init__(message)
        self.problems = list(problems)


_UMASK = os.umask(0)  # read once (setting it is the only way to read it) and put back
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path):
    """A temp path beside path to write; when the block ends, it is synced and renamed over path (removed
    instead if the block raised), so path is only ever the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600: the file gets the mode open() would give it
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, write) -> None:
    """Call write(fileobj) on a temp file beside path, fsync it, then rename it over path."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def list_hash(root: Path, images) -> str:
    """Hash of the image list with each file's size and modification time: one stat per file, no reads,
    yet it changes when a file is added, removed, replaced or edited in place (even at the same size, as
    a BMP is). The bytes themselves are hashed as they are decoded: see FeatureCache.content_hash."""
    h = hashlib.sha256()
    for rel in images:
        try:
            st = os.stat(Path(root) / rel)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # missing, or not a file (an image stored inside a CSV, "fer2013.csv#row12")
            stamp = "-1"
        h.update(f"{rel}\t{stamp}\n".encode("utf-8", PATH_ERRORS))
    return h.hexdigest()


def write_missed(cache: "FeatureCache", path: Path) -> tuple[int, int]:
    """List every image without a usable face, and why, in a .tsv; returns (no face found, unusable file)."""
    missed = [(cache.images[i], r) for i, r in cache.missed()]
    lines = "".join(f"{p}\t{r}\n" for p, r in missed)
    atomic_write(path, lambda f: f.write(("path\treason\n" + lines).encode("utf-8", PATH_ERRORS)))
    n_noface = sum(1 for _, r in missed if r == "no face detected")
    return n_noface, len(missed) - n_noface


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
            return [self[j] for j in range(*i.indices(len(self)))]
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


def _open_rows(path):
    f = open(path, "rb", buffering=0)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except ValueError as e:
        f.close()
        raise ValueError(f"{path}: not a .npy file ({e})") from None
    if fortran:
        f.close()
        raise ValueError(f"{path} is not stored in C order")
    return f, f.tell(), dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))


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
    bench/cache.py on the 2-core VM: see BENCHMARKS.md."""
    files: list[Path]
    bounds: np.ndarray  # shard k holds rows bounds[k]:bounds[k+1]
    max_open: int | None = None
    direct: bool = False

    def __post_init__(self):
        # thread-safe: fusion's read-ahead thread and the main one read the same arrays
        self._maps = OPEN_FILES if self.max_open is None else OpenFiles(self.max_open)

    def __getstate__(self):  # to another process (a spawned loader worker): the paths, not the open files
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def shard(self, k: int) -> np.ndarray:
        path = str(self.files[k])
        return self._maps.get(("map", path), lambda: np.load(path, mmap_mode="r"))

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self):
        return (len(self), *self.shard(0).shape[1:])

    def _file(self, k: int):
        """Shard k opened for positioned reads: (unbuffered file, offset of row 0, bytes a row). The file
        object, not a bare descriptor, so that one evicted under another thread's read closes only when
        that read lets go of it."""
        return self._maps.get(("file", str(self.files[k])), lambda: _open_rows(self.files[k]))

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
                if got != len(part) * stride:
                    raise OSError(f"{self.files[k]}: short read ({got} of {len(part) * stride} bytes at row "
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
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"no feature cache at {self.path} (no manifest.json): "
                                    f"run `python fuse.py --data DIR --cache {self.path}` first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CacheMismatch(f"{manifest}: cache format {self.manifest.get('format')}, this code reads {FORMAT}")
        self.images = PathArray((self.path / "images.txt").read_bytes())
        self.bounds = np.array(self.manifest["shard_bounds"], dtype=np.int64)
        self._meta = None

    # -- creation and resume ---------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path, data_root, images, teachers, shard_size=4096, dtype="float16",
                         align="mtcnn", min_face_prob=0.9, crop_size=CROP_SIZE,
                         detect_size=DETECT_SIZE) -> "FeatureCache":
        """Write the plan of a new cache, or check that an existing one was planned identically.

        The plan holds everything that changes what the cache contains: teachers (weights and
        preprocessing), images (names, sizes, times), storage type, alignment, the detector's
        threshold and the size of the copy it sees (both change which faces are found), and the size of
        the crop store. The detector's settings matter with --align mtcnn only; with none they are not
        recorded."""
        path = Path(path)
        bounds = list(range(0, len(images), shard_size)) + [len(images)]
        plan = {
            "format": FORMAT,
            "teachers": [{"name": t.name, "dim": int(t.dim), "version": t.version} for t in teachers],
            "dtype": dtype,
            "align": align,
            "min_face_prob": float(min_face_prob) if align == "mtcnn" else None,
            "detect_size": int(detect_size) if align == "mtcnn" else None,
            "data_root": str(Path(data_root).resolve()),
            "n_images": len(images),
            "list_hash": list_hash(data_root, images),
            "shard_size": shard_size,
            "shard_bounds": bounds,
            "crop_size": int(crop_size),
        }
        manifest = path / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            problems = cls._plan_differences(old, plan)
            if problems:
                raise CacheMismatch(f"the cache at {path} was written differently: " + "; ".join(problems)
                                    + ". Use another --cache folder, or --overwrite to rebuild it.", problems)
        else:
            atomic_write(path / "images.txt", lambda f: f.write(encode_paths(images)))
            write_json(manifest, {**plan, "complete": False})
        return cls(path)

    @staticmethod
    def _plan_differences(old, new) -> list[str]:
        problems = []
        if old.get("format") != new["format"]:
            problems.append(f"format {old.get('format')} != {new['format']}")
        old_t = [(t["name"], t["dim"], t["version"]) for t in old.get("teachers", [])]
        new_t = [(t["name"], t["dim"], t["version"]) for t in new["teachers"]]
        if old_t != new_t:
            problems.append(f"teachers {[t[0] for t in old_t]} (versions {[t[2] for t in old_t]}) "
                            f"!= asked {[t[0] for t in new_t]} (versions {[t[2] for t in new_t]})")
        if old.get("list_hash") != new["list_hash"]:
            problems.append(f"image list of {old.get('n_images')} files under {old.get('data_root')} "
                            f"!= {new['n_images']} files under {new['data_root']}")
        for key in ("dtype", "align", "min_face_prob", "detect_size", "shard_size", "crop_size"):
            if old.get(key) != new[key]:
                problems.append(f"{key} {old.get(key)} != {new[key]}")
        return problems

    def shard_file(self, k: int) -> Path:
        return self.path / "shards" / f"{k:05d}.npy"

    def shard_done(self, k: int) -> bool:
        return self.shard_file(k).exists()

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
        good = features[found].astype(np.float64)
        meta = dict(found=found, matrix=np.asarray(matrix, np.float32), score=np.asarray(score, np.float32),
                    sha1=np.asarray(sha1, dtype="S40"), reason=np.asarray(reason, dtype=str),
                    count=np.int64(found.sum()), sum=good.sum(0), sumsq=(good ** 2).sum(0))
        if self.crop_size:
            s = self.crop_size
            if crops is None or crops.shape != (rows, s, s, 3) or crops.dtype != np.uint8:
                raise ValueError(f"shard {k} needs its ({rows}, {s}, {s}, 3) uint8 crops, got "
                                 f"{None if crops is None else (crops.shape, crops.dtype)}")
            crops = np.ascontiguousarray(crops)
            atomic_write(self.crop_file(k), lambda f: np.save(f, crops))
            meta["crops_sha256"] = np.asarray(hashlib.sha256(self.crop_file(k).read_bytes()).hexdigest())
        atomic_write(self.shard_file(k).with_suffix(".meta.npz"), lambda f: np.savez(f, **meta))
        atomic_write(self.shard_file(k), lambda f: np.save(f, features.astype(self.dtype, copy=False)))

    def sums(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares (float64, per dimension) of the faces found, from the shards' metadata
        (computed from the stored values as each shard was written): no pass over the features."""
        count, s, ss = 0, np.zeros(self.dim), np.zeros(self.dim)
        for k in range(self.n_shards):
            with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
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
                with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
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
        if not self.manifest.get("complete"):
            done = sum(self.shard_done(k) for k in range(self.n_shards))
            raise RuntimeError(f"the cache at {self.path} is incomplete ({done}/{self.n_shards} shards): "
                               f"run fuse.py again with the same arguments to finish it")
        return self

    @property
    def features(self) -> ShardedArray:
        return ShardedArray([self.shard_file(k) for k in range(self.n_shards)], self.bounds)

    def _load_meta(self):
        """Per-row found flags and alignment matrices of every shard (28 bytes a face: 115 MB for 4 M)."""
        if self._meta is None:
            # Filled in place, shard by shard: the peak is the result, not the result plus its parts.
            n = int(self.bounds[-1])
            meta = {"found": np.zeros(n, bool), "matrix": np.zeros((n, 2, 3), np.float32)}
            for k in range(self.n_shards):
                with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
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
        return ShardedArray([self.crop_file(k) for k in range(self.n_shards)], self.bounds, direct=True)

    def verify_crops(self) -> list[int]:
        """Shards whose crop file no longer matches the sha256 the manifest recorded (empty: all intact)."""
        want = self.manifest.get("crops_sha256") or []
        return [k for k, h in enumerate(want)
                if not self.crop_file(k).exists() or hashlib.sha256(self.crop_file(k).read_bytes()).hexdigest() != h]

    @property
    def found(self) -> np.ndarray:
        return self._load_meta()["found"]

    @property
    def matrices(self) -> np.ndarray:
        return self._load_meta()["matrix"]

    def missed(self):
        """(row, reason) of every image without a usable face, read shard by shard (reasons stay on disk)."""
        for k in range(self.n_shards):
            with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
                missed = np.flatnonzero(~m["found"])
                reasons = m["reason"] if len(missed) else None  # m[...] reads the array anew at each access
                for i in missed:
                    yield int(self.bounds[k] + i), str(reasons[i])

    def content_hash(self) -> str:
        """sha256 over every row's sha1 of the image bytes it was computed from (in row order): two caches
        with the same content_hash saw byte-identical images. Recorded in the manifest at finalize."""
        h = hashlib.sha256()
        for k in range(self.n_shards):
            with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
                h.update(b"\n".join(m["sha1"].tolist()) + b"\n")
        return h.hexdigest()

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std (std floored so that dead units standardise to 0, not inf)."""
        with np.load(self.path / "stats.npz") as s:
            return s["mean"], np.maximum(s["std"], 1e-6)

    # -- fused embeddings (h_G) --------------------------------------------------------------------
    def embedding_dir(self, name: str) -> Path:
        """The folder of the current version of h_G `name`, resolved once: whoever reads through the
        returned path keeps reading that version even if fuse.py switches to a new one meanwhile."""
        return (self.path / "emb" / name).resolve()

    def embedding_file(self, name: str, k: int, folder: Path | None = None) -> Path:
        return (folder or self.embedding_dir(name)) / f"{k:05d}.npy"

    @contextmanager
    def new_embedding(self, name: str):
        """Yield a fresh folder for a new version of h_G `name`; on success, switch emb/NAME to it atomically.

        Nothing reads the folder before the switch, so a run killed while writing leaves the previous
        version in place (the unfinished folder is removed at the next switch)."""
        root = self.path / "emb"
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.{time.strftime('%Y%m%d-%H%M%S')}."))
        folder.chmod(0o755)
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
        os.symlink(folder.name, tmp)  # relative, so the cache folder can be moved
        os.replace(tmp, link)  # the switch: one rename
        for old in root.glob(f".{name}.*"):
            if old.is_dir() and old.resolve() not in (folder.resolve(), previous):
                shutil.rmtree(old, ignore_errors=True)

    def write_embedding_shard(self, name: str, k: int, values: np.ndarray, folder: Path | None = None) -> None:
        path = self.embedding_file(name, k, folder or self.path / "emb" / name)
        atomic_write(path, lambda f: np.save(f, values.astype(self.dtype, copy=False)))

    def write_embedding_meta(self, name: str, meta: dict, folder: Path | None = None) -> None:
        write_json((folder or self.path / "emb" / name) / "meta.json", meta)

    def input_stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) that put h_i in the units of G `name` (fuse.py saves those of its training faces beside
        h_G), which whatever feeds h_i to that G must use. A G written before it kept its units was trained
        with the whole cache's std per dimension."""
        f = self.embedding_dir(name) / "stats.npz"
        if not f.exists():
            return self.stats()
        with np.load(f) as s:
            return s["mean"], s["std"]

    def embedding_names(self) -> list[str]:
        root = self.path / "emb"
        return sorted(p.name for p in root.iterdir()
                      if not p.name.startswith(".") and (p / "meta.json").exists()) if root.exists() else []

    def embedding(self, name: str) -> tuple[ShardedArray, dict]:
        folder = self.embedding_dir(name)
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{self.path} holds no fused embedding '{name}' "
                                    f"(has: {self.embedding_names() or 'none'}): run fuse.py --write {name}")
        meta = json.loads((folder / "meta.json").read_text())
        meta["folder"] = str(folder)
        return ShardedArray([self.embedding_file(name, k, folder) for k in range(self.n_shards)], self.bounds), meta

"""The feature cache: every teacher's h_i for every face, computed once, stored in memory-mapped shards.

Layout of a cache folder (all writes atomic: temp file + os.replace, so a killed run leaves only
whole files behind):
    manifest.json          plan (teachers with widths and versions, image list hash, shard table), then
                           normalisation statistics and complete=true once every shard is written
    images.txt             the image paths, relative to the data root, one per line, in row order
    shards/NNNNN.npy       (rows, sum of teacher widths) features in the cache dtype, teachers side by side
    shards/NNNNN.meta.npz  per row: face found, 2x3 alignment matrix, detector score, file sha1, failure
                           reason; per shard: sum and sum of squares for the statistics
    stats.npz              per-dimension mean and std over the faces found
    emb/NAME/NNNNN.npy     fused embeddings (h_G of an operator) in the same shard layout, + meta.json
A shard is done when its .npy exists (written last), which is all that resuming needs to know.
Sized for millions of faces: nothing here holds more than one shard in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1


class CacheMismatch(Exception):
    """The cache on disk was written for other teachers or other images."""


def atomic_write(path: Path, write) -> None:
    """Call write(fileobj) on a temp file beside path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def list_hash(root: Path, images: list[str]) -> str:
    """Hash of the image list with file sizes: cheap (no reads) yet changes when files are added or replaced."""
    h = hashlib.sha256()
    for rel in images:
        path = Path(root) / rel
        # Entries that are not files (an image stored inside a CSV, "fer2013.csv#row12") hash by name.
        size = os.path.getsize(path) if path.exists() else -1
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


@dataclass
class ShardedArray:
    """Rows spread over several .npy shards, read through memory maps."""
    files: list[Path]
    bounds: np.ndarray  # shard k holds rows bounds[k]:bounds[k+1]

    def __post_init__(self):
        self._maps = [None] * len(self.files)

    def shard(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            self._maps[k] = np.load(self.files[k], mmap_mode="r")
        return self._maps[k]

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self):
        return (len(self), self.shard(0).shape[1])

    def take(self, rows) -> np.ndarray:
        """Rows in the order asked, gathered shard by shard so each map is touched once."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=self.shard(0).dtype)
        which = np.searchsorted(self.bounds, rows, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.shard(k)[rows[sel] - self.bounds[k]]
        return out


class FeatureCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"no feature cache at {self.path} (no manifest.json): "
                                    f"run `python fuse.py --data DIR --out {self.path}` first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CacheMismatch(f"{manifest}: cache format {self.manifest.get('format')}, this code reads {FORMAT}")
        self.images = (self.path / "images.txt").read_text().splitlines()
        self.bounds = np.array(self.manifest["shard_bounds"], dtype=np.int64)
        self._meta = None

    # -- creation and resume ---------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path, data_root, images, teachers, shard_size=4096, dtype="float16",
                         align="mtcnn") -> "FeatureCache":
        """Write the plan of a new cache, or check that an existing one was planned identically."""
        path = Path(path)
        bounds = list(range(0, len(images), shard_size)) + [len(images)]
        plan = {
            "format": FORMAT,
            "teachers": [{"name": t.name, "dim": int(t.dim), "version": t.version} for t in teachers],
            "dtype": dtype,
            "align": align,
            "data_root": str(Path(data_root).resolve()),
            "n_images": len(images),
            "list_hash": list_hash(data_root, images),
            "shard_size": shard_size,
            "shard_bounds": bounds,
        }
        manifest = path / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            problems = cls._plan_differences(old, plan)
            if problems:
                raise CacheMismatch(f"the cache at {path} was written differently: " + "; ".join(problems)
                                    + ". Use another --out folder, or --overwrite to rebuild it.")
        else:
            atomic_write(path / "images.txt", lambda f: f.write("".join(i + "\n" for i in images).encode()))
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
        for key in ("dtype", "align", "shard_size"):
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

    def write_shard(self, k: int, features: np.ndarray, found, matrix, score, sha1, reason) -> None:
        """Store one shard: metadata and statistics first, the features last (their presence marks it done)."""
        rows = int(self.bounds[k + 1] - self.bounds[k])
        assert features.shape == (rows, self.dim), (features.shape, rows, self.dim)
        found = np.asarray(found, bool)
        good = features[found].astype(np.float64)
        meta = dict(found=found, matrix=np.asarray(matrix, np.float32), score=np.asarray(score, np.float32),
                    sha1=np.asarray(sha1, dtype="S40"), reason=np.asarray(reason, dtype=str),
                    count=np.int64(found.sum()), sum=good.sum(0), sumsq=(good ** 2).sum(0))
        atomic_write(self.shard_file(k).with_suffix(".meta.npz"), lambda f: np.savez(f, **meta))
        atomic_write(self.shard_file(k), lambda f: np.save(f, features.astype(self.dtype, copy=False)))

    def finalize(self) -> None:
        """Merge the shards' statistics and mark the cache complete."""
        missing = [k for k in range(self.n_shards) if not self.shard_done(k)]
        if missing:
            raise RuntimeError(f"{self.path}: shards {missing[:10]} not written yet")
        count, s, ss = 0, np.zeros(self.dim), np.zeros(self.dim)
        for k in range(self.n_shards):
            with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
                count, s, ss = count + int(m["count"]), s + m["sum"], ss + m["sumsq"]
        mean = s / max(count, 1)
        std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 0.0))
        atomic_write(self.path / "stats.npz", lambda f: np.savez(f, mean=mean, std=std, count=count))
        self.manifest.update(complete=True, n_faces=count)
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
            parts = []
            for k in range(self.n_shards):
                with np.load(self.shard_file(k).with_suffix(".meta.npz")) as m:
                    parts.append({key: m[key] for key in ("found", "matrix")})
            self._meta = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return self._meta

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
                for i in np.flatnonzero(~m["found"]):
                    yield int(self.bounds[k] + i), str(m["reason"][i])

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std (std floored so that dead units standardise to 0, not inf)."""
        with np.load(self.path / "stats.npz") as s:
            return s["mean"], np.maximum(s["std"], 1e-6)

    # -- fused embeddings (h_G) --------------------------------------------------------------------
    def embedding_file(self, name: str, k: int) -> Path:
        return self.path / "emb" / name / f"{k:05d}.npy"

    def write_embedding_shard(self, name: str, k: int, values: np.ndarray) -> None:
        atomic_write(self.embedding_file(name, k), lambda f: np.save(f, values.astype(self.dtype, copy=False)))

    def write_embedding_meta(self, name: str, meta: dict) -> None:
        write_json(self.path / "emb" / name / "meta.json", meta)

    def embedding_names(self) -> list[str]:
        root = self.path / "emb"
        return sorted(p.parent.name for p in root.glob("*/meta.json")) if root.exists() else []

    def embedding(self, name: str) -> tuple[ShardedArray, dict]:
        meta_file = self.path / "emb" / name / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.path} holds no fused embedding '{name}' "
                                    f"(has: {self.embedding_names() or 'none'}): run fuse.py --write {name}")
        meta = json.loads(meta_file.read_text())
        return ShardedArray([self.embedding_file(name, k) for k in range(self.n_shards)], self.bounds), meta

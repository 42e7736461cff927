"""Files written whole or not at all: a temp file beside the target, synced, then renamed over it, so that a
killed run leaves the old file or the whole new one, never a part; and the removal of the temp files a
kill -9 left behind."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)  # read once (setting it is the only way to read it) and put back
os.umask(_UMASK)


def default_mode(folder: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or folder under this process's umask."""
    return (0o777 if folder else 0o666) & ~_UMASK


@contextmanager
def atomic_file(path: Path):
    """A temp path beside path to write; when the block ends, it is synced and renamed over path (removed
    instead if the block raised), so path is only ever the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # after the writer, which may have made the file anew (safetensors' at 0600 whatever the umask): mkstemp
        # makes it 0600 too; it gets the mode open() would give it, so that colleagues read a shared cache
        os.chmod(tmp, default_mode())
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


def remove_temporary(folder: Path, recursive: bool = False) -> int:
    """Remove the temporary files (.NAME....tmp, atomic_file's) that a killed writer left in folder (and its
    subfolders, recursive): a kill -9 raises nothing, so each stayed for good (a 4,096-face crop shard's is
    ~200 MB). Only the process that holds the folder's writer lock may call it: another writer's temporary file
    would be one it is writing."""
    n = 0
    for p in (Path(folder).rglob if recursive else Path(folder).glob)(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def atomic_write(path: Path, write) -> None:
    """Call write(fileobj) on a temp file beside path, fsync it, then rename it over path."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: Path, obj) -> None:
    """Strict JSON: a NaN or infinite number (a teacher without spread in Table 5, a diverged decoder's
    error) is written null, which jq, JavaScript and every other reader parse; the markdown tables say
    n/a or inf."""
    atomic_write(path, lambda f: f.write(json.dumps(_finite(obj), indent=1, allow_nan=False).encode()))


def _finite(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_text(path: Path, text: str) -> None:
    """A report's text, whole or not at all (a kill mid-write left a table cut short)."""
    atomic_write(path, lambda f: f.write(text.encode()))

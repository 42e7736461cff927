"""File locks (flock) that keep two processes from writing one run folder or one cache at once."""
from __future__ import annotations

from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: nothing is locked
    fcntl = None


def acquire(path: Path, busy: str | None = None, log=None, what=None):
    """Open and lock the file at path (made, with its folder). Held by another process: busy given, SystemExit
    with that line; else wait for it, saying in log that it waits for `what`. Returns the open file, whose
    closing lets go, or None on a file system without locks (some network mounts): the work goes on unlocked."""
    if fcntl is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                raise SystemExit(busy) from None
            if log:
                log.info(f"waiting for another run writing {what}")
            fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f

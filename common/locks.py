"""File locks (flock) that keep two processes from writing one run folder or one cache at once, and a cache
that a run reads from being deleted or rewritten under it."""
from __future__ import annotations

import logging
import os
import time
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: nothing is locked
    fcntl = None

held = {}  # lock file (resolved) -> open file: the locks this process holds until its script's main returns
_open = weakref.WeakSet()  # every lock file acquire() opened and that is still open
said = set()  # lock files already said to be unlockable (in this main: common.runs.holding_runs clears it)
log = logging.getLogger("common.locks")  # the scripts' log handlers take common.* (runs.get_logger)


def _unlocked(path: Path, e: OSError, shared: bool) -> None:
    """Say, once a lock file, that the work goes on without it: a second run on the same folder (an NFS home
    without its lock daemon: ENOLCK) would not be refused, and the user should know it."""
    if str(path) not in said:
        said.add(str(path))
        who = "a run that writes it meanwhile" if shared else "a second run on it"
        log.warning(f"warning: no lock on {path} ({e.strerror or e}): the work goes on without one, and {who} "
                    f"would not be refused")


def _drop_inherited() -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock files. A flock belongs to
    the open file, which a fork shares: workers left behind by a killed run held its run folder and cache
    locked for seconds, refusing the rerun ("another run is writing"). Closing a copy does not unlock the
    parent's (no LOCK_UN; the lock goes when the last copy closes)."""
    for f in list(_open):
        try:
            f.close()
        except OSError:
            pass
    held.clear()
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited)


def acquire(path: Path, busy: str | None = None, log=None, what=None, shared: bool = False, patience: float = 2.0,
            quiet: bool = False):
    """Open and lock the file at path (made, with its folder); shared: a reader's lock, which other readers
    share and a writer's excludes. Held by another process: busy given, SystemExit with that line once it is
    still held after `patience` seconds (another process's brief check is not a run); else wait for it, saying
    in log that it waits for `what`. Returns the open file, whose closing lets go, or None where no lock can be
    had (a file system without locks, a read-only or another user's folder): the work goes on unlocked, said
    once a lock file unless `quiet` (what the lock guards cannot be written either)."""
    if fcntl is None:
        return None
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError as e:  # a read-only or another user's folder
        if not shared and not quiet:  # (a reader of a cache there, or quiet: nobody can write what it guards)
            _unlocked(path, e, shared)
        return None
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        give_up = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if busy is None:
                    if log:
                        log.info(f"waiting for another run writing {what}")
                    fcntl.flock(f, mode)
                    break
                if time.monotonic() >= give_up:
                    raise SystemExit(busy) from None
                time.sleep(0.1)
    except OSError as e:  # a file system without locks
        f.close()
        _unlocked(path, e, shared)
        return None
    except BaseException:
        f.close()
        raise
    _open.add(f)
    return f


def hold(path: Path, busy: str, shared: bool = False) -> bool:
    """acquire, kept until the script's main returns (common.runs.holding_runs), else the process ends. A lock
    this process holds already is kept as it is. Returns whether it is held (False where none can be had)."""
    if not is_held(path) and (f := acquire(path, busy, shared=shared)) is not None:
        held[str(Path(path).resolve())] = f
    return is_held(path)


def is_held(path: Path) -> bool:
    """Whether this process holds the lock at path (hold)."""
    return str(Path(path).resolve()) in held


def others_hold(path: Path) -> bool:
    """Whether another process holds the lock at path (shared or not). A lock this process holds (`held`)
    is not another's."""
    path = Path(path)
    if fcntl is None or not path.exists() or is_held(path):
        return False
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when f closes
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False

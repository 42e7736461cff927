"""run_main: the errors a user can fix end with one line, and what it says is true."""
import errno

import pytest

from common.runs import run_main


def raising(e):
    def main():
        raise e
    return main


def chained(outer, inner):
    try:
        raise inner
    except Exception as e:
        outer.__cause__ = e
    return outer


# what a full disk looks like from each writer: open().write, the errno of a quota, numpy's short write in
# np.save, safetensors' Rust I/O error, and one wrapped in another error
FULL = [OSError(errno.ENOSPC, "No space left on device", "feats/shards/00003.npy"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError("1572864 requested and 1523584 written"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        chained(RuntimeError("shard 3 failed"), OSError(errno.ENOSPC, "No space left on device"))]


@pytest.mark.parametrize("error", FULL, ids=range(len(FULL)))
def test_a_full_disk_is_one_line_that_says_nothing_is_lost(error):
    with pytest.raises(SystemExit) as e:
        run_main(raising(error))
    msg = str(e.value.code)
    assert msg.startswith("error: the disk is full (") and str(error) in msg
    assert "written whole or not at all" in msg and "run the same command again" in msg


def test_permission_denied_is_one_line():
    with pytest.raises(SystemExit, match="error: .*Permission denied"):
        run_main(raising(PermissionError(errno.EACCES, "Permission denied", "runs/x")))


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), RuntimeError("28 requested")])
def test_other_errors_keep_their_traceback(error):
    with pytest.raises(type(error)):
        run_main(raising(error))

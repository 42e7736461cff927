"""run_main: the errors a user can fix end with one line, and what it says is true."""
import errno

import pytest

from common.runs import run_main


def raising(e):
    def main():
        raise e
    return main


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_that_says_nothing_is_lost(code):
    with pytest.raises(SystemExit) as e:
        run_main(raising(OSError(code, "No space left on device", "feats/shards/00003.npy")))
    msg = str(e.value.code)
    assert msg.startswith("error: No space left on device writing feats/shards/00003.npy")
    assert "written whole or not at all" in msg and "run the same command again" in msg


def test_permission_denied_is_one_line():
    with pytest.raises(SystemExit, match="error: .*Permission denied"):
        run_main(raising(PermissionError(errno.EACCES, "Permission denied", "runs/x")))


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(OSError, match="Input/output error"):
        run_main(raising(OSError(errno.EIO, "Input/output error")))

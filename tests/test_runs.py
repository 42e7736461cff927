"""run_main: the errors a user can fix end with one line, and what it says is true."""
import errno
import os

import pytest
import torch

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


def said(error):
    """The error run_main names: the innermost of a chain, which holds the path and the errno."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)


# what a full disk looks like from each writer: open().write, the errno of a quota, safetensors' Rust I/O
# error, and one wrapped in another error
FULL = [OSError(errno.ENOSPC, "No space left on device", "feats/shards/00003.npy"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        chained(RuntimeError("shard 3 failed"), OSError(errno.ENOSPC, "No space left on device", "emb/x.npy"))]


@pytest.mark.parametrize("error", FULL, ids=range(len(FULL)))
def test_a_full_disk_is_one_line_that_says_nothing_is_lost(error):
    with pytest.raises(SystemExit) as e:
        run_main(raising(error))
    msg = str(e.value.code)
    assert msg.startswith(f"error: the disk is full ({said(error)})")
    assert "written whole or not at all" in msg and "free some space, then run the command again" in msg


# a file size limit (ulimit -f: Python ignores SIGXFSZ, so the write fails with EFBIG) and a read-only mount,
# from open().write, safetensors and a wrapped one: each a traceback before; numpy's short write into a file
# (no errno) is either a full disk or a size limit, and says both
LIMITS = [(OSError(errno.EFBIG, "File too large"), "a file is larger than this process may write", "ulimit -f"),
          (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
           "a file is larger than this process may write", "ulimit"),
          (OSError(errno.EROFS, "Read-only file system", "feats/x/.manifest.json.tmp"), "the file system is read-only",
           "on a writable one"),
          (chained(RuntimeError("fit failed"), OSError(errno.EROFS, "Read-only file system", "feats/fits/x")),
           "the file system is read-only", "writable"),
          (OSError("1572864 requested and 1523584 written"), "a write was cut short: the disk is full or a file is "
           "larger than this process may write", "free some space or raise the file size limit")]


@pytest.mark.parametrize("error, why, remedy", LIMITS, ids=range(len(LIMITS)))
def test_a_file_size_limit_or_a_read_only_disk_is_one_line(error, why, remedy):
    with pytest.raises(SystemExit) as e:
        run_main(raising(error))
    msg = str(e.value.code)
    assert msg.startswith(f"error: {why} ({said(error)})") and remedy in msg
    assert "feats/fits/x" in msg or error.__cause__ is None  # a chain's message names the inner error's path


def test_permission_denied_is_one_line():
    with pytest.raises(SystemExit, match="error: .*Permission denied"):
        run_main(raising(PermissionError(errno.EACCES, "Permission denied", "runs/x")))


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), RuntimeError("28 requested")])
def test_other_errors_keep_their_traceback(error):
    with pytest.raises(type(error)):
        run_main(raising(error))


def test_ctrl_c_and_a_diverged_loss_are_one_line(capsys, tmp_path):
    """Ctrl-C says how to go on: "the same command again" resumed fuse.py but was refused by distill.py and
    transfer.py, which need --resume and their run folder (a timestamped one when none was given)."""
    from argparse import Namespace

    from common.runs import holding_runs, make_run_dir

    for script in ("fuse", "distill", "transfer", None):
        @holding_runs  # as the scripts' mains: the locks let go, and the folder named is this main's
        def main():
            run = make_run_dir(tmp_path / script, script, Namespace()) if script else None
            raise KeyboardInterrupt(run)
        with pytest.raises(SystemExit) as e:
            run_main(main)
        err = capsys.readouterr().err
        assert e.value.code == 130 and "run the same command again" in err
        if script is None:
            assert "interrupted before its run folder was made" in err
            continue
        assert (f"--resume --run-dir {tmp_path / script}" in err) == (script != "fuse")
        assert ("--overwrite" in err) == (script == "fuse")
    from common import runs

    runs.LAST_RUN[:] = ["embed", tmp_path / "e.npy"]  # distill.py embed: no run folder, one file written at its end
    assert runs.interrupted_line() == (f"interrupted: {tmp_path / 'e.npy'} is written whole at its end, so nothing "
                                       f"of it was: run the same command again")
    runs.LAST_RUN.clear()
    with pytest.raises(SystemExit, match=r"^error: ae: the loss became inf; lower --lr$"):
        run_main(raising(FloatingPointError("ae: the loss became inf; lower --lr")))


def test_sigterm_and_sighup_end_a_run_as_ctrl_c_does(capsys, tmp_path):
    """kill, timeout, a batch system's preemption send SIGTERM: the run ended at once without a word (exit
    143), never saying how to resume, its loader workers holding its locks for seconds."""
    import signal

    inherited = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGHUP)}  # (nohup)
    try:
        _sigterm_and_sighup(capsys, tmp_path)
    finally:
        for sig, handler in inherited.items():
            signal.signal(sig, handler)


def _sigterm_and_sighup(capsys, tmp_path):
    import os
    import signal
    import time
    from argparse import Namespace

    from common.runs import holding_runs, make_run_dir

    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        cleaned = []

        @holding_runs
        def main():
            make_run_dir(tmp_path / "d", "distill", Namespace())
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # (the handler raises at once)
            finally:
                cleaned.append(True)  # the clean-up a Ctrl-C runs, runs
        with pytest.raises(SystemExit) as e:
            run_main(main)
        assert e.value.code == 128 + sig and cleaned
        assert f"interrupted by {sig.name}: to go on where it stopped, run the same command again with --resume " \
               f"--run-dir {tmp_path / 'd'}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # given back to whoever called run_main
    # under nohup (SIGHUP ignored) a closed terminal does not end the run
    ignored = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: os.kill(os.getpid(), signal.SIGHUP) or time.sleep(0.2) or "went on")
        assert e.value.code == "went on" and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, ignored)


def test_a_forked_worker_does_not_keep_the_parents_locks(tmp_path):
    """A flock belongs to the open file, which a fork shares: the loader workers of a killed run kept its run
    folder and cache locked until they noticed, refusing the rerun. A child closes its copies at the fork,
    which leaves the parent's lock held."""
    import os
    import signal
    import time

    from common import locks

    f = locks.acquire(tmp_path / "x.lock")
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that lives on, once past the fork (and its hooks)
        os.write(told, b"1")
        time.sleep(30)
        os._exit(0)
    os.close(told)
    os.read(ready, 1)  # (not a race with a slow machine's scheduler)
    os.close(ready)
    with pytest.raises(SystemExit, match="^held$"):  # the parent's lock still holds against others
        locks.acquire(tmp_path / "x.lock", busy="held", patience=0)
    f.close()  # the parent gone: its lock goes with it, though its child lives
    try:
        g = locks.acquire(tmp_path / "x.lock", busy="still held by the child", patience=0.5)
        g.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_run_folder_is_never_another_scripts_nor_a_file(tmp_path):
    """distill.py into fuse.py's run folder replaced its args.json and appended to its log; a file as
    --run-dir gave a FileExistsError traceback."""
    import json
    from argparse import Namespace

    from common.runs import make_run_dir

    run = make_run_dir(tmp_path / "run", "fuse", Namespace(seed=1))
    assert json.loads((run / "args.json").read_text())["script"] == "fuse"
    with pytest.raises(SystemExit, match="holds a fuse.py run: give distill.py a folder of its own"):
        make_run_dir(run, "distill", Namespace(seed=2))
    assert json.loads((run / "args.json").read_text())["seed"] == 1
    assert make_run_dir(run, "fuse", Namespace(seed=3)) == run  # the same script's rerun (resume) goes on
    (tmp_path / "cache").mkdir()  # a fuse.py feature cache: the run's files would go in among the cache's
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="cache is a fuse.py feature cache: give transfer.py a run folder"):
        make_run_dir(tmp_path / "cache", "transfer", Namespace())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["manifest.json"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="afile is a file"):
        make_run_dir(tmp_path / "afile", "fuse", Namespace())
    # transfer.py --resume given another script's folder listed every flag as differing
    import transfer

    args = transfer.parse_args(["--run-dir", str(run), "--resume"])
    with pytest.raises(SystemExit, match="holds a fuse.py run, not a transfer.py one"):
        transfer.resumed_results(args)
    with pytest.raises(SystemExit, match="--task-cache .*afile is a file: name a folder"):
        transfer.main(["--task-cache", str(tmp_path / "afile"), "--run-dir", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


BAD_NUMBERS = [("transfer", ["--lr", "nan"]), ("transfer", ["--lr", "-1"]), ("transfer", ["--hidden", "0"]),
               ("transfer", ["--seed", "-1"]), ("transfer", ["--workers", "-1"]), ("transfer", ["--min-face-prob", "1.5"]),
               ("transfer", ["--max-subsets", "-1"]), ("transfer", ["--batch-features", "0"]),
               ("fuse", ["--shard-size", "0"]), ("fuse", ["--batch", "0"]), ("fuse", ["--eval-every", "0"]),
               ("fuse", ["--fusion-batch", "0"]), ("fuse", ["--lr", "nan"]), ("fuse", ["--min-face-prob", "nan"]),
               ("fuse", ["--val-frac", "-0.5"]), ("fuse", ["--crop-size", "-1"]), ("fuse", ["--steps", "-5"]),
               ("distill", ["--lr", "-1"]), ("distill", ["--warmup", "nan"]), ("distill", ["--weight-decay", "-1"]),
               ("distill", ["--workers", "-1"]), ("distill", ["--stop-at", "-3"])]


@pytest.mark.parametrize("script, argv", BAD_NUMBERS, ids=[" ".join([s, *a]) for s, a in BAD_NUMBERS])
def test_numbers_out_of_range_stop_at_the_command_line(script, argv, capsys):
    """NaN learning rates, negative counts and zero batches ran (a NaN score reported, a traceback hours in)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).parse_args(argv)
    assert e.value.code == 2 and f"argument {argv[0]}: {argv[1]}: expected" in capsys.readouterr().err


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    """Two distill.py runs given one --run-dir interleaved their metrics and deleted each other's temporary
    checkpoint files: the second is refused while the first holds the folder."""
    from argparse import Namespace

    from common.runs import holding_runs, make_run_dir
    from tests.fixtures import held_elsewhere

    held = tmp_path / "run"
    held.mkdir()
    with held_elsewhere(held), pytest.raises(SystemExit, match="another run is writing into"):
        make_run_dir(held, "distill", Namespace())
    assert holding_runs(make_run_dir)(held, "distill", Namespace()) == held  # free once that process ended


def test_a_file_system_without_locks_runs_unlocked_and_says_so_once_a_lock(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on some network mounts: that is no other run, and must not stop this one; but two
    fuse.py on one cache there both ran, unlocked, and neither said a word."""
    import logging
    from argparse import Namespace

    from common import locks, runs

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    monkeypatch.setattr(locks, "said", set())
    with caplog.at_level(logging.WARNING, logger="common.locks"):
        assert runs.make_run_dir(tmp_path / "nfs", "fuse", Namespace()) == tmp_path / "nfs"
        assert locks.acquire(tmp_path / "nfs" / ".lock", busy="busy") is None  # said once a lock file
        assert locks.acquire(tmp_path / "cache" / ".readers", shared=True) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "No locks available" in said[0] and "a second run on it would not be refused" in said[0]
    assert "a run that writes it meanwhile" in said[1]
    # a later main in the same process (a notebook's next cell) on the same folder says it again
    caplog.clear()
    main = runs.holding_runs(lambda: runs.make_run_dir(tmp_path / "nfs2", "fuse", Namespace()))
    with caplog.at_level(logging.WARNING, logger="common.locks"):
        main()
        main()
    assert sum("No locks available" in r.getMessage() for r in caplog.records) == 2


def test_a_main_lets_go_of_its_run_folder_when_it_returns(tmp_path):
    """A notebook that called main() could not run the command line on the same folder afterwards."""
    import subprocess
    import sys
    from argparse import Namespace
    from pathlib import Path

    from common.runs import holding_runs, make_run_dir

    main = holding_runs(lambda: make_run_dir(tmp_path / "run", "fuse", Namespace()))
    main()
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from common.runs import hold; "
                           "hold(Path(sys.argv[1]))", str(tmp_path / "run")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_timestamped_run_folder_is_locked_too(tmp_path, monkeypatch):
    """A run without --run-dir gets runs/SCRIPT-TIME: a --resume given that folder while it runs is refused."""
    import subprocess
    import sys
    from argparse import Namespace
    from pathlib import Path

    from common import runs

    monkeypatch.setattr(runs, "RUNS", tmp_path)
    root = Path(__file__).resolve().parents[1]

    def main():
        run = runs.make_run_dir(None, "distill", Namespace())
        return subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from common.runs import hold; "
                               "hold(Path(sys.argv[1]))", str(run)], cwd=root, capture_output=True, text=True)
    other = runs.holding_runs(main)()
    assert other.returncode != 0 and "another run is writing into" in other.stderr


def test_progress_lines_in_a_log_without_a_terminal(monkeypatch):
    """tqdm draws nothing into a batch job's log: a line with the count and the rate stands in, at most once
    every EVERY seconds (transfer.py's and multitask's training said nothing for hours on a real dataset)."""
    import logging

    from common import progress

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    lines, keep = [], Keep()
    progress.log.addHandler(keep)  # (the scripts' loggers may have cut common.* off the root's handlers)
    monkeypatch.setattr(progress, "EVERY", 0)
    bar = progress.Progress("finetune AgeR-UTK", total=96, disable=True)  # as without a terminal
    for _ in range(3):
        bar.update(32, epoch="1/3")
    bar.close()
    assert len(lines) == 3 and lines[-1].startswith("finetune AgeR-UTK: 96/96 img, ") and lines[-1].endswith(
        "img/s, epoch 1/3")
    lines.clear()  # a resumed extraction: the images done before count, not in this run's rate
    bar = progress.Progress("extract[0]", total=100, initial=60, disable=True)
    bar.update(40)
    assert lines[0].startswith("extract[0]: 100/100 img, ")
    assert float(lines[0].split(", ")[1].split()[0]) > 0
    lines.clear()  # a resumed G fit: its steps come as a count, the first one after those of the killed run
    bar = progress.Progress("G[aer 64]", "step", total=10 ** 6, disable=True)
    bar.start -= 1  # one second into this run
    bar.update_to(900_001)
    bar.update_to(900_002, best_val_mse="0.1")
    assert lines[-1].startswith("G[aer 64]: 900002/1000000 step, ") and lines[-1].endswith(", best_val_mse 0.1")
    assert float(lines[-1].split(", ")[1].split()[0]) < 10  # 2 steps in a second, not 900,002
    monkeypatch.setattr(progress, "EVERY", 3600)
    lines.clear()
    bar = progress.Progress("quiet", disable=True)
    bar.update(5)
    progress.log.removeHandler(keep)
    assert not lines


def test_args_json_names_the_run_folder_and_is_written_whole(tmp_path, monkeypatch):
    """A run without --run-dir recorded run_dir null, though it went to a timestamped folder; args.json is
    written through a temporary file (a kill mid-write left a run that --resume could not read)."""
    import json
    from argparse import Namespace
    from pathlib import Path

    from common import runs

    monkeypatch.setattr(runs, "RUNS", tmp_path / "runs")
    run = runs.make_run_dir(None, "fuse", Namespace(run_dir=None, out=Path("feats/demo")))
    recorded = json.loads((run / "args.json").read_text())
    assert recorded["run_folder"] == str(run.resolve()) and recorded["run_dir"] is None and recorded["script"] == "fuse"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "args.json"]
    runs.locks.held.pop(str((run / ".lock").resolve())).close()
    # what the result depends on beside its arguments: the packages' versions and the code's commit
    import numpy
    import torch

    env = recorded["environment"]
    assert env["packages"]["numpy"] == numpy.__version__ and torch.__version__.startswith(env["packages"]["torch"])
    assert "onnxruntime" in env["packages"] and "facenet-pytorch" in env["packages"]  # the teachers' runtimes too
    if (runs.REPO / ".git").exists():
        assert len(env["commit"].split("-")[0]) == 40


@pytest.mark.parametrize("rank", ["0", "1"])
def test_scripts_that_do_not_split_their_work_refuse_torchrun(tmp_path, monkeypatch, rank):
    """Under torchrun every process ran all of transfer.py (twice the work, or a refusal by its own job's
    run-folder lock blaming a second command) and of distill.py embed: they stop at once, making nothing."""
    import distill
    import transfer

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="does not split its work under torchrun"):
        transfer.main(["--run-dir", str(tmp_path / "t"), "--task-cache", str(tmp_path / "tc")])
    with pytest.raises(SystemExit, match="distill.py embed runs in one process"):
        distill.main(["embed", "--student", str(tmp_path / "s"), "--data", str(tmp_path), "--out", str(tmp_path / "e.npy")])
    assert not (tmp_path / "t").exists() and not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("argv,say", [(["cache.py", "--rows", "0"], "--rows: 0: expected a whole number >= 1"),
                                      (["distill.py", "--widths", "abc"], "error: --widths abc: a comma list"),
                                      (["cache.py", "--workers", "abc"], "error: --workers abc: a comma list"),
                                      (["cache.py", "--dir", "/nonexistent/x"], "error: --dir /nonexistent/x: no such"),
                                      (["teachers.py", "--teachers", "gendr"], "error: unknown teacher 'gendr'"),
                                      (["pipeline.py", "--old-n", "0"], "--old-n: 0: expected a whole number >= 1"),
                                      pytest.param(["teachers.py", "--device", "cuda"], "has no CUDA GPU",
                                                   marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                            reason="a GPU is here"))])
def test_benchmarks_refuse_bad_arguments_in_one_line(argv, say):
    """A zero count or a typo ended in a traceback (ZeroDivisionError, IndexError, BadTeacher...)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    r = subprocess.run([sys.executable, str(bench / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and say in r.stderr and "Traceback" not in r.stderr


def test_a_rank_whose_peer_stopped_ends_in_one_line(monkeypatch):
    """Rank 0's refusal was followed by a page of gloo's trace from each other rank."""
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6578")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match=r"^rank 1: stopped, as another process of this job did"):
        run_main(raising(gloo))
    monkeypatch.setenv("RANK", "0")  # rank 0's own failure keeps its trace
    with pytest.raises(RuntimeError, match="closed by peer"):
        run_main(raising(gloo))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="a bug"):  # any other error keeps its trace on every rank
        run_main(raising(RuntimeError("a bug")))


def test_the_log_names_the_run_folder_first(tmp_path, capsys):
    """A timestamped run folder is named on the first line, not only when the run ends (a killed run's log
    would otherwise be somewhere the user has to guess); another torchrun rank does not repeat it."""
    from common.runs import get_logger

    import logging

    run = tmp_path / "fuse-20261129-120000"
    run.mkdir()
    early = [logging.LogRecord("fuse", logging.WARNING, __file__, 1, "1 folder(s) cannot be read", None, None)]
    get_logger(run, "t_first", early).info("teachers: ...")  # early: a warning of the image listing, on stderr already
    out = capsys.readouterr().out.splitlines()
    assert f"run folder: {run}" in out[0] and "teachers" in out[1]
    logged = (run / "log.txt").read_text().splitlines()
    assert f"run folder: {run}" in logged[0] and "cannot be read" in logged[1] and "teachers" in logged[2]
    get_logger(run, "t_rank1", rank=1).info("shard 3")
    assert "run folder" not in capsys.readouterr().out


def test_a_run_folder_named_in_other_bytes_than_utf8_is_logged(tmp_path, capsys):
    """A --run-dir whose name is not UTF-8 (a Latin-1 é): every line naming it was lost from log.txt, a
    'Logging error' trace on stderr in its place."""
    import os

    from common.runs import get_logger

    run = tmp_path / os.fsdecode(b"r\xe9sum\xe9")
    run.mkdir()
    get_logger(run, "t_bytes").info(f"written to {run}")
    named = str(run).encode("utf-8", "backslashreplace").decode()  # ...r\udce9sum\udce9
    log = (run / "log.txt").read_text(encoding="utf-8")  # still UTF-8
    assert log.count(named) == 3 and f"written to {named}" in log  # the first line names it twice
    out = capsys.readouterr()
    assert "Logging error" not in out.err and f"written to {named}" in out.out


def test_a_main_called_again_in_one_process_reads_files_written_since_and_logs_apart(tmp_path):
    """A notebook or sweep driver calling the scripts' mains: a shard kept open (a map) across two calls read
    the file an --overwrite had deleted (G fitted on the old features, Table 5 off by 3x), and the shared
    modules' warnings after a main went on into that run's log.txt."""
    import json
    import logging
    from argparse import Namespace

    import numpy as np
    import torch

    from common.cache import OPEN_FILES, ShardedArray
    from common.runs import get_logger, holding_runs, make_run_dir

    shard = tmp_path / "00000.npy"
    np.save(shard, np.zeros((4, 2), np.float32))
    rows = ShardedArray([shard], np.array([0, 4]))

    @holding_runs
    def main(argv=None):
        make_run_dir(tmp_path, "nb", Namespace())
        get_logger(tmp_path, "nb").info("inside")
        torch.backends.cudnn.benchmark = True  # as distill.py sets it
        return float(rows.shard(0)[0, 0])

    assert main(["--steps", 3]) == 0.0
    shard.unlink()  # deleted and written anew between the calls, as fuse.py --overwrite does
    np.save(shard, np.ones((4, 2), np.float32))
    assert main() == 1.0 and len(OPEN_FILES) == 0
    logging.getLogger("common.images").warning("a warning of the next cell")
    log = (tmp_path / "log.txt").read_text()
    assert log.count("inside") == 2 and "next cell" not in log
    assert logging.getLogger("nb").handlers == []  # its log.txt closed
    assert torch.backends.cudnn.benchmark is False  # the next main runs as in a fresh process
    main(["--epochs", "2"])  # args.json's command: the argv given, not the notebook kernel's
    assert json.loads((tmp_path / "args.json").read_text())["argv"] == ["test_runs.py", "--epochs", "2"]


def test_a_run_folder_holding_links_is_refused_before_anything_is_written_through_them(tmp_path):
    """A run folder copied from elsewhere with ckpt or log.txt as a symbolic link: the refused resume had
    already appended to the linked file and swept the linked folder's temporary files; a continued one wrote
    its checkpoints there and deleted 'later steps' of the user's."""
    from argparse import Namespace

    from common.runs import holding_runs, make_run_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".keep.tmp").write_text("mine")
    (elsewhere / "bashrc").write_text("mine\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt").symlink_to(elsewhere)
    (run / "log.txt").symlink_to(elsewhere / "bashrc")
    with pytest.raises(SystemExit, match=r"holds log.txt, ckpt as a symbolic link"):
        holding_runs(make_run_dir)(run, "distill", Namespace())
    assert (elsewhere / ".keep.tmp").exists() and (elsewhere / "bashrc").read_text() == "mine\n"
    assert not (run / ".lock").exists() and not (run / "args.json").exists()


@pytest.mark.parametrize("name", ["etl", "metrics.jsonl", ".lock", "ckpt", "log.txt"])
def test_each_name_a_run_writes_through_is_refused_as_a_link(tmp_path, name):
    from common.runs import THROUGH, run_dir_problem

    assert name in THROUGH
    (tmp_path / "elsewhere").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(tmp_path / "elsewhere")
    assert f"holds {name} as a symbolic link" in (run_dir_problem(run, "transfer") or "")


def test_args_json_says_when_the_code_was_changed_since_its_commit(monkeypatch):
    """A result of edited code was recorded as the commit's own."""
    import subprocess

    from common import runs

    for status, suffix in ((" M common/fusion.py", "-dirty"), ("", "")):
        def git(cmd, **kwargs):
            out = {"rev-parse": "a" * 40, "status": status}[cmd[4]]
            return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")
        monkeypatch.setattr(subprocess, "run", git)
        assert runs.environment()["commit"] == "a" * 40 + suffix


def test_running_out_of_device_memory_is_one_line_that_says_how_to_go_on(tmp_path):
    """A CUDA out of memory ended in torch's traceback, naming no flag and not saying that a rerun resumes."""
    import torch

    from common import runs

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                 "of 79.10 GiB of which 1.06 GiB is free.\nSee documentation for Memory Management")
    cases = [(None, "run the command again with a smaller --batch"),
             (["fuse", tmp_path / "f"], "run the same command again once the memory is free, or with a smaller "
                                         "--batch or fewer --streams"),
             (["distill", tmp_path / "d"], f"with --resume --run-dir {tmp_path / 'd'}; a smaller --batch is another run"),
             (["embed", tmp_path / "e.npy"], "is written whole at its end: run again with a smaller --batch")]
    try:
        for last, remedy in cases:
            runs.LAST_RUN[:] = last or []
            for error in (oom, chained(RuntimeError("lane 1 failed"), oom)):
                with pytest.raises(SystemExit) as e:
                    run_main(raising(error))
                msg = str(e.value.code)
                assert msg.startswith("error: out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB.")
                assert remedy in msg and "\n" not in msg and "documentation" not in msg
    finally:
        runs.LAST_RUN.clear()


def test_the_way_on_pastes_into_a_shell_whatever_the_run_folder_is_called(tmp_path):
    """'--resume --run-dir runs/-d2 é' pasted back was 'unrecognized arguments: é', and a folder named -r read as
    a flag."""
    import shlex

    from common import runs

    for name in ("runs/-d2 é", "-r", "plain", "it's"):
        runs.LAST_RUN[:] = ["distill", name]
        try:
            lines = [runs.interrupted_line(), runs.out_of_memory_line(RuntimeError("CUDA out of memory"))]
        finally:
            runs.LAST_RUN.clear()
        for line in lines:  # (the out-of-memory line's resume ends its sentence with ';')
            words = shlex.split(line.split("again with ", 1)[1].split(";")[0])
            assert words[:2] == ["--resume", "--run-dir"] and os.path.normpath(words[2]) == name and len(words) == 3
            assert not words[2].startswith("-")


def test_the_scripts_start_where_python_has_no_sighup():
    """Windows' Python has no signal.SIGHUP: every script stopped at its start with an AttributeError."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import runpy, signal, sys; del signal.SIGHUP; sys.argv = ['fuse.py', '--list-teachers']; "
            "runpy.run_path('fuse.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "sface" in done.stdout, done.stderr[-2000:]


def test_every_loader_leaves_stop_signals_to_its_parent():
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1]
    loaders = []
    for path in [*root.glob("*.py"), *(root / "common").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "DataLoader":
                loaders.append((path.name, {k.arg: ast.unparse(k.value) for k in node.keywords}.get("worker_init_fn")))
    assert len(loaders) >= 5 and all(fn == "leave_stops_to_the_parent" for _, fn in loaders), loaders


def _loader_job_stopped(tmp_path, stop, dataset="range(10 ** 6)", prelude="", preexec_fn=None):
    """A run_main script reading a 2-worker loader over `dataset` (source; `prelude` may define it), stopped by
    stop(job) once it has read 20 items: (exit status, stderr, seconds from the stop to its end). preexec_fn
    runs in the job before it starts (nohup's SIGHUP ignored)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "job.py"
    script.write_text(
        "import time, torch\n"
        "from common.runs import leave_stops_to_the_parent, run_main\n"
        f"{prelude}"
        "def main():\n"
        f"    loader = torch.utils.data.DataLoader({dataset}, batch_size=1, num_workers=2,\n"
        "                                         worker_init_fn=leave_stops_to_the_parent)\n"
        "    for i, _ in enumerate(loader):\n"
        "        if i == 20:\n"
        "            print('ready', flush=True)\n"
        "        time.sleep(0.005)\n"
        "run_main(main)\n")
    root = Path(__file__).parents[1]
    job = subprocess.Popen([sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=preexec_fn)
    try:
        assert job.stdout.readline() == "ready\n"
        start = time.monotonic()
        stop(job)
        _, err = job.communicate(timeout=100)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:  # all gone, as they should be
            pass
    return job.returncode, err, time.monotonic() - start


def test_a_stop_signal_to_the_whole_job_ends_a_run_with_loader_workers_as_ctrl_c_does(tmp_path):
    """`timeout`, a batch system or kill -- -PGID send SIGTERM to the workers too: torch's handler ended them at
    once, and the run, ending as Ctrl-C does, died of a "DataLoader worker killed by signal" traceback (exit 1)."""
    import signal

    code, err, _ = _loader_job_stopped(tmp_path, lambda job: os.killpg(job.pid, signal.SIGTERM))  # as a batch system
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    assert "Traceback" not in err and "killed by signal" not in err, err


def test_under_nohup_a_closed_terminal_ends_neither_the_run_nor_its_loader_workers(tmp_path):
    """nohup ignores SIGHUP, and the workers inherit that: taking it for a stop in them killed them when the
    terminal closed, and the run died of "DataLoader worker exited unexpectedly"."""
    import signal

    code, err, _ = _loader_job_stopped(tmp_path, lambda job: os.killpg(job.pid, signal.SIGHUP), "range(300)",
                                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert code == 0 and "Traceback" not in err, err


def test_a_busy_worker_ends_at_once_when_its_parent_alone_is_stopped(tmp_path):
    """kill PID, docker stop: the parent ends its workers with SIGTERM, then waits; one in a long read (a slow
    disk, a hung mount) must not hold the run's end until its item is done."""
    import signal
    import time

    slow = ("class Slow(torch.utils.data.Dataset):\n"
            "    def __len__(self):\n"
            "        return 10 ** 6\n"
            "    def __getitem__(self, i):\n"
            "        time.sleep(120 if i >= 40 else 0.001)\n"
            "        return i\n")

    def stop(job):
        time.sleep(1)  # the workers are in their long reads
        job.send_signal(signal.SIGTERM)  # the parent alone

    code, err, seconds = _loader_job_stopped(tmp_path, stop, "Slow()", slow)
    assert code == 128 + signal.SIGTERM and seconds < 60 and "Traceback" not in err, err


def test_a_resumed_runs_args_json_keeps_the_command_that_started_it(tmp_path, monkeypatch):
    """A resume recorded argv ['distill.py', '--resume', '--run-dir', RUN] in place of the first command: run
    again into another folder it started afresh on the defaults (160 steps instead of 12), without an error."""
    import json
    from argparse import Namespace

    from common import runs

    run = tmp_path / "run"
    run.mkdir()
    start = ["distill.py", "--cache", "feats/demo", "--epochs", "3", "--stop-at", "4"]

    def record(argv, resume):
        monkeypatch.setattr(runs, "CALL", argv)
        runs.write_args(run, "distill", Namespace(epochs=3, resume=resume))
        recorded = json.loads((run / "args.json").read_text())
        assert recorded["argv"] == argv
        return recorded.get("started_by")

    assert record(start, False) == {"argv": start, "cwd": os.getcwd()}
    for argv in (["distill.py", "--resume", "--run-dir", str(run)], ["distill.py", "--resum", "--run-dir", "r"]):
        assert record(argv, True) == {"argv": start, "cwd": os.getcwd()}  # a resume of a resume too
    again = ["distill.py", "--overwrite", "--epochs", "2"]
    assert record(again, False) == {"argv": again, "cwd": os.getcwd()}  # a new run: its own command
    (run / "args.json").unlink()  # a requeued job that starts the run with --resume: its command started it
    requeued = ["distill.py", "--cache", "feats/demo", "--resume", "--run-dir", str(run)]
    assert record(requeued, True) == {"argv": requeued, "cwd": os.getcwd()}
    assert record(["distill.py", "--resume", "--run-dir", str(run)], True) == {"argv": requeued, "cwd": os.getcwd()}
    # a run resumed by older code recorded only the resume: what started it is not known, and not said
    record(["distill.py", "--resume", "--run-dir", str(run)], True)
    (run / "args.json").write_text(json.dumps({"argv": ["distill.py", "--resume", "--run-dir", "r"], "resume": True}))
    assert record(["distill.py", "--resume", "--run-dir", "r"], True) is None


@pytest.mark.parametrize("script", ["distill", "transfer"])
def test_a_bare_resume_of_a_folder_with_no_run_recorded_is_refused(tmp_path, script):
    """Killed in its first seconds, before the run folder was made, a run left nothing: `--resume --run-dir RUN`
    alone then ran the script's defaults (transfer.py the embedded LFW task, distill.py 40 epochs for 3) and
    exited 0 in that folder."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match="holds no recorded run to continue.*to run the defaults, give one"):
        module.parse_args(["--resume", "--run-dir", str(tmp_path / "run"), "--workers", "0"])
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "args.json").write_text('{"trunc')  # said by the resume check as what it is
    module.parse_args(["--resume", "--run-dir", str(tmp_path / "damaged")])
    # with the command that started it, a resume into an empty folder starts it (a preemptible job's requeue)
    module.parse_args(["--resume", "--run-dir", str(tmp_path / "run"), "--epochs", "3"])


def test_stamped_folders_made_in_one_second_are_two(tmp_path, monkeypatch):
    from common import runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: "20261130-000000")
    first, second = runs.stamped_folder(tmp_path, "replaced"), runs.stamped_folder(tmp_path, "replaced")
    assert (first.name, second.name) == ("replaced-20261130-000000", "replaced-20261130-000000-2")
    assert first.is_dir() and second.is_dir()

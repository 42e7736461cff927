"""Run folders: every result lands beside the exact arguments that produced it (as timm's train.py does)."""
from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common import locks
from common.files import remove_temporary, write_json


RUNS = Path("runs")  # where a run without --run-dir goes (the tests point it into their temporary folder)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default after its text, unless the text already gives it or there is none
    to give (None, off, an empty list): the scripts' docstrings keep their own line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS)
        if none or "default" in text or not text:  # (`is False`: a default of 0 is one to show)
            return text
        return text + " (default: %(default)s)"


def bounded(kind=int, lo=None, hi=None, above=None, below=None):
    """An argparse type: a finite number of `kind` within the bounds (lo <= x <= hi, above < x < below), so
    that a NaN, a negative count or a zero batch stops at the command line, not in a traceback hours in."""
    words = [f">= {lo:g}" if lo is not None else "", f"> {above:g}" if above is not None else "",
             f"<= {hi:g}" if hi is not None else "", f"< {below:g}" if below is not None else ""]
    wanted = ("a whole number" if kind is int else "a number") + " " + " and ".join(w for w in words if w)

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {wanted}") from None
        if not (math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
                and (above is None or v > above) and (below is None or v < below)):
            raise argparse.ArgumentTypeError(f"{text}: expected {wanted}")
        return v
    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


COUNT = bounded(int, lo=0)  # workers, seeds, steps where 0 means none or off
POSITIVE_INT = bounded(int, lo=1)  # batches, sizes, epochs
POSITIVE = bounded(float, above=0)  # learning rates, temperatures, widths
NONNEGATIVE = bounded(float, lo=0)  # weights, weight decay
PROBABILITY = bounded(float, lo=0, hi=1)  # detector confidences, shares of 0 to 1 both included


def resolved_args(args) -> dict:
    """The arguments as a run folder's args.json holds them (paths as text; argv aside)."""
    return json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                 default=str))


def recorded_args(run: Path) -> dict | None:
    """The args.json of the run folder `run` (write_args's), or None: no run there, or a record that does not
    read."""
    try:
        recorded = json.loads((Path(run) / "args.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def resumed_value(args, run):
    """flag -> whether args' value of it is the one the run being resumed (--resume into `run`) recorded: such a
    value passes the checks of a flag, as a run recorded before a check refused that value is continued as it
    ran; any other value is checked, given with --resume or not."""
    recorded = (recorded_args(run) or {}) if getattr(args, "resume", False) and run else {}
    return lambda flag: flag in recorded and recorded[flag] == getattr(args, flag)


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests the command line itself gave (abbreviations and --flag=value included): argv parsed again
    with no defaults at all."""
    actions = [a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)]
    saved = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in zip(actions, saved):
            a.default = d


def resume_defaults(parser: argparse.ArgumentParser, argv, args, run: Path, script: str, keep=("resume",),
                    rebase=None):
    """--resume: each flag not on the command line takes the value the run's args.json recorded (its resolved
    one), so that `--resume --run-dir RUN` alone continues RUN instead of being refused for every default that
    differs from the arguments it ran with. keep: the flags never taken from there (the run folder's own).
    Another script's run folder lends nothing (make_run_dir refuses it). With no run recorded there, a command
    that gives nothing but the resume is refused: on defaults it would be another job."""
    recorded = recorded_args(run)
    actions = [a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)]
    given = given_flags(parser, argv)
    if recorded is None and not (Path(run) / "args.json").exists() and given <= {*keep, "device", "workers"}:
        # (a run killed in its first seconds, before its folder and args.json were made, or a mistyped folder;
        # an args.json that does not read is said by the resume check)
        raise SystemExit(f"error: --resume: {run} holds no recorded run to continue, and this command gives nothing "
                         f"else, so it would run {script}.py's defaults: run the command that started it again "
                         f"(with --resume, it continues whatever of it is there); to run the defaults, give one "
                         f"of them on the command line")
    if recorded is None or recorded.get("script", script) != script:  # (no run there yet: the resume check says so)
        return args
    # a relative path is the run's from the folder it was started in (feats/demo, runs/...): resumed from another
    # one, it named nothing there ("no feature cache at feats/c1") or a cache made anew. rebase: {dest: (value,
    # cwd) -> value} for the flags that hold paths inside a text (transfer.py's --tasks NAME=DIR,...)
    rebase, cwd = rebase or {}, recorded.get("cwd", "")
    for a in actions:
        if a.dest in recorded and a.dest not in given and a.dest not in keep:
            value = recorded[a.dest]
            if value is not None and a.dest in rebase:
                value = rebase[a.dest](value, cwd)
            elif value is not None and (a.type is Path or isinstance(a.default, Path)):
                value = Path(cwd, value)
            setattr(args, a.dest, value)
    return args


def comparable(args, recorded: dict, defaults) -> tuple[dict, dict]:
    """(the recorded run's arguments, args') as resolved_args gives them, made comparable: a flag newer than
    that run takes its default there (defaults: the parser's), and the path arguments are absolute, each from
    the folder its run was started in, so that the same files compare equal from anywhere."""
    old, now = {**resolved_args(defaults), **recorded}, resolved_args(args)
    for k, v in vars(args).items():  # (real paths: a recorded cwd is one, a path given may go through a link)
        if isinstance(v, Path):
            now[k] = os.path.realpath(v)
            if isinstance(old.get(k), str):
                old[k] = os.path.realpath(os.path.join(old.get("cwd", ""), old[k]))
    return old, now


LAST_RUN = []  # [script, run folder] of the run folder this process made last (embed: [embed, its --out])


def as_arg(path) -> str:
    """A path as a shell takes it after a flag: quoted where needed, and not read as a flag itself."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def interrupted_line() -> str:
    """What a Ctrl-C ends with: how to go on where the run stopped (what was written is whole)."""
    if not LAST_RUN:
        return "interrupted before its run folder was made: run the same command again"
    script, run = LAST_RUN
    if script == "embed":  # distill.py embed: no run folder, one file written whole at the end
        return f"interrupted: {run} is written whole at its end, so nothing of it was: run the same command again"
    if script == "fuse":
        return (f"interrupted (run folder {run}): run the same command again, without --overwrite (which would "
                f"delete the cache), to go on where it stopped")
    return f"interrupted: to go on where it stopped, run the same command again with --resume --run-dir {as_arg(run)}"


def out_of_memory_line(e: BaseException) -> str:
    """What running out of a device's memory ends with: what ran out, and how to go on with less."""
    what = " ".join(str(e).split("\n")[0].split())[:400]
    if not LAST_RUN:
        return f"error: out of device memory ({what}): run the command again with a smaller --batch"
    script, run = LAST_RUN
    if script == "embed":
        return f"error: out of device memory ({what}); {run} is written whole at its end: run again with a smaller --batch"
    if script == "fuse":
        return (f"error: out of device memory ({what}). What was written is whole: run the same command again once "
                f"the memory is free, or with a smaller --batch or fewer --streams, which the extraction takes on the "
                f"same cache (G's fit, --fusion-batch, starts afresh at another batch)")
    return (f"error: out of device memory ({what}). What was written is whole: once the memory is free, run the same "
            f"command again with --resume --run-dir {as_arg(run)}; a smaller --batch is another run (start it afresh)")


THROUGH = (".lock", "log.txt", "metrics.jsonl", "ckpt", "etl")  # written into in place (not replaced whole)


def run_dir_problem(run: Path | None, prefix: str) -> str | None:
    """Why --run-dir `run` would be refused to script `prefix` (None: it would not), without making or locking
    anything: a script that deletes or rewrites before it makes its run folder (fuse.py --overwrite) asks
    first, so that a refused folder costs nothing."""
    if run is None:
        return None
    run = Path(run)
    if run.exists() and not run.is_dir():
        return f"error: --run-dir {run} is a file: name a folder"
    if (run / "manifest.json").is_file():  # its args.json, log and tables would go into the cache's folder
        return f"error: --run-dir {run} is a fuse.py feature cache: give {prefix}.py a run folder of its own"
    # no run there yet (or one from before the script was recorded): this script's
    made_by = (recorded_args(run) or {}).get("script", prefix)
    if made_by != prefix:
        return f"error: --run-dir {run} holds a {made_by}.py run: give {prefix}.py a folder of its own"
    # what a run appends to, writes into or sweeps: through a link, files elsewhere were written and deleted
    if links := [name for name in THROUGH if (run / name).is_symlink()]:
        return (f"error: --run-dir {run} holds {', '.join(links)} as a symbolic link, which a run would write into "
                f"and sweep, wherever it points: put the file or folder itself there")
    return None  # (a run writing there: make_run_dir's lock says so, after the patience a brief check needs)


def stamped_folder(parent: Path, prefix: str) -> Path:
    """A new folder parent/PREFIX-TIME (two made in the same second get folders of their own: -2, -3 ...)."""
    stamp, n = Path(parent) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    while True:
        folder = stamp if n == 1 else stamp.with_name(f"{stamp.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def make_run_dir(out: str | Path | None, prefix: str, args, record: bool = True) -> Path:
    """Create the run folder (a timestamped one under RUNS when out is None) and save args.json in it, with the
    script (`prefix`) that made it: another script's run folder is refused, not written over. record=False
    leaves args.json to write_args (a resume writes it once its checks passed: a refused one keeps the run's)."""
    if out:
        run = Path(out)
        if why := run_dir_problem(run, prefix):
            raise SystemExit(why)
        run.mkdir(parents=True, exist_ok=True)
    else:
        RUNS.mkdir(parents=True, exist_ok=True)
        run = stamped_folder(RUNS, prefix)
    # a timestamped one too: its name is in the log, and a --resume given it meanwhile is refused
    if hold(run):  # held: a temporary file of its own is a killed run's
        remove_temporary(run)  # its own folders only: a --run-dir above other runs or caches holds their writers'
        for sub in ("ckpt", "etl"):
            remove_temporary(run / sub, recursive=True)
    LAST_RUN[:] = [prefix, run]  # for the line a Ctrl-C ends with
    if record:
        write_args(run, prefix, args)
    return run


def write_args(run: Path, prefix: str, args) -> None:
    """args.json: the resolved arguments by their argparse names (dest: fuse.py's `out` is --cache, distill.py's
    `out` --run-dir and `teacher_cache` --cache, transfer.py's `teacher_cache` --cache and `cache_dir`
    --task-cache), the script, the run folder itself (a timestamped one when --run-dir was not given) and the
    command line (argv, run in cwd). A resume's argv is `--resume --run-dir RUN`, which run again elsewhere
    starts afresh on defaults: `started_by` keeps the command (and its folder) that started the run. Written
    whole or not at all: a kill mid-write must not leave a run that --resume cannot read."""
    argv, before = CALL or sys.argv, recorded_args(run) or {}
    if not getattr(args, "resume", False) or not before:  # the run starts here (a requeued job may start it resuming)
        first = {"argv": argv, "cwd": os.getcwd()}
    else:  # (a record by older code kept none: its argv started the run unless it was a resume itself)
        first = before.get("started_by") or ({"argv": before["argv"], "cwd": before.get("cwd")}
                                             if before.get("argv") and before.get("resume") is False else None)
    write_json(run / "args.json", {**resolved_args(args), "script": prefix, "run_folder": str(Path(run).resolve()),
                                   "argv": argv, "cwd": os.getcwd(), "environment": environment(),
                                   **({"started_by": first} if first else {})})


REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    """What a result depends on beside its arguments: Python, the version of each package the requirements
    files name (installed ones), and the code's git commit (with `dirty` when tracked files were changed: asked
    each time, a notebook's code may change between two runs)."""
    env = {"python": sys.version.split()[0], "packages": _packages()}
    if "torch" in sys.modules:  # the build: 2.14.1+cu130 and +cpu are one package version
        env["torch"] = sys.modules["torch"].__version__
    try:
        # (--no-optional-locks: runs started together do not contend for the checkout's index lock)
        git = lambda *a: subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *a],  # noqa: E731
                                        capture_output=True, text=True, timeout=10).stdout.strip()
        if commit := git("rev-parse", "HEAD"):
            env["commit"] = commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git here, or a checkout without .git
        pass
    return env


@functools.lru_cache(maxsize=1)
def _packages() -> dict:
    from importlib import metadata

    packages = {}
    for req in ("requirements.txt", "requirements-weights.txt"):
        try:
            lines = (REPO / req).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if name := re.split(r"[=<>~!\[ ;#]", line.strip(), maxsplit=1)[0]:
                try:
                    packages[name] = metadata.version(name)
                except metadata.PackageNotFoundError:
                    pass
    return packages


def holding_runs(main):
    """A script's main that, when it returns or fails, lets go of the run folders it locked, of its log files
    and of the shard files it held open: a notebook or a driver script that calls it can then run the command
    line on the same folder, delete or rewrite a cache between two calls, and log elsewhere."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        from common.cache import OPEN_FILES

        import torch

        before, made, lib = set(locks.held), len(_LOGGERS), logging.getLogger("common")
        saved = list(lib.handlers), lib.propagate
        cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic  # distill.py sets them
        argv = args[0] if args and isinstance(args[0], (list, tuple)) else kwargs.get("argv")
        # what args.json records as the command: the argv given, from a notebook, not the kernel's
        CALL[:] = [f"{main.__module__.rsplit('.', 1)[-1]}.py", *map(str, argv)] if argv is not None else []
        LAST_RUN.clear()  # a driver running several mains: the Ctrl-C line names this one's folder
        OPEN_FILES.clear()  # maps of files deleted since (fuse.py --overwrite) read the old features
        try:
            return main(*args, **kwargs)
        finally:
            for key in set(locks.held) - before:
                locks.held.pop(key).close()
            for log in _LOGGERS[made:]:  # the common.* warnings after it went to this run's log.txt
                for h in log.handlers:
                    h.close()
                log.handlers.clear()
            del _LOGGERS[made:]
            lib.handlers, lib.propagate = saved
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
            OPEN_FILES.clear()
            CALL.clear()
            locks.said.clear()  # a later call on the same lock-less folder says so again
            if (student := sys.modules.get("common.student")) is not None:
                student.PINNED.clear()  # the student files transfer.py read once (a later call reads them anew)
    return wrapped


CALL = []  # the command line of the main running, as called from Python ([] from the command line: sys.argv)


_LOGGERS = []  # the loggers get_logger set up, in order


def hold(run: Path, lock: Path | None = None, busy: str | None = None) -> bool:
    """Lock the run folder until the script's main returns (holding_runs), else the process ends: a second
    command given the same --run-dir while the first runs would interleave its log, metrics and checkpoints
    with the first's (and delete its temporary files). lock: the lock file (run/.lock), busy: the refusal.
    Returns whether it is held (False on a file system without locks)."""
    return locks.hold(lock or run / ".lock", busy or f"error: another run is writing into {run} (the same --run-dir "
                                                     f"given twice?): wait for it to end, or give this one another folder")


@contextmanager
def kept_warnings():
    """The shared modules' warnings logged before the run folder exists (images the listing leaves out): shown
    at once on stderr, and kept, so that get_logger(..., early=...) writes them into the run's log.txt too."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
            sys.stderr.write(self.format(record) + "\n")

    handler, lib = Keep(logging.WARNING), logging.getLogger("common")
    saved = lib.handlers, lib.propagate
    lib.handlers, lib.propagate = [handler], False  # not also a previous run's log in the same process
    try:
        yield records
    finally:
        lib.handlers, lib.propagate = saved


def get_logger(run: Path | None, name: str, early=(), rank: int = 0) -> logging.Logger:
    """Logger writing to stdout and run/log.txt (appending, so a resumed run keeps its history).

    Without a run folder it writes to stdout only. `early`: log records kept by kept_warnings, written into
    log.txt (stderr has shown them already). rank > 0 (another process of a torchrun job, appending to the
    same log.txt): its lines say so.
    """
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s " + (f"rank {rank}: " if rank else "") + "%(message)s", "%H:%M:%S")
    # A path that is not UTF-8 (its bytes kept as surrogates, as os.fsdecode gives them) is written with its
    # odd bytes as \udcXX escapes, the log staying UTF-8: strict encoding lost every line naming it, a
    # "Logging error" trace each.
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # (under the C locale it writes the bytes back already)
    handlers = [logging.StreamHandler(sys.stdout)] + (
        [logging.FileHandler(run / "log.txt", encoding="utf-8", errors="backslashreplace")] if run else [])
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    # Warnings of the shared modules (common.*, e.g. a teacher falling back to one image at a time)
    # land in the same places.
    lib = logging.getLogger("common")
    lib.handlers, lib.propagate = list(handlers), False
    _LOGGERS.append(log)
    if run and rank == 0:  # first: a timestamped folder is otherwise named only when the run ends
        log.info(f"run folder: {run} (this log in {run / 'log.txt'})")
    for record in early:
        for h in handlers[1:]:
            h.handle(record)
    return log


def dist_info() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def one_process_only(script: str, apart: str) -> None:
    """Refuse torchrun for a script that does not split its work: every process would do all of it, into
    the same files (or be refused by its own job's lock, a message blaming a second command)."""
    if dist_info()[1] > 1:
        raise SystemExit(f"error: {script} runs in one process and does not split its work under torchrun: start "
                         f"it with python (on several GPUs, one run per GPU, each with its own --device cuda:N and "
                         f"{apart})")


def init_dist(device, timeout=None) -> None:
    """Join torchrun's process group: NCCL between GPUs, gloo on the CPU. pick_device has made each rank's
    GPU the current one, so that its NCCL context lands there and not on GPU 0. timeout: how long a
    collective may wait for the slowest rank (torch's default: 10 min with NCCL, 30 with gloo)."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **({"timeout": timeout} if timeout else {}))


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # with an index: under torchrun each process takes its own GPU
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # MPS has no float64, which detection and PCA use; others untried
        raise SystemExit(f"error: --device {name}: only cpu and cuda are supported (expected auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: this machine has no CUDA GPU that torch can use (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "cuda" and device.index is not None:
        # the current device too: what runs on "the" GPU (the loaders' pin-memory threads, a CUDA context)
        # would otherwise land on GPU 0 when the run asked for cuda:1
        torch.cuda.set_device(device)
    return device


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (kill, timeout, a batch system's preemption or time limit, a closed terminal): ended
    as a Ctrl-C is, through the same clean-up and its line saying how to go on. Python's default ended the run
    at once without a word (exit 143), leaving its loader workers holding the run's locks for seconds."""


def _terminated(signum, frame):
    raise Terminated(signum)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # Windows: no SIGHUP


def leave_stops_to_the_parent(_worker_id=None) -> None:
    """A loader worker's worker_init_fn. `timeout`, a batch system or `kill -- -PGID` send SIGTERM to every
    process of the job: torch's handler ended a worker by the signal, and its parent, while it ended itself as
    Ctrl-C does, died of a "DataLoader worker killed by signal" traceback. A worker now ends quietly (exit 0,
    which torch does not take for a failure) at once, at any signal to stop, its parent's included, busy or
    not; one ignored (nohup's SIGHUP) stays ignored."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _quit)


def _quit(signum, frame):
    os._exit(0)  # (a worker holds nothing to save: the parent writes everything)


def run_main(main) -> None:
    """Run a script's main; the errors a user can fix (a missing folder, another cache, a package not
    installed, an unreadable file) end with their one-line message instead of a traceback. SIGTERM and
    SIGHUP, where they would end it anyway (not under nohup), end it as Ctrl-C does (exit 128 + the signal)."""
    from common.cache import CacheMismatch
    from common.checkpoint import StateError
    from common.images import BadImage
    from common.prune import CannotPrune
    from common.student import NotAStudent
    from common.tasks import BadLabels
    from common.teachers import BadTeacher
    from common.weights import MissingWeights

    signals = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
    # only where the default would end the run: `nohup` ignores SIGHUP, and a run under it must outlive its terminal
    before = {sig: signal.signal(sig, _terminated) for sig in signals if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:  # Ctrl-C: what was written is whole (atomic writes), the rest is redone
        if dist_info()[0] == 0:  # rank 0 alone made the run folder and says how to go on
            how = f" by {signal.Signals(e.args[0]).name}" if isinstance(e, Terminated) else ""
            sys.stderr.write(f"\n{interrupted_line().replace('interrupted', 'interrupted' + how, 1)}\n")
        sys.exit(128 + e.args[0] if isinstance(e, Terminated) else 130)
    except FloatingPointError as e:  # a loss that diverged: the message names the flag to change
        sys.exit(f"error: {e}")
    except (FileNotFoundError, NotADirectoryError, PermissionError, CacheMismatch, MissingWeights, BadImage,
            NotAStudent, BadLabels, BadTeacher, CannotPrune, StateError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:
        if peer_stopped(e):  # rank 0 refused (its one line is above): not a page of gloo's trace per rank
            sys.exit(f"rank {dist_info()[0]}: stopped, as another process of this job did (its message is above)")
        import torch

        if (full := _raised_from(e, torch.OutOfMemoryError)) is not None:
            sys.exit(out_of_memory_line(full))
        if (stopped := cannot_write(e)) is None:
            raise
        why, e = stopped  # the error that says it (the path, the errno), not one raised from it
        # Every file is written to a temporary name and renamed once whole, so a write that fails leaves the
        # old file or none, never half of one.
        sys.exit(f"error: {why} ({e}). Files are written whole or not at all, so nothing already written is "
                 f"damaged: {_WRITE_ERRORS[why][2]}, then run the command again (fuse.py, and distill.py and "
                 f"transfer.py with --resume, go on where they stopped).")
    finally:  # a notebook or driver calling it gets its own handlers back
        for sig, handler in before.items():
            signal.signal(sig, handler)


# What stops every write, as run_main says it, its errnos, its words where no errno came (safetensors' Rust I/O
# error "os error 28"), and what to do about it. numpy's short write ("N requested and M written", no errno)
# comes of either of the first two.
_WRITE_ERRORS = {
    "the disk is full": ((errno.ENOSPC, errno.EDQUOT),
                         r"No space left on device|Disk quota exceeded|os error (28|122)\b", "free some space"),
    "a file is larger than this process may write": ((errno.EFBIG,), r"File too large|os error 27\b",
                                                     "raise the file size limit (`ulimit -f`; shards are the largest "
                                                     "files, and a smaller --shard-size makes them smaller)"),
    "the file system is read-only": ((errno.EROFS,), r"Read-only file system|os error 30\b",
                                     "give the folder to write (--cache, --run-dir, --task-cache) on a writable one"),
    "a write was cut short: the disk is full or a file is larger than this process may write": (
        (), r"\d+ requested and \d+ written", "free some space or raise the file size limit (`ulimit -f`)"),
}


def peer_stopped(e) -> bool:
    """A collective of a rank other than 0 broken by another process's end (gloo: the connection closed)."""
    rank, world = dist_info()
    if rank == 0 or world == 1 or not isinstance(e, RuntimeError):
        return False
    import torch.distributed as dist

    return isinstance(e, dist.DistNetworkError) or "closed by peer" in str(e) or "Connection reset" in str(e)


def _chain(e: BaseException | None):
    """e, then each error it was raised from."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _raised_from(e: BaseException | None, kind) -> BaseException | None:
    """e, or the first error it was raised from, of type `kind`."""
    return next((x for x in _chain(e) if isinstance(x, kind)), None)


def cannot_write(e: BaseException | None) -> tuple[str, BaseException] | None:
    """(what in _WRITE_ERRORS stopped a write: the disk or the user's quota full, a file size limit, a read-only
    file system; the error that says so), looked for in e and the errors it was raised from; None for any
    other error."""
    for x in _chain(e):
        for why, (numbers, words, _) in _WRITE_ERRORS.items():
            if getattr(x, "errno", None) in numbers or re.search(words, str(x)):
                return why, x
    return None

"""Training state (optimizer, loss scaler, random generators) stored without pickle.

Resuming a run exactly needs more than its weights: the optimizer's moments, the fp16 loss scaler and
every random generator's state. torch.save would keep those with pickle, and reading a pickle runs
whatever code the file asks for: a run folder received from someone else could then run code on
`--resume`. A state file here is one safetensors file: the tensors as tensors, and everything else
(numbers, strings, and how the dicts, lists and tuples nest) as JSON in its metadata. Reading one only
parses data; a file that is anything else is refused with a StateError.

Run folders from an older distill.py hold step_N.state.pt files, which need unpickling. For folders you
wrote yourself, convert them in place (the student weights are already safetensors and stay as they are):

  python -m common.checkpoint RUN_FOLDER
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_file, write_json

FORMAT = "facekd-state/1"
STATE_SUFFIX = ".state.safetensors"
LEGACY_STATE_SUFFIX = ".state.pt"


class StateError(ValueError):
    """A state file that is not one this module wrote (or not readable without pickle)."""


# ---------------------------------------------------------------------------------- encoding
# JSON keeps dicts with string keys, lists, strings, numbers, booleans and None. What it would change is
# tagged: tuples (python's random.setstate wants tuples back), dicts with other keys (an optimizer's
# state is keyed by parameter index: string keys would silently match no parameter on loading), small
# numpy arrays (numpy's generator key, 624 ints) and tensors (stored in the safetensors body).
def _encode(obj, tensors: dict):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a state file cannot hold a {type(obj).__name__}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise StateError("an array of Python objects")
        return np.array(obj["__ndarray__"], dtype=dtype)
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------- files
def save_state(path, state) -> None:
    """Write state (nested dicts/lists/tuples of tensors, arrays and plain values) to path, atomically.
    Written by safetensors straight to the file, not built in memory first (a fit of G at the paper's
    widths is 0.8 GB)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {}
    # One metadata key: safetensors writes several in a random order (a hash map's), so that two runs with the
    # same result gave files with other bytes, and a reproduction checked by sha256 failed for nothing
    meta = {"state": json.dumps({"format": FORMAT, "state": _encode(state, tensors)})}
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as e:  # its I/O errors (a full disk) are not OSError: callers catch OSError
            raise OSError(f"could not write {path}: {e}") from e


def load_state(path):
    """The state save_state wrote to path, tensors on the CPU. Raises StateError for any other file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise StateError(f"{path} is not a safetensors state file ({e}); it is not read any further") from None
    try:
        # the format inside the state, or beside it (files written before it moved in)
        inner = json.loads(meta["state"]) if "format" not in meta and "state" in meta else None
    except (ValueError, RecursionError) as e:
        raise StateError(f"{path}: damaged state ({type(e).__name__}: {e})") from None
    found = inner.get("format") if isinstance(inner, dict) else meta.get("format")
    if found != FORMAT or "state" not in meta:
        raise StateError(f"{path} is a safetensors file but not a training state written by facekd "
                         f"(format {found!r}, expected {FORMAT!r})")
    try:
        return _decode(inner["state"] if inner is not None else json.loads(meta["state"]), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise StateError(f"{path}: damaged state ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------- random generators
def rng_state() -> dict:
    """Every generator a training step draws from: torch's CPU and CUDA ones, numpy's global, python's."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(legacy=False),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        # one state per GPU that was visible when saved: a run resumed with fewer visible keeps theirs
        for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


# ---------------------------------------------------------------------------------- older run folders
def _legacy_globals() -> list:
    """What an older state file needs beyond tensors: numpy's legacy generator state, a uint32 array."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def convert_legacy(run) -> list[Path]:
    """Rewrite run/ckpt/*.state.pt of an older distill.py as *.state.safetensors; returns the new files.

    The old files are read by torch's restricted loader (weights_only=True), which builds tensors,
    containers and, allowed here, uint32 numpy arrays, and refuses anything else: a file that would run
    code is refused, not run. Each new file is written before latest.json names it and before the old
    one is deleted, so a conversion killed midway can be run again."""
    ckpt = Path(run) / "ckpt"
    olds = sorted(ckpt.glob(f"*{LEGACY_STATE_SUFFIX}"))
    if not olds:
        raise FileNotFoundError(f"no *{LEGACY_STATE_SUFFIX} files in {ckpt}: nothing to convert")
    done = []
    for old in olds:
        try:
            with torch.serialization.safe_globals(_legacy_globals()):
                state = torch.load(old, map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted loader's refusals come in several types
            first = str(e).strip().splitlines()
            raise StateError(f"{old} holds more than tensors and numbers ({first[-1] if first else e}); it was "
                             "not loaded. Start the run afresh instead") from None
        new = old.with_name(old.name[: -len(LEGACY_STATE_SUFFIX)] + STATE_SUFFIX)
        save_state(new, state)
        done.append(new)
    latest = ckpt / "latest.json"
    if latest.exists():
        info = json.loads(latest.read_text())
        if str(info.get("state", "")).endswith(LEGACY_STATE_SUFFIX):
            info["state"] = info["state"][: -len(LEGACY_STATE_SUFFIX)] + STATE_SUFFIX
            write_json(latest, info)
    for old in olds:
        old.unlink()
    return done


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m common.checkpoint",
                                description="Convert the training state of a run folder written by an older "
                                "distill.py (ckpt/*.state.pt) to the pickle-free format, so --resume can use it. "
                                "Only for run folders you wrote yourself; any other is better started afresh.")
    p.add_argument("run", type=Path, help="distill.py run folder (the one holding ckpt/)")
    a = p.parse_args(argv)
    try:
        for path in convert_legacy(a.run):
            print(f"wrote {path}")
    except (StateError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"converted: continue with python distill.py ... --out {a.run} --resume")


if __name__ == "__main__":
    main()

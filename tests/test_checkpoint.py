"""Training state without pickle (common/checkpoint.py): exact round trip of optimizer, scaler and
generator states; no file a user may receive is loaded in a way that can run code, anywhere in the tree;
a crafted pickle payload is refused, never run; older run folders are refused with a way out, and the
converter reads them with torch's restricted loader only."""
from __future__ import annotations

import ast
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distill  # noqa: E402
from common import checkpoint  # noqa: E402
from common.checkpoint import StateError, load_state, rng_state, save_state, set_rng_state  # noqa: E402


def trained_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return net, opt


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


def test_state_round_trip_is_exact(tmp_path):
    net, opt = trained_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = {"step": 7, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
             "odd": {"__tensor__": "not a tag", 3: (1.5, float("nan"), None), "bf16": torch.ones(2, dtype=torch.bfloat16)}}
    path = tmp_path / "s.state.safetensors"
    save_state(path, state)
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header])["__metadata__"]
    assert raw[8:9] == b"{" and json.loads(meta["state"])["format"] == checkpoint.FORMAT
    # one metadata key: several were written in a random order (safetensors' hash map), so that the same state
    # gave other bytes in another process
    assert list(meta) == ["state"]
    loaded = load_state(path)
    assert_same(loaded, state)  # int keys, tuples, dtypes and NaN all come back as they were
    expected = draws()
    set_rng_state(loaded["rng"])
    assert draws() == expected  # every generator restarts where it was saved
    # The restored optimizer takes the same next step as the original.
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded["optimizer"])
    x = torch.randn(5, 4)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="cannot hold a object"):
        save_state(tmp_path / "bad.state.safetensors", {"x": object()})


# ------------------------------------------------------------------------------ nothing that runs code
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Loading calls that can run code: pickle-family imports, eval/exec, weights_only=False,
    allow_pickle=True, and torch.load without an explicit weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in UNSAFE_MODULES:
            found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{f.id}(")
            kw = {k.arg: k.value for k in node.keywords}
            for arg, bad in (("weights_only", False), ("allow_pickle", True)):
                if isinstance(kw.get(arg), ast.Constant) and kw[arg].value is bad:
                    found.append(f"{arg}={bad}")
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                                      and kw["weights_only"].value is True):
                found.append("torch.load without weights_only=True")
    return found


def tree_sources():
    """Every .py file of the repository (not virtual environments, hidden folders or caches)."""
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (Path(top) / d / "pyvenv.cfg").exists()]
        yield from (Path(top) / f for f in files if f.endswith(".py"))


def test_unsafe_call_finder_finds_them():
    assert unsafe_calls("import pickle\nx = eval('1')") == ["pickle", "eval("]
    assert unsafe_calls("torch.load(p, weights_only=False)") == ["weights_only=False", "torch.load without weights_only=True"]
    assert unsafe_calls("np.load(p, allow_pickle=True)\ntorch.load(p)") == ["allow_pickle=True",
                                                                            "torch.load without weights_only=True"]
    assert unsafe_calls("m.eval()\ntorch.load(p, weights_only=True)\nnp.load(p)") == []


def test_no_code_running_loads_in_the_tree():
    files = [p for p in tree_sources() if p.resolve() != Path(__file__).resolve()]
    assert {"distill.py", "fuse.py", "transfer.py", "checkpoint.py", "test_distill.py"} <= {p.name for p in files}
    bad = {str(p.relative_to(ROOT)): hits for p in files if (hits := unsafe_calls(p.read_text()))}
    assert not bad, bad


# ------------------------------------------------------------------------------ crafted payloads
class Payload:
    """Unpickling this creates the marker file: what a malicious state file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def legacy_state():
    """A state as the older distill.py wrote it (torch.save of tensors, numpy's legacy tuple, python's)."""
    _, opt = trained_optimizer()
    return {"step": 2, "optimizer": opt.state_dict(), "scaler": None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": None}}


def old_run(tmp_path, state) -> Path:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    torch.save(state, run / "ckpt" / "step_00000002.state.pt")
    (run / "ckpt" / "latest.json").write_text(json.dumps({"step": 2, "weights": "step_00000002.safetensors",
                                                          "state": "step_00000002.state.pt"}))
    return run


def test_pickle_payload_is_refused_never_run(tmp_path):
    marker = tmp_path / "marker"
    run = old_run(tmp_path, {"step": 2, "optimizer": Payload(marker)})
    payload = run / "ckpt" / "step_00000002.state.pt"
    # distill.py --resume: refused before anything is read, with both ways out.
    with pytest.raises(SystemExit) as e:
        distill.load_checkpoint(run, None, None, None, None, {})
    msg = str(e.value.code)
    assert "pickle" in msg and "--overwrite" in msg and f"python -m common.checkpoint {run}" in msg
    # The same bytes under the new name: not safetensors, refused.
    disguised = tmp_path / "step_00000002.state.safetensors"
    disguised.write_bytes(payload.read_bytes())
    with pytest.raises(StateError, match="not a safetensors state file"):
        load_state(disguised)
    # The converter's restricted loader refuses it too, and converts nothing.
    with pytest.raises(StateError, match="not loaded"):
        checkpoint.convert_legacy(run)
    assert payload.exists() and not list((run / "ckpt").glob("*.safetensors"))
    with pytest.raises(SystemExit, match="error: .*not loaded"):
        checkpoint.main([str(run)])
    assert not marker.exists()
    # The payload is live: the unrestricted loader this project no longer uses would have run it.
    torch.load(payload, weights_only=False)
    assert marker.exists()


def test_safetensors_with_foreign_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(StateError, match="not a training state"):
        load_state(tmp_path / "w.safetensors")
    save_file({"0": torch.zeros(2)}, str(tmp_path / "x.safetensors"),
              metadata={"format": checkpoint.FORMAT, "state": '{"a": {"__tensor__": "9"}}'})
    with pytest.raises(StateError, match="damaged"):
        load_state(tmp_path / "x.safetensors")
    save_file({"0": torch.zeros(2)}, str(tmp_path / "y.safetensors"), metadata={"state": '{"format": "other/1"}'})
    with pytest.raises(StateError, match="not a training state written by facekd .format 'other/1'"):
        load_state(tmp_path / "y.safetensors")
    # a state written before the format moved inside its one key still reads
    save_file({"0": torch.ones(2)}, str(tmp_path / "old.safetensors"),
              metadata={"format": checkpoint.FORMAT, "state": '{"a": {"__tensor__": "0"}, "step": 3}'})
    old = load_state(tmp_path / "old.safetensors")
    assert old["step"] == 3 and torch.equal(old["a"], torch.ones(2))


def test_convert_older_run_folder(tmp_path):
    state = legacy_state()
    expected = draws()
    run = old_run(tmp_path, state)
    with pytest.raises(SystemExit, match="older distill.py"):
        distill.load_checkpoint(run, None, None, None, None, {})
    checkpoint.main([str(run)])
    ckpt = run / "ckpt"
    assert not list(ckpt.glob("*.pt"))
    assert json.loads((ckpt / "latest.json").read_text())["state"] == "step_00000002.state.safetensors"
    converted = load_state(ckpt / "step_00000002.state.safetensors")
    assert_same(converted, state)
    set_rng_state(converted["rng"])  # numpy's legacy tuple form restores as well
    assert draws() == expected


def test_state_files_take_the_umask_like_any_other_file(tmp_path, monkeypatch):
    """safetensors makes its files 0600 whatever the umask: the fit states and training states of a shared
    cache or run folder were unreadable to the colleagues who read its other files."""
    import os

    from common import files, fusion

    monkeypatch.setattr(files, "_UMASK", 0o027)
    save_state(tmp_path / "s.state.safetensors", {"step": 1, "w": torch.zeros(2)})
    fusion.save(fusion.build("pca", 4, 2, "paper", 0), "pca", 4, 2, tmp_path / "G.safetensors")
    for name in ("s.state.safetensors", "G.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name

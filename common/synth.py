"""A synthetic scale corpus: N seeded faces from the DCGAN that the `gan-face-generate` wheel ships.

The wheel (MIT licence) carries a 64x64 DCGAN generator trained on DigiFace-1M, itself a set of rendered
(not photographed) faces. Its pictures are faces to a face detector and to the teachers, which is all
fuse.py's fusion G needs to be trained and measured at 10 k to 100 k faces without any download.
They are not real people: error figures on them show how G scales with the corpus size, not what
it would reach on real photographs, and no label exists for any transfer task.

    python fuse.py --data synth:10000                    # writes data/synth/n10000-160px-s0/, then fuses it
    python -c "from common.synth import ensure; ensure(10000, 'data/synth/x', size=160, seed=0)"

Face i is the same picture for every N, size aside: the latents are drawn chunk by chunk from a
generator seeded by (seed, chunk), so `synth:1000` holds the first 1000 faces of `synth:10000`.
Every file is written atomically; a killed run resumes with the files it has.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.files import atomic_write
from common.weights import package_dir

CHUNK = 500  # faces drawn per seeded latent batch: face i's latent depends on (seed, i // CHUNK) only
NZ, NGF = 100, 64  # the wheel's generator: 100-dim latent, 64 feature maps
PIP = "gan-face-generate==1.1.1"


def parse(spec: str) -> int | None:
    """N of a `synth:N` data spec (k and M suffixes allowed), None if spec is not one."""
    spec = str(spec)
    if not spec.startswith("synth:"):
        return None
    text = spec[len("synth:"):].strip().lower()
    scale = {"k": 1000, "m": 1000_000}.get(text[-1:], 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except (ValueError, OverflowError):  # synth:abc, synth:inf
        n = 0
    if n < 1:
        raise SystemExit(f"error: --data {spec}: write synth:N with N a positive number of faces (e.g. synth:10000, "
                         "synth:10k)")
    return n


def load_generator(device="cpu") -> torch.nn.Module:
    """The wheel's DCGAN generator with its trained weights (a plain state dict, read with weights_only)."""
    folder = package_dir("gan_face_generate", PIP, "the synthetic corpus's DCGAN weights")
    from gan_face_generate.models import Generator  # the module imports torch only

    ckpt = torch.load(folder / "weights.tar", map_location="cpu", weights_only=True)
    net = Generator(0, 3, NZ, NGF)
    net.load_state_dict(ckpt["netG_state_dict"])
    return net.eval().to(device)


def name(i: int) -> str:
    return f"{i // 1000:05d}/{i:07d}.png"  # a thousand files a folder


def latents(seed: int, chunk: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    return torch.randn(CHUNK, NZ, 1, 1, generator=g)


def ensure(n: int, root: str | Path, size: int = 160, seed: int = 0, device="cpu", batch: int = 100) -> Path:
    """Write faces 0..n-1 under root (those already there are kept), return root."""
    root = Path(root)
    done_file = root / "synth.json"
    info = {"n": n, "size": size, "seed": seed, "generator": PIP}
    if done_file.exists() and json.loads(done_file.read_text()) == info:
        return root
    if not 16 <= size <= 1024:
        raise SystemExit(f"error: synthetic face size {size}: choose 16 to 1024 pixels")
    todo = [i for i in range(n) if not (root / name(i)).exists()]
    if todo:
        _borrow(root, todo, size, seed)
        todo = [i for i in todo if not (root / name(i)).exists()]
    net = load_generator(device) if todo else None
    bar = tqdm(total=n, initial=n - len(todo), unit="img", desc="synthetic faces", disable=None, dynamic_ncols=True)
    by_chunk: dict[int, list[int]] = {}
    for i in todo:
        by_chunk.setdefault(i // CHUNK, []).append(i)
    with torch.no_grad():
        for c, rows in by_chunk.items():
            z = latents(seed, c)[np.array(rows) - c * CHUNK]
            for lo in range(0, len(rows), batch):
                # BatchNorm in eval mode uses its stored statistics: each picture depends on its own latent only.
                img = net(z[lo:lo + batch].to(device)).cpu()
                img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                for i, pixels in zip(rows[lo:lo + batch], img):
                    pic = Image.fromarray(pixels)
                    if size != pic.width:
                        pic = pic.resize((size, size), Image.BICUBIC)
                    atomic_write(root / name(i), lambda f: pic.save(f, format="PNG"))
                bar.update(len(img))
    bar.close()
    atomic_write(done_file, lambda f: f.write(json.dumps(info).encode()))
    return root


def _borrow(root: Path, todo: list[int], size: int, seed: int) -> None:
    """Hard-link faces that a sibling corpus of the same size and seed already drew (synth:1000 from synth:10000)."""
    for other in sorted(root.parent.glob(f"n*-{size}px-s{seed}")):
        if other == root:
            continue
        for i in todo:
            src, dst = other / name(i), root / name(i)
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    return  # another file system: draw them instead


def default_root(n: int, size: int, seed: int) -> Path:
    return Path("data/synth") / f"n{n}-{size}px-s{seed}"

"""Reading face images from users' disks: every odd format becomes 8-bit RGB, every broken file a clear error."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class BadImage(Exception):
    """An image that cannot be used; the message names the file and the reason."""


def list_images(root: str | Path) -> list[str]:
    """Relative paths of every image under root, sorted so that the order (and the cache) is reproducible."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def to_rgb8(img: Image.Image) -> np.ndarray:
    """PIL image of any mode (grey, 16-bit, CMYK, palette, alpha) -> HxWx3 uint8 RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit and 32-bit integer greys: rescale to 8 bits rather than clip, so they are not all white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are composited on mid-grey: black or white would look like a hard face edge.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path, with_hash: bool = False):
    """Decode one image file fully (truncated files fail here, not later) to HxWx3 uint8 RGB.

    With with_hash, also returns the sha1 of the file's bytes, read once for both.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        import io

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = to_rgb8(img)
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise BadImage(f"{path}: image is only {arr.shape[1]}x{arr.shape[0]} pixels")
    if with_hash:
        return arr, hashlib.sha1(data).hexdigest()
    return arr

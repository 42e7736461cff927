"""Face detection and 5-point similarity alignment to one canonical crop (paper section 4.1).

Every face in the project is described by a 2x3 affine matrix that maps the original image onto the
canonical crop: a CANON x CANON RGB square in which the eyes, nose tip and mouth corners sit at
TEMPLATE. The ArcFace 112x112 template fills the central ARCFACE_BOX of the crop, so an identity
teacher that expects ArcFace alignment takes exactly that box; looser teachers take more context.
Only the matrix is stored in the cache: images are warped again when read, so a 4 M-face corpus
costs 24 bytes a face instead of 200 kB.
"""
from __future__ import annotations

import numpy as np

from common.images import BadImage

CANON = 256
# The ArcFace reference points for a 112x112 crop (left eye, right eye, nose, left mouth, right mouth).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
_MARGIN = 0.1  # fraction of the canonical crop left as context on each side of the ArcFace window
ARCFACE_BOX = (_MARGIN, _MARGIN, 1 - _MARGIN, 1 - _MARGIN)  # (x0, y0, x1, y1) as fractions of CANON
TEMPLATE = ARCFACE_112 * ((1 - 2 * _MARGIN) * CANON / 112) + _MARGIN * CANON


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src points to dst.

    Umeyama's closed form; returns the 2x3 matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp(image: np.ndarray, matrix: np.ndarray, size: int = CANON) -> np.ndarray:
    """Warp an HxWx3 uint8 RGB image into the size x size canonical crop given by `matrix`."""
    import cv2

    m = np.asarray(matrix, np.float64).copy()
    if size != CANON:
        m *= size / CANON
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


def center_matrix(width: int, height: int, size: int = CANON) -> np.ndarray:
    """Matrix for images that are already face crops (--align none): the whole image fills the crop."""
    return np.array([[size / width, 0, 0], [0, size / height, 0]], dtype=np.float64)


class FaceDetector:
    """MTCNN (facenet-pytorch's shipped P/R/O-Nets, pure PyTorch) giving a box and 5 landmarks per face.

    When several faces are found, the one closest to the image centre is kept, as in the paper.
    """

    def __init__(self, device="cpu", min_prob: float = 0.9, min_face: int = 20):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise ImportError("the face detector needs facenet-pytorch: "
                              "pip install --no-deps facenet-pytorch==2.6.0 (and requests)") from e
        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=min_face)
        self.min_prob, self.min_face = min_prob, min_face

    def __call__(self, image: np.ndarray):
        """Return (matrix 2x3, score) for the chosen face of an HxWx3 uint8 RGB image, or None.

        An image too small to hold a detectable face raises BadImage (a counted row, like a bad file)."""
        import torch

        h, w = image.shape[:2]
        if min(h, w) < self.min_face:
            # MTCNN builds no image pyramid below its smallest face and then fails on an empty list.
            raise BadImage(f"image is {w}x{h} pixels: smaller than the {self.min_face}-pixel faces the "
                           f"detector looks for")
        with torch.inference_mode():
            boxes, probs, marks = self.mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return None
        keep = [i for i, p in enumerate(probs) if p is not None and p >= self.min_prob]
        if not keep:
            return None
        centres = (boxes[keep, :2] + boxes[keep, 2:]) / 2
        best = keep[int(np.argmin(((centres - [w / 2, h / 2]) ** 2).sum(1)))]
        return similarity_transform(marks[best], TEMPLATE), float(probs[best])

"""Face detection and 5-point similarity alignment to one canonical crop (paper section 4.1).

Every face in the project is described by a 2x3 affine matrix that maps the original image onto the
canonical crop: a CANON x CANON RGB square in which the eyes, nose tip and mouth corners sit at
TEMPLATE. The ArcFace 112x112 template fills the central ARCFACE_BOX of the crop, so an identity
teacher that expects ArcFace alignment takes exactly that box; looser teachers take more context.
The cache keeps the matrix of every face and, in its crop store, the crop itself at a smaller size
(common.cache), so later steps never decode the source image again.

Two implementations of each step: the per-image reference (FaceDetector, warp: MTCNN at full
resolution, cv2) and the batched one the extraction engine runs on the run's device (BatchDetector,
warp_batch: MTCNN on a downscaled batch, one grid_sample per batch). Tests hold them together.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from common import mtcnn as mtcnn_batch
from common.images import BadImage

CANON = 256
# Longer side of the copy the batched detector sees. MTCNN's cost grows with pixels; the faces of face
# corpora are large, and the landmarks found on the copy are mapped back to full resolution for the warp.
DETECT_SIZE = 640
# Faces smaller than this (pixels of that copy) are not searched for. MTCNN's own smallest is 20; its first
# pyramid levels, the largest and most costly, look only for faces under 40 pixels (6 % of a 640 copy).
SMALLEST_FACE = 20
MIN_FACE_PROB = 0.9  # MTCNN's confidence below which no face counts
# The version of the detection code, in every new cache's manifest: raised when a change moves which face an
# image gets or where (2: NMS within each image on the CPU). A cache gives its faces to another
# (extract.KnownFaces) only at the current version; resuming and reading caches do not depend on it.
DETECTOR = 2
# What one more detection pass costs, in pixels of P-Net work: about 20 frames of 640x360. An estimate
# from the H100 timings at three detect sizes (a part of each batch's time that did not shrink with the
# pixels); it only decides which image sizes share a canvas, never what is found.
DETECT_CALL = 20 * 640 * 360
# On the CPU a pass costs little beside its convolutions, and padding costs as much as pixels: about one
# frame (of 0, 1, 2, 4 and 20 frames, 1 was the fastest on the mixed-size demo folder, within the noise).
DETECT_CALL_CPU = 640 * 360
# At most this many bytes of full-resolution float32 pixels at once while shrinking images for detection:
# a batch of 32 twelve-megapixel photos would otherwise take 4.6 GB in one float copy. Chunks of one size
# are resized apart, image by image the same computation, so the budget changes no result.
RESIZE_BYTES = 256 * 2**20
# Side of the crops kept in the cache's crop store: the whole canonical frame, shrunk. 128 covers the
# student's default 112 input with the augmentation's 0.8 crop scale without enlarging (48 kB a face,
# 203 GB for 4.12 M faces); teachers run on the full CANON crop at extraction, never on the store.
CROP_SIZE = 128
# The ArcFace reference points for a 112x112 crop (left eye, right eye, nose, left mouth, right mouth).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
_MARGIN = 0.1  # fraction of the canonical crop left as context on each side of the ArcFace window
ARCFACE_BOX = (_MARGIN, _MARGIN, 1 - _MARGIN, 1 - _MARGIN)  # (x0, y0, x1, y1) as fractions of CANON
TEMPLATE = ARCFACE_112 * ((1 - 2 * _MARGIN) * CANON / 112) + _MARGIN * CANON


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src points to dst.

    Umeyama's closed form; returns the 2x3 matrix M with dst ~= M @ [x, y, 1]. src may hold a batch
    (n, k, 2) of point sets, all sent to the same dst: then (n, 2, 3), in one pass of numpy.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim == 2:
        return similarity_transform(src[None], dst)[0]
    mu_s, mu_d = src.mean(1), dst.mean(0)
    s, d = src - mu_s[:, None], dst - mu_d
    cov = np.einsum("kd,nks->nds", d, s) / src.shape[1]
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones((len(src), 2))
    sign[np.linalg.det(u) * np.linalg.det(vt) < 0, 1] = -1
    rot = (u * sign[:, None, :]) @ vt
    scale = (sig * sign).sum(1) / s.var(1).sum(1)
    m = np.zeros((len(src), 2, 3))
    m[:, :, :2] = scale[:, None, None] * rot
    m[:, :, 2] = mu_d - scale[:, None] * np.einsum("nij,nj->ni", rot, mu_s)
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

    def __init__(self, device="cpu", min_prob: float = MIN_FACE_PROB, min_face: int = 20):
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


def by_size(sizes) -> dict:
    """(h, w) -> the indices of the images of that size, in order."""
    by = {}
    for i, s in enumerate(sizes):
        by.setdefault((int(s[0]), int(s[1])), []).append(i)
    return by


def size_groups(sizes, waste: float = 2.0, call: float = float("inf")) -> list[list[int]]:
    """Indices of (h, w) sizes split into groups padded to one canvas each, no group wasting more than
    `waste` times its pixels (waste=1: one group per size), at the least cost: call (what one more group
    costs, in padded pixels; by default groups are dear, so they are as few as the waste allows) per
    group plus the padded pixels. Groups are runs of the distinct sizes sorted by height, the best split
    found by dynamic programming: a batch of one size is one canvas, a few odd sizes do not widen it,
    sizes all different share a few."""
    by = by_size(sizes)
    keys = sorted(by)
    if len(keys) <= 1:
        return [by[k] for k in keys]
    h, w = np.array(keys, np.float64).T
    cnt = np.array([len(by[k]) for k in keys], np.float64)
    n, area, count = len(keys), np.concatenate([[0.0], np.cumsum(cnt * h * w)]), np.concatenate([[0.0], np.cumsum(cnt)])
    per = 1e30 if call == float("inf") else call
    best, start = np.zeros(n + 1), np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):  # best[j]: the cheapest split of the first j sizes; run [i, j) is h[j - 1] high
        padded = (count[j] - count[:j]) * h[j - 1] * np.maximum.accumulate(w[:j][::-1])[::-1]
        ok = padded <= waste * (area[j] - area[:j]) * (1 + 1e-12)
        ok[j - 1] = True  # one size alone is never padded
        cost = np.where(ok, best[:j] + per + padded, np.inf)
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    groups, j = [], n
    while j:
        groups.append([i for k in keys[start[j]:j] for i in by[k]])
        j = start[j]
    return groups[::-1]


def _canvas(images, idx, dtype=torch.float32):
    """(n, 3, H, W) zero-padded batch of the (3, h, w) images idx, top-left aligned."""
    h = max(images[i].shape[1] for i in idx)
    w = max(images[i].shape[2] for i in idx)
    if all(images[i].shape[1:] == (h, w) for i in idx):  # one copy, not one per image
        return torch.stack([images[i] for i in idx]).to(dtype)
    out = torch.zeros(len(idx), 3, h, w, dtype=dtype, device=images[idx[0]].device)
    for j, i in enumerate(idx):
        out[j, :, :images[i].shape[1], :images[i].shape[2]] = images[i]
    return out


def _around(box, w: int, h: int):
    """The pixel region (x0, y0, x1, y1) searched for a face box: the square around its centre, twice its larger
    side, within the image; None for no box (NaN), a string when the box lies outside the image."""
    if box is None or not np.isfinite(np.asarray(box, np.float64)).all():
        return None
    bx0, by0, bx1, by1 = (float(v) for v in box)
    cx, cy, half = (bx0 + bx1) / 2, (by0 + by1) / 2, max(bx1 - bx0, by1 - by0, 1.0)
    x0, y0 = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    x1, y1 = min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half)))
    if x1 <= x0 or y1 <= y0:
        return f"the dataset's face box ({bx0:g}, {by0:g}, {bx1:g}, {by1:g}) lies outside the {w}x{h} image"
    return x0, y0, x1, y1


class BatchDetector:
    """MTCNN on whole batches, on the run's device: each image is shrunk (never enlarged) so that its longer
    side is at most detect_size, images of different sizes share zero-padded canvases (each searched as
    if alone: common.mtcnn.detect's sizes), and the landmarks found are mapped back to the full image.
    The face rule is FaceDetector's: confidence >= min_prob, then the face closest to the image centre.
    min_face is in pixels of the shrunk copy. smallest_face (pixels of the copy): MTCNN's pyramid levels
    that look only for faces smaller than this are skipped, the rest kept as they are (common.mtcnn._pyramid);
    20, MTCNN's min_face, skips none. A dataset's face box (AffectNet gives one per image, whose images may hold
    several faces) makes the search run on the square around it, twice its larger side, so that the face
    closest to that region's centre is the annotated one."""

    def __init__(self, device="cpu", min_prob: float = MIN_FACE_PROB, min_face: int = 20,
                 detect_size: int = DETECT_SIZE, smallest_face: int = SMALLEST_FACE):
        self.inner = FaceDetector(device, min_prob, min_face)
        self.min_prob, self.detect_size, self.device = min_prob, detect_size, torch.device(device)
        self.smallest_face = smallest_face

    def __call__(self, images: list, boxes=None) -> list:
        """images: (3, H, W) uint8 tensors -> per image (matrix 2x3, score), None (no face), or the reason
        (a string) why an image is too small to search. boxes: per image, its face box (x0, y0, x1, y1) in
        pixels, or NaN / None for the whole image."""
        out, offset, what = [None] * len(images), [(0, 0)] * len(images), ["image"] * len(images)
        if boxes is not None:
            images = list(images)
            for i, box in enumerate(boxes):
                region = _around(box, images[i].shape[2], images[i].shape[1])
                if isinstance(region, str):
                    out[i] = region
                elif region is not None:
                    x0, y0, x1, y1 = region
                    images[i], offset[i] = images[i][:, y0:y1, x0:x1], (x0, y0)
                    what[i] = "the region around its face box"
        small, scale = [None] * len(images), [None] * len(images)
        live = [i for i in range(len(images)) if out[i] is None]
        for (h, w), sub in by_size([images[i].shape[1:] for i in live]).items():  # one resize per image size
            s = min(1.0, self.detect_size / max(h, w))
            step = max(1, RESIZE_BYTES // (3 * h * w * 4))
            for start in range(0, len(sub), step):
                idx = [live[j] for j in sub[start:start + step]]
                x = torch.stack([images[i] for i in idx]).to(self.device, non_blocking=True).float()
                if s < 1:
                    x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                                      antialias=True, align_corners=False)
                for j, i in enumerate(idx):
                    small[i], scale[i] = x[j], (x.shape[3] / w, x.shape[2] / h)
        # MTCNN builds no pyramid below its smallest face (see FaceDetector), and a face cannot be larger than
        # its image: a copy smaller than the smallest face searched is not searched, and says so
        m = max(self.inner.min_face, self.smallest_face)
        ok = []
        for i, x in enumerate(small):
            if x is None:
                continue
            if min(x.shape[1:]) < m:
                h, w = images[i].shape[1:]
                copy = "" if x.shape[1:] == images[i].shape[1:] else f" ({x.shape[2]}x{x.shape[1]} as searched)"
                out[i] = f"{what[i]} is {w}x{h} pixels{copy}: smaller than the {m}-pixel faces the detector looks for"
            else:
                ok.append(i)
        # images of other sizes share a zero-padded canvas; each is still searched as if alone
        call = DETECT_CALL if self.device.type != "cpu" else DETECT_CALL_CPU
        for sub in size_groups([small[i].shape[1:] for i in ok], call=call):
            idx = [ok[j] for j in sub]
            with torch.inference_mode():
                found = mtcnn_batch.detect(_canvas(small, idx), self.inner.mtcnn,
                                           sizes=[small[i].shape[1:] for i in idx], smallest=self.smallest_face)
            chosen = []
            for (boxes, marks), i in zip(found, idx):
                keep = np.flatnonzero(boxes[:, 4] >= self.min_prob)
                if not len(keep):
                    continue
                sx, sy = scale[i]
                h, w = images[i].shape[1:]
                b = boxes[keep, :4].astype(np.float64) / [sx, sy, sx, sy]
                centres = (b[:, :2] + b[:, 2:]) / 2
                best = keep[int(np.argmin(((centres - [w / 2, h / 2]) ** 2).sum(1)))]
                chosen.append((i, marks[best].astype(np.float64) / [sx, sy] + offset[i], float(boxes[best, 4])))
            if chosen:  # one batched solve, not one per face
                mats = similarity_transform(np.stack([pts for _, pts, _ in chosen]), TEMPLATE)
                for (i, _, score), mat in zip(chosen, mats):
                    out[i] = mat, score
        return out


def warp_batch(images: list, matrices, size: int = CANON) -> torch.Tensor:
    """Warp (3, H, W) uint8 images (any sizes, one device) into size x size crops: (N, 3, size, size) uint8
    (channels-last in memory on the CPU).

    cv2.warpAffine's rule (bilinear, BORDER_REFLECT101 outside the image) as one grid_sample per group of
    similar sizes: the source coordinates are reflected inside each image's own bounds before sampling,
    so zero padding of the batch canvas is never read.
    """
    n = len(images)
    device = images[0].device if n else torch.device("cpu")
    if not n:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    if device.type == "cpu":  # cv2's fixed-point warp is 20x faster than grid_sample there, within 1 level
        hwc = np.empty((n, size, size, 3), np.uint8)
        for i, (img, mat) in enumerate(zip(images, matrices)):
            hwc[i] = warp(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), mat, size)
        return torch.from_numpy(hwc).permute(0, 3, 1, 2)  # a channels-last view: no uint8 transpose copy
    return grid_warp(images, matrices, size, torch.empty(n, 3, size, size, dtype=torch.uint8, device=device))


def grid_warp(images: list, matrices, size: int, out: torch.Tensor) -> torch.Tensor:
    """warp_batch's device path, one grid_sample per size group (callable on the CPU for tests)."""
    n, device = len(images), out.device
    m = np.asarray(matrices, np.float64).reshape(n, 2, 3) * (size / CANON)
    full = np.concatenate([m, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], 1)
    inv = torch.as_tensor(np.linalg.inv(full)[:, :2], dtype=torch.float32, device=device)  # crop -> image
    v, u = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                          torch.arange(size, device=device, dtype=torch.float32), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).view(1, -1, 3)
    for idx in size_groups([img.shape[1:] for img in images]):
        canvas = _canvas(images, idx)
        hw = torch.tensor([[img.shape[2], img.shape[1]] for img in (images[i] for i in idx)], device=device,
                          dtype=torch.float32).view(-1, 1, 2)  # (w, h)
        src = pix @ inv[idx].transpose(1, 2)  # (n, size*size, 2) source pixel coordinates
        span = (hw - 1).clamp(min=1)
        src = torch.remainder(src.abs(), 2 * span)  # REFLECT101: ... 2 1 | 0 1 2 ... w-1 | w-2 ...
        src = torch.where(src > span, 2 * span - src, src)
        wh = torch.tensor([canvas.shape[3], canvas.shape[2]], device=device, dtype=torch.float32)
        grid = (2 * src / (wh - 1).clamp(min=1) - 1).view(len(idx), size, size, 2)
        crops = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out[idx] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out


def store_crops(crops: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """(N, 3, H, H) uint8 crops -> (N, 3, size, size) uint8, antialiased, on the crops' device: the crop
    store's shrink of the canonical crops, and the student's evaluation view of the stored ones."""
    if crops.shape[-1] == size:
        return crops
    x = F.interpolate(crops.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)

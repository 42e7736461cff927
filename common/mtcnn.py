"""MTCNN over a whole batch of images with no Python loop over candidate boxes.

facenet-pytorch's detect_face cuts every candidate box of its second and third stages out of the image
and area-resizes it to 24 or 48 pixels one box at a time: thousands of tiny kernel launches per batch,
which held batched detection near 400 images/s on an H200 whatever the GPU. An area resize is a mean
over integer bins (adaptive average pooling), so here every crop of the batch comes from one
summed-area table: four lookups per output pixel, for all boxes at once. The rest (image pyramid,
thresholds, NMS, box regression, landmarks) calls facenet-pytorch's own functions in its order, so the
detections are facenet-pytorch's up to float rounding (float64 sums against float32 means).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms


MAX_PER_IMAGE = 4096  # candidates of one image above which nms_by_image leaves the batch to torchvision


def _fn():
    from facenet_pytorch.models.utils import detect_face

    return detect_face


def summed_area(imgs: torch.Tensor) -> torch.Tensor:
    """(N, H+1, W+1, C) float64 table of (N, C, H, W) images: t[n, y, x] = sum of img[n, :, :y, :x].
    float64 keeps the differences of sums up to 255 x H x W exact to ~1e-8."""
    n, c, h, w = imgs.shape
    t = torch.zeros(n, h + 1, w + 1, c, dtype=torch.float64, device=imgs.device)
    t[:, 1:, 1:] = imgs.permute(0, 2, 3, 1).double().cumsum(1).cumsum(2)
    return t


def area_crops(table, image, y0, y1, x0, x1, size: int, chunk: int = 4096) -> torch.Tensor:
    """(K, C, size, size) float32 crops: rows [y0, y1) x columns [x0, x1) of image `image` (one per box,
    int tensors), each resized as F.interpolate(mode="area") would, from a summed_area table."""
    dev, c = table.device, table.shape[-1]
    step = torch.arange(size, device=dev)
    out = [torch.empty(0, c, size, size, device=dev)]
    for s in range(0, len(image), chunk):
        n, a0, a1, b0, b1 = (v[s:s + chunk].long()[:, None] for v in (image, y0, y1, x0, x1))
        # adaptive pooling's bins: [floor(i L / S), ceil((i + 1) L / S)) along each side
        ys, ye = a0 + step * (a1 - a0) // size, a0 + ((step + 1) * (a1 - a0) + size - 1) // size
        xs, xe = b0 + step * (b1 - b0) // size, b0 + ((step + 1) * (b1 - b0) + size - 1) // size
        n, ys, ye, xs, xe = n[:, :, None], ys[:, :, None], ye[:, :, None], xs[:, None, :], xe[:, None, :]
        total = table[n, ye, xe] - table[n, ys, xe] - table[n, ye, xs] + table[n, ys, xs]
        out.append((total / ((ye - ys) * (xe - xs))[..., None]).float().permute(0, 3, 1, 2))
    return torch.cat(out)


def nms_by_image(boxes, scores, image, threshold: float, budget: int = 1 << 24, hold: int = 1 << 30) -> torch.Tensor:
    """torchvision.ops.batched_nms(boxes, scores, image, threshold) on a GPU, for thousands of boxes over
    hundreds of images: the indices kept, by decreasing score.

    torchvision runs one NMS per image once a batch holds over 25,000 boxes (a Python loop with a host
    sync each), or one over all boxes with a K x K mask copied to the host. Here each image's boxes are
    padded to a (images, M, M) "j suppresses i" matrix, and greedy NMS is its fixed point: box i is kept
    iff no kept box before it (higher score) overlaps it by more than the threshold. Iterating from
    "all kept" settles the boxes in score order, so it ends on greedy NMS's answer, in a few rounds in
    practice (at most M). The IoU is torchvision's formula, so the comparisons are the same.
    budget: elements of the IoU temporaries computed at once; hold: booleans of the matrix kept for one
    fixed-point loop (1 GiB), so that a batch needs one loop, not one per slice of images.
    """
    k = len(boxes)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]  # by image, then by decreasing score
    img = image[order]
    counts = torch.bincount(img)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(k, device=boxes.device) - starts[img]
    n, m = len(counts), int(counts.max())
    if m > MAX_PER_IMAGE:  # its M x M matrix would not be small: torchvision's memory stays linear
        return batched_nms(boxes, scores, image, threshold)
    padded = boxes.new_zeros(n, m, 4)
    padded[img, slot] = boxes[order, :4].float()
    valid = torch.zeros(n, m, dtype=torch.bool, device=boxes.device)
    valid[img, slot] = True
    keep = torch.zeros_like(valid)
    earlier = torch.ones(m, m, dtype=torch.bool, device=boxes.device).tril(-1)  # [i, j]: j before i
    rows = max(1, hold // (m * m))
    step = max(1, min(rows, budget // (m * m)))
    for a in range(0, n, rows):
        z = min(n, a + rows)
        hits = torch.empty(z - a, m, m, dtype=torch.bool, device=boxes.device)
        for c in range(a, z, step):
            b = padded[c:min(z, c + step)]
            area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
            lt = torch.maximum(b[:, :, None, :2], b[:, None, :, :2])
            rb = torch.minimum(b[:, :, None, 2:], b[:, None, :, 2:])
            wh = (rb - lt).clamp(min=0)
            inter = wh[..., 0] * wh[..., 1]
            hits[c - a:c - a + len(b)] = (inter / (area[:, :, None] + area[:, None, :] - inter) > threshold) & earlier
        kept = valid[a:z].clone()
        while True:
            new = valid[a:z] & ~(hits & kept[:, None, :]).any(2)
            if torch.equal(new, kept):
                break
            kept = new
        keep[a:z] = kept
    chosen = order[keep[img, slot]]
    return chosen[torch.sort(scores[chosen], descending=True, stable=True).indices]


def _nms(boxes, scores, image, threshold):
    # the CPU keeps torchvision's: fast enough there
    if boxes.device.type == "cpu":
        return batched_nms(boxes, scores, image, threshold)
    return nms_by_image(boxes, scores, image, threshold)


def _crops_of(table, boxes, image, w, h, size):
    """facenet-pytorch's pad() and crop rule, for all boxes: the box clipped to the image, 1-based; boxes
    left empty by the clipping are dropped (facenet-pytorch skips them too)."""
    b = boxes[:, :4].trunc().long()
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
    ok = (ey > y - 1) & (ex > x - 1)
    if not bool(ok.all()):
        boxes, image, x, y, ex, ey = boxes[ok], image[ok], x[ok], y[ok], ex[ok], ey[ok]
    crops = area_crops(table, image, y - 1, ey, x - 1, ex, size)
    return (crops - 127.5) * 0.0078125, boxes, image


def detect(imgs: torch.Tensor, mtcnn, batched: bool | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, 3, H, W) float images (0-255) on mtcnn's device -> per image (boxes (k, 5): x1, y1, x2, y2,
    probability; landmarks (k, 5, 2)), as numpy, the k faces in no particular order.

    batched: this module's crops and NMS (default on a GPU), else facenet-pytorch's detect_face itself
    (default on the CPU, where its per-box loop costs little and the summed-area table was 15-25% slower).
    """
    d = _fn()
    pnet, rnet, onet, thresholds = mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.thresholds
    imgs = imgs.to(next(pnet.parameters()).dtype)
    if not (imgs.device.type != "cpu" if batched is None else batched):
        boxes, points = d.detect_face(imgs.permute(0, 2, 3, 1), mtcnn.min_face_size, pnet, rnet, onet,
                                      thresholds, mtcnn.factor, imgs.device)
        return [(np.asarray(b, np.float32).reshape(-1, 5), np.asarray(m, np.float32).reshape(-1, 5, 2))
                for b, m in zip(boxes, points)]
    n, _, h, w = imgs.shape
    dev = imgs.device
    # stage 1: P-Net over the image pyramid (facenet-pytorch's code, batched over images already)
    scale = 12.0 / mtcnn.min_face_size
    scales, minl = [], min(h, w) * scale
    while minl >= 12:  # repeated products, as facenet-pytorch, so that every level has its exact size
        scales.append(scale)
        scale, minl = scale * mtcnn.factor, minl * mtcnn.factor
    boxes, image, picks, offset = [], [], [], 0
    for scale in scales:
        x = d.imresample(imgs, (int(h * scale + 1), int(w * scale + 1)))
        reg, probs = pnet((x - 127.5) * 0.0078125)
        b, i = d.generateBoundingBox(reg, probs[:, 1], scale, thresholds[0])
        boxes.append(b)
        image.append(i)
        picks.append(_nms(b[:, :4], b[:, 4], i, 0.5) + offset)
        offset += b.shape[0]
    boxes, image = torch.cat(boxes), torch.cat(image)
    picks = torch.cat(picks)
    boxes, image = boxes[picks], image[picks]
    pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.7)
    boxes, image = boxes[pick], image[pick]
    rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
                         boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4]], 1)
    boxes = d.rerec(boxes)
    points = torch.zeros(0, 5, 2, device=dev)
    table = summed_area(imgs) if len(boxes) else None
    # stage 2: R-Net on 24 px crops of every candidate
    if len(boxes):
        crops, boxes, image = _crops_of(table, boxes, image, w, h, 24)
        reg, score = d.fixed_batch_process(crops, rnet) if len(crops) else (crops.new_zeros(0, 4),
                                                                              crops.new_zeros(0, 2))
        keep = score[:, 1] > thresholds[1]
        boxes = torch.cat([boxes[keep, :4], score[keep, 1:2]], 1)
        image, reg = image[keep], reg[keep]
        pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes = d.rerec(d.bbreg(boxes[pick], reg[pick]))
        image = image[pick]
    # stage 3: O-Net on 48 px crops: probability, box regression, landmarks
    if len(boxes):
        crops, boxes, image = _crops_of(table, boxes, image, w, h, 48)
        if len(crops):
            reg, marks, score = d.fixed_batch_process(crops, onet)
        else:
            reg, marks, score = crops.new_zeros(0, 4), crops.new_zeros(0, 10), crops.new_zeros(0, 2)
        keep = score[:, 1] > thresholds[2]
        boxes = torch.cat([boxes[keep, :4], score[keep, 1:2]], 1)
        image, reg, marks = image[keep], reg[keep], marks[keep]
        bw, bh = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = torch.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = d.bbreg(boxes, reg)
        pick = d.batched_nms_numpy(boxes[:, :4], boxes[:, 4], image, 0.7, "Min")
        boxes, image, points = boxes[pick], image[pick], points[pick]
    boxes, points, image = boxes.cpu().numpy(), points.cpu().numpy(), image.cpu().numpy()
    return [(boxes[image == k], points[image == k]) for k in range(n)]

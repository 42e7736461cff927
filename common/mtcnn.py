"""MTCNN over a whole batch of images, of one size or several, with no Python loop over candidate boxes
on a GPU.

facenet-pytorch's detect_face cuts every candidate box of its second and third stages out of the image
and area-resizes it to 24 or 48 pixels one box at a time: thousands of tiny kernel launches per batch,
which held batched detection near 400 images/s on an H200 whatever the GPU. An area resize is a mean
over integer bins (adaptive average pooling), so on a GPU every crop and every pyramid level of the
batch comes from one summed-area table: four lookups per output pixel, for all boxes at once. On the
CPU those resizes stay one F.interpolate per image and per box (facenet-pytorch's own way, cheaper
there). Images of different sizes share a zero-padded canvas and each is searched as if alone. The rest
(thresholds, NMS rules, box regression, landmarks) follows facenet-pytorch's functions in its order, so
the detections are facenet-pytorch's on each image alone, up to float rounding.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
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


def _bins(start, length, size, step):
    """Adaptive pooling's bins [floor(i L / S), ceil((i + 1) L / S)) of L pixels into S, shifted by start."""
    return start + step * length // size, start + ((step + 1) * length + size - 1) // size


def _area(table, n, ys, ye, xs, xe, pixels=None) -> torch.Tensor:
    """Means of the table's image n over rows [ys, ye) x columns [xs, xe): (k, C, rows, cols) float32
    from (k, 1, 1) images, (k, rows, 1) row bins and (k, 1, cols) column bins. pixels: each bin's pixel
    count, when some bins are empty on purpose (given 1, so that they come out 0)."""
    total = table[n, ye, xe] - table[n, ys, xe] - table[n, ye, xs] + table[n, ys, xs]
    pixels = (ye - ys) * (xe - xs) if pixels is None else pixels
    return (total / pixels[..., None]).float().permute(0, 3, 1, 2)


def area_crops(table, image, y0, y1, x0, x1, size: int, chunk: int = 4096) -> torch.Tensor:
    """(K, C, size, size) float32 crops: rows [y0, y1) x columns [x0, x1) of image `image` (one per box,
    int tensors), each resized as F.interpolate(mode="area") would, from a summed_area table."""
    dev, c = table.device, table.shape[-1]
    step = torch.arange(size, device=dev)
    out = [torch.empty(0, c, size, size, device=dev)]
    for s in range(0, len(image), chunk):
        n, a0, a1, b0, b1 = (v[s:s + chunk].long()[:, None] for v in (image, y0, y1, x0, x1))
        ys, ye = _bins(a0, a1 - a0, size, step)
        xs, xe = _bins(b0, b1 - b0, size, step)
        out.append(_area(table, n[:, :, None], ys[:, :, None], ye[:, :, None], xs[:, None, :], xe[:, None, :]))
    return torch.cat(out)


def _level_bins(src, out, steps):
    """Host-side adaptive pooling bins of src pixels into out (per image, (k,) arrays) for steps positions:
    (start, end, length) each (k, steps), positions past out given the empty bin [0, 0) of length 1."""
    src, out = np.asarray(src, np.int64)[:, None], np.asarray(out, np.int64)[:, None]
    i = np.arange(steps)[None]
    start, end = _bins(0, src, out, i)
    past = i >= out
    start, end = np.where(past, 0, start), np.where(past, 0, end)
    return start, end, np.where(past, 1, end - start)


def area_levels(table, image, sizes, out, chunk: int = 1 << 25) -> torch.Tensor:
    """(K, C, max oh, max ow) float32: the top-left h x w pixels (sizes) of table image image[k] resized to
    oh x ow (out) as F.interpolate(mode="area") would, zero beyond: one pyramid level of images of
    different sizes, each as if resized alone. The bins are computed on the host (all sizes are known
    there) and sent in one copy."""
    dev, c = table.device, table.shape[-1]
    (h, w), (oh, ow) = np.asarray(sizes).T, np.asarray(out).T
    rows, cols = int(oh.max()), int(ow.max())
    packed = np.concatenate([np.asarray(image, np.int64)[:, None], *_level_bins(h, oh, rows),
                             *_level_bins(w, ow, cols)], 1)
    packed = torch.from_numpy(packed).to(dev, non_blocking=True)
    n, ys, ye, yl = packed[:, :1], *packed[:, 1:1 + 3 * rows].view(-1, 3, rows).unbind(1)
    xs, xe, xl = packed[:, 1 + 3 * rows:].view(-1, 3, cols).unbind(1)
    parts = []
    per = max(1, chunk // (rows * cols * c))
    for a in range(0, len(packed), per):
        k = slice(a, a + per)
        parts.append(_area(table, n[k, :, None], ys[k, :, None], ye[k, :, None], xs[k, None, :], xe[k, None, :],
                           yl[k, :, None] * xl[k, None, :]))
    return torch.cat(parts)


class Resizer:
    """The area resizes of one batch (pyramid levels, box crops): from a summed-area table (table=True:
    a few kernels for the whole batch, for a GPU) or one F.interpolate per image and per box (the CPU)."""

    def __init__(self, imgs: torch.Tensor, table: bool):
        self.imgs, self.use_table, self._table = imgs, table, None

    def table(self):
        if self._table is None:
            self._table = summed_area(self.imgs)
        return self._table

    def levels(self, image: list, sizes: list, out: list) -> torch.Tensor:
        """(K, C, max oh, max ow): image[k]'s top-left sizes[k] pixels resized to out[k], zero beyond."""
        if self.use_table:
            return area_levels(self.table(), image, sizes, out)
        x = self.imgs.new_zeros(len(image), self.imgs.shape[1], max(o[0] for o in out), max(o[1] for o in out))
        same = {}
        for k, key in enumerate(zip(sizes, out)):
            same.setdefault(key, []).append(k)
        for ((h, w), (oh, ow)), ks in same.items():  # one resize per image size
            src = self.imgs[[image[k] for k in ks], :, :h, :w]
            x[ks, :, :oh, :ow] = F.interpolate(src, size=(oh, ow), mode="area")
        return x

    def crops(self, image, y0, y1, x0, x1, size: int) -> torch.Tensor:
        """(K, C, size, size): rows [y0, y1) x columns [x0, x1) of image `image`, one per box."""
        if self.use_table:
            return area_crops(self.table(), image, y0, y1, x0, x1, size)
        boxes = torch.stack([image, y0, y1, x0, x1], 1).tolist()
        return torch.cat([self.imgs.new_zeros(0, self.imgs.shape[1], size, size)] + [
            F.interpolate(self.imgs[n:n + 1, :, a:b, c:e], size=(size, size), mode="area") for n, a, b, c, e in boxes])


def nms_by_image(boxes, scores, image, threshold: float, budget: int = 1 << 24, hold: int = 1 << 30,
                 overlap: str = "iou") -> torch.Tensor:
    """torchvision.ops.batched_nms(boxes, scores, image, threshold) on a GPU, for thousands of boxes over
    hundreds of images: the indices kept, by decreasing score. overlap="min": facenet-pytorch's last NMS
    instead (its nms_numpy "Min": boxes one pixel wider, intersection over the smaller box, ties to the
    later box), which runs on the host one kept box at a time.

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
    if overlap == "min":  # nms_numpy takes the last of equal scores first
        order = k - 1 - torch.sort(scores.flip(0), descending=True, stable=True).indices
    else:
        order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]  # by image, then by decreasing score
    img = image[order]
    counts = torch.bincount(img)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(k, device=boxes.device) - starts[img]
    n, m = len(counts), int(counts.max())
    if m > MAX_PER_IMAGE:  # its M x M matrix would not be small: torchvision's memory stays linear
        if overlap == "min":
            return _fn().batched_nms_numpy(boxes[:, :4], scores, image, threshold, "Min")
        return batched_nms(boxes, scores, image, threshold)
    one = 1.0 if overlap == "min" else 0.0
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
            area = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
            lt = torch.maximum(b[:, :, None, :2], b[:, None, :, :2])
            rb = torch.minimum(b[:, :, None, 2:], b[:, None, :, 2:])
            wh = (rb - lt + one).clamp(min=0)
            inter = wh[..., 0] * wh[..., 1]
            if overlap == "min":
                over = inter / torch.minimum(area[:, :, None], area[:, None, :])
            else:
                over = inter / (area[:, :, None] + area[:, None, :] - inter)
            hits[c - a:c - a + len(b)] = (over > threshold) & earlier
        kept = valid[a:z]
        while True:  # two rounds per comparison: one host wait each, and a fixed point stays one
            new = valid[a:z] & ~(hits & kept[:, None, :]).any(2)
            kept = valid[a:z] & ~(hits & new[:, None, :]).any(2)
            if torch.equal(new, kept):
                break
        keep[a:z] = kept
    chosen = order[keep[img, slot]]
    return chosen[torch.sort(scores[chosen], descending=True, stable=True).indices]


def _nms(boxes, scores, image, threshold, overlap="iou", within=None, groups=1):
    """NMS within each image (and within each group `within`, 0 to groups - 1, of an image: its pyramid levels).

    The CPU keeps torchvision's and facenet-pytorch's functions, called once per image with the groups an
    image alone would have: called once for the batch, an image's answer depended on the others. Their offset
    trick moves each group's boxes by a multiple of the largest coordinate (float32 rounding that differed
    with the batch and with the image's place in it), and facenet-pytorch's last NMS breaks ties of equal
    scores (saturated O-Net probabilities) with numpy's unstable argsort over all the boxes it is given: in a
    batch with a larger image, a face moved by 10 pixels. Even on one image that argsort breaks ties one
    way on a few boxes and its own way on more (and by the CPU's sort kernel), so the last NMS is
    nms_by_image on the CPU as on a GPU: equal probabilities go to the later box on every machine."""
    if boxes.device.type != "cpu":
        return nms_by_image(boxes, scores, image if within is None else image * groups + within, threshold,
                            overlap=overlap)
    picks = [torch.zeros(0, dtype=torch.long)]
    for k in torch.unique(image).tolist():  # in image order: an image's boxes keep their order alone
        sel = (image == k).nonzero()[:, 0]
        ids = torch.zeros_like(sel) if within is None else within[sel]
        if overlap == "min":
            keep = nms_by_image(boxes[sel], scores[sel], ids, threshold, overlap="min")
        else:
            keep = batched_nms(boxes[sel], scores[sel], ids, threshold)
        picks.append(sel[keep])
    return torch.cat(picks)


def _pyramid(sizes, min_face: int, factor: float, smallest: float = 0):
    """facenet-pytorch's scales (repeated products, so that every level has its exact size) and, per
    image, how many of them its own smaller side takes (levels down to a 12-pixel side).

    smallest: leave out the first levels, whose faces (12 / scale pixels up to 1 / factor times that) are
    all smaller than this. The levels kept are the very same scales; only the proposals of the dropped ones
    are gone from the image's NMS, which can move the landmarks of faces up to about twice that size."""
    counts = []
    for h, w in sizes:
        k, minl = 0, min(h, w) * 12.0 / min_face
        while minl >= 12:
            k, minl = k + 1, minl * factor
        counts.append(k)
    scales = [12.0 / min_face]
    while len(scales) < max(counts, default=0):
        scales.append(scales[-1] * factor)
    scales = scales[:max(counts, default=0)]
    skip = 0
    while skip < len(scales) and 12.0 / (scales[skip] * factor) <= smallest:
        skip += 1
    return scales[skip:], [max(0, k - skip) for k in counts]


def _edges(x, oh, ow):
    """_pnet's three masks over a canvas x of (K, C, H, W) holding images of oh x ow pixels (top-left):
    True outside each image's own map after conv1 and after pool1 (the positions masked_fill fills), True
    inside it after conv3. Each mask is the outer "or" / "and" of a row and a column vector made on the
    host (the maps' sizes are known there) and sent in one copy, not some fourteen small ops per mask."""
    oh, ow = (np.asarray(v.tolist() if torch.is_tensor(v) else v, np.int64) for v in (oh, ow))
    k, (h, w) = len(oh), x.shape[2:]
    h1, w1 = h - 2, w - 2  # conv1, 3x3
    h2, w2 = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1  # pool1, 2x2 stride 2, ceil mode
    ph, pw = (oh - 1) // 2, (ow - 1) // 2  # ceil((oh - 2) / 2): the pooled map of the image alone
    parts = [(h1, oh - 2, True), (w1, ow - 2, True), (h2, ph, True), (w2, pw, True), (h2 - 4, ph - 4, False),
             (w2 - 4, pw - 4, False)]
    flat = np.concatenate([((np.arange(n)[None] < lim[:, None]) ^ out).ravel() for n, lim, out in parts])
    flat = torch.from_numpy(flat).to(x.device, non_blocking=True)
    vec, at = [], 0
    for (n, _, _), shape in zip(parts, [(k, 1, -1, 1), (k, 1, 1, -1)] * 3):
        vec.append(flat[at:at + k * n].view(shape))
        at += k * n
    return vec[0] | vec[1], vec[2] | vec[3], vec[4] & vec[5]


def _pnet(pnet, x, oh, ow):
    """P-Net over a canvas of images of oh x ow pixels each (top-left; (K,) int tensors or host arrays):
    (regression, face probability), zero outside each image's own output map. Each image's outputs are
    those of P-Net on that image alone: its ceil-mode pooling windows that run past the image see -inf
    (so max ignores them, as PyTorch's does past the edge), and what lies beyond feeds only outputs that
    are dropped."""
    past1, past2, keep = _edges(x, oh, ow)
    y = pnet.prelu1(pnet.conv1(x))
    y = pnet.pool1(y.masked_fill(past1, float("-inf")))
    y = y.masked_fill(past2, 0.0)  # finite, so that no conv algorithm spreads an inf
    y = pnet.prelu3(pnet.conv3(pnet.prelu2(pnet.conv2(y))))
    return pnet.conv4_2(y) * keep, pnet.softmax4_1(pnet.conv4_1(y))[:, 1:] * keep


def _stage_one(imgs, resize, sizes, mtcnn, smallest=0):
    """P-Net candidates of every level of every image, after facenet-pytorch's NMS within each level
    (0.5) and each image (0.7): one nonzero and two NMS for the batch, not some per level. Images of one
    size are resized as one canvas (facenet-pytorch's imresample), else each by the Resizer. Returns
    (boxes (k, 9): x1, y1, x2, y2, score, 4 regressions; image (k,))."""
    d, pnet, dev = _fn(), mtcnn.pnet, imgs.device
    scales, counts = _pyramid(sizes, mtcnn.min_face_size, mtcnn.factor, smallest)
    probs, regs, owner, dims = [], [], [], []
    whole = all(s == tuple(imgs.shape[2:]) for s in sizes)  # every image fills the canvas: nothing to mask
    for lv, scale in enumerate(scales):
        idx = [i for i, k in enumerate(counts) if k > lv]
        out = [(int(sizes[i][0] * scale + 1), int(sizes[i][1] * scale + 1)) for i in idx]  # facenet-pytorch's
        if whole:
            reg, prob = pnet((d.imresample(imgs, out[0]) - 127.5) * 0.0078125)
            prob = prob[:, 1:]
        else:
            oh, ow = np.asarray(out, np.int64).T
            x = resize.levels(idx, [sizes[i] for i in idx], out)
            reg, prob = _pnet(pnet, (x - 127.5) * 0.0078125, oh, ow)
        probs.append(prob.reshape(-1))
        regs.append(reg.permute(0, 2, 3, 1).reshape(-1, 4))
        owner.append(idx)
        dims.append(prob.shape[2:])
    if not probs:
        return torch.zeros(0, 9, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    prob, reg = torch.cat(probs), torch.cat(regs)
    hit = (prob >= mtcnn.thresholds[0]).nonzero()[:, 0]
    # a flat index -> (level, image, row, column), from each level's offset and map size (one copy)
    per = np.array([len(o) * h * w for o, (h, w) in zip(owner, dims)])
    first = np.cumsum([0] + [len(o) for o in owner[:-1]])
    meta = torch.tensor(np.stack([np.cumsum(per), np.cumsum(per) - per, [h * w for h, w in dims],
                                  [w for _, w in dims], first]), device=dev)
    level = torch.searchsorted(meta[0], hit, right=True)
    _, start, area, width, first = meta[:, level]
    pos = (hit - start) % area
    image = torch.tensor(sum(owner, []), device=dev)[first + (hit - start) // area]
    cell = torch.stack([pos % width, pos // width], 1).to(prob.dtype)  # (x, y)
    scale = torch.tensor(scales, dtype=prob.dtype, device=dev)[level, None]
    boxes = torch.cat([((2 * cell + 1) / scale).floor(), ((2 * cell + 12) / scale).floor(), prob[hit, None],
                       reg[hit]], 1)
    pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.5, within=level, groups=len(scales))
    pick = pick[torch.sort(level[pick], stable=True).indices]  # facenet-pytorch's order: by level, then score
    boxes, image = boxes[pick], image[pick]
    pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.7)
    return boxes[pick], image[pick]


def _crops_of(resize, boxes, image, w, h, size):
    """facenet-pytorch's pad() and crop rule, for all boxes: the box clipped to its own image (w, h:
    per-image tensors), 1-based; boxes left empty by the clipping are dropped (facenet-pytorch skips them too)."""
    b = boxes[:, :4].trunc().long()
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = torch.minimum(b[:, 2], w[image]), torch.minimum(b[:, 3], h[image])
    ok = ((ey > y - 1) & (ex > x - 1)).nonzero()[:, 0]  # one host wait, not one per tensor cut
    if len(ok) < len(boxes):
        boxes, image, x, y, ex, ey = boxes[ok], image[ok], x[ok], y[ok], ex[ok], ey[ok]
    crops = resize.crops(image, y - 1, ey, x - 1, ex, size)
    return (crops - 127.5) * 0.0078125, boxes, image


def detect(imgs: torch.Tensor, mtcnn, sizes=None, table: bool | None = None,
           smallest: float = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, 3, H, W) float images (0-255) on mtcnn's device -> per image (boxes (k, 5): x1, y1, x2, y2,
    probability; landmarks (k, 5, 2)), as numpy, the k faces in no particular order.

    sizes: (h, w) of each image, which fills the top-left of its canvas (default: the whole canvas). Each
    image's detections are those of facenet-pytorch on that image alone, whatever the canvas.
    table: resize from a summed-area table (default on a GPU) or one F.interpolate per image and box (the
    CPU's default: cheaper there, and facenet-pytorch's own arithmetic).
    smallest: skip the pyramid levels whose faces are all smaller than this many pixels (see _pyramid).
    """
    d = _fn()
    pnet, rnet, onet, thresholds = mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.thresholds
    imgs = imgs.to(next(pnet.parameters()).dtype)
    n, _, h, w = imgs.shape
    sizes = [(h, w)] * n if sizes is None else [tuple(int(v) for v in s) for s in sizes]
    dev = imgs.device
    resize = Resizer(imgs, dev.type != "cpu" if table is None else table)
    hs, ws = torch.tensor(sizes, device=dev).unbind(1)
    # stage 1: P-Net over each image's pyramid
    boxes, image = _stage_one(imgs, resize, sizes, mtcnn, smallest)
    rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
                         boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4]], 1)
    boxes = d.rerec(boxes)
    points = torch.zeros(0, 5, 2, device=dev)
    # stage 2: R-Net on 24 px crops of every candidate
    if len(boxes):
        crops, boxes, image = _crops_of(resize, boxes, image, ws, hs, 24)
        reg, score = d.fixed_batch_process(crops, rnet) if len(crops) else (crops.new_zeros(0, 4),
                                                                              crops.new_zeros(0, 2))
        keep = (score[:, 1] > thresholds[1]).nonzero()[:, 0]  # one host wait for the four cuts
        boxes = torch.cat([boxes[keep, :4], score[keep, 1:2]], 1)
        image, reg = image[keep], reg[keep]
        pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes = d.rerec(d.bbreg(boxes[pick], reg[pick]))
        image = image[pick]
    # stage 3: O-Net on 48 px crops: probability, box regression, landmarks
    if len(boxes):
        crops, boxes, image = _crops_of(resize, boxes, image, ws, hs, 48)
        if len(crops):
            reg, marks, score = d.fixed_batch_process(crops, onet)
        else:
            reg, marks, score = crops.new_zeros(0, 4), crops.new_zeros(0, 10), crops.new_zeros(0, 2)
        keep = (score[:, 1] > thresholds[2]).nonzero()[:, 0]
        boxes = torch.cat([boxes[keep, :4], score[keep, 1:2]], 1)
        image, reg, marks = image[keep], reg[keep], marks[keep]
        bw, bh = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = torch.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = d.bbreg(boxes, reg)
        pick = _nms(boxes[:, :4], boxes[:, 4], image, 0.7, overlap="min")
        boxes, image, points = boxes[pick], image[pick], points[pick]
    # one copy back to the host, not three (image indices are exact in float32 below 2**24)
    back = torch.cat([boxes, points.reshape(-1, 10), image[:, None].to(boxes.dtype)], 1).cpu().numpy()
    boxes, points, image = back[:, :5], back[:, 5:15].reshape(-1, 5, 2), back[:, 15].astype(np.int64)
    return [(boxes[image == k], points[image == k]) for k in range(n)]

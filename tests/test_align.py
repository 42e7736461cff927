"""Image decoding of awkward files, and detection + similarity alignment on real faces."""
import numpy as np
import pytest

from common.align import ARCFACE_112, CANON, TEMPLATE, FaceDetector, similarity_transform, warp
from common.images import BadImage, decode_image, list_images, read_image


def test_list_images_sorted_and_recursive(face_dir):
    imgs = list_images(face_dir)
    assert imgs == sorted(imgs)
    assert "odd/grey.png" in imgs and "single_face.jpg" in imgs


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("name", ["odd/grey.png", "odd/cmyk.jpg", "odd/alpha.png", "odd/grey16.png", "single_face.jpg"])
def test_odd_formats_become_rgb8(face_dir, name):
    img = read_image(face_dir / name)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 20 < img.mean() < 235  # 16-bit rescaled, not clipped to white; CMYK not inverted to black


def test_grey16_matches_grey8(face_dir):
    a = read_image(face_dir / "odd/grey16.png").astype(int)
    b = read_image(face_dir / "odd/grey.png").astype(int)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("name", ["odd/truncated.jpg", "odd/corrupt.jpg"])
def test_broken_files_raise_with_path(face_dir, name):
    with pytest.raises(BadImage, match=name.split("/")[-1]) as err:
        read_image(face_dir / name)
    assert "object at 0x" not in str(err.value)  # the same reason on every run, for missed_faces.tsv


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = rng.uniform(0, 100, (5, 2))
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_similarity_transform_of_a_batch_is_the_least_squares_similarity():
    """A batch of point sets (mirrored ones too, where the best rotation is not the SVD's reflection):
    each matrix is the linear least-squares fit of [[a, -b, tx], [b, a, ty]]."""
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (6, 5, 2))
    src[3:, :, 0] *= -1
    got = similarity_transform(src, TEMPLATE)
    assert got.shape == (6, 2, 3)
    for pts, m in zip(src, got):
        x, y = pts[:, 0], pts[:, 1]
        a = np.concatenate([np.c_[x, -y, np.ones(5), np.zeros(5)], np.c_[y, x, np.zeros(5), np.ones(5)]])
        (ca, cb, tx, ty), *_ = np.linalg.lstsq(a, np.concatenate([TEMPLATE[:, 0], TEMPLATE[:, 1]]), rcond=None)
        np.testing.assert_allclose(m, [[ca, -cb, tx], [cb, ca, ty]], atol=1e-9)
        np.testing.assert_allclose(similarity_transform(pts, TEMPLATE), m, atol=1e-12)


def test_template_maps_to_arcface_window():
    # The ArcFace 112 crop is exactly the central box of the canonical crop.
    x0 = 0.1 * CANON
    back = (TEMPLATE - x0) * 112 / (0.8 * CANON)
    assert np.allclose(back, ARCFACE_112)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def test_detector_aligns_real_face(face_dir, detector):
    img = read_image(face_dir / "single_face.jpg")
    matrix, score = detector(img)
    assert score > 0.9
    crop = warp(img, matrix)
    assert crop.shape == (CANON, CANON, 3)
    # Landmarks found again on the aligned crop land on the template.
    boxes, probs, marks = detector.mtcnn.detect(crop, landmarks=True)
    best = int(np.argmax(probs))
    assert np.abs(marks[best] - TEMPLATE).max() < 0.06 * CANON


def test_detector_no_face(face_dir, detector):
    assert detector(read_image(face_dir / "zz_noface.jpg")) is None


# ------------------------------------------------------------------------- the batched (device) path
def _chw(img):
    import torch

    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_grid_warp_matches_cv2(face_dir, detector):
    """The device warp (one grid_sample, REFLECT101 borders) gives cv2.warpAffine's pixels, for images of
    several sizes in one batch and a matrix that reaches past the image edges."""
    import torch

    from common.align import grid_warp

    names = ["single_face.jpg", "tom.png", "odd/grey.png", "bw.jpg"]
    imgs = [read_image(face_dir / n) for n in names]
    mats = [detector(i)[0] for i in imgs[:2]]
    mats += [np.array([[0.5, 0.1, -40.0], [-0.1, 0.5, 30.0]]), np.array([[2.0, 0.0, -300.0], [0.0, 2.0, 50.0]])]
    out = grid_warp([_chw(i) for i in imgs], mats, CANON, torch.empty(4, 3, CANON, CANON, dtype=torch.uint8))
    ref = np.stack([warp(i, m) for i, m in zip(imgs, mats)]).astype(int)
    diff = np.abs(out.permute(0, 2, 3, 1).numpy().astype(int) - ref)
    assert diff.mean() < 0.2 and diff.max() <= 2, (diff.mean(), diff.max())


def test_batched_detector_agrees_with_per_image(face_dir, detector):
    """Same faces found and missed; same landmarks where no image is shrunk (images of other sizes share
    a canvas, each searched as if alone), close ones where the detector sees a shrunk copy; the
    centre-face rule on a photo of several faces."""
    from common.align import BatchDetector

    names = ["single_face.jpg", "0-f1-su-ph.jpg", "multi_face.jpg", "tom.png", "zz_noface.jpg"]
    imgs = [read_image(face_dir / n) for n in names]
    ref = [detector(i) for i in imgs]
    full = BatchDetector(detect_size=10_000)([_chw(i) for i in imgs])
    small = BatchDetector(detect_size=320)([_chw(i) for i in imgs])
    for n, img, a, b, c in zip(names, imgs, ref, full, small):
        assert (a is None) == (b is None) == (c is None), n
        if a is None:
            continue
        eyes = np.linalg.norm(np.linalg.inv(np.vstack([a[0], [0, 0, 1]]))[:2, :2] @ (TEMPLATE[1] - TEMPLATE[0]))
        shift = lambda m: np.abs(warp_points(m, TEMPLATE) - warp_points(a[0], TEMPLATE)).max() / eyes
        assert shift(b[0]) < 1e-3, n
        assert shift(c[0]) < 0.15, n  # within 15% of the eye distance on a copy of 320 px


def test_skipping_the_levels_of_small_faces_keeps_the_large_faces_as_they_were(face_dir):
    """--smallest-face drops MTCNN's first pyramid levels, whose faces are all smaller; the levels kept are the
    same scales, so these photos' faces (far above 40 px) are found with the very same landmarks, and a face
    under it (a shrunk copy of the photo) is no longer found."""
    from common import mtcnn
    from common.align import BatchDetector

    full, counts = mtcnn._pyramid([(360, 640), (200, 120)], 20, 0.709)
    for smallest, skipped in ((20, 0), (28, 0), (28.3, 1), (40, 2), (56, 2), (56.2, 3)):
        kept, c = mtcnn._pyramid([(360, 640), (200, 120)], 20, 0.709, smallest)
        assert kept == full[skipped:] and c == [max(0, k - skipped) for k in counts], smallest
        assert 12 / (kept[0] * 0.709) > smallest  # the first level kept holds faces of that size
    names = ["single_face.jpg", "0-f1-su-ph.jpg", "multi_face.jpg", "tom.png", "zz_noface.jpg"]
    imgs = [_chw(read_image(face_dir / n)) for n in names]
    every, some = BatchDetector()(imgs), BatchDetector(smallest_face=40)(imgs)
    for n, a, b in zip(names, every, some):
        assert (a is None) == (b is None), n
        if a is not None:
            assert np.allclose(a[0], b[0], atol=1e-9) and a[1] == pytest.approx(b[1]), n
    # the same photo shrunk to 47 px (its face about 25 px) on a 640 x 480 canvas: found when every level is
    # searched, not when faces under 40 px are skipped
    import torch
    from torch.nn import functional as F

    face = torch.from_numpy(np.array(read_image(face_dir / "single_face.jpg"))).permute(2, 0, 1)[None].float()
    small = F.interpolate(face, scale_factor=1 / 12, mode="area")[0].round().to(torch.uint8)
    canvas = torch.zeros(3, 480, 640, dtype=torch.uint8)
    canvas[:, :small.shape[1], :small.shape[2]] = small
    assert BatchDetector()([canvas])[0] is not None
    assert BatchDetector(smallest_face=40)([canvas])[0] is None
    # an image (as searched) smaller than the smallest face is not searched, and the reason says so
    assert BatchDetector(smallest_face=500)([canvas])[0] == ("image is 640x480 pixels: smaller than the 500-pixel "
                                                             "faces the detector looks for")
    big = F.interpolate(canvas[None].float(), scale_factor=2)[0].to(torch.uint8)
    assert "(640x480 as searched): smaller than the 500-pixel" in BatchDetector(smallest_face=500)([big])[0]


def warp_points(m, pts):
    """Image positions of crop points under the alignment matrix m."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    return pts @ inv[:2, :2].T + inv[:2, 2]


def test_gpu_jpeg_decode_matches_pil(face_dir):
    import torch

    from common.images import decode_jpegs_on, nvjpeg_safe

    if not torch.cuda.is_available():
        pytest.skip("nvjpeg needs a CUDA device")
    names = ["single_face.jpg", "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg"]
    datas = [(face_dir / n).read_bytes() for n in names]
    refs = [read_image(face_dir / n) for n in names]
    for sub, name in _subsampled(refs[0]):  # the same face as 4:4:4, 4:2:2 and 4:2:0
        names, datas, refs = names + [name], datas + [sub], refs + [decode_image(sub)]
    assert all(nvjpeg_safe(d) for d in datas)
    for n, d, ref, gpu in zip(names, datas, refs, decode_jpegs_on(datas, "cuda")):
        ref = ref.astype(int)
        diff = np.abs(gpu.permute(1, 2, 0).cpu().numpy().astype(int) - ref)
        assert diff.shape == ref.shape and diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (n, diff.mean())


def _subsampled(rgb):
    """(JPEG bytes, label) of one image saved with each common chroma subsampling."""
    import io

    from PIL import Image

    out = []
    for code, label in [(0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0")]:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90, subsampling=code)
        out.append((buf.getvalue(), label))
    return out


def test_common_subsamplings_go_to_nvjpeg(face_dir):
    from common.images import nvjpeg_safe

    for data, label in _subsampled(read_image(face_dir / "single_face.jpg")):
        assert nvjpeg_safe(data), label


def test_odd_jpegs_stay_on_pil(face_dir):
    import io

    from PIL import Image

    from common.images import nvjpeg_safe

    assert nvjpeg_safe((face_dir / "single_face.jpg").read_bytes())
    # bw.jpg: grey with 2x2 sampling, which nvjpeg decoded wrong (mean error 63 levels) on an H100
    for n in ["odd/cmyk.jpg", "odd/truncated.jpg", "odd/corrupt.jpg", "tom.png", "bw.jpg"]:
        assert not nvjpeg_safe((face_dir / n).read_bytes()), n
    # colour stored as RGB, not YCbCr: libjpeg honours it, nvjpeg is unchecked. Either sign alone says so:
    # components named R, G, B (the Adobe marker cut out), or an Adobe marker with transform 0
    stored_rgb, plain = io.BytesIO(), io.BytesIO()
    Image.open(face_dir / "single_face.jpg").save(stored_rgb, "JPEG", quality=90, keep_rgb=True)
    Image.open(face_dir / "single_face.jpg").save(plain, "JPEG", quality=90)
    rgb, ycc = stored_rgb.getvalue(), plain.getvalue()
    at = rgb.index(b"\xff\xee")
    app14 = rgb[at:at + 2 + int.from_bytes(rgb[at + 2:at + 4], "big")]
    assert app14[-1] == 0 and nvjpeg_safe(ycc)
    for data in (rgb, rgb.replace(app14, b""), ycc[:2] + app14 + ycc[2:]):
        assert not nvjpeg_safe(data)


def test_engine_jpeg_bytes_path(face_dir):
    """The GPU path's split, run with torchvision's CPU decoder: plain RGB JPEGs travel as bytes and decode
    in one batched call to PIL's pixels; grey and odd files are decoded by PIL in the worker; bad ones keep
    their reason."""
    from common.extract import Engine, ImageFiles, Options

    names = ["single_face.jpg", "bw.jpg", "odd/cmyk.jpg", "odd/truncated.jpg", "tom.png"]
    files = ImageFiles(face_dir, names, gpu_jpeg=True)
    items = [files[i] for i in range(len(names))]
    assert [it["jpeg"] is not None for it in items] == [True, False, False, False, False]  # bw.jpg is grey
    assert "not a readable image" in items[3]["reason"] and items[3]["image"] is None
    images = Engine([], "cpu", Options(align="none")).decode(items, [it["reason"] for it in items])
    for n, img in zip(names, images):
        if n == "odd/truncated.jpg":
            assert img is None
            continue
        ref = read_image(face_dir / n).astype(int)
        diff = np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref)
        assert diff.shape == ref.shape and diff.mean() < 1.0, (n, diff.mean())


def test_a_batch_nvjpeg_refuses_is_decoded_file_by_file_as_the_cpu_path_would(face_dir, tmp_path, monkeypatch):
    """nvjpeg fails a whole batched call for one stream it cannot decode, and a damaged JPEG can pass the
    header check: the batch is then decoded by PIL, the good files to PIL's pixels, the bad one a row with
    PIL's reason naming the file, instead of the error ending the extraction."""
    import torch

    import common.extract
    from common.extract import Engine, ImageFiles, Options

    data = (face_dir / "single_face.jpg").read_bytes()
    bad = bytearray(data)
    bad[data.index(b"\xff\xc4") + 5] = 0xFF  # a broken Huffman table: the header still reads, the scan does not
    (tmp_path / "bad.jpg").write_bytes(bytes(bad))
    (tmp_path / "good.jpg").write_bytes(data)
    files = ImageFiles(tmp_path, ["good.jpg", "bad.jpg"], gpu_jpeg=True)
    items = [files[0], files[1]]
    assert all(it["jpeg"] is not None for it in items)  # both passed nvjpeg_safe

    def refuse(datas, device):
        raise RuntimeError("Error while decoding JPEG images: nvjpegDecodeBatched failed: 6")

    monkeypatch.setattr(common.extract, "decode_jpegs_on", refuse)
    reasons = ["", ""]
    good, broken = Engine([], "cpu", Options(align="none")).decode(items, reasons)
    assert broken is None and "bad.jpg" in reasons[1] and "not a readable image" in reasons[1]
    assert reasons[0] == ""
    ref = read_image(tmp_path / "good.jpg").astype(int)
    assert np.array_equal(good.permute(1, 2, 0).numpy().astype(int), ref)

    def out_of_memory(datas, device):  # the device's trouble, not the files': not hidden by the host path
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(common.extract, "decode_jpegs_on", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Engine([], "cpu", Options(align="none")).decode(items, ["", ""])


def test_area_crops_match_area_interpolation():
    """The summed-area crops are F.interpolate(mode='area') of each box, shrinking and enlarging alike."""
    import torch
    from torch.nn import functional as F

    from common.mtcnn import area_crops, summed_area

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 3, 50, 70, generator=g) * 255
    boxes = [(0, 0, 50, 0, 70), (1, 3, 9, 60, 70), (2, 10, 49, 5, 6), (1, 0, 30, 20, 64), (0, 7, 8, 7, 8)]
    n, y0, y1, x0, x1 = (torch.tensor(v) for v in zip(*boxes))
    for size in (24, 48):
        got = area_crops(summed_area(imgs), n, y0, y1, x0, x1, size, chunk=2)
        for k, (i, a, b, c, d) in enumerate(boxes):
            ref = F.interpolate(imgs[i:i + 1, :, a:b, c:d], size=(size, size), mode="area")[0]
            torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-3)


def _gpu_nms(boxes, scores, image, threshold, overlap="iou", within=None, groups=1):
    """common.mtcnn._nms as it runs on a GPU (nms_by_image), on the CPU."""
    from common.mtcnn import nms_by_image
    return nms_by_image(boxes, scores, image if within is None else image * groups + within, threshold,
                        overlap=overlap)


@pytest.mark.parametrize("way", ["cpu", "table", "table, nms_by_image"])
def test_batched_mtcnn_gives_facenet_pytorch_detections(face_dir, detector, way, monkeypatch):
    """Every box, probability and landmark of facenet-pytorch's detect, on a batch of real photos, with
    the CPU's resizes and NMS and with the GPU's (summed-area table, nms_by_image)."""
    import torch

    from common import mtcnn as batched

    if way == "table, nms_by_image":
        monkeypatch.setattr(batched, "_nms", _gpu_nms)

    imgs = [read_image(face_dir / n) for n in ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg"]]
    assert len({i.shape for i in imgs}) == 1
    canvas = torch.from_numpy(np.stack(imgs)).float()
    with torch.inference_mode():
        boxes, probs, marks = detector.mtcnn.detect(canvas, landmarks=True)
        ours = batched.detect(canvas.permute(0, 3, 1, 2), detector.mtcnn, table=way != "cpu")
    for ref_b, ref_p, ref_m, (b, m) in zip(boxes, probs, marks, ours):
        ref_b, ref_m = np.asarray(ref_b, np.float64), np.asarray(ref_m, np.float64)  # object arrays
        assert len(b) == len(ref_b) >= 1
        order, mine = np.lexsort(ref_b[:, :2].T), np.lexsort(b[:, :2].T)
        np.testing.assert_allclose(b[mine, :4], ref_b[order], atol=1e-2)
        np.testing.assert_allclose(b[mine, 4], np.asarray(ref_p, np.float64)[order], atol=1e-4)
        np.testing.assert_allclose(m[mine], ref_m[order], atol=1e-2)


def test_tied_onet_probabilities_keep_the_same_face_on_the_cpu_as_on_a_gpu(face_dir, detector, monkeypatch):
    """45-m7-di-ph.jpg: O-Net gives two overlapping boxes the same saturated probability. The CPU path kept
    the one numpy's unstable argsort put first and the GPU's nms_by_image the later one, and the aligned
    crops were 10 pixels apart (age features at cosine 0.937). Both now keep the later box."""
    import torch

    from common import mtcnn as batched

    seen = []
    nms = batched.nms_by_image

    def spy(boxes, scores, image, threshold, overlap="iou", **kw):
        if overlap == "min":
            seen.append(scores.clone())
        return nms(boxes, scores, image, threshold, overlap=overlap, **kw)

    canvas = torch.from_numpy(read_image(face_dir / "45-m7-di-ph.jpg").copy()).float().permute(2, 0, 1)[None]
    with torch.inference_mode():
        monkeypatch.setattr(batched, "nms_by_image", spy)
        (cpu_b, cpu_m), = batched.detect(canvas, detector.mtcnn)
        monkeypatch.setattr(batched, "_nms", _gpu_nms)
        (gpu_b, gpu_m), = batched.detect(canvas, detector.mtcnn, table=True)
    top = seen[0].max()
    assert (seen[0] == top).sum() >= 2  # the tie is still there to break
    assert len(cpu_b) == len(gpu_b) >= 1
    order, mine = np.lexsort(gpu_b[:, :2].T), np.lexsort(cpu_b[:, :2].T)
    np.testing.assert_allclose(cpu_b[mine], gpu_b[order], atol=1e-2)
    np.testing.assert_allclose(cpu_m[mine], gpu_m[order], atol=1e-2)


def test_area_levels_match_area_interpolation_of_each_image():
    """A pyramid level of images of several sizes on one canvas: each is F.interpolate(mode='area') of
    that image alone, zero beyond its own level size."""
    import torch
    from torch.nn import functional as F

    from common.mtcnn import area_levels, summed_area

    g = torch.Generator().manual_seed(1)
    canvas = torch.rand(3, 3, 41, 57, generator=g) * 255
    sizes = [(41, 57), (30, 57), (17, 9)]
    for scale in (0.6, 0.3, 1.7):
        out = [(int(h * scale + 1), int(w * scale + 1)) for h, w in sizes]
        order = [2, 0, 1]
        got = area_levels(summed_area(canvas), order, [sizes[i] for i in order], [out[i] for i in order], chunk=3000)
        for k, i in enumerate(order):
            (a, b), (c, d) = sizes[i], out[i]
            ref = F.interpolate(canvas[i:i + 1, :, :a, :b], size=(c, d), mode="area")[0]
            torch.testing.assert_close(got[k, :, :c, :d], ref, rtol=0, atol=1e-3)
            assert got[k, :, c:].abs().sum() == 0 and got[k, :, :, d:].abs().sum() == 0


def test_masked_pnet_is_pnet_on_each_image_alone(detector):
    """P-Net over a canvas of inputs of odd and even sides (ceil-mode pooling windows that run past an
    input's edge): each input's map is P-Net's on that input alone, and zero beyond it."""
    import torch

    from common.mtcnn import _pnet

    pnet = detector.mtcnn.pnet
    g = torch.Generator().manual_seed(2)
    sizes = [(31, 40), (24, 17), (13, 13), (40, 29)]
    canvas = torch.rand(len(sizes), 3, 40, 40, generator=g) * 2 - 1  # padding holds noise, not zeros
    oh, ow = torch.tensor(sizes).unbind(1)
    with torch.inference_mode():
        reg, prob = _pnet(pnet, canvas, oh, ow)
        for k, (h, w) in enumerate(sizes):
            ref_reg, ref_prob = pnet(canvas[k:k + 1, :, :h, :w])
            r, c = ref_prob.shape[2:]
            torch.testing.assert_close(prob[k, 0, :r, :c], ref_prob[0, 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(reg[k, :, :r, :c], ref_reg[0], rtol=0, atol=1e-5)
            assert prob[k, :, r:].abs().sum() == 0 and prob[k, :, :, c:].abs().sum() == 0


@pytest.mark.parametrize("where", ["cpu", "cpu, table", "cpu, table, nms_by_image", "cuda"])
def test_batched_mtcnn_on_a_canvas_of_sizes_is_each_image_alone(face_dir, detector, where, monkeypatch):
    """Real photos of seven sizes (odd sides, a small one with fewer pyramid levels, one cut through
    faces at its right and bottom edges, so that boxes run into the padding) zero-padded on one canvas
    and searched in one pass: every box, probability and landmark of facenet-pytorch on each photo alone
    (on CUDA, within the rounding of its TF32 convolutions)."""
    import torch
    from torch.nn import functional as F

    from common import mtcnn as batched
    from common.align import FaceDetector

    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if where == "cpu, table, nms_by_image":
        monkeypatch.setattr(batched, "_nms", _gpu_nms)
    # 45-m7-di-ph.jpg: O-Net gives several of its boxes the same (saturated) probability; one NMS over the
    # batch broke that tie by numpy's unstable sort over every image's boxes, and moved its face 10 pixels
    names = ["0-f1-su-ph.jpg", "single_face.jpg", "multi_face.jpg", "tom.png", "mask.jpg", "0-f15-hao-ph.jpg",
             "45-m7-di-ph.jpg"]
    imgs = [torch.from_numpy(read_image(face_dir / n)).permute(2, 0, 1).float()[None] for n in names]
    sides = [(509, 511), (301, 277), None, (233, 157), (95, 121), (480, 359), None]
    imgs = [i if s is None else F.interpolate(i, size=s, mode="bilinear", antialias=True) for i, s in zip(imgs, sides)]
    names, imgs = names + ["multi_face.jpg, cut"], imgs + [imgs[2][:, :, :401, :761]]
    sizes = [tuple(i.shape[2:]) for i in imgs]
    assert len(set(sizes)) == len(sizes)
    canvas = torch.zeros(len(imgs), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
    for k, i in enumerate(imgs):
        canvas[k, :, :i.shape[2], :i.shape[3]] = i[0]
    device = "cuda" if where == "cuda" else "cpu"
    with torch.inference_mode():
        ours = batched.detect(canvas.to(device), FaceDetector(device).mtcnn, sizes=sizes, table=where != "cpu")
        alone = [detector.mtcnn.detect(i[0].permute(1, 2, 0), landmarks=True) for i in imgs]
    assert sum(len(b) for b, _ in ours) >= len(names)
    px, prob = (0.5, 1e-3) if device == "cuda" else (1e-2, 1e-4)
    for n, (b, m), (ref_b, ref_p, ref_m) in zip(names, ours, alone):
        if ref_b is None:
            assert len(b) == 0, n
            continue
        ref_b, ref_p, ref_m = (np.asarray(v, np.float64) for v in (ref_b, ref_p, ref_m))
        assert len(b) == len(ref_b), n
        if n == "45-m7-di-ph.jpg":
            continue  # nms_by_image breaks that tie its own way (the same in any batch, on any machine)
        order, mine = np.lexsort(ref_b[:, :2].T), np.lexsort(b[:, :2].T)
        np.testing.assert_allclose(b[mine, :4], ref_b[order], atol=px)
        np.testing.assert_allclose(b[mine, 4], ref_p[order], atol=prob)
        np.testing.assert_allclose(m[mine], ref_m[order], atol=px)


@pytest.mark.parametrize("max_per_image", [4096, 10])  # 10: every image over it, torchvision's NMS takes over
def test_nms_by_image_is_torchvision_batched_nms(max_per_image, monkeypatch):
    """Same boxes kept, in the same order, for clusters of overlapping boxes spread over many images."""
    import torch
    from torchvision.ops import batched_nms

    from common import mtcnn
    from common.mtcnn import nms_by_image

    monkeypatch.setattr(mtcnn, "MAX_PER_IMAGE", max_per_image)

    g = torch.Generator().manual_seed(3)
    for n_img, k in [(1, 50), (7, 400), (40, 3000)]:
        centre = torch.rand(k, 2, generator=g) * 100
        size = 5 + torch.rand(k, 2, generator=g) * 20
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
        scores = torch.rand(k, generator=g)
        image = torch.randint(0, n_img, (k,), generator=g)
        for t in (0.5, 0.7):
            want = batched_nms(boxes, scores, image, t)
            assert torch.equal(nms_by_image(boxes, scores, image, t, budget=5000), want)  # IoU in slices
            assert torch.equal(nms_by_image(boxes, scores, image, t, hold=20_000), want)  # loops in slices
    assert len(nms_by_image(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)) == 0


@pytest.mark.parametrize("max_per_image", [4096, 10])
def test_nms_by_image_min_is_facenet_nms_numpy_per_image(max_per_image, monkeypatch):
    """overlap="min" keeps, per image, what facenet-pytorch's nms_numpy(..., "Min") keeps on that image
    alone, equal scores included (the later box first, as nms_numpy on a few boxes)."""
    import torch
    from facenet_pytorch.models.utils.detect_face import nms_numpy

    from common import mtcnn
    from common.mtcnn import nms_by_image

    monkeypatch.setattr(mtcnn, "MAX_PER_IMAGE", max_per_image)
    g = torch.Generator().manual_seed(4)
    for n_img, k, ties in [(1, 12, True), (9, 100, True), (30, 900, False)]:
        centre = torch.rand(k, 2, generator=g) * 60
        size = 5 + torch.rand(k, 2, generator=g) * 20
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1).round()
        scores = (torch.rand(k, generator=g) * 4).round() / 4 if ties else torch.rand(k, generator=g)
        image = torch.randint(0, n_img, (k,), generator=g)
        got = nms_by_image(boxes, scores, image, 0.7, overlap="min")
        assert torch.all(scores[got][:-1] >= scores[got][1:])
        for i in range(n_img):
            idx = torch.nonzero(image == i)[:, 0]
            if ties and len(idx) > 16:  # numpy's argsort is stable only on short arrays
                continue
            want = idx[torch.as_tensor(nms_numpy(boxes[idx].numpy(), scores[idx].numpy(), 0.7, "Min"), dtype=torch.long)]
            assert sorted(got[image[got] == i].tolist()) == sorted(want.tolist()), (n_img, i)


def test_size_groups_pool_sizes_without_widening_a_batch_of_one_size():
    """Every image in one group; a batch of one size is one canvas; a few odd sizes beside 240 video
    frames do not widen the frames' canvas; 256 sizes all different share a few canvases, none padded
    past twice its pixels; waste=1 is one group per size."""
    from common.align import DETECT_CALL, size_groups

    def check(sizes, groups):
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
        for g in groups:
            h, w = max(sizes[i][0] for i in g), max(sizes[i][1] for i in g)
            assert h * w * len(g) <= 2 * sum(sizes[i][0] * sizes[i][1] for i in g)
        return groups

    assert check([(360, 640)] * 9, size_groups([(360, 640)] * 9, call=DETECT_CALL)) == [list(range(9))]
    sizes = [(360, 640)] * 240 + [(512, 512)] * 5 + [(478, 640), (112, 112), (231, 440), (107, 189)] * 4
    groups = check(sizes, size_groups(sizes, call=DETECT_CALL))
    frames = next(g for g in groups if 0 in g)
    assert (max(sizes[i][0] for i in frames), max(sizes[i][1] for i in frames)) == (360, 640)
    assert len(groups) <= 3
    assert len(size_groups(sizes)) < len(groups) or len(groups) == 1  # with no cost per call, pooled freely
    rng = np.random.default_rng(0)
    mixed = [(int(h), int(w)) for h, w in rng.integers(100, 641, (256, 2))]
    assert len(set(mixed)) == 256
    assert len(check(mixed, size_groups(mixed, call=DETECT_CALL))) <= 8
    assert sorted(map(sorted, size_groups(sizes, waste=1.0))) == sorted(
        [i for i, s in enumerate(sizes) if s == size] for size in set(sizes))


def test_cpu_nms_keeps_for_each_image_what_it_keeps_alone():
    """common.mtcnn._nms on the CPU, one call over many images: each image keeps exactly the boxes it keeps
    alone, wherever it sits in the batch. One call over the batch shifted each image's boxes by a multiple of
    its index, and float32 rounding then flipped pairs that overlap by just about the threshold; ties of
    equal scores went another way too."""
    import torch

    from common.mtcnn import _nms

    g = torch.Generator().manual_seed(7)
    n, side = 2000, 100.0
    for overlap, d in (("iou", 0.3 * side / 1.7), ("min", 0.3 * (side + 1))):  # the shift that overlaps by 0.7
        a = torch.rand(n, 1, 2, generator=g) * 500 + torch.rand(n, 1, 2, generator=g)  # fractional, as stage 2's
        shift = d + (torch.rand(n, 1, generator=g) - 0.5) * 2e-3
        first = torch.cat([a, a + side], 2)
        second = first + torch.cat([shift, torch.zeros_like(shift)] * 2, 1)[:, None]
        boxes = torch.cat([first, second], 1)  # (n, 2, 4)
        scores = torch.tensor([0.9, 0.8]).repeat(n, 1)
        scores[::3] = 1.0  # and ties
        image = torch.arange(n).repeat_interleave(2)
        together = _nms(boxes.reshape(-1, 4), scores.reshape(-1), image, 0.7, overlap)
        for i in range(n):
            alone = _nms(boxes[i], scores[i], torch.zeros(2, dtype=torch.long), 0.7, overlap) + 2 * i
            assert torch.equal(together[image[together] == i], alone), (overlap, i)


def test_a_dataset_face_box_picks_its_face_in_a_photo_of_several(face_dir, detector):
    """AffectNet gives a face box per image: the face searched for is the one around it, not the one nearest
    the centre, with its landmarks in the whole image's pixels."""
    from common.align import BatchDetector

    img = read_image(face_dir / "multi_face.jpg")
    boxes, probs, _ = detector.mtcnn.detect(img, landmarks=True)
    boxes = np.asarray(boxes, np.float64)[np.asarray(probs, np.float64) >= 0.9]
    assert len(boxes) >= 3
    x, det = _chw(img), BatchDetector()
    alone = det([x])[0]
    assert np.allclose(det([x], [np.full(4, np.nan)])[0][0], alone[0])  # NaN: no box, the whole image
    eyes = []
    for box in boxes:
        matrix, score = det([x], [box])[0]
        inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
        pts = TEMPLATE @ inv[:2, :2].T + inv[:2, 2]  # the five points the crop puts on the template
        assert score >= 0.9 and ((pts >= box[:2]) & (pts <= box[2:])).all(), box
        eyes.append(pts[:2].mean(0))
    assert len({tuple(np.round(e)) for e in eyes}) == len(boxes)  # a face of its own for each box
    far = det([x, x], [np.array([5000.0, 5000, 5100, 5100]), boxes[0]])
    assert far[0] == "the dataset's face box (5000, 5000, 5100, 5100) lies outside the 1000x667 image"
    assert far[1][1] >= 0.9


def test_shrinking_for_detection_holds_a_bounded_float_copy_and_finds_the_same_faces(face_dir, monkeypatch):
    """Images of one size are shrunk in chunks of at most RESIZE_BYTES of float pixels (32 twelve-megapixel
    photos were one 4.6 GB copy), and the chunks change nothing: the same faces, the same landmarks."""
    import torch.nn.functional as F

    import common.align
    from common.align import BatchDetector

    img = _chw(read_image(face_dir / "single_face.jpg"))
    imgs = [img, img.flip(2), img, img.flip(2), img]  # one size: one group
    whole = BatchDetector(detect_size=160)(imgs)
    sizes, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, *a, **k: sizes.append(len(x)) or interpolate(x, *a, **k))
    monkeypatch.setattr(common.align, "RESIZE_BYTES", 2 * 3 * img.shape[1] * img.shape[2] * 4)
    chunked = BatchDetector(detect_size=160)(imgs)
    assert sizes[:3] == [2, 2, 1]
    for a, b in zip(whole, chunked):
        assert a is not None and b is not None
        np.testing.assert_allclose(b[0], a[0], atol=1e-6)
        assert b[1] == pytest.approx(a[1])


def _count_ops(fn):
    """bench/pipeline.py's count of (aten ops, host waits) while fn runs, in inference mode as BatchDetector."""
    import torch

    from tests.conftest import bench_module

    with torch.inference_mode():
        return bench_module("pipeline").count_ops(fn)


def test_masked_pnet_dispatches_few_ops_for_its_masks(detector):
    """The three masks of _pnet (an image's own map after conv1, pool1 and conv3) are made on the host and sent
    in one copy: P-Net over a canvas of four sizes dispatches 36 aten ops (views included) where the masks
    built on the device took 67; a GPU's eager pass is bound by such small ops, one pyramid level each."""
    import torch

    from common.mtcnn import _pnet

    canvas = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    oh, ow = np.array([(31, 40), (24, 17), (13, 13), (40, 29)]).T
    ops, waits = _count_ops(lambda: _pnet(detector.mtcnn.pnet, canvas, oh, ow))
    assert ops <= 45 and waits == 0, (ops, waits)


def test_batched_mtcnn_host_waits_on_the_gpu_path(face_dir, detector, monkeypatch):
    """detect with the GPU's code path (summed-area table, nms_by_image) on a canvas of photos of three sizes:
    the host waits once per cut of the candidates, not once per tensor cut, and the NMS fixed point is
    compared every second round: 21 waits and 1,574 ops here (34 and 1,992 before); the answer is the one tested
    against facenet-pytorch above."""
    import torch

    from common import mtcnn as batched

    monkeypatch.setattr(batched, "_nms", _gpu_nms)
    names = ["0-f1-su-ph.jpg", "single_face.jpg", "multi_face.jpg"]
    imgs = [torch.from_numpy(read_image(face_dir / n)).permute(2, 0, 1).float() for n in names]
    sizes = [tuple(i.shape[1:]) for i in imgs]
    canvas = torch.zeros(len(imgs), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for k, i in enumerate(imgs):
        canvas[k, :, :i.shape[1], :i.shape[2]] = i
    found = []
    ops, waits = _count_ops(lambda: found.extend(batched.detect(canvas, detector.mtcnn, sizes=sizes, table=True)))
    assert len(found) == 3 and all(len(b) for b, _ in found)
    assert waits <= 22 and ops <= 1800, (ops, waits)  # 34 and 1,992 before; 24 with R-Net's cut a mask again


def test_a_candidate_that_clipping_leaves_empty_is_cut_before_its_crop(detector):
    """A box past its image's border has no pixels to crop: it is cut (one nonzero for every tensor), not
    resized from an empty crop."""
    import torch

    from common.mtcnn import Resizer, _crops_of

    img = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(3)) * 255
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0, 0.9], [40.0, 40.0, 50.0, 50.0, 0.9]])
    for table in (False, True):
        crops, kept, image = _crops_of(Resizer(img, table), boxes, torch.tensor([0, 0]), torch.tensor([30]),
                                       torch.tensor([30]), 24)
        assert crops.shape == (1, 3, 24, 24) and torch.equal(kept, boxes[:1]) and image.tolist() == [0]


def test_the_profiles_gpu_code_path_and_its_wait_count():
    """bench/pipeline.py --profile-detect on a CPU: the GPU's path is forced only inside gpu_code_path, and a
    value read back in inference mode (aten.item, not _local_scalar_dense) counts as a host wait."""
    import torch

    from common import align, mtcnn
    from tests.conftest import bench_module

    pipeline = bench_module("pipeline")
    x = torch.ones(2, 3)
    assert _count_ops(lambda: x.sum().item())[1] == 1
    cpu_call = align.DETECT_CALL_CPU
    with pipeline.gpu_code_path():
        assert mtcnn.Resizer(x, False).use_table and align.DETECT_CALL_CPU == align.DETECT_CALL
    assert not mtcnn.Resizer(x, False).use_table and align.DETECT_CALL_CPU == cpu_call

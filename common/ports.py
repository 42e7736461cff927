"""Teachers shipped for other runtimes (ONNX, TFLite), rebuilt as PyTorch modules so they run batched on any device.

Two ports, both rebuilt from the shipped weight file every time a teacher loads (under a second each on 2 CPU
cores, SFace the slowest at 0.7-0.9 s, so there is no conversion cache to go stale, and nothing is ever unpickled):

- onnx_module: the ONNX graph, cut at the embedding layer, with every constant sub-graph (SFace's 29 blocked int8
  `DequantizeLinear` weights and the Reshapes after them) folded to fp32 by ONNX's own reference evaluator, then
  converted by onnx2torch. onnxruntime does the same dequantisation in fp32, so the two agree to ~1e-6.
- TFLiteModule: a small interpreter of the few TFLite operators MobileNet-style graphs use (conv, depthwise conv,
  add, pad, dequantize), reading the flatbuffer with ai_edge_litert's schema. TFLite "hybrid" convolutions keep
  int8 weights and quantise their float input on the fly, one scale per image; the port does the same
  quantisation in float (round(x / s) * s), which is what makes it agree with LiteRT (cosine > 0.99), not
  just with the float model the weights came from.

The reference runtimes (onnxruntime, LiteRT) stay available: see common.teachers (`name@reference`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# onnx2torch knows the operators up to opset 17. These graphs are stamped 18 (age, gender) or 21 (SFace); the ops
# they use whose definition changed after 17 changed only in ways checked below, so the graph is relabelled 17.
ONNX2TORCH_OPSET = 17
# op -> why its newer version means the same here
_SAME_AS_17 = {
    "Pad": "18 added an optional `axes` input (checked absent)",
    "Flatten": "21 only admits more element types",
    "Reshape": "19/21 only admit more element types",
    "Constant": "19/21 only admit more element types",
    "Cast": "19/21 only admit more element types",
    "Identity": "19/21 only admit more element types",
    "DequantizeLinear": "folded away before conversion",
}


def onnx_graph(path, layer: str, name: str):
    """The ONNX model at `path` with one real input (batch left free) and tensor `layer` as its only output."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name for t in g.initializer}
    used = {i for node in g.node for i in node.input}
    # Old exporters list every initializer as a graph input too (SFace: 174 of them); onnxruntime would then
    # treat the weights as feedable and skip constant folding. Keep the one real input.
    inputs = [i for i in g.input if i.name not in inits and i.name in used]
    if len(inputs) != 1:
        raise ValueError(f"teacher {name}: expected one image input in {path}, found {[i.name for i in inputs]}")
    del g.input[:]
    g.input.extend(inputs)
    dims = g.input[0].type.tensor_type.shape.dim  # (the copy now in the graph, not the detached original)
    if len(dims):
        dims[0].dim_param = "batch"  # SFace is exported with batch 1
    layer = layer or g.output[0].name
    if layer not in {o for node in g.node for o in node.output}:
        # the inner tensors too (a layer is usually one of them), the last ones first: nearest the embedding
        inner = [o for node in reversed(g.node) for o in node.output if node.op_type not in ("Constant", "Shape")]
        raise ValueError(f"teacher {name}: no tensor {layer!r} in {path}; the graph outputs are "
                         f"{[o.name for o in g.output]}, its last tensors (any can be the layer) "
                         f"{inner[:12]}{' ...' if len(inner) > 12 else ''}")
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT, None))
    del g.value_info[:]  # exported shapes carry the old fixed batch
    return model


def _fold_constants(model) -> None:
    """Evaluate, in place, every node whose inputs are all constants, and drop what the output no longer needs."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opset = {o.domain: o.version for o in model.opset_import}
    const = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep = []
    for node in g.node:
        if node.domain in ("", "ai.onnx") and all(i in const or not i for i in node.input):
            outs = ReferenceEvaluator(node, opsets=opset).run(None, {i: const[i] for i in node.input if i})
            const.update(zip(node.output, outs))
        else:
            keep.append(node)
    needed = {o.name for o in g.output}
    live = []
    for node in reversed(keep):  # only nodes that reach the output
        if needed & set(node.output):
            live.append(node)
            needed |= set(node.input)
    del g.node[:]
    g.node.extend(live[::-1])
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(np.asarray(const[n]), n) for n in sorted(needed & set(const)))
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid(d, v) for d, v in opset.items()])


def onnx_module(path, layer: str, name: str) -> torch.nn.Module:
    """The ONNX model at `path`, cut at `layer`, as a torch module in eval mode (see the module docstring)."""
    from onnx.defs import get_schema

    from .weights import require

    onnx2torch = require("onnx2torch", "onnx2torch==1.5.15")
    model = onnx_graph(path, layer, name)
    _fold_constants(model)
    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if version > ONNX2TORCH_OPSET:
        for node in model.graph.node:
            same = (get_schema(node.op_type, version).since_version
                    == get_schema(node.op_type, ONNX2TORCH_OPSET).since_version)
            if not same and (node.op_type not in _SAME_AS_17 or (node.op_type == "Pad" and len(node.input) > 3)):
                raise ValueError(f"teacher {name}: cannot convert {node.op_type} of opset {version} to PyTorch; "
                                 f"use the reference runtime ({name}@reference)")
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = ONNX2TORCH_OPSET
    try:
        return onnx2torch.convert(model).eval()
    except (NotImplementedError, KeyError, ValueError) as e:
        raise ValueError(f"teacher {name}: onnx2torch cannot convert {path} ({e}); "
                         f"use the reference runtime ({name}@reference)") from None


def tflite_expose(content: bytes, layer: str) -> bytes:
    """Rewrite a .tflite so that tensor `layer` is the only output, dropping the ops it does not depend on.

    Intermediate tensors of a delegated (XNNPACK) graph cannot be read, and preserving all tensors means running
    without the delegate (slow). Making the layer a real output keeps the fast path, and cutting the classifier
    head also removes its fixed-batch reshape, so the input can be resized for batching.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(content, 0)
    sg = model.subgraphs[0]
    names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in sg.tensors]
    if layer not in names:
        raise ValueError(f"no tensor {layer!r} in the model; spatial tensors include "
                         f"{[n for n, t in zip(names, sg.tensors) if t.shape is not None and len(t.shape) == 4][-8:]}")
    target = names.index(layer)
    needed, keep = {target}, []
    for op in reversed(sg.operators):
        if needed & set(op.outputs):
            keep.append(op)
            needed |= {int(i) for i in op.inputs if i >= 0}
    sg.operators, sg.outputs = keep[::-1], np.array([target], dtype=np.int32)
    model.signatureDefs = None  # they name the old outputs
    builder = flatbuffers.Builder(len(content) + (1 << 16))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _quantise_per_image(x: torch.Tensor) -> torch.Tensor:
    """LiteRT's hybrid-op input quantisation, in float: symmetric int8 with one scale per image (max |x| / 127),
    for a convolution's map as for a fully connected layer's row.

    The gradient passes straight through, so the port can still be fine-tuned (transfer.py's P-CNN)."""
    scale = x.abs().amax(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-30).detach() / 127
    q = torch.round(x / scale).clamp(-127, 127) * scale
    return x + (q - x).detach() if x.requires_grad else q


class TFLiteModule(torch.nn.Module):
    """A TFLite graph of CONV_2D, DEPTHWISE_CONV_2D, ADD, PAD, DEQUANTIZE and FULLY_CONNECTED ops, cut at `layer`,
    in PyTorch.

    Takes and returns NHWC float tensors, as the .tflite does (a fully connected layer's output: (N, units));
    runs NCHW (channels_last) inside.
    """

    OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "PAD", "DEQUANTIZE", "FULLY_CONNECTED")

    def __init__(self, content: bytes, layer: str, name: str):
        super().__init__()
        from ai_edge_litert import schema_py_generated as schema

        try:
            content = tflite_expose(content, layer)
        except ValueError as e:
            raise ValueError(f"teacher {name}: {e}") from None
        model = schema.ModelT.InitFromPackedBuf(content, 0)
        sg = model.subgraphs[0]
        codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.input, self.output = int(sg.inputs[0]), int(sg.outputs[0])

        def data(i):
            t = sg.tensors[i]
            buf = model.buffers[t.buffer].data
            if buf is None:
                return None
            dtype = {"FLOAT32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "INT8": np.int8}[types[t.type]]
            return np.frombuffer(np.asarray(buf, np.uint8).tobytes(), dtype).reshape(t.shape)

        def dequantize(i, hybrid):
            q, t = data(i), sg.tensors[i]
            scale = np.asarray(t.quantization.scale, np.float32)
            zero = np.asarray(t.quantization.zeroPoint, np.float32)
            if hybrid:
                # hybrid kernels read the weights as symmetric int8 whatever the declared type (old converters
                # stored them as UINT8 with zero point 0)
                if zero.any():
                    raise ValueError(f"teacher {name}: hybrid weights {t.name} have a zero point")
                q = q.view(np.int8)
            shape = [-1 if d == t.quantization.quantizedDimension else 1 for d in range(q.ndim)] if scale.size > 1 \
                else [1] * q.ndim
            return (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)

        self.steps, consts = [], {}
        for k, op in enumerate(sg.operators):
            code = codes.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                                 model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode))
            if code not in self.OPS:
                raise ValueError(f"teacher {name}: the PyTorch port has no TFLite {code}; "
                                 f"use the reference runtime ({name}@reference)")
            ins, out = [int(i) for i in op.inputs], int(op.outputs[0])
            opt = op.builtinOptions
            if code == "DEQUANTIZE":
                consts[out] = dequantize(ins[0], hybrid=False)
                continue
            if code == "PAD":
                pads = data(ins[1])  # NHWC (before, after) pairs -> F.pad's last-dim-first order for NCHW
                step = dict(op="pad", pad=tuple(int(v) for d in (2, 1, 3, 0) for v in pads[d]))
            elif code == "ADD":
                step = dict(op="add", act=opt.fusedActivationFunction)
            else:  # CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: weights (float or int8 "hybrid"), a bias or none
                w = ins[1]
                hybrid = types[sg.tensors[w].type] in ("UINT8", "INT8")
                weight = consts[w] if w in consts else dequantize(w, hybrid=True) if hybrid else data(w)
                bias = f"b{k}" if len(ins) > 2 and ins[2] >= 0 else None
                step = dict(w=f"w{k}", b=bias, act=opt.fusedActivationFunction, hybrid=hybrid)
                if code == "FULLY_CONNECTED":
                    if opt.keepNumDims or (hybrid and opt.asymmetricQuantizeInputs):
                        raise ValueError(f"teacher {name}: the PyTorch port has no FULLY_CONNECTED with "
                                         f"keep_num_dims or asymmetric input quantisation; use the reference runtime "
                                         f"({name}@reference)")
                    weight = torch.tensor(weight)  # (units, inputs), as F.linear takes it
                    step.update(op="fc")
                else:
                    depthwise = code == "DEPTHWISE_CONV_2D"
                    # TFLite OHWI (conv) / 1HWC (depthwise) -> torch OIHW
                    weight = torch.tensor(weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2))
                    weight = weight.contiguous(memory_format=torch.channels_last)
                    step.update(op="conv", stride=(opt.strideH, opt.strideW),
                                dilation=(opt.dilationHFactor, opt.dilationWFactor),
                                same=opt.padding == schema.Padding.SAME, groups=weight.shape[0] if depthwise else 1)
                # parameters, not buffers: transfer.py's P-CNN fine-tunes a teacher's layers
                self.register_parameter(f"w{k}", torch.nn.Parameter(weight))
                if bias:
                    self.register_parameter(bias, torch.nn.Parameter(torch.tensor(data(ins[2]))))
            step.update(ins=ins[:2] if code == "ADD" else ins[:1], out=out)
            self.steps.append(step)
        # free each activation after its last reader: a batch of 200x200 MobileNet maps is GBs if all are kept
        last = {}
        for k, s in enumerate(self.steps):
            last.update((i, k) for i in s["ins"])
        for k, s in enumerate(self.steps):
            s["free"] = [i for i in s["ins"] if last[i] == k and i != self.output]

    @staticmethod
    def _act(x, act):
        if act == 0:
            return x
        lo, hi = {1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}[act]  # RELU, RELU_N1_TO_1, RELU6
        return x.clamp(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input: x.permute(0, 3, 1, 2)}
        for s in self.steps:
            a = values[s["ins"][0]]
            if s["op"] == "pad":
                y = F.pad(a, s["pad"])
            elif s["op"] == "add":
                y = self._act(a + values[s["ins"][1]], s["act"])
            elif s["op"] == "fc":
                # TFLite flattens its NHWC input row by row: back to that order from the NCHW kept inside
                a = (a.permute(0, 2, 3, 1) if a.ndim == 4 else a).reshape(a.shape[0], -1)
                if s["hybrid"]:
                    a = _quantise_per_image(a)
                w = getattr(self, s["w"])
                y = self._act(F.linear(a, w, getattr(self, s["b"]) if s["b"] else None), s["act"])
            else:
                w = getattr(self, s["w"])
                if s["same"]:  # TensorFlow's SAME: the odd pixel of padding goes after (bottom/right)
                    pad = []
                    for size, k, st, d in zip(a.shape[:1:-1], w.shape[:1:-1], s["stride"][::-1], s["dilation"][::-1]):
                        total = max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
                        pad += [total // 2, total - total // 2]
                    a = F.pad(a, pad)
                if s["hybrid"]:
                    a = _quantise_per_image(a)
                y = F.conv2d(a, w, getattr(self, s["b"]) if s["b"] else None, s["stride"], 0, s["dilation"],
                             s["groups"])
                y = self._act(y, s["act"])
            for i in s["free"]:
                del values[i]
            values[s["out"]] = y
        y = values[self.output]
        return y.permute(0, 2, 3, 1) if y.ndim == 4 else y

"""The student E^G_unique of the paper (section 3.3): one light CNN mapping a face crop straight to h_G.

The paper distils into "a ResNet-18" of 2.2 M parameters, which a full ResNet-18 (11.2 M without its
classifier) is not: so the default is torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2], same stem,
same init, same forward) with every channel count multiplied by WIDTH = 0.42, i.e. stages of
27/54/108/215 channels, followed by one linear projection of the pooled features to h_G. With the
paper's h_G of 1024 that is 1,981,088 backbone + 221,184 projection = 2,202,272 parameters.
--arch resnet18 is the full-width network (11,701,824 parameters with a 1024-wide h_G) and --width
any other multiplier; at width 1 the backbone's state dict is exactly torchvision's resnet18's.
0.42 gives channel counts that are not multiples of 8, which GPU tensor cores prefer: --width 0.375
(24/48/96/192 channels, 1.77 M parameters) is the aligned choice to time on a GPU.

Input: N x 3 x S x S RGB pixels in 0..255 (uint8 or float), the canonical aligned crop of
common.align resized to S; the ImageNet normalisation happens inside, so exported models take
pixels as they are. Output: N x out_dim, the estimate of h_G (or of h_MT for the one-step variant).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from common.files import atomic_write

WIDTH = 0.42
ARCHS = ("resnet18w", "resnet18")
DEFAULT = {"arch": "resnet18w", "width": WIDTH, "out_dim": 1024, "size": 112}  # scratch's network without a student
_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def stage_widths(width: float) -> list[int]:
    return [max(1, round(64 * width * 2 ** i)) for i in range(4)]


class ScaledResNet18(ResNet):
    """torchvision's ResNet with BasicBlocks [2, 2, 2, 2] and channels scaled by `width`.

    Subclassing keeps torchvision's forward and initialisation; only the channel counts change, by
    rebuilding the stem before the first stage is made (torchvision hard-codes 64 there).
    """

    def __init__(self, width: float = 1.0):
        object.__setattr__(self, "_pending", stage_widths(width))
        super().__init__(BasicBlock, [2, 2, 2, 2])
        del self._pending
        self.fc = nn.Identity()  # the projection to h_G lives in Student, outside the backbone
        self.out_features = self.inplanes

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if len(self._pending) == 4:  # first stage: the stem must match its width
            self.inplanes = self._pending[0]
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(self.inplanes)
        planes = self._pending.pop(0)
        return super()._make_layer(block, planes, blocks, stride, dilate)


class Student(nn.Module):
    def __init__(self, arch: str = "resnet18w", width: float = WIDTH, out_dim: int = 1024):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown student architecture {arch!r}: choose from {', '.join(ARCHS)}")
        if arch == "resnet18":
            width = 1.0
        self.config = {"arch": arch, "width": float(width), "out_dim": int(out_dim)}
        self.backbone = ScaledResNet18(width)
        self.proj = nn.Linear(self.backbone.out_features, out_dim)
        self.register_buffer("pixel_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return self.proj(self.backbone(x))


def build_student(arch: str = "resnet18w", width: float = WIDTH, out_dim: int = 1024) -> Student:
    return Student(arch, width, out_dim)


def head(d_in: int, n_out: int, hidden: int, widths: list[int] | None = None) -> nn.Module:
    """The MLP C_(t,d) put on an embedding; `widths` gives G-shaped layers for the concat baseline."""
    widths = widths or [d_in, hidden]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(0.2)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], n_out))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_student(student: Student, path, extra: dict | None = None, tensors: dict | None = None) -> None:
    """Weights as safetensors with the config (and whatever `extra` says, e.g. the input size) in its
    metadata, so a checkpoint alone rebuilds the network. `tensors` adds more weights (a decoder)."""
    from safetensors.torch import save

    state = {f"student.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    state.update({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    meta = {"config": json.dumps({**student.config, **(extra or {})})}
    atomic_write(Path(path), lambda f: f.write(save(state, metadata=meta)))


class NotAStudent(ValueError):
    """A file given as a student checkpoint that is not one."""


PINNED: dict[str, bytes] = {}  # student file (resolved) -> its bytes as pin() read them, until the main returns


def student_file(path) -> Path:
    """The checkpoint file a --student names: the file, or a distill.py run folder's final student."""
    path = Path(path)
    return path / "student.safetensors" if path.is_dir() else path  # a run folder: its final student


def pin(path) -> str:
    """Read a student file once for the rest of the script's main, and return its sha256: every later load of
    it takes these bytes. transfer.py loads the student again for each method and task, and a distill.py
    --overwrite of its folder meanwhile gave the methods of one report other students under the sha it
    recorded. (common.runs.holding_runs lets go of them.)"""
    path = student_file(path)
    read_checkpoint(path, tensors=False)  # a file that is no student is refused from its header, not read whole
    data = PINNED[str(path.resolve())] = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(path, tensors: bool = True) -> tuple[dict, dict | None]:
    """(config, every tensor) of a file written by save_student; tensors=False reads the config alone (the
    file's header). A file pin() read is taken from its bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = student_file(path)
    data = PINNED.get(str(path.resolve()))
    if data is None and not path.is_file():
        raise FileNotFoundError(f"no student checkpoint at {path}")
    try:
        if data is None:  # one read for config and tensors (two could meet two files, one replaced between)
            data = path.read_bytes() if tensors else _header_bytes(path)
        size = int.from_bytes(data[:8], "little")  # safetensors: the header's length (8 bytes), its JSON, the tensors
        if len(data) < 8 or size > min(len(data) - 8, HEADER_LIMIT):
            raise ValueError(f"a header of {size} bytes, where {max(len(data) - 8, 0)} follow")
        header = json.loads(data[8:8 + size])
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        cfg = json.loads(meta["config"]) if isinstance(meta, dict) and isinstance(meta.get("config"), str) else {}
        if not isinstance(cfg, dict) or not {"arch", "width", "out_dim"} <= set(cfg):
            raise NotAStudent(f"{path} is not a student checkpoint (its metadata has no student config: arch, "
                              f"width, out_dim); pass a distill.py run folder or its student.safetensors")
        return cfg, load(data) if tensors else None
    except NotAStudent:
        raise
    except (SafetensorError, ValueError, RecursionError) as e:  # (json's errors and UnicodeDecodeError are ValueErrors)
        raise NotAStudent(f"{path} is not a student checkpoint: not a readable safetensors file ({e})") from None


HEADER_LIMIT = 100 * 2 ** 20  # safetensors' own bound on a header


def _header_bytes(path: Path) -> bytes:
    """The first 8 bytes of a safetensors file and the header they announce (at most HEADER_LIMIT of it)."""
    with open(path, "rb") as f:
        head = f.read(8)
        return head + f.read(min(int.from_bytes(head, "little"), HEADER_LIMIT))


def student_like(cfg: dict) -> Student:
    """A freshly initialised network of a checkpoint's architecture, a pruned one's smaller layers included."""
    student = build_student(cfg["arch"], cfg["width"], cfg["out_dim"])
    if cfg.get("pruned"):  # a transfer.py --method etl network: smaller layers, shapes in the metadata
        from common.prune import apply_shapes

        apply_shapes(student, cfg["pruned"])
    return student


def load_student(path, device="cpu") -> tuple[Student, dict]:
    """(student in eval mode, config) from a checkpoint file or a distill.py run folder.

    config holds arch, width, out_dim, size (input side), embedding (which h_G) and loss; a pruned
    student (transfer.py --method etl) also its layer shapes ("pruned") and what it was pruned for ("etl").
    """
    cfg, tensors = read_checkpoint(path)
    try:  # a config its tensors do not fit (an edited file, another tool's): the file's fault, said in one line
        # sized without memory first: a 172-byte file whose config said out_dim 2,500,000 took 2.7 GB to refuse
        with torch.device("meta"):
            planned = sum(t.numel() for t in student_like(cfg).state_dict().values())
        held = sum(t.numel() for k, t in tensors.items() if k.startswith("student."))
        if planned != held:
            raise ValueError(f"the config describes {planned:,} values, the file holds {held:,}")
        student = student_like(cfg)
        student.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = " ".join(str(e).split())
        raise NotAStudent(f"{path}: its weights do not fit the network its config describes "
                          f"({ {k: cfg[k] for k in ('arch', 'width', 'out_dim')} }): {why[:300]}") from None
    return student.to(device).eval(), cfg
